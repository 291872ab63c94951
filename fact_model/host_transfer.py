"""Bring a bundle of device tensors to the host in one copy (one device→host transfer, one sync).

A response of the service is built from many small tensors (logits, ranked classes, the top
concepts' contributions and activations, a trace, the rendered heatmap pixels). Reading each
with ``float()`` or ``.cpu()`` would cost one transfer and one stream synchronisation apiece
on a GPU. :func:`to_host` instead views every tensor of a nested structure as bytes, packs
them into one device buffer, copies that buffer once and hands back CPU tensors that are views
of the copy, in the same structure.

The packing is exact for every dtype (it copies bytes, it does not convert), and each tensor
starts at a multiple of :data:`ALIGNMENT` bytes so that the byte views can be re-viewed as
their dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["ALIGNMENT", "map_tensors", "to_host", "tree_tensors"]

ALIGNMENT = 16
"""Bytes each packed tensor is aligned to (covers every dtype's element size, complex128 included)."""
T = TypeVar("T")


def map_tensors(tree: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``tree`` with ``fn`` applied to every tensor in it; dataclasses, dicts, lists and tuples are rebuilt."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        changes = {f.name: map_tensors(getattr(tree, f.name), fn) for f in dataclasses.fields(tree) if f.init}
        return dataclasses.replace(tree, **changes)
    if isinstance(tree, dict):
        return {key: map_tensors(value, fn) for key, value in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a named tuple
        return type(tree)(*(map_tensors(value, fn) for value in tree))
    if isinstance(tree, list | tuple):
        return type(tree)(map_tensors(value, fn) for value in tree)
    return tree


def tree_tensors(tree: Any) -> list[Tensor]:
    """Every tensor in ``tree`` (dataclasses, dicts, lists, tuples), in a fixed traversal order."""
    found: list[Tensor] = []
    map_tensors(tree, lambda t: found.append(t) or t)
    return found


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def to_host(tree: T) -> T:
    """``tree`` with every tensor replaced by a CPU copy, all copied in one transfer.

    Args:
        tree: tensors, possibly nested in dataclasses (rebuilt with :func:`dataclasses.replace`),
            dicts, lists and tuples; other values are kept as they are. The tensors may live on
            different devices (each non-CPU device is packed and copied once) and may be
            non-contiguous or of any dtype.

    Returns:
        The same structure; every tensor is detached and on the CPU, with its dtype and shape.
        The tensors that came from one device are views of one CPU buffer (a CPU tensor is
        copied too, so the result never aliases the input).
    """
    tensors = tree_tensors(tree)
    if not tensors:
        return tree
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    copies: dict[int, Tensor] = {}
    for device, indices in by_device.items():
        copies.update(_transfer(device, [tensors[i] for i in indices], indices))
    order = iter(range(len(tensors)))  # map_tensors visits the tensors in tree_tensors' order
    return map_tensors(tree, lambda t: copies[next(order)])


def _transfer(device: torch.device, tensors: list[Tensor], indices: list[int]) -> dict[int, Tensor]:
    """One device buffer of the tensors' bytes → one copy to the host → ``index → CPU view``."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += _padded(size)
    packed = torch.empty(total, dtype=torch.uint8, device=device)
    for t, offset, size in zip(tensors, offsets, sizes, strict=True):
        if size:
            packed[offset : offset + size].view(t.dtype).view(t.shape).copy_(t.detach())  # any strides
    if device.type == "cuda":
        host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()  # the one wait of the response
    else:
        host = packed
    out = {}
    for index, t, offset, size in zip(indices, tensors, offsets, sizes, strict=True):
        out[index] = host[offset : offset + size].view(t.dtype).reshape(t.shape)
    return out
