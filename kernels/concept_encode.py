"""Fused concept encode: ``TopK_k(ReLU(X Eᵀ))`` per row without the dense pre-activations.

For ``X`` ``(M, C)`` (one row per position) and the encoder ``E`` ``(K, C)``, the
kernel returns the ``k`` largest ReLU pre-activations of every row and their
concept ids. The ``(M, K)`` pre-activation matrix never reaches global memory:

* the grid is ``(row blocks, K splits)``: each program owns ``BLOCK_M`` rows and a
  contiguous range of concepts (splitting ``K`` gives enough programs when ``M`` is
  only a few thousand rows);
* per ``BLOCK_N`` concepts it computes the ``(BLOCK_M, BLOCK_N)`` tile with ``tl.dot``
  over ``C`` (fp32 accumulation; TF32 for fp32 inputs exactly when PyTorch's
  ``float32_matmul_precision`` allows it), applies the ReLU and merges the tile into
  a running top-k per row;
* values and ids travel as one int64 key ``(float bits of the value ≥ 0) << 32 | id``:
  for non-negative floats the bit pattern orders like the value, so one integer
  max finds the value and its id together, and ties break towards the larger id.
  The merge inserts, per row, the tile's next-largest key while it beats the row's
  current k-th key (a data-dependent loop: after the first tiles few keys qualify);
* each program writes its ``k`` best keys per row to a small ``(M, splits, k)``
  buffer; ``torch.topk`` over those ``splits·k`` candidates gives the result, sorted
  by decreasing value.

Training backward (``values`` are differentiable, ``indices`` are not), with
``g' = g ⊙ [values > 0]`` (the ReLU's gate):
``dX[m] = Σ_j g'[m, j] · E[i[m, j]]`` (:func:`kernels.concept_decode.gather_sum`) and
``dE[i[m, j]] += g'[m, j] · X[m]`` (:func:`kernels.concept_decode.scatter_rows`).

Two paths compute the same top-k (values equal up to the GEMM's rounding; indices
except exact ties):

* ``fused`` — the kernel above;
* ``gemm_select`` — :mod:`kernels.concept_select`: cuBLAS GEMMs over L2-sized ``K``
  chunks, each followed by a Triton top-k select into the same candidate keys.

``fact_model.options`` ``concept_encode_path`` (``FACT_CONCEPT_ENCODE_PATH``) = ``auto`` (default) | ``fused`` |
``gemm_select`` picks the path (asked at each call). In ``auto`` on CUDA the first call of each shape key
(``M`` bucketed to a power of two, ``C``, ``K``, ``k``, dtype, TF32 state) times both
paths and remembers the faster (:data:`path_table`); on the CPU (interpreter) ``auto``
is ``fused``; under ``torch.compile`` the operator always traces the fused path.

Registered as ``fact::concept_encode`` (``torch.library.triton_op``); on the CPU the
operator runs the PyTorch reference, or the Triton kernels under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op

from fact_model import options
from fact_model.options import CONCEPT_ENCODE_PATHS
from kernels._common import (
    KernelInputError,
    check_tensor,
    interpreting,
    launchable,
    next_power_of_two,
    sm_count,
)
from kernels._topk import MAX_K, _check_encode, _insert_keys, merge_candidates
from kernels.concept_select import encode_topk_gemm_select
from kernels.path_table import PathTable, batch_bucket

__all__ = [
    "MAX_K",
    "PATHS",
    "EncodeConfig",
    "encode_candidates",
    "encode_config",
    "encode_path",
    "encode_topk",
    "encode_topk_reference",
    "fastest_encode_path",
    "merge_candidates",
    "path_key",
    "path_table",
]

PATHS = CONCEPT_ENCODE_PATHS


@triton.jit
def _encode_topk_kernel(
    x_ptr,
    e_ptr,
    keys_ptr,
    M,
    C,
    K,
    k,
    num_tiles,
    tiles_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    KP: tl.constexpr,
    EVEN_C: tl.constexpr,
    USE_TF32: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Top-k keys of ``ReLU(X Eᵀ)`` over one concept split for BLOCK_M rows → ``keys[m, split, :k]``."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    slots = tl.arange(0, KP)
    # Running top-k as keys: the k real slots start at distinct negative keys (every
    # ReLU output beats them), padding slots at the largest int64 (never the minimum;
    # real keys stay below it: the bits of a finite float are < 0x7F800000). Masked
    # elements get -2^62, below every initial key.
    init = tl.where(slots < k, -1 - slots.to(tl.int64), 0x7FFFFFFFFFFFFFFF)
    best = tl.zeros((BLOCK_M, KP), dtype=tl.int64) + init[None, :]
    thresh = tl.min(best, axis=1)  # the row's current k-th key
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    for t in range(first, last):
        concepts = t * BLOCK_N + cols
        col_ok = concepts < K
        x_rows = x_ptr + rows64[:, None] * C
        e_rows = e_ptr + concepts.to(tl.int64)[:, None] * C
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + offs_c
            if EVEN_C:
                a = tl.load(x_rows + c[None, :], mask=row_ok[:, None], other=0.0)
                b = tl.load(e_rows + c[None, :], mask=col_ok[:, None], other=0.0)
            else:
                a = tl.load(x_rows + c[None, :], mask=row_ok[:, None] & (c < C)[None, :], other=0.0)
                b = tl.load(e_rows + c[None, :], mask=col_ok[:, None] & (c < C)[None, :], other=0.0)
            if UPCAST:  # the CPU interpreter's low-precision dot is wrong
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if USE_TF32:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="tf32")
            else:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        act = tl.where(acc > 0, acc, 0.0)  # ReLU, and +0.0 (not -0.0) so the bits order like the values
        keys = (act.to(tl.int32, bitcast=True).to(tl.int64) << 32) | concepts.to(tl.int64)[None, :]
        keys = tl.where(row_ok[:, None] & col_ok[None, :], keys, -0x4000000000000000)
        best, thresh = _insert_keys(best, thresh, keys)
    out = keys_ptr + (rows64[:, None] * num_splits + split) * k + slots[None, :]
    tl.store(out, best, mask=row_ok[:, None] & (slots < k)[None, :])


@functools.cache
def _best_split(num_tiles: int, row_blocks: int, concurrent: int) -> int:
    """Number of ``K`` splits minimising a simple cost model of the launch.

    A program costs its tiles plus ~2 tiles for filling its running top-k from empty
    (k insertions); programs run in waves of ``concurrent`` (assumed 2 per SM: an
    8-warp 64×128 tile with its int64 keys needs over half an SM's registers).
    Cost = waves × (tiles per split + 2); ties go to fewer splits (smaller merge).
    """
    best, best_cost = 1, None
    for splits in range(1, num_tiles + 1):
        per_split = triton.cdiv(num_tiles, splits)
        used = triton.cdiv(num_tiles, per_split)
        cost = triton.cdiv(row_blocks * used, concurrent) * (per_split + 2)
        if best_cost is None or cost < best_cost:
            best, best_cost = used, cost
    return best


class EncodeConfig:
    """Block sizes and the ``K`` split of one encode launch (chosen by simple rules)."""

    def __init__(self, block_m: int, block_n: int, block_c: int, splits: int, tiles_per_split: int, num_tiles: int):
        self.block_m = block_m
        self.block_n = block_n
        self.block_c = block_c
        self.splits = splits
        self.tiles_per_split = tiles_per_split
        self.num_tiles = num_tiles

    def __repr__(self) -> str:
        return (
            f"EncodeConfig(block_m={self.block_m}, block_n={self.block_n}, block_c={self.block_c}, "
            f"splits={self.splits}, tiles_per_split={self.tiles_per_split})"
        )


def encode_config(
    m: int,
    c: int,
    num_concepts: int,
    dtype: torch.dtype,
    device: torch.device,
    block_m: int | None = None,
    block_n: int | None = None,
    splits: int | None = None,
) -> EncodeConfig:
    """Tile sizes (``tl.dot`` needs ≥ 16) and a ``K`` split that fills the GPU (see :func:`_best_split`).

    ``block_m``, ``block_n`` (powers of two ≥ 16) and ``splits`` override the rules (tests
    use them to exercise several tiles and splits at tiny shapes).
    """
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise KernelInputError(f"{name} must be a power of two ≥ 16, got {value}")
    if splits is not None and splits < 1:
        raise KernelInputError(f"splits must be ≥ 1, got {splits}")
    bm = block_m or (64 if m > 32 else max(16, next_power_of_two(m)))
    bn = block_n or min(128, max(16, next_power_of_two(num_concepts)))
    bc = min(32 if dtype == torch.float32 else 64, max(16, next_power_of_two(c)))
    num_tiles = triton.cdiv(num_concepts, bn)
    row_blocks = triton.cdiv(m, bm)
    if splits is None:
        concurrent = 2 * sm_count(device)
        splits = _best_split(num_tiles, row_blocks, concurrent)
    splits = min(splits, num_tiles)
    tiles_per_split = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, tiles_per_split)  # no empty split
    return EncodeConfig(bm, bn, bc, splits, tiles_per_split, num_tiles)


def encode_candidates(
    x: Tensor,
    encoder: Tensor,
    k: int,
    *,
    out: Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    splits: int | None = None,
) -> Tensor:
    """Per-split top-k keys ``(M, splits, k)`` int64 (the kernel's output; see the module doc).

    Args:
        x: ``(M, C)`` fp32/fp16/bf16, contiguous.
        encoder: ``(K, C)``, same dtype.
        k: ``1 ≤ k ≤ min(K, MAX_K)``.
        out: optional ``(M, splits, k)`` int64 buffer (every element is written); its
            ``splits`` must equal :func:`encode_config`'s.
        block_m, block_n, splits: override the launch rules.

    Raises:
        KernelInputError: wrong device, dtype, shape, layout or ``k``.
    """
    _check_encode(x, encoder, k)
    m, c = x.shape
    num_concepts = encoder.shape[0]
    cfg = encode_config(m, c, num_concepts, x.dtype, x.device, block_m, block_n, splits)
    shape = (m, cfg.splits, k)
    if out is None:
        out = torch.empty(shape, device=x.device, dtype=torch.int64)
    else:
        check_tensor("out", out, ndim=3, dtypes=(torch.int64,))
        if tuple(out.shape) != shape or out.device != x.device:
            raise KernelInputError(f"out must have shape {shape} on {x.device}, got {tuple(out.shape)} on {out.device}")
    if m == 0:
        return out
    if c == 0:  # every pre-activation is 0: the first k concepts, value 0
        return out.copy_(torch.arange(k, device=x.device).expand(shape))
    use_tf32 = x.dtype != torch.float32 or torch.get_float32_matmul_precision() != "highest"
    grid = (triton.cdiv(m, cfg.block_m), cfg.splits)
    launchable(_encode_topk_kernel, x)[grid](
        x,
        encoder,
        out,
        m,
        c,
        num_concepts,
        k,
        cfg.num_tiles,
        cfg.tiles_per_split,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_C=cfg.block_c,
        KP=max(2, next_power_of_two(k)),
        EVEN_C=c % cfg.block_c == 0,
        USE_TF32=use_tf32,
        UPCAST=interpreting(),
        num_warps=8,
        num_stages=3,
    )
    return out


def encode_topk(
    x: Tensor,
    encoder: Tensor,
    k: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused ``ReLU(x @ encoder.T).topk(k)`` with the Triton kernel.

    Args:
        x: ``(M, C)`` rows (positions), fp32/fp16/bf16, contiguous.
        encoder: ``(K, C)`` encoder ``E``, same dtype.
        k: concepts kept per row.

    Returns:
        ``values`` ``(M, k)`` in ``x``'s dtype, sorted descending (≥ 0: rows with fewer
        than ``k`` positive pre-activations are padded with zeros of other concepts), and
        ``indices`` ``(M, k)`` int64 concept ids (distinct within a row).
    """
    keys = encode_candidates(x, encoder, k, block_m=block_m, block_n=block_n, splits=splits)
    return merge_candidates(keys, k, x.dtype)


def encode_topk_reference(x: Tensor, encoder: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """PyTorch reference: the dense ``(M, K)`` pre-activations, ReLU, ``topk`` (sorted)."""
    return torch.topk(F.relu(x @ encoder.t()), k, dim=1)


# --------------------------------------------------------------------------- path dispatch
path_table = PathTable()
"""The measured ``fused`` / ``gemm_select`` choice per shape key (this module's own table)."""


def _run_path(path: str, x: Tensor, encoder: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Values and indices ``(M, k)`` by ``path`` (``fused`` or ``gemm_select``)."""
    if path == "gemm_select":
        return encode_topk_gemm_select(x, encoder, k)
    return merge_candidates(encode_candidates(x, encoder, k), k, x.dtype)


def path_key(x: Tensor, encoder: Tensor, k: int) -> tuple:
    """What the faster path depends on: ``M`` (power-of-two bucket), ``C``, ``K``, ``k``, dtype, TF32 state."""
    bucket = batch_bucket(x.shape[0])
    tf32 = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    return (bucket, x.shape[1], encoder.shape[0], k, x.dtype, *tf32)


def fastest_encode_path(x: Tensor, encoder: Tensor, k: int, table: PathTable | None = None) -> str:
    """The faster of ``fused`` and ``gemm_select`` for this shape key, timed at its first call.

    ``table`` defaults to :data:`path_table`. While a CUDA graph is being captured nothing
    can be timed: a known key answers from the table, an unknown one gets ``fused``.
    """
    table = path_table if table is None else table
    key = path_key(x, encoder, k)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return table.choices.get(key, "fused")
    return table.choose(key, {path: functools.partial(_run_path, path, x, encoder, k) for path in PATHS[1:]})


def encode_path(x: Tensor, encoder: Tensor, k: int) -> str:
    """The path the operator takes for these inputs (see the module doc)."""
    requested = options.current().concept_encode_path
    if torch.compiler.is_compiling() or is_fake(x):
        return "fused"
    if requested != "auto":
        return requested
    if not x.is_cuda or x.shape[0] == 0:
        return "fused"
    return fastest_encode_path(x, encoder, k)


# --------------------------------------------------------------------------- operator
@triton_op("fact::concept_encode", mutates_args=(), schema="(Tensor x, Tensor encoder, int k) -> (Tensor, Tensor)")
def concept_encode(x: Tensor, encoder: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``ReLU(x @ encoder.T).topk(k)``: ``(M, C), (K, C) → values (M, k), indices (M, k)``, by :func:`encode_path`."""
    _check_encode(x, encoder, k)
    return _run_path(encode_path(x, encoder, k), x, encoder, k)


@concept_encode.register_kernel("cpu")
def _concept_encode_cpu(x: Tensor, encoder: Tensor, k: int) -> tuple[Tensor, Tensor]:
    if interpreting():
        _check_encode(x, encoder, k)
        return _run_path(encode_path(x, encoder, k), x, encoder, k)
    values, indices = encode_topk_reference(x, encoder, k)
    return values, indices


def _encode_setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, encoder, _ = inputs
    values, indices = output
    ctx.save_for_backward(x, encoder, values, indices)
    ctx.mark_non_differentiable(indices)


def _encode_backward(ctx, grad_values, grad_indices):  # type: ignore[no-untyped-def]
    """``dX = Σ_j g'·E[i]`` (gather-sum) and ``dE[i] += g'·X`` (scatter), ``g' = g ⊙ [values > 0]``."""
    x, encoder, values, indices = ctx.saved_tensors
    gated = torch.where(values > 0, grad_values, torch.zeros_like(grad_values)).contiguous()
    grad_x = grad_encoder = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.fact.concept_decode(gated, indices, encoder)
    if ctx.needs_input_grad[1]:
        grad_encoder = torch.ops.fact.concept_scatter_rows(gated, indices, x, encoder.shape[0])
    return grad_x, grad_encoder, None


concept_encode.register_autograd(_encode_backward, setup_context=_encode_setup_context)
