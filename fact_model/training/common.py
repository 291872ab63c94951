"""Pieces shared by the training steps: schedules, evaluation loops, summaries."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fact_model.bcos.encoding import encode_rgb
from fact_model.data.loading import ImageSplit, TrainingData
from fact_model.distributed import SINGLE_PROCESS, DistributedContext
from fact_model.explanation import rank_classes
from fact_model.model import FaCTModel

__all__ = [
    "BestEpoch",
    "TrainingData",
    "accuracy",
    "prefixed",
    "print_summary",
    "set_learning_rate",
    "unprefixed",
    "warmup_cosine",
]


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set ``lr`` on every parameter group of ``optimizer``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class BestEpoch:
    """The best validation score so far and a copy of the state that reached it (ties keep the earlier one)."""

    def __init__(self, score: float = -1.0, state: dict[str, torch.Tensor] | None = None) -> None:
        self.score = score
        self.state = state

    def offer(self, score: float, state: Mapping[str, torch.Tensor]) -> bool:
        """Keep a detached copy of ``state`` if ``score`` beats the best; returns whether it did."""
        if not score > self.score:
            return False
        self.score, self.state = score, {k: v.detach().clone() for k, v in state.items()}
        return True


def prefixed(prefix: str, tensors: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``tensors`` with keys ``f"{prefix}.{key}"`` (one namespace of a checkpoint's tensors)."""
    return {f"{prefix}.{k}": v for k, v in (tensors or {}).items()}


def unprefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of namespace ``prefix`` (see :func:`prefixed`), keys without the prefix."""
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(f"{prefix}.")}


@torch.no_grad()
def accuracy(
    model: FaCTModel,
    split: ImageSplit,
    concepts: bool = True,
    batch_size: int = 256,
    context: DistributedContext = SINGLE_PROCESS,
) -> float:
    """Top-1 accuracy of ``model`` (with or without its concept layers) on ``split``, streamed in batches.

    Unreadable items are left out (and reported once by the split); the accuracy is over the rest.
    Under ``torchrun`` each rank scores its shard of whole batches and the counts are summed, so every
    rank returns the single-process figure exactly.
    """
    was_training = model.training
    model.eval()
    correct = total = 0
    pin = model.device.type == "cuda"
    order = context.shard(len(split), block=batch_size)
    for batch in split.batches(batch_size, order=order, pin_memory=pin):
        if not len(batch):
            continue
        record = model.forward_encoded(encode_rgb(batch.float_images(model.device)), concepts=concepts)
        correct += int((rank_classes(record.scores)[:, 0].cpu() == batch.labels).sum())
        total += len(batch)
    model.train(was_training)
    correct, total = (int(v) for v in context.all_reduce_sum(torch.tensor([correct, total], dtype=torch.long)))
    if total == 0:
        raise ValueError(f"no readable image in {split!r}")
    return correct / total


def print_summary(title: str, rows: dict[str, object], console: Console | None = None) -> None:
    """A two-column rich table at the end of a step."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in rows.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        table.add_row(escape(key), escape(text))  # keys may contain [brackets] (encoder names)
    (console or Console(stderr=True)).print(table)
