"""Image folders written for tests: real JPEG files in ``ROOT/<class>/`` layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("ants", "bees")


def write_image_folder(root: Path, n: int, size: int, classes: tuple[str, ...] = CLASSES, seed: int = 0) -> Path:
    """``n`` JPEG images of ``size``², spread over ``classes`` sub-folders of ``root`` (returned)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size, size), Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=85)
    return root
