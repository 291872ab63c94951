"""FaCT: faithful concept traces for B-cos image classifiers.

Public API (see README):

* :class:`FaCTModel`, :class:`FaCTConfig`, :class:`ConceptLayerSpec`, :class:`Preprocessing`
* :func:`load` / :func:`save` — safetensors weights + JSON manifest
* :class:`Explanation` — what :meth:`FaCTModel.explain` returns
* :func:`region_contributions`, :func:`concept_region_map` — region queries (:mod:`fact_model.regions`)
* :func:`intervene` / :class:`Intervention` — remove or rescale concepts and explain the edited network

The names are imported on first use (PEP 562), so ``import fact_model`` and the ``fact`` command's
``--help`` do not pay for torch, torchvision and bcos until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "ArtifactError": "fact_model.artifacts",
    "Options": "fact_model.options",
    "load": "fact_model.artifacts",
    "save": "fact_model.artifacts",
    "ConceptLayerSpec": "fact_model.config",
    "FaCTConfig": "fact_model.config",
    "Preprocessing": "fact_model.config",
    "CrossLayerTrace": "fact_model.explanation",
    "Explanation": "fact_model.explanation",
    "ExplanationMaps": "fact_model.explanation",
    "PositionalShares": "fact_model.explanation",
    "TopConcept": "fact_model.explanation",
    "Intervention": "fact_model.intervention",
    "intervene": "fact_model.intervention",
    "ConceptLayerInfo": "fact_model.model",
    "FaCTModel": "fact_model.model",
    "RegionContributions": "fact_model.regions",
    "box_mask": "fact_model.regions",
    "cell_weights": "fact_model.regions",
    "concept_region_map": "fact_model.regions",
    "mask_from_array": "fact_model.regions",
    "region_contributions": "fact_model.regions",
    "spread_to_pixels": "fact_model.regions",
}

__all__ = [
    "ArtifactError",
    "ConceptLayerInfo",
    "ConceptLayerSpec",
    "CrossLayerTrace",
    "Explanation",
    "ExplanationMaps",
    "FaCTConfig",
    "FaCTModel",
    "Intervention",
    "Options",
    "PositionalShares",
    "Preprocessing",
    "RegionContributions",
    "TopConcept",
    "__version__",
    "box_mask",
    "cell_weights",
    "concept_region_map",
    "intervene",
    "load",
    "mask_from_array",
    "region_contributions",
    "save",
    "spread_to_pixels",
]

if TYPE_CHECKING:
    from fact_model.artifacts import ArtifactError, load, save
    from fact_model.config import ConceptLayerSpec, FaCTConfig, Preprocessing
    from fact_model.explanation import CrossLayerTrace, Explanation, ExplanationMaps, PositionalShares, TopConcept
    from fact_model.intervention import Intervention, intervene
    from fact_model.model import ConceptLayerInfo, FaCTModel
    from fact_model.regions import (
        RegionContributions,
        box_mask,
        cell_weights,
        concept_region_map,
        mask_from_array,
        region_contributions,
        spread_to_pixels,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fact_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
