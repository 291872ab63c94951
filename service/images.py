"""Decoding untrusted image uploads safely: size, format and pixel limits before any model work."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from service.errors import RequestError

__all__ = ["ALLOWED_FORMATS", "decode_base64", "decode_image"]

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")


def decode_base64(text: str, max_bytes: int) -> bytes:
    """Strict base64 (a ``data:image/...;base64,`` prefix is accepted) → bytes."""
    if not isinstance(text, str) or not text.strip():
        raise RequestError(400, "empty_image", "the image is empty: send JPEG, PNG or WebP bytes, base64-encoded")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    if len(text) > max_bytes * 4 // 3 + 8:
        raise RequestError(413, "too_large", f"the image exceeds the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, "bad_base64", f"the image field is not valid base64: {err}") from None


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """Bytes → a fully decoded PIL image, or a :class:`RequestError`.

    The header is read first: the format must be JPEG, PNG or WebP and the pixel
    count at most ``max_pixels`` (decompression bombs are refused before decoding).
    """
    if not data:
        raise RequestError(400, "empty_image", "the image is empty: send JPEG, PNG or WebP bytes")
    if len(data) > max_bytes:
        raise RequestError(413, "too_large", f"the image has {len(data)} bytes; the limit is {max_bytes}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise RequestError(400, "too_many_pixels", f"the image has too many pixels: {err}") from None
        except UnidentifiedImageError:
            raise RequestError(400, "not_an_image", "the data is not a readable JPEG, PNG or WebP image") from None
        except (OSError, SyntaxError, ValueError) as err:  # e.g. a header cut short
            raise RequestError(400, "corrupt_image", f"the image is truncated or corrupt: {err}") from None
        if image.format not in ALLOWED_FORMATS:
            raise RequestError(
                400, "unsupported_format", f"image format {image.format} is not accepted; send JPEG, PNG or WebP"
            )
        width, height = image.size
        if width * height > max_pixels:
            raise RequestError(
                400,
                "too_many_pixels",
                f"the image is {width}×{height} = {width * height} pixels; the limit is {max_pixels}",
            )
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as err:
            raise RequestError(
                400, "corrupt_image", f"the {image.format} image is truncated or corrupt: {err}"
            ) from None
    return image
