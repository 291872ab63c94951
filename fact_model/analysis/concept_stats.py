"""Per-concept dataset statistics, saved next to a model (``fact stats``).

So that a service can answer "what does concept 17 look like, and what is it
for?" without recomputation, for every concept layer over a held-out split:

* ``top_indices`` / ``top_activations`` ``(K, T)``: the T images (indices into the
  split) where the concept's total activation ``Σ_p u_{k,p}`` is largest, largest first;
* ``top_contributions`` ``(K, T, classes)``: the concept's contribution to every
  class logit in each of those images;
* ``class_mean_contributions`` ``(classes, K)``: mean contribution of each concept
  to class c over the images labelled c;
* ``frequency`` ``(K,)``: fraction of images in which the concept is active.

Stored as ``concept_stats.safetensors`` (tensors named ``<layer>/<statistic>``)
and ``concept_stats.json`` (the split's description, T, the tensors' sha256).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from fact_model._validation import check_same_classes
from fact_model.data.loading import ImageSplit
from fact_model.model import FaCTModel

__all__ = ["STATS_FILE", "STATS_META", "compute_concept_stats", "load_concept_stats", "save_concept_stats"]

STATS_FILE = "concept_stats.safetensors"
STATS_META = "concept_stats.json"


def _merge_top(
    best_values: Tensor,
    best_indices: Tensor,
    best_extra: Tensor,
    values: Tensor,
    indices: Tensor,
    extra: Tensor,
    t: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the ``t`` largest of two candidate sets per concept (rows = concepts)."""
    all_values = torch.cat([best_values, values], dim=1)
    all_indices = torch.cat([best_indices, indices], dim=1)
    all_extra = torch.cat([best_extra, extra], dim=1)
    top_values, order = all_values.topk(min(t, all_values.shape[1]), dim=1)
    return (
        top_values,
        all_indices.gather(1, order),
        all_extra.gather(1, order[..., None].expand(-1, -1, all_extra.shape[-1])),
    )


def compute_concept_stats(
    model: FaCTModel, split: ImageSplit, top: int = 16, batch_size: int = 200, progress: bool = True
) -> dict[str, Tensor]:
    """Statistics of every concept layer over ``split``, streamed in batches.

    Image indices in the statistics are positions in ``split`` (reopen it with
    :func:`fact_model.data.sources.open_recorded_split` to show them). Unreadable images are left
    out and reported; frequencies and class means are over the images read.

    Raises:
        ValueError: the split's classes are not the model's, or no image in it is readable.
    """
    check_same_classes(split.class_names, model.class_names)
    model.eval()
    classes = model.num_classes
    stats: dict[str, Tensor] = {}
    state = {}
    for info in model.concept_layers:
        k = info.num_concepts
        state[info.name] = {
            "values": torch.empty(k, 0),
            "indices": torch.empty(k, 0, dtype=torch.long),
            "extra": torch.empty(k, 0, classes),
            "class_sum": torch.zeros(classes, k),
            "active": torch.zeros(k),
        }
    class_count = torch.zeros(classes)
    images = 0
    for batch in split.batches(batch_size, progress=progress, desc="concept stats"):
        if not len(batch):
            continue
        x, labels, idx = batch.float_images(model.device), batch.labels, batch.indices
        images += len(batch)
        class_count += torch.bincount(labels, minlength=classes).float()
        per_class = [model.explain(x, target=c, top_k=0) for c in range(classes)]
        for name, s in state.items():
            activations = per_class[0].activations[name]  # (B, K): the same for every target
            contributions = torch.stack([e.contributions[name] for e in per_class], dim=2)  # (B, K, classes)
            s["values"], s["indices"], s["extra"] = _merge_top(
                s["values"], s["indices"], s["extra"],
                activations.t(), idx[None].expand(activations.shape[1], -1), contributions.transpose(0, 1), top,
            )  # fmt: skip
            own = contributions.gather(2, labels[:, None, None].expand(-1, contributions.shape[1], 1))[..., 0]
            s["class_sum"].index_add_(0, labels, own)
            s["active"] += (activations > 0).sum(dim=0).float()
    if images == 0:
        raise ValueError(f"no readable image in {split!r}")
    for name, s in state.items():
        stats[f"{name}/top_indices"] = s["indices"]
        stats[f"{name}/top_activations"] = s["values"]
        stats[f"{name}/top_contributions"] = s["extra"]
        stats[f"{name}/class_mean_contributions"] = s["class_sum"] / class_count.clamp_min(1)[:, None]
        stats[f"{name}/frequency"] = s["active"] / images
    return stats


def save_concept_stats(directory: str | Path, stats: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write the statistics into an artifact directory (next to ``model.safetensors``)."""
    directory = Path(directory)
    data = safetensors_save({k: v.contiguous() for k, v in stats.items()})
    tmp = directory / f".{STATS_FILE}.tmp"
    tmp.write_bytes(data)
    tmp.replace(directory / STATS_FILE)
    record = {**meta, "sha256": hashlib.sha256(data).hexdigest()}
    (directory / STATS_META).write_text(json.dumps(record, indent=2) + "\n")
    return directory / STATS_FILE


def load_concept_stats(directory: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read statistics written by :func:`save_concept_stats`; refuses a file that does not match its hash."""
    directory = Path(directory)
    meta = json.loads((directory / STATS_META).read_text())
    data = (directory / STATS_FILE).read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise ValueError(f"{directory / STATS_FILE} does not match the sha256 in {STATS_META}: corrupted or replaced")
    return safetensors_load(data), meta
