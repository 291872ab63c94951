"""Rendering of explanation maps as RGBA images.

Maps come from :class:`fact_model.explanation.ExplanationMaps`: a weight map
``W = ∂y/∂x`` on the 6-channel encoded input ``x = [r, g, b, 1-r, 1-g, 1-b]``,
whose per-pixel contribution is ``Σ_channels x ⊙ W``.

* :func:`bcos_colour` — the B-cos colour visualisation: each pixel is coloured
  by the input colour its weights align with, and made opaque where it
  contributes positively and strongly.
* :func:`signed_heatmap` — a diverging red (positive) / blue (negative) map of
  any per-pixel scalar map, optionally blended over the image.
* :func:`signed_heatmaps` — the same for a batch of maps over one image, in one call.
* :func:`overlay` — alpha-composite an RGBA map over an RGB image.
* :func:`to_uint8` / :func:`to_png` — conversion for display and storage.
* :func:`resize_rgba` / :func:`sum_pool` — a batch of rendered maps (or of per-pixel
  values) at another resolution: area means of premultiplied colour, exact block sums.
* :func:`encode_rgba` — a batch of rendered maps as compact image files: lossless PNG
  (colour of fully transparent pixels cleared), palette PNG (``png8``) or lossy WebP.

Conventions: rendered images are float tensors with values in [0, 1], channels
last (``(..., H, W, 4)``, RGBA), on the device of the input; images to draw
over are ``(3, H, W)`` float tensors in [0, 1] (channels first, as the model
takes them). Sizes are ``(height, width)``.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = [
    "ENCODINGS",
    "MEDIA_TYPES",
    "bcos_colour",
    "encode_pixels",
    "encode_rgba",
    "overlay",
    "quantise",
    "resize_rgba",
    "signed_heatmap",
    "signed_heatmaps",
    "sum_pool",
    "to_png",
    "to_uint8",
]

ENCODINGS = ("png", "png8", "webp")
"""Image encodings of :func:`encode_rgba`."""
MEDIA_TYPES = {"png": "image/png", "png8": "image/png", "webp": "image/webp"}
"""The media type of each encoding's files."""
WEBP_QUALITY = 80
"""Default lossy WebP quality (0–100): about 4–10 kB per 224² map, mean error ≈ 1 % (docs/LOAD.md)."""

_ENCODED_CHANNELS = 6
_RANGE_SLACK = 1e-4  # float rounding may overshoot [0, 1] slightly


# --------------------------------------------------------------------------- checks


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_tensor(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_floating(t: Tensor, name: str) -> None:
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_unit_range(t: Tensor, name: str) -> None:
    if t.numel() == 0:
        return
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(t.min()), float(t.max())
    if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
        raise ValueError(f"{name} values must lie in [0, 1], got min {lo:.4g} and max {hi:.4g}")


def _check_percentile(q: float, name: str) -> None:
    if not 0 <= q <= 100:
        raise ValueError(f"{name} must lie in [0, 100], got {q!r}")


def _check_rgba(rgba: object, name: str = "rgba") -> Tensor:
    rgba = _check_tensor(rgba, name)
    if rgba.ndim < 3 or rgba.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (..., H, W, 4), got {_shape(rgba)}")
    _check_floating(rgba, name)
    return rgba


def _check_image(image: object, hw: tuple[int, int], name: str = "image") -> Tensor:
    image = _check_tensor(image, name)
    if image.ndim != 3 or image.shape[0] != 3 or tuple(image.shape[1:]) != hw:
        raise ValueError(f"{name} must have shape (3, {hw[0]}, {hw[1]}), got {_shape(image)}")
    _check_floating(image, name)
    _check_unit_range(image, name)
    return image


# --------------------------------------------------------------------------- helpers


def _percentile(values: Tensor, q: float) -> Tensor:
    """Per-row ``q``-th percentile with linear interpolation (as ``numpy.percentile``).

    Only the two order statistics around the position are needed, so the rows are not
    sorted: ``topk`` of the shorter tail (a 99.5th percentile of 50,176 pixels selects
    252 values per row, ~5× faster than a full sort).

    Args:
        values: ``(N, M)`` float tensor, ``M ≥ 1``.
        q: percentile in [0, 100].

    Returns:
        ``(N,)`` tensor of ``values``' dtype.
    """
    m = values.shape[1]
    position = q / 100 * (m - 1)
    lo, hi = int(np.floor(position)), int(np.ceil(position))
    frac = position - lo
    if m - lo <= hi + 1:  # upper tail: the m - lo largest, descending; rank r is at m - 1 - r
        tail = values.topk(m - lo, dim=1, largest=True, sorted=True).values
        low, high = tail[:, m - 1 - lo], tail[:, m - 1 - hi]
    else:  # lower tail: the hi + 1 smallest, ascending
        tail = values.topk(hi + 1, dim=1, largest=False, sorted=True).values
        low, high = tail[:, lo], tail[:, hi]
    return low + (high - low) * frac


def _box_filter(maps: Tensor, size: int) -> Tensor:
    """Mean over a ``size × size`` window, stride 1, same output size.

    Windows are clipped at the border and averaged over the pixels inside the
    image (no darkened edges). ``maps``: ``(N, H, W)`` float.
    """
    before, after = (size - 1) // 2, size // 2
    padding = (before, after, before, after)
    x = F.pad(maps[:, None], padding)
    ones = F.pad(torch.ones_like(maps[:1, None]), padding)
    total = F.avg_pool2d(x, size, stride=1)
    count = F.avg_pool2d(ones, size, stride=1)
    return (total / count)[:, 0]


def _safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, 0 where ``den == 0``."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


# --------------------------------------------------------------------------- B-cos colour


def _colour_rgb(weights: Tensor) -> Tensor:
    """Per-pixel colour of ``(N, 6, H, W)`` weights → ``(N, 3, H, W)`` in [0, 1].

    Each pixel's 6-vector is divided by its largest ``|entry|`` and clamped at 0;
    channel ``c`` of the colour is ``W_c / (W_c + W_{c+3})`` (0 where both are 0).
    The division by the largest entry cancels in that ratio (both terms share it), so it
    is not computed: ``max(W_c, 0) / (max(W_c, 0) + max(W_{c+3}, 0))``.
    """
    positive = weights.clamp(min=0)
    direct, inverse = positive[:, :3], positive[:, 3:]
    return _safe_divide(direct, direct + inverse).clamp(0, 1)


def _colour_alpha(weights: Tensor, inputs: Tensor, smooth: int, alpha_percentile: float) -> Tensor:
    """Per-pixel opacity of ``(N, 6, H, W)`` weights → ``(N, H, W)`` in [0, 1].

    ``‖W‖₂`` per pixel, 0 where ``Σ x ⊙ W < 0``, box-smoothed, divided by its
    per-image percentile and clipped to [0, 1] (all 0 where that percentile is 0).
    """
    contribution = (inputs * weights).sum(dim=1)
    alpha = torch.linalg.vector_norm(weights, dim=1)
    alpha = torch.where(contribution < 0, torch.zeros_like(alpha), alpha)
    if smooth > 1:
        alpha = _box_filter(alpha, smooth)
    n, h, w = alpha.shape
    scale = _percentile(alpha.reshape(n, h * w), alpha_percentile).reshape(n, 1, 1)
    return _safe_divide(alpha, scale.expand_as(alpha)).clamp(0, 1)


def bcos_colour(weights: Tensor, inputs: Tensor, smooth: int = 3, alpha_percentile: float = 99.5) -> Tensor:
    """The B-cos colour visualisation of a weight map.

    Each pixel's colour is the input colour its weights align with: the 6-vector
    ``W`` is normalised by its largest ``|entry|``, clamped at 0, and
    ``rgb = W[:3] / (W[:3] + W[3:])``. Its opacity is ``‖W‖₂``, set to 0 where the
    pixel's contribution ``Σ x ⊙ W`` is negative, averaged over a
    ``smooth × smooth`` window, divided by the image's ``alpha_percentile``-th
    percentile and clipped to [0, 1].

    Args:
        weights: ``W = ∂y/∂x``, float ``(6, H, W)`` or ``(N, 6, H, W)``, any real values.
        inputs: the encoded input ``[r, g, b, 1-r, 1-g, 1-b]``, float of the same
            shape as ``weights``, values in [0, 1].
        smooth: side of the box filter on the opacity; 0 or 1 = no smoothing.
        alpha_percentile: percentile in [0, 100] of the opacity that maps to 1;
            where it is 0 (e.g. all-zero weights) the opacity stays 0.

    Returns:
        RGBA ``(H, W, 4)`` or ``(N, H, W, 4)``, values in [0, 1], dtype of
        ``weights`` promoted to at least float32, on ``weights``' device.

    Raises:
        ValueError: wrong shapes or dtypes, ``smooth < 0``, or a percentile outside [0, 100].
    """
    weights = _check_tensor(weights, "weights")
    inputs = _check_tensor(inputs, "inputs")
    if weights.ndim not in (3, 4) or weights.shape[-3] != _ENCODED_CHANNELS:
        raise ValueError(f"weights must have shape (6, H, W) or (N, 6, H, W), got {_shape(weights)}")
    if weights.numel() == 0:
        raise ValueError(f"weights must not be empty, got shape {_shape(weights)}")
    if inputs.shape != weights.shape:
        raise ValueError(f"inputs must have the shape of weights {_shape(weights)}, got {_shape(inputs)}")
    _check_floating(weights, "weights")
    _check_floating(inputs, "inputs")
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 0:
        raise ValueError(f"smooth must be an int ≥ 0, got {smooth!r}")
    _check_percentile(alpha_percentile, "alpha_percentile")

    single = weights.ndim == 3
    dtype = torch.promote_types(weights.dtype, torch.float32)
    w = weights.to(dtype)
    x = inputs.to(device=w.device, dtype=dtype)
    if single:
        w, x = w[None], x[None]
    rgb = _colour_rgb(w)
    alpha = _colour_alpha(w, x, smooth, alpha_percentile)
    rgba = torch.cat([rgb, alpha[:, None]], dim=1).permute(0, 2, 3, 1)
    return rgba[0] if single else rgba


# --------------------------------------------------------------------------- signed heatmap


def _diverging(v: Tensor) -> Tensor:
    """``v`` in [-1, 1], ``(H, W)`` → RGBA ``(H, W, 4)``.

    ``v > 0`` → ``(1, 1-v, 1-v)`` (red), ``v < 0`` → ``(1-|v|, 1-|v|, 1)`` (blue),
    alpha ``|v|``.
    """
    magnitude = v.abs()
    red = 1 - (-v).clamp(min=0)
    green = 1 - magnitude
    blue = 1 - v.clamp(min=0)
    return torch.stack([red, green, blue, magnitude], dim=-1)


def signed_heatmap(
    contribution: Tensor,
    image: Tensor | None = None,
    percentile: float = 99.5,
    opacity: float = 0.6,
) -> Tensor:
    """A diverging heatmap of a signed per-pixel map: red positive, blue negative.

    ``v = contribution / s`` clipped to [-1, 1], where ``s`` is the
    ``percentile``-th percentile of ``|contribution|`` (the maximum ``|contribution|``
    if that percentile is 0, e.g. for a sparse map; ``v = 0`` for an all-zero map).
    Colour ``(1, 1-v, 1-v)`` for ``v > 0``, ``(1-|v|, 1-|v|, 1)`` for ``v < 0``,
    alpha ``|v|``.

    Args:
        contribution: ``(H, W)`` real-valued map, e.g. ``ExplanationMaps.pixel_contributions``
            of one image.
        image: optional ``(3, H, W)`` float image in [0, 1] to blend under the map.
        percentile: percentile in [0, 100] of ``|contribution|`` that maps to full colour.
        opacity: in [0, 1], the map's opacity at ``|v| = 1`` when blended over ``image``.

    Returns:
        RGBA ``(H, W, 4)`` float in [0, 1], dtype of ``contribution`` promoted to at
        least float32. Without ``image`` its alpha is ``|v|``; with ``image`` it is
        opaque: ``rgb = image·(1 − opacity·|v|) + colour·opacity·|v|``, alpha 1.

    Raises:
        ValueError: wrong shapes or dtypes, non-finite values, or ``percentile`` /
            ``opacity`` out of range.
    """
    contribution = _check_signed_arguments(contribution, "contribution", "(H, W)", percentile, opacity)
    if image is not None:
        image = _check_image(image, _shape(contribution))
    return _signed(contribution[None], image, percentile, opacity)[0]


def _check_signed_arguments(maps: Tensor, name: str, shape: str, percentile: float, opacity: float) -> Tensor:
    """Validate the maps (real, finite, of ``shape``: ``"(H, W)"`` or ``"(N, H, W)"``), percentile and opacity."""
    maps = _check_tensor(maps, name)
    if maps.ndim != shape.count(",") + 1 or maps.numel() == 0:
        raise ValueError(f"{name} must have shape {shape}, got {_shape(maps)}")
    if maps.dtype == torch.bool or maps.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {maps.dtype}")
    if not torch.isfinite(maps).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    _check_percentile(percentile, "percentile")
    if not 0 <= opacity <= 1:
        raise ValueError(f"opacity must lie in [0, 1], got {opacity!r}")
    return maps


def signed_heatmaps(
    contributions: Tensor,
    image: Tensor | None = None,
    percentile: float = 99.5,
    opacity: float = 0.6,
    check_values: bool = True,
) -> Tensor:
    """:func:`signed_heatmap` of each of ``N`` maps (each scaled by its own percentile), in one call.

    Args:
        contributions: ``(N, H, W)`` real-valued maps, e.g. the top concepts' per-pixel
            contributions of one image.
        image: optional ``(3, H, W)`` float image in [0, 1] blended under every map.
        percentile, opacity: as for :func:`signed_heatmap`.
        check_values: check that the values are finite (and the image's in [0, 1]); False skips
            those reads, which wait for a GPU (the service renders the model's own outputs).

    Returns:
        RGBA ``(N, H, W, 4)`` float in [0, 1]; map ``i`` equals ``signed_heatmap(contributions[i], image)``.

    Raises:
        ValueError: as for :func:`signed_heatmap`.
    """
    if check_values:
        contributions = _check_signed_arguments(contributions, "contributions", "(N, H, W)", percentile, opacity)
        if image is not None:
            image = _check_image(image, _shape(contributions)[1:])
    return _signed(contributions, image, percentile, opacity)


def _signed(contributions: Tensor, image: Tensor | None, percentile: float, opacity: float) -> Tensor:
    """Checked ``(N, H, W)`` maps (and ``(3, H, W)`` image) → RGBA ``(N, H, W, 4)``."""
    c = contributions.to(torch.promote_types(contributions.dtype, torch.float32))
    n = c.shape[0]
    scale = _percentile_or_max(c.abs().reshape(n, -1), percentile).reshape(n, 1, 1)
    rgba = _diverging(_safe_divide(c, scale.expand_as(c)).clamp(-1, 1))  # (N, H, W, 4)
    if image is None:
        return rgba
    # overlay() of the faded map, for all N at once: rgb = image·(1 − a·opacity) + colour·a·opacity
    alpha = rgba[..., 3:] * opacity
    base = image.to(device=rgba.device, dtype=rgba.dtype).permute(1, 2, 0)
    rgb = (base * (1 - alpha) + rgba[..., :3] * alpha).clamp(0, 1)
    return torch.cat([rgb, torch.ones_like(alpha)], dim=-1)


def _percentile_or_max(magnitude: Tensor, q: float) -> Tensor:
    """``(N, M)`` non-negative → ``(N,)``: each row's ``q``-th percentile, or its max if that is 0."""
    scale = _percentile(magnitude, q)
    return torch.where(scale > 0, scale, magnitude.amax(dim=1))


# --------------------------------------------------------------------------- compositing and export


def overlay(rgba: Tensor, image: Tensor) -> Tensor:
    """Alpha-composite an RGBA map over an RGB image.

    Args:
        rgba: ``(H, W, 4)`` float in [0, 1], channels last.
        image: ``(3, H, W)`` float in [0, 1], channels first.

    Returns:
        Opaque RGBA ``(H, W, 4)`` float in [0, 1] (alpha 1):
        ``rgb = image·(1 − a) + map_rgb·a``; dtype of ``rgba`` promoted with ``image``'s.

    Raises:
        ValueError: wrong shapes or dtypes, or values outside [0, 1].
    """
    rgba = _check_rgba(rgba)
    if rgba.ndim != 3:
        raise ValueError(f"rgba must have shape (H, W, 4), got {_shape(rgba)}")
    _check_unit_range(rgba, "rgba")
    image = _check_image(image, _shape(rgba)[:2])
    base = image.to(rgba.device).permute(1, 2, 0)
    colour, alpha = rgba[..., :3], rgba[..., 3:]
    rgb = (base * (1 - alpha) + colour * alpha).clamp(0, 1)
    return torch.cat([rgb, torch.ones_like(alpha, dtype=rgb.dtype)], dim=-1)


def to_uint8(rgba: Tensor) -> np.ndarray:
    """Float RGBA ``(H, W, 4)`` in [0, 1] → ``uint8`` numpy array ``(H, W, 4)``, rounded.

    Raises:
        ValueError: wrong shape or dtype, non-finite values, or values outside [0, 1].
    """
    rgba = _check_rgba(rgba)
    if rgba.ndim != 3:
        raise ValueError(f"rgba must have shape (H, W, 4), got {_shape(rgba)}")
    _check_unit_range(rgba, "rgba")
    scaled = (rgba.detach().to("cpu", torch.float64).clamp(0, 1) * 255).round()
    return scaled.to(torch.uint8).numpy()


def _as_uint8_array(rgba: Tensor | np.ndarray) -> np.ndarray:
    """Float tensor/array in [0, 1] or ``uint8`` tensor/array, ``(H, W, 4)`` → ``uint8`` array."""
    if isinstance(rgba, np.ndarray):
        if rgba.dtype == np.uint8:
            array = rgba
        elif np.issubdtype(rgba.dtype, np.floating):
            return to_uint8(torch.from_numpy(rgba))
        else:
            raise ValueError(f"rgba array must be uint8 or float, got dtype {rgba.dtype}")
    elif isinstance(rgba, Tensor):
        if rgba.dtype != torch.uint8:
            return to_uint8(rgba)
        array = rgba.detach().cpu().numpy()
    else:
        raise ValueError(f"rgba must be a torch.Tensor or numpy.ndarray, got {type(rgba).__name__}")
    if array.ndim != 3 or array.shape[-1] != 4:
        raise ValueError(f"rgba must have shape (H, W, 4), got {tuple(array.shape)}")
    return array


def _check_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """``size`` → ``(height, width)``, both positive ints."""
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair):
        raise ValueError(f"size must be a positive int or (height, width) of positive ints, got {size!r}")
    return pair  # type: ignore[return-value]


def to_png(rgba: Tensor | np.ndarray, size: int | tuple[int, int] | None = None) -> bytes:
    """Encode an RGBA image as PNG bytes.

    Args:
        rgba: ``(H, W, 4)``: float tensor/array in [0, 1] or ``uint8`` tensor/array.
        size: optional output size, ``n`` (square) or ``(height, width)``; resized
            with nearest-neighbour so small maps stay crisp.

    Returns:
        The PNG file contents (8-bit RGBA).

    Raises:
        ValueError: wrong type, shape, dtype or value range, or a bad ``size``.
    """
    array = _as_uint8_array(rgba)
    picture = Image.fromarray(np.ascontiguousarray(array))  # (H, W, 4) uint8 → RGBA
    if size is not None:
        height, width = _check_size(size)
        picture = picture.resize((width, height), resample=Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)  # small maps: speed over a few bytes
    return buffer.getvalue()


# --------------------------------------------------------------------------- other resolutions


def _partition(source: int, target: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(target, source)`` 0/1 matrix: source pixel ``p`` belongs to cell ``⌊p · target / source⌋``.

    Every source pixel is in exactly one cell and, as ``target ≤ source``, every cell holds
    ``⌊source/target⌋`` or ``⌈source/target⌉`` pixels (exactly ``source/target`` when it divides).
    """
    cells = torch.arange(source, device=device) * target // source  # (source,)
    return (cells[None, :] == torch.arange(target, device=device)[:, None]).to(dtype)


def _check_shrink(shape: tuple[int, int], size: int | tuple[int, int], what: str) -> tuple[int, int]:
    height, width = _check_size(size)
    if height > shape[0] or width > shape[1]:
        raise ValueError(f"{what} can only shrink: size {(height, width)} is larger than the maps' {shape}")
    return height, width


def sum_pool(maps: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Block sums of per-pixel values at a lower resolution; the total of each map is kept exactly.

    Output cell ``(i, j)`` is the sum of the source pixels ``(y, x)`` with ``⌊y·h/H⌋ = i`` and
    ``⌊x·w/W⌋ = j``: a partition of the pixels, so for per-pixel contributions (which sum
    to a concept's activation) the pooled map still sums to it, at any size.

    Args:
        maps: ``(N, H, W)`` or ``(H, W)`` float.
        size: ``n`` (square) or ``(h, w)`` with ``h ≤ H``, ``w ≤ W``.

    Returns:
        ``(N, h, w)`` or ``(h, w)`` of ``maps``' dtype and device.

    Raises:
        ValueError: wrong shape or dtype, or a size that is not positive or is larger than the maps.
    """
    maps = _check_tensor(maps, "maps")
    if maps.ndim not in (2, 3) or maps.numel() == 0:
        raise ValueError(f"maps must have shape (N, H, W) or (H, W), got {_shape(maps)}")
    _check_floating(maps, "maps")
    height, width = _check_shrink(_shape(maps)[-2:], size, "sum_pool")
    if (height, width) == _shape(maps)[-2:]:
        return maps
    rows = _partition(maps.shape[-2], height, maps.dtype, maps.device)  # (h, H)
    cols = _partition(maps.shape[-1], width, maps.dtype, maps.device)  # (w, W)
    return rows @ maps @ cols.T  # (…, h, w)


def resize_rgba(rgba: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Rendered maps at a lower resolution: the area mean of each cell, in premultiplied colour.

    The cells are those of :func:`sum_pool`. Colour is averaged weighted by alpha (so the
    colour of transparent pixels does not bleed into visible ones) and alpha is averaged:
    ``a' = mean(a)``, ``rgb' = mean(rgb·a) / a'`` (0 where ``a' = 0``).

    Args:
        rgba: ``(N, H, W, 4)`` or ``(H, W, 4)`` float in [0, 1].
        size: ``n`` (square) or ``(h, w)`` with ``h ≤ H``, ``w ≤ W``.

    Returns:
        RGBA of the same rank, ``(…, h, w, 4)``, float in [0, 1]; ``rgba`` itself at its own size.

    Raises:
        ValueError: wrong shape or dtype, or a size that is not positive or is larger than the maps.
    """
    rgba = _check_rgba(rgba)
    if rgba.ndim not in (3, 4):
        raise ValueError(f"rgba must have shape (N, H, W, 4) or (H, W, 4), got {_shape(rgba)}")
    height, width = _check_shrink(_shape(rgba)[-3:-1], size, "resize_rgba")
    if (height, width) == _shape(rgba)[-3:-1]:
        return rgba
    source_h, source_w = rgba.shape[-3], rgba.shape[-2]
    rows = _partition(source_h, height, rgba.dtype, rgba.device)
    cols = _partition(source_w, width, rgba.dtype, rgba.device)
    count = rows.sum(dim=1)[:, None] * cols.sum(dim=1)[None, :]  # (h, w) pixels per cell
    alpha = rgba[..., 3]
    planes = torch.cat([rgba[..., :3] * alpha[..., None], alpha[..., None]], dim=-1).movedim(-1, -3)  # (…, 4, H, W)
    means = (rows @ planes @ cols.T) / count  # (…, 4, h, w)
    mean_alpha = means[..., 3:, :, :]
    colour = _safe_divide(means[..., :3, :, :], mean_alpha.expand_as(means[..., :3, :, :]))
    return torch.cat([colour, mean_alpha], dim=-3).movedim(-3, -1).clamp(0, 1)


# --------------------------------------------------------------------------- compact encodings


def quantise(rgba: Tensor) -> Tensor:
    """Float RGBA ``(…, H, W, 4)`` in [0, 1] → ``uint8`` of the same shape, rounded; colour 0 where alpha is 0.

    Runs where ``rgba`` is (a GPU's maps leave it as 4× fewer bytes) and reads nothing back:
    values are clamped to [0, 1], not checked (:func:`encode_rgba` checks). A pixel with alpha 0
    is invisible whatever its colour; clearing it lets PNG's filters and deflate compress the
    transparent area to almost nothing (a B-cos colour map of a 224² image is often mostly
    transparent: measured 102 → 10 kB per map, docs/LOAD.md).
    """
    pixels = (rgba.detach().to(torch.float32) * 255).round_().clamp_(0, 255).to(torch.uint8)
    pixels[..., :3] *= (pixels[..., 3:] > 0).to(torch.uint8)
    return pixels


def encode_rgba(rgba: Tensor, encoding: str = "png", quality: int = WEBP_QUALITY) -> list[bytes]:
    """Encode a batch of rendered maps as image files.

    Encodings (all 8 bits per channel, colour of fully transparent pixels set to 0, which
    no viewer can see):

    * ``"png"``: lossless RGBA PNG — every visible pixel is exactly :func:`to_uint8` of ``rgba``.
    * ``"png8"``: palette PNG, at most 256 RGBA colours (Pillow's fast octree, no dithering);
      decoders return RGBA (Pillow: mode ``P`` with transparency, ``.convert("RGBA")``).
    * ``"webp"``: lossy WebP with alpha at ``quality`` (colour 4:2:0, alpha lossless).

    Args:
        rgba: ``(N, H, W, 4)`` or ``(H, W, 4)`` float in [0, 1].
        encoding: one of :data:`ENCODINGS`.
        quality: WebP quality in [0, 100] (ignored by the PNG encodings).

    Returns:
        One file's bytes per map (a list of one for ``(H, W, 4)``).

    Raises:
        ValueError: wrong shape, dtype or value range, unknown encoding, or a bad quality.
    """
    rgba = _check_rgba(rgba)
    if rgba.ndim == 3:
        rgba = rgba[None]
    if rgba.ndim != 4:
        raise ValueError(f"rgba must have shape (N, H, W, 4) or (H, W, 4), got {_shape(rgba)}")
    _check_unit_range(rgba, "rgba")
    return encode_pixels(quantise(rgba).cpu(), encoding, quality)


def encode_pixels(pixels: Tensor, encoding: str = "png", quality: int = WEBP_QUALITY) -> list[bytes]:
    """Encode :func:`quantise`'d maps, ``uint8`` ``(N, H, W, 4)`` on the CPU, as image files (see :func:`encode_rgba`).

    Raises:
        ValueError: not a CPU ``uint8`` ``(N, H, W, 4)`` tensor, unknown encoding, or a bad quality.
    """
    if not (isinstance(pixels, Tensor) and pixels.dtype == torch.uint8 and pixels.ndim == 4 and pixels.shape[-1] == 4):
        raise ValueError(
            f"pixels must be a uint8 (N, H, W, 4) tensor, got {type(pixels).__name__} "
            f"{getattr(pixels, 'dtype', '')} {tuple(getattr(pixels, 'shape', ()))}"
        )
    if pixels.device.type != "cpu":
        raise ValueError(f"pixels must be on the CPU (to_host or .cpu() them first), got {pixels.device}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100:
        raise ValueError(f"quality must be an int in [0, 100], got {quality!r}")
    out = []
    for frame in pixels.contiguous().numpy():
        picture = Image.fromarray(frame)  # (H, W, 4) uint8 → RGBA
        buffer = io.BytesIO()
        if encoding == "png":
            picture.save(buffer, format="PNG", compress_level=1)
        elif encoding == "png8":
            palette = picture.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
            palette.save(buffer, format="PNG", compress_level=6)  # palette images: level 6 costs ~1 ms more
        else:
            # method 2: ~2× faster than the default 4 for +3 % bytes; alpha stays lossless (alpha_quality 100).
            picture.save(buffer, format="WEBP", quality=quality, method=2)
        out.append(buffer.getvalue())
    return out
