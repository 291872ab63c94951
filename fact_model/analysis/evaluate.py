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
from fact_model.explanation import rank_classes
from fact_model.model import FaCTModel

__all__ = ["EvaluationReport", "LayerFigures", "evaluate"]

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
        (out_dir / "evaluation.json").write_text(self.to_json())
        (out_dir / "evaluation.md").write_text(self.to_markdown())
        return out_dir / "evaluation.json", out_dir / "evaluation.md"


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
) -> EvaluationReport:
    """Evaluate ``model`` on ``split``, streamed in batches (unreadable images are left out and reported).

    Args:
        data: the description recorded in the report (default: ``split.description``).

    Raises:
        ValueError: the split's classes are not the model's, or no image in it is readable.
    """
    check_same_classes(split.class_names, model.class_names)
    model.eval()
    names = [info.name for info in model.concept_layers]
    k_of = {info.name: info for info in model.concept_layers}
    correct_fact = correct_backbone = 0
    l0 = {n: [] for n in names}
    cover = {n: [] for n in names}
    active_images = {n: torch.zeros(k_of[n].num_concepts) for n in names}
    share_sum = {n: torch.zeros(model.num_classes, k_of[n].num_concepts) for n in names}
    class_count = torch.zeros(model.num_classes)
    recon = {n: [0.0, 0.0] for n in names}
    max_res = {n: 0.0 for n in names}
    max_rel = {n: 0.0 for n in names}
    images = 0
    pin = model.device.type == "cuda"
    for batch in split.batches(batch_size, pin_memory=pin, progress=progress, desc="evaluate"):
        if not len(batch):
            continue
        images += len(batch)
        x = batch.float_images(model.device)
        labels = batch.labels.to(model.device)
        with torch.no_grad():
            backbone_scores = model.forward_encoded(encode_rgb(x), concepts=False).scores
        correct_backbone += int((rank_classes(backbone_scores)[:, 0] == labels).sum())
        expl = model.explain(x, top_k=0)
        correct_fact += int((expl.target == labels).sum())
        class_count += torch.bincount(expl.target, minlength=model.num_classes).float()
        for n in names:
            contributions = expl.contributions[n]
            active = expl.activations[n] > 0
            l0[n].append(active.sum(dim=1).float())
            cover[n].append(_concepts_to_cover(contributions, COVERAGE).float())
            active_images[n] += active.sum(dim=0).float()
            positive = contributions.clamp(min=0)
            shares = positive / positive.sum(dim=1, keepdim=True).clamp_min(1e-30)
            share_sum[n].index_add_(0, expl.target, shares)
            scale = contributions.abs().sum(dim=1).clamp_min(1e-30)
            max_res[n] = max(max_res[n], float(expl.residuals[n].max()))
            max_rel[n] = max(max_rel[n], float((expl.residuals[n] / scale).max()))
            err, total = _reconstruction(model, encode_rgb(x), n)
            recon[n][0] += err
            recon[n][1] += total
    if images == 0:
        raise ValueError(f"no readable image in {split!r}")
    report = EvaluationReport(
        images=images,
        num_classes=model.num_classes,
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
                image_l0_mean=float(torch.cat(l0[n]).mean()),
                concepts_for_80_percent_mean=float(torch.cat(cover[n]).mean()),
                alive_fraction=float((active_images[n] > 0).float().mean()),
                always_active=int((active_images[n] > ALWAYS_ACTIVE_FRACTION * images).sum()),
                reconstruction_nmse=recon[n][0] / max(recon[n][1], 1e-30),
                max_residual=max_res[n],
                max_relative_residual=max_rel[n],
                shared_concepts=int((supports.sum(dim=0) >= 2).sum()),
                concepts_supporting_a_class=int((supports.sum(dim=0) >= 1).sum()),
            )
        )
    return report
