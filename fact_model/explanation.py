"""Result types of :func:`fact_model.explain.explain` (spec section 4).

All tensors are detached, on the model's device. ``N`` = images, ``C`` = classes,
``K`` = concepts of a layer, ``R`` = that layer's top concepts per image
(``min(top_k, K)``, so layers of different sizes can have different ``R``),
``(h, w)`` = the concept layer's feature-map size (a ViT's token grid), ``(H, W)`` = the input size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fact_model.host_transfer import map_tensors

__all__ = [
    "CrossLayerTrace",
    "Explanation",
    "ExplanationMaps",
    "PositionalShares",
    "SlotContributions",
    "TopConcept",
    "rank_classes",
]


def rank_classes(scores: Tensor) -> Tensor:
    """The one class ranking of the project: ``(N, C)`` scores → ``(N, C)`` class indices, best first.

    Ranks by the bias-free scores ``logit − b`` (what explanations decompose; adding the
    scalar bias in float32 can round two close scores to equal logits), highest first, ties
    broken by the lower class index (a stable sort), so ``prediction`` and ``top_classes[0]``
    always agree, whichever path computed them.
    """
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


@dataclass(frozen=True)
class TopConcept:
    """One concept's part in one image's explained logit.

    Attributes:
        layer: concept-layer (stage) name.
        concept: concept id in ``[0, K)``.
        contribution: its additive contribution to ``logit − bias`` (or to the
            contrast difference); contributions of a layer sum to it exactly.
        share: ``contribution / Σ positive contributions`` of that layer (negative
            for a concept that argued against the target).
        activation: its total activation ``Σ_p u_{k,p}`` in the image.
    """

    layer: str
    concept: int
    contribution: float
    share: float
    activation: float


@dataclass(frozen=True)
class CrossLayerTrace:
    """How lower-layer concepts built each top upper-layer concept.

    Attributes:
        upper, lower: concept-layer names (``lower`` precedes ``upper`` in the network).
        upper_ids: ``(N, R_upper)`` the upper layer's top concepts (same as ``Explanation.top_ids[upper]``).
        contributions: ``(N, R_upper, K_lower)``: contribution of lower concept ``j`` to the
            total activation ``Σ_q u^upper_{k,q}`` of upper concept ``upper_ids[n, r]``;
            sums over ``j`` to that activation exactly.
    """

    upper: str
    lower: str
    upper_ids: Tensor
    contributions: Tensor


@dataclass(frozen=True)
class SlotContributions:
    """Every code slot's contribution to the explained quantity at one concept layer.

    Attributes:
        values: ``(N, P, k)`` ``u_{p,j} · ∂y/∂u_{p,j}`` of slot ``j`` at position ``p``; summed over
            everything, ``y`` exactly (region queries weight positions: :mod:`fact_model.regions`).
        concept_ids: ``(N, P, k)`` the concept each slot holds.
        spatial_shape: ``(h, w)`` of the feature map (``P = h·w``) or ``(T,)`` for tokens.
    """

    values: Tensor
    concept_ids: Tensor
    spatial_shape: tuple[int, ...]


@dataclass(frozen=True)
class PositionalShares:
    """What a ViT's positional embedding contributed to each mapped quantity.

    The embedding is added to the tokens independently of the image, so it is not in any
    input map: for every map, ``Σ_pixels x ⊙ W + share = the mapped quantity`` exactly,
    with ``share = Σ pe ⊙ ∂(quantity)/∂tokens`` over the first stage's token grid.

    Attributes:
        concepts: layer → ``(N, R)``: share in each top concept's activation.
        logit: ``(N,)`` share in the explained logit ``y``, or None (no logit map).
        other: ``(N,)`` share in "all other concepts", or None (no such map).
    """

    concepts: dict[str, Tensor] = field(default_factory=dict)
    logit: Tensor | None = None
    other: Tensor | None = None


@dataclass(frozen=True)
class ExplanationMaps:
    """Input-level maps ``W = ∂(·)/∂x`` on the 6-channel encoded input, in explanation mode.

    Render a map with :mod:`fact_model.render`; its per-pixel contribution is
    ``(inputs ⊙ W).sum(channel)``, which sums over pixels to the explained quantity
    (for a ViT, to the quantity minus its ``positional`` share).

    Attributes:
        inputs: ``(N, 6, H, W)`` the encoded input ``[r, g, b, 1-r, 1-g, 1-b]``.
        concepts: layer → ``(N, R, 6, H, W)``: ``∂(Σ_p u_{k,p})/∂x`` for the layer's
            top concepts (``Explanation.top_ids[layer]``); sums to the concept's activation.
        logit: ``(N, 6, H, W)`` map of the explained logit ``y`` (all concepts), or None.
        other: ``(N, 6, H, W)`` map of ``y`` minus the shown top concepts of the last
            concept layer ("all other concepts"), or None.
        positional: the shares of an input-independent term that the maps leave out (a
            ViT's positional embedding), or None for bias-free networks (B-cos CNNs),
            whose maps sum to the quantity exactly.
    """

    inputs: Tensor
    concepts: dict[str, Tensor] = field(default_factory=dict)
    logit: Tensor | None = None
    other: Tensor | None = None
    positional: PositionalShares | None = None

    def pixel_contributions(self, weights: Tensor) -> Tensor:
        """``Σ_channels x ⊙ W``: ``(N, [R,] 6, H, W)`` → ``(N, [R,] H, W)``."""
        x = self.inputs if weights.ndim == 4 else self.inputs[:, None]
        return (x * weights).sum(dim=-3)


@dataclass(frozen=True)
class Explanation:
    """Exact concept explanation of a batch.

    Attributes:
        logits: ``(N, num_classes)`` logits, bias included.
        probabilities: ``(N, num_classes)`` (softmax or sigmoid, per the model).
        ranking: ``(N, num_classes)`` class indices, best first (:func:`rank_classes` of the
            bias-free scores): ``ranking[:, 0]`` is the prediction; consumers use this
            order instead of re-ranking ``logits`` (which can tie where the scores do not).
        target: ``(N,)`` explained class (default: the predicted one, ``ranking[:, 0]``).
        contrast: ``(N,)`` contrast class ("why target rather than contrast"), or None.
        logit_bias: the scalar bias ``b``; explanations decompose ``logit − b``.
        explained: ``(N,)`` the decomposed quantity ``y = logit[target] − b``, or
            ``logit[target] − logit[contrast]`` with a contrast.
        contributions: layer → ``(N, K)`` contribution of every concept to ``y``.
        activations: layer → ``(N, K)`` total activation ``Σ_p u_{k,p}`` per concept.
        residuals: layer → ``(N,)`` ``|Σ_k contributions − y|`` (completeness check).
        residual: ``(N,)`` the largest residual over layers.
        top_ids: layer → ``(N, R)`` concept ids sorted by contribution, largest first.
        top_concepts: per image, the top concepts of every layer (last layer first).
        other_contribution: layer → ``(N,)`` ``y`` minus the top concepts' contributions.
        spatial: layer → ``(N, R, h, w)`` where each top concept pushed ``y``:
            ``u_{k,p} · ∂y/∂u_{k,p}`` per position (sums to its contribution).
        slots: layer → every slot's contribution (all concepts, every position).
        traces: cross-layer traces between consecutive concept layers (empty for one layer).
        maps: input-level maps when requested, else None.
        layer_names: concept layers in forward order (lowest first).
        timings_ms: wall-clock milliseconds of the ``forward`` pass, the ``backward``
            passes (contributions, traces, maps) and the ``total``.
    """

    logits: Tensor
    probabilities: Tensor
    ranking: Tensor
    target: Tensor
    contrast: Tensor | None
    logit_bias: float
    explained: Tensor
    contributions: dict[str, Tensor]
    activations: dict[str, Tensor]
    residuals: dict[str, Tensor]
    residual: Tensor
    top_ids: dict[str, Tensor]
    top_concepts: list[list[TopConcept]]
    other_contribution: dict[str, Tensor]
    spatial: dict[str, Tensor]
    slots: dict[str, SlotContributions]
    traces: list[CrossLayerTrace]
    maps: ExplanationMaps | None
    layer_names: tuple[str, ...]
    timings_ms: dict[str, float] = field(default_factory=dict)

    def image(self, n: int, maps: bool = True) -> Explanation:
        """Image ``n`` alone, as a batch of one: every tensor is row ``n`` of its batch (a view, no copy).

        ``maps=False`` drops the input maps (the largest tensors; a response needs only their rendering).
        """
        rest = dataclasses.replace(self, maps=self.maps if maps else None, top_concepts=[])
        one = map_tensors(rest, lambda t: t[n : n + 1])
        return dataclasses.replace(one, top_concepts=self.top_concepts[n : n + 1])
