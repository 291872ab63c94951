"""Real images for the folder path: scikit-learn's handwritten digits as an ImageNet-layout folder.

``load_digits`` ships 1,797 real 8×8 greyscale scans (values 0–16) inside the scikit-learn
wheel, so tests and benchmarks can run the whole folder pipeline on real data with nothing
downloaded. :func:`export_digits` upsamples them (bilinear) to ``size``², splits them per class
with a seed, and writes::

    out_dir/train/<digit folder>/*.png   out_dir/test/<digit folder>/*.png

(each split a :func:`~fact_model.data.export.export_png_folder` folder with ``classes.json``), which
``--data out_dir`` reads as the splits layout (``fact evaluate`` then defaults to ``test``).
scikit-learn is a development dependency (``.[dev]``); importing it is deferred to the call.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from fact_model.data.export import export_png_folder
from fact_model.data.folder import split_indices

__all__ = ["DIGIT_NAMES", "export_digits"]

DIGIT_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))


def export_digits(
    out_dir: str | os.PathLike[str],
    size: int = 32,
    test_fraction: float = 0.25,
    seed: int = 0,
    overwrite: bool = False,
    per_split: int | None = None,
) -> dict[str, int]:
    """Write the digits as ``out_dir/{train,test}/<class>/*.png`` RGB images of ``size``².

    Args:
        per_split: keep only the first this many images of each split (small stand-ins), else all.

    Returns:
        Images written per split, e.g. ``{"train": 1347, "test": 450}``.

    Raises:
        ValueError: ``size`` < 8, ``test_fraction`` outside (0, 1), or a non-empty ``out_dir``
            without ``overwrite``.
        ModuleNotFoundError: scikit-learn is not installed (``pip install -e '.[dev]'``).
    """
    if not (isinstance(size, int) and size >= 8):
        raise ValueError(f"size must be an int ≥ 8, got {size!r}")
    if per_split is not None and per_split < 10:
        raise ValueError(f"per_split must be ≥ 10 (one image per class at least), got {per_split}")
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("export_digits needs scikit-learn: pip install -e '.[dev]'") from err
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out_dir '{out}' is not empty; pass overwrite=True or choose an empty directory")
    digits = load_digits()
    scans = torch.from_numpy(digits.images).float().div(16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(scans, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    images = (1.0 - images).expand(-1, 3, -1, -1)  # dark ink on white paper, as scanned
    labels = torch.from_numpy(digits.target).long()
    train_idx, test_idx = split_indices(labels, test_fraction, seed)
    counts = {}
    for split, indices in (("train", train_idx), ("test", test_idx)):
        index = torch.tensor(indices[:per_split] if per_split else indices)
        export_png_folder(images[index], labels[index], DIGIT_NAMES, out / split, overwrite=overwrite)
        counts[split] = len(index)
    return counts
