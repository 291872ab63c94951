"""A procedurally generated, seeded image dataset whose classes are made of shared parts.

Each of the :data:`NUM_CLASSES` classes is a set of two part types from :data:`PART_TYPES`
(class ``i`` = parts ``i`` and ``i + 1 mod 10``), so every part type appears in exactly two
classes and a class is only identified by the *combination* of its parts. An image is a
muted, low-contrast textured background with the class's two parts at random positions,
sizes and rotations (colours slightly jittered), plus 0 to ``max_distractors`` parts of
:data:`DISTRACTOR_TYPES`, which never decide the class.

Every image comes with its ground truth: an ``(H, W)`` part map with 0 = background,
``p + 1`` = part type ``p`` and ``len(PART_TYPES) + 1 + d`` = distractor type ``d``; the
pixels a part covers in the image are exactly the pixels labelled with it. Parts never
overlap by more than a little; distractors are drawn first, so class parts are never
hidden behind them.

Image ``index`` of a split is generated from ``np.random.default_rng([seed, split_id,
index])`` alone, so any image can be regenerated on its own, in any order. Labels are
``index % NUM_CLASSES`` (balanced splits).

* :class:`SyntheticConfig` — image size, seed, split sizes, distractor count.
* :func:`render_sample` — one ``(image, part_map, label)`` as numpy arrays.
* :class:`SyntheticParts` — one split as a ``torch.utils.data.Dataset``.
* :func:`part_map_to_rgb` — colour a part map for display.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fact_model.data._parts import DISTRACTOR_TYPES, PART_TYPES, PartType, part_coordinates, part_window

__all__ = [
    "CLASS_NAMES",
    "CLASS_PARTS",
    "DISTRACTOR_TYPES",
    "NUM_CLASSES",
    "PART_NAMES",
    "PART_TYPES",
    "SPLITS",
    "SyntheticConfig",
    "SyntheticParts",
    "part_map_to_rgb",
    "render_sample",
]

NUM_PARTS = len(PART_TYPES)
CLASS_PARTS: tuple[tuple[int, int], ...] = tuple((i, (i + 1) % NUM_PARTS) for i in range(NUM_PARTS))
"""Part-type indices of each class: class ``i`` = parts ``i`` and ``i + 1 mod 10``."""
NUM_CLASSES = len(CLASS_PARTS)
CLASS_NAMES: tuple[str, ...] = tuple(" + ".join(PART_TYPES[p].name for p in parts) for parts in CLASS_PARTS)
PART_NAMES: tuple[str, ...] = ("background", *(t.name for t in PART_TYPES), *(t.name for t in DISTRACTOR_TYPES))
"""Name of each part-map label: 0 = background, then the part types, then the distractor types."""

SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}

_MIN_SIZE, _MAX_SIZE = 24, 1024  # image side limits
_MAX_DISTRACTORS = 4
_RADIUS_RANGE = (0.125, 0.1875)  # part radius as a fraction of the image side (6–9 px at 48 px)
_PLACEMENT_CANDIDATES = 64  # random centres tried per part; the first non-overlapping one wins
_COLOR_JITTER_STD = 10.0  # per-channel offset of a part's colours, in [0, 255] units
_BRIGHTNESS_RANGE = (0.88, 1.08)  # multiplicative brightness jitter of a part's colours
_BG_SATURATION = (0.05, 0.3)  # muted backgrounds: low HSV saturation ...
_BG_VALUE = (0.3, 0.6)  # ... and medium-dark value (parts are saturated or brighter)
_BG_GRADIENT = 18.0  # max brightness change across the image, [0, 255] units
_BG_BLOTCH_STD = 6.0  # std of the low-frequency colour noise
_BG_BLOTCH_GRID = 4  # its resolution (grid points per side, bilinearly upsampled)
_PIXEL_NOISE_AMPLITUDE = 14.0  # uniform per-pixel noise on the whole image (std 4), [0, 255] units


# --------------------------------------------------------------------------- configuration


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


@dataclass(frozen=True)
class SyntheticConfig:
    """Generation settings shared by all splits.

    Attributes:
        image_size: side of the square images in pixels, in [24, 1024]; parts scale with it.
        seed: base seed (int ≥ 0); each split and image derives its own from it.
        train, val, test: number of images in each split (ints ≥ 0).
        max_distractors: most distractor parts per image, in [0, 4] (each image draws 0..max uniformly).
    """

    image_size: int = 48
    seed: int = 0
    train: int = 6000
    val: int = 1000
    test: int = 1000
    max_distractors: int = 2

    def __post_init__(self) -> None:
        if not (_is_int(self.image_size) and _MIN_SIZE <= self.image_size <= _MAX_SIZE):
            raise ValueError(f"image_size must be an int in [{_MIN_SIZE}, {_MAX_SIZE}], got {self.image_size!r}")
        if not (_is_int(self.seed) and self.seed >= 0):
            raise ValueError(f"seed must be an int ≥ 0, got {self.seed!r}")
        for split in SPLITS:
            size = getattr(self, split)
            if not (_is_int(size) and size >= 0):
                raise ValueError(f"{split} (split size) must be an int ≥ 0, got {size!r}")
        if not (_is_int(self.max_distractors) and 0 <= self.max_distractors <= _MAX_DISTRACTORS):
            raise ValueError(f"max_distractors must be an int in [0, {_MAX_DISTRACTORS}], got {self.max_distractors!r}")

    def split_size(self, split: str) -> int:
        """Number of images in ``split`` (``'train'``, ``'val'`` or ``'test'``)."""
        return int(getattr(self, _check_split(split)))

    @classmethod
    def from_description(cls, description: dict) -> SyntheticConfig:
        """The settings recorded in a data description (``{"dataset": "synthetic", "image_size": …, …}``).

        Keys that are not settings (``dataset``, ``split``, …) are ignored; missing ones take the defaults.

        Raises:
            ValueError: a recorded setting out of range (as for the constructor).
        """
        return cls(**{name: description[name] for name in cls.__dataclass_fields__ if name in description})


def _check_split(split: object) -> str:
    if not isinstance(split, str) or split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
    return split


def _check_index(config: SyntheticConfig, split: str, index: object) -> int:
    n = config.split_size(split)
    if not _is_int(index) or not 0 <= int(index) < n:  # type: ignore[call-overload]
        raise ValueError(f"index must be an int in [0, {n - 1}] for split {split!r} of {n} images, got {index!r}")
    return int(index)  # type: ignore[call-overload]


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Part:
    """One part to draw: its type, map label and pose (pixels, radians) and colour jitter."""

    type: PartType
    label: int
    cx: float
    cy: float
    radius: float
    angle: float
    offset: np.ndarray  # (3,) float64 colour offset
    brightness: float


def _place(rng: np.random.Generator, size: int, radii: np.ndarray) -> np.ndarray:
    """Centres for parts of the given radii, in order, avoiding overlap with earlier ones.

    Each part tries ``_PLACEMENT_CANDIDATES`` random centres (keeping the part inside the
    image) and takes the first whose distance to every earlier centre is at least the sum
    of the radii; when none is, the one with the least overlap (largest distance / radius
    sum) — so crowded images overlap slightly instead of failing.

    Returns:
        ``(len(radii), 2)`` float64 centres ``(x, y)`` in pixels.
    """
    centres = np.empty((len(radii), 2))
    for k, r in enumerate(radii):
        candidates = rng.uniform(r, size - r, size=(_PLACEMENT_CANDIDATES, 2))
        if k == 0:
            centres[k] = candidates[0]
            continue
        dist = np.linalg.norm(candidates[:, None, :] - centres[None, :k, :], axis=-1)  # (C, k)
        ratio = (dist / (r + radii[None, :k])).min(axis=1)
        free = ratio >= 1.0
        centres[k] = candidates[int(np.argmax(free)) if free.any() else int(np.argmax(ratio))]
    return centres


def _layout(rng: np.random.Generator, config: SyntheticConfig, label: int) -> list[_Part]:
    """Random parts of one image of class ``label``, in drawing order (distractors first)."""
    n_distractors = int(rng.integers(0, config.max_distractors + 1))
    distractors = rng.integers(0, len(DISTRACTOR_TYPES), size=n_distractors)
    class_parts = rng.permutation(np.asarray(CLASS_PARTS[label]))
    types = [PART_TYPES[p] for p in class_parts] + [DISTRACTOR_TYPES[d] for d in distractors]
    labels = [int(p) + 1 for p in class_parts] + [NUM_PARTS + 1 + int(d) for d in distractors]
    n = len(types)
    radii = rng.uniform(*_RADIUS_RANGE, size=n) * config.image_size
    angles = rng.uniform(0.0, 2.0 * np.pi, size=n)
    offsets = rng.normal(0.0, _COLOR_JITTER_STD, size=(n, 3))
    brightness = rng.uniform(*_BRIGHTNESS_RANGE, size=n)
    centres = _place(rng, config.image_size, radii)  # class parts are placed first: they get the free space
    parts = [_Part(types[k], labels[k], *centres[k], radii[k], angles[k], offsets[k], brightness[k]) for k in range(n)]
    return parts[2:] + parts[:2]  # draw distractors first, so they never hide class parts


# --------------------------------------------------------------------------- drawing


def _upsample_matrix(size: int, grid: int) -> np.ndarray:
    """``(size, grid)`` bilinear interpolation weights from ``grid`` points to ``size`` pixels."""
    t = (np.arange(size) + 0.5) / size * (grid - 1)
    lo = np.minimum(np.floor(t).astype(np.intp), grid - 2)
    frac = t - lo
    weights = np.zeros((size, grid))
    weights[np.arange(size), lo] = 1.0 - frac
    weights[np.arange(size), lo + 1] = frac
    return weights


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted, low-contrast background: random base colour, soft gradient and colour blotches.

    Returns:
        ``(size, size, 3)`` float32 in roughly [40, 200] (not clipped).
    """
    hue = rng.uniform()
    saturation = rng.uniform(*_BG_SATURATION)
    value = rng.uniform(*_BG_VALUE)
    base = np.asarray(colorsys.hsv_to_rgb(hue, saturation, value)) * 255.0
    direction = rng.uniform(0.0, 2.0 * np.pi)
    amplitude = rng.uniform(-_BG_GRADIENT, _BG_GRADIENT)
    blotches = rng.normal(0.0, _BG_BLOTCH_STD, size=(_BG_BLOTCH_GRID, _BG_BLOTCH_GRID, 3))
    coords = (np.arange(size) + 0.5) / size - 0.5
    gradient = amplitude * (np.cos(direction) * coords[None, :] + np.sin(direction) * coords[:, None])
    up = _upsample_matrix(size, _BG_BLOTCH_GRID)
    smooth = (up @ blotches.transpose(2, 0, 1) @ up.T).transpose(1, 2, 0)  # (size, size, 3)
    return (base + gradient[:, :, None] + smooth).astype(np.float32)


def _draw(image: np.ndarray, part_map: np.ndarray, part: _Part, jitter: bool) -> None:
    """Paint ``part`` into ``image`` (``(H, W, 3)`` float) and its label into ``part_map`` (``(H, W)`` int64)."""
    rows, cols = part_window(image.shape[0], part.cx, part.cy, part.radius)
    u, v = part_coordinates(rows, cols, part.cx, part.cy, part.radius, part.angle)
    mask = part.type.shape(u, v)
    palette = part.type.palette()
    if jitter:
        palette = np.clip(palette * part.brightness + part.offset, 0.0, 255.0)
    image[rows, cols][mask] = palette[part.type.texture(u, v)[mask]]
    part_map[rows, cols][mask] = part.label


def render_sample(
    config: SyntheticConfig, split: str, index: int, *, clean: bool = False
) -> tuple[np.ndarray, np.ndarray, int]:
    """Generate image ``index`` of ``split`` (deterministic in ``config.seed``, split and index).

    Args:
        config: generation settings.
        split: ``'train'``, ``'val'`` or ``'test'``.
        index: int in ``[0, config.split_size(split))``.
        clean: draw the same parts on a black background with their nominal colours and no
            noise — every pixel labelled ``l`` then has exactly one of ``l``'s palette colours
            (for checking the ground truth and for illustrations).

    Returns:
        ``(image, part_map, label)``: ``(H, W, 3)`` uint8 RGB; ``(H, W)`` int64 part map
        (0 = background, ``1..len(PART_TYPES)`` = part types, then distractor types); the
        class index ``index % NUM_CLASSES``.

    Raises:
        ValueError: unknown split or index out of range.
    """
    split = _check_split(split)
    index = _check_index(config, split, index)
    rng = np.random.default_rng([config.seed, _SPLIT_IDS[split], index])
    label = index % NUM_CLASSES
    size = config.image_size
    parts = _layout(rng, config, label)
    background = _background(rng, size)
    noise = rng.random(size=(size, size, 3), dtype=np.float32)  # drawn even when clean: same geometry
    image = np.zeros((size, size, 3), dtype=np.float32) if clean else background
    part_map = np.zeros((size, size), dtype=np.int64)
    for part in parts:
        _draw(image, part_map, part, jitter=not clean)
    if not clean:
        image += (noise - 0.5) * _PIXEL_NOISE_AMPLITUDE
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), part_map, label


def part_map_to_rgb(part_map: np.ndarray | Tensor) -> np.ndarray:
    """Colour a part map for display: each label gets its part's main colour, background black.

    Args:
        part_map: ``(..., H, W)`` integer labels in ``[0, len(PART_NAMES))``.

    Returns:
        ``(..., H, W, 3)`` uint8 RGB.

    Raises:
        ValueError: labels out of range.
    """
    labels = np.asarray(part_map.cpu() if isinstance(part_map, Tensor) else part_map)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"part_map must hold integer labels, got dtype {labels.dtype}")
    if labels.size and not 0 <= labels.min() <= labels.max() < len(PART_NAMES):
        raise ValueError(
            f"part_map labels must lie in [0, {len(PART_NAMES) - 1}], got labels in [{labels.min()}, {labels.max()}]"
        )
    colours = np.asarray([(0, 0, 0)] + [t.colors[0] for t in (*PART_TYPES, *DISTRACTOR_TYPES)], dtype=np.uint8)
    return colours[labels]


# --------------------------------------------------------------------------- dataset


class SyntheticParts(Dataset):
    """One split of the synthetic parts dataset.

    Items are ``(image, label)``: ``(3, H, W)`` float32 tensor in [0, 1] and int class
    index. Images are rendered on demand, or read from the in-memory cache once
    :meth:`tensors` has generated the whole split.

    Attributes:
        config: generation settings.
        split: ``'train'``, ``'val'`` or ``'test'``.
        class_names: names of the classes, e.g. ``"red disc + blue square"``.
        part_names: names of the part-map labels (``"background"`` first, distractors last).
    """

    def __init__(self, config: SyntheticConfig, split: str) -> None:
        if not isinstance(config, SyntheticConfig):
            raise ValueError(f"config must be a SyntheticConfig, got {type(config).__name__}")
        self.config = config
        self.split = _check_split(split)
        self.class_names: list[str] = list(CLASS_NAMES)
        self.part_names: list[str] = list(PART_NAMES)
        self._cache: tuple[Tensor, Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return self.config.split_size(self.split)

    def _index(self, i: object) -> int:
        n = len(self)
        if not _is_int(i) or not -n <= int(i) < n:  # type: ignore[call-overload]
            raise IndexError(f"index must be an int in [{-n}, {n - 1}] for this split of {n} images, got {i!r}")
        return int(i) % n  # type: ignore[call-overload]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        """Image ``i`` as a ``(3, H, W)`` float32 tensor in [0, 1] and its int label.

        Raises:
            IndexError: ``i`` out of range (negative indices count from the end).
        """
        i = self._index(i)
        if self._cache is not None:
            return self._cache[0][i].float() / 255.0, int(self._cache[1][i])
        image, _, label = render_sample(self.config, self.split, i)
        return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0, label

    def part_map(self, i: int) -> Tensor:
        """Ground-truth part map of image ``i``: ``(H, W)`` int64 (labels as in :data:`PART_NAMES`).

        Raises:
            IndexError: ``i`` out of range.
        """
        i = self._index(i)
        if self._cache is not None:
            return self._cache[2][i].long()
        return torch.from_numpy(render_sample(self.config, self.split, i)[1])

    def tensors(self, progress: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """The whole split, generated once and kept in memory on this object.

        Args:
            progress: show a tqdm progress bar while generating.

        Returns:
            ``(images, labels, part_maps)``: ``(N, 3, H, W)`` uint8 RGB, ``(N,)`` int64,
            ``(N, H, W)`` uint8 part-map labels. The cached tensors themselves (do not modify).
        """
        if self._cache is None:
            n, size = len(self), self.config.image_size
            images = np.empty((n, size, size, 3), dtype=np.uint8)
            maps = np.empty((n, size, size), dtype=np.uint8)
            labels = np.empty(n, dtype=np.int64)
            indices: range = range(n)
            if progress:
                from tqdm.auto import tqdm

                indices = tqdm(indices, desc=f"rendering {self.split}", unit="img")  # type: ignore[assignment]
            for i in indices:
                images[i], maps[i], labels[i] = render_sample(self.config, self.split, i)
            self._cache = (
                torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                torch.from_numpy(labels),
                torch.from_numpy(maps),
            )
        return self._cache
