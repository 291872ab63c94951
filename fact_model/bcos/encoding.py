"""Input encoding and logit layer of B-cos networks (spec section 2)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["AddInverse", "LogitLayer", "default_logit_bias", "encode_rgb"]


def encode_rgb(images: Tensor) -> Tensor:
    """``(N, 3, H, W)`` in [0, 1] → ``(N, 6, H, W)`` = ``[r, g, b, 1-r, 1-g, 1-b]``.

    Every colour, black included, then has a non-zero norm, so a B-cos network
    can tell colours apart by alignment alone.
    """
    return torch.cat([images, 1 - images], dim=1)


class AddInverse(nn.Module):
    """Module form of :func:`encode_rgb`."""

    def forward(self, images: Tensor) -> Tensor:
        """``(N, 3, H, W)`` → ``(N, 6, H, W)``."""
        return encode_rgb(images)


def default_logit_bias(num_classes: int) -> float:
    """``-log(num_classes - 1)``: B-cos-v2's bias, which makes the sigmoid of a zero logit ≈ 1/num_classes."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be ≥ 2, got {num_classes}")
    return -math.log(num_classes - 1)


class LogitLayer(nn.Module):
    """``logit = y / T + b`` with temperature ``T`` and a scalar bias ``b``.

    Explanations decompose ``logit − b`` (= ``y / T``); ``b`` is reported separately.
    State-dict compatible with ``bcos.modules.LogitLayer`` (no parameters).
    """

    def __init__(self, logit_temperature: float | None = None, logit_bias: float | None = None) -> None:
        super().__init__()
        if logit_temperature is not None and not logit_temperature > 0:
            raise ValueError(f"logit_temperature must be > 0, got {logit_temperature!r}")
        self.logit_temperature = logit_temperature
        self.logit_bias = logit_bias

    @property
    def temperature(self) -> float:
        """``T`` (1 when unset)."""
        return 1.0 if self.logit_temperature is None else float(self.logit_temperature)

    @property
    def bias(self) -> float:
        """``b`` (0 when unset)."""
        return 0.0 if self.logit_bias is None else float(self.logit_bias)

    def forward(self, y: Tensor) -> Tensor:
        """``(N, num_classes)`` → ``(N, num_classes)``."""
        if self.logit_temperature is not None:
            y = y / self.logit_temperature
        if self.logit_bias is not None:
            y = y + self.logit_bias
        return y

    def extra_repr(self) -> str:
        return f"logit_temperature={self.logit_temperature}, logit_bias={self.logit_bias}"
