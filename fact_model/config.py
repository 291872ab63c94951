"""Typed, validated configuration of a FaCT model — what the artifact manifest records."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["ConceptLayerSpec", "FaCTConfig", "Preprocessing"]

Interpolation = Literal["bilinear", "bicubic", "nearest"]
OutputActivation = Literal["softmax", "sigmoid"]


@dataclass(frozen=True)
class ConceptLayerSpec:
    """A concept layer inserted after backbone stage ``layer``.

    Attributes:
        layer: stage name (see ``StagedBackbone.stage_names``), e.g. ``"layer4"``.
        num_concepts: dictionary size ``K``.
        k: active concepts per position.
    """

    layer: str
    num_concepts: int
    k: int

    def __post_init__(self) -> None:
        if not isinstance(self.layer, str) or not self.layer:
            raise ValueError(f"concept layer name must be a non-empty string, got {self.layer!r}")
        if not (isinstance(self.num_concepts, int) and self.num_concepts >= 1):
            raise ValueError(f"num_concepts must be a positive int, got {self.num_concepts!r}")
        if not (isinstance(self.k, int) and 1 <= self.k <= self.num_concepts):
            raise ValueError(f"k must be an int in [1, num_concepts={self.num_concepts}], got {self.k!r}")


@dataclass(frozen=True)
class Preprocessing:
    """How a PIL image becomes the model's ``(3, H, W)`` input in [0, 1].

    Attributes:
        input_size: side of the square model input, in pixels.
        resize: shorter side after resizing, before the crop; ``None`` resizes the
            whole image straight to ``input_size × input_size`` (no crop).
        interpolation: resampling filter of the resize.
    """

    input_size: int
    resize: int | None = None
    interpolation: Interpolation = "bilinear"

    def __post_init__(self) -> None:
        if not (isinstance(self.input_size, int) and self.input_size >= 8):
            raise ValueError(f"input_size must be an int ≥ 8, got {self.input_size!r}")
        if self.resize is not None and not (isinstance(self.resize, int) and self.resize >= self.input_size):
            raise ValueError(f"resize must be None or an int ≥ input_size ({self.input_size}), got {self.resize!r}")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation must be bilinear, bicubic or nearest, got {self.interpolation!r}")


@dataclass(frozen=True)
class FaCTConfig:
    """Everything needed to rebuild a FaCT model's architecture.

    Attributes:
        backbone: registered architecture name (``fact_model.backbones.list_backbones()``).
        backbone_kwargs: keyword arguments of that architecture (``num_classes`` is
            taken from ``class_names``).
        concept_layers: one spec per concept layer, any order (sorted by stage order).
        class_names: one name per output class.
        preprocessing: image → tensor recipe.
        output_activation: ``"softmax"`` or ``"sigmoid"`` (B-cos-v2 models are trained
            with a binary cross-entropy, so their probabilities are sigmoids).
    """

    backbone: str
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    concept_layers: tuple[ConceptLayerSpec, ...] = ()
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    output_activation: OutputActivation = "softmax"

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "concept_layers", tuple(self.concept_layers))
        if len(self.class_names) < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {len(self.class_names)}")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names must be unique")
        if "num_classes" in self.backbone_kwargs and self.backbone_kwargs["num_classes"] != len(self.class_names):
            raise ValueError(
                f"backbone_kwargs num_classes={self.backbone_kwargs['num_classes']} "
                f"disagrees with {len(self.class_names)} class names"
            )
        names = [spec.layer for spec in self.concept_layers]
        if len(set(names)) != len(names):
            raise ValueError(f"concept layers must be at distinct stages, got {names}")
        if self.output_activation not in ("softmax", "sigmoid"):
            raise ValueError(f"output_activation must be 'softmax' or 'sigmoid', got {self.output_activation!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (the ``model`` section of the manifest)."""
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        d["concept_layers"] = [asdict(s) for s in self.concept_layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FaCTConfig:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on missing or malformed fields."""
        try:
            return cls(
                backbone=d["backbone"],
                class_names=tuple(d["class_names"]),
                preprocessing=Preprocessing(**d["preprocessing"]),
                concept_layers=tuple(ConceptLayerSpec(**s) for s in d.get("concept_layers", [])),
                backbone_kwargs=dict(d.get("backbone_kwargs", {})),
                output_activation=d.get("output_activation", "softmax"),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed model configuration: {err!r}") from err
