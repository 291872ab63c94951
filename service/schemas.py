"""Request schemas of the JSON endpoints: strict, closed, and the source of the OpenAPI document.

Strict means no coercion: ``top_k: true`` or ``"3"`` is refused, not read as 1 or 3; closed
means an unknown or misspelt field (``topk``) is refused with its name, not ignored. The
request gate (:mod:`service.gate`) validates every body against these models before
BentoML sees it; BentoML reads the same models (``input_spec``) for its OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated, Literal

import bentoml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictInt, StringConstraints, model_validator

from service.gate import decoded_image
from service.settings import SETTINGS

__all__ = [
    "Box",
    "ConceptRef",
    "ExplainBatchRequest",
    "ExplainItem",
    "ExplainRequest",
    "HeatmapFormat",
    "HeatmapKind",
    "InterveneRequest",
    "PredictItem",
    "PredictRequest",
    "Region",
    "ScaleEdit",
]

HeatmapFormat = Literal["none", "png", "png8", "webp", "array", "float32"]
HeatmapKind = Literal["bcos", "signed", "spatial"]
MAX_LAYER_NAMES = 16

_STRICT = ConfigDict(extra="forbid", strict=True)
ImageBase64 = Annotated[
    str,
    Field(
        description="JPEG, PNG, WebP, GIF, BMP or TIFF bytes, base64-encoded (standard or URL-safe alphabet; "
        "line breaks and missing padding are accepted; a data: URL prefix too)",
        min_length=1,
    ),
]
ClassName = Annotated[str, StringConstraints(min_length=1, max_length=256)]
ClassRef = Annotated[
    StrictInt | ClassName,
    Field(description="class index (an integer, or a string of ASCII digits) or class name (GET /model lists them)"),
]
TopK = Annotated[StrictInt, Field(ge=1, le=SETTINGS.max_top_k, description="concepts per layer to report")]
HeatmapSize = Annotated[
    StrictInt | None,
    Field(
        description="side of each heatmap in pixels, from 8 to the model's input size (GET /model: "
        "heatmaps.size); default: the input size. Images are area-averaged, array/float32 maps block-summed "
        "(they still sum to the concept's activation)",
    ),
]
HEATMAPS_DESCRIPTION = (
    "none; images: png (lossless RGBA), png8 (palette PNG, ≤ 256 colours), webp (lossy, smallest); exact "
    "floats: array (JSON lists), float32 (base64 little-endian float32, row-major)"
)
HEATMAP_KIND_DESCRIPTION = (
    "bcos (B-cos colour of each concept's input map), signed (red/blue per-pixel contribution over the image), "
    "spatial (contribution to the logit per feature-map position, no backward pass: fastest)"
)
LayerNames = Annotated[
    list[Annotated[str, StringConstraints(min_length=1, max_length=128)]],
    Field(max_length=MAX_LAYER_NAMES, description="concept layers to trace (default: all; GET /model lists them)"),
]


MAX_EDITS = 4096
"""Most concepts one ``/intervene`` request may remove or scale."""
ConceptId = Annotated[StrictInt, Field(ge=0, description="concept id in [0, K) of the edited layer (GET /model)")]
LayerName = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class Box(BaseModel):
    """A rectangle in the model input's pixels (GET /model: input_size): x right, y down, origin top-left."""

    model_config = _STRICT
    x0: float = Field(description="left edge (pixels)")
    y0: float = Field(description="top edge (pixels)")
    x1: float = Field(description="right edge (pixels, exclusive)")
    y1: float = Field(description="bottom edge (pixels, exclusive)")


class Region(BaseModel):
    """Part of the image to query: a box, or a mask (exactly one)."""

    model_config = _STRICT
    box: Box | None = Field(None, description="a box in the model input's pixels")
    mask_base64: ImageBase64 | None = Field(
        None,
        description="a greyscale mask image (white = inside; grey = partly), base64; any size: it is resized and "
        "cropped with the image's own preprocessing, so a mask drawn on the uploaded image lines up with it",
    )
    layer: LayerName | None = Field(None, description="concept layer queried (default: the reported layer)")

    @model_validator(mode="after")
    def _one_shape(self) -> Region:
        if (self.box is None) == (self.mask_base64 is None):
            raise ValueError("give exactly one of 'box' and 'mask_base64'")
        return self


class ConceptRef(BaseModel):
    """One concept: its layer and id."""

    model_config = _STRICT
    layer: LayerName | None = Field(None, description="concept layer (default: the reported layer)")
    id: ConceptId


class ScaleEdit(BaseModel):
    """Multiply one concept's codes by ``factor`` (0 removes it; 2 doubles it)."""

    model_config = _STRICT
    concept: ConceptId
    factor: float = Field(allow_inf_nan=False, ge=-1e3, le=1e3)


class ExplainRequest(bentoml.IODescriptor):
    """``POST /explain`` as JSON (a multipart form with a file ``image`` and the same fields is accepted too)."""

    model_config = _STRICT
    image_base64: ImageBase64
    target: ClassRef | None = Field(None, description="class to explain; default: the predicted class")
    contrast: ClassRef | None = Field(None, description="explain target rather than this class (a 'why not')")
    top_k: TopK = 5
    layers: LayerNames | None = None
    heatmaps: HeatmapFormat = Field("png", description=HEATMAPS_DESCRIPTION)
    heatmap_kind: HeatmapKind = Field("bcos", description=HEATMAP_KIND_DESCRIPTION)
    heatmap_size: HeatmapSize = None
    region: Region | None = Field(
        None, description="also rank the concepts by their contribution inside this part of the image"
    )
    where: ConceptRef | None = Field(
        None, description="also map where this concept contributed (any concept, not only the top ones)"
    )


class InterveneRequest(bentoml.IODescriptor):
    """``POST /intervene``: remove or scale concepts, re-run the network from the edited reconstruction."""

    model_config = _STRICT
    image_base64: ImageBase64
    layer: LayerName | None = Field(None, description="concept layer to edit (default: the last one)")
    remove: list[ConceptId] = Field(default_factory=list, max_length=MAX_EDITS, description="concepts to remove")
    scale: list[ScaleEdit] = Field(default_factory=list, max_length=MAX_EDITS, description="concepts to scale")
    remove_top: StrictInt | None = Field(None, ge=1, description="remove the image's top-n concepts of the layer")
    keep_top: StrictInt | None = Field(None, ge=1, description="keep only the image's top-n concepts of the layer")
    target: ClassRef | None = Field(None, description="class to explain; default: the predicted class (before)")
    contrast: ClassRef | None = Field(None, description="explain target rather than this class")
    top_k: TopK = 5
    layers: LayerNames | None = None
    heatmaps: HeatmapFormat = Field("none", description=HEATMAPS_DESCRIPTION)
    heatmap_kind: HeatmapKind = Field("bcos", description=HEATMAP_KIND_DESCRIPTION)
    heatmap_size: HeatmapSize = None


class ExplainItem(BaseModel):
    """One image of ``/explain_batch``, with its own target and contrast."""

    model_config = _STRICT
    image_base64: ImageBase64
    target: ClassRef | None = Field(None, description="class to explain; default: the predicted class")
    contrast: ClassRef | None = Field(None, description="explain target rather than this class")


class ExplainBatchRequest(bentoml.IODescriptor):
    """``POST /explain_batch``: several images explained in one model call."""

    model_config = _STRICT
    items: list[ExplainItem] = Field(min_length=1, max_length=SETTINGS.max_batch_items)
    top_k: TopK = 5
    layers: LayerNames | None = None
    heatmaps: HeatmapFormat = Field("none", description=HEATMAPS_DESCRIPTION)
    heatmap_kind: HeatmapKind = Field("bcos", description=HEATMAP_KIND_DESCRIPTION)
    heatmap_size: HeatmapSize = None


class PredictItem(BaseModel):
    """One image of ``/predict``. Its pixels come from the request gate, which decoded them off the event loop."""

    model_config = _STRICT
    image_base64: ImageBase64
    _image: Image.Image | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _attach_image(self) -> PredictItem:
        self._image = decoded_image(self.image_base64)  # None while the gate itself validates the body
        return self

    @property
    def image(self) -> Image.Image:
        """The image the request gate decoded for this item."""
        if self._image is None:  # every API route is gated: a wiring bug, not a client error
            raise RuntimeError("the request gate did not decode this /predict image")
        return self._image


class PredictRequest(BaseModel):
    """``POST /predict`` as the gate validates it (BentoML batches the items of many such requests)."""

    model_config = _STRICT
    images: list[PredictItem] = Field(min_length=1, max_length=SETTINGS.predict_max_batch)
