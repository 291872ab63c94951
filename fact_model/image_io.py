"""Reading images for the model: one list of accepted formats, integrity checks, and every PIL mode → RGB.

The service (``service/images.py``), the CLI (``fact explain``) and image-folder datasets all read through
this module, so they accept the same files and see the same pixels:

* :data:`IMAGE_FORMATS` — JPEG (also MPO: JPEGs with extra pictures, e.g. gain maps), PNG (APNG: first
  frame), WebP, GIF, BMP and TIFF; only the first frame of an animated or multi-page file is read.
  :data:`IMAGE_EXTENSIONS` are their file extensions.
* :func:`open_image` reads the header only; :func:`load_image` decodes the first frame (optionally at a
  reduced JPEG scale) and refuses truncated or corrupt data; :func:`decode_image` does both.
  :func:`read_image` / :func:`read_rgb` read a file, with errors that name it.
* :func:`to_rgb` turns any PIL mode into 8-bit RGB by the mode's real value range.

Every refusal is an :class:`ImageReadError` (a ``ValueError``) whose ``reason`` says which check failed.
"""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

__all__ = [
    "ACCEPTED_FORMATS",
    "IMAGE_EXTENSIONS",
    "IMAGE_FORMATS",
    "MAX_JPEG_SCANS",
    "MAX_PNG_CHUNKS",
    "SUPPORTED_MODES",
    "ImageFormat",
    "ImageReadError",
    "decode_image",
    "load_image",
    "open_image",
    "read_image",
    "read_rgb",
    "to_rgb",
]


# ----------------------------------------------------------------------------- formats
@dataclass(frozen=True)
class ImageFormat:
    """One accepted file format.

    Attributes:
        name: the name shown to users (e.g. ``"WebP"``).
        pillow: the ``Image.format`` values Pillow reports for it; the first is the plugin that opens it.
        extensions: lower-case file extensions, with the dot.
    """

    name: str
    pillow: tuple[str, ...]
    extensions: tuple[str, ...]


IMAGE_FORMATS: tuple[ImageFormat, ...] = (
    ImageFormat("JPEG", ("JPEG", "MPO"), (".jpg", ".jpeg", ".jpe", ".jfif")),
    ImageFormat("PNG", ("PNG",), (".png", ".apng")),
    ImageFormat("WebP", ("WEBP",), (".webp",)),
    ImageFormat("GIF", ("GIF",), (".gif",)),
    ImageFormat("BMP", ("BMP",), (".bmp",)),
    ImageFormat("TIFF", ("TIFF",), (".tif", ".tiff")),
)
"""The image formats the service, the CLI and folder datasets accept (first frame of multi-frame files)."""

ACCEPTED_FORMATS: str = ", ".join(f.name for f in IMAGE_FORMATS)
"""The accepted formats as text for messages: ``"JPEG, PNG, WebP, GIF, BMP, TIFF"``."""

IMAGE_EXTENSIONS: frozenset[str] = frozenset(ext for f in IMAGE_FORMATS for ext in f.extensions)
"""File extensions (lower case, with the dot) of :data:`IMAGE_FORMATS`."""

_OPENERS = tuple(f.pillow[0] for f in IMAGE_FORMATS)
_PILLOW_FORMATS = frozenset(name for f in IMAGE_FORMATS for name in f.pillow)
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})

MAX_JPEG_SCANS = 64
"""Most scans a JPEG may have. Every progressive scan is a pass over all of the image's blocks, so a small
file with thousands of scans costs minutes of CPU; encoders write about 10 (libjpeg, mozjpeg)."""

_MAX_JPEG_SEGMENTS = 1024  # marker segments before the first scan (real files: tens); Pillow parses each in Python
MAX_PNG_CHUNKS = 65_536
"""Most PNG chunks read up to the end of the first frame's data (real files: a few hundred, or one per row
for some encoders); each chunk costs Pillow a Python call, so a 10 MB file of empty chunks costs seconds."""


class ImageReadError(ValueError):
    """An image that cannot be used, with a machine-readable ``reason``.

    Reasons: ``unreadable_file`` (the file cannot be read), ``not_an_image``, ``unsupported_format``,
    ``too_many_pixels`` (Pillow's decompression-bomb limit), ``too_complex`` (more JPEG scans or segments,
    or PNG chunks, than a real image has), ``corrupt_image`` (truncated or damaged data),
    ``unsupported_mode`` (a pixel mode or value range :func:`to_rgb` cannot convert).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _corrupt(message: str) -> ImageReadError:
    return ImageReadError("corrupt_image", message)


# ----------------------------------------------------------------------------- JPEG structure
_JPEG_FILL = re.compile(rb"\xff+")
_JPEG_NEXT_FF = re.compile(rb"\xff")
_JPEG_SCAN_END = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")  # a marker other than stuffing or RSTn
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_SEQUENTIAL_HUFFMAN = frozenset({0xC0, 0xC1})
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_JPEG_PADDING = bytes(range(1, 255))  # inserted after the last scan by the fill check; no 0x00 or 0xFF


@dataclass(frozen=True)
class _JpegHeader:
    sof: int  # the SOFn marker byte
    width: int
    height: int
    sampling: tuple[tuple[int, int], ...]  # (h, v) sampling factors per component
    scan_start: int  # offset of the first SOS marker


def _jpeg_segments(data: bytes, max_segments: int, *, through_scans: bool = True):
    """Yield ``(marker, start, end)`` per marker of the first image in ``data``, SOI excluded, EOI included.

    ``end`` is where the next marker may start (for SOS: the end of its entropy-coded data). Bytes that are
    not a marker where one is expected are skipped, as libjpeg does. Stops after EOI (bytes after it, e.g. an
    MPO's other pictures, are not read), or with ``through_scans=False`` at the first SOS, whose ``end`` is
    then the end of its header (finding the end of the scan data means searching all of it).

    Raises:
        ImageReadError: ``too_complex`` after ``max_segments`` markers; ``corrupt_image`` when the data ends
            inside a segment or scan.
    """
    pos, size = 2, len(data)
    for _ in range(max_segments):
        found = _JPEG_NEXT_FF.search(data, pos) if pos < size and data[pos] != 0xFF else None
        if found is not None:
            pos = found.start()
        fill = _JPEG_FILL.match(data, pos)
        if fill is None or fill.end() >= size:
            raise _corrupt("the JPEG data ends before its end-of-image marker")
        pos = fill.end() - 1
        marker = data[pos + 1]
        if marker == _JPEG_EOI:
            yield marker, pos, pos + 2
            return
        if marker in _JPEG_STANDALONE:
            yield marker, pos, pos + 2
            pos += 2
            continue
        if pos + 4 > size:
            raise _corrupt("the JPEG data ends inside a marker segment")
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if end > size:
            raise _corrupt(f"the JPEG data ends inside a segment (marker 0x{marker:02X})")
        if marker == _JPEG_SOS and not through_scans:
            yield marker, pos, end
            return
        if marker == _JPEG_SOS:
            scan_end = _JPEG_SCAN_END.search(data, end)
            if scan_end is None:
                raise _corrupt("the JPEG data ends inside a scan")
            end = scan_end.start()
        yield marker, pos, end
        pos = end
    raise ImageReadError("too_complex", f"the JPEG has more than {max_segments} marker segments")


def _jpeg_header(data: bytes) -> _JpegHeader | None:
    """The frame header and where the first scan starts; ``None`` when there is no SOF before it.

    Raises:
        ImageReadError: as :func:`_jpeg_segments` (e.g. a flood of segments before the first scan).
    """
    sof: tuple[int, int, int, tuple[tuple[int, int], ...]] | None = None
    for marker, start, _ in _jpeg_segments(data, _MAX_JPEG_SEGMENTS, through_scans=False):
        if marker in _JPEG_SOF and sof is None and start + 10 <= len(data):
            height, width = struct.unpack_from(">HH", data, start + 5)
            count = data[start + 9]
            fields = data[start + 10 : start + 10 + 3 * count]
            sampling = tuple((fields[i + 1] >> 4, fields[i + 1] & 15) for i in range(0, len(fields) - 2, 3))
            sof = (marker, width, height, sampling)
        elif marker == _JPEG_SOS:
            return None if sof is None else _JpegHeader(*sof, scan_start=start)
        elif marker == _JPEG_EOI:
            return None
    return None


def _jpeg_min_entropy_bytes(header: _JpegHeader) -> int:
    """A lower bound on the entropy-coded bytes of a sequential Huffman JPEG of this size.

    Every 8×8 block costs at least 2 bits (a DC code and an end-of-block code, each ≥ 1 bit), so this is
    exact as a refusal criterion: no complete image can be smaller.
    """
    h_max = max((h for h, _ in header.sampling), default=1) or 1
    v_max = max((v for _, v in header.sampling), default=1) or 1
    blocks = 0
    for h, v in header.sampling:
        columns = -(-header.width * h // h_max)
        rows = -(-header.height * v // v_max)
        blocks += -(-columns // 8) * -(-rows // 8)
    return blocks * 2 // 8


def _check_jpeg_before_decode(data: bytes) -> None:
    """Refuse a JPEG that cannot be complete, or whose scans would cost too much, before decoding it.

    Raises:
        ImageReadError: ``corrupt_image`` (a sequential JPEG smaller than its declared size allows — the
            rest would be filled in grey), ``too_complex`` (more than :data:`MAX_JPEG_SCANS` scans).
    """
    try:
        header = _jpeg_header(data)
    except ImageReadError as err:
        if err.reason != "corrupt_image":
            raise
        return  # a header this parser cannot follow: libjpeg decides
    if header is None:
        return
    if header.sof in _JPEG_SEQUENTIAL_HUFFMAN:
        needed = _jpeg_min_entropy_bytes(header)
        available = len(data) - header.scan_start
        if available < needed:
            raise _corrupt(
                f"the JPEG is truncated: a {header.width}×{header.height} image needs at least {needed} bytes of "
                f"image data, the file has {available}"
            )
    # b"\xff\xda" cannot occur inside scan data, so counting it is a cheap upper bound on the scans
    if data.count(b"\xff\xda") > MAX_JPEG_SCANS and _jpeg_scan_count(data) > MAX_JPEG_SCANS:
        raise ImageReadError("too_complex", f"the JPEG has more than {MAX_JPEG_SCANS} scans; re-encode it")


def _jpeg_scan_count(data: bytes) -> int:
    # SOS markers of the first image only (an EXIF thumbnail or an MPO's other pictures have their own)
    limit = _MAX_JPEG_SEGMENTS + 4 * MAX_JPEG_SCANS
    return sum(marker == _JPEG_SOS for marker, _, _ in _jpeg_segments(data, limit))


def _jpeg_last_scan_end(data: bytes) -> int | None:
    """Offset of the marker that ends the first image's last scan, or ``None`` if it cannot be found."""
    end = None
    try:
        for marker, _, segment_end in _jpeg_segments(data, _MAX_JPEG_SEGMENTS + 4 * MAX_JPEG_SCANS):
            if marker == _JPEG_SOS:
                end = segment_end
    except ImageReadError:
        return None
    return end


def _looks_filled(image: Image.Image) -> bool:
    """Whether the bottom-right pixel has the value libjpeg fills missing data with (mid-grey, 127 or 128)."""
    width, height = image.size
    pixel = image.getpixel((width - 1, height - 1))
    values = pixel if isinstance(pixel, tuple) else (pixel,)
    return all(value in (127, 128) for value in values)


def _check_jpeg_not_filled(image: Image.Image, data: bytes, target_size: int | None) -> None:
    """Refuse a JPEG whose scan data ended early at a marker (libjpeg then only warns and fills grey).

    Pillow drops libjpeg's warnings, so this is checked by decoding a second time with filler bytes inserted
    before the marker that ends the last scan: a complete image ignores bytes after its last block and decodes
    the same; one whose data ran out decodes its missing blocks from the filler instead of as grey. The second
    decode runs only when the last block looks filled (mid-grey), i.e. rarely for complete images.

    Raises:
        ImageReadError: ``corrupt_image``.
    """
    if not _looks_filled(image):
        return
    end = _jpeg_last_scan_end(data)
    if end is None:
        return
    try:
        padded = Image.open(io.BytesIO(data[:end] + _JPEG_PADDING + data[end:]), formats=["JPEG"])
        if target_size is not None:
            padded.draft("RGB", (target_size, target_size))
        padded.load()
    except _DECODE_ERRORS:
        padded = None  # a complete image would have decoded exactly as before
    if padded is None or padded.tobytes() != image.tobytes():
        raise _corrupt("the JPEG is truncated or corrupt: its image data ends before the last block")


# ----------------------------------------------------------------------------- PNG structure
def _png_chunks(data: bytes):
    """Yield ``(kind, start, end)`` per PNG chunk up to the end of the first frame's data.

    Chunks after it (APNG frames, trailing metadata) are not read: the first frame is all that is decoded.

    Raises:
        ImageReadError: ``too_complex`` after :data:`MAX_PNG_CHUNKS` chunks, ``corrupt_image`` when cut short.
    """
    pos, size, seen_data = 8, len(data), False
    for _ in range(MAX_PNG_CHUNKS):
        if pos + 12 > size:
            raise _corrupt("the PNG is truncated: it ends before its image data does")
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > size:
            raise _corrupt(f"the PNG is truncated: chunk {kind.decode('latin-1')!r} is cut short")
        if kind != b"IDAT" and (seen_data or kind == b"IEND"):
            return
        seen_data = seen_data or kind == b"IDAT"
        yield kind, pos, end
        pos = end
    raise ImageReadError("too_complex", f"the PNG has more than {MAX_PNG_CHUNKS} chunks before its image data ends")


def _limit_png_chunks(data: bytes) -> None:
    """Refuse a flood of chunks before Pillow parses them (one Python call each: a 10 MB file costs seconds)."""
    try:
        for _ in _png_chunks(data):
            pass
    except ImageReadError as err:
        if err.reason != "corrupt_image":
            raise  # truncation is reported by the checksum walk, after the pixel limit


def _check_png_checksums(data: bytes) -> None:
    """Check every chunk's CRC up to the end of the first frame's data (Pillow checks none of IDAT's).

    Raises:
        ImageReadError: ``corrupt_image`` (cut short, bad checksum), ``too_complex`` (too many chunks).
    """
    view = memoryview(data)
    for kind, start, end in _png_chunks(data):
        if zlib.crc32(view[start + 4 : end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            raise _corrupt(f"the PNG is corrupt: chunk {kind.decode('latin-1')!r} has a bad checksum")


# ----------------------------------------------------------------------------- opening and decoding
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8"


def _limit_structure(data: bytes) -> None:
    """Refuse files whose headers would cost Pillow's Python parsers seconds (floods of segments or chunks)."""
    if data.startswith(_PNG_SIGNATURE):
        _limit_png_chunks(data)
    elif data.startswith(_JPEG_SIGNATURE):
        try:
            _jpeg_header(data)
        except ImageReadError as err:
            if err.reason != "corrupt_image":
                raise  # a header cut short is reported by Pillow


def _check_before_decode(image: ImageFile.ImageFile, data: bytes) -> None:
    """Integrity checks that need no decoding: PNG checksums, JPEG size bound and scan count."""
    if image.format == "PNG" and data.startswith(_PNG_SIGNATURE):
        _check_png_checksums(data)
    elif image.format in _JPEG_FORMATS and data.startswith(_JPEG_SIGNATURE):
        _check_jpeg_before_decode(data)


def _name_refused_format(data: bytes) -> str | None:
    """The Pillow format name of data in a format outside :data:`IMAGE_FORMATS`, if Pillow knows it."""
    try:
        with Image.open(io.BytesIO(data)) as image:  # header only, to name the format in the message
            return image.format
    except Exception:  # any plugin failure just means "not an image we can name"
        return None


def open_image(data: bytes) -> ImageFile.ImageFile:
    """Parse the header of ``data`` (no pixels are decoded) and check the format is accepted.

    Returns:
        The opened image: ``size``, ``mode`` and ``format`` are known; call :func:`load_image` next.

    Raises:
        ImageReadError: ``not_an_image``, ``unsupported_format`` (naming the format and the accepted list),
            ``too_complex``, ``corrupt_image`` (a header cut short or damaged), ``too_many_pixels`` (Pillow's
            decompression-bomb limit, :data:`PIL.Image.MAX_IMAGE_PIXELS` × 2).
    """
    _limit_structure(data)
    try:
        image = Image.open(io.BytesIO(data), formats=_OPENERS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # the warning where it is an error
        raise ImageReadError("too_many_pixels", f"the image has too many pixels: {err}") from None
    except UnidentifiedImageError:
        refused = _name_refused_format(data)
        if refused is not None and refused not in _PILLOW_FORMATS:
            raise ImageReadError(
                "unsupported_format", f"image format {refused} is not accepted; send one of {ACCEPTED_FORMATS}"
            ) from None
        raise ImageReadError(
            "not_an_image", f"the data is not a readable image (accepted formats: {ACCEPTED_FORMATS})"
        ) from None
    except _DECODE_ERRORS as err:
        raise _corrupt(f"the image header is truncated or corrupt: {err}") from None
    if image.format not in _PILLOW_FORMATS:  # cannot happen with formats=_OPENERS; kept as the contract
        raise ImageReadError(
            "unsupported_format", f"image format {image.format} is not accepted; send one of {ACCEPTED_FORMATS}"
        )
    return image


def load_image(image: ImageFile.ImageFile, data: bytes, target_size: int | None = None) -> ImageFile.ImageFile:
    """Decode the first frame of an image from :func:`open_image`, refusing truncated or corrupt data.

    Args:
        image: the opened image (header only).
        data: the bytes it was opened from (needed for the JPEG fill check).
        target_size: the smallest short side, in pixels, the caller needs (e.g. the model's resize or input
            size). A JPEG then decodes at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, much cheaper) as long
            as its short side stays ≥ ``target_size``; other formats decode at full size.

    Returns:
        ``image``, loaded: first frame only (later frames of GIF/APNG/WebP/TIFF/MPO are never decoded),
        mode and size as decoded (possibly reduced for JPEG).

    Raises:
        ImageReadError: ``corrupt_image``.
        ValueError: ``target_size`` is not a positive int.
    """
    if target_size is not None:
        if isinstance(target_size, bool) or not isinstance(target_size, int) or target_size < 1:
            raise ValueError(f"target_size must be a positive int or None, got {target_size!r}")
        if image.format in _JPEG_FORMATS:
            image.draft("RGB", (target_size, target_size))
    _check_before_decode(image, data)
    try:
        image.load()
    except _DECODE_ERRORS as err:
        raise _corrupt(f"the {image.format} image is truncated or corrupt: {err}") from None
    if image.format in _JPEG_FORMATS:
        _check_jpeg_not_filled(image, data, target_size)
    return image


def decode_image(data: bytes, target_size: int | None = None) -> ImageFile.ImageFile:
    """Bytes → the decoded first frame (:func:`open_image` then :func:`load_image`; no pixel limit)."""
    return load_image(open_image(data), data, target_size)


def read_image(path: str | os.PathLike[str]) -> ImageFile.ImageFile:
    """Read and decode the image file ``path`` (first frame, any accepted format, by content not extension).

    Raises:
        ImageReadError: as :func:`decode_image`, or ``unreadable_file``; the message names ``path``.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as err:
        raise ImageReadError("unreadable_file", f"cannot read image {path}: {err.strerror or err}") from None
    try:
        return decode_image(data)
    except ImageReadError as err:
        raise ImageReadError(err.reason, f"cannot read image {path}: {err.message}") from None


def read_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """:func:`read_image` then :func:`to_rgb`; every error is an :class:`ImageReadError` naming ``path``."""
    image = read_image(path)
    try:
        return to_rgb(image)
    except ImageReadError as err:
        raise ImageReadError(err.reason, f"cannot read image {path}: {err.message}") from None


# ----------------------------------------------------------------------------- modes → RGB
_HIGH_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}
_ALPHA_MODES = frozenset({"LA", "PA", "RGBA"})
_PILLOW_CONVERTED = frozenset({"1", "L", "P", "RGBX", "CMYK", "YCbCr", "HSV"})  # Pillow's convert is exact here
SUPPORTED_MODES: frozenset[str] = frozenset(
    {"RGB", "LAB"} | _HIGH_BIT_MODES | set(_PREMULTIPLIED) | _ALPHA_MODES | _PILLOW_CONVERTED
)
"""Every PIL mode :func:`to_rgb` converts (all of Pillow's modes)."""

_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # EXIF orientation → the transpose that shows the image upright (as PIL.ImageOps.exif_transpose)
_EXIF_ORIENTATION = 0x0112
_ROWS_PER_CHUNK = 256  # LAB conversion works on row bands, so its float temporaries stay small


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image → 8-bit RGB by its real value range, upright, transparency composited on white.

    * ``RGB`` is returned as is (the same object when no EXIF orientation is to be applied).
    * ``1``, ``L``, ``P``, ``RGBX``, ``CMYK`` (naive ``(1 − C)(1 − K)``), ``YCbCr`` (JPEG/JFIF), ``HSV``:
      Pillow's conversion.
    * ``LA``, ``PA``, ``RGBA``, premultiplied ``La``/``RGBa``, and ``1``/``L``/``P``/``RGB`` with a
      transparency key or palette alpha: composited on white.
    * ``LAB`` (Pillow's CIELAB: L 0–255 ↔ 0–100, a/b signed): CIE D50 (the ICC and Photoshop white) → sRGB
      through the Bradford-adapted matrix, out-of-gamut values clipped. Pillow's own LAB conversion goes
      through an 8-bit LittleCMS table that is off by up to ~20 levels near the gamut edge, so it is not used.
    * ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``: grey, ``v → round(v · 255 / 65535)``, not clipped at 255
      (a TIFF's declared depth below 16 bits sets the scale instead: 12-bit → 4095).
    * ``I`` (32-bit int): negative values are refused. The full scale is the file's declared bit depth when
      it is at most 16 (TIFF BitsPerSample/SampleFormat, e.g. signed 16-bit → 32767; a mode-``I`` PNG is
      16-bit). Otherwise (32-bit files, images made in memory) it is the smallest of 255, 65535 and
      2³¹ − 1 (2³² − 1 for an unsigned 32-bit TIFF) that holds the image's maximum: 32-bit integer files
      nearly always carry 8- or 16-bit data (Pillow writes every mode-``I`` image as 32-bit TIFF), and such
      data at the full 32-bit scale would be black. ``v → round(v · 255 / scale)``.
    * ``F`` (32-bit float): intensities in [0, 1], ``v → round(v · 255)``; NaN, infinities or values outside
      [0, 1] are refused (there is no one meaning for them).

    Transparency keys of 16-bit grey PNGs are honoured as well.

    Returns:
        An ``RGB`` image, ``size`` as displayed (EXIF orientation applied, so a second call changes nothing);
        the input's metadata is dropped when a new image is made.

    Raises:
        ImageReadError: ``unsupported_mode`` — a mode outside :data:`SUPPORTED_MODES`, or values ``I``/``F``
            cannot be read as intensities (the message says which and why).
    """
    if image.mode not in SUPPORTED_MODES:
        raise ImageReadError(
            "unsupported_mode",
            f"image mode {image.mode!r} is not supported; supported modes: {', '.join(sorted(SUPPORTED_MODES))}",
        )
    method = _ORIENTATION.get(image.getexif().get(_EXIF_ORIENTATION))
    if image.mode == "RGB" and method is None:
        return image
    rgb = _pixels_to_rgb(image)
    if method is not None:
        rgb = rgb.transpose(method)
    if rgb is not image:
        rgb.info = {}  # orientation is applied; a stale EXIF tag would rotate it again
    return rgb


def _pixels_to_rgb(image: Image.Image) -> Image.Image:
    """The mode conversion of :func:`to_rgb`, without orientation."""
    if image.mode == "RGB":
        return image
    if image.mode == "LAB":
        return _lab_to_rgb(image)
    if image.mode in _HIGH_BIT_MODES:
        image = _high_bit_to_grey(image)
    elif image.mode in _PREMULTIPLIED:
        image = image.convert(_PREMULTIPLIED[image.mode])
    if image.mode in _ALPHA_MODES or image.has_transparency_data:
        return _composite_on_white(image)
    return image.convert("RGB")


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_to_grey(image: Image.Image) -> Image.Image:
    """``I;16*``/``I``/``F`` → ``L`` (``LA`` when a transparency key marks pixels transparent)."""
    values = np.asarray(image)
    if image.mode == "F":
        grey = _float_to_8bit(values)
    else:
        if image.mode == "I" and _declared_depth(image) == (32, False):
            values = values.view(np.uint32)  # Pillow reads unsigned 32-bit TIFF samples as signed
        grey = _int_to_8bit(values, _full_scale(image, values))
    out = Image.fromarray(grey)
    key = image.info.get("transparency")
    if image.mode != "F" and isinstance(key, int) and not isinstance(key, bool):
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8))
        return Image.merge("LA", (out, alpha))
    return out


def _declared_depth(image: Image.Image) -> tuple[int, bool] | None:
    """``(bits per sample, signed)`` of a mode-``I`` image as its file declares it, if known."""
    if image.format == "PNG":
        return 16, False  # PNG has no deeper grey; older Pillow opened 16-bit PNGs as mode I
    tags = getattr(image, "tag_v2", None)
    if image.format != "TIFF" or tags is None or 258 not in tags:
        return None
    bits, sample_format = tags.get(258), tags.get(339, 1)
    bits = bits[0] if isinstance(bits, tuple) else bits
    sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
    return int(bits), sample_format == 2


def _full_scale(image: Image.Image, values: np.ndarray) -> int:
    """The value that maps to 255 for an integer grey image (see :func:`to_rgb` for the rule)."""
    low = int(values.min()) if values.size else 0
    if low < 0:
        raise ImageReadError(
            "unsupported_mode",
            f"the mode-I (32-bit integer) image has negative values (down to {low}); only non-negative "
            "intensities can be shown as RGB: rescale it to 0..65535 (mode I;16) or 0..255 (mode L)",
        )
    depth = _declared_depth(image)
    if depth is not None and 1 <= depth[0] <= 16:
        bits, signed = depth
        return (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    if image.mode != "I":
        return 65535
    peak = int(values.max()) if values.size else 0
    top = (1 << 32) - 1 if values.dtype == np.uint32 else (1 << 31) - 1
    return next(scale for scale in (255, 65535, top) if peak <= scale)


def _int_to_8bit(values: np.ndarray, scale: int) -> np.ndarray:
    """``round(min(v, scale) · 255 / scale)`` in integer arithmetic, ``(H, W)`` → ``(H, W)`` uint8."""
    wide = np.uint32 if scale <= 65535 else np.uint64  # v · 255 must not overflow
    clipped = np.minimum(values.astype(wide), scale)  # samples above a declared depth (damaged files)
    return ((clipped * 255 + scale // 2) // scale).astype(np.uint8)


def _float_to_8bit(values: np.ndarray) -> np.ndarray:
    if values.size and not np.isfinite(values).all():
        raise ImageReadError(
            "unsupported_mode", "the mode-F (32-bit float) image has NaN or infinite values; it cannot be shown"
        )
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0.0 or high > 1.0:
        raise ImageReadError(
            "unsupported_mode",
            f"the mode-F (32-bit float) image has values in [{low:.6g}, {high:.6g}]; float images are read as "
            "intensities in [0, 1]: scale it to [0, 1], or save it as 8-bit (L) or 16-bit (I;16)",
        )
    return np.rint(values * np.float32(255)).astype(np.uint8)


# CIE XYZ (D50) → linear sRGB: the sRGB matrix with Bradford adaptation from D50 (as ICC profiles do).
_XYZ_D50_TO_LINEAR_SRGB = np.array(
    [
        [3.1338561, -1.6168667, -0.4906146],
        [-0.9787684, 1.9161415, 0.0334540],
        [0.0719453, -0.2289914, 1.4052427],
    ]
)
_D50_WHITE = np.array([0.96422, 1.0, 0.82521])


def _lab_to_rgb(image: Image.Image) -> Image.Image:
    """Pillow ``LAB`` (bytes: L 0–255, a and b as int8) → sRGB, in bands of rows."""
    lab = np.asarray(image)
    bands = range(0, lab.shape[0], _ROWS_PER_CHUNK)
    rgb = np.concatenate([_lab_rows_to_srgb(lab[start : start + _ROWS_PER_CHUNK]) for start in bands])
    return Image.fromarray(rgb)


def _lab_rows_to_srgb(lab: np.ndarray) -> np.ndarray:
    """``(h, W, 3)`` Pillow LAB bytes → ``(h, W, 3)`` uint8 sRGB."""
    lightness = lab[..., 0].astype(np.float64) * (100.0 / 255.0)
    a = lab[..., 1].view(np.int8).astype(np.float64)
    b = lab[..., 2].view(np.int8).astype(np.float64)
    fy = (lightness + 16.0) / 116.0
    f = np.stack([fy + a / 500.0, fy, fy - b / 200.0], axis=-1)
    delta = 6.0 / 29.0
    xyz = np.where(f > delta, f**3, 3.0 * delta**2 * (f - 4.0 / 29.0)) * _D50_WHITE
    linear = np.clip(xyz @ _XYZ_D50_TO_LINEAR_SRGB.T, 0.0, 1.0)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.rint(srgb * 255.0).astype(np.uint8)
