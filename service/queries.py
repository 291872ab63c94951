"""Region and single-concept queries of ``/explain``: request fields → masks → JSON records.

A region (a box in the model input's pixels, or a mask image) and a "where did this concept
contribute" query are answered from one explanation's slot contributions
(:attr:`fact_model.explanation.Explanation.slots`) through :mod:`fact_model.regions`, whose
cell partition maps the concept layer's feature grid to input pixels (its module
docstring says how and why). Nothing here runs the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image
from torch import Tensor

from fact_model import regions, serialize
from fact_model.explanation import Explanation
from fact_model.model import FaCTModel
from service.errors import RequestError

__all__ = ["ConceptQuery", "RegionQuery", "region_mask", "region_record", "where_values"]


@dataclass(frozen=True)
class RegionQuery:
    """A region of ``/explain``: ``box`` ``(x0, y0, x1, y1)`` in input pixels, or a decoded ``mask`` image."""

    layer: str | None = None
    box: tuple[float, float, float, float] | None = None
    mask: Image.Image | None = None


@dataclass(frozen=True)
class ConceptQuery:
    """One concept of ``/explain``'s ``where``: its layer (None: the reported one) and id."""

    layer: str | None
    concept: int


def region_mask(model: FaCTModel, query: RegionQuery) -> Tensor:
    """The query's ``(S, S)`` mask in [0, 1] at the model input size ``S`` (400 ``bad_region`` when unusable).

    A mask image of any size goes through the images' own preprocessing (resize, crop), so a mask
    drawn on the uploaded image covers the same pixels of the model input as the image does.
    """
    size = model.config.preprocessing.input_size
    try:
        if query.box is not None:
            return regions.box_mask(query.box, (size, size))
        assert query.mask is not None  # the schema asks for exactly one
        grey = query.mask.convert("L").convert("RGB")
        mask = model.preprocess([grey])[0].mean(dim=0)  # (S, S) in [0, 1]
        return regions.mask_from_array(mask, (size, size))
    except ValueError as err:
        raise RequestError(400, "bad_region", f"region: {err}") from None


def region_record(
    expl: Explanation, n: int, layer: str, mask: Tensor, top_k: int, query: RegionQuery
) -> dict[str, Any]:
    """Image ``n``'s concepts of ``layer`` ranked by their contribution inside the region.

    ``total`` is the region's part of the explained quantity ``y`` (all concepts), ``share``
    ``total / y``, ``outside`` ``y − total``; each listed concept has its ``contribution`` inside
    the region and ``in_image`` (its whole contribution). Over the whole image the region's
    contributions are the explanation's own.
    """
    found = regions.region_contributions(expl, layer, mask)
    inside = found.contributions[n]  # (K,)
    top = inside.topk(min(top_k, inside.numel()))
    whole = expl.contributions[layer][n]
    positive = serialize.positive_total(inside)
    explained = float(expl.explained[n])
    total = float(found.total[n])
    return {
        "layer": layer,
        "box": None if query.box is None else list(query.box),
        "mask": query.mask is not None,
        "coverage": float(found.coverage[n]),
        "total": total,
        "share": float(found.share[n]),
        "outside": explained - total,
        "concepts": [
            {
                "layer": layer,
                "id": int(concept),
                "contribution": float(value),
                "share": serialize.concept_share(float(value), positive),
                "in_image": float(whole[concept]),
            }
            for value, concept in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ],
        "mapping": "area-weighted cell partition of the feature grid (fact_model.regions)",
    }


def where_values(expl: Explanation, n: int, layer: str, concept: int, size: int) -> Tensor:
    """``(S, S)``: where concept ``concept`` of ``layer`` contributed to ``y`` in image ``n`` (sums to it)."""
    k = expl.contributions[layer].shape[1]
    if not 0 <= concept < k:
        raise RequestError(
            400, "unknown_concept", f"where: concept id {concept} is out of range [0, {k - 1}] for {layer!r}"
        )
    return regions.concept_region_map(expl, layer, concept, n, (size, size))
