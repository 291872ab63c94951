"""The B-cos maths in one place (spec section 2).

A B-cos unit with weight row ``w`` (used as ``ŵ = w/‖w‖``) maps an input patch ``x`` to

    out = |cos(x, ŵ)|^(B-1) · (ŵ·x),     cos(x, ŵ) = (ŵ·x) / ‖x‖

Every B-cos layer of the package (convolution, linear, head) and the Triton kernels of
``kernels/`` are checked against the functions of this module. They follow the
conventions of the ``bcos`` package (B-cos-v2) so that its checkpoints give the same
outputs: ε = 1e-6 under the square root of the patch norm, and for B ≠ 2 the
``+1e-6`` added to ``|cos|`` before the power.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "COS_EPS",
    "PATCH_NORM_EPS",
    "bcos_combine",
    "dynamic_scale",
    "patch_norms",
    "unit_norm_rows",
]

PATCH_NORM_EPS = 1e-6
"""Added to the squared patch norm before the square root (spec section 2)."""

COS_EPS = 1e-6
"""Added to ``|cos|`` before the power for B ≠ 2 (keeps the gradient finite at cos = 0)."""


def unit_norm_rows(weight: Tensor) -> Tensor:
    """``weight`` divided by the L2 norm of each output row.

    Args:
        weight: ``(O, ...)`` — a conv weight ``(O, C/G, kh, kw)`` or a linear weight ``(O, C)``.

    Returns:
        ``ŵ`` with the same shape, every ``ŵ[o]`` of unit L2 norm.
    """
    dims = tuple(range(1, weight.ndim))
    return weight / torch.linalg.vector_norm(weight, dim=dims, keepdim=True)


def patch_norms(
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> Tensor:
    """L2 norm of every receptive-field patch of a (grouped) convolution.

    The patch of output position ``p`` in group ``g`` is every input channel of
    group ``g`` under the kernel window at ``p`` (zero padding included).

    Args:
        x: ``(N, C, H, W)`` convolution input.
        kernel_size, stride, padding, dilation, groups: those of the convolution.

    Returns:
        ``(N, G, H_out, W_out)``: ``sqrt(Σ_patch x² + ε)``, one map per group.
    """
    n, c, h, w = x.shape
    # Σ over the group's channels first, so the window sum runs on G maps, not C.
    squares = x.square().view(n, groups, c // groups, h, w).sum(dim=2)
    kh, kw = kernel_size
    pooling_fits = dilation == (1, 1) and padding[0] <= kh // 2 and padding[1] <= kw // 2
    if pooling_fits:
        # avg_pool2d counts zero padding in its divisor by default, so ×(kh·kw) is the window sum.
        window_sums = F.avg_pool2d(squares, kernel_size, stride, padding) * (kh * kw)
    else:
        ones = squares.new_ones(groups, 1, kh, kw)
        window_sums = F.conv2d(squares, ones, None, stride, padding, dilation, groups)
    return (window_sums + PATCH_NORM_EPS).sqrt()


def dynamic_scale(linear_out: Tensor, norms: Tensor, b: float) -> Tensor:
    """The input-dependent factor ``|cos|^(B-1)``.

    Args:
        linear_out: ``ŵ·x``, any shape.
        norms: ``‖x‖``, broadcastable to ``linear_out``.
        b: the B-cos exponent ``B`` (> 1; B = 1 has no dynamic factor).

    Returns:
        A tensor of ``linear_out``'s shape.
    """
    if b == 2:
        # |cos| = |ŵ·x| / ‖x‖; special-cased as B-cos-v2 does (no ε, no pow).
        return linear_out.abs() / norms
    return ((linear_out / norms).abs() + COS_EPS).pow(b - 1)


def bcos_combine(linear_out: Tensor, norms: Tensor, b: float, detach_scale: bool) -> Tensor:
    """``|cos|^(B-1) · (ŵ·x)``, with the scale optionally detached (explanation mode).

    With ``detach_scale`` the result is ``W̃(x)·x`` with ``W̃(x)`` treated as a
    constant by autograd, so ``∂out/∂x`` is the dynamic-linear matrix itself
    (spec section 2, "Explanation mode"). The forward value is the same either way.
    """
    if b == 1:
        return linear_out
    if detach_scale:
        scale = dynamic_scale(linear_out.detach(), norms.detach(), b)
    else:
        scale = dynamic_scale(linear_out, norms, b)
    return scale * linear_out
