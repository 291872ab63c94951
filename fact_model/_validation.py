"""Checks on user input, raising ``ValueError`` with a message a caller can act on."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ClassSpec", "check_same_classes", "resolve_classes", "validate_images"]

ClassSpec = int | str | Sequence[int | str] | Tensor | None

_RANGE_SLACK = 1e-4  # float rounding from resizing/normalising may overshoot [0, 1] slightly


def validate_images(images: object, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Check a batch of RGB images and move it to the model's device and dtype.

    Args:
        images: ``(N, 3, H, W)`` floating-point tensor with values in [0, 1]
            (what ``FaCTModel.preprocess`` returns).

    Returns:
        The batch as ``dtype`` on ``device``.

    Raises:
        ValueError: not a tensor, wrong rank, channel count or dtype, empty batch,
            NaN/inf values, or values outside [0, 1].
    """
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor of shape (N, 3, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        hint = " (for one image use images.unsqueeze(0))" if images.ndim == 3 else ""
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}{hint}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (N = 0)")
    if images.shape[1] != 3:
        raise ValueError(
            f"images must have 3 (RGB) channels, got {images.shape[1]} in shape {tuple(images.shape)}; "
            "the 6-channel [r,g,b,1-r,1-g,1-b] encoding is applied inside the model"
        )
    if images.shape[2] < 8 or images.shape[3] < 8:
        raise ValueError(f"images must be at least 8×8 pixels, got {tuple(images.shape[2:])}")
    if not images.dtype.is_floating_point:
        raise ValueError(
            f"images must be a floating-point tensor in [0, 1], got dtype {images.dtype}"
            + (" (divide uint8 images by 255)" if images.dtype == torch.uint8 else "")
        )
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
        raise ValueError(f"image values must lie in [0, 1], got min {lo:.4g} and max {hi:.4g}")
    return images.to(device=device, dtype=dtype).clamp(0, 1)


def check_same_classes(data_classes: Sequence[str], model_classes: Sequence[str], hint: str = "") -> None:
    """Refuse data whose classes (names, in order) are not the model's: its labels would mean other classes.

    Raises:
        ValueError: naming the first classes of both, followed by ``hint``.
    """
    if tuple(data_classes) != tuple(model_classes):
        raise ValueError(
            f"the data's classes {list(data_classes)[:5]}… are not the model's {list(model_classes)[:5]}…"
            + (f" {hint}" if hint else "")
        )


def _one_class(value: object, class_names: Sequence[str], what: str) -> int:
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise ValueError(f"{what} must be a class index or name, got {value!r}")
    if isinstance(value, str):
        try:
            return list(class_names).index(value)
        except ValueError:
            shown = ", ".join(repr(c) for c in list(class_names)[:20])
            more = ", …" if len(class_names) > 20 else ""
            raise ValueError(f"unknown {what} class name {value!r}; valid names: {shown}{more}") from None
    integer_tensor = isinstance(value, Tensor) and value.ndim == 0 and not value.is_floating_point()
    if isinstance(value, numbers.Integral) or integer_tensor:  # int, numpy integers, 0-d integer tensors
        index = int(value)
        if not 0 <= index < len(class_names):
            raise ValueError(f"{what} class index {index} is out of range [0, {len(class_names) - 1}]")
        return index
    raise ValueError(f"{what} must be a class index (int) or name (str), got {value!r}")


def resolve_classes(spec: ClassSpec, n: int, class_names: Sequence[str], what: str) -> Tensor | None:
    """Turn a class spec into ``(N,)`` int64 class indices (or ``None`` for ``None``).

    ``spec`` is one index/name for the whole batch, or one per image.
    """
    if spec is None:
        return None
    if isinstance(spec, Tensor) and spec.ndim == 1:
        spec = spec.tolist()
    if isinstance(spec, (bytes, bytearray)):  # a Sequence of ints, but never meant as class indices
        raise ValueError(f"{what} must be a class index, a name, or one per image, got {type(spec).__name__}")
    if isinstance(spec, (str, numbers.Integral, Tensor)):
        return torch.full((n,), _one_class(spec, class_names, what), dtype=torch.long)
    if isinstance(spec, Sequence):
        if len(spec) != n:
            raise ValueError(f"{what} has {len(spec)} entries but the batch has {n} images")
        return torch.tensor([_one_class(v, class_names, what) for v in spec], dtype=torch.long)
    raise ValueError(f"{what} must be a class index, a name, or one per image, got {type(spec).__name__}")
