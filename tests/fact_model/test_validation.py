"""``fact_model._validation``: the checks on images and class specs, their order, and the messages they raise."""

from __future__ import annotations

import re

import pytest
import torch

from fact_model._validation import resolve_classes, validate_images

CPU = torch.device("cpu")
NAMES = ["cat", "dog", "bird"]


def rejected(images: object) -> str:
    with pytest.raises(ValueError) as info:
        validate_images(images, CPU, torch.float32)
    return str(info.value)


# ----------------------------------------------------------------------------- validate_images
def test_a_valid_batch_is_moved_to_the_dtype_and_returned_unchanged():
    images = torch.rand(2, 3, 8, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = validate_images(images, CPU, torch.float32)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 8, 9)
    assert torch.equal(out, images.float())
    assert validate_images(out, CPU, torch.float32).data_ptr() != images.data_ptr()


def test_rounding_overshoot_is_tolerated_and_clamped_into_0_1():
    images = torch.full((1, 3, 8, 8), 0.5)
    images[0, 0, 0, 0], images[0, 1, 0, 0] = 1 + 5e-5, -5e-5
    out = validate_images(images, CPU, torch.float32)
    assert float(out.max()) == 1.0 and float(out.min()) == 0.0
    assert float(images.max()) > 1  # the caller's tensor is not clamped in place


@pytest.mark.parametrize(("value", "kind"), [([[0.5]], "list"), (None, "NoneType"), (0.5, "float")])
def test_not_a_tensor_names_the_type(value, kind):
    assert rejected(value) == f"images must be a torch.Tensor of shape (N, 3, H, W), got {kind}"


def test_one_image_without_a_batch_dimension_gets_the_unsqueeze_hint():
    assert rejected(torch.rand(3, 8, 8)) == (
        "images must have shape (N, 3, H, W), got (3, 8, 8) (for one image use images.unsqueeze(0))"
    )


@pytest.mark.parametrize("shape", [(8, 8), (1, 1, 3, 8, 8), (8,)])
def test_other_ranks_name_the_shape_without_a_hint(shape):
    assert rejected(torch.rand(shape)) == f"images must have shape (N, 3, H, W), got {shape}"


def test_empty_batch():
    assert rejected(torch.rand(0, 3, 8, 8)) == "images is an empty batch (N = 0)"
    assert rejected(torch.rand(0, 1, 2, 2)) == "images is an empty batch (N = 0)"  # checked before the rest


@pytest.mark.parametrize("channels", [1, 4, 6])
def test_channel_count_other_than_3_explains_the_encoding_is_internal(channels):
    assert rejected(torch.rand(2, channels, 8, 8)) == (
        f"images must have 3 (RGB) channels, got {channels} in shape (2, {channels}, 8, 8); "
        "the 6-channel [r,g,b,1-r,1-g,1-b] encoding is applied inside the model"
    )


@pytest.mark.parametrize(("h", "w"), [(7, 8), (8, 7), (1, 1)])
def test_images_smaller_than_8x8_are_refused(h, w):
    assert rejected(torch.rand(1, 3, h, w)) == f"images must be at least 8×8 pixels, got ({h}, {w})"
    validate_images(torch.rand(1, 3, 8, 8), CPU, torch.float32)  # 8×8 is fine


def test_integer_images_are_refused_and_uint8_gets_the_divide_hint():
    assert rejected(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)) == (
        "images must be a floating-point tensor in [0, 1], got dtype torch.uint8 (divide uint8 images by 255)"
    )
    assert rejected(torch.zeros(1, 3, 8, 8, dtype=torch.int32)) == (
        "images must be a floating-point tensor in [0, 1], got dtype torch.int32"
    )
    assert rejected(torch.zeros(1, 3, 8, 8, dtype=torch.bool)).endswith("got dtype torch.bool")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(bad):
    images = torch.rand(2, 3, 8, 8)
    images[1, 2, 3, 4] = bad
    assert rejected(images) == "images contain NaN or infinite values"


@pytest.mark.parametrize(
    ("lo", "hi", "message"),
    [
        (0.0, 1.5, "got min 0 and max 1.5"),
        (-0.25, 1.0, "got min -0.25 and max 1"),
        (0.0, 255.0, "got min 0 and max 255"),
        (0.0, 1.001, "got min 0 and max 1.001"),
    ],
)
def test_values_outside_0_1_give_the_range_found(lo, hi, message):
    images = torch.full((1, 3, 8, 8), 0.5)
    images[0, 0, 0, 0], images[0, 0, 0, 1] = lo, hi
    assert rejected(images) == f"image values must lie in [0, 1], {message}"


# ----------------------------------------------------------------------------- resolve_classes
def test_none_stays_none():
    assert resolve_classes(None, 4, NAMES, "target") is None


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (1, [1, 1, 1]),
        ("bird", [2, 2, 2]),
        (torch.tensor(2), [2, 2, 2]),
        (torch.tensor(0, dtype=torch.int32), [0, 0, 0]),
        ([0, "dog", 2], [0, 1, 2]),
        (("bird", "cat", 1), [2, 0, 1]),
        (torch.tensor([2, 1, 0]), [2, 1, 0]),
    ],
)
def test_one_spec_for_the_batch_or_one_per_image(spec, expected):
    out = resolve_classes(spec, 3, NAMES, "target")
    assert out.dtype == torch.long and out.tolist() == expected


@pytest.mark.parametrize(("spec", "n"), [([0, 1], 3), ([], 1), (torch.tensor([0, 1, 2, 0]), 3)])
def test_one_per_image_must_have_one_entry_per_image(spec, n):
    with pytest.raises(ValueError) as info:
        resolve_classes(spec, n, NAMES, "contrast")
    assert str(info.value) == f"contrast has {len(spec)} entries but the batch has {n} images"


@pytest.mark.parametrize(("index", "n"), [(3, 1), (-1, 1), (10**12, 1), (torch.tensor(3), 2)])
def test_index_out_of_range(index, n):
    with pytest.raises(ValueError) as info:
        resolve_classes(index, n, NAMES, "target")
    assert str(info.value) == f"target class index {int(index)} is out of range [0, 2]"


def test_out_of_range_inside_a_list_is_named():
    with pytest.raises(ValueError, match=re.escape("target class index 7 is out of range [0, 2]")):
        resolve_classes([0, 7], 2, NAMES, "target")


@pytest.mark.parametrize("value", [True, False])
def test_bools_are_not_indices(value):
    for spec in (value, [value]):
        with pytest.raises(ValueError) as info:
            resolve_classes(spec, 1, NAMES, "target")
        assert str(info.value) == f"target must be a class index or name, got {value!r}"


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        resolve_classes("zebra", 1, NAMES, "target")
    assert str(info.value) == "unknown target class name 'zebra'; valid names: 'cat', 'dog', 'bird'"


def test_unknown_name_lists_at_most_20_names():
    names = [f"c{i}" for i in range(25)]
    with pytest.raises(ValueError) as info:
        resolve_classes("C0", 1, names, "target")  # names are case-sensitive
    shown = ", ".join(repr(f"c{i}") for i in range(20))
    assert str(info.value) == f"unknown target class name 'C0'; valid names: {shown}, …"
    assert "'c20'" not in str(info.value)


def test_a_digit_string_is_a_name_not_an_index():
    with pytest.raises(ValueError, match=re.escape("unknown target class name '1'")):
        resolve_classes("1", 1, NAMES, "target")
    assert resolve_classes("1", 1, ["0", "1"], "target").tolist() == [1]


@pytest.mark.parametrize(
    ("spec", "shown"),
    [([1.0], "1.0"), (torch.tensor(1.0), "tensor(1.)"), (torch.tensor([[1]]), "tensor([[1]])"), ([None], "None")],
)
def test_floats_and_other_values_are_refused(spec, shown):
    with pytest.raises(ValueError) as info:
        resolve_classes(spec, 1, NAMES, "target")
    assert str(info.value) == f"target must be a class index (int) or name (str), got {shown}"


def test_a_float_tensor_of_classes_is_refused_per_entry():
    with pytest.raises(ValueError) as info:
        resolve_classes(torch.tensor([0.0, 1.0]), 2, NAMES, "target")
    assert str(info.value) == "target must be a class index (int) or name (str), got 0.0"


@pytest.mark.parametrize(("spec", "kind"), [(1.0, "float"), ({0: 1}, "dict"), ({1}, "set"), (object(), "object")])
def test_non_sequence_specs_are_refused(spec, kind):
    with pytest.raises(ValueError) as info:
        resolve_classes(spec, 1, NAMES, "target")
    assert str(info.value) == f"target must be a class index, a name, or one per image, got {kind}"


def test_a_bool_tensor_is_refused_like_a_bool():
    with pytest.raises(ValueError, match=r"^target must be a class index or name, got tensor\(True\)$"):
        resolve_classes(torch.tensor(True), 1, NAMES, "target")
    with pytest.raises(ValueError, match=r"^target must be a class index or name, got True$"):
        resolve_classes(torch.tensor([1, 0], dtype=torch.bool), 2, NAMES, "target")


def test_numpy_integers_are_indices_and_bytes_are_refused():
    import numpy as np

    assert resolve_classes(np.int64(2), 3, NAMES, "target").tolist() == [2, 2, 2]
    assert resolve_classes([np.int32(1), 0], 2, NAMES, "contrast").tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"^target must be a class index, a name, or one per image, got bytes$"):
        resolve_classes(b"\x01\x00", 2, NAMES, "target")
