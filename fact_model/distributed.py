"""Several processes on one pass: ``torchrun`` workers on PyTorch's own :mod:`torch.distributed`.

Under ``torchrun`` (``python -m torch.distributed.run``) every worker runs the same command;
:func:`session` joins them into one process group (gloo on CPUs, NCCL when the ranks use CUDA)
and yields a :class:`DistributedContext`. Each rank then reads its :meth:`~DistributedContext.shard`
of the data and the tallies are combined with :meth:`~DistributedContext.all_reduce_sum`,
:meth:`~DistributedContext.all_reduce_max` and :meth:`~DistributedContext.all_gather_object`;
rank 0 alone writes results and shows progress. Without torchrun's variables the context is
:data:`SINGLE_PROCESS`: no process group, every collective the identity.

Why the shards are *blocks dealt round-robin* (:func:`shard`): with ``block`` equal to the batch
size, every rank's batches are exactly batches of the single-process pass (same images, same
order), so every per-image number is computed on the same batch as in a single process and is
bit-identical to it; only the order in which float sums are added changes. Counts, maxima and
argmax-based figures are therefore equal exactly, sums to rounding. Dealing blocks in turn (block
``b`` to rank ``b mod W``) keeps the ranks' shares within one block of each other and spreads a
class-sorted folder over all ranks.

The launch is read once, at the edge, by :func:`fact_model.options.torchrun_environment`; the
process group itself is the only state, and it is torch's (``env://`` rendezvous: torch reads
``MASTER_ADDR``/``MASTER_PORT`` and the agent's store itself).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from fact_model.options import TorchrunEnvironment

__all__ = ["SINGLE_PROCESS", "DistributedContext", "context", "session", "shard"]

log = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT = datetime.timedelta(minutes=30)
"""How long a collective waits for the slowest rank before the group gives up."""


def shard(items: int | Sequence[T] | Tensor | Sized, rank: int, world_size: int, block: int = 1) -> list:
    """Rank ``rank``'s part of ``items``: blocks of ``block`` consecutive items, block ``b`` to rank ``b mod W``.

    Args:
        items: a count ``n`` (the positions ``0 … n-1``), a sequence or 1-D tensor of indices, or any
            sized collection (a dataset, an :class:`~fact_model.data.loading.ImageSplit`: its positions).
        block: items per block; pass the batch size so that every batch of a rank is a batch of the
            single-process pass (see the module docstring).

    Returns:
        The rank's items in their original order. Over ``rank = 0 … W-1`` the parts are disjoint and
        cover ``items``; they depend only on ``(len(items), W, block)``. A rank may get nothing
        (more ranks than blocks).

    Raises:
        ValueError: ``world_size < 1``, ``rank`` outside ``[0, world_size)`` or ``block < 1``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 ≤ rank < world_size, got rank {rank} of {world_size}")
    if block < 1:
        raise ValueError(f"block must be ≥ 1, got {block}")
    if isinstance(items, int):
        values: Sequence = range(items)
    elif isinstance(items, Tensor):
        values = items.tolist()
    elif isinstance(items, Sequence):
        values = items
    else:
        values = range(len(items))
    start, step = rank * block, world_size * block
    return [
        values[i] for first in range(start, len(values), step) for i in range(first, min(first + block, len(values)))
    ]


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a run: rank, world size, device; collectives that are no-ops alone.

    Attributes:
        rank: this process's rank, ``0 … world_size-1`` (global across machines).
        world_size: processes in the run.
        local_rank: the rank on this machine (picks the GPU).
        device: where this rank computes: ``cuda:<local_rank>`` under NCCL, else the CPU.
        backend: ``"gloo"``/``"nccl"``, or ``None`` in a single process (no process group).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, shows progress and writes results."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1

    def shard(self, items: int | Sequence[T] | Tensor | Sized, block: int = 1) -> list:
        """This rank's part of ``items`` (see :func:`shard`)."""
        return shard(items, self.rank, self.world_size, block)

    def _on_wire(self, tensor: Tensor) -> Tensor:
        """A copy of ``tensor`` where the backend communicates (NCCL on the GPU, gloo on the CPU);
        a copy, so the caller's tensor is left as it was until the result is written back."""
        return tensor.detach().to(self.device if self.backend == "nccl" else "cpu", copy=True)

    def _reduce(self, tensor: Tensor, op: dist.ReduceOp) -> Tensor:
        if not self.is_distributed:
            return tensor
        work = self._on_wire(tensor)
        dist.all_reduce(work, op=op)
        return work.to(tensor.device)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The element-wise sum of ``tensor`` over all ranks (same shape and dtype on every rank), on every rank."""
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        """The element-wise maximum of ``tensor`` over all ranks, on every rank."""
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable; move tensors to the CPU first), in rank order, on every rank."""
        if not self.is_distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any, source: int = 0) -> Any:
        """Rank ``source``'s ``obj`` (picklable) on every rank; the others' ``obj`` is ignored."""
        if not self.is_distributed:
            return obj
        box = [obj if self.rank == source else None]
        dist.broadcast_object_list(box, src=source)
        return box[0]

    def broadcast_(self, tensor: Tensor, source: int = 0) -> Tensor:
        """Overwrite ``tensor`` in place with rank ``source``'s (same shape and dtype everywhere); returns it."""
        if self.is_distributed:
            work = self._on_wire(tensor)
            dist.broadcast(work, src=source)
            tensor.data.copy_(work.to(tensor.device))
        return tensor

    def local_batch_size(self, global_batch_size: int) -> int:
        """This rank's share of a global batch: ``B // W``, one more on the first ``B mod W`` ranks.

        Raises:
            ValueError: ``global_batch_size`` smaller than the world size (some rank would get nothing).
        """
        if global_batch_size < self.world_size:
            raise ValueError(
                f"a global batch of {global_batch_size} cannot be split over {self.world_size} processes; "
                "use --batch-size ≥ the number of processes"
            )
        share, extra = divmod(global_batch_size, self.world_size)
        return share + (1 if self.rank < extra else 0)

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.is_distributed:
            dist.barrier()


SINGLE_PROCESS = DistributedContext()
"""The context of a plain, single-process run (immutable)."""


def context() -> DistributedContext:
    """The context of this process as torch's process group describes it (:data:`SINGLE_PROCESS` without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE_PROCESS
    backend = str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    rank = dist.get_rank()
    local_rank = device.index if device.index is not None else rank
    return DistributedContext(rank, dist.get_world_size(), local_rank, device, backend)


class _OtherRanks(logging.Filter):
    """On ranks other than 0: only warnings and errors, each prefixed with the rank."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        if not getattr(record, "_fact_rank", False):
            record.msg, record._fact_rank = f"[rank {self.rank}] {record.msg}", True
        return True


@contextlib.contextmanager
def session(
    environment: TorchrunEnvironment | None, device: str | torch.device | None = None
) -> Iterator[DistributedContext]:
    """Join the run ``environment`` describes for the block; yields this process's context.

    Args:
        environment: :func:`fact_model.options.torchrun_environment` (``None``: a single process).
        device: the rank's device; default ``cuda:<LOCAL_RANK>`` when several processes run and CUDA
            is available (backend NCCL), else the CPU (backend gloo). A single process stays on the CPU.

    With ``world_size`` 1 or no environment, no process group is made. A group that is already
    initialised (by the caller) is used and left alone; one made here is destroyed on leaving,
    whatever happened in the block. On ranks other than 0, log records below WARNING are dropped
    and the rest carry ``[rank r]`` for the block.
    """
    if environment is None or environment.world_size == 1:
        yield SINGLE_PROCESS
        return
    if dist.is_initialized():
        yield context()
        return
    if device is None:
        device = f"cuda:{environment.local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method="env://", rank=environment.rank, world_size=environment.world_size, timeout=TIMEOUT
    )
    ctx = DistributedContext(environment.rank, environment.world_size, environment.local_rank, device, backend)
    handlers = logging.getLogger().handlers if not ctx.is_main else []
    quiet = _OtherRanks(ctx.rank)
    for handler in handlers:
        handler.addFilter(quiet)
    log.info("rank %d of %d on %s (%s)", ctx.rank, ctx.world_size, device, backend)
    try:
        yield ctx
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)
        dist.destroy_process_group()
