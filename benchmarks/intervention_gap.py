"""Linear prediction vs measured change of concept removal: ``python -m benchmarks.intervention_gap``.

On the shipped default model and the embedded test split (issue 17): for each image, remove its top-n
concepts of one concept layer (:func:`fact_model.intervention.intervene`, ``remove_top=n``, n = 1, 3, 5
by default) and compare the change of ``y = logit[predicted class] − b`` that the unedited contributions
predict (minus the removed concepts' contributions) with the change measured on the edited network. Their
difference (``gap``) is what the linearisation at the image leaves out: the B-cos layers' dynamic scales
reacting to the edit (and, editing a lower layer, the TopK selections above it).

Prints one Markdown table row per n: the mean predicted and measured change (units of ``logit − b``),
mean and worst ``|gap|``, the relative error ``|gap| / |predicted|`` (mean and worst), the share of images
whose measured change is larger than predicted, and the share whose predicted class changed. Not a test:
results are recorded in ``docs/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from fact_model.model import FaCTModel

__all__ = ["GapRow", "gap_markdown", "main", "measure_gaps"]


@dataclass(frozen=True)
class GapRow:
    """Figures of one removal count over all images (changes in units of ``logit − b``)."""

    removed: int
    images: int
    predicted_change: float
    measured_change: float
    gap_mean: float
    gap_worst: float
    relative_error_mean: float
    relative_error_worst: float
    beyond_prediction: float  # share of images whose measured change exceeds the predicted one in size
    prediction_changed: float  # share of images whose predicted class is no longer the explained one


def _row(removed: int, predicted: Tensor, measured: Tensor, flipped: Tensor) -> GapRow:
    gap = (measured - predicted).abs()
    relative = gap / predicted.abs().clamp_min(1e-12)  # the relative error of fact faithfulness's removal table
    return GapRow(
        removed=removed,
        images=int(predicted.numel()),
        predicted_change=float(predicted.mean()),
        measured_change=float(measured.mean()),
        gap_mean=float(gap.mean()),
        gap_worst=float(gap.max()),
        relative_error_mean=float(relative.mean()),
        relative_error_worst=float(relative.max()),
        beyond_prediction=float((measured.abs() > predicted.abs()).float().mean()),
        prediction_changed=float(flipped.float().mean()),
    )


def measure_gaps(
    model: FaCTModel,
    batches: Iterable[Tensor],
    counts: Sequence[int] = (1, 3, 5),
    layer: str | None = None,
) -> list[GapRow]:
    """One :class:`GapRow` per count: ``intervene(remove_top=n)`` on every batch ``(B, 3, H, W)`` in [0, 1]."""
    from fact_model.intervention import intervene

    predicted: dict[int, list[Tensor]] = {n: [] for n in counts}
    measured: dict[int, list[Tensor]] = {n: [] for n in counts}
    flipped: dict[int, list[Tensor]] = {n: [] for n in counts}
    for images in batches:
        for n in counts:
            iv = intervene(model, images, layer=layer, remove_top=n, top_k=0)
            predicted[n].append(iv.predicted_change)
            measured[n].append(iv.measured_change)
            flipped[n].append(iv.after.ranking[:, 0] != iv.before.target)
    return [_row(n, torch.cat(predicted[n]), torch.cat(measured[n]), torch.cat(flipped[n])) for n in counts]


def gap_markdown(rows: Sequence[GapRow], layer: str) -> str:
    """The rows as a Markdown table."""
    lines = [
        f"| removed (top-n of {layer}) | images | predicted change | measured change | mean abs gap | worst abs gap "
        "| relative error (mean) | (worst) | \\|measured\\| > \\|predicted\\| | prediction changed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.removed} | {r.images} | {r.predicted_change:.4g} | {r.measured_change:.4g} | {r.gap_mean:.4g} | "
            f"{r.gap_worst:.4g} | {r.relative_error_mean:.3g} | {r.relative_error_worst:.3g} | "
            f"{100 * r.beyond_prediction:.1f} % | {100 * r.prediction_changed:.1f} % |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[GapRow]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=None, help="first N test images (default: the whole split)")
    parser.add_argument("--counts", default="1,3,5", help="top-n concepts removed, comma-separated (1,3,5)")
    parser.add_argument("--layer", default=None, help="concept layer edited (default: the last)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--model", default="default", help="artifact name or directory (default: the shipped one)")
    args = parser.parse_args(argv)
    if args.n_images is not None and args.n_images < 1:
        parser.error(f"--n-images must be ≥ 1, got {args.n_images}")
    counts = [int(c) for c in args.counts.split(",") if c.strip()]

    from fact_model.artifacts import load, resolve_artifact_path
    from fact_model.data.sources import DataSpec, open_split

    model = load(resolve_artifact_path(args.model))
    layer = args.layer or model.concept_layers[-1].name
    split = open_split(DataSpec(image_size=model.config.preprocessing.input_size), "test")
    limit = len(split) if args.n_images is None else min(args.n_images, len(split))

    def batches() -> Iterator[Tensor]:
        seen = 0
        for batch in split.batches(args.batch_size):
            images = batch.float_images()[: limit - seen]
            seen += images.shape[0]
            yield images
            if seen >= limit:
                return

    started = time.perf_counter()
    rows = measure_gaps(model, batches(), counts, layer)
    seconds = time.perf_counter() - started
    print(gap_markdown(rows, layer))
    print(
        f"{limit} embedded test images at {model.config.preprocessing.input_size} px, model {args.model!r}, "
        f"{seconds:.1f} s, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    return rows


if __name__ == "__main__":
    main()
