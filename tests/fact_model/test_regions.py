"""Region queries (fact_model.regions), each claim checked against an independent computation.

Sizes are chosen so the grid does not divide the input: a CNN at 30 px (layer2 15 × 15, 2 px
cells; layer3 8 × 8, 3.75 px cells) and a ViT at 36 px (5 × 5 tokens, 7.2 px cells).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fact_model import regions
from fact_model.explanation import Explanation, SlotContributions
from tests.conftest import make_model

CNN_LAYERS = [("layer2", 32, 4), ("layer3", 48, 4)]
VIT_LAYERS = [("transformer.encoder_1", 32, 4), ("transformer.encoder_3", 48, 4)]
SIZES = {"cnn": 30, "vit": 36}


def _explain(kind: str, maps: bool = False) -> Explanation:
    size = SIZES[kind]
    if kind == "cnn":
        model = make_model(CNN_LAYERS)
    else:
        model = make_model(VIT_LAYERS, backbone="bcos_vitc")
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(5))
    return model.explain(images, top_k=3, maps=maps, map_kinds=("logit",))


@pytest.fixture(scope="module")
def explanations() -> dict[str, Explanation]:
    return {kind: _explain(kind) for kind in SIZES}


def _close(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor) -> None:
    """Equal to float32 rounding, relative to the size of the terms summed (``scale``)."""
    tolerance = 1e-5 * scale.abs().max().clamp_min(1e-12) + 1e-7
    assert (actual - expected).abs().max() <= tolerance, (actual - expected).abs().max()


def _slot_scale(expl: Explanation, layer: str) -> torch.Tensor:
    return expl.slots[layer].values.abs().flatten(1).sum(1)


def _position_contributions(expl: Explanation, layer: str, position: int) -> torch.Tensor:
    """Independent reference: ``(N, K)`` per-concept sums of the slots at one position, by a Python loop."""
    slots = expl.slots[layer]
    n, _, k = slots.values.shape
    dense = torch.zeros(n, expl.contributions[layer].shape[1], dtype=torch.float64)
    for img in range(n):
        for j in range(k):
            dense[img, slots.concept_ids[img, position, j]] += float(slots.values[img, position, j])
    return dense.to(slots.values.dtype)


def _brute_force_cell_weights(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Independent reference: the covered fraction of every cell by exact rational pixel overlaps."""
    size_h, size_w = mask.shape
    h, w = grid

    def overlap(pixel: int, cell: int, cells: int, pixels: int) -> Fraction:
        lo, hi = Fraction(cell * pixels, cells), Fraction((cell + 1) * pixels, cells)
        return max(Fraction(0), min(hi, Fraction(pixel + 1)) - max(lo, Fraction(pixel)))

    out = np.zeros(grid)
    cell_area = Fraction(size_h, h) * Fraction(size_w, w)
    for i in range(h):
        for j in range(w):
            total = Fraction(0)
            for r in range(size_h):
                for c in range(size_w):
                    total += overlap(r, i, h, size_h) * overlap(c, j, w, size_w) * Fraction(float(mask[r, c]))
            out[i, j] = float(total / cell_area)
    return out


# ---------------------------------------------------------------------------- the pixel ↔ grid mapping
def test_cell_weights_match_a_brute_force_pixel_loop():
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 10, 7, generator=generator, dtype=torch.float64)
    weights = regions.cell_weights(mask, (3, 4))
    assert weights.shape == (2, 3, 4) and weights.dtype == torch.float64
    for n in range(2):
        expected = _brute_force_cell_weights(mask[n].numpy(), (3, 4))
        np.testing.assert_allclose(weights[n].numpy(), expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(regions.cell_weights(mask[0], (3, 4)), weights[0])


def test_whole_image_weighs_one_and_a_partition_sums_to_one_in_every_cell():
    for size, grid in (((10, 7), (3, 4)), ((48, 48), (7, 7)), ((48, 48), (6, 6)), ((30, 30), (8, 8))):
        ones = regions.cell_weights(torch.ones(size, dtype=torch.float64), grid)
        torch.testing.assert_close(ones, torch.ones(grid, dtype=torch.float64), rtol=0, atol=1e-15)
        soft = torch.rand(size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        parts = regions.cell_weights(torch.stack([soft, 1 - soft]), grid).sum(0)
        torch.testing.assert_close(parts, torch.ones(grid, dtype=torch.float64), rtol=0, atol=1e-15)


def test_spread_to_pixels_preserves_sums_and_is_the_transpose_of_cell_weights():
    generator = torch.Generator().manual_seed(2)
    values = torch.randn(5, 3, 4, generator=generator, dtype=torch.float64)
    mask = torch.rand(10, 7, generator=generator, dtype=torch.float64)
    spread = regions.spread_to_pixels(values, (10, 7))
    assert spread.shape == (5, 10, 7)
    torch.testing.assert_close(spread.sum((-2, -1)), values.sum((-2, -1)), rtol=0, atol=1e-13)
    weights = regions.cell_weights(mask, (3, 4))
    lhs = (weights * values).sum((-2, -1))  # ⟨cell_weights(m), v⟩
    rhs = (mask * spread).sum((-2, -1))  # ⟨m, spread(v)⟩
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-13)
    # each cell's value lands on its own pixels: cell (1, 2) of 10 × 7 on 3 × 4 covers y ∈ [10/3, 20/3), x ∈ [3.5, 5.25)
    one = torch.zeros(3, 4, dtype=torch.float64)
    one[1, 2] = 1.0
    pixels = regions.spread_to_pixels(one, (10, 7))
    assert pixels.nonzero()[:, 0].unique().tolist() == [3, 4, 5, 6]
    assert pixels.nonzero()[:, 1].unique().tolist() == [3, 4, 5]
    assert pixels[4, 4] == pytest.approx(1 / (10 / 3 * 7 / 4))  # a whole pixel: its area over the cell's


def test_spread_differs_from_nearest_upsampling_where_sizes_do_not_divide():
    """48 px on 7 cells: nearest gives cells 6 or 7 px and copies values; the spread keeps each cell's value."""
    ones = torch.ones(1, 1, 7, 7)
    nearest = F.interpolate(ones, size=(48, 48), mode="nearest")[0, 0]
    spread = regions.spread_to_pixels(ones[0, 0], (48, 48))
    counts = torch.bincount((torch.arange(48) * 7) // 48)  # torch's nearest: source ⌊r·h/H⌋
    assert set(counts.tolist()) == {6, 7}
    assert nearest.sum() == 48 * 48  # the copies sum to the pixel count, not to Σ values = 49
    assert spread.sum().item() == pytest.approx(49.0, abs=1e-4)
    torch.testing.assert_close(spread, torch.full((48, 48), 49 / 48**2), rtol=1e-6, atol=0)


def test_box_mask_has_fractional_edges_and_clips():
    mask = regions.box_mask((1, 1, 2.5, 3), (4, 4))
    expected = torch.zeros(4, 4)
    expected[1:3, 1] = 1
    expected[1:3, 2] = 0.5
    torch.testing.assert_close(mask, expected, rtol=0, atol=0)
    clipped = regions.box_mask((-3.0, 2.25, 10, 99), (4, 5), dtype=torch.float64)
    assert clipped.shape == (4, 5)
    assert clipped[:2].sum() == 0 and (clipped[2] == 0.75).all() and (clipped[3] == 1).all()
    assert clipped.sum().item() == pytest.approx(5 * 1.75)


def test_box_cell_weights_are_exact_at_sub_pixel_edges_and_agree_with_the_mask_in_area():
    box = (3.75, 0.4, 11.25, 7.0)  # x exactly columns 1–2 of an 8-cell grid on 30 px, y fractional
    exact = regions.box_cell_weights(box, (8, 8), (30, 30), dtype=torch.float64)
    rows = torch.zeros(8, dtype=torch.float64)
    rows[:2] = torch.tensor([(3.75 - 0.4) / 3.75, (7.0 - 3.75) / 3.75], dtype=torch.float64)
    cols = torch.zeros(8, dtype=torch.float64)
    cols[1:3] = 1
    torch.testing.assert_close(exact, rows[:, None] * cols[None, :], rtol=0, atol=1e-15)
    via_mask = regions.cell_weights(regions.box_mask(box, (30, 30), dtype=torch.float64), (8, 8))
    area = (11.25 - 3.75) * (7.0 - 0.4)
    cell_area = (30 / 8) ** 2
    assert exact.sum().item() * cell_area == pytest.approx(area)
    assert via_mask.sum().item() * cell_area == pytest.approx(area)
    aligned = (2.0, 4.0, 12.0, 18.0)  # edges on pixels: both routes agree
    torch.testing.assert_close(
        regions.box_cell_weights(aligned, (8, 8), (30, 30), dtype=torch.float64),
        regions.cell_weights(regions.box_mask(aligned, (30, 30), dtype=torch.float64), (8, 8)),
        rtol=0,
        atol=1e-15,
    )


# ---------------------------------------------------------------------------- region contributions
@pytest.mark.parametrize("kind", list(SIZES))
def test_whole_image_equals_the_full_decomposition_for_every_layer(kind, explanations):
    expl = explanations[kind]
    size = SIZES[kind]
    for layer in expl.layer_names:
        for region in (torch.ones(size, size), np.ones((size, size), dtype=bool), (0, 0, size, size)):
            result = regions.region_contributions(expl, layer, region, size=(size, size))
            assert result.layer == layer
            scale = _slot_scale(expl, layer)
            _close(result.contributions, expl.contributions[layer], scale)
            _close(result.total, expl.explained, scale)
            _close(result.share * expl.explained, expl.explained, scale)
            assert torch.equal(result.coverage, torch.ones(3))
            assert torch.equal(result.weights, torch.ones(3, *expl.slots[layer].spatial_shape))


@pytest.mark.parametrize("kind", list(SIZES))
def test_complementary_regions_add_up_to_the_whole(kind, explanations):
    expl = explanations[kind]
    size = SIZES[kind]
    split = 13.3  # inside a pixel, and inside a cell of every grid here
    soft = torch.rand(3, size, size, generator=torch.Generator().manual_seed(3))
    pairs = [
        ((0, 0, split, size), (split, 0, size, size)),
        (regions.box_mask((0, 0, split, size), (size, size)), regions.box_mask((split, 0, size, size), (size, size))),
        (soft, 1 - soft),
    ]
    for layer in expl.layer_names:
        scale = _slot_scale(expl, layer)
        for first, second in pairs:
            a = regions.region_contributions(expl, layer, first, size=(size, size))
            b = regions.region_contributions(expl, layer, second, size=(size, size))
            _close(a.contributions + b.contributions, expl.contributions[layer], scale)
            _close(a.total + b.total, expl.explained, scale)
            torch.testing.assert_close(a.coverage + b.coverage, torch.ones(3))
        left = regions.region_contributions(expl, layer, pairs[0][0], size=(size, size))
        assert left.coverage[0].item() == pytest.approx(split / size)


@pytest.mark.parametrize(
    ("kind", "layer", "cell", "edge"),
    [
        ("cnn", "layer3", (2, 5), 3.75),  # 30 px / 8: fractional edges, exact in binary
        ("cnn", "layer2", (7, 0), 2.0),  # 30 px / 15
        ("vit", "transformer.encoder_3", (4, 1), 7.2),  # 36 px / 5
    ],
)
def test_a_box_covering_one_cell_gives_that_positions_slot_contributions(kind, layer, cell, edge, explanations):
    expl = explanations[kind]
    size = SIZES[kind]
    i, j = cell
    box = (j * edge, i * edge, (j + 1) * edge, (i + 1) * edge)
    result = regions.region_contributions(expl, layer, box, size=(size, size))
    h, w = expl.slots[layer].spatial_shape
    one_hot = torch.zeros(3, h, w)
    one_hot[:, i, j] = 1
    torch.testing.assert_close(result.weights, one_hot, rtol=0, atol=1e-6)
    reference = _position_contributions(expl, layer, i * w + j)
    _close(result.contributions, reference, _slot_scale(expl, layer))
    assert result.coverage[0].item() == pytest.approx(1 / (h * w), rel=1e-6)
    if edge == int(edge):  # cell edges on pixel edges: the mask route is exact too
        via_mask = regions.region_contributions(expl, layer, regions.box_mask(box, (size, size)))
        assert torch.equal(via_mask.weights, one_hot)
        _close(via_mask.contributions, reference, _slot_scale(expl, layer))


def test_per_image_masks_apply_to_their_own_image(explanations):
    expl = explanations["cnn"]
    masks = torch.stack([regions.box_mask(box, (30, 30)) for box in ((0, 0, 15, 30), (15, 0, 30, 30), (0, 0, 30, 30))])
    batch = regions.region_contributions(expl, "layer3", masks)
    for n in range(3):
        alone = regions.region_contributions(expl, "layer3", masks[n])
        torch.testing.assert_close(batch.contributions[n], alone.contributions[n], rtol=0, atol=0)
    torch.testing.assert_close(batch.coverage, torch.tensor([0.5, 0.5, 1.0]))


def test_share_is_nan_when_the_explained_quantity_is_zero(explanations):
    expl = explanations["cnn"]
    zero_first = expl.explained.clone()
    zero_first[0] = 0
    result = regions.region_contributions(
        dataclasses.replace(expl, explained=zero_first), "layer3", (0, 0, 15, 30), size=(30, 30)
    )
    assert torch.isnan(result.share[0]) and torch.isfinite(result.share[1:]).all()
    assert torch.isfinite(result.total).all()


def test_token_slots_map_to_their_square_patch_grid(explanations):
    expl = explanations["vit"]
    layer = "transformer.encoder_3"
    grid = expl.slots[layer]
    as_tokens = dataclasses.replace(
        expl, slots={layer: SlotContributions(grid.values, grid.concept_ids, (grid.values.shape[1],))}
    )
    box = (3.0, 10.0, 30.5, 21.0)
    on_grid = regions.region_contributions(expl, layer, box, size=(36, 36))
    on_tokens = regions.region_contributions(as_tokens, layer, box, size=(36, 36))
    assert torch.equal(on_tokens.contributions, on_grid.contributions)
    assert torch.equal(on_tokens.weights, on_grid.weights)
    concept = int(expl.top_ids[layer][1, 0])
    assert torch.equal(
        regions.concept_region_map(as_tokens, layer, concept, 1, (36, 36)),
        regions.concept_region_map(expl, layer, concept, 1, (36, 36)),
    )


# ---------------------------------------------------------------------------- concept maps
@pytest.mark.parametrize("kind", list(SIZES))
def test_concept_region_map_sums_to_the_contribution_and_matches_the_spatial_map(kind, explanations):
    expl = explanations[kind]
    size = SIZES[kind]
    for layer in expl.layer_names:
        contributions = expl.contributions[layer]
        scale = _slot_scale(expl, layer)
        for n in range(3):
            # the top concepts, the weakest non-zero one (rarely a top one) and one that is absent
            nonzero = contributions[n].abs().masked_fill(contributions[n] == 0, float("inf"))
            concepts = [*expl.top_ids[layer][n].tolist(), int(nonzero.argmin())]
            for concept in concepts:
                pixels = regions.concept_region_map(expl, layer, concept, n, (size, size))
                assert pixels.shape == (size, size)
                _close(pixels.sum(), contributions[n, concept], scale[n])
            for rank, concept in enumerate(expl.top_ids[layer][n].tolist()):
                spatial = regions.spread_to_pixels(expl.spatial[layer][n, rank], (size, size))
                _close(regions.concept_region_map(expl, layer, concept, n, (size, size)), spatial, scale[n])
        # a region's sum of the map is that concept's region contribution (adjointness)
        mask = torch.rand(size, size, generator=torch.Generator().manual_seed(4))
        region = regions.region_contributions(expl, layer, mask)
        concept = int(expl.top_ids[layer][0, 0])
        pixels = regions.concept_region_map(expl, layer, concept, 0, (size, size))
        _close((mask * pixels).sum(), region.contributions[0, concept], scale[0])


def test_concept_region_map_takes_the_size_from_the_maps():
    expl = _explain("cnn", maps=True)
    concept = int(expl.top_ids["layer3"][2, 1])
    default = regions.concept_region_map(expl, "layer3", concept, 2)
    assert torch.equal(default, regions.concept_region_map(expl, "layer3", concept, 2, (30, 30)))
    result = regions.region_contributions(expl, "layer3", (0, 0, 30, 30))  # a box needs no size with maps
    _close(result.contributions, expl.contributions["layer3"], _slot_scale(expl, "layer3"))
    with pytest.raises(ValueError, match=r"mask has shape \(32, 32\) but must be \(H, W\) = \(30, 30\)"):
        regions.region_contributions(expl, "layer3", torch.ones(32, 32))
    with pytest.raises(ValueError, match=r"size \(32, 32\) differs from the explanation's input size \(30, 30\)"):
        regions.region_contributions(expl, "layer3", torch.ones(30, 30), size=(32, 32))


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("box", "message"),
    [
        ((5, 1, 5, 3), r"box \(x0, y0, x1, y1\) = \(5, 1, 5, 3\) is empty: it needs x0 < x1 and y0 < y1"),
        ((1, 4, 3, 2), r"= \(1, 4, 3, 2\) is empty"),
        ((0, 0, float("nan"), 3), r"= \(0, 0, nan, 3\) must be finite"),
        ((0, float("-inf"), 2, 3), r"must be finite"),
        ((10, 0, 12, 3), r"lies entirely outside the 8×10 input: it must overlap x ∈ \[0, 10\) and y ∈ \[0, 8\)"),
        ((-4, 0, 0, 3), r"lies entirely outside"),
        ((0, 8, 2, 9), r"lies entirely outside"),
        ((0, -2, 2, -0.5), r"lies entirely outside"),
        ((0, 0, 2), r"box must be four numbers \(x0, y0, x1, y1\) in input pixels, got \(0, 0, 2\)"),
        ((0, 0, True, 2), r"box must be four numbers"),
        ("0 0 2 2", r"box must be four numbers"),
    ],
)
def test_box_refusals_name_the_values_and_the_valid_range(box, message):
    with pytest.raises(ValueError, match=message):
        regions.box_mask(box, (8, 10))
    with pytest.raises(ValueError, match=message):
        regions.box_cell_weights(box, (2, 2), (8, 10))


def test_mask_from_array_accepts_bool_uint8_and_floats():
    expected = torch.zeros(4, 5)
    expected[1:3, 2:] = 1
    as_bool = expected.bool().numpy()
    for mask in (as_bool, as_bool.astype(np.uint8), as_bool.astype(np.uint8) * 255, torch.from_numpy(as_bool)):
        out = regions.mask_from_array(mask, (4, 5))
        assert out.dtype == torch.float32 and torch.equal(out, expected)
    grey = regions.mask_from_array(np.array([[0, 51], [255, 0]], dtype=np.uint8), (2, 2))
    torch.testing.assert_close(grey, torch.tensor([[0.0, 0.2], [1.0, 0.0]]))
    assert regions.mask_from_array(torch.full((2, 2), 0.5, dtype=torch.float64), (2, 2)).dtype == torch.float64
    assert regions.mask_from_array(np.ones((3, 4, 5), dtype=np.float32), (4, 5)).shape == (3, 4, 5)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (
            np.ones((6, 5)),
            r"mask has shape \(6, 5\) but must be \(H, W\) = \(4, 5\) or \(N, 4, 5\), the model's input "
            r"size: resize it as the image was preprocessed first",
        ),
        (np.ones((4, 5, 3)), r"mask has shape \(4, 5, 3\)"),
        (np.ones(5), r"mask has shape \(5,\)"),
        (np.zeros((4, 5)), r"the mask is zero everywhere: a region must cover part of the image"),
        (np.stack([np.ones((4, 5)), np.zeros((4, 5))]), r"the mask of image\(s\) \[1\] is zero everywhere"),
        (np.full((4, 5), 1.5), r"mask values must lie in \[0, 1\], got \[1.5, 1.5\]"),
        (np.full((4, 5), -0.5), r"mask values must lie in \[0, 1\], got \[-0.5, -0.5\]"),
        (np.full((4, 5), np.nan), r"mask contains NaN or infinite values"),
        (np.full((4, 5), 2, dtype=np.int64), r"integer mask values must be 0/1 \(uint8: 0–255\), got \[2, 2\]"),
        (np.array([["a"] * 5] * 4), r"mask must be a numeric or bool array, got dtype <U1"),
        ([[1] * 5] * 4, r"mask must be a numpy array or a torch tensor, got list"),
    ],
)
def test_mask_refusals(mask, message):
    with pytest.raises(ValueError, match=message):
        regions.mask_from_array(mask, (4, 5))


def test_grid_and_size_refusals():
    with pytest.raises(ValueError, match=r"grid must be two positive ints \(rows, columns\), got \(0, 3\)"):
        regions.cell_weights(torch.ones(4, 4), (0, 3))
    with pytest.raises(ValueError, match=r"size must be two positive ints \(rows, columns\), got 8"):
        regions.spread_to_pixels(torch.ones(2, 2), 8)
    with pytest.raises(ValueError, match=r"mask must be a floating-point \(H, W\) or \(N, H, W\) tensor"):
        regions.cell_weights(torch.ones(4, 4, dtype=torch.uint8), (2, 2))
    with pytest.raises(ValueError, match=r"values must be a floating-point \(\.\.\., h, w\) tensor"):
        regions.spread_to_pixels(torch.ones(4), (2, 2))


def test_region_and_concept_map_refusals(explanations):
    expl = explanations["cnn"]
    with pytest.raises(
        ValueError, match=r"no concept layer 'layer9' in this explanation; its layers: \['layer2', 'layer3'\]"
    ):
        regions.region_contributions(expl, "layer9", torch.ones(30, 30))
    with pytest.raises(ValueError, match=r"a per-image mask needs one \(H, W\) mask per image: got 2 for 3 image\(s\)"):
        regions.region_contributions(expl, "layer3", torch.ones(2, 30, 30))
    with pytest.raises(ValueError, match=r"a box needs size=\(H, W\), the model's input size"):
        regions.region_contributions(expl, "layer3", (0, 0, 4, 4))
    with pytest.raises(ValueError, match=r"region must be an \(H, W\) / \(N, H, W\) mask .* got int"):
        regions.region_contributions(expl, "layer3", 3)
    with pytest.raises(ValueError, match=r"lies entirely outside the 30×30 input"):
        regions.region_contributions(expl, "layer3", (30, 0, 31, 4), size=(30, 30))
    with pytest.raises(ValueError, match=r"concept_id must be an int in \[0, 48\), got 48"):
        regions.concept_region_map(expl, "layer3", 48, 0, (30, 30))
    with pytest.raises(ValueError, match=r"n must be an int in \[0, 3\), got -1"):
        regions.concept_region_map(expl, "layer3", 0, -1, (30, 30))
    with pytest.raises(ValueError, match=r"size \(H, W\) is required: this explanation has no input maps"):
        regions.concept_region_map(expl, "layer3", 0, 0)
    slots = expl.slots["layer3"]
    odd = SlotContributions(slots.values[:, :63], slots.concept_ids[:, :63], (63,))
    odd_expl = dataclasses.replace(expl, slots={"layer3": odd})
    with pytest.raises(ValueError, match=r"layer 'layer3' has 63 tokens, not a square grid"):
        regions.region_contributions(odd_expl, "layer3", torch.ones(30, 30))
