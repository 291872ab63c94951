"""The C²-score of concept consistency (spec section 6), on precomputed tensors.

For a concept k with total activation ``S_i`` in evaluation image i:

1. **selection** — the top 5 % of the images where k is active (``S_i > 0``), but at
   least 10 (all of them when it is active in ≤ 10); concepts with fewer than 5
   selected images are dropped; a concept active nowhere is dead;
2. **attribution** ``m_i`` — per-pixel ``Σ_ch x ⊙ ∂S_i/∂x`` (explanation mode), clipped at 0;
3. **encoding** — a reference encoder's dense features ``G_i`` at pixel resolution,
   centred by the dataset-mean feature vector; ``e_i = Σ_p m_i G_i / Σ_p m_i``;
4. **consistency** — the mean of ``cos(e_i, e_j)`` over pairs ``i ≠ j`` weighted by ``S_i·S_j``.

C² = mean consistency over concepts, reported together with the consistency of a
**random concept**: random attribution maps ``max(U(0,1), t)``, ``t ~ U(0,1)`` per image,
``S_i = Σ m_i``, over random sets of evaluation images (optionally within one class,
the per-class baseline). This module only does the arithmetic; producing attributions
and features is :mod:`fact_model.analysis.quality`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ConceptSelection",
    "attribution_weighted_encodings",
    "random_attributions",
    "random_concept_consistency",
    "select_top_images",
    "weighted_consistency",
]

TOP_FRACTION = 0.05
MIN_SELECTED = 10
MIN_KEPT = 5


@dataclass(frozen=True)
class ConceptSelection:
    """Which images each concept is scored on.

    Attributes:
        selected: concept id → ``(M,)`` image indices, largest activation first.
        weights: concept id → ``(M,)`` their activations ``S_i``.
        dead: concepts never active.
        dropped: concepts active in fewer than ``MIN_KEPT`` images.
    """

    selected: dict[int, Tensor]
    weights: dict[int, Tensor]
    dead: tuple[int, ...]
    dropped: tuple[int, ...]


def select_top_images(
    activations: Tensor, fraction: float = TOP_FRACTION, minimum: int = MIN_SELECTED, keep_at_least: int = MIN_KEPT
) -> ConceptSelection:
    """Apply the selection rule to an ``(N_images, K)`` table of total activations ``S``."""
    if activations.ndim != 2:
        raise ValueError(f"activations must be (images, concepts), got shape {tuple(activations.shape)}")
    selected, weights, dead, dropped = {}, {}, [], []
    for k in range(activations.shape[1]):
        column = activations[:, k]
        active = (column > 0).nonzero().squeeze(1)
        if len(active) == 0:
            dead.append(k)
            continue
        count = min(len(active), max(minimum, round(fraction * len(active))))
        if count < keep_at_least:
            dropped.append(k)
            continue
        values, order = column[active].topk(count)
        selected[k] = active[order]
        weights[k] = values
    return ConceptSelection(selected, weights, tuple(dead), tuple(dropped))


def attribution_weighted_encodings(attributions: Tensor, features: Tensor) -> Tensor:
    """``e_i = Σ_p m_i(p) G_i(p) / Σ_p m_i(p)``.

    Args:
        attributions: ``(M, H, W)`` non-negative maps (clip before calling).
        features: ``(M, D, H, W)`` centred reference features.

    Returns:
        ``(M, D)``; an all-zero map gives a zero encoding.
    """
    mass = attributions.flatten(1).sum(dim=1).clamp_min(1e-12)  # (M,)
    weighted = torch.einsum("mhw,mdhw->md", attributions, features)
    return weighted / mass[:, None]


def weighted_consistency(encodings: Tensor, weights: Tensor) -> float:
    """``Σ_{i≠j} w_i w_j cos(e_i, e_j) / Σ_{i≠j} w_i w_j`` for ``(M, D)`` encodings and ``(M,)`` weights."""
    if len(encodings) < 2:
        raise ValueError("consistency needs at least two encodings")
    unit = encodings / encodings.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cosine = unit @ unit.t()
    pair = weights[:, None] * weights[None, :]
    pair = pair - torch.diag(torch.diag(pair))
    total = pair.sum()
    if total <= 0:
        raise ValueError("the pair weights sum to zero")
    return float((pair * cosine).sum() / total)


def random_attributions(count: int, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """``(count, H, W)`` maps ``max(U(0,1), t)`` with one random floor ``t ~ U(0,1)`` per map."""
    noise = torch.rand(count, *size, generator=generator)
    floors = torch.rand(count, 1, 1, generator=generator)
    return torch.maximum(noise, floors)


def random_concept_consistency(
    features: Tensor, images_per_concept: int, repeats: int = 20, seed: int = 0, pool: Tensor | None = None
) -> float:
    """Consistency of a random concept, averaged over ``repeats`` random concepts.

    Args:
        features: ``(N, D, H, W)`` centred reference features of the evaluation images.
        images_per_concept: images a random concept is scored on (like a real concept's selection).
        pool: restrict the images to these indices (e.g. one class: the per-class baseline).
        seed: the baseline is reproducible for a seed.
    """
    generator = torch.Generator().manual_seed(seed)
    candidates = pool if pool is not None else torch.arange(len(features))
    m = min(images_per_concept, len(candidates))
    scores = []
    for _ in range(repeats):
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:m]]
        maps = random_attributions(m, tuple(features.shape[-2:]), generator)
        encodings = attribution_weighted_encodings(maps, features[chosen])
        scores.append(weighted_consistency(encodings, maps.flatten(1).sum(dim=1)))
    return sum(scores) / len(scores)
