"""Tests of fact_model.data.synthetic: determinism, ground truth, vocabulary, splits and API checks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fact_model.data._parts import EXTENT
from fact_model.data.synthetic import (
    CLASS_NAMES,
    CLASS_PARTS,
    DISTRACTOR_TYPES,
    NUM_CLASSES,
    PART_NAMES,
    PART_TYPES,
    SyntheticConfig,
    SyntheticParts,
    part_map_to_rgb,
    render_sample,
)

P = len(PART_TYPES)
SMALL = SyntheticConfig(train=200, val=60, test=100)


def _render_many(config: SyntheticConfig, split: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, H, W, 3) uint8 images, (n, H, W) int64 maps, (n,) int64 labels."""
    samples = [render_sample(config, split, i) for i in range(n)]
    return (
        np.stack([s[0] for s in samples]),
        np.stack([s[1] for s in samples]),
        np.asarray([s[2] for s in samples]),
    )


@pytest.fixture(scope="module")
def train_samples() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _render_many(SMALL, "train", 200)


# --------------------------------------------------------------------------- vocabulary


def test_vocabulary_parts_are_shared_and_no_class_contains_another() -> None:
    assert P >= 8 and NUM_CLASSES >= 10 and len(DISTRACTOR_TYPES) >= 2
    uses = np.bincount([p for parts in CLASS_PARTS for p in parts], minlength=P)
    assert uses.min() >= 2, uses
    sets = [frozenset(parts) for parts in CLASS_PARTS]
    assert all(len(s) == 2 for s in sets)
    for a, b in itertools.permutations(range(NUM_CLASSES), 2):
        assert not sets[a] <= sets[b], (a, b)
    assert len(set(CLASS_NAMES)) == NUM_CLASSES
    assert CLASS_NAMES[0] == f"{PART_TYPES[CLASS_PARTS[0][0]].name} + {PART_TYPES[CLASS_PARTS[0][1]].name}"
    names = [t.name for t in (*PART_TYPES, *DISTRACTOR_TYPES)]
    assert len(set(names)) == len(names)  # distractor types are not part types
    assert PART_NAMES == ("background", *names)


def test_every_shape_stays_within_its_extent() -> None:
    """Drawing only evaluates a part's window of radius EXTENT; no shape may reach beyond it."""
    grid = np.linspace(-2.0, 2.0, 801)
    u, v = np.meshgrid(grid, grid)
    outside = u * u + v * v > EXTENT**2
    for part in (*PART_TYPES, *DISTRACTOR_TYPES):
        mask = part.shape(u, v)
        assert mask.sum() * (grid[1] - grid[0]) ** 2 > 0.5, part.name  # covers a real area (unit disc: π)
        assert not (mask & outside).any(), part.name


def test_textures_show_both_colours_at_default_resolution() -> None:
    """Striped, dotted and checkered parts show each of their colours on a good share of their pixels."""
    config = SyntheticConfig(train=400, val=0, test=0, max_distractors=0)
    textured = [p for p, t in enumerate(PART_TYPES) if len(t.colors) == 2]
    assert len(textured) >= 3
    shares: dict[int, list[float]] = {p: [] for p in textured}
    for i in range(0, 100):
        image, part_map, _ = render_sample(config, "train", i, clean=True)
        for p in textured:
            pixels = image[part_map == p + 1].astype(int)
            if len(pixels):
                second = np.all(pixels == PART_TYPES[p].colors[1], axis=-1).mean()
                shares[p].append(min(second, 1.0 - second))
    for p in textured:
        assert len(shares[p]) >= 10 and np.median(shares[p]) >= 0.12, (PART_TYPES[p].name, np.median(shares[p]))


# --------------------------------------------------------------------------- determinism and splits


def test_same_seed_same_images_different_seed_different_images() -> None:
    a = _render_many(SMALL, "train", 20)
    b = _render_many(SyntheticConfig(train=200, val=60, test=100), "train", 20)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    c = _render_many(SyntheticConfig(seed=1, train=200, val=60, test=100), "train", 20)
    np.testing.assert_array_equal(a[2], c[2])  # labels depend on the index only
    assert all(not np.array_equal(a[0][i], c[0][i]) for i in range(20))
    assert sum(not np.array_equal(a[1][i], c[1][i]) for i in range(20)) >= 18


def test_images_regenerate_alone_and_in_any_order() -> None:
    dataset = SyntheticParts(SMALL, "val")
    images, labels, maps = dataset.tensors()
    for i in (37, 0, 59, 12):
        image, part_map, label = render_sample(SMALL, "val", i)
        np.testing.assert_array_equal(images[i].permute(1, 2, 0).numpy(), image)
        np.testing.assert_array_equal(maps[i].numpy(), part_map)
        assert labels[i] == label
    # a split's size does not change its images
    np.testing.assert_array_equal(render_sample(SyntheticConfig(val=1000), "val", 37)[0], images[37].permute(1, 2, 0))


def test_splits_differ() -> None:
    firsts = {split: _render_many(SMALL, split, 10)[0] for split in ("train", "val", "test")}
    for a, b in itertools.combinations(firsts, 2):
        assert all(not np.array_equal(firsts[a][i], firsts[b][i]) for i in range(10)), (a, b)


# --------------------------------------------------------------------------- ground truth


def test_clean_render_paints_exactly_the_labelled_pixels_with_the_part_colours() -> None:
    palettes = [np.zeros((1, 3))] + [t.palette() for t in (*PART_TYPES, *DISTRACTOR_TYPES)]
    for i in range(60):
        image, part_map, _ = render_sample(SMALL, "test", i, clean=True)
        _, noisy_map, _ = render_sample(SMALL, "test", i)
        np.testing.assert_array_equal(part_map, noisy_map)  # same geometry as the real image
        for label in np.unique(part_map):
            pixels = image[part_map == label].astype(float)
            matches = (pixels[:, None, :] == palettes[label][None]).all(-1).any(-1)
            assert matches.all(), (i, PART_NAMES[label], pixels[~matches][:3])


def test_labelled_pixels_have_their_part_colour_and_background_does_not(train_samples) -> None:
    images, maps, _ = train_samples
    pixels = images.reshape(-1, 3).astype(float)
    labels = maps.reshape(-1)
    all_colours = np.concatenate([t.palette() for t in (*PART_TYPES, *DISTRACTOR_TYPES)])
    for label in range(1, len(PART_NAMES)):
        palette = (*PART_TYPES, *DISTRACTOR_TYPES)[label - 1].palette()
        dist = np.linalg.norm(pixels[labels == label][:, None] - palette[None], axis=-1).min(1)
        assert len(dist) > 0 and np.median(dist) < 30 and np.percentile(dist, 99) < 75, (PART_NAMES[label], dist)
    background = pixels[labels == 0]
    near_a_part = np.linalg.norm(background[:, None] - all_colours[None], axis=-1).min(1) < 40
    assert near_a_part.mean() < 0.01, near_a_part.mean()
    # the background is muted: low saturation compared with the parts' main colours
    saturation = lambda x: x.max(-1) - x.min(-1)  # noqa: E731
    assert np.percentile(saturation(background), 99) < 80
    assert np.median(saturation(pixels[(labels >= 1) & (labels <= 4)])) > 150


def test_each_image_has_both_class_parts_and_only_distractors_besides(train_samples) -> None:
    _, maps, labels = train_samples
    distractor_labels = set(range(P + 1, len(PART_NAMES)))
    n_distractors = []
    for part_map, label in zip(maps, labels, strict=True):
        counts = np.bincount(part_map.ravel(), minlength=len(PART_NAMES))
        class_labels = {p + 1 for p in CLASS_PARTS[label]}
        for p in class_labels:
            assert counts[p] >= 30, (CLASS_NAMES[label], PART_NAMES[p], counts[p])
        present = set(np.flatnonzero(counts[1:]) + 1)
        assert present - class_labels <= distractor_labels, (CLASS_NAMES[label], present)
        assert counts[0] > 0.6 * part_map.size  # parts do not fill the image
        n_distractors.append(len(present & distractor_labels))
    assert max(n_distractors) <= SMALL.max_distractors
    assert np.bincount(n_distractors).min() >= 20  # 0, 1 and 2 distractors all occur


def test_no_distractors_when_max_is_zero_and_parts_scale_with_image_size() -> None:
    config = SyntheticConfig(image_size=96, train=20, val=0, test=0, max_distractors=0)
    areas = []
    for i in range(20):
        image, part_map, label = render_sample(config, "train", i)
        assert image.shape == (96, 96, 3) and part_map.shape == (96, 96)
        assert set(np.unique(part_map)) == {0, *(p + 1 for p in CLASS_PARTS[label])}
        areas.append((part_map > 0).sum() / part_map.size)
    assert 0.04 < np.mean(areas) < 0.3  # the same share of the image as at 48 px


# --------------------------------------------------------------------------- separability


def test_labels_follow_from_parts_but_not_from_mean_colour() -> None:
    """Nearest class mean: perfect on part presence, poor on the mean image colour (no global shortcut)."""
    config = SyntheticConfig(train=200, val=0, test=200)
    train, test = _render_many(config, "train", 200), _render_many(config, "test", 200)

    def nearest_mean_accuracy(features: tuple[np.ndarray, np.ndarray]) -> float:
        means = np.stack([features[0][train[2] == c].mean(0) for c in range(NUM_CLASSES)])
        predicted = np.argmin(((features[1][:, None] - means[None]) ** 2).sum(-1), axis=1)
        return float((predicted == test[2]).mean())

    presence = tuple(
        np.stack([np.bincount(m.ravel(), minlength=len(PART_NAMES))[1 : P + 1] > 0 for m in s[1]])
        for s in (train, test)
    )
    mean_colour = tuple(s[0].astype(float).mean((1, 2)) for s in (train, test))
    assert nearest_mean_accuracy(presence) == 1.0
    assert nearest_mean_accuracy(mean_colour) < 0.5


# --------------------------------------------------------------------------- dataset API


def test_dataset_items_shapes_dtypes_ranges_and_cache() -> None:
    dataset = SyntheticParts(SMALL, "test")
    assert len(dataset) == 100 and dataset.class_names == list(CLASS_NAMES) and dataset.part_names == list(PART_NAMES)
    image, label = dataset[3]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
    assert isinstance(label, int) and label == 3
    part_map = dataset.part_map(3)
    assert part_map.shape == (48, 48) and part_map.dtype == torch.int64
    last_image, last_label = dataset[-1]
    assert last_label == 99 % NUM_CLASSES

    images, labels, maps = dataset.tensors()
    assert images.shape == (100, 3, 48, 48) and images.dtype == torch.uint8
    assert labels.shape == (100,) and labels.dtype == torch.int64
    assert maps.shape == (100, 48, 48) and maps.dtype == torch.uint8 and int(maps.max()) < len(PART_NAMES)
    assert dataset.tensors()[0] is images  # generated once
    cached_image, cached_label = dataset[3]
    torch.testing.assert_close(cached_image, image, rtol=0, atol=0)
    torch.testing.assert_close(dataset[-1][0], last_image, rtol=0, atol=0)
    assert cached_label == label and torch.equal(dataset.part_map(3), part_map)


def test_labels_are_balanced() -> None:
    _, labels, _ = SyntheticParts(SMALL, "train").tensors()
    assert torch.bincount(labels, minlength=NUM_CLASSES).tolist() == [20] * NUM_CLASSES
    uneven = [render_sample(SyntheticConfig(val=25), "val", i)[2] for i in range(25)]
    counts = np.bincount(uneven, minlength=NUM_CLASSES)
    assert counts.max() - counts.min() <= 1


def test_part_map_to_rgb_colours_labels() -> None:
    part_map = np.array([[0, 1], [P, len(PART_NAMES) - 1]])
    rgb = part_map_to_rgb(torch.from_numpy(part_map))
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 1].tolist() == list(PART_TYPES[0].colors[0])
    assert rgb[1, 1].tolist() == list(DISTRACTOR_TYPES[-1].colors[0])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 16},
        {"image_size": 48.0},
        {"seed": -1},
        {"seed": True},
        {"train": -5},
        {"test": 2.5},
        {"max_distractors": 5},
        {"max_distractors": -1},
    ],
)
def test_bad_config_raises(kwargs: dict[str, object]) -> None:
    (value,) = kwargs.values()
    with pytest.raises(ValueError, match=repr(value).replace(".", r"\.")):
        SyntheticConfig(**kwargs)  # type: ignore[arg-type]


def test_bad_split_index_and_map_raise() -> None:
    with pytest.raises(ValueError, match="'training'"):
        SyntheticParts(SMALL, "training")
    with pytest.raises(ValueError, match="'training'"):
        render_sample(SMALL, "training", 0)
    with pytest.raises(ValueError, match="SyntheticConfig"):
        SyntheticParts({"image_size": 48}, "train")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got 60"):
        render_sample(SMALL, "val", 60)
    with pytest.raises(ValueError, match="got -1"):
        render_sample(SMALL, "val", -1)
    with pytest.raises(ValueError, match="got 1.0"):
        render_sample(SMALL, "val", 1.0)  # type: ignore[arg-type]
    dataset = SyntheticParts(SMALL, "val")
    with pytest.raises(IndexError, match="got 60"):
        dataset[60]
    with pytest.raises(IndexError, match="got -61"):
        dataset.part_map(-61)
    with pytest.raises(ValueError, match=str(len(PART_NAMES))):
        part_map_to_rgb(np.array([[len(PART_NAMES)]]))
    with pytest.raises(ValueError, match="float"):
        part_map_to_rgb(np.zeros((2, 2)))
