"""B-cos convolution (spec section 2; Böhle et al., TPAMI 2024).

State-dict compatible with ``bcos.modules.BcosConv2d``: the weight lives in a
child ``linear`` (``linear.weight``), so B-cos-v2 checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fact_model.bcos.explanation_mode import Detachable
from fact_model.bcos.functional import bcos_combine, patch_norms, unit_norm_rows
from fact_model.bcos.kernel_dispatch import KernelWeightsCache, triton_runs_on

__all__ = ["BcosConv2d", "NormedConv2d", "runs_as_subsampled_pointwise", "subsample"]

IntOrPair = int | tuple[int, int]


def _pair(value: IntOrPair, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, tuple | list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def runs_as_subsampled_pointwise(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether ``conv`` on ``x`` should run as a stride-1 1×1 conv of the subsampled input.

    True for an unpadded strided 1×1 convolution on the CPU, except while exporting (the
    exported graph keeps the plain strided Conv). oneDNN 3.12 (PyTorch 2.14.1) computes the
    weight gradient of such a convolution on a channels_last float32 input with 1–7 input
    channels with a kernel that corrupts the heap, hangs or returns a wrong gradient on
    CPUs without AVX-512 (see ``tests/fact_model/test_onednn_workaround.py``). Applied to every strided
    1×1 conv on the CPU, not just those: the result is the same function either way.
    """
    return (
        x.device.type == "cpu"
        and conv.kernel_size == (1, 1)
        and conv.stride != (1, 1)
        and conv.padding in ((0, 0), "valid")
        and not torch.compiler.is_exporting()
    )


def subsample(x: Tensor, stride: tuple[int, int]) -> Tensor:
    """The positions an unpadded 1×1 conv of ``stride`` reads: ``(N, C, H, W)`` → ``(N, C, ⌈H/sh⌉, ⌈W/sw⌉)``.

    Keeps a channels_last input channels_last (a dense copy), so the conv that follows
    still gets oneDNN's NHWC kernels.
    """
    sub = x[..., :: stride[0], :: stride[1]]
    if x.is_contiguous(memory_format=torch.channels_last):
        return sub.contiguous(memory_format=torch.channels_last)
    return sub


class NormedConv2d(nn.Conv2d):
    """A bias-free ``nn.Conv2d`` that convolves with unit-norm filters ``ŵ = w/‖w‖``."""

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` → ``(N, O, H', W')``: ``conv(x, ŵ)``."""
        weight = unit_norm_rows(self.weight)
        if x.is_contiguous(memory_format=torch.channels_last):
            # oneDNN picks its (faster) NHWC kernels only when the filters are NHWC too.
            weight = weight.contiguous(memory_format=torch.channels_last)
        if runs_as_subsampled_pointwise(self, x):
            # Same function and gradients as the strided conv, without oneDNN's broken
            # strided-1×1 weight-gradient kernel (see runs_as_subsampled_pointwise).
            return F.conv2d(subsample(x, self.stride), weight, None, 1, 0, 1, self.groups)
        return self._conv_forward(x, weight, None)


class BcosConv2d(KernelWeightsCache, Detachable, nn.Module):
    """``out = |cos(x, ŵ)|^(B-1) · (ŵ·x)`` over every receptive-field patch.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups:
            as for ``nn.Conv2d`` (zero padding only: the patch norm assumes it).
        b: the B-cos exponent; ``1`` is a plain unit-norm convolution, ``2`` the
            usual choice, any real ``b ≥ 1`` works.
        max_out: number of linear units per output channel combined by MaxOut
            (``1`` = no MaxOut).
        bias: accepted for signature compatibility; must be ``False`` (a bias breaks
            the exact decomposition).

    Shapes: ``(N, in_channels, H, W)`` → ``(N, out_channels, H', W')``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair = 1,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        b: float = 2.0,
        max_out: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if bias:
            raise ValueError("BcosConv2d has no bias: a bias would break the exact decomposition")
        if padding_mode != "zeros":
            raise ValueError(f"BcosConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        if not (isinstance(b, int | float) and b >= 1):
            raise ValueError(f"b must be a real number ≥ 1, got {b!r}")
        if not (isinstance(max_out, int) and max_out >= 1):
            raise ValueError(f"max_out must be an int ≥ 1, got {max_out!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                f"must both be divisible by groups ({groups})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.groups = groups
        self.b = float(b) if not float(b).is_integer() else int(b)
        self.max_out = max_out
        self.linear = NormedConv2d(
            in_channels,
            out_channels * max_out,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            groups,
            bias=False,
            device=device,
            dtype=dtype,
        )

    @property
    def weight(self) -> Tensor:
        """The raw (not normalised) weight ``(out_channels·max_out, in/groups, kh, kw)``."""
        return self.linear.weight

    def linear_out(self, x: Tensor) -> Tensor:
        """``ŵ·x`` after MaxOut: ``(N, in, H, W)`` → ``(N, out, H', W')``."""
        out = self.linear(x)
        if self.max_out > 1:
            out = out.unflatten(1, (self.out_channels, self.max_out)).amax(dim=2)
        return out

    def patch_norms(self, x: Tensor) -> Tensor:
        """``‖x_patch‖`` per group and output position: ``(N, G, H', W')``."""
        return patch_norms(x, self.kernel_size, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in, H, W)`` → ``(N, out, H', W')``: ``|cos|^(B-1) · (ŵ·x)``."""
        if self.b != 1 and triton_runs_on(x):
            return self._forward_kernels(x)
        out = self.linear_out(x)
        if self.b == 1:
            return out
        n, o, h, w = out.shape
        g = self.groups
        # View outputs as (N, G, O/G, H', W') so each group's patch norm broadcasts
        # over its output channels without materialising a repeat.
        grouped = out.view(n, g, o // g, h, w)
        norms = self.patch_norms(x).unsqueeze(2)
        return bcos_combine(grouped, norms, self.b, self.detach_dynamic).view(n, o, h, w)

    def _forward_kernels(self, x: Tensor) -> Tensor:
        """The same function on the Triton kernels of ``kernels/`` (CUDA; see :mod:`kernels.bcos_layer`)."""
        from kernels.bcos_layer import bcos_conv2d
        from kernels.bcos_postop import ConvGeometry

        geometry = ConvGeometry(
            x.shape[2], x.shape[3], self.kernel_size, self.stride, self.padding, self.dilation, self.groups
        )
        layouts = self._weights_cache(x.dtype)
        return bcos_conv2d(x, layouts.hat, geometry, self.b, self.max_out, self.detach_dynamic, layouts)

    def extra_repr(self) -> str:
        s = f"B={self.b}"
        if self.max_out > 1:
            s += f", max_out={self.max_out}"
        return s
