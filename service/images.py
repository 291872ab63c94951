"""Decoding untrusted image uploads safely: size, format and pixel limits before any decoding.

The accepted formats, integrity checks and mode conversion are :mod:`fact_model.image_io`'s (the CLI and
folder datasets read images the same way); this module adds the request limits and maps every refusal to
a :class:`~service.errors.RequestError`.
"""

from __future__ import annotations

import binascii
import re

from PIL import Image

from fact_model import image_io
from fact_model.image_io import ACCEPTED_FORMATS, ImageReadError
from service.errors import RequestError

__all__ = ["ALLOWED_FORMATS", "decode_base64", "decode_image", "default_max_pixels"]

ALLOWED_FORMATS: tuple[str, ...] = tuple(name for f in image_io.IMAGE_FORMATS for name in f.pillow)
"""``Image.format`` values accepted (``fact_model.image_io.IMAGE_FORMATS``; MPO is a JPEG with extra pictures)."""

_MAX_PIXELS_CAP = 25_000_000
_MAX_PIXELS_FLOOR = 4_194_304  # 2048²


def default_max_pixels(input_size: int) -> int:
    """The default pixel limit for a model whose input is ``input_size``² pixels.

    ``min(25_000_000, max(4_194_304, (16 · input_size)²))``: a photo up to 16× the model's input on each
    side — more detail than resizing to the input can use — and at least 2048² (any ordinary photo of a
    small model's inputs), at most 25 megapixels (a 75 MB RGB buffer per image being decoded). With JPEG
    draft decoding (``decode_image(..., target_size=...)``) large JPEGs are cheap anyway: they decode at
    1/8 scale.

    Raises:
        ValueError: ``input_size`` is not a positive int.
    """
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input_size must be a positive int, got {input_size!r}")
    return min(_MAX_PIXELS_CAP, max(_MAX_PIXELS_FLOOR, (16 * input_size) ** 2))


# ----------------------------------------------------------------------------- base64
_WHITESPACE = " \t\n\r\v\f"
_DROP_WHITESPACE = str.maketrans("", "", _WHITESPACE)
_URL_SAFE_TO_STANDARD = str.maketrans("-_", "+/")
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=\-_ \t\n\r\v\f]")  # the two alphabets, padding, ASCII whitespace
_MAX_DATA_URL_HEADER = 256


def decode_base64(text: str, max_bytes: int) -> bytes:
    """Base64 text → bytes, accepting what common encoders produce, refusing anything else.

    Accepted: a ``data:<type>;base64,`` prefix; ASCII whitespace anywhere (trailing newlines, 76-column MIME
    lines with ``\\r\\n`` or ``\\n``); missing ``=`` padding; the URL-safe alphabet (``-``, ``_``) instead of
    the standard one (``+``, ``/``). Refused (400 ``bad_base64``, the message says what and where): any
    other character, ``=`` other than 1–2 at the end, a length no encoder produces, or both alphabets mixed
    (no encoder writes that, so the text is damaged or two texts were joined). The size is checked (413
    ``too_large``) before anything is decoded: ``max_bytes`` is the limit on the decoded bytes.
    """
    if not isinstance(text, str) or not text.strip():
        raise RequestError(400, "empty_image", f"the image is empty: send {ACCEPTED_FORMATS} bytes, base64-encoded")
    if len(text) > 2 * _encoded_length(max_bytes) + _MAX_DATA_URL_HEADER:  # before copying anything
        raise RequestError(413, "too_large", f"the image exceeds the limit of {max_bytes} bytes")
    body = _strip_data_url(text.strip())
    bad = _NOT_BASE64.search(body)
    if bad is not None:
        raise RequestError(
            400,
            "bad_base64",
            f"the image field is not valid base64: character {bad.group()!r} at position {bad.start()} of the "
            "base64 text is not in the base64 alphabet",
        )
    body = body.translate(_DROP_WHITESPACE)
    if not body:
        raise RequestError(400, "empty_image", f"the image is empty: send {ACCEPTED_FORMATS} bytes, base64-encoded")
    body = _standard_alphabet(_padded(body))
    decoded_length = len(body) // 4 * 3 - body.count("=")
    if decoded_length > max_bytes:
        raise RequestError(
            413, "too_large", f"the image has {decoded_length} bytes after base64 decoding; the limit is {max_bytes}"
        )
    try:
        return binascii.a2b_base64(body, strict_mode=True)
    except binascii.Error as err:  # not expected after the checks above; kept as the contract
        raise RequestError(400, "bad_base64", f"the image field is not valid base64: {err}") from None


def _encoded_length(max_bytes: int) -> int:
    return 4 * -(-max_bytes // 3)


def _strip_data_url(text: str) -> str:
    """``data:image/png;base64,AAAA`` → ``AAAA``; text without a ``data:`` prefix is returned as is."""
    if text[:5].lower() != "data:":
        return text
    header, comma, body = text.partition(",")
    if not comma or len(header) > _MAX_DATA_URL_HEADER or not header.lower().endswith(";base64"):
        raise RequestError(
            400, "bad_base64", "a data: URL must be base64-encoded: data:image/<type>;base64,<base64 text>"
        )
    return body


def _padded(body: str) -> str:
    """Check where ``=`` is and how long the text is, then pad to a multiple of 4."""
    data = body.rstrip("=")
    if "=" in data or len(body) - len(data) > 2:
        raise RequestError(400, "bad_base64", "the image field is not valid base64: '=' may only end the text (1 or 2)")
    if len(data) % 4 == 1:
        raise RequestError(
            400,
            "bad_base64",
            f"the image field is not valid base64: {len(data)} characters cannot encode whole bytes "
            "(the text is cut short or has an extra character)",
        )
    return data + "=" * (-len(data) % 4)


def _standard_alphabet(body: str) -> str:
    url_safe = "-" in body or "_" in body
    if url_safe and ("+" in body or "/" in body):
        raise RequestError(
            400,
            "bad_base64",
            "the image field mixes the standard (+ /) and URL-safe (- _) base64 alphabets; use one",
        )
    return body.translate(_URL_SAFE_TO_STANDARD) if url_safe else body


# ----------------------------------------------------------------------------- images
def decode_image(data: bytes, max_bytes: int, max_pixels: int, target_size: int | None = None) -> Image.Image:
    """Bytes of an upload → an upright RGB image, or a :class:`RequestError`.

    Nothing is decoded before the header is checked: the format must be one of
    :data:`fact_model.image_io.IMAGE_FORMATS` and the pixel count at most ``max_pixels`` (dimension and
    decompression bombs cost a header parse). Then the first frame only is decoded (an animated or multi-page
    file's other frames are never read) and refused when truncated or corrupt, and converted to RGB by its
    mode's real value range (:func:`fact_model.image_io.to_rgb`).

    Args:
        data: the uploaded bytes.
        max_bytes: the limit on ``len(data)`` (413 above it).
        max_pixels: the limit on width × height as the header declares it.
        target_size: the smallest short side, in pixels, the model's preprocessing needs (its resize, or its
            input size). A JPEG then decodes at 1/2, 1/4 or 1/8 scale while its short side stays ≥
            ``target_size``; ``None`` decodes at full size.

    Returns:
        An ``RGB`` image (EXIF orientation applied), at most ``max_pixels`` pixels.

    Raises:
        RequestError: 400 ``empty_image``, ``not_an_image``, ``unsupported_format`` (the message lists the
            accepted formats), ``too_many_pixels``, ``too_complex``, ``corrupt_image``, ``unsupported_mode``;
            413 ``too_large``.
    """
    if not data:
        raise RequestError(400, "empty_image", f"the image is empty: send {ACCEPTED_FORMATS} bytes")
    if len(data) > max_bytes:
        raise RequestError(413, "too_large", f"the image has {len(data)} bytes; the limit is {max_bytes}")
    try:
        # No warnings filter for Pillow's DecompressionBombWarning: filters are process-wide and not thread-safe,
        # and the pixel limit below is stricter than Pillow's (its error, at 2× its limit, is mapped below).
        image = image_io.open_image(data)
        _check_pixels(image, max_pixels)
        return image_io.to_rgb(image_io.load_image(image, data, target_size))
    except ImageReadError as err:
        raise RequestError(400, err.reason, err.message) from None
    except (OSError, ValueError) as err:  # a Pillow conversion failing on a malformed file: still the client's
        raise RequestError(400, "corrupt_image", f"the image cannot be read: {err}") from None


def _check_pixels(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(
            400,
            "too_many_pixels",
            f"the image is {width}×{height} = {width * height} pixels; the limit is {max_pixels}",
        )
