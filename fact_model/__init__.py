"""FaCT: faithful concept traces for B-cos image classifiers.

Public API (see README):

* :class:`FaCTModel`, :class:`FaCTConfig`, :class:`ConceptLayerSpec`, :class:`Preprocessing`
* :func:`load` / :func:`save` — safetensors weights + JSON manifest
* :class:`Explanation` — what :meth:`FaCTModel.explain` returns
"""

from fact_model.artifacts import ArtifactError, load, save
from fact_model.config import ConceptLayerSpec, FaCTConfig, Preprocessing
from fact_model.explanation import CrossLayerTrace, Explanation, ExplanationMaps, PositionalShares, TopConcept
from fact_model.model import ConceptLayerInfo, FaCTModel

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "ConceptLayerInfo",
    "ConceptLayerSpec",
    "CrossLayerTrace",
    "Explanation",
    "ExplanationMaps",
    "FaCTConfig",
    "FaCTModel",
    "PositionalShares",
    "Preprocessing",
    "TopConcept",
    "__version__",
    "load",
    "save",
]
