"""User image folders (``root/<class>/**/*.jpg``) as a PyTorch dataset, plus a stratified split helper.

The layout is the usual "one sub-folder per class" one::

    root/
        cats/       a.jpg  b.png  more/c.webp
        dogs/       d.jpeg e.bmp  f.tif  g.gif
        classes.json   (optional, written by :func:`fact_model.data.export.export_png_folder`)

Class names are the sorted sub-folder names (hidden entries and ``__MACOSX`` are ignored), so label ``i``
is the ``i``-th folder in sorted order. When ``root/classes.json`` is present and its ``folders`` list matches
the sub-folders exactly, the class names are taken from its ``class_names`` list instead, which restores
names that were made filesystem-safe on export.

Bad files never crash a run: with ``validate=True`` every file is decoded once up front and unreadable
ones are skipped (one summarising warning, details in ``dataset.skipped``); a file that still fails later,
at access time, is replaced by the next loadable item (see :meth:`ImageFolderDataset.__getitem__`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from fact_model import image_io
from fact_model.config import Preprocessing
from fact_model.preprocessing import preprocess_images

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "folder_class_names", "split_indices"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = image_io.IMAGE_EXTENSIONS
"""File extensions (lower case, matched case-insensitively) that are treated as images: those of
:data:`fact_model.image_io.IMAGE_FORMATS` (JPEG, PNG, WebP, GIF, BMP, TIFF)."""

CLASSES_FILE = "classes.json"
"""Optional file in the dataset root mapping folder names back to class names (see the module docstring)."""

_IGNORED_NAMES = frozenset({"__MACOSX"})
_MAX_LISTED = 5  # paths listed in a warning before "... and N more"


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_NAMES


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden(path.name) and path.is_file()


def _list_image_files(class_dir: Path) -> list[Path]:
    """All image files below ``class_dir`` (recursively, hidden entries skipped), sorted by relative path."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        found.extend(p for name in filenames if _is_image_file(p := Path(dirpath) / name))
    return sorted(found, key=lambda p: p.relative_to(class_dir).as_posix())


def _check_image(path: Path) -> str | None:
    """``None`` when ``path`` is an accepted image that decodes and converts to RGB, else why not."""
    try:
        image_io.read_rgb(path)  # format, integrity checks, full decode, mode and value range
    except Exception as err:  # any failure (ImageReadError, a decoder's own error, bombs, ...) skips the file
        return f"{type(err).__name__}: {err}"
    return None


def _load_image(path: Path) -> Image.Image:
    """Read and decode ``path`` (first frame; raises on a file :func:`_check_image` would skip)."""
    return image_io.read_image(path)


def _describe(items: Sequence[tuple[Path, str]]) -> str:
    listed = "; ".join(f"{path} ({reason})" for path, reason in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return listed + (f"; ... and {more} more" if more > 0 else "")


def _read_class_names(root: Path, folders: list[str]) -> list[str]:
    """Class names from ``root/classes.json`` when it matches ``folders``, else the folder names."""
    path = root / CLASSES_FILE
    if not path.is_file():
        return list(folders)
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
        names, recorded = mapping["class_names"], mapping["folders"]
        ok = (
            isinstance(names, list)
            and all(isinstance(n, str) for n in names)
            and len(set(names)) == len(names)
            and recorded == folders
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring unreadable %s (%s); using folder names as class names", path, err)
        return list(folders)
    if not ok:
        logger.warning(
            "ignoring %s: its folders %r do not match the class sub-folders %r; using folder names as class names",
            path,
            mapping.get("folders"),
            folders,
        )
        return list(folders)
    return list(names)


def _class_folders(root: Path) -> list[str]:
    """The class sub-folders of ``root``, sorted (hidden entries and ``__MACOSX`` ignored)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name))


def folder_class_names(root: str | os.PathLike[str]) -> list[str]:
    """The class names an :class:`ImageFolderDataset` of ``root`` would have, without listing its files.

    Raises:
        ValueError: ``root`` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset root '{root}' is not a directory")
    return _read_class_names(root, _class_folders(root))


class ImageFolderDataset(Dataset[tuple[Tensor, int]]):
    """Images in ``root/<class folder>/**`` with integer labels, preprocessed with a recorded recipe.

    Args:
        root: directory with one sub-folder per class (at least 2). Files with extensions in
            :data:`IMAGE_EXTENSIONS` are collected recursively within each class folder and sorted by
            relative path; other files and hidden entries are ignored. Files are read by content (a ``.png``
            holding another format is skipped) through :mod:`fact_model.image_io`: first frame only, any
            size and PIL mode (greyscale, palette, RGBA, 16-bit, ...) converted by ``to_rgb`` (values by the
            mode's real range, EXIF orientation, transparency composited on white).
        recipe: how each image becomes a ``(3, S, S)`` tensor, ``S = recipe.input_size``.
        validate: decode every file once now and skip the unreadable ones (one warning, listed in
            :attr:`skipped`). With ``False`` construction is fast and bad files are only found at access time.

    Attributes:
        root: the dataset root.
        recipe: the preprocessing recipe.
        class_names: one name per label, label ``i`` ↔ ``class_names[i]``.
        samples: ``(path, label)`` per item, in class order then path order.
        skipped: ``(path, reason)`` per file left out — found by validation, or (in this process) at access.

    Raises:
        ValueError: root missing or not a directory; no class sub-folders; fewer than 2 classes; no image
            files at all; a class folder without image files; every file unreadable; or a class whose
            files are all unreadable.
    """

    def __init__(self, root: str | os.PathLike[str], recipe: Preprocessing, validate: bool = True) -> None:
        if not isinstance(recipe, Preprocessing):
            raise ValueError(f"recipe must be a fact_model.config.Preprocessing, got {type(recipe).__name__}")
        self.root = Path(root)
        self.recipe = recipe
        if not self.root.exists():
            raise ValueError(f"dataset root '{self.root}' does not exist")
        if not self.root.is_dir():
            raise ValueError(f"dataset root '{self.root}' is not a directory")

        folders = _class_folders(self.root)
        if not folders:
            raise ValueError(
                f"dataset root '{self.root}' has no class sub-folders; "
                f"expected one sub-folder per class, e.g. '{self.root / 'cats'}/img1.jpg'"
            )
        if len(folders) < 2:
            raise ValueError(
                f"a classifier needs at least 2 classes; found {len(folders)}: {folders[0]!r} "
                f"(add one sub-folder per class under '{self.root}')"
            )

        files = {folder: _list_image_files(self.root / folder) for folder in folders}
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        if not any(files.values()):
            raise ValueError(
                f"no image files ({extensions}) found under '{self.root}' in any of its {len(folders)} class folders"
            )
        for folder in folders:
            if not files[folder]:
                raise ValueError(
                    f"class folder '{self.root / folder}' contains no image files ({extensions}); "
                    "add images or remove the folder"
                )

        self.skipped: list[tuple[Path, str]] = []
        if validate:
            for folder in folders:
                good = []
                for path in files[folder]:
                    reason = _check_image(path)
                    if reason is None:
                        good.append(path)
                    else:
                        self.skipped.append((path, reason))
                files[folder] = good
            if self.skipped:
                logger.warning(
                    "skipped %d unreadable image file(s) under %s: %s",
                    len(self.skipped),
                    self.root,
                    _describe(self.skipped),
                )
            total = sum(len(paths) for paths in files.values())
            if total == 0:
                raise ValueError(
                    f"none of the {len(self.skipped)} image files under '{self.root}' could be read: "
                    f"{_describe(self.skipped)}"
                )
            for folder in folders:
                if not files[folder]:
                    bad = [(p, r) for p, r in self.skipped if p.is_relative_to(self.root / folder)]
                    raise ValueError(
                        f"class folder '{self.root / folder}' has no readable images "
                        f"(all {len(bad)} file(s) skipped: {_describe(bad)})"
                    )

        self.class_names: list[str] = _read_class_names(self.root, folders)
        self.samples: list[tuple[Path, int]] = [
            (path, label) for label, folder in enumerate(folders) for path in files[folder]
        ]
        self._failed: set[int] = set()  # indices that failed to load in this process

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        """Label of every item, in item order (for :func:`split_indices`)."""
        return [label for _, label in self.samples]

    def read(self, index: int) -> tuple[Tensor, int]:
        """Item ``index`` as ``(image, label)``, raising when its file cannot be read (no substitution).

        Returns:
            ``image``: ``(3, S, S)`` float32 in [0, 1]; ``label``: int.

        Raises:
            IndexError: ``index`` out of range.
            Exception: whatever reading or decoding the file raised (:class:`~fact_model.image_io.ImageReadError`,
                ``OSError``, a decoder's own error); the streaming loader turns it into a skip.
        """
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for a dataset of {n} items")
        path, label = self.samples[index % n]
        return preprocess_images(_load_image(path), self.recipe)[0], label

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Item ``index`` as ``(image, label)``.

        Returns:
            ``image``: ``(3, S, S)`` float32 in [0, 1], ``S = recipe.input_size``; ``label``: int in
            ``[0, len(class_names))``.

        A file that fails to load now (changed on disk, or never validated) is logged once, added to
        :attr:`skipped`, and replaced by the next loadable item in index order (wrapping around), whose own
        label is returned — deterministic for a given set of bad files. Only when no item at all can be
        loaded is a ``RuntimeError`` raised.

        Raises:
            IndexError: ``index`` out of range.
            RuntimeError: no file in the dataset can be loaded.
        """
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for a dataset of {n} items")
        index %= n
        for offset in range(n):
            candidate = (index + offset) % n
            if candidate in self._failed:
                continue
            path, _ = self.samples[candidate]
            try:
                return self.read(candidate)
            except Exception as err:  # keep the run going: one bad file must not stop training
                self._failed.add(candidate)
                self.skipped.append((path, f"{type(err).__name__}: {err}"))
                logger.warning(
                    "could not load %s (%s: %s); using the next loadable item", path, type(err).__name__, err
                )
        raise RuntimeError(
            f"none of the {n} image files under '{self.root}' could be loaded: {_describe(self.skipped)}"
        )

    def split(self, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
        """Stratified ``(train_indices, val_indices)`` over this dataset's labels (see :func:`split_indices`)."""
        return split_indices(self.labels, val_fraction, seed)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root='{self.root}', {len(self)} images, {len(self.class_names)} classes, "
            f"input_size={self.recipe.input_size}, skipped={len(self.skipped)})"
        )


def split_indices(
    labels: Sequence[int] | Tensor | int, val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Split item indices into train/validation sets, stratified per class, deterministic per ``seed``.

    Args:
        labels: the label of every item (sequence or 1-D integer tensor of length ``N``), or just the number
            of items ``N`` (then everything counts as one class).
        val_fraction: share of each class that goes to validation, in (0, 1). Each class gets
            ``count * val_fraction`` validation items (rounded half up), at least 1 and at most ``count - 1`` when the
            class has ≥ 2 items (a class with a single item stays in training).
        seed: seed of the per-class shuffles; the same labels and seed always give the same split.

    Returns:
        ``(train_indices, val_indices)``: disjoint, sorted lists of ints that together cover ``range(N)``.

    Raises:
        ValueError: ``val_fraction`` outside (0, 1), negative ``N``, or labels that are not non-negative ints.
    """
    if isinstance(labels, bool) or not isinstance(val_fraction, int | float) or isinstance(val_fraction, bool):
        raise ValueError(f"expected labels and a float val_fraction, got {labels!r} and {val_fraction!r}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if isinstance(labels, int):
        if labels < 0:
            raise ValueError(f"n_items must be ≥ 0, got {labels}")
        label_list = [0] * labels
    else:
        if isinstance(labels, Tensor):
            if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex():
                raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
            label_list = labels.tolist()
        else:
            label_list = list(labels)
        bad = [x for x in label_list if isinstance(x, bool) or not isinstance(x, int) or x < 0]
        if bad:
            raise ValueError(f"labels must be non-negative ints, got {bad[0]!r}")

    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(label_list):
        by_class.setdefault(label, []).append(index)

    generator = torch.Generator().manual_seed(int(seed))
    train: list[int] = []
    val: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        count = len(members)
        n_val = min(max(int(count * val_fraction + 0.5), 1), count - 1) if count >= 2 else 0
        order = torch.randperm(count, generator=generator).tolist()
        val.extend(members[i] for i in order[:n_val])
        train.extend(members[i] for i in order[n_val:])
    return sorted(train), sorted(val)
