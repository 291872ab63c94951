"""``service.images`` in-process: base64 variants, image decoding and the pixel limit, each refusal's status,
reason and message (the HTTP tests in test_hardening.py cover the same paths through a server)."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from fact_model.image_io import ACCEPTED_FORMATS
from service.errors import RequestError
from service.images import ALLOWED_FORMATS, decode_base64, decode_image, default_max_pixels

MAX = 1 << 20
PAYLOAD = bytes(range(256)) * 3  # every byte value: the encodings contain + and / (or - and _)


def refused(call, *args, **kwargs) -> RequestError:
    with pytest.raises(RequestError) as info:
        call(*args, **kwargs)
    return info.value


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient(width: int, height: int, mode: str = "RGB") -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8)).convert(mode)


# ----------------------------------------------------------------------------- default_max_pixels
@pytest.mark.parametrize(
    ("input_size", "expected"),
    [
        (1, 2048**2),
        (48, 2048**2),
        (128, 2048**2),
        (129, (16 * 129) ** 2),
        (224, 3584**2),
        (312, 4992**2),
        (313, 25_000_000),
        (4096, 25_000_000),
    ],
)
def test_default_max_pixels_is_16x_the_input_between_2048_squared_and_25_megapixels(input_size, expected):
    assert default_max_pixels(input_size) == expected


@pytest.mark.parametrize("bad", [0, -1, True, 48.0, "48", None])
def test_default_max_pixels_refuses_what_is_not_a_positive_int(bad):
    with pytest.raises(ValueError, match=re.escape(f"input_size must be a positive int, got {bad!r}")):
        default_max_pixels(bad)


# ----------------------------------------------------------------------------- decode_base64: accepted
def test_standard_base64_round_trips():
    text = base64.b64encode(PAYLOAD).decode()
    assert "+" in text and "/" in text
    assert decode_base64(text, MAX) == PAYLOAD


@pytest.mark.parametrize(
    "prefix", ["data:image/png;base64,", "DATA:IMAGE/PNG;BASE64,", "data:application/octet-stream;base64,"]
)
def test_data_url_prefix_is_stripped(prefix):
    assert decode_base64(prefix + base64.b64encode(PAYLOAD).decode(), MAX) == PAYLOAD


def test_url_safe_alphabet_is_accepted():
    text = base64.urlsafe_b64encode(PAYLOAD).decode()
    assert "-" in text and "_" in text and "+" not in text and "/" not in text
    assert decode_base64(text, MAX) == PAYLOAD


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_missing_padding_is_accepted(n):
    data = PAYLOAD[:n]
    text = base64.b64encode(data).decode().rstrip("=")
    assert decode_base64(text, MAX) == data
    assert decode_base64(base64.urlsafe_b64encode(data).decode().rstrip("="), MAX) == data


def test_mime_lines_and_surrounding_whitespace_are_accepted():
    lines = base64.encodebytes(PAYLOAD).decode()  # 76-column lines ending in \n
    assert lines.count("\n") > 5
    assert decode_base64(lines, MAX) == PAYLOAD
    assert decode_base64(lines.replace("\n", "\r\n"), MAX) == PAYLOAD
    assert decode_base64(" \t" + lines + "\n\n", MAX) == PAYLOAD


def test_decoded_size_exactly_at_the_limit_is_accepted():
    assert decode_base64(base64.b64encode(PAYLOAD[:6]).decode(), 6) == PAYLOAD[:6]
    assert decode_base64(base64.b64encode(PAYLOAD[:5]).decode(), 5) == PAYLOAD[:5]  # one '=' of padding


# ----------------------------------------------------------------------------- decode_base64: refused
EMPTY = f"the image is empty: send {ACCEPTED_FORMATS} bytes, base64-encoded"


@pytest.mark.parametrize(
    "text", ["", "   ", "\n\r\n", "data:image/png;base64,", "data:image/png;base64, \n", None, b"QUJD"]
)
def test_empty_or_non_text_is_empty_image(text):
    err = refused(decode_base64, text, MAX)
    assert (err.status, err.reason, err.message) == (400, "empty_image", EMPTY)


@pytest.mark.parametrize(
    ("text", "character", "position"),
    [("QUJD*REVG", "*", 4), ("QUJD REVG!", "!", 9), ("QUJDé", "é", 4), ("data:image/png;base64,QU.J", ".", 2)],
)
def test_a_character_outside_both_alphabets_is_named_with_its_position(text, character, position):
    err = refused(decode_base64, text, MAX)
    assert (err.status, err.reason) == (400, "bad_base64")
    assert err.message == (
        f"the image field is not valid base64: character {character!r} at position {position} of the base64 text "
        "is not in the base64 alphabet"
    )


@pytest.mark.parametrize(
    "text", ["data:image/png,QUJD", "data:image/png;base64QUJD", "data:" + "x" * 300 + ";base64,QUJD"]
)
def test_a_data_url_that_is_not_base64_is_refused(text):
    err = refused(decode_base64, text, MAX)
    assert (err.status, err.reason, err.message) == (
        400,
        "bad_base64",
        "a data: URL must be base64-encoded: data:image/<type>;base64,<base64 text>",
    )


@pytest.mark.parametrize("text", ["QU=JD", "QUJD===", "=QUJD", "QU==JD=="])
def test_padding_anywhere_but_1_or_2_at_the_end_is_refused(text):
    err = refused(decode_base64, text, MAX)
    assert (err.status, err.reason, err.message) == (
        400,
        "bad_base64",
        "the image field is not valid base64: '=' may only end the text (1 or 2)",
    )


@pytest.mark.parametrize("text", ["Q", "QUJDR", "QUJDREVGS", "QUJD R===".replace("=", "")])
def test_a_length_no_encoder_produces_is_refused(text):
    n = len(text.replace(" ", ""))
    assert n % 4 == 1
    err = refused(decode_base64, text, MAX)
    assert (err.status, err.reason) == (400, "bad_base64")
    assert err.message == (
        f"the image field is not valid base64: {n} characters cannot encode whole bytes "
        "(the text is cut short or has an extra character)"
    )


@pytest.mark.parametrize("text", ["ab+c-d==", "ab/c_d==", "+/-_"])
def test_mixed_alphabets_are_refused(text):
    err = refused(decode_base64, text, MAX)
    assert (err.status, err.reason, err.message) == (
        400,
        "bad_base64",
        "the image field mixes the standard (+ /) and URL-safe (- _) base64 alphabets; use one",
    )


def test_more_decoded_bytes_than_the_limit_is_413_with_both_numbers():
    err = refused(decode_base64, base64.b64encode(PAYLOAD[:7]).decode(), 6)
    assert (err.status, err.reason, err.message) == (
        413,
        "too_large",
        "the image has 7 bytes after base64 decoding; the limit is 6",
    )


def test_text_far_beyond_the_limit_is_413_before_it_is_parsed():
    # over twice the encoded limit (+ a data: header's worth): refused on its length alone, junk or not
    err = refused(decode_base64, "*" * (2 * 8 + 256 + 1), 6)
    assert (err.status, err.reason, err.message) == (413, "too_large", "the image exceeds the limit of 6 bytes")
    err = refused(decode_base64, "*" * (2 * 8 + 256), 6)  # at the bound: parsed, so the junk is named
    assert err.reason == "bad_base64"


# ----------------------------------------------------------------------------- decode_image
def test_every_allowed_format_decodes_to_the_same_rgb_pixels():
    image = gradient(40, 30)
    expected = np.asarray(image)
    for fmt in ("PNG", "BMP", "TIFF", "GIF", "WEBP"):
        options = {"lossless": True} if fmt == "WEBP" else {}
        source = image.quantize(256).convert("RGB") if fmt == "GIF" else image
        out = decode_image(encoded(source, fmt, **options), MAX, 10_000)
        assert out.mode == "RGB" and out.size == (40, 30), fmt
        assert np.array_equal(np.asarray(out), np.asarray(source)), fmt
    assert np.array_equal(np.asarray(decode_image(encoded(image, "PNG"), MAX, 1200)), expected)
    assert {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"} == set(ALLOWED_FORMATS)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16"])
def test_other_modes_come_back_as_rgb(mode):
    out = decode_image(encoded(gradient(16, 16, "L" if mode == "I;16" else mode), "PNG"), MAX, 10_000)
    assert out.mode == "RGB" and out.size == (16, 16)


def test_empty_bytes_are_empty_image():
    err = refused(decode_image, b"", MAX, 10_000)
    assert (err.status, err.reason, err.message) == (
        400,
        "empty_image",
        f"the image is empty: send {ACCEPTED_FORMATS} bytes",
    )


def test_more_bytes_than_the_limit_is_413_before_decoding():
    data = encoded(gradient(16, 16), "PNG")
    err = refused(decode_image, data, len(data) - 1, 10_000)
    assert (err.status, err.reason, err.message) == (
        413,
        "too_large",
        f"the image has {len(data)} bytes; the limit is {len(data) - 1}",
    )
    assert decode_image(data, len(data), 10_000).size == (16, 16)  # exactly at the limit


@pytest.mark.parametrize("data", [b"hello, not an image", b"\x00" * 64, b"{}"])
def test_bytes_that_are_no_image_are_not_an_image(data):
    err = refused(decode_image, data, MAX, 10_000)
    assert (err.status, err.reason, err.message) == (
        400,
        "not_an_image",
        f"the data is not a readable image (accepted formats: {ACCEPTED_FORMATS})",
    )


def test_a_format_pillow_knows_but_the_service_refuses_is_named():
    err = refused(decode_image, encoded(gradient(16, 16), "PPM"), MAX, 10_000)
    assert (err.status, err.reason, err.message) == (
        400,
        "unsupported_format",
        f"image format PPM is not accepted; send one of {ACCEPTED_FORMATS}",
    )


def test_too_many_pixels_is_refused_from_the_header_with_the_numbers():
    data = encoded(gradient(100, 50), "PNG")
    err = refused(decode_image, data, MAX, 4999)
    assert (err.status, err.reason, err.message) == (
        400,
        "too_many_pixels",
        "the image is 100×50 = 5000 pixels; the limit is 4999",
    )
    assert decode_image(data, MAX, 5000).size == (100, 50)  # exactly at the limit


def test_truncated_image_is_corrupt():
    data = encoded(gradient(64, 64), "JPEG", quality=90)
    err = refused(decode_image, data[: len(data) // 2], MAX, 10_000)
    assert (err.status, err.reason) == (400, "corrupt_image")
    assert err.message.startswith("the image") and ("truncated" in err.message or "corrupt" in err.message)


def test_jpeg_decodes_at_the_smallest_scale_that_keeps_the_target_size():
    data = encoded(gradient(800, 640), "JPEG", quality=90)
    assert decode_image(data, MAX, 10**6).size == (800, 640)  # no target: full size
    assert decode_image(data, MAX, 10**6, target_size=48).size == (100, 80)  # 1/8: short side 80 ≥ 48
    assert decode_image(data, MAX, 10**6, target_size=100).size == (200, 160)  # 1/4: 1/8 would give 80 < 100
    assert decode_image(data, MAX, 10**6, target_size=640).size == (800, 640)
    # the pixel limit applies to the declared size, not the draft one
    err = refused(decode_image, data, MAX, 800 * 640 - 1, target_size=48)
    assert err.reason == "too_many_pixels" and "800×640 = 512000 pixels" in err.message
