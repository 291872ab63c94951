"""Fused B-cos convolution: implicit GEMM (NHWC) with the patch norm and the B-cos scale in the epilogue.

One kernel computes ``out = |cos(x, ŵ)|^(B-1) · (ŵ·x)`` for a whole layer:

* the GEMM is ``(P, kh·kw·C) @ (kh·kw·C, O)`` with ``P = N·H'·W'`` output pixels, the
  ``A`` tiles gathered from the NHWC input (implicit im2col, zero padding by masks);
* the patch norm ``‖x_patch‖² = Σ_patch x²`` comes one of two ways (the dispatcher of
  :mod:`kernels.bcos_layer` measures both): every ``A`` tile is also squared and summed
  along its row, so it accumulates from the very tiles the GEMM loads (no second read
  of the input); or the epilogue sums the ``kh·kw`` window of a per-pixel ``Σ_c x²``
  map made beforehand (one extra pass over the input, nothing extra in the GEMM loop);
* the epilogue applies ``|cos|^(B-1)`` (B = 2 without a power) and writes the output,
  optionally the detached scale for explanation mode.

Filters arrive unit-norm (``ŵ``): normalising the ``(O, C, kh, kw)`` weight is a tiny
operation done once per forward by PyTorch (cached in inference by the layer), and
keeping it outside the kernel keeps its gradient in autograd's hands.

Grouped convolutions and MaxOut are not fused here: :mod:`kernels.bcos_layer` sends
them to cuDNN + :mod:`kernels.bcos_postop`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from kernels._common import KernelInputError, check_same_device, check_tensor, interpreting, launchable
from kernels.bcos_postop import ConvGeometry, b_mode, geometry_from_list, reference_postop

__all__ = [
    "WeightLayouts",
    "bcos_fused_conv",
    "dgrad_geometry",
    "dgrad_weight_layout",
    "fused_weight_layout",
    "launch_explain_dgrad",
    "launch_fused_conv",
]

# A few tile shapes; autotuning picks one per (pixels, channels, kernel) key on the GPU.
# Few on purpose: every config is one more compilation per kernel size and dtype. BLOCK_K = 64
# halves the loop trips of deep reductions (C = 1024–2048 in late layers); BLOCK_N = 64 suits
# 64-channel outputs; they take 8 warps because with 4 their fp32 forms spill registers
# (``python -m benchmarks.compile_check``).
_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
_INTERPRETER_CONFIG = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]


def _configs() -> list[triton.Config]:
    return _INTERPRETER_CONFIG if interpreting() else _CONFIGS


@triton.jit(do_not_specialize=["P", "H", "W", "HO", "WO", "SH", "SW", "PH", "PW", "DH", "DW"])
def _fused_conv_body(
    x_ptr, w_ptr, out_ptr, scale_ptr, a_scale_ptr, q_ptr,
    P, H, W, C, HO, WO, O, SH, SW, PH, PW, DH, DW, b,
    KH: tl.constexpr, KW: tl.constexpr, B_MODE: tl.constexpr, WRITE_SCALE: tl.constexpr, A_SCALE: tl.constexpr,
    NORM_FROM_MAP: tl.constexpr,
    FP32_DOT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Output-channel blocks vary fastest, so programs that share an input tile run together (L2 reuse).
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < P
    mask_n = offs_n < O
    image = offs_m // (HO * WO)
    rem = offs_m % (HO * WO)
    ho = rem // WO
    wo = rem % WO
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    c_blocks = tl.cdiv(C, BLOCK_K)
    # One flat loop over (tap, channel block) so the pipeliner overlaps loads across taps.
    for it in range(KH * KW * c_blocks):
        tap = it // c_blocks
        c0 = (it % c_blocks) * BLOCK_K
        r = tap // KW
        s = tap % KW
        ih = ho * SH - PH + r * DH
        iw = wo * SW - PW + s * DW
        valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        offs_k = c0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        a_offs = (((image * H + ih) * W + iw) * C)[:, None] + offs_k[None, :]
        a_mask = valid[:, None] & mask_k[None, :]
        a = tl.load(x_ptr + a_offs, mask=a_mask, other=0.0)
        if A_SCALE:  # explanation backward: the operand is g ⊙ scale, multiplied as it is loaded
            a_scale = tl.load(a_scale_ptr + a_offs, mask=a_mask, other=0.0)
            a = (a.to(tl.float32) * a_scale.to(tl.float32)).to(a.dtype)
        w = tl.load(
            w_ptr + (tap * C + offs_k)[:, None] * O + offs_n[None, :],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        if B_MODE != 0 and not NORM_FROM_MAP:
            a32 = a.to(tl.float32)
            sumsq += tl.sum(a32 * a32, axis=1)
        if FP32_DOT:  # the interpreter's low-precision dot is wrong: compute it in float32 there
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32))
        elif IEEE:  # float32 with TF32 switched off in PyTorch: full-precision products, as cuDNN then does
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    out_offs = offs_m[:, None] * O + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if B_MODE == 0:
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if NORM_FROM_MAP:  # window sum over the precomputed Σ_c x² map: KH·KW loads per pixel, no squares in the loop
            for tap in tl.static_range(KH * KW):
                ih = ho * SH - PH + (tap // KW) * DH
                iw = wo * SW - PW + (tap % KW) * DW
                inside = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                sumsq += tl.load(q_ptr + (image * H + ih) * W + iw, mask=inside, other=0.0)
        norm = tl.sqrt(sumsq + 1e-6)[:, None]
        if B_MODE == 1:
            scale = tl.abs(acc) / norm
        else:
            scale = tl.exp2((b - 1.0) * tl.log2(tl.abs(acc) / norm + 1e-6))
        tl.store(out_ptr + out_offs, (scale * acc).to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_SCALE:
            tl.store(scale_ptr + out_offs, scale.to(scale_ptr.dtype.element_ty), mask=mask)


def fitting_configs(configs: list[triton.Config], named_args: dict, **_: object) -> list[triton.Config]:
    """The configurations worth timing for a layer: no tile twice as wide as its channels.

    A 64-channel layer gains nothing from 128-wide output tiles, a 32-channel input nothing
    from 64-deep reduction steps; skipping them saves their compilation and timing at the
    first call (autotuning runs every remaining configuration once per layer shape).
    """
    out_tile = max(64, triton.next_power_of_2(int(named_args["O"])))
    depth = max(32, triton.next_power_of_2(int(named_args["C"])))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= out_tile and c.kwargs["BLOCK_K"] <= depth]
    return kept or configs[:1]


_autotuned = triton.autotune(
    configs=_CONFIGS,
    key=["P", "C", "O", "KH", "KW", "SH", "B_MODE", "WRITE_SCALE", "A_SCALE", "NORM_FROM_MAP", "IEEE"],
    prune_configs_by={"early_config_prune": fitting_configs},
)(_fused_conv_body)


def fused_weight_layout(weight_hat: Tensor) -> Tensor:
    """``(O, C, kh, kw)`` unit-norm filters → the kernel's ``(kh·kw·C, O)`` row-major operand."""
    o, c, kh, kw = weight_hat.shape
    return weight_hat.permute(2, 3, 1, 0).reshape(kh * kw * c, o).contiguous()


def dgrad_weight_layout(weight_hat: Tensor) -> Tensor:
    """``(O, C, kh, kw)`` filters → the ``(kh·kw·O, C)`` operand of the data gradient's convolution.

    The data gradient of a stride-1 convolution is a convolution of the output
    gradient with the filters transposed (``O`` ↔ ``C``) and flipped in space.
    """
    return fused_weight_layout(weight_hat.transpose(0, 1).flip(2, 3))


def dgrad_geometry(geometry: ConvGeometry) -> ConvGeometry | None:
    """The geometry of ``dx = conv(dy, flipped ŵᵀ)`` for ``geometry``, or None where that is no plain convolution.

    Only stride 1 and groups 1 qualify (a strided layer's data gradient is a transposed,
    fractionally strided convolution), with ``padding ≤ dilation·(k − 1)`` so the
    gradient's own padding is not negative.
    """
    if geometry.stride != (1, 1) or geometry.groups != 1:
        return None
    pads = tuple(
        d * (k - 1) - p for d, k, p in zip(geometry.dilation, geometry.kernel_size, geometry.padding, strict=True)
    )
    if min(pads) < 0:
        return None
    return ConvGeometry(
        geometry.out_height, geometry.out_width, geometry.kernel_size, (1, 1), pads, geometry.dilation, 1
    )  # fmt: skip


class WeightLayouts:
    """The unit-norm filters ``ŵ`` and, made on first use, the layouts the kernels read.

    A layer caches one of these at inference (its weight does not change), so the
    re-layouts happen once per weight version instead of once per call.
    """

    def __init__(self, weight_hat: Tensor, dgrad: Tensor | None = None) -> None:
        """``weight_hat``: ``(O, C/groups, kh, kw)`` unit-norm filters, in the activations' dtype;
        ``dgrad``: its :func:`dgrad_weight_layout` if already made."""
        self.hat = weight_hat
        self._fused: Tensor | None = None
        self._dgrad = dgrad

    @property
    def fused(self) -> Tensor:
        """:func:`fused_weight_layout` of ``ŵ`` (detached)."""
        if self._fused is None:
            self._fused = fused_weight_layout(self.hat.detach())
        return self._fused

    @property
    def dgrad(self) -> Tensor:
        """:func:`dgrad_weight_layout` of ``ŵ`` (detached)."""
        if self._dgrad is None:
            self._dgrad = dgrad_weight_layout(self.hat.detach())
        return self._dgrad


def launch_fused_conv(
    x: Tensor,
    weight_kc: Tensor,
    geometry: ConvGeometry,
    b: float,
    write_scale: bool = False,
    a_scale: Tensor | None = None,
    q: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The whole B-cos convolution (groups = 1, no MaxOut) in one kernel.

    Args:
        x: ``(N, C, H, W)`` channels_last input.
        weight_kc: ``(kh·kw·C, O)`` unit-norm filters from :func:`fused_weight_layout`,
            in ``x``'s dtype.
        geometry: the convolution's geometry (``groups`` must be 1).
        b: the B-cos exponent (≥ 1).
        write_scale: also return the scale ``|cos|^(B-1)`` (``None`` when B = 1).
        a_scale: convolve ``x ⊙ a_scale`` instead of ``x`` (same shape, channels_last),
            multiplied as the operand is loaded (B = 1 only: the explanation backward).
        q: ``launch_sumsq(x)`` (``(N, 1, H, W)`` float32): take the patch norm from this
            map in the epilogue instead of accumulating it from the GEMM's input tiles.

    Returns:
        ``(out, scale)``: ``(N, O, H', W')`` channels_last in ``x``'s dtype.
    """
    check_tensor("x", x, ndim=4, channels_last=True)
    check_tensor("weight_kc", weight_kc, ndim=2)
    check_same_device(x=x, weight_kc=weight_kc)
    if weight_kc.dtype != x.dtype:
        raise KernelInputError(f"weight_kc has dtype {weight_kc.dtype} but x has {x.dtype}; they must match")
    if a_scale is not None:
        check_tensor("a_scale", a_scale, ndim=4, channels_last=True)
        check_same_device(x=x, a_scale=a_scale)
        if a_scale.shape != x.shape:
            raise KernelInputError(f"a_scale has shape {tuple(a_scale.shape)} but x has {tuple(x.shape)}")
        if b != 1:
            raise KernelInputError(f"a_scale is for the B = 1 data-gradient convolution only, got b={b!r}")
    n, c, h, w = x.shape
    if q is not None:
        check_tensor("q", q, ndim=4, channels_last=True, dtypes=(torch.float32,))
        check_same_device(x=x, q=q)
        if tuple(q.shape) != (n, 1, h, w):
            raise KernelInputError(f"q must have shape {(n, 1, h, w)} (launch_sumsq(x)), got {tuple(q.shape)}")
    if (h, w) != (geometry.height, geometry.width):
        expected = (geometry.height, geometry.width)
        raise KernelInputError(f"x's spatial size {(h, w)} does not match the geometry's {expected}")
    if geometry.groups != 1:
        raise KernelInputError(f"the fused convolution supports groups=1 only, got groups={geometry.groups}")
    kh, kw = geometry.kernel_size
    if weight_kc.shape[0] != kh * kw * c:
        raise KernelInputError(
            f"weight_kc must have kh·kw·C = {kh * kw * c} rows for x's {c} channels and a {kh}×{kw} kernel, "
            f"got {tuple(weight_kc.shape)}"
        )
    if not (isinstance(b, int | float) and b >= 1):
        raise KernelInputError(f"b must be a real number ≥ 1, got {b!r}")
    o = weight_kc.shape[1]
    ho, wo = geometry.out_height, geometry.out_width
    if ho < 1 or wo < 1:
        raise KernelInputError(f"the kernel does not fit the input: output size {(ho, wo)}")
    out = torch.empty((n, o, ho, wo), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    mode = b_mode(b)
    scale = torch.empty_like(out) if write_scale and mode else None
    p = n * ho * wo
    args = (
        x, weight_kc, out, scale if scale is not None else out, a_scale if a_scale is not None else x,
        q if q is not None else x, p, h, w, c, ho, wo, o, *geometry.stride, *geometry.padding, *geometry.dilation,
        float(b),
    )  # fmt: skip
    meta = {"KH": kh, "KW": kw, "B_MODE": mode, "WRITE_SCALE": scale is not None, "A_SCALE": a_scale is not None,
            "NORM_FROM_MAP": q is not None and mode != 0}  # fmt: skip
    fp32_dot = interpreting() and x.dtype != torch.float32
    ieee = x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32
    if interpreting():
        config = _INTERPRETER_CONFIG[0].kwargs
        grid = (triton.cdiv(o, config["BLOCK_N"]), triton.cdiv(p, config["BLOCK_M"]))
        launchable(_fused_conv_body, x)[grid](*args, **meta, FP32_DOT=fp32_dot, IEEE=ieee, **config)
    else:

        def grid(config: dict) -> tuple[int, int]:
            return (triton.cdiv(o, config["BLOCK_N"]), triton.cdiv(p, config["BLOCK_M"]))

        launchable(_autotuned, x)[grid](*args, **meta, FP32_DOT=False, IEEE=ieee)
    return out, scale


def launch_explain_dgrad(grad: Tensor, scale: Tensor, weight_dgrad: Tensor, geometry: ConvGeometry) -> Tensor:
    """Explanation-mode data gradient ``dx = conv_transpose(g ⊙ scale, ŵ)`` in one kernel (stride 1).

    Args:
        grad: ``(N, O, H', W')`` channels_last gradient of the layer's output.
        scale: the forward's detached B-cos scale, like ``grad``.
        weight_dgrad: :func:`dgrad_weight_layout` of ``ŵ``, in ``grad``'s dtype.
        geometry: the layer's geometry; :func:`dgrad_geometry` must accept it.

    Returns:
        ``(N, C, H, W)`` channels_last in ``grad``'s dtype.
    """
    transposed = dgrad_geometry(geometry)
    if transposed is None:
        raise KernelInputError(f"no stride-1 data-gradient convolution for {geometry}; use the cuDNN path")
    if (grad.shape[2], grad.shape[3]) != (geometry.out_height, geometry.out_width):
        raise KernelInputError(
            f"grad's spatial size {tuple(grad.shape[2:])} is not the layer's output size "
            f"{(geometry.out_height, geometry.out_width)}"
        )
    return launch_fused_conv(grad, weight_dgrad, transposed, 1, a_scale=scale)[0]


# ----------------------------------------------------------------------------- operator
# torch.ops.fact.bcos_fused_conv: see the operator notes in kernels/bcos_postop.py.


@triton_op("fact::bcos_fused_conv", mutates_args=())
def bcos_fused_conv(
    x: Tensor, weight_kc: Tensor, geometry: list[int], b: float, write_scale: bool
) -> tuple[Tensor, Tensor]:
    """The whole B-cos convolution in one kernel (see :func:`launch_fused_conv`); ``scale`` empty unless asked."""
    out, scale = launch_fused_conv(x, weight_kc, geometry_from_list(geometry), b, write_scale)
    return out, scale if scale is not None else out.new_empty(0)


@bcos_fused_conv.register_kernel("cpu")
def _bcos_fused_conv_cpu(
    x: Tensor, weight_kc: Tensor, geometry: list[int], b: float, write_scale: bool
) -> tuple[Tensor, Tensor]:
    geo = geometry_from_list(geometry)
    if interpreting():
        out, scale = launch_fused_conv(x, weight_kc, geo, b, write_scale)
        return out, scale if scale is not None else out.new_empty(0)
    kh, kw = geo.kernel_size
    weight = weight_kc.view(kh, kw, x.shape[1], -1).permute(3, 2, 0, 1)
    y = F.conv2d(x.float(), weight.float(), None, geo.stride, geo.padding, geo.dilation)
    out, scale = reference_postop(y, x, geo, b)
    out = out.to(x.dtype).contiguous(memory_format=torch.channels_last)
    if write_scale and scale is not None:
        return out, scale.to(x.dtype).contiguous(memory_format=torch.channels_last)
    return out, out.new_empty(0)
