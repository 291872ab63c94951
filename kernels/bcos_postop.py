"""Fused B-cos post-op: conv output ``ŵ·x`` → ``|cos|^(B-1) · (ŵ·x)`` in one pass (NHWC).

The plain PyTorch B-cos layer runs ~10 elementwise and pooling passes after the
convolution (square, channel sum, window average, sqrt, abs, divide, pow, multiply).
Here:

* :func:`launch_sumsq` reads the layer input once and writes the per-pixel, per-group
  ``Σ_c x²`` map ``q`` (``(N, H, W, G)``, float32 — C/G times smaller than the input);
* :func:`launch_postop` reads the convolution output once, builds each output pixel's
  patch norm ``sqrt(Σ_window q + ε)`` from ``q`` (stride, padding, dilation, groups
  handled by indexing, no ``repeat_interleave``), applies MaxOut and the dynamic
  scale (B = 2 special-cased, any B ≥ 1), and writes the output in the input's
  dtype — optionally also the scale ``|cos|^(B-1)`` for explanation mode;
* :func:`launch_postop_backward` is the training backward of the post-op: the
  gradient w.r.t. the convolution output (routed through MaxOut) and w.r.t. each
  patch norm (reduced over the group's channels in the kernel, no atomics);
* :func:`launch_scale_grad` is the explanation-mode backward: ``g ⊙ scale`` (the
  scale is a constant there), routed through MaxOut.

All tensors are NHWC: 4-d ``channels_last`` tensors, or ``(P, C)`` row matrices
with ``P = N·H·W`` pixels. The references (:func:`reference_postop`, …) are written
with the functions of :mod:`fact_model.bcos.functional`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from fact_model.bcos.functional import COS_EPS, PATCH_NORM_EPS, dynamic_scale, patch_norms
from kernels._common import KernelInputError, check_same_device, check_tensor, interpreting, launchable, sm_count

__all__ = [
    "ConvGeometry",
    "bcos_postop",
    "bcos_postop_backward",
    "bcos_scale_grad",
    "bcos_sumsq",
    "geometry_from_list",
    "geometry_to_list",
    "launch_postop",
    "launch_postop_backward",
    "launch_scale_grad",
    "launch_sumsq",
    "reference_postop",
    "reference_sumsq",
    "sumsq_blocks",
]

BLOCK_P = 64
BLOCK_C = 64


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a B-cos convolution except its tensors.

    ``height``/``width`` are the input's spatial size; ``out_height``/``out_width``
    follow from the usual convolution arithmetic.
    """

    height: int
    width: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def out_height(self) -> int:
        kh = self.dilation[0] * (self.kernel_size[0] - 1) + 1
        return (self.height + 2 * self.padding[0] - kh) // self.stride[0] + 1

    @property
    def out_width(self) -> int:
        kw = self.dilation[1] * (self.kernel_size[1] - 1) + 1
        return (self.width + 2 * self.padding[1] - kw) // self.stride[1] + 1


def b_mode(b: float) -> int:
    """0: B = 1 (no scale), 1: B = 2 (``|cos|``, no ε), 2: general B (``(|cos| + ε)^(B-1)``)."""
    if b == 1:
        return 0
    return 1 if b == 2 else 2


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _sumsq_kernel(x_ptr, q_ptr, P, C, CG, G, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    g = tl.program_id(1)
    offs_p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    mask_p = offs_p < P
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = mask_p[:, None] & (offs_c < CG)[None, :]
        v = tl.load(x_ptr + offs_p[:, None] * C + g * CG + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(v * v, axis=1)
    tl.store(q_ptr + offs_p * G + g, acc, mask=mask_p)


@triton.jit
def _window_norm(q_ptr, offs_p, mask_p, g, G, H, W, HO, WO, SH, SW, PH, PW, DH, DW, KH: tl.constexpr, KW: tl.constexpr):
    """``sqrt(Σ_window q + ε)`` for output pixels ``offs_p`` of group ``g``: ``(BLOCK_P,)`` float32."""
    n = offs_p // (HO * WO)
    rem = offs_p % (HO * WO)
    ho = rem // WO
    wo = rem % WO
    total = tl.zeros(offs_p.shape, dtype=tl.float32)
    for r in range(KH):
        ih = ho * SH - PH + r * DH
        for s in range(KW):
            iw = wo * SW - PW + s * DW
            valid = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            total += tl.load(q_ptr + ((n * H + ih) * W + iw) * G + g, mask=valid, other=0.0)
    return tl.sqrt(total + 1e-6)


@triton.jit
def _scale_of(y, norm, b, B_MODE: tl.constexpr):
    """The dynamic scale ``|cos|^(B-1)`` of float32 ``y`` with patch norms ``norm`` (broadcast)."""
    if B_MODE == 1:
        return tl.abs(y) / norm
    else:
        c = tl.abs(y) / norm + 1e-6
        return tl.exp2((b - 1.0) * tl.log2(c))


@triton.jit
def _max_out(y_rows, mask, MAX_OUT: tl.constexpr):
    """MaxOut over the ``MAX_OUT`` adjacent units at ``y_rows``: (float32 values, int32 winning unit)."""
    y = tl.load(y_rows, mask=mask, other=0.0).to(tl.float32)
    best = tl.zeros(y.shape, dtype=tl.int32)
    for m in range(1, MAX_OUT):
        candidate = tl.load(y_rows + m, mask=mask, other=0.0).to(tl.float32)
        best = tl.where(candidate > y, m, best)
        y = tl.maximum(y, candidate)
    return y, best


@triton.jit
def _postop_kernel(
    y_ptr, q_ptr, out_ptr, scale_ptr,
    P, H, W, HO, WO, O, OG, G, SH, SW, PH, PW, DH, DW, b,
    KH: tl.constexpr, KW: tl.constexpr, MAX_OUT: tl.constexpr, B_MODE: tl.constexpr,
    WRITE_SCALE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_p = tl.program_id(0)
    g = tl.program_id(1)
    pid_c = tl.program_id(2)
    offs_p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    mask_p = offs_p < P
    offs_o = g * OG + pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = mask_p[:, None] & ((pid_c * BLOCK_C + tl.arange(0, BLOCK_C)) < OG)[None, :]
    y_rows = y_ptr + offs_p[:, None] * (O * MAX_OUT) + offs_o[None, :] * MAX_OUT
    y, _ = _max_out(y_rows, mask, MAX_OUT)
    out_offs = offs_p[:, None] * O + offs_o[None, :]
    if B_MODE == 0:
        tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        norm = _window_norm(q_ptr, offs_p, mask_p, g, G, H, W, HO, WO, SH, SW, PH, PW, DH, DW, KH, KW)
        scale = _scale_of(y, norm[:, None], b, B_MODE)
        tl.store(out_ptr + out_offs, (scale * y).to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_SCALE:
            tl.store(scale_ptr + out_offs, scale.to(scale_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _postop_backward_kernel(
    g_ptr, y_ptr, q_ptr, dy_ptr, dn_ptr,
    P, H, W, HO, WO, O, OG, G, SH, SW, PH, PW, DH, DW, b,
    KH: tl.constexpr, KW: tl.constexpr, MAX_OUT: tl.constexpr, B_MODE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_p = tl.program_id(0)
    grp = tl.program_id(1)
    offs_p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    mask_p = offs_p < P
    norm = _window_norm(q_ptr, offs_p, mask_p, grp, G, H, W, HO, WO, SH, SW, PH, PW, DH, DW, KH, KW)
    dnorm = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, OG, BLOCK_C):
        offs_o = grp * OG + c0 + tl.arange(0, BLOCK_C)
        mask = mask_p[:, None] & ((c0 + tl.arange(0, BLOCK_C)) < OG)[None, :]
        y_rows = y_ptr + offs_p[:, None] * (O * MAX_OUT) + offs_o[None, :] * MAX_OUT
        y, best = _max_out(y_rows, mask, MAX_OUT)
        grad = tl.load(g_ptr + offs_p[:, None] * O + offs_o[None, :], mask=mask, other=0.0).to(tl.float32)
        ratio = tl.abs(y) / norm[:, None]  # |cos|
        if B_MODE == 1:
            # out = y·|y|/n:  ∂out/∂y = 2|y|/n,  ∂out/∂n = −y|y|/n²
            d_y = 2.0 * ratio
            d_n = -y * ratio / norm[:, None]
        else:
            # out = y·c^(B−1), c = |y|/n + ε:  ∂out/∂y = s + (B−1)(s/c)|y|/n,  ∂out/∂n = −(B−1)(s/c) y|y|/n²
            c = ratio + 1e-6
            s = tl.exp2((b - 1.0) * tl.log2(c))
            d_y = s + (b - 1.0) * (s / c) * ratio
            d_n = -(b - 1.0) * (s / c) * y * ratio / norm[:, None]
        dnorm += tl.sum(tl.where(mask, grad * d_n, 0.0), axis=1)
        for m in range(MAX_OUT):
            routed = tl.where(best == m, grad * d_y, 0.0)
            tl.store(dy_ptr + offs_p[:, None] * (O * MAX_OUT) + offs_o[None, :] * MAX_OUT + m, routed, mask=mask)
    tl.store(dn_ptr + offs_p * G + grp, dnorm, mask=mask_p)


@triton.jit
def _scale_grad_kernel(
    g_ptr, s_ptr, y_ptr, dy_ptr, P, O,
    MAX_OUT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    offs_o = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_p < P)[:, None] & (offs_o < O)[None, :]
    offs = offs_p[:, None] * O + offs_o[None, :]
    grad = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scaled = grad * tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MAX_OUT == 1:
        tl.store(dy_ptr + offs, scaled.to(dy_ptr.dtype.element_ty), mask=mask)
    else:
        y_rows = y_ptr + offs_p[:, None] * (O * MAX_OUT) + offs_o[None, :] * MAX_OUT
        y, best = _max_out(y_rows, mask, MAX_OUT)
        dy_rows = dy_ptr + offs_p[:, None] * (O * MAX_OUT) + offs_o[None, :] * MAX_OUT
        for m in range(MAX_OUT):
            tl.store(dy_rows + m, tl.where(best == m, scaled, 0.0).to(dy_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _rows(name: str, tensor: Tensor) -> Tensor:
    """A channels_last 4-d tensor or a 2-d row matrix, checked, as ``(P, C)`` rows."""
    if tensor.ndim == 4:
        check_tensor(name, tensor, channels_last=True)
        return tensor.permute(0, 2, 3, 1).reshape(-1, tensor.shape[1])
    check_tensor(name, tensor, ndim=2)
    return tensor


def _nhwc_empty(n: int, c: int, h: int, w: int, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.empty((n, c, h, w), device=like.device, dtype=dtype or like.dtype, memory_format=torch.channels_last)


def launch_sumsq(x: Tensor, groups: int = 1) -> Tensor:
    """Per-pixel, per-group ``Σ_c x²`` of a channels_last input.

    Args:
        x: ``(N, C, H, W)`` channels_last, float32/float16/bfloat16.
        groups: ``G``; ``C`` must be divisible by it.

    Returns:
        ``q``: ``(N, G, H, W)`` float32, channels_last (memory ``(N, H, W, G)``).
    """
    check_tensor("x", x, ndim=4, channels_last=True)
    n, c, h, w = x.shape
    if not (isinstance(groups, int) and groups >= 1 and c % groups == 0):
        raise KernelInputError(f"groups must be a positive divisor of x's {c} channels, got {groups!r}")
    q = _nhwc_empty(n, groups, h, w, x, torch.float32)
    p = n * h * w
    block_p, block_c = sumsq_blocks(p, c // groups, groups, x.device)
    grid = (triton.cdiv(p, block_p), groups)
    launchable(_sumsq_kernel, x)[grid](x, q, p, c, c // groups, groups, BLOCK_P=block_p, BLOCK_C=block_c)
    return q


def sumsq_blocks(pixels: int, group_channels: int, groups: int, device: torch.device) -> tuple[int, int]:
    """``(BLOCK_P, BLOCK_C)`` of the Σx² kernel: enough programs to fill the GPU.

    Late layers have few pixels and many channels (64·7² pixels × 2048): 64-pixel blocks
    would give 49 programs, each looping over all channels. Pixel blocks shrink (to 8)
    until there are about four programs per SM, and channel blocks widen to 128 so each
    program's loads stay wide.
    """
    target = 4 * sm_count(device)
    block_p = BLOCK_P
    while block_p > 8 and triton.cdiv(pixels, block_p) * groups < target:
        block_p //= 2
    block_c = min(128, max(16, triton.next_power_of_2(group_channels)))
    return block_p, block_c


def _check_postop_args(y: Tensor, q: Tensor, geometry: ConvGeometry, b: float, max_out: int) -> tuple[int, int]:
    """Validate the post-op's tensors; return ``(N, O)`` (O after MaxOut)."""
    check_tensor("y", y, ndim=4, channels_last=True)
    check_tensor("q", q, ndim=4, channels_last=True, dtypes=(torch.float32,))
    check_same_device(y=y, q=q)
    if not (isinstance(b, int | float) and b >= 1):
        raise KernelInputError(f"b must be a real number ≥ 1, got {b!r}")
    if not (isinstance(max_out, int) and max_out >= 1) or y.shape[1] % max_out:
        raise KernelInputError(f"max_out must be a positive divisor of y's {y.shape[1]} channels, got {max_out!r}")
    n, om, ho, wo = y.shape
    g = geometry.groups
    expected_q = (n, g, geometry.height, geometry.width)
    if tuple(q.shape) != expected_q:
        raise KernelInputError(f"q must have shape {expected_q} (N, groups, H, W), got {tuple(q.shape)}")
    if (ho, wo) != (geometry.out_height, geometry.out_width):
        expected = (geometry.out_height, geometry.out_width)
        raise KernelInputError(f"y's spatial size {(ho, wo)} does not match the geometry's output {expected}")
    o = om // max_out
    if o % g:
        raise KernelInputError(f"y's {o} output channels (after MaxOut) are not divisible by groups={g}")
    return n, o


def _geometry_args(geometry: ConvGeometry) -> tuple[int, ...]:
    return (*geometry.stride, *geometry.padding, *geometry.dilation)


def launch_postop(
    y: Tensor, q: Tensor, geometry: ConvGeometry, b: float, max_out: int = 1, write_scale: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``|cos|^(B-1) · y`` with MaxOut, from the conv output and the ``Σx²`` map.

    Args:
        y: ``(N, O·max_out, H', W')`` channels_last conv output ``ŵ·x`` (unit-norm filters).
        q: ``(N, G, H, W)`` float32 from :func:`launch_sumsq` of the conv input.
        geometry: the convolution's geometry (input size, kernel, stride, …, groups).
        b: the B-cos exponent (≥ 1).
        max_out: linear units per output channel combined by MaxOut.
        write_scale: also return the scale ``|cos|^(B-1)`` (``None`` when B = 1).

    Returns:
        ``(out, scale)``: ``out`` ``(N, O, H', W')`` channels_last in ``y``'s dtype;
        ``scale`` the same shape, or ``None``.
    """
    n, o = _check_postop_args(y, q, geometry, b, max_out)
    ho, wo = geometry.out_height, geometry.out_width
    out = _nhwc_empty(n, o, ho, wo, y)
    mode = b_mode(b)
    scale = _nhwc_empty(n, o, ho, wo, y) if write_scale and mode else None
    p, g = n * ho * wo, geometry.groups
    og = o // g
    grid = (triton.cdiv(p, BLOCK_P), g, triton.cdiv(og, BLOCK_C))
    launchable(_postop_kernel, y)[grid](
        y, q, out, scale if scale is not None else out,
        p, geometry.height, geometry.width, ho, wo, o, og, g, *_geometry_args(geometry), float(b),
        KH=geometry.kernel_size[0], KW=geometry.kernel_size[1], MAX_OUT=max_out, B_MODE=mode,
        WRITE_SCALE=scale is not None, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
    )  # fmt: skip
    return out, scale


def launch_postop_backward(
    grad: Tensor, y: Tensor, q: Tensor, geometry: ConvGeometry, b: float, max_out: int = 1
) -> tuple[Tensor, Tensor]:
    """Training backward of :func:`launch_postop` (B > 1).

    Args:
        grad: ``(N, O, H', W')`` channels_last gradient of the post-op output.
        y, q, geometry, b, max_out: as for :func:`launch_postop`.

    Returns:
        ``(dy, dnorm)``: ``dy`` ``(N, O·max_out, H', W')`` float32 channels_last (zero
        for the MaxOut units not selected); ``dnorm`` ``(N, G, H', W')`` float32
        channels_last, the gradient w.r.t. each patch norm ``‖x_patch‖``.
    """
    n, o = _check_postop_args(y, q, geometry, b, max_out)
    if b == 1:
        raise KernelInputError("b = 1 has no dynamic scale: its backward is the convolution's")
    ho, wo = geometry.out_height, geometry.out_width
    check_tensor("grad", grad, ndim=4, channels_last=True)
    if tuple(grad.shape) != (n, o, ho, wo):
        raise KernelInputError(f"grad must have shape {(n, o, ho, wo)}, got {tuple(grad.shape)}")
    g = geometry.groups
    dy = _nhwc_empty(n, o * max_out, ho, wo, y, torch.float32)
    dnorm = _nhwc_empty(n, g, ho, wo, y, torch.float32)
    p = n * ho * wo
    launchable(_postop_backward_kernel, y)[(triton.cdiv(p, BLOCK_P), g)](
        grad, y, q, dy, dnorm,
        p, geometry.height, geometry.width, ho, wo, o, o // g, g, *_geometry_args(geometry), float(b),
        KH=geometry.kernel_size[0], KW=geometry.kernel_size[1], MAX_OUT=max_out, B_MODE=b_mode(b),
        BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
    )  # fmt: skip
    return dy, dnorm


def launch_scale_grad(grad: Tensor, scale: Tensor, y: Tensor | None = None, max_out: int = 1) -> Tensor:
    """Explanation-mode backward of the post-op: ``g ⊙ scale`` routed through MaxOut.

    Args:
        grad: ``(N, O, H', W')`` channels_last gradient of the output.
        scale: the detached scale written by the forward, same shape.
        y: the pre-MaxOut conv output ``(N, O·max_out, H', W')`` (needed when ``max_out > 1``).

    Returns:
        ``(N, O·max_out, H', W')`` channels_last in ``grad``'s dtype.
    """
    check_tensor("grad", grad, ndim=4, channels_last=True)
    check_tensor("scale", scale, ndim=4, channels_last=True)
    if scale.shape != grad.shape:
        raise KernelInputError(f"scale must have grad's shape {tuple(grad.shape)}, got {tuple(scale.shape)}")
    check_same_device(grad=grad, scale=scale)
    n, o, ho, wo = grad.shape
    if max_out > 1:
        if y is None:
            raise KernelInputError("y (the pre-MaxOut conv output) is required when max_out > 1")
        check_tensor("y", y, ndim=4, channels_last=True)
        if tuple(y.shape) != (n, o * max_out, ho, wo):
            raise KernelInputError(f"y must have shape {(n, o * max_out, ho, wo)}, got {tuple(y.shape)}")
    dy = _nhwc_empty(n, o * max_out, ho, wo, grad)
    p = n * ho * wo
    launchable(_scale_grad_kernel, grad)[(triton.cdiv(p, BLOCK_P), triton.cdiv(o, BLOCK_C))](
        grad, scale, y if y is not None else grad, dy, p, o, MAX_OUT=max_out, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C
    )
    return dy


# ----------------------------------------------------------------------------- references


def reference_sumsq(x: Tensor, groups: int = 1) -> Tensor:
    """PyTorch reference of :func:`launch_sumsq`: ``(N, G, H, W)`` float32."""
    n, c, h, w = x.shape
    return x.float().square().view(n, groups, c // groups, h, w).sum(dim=2)


def reference_postop(
    y: Tensor, x: Tensor, geometry: ConvGeometry, b: float, max_out: int = 1
) -> tuple[Tensor, Tensor | None]:
    """PyTorch reference of the post-op, from the conv *input* ``x`` (as the B-cos layer computes it).

    Returns ``(out, scale)`` as float32 NCHW tensors (``scale`` is ``None`` for B = 1).
    """
    out = y.float()
    if max_out > 1:
        out = out.unflatten(1, (out.shape[1] // max_out, max_out)).amax(dim=2)
    if b == 1:
        return out, None
    n, o, ho, wo = out.shape
    g = geometry.groups
    norms = patch_norms(x.float(), geometry.kernel_size, geometry.stride, geometry.padding, geometry.dilation, g)
    scale = dynamic_scale(out.view(n, g, o // g, ho, wo), norms.unsqueeze(2), b).view(n, o, ho, wo)
    return scale * out, scale


def window_sum_norms(q: Tensor, geometry: ConvGeometry) -> Tensor:
    """Patch norms ``sqrt(Σ_window q + ε)`` from a ``Σx²`` map: ``(N, G, H', W')`` float32."""
    g = geometry.groups
    ones = q.new_ones(g, 1, *geometry.kernel_size)
    sums = F.conv2d(q, ones, None, geometry.stride, geometry.padding, geometry.dilation, g)
    return (sums + PATCH_NORM_EPS).sqrt()


assert COS_EPS == 1e-6 and PATCH_NORM_EPS == 1e-6, "the kernels hard-code ε = 1e-6 (fact_model.bcos.functional)"


# ----------------------------------------------------------------------------- operators
# Registered with torch.library.triton_op, so torch.compile / torch.export see the kernels. The CPU
# kernel of each operator is its PyTorch reference, except under TRITON_INTERPRET=1, where it runs the
# Triton launcher in the interpreter. A geometry travels as 11 ints [H, W, kh, kw, sh, sw, ph, pw, dh,
# dw, groups]; optional outputs are empty tensors (operator schemas have no Optional outputs).

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


def _max_out_reference(y: Tensor, max_out: int) -> tuple[Tensor, Tensor]:
    """MaxOut over groups of ``max_out`` channels: ``(values, argmax)``."""
    units = y.unflatten(1, (y.shape[1] // max_out, max_out))
    values, best = units.max(dim=2)
    return values, best


def _reference_scale(y: Tensor, q: Tensor, geometry: ConvGeometry, b: float, max_out: int) -> tuple[Tensor, Tensor]:
    """float32 ``(after MaxOut, scale)`` from a conv output and a ``Σx²`` map."""
    out = _max_out_reference(y.float(), max_out)[0]
    n, o, ho, wo = out.shape
    g = geometry.groups
    norms = window_sum_norms(q, geometry).unsqueeze(2)
    scale = dynamic_scale(out.view(n, g, o // g, ho, wo), norms, b).view(n, o, ho, wo)
    return out, scale


@triton_op("fact::bcos_sumsq", mutates_args=())
def bcos_sumsq(x: Tensor, groups: int) -> Tensor:
    """Per-pixel, per-group ``Σ_c x²``: ``(N, C, H, W)`` → ``(N, G, H, W)`` float32 (channels_last)."""
    return launch_sumsq(x, groups)


@bcos_sumsq.register_kernel("cpu")
def _bcos_sumsq_cpu(x: Tensor, groups: int) -> Tensor:
    if interpreting():
        return launch_sumsq(x, groups)
    return reference_sumsq(x, groups).contiguous(memory_format=CL)


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
        out = _max_out_reference(y32, max_out)[0]
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
    best = _max_out_reference(y, max_out)[1]
    routed = F.one_hot(best, max_out).permute(0, 1, 4, 2, 3).to(grad.dtype) * scaled.unsqueeze(2)
    return routed.flatten(1, 2).contiguous(memory_format=CL)
