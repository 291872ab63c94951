"""Concept interventions: remove or rescale concepts at one concept layer and explain the edited network.

An intervention multiplies the codes of each concept ``k`` of one concept layer by a factor ``s_k``
(0 removes it, 1 leaves it) at every position, decodes the edited codes, and lets the network continue
from the edited reconstruction (:meth:`FaCTModel.forward_encoded`'s ``code_scales``). The result holds:

* ``before``: the unedited explanation (the predicted class, unless a target is given);
* ``after``: the exact explanation of the edited network for the *same* target (and contrast);
* ``predicted_change`` ``= Σ_k (s_k − 1) · contribution_k``: the change of the explained quantity
  ``y`` that the unedited contributions predict — exact for the network linearised at the image;
* ``measured_change`` ``= y_after − y_before``.

Their difference (:attr:`Intervention.gap`) is what the linearisation leaves out: the input-dependent
factors the explanation holds fixed (the B-cos ``|cos|^(B−1)`` scales, per-sample norms) react to the
edit, and, editing below another concept layer, the TopK selections above it can change. With B = 1
and the edit at the last concept layer feeding the head, the gap is zero to float rounding.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fact_model._validation import ClassSpec
from fact_model.explanation import Explanation

if TYPE_CHECKING:
    from fact_model.model import FaCTModel

__all__ = ["Intervention", "intervene"]


@dataclass(frozen=True)
class Intervention:
    """An edited network's explanation beside the unedited one (``N`` images, ``K`` concepts of ``layer``).

    Attributes:
        layer: the concept layer edited.
        factors: ``(N, K)`` factor per image and concept that multiplied its codes (1 = unchanged).
        before: the unedited explanation; its ``target`` (and ``contrast``) is what ``after`` explains.
        after: the exact explanation of the edited network, same target and contrast; its
            contributions sum to ``after.explained``.
        predicted_change: ``(N,)`` ``Σ_k (factor_k − 1) · before.contributions[layer][:, k]``, the linear
            prediction of the change of the explained quantity (for a removal: minus the removed
            concepts' contributions), in units of ``logit − b``.
        measured_change: ``(N,)`` ``after.explained − before.explained``, same units.
    """

    layer: str
    factors: Tensor
    before: Explanation
    after: Explanation
    predicted_change: Tensor
    measured_change: Tensor

    @property
    def gap(self) -> Tensor:
        """``(N,)`` ``measured_change − predicted_change``: what the linearisation at the image leaves out."""
        return self.measured_change - self.predicted_change


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _concept_id(value: object, what: str, num_concepts: int, layer: str) -> int:
    if not _is_int(value):
        raise ValueError(
            f"{what} must hold int concept ids in [0, {num_concepts}) of layer {layer!r}, "
            f"got {value!r} ({type(value).__name__})"
        )
    if not 0 <= value < num_concepts:  # type: ignore[operator]
        raise ValueError(f"{what}: concept id {value} is out of range [0, {num_concepts}) of layer {layer!r}")
    return int(value)  # type: ignore[arg-type]


def _concept_ids(values: object, what: str, num_concepts: int, layer: str) -> list[int]:
    """Checked, distinct concept ids from a sequence, set or 1-D array (a bare id, a string or a mapping is refused)."""
    if hasattr(values, "tolist") and not isinstance(values, (str, bytes)):  # a tensor or a NumPy array
        values = values.tolist()  # type: ignore[union-attr]
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, (Sequence, AbstractSet)):
        hint = f" (e.g. {what}=[{values}])" if _is_int(values) else ""
        raise ValueError(f"{what} must be a sequence of concept ids in [0, {num_concepts}), got {values!r}{hint}")
    ids = [_concept_id(v, what, num_concepts, layer) for v in values]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{what} lists concept id(s) {duplicates} more than once")
    return ids


def _factor(value: object, concept: int) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"scale: the factor of concept {concept} must be a finite float, got {value!r}")
    return float(value)


def _count(value: object, what: str, num_concepts: int, layer: str) -> int:
    if not _is_int(value) or not 1 <= value <= num_concepts:  # type: ignore[operator]
        raise ValueError(
            f"{what} must be an int in [1, {num_concepts}] (the concepts of layer {layer!r}), got {value!r}"
        )
    return int(value)  # type: ignore[arg-type]


def _check_layer(model: FaCTModel, layer: object) -> str:
    names = [info.name for info in model.concept_layers]
    if not names:
        raise ValueError("the model has no concept layers to intervene on")
    if layer is None:
        return names[-1]
    if layer not in names:
        raise ValueError(f"unknown concept layer {layer!r}; concept layers: {names}")
    return layer  # type: ignore[return-value]


@dataclass(frozen=True)
class _Edit:
    """A checked edit: fixed ``removed`` ids and ``scaled`` factors, or a per-image top-``top`` choice."""

    removed: tuple[int, ...] = ()
    scaled: tuple[tuple[int, float], ...] = ()
    top: int | None = None
    keep: bool = False  # with ``top``: keep the top concepts (remove the rest) instead of removing them

    def factors(self, contributions: Tensor) -> Tensor:
        """``(N, K)`` factors from the unedited ``(N, K)`` contributions (the top-n choices rank them)."""
        factors = torch.ones_like(contributions)
        if self.top is not None:
            ids = contributions.topk(self.top, dim=1).indices  # (N, top), largest contribution first
            if self.keep:
                return torch.zeros_like(factors).scatter(1, ids, 1.0)
            return factors.scatter(1, ids, 0.0)
        factors[:, list(self.removed)] = 0.0
        for concept, factor in self.scaled:
            factors[:, concept] = factor
        return factors


def _parse_edit(
    layer: str,
    num_concepts: int,
    remove: object,
    scale: object,
    remove_top: object,
    keep_top: object,
) -> _Edit:
    """Check the edit arguments of :func:`intervene` (before any explanation runs)."""
    if remove_top is not None and keep_top is not None:
        raise ValueError(f"remove_top ({remove_top!r}) and keep_top ({keep_top!r}) exclude each other; give one")
    if remove_top is not None or keep_top is not None:
        what = "remove_top" if remove_top is not None else "keep_top"
        given = [name for name, value in (("remove", remove), ("scale", scale)) if value is not None]
        if given:
            raise ValueError(f"{what} chooses the concepts per image; it cannot be combined with {', '.join(given)}")
        top = _count(remove_top if remove_top is not None else keep_top, what, num_concepts, layer)
        return _Edit(top=top, keep=keep_top is not None)
    removed = [] if remove is None else _concept_ids(remove, "remove", num_concepts, layer)
    if scale is not None and not isinstance(scale, Mapping):
        raise ValueError(f"scale must be a mapping {{concept id: factor}}, got {type(scale).__name__}")
    scaled = {_concept_id(c, "scale", num_concepts, layer): _factor(f, c) for c, f in (scale or {}).items()}
    both = sorted(set(removed) & set(scaled))
    if both:
        raise ValueError(f"concept id(s) {both} are both removed and scaled; give each concept one factor")
    return _Edit(removed=tuple(removed), scaled=tuple(scaled.items()))


def intervene(
    model: FaCTModel,
    images: Tensor,
    *,
    layer: str | None = None,
    remove: Sequence[int] | None = None,
    scale: Mapping[int, float] | None = None,
    remove_top: int | None = None,
    keep_top: int | None = None,
    target: ClassSpec = None,
    contrast: ClassSpec = None,
    top_k: int = 5,
    maps: bool = False,
    map_layers: Sequence[str] | None = None,
) -> Intervention:
    """Edit concepts of one layer and explain the edited network exactly, beside the unedited one.

    Args:
        model: the FaCT model.
        images: ``(N, 3, H, W)`` floating-point RGB in [0, 1].
        layer: the concept layer edited (default: the last one).
        remove: concept ids (the same for every image) whose codes are zeroed.
        scale: ``{concept id: factor}``: codes multiplied by a finite factor (may be negative or > 1).
        remove_top: remove each image's ``remove_top`` concepts of ``layer`` with the largest
            contribution to the explained quantity.
        keep_top: remove all but each image's ``keep_top`` concepts with the largest contribution.
        target, contrast: as in :func:`fact_model.explain.explain`; the target defaults to the
            predicted class of the *unedited* network, and ``after`` explains that same class.
        top_k: concepts per layer reported in both explanations.
        maps, map_layers: input maps of the edited network (``after.maps``); ``before`` has none.

    ``remove_top`` and ``keep_top`` exclude each other and ``remove``/``scale``. No edit at all
    (or an empty ``remove``/``scale``) is allowed: every factor is 1 and nothing changes.

    Raises:
        ValueError: an unknown layer; a concept id that is not an int, out of ``[0, K)`` or given
            twice; a concept both removed and scaled; a non-finite factor; a count outside
            ``[1, K]``; exclusive edits combined; or anything :func:`~fact_model.explain.explain` refuses.
    """
    layer_name = _check_layer(model, layer)
    num_concepts = model.concept_layer(layer_name).num_concepts
    edit = _parse_edit(layer_name, num_concepts, remove, scale, remove_top, keep_top)
    before = model.explain(images, target=target, contrast=contrast, top_k=top_k)
    contributions = before.contributions[layer_name]
    factors = edit.factors(contributions)
    after = model.explain(
        images,
        target=before.target,
        contrast=before.contrast,
        top_k=top_k,
        maps=maps,
        map_layers=map_layers,
        code_scales={layer_name: factors},
    )
    return Intervention(
        layer=layer_name,
        factors=factors,
        before=before,
        after=after,
        predicted_change=((factors - 1) * contributions).sum(dim=1),
        measured_change=after.explained - before.explained,
    )
