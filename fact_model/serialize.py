"""Explanations and predictions as JSON-ready records: the one serialiser of the project.

``fact explain --json``, the service's ``/explain``, ``/explain_batch`` and ``/predict`` and
the explorer page (which shows what the service returns) all read these records, so a
field means the same thing everywhere. Every number is a plain Python ``float``/``int``.

An explanation record (:func:`explanation_record`) of image ``n``:

* ``prediction`` and ``top_classes``: the class ranking (:func:`~fact_model.explanation.rank_classes`),
  each entry ``{index, name, probability, logit}``;
* ``target`` / ``contrast``: the explained class (and the contrast class, or None);
* ``explained``: the decomposed quantity ``y`` (``logit[target] − b``, or the contrast difference);
* ``layer``: the reported concept layer; ``concepts``: its top concepts, each with its
  ``contribution`` to ``y``, ``share`` (of the layer's positive total), total ``activation``,
  optional ``heatmap`` and the ``children`` (top concepts of the layer below that built it,
  ``contribution_to_parent``); ``other``: ``y`` minus the listed concepts;
* ``completeness``: the residual ``|Σ contributions − y|``, relative to ``Σ |contributions|``,
  and the sum itself; ``active_concepts``: concepts with a positive activation per layer.

An intervention record (:func:`intervention_record`) of image ``n``: the edited ``layer``, the ``edits``
(concepts whose factor is not 1, with their unedited ``contribution``), the ``target`` / ``contrast``
both networks explain, the unedited network's ``prediction``, ``explained`` and ``probability_of_target``
(``before``), the edited network's explanation record (``after``, plus its ``probability_of_target``), and
the ``change`` of ``explained``: ``predicted`` by the unedited contributions, ``measured``, and their ``gap``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from fact_model.explanation import CrossLayerTrace, Explanation

if TYPE_CHECKING:
    from fact_model.intervention import Intervention

__all__ = [
    "CHILDREN",
    "MAX_LISTED_EDITS",
    "TOP_CLASSES",
    "class_entry",
    "concept_share",
    "explanation_record",
    "intervention_record",
    "positive_total",
    "prediction_record",
    "ranked_classes",
]

TOP_CLASSES = 5
"""Classes listed in ``top_classes``."""
CHILDREN = 3
"""Lower-layer concepts listed per concept in ``children``."""
MAX_LISTED_EDITS = 64
"""Edits an intervention record lists (the largest contributions first; ``edited_concepts`` counts all)."""


def class_entry(class_names: Sequence[str], logits: Tensor, probabilities: Tensor, index: int) -> dict[str, Any]:
    """``{index, name, probability, logit}`` of class ``index`` from one image's ``(C,)`` logits and probabilities."""
    return {
        "index": index,
        "name": class_names[index],
        "probability": float(probabilities[index]),
        "logit": float(logits[index]),
    }


def _class_reference(class_names: Sequence[str], index: int | None) -> dict[str, Any] | None:
    """``{index, name}`` of an explained (target or contrast) class, or None for no class."""
    return None if index is None else {"index": index, "name": class_names[index]}


def ranked_classes(
    class_names: Sequence[str], logits: Tensor, probabilities: Tensor, ranking: Tensor, top: int = TOP_CLASSES
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(prediction, top_classes)`` of one image from its ``(C,)`` class ranking: one order for both."""
    entries = [class_entry(class_names, logits, probabilities, c) for c in ranking[:top].tolist()]
    return entries[0], entries


def positive_total(contributions: Tensor) -> float:
    """``Σ max(contribution, 0)`` over one image's ``(K,)`` concept contributions of a layer."""
    return float(contributions.clamp(min=0).sum())


def concept_share(contribution: float, positive: float) -> float:
    """A concept's share of its layer's positive total (negative for a concept that argued against; 0 if none)."""
    return contribution / positive if positive > 0 else 0.0


def _children(trace: CrossLayerTrace | None, n: int, rank: int) -> list[dict[str, Any]]:
    """The lower-layer concepts that built the rank-``rank`` concept of ``trace.upper`` in image ``n``."""
    if trace is None:
        return []
    contributions = trace.contributions[n, rank]  # (K_lower,): to the parent's activation, not to the logit
    top = contributions.topk(min(CHILDREN, contributions.numel()))
    return [
        {"layer": trace.lower, "id": int(i), "contribution_to_parent": float(c)}
        for c, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]


def explanation_record(
    expl: Explanation,
    n: int,
    class_names: Sequence[str],
    layers: Sequence[str] | None = None,
    heatmaps: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The record of image ``n`` of ``expl`` (see the module docstring).

    Args:
        layers: the concept layers reported, in forward order (default: all); the last is the
            one whose concepts are listed, the one before it gives their ``children``.
        heatmaps: one JSON heatmap per listed concept (rank order), or None (``heatmap: null``).
    """
    selected = tuple(expl.layer_names if not layers else layers)
    layer = selected[-1]
    lower = selected[-2] if len(selected) > 1 else None
    trace = next((t for t in expl.traces if t.upper == layer and t.lower == lower), None)
    prediction, top_classes = ranked_classes(class_names, expl.logits[n], expl.probabilities[n], expl.ranking[n])
    contributions = expl.contributions[layer][n]
    positive = positive_total(contributions)
    concepts = []
    for rank, concept in enumerate(expl.top_ids[layer][n].tolist()):
        value = float(contributions[concept])
        concepts.append(
            {
                "layer": layer,
                "id": concept,
                "contribution": value,
                "share": concept_share(value, positive),
                "activation": float(expl.activations[layer][n, concept]),
                "heatmap": heatmaps[rank] if heatmaps is not None else None,
                "children": _children(trace, n, rank),
            }
        )
    residual = float(expl.residuals[layer][n])
    scale = float(contributions.abs().sum())
    return {
        "prediction": prediction,
        "top_classes": top_classes,
        "target": _class_reference(class_names, int(expl.target[n])),
        "contrast": _class_reference(class_names, None if expl.contrast is None else int(expl.contrast[n])),
        "explained": float(expl.explained[n]),
        "logit_bias": expl.logit_bias,
        "layer": layer,
        "concepts": concepts,
        "other": {"contribution": float(expl.other_contribution[layer][n])},
        "completeness": {
            "residual": residual,
            "relative_residual": residual / scale if scale > 0 else 0.0,
            "sum_of_contributions": float(contributions.sum()),
        },
        "active_concepts": {name: int((expl.activations[name][n] > 0).sum()) for name in selected},
        "faithfulness": {"method": "fact", "exact": True},
    }


def intervention_record(
    iv: Intervention,
    n: int,
    class_names: Sequence[str],
    layers: Sequence[str] | None = None,
    heatmaps: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The record of image ``n`` of an intervention (see the module docstring).

    ``edits`` lists the concepts whose factor is not 1, largest ``|contribution|`` (to the unedited
    ``explained``) first, ties by concept id, at most :data:`MAX_LISTED_EDITS` of them (``keep_top``
    on a large dictionary edits almost every concept, nearly all with contribution 0);
    ``edited_concepts`` counts them all. ``layers`` and ``heatmaps`` are those of the ``after``
    record (:func:`explanation_record`): the edited network's explanation.
    """
    before, after = iv.before, iv.after
    factors = iv.factors[n]
    contributions = before.contributions[iv.layer][n]
    edited = (factors != 1).nonzero().flatten().tolist()
    edits = sorted(
        ({"concept": c, "factor": float(factors[c]), "contribution": float(contributions[c])} for c in edited),
        key=lambda edit: (-abs(edit["contribution"]), edit["concept"]),
    )
    target = int(before.target[n])
    prediction = class_entry(class_names, before.logits[n], before.probabilities[n], int(before.ranking[n, 0]))
    after_record = explanation_record(after, n, class_names, layers, heatmaps)
    after_record["probability_of_target"] = float(after.probabilities[n, target])
    return {
        "layer": iv.layer,
        "edits": edits[:MAX_LISTED_EDITS],
        "edited_concepts": len(edits),
        "target": _class_reference(class_names, target),
        "contrast": _class_reference(class_names, None if before.contrast is None else int(before.contrast[n])),
        "before": {
            "prediction": prediction,
            "explained": float(before.explained[n]),
            "probability_of_target": float(before.probabilities[n, target]),
        },
        "after": after_record,
        "change": {
            "predicted": float(iv.predicted_change[n]),
            "measured": float(iv.measured_change[n]),
            "gap": float(iv.gap[n]),
        },
    }


def prediction_record(
    class_names: Sequence[str],
    logits: Tensor,
    probabilities: Tensor,
    ranking: Tensor,
    layer: str,
    concept_ids: Tensor,
    contributions: Tensor,
    logit_bias: float,
) -> dict[str, Any]:
    """The ``/predict`` record of one image: classes, and ``layer``'s top concepts for the predicted class.

    Args:
        logits, probabilities, ranking: ``(C,)`` of the image.
        concept_ids, contributions: ``(R,)`` the top concepts and their contributions to the
            predicted class's ``logit − b``, largest first.
    """
    prediction, top_classes = ranked_classes(class_names, logits, probabilities, ranking)
    return {
        "prediction": prediction,
        "top_classes": top_classes,
        "concepts": [
            {"layer": layer, "id": int(i), "contribution": float(c)}
            for c, i in zip(contributions.tolist(), concept_ids.tolist(), strict=True)
        ],
        "logit_bias": logit_bias,
    }
