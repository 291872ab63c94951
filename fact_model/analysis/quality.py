"""Concept quality of a FaCT model: C²-score and ground-truth recovery, against raw channels and random.

For a concept layer, every unit is scored on its top-activating evaluation images
(:func:`~fact_model.analysis.c2.select_top_images`) with its attribution maps
``m = clip(Σ_ch x ⊙ ∂S/∂x, 0)`` (explanation mode):

* **C²** with each reference encoder (spec section 6), next to a random concept's;
* **ground-truth recovery** (embedded dataset only): the share of the attribution mass
  falling on each ground-truth label; *purity* = the largest share, *part* = its label;
  *coverage* = share of the dataset's part types with at least one unit of purity ≥ 0.8
  on that part.

Units are either the FaCT concepts (``S = Σ_p u_{k,p}``) or, as the paper's baseline,
the backbone's raw channels at the same stage (``S = Σ_p max(f_{c,p}, 0)``, the plain
backbone without concept layers).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fact_model.analysis.c2 import (
    attribution_weighted_encodings,
    random_concept_consistency,
    select_top_images,
    weighted_consistency,
)
from fact_model.bcos.encoding import encode_rgb
from fact_model.distributed import SINGLE_PROCESS, DistributedContext
from fact_model.explain import concept_input_maps
from fact_model.model import FaCTModel

__all__ = ["QualityReport", "UnitScores", "concept_quality", "plain_backbone"]

log = logging.getLogger(__name__)

PURITY_THRESHOLD = 0.8
Source = Literal["fact", "channels"]


@dataclass
class UnitScores:
    """Scores of one concept or channel."""

    unit: int
    images: int
    c2: dict[str, float] = field(default_factory=dict)  # encoder name → consistency
    purity: float | None = None
    part: int | None = None


@dataclass
class QualityReport:
    """Quality figures of one layer's units (FaCT concepts or raw channels)."""

    layer: str
    source: Source
    units: int
    dead: int
    dropped: int
    scores: list[UnitScores]
    random_c2: dict[str, float]
    encoders: list[str]
    part_names: list[str] = field(default_factory=list)
    class_part_labels: list[int] = field(default_factory=list)

    def mean_c2(self, encoder: str) -> float:
        values = [s.c2[encoder] for s in self.scores if encoder in s.c2]
        return sum(values) / len(values) if values else float("nan")

    @property
    def mean_purity(self) -> float:
        values = [s.purity for s in self.scores if s.purity is not None]
        return sum(values) / len(values) if values else float("nan")

    @property
    def coverage(self) -> float:
        """Share of the class part labels that some unit captures with purity ≥ 0.8."""
        if not self.class_part_labels:
            return float("nan")
        captured = {s.part for s in self.scores if s.purity is not None and s.purity >= PURITY_THRESHOLD}
        return sum(label in captured for label in self.class_part_labels) / len(self.class_part_labels)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "layer": self.layer,
            "source": self.source,
            "units": self.units,
            "scored": len(self.scores),
            "dead": self.dead,
            "dropped": self.dropped,
            "mean_purity": self.mean_purity,
            "coverage": self.coverage,
        }
        for encoder in self.encoders:
            out[f"C2 [{encoder}]"] = self.mean_c2(encoder)
            out[f"random C2 [{encoder}]"] = self.random_c2[encoder]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "per_unit": [dataclasses.asdict(s) for s in self.scores]}


def plain_backbone(model: FaCTModel) -> FaCTModel:
    """The model's backbone without concept layers (the raw-channel baseline)."""
    plain = FaCTModel(dataclasses.replace(model.config, concept_layers=()))
    plain.backbone.load_state_dict(model.backbone.state_dict())
    return plain.to(model.device).eval()


def _in_batches(n: int, batch_size: int, rows: Callable[[Tensor], Tensor], context: DistributedContext) -> Tensor:
    """``rows(indices)`` over the batches ``arange(n).split(batch_size)``, concatenated: ``(n, ...)``.

    Each rank computes its share of whole batches (the same batches as one process, so the rows are
    bit-identical to a single process's); the rows are gathered on every rank, in batch order.
    """
    chunks = torch.arange(n).split(batch_size)
    mine = {b: rows(chunks[b]).cpu() for b in context.shard(len(chunks))}
    if context.is_distributed:
        for theirs in context.all_gather_object(mine):
            mine.update(theirs)
    return torch.cat([mine[b] for b in range(len(chunks))])


@torch.no_grad()
def _activation_table(
    model: FaCTModel, images: Tensor, layer: str, source: Source, batch_size: int, context: DistributedContext
) -> Tensor:
    """``(N, units)`` total activations ``S``."""

    def rows(idx: Tensor) -> Tensor:
        x6 = encode_rgb(images[idx].float() / 255)
        if source == "fact":
            return model.forward_encoded(x6).codes[layer].totals()
        return model.features_at(x6, layer).clamp(min=0).sum(dim=(2, 3))

    return _in_batches(len(images), batch_size, rows, context)


def _attributions(model: FaCTModel, images: Tensor, layer: str, source: Source, unit: int) -> Tensor:
    """``(M, H, W)`` clipped pixel attributions of unit's total activation in each image."""
    x = images.float() / 255
    if source == "fact":
        maps, x6 = concept_input_maps(model, x, layer, torch.full((len(images), 1), unit))
        return (x6 * maps[:, 0]).sum(dim=1).clamp(min=0)
    with model.explanation_mode(), torch.enable_grad():
        x6 = encode_rgb(x).requires_grad_(True)
        activation = model.features_at(x6, layer)[:, unit].clamp(min=0).sum()
        (grad,) = torch.autograd.grad(activation, x6)
    return (x6.detach() * grad).sum(dim=1).clamp(min=0)


def concept_quality(
    model: FaCTModel,
    images: Tensor,
    layer: str,
    encoders: Sequence[Any],
    source: Source = "fact",
    part_maps: Tensor | None = None,
    part_names: Sequence[str] = (),
    class_part_labels: Sequence[int] = (),
    batch_size: int = 100,
    random_repeats: int = 20,
    seed: int = 0,
    progress: bool = True,
    context: DistributedContext = SINGLE_PROCESS,
) -> QualityReport:
    """Score every unit of ``layer`` on uint8 ``images`` ``(N, 3, H, W)``.

    Args:
        encoders: reference encoders (``name``, ``encode(images, indices=None)``); their
            features are centred by the mean over all images and pixels.
        source: ``"fact"`` (the model's concepts) or ``"channels"`` (the plain backbone's
            channels at ``layer``; pass the FaCT model, the backbone is taken from it).
        part_maps: ``(N, H, W)`` ground-truth labels (enables purity and coverage).
        class_part_labels: the labels that are class parts (for coverage).
        context: under ``torchrun``, every rank calls this with its context: the activation table
            and the reference features are computed in shards of whole batches and gathered, the
            units are dealt round-robin over the ranks and their scores gathered. Every unit is scored
            on the same inputs as in one process, so every rank returns the single-process report
            exactly (same floats).
    """
    model = (plain_backbone(model) if source == "channels" else model).eval()
    table = _activation_table(model, images, layer, source, batch_size, context)
    selection = select_top_images(table)
    features = {}
    for encoder in encoders:
        encoded = _in_batches(
            len(images), batch_size, lambda idx, e=encoder: e.encode(images[idx].float() / 255, indices=idx), context
        )
        features[encoder.name] = encoded - encoded.mean(dim=(0, 2, 3), keepdim=True)
    num_labels = int(part_maps.max()) + 1 if part_maps is not None else 0
    units = list(selection.selected.items())
    mine: dict[int, UnitScores | None] = {}
    shown = progress and context.is_main
    for position in tqdm(context.shard(len(units)), desc=f"{source} {layer}", disable=not shown, leave=False):
        unit, indices = units[position]
        maps = _attributions(model, images[indices], layer, source, unit)
        weights = selection.weights[unit]
        score = UnitScores(unit=unit, images=len(indices))
        mine[position] = None
        if float(maps.sum()) <= 0:
            continue  # no positive attribution anywhere: nothing to encode
        for name, encoded in features.items():
            score.c2[name] = weighted_consistency(attribution_weighted_encodings(maps, encoded[indices]), weights)
        if part_maps is not None:
            labels = part_maps[indices].long()
            mass = torch.zeros(num_labels).index_add_(0, labels.flatten(), maps.flatten())
            shares = mass / mass.sum()
            score.purity, score.part = float(shares.max()), int(shares.argmax())
        mine[position] = score
    if context.is_distributed:
        for theirs in context.all_gather_object(mine):
            mine.update(theirs)
    scores = [score for position in range(len(units)) if (score := mine[position]) is not None]
    typical = sorted(len(i) for i in selection.selected.values())
    per_concept = typical[len(typical) // 2] if typical else 10
    random_c2 = {
        name: random_concept_consistency(encoded, per_concept, repeats=random_repeats, seed=seed)
        for name, encoded in features.items()
    }
    return QualityReport(
        layer=layer,
        source=source,
        units=table.shape[1],
        dead=len(selection.dead),
        dropped=len(selection.dropped),
        scores=scores,
        random_c2=random_c2,
        encoders=list(features),
        part_names=list(part_names),
        class_part_labels=list(class_part_labels),
    )


def quality_markdown(reports: Sequence[QualityReport], title: str = "Concept quality") -> str:
    """A Markdown table per layer: FaCT concepts vs raw channels vs the random concept."""
    lines = [f"# {title}", ""]
    for layer in dict.fromkeys(r.layer for r in reports):
        rows = [r for r in reports if r.layer == layer]
        encoders = rows[0].encoders
        header = "| units | scored / total | mean purity | coverage | " + " | ".join(f"C² {e}" for e in encoders) + " |"
        lines += [f"## {layer}", "", header, "|---|---|---:|---:|" + "---:|" * len(encoders)]
        for r in rows:
            label = "FaCT concepts" if r.source == "fact" else "raw B-cos channels"
            c2 = " | ".join(f"{r.mean_c2(e):.3f}" for e in encoders)
            lines.append(f"| {label} | {len(r.scores)} / {r.units} | {r.mean_purity:.3f} | {r.coverage:.0%} | {c2} |")
        random = " | ".join(f"{rows[0].random_c2[e]:.4f}" for e in encoders)
        lines.append(f"| random concept | – | – | – | {random} |")
        lines.append("")
    return "\n".join(lines)
