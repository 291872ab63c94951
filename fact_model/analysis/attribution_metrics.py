"""Faithfulness and localisation metrics of per-pixel attributions, for any attribution method.

Every function takes attributions ``(N, H, W)``: one relevance value per pixel of each image
(channels already summed), in the units of the explained score.

* :func:`completeness_error` — ``|Σ attribution − y| / |y|``;
* :func:`perturbation_curves` / :func:`curve_auc` — pixel flipping: remove (or insert) pixels in
  order of relevance in fixed steps and record the model's score after each step (one batched
  forward pass per step);
* :func:`region_shares` — the share of positive attribution that falls in labelled regions
  (an energy-based pointing game);
* :func:`grid_mosaics` — B-cos-v2's grid pointing game: 2×2 mosaics of images of different classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "completeness_error",
    "curve_auc",
    "grid_mosaics",
    "perturbation_curves",
    "quadrant_shares",
    "region_shares",
]

ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""``(images (N, 3, H, W), targets (N,)) → (N,)`` the score being explained (e.g. the target's probability)."""


def completeness_error(attributions: Tensor, explained: Tensor) -> Tensor:
    """``|Σ_pixels attribution − y| / |y|`` per image: ``(N, H, W), (N,) → (N,)`` (0 = complete)."""
    total = attributions.flatten(1).double().sum(dim=1)
    y = explained.double()
    return ((total - y).abs() / y.abs().clamp_min(1e-12)).float()


def _flip_masks(attributions: Tensor, steps: int, most_relevant_first: bool) -> list[Tensor]:
    """``steps + 1`` boolean masks ``(N, H·W)``: after step ``i`` the first ``round(i·P/steps)`` pixels of the order."""
    n, pixels = attributions.shape[0], attributions[0].numel()
    order = attributions.flatten(1).argsort(dim=1, descending=most_relevant_first, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(pixels, device=order.device).expand(n, -1))
    return [rank < round(i * pixels / steps) for i in range(steps + 1)]


def perturbation_curves(
    score: ScoreFn,
    images: Tensor,
    targets: Tensor,
    attributions: Tensor,
    steps: int = 16,
    *,
    insert: bool = False,
    most_relevant_first: bool = True,
    baseline: float = 0.0,
) -> Tensor:
    """Scores while pixels are removed (set to ``baseline``) or inserted (into a ``baseline`` image).

    Args:
        images: ``(N, 3, H, W)`` in [0, 1]; targets: ``(N,)`` class per image.
        attributions: ``(N, H, W)``; pixels are taken in decreasing order of attribution
            (``most_relevant_first``, MoRF) or increasing (LeRF); ties keep raster order.
        steps: the curve has ``steps + 1`` points at fractions ``0, 1/steps, …, 1`` of the pixels.
        insert: start from the baseline image and insert pixels instead of deleting them.

    Returns:
        ``(N, steps + 1)`` scores; point 0 is the intact image (deletion) or the baseline (insertion).
    """
    n, _, h, w = images.shape
    if attributions.shape != (n, h, w):
        raise ValueError(f"attributions must have shape {(n, h, w)}, got {tuple(attributions.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    points = []
    for mask in _flip_masks(attributions, steps, most_relevant_first):
        taken = mask.view(n, 1, h, w).to(images.dtype)
        kept = taken if insert else 1 - taken
        points.append(score(images * kept + baseline * (1 - kept), targets))
    return torch.stack(points, dim=1)


def curve_auc(curves: Tensor) -> Tensor:
    """Area under each curve ``(N, S + 1)`` sampled at evenly spaced fractions of ``[0, 1]`` (trapezoid): ``(N,)``."""
    steps = curves.shape[1] - 1
    return ((curves[:, :-1] + curves[:, 1:]) / 2).sum(dim=1) / steps


def region_shares(attributions: Tensor, regions: Tensor, wanted: Sequence[Sequence[int]]) -> dict[str, Tensor]:
    """Where the positive attribution lies: on the wanted regions, on other labelled regions, on background.

    Args:
        attributions: ``(N, H, W)``.
        regions: ``(N, H, W)`` integer region id per pixel, 0 = background.
        wanted: per image, the region ids that decide its class.

    Returns:
        ``{"parts", "distractors", "background"}`` → ``(N,)`` shares of ``Σ max(attribution, 0)``
        (they sum to 1; all 0 for an image without positive attribution).
    """
    positive = attributions.clamp(min=0).flatten(1).double()
    labels = regions.flatten(1)
    on_parts = torch.zeros_like(labels, dtype=torch.bool)
    for i, ids in enumerate(wanted):
        on_parts[i] = torch.isin(labels[i], torch.as_tensor(list(ids), dtype=labels.dtype))
    background = labels == 0
    total = positive.sum(dim=1).clamp_min(1e-30)
    share = {
        "parts": (positive * on_parts).sum(dim=1) / total,
        "distractors": (positive * (~on_parts & ~background)).sum(dim=1) / total,
        "background": (positive * background).sum(dim=1) / total,
    }
    return {k: v.float() for k, v in share.items()}


def grid_mosaics(images: Tensor, labels: Tensor, count: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``count`` 2×2 mosaics of images of four different classes, each downscaled to half size.

    Returns ``(mosaics (M, 3, H, W), classes (M, 4))``: quadrant order top-left, top-right,
    bottom-left, bottom-right. Fewer than ``count`` when the images hold fewer than four classes.
    """
    n, _, h, w = images.shape
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        by_class.setdefault(label, []).append(i)
    classes = sorted(by_class)
    if len(classes) < 4:
        return images.new_zeros(0, 3, h, w), labels.new_zeros(0, 4)
    mosaics, chosen = [], []
    for _ in range(count):
        picked = torch.randperm(len(classes), generator=generator)[:4].tolist()
        members = [by_class[classes[c]] for c in picked]
        idx = [m[int(torch.randint(len(m), (1,), generator=generator))] for m in members]
        small = F.interpolate(images[idx], size=(h // 2, w // 2), mode="area")
        top, bottom = torch.cat([small[0], small[1]], dim=2), torch.cat([small[2], small[3]], dim=2)
        mosaic = torch.cat([top, bottom], dim=1)
        mosaics.append(F.pad(mosaic, (0, w - mosaic.shape[2], 0, h - mosaic.shape[1])))  # odd sizes
        chosen.append([classes[c] for c in picked])
    return torch.stack(mosaics), torch.tensor(chosen)


def quadrant_shares(attributions: Tensor, quadrants: Tensor) -> Tensor:
    """Share of positive attribution inside each image's quadrant ``(N,)`` (0 TL, 1 TR, 2 BL, 3 BR): ``(N,)``."""
    n, h, w = attributions.shape
    positive = attributions.clamp(min=0).double()
    rows = torch.arange(h)[:, None] >= h // 2
    cols = torch.arange(w)[None, :] >= w // 2
    masks = torch.stack([~rows & ~cols, ~rows & cols, rows & ~cols, rows & cols])  # (4, H, W)
    inside = (positive * masks[quadrants]).flatten(1).sum(dim=1)
    return (inside / positive.flatten(1).sum(dim=1).clamp_min(1e-30)).float()
