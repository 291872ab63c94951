"""Top-k machinery shared by the two concept-encode paths (:mod:`kernels.concept_encode`'s fused
kernel and :mod:`kernels.concept_select`'s GEMM + select): the keys' limit, their in-register
insertion, the final merge and the argument checks. Both paths import this module; neither imports
the other's internals.

A *key* packs a non-negative float32 value and its concept id into one int64 (value bits high, id
low), so one integer ``max``/``topk`` orders by value and carries the id along.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._common import KernelInputError, check_same_device, check_tensor

__all__ = ["MAX_K", "merge_candidates"]


MAX_K = 256
"""Largest ``k`` the fused kernel keeps per row (its running top-k lives in registers)."""


@triton.jit
def _insert_keys(best, thresh, keys):
    """Merge a tile's ``(BLOCK_M, BLOCK_N)`` keys into the running top-k ``best`` ``(BLOCK_M, KP)``.

    ``thresh`` is each row's current k-th key (``min(best)``); masked keys are -2^62. The
    tile's keys go in in decreasing order, each replacing its row's k-th key, while one
    beats it: one tile pass per insertion, and after the first tiles few keys qualify.
    Returns the new ``(best, thresh)``.
    """
    top = tl.max(keys, axis=1)
    beats = top > thresh
    while tl.max(beats.to(tl.int32), axis=0) > 0:
        replace = (best == thresh[:, None]) & beats[:, None]
        best = tl.where(replace, top[:, None], best)
        thresh = tl.min(best, axis=1)
        top = tl.max(tl.where(keys < top[:, None], keys, -0x4000000000000000), axis=1)
        beats = top > thresh
    return best, thresh


def _check_encode(x: Tensor, encoder: Tensor, k: int) -> None:
    check_tensor("x", x, ndim=2)
    check_tensor("encoder", encoder, ndim=2)
    check_same_device(x=x, encoder=encoder)
    if encoder.dtype != x.dtype:
        raise KernelInputError(f"encoder has dtype {encoder.dtype} but x has {x.dtype}")
    if encoder.shape[1] != x.shape[1]:
        raise KernelInputError(
            f"encoder has {encoder.shape[1]} input channels (shape {tuple(encoder.shape)}) "
            f"but x has {x.shape[1]} (shape {tuple(x.shape)})"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise KernelInputError(f"k must be a positive int, got {k!r}")
    if k > encoder.shape[0]:
        raise KernelInputError(f"k ({k}) exceeds the number of concepts K = encoder.shape[0] ({encoder.shape[0]})")
    if k > MAX_K:
        raise KernelInputError(f"k ({k}) exceeds the fused kernel's limit of {MAX_K}; use the PyTorch reference")


def merge_candidates(keys: Tensor, k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The ``k`` largest of ``(M, S, k)`` keys → values ``(M, k)`` (``dtype``, descending) and int64 ids."""
    top = torch.topk(keys.flatten(1), k, dim=1).values  # flatten, not reshape(M, -1): M may be 0
    values = (top >> 32).to(torch.int32).view(torch.float32).to(dtype)
    return values, top & 0xFFFFFFFF
