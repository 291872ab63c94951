"""One data path: a split read batch by batch through ``torch.utils.data.DataLoader``.

Every command that reads images (training, feature collection, statistics, evaluation,
galleries) iterates an :class:`ImageSplit` with :meth:`ImageSplit.batches`; nothing holds a
whole image folder in memory. Peak memory is bounded by the batch size, the number of worker
processes and their prefetch depth, whatever the number of images.

An :class:`ImageSplit` wraps a map-style *item source*: ``source[i] -> (image, label)`` with
``image`` a ``(3, S, S)`` tensor (uint8, or float in [0, 1]), raising when item ``i`` cannot be
read. The embedded synthetic dataset is generated into memory (a :class:`TensorItems` source);
an image folder decodes each file when it is asked for, in a worker process.

Unreadable files never stop a pass: a failing item is left out of its batch and reported — one
warning per pass with the count and the first paths, whether the failure happened in the main
process or in a worker (the workers send the reason back with the batch instead of logging it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fact_model.config import Preprocessing

__all__ = [
    "Batch",
    "ImageSplit",
    "ItemSource",
    "TensorItems",
    "TrainingData",
    "default_workers",
    "seeded_generator",
    "shuffled_order",
]

log = logging.getLogger(__name__)

_MAX_LISTED = 5  # item names listed in a skip warning before "... and N more"
_MAX_AUTO_WORKERS = 8


class ItemSource(Protocol):
    """What an :class:`ImageSplit` reads: ``len()`` items, ``source[i] -> (image (3, S, S), label)``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, int]: ...


class TensorItems:
    """Images already in memory (the generated synthetic dataset): uint8 ``(N, 3, S, S)`` and labels ``(N,)``."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"need one label per image, got {tuple(labels.shape)} for {len(images)} images")
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


def default_workers(in_memory: bool) -> int:
    """Worker processes of a loader: 0 for in-memory data (nothing to decode), else one per spare core (≤ 8)."""
    if in_memory:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(_MAX_AUTO_WORKERS, cores - 1))


def seeded_generator(seed: int, *indices: int) -> torch.Generator:
    """A CPU generator that depends only on ``seed`` and the ``indices`` (an epoch, a batch, a rank …),
    so a resumed or re-sharded run draws exactly what an uninterrupted one draws."""
    state = int(seed)
    for index in indices:
        state = state * 1_000_003 + int(index)
    return torch.Generator().manual_seed(state % (2**63))


def shuffled_order(n: int, seed: int, epoch: int = 0) -> list[int]:
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)`` (so a resumed run sees the same order)."""
    return torch.randperm(n, generator=seeded_generator(seed, epoch)).tolist()


def _to_uint8(image: Tensor) -> Tensor:
    if image.dtype == torch.uint8:
        return image
    return image.mul(255).round_().clamp_(0, 255).to(torch.uint8)


@dataclass
class Batch:
    """One batch of a split.

    Attributes:
        images: ``(B, 3, S, S)`` uint8 RGB (B may be smaller than the batch size, even 0, when items were skipped).
        labels: ``(B,)`` int64.
        indices: ``(B,)`` int64, the items' positions in the split.
        skipped: ``(position, reason)`` of every item of this batch that could not be read.
    """

    images: Tensor
    labels: Tensor
    indices: Tensor
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def float_images(self, device: torch.device | str | None = None) -> Tensor:
        """``(B, 3, S, S)`` float32 in [0, 1], on ``device`` (copied non-blocking from pinned memory on CUDA)."""
        images = self.images if device is None else self.images.to(device, non_blocking=True)
        return images.float().div_(255)

    def pin_memory(self, device: Any = None) -> Batch:
        """Called by the DataLoader's pin-memory thread on CUDA."""
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.indices.pin_memory(), self.skipped)


class _Guarded(Dataset):
    """``position -> (position, uint8 image | None, label, reason | None)``: a failing read becomes data."""

    def __init__(self, source: ItemSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, position: int) -> tuple[int, Tensor | None, int, str | None]:
        try:
            image, label = self.source[position]
            return position, _to_uint8(image), int(label), None
        except Exception as err:  # any unreadable file is skipped, whatever the decoder raised
            return position, None, -1, f"{type(err).__name__}: {err}"


class _Collate:
    """Stack the readable rows of a batch; keep the others' reasons (picklable, for worker processes)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, rows: list[tuple[int, Tensor | None, int, str | None]]) -> Batch:
        good = [row for row in rows if row[1] is not None]
        skipped = [(row[0], row[3] or "unreadable") for row in rows if row[1] is None]
        if good:
            images = torch.stack([row[1] for row in good])  # type: ignore[misc]
        else:
            images = torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        labels = torch.tensor([row[2] for row in good], dtype=torch.long)
        indices = torch.tensor([row[0] for row in good], dtype=torch.long)
        return Batch(images, labels, indices, skipped)


class ImageSplit:
    """One split of a dataset, read batch by batch.

    Args:
        source: the items (see :class:`ItemSource`); decoding happens in ``source[i]``.
        labels: the label of every item, known without reading any image (folder names, generated labels).
        class_names: one name per label.
        preprocessing: how the images were brought to ``(3, S, S)``, ``S = preprocessing.input_size``.
        description: JSON-able provenance, enough to reopen the split
            (:func:`fact_model.data.sources.open_recorded_split`).
        in_memory: the items are already in memory (no worker processes needed).
        item_name: ``position -> str`` naming an item in warnings (e.g. its file path).
        workers: default DataLoader worker processes of :meth:`batches` (None: :func:`default_workers`).

    Attributes:
        skipped: ``position -> reason`` of every item found unreadable so far (in any pass).
    """

    def __init__(
        self,
        source: ItemSource,
        labels: Sequence[int] | Tensor,
        class_names: Sequence[str],
        preprocessing: Preprocessing,
        description: dict[str, Any],
        in_memory: bool = False,
        item_name: Callable[[int], str] | None = None,
        workers: int | None = None,
    ) -> None:
        self.source = source
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        if self.labels.ndim != 1 or len(self.labels) != len(source):
            raise ValueError(f"need one label per item, got {tuple(self.labels.shape)} for {len(source)} items")
        if len(source) == 0:
            raise ValueError(f"the split {description.get('split', '')!r} has no images")
        self.class_names = tuple(class_names)
        if len(self.class_names) < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {len(self.class_names)}")
        self.preprocessing = preprocessing
        self.description = dict(description)
        self.in_memory = in_memory
        self.workers = workers
        self._item_name = item_name or (lambda position: f"item {position}")
        self.skipped: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.source)

    @property
    def image_size(self) -> int:
        return self.preprocessing.input_size

    def __repr__(self) -> str:
        where = "in memory" if self.in_memory else "streamed"
        return f"ImageSplit({self.description.get('split', '?')!r}, {len(self)} images, {where})"

    def item_name(self, position: int) -> str:
        """What item ``position`` is, for messages (a file path for folders)."""
        return self._item_name(position)

    def images(self, positions: Sequence[int] | Tensor) -> Tensor:
        """Items at ``positions`` as uint8 ``(n, 3, S, S)``, read now in this process (galleries, cards).

        Raises:
            ValueError: an item cannot be read (the message names it).
        """
        rows = []
        for position in [int(p) for p in positions]:
            try:
                rows.append(_to_uint8(self.source[position][0]))
            except Exception as err:
                raise ValueError(f"cannot read {self.item_name(position)}: {type(err).__name__}: {err}") from err
        if not rows:
            return torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        return torch.stack(rows)

    def materialise(self) -> tuple[Tensor, Tensor]:
        """The whole split as ``(images uint8 (N, 3, S, S), labels (N,))`` — only for in-memory (generated) data.

        Raises:
            ValueError: the split is streamed from disk (iterate :meth:`batches` instead).
        """
        if isinstance(self.source, TensorItems):
            return self.source.images, self.source.labels
        tensors = getattr(self.source, "tensors", None)  # the synthetic dataset generates itself into memory
        if not (self.in_memory and callable(tensors)):
            raise ValueError(f"{self!r} is streamed from disk and cannot be held in memory; iterate its batches")
        images, labels, _ = tensors()
        return images, labels

    def part_maps(self) -> Tensor:
        """Ground-truth part maps ``(N, S, S)`` uint8 — the synthetic dataset only.

        Raises:
            ValueError: the split has no ground truth (an image folder).
        """
        tensors = getattr(self.source, "tensors", None)
        if not callable(tensors):
            raise ValueError(f"{self!r} has no ground-truth part maps (only the embedded synthetic dataset has)")
        return tensors()[2]

    @classmethod
    def from_tensors(
        cls, images: Tensor, labels: Tensor, class_names: Sequence[str], description: dict[str, Any] | None = None
    ) -> ImageSplit:
        """An in-memory split of uint8 ``images`` ``(N, 3, S, S)`` and ``labels`` ``(N,)``."""
        items = TensorItems(images, labels)
        return cls(items, items.labels, class_names, Preprocessing(images.shape[-1]), description or {}, True)

    def batches(
        self,
        batch_size: int,
        *,
        order: Sequence[int] | None = None,
        start_batch: int = 0,
        workers: int | None = None,
        pin_memory: bool = False,
        progress: bool = False,
        desc: str | None = None,
    ) -> Iterator[Batch]:
        """Yield the split in batches of (at most) ``batch_size`` images.

        Args:
            batch_size: items per batch (a batch is shorter when items in it are unreadable).
            order: item positions in reading order (default: ``range(len(self))``), e.g.
                :func:`shuffled_order`. Batch ``b`` always holds ``order[b·batch_size : (b+1)·batch_size]``.
            start_batch: skip the first batches without reading them (resuming a pass).
            workers: DataLoader worker processes (``None``: :func:`default_workers`).
            pin_memory: pin batches for fast, non-blocking copies to a CUDA device.
            progress: show a progress bar; ``desc`` labels it and the skip warning.

        A warning at the end of the pass (or when it is abandoned) reports the items skipped for
        the first time in it: how many, and the first names and reasons.
        """
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        positions = list(range(len(self))) if order is None else [int(p) for p in order]
        chunks = [positions[i : i + batch_size] for i in range(start_batch * batch_size, len(positions), batch_size)]
        if not chunks:
            return
        if workers is None:
            workers = default_workers(self.in_memory) if self.workers is None else self.workers
        workers = int(workers)
        loader = DataLoader(
            _Guarded(self.source),
            batch_sampler=chunks,
            num_workers=workers,
            collate_fn=_Collate(self.image_size),
            pin_memory=pin_memory and torch.cuda.is_available(),
            prefetch_factor=2 if workers > 0 else None,
        )
        label = desc or f"reading {self.description.get('split', 'split')}"
        fresh: list[tuple[int, str]] = []
        try:
            for batch in tqdm(loader, total=len(chunks), desc=label, disable=not progress, leave=False):
                for position, reason in batch.skipped:
                    if position not in self.skipped:
                        self.skipped[position] = reason
                        fresh.append((position, reason))
                yield batch
        finally:
            if fresh:
                listed = "; ".join(f"{self.item_name(p)} ({r})" for p, r in fresh[:_MAX_LISTED])
                more = len(fresh) - _MAX_LISTED
                log.warning(
                    "%s: skipped %d unreadable image file(s) of %d: %s%s",
                    label, len(fresh), len(self), listed, f"; ... and {more} more" if more > 0 else "",
                )  # fmt: skip


@dataclass
class TrainingData:
    """The train and validation splits of a training run.

    Attributes:
        train, val: the splits (same classes and input size).
        source: JSON-able description of the data for the artifact's provenance.
    """

    train: ImageSplit
    val: ImageSplit
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.train.class_names != self.val.class_names:
            raise ValueError(
                f"train and val splits have different classes: {list(self.train.class_names)[:5]}… vs "
                f"{list(self.val.class_names)[:5]}…"
            )
        if self.train.image_size != self.val.image_size:
            raise ValueError(f"train and val image sizes differ: {self.train.image_size} vs {self.val.image_size}")

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names

    @property
    def preprocessing(self) -> Preprocessing:
        return self.train.preprocessing
