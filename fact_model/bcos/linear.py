"""B-cos linear layer (spec section 2): the 1×1 case of the B-cos unit on vectors.

State-dict compatible with ``bcos.modules.BcosLinear`` (weight in ``linear.weight``).
Uses the same ε convention as :class:`~fact_model.bcos.conv.BcosConv2d`
(``‖x‖ = sqrt(Σx² + 1e-6)``), so a linear layer and a 1×1 convolution agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fact_model.bcos.explanation_mode import Detachable
from fact_model.bcos.functional import PATCH_NORM_EPS, bcos_combine, unit_norm_rows
from fact_model.bcos.kernel_dispatch import KernelWeightsCache, triton_runs_on

__all__ = ["BcosLinear", "NormedLinear"]


class NormedLinear(nn.Linear):
    """A bias-free ``nn.Linear`` with unit-norm weight rows."""

    def forward(self, x: Tensor) -> Tensor:
        """``(*, in)`` → ``(*, out)``: ``x ŵᵀ``."""
        return F.linear(x, unit_norm_rows(self.weight))


class BcosLinear(KernelWeightsCache, Detachable, nn.Module):
    """``out = |cos(x, ŵ)|^(B-1) · (ŵ·x)`` for vectors ``x`` of the last dimension.

    Args:
        in_features, out_features: sizes of the last dimension.
        b: the B-cos exponent (``≥ 1``).
        max_out: linear units per output combined by MaxOut.
        bias: must be ``False``.

    Shapes: ``(*, in_features)`` → ``(*, out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        b: float = 2.0,
        max_out: int = 1,
    ) -> None:
        super().__init__()
        if bias:
            raise ValueError("BcosLinear has no bias: a bias would break the exact decomposition")
        if not (isinstance(b, int | float) and b >= 1):
            raise ValueError(f"b must be a real number ≥ 1, got {b!r}")
        if not (isinstance(max_out, int) and max_out >= 1):
            raise ValueError(f"max_out must be an int ≥ 1, got {max_out!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.b = b
        self.max_out = max_out
        self.linear = NormedLinear(in_features, out_features * max_out, bias=False, device=device, dtype=dtype)

    @property
    def weight(self) -> Tensor:
        """The raw (not normalised) weight ``(out_features·max_out, in_features)``."""
        return self.linear.weight

    def forward(self, x: Tensor) -> Tensor:
        """``(*, in)`` → ``(*, out)``."""
        if self.b != 1 and triton_runs_on(x):
            from kernels.bcos_layer import bcos_linear

            layouts = self._weights_cache(x.dtype)
            return bcos_linear(x, layouts.hat, self.b, self.max_out, self.detach_dynamic, layouts)
        out = self.linear(x)
        if self.max_out > 1:
            out = out.unflatten(-1, (self.out_features, self.max_out)).amax(dim=-1)
        if self.b == 1:
            return out
        norms = (x.square().sum(dim=-1, keepdim=True) + PATCH_NORM_EPS).sqrt()
        return bcos_combine(out, norms, self.b, self.detach_dynamic)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, B={self.b}"
        if self.max_out > 1:
            s += f", max_out={self.max_out}"
        return s
