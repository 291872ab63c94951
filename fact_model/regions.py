"""Region queries: what the model used in a part of the image (issue 17).

A concept layer sees the image as an ``h × w`` grid of positions (CNN feature-map positions,
ViT tokens); :attr:`Explanation.slots <fact_model.explanation.Explanation.slots>` holds every code
slot's exact contribution ``u_{p,j} · ∂y/∂u_{p,j}`` to the explained quantity ``y``, per position.
This module maps input pixels onto that grid, so that "the contribution of this region" is a
weighted sum of positions whose weights come from pixel geometry alone.

**The grid ↔ pixel mapping.** The grid partitions the ``H × W`` input into ``h × w`` cells with
fractional edges: row ``i`` covers ``[i·H/h, (i+1)·H/h)`` and column ``j`` covers
``[j·W/w, (j+1)·W/w)``, in continuous pixel coordinates (pixel ``(r, c)`` is the unit square
``[r, r+1) × [c, c+1)``; x right, y down, origin top-left). This is the ``align_corners=False``
convention of ``torch.nn.functional.interpolate``. A region's weight on position ``(i, j)`` is the
fraction of that cell's area the region covers (for a soft mask, the mask's mean over the cell),
exact for sizes that do not divide: 48 px on a 7 × 7 grid gives cells 48/7 ≈ 6.86 px wide and a
pixel straddling an edge is split between its two cells by area.

Per axis that is one ``(cells, pixels)`` overlap matrix ``A``, ``A[i, r] = |[r, r+1) ∩ cell i| /
|cell i|`` (:func:`overlap_matrix`); every row sums to one (a cell is tiled by the pixels it
overlaps). Then

    cell_weights(m) = A_h · m · A_wᵀ        (H, W) → (h, w): fraction of each cell covered
    spread_to_pixels(v) = A_hᵀ · v · A_w    (h, w) → (H, W): each cell's value over its pixels

are transposes of each other, ``⟨cell_weights(m), v⟩ = ⟨m, spread_to_pixels(v)⟩``, and because
the rows of ``A`` sum to one ``spread_to_pixels`` preserves sums and the all-ones mask gets weight
1 in every cell. Both maps are linear, so the masks of a partition of the image (they sum to one
at every pixel: left/right halves, a box and its complement) get weights that sum to one in
every cell, and their region contributions add up to the full decomposition
(``Explanation.contributions``) exactly; the whole image's region total is ``y``.

**Why not nearest upsampling** (what the service's ``spatial`` heatmaps did:
``F.interpolate(mode="nearest")`` assigns pixel ``r`` wholly to cell ``⌊r·h/H⌋``). When the sizes
divide it is the same partition. When they do not, each pixel straddling a cell edge goes wholly
to one cell, so the cells get unequal pixel counts (48 px on 7 cells: 7 or 6 px) and edges move
by up to a pixel; a 0/1 region's weight on a cell is then a multiple of 1 / (that cell's pixel
count), not its covered area; and the upsampled map *copies* each cell's value to every pixel, so it sums
to ``Σ value × pixel count`` (equal contributions drawn with unequal mass), not to the
contribution. ``spread_to_pixels`` divides each value over the cell's area instead.

**What the cells are, checked against the backbones.** The cells are where positions sit on the
input, not their receptive fields, and their centres are the receptive-field centres only up to a
shift. Every stride in our backbones comes from an odd ``k × k`` conv or pool with padding
``(k−1)/2`` (ResNet stems and blocks, the ViT-c conv stem, DenseNet's stem), so position ``i`` of a
stage with total stride ``S`` is centred on pixel index ``S·i``, i.e. at ``S·i + ½`` in the
coordinates above, while cell ``i`` is centred at ``S·(i + ½)`` (for ``H = S·h``): ``(S−1)/2`` px up
and left, less than half a cell. Measured (support of ``∂f_i/∂x`` at interior positions) on
``bcos_resnet8``: ``conv1``/``layer1`` (``S = 1``) centred, ``layer2`` ½ px, ``layer3`` 1½ px off;
the ``bcos_vitc`` stem (``S = 8``; the tokens are its 1×1 "patches", so a token's "patch" is a
conv-stem footprint, not a pixel block) 3½ px off. By the same rule an ImageNet ResNet's ``layer4``
(``S = 32``) is 15½ px off; DenseNet's 2 × 2 average-pool transitions add no shift, so its deep
stages stay at the stem's 1½ px. Where ``S·h ≠ H`` (30 px → 8 positions at ``S = 4``) the cells are
``H/h`` wide while positions step by ``S``. Receptive fields are also much wider than a cell
(``layer3``: 25 px for 3.75–4 px cells) and for the ViT global (attention, and the stem's group
norm). So the cells are a convention for *where* a position's contribution is shown, the same for
every backbone and what a heatmap of the grid draws; the exactness of region totals (they partition
``y``) does not depend on it.

Shapes: ``N`` images, ``K`` concepts of the layer, ``P = h·w`` positions, ``k`` code slots per
position, ``(H, W)`` the model's input size in pixels (the size the images had when explained).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fact_model.explanation import Explanation, SlotContributions

__all__ = [
    "RegionContributions",
    "box_cell_weights",
    "box_mask",
    "cell_weights",
    "concept_region_map",
    "mask_from_array",
    "overlap_matrix",
    "region_contributions",
    "spread_to_pixels",
]


def _check_size(size: Sequence[int], what: str) -> tuple[int, int]:
    """``(H, W)`` or ``(h, w)`` as two positive Python ints, or a ValueError naming ``what``."""
    values = tuple(size) if isinstance(size, Sequence) else (size,)
    if len(values) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{what} must be two positive ints (rows, columns), got {size!r}")
    rows, cols = int(values[0]), int(values[1])
    if rows < 1 or cols < 1:
        raise ValueError(f"{what} must be two positive ints (rows, columns), got {size!r}")
    return rows, cols


def overlap_matrix(
    cells: int, pixels: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Tensor:
    """One axis of the grid ↔ pixel mapping: ``(cells, pixels)``, row ``i`` = pixel shares of cell ``i``.

    ``A[i, r] = |[r, r+1) ∩ [i·pixels/cells, (i+1)·pixels/cells)| / (pixels/cells)``: the fraction of
    cell ``i``'s extent that pixel ``r`` covers. Rows sum to one; columns to ``cells/pixels``.
    Computed in integers (``cells·overlap`` is an integer) and divided once, so every entry is the
    correctly rounded rational.
    """
    cells, pixels = _check_size((cells, pixels), "(cells, pixels)")
    i = torch.arange(cells, dtype=torch.int64)[:, None]
    r = torch.arange(pixels, dtype=torch.int64)[None, :]
    # Scaled by `cells`: pixel r spans [cells·r, cells·(r+1)), cell i spans [pixels·i, pixels·(i+1)).
    overlap = (torch.minimum(cells * (r + 1), pixels * (i + 1)) - torch.maximum(cells * r, pixels * i)).clamp_min(0)
    return (overlap.to(torch.float64) / pixels).to(dtype=dtype, device=device)


def cell_weights(mask: Tensor, grid: Sequence[int]) -> Tensor:
    """The fraction of every grid cell a mask covers: ``A_h · mask · A_wᵀ``.

    Args:
        mask: ``(H, W)`` or ``(N, H, W)`` floating-point coverage in [0, 1] per input pixel
            (:func:`box_mask`, :func:`mask_from_array`).
        grid: ``(h, w)`` the concept layer's grid.

    Returns:
        ``(h, w)`` or ``(N, h, w)`` weights in [0, 1] (the mask's mean over each cell), in the
        mask's dtype and on its device. The all-ones mask gives all ones; masks that sum to one at
        every pixel give weights that sum to one in every cell.
    """
    h, w = _check_size(grid, "grid")
    if not (isinstance(mask, Tensor) and mask.is_floating_point() and mask.ndim in (2, 3)):
        raise ValueError(
            f"mask must be a floating-point (H, W) or (N, H, W) tensor (see mask_from_array), got "
            f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))} {getattr(mask, 'dtype', '')}"
        )
    size_h, size_w = mask.shape[-2:]
    a_h = overlap_matrix(h, size_h, device=mask.device)
    a_w = overlap_matrix(w, size_w, device=mask.device)
    return (a_h @ mask.to(torch.float64) @ a_w.t()).to(mask.dtype)


def spread_to_pixels(values: Tensor, size: Sequence[int]) -> Tensor:
    """Distribute every cell's value over its pixels in proportion to overlap: ``A_hᵀ · values · A_w``.

    The transpose of :func:`cell_weights`: a pixel gets ``value × (its area in the cell) / (cell
    area)`` from every cell it overlaps, so the pixels of a cell sum to the cell's value and the
    whole map to ``Σ values`` (a contribution map stays a contribution map, in units of ``y``).

    Args:
        values: ``(..., h, w)`` floating point, per grid position.
        size: ``(H, W)`` output pixels (any size: the input size, or a heatmap's).

    Returns:
        ``(..., H, W)`` in the values' dtype and on their device.
    """
    size_h, size_w = _check_size(size, "size")
    if not (isinstance(values, Tensor) and values.is_floating_point() and values.ndim >= 2):
        raise ValueError(
            f"values must be a floating-point (..., h, w) tensor, got {type(values).__name__} "
            f"{tuple(getattr(values, 'shape', ()))}"
        )
    h, w = values.shape[-2:]
    a_h = overlap_matrix(h, size_h, device=values.device)
    a_w = overlap_matrix(w, size_w, device=values.device)
    return (a_h.t() @ values.to(torch.float64) @ a_w).to(values.dtype)


def _check_box(box: Sequence[float], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` as floats, or a ValueError naming the values and the valid range."""
    size_h, size_w = size
    values = tuple(box) if isinstance(box, Sequence) else None
    if (
        values is None
        or len(values) != 4
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)
    ):
        raise ValueError(f"box must be four numbers (x0, y0, x1, y1) in input pixels, got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in values)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box (x0, y0, x1, y1) = {box!r} must be finite")
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box (x0, y0, x1, y1) = {box!r} is empty: it needs x0 < x1 and y0 < y1")
    if x1 <= 0 or y1 <= 0 or x0 >= size_w or y0 >= size_h:
        raise ValueError(
            f"box (x0, y0, x1, y1) = {box!r} lies entirely outside the {size_h}×{size_w} input: it must "
            f"overlap x ∈ [0, {size_w}) and y ∈ [0, {size_h}) (input pixels of the model's input)"
        )
    return x0, y0, x1, y1


def _interval_cover(start: float, stop: float, parts: int, length: int) -> Tensor:
    """``(parts,)`` float64: the fraction of each ``1/parts`` piece of ``[0, length)`` that ``[start, stop)`` covers."""
    # In units of pieces the edges are the integers i, i+1: a fully covered piece gets exactly 1.
    i = torch.arange(parts, dtype=torch.float64)
    lo, hi = start * parts / length, stop * parts / length
    return (torch.clamp(i + 1, max=hi) - torch.clamp(i, min=lo)).clamp(0, 1)


def box_mask(
    box: Sequence[float],
    size: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """A box as a pixel-coverage mask of the model's input.

    Args:
        box: ``(x0, y0, x1, y1)`` in input pixels of the model's input (after preprocessing:
            resize and centre crop), half-open ``[x0, x1) × [y0, y1)``, x to the right, y down,
            origin at the top-left corner of the image; floats allowed. A box partly outside the
            image is clipped to it.
        size: ``(H, W)`` the model's input size.
        dtype, device: of the mask.

    Returns:
        ``(H, W)`` coverage in [0, 1]: 1 inside, the covered fraction of each pixel a fractional
        edge cuts (``(1, 1, 2.5, 3)`` covers half of column 2 of rows 1–2), 0 outside. A mask holds
        one number per pixel, so where a cell edge falls inside a pixel that the box covers in
        part, :func:`cell_weights` shares the pixel's coverage between both cells by area; the
        box itself (:func:`box_cell_weights`, ``region_contributions(expl, layer, box)``) keeps
        sub-pixel edges exact.

    Raises:
        ValueError: not four finite numbers, ``x1 ≤ x0`` or ``y1 ≤ y0``, or a box lying entirely
            outside the image ``[0, W) × [0, H)``.
    """
    size_h, size_w = _check_size(size, "size")
    x0, y0, x1, y1 = _check_box(box, (size_h, size_w))
    rows = _interval_cover(y0, y1, size_h, size_h)
    cols = _interval_cover(x0, x1, size_w, size_w)
    return (rows[:, None] * cols[None, :]).to(dtype=dtype, device=device)


def box_cell_weights(
    box: Sequence[float],
    grid: Sequence[int],
    size: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The fraction of every grid cell a box covers, from the box's edges (no pixel rounding).

    Equals ``cell_weights(box_mask(box, size), grid)`` when the box's edges lie on pixel edges
    (or cell edges on pixel edges); otherwise it is the exact area of box ∩ cell, which the
    pixel mask can only approximate (both give the same total area).

    Args:
        box: ``(x0, y0, x1, y1)`` as for :func:`box_mask` (clipped to the image, same refusals).
        grid: ``(h, w)``. size: ``(H, W)`` the model's input size.

    Returns:
        ``(h, w)`` weights in [0, 1].
    """
    h, w = _check_size(grid, "grid")
    size_h, size_w = _check_size(size, "size")
    x0, y0, x1, y1 = _check_box(box, (size_h, size_w))
    rows = _interval_cover(y0, y1, h, size_h)
    cols = _interval_cover(x0, x1, w, size_w)
    return (rows[:, None] * cols[None, :]).to(dtype=dtype, device=device)


def mask_from_array(mask: Tensor | np.ndarray, size: Sequence[int]) -> Tensor:
    """A user's region mask as float coverage of the model's input pixels.

    Args:
        mask: ``(H, W)`` (or ``(N, H, W)``, one per image) at the model's input size: bool,
            floating point in [0, 1], integers 0/1, or uint8 0–255 (a greyscale image: divided
            by 255 unless all values are 0 or 1); a numpy array or a tensor.
        size: ``(H, W)`` the model's input size; a mask of another size is refused, not resized
            (resize it the way the image was preprocessed, then pass it).

    Returns:
        ``(H, W)`` or ``(N, H, W)`` float32 (float64 stays float64) on the mask's device.

    Raises:
        ValueError: another size or rank, values outside [0, 1] (or 0–255 for uint8), NaN/inf,
            or a mask (of any image) that is zero everywhere.
    """
    size_h, size_w = _check_size(size, "size")
    if isinstance(mask, np.ndarray):
        if mask.dtype == object or not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.number)):
            raise ValueError(f"mask must be a numeric or bool array, got dtype {mask.dtype}")
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a numpy array or a torch tensor, got {type(mask).__name__}")
    if mask.ndim not in (2, 3) or tuple(mask.shape[-2:]) != (size_h, size_w):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but must be (H, W) = ({size_h}, {size_w}) or (N, {size_h}, "
            f"{size_w}), the model's input size: resize it as the image was preprocessed first"
        )
    if mask.dtype == torch.bool:
        out = mask.to(torch.float32)
    elif mask.is_floating_point():
        out = mask if mask.dtype == torch.float64 else mask.to(torch.float32)
        if not torch.isfinite(out).all():
            raise ValueError("mask contains NaN or infinite values")
        low, high = out.min().item(), out.max().item()
        if low < 0 or high > 1:
            raise ValueError(f"mask values must lie in [0, 1], got [{low:g}, {high:g}]")
    elif mask.dtype.is_complex:
        raise ValueError(f"mask must be real, got dtype {mask.dtype}")
    else:
        low, high = int(mask.min()), int(mask.max())
        if mask.dtype == torch.uint8 and high > 1:
            out = mask.to(torch.float32) / 255
        elif low < 0 or high > 1:
            raise ValueError(f"integer mask values must be 0/1 (uint8: 0–255), got [{low}, {high}] ({mask.dtype})")
        else:
            out = mask.to(torch.float32)
    empty = (out.flatten(-2).amax(dim=-1) == 0).flatten().nonzero().flatten().tolist()
    if empty:
        which = "the mask" if out.ndim == 2 else f"the mask of image(s) {empty}"
        raise ValueError(f"{which} is zero everywhere: a region must cover part of the image")
    return out


def _slots(expl: Explanation, layer: str) -> SlotContributions:
    if layer not in expl.slots:
        raise ValueError(f"no concept layer {layer!r} in this explanation; its layers: {list(expl.slots)}")
    return expl.slots[layer]


def _grid(slots: SlotContributions, layer: str) -> tuple[int, int]:
    """``(h, w)`` of a layer's positions; a ViT's ``(T,)`` tokens as their square patch grid (row-major)."""
    shape = tuple(slots.spatial_shape)
    if len(shape) == 2:
        return shape[0], shape[1]
    (tokens,) = shape
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(
            f"layer {layer!r} has {tokens} tokens, not a square grid: region queries need the tokens' "
            f"(h, w) patch grid, which a non-square token count does not determine"
        )
    return side, side


def _input_size(expl: Explanation) -> tuple[int, int] | None:
    return None if expl.maps is None else tuple(expl.maps.inputs.shape[-2:])


@dataclass(frozen=True)
class RegionContributions:
    """What one region of the input contributed to the explained quantity, per concept.

    Attributes:
        layer: the concept layer.
        contributions: ``(N, K)`` each concept's contribution inside the region,
            ``Σ_{p,j} w_p · u_{p,j} ∂y/∂u_{p,j}`` over the slots holding it (units of ``y``,
            i.e. of ``logit − b`` or the contrast difference).
        total: ``(N,)`` the region's total, ``Σ_k contributions``.
        share: ``(N,)`` ``total / Explanation.explained``; NaN where ``explained`` is 0 (a share
            of nothing is undefined; ``total`` stays meaningful). Regions of opposite sign can
            make a share negative or above 1.
        weights: ``(N, h, w)`` the region's weight on every position (:func:`cell_weights`).
        coverage: ``(N,)`` the fraction of the image's area the mask covers.
    """

    layer: str
    contributions: Tensor
    total: Tensor
    share: Tensor
    weights: Tensor
    coverage: Tensor


def region_contributions(
    expl: Explanation,
    layer: str,
    region: Tensor | np.ndarray | Sequence[float],
    *,
    size: Sequence[int] | None = None,
) -> RegionContributions:
    """Every concept's contribution inside a region of the input, exactly.

    Each position's slot contributions (``Explanation.slots``) are weighted by the fraction of
    the position's cell the region covers, so complementary regions add up to the full
    decomposition and the whole image gives ``Explanation.contributions``.

    Args:
        expl: an explanation (:func:`fact_model.explain.explain`).
        layer: one of its concept layers.
        region: a mask at the model's input size, ``(H, W)`` (every image) or ``(N, H, W)`` (one
            per image): :func:`box_mask`'s, or any array :func:`mask_from_array` accepts; or a box
            ``(x0, y0, x1, y1)`` in input pixels (:func:`box_cell_weights`: sub-pixel edges exact).
        size: ``(H, W)`` the model's input size (the size the images were explained at). Default:
            ``expl.maps.inputs``' size when the explanation has maps, else the mask's own size; a
            box without maps needs it.

    Raises:
        ValueError: an unknown layer, a mask :func:`mask_from_array` refuses (the wrong size
            included) or a box :func:`box_mask` refuses, a per-image mask for another number of
            images, a ``size`` unlike the maps', or a ViT token count that is not a square grid.
    """
    slots = _slots(expl, layer)
    grid = _grid(slots, layer)
    n, device, dtype = slots.values.shape[0], slots.values.device, slots.values.dtype
    input_size = _input_size(expl)
    if size is not None:
        size = _check_size(size, "size")
        if input_size is not None and size != input_size:
            raise ValueError(f"size {size} differs from the explanation's input size {input_size} (expl.maps.inputs)")
    size = size or input_size
    if isinstance(region, Tensor | np.ndarray):
        region = mask_from_array(region, size or tuple(region.shape[-2:]))
        if region.ndim == 3 and region.shape[0] != n:
            raise ValueError(
                f"a per-image mask needs one (H, W) mask per image: got {region.shape[0]} for {n} image(s)"
            )
        region = region.to(device=device, dtype=dtype).expand(n, *region.shape[-2:])
        weights = cell_weights(region, grid)  # (N, h, w)
        coverage = region.mean(dim=(-2, -1))
    elif isinstance(region, Sequence) and not isinstance(region, str):
        if size is None:
            raise ValueError("a box needs size=(H, W), the model's input size: this explanation has no input maps")
        single = box_cell_weights(region, grid, size, dtype=torch.float64)
        x0, y0, x1, y1 = _check_box(region, size)
        area = (min(x1, size[1]) - max(x0, 0.0)) * (min(y1, size[0]) - max(y0, 0.0))
        weights = single.to(device=device, dtype=dtype).expand(n, *grid)
        coverage = torch.full((n,), area / (size[0] * size[1]), device=device, dtype=dtype)
    else:
        raise ValueError(
            f"region must be an (H, W) / (N, H, W) mask (numpy array or tensor) or a box (x0, y0, x1, y1), "
            f"got {type(region).__name__}"
        )
    per_slot = weights.flatten(1)[:, :, None] * slots.values  # (N, P, k)
    num_concepts = expl.contributions[layer].shape[1]
    contributions = per_slot.new_zeros(n, num_concepts).scatter_add_(
        1, slots.concept_ids.flatten(1), per_slot.flatten(1)
    )
    total = per_slot.flatten(1).sum(dim=1)
    explained = expl.explained.to(total.dtype)
    nonzero = explained != 0
    share = torch.where(nonzero, total / torch.where(nonzero, explained, 1), torch.nan)
    return RegionContributions(layer, contributions, total, share, weights, coverage)


def concept_region_map(
    expl: Explanation, layer: str, concept_id: int, n: int, size: Sequence[int] | None = None
) -> Tensor:
    """Where one concept contributed in image ``n``, on the input's pixels.

    Its per-position contribution ``Σ_j u_{p,j} ∂y/∂u_{p,j}`` over the slots holding it (any
    concept, not only the top ones) spread to pixels by :func:`spread_to_pixels`: the map sums to
    the concept's contribution ``Explanation.contributions[layer][n, concept_id]`` (units of ``y``
    per pixel), and a region's sum of it is that concept's :func:`region_contributions` entry.

    Args:
        expl: an explanation. layer: one of its concept layers.
        concept_id: in ``[0, K)``. n: the image, in ``[0, N)``.
        size: ``(H, W)`` output pixels; default the input size of ``expl.maps`` (required when the
            explanation has no maps).

    Returns:
        ``(H, W)`` in the explanation's dtype and on its device.
    """
    slots = _slots(expl, layer)
    grid = _grid(slots, layer)
    num_images, num_concepts = expl.contributions[layer].shape
    for name, value, bound in (("concept_id", concept_id, num_concepts), ("n", n, num_images)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < bound:
            raise ValueError(f"{name} must be an int in [0, {bound}), got {value!r}")
    if size is None:
        size = _input_size(expl)
        if size is None:
            raise ValueError("size (H, W) is required: this explanation has no input maps to take the input size from")
    held = slots.concept_ids[n] == concept_id  # (P, k)
    per_position = (slots.values[n] * held).sum(dim=-1).view(grid)  # (h, w)
    return spread_to_pixels(per_position, size)
