"""``fact evaluate``: the dataset-level figures of spec section 5.

Over an evaluation split, for the predicted class of every image:

* accuracy of the backbone alone (concept layers skipped) and of the FaCT model;
* per concept layer: image-L0 (concepts with any activation per image), the number
  of concepts needed to cover 80 % of the positive contribution, the share of alive
  concepts (active in at least one image), always-active concepts (active in more
  than 85 % of images), the reconstruction error ``Σ‖f − f̂‖² / Σ‖f‖²``, the
  largest completeness residual (absolute and relative to ``Σ|contributions|``),
  and how many concepts are *shared*: carry ≥ 5 % of the positive contribution, on
  average, for two or more classes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fact_model._validation import check_same_classes
from fact_model.bcos.encoding import encode_rgb
from fact_model.data.loading import ImageSplit
from fact_model.distributed import SINGLE_PROCESS, DistributedContext
from fact_model.explanation import rank_classes
from fact_model.model import FaCTModel

__all__ = ["EvaluationReport", "LayerFigures", "evaluate", "gather_skipped"]

ALWAYS_ACTIVE_FRACTION = 0.85
COVERAGE = 0.8
SHARED_SHARE = 0.05


@dataclass
class LayerFigures:
    """Figures of one concept layer (see the module docstring)."""

    layer: str
    num_concepts: int
    k: int
    image_l0_mean: float
    concepts_for_80_percent_mean: float
    alive_fraction: float
    always_active: int
    reconstruction_nmse: float
    max_residual: float
    max_relative_residual: float
    shared_concepts: int
    concepts_supporting_a_class: int


@dataclass
class EvaluationReport:
    """Everything ``fact evaluate`` reports; ``to_json``/``to_markdown`` write it out."""

    images: int
    num_classes: int
    backbone_accuracy: float
    fact_accuracy: float
    layers: list[LayerFigures] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def to_markdown(self, title: str = "FaCT evaluation") -> str:
        lines = [
            f"# {title}",
            "",
            f"{self.images} images, {self.num_classes} classes. Data: `{json.dumps(self.data)}`",
            "",
            "| model | accuracy |",
            "|---|---:|",
            f"| backbone alone | {self.backbone_accuracy:.2%} |",
            f"| FaCT (concept layers in place) | {self.fact_accuracy:.2%} |",
            "",
            "| layer | K / k | image-L0 | concepts for 80 % | alive | always active (>85 %) "
            "| recon. NMSE | max residual (rel.) | shared (≥5 % for ≥2 classes) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for f in self.layers:
            lines.append(
                f"| {f.layer} | {f.num_concepts} / {f.k} | {f.image_l0_mean:.1f} "
                f"| {f.concepts_for_80_percent_mean:.1f} "
                f"| {f.alive_fraction:.1%} | {f.always_active} | {f.reconstruction_nmse:.4f} "
                f"| {f.max_residual:.1e} ({f.max_relative_residual:.1e}) "
                f"| {f.shared_concepts} of {f.concepts_supporting_a_class} |"
            )
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``evaluation.json`` and ``evaluation.md`` into ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = out_dir / "evaluation.json", out_dir / "evaluation.md"
        for path, text in zip(paths, (self.to_json(), self.to_markdown()), strict=True):
            tmp = path.with_name(f".{path.name}.tmp")  # a reader never sees half a report
            tmp.write_text(text)
            tmp.replace(path)
        return paths


def _concepts_to_cover(contributions: Tensor, fraction: float) -> Tensor:
    """Per row: how many of the largest positive contributions reach ``fraction`` of their total."""
    positive = contributions.clamp(min=0).sort(dim=1, descending=True).values
    cumulative = positive.cumsum(dim=1)
    total = cumulative[:, -1:]
    reached = cumulative >= fraction * total
    return reached.float().argmax(dim=1) + 1


@torch.no_grad()
def _reconstruction(model: FaCTModel, x6: Tensor, layer: str) -> tuple[float, float]:
    features = model.features_at(x6, layer)
    recon = model.concept_layer(layer)(features)
    return float((features - recon).square().sum()), float(features.square().sum())


def evaluate(
    model: FaCTModel,
    split: ImageSplit,
    batch_size: int = 200,
    progress: bool = True,
    data: dict | None = None,
    context: DistributedContext = SINGLE_PROCESS,
) -> EvaluationReport:
    """Evaluate ``model`` on ``split``, streamed in batches (unreadable images are left out and reported).

    Args:
        data: the description recorded in the report (default: ``split.description``).
        context: under ``torchrun``, every rank calls this with its context: each reads its shard of
            whole batches (:meth:`~fact_model.distributed.DistributedContext.shard`, ``block=batch_size``)
            and every rank returns the same report, that of the whole split. Counts, accuracies and
            everything derived from per-image integers or maxima equal the single-process figures
            exactly; the reconstruction NMSE and the mean shares behind ``shared_concepts`` are float64
            sums and agree to about 1e-12 relative (a share within that of 5 % could flip a concept).
            ``split.skipped`` afterwards holds every rank's unreadable items.

    Raises:
        ValueError: the split's classes are not the model's, or no image in it is readable.
    """
    check_same_classes(split.class_names, model.class_names)
    model.eval()
    names = [info.name for info in model.concept_layers]
    k_of = {info.name: info for info in model.concept_layers}
    classes = model.num_classes
    # Per-rank tallies; integers (exact in any order) where the figure is a count, float64 sums otherwise.
    counts = torch.zeros(3, dtype=torch.long)  # images, correct (FaCT), correct (backbone alone)
    class_count = torch.zeros(classes, dtype=torch.long)  # images per predicted class
    l0_sum = {n: torch.zeros((), dtype=torch.long) for n in names}  # Σ_images active concepts
    cover_sum = {n: torch.zeros((), dtype=torch.long) for n in names}  # Σ_images concepts for 80 %
    active_images = {n: torch.zeros(k_of[n].num_concepts, dtype=torch.long) for n in names}  # (K,)
    share_sum = {n: torch.zeros(classes, k_of[n].num_concepts, dtype=torch.float64) for n in names}  # (classes, K)
    recon = {n: torch.zeros(2, dtype=torch.float64) for n in names}  # Σ‖f − f̂‖², Σ‖f‖²
    maxima = {n: torch.zeros(2, dtype=torch.float64) for n in names}  # max residual, max relative residual
    pin = model.device.type == "cuda"
    order = context.shard(len(split), block=batch_size)
    batches = split.batches(
        batch_size, order=order, pin_memory=pin, progress=progress and context.is_main, desc="evaluate"
    )
    for batch in batches:
        if not len(batch):
            continue
        x = batch.float_images(model.device)
        labels = batch.labels.to(model.device)
        with torch.no_grad():
            backbone_scores = model.forward_encoded(encode_rgb(x), concepts=False).scores
        expl = model.explain(x, top_k=0)
        counts += torch.tensor(
            [len(batch), int((expl.target == labels).sum()), int((rank_classes(backbone_scores)[:, 0] == labels).sum())]
        )
        target = expl.target.cpu()
        class_count += torch.bincount(target, minlength=classes)
        for n in names:
            contributions = expl.contributions[n].cpu()  # (B, K)
            active = expl.activations[n].cpu() > 0  # (B, K)
            l0_sum[n] += active.sum()
            cover_sum[n] += _concepts_to_cover(contributions, COVERAGE).sum()
            active_images[n] += active.sum(dim=0)
            positive = contributions.clamp(min=0)
            shares = positive / positive.sum(dim=1, keepdim=True).clamp_min(1e-30)  # (B, K)
            share_sum[n].index_add_(0, target, shares.double())
            scale = contributions.abs().sum(dim=1).clamp_min(1e-30)
            residuals = expl.residuals[n].cpu()
            batch_max = torch.tensor([float(residuals.max()), float((residuals / scale).max())], dtype=torch.float64)
            maxima[n] = torch.maximum(maxima[n], batch_max)
            err, total = _reconstruction(model, encode_rgb(x), n)
            recon[n] += torch.tensor([err, total], dtype=torch.float64)
    # One reduction per tally: sums of counts and float64 sums, maxima of maxima.
    counts, class_count = context.all_reduce_sum(counts), context.all_reduce_sum(class_count)
    for n in names:
        l0_sum[n], cover_sum[n] = context.all_reduce_sum(l0_sum[n]), context.all_reduce_sum(cover_sum[n])
        active_images[n], share_sum[n] = context.all_reduce_sum(active_images[n]), context.all_reduce_sum(share_sum[n])
        recon[n], maxima[n] = context.all_reduce_sum(recon[n]), context.all_reduce_max(maxima[n])
    gather_skipped(split, context)
    images, correct_fact, correct_backbone = (int(c) for c in counts)
    if images == 0:
        raise ValueError(f"no readable image in {split!r}")
    report = EvaluationReport(
        images=images,
        num_classes=classes,
        backbone_accuracy=correct_backbone / images,
        fact_accuracy=correct_fact / images,
        data=dict(split.description if data is None else data),
    )
    for n in names:
        mean_share = share_sum[n] / class_count.clamp_min(1)[:, None]  # (classes, K)
        supports = mean_share >= SHARED_SHARE
        report.layers.append(
            LayerFigures(
                layer=n,
                num_concepts=k_of[n].num_concepts,
                k=k_of[n].k,
                image_l0_mean=int(l0_sum[n]) / images,
                concepts_for_80_percent_mean=int(cover_sum[n]) / images,
                alive_fraction=float((active_images[n] > 0).double().mean()),
                always_active=int((active_images[n] > ALWAYS_ACTIVE_FRACTION * images).sum()),
                reconstruction_nmse=float(recon[n][0]) / max(float(recon[n][1]), 1e-30),
                max_residual=float(maxima[n][0]),
                max_relative_residual=float(maxima[n][1]),
                shared_concepts=int((supports.sum(dim=0) >= 2).sum()),
                concepts_supporting_a_class=int((supports.sum(dim=0) >= 1).sum()),
            )
        )
    return report


def gather_skipped(split: ImageSplit, context: DistributedContext) -> None:
    """After a sharded pass: every rank's unreadable items into ``split.skipped`` (on every rank)."""
    if context.is_distributed:
        for skipped in context.all_gather_object(dict(split.skipped)):
            split.skipped.update(skipped)
