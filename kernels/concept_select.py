"""Concept encode as cuBLAS GEMM chunks + a Triton top-k select: the ``gemm_select`` path.

:mod:`kernels.concept_encode`'s fused kernel computes ``X Eᵀ`` with its own Triton GEMM,
which is slower than cuBLAS. This path lets cuBLAS do the GEMM and keeps only the top-k
selection in Triton, without ever materialising the whole ``(M, K)`` pre-activations:

* ``K`` is cut into chunks of ``chunk`` concepts, sized so that one ``(M, chunk)`` chunk
  of pre-activations ``S`` fits in ~16–32 MiB (L2-sized on an H100): ``torch.matmul``
  writes it into one reused buffer (following PyTorch's TF32 settings), and the select
  kernel reads it back, once, while it is still in L2;
* :func:`select_candidates` (the kernel) turns ``S`` into the candidate keys of the
  fused kernel — int64 ``(float bits of ReLU(s)) << 32 | concept id`` in an
  ``(M, lanes, k)`` buffer — and :func:`kernels._topk.merge_candidates`
  finishes with ``torch.topk`` over ``lanes·k`` candidates per row.

The select kernel: a program owns ``BLOCK_M`` rows and one *lane*, a column range of
``span`` columns of the chunk, streams it in ``(BLOCK_M, BLOCK_N)`` tiles and merges each
tile into a running top-k per row held in registers (the fused kernel's insertion merge,
:func:`kernels._topk._insert_keys`). Why insertion and not ``k`` rounds of
max-extraction per tile: extraction costs ``k`` full passes over every element (16 at
``k = 16``, 256 at ``MAX_K``), while insertion costs one pass (build keys, row max,
compare) plus one tile pass per key that enters the running top-k — for a row in random
order about ``k·(1 + ln(n/k))`` keys over ``n`` elements, i.e. a few extra passes per
element, and fewer the longer the stream. Two choices make the stream long and cheap:

* with ``carry`` (every chunk after the first) a program starts from the keys its lane
  wrote for the previous chunk, so the running top-k and its threshold persist over the
  whole row of ``K`` concepts: the fill (``k`` insertions) happens once per lane, and
  later chunks see only the rare keys above an already high threshold;
* zeros (ReLU-inactive) enter only while a row still has an unfilled slot: a ReLU-dead
  row would otherwise re-insert up to ``k`` zeros per tile (equal values tie-break
  towards the larger id). Zeros are exact ties, so any zeros make a valid top-k.

A bitonic ``tl.topk`` per tile would be data-independent but needs about
``log₂k·(log₂k + 3)/2`` compare-exchange passes per element (14 at ``k = 16``), each with
cross-lane shuffles — more than the insertion merge in the common case.

Ties: keys are distinct (ids are), so the top-k is unique given the values; equal values
order by the larger id. NaN pre-activations count as 0 (as in the fused kernel).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from kernels._common import KernelInputError, check_same_device, check_tensor, launchable, next_power_of_two, sm_count
from kernels._topk import MAX_K, _check_encode, _insert_keys, merge_candidates

__all__ = [
    "CHUNK_BYTES",
    "SelectConfig",
    "encode_topk_gemm_select",
    "gemm_select_candidates",
    "gemm_select_chunk",
    "gemm_select_plan",
    "select_candidates",
    "select_candidates_reference",
    "select_config",
]

CHUNK_BYTES = 32 << 20
"""Upper bound of one ``(M, chunk)`` pre-activation chunk: the chunk is the largest power of two
of concepts under it (so 16–32 MiB), to stay in an H100's 50 MB L2 between GEMM and select."""

_MIN_CHUNK = 256
_NEG = -0x4000000000000000  # masked key (as in the kernels): below every real key (≥ 0) and fill key (-1 - slot)


@triton.jit
def _select_topk_kernel(
    s_ptr,
    keys_ptr,
    M,
    N,
    k,
    concept_offset,
    split_offset,
    num_splits,
    span,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KP: tl.constexpr,
    CARRY: tl.constexpr,
):
    """Top-k keys of ``ReLU(S)`` over one lane (``span`` columns) for BLOCK_M rows → ``keys[m, split, :k]``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    lane = tl.program_id(1)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    slots = tl.arange(0, KP)
    out = keys_ptr + (rows64[:, None] * num_splits + split_offset + lane) * k + slots[None, :]
    out_mask = row_ok[:, None] & (slots < k)[None, :]
    if CARRY:  # continue from the keys this lane kept for the previous chunks
        best = tl.load(out, mask=out_mask, other=0x7FFFFFFFFFFFFFFF)
    else:  # distinct negative fill keys: every ReLU output beats them
        init = tl.where(slots < k, -1 - slots.to(tl.int64), 0x7FFFFFFFFFFFFFFF)  # padding: never the minimum
        best = tl.zeros((BLOCK_M, KP), dtype=tl.int64) + init[None, :]
    thresh = tl.min(best, axis=1)
    begin = lane * span
    end = tl.minimum(begin + span, N)
    for c0 in range(begin, end, BLOCK_N):
        c = c0 + cols
        ok = row_ok[:, None] & (c < end)[None, :]
        s = tl.load(s_ptr + rows64[:, None] * N + c[None, :], mask=ok, other=0.0).to(tl.float32)
        act = tl.where(s > 0, s, 0.0)  # ReLU, +0.0 (not -0.0) so the bits order like the values
        ids = (concept_offset + c).to(tl.int64)
        keys = (act.to(tl.int32, bitcast=True).to(tl.int64) << 32) | ids[None, :]
        live = ok & ((act > 0) | (thresh < 0)[:, None])  # zeros only fill empty slots
        best, thresh = _insert_keys(best, thresh, tl.where(live, keys, -0x4000000000000000))
    tl.store(out, best, mask=out_mask)


class SelectConfig:
    """Block sizes and lanes of one select launch: ``lanes`` programs per row block, ``span`` columns each."""

    def __init__(self, block_m: int, block_n: int, span: int, lanes: int):
        self.block_m = block_m
        self.block_n = block_n
        self.span = span
        self.lanes = lanes

    def __repr__(self) -> str:
        return f"SelectConfig(block_m={self.block_m}, block_n={self.block_n}, span={self.span}, lanes={self.lanes})"


def _check_int(name: str, value: object, minimum: int, pow2: bool = False) -> None:
    """Refuse ``value`` unless it is an int ≥ ``minimum`` (and a power of two if ``pow2``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (pow2 and value & (value - 1)):
        kind = "a power of two" if pow2 else "an int"
        raise KernelInputError(f"{name} must be {kind} ≥ {minimum}, got {value!r}")


@functools.cache
def _lanes(row_blocks: int, width: int, block_n: int, concurrent: int) -> int:
    """Fewest lanes (a power of two) giving ``concurrent`` programs, each lane ≥ 4 tiles long.

    Fewer lanes mean longer streams (fewer insertions per element, see the module doc);
    more lanes mean more programs to fill the GPU when ``M`` is small.
    """
    lanes = 1
    while row_blocks * lanes < concurrent and width >= 2 * lanes * 4 * block_n:
        lanes *= 2
    return lanes


def select_config(
    m: int,
    width: int,
    device: torch.device,
    block_m: int | None = None,
    block_n: int | None = None,
    span: int | None = None,
) -> SelectConfig:
    """Launch shape for an ``(m, width)`` chunk; ``block_m``, ``block_n`` (powers of two), ``span`` override.

    Defaults (untuned rules): 8 rows × 128 columns per tile (1024 keys over 4 warps), and
    the fewest lanes that give about 4 programs per SM (:func:`_lanes`).
    """
    for name, value, pow2 in (("block_m", block_m, True), ("block_n", block_n, True), ("span", span, False)):
        if value is not None:
            _check_int(name, value, 1, pow2)
    bm = block_m or min(8, next_power_of_two(max(m, 1)))
    bn = block_n or min(128, max(16, next_power_of_two(width)))
    if span is None:
        concurrent = 4 * sm_count(device)
        lanes = _lanes(triton.cdiv(m, bm), width, bn, concurrent)
        span = max(1, triton.cdiv(triton.cdiv(width, lanes), bn)) * bn  # whole tiles per lane
    return SelectConfig(bm, bn, span, max(1, triton.cdiv(width, span)))


def _check_k(k: int) -> None:
    _check_int("k", k, 1)
    if k > MAX_K:
        raise KernelInputError(f"k ({k}) exceeds the select kernel's limit of {MAX_K}")


def _check_select_out(out: Tensor, scores: Tensor, k: int, split_offset: int, lanes: int) -> None:
    check_tensor("out", out, ndim=3, dtypes=(torch.int64,))
    check_same_device(scores=scores, out=out)
    m = scores.shape[0]
    if out.shape[0] != m or out.shape[2] != k:
        raise KernelInputError(f"out must have shape ({m}, splits, {k}), got {tuple(out.shape)}")
    _check_int("split_offset", split_offset, 0)
    if split_offset + lanes > out.shape[1]:
        raise KernelInputError(
            f"out has {out.shape[1]} splits but the launch writes splits {split_offset}…{split_offset + lanes - 1}"
        )


def select_candidates(
    scores: Tensor,
    k: int,
    *,
    out: Tensor | None = None,
    concept_offset: int = 0,
    split_offset: int = 0,
    carry: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    span: int | None = None,
) -> Tensor:
    """Per-lane top-k keys of ``ReLU(scores)`` into ``out[:, split_offset + lane, :]`` (the Triton kernel).

    Args:
        scores: ``(M, N)`` pre-activations of concepts ``concept_offset … concept_offset + N - 1``,
            fp32/fp16/bf16, contiguous.
        k: keys kept per row and lane, ``1 ≤ k ≤ MAX_K`` (a lane narrower than ``k`` keeps
            negative fill keys in its free slots; :func:`merge_candidates` never picks them
            while the whole row has ≥ ``k`` concepts).
        out: ``(M, splits, k)`` int64 candidate buffer; allocated with ``splits = lanes`` if
            ``None``. Each lane's ``k`` slots of every row are written (in no particular order).
        concept_offset: id of column 0 (the chunk's first concept).
        split_offset: the first split this launch writes.
        carry: start each lane from the keys already in its slots of ``out`` (the previous
            chunks' top-k) instead of from empty: the slots end up holding the top-k of all
            chunks seen by that lane.
        block_m, block_n, span: override :func:`select_config` (rows and columns per tile,
            columns per lane).

    Returns:
        ``out``.

    Raises:
        KernelInputError: wrong device, dtype, shape, layout, ``k`` or offsets.
    """
    check_tensor("scores", scores, ndim=2)
    _check_k(k)
    m, n = scores.shape
    _check_int("concept_offset", concept_offset, 0)
    if concept_offset + n > 2**31:
        raise KernelInputError(f"concept ids up to {concept_offset + n - 1} do not fit the keys' 31-bit ids")
    cfg = select_config(m, n, scores.device, block_m, block_n, span)
    if out is None:
        if carry:
            raise KernelInputError("carry=True needs out: the keys to continue from")
        out = torch.empty((m, cfg.lanes, k), device=scores.device, dtype=torch.int64)
    _check_select_out(out, scores, k, split_offset, cfg.lanes)
    if m == 0 or n == 0:
        if n == 0 and not carry:
            out[:, split_offset].copy_(-1 - torch.arange(k, device=out.device))  # the kernel's fill keys
        return out
    grid = (triton.cdiv(m, cfg.block_m), cfg.lanes)
    launchable(_select_topk_kernel, scores)[grid](
        scores,
        out,
        m,
        n,
        k,
        concept_offset,
        split_offset,
        out.shape[1],
        cfg.span,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        KP=max(2, next_power_of_two(k)),
        CARRY=carry,
        num_warps=4,
    )
    return out


def select_candidates_reference(scores: Tensor, k: int, span: int, concept_offset: int = 0) -> Tensor:
    """PyTorch reference of :func:`select_candidates` (no carry): ``(M, lanes, k)`` keys, sorted descending.

    Lanes narrower than ``k`` are padded with the kernel's fill keys. Zeros tie-break
    differently from the kernel (any zeros are a valid top-k): compare keys of positive
    values, or values. Integer and float32 arithmetic only (no float64).
    """
    m, n = scores.shape
    lanes = max(1, triton.cdiv(n, span))
    act = torch.where(scores > 0, scores.float(), torch.zeros((), device=scores.device))  # +0.0 for ≤ 0 and NaN
    ids = concept_offset + torch.arange(n, device=scores.device)
    keys = (act.view(torch.int32).to(torch.int64) << 32) | ids
    padded = torch.full((m, lanes * span), _NEG, dtype=torch.int64, device=scores.device)
    padded[:, :n] = keys
    per_lane = F.pad(padded.view(m, lanes, span), (0, max(0, k - span)), value=_NEG)
    top = per_lane.topk(k, dim=2).values
    # A lane with r < k columns keeps k - r fill keys: the kernel replaces the lowest first, so -1 … -(k - r) stay.
    empty = (top == _NEG).sum(dim=2, keepdim=True)
    fill = -1 - (torch.arange(k, device=scores.device) - (k - empty))
    return torch.where(top == _NEG, fill, top)


# --------------------------------------------------------------------------- the encode path
def gemm_select_chunk(m: int, num_concepts: int, dtype: torch.dtype) -> int:
    """Concepts per GEMM chunk: the largest power of two with ``m·chunk`` elements ≤ :data:`CHUNK_BYTES`.

    At least 256 (very large ``m`` then overflows L2 rather than launching tiny chunks), at most ``K``.
    """
    per_concept = max(1, m) * dtype.itemsize
    chunk = 1 << max(0, (CHUNK_BYTES // per_concept).bit_length() - 1)
    return max(1, min(max(chunk, _MIN_CHUNK), num_concepts))


def gemm_select_plan(x: Tensor, num_concepts: int, chunk: int | None = None) -> tuple[int, SelectConfig]:
    """The chunk width (≤ ``K``) and the select launch of every chunk (its ``lanes`` size the candidate buffer)."""
    if chunk is None:
        chunk = gemm_select_chunk(x.shape[0], num_concepts, x.dtype)
    else:
        _check_int("chunk", chunk, 1)
    chunk = min(chunk, num_concepts)
    return chunk, select_config(x.shape[0], chunk, x.device)


def gemm_select_candidates(
    x: Tensor, encoder: Tensor, k: int, *, chunk: int | None = None, out: Tensor | None = None
) -> Tensor:
    """Candidate keys ``(M, lanes, k)`` of ``ReLU(x @ encoder.T)``: per chunk a cuBLAS GEMM, then the select.

    Args:
        x: ``(M, C)`` fp32/fp16/bf16, contiguous.
        encoder: ``(K, C)``, same dtype.
        k: ``1 ≤ k ≤ min(K, MAX_K)``.
        chunk: concepts per GEMM chunk (default :func:`gemm_select_chunk`).
        out: optional ``(M, lanes, k)`` int64 buffer (every element is written); ``lanes``
            from :func:`gemm_select_plan`.

    Raises:
        KernelInputError: wrong device, dtype, shape, layout, ``k`` or ``chunk``.
    """
    _check_encode(x, encoder, k)
    m = x.shape[0]
    num_concepts = encoder.shape[0]
    chunk, cfg = gemm_select_plan(x, num_concepts, chunk)
    shape = (m, cfg.lanes, k)
    if out is None:
        out = torch.empty(shape, device=x.device, dtype=torch.int64)
    elif tuple(out.shape) != shape:
        raise KernelInputError(f"out must have shape {shape}, got {tuple(out.shape)}")
    if m == 0:
        return out
    scratch = torch.empty(m * chunk, device=x.device, dtype=x.dtype)  # one buffer, reused by every chunk
    for start in range(0, num_concepts, chunk):
        width = min(chunk, num_concepts - start)
        scores = scratch[: m * width].view(m, width)
        torch.matmul(x, encoder[start : start + width].t(), out=scores)
        select_candidates(scores, k, out=out, concept_offset=start, carry=start > 0, span=cfg.span)
    return out


def encode_topk_gemm_select(x: Tensor, encoder: Tensor, k: int, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """``ReLU(x @ encoder.T).topk(k)`` by cuBLAS GEMM chunks and the Triton select (see the module doc).

    Args:
        x: ``(M, C)`` rows, fp32/fp16/bf16, contiguous.
        encoder: ``(K, C)``, same dtype.
        k: concepts kept per row, ``1 ≤ k ≤ min(K, MAX_K)``.
        chunk: concepts per GEMM chunk (default: L2-sized, :func:`gemm_select_chunk`).

    Returns:
        ``values`` ``(M, k)`` in ``x``'s dtype, sorted descending (the GEMM's own rounding to
        that dtype, as in :func:`kernels.concept_encode.encode_topk_reference`), and
        ``indices`` ``(M, k)`` int64, distinct within a row.
    """
    keys = gemm_select_candidates(x, encoder, k, chunk=chunk)
    return merge_candidates(keys, k, x.dtype)
