"""Drawing primitives of the synthetic parts dataset: shapes, textures and the part vocabulary.

Every part is drawn in its own *normalised* coordinate frame ``(u, v)``: the pixel grid
shifted to the part's centre, rotated by the part's angle and divided by its radius, so
the part's extent is (roughly) the unit disc. A *shape* maps ``(u, v)`` to a boolean
coverage mask and a *texture* maps it to an index into the part's colours, so a part is
fully described by (shape, texture, colours) and drawing is a handful of vectorised
numpy operations on ``(H, W)`` arrays.

Conventions: ``u`` and ``v`` are ``(H, W)`` float arrays (or broadcastable to that);
masks are ``(H, W)`` bool; colour indices are ``(H, W)`` int; colours are RGB triples of
ints in [0, 255].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DISTRACTOR_TYPES",
    "EXTENT",
    "PART_TYPES",
    "PartType",
    "part_coordinates",
    "part_window",
]

RGB = tuple[int, int, int]
ShapeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
TextureFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

_SQUARE_HALF = 0.78  # half side of squares, so their corners (at 1.10) barely leave the unit disc
_RING_INNER = 0.55  # inner radius of rings
_ARM_HALF = 0.3  # half width of cross arms
_BAR_HALF = 0.36  # half width of bars
_STRIPE_WIDTH = 0.39  # width of one stripe: 4 stripes across a square
_DOT_PERIOD = 0.8  # spacing of the dots of dotted parts
_DOT_RADIUS = 0.25
_CHECKER_CELL = 2.0 / 3.0  # 3 × 3 cells on a diamond

EXTENT = 1.2
"""Every shape lies within this radius (in part radii) of its centre (the squiggle's ends reach 1.17)."""


# --------------------------------------------------------------------------- coordinates


def part_window(size: int, cx: float, cy: float, radius: float) -> tuple[slice, slice]:
    """Rows and columns of a ``size × size`` image that a part can cover.

    Every shape lies within ``u² + v² ≤ EXTENT²``, so only the pixels whose centres are in
    the square of half side ``EXTENT * radius`` around the centre need evaluating.

    Returns:
        ``(rows, cols)`` slices, clipped to the image (possibly empty).
    """
    reach = EXTENT * radius
    rows = slice(max(0, int(np.floor(cy - reach))), min(size, int(np.ceil(cy + reach)) + 1))
    cols = slice(max(0, int(np.floor(cx - reach))), min(size, int(np.ceil(cx + reach)) + 1))
    return rows, cols


def part_coordinates(
    rows: slice, cols: slice, cx: float, cy: float, radius: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised, rotated coordinates of the pixel centres of an image window.

    Args:
        rows, cols: the window (slices with explicit start and stop, e.g. from :func:`part_window`).
        cx, cy: part centre in pixels (x = column, y = row; pixel ``j`` has centre ``j + 0.5``).
        radius: part radius in pixels (> 0).
        angle: rotation in radians.

    Returns:
        ``(u, v)``, each ``(len(rows), len(cols))`` float64: the pixel centres in the part's
        frame, in units of ``radius`` (the part covers roughly ``u² + v² ≤ 1``).
    """
    dx = (np.arange(cols.start, cols.stop) + (0.5 - cx)) / radius
    dy = (np.arange(rows.start, rows.stop) + (0.5 - cy)) / radius
    c, s = np.cos(angle), np.sin(angle)
    return c * dx[None, :] + s * dy[:, None], c * dy[:, None] - s * dx[None, :]


# --------------------------------------------------------------------------- shapes


def disc(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The unit disc."""
    return u * u + v * v <= 1.0


def square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """An axis-aligned (in the part frame) square of half side ``_SQUARE_HALF``."""
    return np.maximum(np.abs(u), np.abs(v)) <= _SQUARE_HALF


def triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """An equilateral triangle with vertices at radius 1.1, pointing to ``-v``."""
    half_height = 0.55  # inradius = vertex radius / 2
    k = np.sqrt(3.0) / 2.0
    return (v <= half_height) & (k * u - 0.5 * v <= half_height) & (-k * u - 0.5 * v <= half_height)


def ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """An annulus between radii ``_RING_INNER`` and 1."""
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= _RING_INNER**2)


def cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A plus sign with arms of half width ``_ARM_HALF`` reaching radius 0.95."""
    au, av = np.abs(u), np.abs(v)
    return ((au <= _ARM_HALF) & (av <= 0.95)) | ((av <= _ARM_HALF) & (au <= 0.95))


def bar(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A long rectangle: full length along ``u``, half width ``_BAR_HALF`` along ``v``."""
    return (np.abs(u) <= 1.0) & (np.abs(v) <= _BAR_HALF)


def crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The unit disc minus a disc of radius 0.75 shifted by 0.45 along ``u``."""
    return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.75**2)


def diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A square standing on a corner: ``|u| + |v| ≤ 1``."""
    return np.abs(u) + np.abs(v) <= 1.0


def star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A five-pointed star: tips at radius 1, valleys at radius 0.42."""
    theta = np.arctan2(v, u)
    boundary = 0.42 + 0.58 * ((1.0 + np.cos(5.0 * theta)) / 2.0) ** 2
    return u * u + v * v <= boundary**2


def blob(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """An irregular, lumpy blob (fixed shape; random rotation gives variety)."""
    theta = np.arctan2(v, u)
    boundary = 0.78 + 0.14 * np.sin(2.0 * theta) + 0.08 * np.cos(3.0 * theta + 1.0)
    return u * u + v * v <= boundary**2


def squiggle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A thick sine-wave line along ``u``."""
    return (np.abs(u) <= 1.0) & (np.abs(v - 0.4 * np.sin(1.5 * np.pi * u)) <= 0.2)


# --------------------------------------------------------------------------- textures


def solid(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """One colour: index 0 everywhere."""
    return np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=np.intp)


def stripes(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Stripes across ``u`` of width ``_STRIPE_WIDTH``, alternating colours 0 and 1."""
    return (np.floor(u / _STRIPE_WIDTH).astype(np.intp) & 1) + np.zeros_like(v, dtype=np.intp)


def dots(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Colour 1 dots on a square lattice (one dot at the centre), colour 0 elsewhere."""
    du = (u + _DOT_PERIOD / 2) % _DOT_PERIOD - _DOT_PERIOD / 2
    dv = (v + _DOT_PERIOD / 2) % _DOT_PERIOD - _DOT_PERIOD / 2
    return (du * du + dv * dv <= _DOT_RADIUS**2).astype(np.intp)


def checker(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A checkerboard aligned with the edges of :func:`diamond`, 3 × 3 cells on it."""
    a = np.floor((u + v + 1.0) / _CHECKER_CELL).astype(np.intp)
    b = np.floor((u - v + 1.0) / _CHECKER_CELL).astype(np.intp)
    return (a + b) & 1


# --------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class PartType:
    """One kind of part: a shape filled with a texture of one or two colours.

    Attributes:
        name: human-readable, e.g. ``"red disc"``.
        shape: ``(u, v) → (H, W) bool`` coverage in the part frame.
        texture: ``(u, v) → (H, W) int`` index into ``colors``.
        colors: nominal RGB colours (ints in [0, 255]); index 0 is the main colour.
    """

    name: str
    shape: ShapeFn
    texture: TextureFn
    colors: tuple[RGB, ...]

    def __post_init__(self) -> None:
        if not self.colors or any(len(c) != 3 or not all(0 <= x <= 255 for x in c) for c in self.colors):
            raise ValueError(f"colors of part {self.name!r} must be RGB triples in [0, 255], got {self.colors!r}")

    def palette(self) -> np.ndarray:
        """The nominal colours as a ``(len(colors), 3)`` float64 array in [0, 255]."""
        return np.asarray(self.colors, dtype=np.float64)


PART_TYPES: tuple[PartType, ...] = (
    PartType("red disc", disc, solid, ((215, 25, 30),)),
    PartType("blue square", square, solid, ((25, 70, 225),)),
    PartType("green triangle", triangle, solid, ((25, 170, 45),)),
    PartType("yellow ring", ring, solid, ((245, 215, 20),)),
    PartType("magenta-white striped square", square, stripes, ((215, 25, 200), (250, 250, 250))),
    PartType("cyan dotted disc", disc, dots, ((20, 215, 235), (15, 25, 95))),
    PartType("orange cross", cross, solid, ((250, 125, 10),)),
    PartType("purple bar", bar, solid, ((120, 35, 190),)),
    PartType("pink crescent", crescent, solid, ((255, 135, 190),)),
    PartType("white-navy checkered diamond", diamond, checker, ((245, 245, 245), (25, 35, 125))),
)
"""The parts classes are made of; part type ``p`` has label ``p + 1`` in part maps."""

DISTRACTOR_TYPES: tuple[PartType, ...] = (
    PartType("grey star", star, solid, ((200, 200, 200),)),
    PartType("brown blob", blob, solid, ((125, 75, 35),)),
    PartType("olive squiggle", squiggle, solid, ((125, 135, 30),)),
)
"""Parts that never decide the class; distractor ``d`` has label ``len(PART_TYPES) + 1 + d``."""
