"""Pieces shared by the training steps: in-memory data, schedules, evaluation loops, summaries."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import Tensor

from fact_model.bcos.encoding import encode_rgb
from fact_model.config import Preprocessing
from fact_model.explanation import rank_classes
from fact_model.model import FaCTModel

__all__ = ["TrainingData", "accuracy", "as_float", "batches", "print_summary", "warmup_cosine"]


@dataclass
class TrainingData:
    """A classification dataset held in memory as uint8 images.

    Attributes:
        train_images, val_images: ``(N, 3, H, W)`` uint8.
        train_labels, val_labels: ``(N,)`` int64.
        class_names: one name per class.
        preprocessing: how the images were (or user images will be) brought to ``(3, H, W)``.
        source: JSON-able description for the artifact's provenance.
    """

    train_images: Tensor
    train_labels: Tensor
    val_images: Tensor
    val_labels: Tensor
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("train", "val"):
            images, labels = getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"{name} images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
            if len(images) != len(labels) or len(images) == 0:
                raise ValueError(f"{name} split needs as many labels as images (≥ 1), got {len(images)}/{len(labels)}")
        if len(self.class_names) < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {len(self.class_names)}")


def as_float(images: Tensor) -> Tensor:
    """uint8 ``(N, 3, H, W)`` → float32 in [0, 1]."""
    return images.float().div_(255)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Index batches over ``range(n)``, shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.split(batch_size)


@torch.no_grad()
def accuracy(model: FaCTModel, images: Tensor, labels: Tensor, concepts: bool = True, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (with or without its concept layers) on uint8 images."""
    was_training = model.training
    model.eval()
    correct = 0
    for idx in batches(len(images), batch_size):
        record = model.forward_encoded(encode_rgb(as_float(images[idx])), concepts=concepts)
        correct += int((rank_classes(record.scores)[:, 0] == labels[idx]).sum())
    model.train(was_training)
    return correct / len(images)


def print_summary(title: str, rows: dict[str, object], console: Console | None = None) -> None:
    """A two-column rich table at the end of a step."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in rows.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        table.add_row(escape(key), escape(text))  # keys may contain [brackets] (encoder names)
    (console or Console(stderr=True)).print(table)
