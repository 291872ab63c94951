"""Sparse concept decode and its backward: gather-sums and scatter-adds of table rows.

The concept layer's code of a position is ``k`` (value, concept id) pairs, so its
decode ``f̂[m] = Σ_j values[m, j] · Dᵀ[indices[m, j]]`` touches ``k`` rows of the
``(K, C)`` table ``Dᵀ`` (the ``decoder`` parameter) instead of a dense ``(M, K)`` code.
Three kernels cover the decode and every backward of the concept layer:

* ``gather_sum`` ``(M, k), (M, k), (K, C) → (M, C)``: ``out[m] = Σ_j w[m, j] · T[i[m, j]]``
  (the decode; also the encode's input gradient, with ``T = E``);
* ``gather_dot`` ``(M, C), (M, k), (K, C) → (M, k)``: ``out[m, j] = ⟨g[m], T[i[m, j]]⟩``
  (the decode's gradient w.r.t. the values);
* ``scatter_rows`` ``(M, k), (M, k), (M, C) → (K, C)``: ``out[i[m, j]] += w[m, j] · R[m]``
  (the gradient w.r.t. the table: ``Dᵀ`` or ``E``), fp32 atomics, then cast.

Each is registered as a PyTorch operator (``fact::concept_decode``,
``fact::concept_gather_dot``, ``fact::concept_scatter_rows``) with ``torch.library.triton_op``
so ``torch.compile`` sees the kernels; on the CPU the operator runs the PyTorch
reference, or the Triton kernel under ``TRITON_INTERPRET=1``. ``fact::concept_decode``
has its training backward registered.

Index checks: on the CPU (cheap) indices outside ``[0, K)`` raise
:class:`~kernels._common.KernelInputError`. On CUDA the check would need a device
synchronisation per call, so the kernels instead mask the read and turn the
affected output rows into NaN (never an out-of-bounds access, never a plausible
wrong value); the scatter skips such slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from kernels._common import (
    KernelInputError,
    check_same_device,
    check_tensor,
    interpreting,
    launchable,
    next_power_of_two,
)

__all__ = [
    "gather_dot",
    "gather_dot_reference",
    "gather_sum",
    "gather_sum_reference",
    "scatter_rows",
    "scatter_rows_reference",
]

_INDEX_DTYPES = (torch.int64,)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _gather_sum_kernel(
    w_ptr,
    idx_ptr,
    table_ptr,
    out_ptr,
    M,
    C,
    K,
    k,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_C) tile of ``out[m] = Σ_j w[m, j] · T[i[m, j]]``, fp32 accumulation."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < C
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for j in range(k):
        w = tl.load(w_ptr + rows64 * k + j, mask=row_ok, other=0.0).to(tl.float32)
        i = tl.load(idx_ptr + rows64 * k + j, mask=row_ok, other=0)
        in_range = (i >= 0) & (i < K)
        w = tl.where(in_range, w, float("nan"))
        r = tl.load(
            table_ptr + i[:, None] * C + cols[None, :],
            mask=(in_range & row_ok)[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += w[:, None] * r
    out = out_ptr + rows64[:, None] * C + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gather_dot_kernel(
    g_ptr,
    idx_ptr,
    table_ptr,
    out_ptr,
    M,
    C,
    K,
    k,
    BLOCK_M: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out[m, j] = ⟨g[m], T[i[m, j]]⟩`` for BLOCK_M rows and all k slots (padded to KP)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.arange(0, KP)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    slot_mask = row_ok[:, None] & (slots < k)[None, :]
    i = tl.load(idx_ptr + rows64[:, None] * k + slots[None, :], mask=slot_mask, other=0)
    in_range = (i >= 0) & (i < K)
    gather_ok = in_range & slot_mask
    acc = tl.zeros((BLOCK_M, KP), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        g = tl.load(g_ptr + rows64[:, None] * C + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        t = tl.load(
            table_ptr + i[:, :, None] * C + cols[None, None, :],
            mask=gather_ok[:, :, None] & col_ok[None, None, :],
            other=0.0,
        )
        acc += tl.sum(g.to(tl.float32)[:, None, :] * t.to(tl.float32), axis=2)
    acc = tl.where(in_range, acc, float("nan"))
    tl.store(out_ptr + rows64[:, None] * k + slots[None, :], acc.to(out_ptr.dtype.element_ty), mask=slot_mask)


@triton.jit
def _scatter_rows_kernel(
    w_ptr,
    idx_ptr,
    rows_ptr,
    out_ptr,
    M,
    C,
    K,
    k,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out[i[m, j]] += w[m, j] · R[m]`` for one (BLOCK_M, BLOCK_C) tile of ``R`` (fp32 atomics)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < C
    rows64 = rows.to(tl.int64)
    r = tl.load(rows_ptr + rows64[:, None] * C + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(
        tl.float32
    )
    for j in range(k):
        w = tl.load(w_ptr + rows64 * k + j, mask=row_ok, other=0.0).to(tl.float32)
        i = tl.load(idx_ptr + rows64 * k + j, mask=row_ok, other=0)
        ok = row_ok & (i >= 0) & (i < K)
        tl.atomic_add(
            out_ptr + i[:, None] * C + cols[None, :],
            w[:, None] * r,
            mask=ok[:, None] & col_ok[None, :],
            sem="relaxed",
        )


# --------------------------------------------------------------------------- input checks
def _data_checks_possible(tensor: Tensor) -> bool:
    """Whether a data-dependent check is cheap here: real CPU tensors outside tracing."""
    from torch._subclasses.fake_tensor import is_fake

    return tensor.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(tensor)


def check_index_range(name: str, indices: Tensor, num_rows: int) -> None:
    """Refuse ids outside ``[0, num_rows)`` where that is cheap to check (CPU tensors)."""
    if indices.numel() == 0 or not _data_checks_possible(indices):
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= num_rows:
        raise KernelInputError(f"{name} holds ids in [{lo}, {hi}], outside the table's rows [0, {num_rows})")


def _check_slots(
    weights_name: str, weights: Tensor, indices: Tensor, table_name: str, table: Tensor
) -> tuple[int, int, int, int]:
    """Shared checks of a ``(M, k)`` weights/indices pair against a ``(K, C)`` table: ``(M, k, K, C)``."""
    check_tensor(weights_name, weights, ndim=2)
    check_tensor("indices", indices, ndim=2, dtypes=_INDEX_DTYPES)
    check_tensor(table_name, table, ndim=2)
    check_same_device(**{weights_name: weights, "indices": indices, table_name: table})
    if indices.shape != weights.shape:
        raise KernelInputError(
            f"indices must have the shape of {weights_name} {tuple(weights.shape)}, got {tuple(indices.shape)}"
        )
    if weights.dtype != table.dtype:
        raise KernelInputError(f"{weights_name} has dtype {weights.dtype} but {table_name} has {table.dtype}")
    m, k = weights.shape
    num_rows, c = table.shape
    check_index_range("indices", indices, num_rows)
    return m, k, num_rows, c


def _check_out(out: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    if out is None:
        return torch.empty(shape, device=like.device, dtype=like.dtype)
    check_tensor("out", out, ndim=len(shape))
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise KernelInputError(
            f"out must be a {like.dtype} tensor of shape {shape} on {like.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out


# --------------------------------------------------------------------------- launchers
def gather_sum(weights: Tensor, indices: Tensor, table: Tensor, *, out: Tensor | None = None) -> Tensor:
    """``out[m] = Σ_j weights[m, j] · table[indices[m, j]]`` with the Triton kernel.

    Args:
        weights: ``(M, k)`` float (the code values, or a gradient seed).
        indices: ``(M, k)`` int64 row ids into ``table``.
        table: ``(K, C)``, same dtype as ``weights``.
        out: optional ``(M, C)`` buffer to write (every element is written).

    Returns:
        ``(M, C)`` in ``table``'s dtype (fp32 accumulation).

    Raises:
        KernelInputError: wrong device, dtype, shape or layout, or (CPU) ids out of range.
    """
    m, k, num_rows, c = _check_slots("weights", weights, indices, "table", table)
    out = _check_out(out, (m, c), table)
    if m == 0 or c == 0:
        return out
    if k == 0:
        return out.zero_()
    block_m = 32
    block_c = min(256 if table.element_size() <= 2 else 128, max(16, next_power_of_two(c)))
    grid = (triton.cdiv(m, block_m), triton.cdiv(c, block_c))
    launchable(_gather_sum_kernel, table)[grid](
        weights, indices, table, out, m, c, num_rows, k, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4
    )
    return out


def gather_dot(grad: Tensor, indices: Tensor, table: Tensor, *, out: Tensor | None = None) -> Tensor:
    """``out[m, j] = ⟨grad[m], table[indices[m, j]]⟩`` with the Triton kernel.

    Args:
        grad: ``(M, C)`` float (the decode's output gradient).
        indices: ``(M, k)`` int64 row ids into ``table``.
        table: ``(K, C)``, same dtype as ``grad``.
        out: optional ``(M, k)`` buffer to write.

    Returns:
        ``(M, k)`` in ``grad``'s dtype (fp32 accumulation).
    """
    check_tensor("grad", grad, ndim=2)
    check_tensor("indices", indices, ndim=2, dtypes=_INDEX_DTYPES)
    check_tensor("table", table, ndim=2)
    check_same_device(grad=grad, indices=indices, table=table)
    if grad.dtype != table.dtype:
        raise KernelInputError(f"grad has dtype {grad.dtype} but table has {table.dtype}")
    m, c = grad.shape
    num_rows = table.shape[0]
    if indices.shape[0] != m:
        raise KernelInputError(f"indices has {indices.shape[0]} rows but grad has {m}")
    if table.shape[1] != c:
        raise KernelInputError(f"table has {table.shape[1]} columns but grad has {c}")
    k = indices.shape[1]
    check_index_range("indices", indices, num_rows)
    out = _check_out(out, (m, k), grad)
    if m == 0 or k == 0:
        return out
    kp = max(2, next_power_of_two(k))
    block_m = max(1, min(16, 256 // kp))
    block_c = max(1, min(64, next_power_of_two(c), 16384 // (block_m * kp)))
    grid = (triton.cdiv(m, block_m),)
    launchable(_gather_dot_kernel, table)[grid](
        grad, indices, table, out, m, c, num_rows, k, BLOCK_M=block_m, KP=kp, BLOCK_C=block_c, num_warps=4
    )
    return out


def scatter_rows(weights: Tensor, indices: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """``out[indices[m, j]] += weights[m, j] · rows[m]`` into a zero ``(num_rows, C)`` table.

    Args:
        weights: ``(M, k)`` float.
        indices: ``(M, k)`` int64 ids in ``[0, num_rows)``.
        rows: ``(M, C)``, same dtype as ``weights``.
        num_rows: ``K``, rows of the result.

    Returns:
        ``(num_rows, C)`` in ``rows``' dtype, accumulated in fp32 (atomics: the order of
        the additions, hence the last bits, can vary between runs on CUDA).
    """
    if not isinstance(num_rows, int) or num_rows < 0:
        raise KernelInputError(f"num_rows must be a non-negative int, got {num_rows!r}")
    check_tensor("weights", weights, ndim=2)
    check_tensor("indices", indices, ndim=2, dtypes=_INDEX_DTYPES)
    check_tensor("rows", rows, ndim=2)
    check_same_device(weights=weights, indices=indices, rows=rows)
    if indices.shape != weights.shape:
        raise KernelInputError(
            f"indices must have the shape of weights {tuple(weights.shape)}, got {tuple(indices.shape)}"
        )
    if weights.dtype != rows.dtype:
        raise KernelInputError(f"weights has dtype {weights.dtype} but rows has {rows.dtype}")
    m, k = weights.shape
    if rows.shape[0] != m:
        raise KernelInputError(f"rows has {rows.shape[0]} rows but weights has {m}")
    c = rows.shape[1]
    check_index_range("indices", indices, num_rows)
    acc = torch.zeros((num_rows, c), device=rows.device, dtype=torch.float32)
    if m and k and c and num_rows:
        block_m = 32
        block_c = min(256 if rows.element_size() <= 2 else 128, max(16, next_power_of_two(c)))
        grid = (triton.cdiv(m, block_m), triton.cdiv(c, block_c))
        launchable(_scatter_rows_kernel, rows)[grid](
            weights, indices, rows, acc, m, c, num_rows, k, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4
        )
    return acc.to(rows.dtype)


# --------------------------------------------------------------------------- references
def gather_sum_reference(weights: Tensor, indices: Tensor, table: Tensor) -> Tensor:
    """PyTorch reference of :func:`gather_sum` (the concept layer's ``embedding_bag`` decode)."""
    if weights.shape[1] == 0:
        return table.new_zeros(weights.shape[0], table.shape[1])
    return F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum")


def gather_dot_reference(grad: Tensor, indices: Tensor, table: Tensor) -> Tensor:
    """PyTorch reference of :func:`gather_dot` (one ``(M, C)`` gather per slot, never ``(M, k, C)``)."""
    columns = [(grad * table[indices[:, j]]).sum(dim=1) for j in range(indices.shape[1])]
    return torch.stack(columns, dim=1) if columns else grad.new_zeros(grad.shape[0], 0)


def scatter_rows_reference(weights: Tensor, indices: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """PyTorch reference of :func:`scatter_rows` (``index_add_`` per slot)."""
    acc_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    out = torch.zeros(num_rows, rows.shape[1], device=rows.device, dtype=acc_dtype)
    rows_acc = rows.to(acc_dtype)
    for j in range(indices.shape[1]):
        out.index_add_(0, indices[:, j], weights[:, j, None].to(acc_dtype) * rows_acc)
    return out.to(rows.dtype)


# --------------------------------------------------------------------------- operators
@triton_op("fact::concept_decode", mutates_args=(), schema="(Tensor values, Tensor indices, Tensor decoder) -> Tensor")
def concept_decode(values: Tensor, indices: Tensor, decoder: Tensor) -> Tensor:
    """Operator form of :func:`gather_sum`: ``(M, k), (M, k), (K, C) → (M, C)``."""
    return gather_sum(values, indices, decoder)


@triton_op("fact::concept_gather_dot", mutates_args=(), schema="(Tensor grad, Tensor indices, Tensor table) -> Tensor")
def concept_gather_dot(grad: Tensor, indices: Tensor, table: Tensor) -> Tensor:
    """Operator form of :func:`gather_dot`: ``(M, C), (M, k), (K, C) → (M, k)``."""
    return gather_dot(grad, indices, table)


@triton_op(
    "fact::concept_scatter_rows",
    mutates_args=(),
    schema="(Tensor weights, Tensor indices, Tensor rows, int num_rows) -> Tensor",
)
def concept_scatter_rows(weights: Tensor, indices: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """Operator form of :func:`scatter_rows`: ``(M, k), (M, k), (M, C) → (num_rows, C)``."""
    return scatter_rows(weights, indices, rows, num_rows)


@concept_decode.register_kernel("cpu")
def _concept_decode_cpu(values: Tensor, indices: Tensor, decoder: Tensor) -> Tensor:
    if interpreting():
        return gather_sum(values, indices, decoder)
    return gather_sum_reference(values, indices, decoder)


@concept_gather_dot.register_kernel("cpu")
def _concept_gather_dot_cpu(grad: Tensor, indices: Tensor, table: Tensor) -> Tensor:
    if interpreting():
        return gather_dot(grad, indices, table)
    return gather_dot_reference(grad, indices, table)


@concept_scatter_rows.register_kernel("cpu")
def _concept_scatter_rows_cpu(weights: Tensor, indices: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    if interpreting():
        return scatter_rows(weights, indices, rows, num_rows)
    return scatter_rows_reference(weights, indices, rows, num_rows)


@concept_gather_dot.register_vmap
def _concept_gather_dot_vmap(info, in_dims, grad, indices, table):  # type: ignore[no-untyped-def]
    """R cotangents ``(R, M, C)`` (an explanation's batched VJPs) → one call on ``(R·M, C)``."""
    grad_dim, index_dim, table_dim = in_dims
    if index_dim is not None or table_dim is not None:
        raise NotImplementedError("concept_gather_dot: vmap over the indices or the table is not supported")
    r = info.batch_size
    grad = grad.movedim(grad_dim, 0)
    rows = indices.repeat(r, 1)
    out = torch.ops.fact.concept_gather_dot(grad.reshape(-1, grad.shape[-1]).contiguous(), rows, table)
    return out.view(r, *indices.shape), 0


def _decode_setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    values, indices, decoder = inputs
    ctx.save_for_backward(values, indices, decoder)


def _decode_backward(ctx, grad):  # type: ignore[no-untyped-def]
    """``dvalues[m, j] = ⟨g[m], Dᵀ[i[m, j]]⟩`` and ``dDᵀ[i[m, j]] += values[m, j] · g[m]``."""
    values, indices, decoder = ctx.saved_tensors
    grad = grad.contiguous()
    grad_values = grad_decoder = None
    if ctx.needs_input_grad[0]:
        grad_values = torch.ops.fact.concept_gather_dot(grad, indices, decoder)
    if ctx.needs_input_grad[2]:
        grad_decoder = torch.ops.fact.concept_scatter_rows(values, indices, grad, decoder.shape[0])
    return grad_values, None, grad_decoder


concept_decode.register_autograd(_decode_backward, setup_context=_decode_setup_context)
