"""B-cos convolution and linear layers on the kernels, with autograd and per-shape dispatch.

:func:`bcos_conv2d` is what :class:`fact_model.bcos.BcosConv2d` calls on CUDA when the
kernels are on. It computes the same function as the PyTorch layer, by one of three paths:

* ``fused`` — :mod:`kernels.bcos_conv`: implicit GEMM with the patch norm and the scale
  in the epilogue (groups = 1, no MaxOut, not for training), the norm accumulated from
  the GEMM's own input tiles;
* ``fused_map`` — the same kernel taking the norm from a ``Σ_c x²`` map (one more
  pass over the input, a lighter GEMM loop);
* ``cudnn`` — PyTorch's convolution (cuDNN) followed by the fused post-op of
  :mod:`kernels.bcos_postop` (every case, training included).

The explanation backward has two paths: ``fused`` is one implicit-GEMM kernel
for ``dx = conv_transpose(g ⊙ scale, ŵ)`` with the product taken as the operand is
loaded (stride-1 ungrouped layers without MaxOut); ``cudnn`` multiplies, then runs
cuDNN's transposed convolution.

``fact_model.options`` ``bcos_conv_path`` (``FACT_BCOS_CONV_PATH``) = ``auto`` (default) | ``fused`` | ``fused_map`` |
``cudnn`` picks
the path (``fused_map`` means ``fused`` for the backward); in ``auto`` the first call of
each layer shape on a GPU times the candidates and remembers the fastest
(:class:`PathTable`), separately for the forward and the explanation backward.

Autograd: training differentiates through the dynamic scale and the patch norm (the
post-op backward kernel, then cuDNN's data and weight gradients); in explanation mode
(``detach_scale``) the scale is a constant and the backward is
``dx = conv_transpose(g ⊙ scale, ŵ)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fact_model import options
from fact_model.options import BCOS_CONV_PATHS
from kernels.bcos_conv import WeightLayouts, dgrad_geometry, launch_explain_dgrad, launch_fused_conv
from kernels.bcos_postop import (
    ConvGeometry,
    geometry_from_list,
    geometry_to_list,
    launch_postop,
    launch_postop_backward,
    launch_scale_grad,
    launch_sumsq,
    window_sum_norms,
)
from kernels.path_table import PathTable, batch_bucket

__all__ = [
    "PATHS",
    "bcos_conv2d",
    "bcos_linear",
    "conv_data_grad",
    "conv_path",
    "dgrad_key",
    "explain_data_grad",
    "forward_key",
    "path_table",
]

PATHS = BCOS_CONV_PATHS
CL = torch.channels_last


def conv_path() -> str:
    """The B-cos path in force (``fact_model.options.current().bcos_conv_path``, ``FACT_BCOS_CONV_PATH``)."""
    return options.current().bcos_conv_path


path_table = PathTable()


# Eager calls go straight to the launchers: the operator dispatcher costs tens of µs per call,
# which on a 53-layer network at small batch is more than the kernels themselves. Under
# torch.compile the registered operators are used, so the compiler sees the Triton kernels.


def _sumsq(x: Tensor, groups: int) -> Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.fact.bcos_sumsq(x, groups)
    return launch_sumsq(x, groups)


def _postop(y: Tensor, q: Tensor, geometry: ConvGeometry, b: float, max_out: int, write_scale: bool):
    if torch.compiler.is_compiling():
        out, scale = torch.ops.fact.bcos_postop(y, q, geometry_to_list(geometry), float(b), max_out, write_scale)
        return out, (scale if write_scale and b != 1 else None)
    return launch_postop(y, q, geometry, b, max_out, write_scale)


def _cudnn_forward(x: Tensor, weight_hat: Tensor, geometry: ConvGeometry, b: float, max_out: int, write_scale: bool):
    y = F.conv2d(x, weight_hat, None, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)
    y = y.contiguous(memory_format=CL)
    q = _sumsq(x, geometry.groups)
    out, scale = _postop(y, q, geometry, b, max_out, write_scale)
    return out, scale, y, q


def _fused_forward(
    x: Tensor, weight_kc: Tensor, geometry: ConvGeometry, b: float, write_scale: bool, norm_from_map: bool = False
):
    if torch.compiler.is_compiling():  # (the dispatcher sends compiled graphs the tile-norm variant)
        out, scale = torch.ops.fact.bcos_fused_conv(x, weight_kc, geometry_to_list(geometry), float(b), write_scale)
        return out, (scale if write_scale and b != 1 else None)
    return launch_fused_conv(x, weight_kc, geometry, b, write_scale, q=launch_sumsq(x) if norm_from_map else None)


def _postop_backward(grad: Tensor, y: Tensor, q: Tensor, geometry: ConvGeometry, b: float, max_out: int):
    if torch.compiler.is_compiling():
        return torch.ops.fact.bcos_postop_backward(grad, y, q, geometry_to_list(geometry), float(b), max_out)
    return launch_postop_backward(grad, y, q, geometry, b, max_out)


def _scale_grad(grad: Tensor, scale: Tensor, y: Tensor | None, max_out: int) -> Tensor:
    if max_out == 1:
        return grad * scale  # one elementwise product: PyTorch's own kernel is as fast, and cheaper to call
    if torch.compiler.is_compiling():
        return torch.ops.fact.bcos_scale_grad(grad, scale, y, max_out)
    return launch_scale_grad(grad, scale, y, max_out)


def conv_data_grad(dy: Tensor, weight_hat: Tensor, input_shape: torch.Size, geometry: ConvGeometry) -> Tensor:
    """``∂(Σ dy ⊙ conv(x, ŵ))/∂x``: ``(N, O, H', W')`` → ``input_shape``, channels_last like ``dy``."""
    # conv_transpose2d rather than torch.nn.grad.conv2d_input: the latter's placeholder input has no
    # memory format, so for 1×1 filters (ambiguous layout) cuDNN returns NCHW and every layer below
    # then converts; the transposed convolution follows dy's channels_last.
    output_padding = tuple(
        size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
        for size, out, s, p, d, k in zip(
            input_shape[2:], dy.shape[2:], geometry.stride, geometry.padding, geometry.dilation,
            geometry.kernel_size, strict=True,
        )
    )  # fmt: skip
    return F.conv_transpose2d(
        dy, weight_hat, None, geometry.stride, geometry.padding, output_padding, geometry.groups, geometry.dilation
    )


def _weight_grad(dy: Tensor, x: Tensor, weight_shape: torch.Size, geometry: ConvGeometry) -> Tensor:
    return torch.nn.grad.conv2d_weight(
        x, weight_shape, dy, geometry.stride, geometry.padding, geometry.dilation, geometry.groups
    )


class _BcosConvFunction(torch.autograd.Function):
    """One B-cos convolution on the kernels (see the module docstring for the paths)."""

    @staticmethod
    def forward(ctx, x, weight_hat, layouts, geometry, b, max_out, detach_scale, path):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ctx.geometry, ctx.b, ctx.max_out = geometry, b, max_out
        ctx.x_shape = x.shape
        ctx.training_backward = needs_grad and not detach_scale
        write_scale = needs_grad and detach_scale  # only the explanation backward reads the scale
        if path in ("fused", "fused_map"):
            out, scale = _fused_forward(x, layouts.fused, geometry, b, write_scale, path == "fused_map")
            y = q = None
        else:
            out, scale, y, q = _cudnn_forward(x, weight_hat, geometry, b, max_out, write_scale)
        if ctx.training_backward:
            ctx.save_for_backward(x, weight_hat, y, q)
        elif needs_grad:
            ctx.layouts = layouts  # holds ŵ's data-gradient layout once made: made at most once per weight
            keep_x = x if ctx.needs_input_grad[1] else None
            ctx.save_for_backward(keep_x, weight_hat, y if max_out > 1 else None, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.training_backward:
            grad = grad.contiguous(memory_format=CL)
            return (*_training_backward(ctx, grad), None, None, None, None, None, None)
        x, weight_hat, y, scale = ctx.saved_tensors
        if scale is None:  # B = 1 never reaches here; kept for safety
            raise RuntimeError("explanation-mode backward without a saved scale")
        dx = dw = None
        if _is_vmapped(grad):
            # Many cotangents at once (torch.func.vmap over the backward, explain's batched VJPs): the
            # operator's vmap rule folds them into the batch, so each layer runs one launch for all of them.
            if ctx.needs_input_grad[0]:
                dgrad = ctx.layouts.dgrad if dgrad_geometry(ctx.geometry) is not None else weight_hat.new_empty(0)
                dx = torch.ops.fact.bcos_explain_backward(
                    grad, scale, weight_hat, dgrad, y, geometry_to_list(ctx.geometry), list(ctx.x_shape), ctx.max_out
                )
            if ctx.needs_input_grad[1]:
                if ctx.max_out > 1:
                    raise NotImplementedError("the filter gradient of a MaxOut B-cos layer under vmap")
                dw = _weight_grad(grad * scale, x, weight_hat.shape, ctx.geometry)  # PyTorch ops: vmap batches them
            return dx, dw, None, None, None, None, None, None
        grad = grad.contiguous(memory_format=CL)
        if ctx.needs_input_grad[0]:
            dx = explain_data_grad(grad, scale, ctx.layouts, ctx.x_shape, ctx.geometry, y, ctx.max_out)
        if ctx.needs_input_grad[1]:
            dy = _scale_grad(grad, scale, y, ctx.max_out)
            dw = _weight_grad(dy, x, weight_hat.shape, ctx.geometry)
        return dx, dw, None, None, None, None, None, None


def _training_backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[no-untyped-def]
    """``(dx, dŵ)`` through the dynamic scale and the patch norm."""
    geometry = ctx.geometry
    x, weight_hat, y, q = ctx.saved_tensors
    dy, dnorm = _postop_backward(grad, y, q, geometry, ctx.b, ctx.max_out)
    dy = dy.to(x.dtype)
    dx = dw = None
    if ctx.needs_input_grad[0]:
        norms = window_sum_norms(q, geometry)
        # ‖x‖ = sqrt(Σ_window q + ε) → ∂/∂q = 1/(2‖x‖) summed back over every window holding the pixel.
        ones = q.new_ones(geometry.groups, 1, *geometry.kernel_size)
        dq = torch.nn.grad.conv2d_input(
            q.shape, ones, dnorm / (2 * norms), geometry.stride, geometry.padding, geometry.dilation,
            geometry.groups,
        )  # fmt: skip
        n, c, h, w = x.shape
        g = geometry.groups
        d_norm_x = (2 * x.float().view(n, g, c // g, h, w) * dq.unsqueeze(2)).view(n, c, h, w)
        dx = (conv_data_grad(dy, weight_hat, x.shape, geometry).float() + d_norm_x).to(x.dtype)
    if ctx.needs_input_grad[1]:
        dw = _weight_grad(dy, x, weight_hat.shape, geometry)
    return dx, dw


def _dispatch_key(kind: str, t: Tensor, weight_hat: Tensor, geometry: ConvGeometry, *extra: object) -> tuple:
    """What a measured path choice depends on besides the data.

    TF32 on/off changes both paths' speed (and the kernels follow cuDNN's setting). Batch
    sizes share a choice per power-of-two bucket: a server batching 1…32 requests
    measures 6 buckets, not 32.
    """
    bucket = batch_bucket(t.shape[0])
    shape = (*t.shape[1:], *weight_hat.shape)
    return (kind, bucket, t.dtype, torch.backends.cudnn.allow_tf32, shape, geometry, *extra)


def forward_key(x: Tensor, weight_hat: Tensor, geometry: ConvGeometry, b: float) -> tuple:
    """The :data:`path_table` key of a forward with input ``x``."""
    return _dispatch_key("forward", x, weight_hat, geometry, b)


def dgrad_key(grad: Tensor, weight_hat: Tensor, geometry: ConvGeometry) -> tuple:
    """The :data:`path_table` key of an explanation backward with output gradient ``grad``."""
    return _dispatch_key("dgrad", grad, weight_hat, geometry)


def _choose_path(
    x: Tensor, layouts: WeightLayouts, geometry: ConvGeometry, b: float, max_out: int, training: bool
) -> str:
    """Forward: ``fused``, ``fused_map`` or ``cudnn`` (see the module docstring)."""
    fusable = geometry.groups == 1 and max_out == 1 and not training
    requested = conv_path()
    if not fusable or requested == "cudnn":
        return "cudnn"
    if requested in ("fused", "fused_map") and not torch.compiler.is_compiling():
        return requested
    if not x.is_cuda or torch.compiler.is_compiling():
        return "fused"
    return path_table.choose(
        forward_key(x, layouts.hat, geometry, b),
        {
            "fused": lambda: _fused_forward(x, layouts.fused, geometry, b, False),
            "fused_map": lambda: _fused_forward(x, layouts.fused, geometry, b, False, norm_from_map=True),
            "cudnn": lambda: _cudnn_forward(x, layouts.hat, geometry, b, max_out, False),
        },
    )


def explain_data_grad(
    grad: Tensor,
    scale: Tensor,
    layouts: WeightLayouts,
    x_shape: torch.Size,
    geometry: ConvGeometry,
    y: Tensor | None = None,
    max_out: int = 1,
) -> Tensor:
    """Explanation-mode ``dx = conv_transpose(g ⊙ scale, ŵ)`` by the ``fused`` or the ``cudnn`` path.

    ``fused`` (one kernel, the product taken at the operand load) needs a stride-1,
    ungrouped layer without MaxOut (:func:`kernels.bcos_conv.dgrad_geometry`); ``cudnn``
    multiplies (routing through MaxOut by ``y``), then runs cuDNN's transposed convolution.
    The path follows ``FACT_BCOS_CONV_PATH``; ``auto`` measures both per :func:`dgrad_key`.

    Args:
        grad, scale: ``(N, O·max_out or O, H', W')`` channels_last (``scale`` per linear unit for MaxOut).
        layouts: the layer's filters.
        x_shape: the layer input's shape ``(N, C, H, W)``.
        y: the linear outputs (MaxOut routing), else None.

    Returns:
        ``(N, C, H, W)`` channels_last.
    """
    requested = conv_path()

    def cudnn() -> Tensor:
        return conv_data_grad(_scale_grad(grad, scale, y, max_out), layouts.hat, x_shape, geometry)

    def fused() -> Tensor:
        return launch_explain_dgrad(grad, scale, layouts.dgrad, geometry)

    if max_out > 1 or dgrad_geometry(geometry) is None or requested == "cudnn" or torch.compiler.is_compiling():
        return cudnn()
    if requested in ("fused", "fused_map") or not grad.is_cuda:
        return fused()
    choice = path_table.choose(dgrad_key(grad, layouts.hat, geometry), {"fused": fused, "cudnn": cudnn})
    return fused() if choice == "fused" else cudnn()


def _is_vmapped(t: Tensor) -> bool:
    """True for a tensor inside ``vmap`` (a functorch batched tensor: no storage, no data pointer)."""
    return torch._C._functorch.is_batchedtensor(t)  # no public test for it (PyTorch 2.14)


@torch.library.custom_op("fact::bcos_explain_backward", mutates_args=())
def bcos_explain_backward(
    grad: Tensor,
    scale: Tensor,
    weight_hat: Tensor,
    weight_dgrad: Tensor,
    y: Tensor | None,
    geometry: list[int],
    x_shape: list[int],
    max_out: int,
) -> Tensor:
    """:func:`explain_data_grad` as an operator, so ``vmap`` can batch it (see its vmap rule).

    ``weight_dgrad`` is ``dgrad_weight_layout(ŵ)``, or empty where the layer has no stride-1
    data-gradient convolution.
    """
    layouts = WeightLayouts(weight_hat, weight_dgrad if weight_dgrad.numel() else None)
    grad = grad.contiguous(memory_format=CL)
    return explain_data_grad(grad, scale, layouts, torch.Size(x_shape), geometry_from_list(geometry), y, max_out)


@bcos_explain_backward.register_fake
def _(grad, scale, weight_hat, weight_dgrad, y, geometry, x_shape, max_out):  # type: ignore[no-untyped-def]
    return grad.new_empty(x_shape).contiguous(memory_format=CL)


@bcos_explain_backward.register_vmap
def _(info, in_dims, grad, scale, weight_hat, weight_dgrad, y, geometry, x_shape, max_out):  # type: ignore[no-untyped-def]
    """R cotangents ``(R, N, O, H', W')`` → one call on ``(R·N, O, H', W')``; the saved tensors are repeated."""
    grad_dim, scale_dim, weight_dim, dgrad_dim, y_dim = in_dims[:5]
    if weight_dim is not None or dgrad_dim is not None:
        raise NotImplementedError("bcos_explain_backward: vmap over the filters is not supported")
    r = info.batch_size

    def folded(t: Tensor | None, dim: int | None) -> Tensor | None:
        if t is None:
            return None
        t = t.unsqueeze(0).expand(r, *t.shape) if dim is None else t.movedim(dim, 0)
        return t.reshape(-1, *t.shape[2:]).contiguous(memory_format=CL)

    x_folded = [r * x_shape[0], *x_shape[1:]]
    dx = bcos_explain_backward(
        folded(grad, grad_dim), folded(scale, scale_dim), weight_hat, weight_dgrad, folded(y, y_dim), geometry,
        x_folded, max_out,
    )  # fmt: skip
    return dx.view(r, *x_shape), 0


def bcos_conv2d(
    x: Tensor,
    weight_hat: Tensor,
    geometry: ConvGeometry,
    b: float,
    max_out: int = 1,
    detach_scale: bool = False,
    layouts: WeightLayouts | None = None,
) -> Tensor:
    """``|cos(x, ŵ)|^(B-1) · (ŵ·x)`` over every patch, on the kernels (B > 1).

    Args:
        x: ``(N, C, H, W)``; made channels_last if it is not.
        weight_hat: ``(O·max_out, C/groups, kh, kw)`` unit-norm filters (in autograd's graph when training).
        geometry: the convolution's geometry (``height``/``width`` must be ``x``'s).
        b: the B-cos exponent (> 1; B = 1 is a plain convolution and needs no kernel).
        max_out: MaxOut units per output channel.
        detach_scale: explanation mode: the scale is a constant for autograd.
        layouts: ``WeightLayouts(ŵ)`` if the caller caches the filters' kernel layouts
            (``ŵ`` must then be ``weight_hat``, in ``x``'s dtype).

    Returns:
        ``(N, O, H', W')`` channels_last in ``x``'s dtype.
    """
    x = x.contiguous(memory_format=CL)
    weight_hat = weight_hat.to(x.dtype)
    training = torch.is_grad_enabled() and not detach_scale and (x.requires_grad or weight_hat.requires_grad)
    if layouts is None or layouts.hat.dtype != x.dtype:
        layouts = WeightLayouts(weight_hat)
    path = _choose_path(x, layouts, geometry, b, max_out, training)
    return _BcosConvFunction.apply(x, weight_hat, layouts, geometry, b, max_out, detach_scale, path)


def bcos_linear(
    x: Tensor,
    weight_hat: Tensor,
    b: float,
    max_out: int = 1,
    detach_scale: bool = False,
    layouts: WeightLayouts | None = None,
) -> Tensor:
    """The B-cos linear layer ``(*, C)`` → ``(*, O)`` as a 1×1 B-cos convolution over ``N = Π(*)`` pixels.

    ``weight_hat`` is ``(O, C)`` or already ``(O, C, 1, 1)``; ``layouts`` as for :func:`bcos_conv2d`.
    """
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1], 1, 1)
    filters = weight_hat if weight_hat.ndim == 4 else weight_hat[:, :, None, None]
    geometry = ConvGeometry(1, 1, (1, 1))
    out = bcos_conv2d(rows, filters, geometry, b, max_out, detach_scale, layouts)
    return out.reshape(*lead, out.shape[1])
