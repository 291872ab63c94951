"""PIL image → model input tensor, following a recorded :class:`~fact_model.config.Preprocessing`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from fact_model.config import Preprocessing
from fact_model.image_io import to_rgb

__all__ = ["preprocess_images", "to_rgb"]

_INTERPOLATION = {
    "bilinear": TF.InterpolationMode.BILINEAR,
    "bicubic": TF.InterpolationMode.BICUBIC,
    "nearest": TF.InterpolationMode.NEAREST,
}


def preprocess_images(images: Image.Image | Sequence[Image.Image], recipe: Preprocessing) -> Tensor:
    """PIL image(s) → ``(N, 3, input_size, input_size)`` float32 in [0, 1].

    Any PIL mode: each image goes through :func:`fact_model.image_io.to_rgb` (values by the mode's real
    range, EXIF orientation, transparency on white), which raises ``ValueError`` for a mode or value range it
    cannot read.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        raise ValueError("no images to preprocess")
    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise ValueError(f"expected PIL images, got {type(image).__name__}")
        tensor = TF.pil_to_tensor(to_rgb(image))  # (3, H, W) uint8
        mode = _INTERPOLATION[recipe.interpolation]
        size = recipe.input_size
        if recipe.resize is None:
            tensor = TF.resize(tensor, [size, size], interpolation=mode, antialias=True)
        else:
            tensor = TF.resize(tensor, [recipe.resize], interpolation=mode, antialias=True)
            tensor = TF.center_crop(tensor, [size, size])
        out.append(tensor)
    return torch.stack(out).float().div_(255)
