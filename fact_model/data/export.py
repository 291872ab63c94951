"""Write a labelled image tensor to disk as a PNG class folder that :class:`ImageFolderDataset` reads back.

Layout written by :func:`export_png_folder`::

    out_dir/
        classes.json                    {"class_names": [...], "folders": [...]} in label order
        00_red_disc_+_blue_square/      one folder per class: zero-padded label + filesystem-safe name
            00000.png  00007.png ...    file name = the image's index in the exported batch

The label prefix makes sorted folder order equal label order, so loading the folder back gives the same
labels, and ``classes.json`` restores the original (unsanitised) class names.
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image
from torch import Tensor

from fact_model.data.folder import CLASSES_FILE

__all__ = ["export_png_folder", "safe_folder_name"]

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^\w.+\-]+")  # anything but letters, digits, _ . + - becomes "_"
_MAX_NAME = 80
_EXPORTED_PNG = re.compile(r"^\d{5,}\.png$")


def safe_folder_name(index: int, name: str, num_classes: int) -> str:
    """Filesystem-safe class folder name: ``"<index>_<name>"``, e.g. ``"03_red_disc_+_blue_square"``.

    The index is zero-padded to at least 2 digits (enough for ``num_classes``) so that sorting the names
    sorts the classes by index; the name keeps letters, digits, ``_ . + -`` and turns every other run of
    characters (spaces, slashes, ...) into one ``_``, truncated to 80 characters.
    """
    width = max(2, len(str(max(num_classes - 1, 0))))
    cleaned = _UNSAFE.sub("_", unicodedata.normalize("NFC", name)).strip("._")[:_MAX_NAME].rstrip("._")
    return f"{index:0{width}d}_{cleaned or 'class'}"


def _to_uint8(images: Tensor) -> Tensor:
    """``(N, 3, H, W)`` uint8 or float in [0, 1] → uint8 on the CPU (floats rounded to the nearest level)."""
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor of shape (N, 3, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point in [0, 1], got dtype {images.dtype}")
    if images.numel() and not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf values")
    if images.numel() and (images.min() < -1e-4 or images.max() > 1 + 1e-4):
        raise ValueError(
            f"float images must lie in [0, 1], got values in [{images.min().item():.4g}, {images.max().item():.4g}]"
        )
    return images.float().mul(255).round_().clamp_(0, 255).to(torch.uint8)


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write via ``write(file_object)`` to a hidden temp file next to ``path``, then rename it into place."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"  # hidden: never picked up as an image
    # os.open with 0o666 honours the umask (mkstemp would leave the file private, 0o600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_previous_export(out_dir: Path) -> None:
    """Delete the PNGs a previous export listed in ``classes.json`` (``NNNNN.png`` in its folders only)."""
    manifest = out_dir / CLASSES_FILE
    try:
        folders = json.loads(manifest.read_text(encoding="utf-8"))["folders"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not isinstance(folders, list):
        return
    for folder in folders:
        if not isinstance(folder, str) or Path(folder).name != folder or folder in ("", ".", ".."):
            continue
        folder_path = out_dir / folder
        if folder_path.is_dir():
            for path in folder_path.iterdir():
                if _EXPORTED_PNG.match(path.name) and path.is_file():
                    path.unlink()


def export_png_folder(
    images: Tensor,
    labels: Tensor | Sequence[int],
    class_names: Sequence[str],
    out_dir: str | os.PathLike[str],
    overwrite: bool = False,
) -> dict[str, int]:
    """Save images as ``out_dir/<class folder>/<index>.png`` plus a ``classes.json`` mapping.

    Args:
        images: ``(N, 3, H, W)`` uint8, or floating point in [0, 1] (rounded to the nearest of 256 levels,
            so uint8 input and float input of the form ``k / 255`` round-trip exactly).
        labels: ``(N,)`` ints in ``[0, len(class_names))``; image ``i`` goes to ``class_names[labels[i]]``.
        class_names: unique class names in label order. Each becomes a folder named by
            :func:`safe_folder_name`; a class without images still gets an (empty) folder, with a warning,
            because :class:`ImageFolderDataset` refuses empty class folders.
        out_dir: target directory, created if missing.
        overwrite: allow writing into an existing non-empty ``out_dir``. Files of the same name are
            replaced and the ``NNNNN.png`` files of a previous export recorded in its ``classes.json`` are
            removed first; nothing else is ever deleted.

    Returns:
        Number of images written per class name, in label order (zeros included).

    Raises:
        ValueError: bad shapes/dtypes/values, labels out of range, duplicate or empty class names,
            ``out_dir`` is a file, or ``out_dir`` is non-empty and ``overwrite`` is False.
    """
    pixels = _to_uint8(images)
    n = pixels.shape[0]
    label_tensor = torch.as_tensor(labels).detach().cpu()
    if label_tensor.ndim != 1 or label_tensor.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match images, got {tuple(label_tensor.shape)}")
    if label_tensor.is_floating_point() or label_tensor.dtype == torch.bool or label_tensor.is_complex():
        raise ValueError(f"labels must be integers, got dtype {label_tensor.dtype}")
    names = list(class_names)
    if isinstance(class_names, str) or not names or not all(isinstance(c, str) and c for c in names):
        raise ValueError(f"class_names must be a non-empty sequence of non-empty strings, got {class_names!r}")
    if len(set(names)) != len(names):
        duplicates = sorted({c for c in names if names.count(c) > 1})
        raise ValueError(f"class_names must be unique, got duplicates {duplicates}")
    if n and (label_tensor.min() < 0 or label_tensor.max() >= len(names)):
        bad = label_tensor[(label_tensor < 0) | (label_tensor >= len(names))][0].item()
        raise ValueError(f"labels must be in [0, {len(names)}) for {len(names)} class names, got {bad}")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(
                f"out_dir '{out}' is not empty; pass overwrite=True to write into it or choose an empty directory"
            )
        _remove_previous_export(out)
    out.mkdir(parents=True, exist_ok=True)

    folders = [safe_folder_name(i, name, len(names)) for i, name in enumerate(names)]
    for folder in folders:
        (out / folder).mkdir(exist_ok=True)
    mapping = {"class_names": names, "folders": folders}
    _atomic_write(out / CLASSES_FILE, lambda f: f.write(json.dumps(mapping, indent=2, ensure_ascii=False).encode()))

    width = max(5, len(str(max(n - 1, 0))))
    counts = dict.fromkeys(names, 0)
    label_list = label_tensor.tolist()
    for i in range(n):
        label = label_list[i]
        image = Image.fromarray(pixels[i].permute(1, 2, 0).contiguous().numpy())
        _atomic_write(out / folders[label] / f"{i:0{width}d}.png", lambda f, im=image: im.save(f, format="PNG"))
        counts[names[label]] += 1

    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        logger.warning(
            "export to %s: %d class(es) have no images and get empty folders (ImageFolderDataset will refuse them): %s",
            out,
            len(empty),
            ", ".join(repr(c) for c in empty[:5]) + (" ..." if len(empty) > 5 else ""),
        )
    return counts
