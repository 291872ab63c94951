"""Request schemas (pydantic) of the JSON endpoints; responses are documented in the README."""

from __future__ import annotations

from typing import Literal

from PIL import Image
from pydantic import BaseModel, Field, PrivateAttr, model_validator

from service.errors import RequestError
from service.images import decode_base64, decode_image
from service.metrics import METRICS
from service.settings import SETTINGS

__all__ = ["ExplainItem", "HeatmapFormat", "HeatmapKind", "PredictItem"]

HeatmapFormat = Literal["none", "png", "array"]
HeatmapKind = Literal["bcos", "signed"]


class ExplainItem(BaseModel):
    """One image of ``/explain_batch``, with its own target and contrast."""

    image_base64: str = Field(description="JPEG, PNG or WebP bytes, base64-encoded (a data: URL prefix is accepted)")
    target: int | str | None = Field(None, description="class index or name; default: the predicted class")
    contrast: int | str | None = Field(None, description="class to contrast with (why target rather than contrast)")


class PredictItem(BaseModel):
    """One image of ``/predict``; decoded and checked when the request is validated, before batching."""

    image_base64: str = Field(description="JPEG, PNG or WebP bytes, base64-encoded")
    _image: Image.Image | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _decode(self) -> PredictItem:
        try:
            data = decode_base64(self.image_base64, SETTINGS.max_request_bytes)
            self._image = decode_image(data, SETTINGS.max_request_bytes, SETTINGS.max_pixels)
        except RequestError as err:
            METRICS.rejected.labels(endpoint="predict", reason=err.reason).inc()
            raise ValueError(err.message) from None
        return self

    @property
    def image(self) -> Image.Image:
        assert self._image is not None
        return self._image
