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
from fact_model.analysis.evaluate import gather_skipped
from fact_model.data.loading import ImageSplit
from fact_model.distributed import SINGLE_PROCESS, DistributedContext
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
    """Keep the ``t`` largest of two candidate sets per concept (rows = concepts).

    Shapes: values and indices ``(K, M)``, extra ``(K, M, E)``. Ties are broken by the smaller image
    index, so the order is total and the result does not depend on how the candidates were split
    into batches or ranks: merging in any grouping keeps the same ``t`` (largest value first).
    """
    all_values = torch.cat([best_values, values], dim=1)
    all_indices = torch.cat([best_indices, indices], dim=1)
    all_extra = torch.cat([best_extra, extra], dim=1)
    by_index = all_indices.argsort(dim=1, stable=True)  # (K, M) image index ascending ...
    by_value = all_values.gather(1, by_index).argsort(dim=1, descending=True, stable=True)  # ... then value descending
    order = by_index.gather(1, by_value)[:, : min(t, all_values.shape[1])]  # (K, t)
    return (
        all_values.gather(1, order),
        all_indices.gather(1, order),
        all_extra.gather(1, order[..., None].expand(-1, -1, all_extra.shape[-1])),
    )


def compute_concept_stats(
    model: FaCTModel,
    split: ImageSplit,
    top: int = 16,
    batch_size: int = 200,
    progress: bool = True,
    context: DistributedContext = SINGLE_PROCESS,
) -> dict[str, Tensor]:
    """Statistics of every concept layer over ``split``, streamed in batches.

    Image indices in the statistics are positions in ``split`` (reopen it with
    :func:`fact_model.data.sources.open_recorded_split` to show them). Unreadable images are left
    out and reported; frequencies and class means are over the images read.

    Args:
        context: under ``torchrun``, every rank calls this with its context and reads its shard of
            whole batches; every rank returns the statistics of the whole split. The top-image lists
            (ties to the smaller index), their activations and contributions and the frequencies equal
            the single-process ones exactly; the class means are float64 sums over the ranks, stored as
            float32, equal to about 1e-7 relative (float32 rounding). ``split.skipped`` afterwards holds
            every rank's unreadable items.

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
            "values": torch.empty(k, 0),  # (K, ≤T) total activations, largest first
            "indices": torch.empty(k, 0, dtype=torch.long),  # (K, ≤T) their images
            "extra": torch.empty(k, 0, classes),  # (K, ≤T, classes) their contributions to every class
            "class_sum": torch.zeros(classes, k, dtype=torch.float64),  # Σ over images labelled c
            "active": torch.zeros(k, dtype=torch.long),  # images with the concept active
        }
    class_count = torch.zeros(classes, dtype=torch.long)
    order = context.shard(len(split), block=batch_size)
    batches = split.batches(batch_size, order=order, progress=progress and context.is_main, desc="concept stats")
    for batch in batches:
        if not len(batch):
            continue
        x, labels, idx = batch.float_images(model.device), batch.labels, batch.indices
        class_count += torch.bincount(labels, minlength=classes)
        per_class = [model.explain(x, target=c, top_k=0) for c in range(classes)]
        for name, s in state.items():
            activations = per_class[0].activations[name].cpu()  # (B, K): the same for every target
            contributions = torch.stack([e.contributions[name].cpu() for e in per_class], dim=2)  # (B, K, classes)
            s["values"], s["indices"], s["extra"] = _merge_top(
                s["values"], s["indices"], s["extra"],
                activations.t(), idx[None].expand(activations.shape[1], -1), contributions.transpose(0, 1), top,
            )  # fmt: skip
            own = contributions.gather(2, labels[:, None, None].expand(-1, contributions.shape[1], 1))[..., 0]
            s["class_sum"].index_add_(0, labels, own.double())
            s["active"] += (activations > 0).sum(dim=0)
    class_count = context.all_reduce_sum(class_count)
    images = int(class_count.sum())
    for s in state.values():
        s["class_sum"], s["active"] = context.all_reduce_sum(s["class_sum"]), context.all_reduce_sum(s["active"])
        if context.is_distributed:  # every rank's candidates, merged in rank order (the order does not matter)
            candidates = context.all_gather_object((s["values"], s["indices"], s["extra"]))
            s["values"], s["indices"], s["extra"] = candidates[0]
            for values, indices, extra in candidates[1:]:
                s["values"], s["indices"], s["extra"] = _merge_top(
                    s["values"], s["indices"], s["extra"], values, indices, extra, top
                )
    gather_skipped(split, context)
    if images == 0:
        raise ValueError(f"no readable image in {split!r}")
    for name, s in state.items():
        stats[f"{name}/top_indices"] = s["indices"]
        stats[f"{name}/top_activations"] = s["values"]
        stats[f"{name}/top_contributions"] = s["extra"]
        stats[f"{name}/class_mean_contributions"] = (s["class_sum"] / class_count.clamp_min(1)[:, None]).float()
        stats[f"{name}/frequency"] = s["active"].float() / images
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
