"""Tests of fact_model.render against hand-derived values and independent numpy computations."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fact_model.render import bcos_colour, overlay, signed_heatmap, to_png, to_uint8

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _encoded(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) → (..., 6, H, W) = [r, g, b, 1-r, 1-g, 1-b]."""
    return torch.cat([rgb, 1 - rgb], dim=-3)


def _grey_inputs(h: int, w: int) -> torch.Tensor:
    return _encoded(torch.full((3, h, w), 0.5))


# --------------------------------------------------------------------------- bcos_colour


def test_colour_rgb_matches_hand_derived_values() -> None:
    a = 0.7
    weights = torch.zeros(6, 2, 3)
    weights[:, 0, 0] = torch.tensor([a, 0, 0, 0, a, a])  # pure red
    weights[:, 0, 1] = torch.tensor([0, 0, 0, a, a, a])  # pure black
    weights[:, 0, 2] = torch.tensor([2.0, 1.0, -1.0, 1.0, 3.0, 0.5])
    weights[:, 1, 0] = torch.tensor([0, a, 0, a, 0, a])  # pure green
    # pixel (1, 1) and (1, 2) stay all zero
    rgba = bcos_colour(weights, _grey_inputs(2, 3), smooth=1)

    assert rgba.shape == (2, 3, 4)
    torch.testing.assert_close(rgba[0, 0, :3], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(rgba[0, 1, :3], torch.tensor([0.0, 0.0, 0.0]))
    # /3, clamp at 0 → [2/3, 1/3, 0, 1/3, 1, 1/6]; rgb = (2/3 / 1, 1/3 / (4/3), 0 / (1/6))
    torch.testing.assert_close(rgba[0, 2, :3], torch.tensor([2 / 3, 1 / 4, 0.0]))
    torch.testing.assert_close(rgba[1, 0, :3], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(rgba[1, 1], torch.zeros(4))


def test_colour_alpha_zero_where_contribution_negative() -> None:
    weights = torch.ones(6, 3, 4)
    weights[:, 1, 2] = torch.tensor([-1.0, -2.0, 0.5, -1.0, -1.0, 0.5])  # Σ 0.5·W = -2 < 0
    weights[:, 2, 3] = -5.0  # strongly negative, largest norm
    rgba = bcos_colour(weights, _grey_inputs(3, 4), smooth=1, alpha_percentile=100)

    assert rgba[1, 2, 3] == 0
    assert rgba[2, 3, 3] == 0
    assert rgba[0, 0, 3] == 1  # the other pixels all have the max norm √6
    assert (rgba[..., 3] > 0).sum() == 3 * 4 - 2


def test_colour_alpha_is_norm_over_max_at_percentile_100() -> None:
    weights = torch.zeros(6, 2, 2)
    weights[0, 0, 0] = 2.0  # norm 2
    weights[1, 0, 1] = 1.0  # norm 1
    weights[:, 1, 0] = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0, 0.0])  # norm 1
    rgba = bcos_colour(weights, _grey_inputs(2, 2), smooth=1, alpha_percentile=100)

    torch.testing.assert_close(rgba[..., 3], torch.tensor([[1.0, 0.5], [0.5, 0.0]]))
    assert float(rgba[..., 3].max()) == 1.0


def test_colour_matches_numpy_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(6, 16, 12, generator=gen, dtype=torch.float64)
    inputs = _encoded(torch.rand(3, 16, 12, generator=gen, dtype=torch.float64))
    rgba = bcos_colour(weights, inputs, smooth=0, alpha_percentile=90).numpy()

    w, x = weights.numpy(), inputs.numpy()
    normed = np.maximum(w / np.abs(w).max(axis=0, keepdims=True), 0)
    rgb = normed[:3] / (normed[:3] + normed[3:] + 1e-300)
    alpha = np.sqrt((w**2).sum(axis=0))
    alpha[(x * w).sum(axis=0) < 0] = 0
    alpha = np.clip(alpha / np.percentile(alpha, 90), 0, 1)

    np.testing.assert_allclose(rgba[..., :3], rgb.transpose(1, 2, 0), atol=1e-12)
    np.testing.assert_allclose(rgba[..., 3], alpha, atol=1e-12)
    assert rgba.dtype == np.float64
    assert 0 < (rgba[..., 3] == 1).mean() < 0.5  # ~10 % of pixels saturate at the 90th percentile


def test_colour_smoothing_box_filter() -> None:
    weights = torch.zeros(6, 5, 5)
    weights[0, 2, 2] = 3.0  # impulse in the middle
    weights[0, 0, 0] = 3.0  # impulse in a corner
    rgba = bcos_colour(weights, _grey_inputs(5, 5), smooth=3, alpha_percentile=100)
    alpha = rgba[..., 3]

    # Smoothed (×1/3): corner window holds 4 pixels → 1/4; middle 3×3 block → 1/9 each,
    # except (1, 1), whose window holds both impulses → 2/9; (0, 1): 6-pixel window → 1/6.
    expected = torch.zeros(5, 5)
    expected[1:4, 1:4] = 1 / 9
    expected[0, 0] = 1 / 4
    expected[0, 1] = expected[1, 0] = 1 / 6
    expected[1, 1] = 2 / 9
    torch.testing.assert_close(alpha, expected / expected.max())


def test_colour_batched_shape_and_per_image_scaling() -> None:
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(1, 6, 7, 9, generator=gen).repeat(2, 1, 1, 1)
    weights[1] *= 10.0
    inputs = _encoded(torch.rand(1, 3, 7, 9, generator=gen)).repeat(2, 1, 1, 1)
    rgba = bcos_colour(weights, inputs)

    assert rgba.shape == (2, 7, 9, 4)
    assert rgba.dtype == torch.float32
    assert float(rgba[0, ..., 3].max()) == 1.0
    torch.testing.assert_close(rgba[0], rgba[1])  # each image normalised by its own percentile
    assert rgba.min() >= 0 and rgba.max() <= 1


def test_colour_all_zero_weights_is_nan_free_and_transparent() -> None:
    rgba = bcos_colour(torch.zeros(2, 6, 4, 4), _encoded(torch.rand(2, 3, 4, 4)))

    assert not torch.isnan(rgba).any()
    assert (rgba == 0).all()


def test_colour_percentile_zero_leaves_alpha_zero() -> None:
    weights = torch.zeros(6, 10, 10)
    weights[0, 3, 3] = 1.0  # 1 % of the pixels, below the 50th percentile
    rgba = bcos_colour(weights, _grey_inputs(10, 10), smooth=1, alpha_percentile=50)

    assert (rgba[..., 3] == 0).all()
    torch.testing.assert_close(rgba[3, 3, :3], torch.tensor([1.0, 0.0, 0.0]))


# --------------------------------------------------------------------------- signed_heatmap


def test_signed_heatmap_sign_to_colour() -> None:
    contribution = torch.tensor([[2.0, -2.0, 0.0], [1.0, -0.5, 0.0]])
    rgba = signed_heatmap(contribution, percentile=100)  # v = contribution / 2

    assert rgba.shape == (2, 3, 4)
    torch.testing.assert_close(rgba[0, 0], torch.tensor([1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(rgba[0, 1], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(rgba[1, 0], torch.tensor([1.0, 0.5, 0.5, 0.5]))
    torch.testing.assert_close(rgba[1, 1], torch.tensor([0.75, 0.75, 1.0, 0.25]))
    assert rgba[0, 2, 3] == 0 and rgba[1, 2, 3] == 0
    assert rgba[1, 0, 0] > rgba[1, 0, 2]  # positive: red-dominant
    assert rgba[1, 1, 2] > rgba[1, 1, 0]  # negative: blue-dominant


def test_signed_heatmap_percentile_scaling_and_clipping() -> None:
    contribution = torch.linspace(-3.0, 5.0, 40, dtype=torch.float64).reshape(5, 8)
    rgba = signed_heatmap(contribution, percentile=80)

    scale = np.percentile(np.abs(contribution.numpy()), 80)
    v = np.clip(contribution.numpy() / scale, -1, 1)
    np.testing.assert_allclose(rgba[..., 3].numpy(), np.abs(v), atol=1e-12)
    assert (rgba[..., 3] == 1).sum() == (np.abs(contribution.numpy()) >= scale).sum()


def test_signed_heatmap_all_zero_and_sparse() -> None:
    zero = signed_heatmap(torch.zeros(4, 4))
    assert not torch.isnan(zero).any()
    assert (zero[..., 3] == 0).all() and (zero[..., :3] == 1).all()

    sparse = torch.zeros(10, 10)
    sparse[2, 2] = -4.0  # percentile 99.5 of |·| is 0 → scaled by the max instead
    rgba = signed_heatmap(sparse)
    torch.testing.assert_close(rgba[2, 2], torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_signed_heatmap_with_image_equals_manual_blend() -> None:
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(3, 3, 5, generator=gen)
    contribution = torch.zeros(3, 5)
    contribution[1, 2] = 4.0
    contribution[0, 4] = -2.0
    rgba = signed_heatmap(contribution, image=image, percentile=100, opacity=0.6)

    assert rgba.shape == (3, 5, 4)
    assert (rgba[..., 3] == 1).all()
    torch.testing.assert_close(rgba[1, 2, :3], image[:, 1, 2] * 0.4 + torch.tensor([1.0, 0.0, 0.0]) * 0.6)
    # v = -0.5 → colour (0.5, 0.5, 1), weight 0.6·0.5 = 0.3
    torch.testing.assert_close(rgba[0, 4, :3], image[:, 0, 4] * 0.7 + torch.tensor([0.5, 0.5, 1.0]) * 0.3)
    torch.testing.assert_close(rgba[2, 0, :3], image[:, 2, 0])  # zero contribution: the image itself


# --------------------------------------------------------------------------- overlay


def test_overlay_alpha_composite() -> None:
    rgba = torch.tensor([[[1.0, 0.0, 0.0, 0.25], [0.0, 1.0, 0.0, 1.0]]])  # (1, 2, 4)
    image = torch.tensor([[[0.2, 0.2]], [[0.4, 0.4]], [[0.8, 0.8]]])  # (3, 1, 2)
    out = overlay(rgba, image)

    assert out.shape == (1, 2, 4)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.75 * 0.2 + 0.25, 0.75 * 0.4, 0.75 * 0.8, 1.0]))
    torch.testing.assert_close(out[0, 1], torch.tensor([0.0, 1.0, 0.0, 1.0]))


# --------------------------------------------------------------------------- to_uint8 / to_png


def test_to_uint8_rounds() -> None:
    rgba = torch.tensor([[[0.0, 1.0, 0.2, 0.5]], [[1 / 255 * 0.49, 1 / 255 * 0.51, 0.999, 1.0]]])
    out = to_uint8(rgba)

    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (2, 1, 4)
    np.testing.assert_array_equal(out[0, 0], [0, 255, 51, 128])
    np.testing.assert_array_equal(out[1, 0], [0, 1, 255, 255])


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as picture:
        assert picture.mode == "RGBA"
        return np.asarray(picture).copy()


def test_to_png_round_trip() -> None:
    rgba = torch.rand(5, 7, 4, generator=torch.Generator().manual_seed(3))
    data = to_png(rgba)

    assert data.startswith(PNG_SIGNATURE)
    expected = np.round(rgba.numpy().astype(np.float64) * 255).astype(np.uint8)
    np.testing.assert_array_equal(_decode(data), expected)

    pixels = np.arange(5 * 7 * 4, dtype=np.uint8).reshape(5, 7, 4)
    np.testing.assert_array_equal(_decode(to_png(pixels)), pixels)


def test_to_png_nearest_upscale() -> None:
    pixels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10

    decoded = _decode(to_png(pixels, size=(6, 12)))  # (height, width)
    assert decoded.shape == (6, 12, 4)
    np.testing.assert_array_equal(decoded, pixels.repeat(3, axis=0).repeat(4, axis=1))

    square = _decode(to_png(pixels, size=6))
    assert square.shape == (6, 6, 4)
    np.testing.assert_array_equal(square[::3, ::2], pixels)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("weights", "inputs", "match"),
    [
        (torch.zeros(3, 4, 4), torch.zeros(3, 4, 4), r"\(3, 4, 4\)"),
        (torch.zeros(6, 4), torch.zeros(6, 4), r"\(6, 4\)"),
        (torch.zeros(6, 4, 4), torch.zeros(6, 4, 5), r"\(6, 4, 5\)"),
        (torch.zeros(2, 6, 4, 4), torch.zeros(6, 4, 4), r"\(6, 4, 4\)"),
        (torch.zeros(6, 4, 4, dtype=torch.long), torch.zeros(6, 4, 4), "int64"),
    ],
)
def test_bcos_colour_rejects_bad_shapes(weights: torch.Tensor, inputs: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bcos_colour(weights, inputs)


@pytest.mark.parametrize(("kwargs", "match"), [({"smooth": -1}, "-1"), ({"alpha_percentile": 101.0}, "101")])
def test_bcos_colour_rejects_bad_parameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bcos_colour(torch.zeros(6, 4, 4), torch.zeros(6, 4, 4), **kwargs)


def test_signed_heatmap_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(1, 4, 4\)"):
        signed_heatmap(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"\(3, 4, 5\)"):
        signed_heatmap(torch.zeros(4, 4), image=torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match=r"1\.5"):
        signed_heatmap(torch.zeros(4, 4), opacity=1.5)
    with pytest.raises(ValueError, match="NaN"):
        signed_heatmap(torch.full((4, 4), float("nan")))


def test_overlay_and_export_reject_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(4, 4, 3\)"):
        overlay(torch.zeros(4, 4, 3), torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match=r"\(3, 4, 5\)"):
        overlay(torch.zeros(4, 4, 4), torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match=r"max 2"):
        to_uint8(torch.full((2, 2, 4), 2.0))
    with pytest.raises(ValueError, match=r"\(2, 2, 3\)"):
        to_png(np.zeros((2, 2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(0, 4\)"):
        to_png(np.zeros((2, 2, 4), dtype=np.uint8), size=(0, 4))
