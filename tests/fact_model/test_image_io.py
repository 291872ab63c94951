"""Reading images: the one format list, every PIL mode → RGB against numpy references, integrity checks,
JPEG draft decoding, first frames only, and the service's decoding (base64, limits, error reasons)."""

from __future__ import annotations

import base64
import binascii
import colorsys
import io
import struct
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from fact_model import image_io
from fact_model.data import folder
from fact_model.image_io import (
    ACCEPTED_FORMATS,
    IMAGE_EXTENSIONS,
    IMAGE_FORMATS,
    MAX_JPEG_SCANS,
    SUPPORTED_MODES,
    ImageReadError,
    decode_image,
    read_rgb,
    to_rgb,
)
from service import images as service_images
from service.errors import RequestError

RNG_SEED = 0
H, W = 24, 40  # a non-square size, so transposed results would not match


def _encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _reopen(image: Image.Image, fmt: str, **save: object) -> Image.Image:
    opened = Image.open(io.BytesIO(_encode(image, fmt, **save)))
    opened.load()
    return opened


def _rng(offset: int = 0) -> np.random.Generator:
    return np.random.default_rng(RNG_SEED + offset)


def _grey3(levels: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(levels, np.float64)[..., None], 3, axis=-1)


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight alpha composited on white: ``c·a + 255·(1 − a)``."""
    a = np.asarray(alpha, np.float64)[..., None] / 255
    return np.asarray(rgb, np.float64) * a + 255 * (1 - a)


def _patch_tiff_tag(data: bytes, tag: int, value: int) -> bytes:
    """Overwrite a one-value SHORT/LONG tag of the first IFD of a little-endian TIFF (as another writer would)."""
    out = bytearray(data)
    assert out[:2] == b"II"
    ifd = struct.unpack_from("<I", out, 4)[0]
    for i in range(struct.unpack_from("<H", out, ifd)[0]):
        entry = ifd + 2 + 12 * i
        entry_tag, kind, count = struct.unpack_from("<HHI", out, entry)
        if entry_tag == tag:
            assert count == 1
            struct.pack_into("<H" if kind == 3 else "<I", out, entry + 8, value)
            return bytes(out)
    raise KeyError(tag)


# ----------------------------------------------------------------------------- numpy references per mode
def _bilevel():
    bits = _rng(1).random((H, W)) > 0.5
    return _reopen(Image.fromarray(bits), "PNG"), _grey3(bits * 255.0), 0


def _grey():
    levels = _rng(2).integers(0, 256, (H, W), dtype=np.uint8)
    return _reopen(Image.fromarray(levels), "PNG"), _grey3(levels), 0


def _grey_alpha():
    levels, alpha = _rng(3).integers(0, 256, (2, H, W), dtype=np.uint8)
    image = _reopen(Image.fromarray(np.dstack([levels, alpha])), "PNG")
    return image, _on_white(_grey3(levels), alpha), 1


def _grey_premultiplied():
    levels, alpha = _rng(4).integers(0, 256, (2, H, W), dtype=np.uint8)
    premultiplied = (levels.astype(np.uint16) * alpha // 255).astype(np.uint8)
    la = Image.fromarray(np.dstack([premultiplied, alpha]))
    image = Image.open(io.BytesIO(_patch_tiff_tag(_encode(la, "TIFF"), 338, 1)))  # ExtraSamples: associated alpha
    return image, _grey3(premultiplied.astype(np.float64) + 255 - alpha), 1


def _palette_rgb() -> tuple[np.ndarray, np.ndarray]:
    palette = _rng(5).integers(0, 256, (256, 3), dtype=np.uint8)
    indices = _rng(6).integers(0, 256, (H, W), dtype=np.uint8)
    return palette, indices


def _palette_image(palette: np.ndarray, indices: np.ndarray) -> Image.Image:
    image = Image.frombytes("P", (W, H), indices.tobytes())
    image.putpalette(palette.tobytes())
    return image


def _palette():
    palette, indices = _palette_rgb()
    return _reopen(_palette_image(palette, indices), "PNG"), palette[indices].astype(np.float64), 0


def _palette_alpha_png():
    palette, indices = _palette_rgb()
    alphas = _rng(7).integers(0, 256, 256, dtype=np.uint8)
    image = _reopen(_palette_image(palette, indices), "PNG", transparency=alphas.tobytes())  # tRNS per entry
    return image, _on_white(palette[indices], alphas[indices]), 1


def _palette_key_gif():
    palette, indices = _palette_rgb()
    image = _reopen(_palette_image(palette, indices), "GIF", transparency=int(indices[0, 0]))
    alpha = np.where(indices == indices[0, 0], 0, 255)
    return image, _on_white(palette[indices], alpha), 0


def _palette_with_alpha_mode():
    palette, indices = _palette_rgb()
    alpha = _rng(8).integers(0, 256, (H, W), dtype=np.uint8)
    pa = _palette_image(palette, indices).convert("PA")
    pa.putalpha(Image.fromarray(alpha))
    return _reopen(pa, "TIFF"), _on_white(palette[indices], alpha), 1


def _rgb():
    pixels = _rng(9).integers(0, 256, (H, W, 3), dtype=np.uint8)
    return _reopen(Image.fromarray(pixels), "PNG"), pixels.astype(np.float64), 0


def _rgba():
    pixels = _rng(10).integers(0, 256, (H, W, 4), dtype=np.uint8)
    return _reopen(Image.fromarray(pixels), "PNG"), _on_white(pixels[..., :3], pixels[..., 3]), 1


def _rgba_premultiplied():  # no file format keeps RGBa (Pillow un-premultiplies a TIFF's on reading)
    rgb = _rng(11).integers(0, 256, (H, W, 3), dtype=np.uint8)
    alpha = _rng(12).integers(0, 256, (H, W), dtype=np.uint8)
    premultiplied = (rgb.astype(np.uint16) * alpha[..., None] // 255).astype(np.uint8)
    image = Image.frombytes("RGBa", (W, H), np.dstack([premultiplied, alpha]).tobytes())
    return image, premultiplied.astype(np.float64) + 255 - alpha[..., None], 1


def _rgbx():  # in memory: files with padding bytes open as RGB
    pixels = _rng(13).integers(0, 256, (H, W, 4), dtype=np.uint8)
    return Image.frombytes("RGBX", (W, H), pixels.tobytes()), pixels[..., :3].astype(np.float64), 0


def _cmyk():
    cmyk = _rng(14).integers(0, 256, (H, W, 4), dtype=np.uint8)
    image = _reopen(Image.frombytes("CMYK", (W, H), cmyk.tobytes()), "TIFF")
    c = cmyk.astype(np.float64) / 255
    reference = 255 * (1 - c[..., :3]) * (1 - c[..., 3:])
    return image, reference, 1


def _ycbcr():
    ycc = _rng(15).integers(0, 256, (H, W, 3), dtype=np.uint8)
    image = _reopen(Image.frombytes("YCbCr", (W, H), ycc.tobytes()), "TIFF")
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    reference = np.stack(  # JFIF (ITU-R BT.601, full range)
        [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)], -1
    )
    return image, np.clip(reference, 0, 255), 1


def _lab_reference(lightness: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """CIELAB (D50) → sRGB from first principles: XYZ, Bradford adaptation D50 → D65, the IEC sRGB matrix."""
    fy = (lightness + 16) / 116
    f = np.stack([fy + a / 500, fy, fy - b / 200], -1)
    e = 6 / 29
    xyz_d50 = np.where(f > e, f**3, 3 * e * e * (f - 4 / 29)) * np.array([0.96422, 1.0, 0.82521])
    bradford = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
    cone_d50 = bradford @ np.array([0.96422, 1.0, 0.82521])
    cone_d65 = bradford @ np.array([0.95047, 1.0, 1.08883])
    adapt = np.linalg.inv(bradford) @ np.diag(cone_d65 / cone_d50) @ bradford
    srgb_matrix = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])
    linear = np.clip(xyz_d50 @ (srgb_matrix @ adapt).T, 0, 1)
    return 255 * np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def _lab():
    lightness = _rng(16).integers(0, 256, (H, W))
    a, b = _rng(17).integers(-128, 128, (2, H, W))
    raw = np.stack([lightness, a & 255, b & 255], -1).astype(np.uint8)  # TIFF CIELAB: a and b as int8
    image = _reopen(Image.frombytes("LAB", (W, H), raw.tobytes()), "TIFF")
    return image, _lab_reference(lightness * 100 / 255, a.astype(np.float64), b.astype(np.float64)), 1


def _hsv():  # in memory: no file format stores HSV
    hsv = _rng(18).integers(0, 256, (H, W, 3), dtype=np.uint8)
    reference = np.array([colorsys.hsv_to_rgb(*(p / 255)) for p in hsv.reshape(-1, 3)]).reshape(H, W, 3) * 255
    return Image.frombytes("HSV", (W, H), hsv.tobytes()), reference, 1


def _sixteen_bit(mode: str, fmt: str | None):
    def build():
        values = _rng(19).integers(0, 65536, (H, W)).astype(np.uint16)
        order = ">u2" if mode == "I;16B" else "<u2"
        image = Image.frombytes(mode, (W, H), values.astype(order).tobytes())
        if fmt is not None:
            image = _reopen(image, fmt)
        return image, _grey3(values / 65535 * 255), 0

    return build


def _twelve_bit_tiff():
    """A 12-bit grey TIFF (samples packed 2 per 3 bytes, as scientific cameras write them): opens as I;16."""
    values = _rng(26).integers(0, 4096, (H, W)).astype(np.uint16)
    values[0, 0] = 4095
    a, b = values[:, 0::2], values[:, 1::2]
    packed = np.stack([a >> 4, ((a & 15) << 4) | (b >> 8), b & 255], -1).reshape(H, W * 3 // 2).astype(np.uint8)
    data = _encode(Image.fromarray(packed), "TIFF")  # an 8-bit TIFF of the packed bytes, then relabelled
    image = Image.open(io.BytesIO(_patch_tiff_tag(_patch_tiff_tag(data, 256, W), 258, 12)))
    return image, _grey3(values / 4095 * 255), 0


def _int32_holding_16_bit():
    values = _rng(20).integers(0, 65536, (H, W)).astype(np.int32)
    return _reopen(Image.fromarray(values), "TIFF"), _grey3(values / 65535 * 255), 0  # 32-bit signed TIFF


def _int32_holding_8_bit():  # e.g. Image.convert("I") of an L image: Pillow keeps 0..255
    values = _rng(21).integers(0, 256, (H, W)).astype(np.int32)
    return Image.fromarray(values), _grey3(values), 0


def _int32_full_range():
    values = _rng(22).integers(0, 2**31 - 1, (H, W)).astype(np.int32)
    values[0, 0] = 2**31 - 1
    return _reopen(Image.fromarray(values), "TIFF"), _grey3(values / (2**31 - 1) * 255), 0


def _uint32_tiff():
    values = _rng(23).integers(0, 2**32, (H, W), dtype=np.uint64).astype(np.uint32)
    values[0, 0] = 2**32 - 1
    data = _encode(Image.frombytes("I", (W, H), values.tobytes()), "TIFF")
    image = Image.open(io.BytesIO(_patch_tiff_tag(data, 339, 1)))  # SampleFormat: unsigned
    return image, _grey3(values / (2**32 - 1) * 255), 0


def _int16_signed_tiff():
    values = _rng(24).integers(0, 32768, (H, W)).astype(np.uint16)
    image = _reopen(Image.fromarray(values), "TIFF", tiffinfo={339: 2})  # SampleFormat: signed 16-bit
    return image, _grey3(values / 32767 * 255), 0


def _float():
    values = _rng(25).random((H, W), dtype=np.float32)
    values[0, :2] = (0.0, 1.0)
    return _reopen(Image.fromarray(values), "TIFF"), _grey3(values * 255.0), 0


MODE_CASES: dict[str, tuple[str, Callable]] = {
    # name: (mode the opened image has, builder → (image, reference (H, W, 3) float, tolerance in levels))
    "1 PNG": ("1", _bilevel),
    "L PNG": ("L", _grey),
    "LA PNG": ("LA", _grey_alpha),
    "La TIFF (associated alpha)": ("La", _grey_premultiplied),
    "P PNG": ("P", _palette),
    "P PNG with per-entry alpha": ("P", _palette_alpha_png),
    "P GIF with a transparent index": ("P", _palette_key_gif),
    "PA TIFF": ("PA", _palette_with_alpha_mode),
    "RGB PNG": ("RGB", _rgb),
    "RGBA PNG": ("RGBA", _rgba),
    "RGBa in memory": ("RGBa", _rgba_premultiplied),
    "RGBX in memory": ("RGBX", _rgbx),
    "CMYK TIFF": ("CMYK", _cmyk),
    "YCbCr TIFF": ("YCbCr", _ycbcr),
    "LAB TIFF": ("LAB", _lab),
    "HSV in memory": ("HSV", _hsv),
    "I;16 PNG": ("I;16", _sixteen_bit("I;16", "PNG")),
    "I;16B TIFF": ("I;16B", _sixteen_bit("I;16B", "TIFF")),
    "I;16L in memory": ("I;16L", _sixteen_bit("I;16L", None)),
    "I;16N in memory": ("I;16N", _sixteen_bit("I;16N", None)),
    "I;16 TIFF (12-bit)": ("I;16", _twelve_bit_tiff),
    "I TIFF (32-bit, 16-bit data)": ("I", _int32_holding_16_bit),
    "I in memory (8-bit data)": ("I", _int32_holding_8_bit),
    "I TIFF (32-bit, full range)": ("I", _int32_full_range),
    "I TIFF (unsigned 32-bit)": ("I", _uint32_tiff),
    "I TIFF (signed 16-bit)": ("I", _int16_signed_tiff),
    "F TIFF": ("F", _float),
}


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_every_mode_matches_a_numpy_reference(case):
    mode, build = MODE_CASES[case]
    image, reference, tolerance = build()
    assert image.mode == mode, "the test image must really have the mode under test"
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (W, H)
    error = np.abs(np.asarray(rgb).astype(np.float64) - np.rint(reference))
    assert error.max() <= tolerance, (
        f"{case}: {int(error.max())} levels off (at {np.unravel_index(error.argmax(), error.shape)})"
    )
    assert np.asarray(rgb).std() > 20, "the reference must not be trivially flat"


def test_the_cases_cover_every_pillow_mode():
    covered = {mode for mode, _ in MODE_CASES.values()}
    assert set(Image.MODES) <= covered, set(Image.MODES) - covered
    assert set(Image.MODES) <= SUPPORTED_MODES


def test_16_bit_grey_png_is_scaled_not_clipped_to_white():
    """The review's bug: ``convert("RGB")`` clips 16-bit values at 255, so a normal photo became white."""
    values = np.linspace(0, 65535, H * W).reshape(H, W).astype(np.uint16)
    image = _reopen(Image.fromarray(values), "PNG")
    assert image.mode == "I;16"
    assert np.asarray(image.convert("RGB")).mean() > 250  # Pillow's own conversion: the bug
    rgb = np.asarray(to_rgb(image)).astype(np.float64)
    reference = np.rint(values / 257.0)
    assert abs(rgb.mean() - reference.mean()) < 0.5 and 120 < rgb.mean() < 135
    assert np.abs(rgb[..., 0] - reference).max() <= 0 and (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255


def test_16_bit_transparency_key_is_composited_on_white():
    values = _rng(30).integers(0, 65536, (H, W)).astype(np.uint16)
    key = int(values[3, 5])
    image = _reopen(Image.fromarray(values), "PNG", transparency=key)
    assert image.mode == "I;16" and image.info["transparency"] == key
    rgb = np.asarray(to_rgb(image))
    reference = np.where(values == key, 255, np.rint(values / 257.0))
    assert (rgb[..., 1] == reference).all()


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (Image.fromarray(np.full((4, 4), 1.5, np.float32)), r"values in \[1\.5, 1\.5\]; float images are read as"),
        (Image.fromarray(np.array([[0.5, np.nan]], np.float32)), "NaN or infinite"),
        (Image.fromarray(np.array([[0, -3]], np.int32)), r"negative values \(down to -3\)"),
    ],
    ids=["F above 1", "F NaN", "I negative"],
)
def test_values_without_one_meaning_are_refused(image, match):
    with pytest.raises(ImageReadError, match=match) as info:
        to_rgb(image)
    assert info.value.reason == "unsupported_mode" and isinstance(info.value, ValueError)


def test_unknown_mode_is_refused_naming_it():
    image = Image.new("RGB", (2, 2))
    image._mode = "XYZ;7"  # a mode Pillow does not have (as a future or third-party one would be)
    with pytest.raises(ImageReadError, match=r"image mode 'XYZ;7' is not supported; supported modes: 1, CMYK"):
        to_rgb(image)


def test_orientation_is_applied_once_also_to_16_bit_images():
    values = _rng(31).integers(0, 65536, (H, W)).astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise
    image = Image.open(io.BytesIO(_encode(Image.fromarray(values), "PNG", exif=exif.tobytes())))
    assert image.mode == "I;16"
    rgb = to_rgb(image)
    assert rgb.size == (H, W)
    assert (np.asarray(rgb)[..., 0] == np.rint(np.rot90(values, k=-1) / 257.0)).all()
    assert np.array_equal(np.asarray(to_rgb(rgb)), np.asarray(rgb))  # the result carries no orientation


def test_upright_rgb_is_returned_without_a_copy():
    image = Image.new("RGB", (3, 3), (1, 2, 3))
    assert to_rgb(image) is image


# ----------------------------------------------------------------------------- formats
def test_one_format_list_with_extensions_pillow_agrees_on():
    assert ACCEPTED_FORMATS == "JPEG, PNG, WebP, GIF, BMP, TIFF"
    assert folder.IMAGE_EXTENSIONS is IMAGE_EXTENSIONS
    assert set(service_images.ALLOWED_FORMATS) == {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"}
    registered = Image.registered_extensions()
    for fmt in IMAGE_FORMATS:
        for ext in fmt.extensions:
            assert registered[ext] in fmt.pillow, (ext, registered[ext])
    assert {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"} <= IMAGE_EXTENSIONS


def _colour_image() -> Image.Image:
    """Smooth colour ramps (lossy formats keep them within a few levels), ``W × H``."""
    y, x = np.mgrid[0:H, 0:W]
    pixels = np.stack([x * 255 // (W - 1), y * 255 // (H - 1), (x + y) * 255 // (W + H - 2)], -1)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize(
    ("fmt", "save", "lossless"),
    [
        ("PNG", {}, True),
        ("WEBP", {"lossless": True}, True),
        ("GIF", {}, False),
        ("BMP", {}, True),
        ("TIFF", {}, True),
        ("TIFF", {"compression": "tiff_lzw"}, True),
        ("JPEG", {"quality": 95}, False),
        ("JPEG", {"quality": 95, "progressive": True}, False),
    ],
)
def test_every_accepted_format_decodes(fmt, save, lossless):
    image = _colour_image()
    decoded = to_rgb(decode_image(_encode(image, fmt, **save)))
    error = np.abs(np.asarray(decoded).astype(int) - np.asarray(image).astype(int))
    assert decoded.size == image.size
    assert error.max() == 0 if lossless else error.mean() < 6  # GIF: 256-colour palette; JPEG: lossy


def test_mpo_jpeg_with_extra_pictures_is_a_jpeg_and_its_first_picture_is_read():
    first, second = _colour_image(), Image.new("RGB", (W, H), (0, 0, 0))
    data = _encode(first, "MPO", save_all=True, append_images=[second], quality=95)
    image = decode_image(data)
    assert image.format == "MPO"
    assert np.abs(np.asarray(to_rgb(image)).astype(int) - np.asarray(first).astype(int)).mean() < 5


@pytest.mark.parametrize(
    ("data", "reason", "match"),
    [
        (_encode(Image.new("RGB", (16, 16)), "ICO"), "unsupported_format", "image format ICO is not accepted"),
        (_encode(Image.new("RGB", (16, 16)), "PCX"), "unsupported_format", "image format PCX is not accepted"),
        (b"GIF89a but not really", "not_an_image", "not a readable image"),
        (b"hello", "not_an_image", "not a readable image"),
    ],
)
def test_other_formats_are_refused_with_the_accepted_list(data, reason, match):
    with pytest.raises(ImageReadError, match=match) as info:
        decode_image(data)
    assert info.value.reason == reason and ACCEPTED_FORMATS in info.value.message


# ----------------------------------------------------------------------------- truncated and corrupt data
@pytest.mark.parametrize(
    ("fmt", "save"),
    [("PNG", {}), ("WEBP", {}), ("GIF", {}), ("BMP", {}), ("TIFF", {}), ("JPEG", {}), ("JPEG", {"progressive": True})],
)
def test_truncated_files_are_refused_in_every_format(fmt, save):
    data = _encode(Image.fromarray(_rng(41).integers(0, 256, (120, 160, 3), dtype=np.uint8)), fmt, **save)
    with pytest.raises(ImageReadError) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.reason == "corrupt_image", info.value
    assert "truncated" in info.value.message and str(info.value) == info.value.message, info.value


def _tiny_jpeg_claiming(width: int, height: int) -> bytes:
    """An 8×8 JPEG whose frame header is rewritten to a larger size: libjpeg fills the rest in grey."""
    data = bytearray(_encode(Image.fromarray(_rng(42).integers(0, 256, (8, 8, 3), dtype=np.uint8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def test_small_jpeg_declaring_5000x5000_is_refused_before_decoding(monkeypatch):
    data = _tiny_jpeg_claiming(5000, 5000)
    assert len(data) < 1000
    opened = Image.open(io.BytesIO(data))
    opened.load()  # what Pillow alone does: "decodes", 25 megapixels of grey
    assert opened.size == (5000, 5000) and opened.getpixel((4999, 4999)) == (128, 128, 128)

    def no_decoding(self):
        raise AssertionError("decoded before refusing")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageReadError, match=r"truncated: a 5000×5000 image needs at least \d+ bytes") as info:
        decode_image(data)
    assert info.value.reason == "corrupt_image"


def _noise_jpeg(**save: object) -> bytes:
    pixels = _rng(43).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    return _encode(Image.fromarray(pixels), "JPEG", **save)


@pytest.mark.parametrize(
    "save",
    [{}, {"restart_marker_blocks": 4}, {"subsampling": 0}, {"optimize": True}],
    ids=["baseline", "restart markers", "4:4:4", "optimised tables"],
)
@pytest.mark.parametrize("target_size", [None, 48])
def test_jpeg_cut_short_before_its_end_marker_is_refused(save, target_size):
    data = _noise_jpeg(**save)
    for fraction in (0.3, 0.6, 0.95):
        cut = data[: int(len(data) * fraction)] + b"\xff\xd9"  # cut, then closed as some tools do
        opened = Image.open(io.BytesIO(cut))
        opened.load()  # Pillow alone accepts it (libjpeg warns, Pillow drops the warning)
        with pytest.raises(ImageReadError, match="image data ends before the last block") as info:
            decode_image(cut, target_size=target_size)
        assert info.value.reason == "corrupt_image"
    assert decode_image(data, target_size=target_size).size[1] >= (target_size or 240)


@pytest.mark.parametrize(
    ("mode", "grey", "dark"), [("RGB", (128,) * 3, (0,) * 3), ("L", 128, 0), ("CMYK", (128,) * 4, (0, 255, 0, 0))]
)
def test_complete_jpeg_ending_in_mid_grey_is_accepted(mode, grey, dark):
    """The fill check's trigger (a mid-grey last block) fires on these; the second decode clears them."""
    image = Image.new(mode, (64, 48), grey)
    image.paste(Image.new(mode, (20, 20), dark), (5, 5))
    decoded = decode_image(_encode(image, "JPEG", quality=95))
    assert image_io._looks_filled(decoded), "the test image must exercise the second decode"
    assert decoded.size == (64, 48) and decoded.mode == mode


def test_png_with_a_damaged_idat_checksum_is_refused():
    data = bytearray(_encode(_colour_image(), "PNG"))
    data[data.index(b"IDAT") + 20] ^= 0x01
    with pytest.raises(ImageReadError, match="chunk 'IDAT' has a bad checksum") as info:
        decode_image(bytes(data))
    assert info.value.reason == "corrupt_image"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_flood_of_png_chunks_is_refused_before_pillow_parses_them():
    png = _encode(Image.new("RGB", (8, 8)), "PNG")
    flood = _png_chunk(b"zzZz", b"") * (image_io.MAX_PNG_CHUNKS + 10)
    data = png[:33] + flood + png[33:]  # after the signature and IHDR
    started = time.perf_counter()
    with pytest.raises(ImageReadError, match="more than 65536 chunks") as info:
        decode_image(data)
    assert info.value.reason == "too_complex" and time.perf_counter() - started < 2


def test_flood_of_jpeg_segments_is_refused():
    jpeg = _noise_jpeg()
    data = jpeg[:2] + b"\xff\xfe\x00\x02" * 5000 + jpeg[2:]  # 5000 empty comments
    with pytest.raises(ImageReadError, match="more than 1024 marker segments") as info:
        decode_image(data)
    assert info.value.reason == "too_complex"
    assert decode_image(jpeg[:2] + b"\xff\xfe\x00\x02" * 50 + jpeg[2:]).size == (320, 240)  # a few are fine


def test_progressive_jpeg_with_too_many_scans_is_refused():
    data = _encode(Image.new("RGB", (256, 256)), "JPEG", progressive=True)
    last_sos = data.rindex(b"\xff\xda")
    start = max(data.rindex(b"\xff\xc4", 0, last_sos), data.rindex(b"\xff\xda", 0, last_sos))
    last_scan = data[start:-2] if start > data.rindex(b"\xff\xda", 0, last_sos) else data[last_sos:-2]
    bomb = data[:-2] + last_scan * MAX_JPEG_SCANS + data[-2:]  # each repeated scan is another pass over every block
    with pytest.raises(ImageReadError, match=f"more than {MAX_JPEG_SCANS} scans") as info:
        decode_image(bomb)
    assert info.value.reason == "too_complex"
    assert decode_image(data).size == (256, 256)


# ----------------------------------------------------------------------------- JPEG draft decoding
@pytest.mark.parametrize(("target", "scale"), [(48, 8), (200, 4), (400, 2), (700, 1), (1200, 1)])
def test_jpeg_draft_reduces_by_a_power_of_two_keeping_the_short_side(target, scale):
    width, height = 2000, 1200
    data = _encode(Image.new("RGB", (width, height), (200, 10, 10)), "JPEG")
    image = decode_image(data, target_size=target)
    assert image.size == (-(-width // scale), -(-height // scale))
    assert min(image.size) >= min(target, height)
    assert np.abs(np.asarray(image).astype(int).mean(axis=(0, 1)) - (200, 10, 10)).max() < 4


def test_draft_applies_to_jpeg_only_and_checks_its_argument():
    png = _encode(Image.new("RGB", (400, 300)), "PNG")
    assert decode_image(png, target_size=48).size == (400, 300)
    with pytest.raises(ValueError, match="target_size must be a positive int"):
        decode_image(png, target_size=0)


# ----------------------------------------------------------------------------- first frames only
def _frames(count: int) -> list[Image.Image]:
    return [Image.fromarray(_rng(50 + i).integers(0, 256, (H, W, 3), dtype=np.uint8)) for i in range(count)]


@pytest.mark.parametrize(
    ("fmt", "save"),
    [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})],
    ids=["GIF", "APNG", "WebP", "TIFF"],
)
def test_animated_and_multi_page_files_give_their_first_frame(fmt, save):
    frames = _frames(3)
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], **save)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    decoded = np.asarray(to_rgb(decode_image(data))).astype(int)
    first = np.asarray(to_rgb(_reopen(frames[0], fmt, **save))).astype(int)
    assert np.abs(decoded - first).max() <= 1


@pytest.mark.parametrize(("fmt", "count"), [("GIF", 40), ("PNG", 2000)], ids=["GIF", "APNG"])  # GIF saving is slow
def test_frames_after_the_first_are_never_read(fmt, count):
    """Many frames cost nothing: even with everything after the first frame cut away, it decodes."""
    frames = _frames(2) * (count // 2)
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == count
    started = time.perf_counter()
    decoded = decode_image(data)
    elapsed = time.perf_counter() - started
    cut = decode_image(data[: len(data) // 3])
    first = np.asarray(to_rgb(_reopen(frames[0], fmt)))
    assert np.array_equal(np.asarray(to_rgb(decoded)), first) and np.array_equal(np.asarray(to_rgb(cut)), first)
    assert elapsed < 0.5, elapsed


# ----------------------------------------------------------------------------- files (CLI, folders)
def test_read_rgb_names_the_file_for_every_refusal(tmp_path: Path):
    cases = {
        "missing.png": None,
        "icon.png": _encode(Image.new("RGB", (16, 16)), "ICO"),  # the extension lies
        "float.tif": _encode(Image.fromarray(np.full((4, 4), 7.0, np.float32)), "TIFF"),
        "cut.jpg": _noise_jpeg()[:3000],
    }
    reasons = {}
    for name, data in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(ValueError, match=f"cannot read image {path}: ") as info:
            read_rgb(path)
        reasons[name] = info.value.reason
    assert reasons == {
        "missing.png": "unreadable_file",
        "icon.png": "unsupported_format",
        "float.tif": "unsupported_mode",
        "cut.jpg": "corrupt_image",
    }
    good = tmp_path / "good.tif"
    good.write_bytes(_encode(Image.fromarray(np.full((4, 6), 65535, np.uint16)), "TIFF"))
    assert read_rgb(good).getpixel((0, 0)) == (255, 255, 255)


def test_cli_explain_refuses_an_unsupported_file_naming_it(tmp_path: Path, caplog):
    import fact_model
    from fact_model.cli import main
    from tests.conftest import make_model

    artifact = fact_model.save(make_model([("layer3", 16, 2)]), tmp_path / "model")
    icon = tmp_path / "photo.png"
    icon.write_bytes(_encode(Image.new("RGB", (16, 16)), "ICO"))
    assert main(["-q", "explain", str(icon), "--model", str(artifact)]) == 2
    assert f"cannot read image {icon}: image format ICO is not accepted; send one of {ACCEPTED_FORMATS}" in caplog.text


# ----------------------------------------------------------------------------- the service: base64
PAYLOAD = bytes(range(256)) * 3 + b"\xfb\xff"  # bytes whose encoding has +, / (standard) and -, _ (URL-safe)


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(PAYLOAD).decode(),
        base64.b64encode(PAYLOAD).decode() + "\n",
        base64.encodebytes(PAYLOAD).decode(),  # MIME: 76 columns, \n
        base64.encodebytes(PAYLOAD).decode().replace("\n", "\r\n"),
        " \t" + base64.b64encode(PAYLOAD).decode()[:100] + " \v\f " + base64.b64encode(PAYLOAD).decode()[100:],
        base64.b64encode(PAYLOAD).decode().rstrip("="),
        base64.b64encode(PAYLOAD).decode()[:-1],  # one of two '=' missing
        base64.urlsafe_b64encode(PAYLOAD).decode(),
        base64.urlsafe_b64encode(PAYLOAD).decode().rstrip("="),
        "data:image/png;base64," + base64.b64encode(PAYLOAD).decode(),
        "DATA:image/png;name=a.png;BASE64," + base64.encodebytes(PAYLOAD).decode(),
    ],
    ids=[
        "standard",
        "trailing newline",
        "MIME lines",
        "MIME CRLF lines",
        "other whitespace",
        "no padding",
        "partial padding",
        "URL-safe",
        "URL-safe no padding",
        "data URL",
        "data URL, upper case, MIME",
    ],
)
def test_common_base64_variants_decode_to_the_same_bytes(text):
    encoded = base64.b64encode(PAYLOAD).decode()
    assert "+" in encoded and "/" in encoded  # the payload exercises both alphabets' special characters
    assert service_images.decode_base64(text, max_bytes=len(PAYLOAD)) == PAYLOAD


GOOD = base64.b64encode(PAYLOAD).decode()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (GOOD[:40] + "*" + GOOD[40:], r"character '\*' at position 40"),
        (GOOD[:40] + "é" + GOOD[40:], r"character 'é' at position 40"),
        (GOOD[:40] + "=" + GOOD[40:], "'=' may only end the text"),
        (GOOD.rstrip("=") + "===", "'=' may only end the text"),
        (GOOD.rstrip("=")[:-2], "cannot encode whole bytes"),
        (GOOD[:150] + base64.urlsafe_b64encode(PAYLOAD).decode()[150:], r"mixes the standard \(\+ /\) and URL-safe"),
        ("data:image/png," + GOOD, "data: URL must be base64-encoded"),
    ],
    ids=[
        "asterisk",
        "non-ASCII",
        "padding inside",
        "three '='",
        "length 1 mod 4",
        "mixed alphabets",
        "data URL, no base64",
    ],
)
def test_other_base64_is_refused_saying_why(text, match):
    with pytest.raises(RequestError, match=match) as info:
        service_images.decode_base64(text, max_bytes=10_000)
    assert (info.value.status, info.value.reason) == (400, "bad_base64")


def test_base64_size_is_checked_before_decoding(monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the size check")

    monkeypatch.setattr(binascii, "a2b_base64", no_decoding)
    for text in (GOOD, "A" * 10_000_000):
        with pytest.raises(RequestError, match="the limit is|exceeds the limit") as info:
            service_images.decode_base64(text, max_bytes=len(PAYLOAD) - 1)
        assert (info.value.status, info.value.reason) == (413, "too_large")
    for text in ("", " \n ", "data:image/png;base64,\n"):
        with pytest.raises(RequestError) as info:
            service_images.decode_base64(text, max_bytes=100)
        assert (info.value.status, info.value.reason) == (400, "empty_image")
        assert info.value.message == f"the image is empty: send {image_io.ACCEPTED_FORMATS} bytes, base64-encoded"


# ----------------------------------------------------------------------------- the service: images
@pytest.mark.parametrize(
    ("input_size", "expected"),
    [
        (1, 4_194_304),
        (48, 4_194_304),
        (128, 4_194_304),
        (224, 12_845_056),
        (312, 24_920_064),
        (313, 25_000_000),
        (512, 25_000_000),
    ],
)
def test_default_max_pixels(input_size, expected):
    side = 16 * input_size
    assert expected == min(25_000_000, max(2048 * 2048, side * side))
    assert service_images.default_max_pixels(input_size) == expected


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "48", None])
def test_default_max_pixels_refuses_non_sizes(bad):
    with pytest.raises(ValueError, match="input_size must be a positive int"):
        service_images.default_max_pixels(bad)


def _service_decode(data: bytes, max_pixels: int = 25_000_000, **kw: object) -> Image.Image:
    return service_images.decode_image(data, 10 * 2**20, max_pixels, **kw)


@pytest.mark.parametrize(
    ("data", "max_pixels", "status", "reason", "match"),
    [
        (b"", 10**6, 400, "empty_image", "the image is empty"),
        (b"x" * (10 * 2**20 + 1), 10**6, 413, "too_large", "the limit is 10485760"),
        (_encode(Image.new("RGB", (16, 16)), "ICO"), 10**6, 400, "unsupported_format", ACCEPTED_FORMATS),
        (b"not an image at all", 10**6, 400, "not_an_image", ACCEPTED_FORMATS),
        (_encode(Image.new("RGB", (3000, 2000)), "PNG"), 5_999_999, 400, "too_many_pixels", "3000×2000 = 6000000"),
        (_tiny_jpeg_claiming(5000, 5000), 4_194_304, 400, "too_many_pixels", "the limit is 4194304"),
        (_tiny_jpeg_claiming(2000, 2000), 4_194_304, 400, "corrupt_image", "truncated"),
        (_encode(Image.fromarray(np.full((4, 4), 2.0, np.float32)), "TIFF"), 10**6, 400, "unsupported_mode", "[0, 1]"),
    ],
    ids=["empty", "too large", "ICO", "junk", "pixels", "JPEG bomb", "JPEG truncated", "float out of range"],
)
def test_service_decode_refusals(data, max_pixels, status, reason, match):
    with pytest.raises(RequestError) as info:
        service_images.decode_image(data, 10 * 2**20, max_pixels)
    assert (info.value.status, info.value.reason) == (status, reason)
    assert match in info.value.message


def test_service_decode_returns_upright_rgb_by_value_range_and_drafts_jpegs():
    values = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    rgb = _service_decode(_encode(Image.fromarray(values), "PNG"))
    assert rgb.mode == "RGB" and (np.asarray(rgb)[..., 0] == np.rint(values / 257.0)).all()
    jpeg = _encode(Image.new("RGB", (4000, 3000), (30, 120, 220)), "JPEG")
    assert _service_decode(jpeg, target_size=48).size == (500, 375)
    assert _service_decode(jpeg).size == (4000, 3000)


def test_pillow_bomb_limits_are_too_many_pixels_also_where_warnings_are_errors():
    header = _encode(Image.new("1", (10_000, 10_000)), "PNG")  # 100 megapixels: above Pillow's warning limit
    with pytest.warns(Image.DecompressionBombWarning):
        assert image_io.open_image(header).size == (10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageReadError, match="too many pixels") as info:
            image_io.open_image(header)
    assert info.value.reason == "too_many_pixels"
    with pytest.raises(RequestError) as refused, pytest.warns(Image.DecompressionBombWarning):  # its lower limit
        service_images.decode_image(header, 10 * 2**20, 25_000_000)
    assert refused.value.reason == "too_many_pixels" and "10000×10000" in refused.value.message
