"""PIL → tensor preprocessing as recorded in the manifest."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from fact_model.config import Preprocessing
from fact_model.preprocessing import preprocess_images, to_rgb
from tests.conftest import make_model


def test_modes_and_sizes_become_rgb_at_input_size():
    images = [
        Image.new("L", (50, 30), 128),
        Image.new("RGBA", (17, 90), (255, 0, 0, 255)),
        Image.new("P", (40, 40)),
        Image.new("RGB", (8, 8), (0, 0, 255)),
    ]
    batch = preprocess_images(images, Preprocessing(32))
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float32
    assert 0 <= batch.min() and batch.max() <= 1
    torch.testing.assert_close(batch[0], torch.full((3, 32, 32), 128 / 255))
    torch.testing.assert_close(batch[1, :, 10, 10], torch.tensor([1.0, 0.0, 0.0]))


def test_transparency_is_composited_on_white():
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(transparent).getpixel((1, 1)) == (255, 255, 255)


def test_exif_orientation_is_honoured():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    loaded = Image.open(io.BytesIO(buffer.getvalue()))
    rgb = to_rgb(loaded)
    assert rgb.size == (20, 40)  # portrait after applying the orientation
    assert sum(rgb.getpixel((10, 5))) > 600 and sum(rgb.getpixel((10, 35))) < 100  # white on top


def test_resize_then_center_crop():
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 12, 32))  # white left strip is cropped away
    batch = preprocess_images(image, Preprocessing(16, resize=16))
    assert batch.shape == (1, 3, 16, 16)
    assert batch.max() < 0.05


def test_model_preprocess_and_errors():
    model = make_model([("layer3", 16, 2)])
    batch = model.preprocess([Image.new("RGB", (100, 60), (10, 200, 30))])
    assert batch.shape == (1, 3, 32, 32)
    assert model.explain(batch).residual.item() < 1e-4
    with pytest.raises(ValueError, match="no images"):
        preprocess_images([], Preprocessing(32))
    with pytest.raises(ValueError, match="PIL images"):
        preprocess_images([torch.zeros(3, 4, 4)], Preprocessing(32))
    with pytest.raises(ValueError, match="resize"):
        Preprocessing(32, resize=16)


def test_high_bit_depth_is_scaled_by_its_range_and_bad_values_refused():
    import numpy as np

    grey16 = Image.fromarray(np.full((20, 30), 32896, np.uint16))  # 32896 / 257 = 128
    assert grey16.mode == "I;16"
    torch.testing.assert_close(preprocess_images(grey16, Preprocessing(8)), torch.full((1, 3, 8, 8), 128 / 255))
    with pytest.raises(ValueError, match=r"mode-F .* values in \[0, 2\]"):
        preprocess_images(Image.fromarray(np.linspace(0, 2, 16, dtype=np.float32).reshape(4, 4)), Preprocessing(8))
