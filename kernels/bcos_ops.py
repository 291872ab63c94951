"""The B-cos kernels as PyTorch operators (``torch.ops.fact.*``).

Registered with :func:`torch.library.triton_op`, so ``torch.compile`` and
``torch.export`` see the Triton kernels inside. The CPU kernel of each operator is
its PyTorch reference — except under ``TRITON_INTERPRET=1``, where it runs the Triton
launcher in the interpreter (that is how the test suite checks the kernels without a GPU).

A convolution's geometry travels as 11 ints: ``[H, W, kh, kw, sh, sw, ph, pw, dh, dw, groups]``.
Optional outputs are returned as empty tensors (operator schemas have no ``Optional`` outputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from fact_model.bcos.functional import dynamic_scale, unit_norm_rows
from kernels._common import interpreting
from kernels.bcos_conv import launch_fused_conv
from kernels.bcos_postop import (
    ConvGeometry,
    launch_postop,
    launch_postop_backward,
    launch_scale_grad,
    launch_sumsq,
    reference_sumsq,
    window_sum_norms,
)

__all__ = [
    "bcos_fused_conv",
    "bcos_postop",
    "bcos_postop_backward",
    "bcos_scale_grad",
    "bcos_sumsq",
    "geometry_from_list",
    "geometry_to_list",
]

CL = torch.channels_last


def geometry_to_list(geometry: ConvGeometry) -> list[int]:
    """``ConvGeometry`` → the 11 ints the operators take."""
    return [geometry.height, geometry.width, *geometry.kernel_size, *geometry.stride, *geometry.padding,
            *geometry.dilation, geometry.groups]  # fmt: skip


def geometry_from_list(values: list[int]) -> ConvGeometry:
    """The 11 ints of an operator → ``ConvGeometry``."""
    h, w, kh, kw, sh, sw, ph, pw, dh, dw, g = (int(v) for v in values)
    return ConvGeometry(h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw), g)


def _or_empty(tensor: Tensor | None, like: Tensor) -> Tensor:
    return tensor if tensor is not None else like.new_empty(0)


def _max_out(y: Tensor, max_out: int) -> tuple[Tensor, Tensor]:
    """MaxOut over groups of ``max_out`` channels: ``(values, argmax)``."""
    units = y.unflatten(1, (y.shape[1] // max_out, max_out))
    values, best = units.max(dim=2)
    return values, best


def _reference_scale(y: Tensor, q: Tensor, geometry: ConvGeometry, b: float, max_out: int) -> tuple[Tensor, Tensor]:
    """float32 ``(after MaxOut, scale)`` from a conv output and a ``Σx²`` map."""
    out = _max_out(y.float(), max_out)[0]
    n, o, ho, wo = out.shape
    g = geometry.groups
    norms = window_sum_norms(q, geometry).unsqueeze(2)
    scale = dynamic_scale(out.view(n, g, o // g, ho, wo), norms, b).view(n, o, ho, wo)
    return out, scale


# ----------------------------------------------------------------------------- Σx² map


@triton_op("fact::bcos_sumsq", mutates_args=())
def bcos_sumsq(x: Tensor, groups: int) -> Tensor:
    """Per-pixel, per-group ``Σ_c x²``: ``(N, C, H, W)`` → ``(N, G, H, W)`` float32 (channels_last)."""
    return launch_sumsq(x, groups)


@bcos_sumsq.register_kernel("cpu")
def _bcos_sumsq_cpu(x: Tensor, groups: int) -> Tensor:
    if interpreting():
        return launch_sumsq(x, groups)
    return reference_sumsq(x, groups).contiguous(memory_format=CL)


# ----------------------------------------------------------------------------- post-op


@triton_op("fact::bcos_postop", mutates_args=())
def bcos_postop(
    y: Tensor, q: Tensor, geometry: list[int], b: float, max_out: int, write_scale: bool
) -> tuple[Tensor, Tensor]:
    """``(out, scale)`` of :func:`kernels.bcos_postop.launch_postop` (``scale`` empty unless asked)."""
    out, scale = launch_postop(y, q, geometry_from_list(geometry), b, max_out, write_scale)
    return out, _or_empty(scale, out)


@bcos_postop.register_kernel("cpu")
def _bcos_postop_cpu(
    y: Tensor, q: Tensor, geometry: list[int], b: float, max_out: int, write_scale: bool
) -> tuple[Tensor, Tensor]:
    if interpreting():
        out, scale = launch_postop(y, q, geometry_from_list(geometry), b, max_out, write_scale)
        return out, _or_empty(scale, out)
    out, scale = _reference_scale(y, q, geometry_from_list(geometry), b, max_out)
    result = (out * scale if b != 1 else out).to(y.dtype).contiguous(memory_format=CL)
    if write_scale and b != 1:
        return result, scale.to(y.dtype).contiguous(memory_format=CL)
    return result, result.new_empty(0)


@triton_op("fact::bcos_postop_backward", mutates_args=())
def bcos_postop_backward(
    grad: Tensor, y: Tensor, q: Tensor, geometry: list[int], b: float, max_out: int
) -> tuple[Tensor, Tensor]:
    """Training backward of the post-op: ``(dy, dnorm)`` (see :func:`kernels.bcos_postop.launch_postop_backward`)."""
    return launch_postop_backward(grad, y, q, geometry_from_list(geometry), b, max_out)


@bcos_postop_backward.register_kernel("cpu")
def _bcos_postop_backward_cpu(
    grad: Tensor, y: Tensor, q: Tensor, geometry: list[int], b: float, max_out: int
) -> tuple[Tensor, Tensor]:
    geo = geometry_from_list(geometry)
    if interpreting():
        return launch_postop_backward(grad, y, q, geo, b, max_out)
    with torch.enable_grad():
        y32 = y.detach().float().requires_grad_(True)
        norms = window_sum_norms(q, geo).detach().requires_grad_(True)
        out = _max_out(y32, max_out)[0]
        n, o, ho, wo = out.shape
        g = geo.groups
        combined = dynamic_scale(out.view(n, g, o // g, ho, wo), norms.unsqueeze(2), b) * out.view(n, g, o // g, ho, wo)
        dy, dnorm = torch.autograd.grad(combined, (y32, norms), grad.float().view(n, g, o // g, ho, wo))
    return dy.contiguous(memory_format=CL), dnorm.contiguous(memory_format=CL)


@triton_op("fact::bcos_scale_grad", mutates_args=())
def bcos_scale_grad(grad: Tensor, scale: Tensor, y: Tensor, max_out: int) -> Tensor:
    """Explanation-mode backward of the post-op: ``g ⊙ scale`` routed through MaxOut (``y`` unused when 1)."""
    return launch_scale_grad(grad, scale, y if max_out > 1 else None, max_out)


@bcos_scale_grad.register_kernel("cpu")
def _bcos_scale_grad_cpu(grad: Tensor, scale: Tensor, y: Tensor, max_out: int) -> Tensor:
    if interpreting():
        return launch_scale_grad(grad, scale, y if max_out > 1 else None, max_out)
    scaled = grad * scale
    if max_out == 1:
        return scaled.contiguous(memory_format=CL)
    best = _max_out(y, max_out)[1]
    routed = F.one_hot(best, max_out).permute(0, 1, 4, 2, 3).to(grad.dtype) * scaled.unsqueeze(2)
    return routed.flatten(1, 2).contiguous(memory_format=CL)


# ----------------------------------------------------------------------------- fused convolution


@triton_op("fact::bcos_fused_conv", mutates_args=())
def bcos_fused_conv(
    x: Tensor, weight_kc: Tensor, geometry: list[int], b: float, write_scale: bool
) -> tuple[Tensor, Tensor]:
    """The whole B-cos convolution in one kernel (see :func:`kernels.bcos_conv.launch_fused_conv`)."""
    out, scale = launch_fused_conv(x, weight_kc, geometry_from_list(geometry), b, write_scale)
    return out, _or_empty(scale, out)


@bcos_fused_conv.register_kernel("cpu")
def _bcos_fused_conv_cpu(
    x: Tensor, weight_kc: Tensor, geometry: list[int], b: float, write_scale: bool
) -> tuple[Tensor, Tensor]:
    geo = geometry_from_list(geometry)
    if interpreting():
        out, scale = launch_fused_conv(x, weight_kc, geo, b, write_scale)
        return out, _or_empty(scale, out)
    kh, kw = geo.kernel_size
    weight = weight_kc.view(kh, kw, x.shape[1], -1).permute(3, 2, 0, 1)
    y = F.conv2d(x, unit_norm_rows(weight), None, geo.stride, geo.padding, geo.dilation)
    return _bcos_postop_cpu(y.contiguous(memory_format=CL), reference_sumsq(x).contiguous(memory_format=CL),
                            geometry, b, 1, write_scale)  # fmt: skip
