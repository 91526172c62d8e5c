"""Image files to RGB uint8 arrays: the one decoder every CPU path uses.

What it refuses rather than guess, each as a :class:`UserError` naming the file:

- files it cannot read (missing, not an image, truncated or corrupt) and images of more than ``MAX_PIXELS``
  pixels (read from the header, before anything is decoded: a decompression bomb), as :class:`ImageFileError`,
  the broken files ``--skip-bad-images`` may leave out;
- images whose values cannot be mapped to 8 bits faithfully: 32-bit integer images, float images with values
  outside [0, 1] or not finite.

What it converts: 16-bit images keep their high byte (``v >> 8``, what Pillow does for 16-bit colour PNGs, so
grey and colour files agree), float images in [0, 1] are scaled by 255 and rounded, everything else goes through
Pillow's ``convert("RGB")`` (palette, grey, CMYK; alpha is dropped). File names may hold any bytes.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from ssl_patchbench.core.errors import UserError

MAX_PIXELS = 8192 * 8192
# Pillow's own guard is set to the same limit (it raises beyond twice the limit, while opening the file) and its
# warning silenced: every image above the limit is refused here with one message, whichever check sees it first.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
JPEG_SUFFIXES = (".jpg", ".jpeg")
HEADER_BYTES = 4096  # a JPEG's frame header lies within its first bytes unless metadata segments come first
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError)


class OtherSize(Exception):
    """Raised by :func:`decode` with ``size`` for an image of another size, read from its header before anything
    is decoded: the caller wanted images of one size only (an array of them), and ``args[0]`` names the file."""


class ImageFileError(UserError):
    """A file the decoder cannot use as an image at all (unreadable, not an image, truncated or corrupt, over the
    pixel limit), as opposed to a whole image whose values it refuses; ``problem`` says which, in a few words."""

    def __init__(self, message: str, problem: str = "unreadable") -> None:
        super().__init__(message)
        self.problem = problem  # kept through pickling (a decoding process hands the error back as a value)


def shown(path: str | os.PathLike) -> str:
    """``path`` printable whatever bytes its name holds (undecodable bytes as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_pixels(path: str | os.PathLike, width: int, height: int) -> None:
    """Refuse an image of more than ``MAX_PIXELS`` pixels before it is decoded (every decoder calls this)."""
    if width * height > MAX_PIXELS:
        raise _too_large(path, f"{width}x{height} px")


def _too_large(path: str | os.PathLike, size: str | None) -> ImageFileError:
    has = f"is {size}, more than" if size else "has more than"
    return ImageFileError(
        f"image {shown(path)} {has} the {MAX_PIXELS:,} pixels patchbench decodes "
        "(a decompression bomb or a huge scan): downscale it or remove it",
        "over the pixel limit",
    )


def unreadable_file(path: str | os.PathLike, exc: Exception) -> ImageFileError:
    detail = str(exc)
    if isinstance(exc, UnidentifiedImageError):  # its text repeats the path
        problem, detail = "not an image", "not an image Pillow can identify"
    elif isinstance(exc, OSError) and exc.errno is not None:  # the file itself: missing, no permission
        problem, detail = f"unreadable ({exc.strerror})", exc.strerror or detail
    else:
        problem = "truncated or corrupt"
    return ImageFileError(f"cannot read image {shown(path)}: {detail}: replace or remove it", problem)


def image_header(path: str) -> tuple[str | None, int, int]:
    """``(format, height, width)`` from the file's header alone (nothing is decoded; format as Pillow names it,
    e.g. ``JPEG``); a bomb is refused."""
    try:
        with Image.open(path) as im:
            check_pixels(path, *im.size)
            return im.format, im.height, im.width
    except Image.DecompressionBombError as exc:
        raise _too_large(path, None) from exc
    except _UNREADABLE as exc:
        raise unreadable_file(path, exc) from exc


def image_size(path: str) -> tuple[int, int]:
    """``(height, width)`` from the file's header alone (nothing is decoded); a bomb is refused. A JPEG's frame
    header is parsed from its first bytes (18.5 against Pillow's 40 us a file on a 2-core CPU, a cost a
    file-backed pass pays once per image for its padding groups); any other file, or a JPEG whose frame header
    is not there, goes to Pillow."""
    if path.lower().endswith(JPEG_SUFFIXES):
        size = _jpeg_size(path)
        if size is not None:
            return size
    _, height, width = image_header(path)
    return height, width


def _jpeg_size(path: str) -> tuple[int, int] | None:
    """``(height, width)`` from the frame header in a JPEG's first ``HEADER_BYTES``; None when there is none
    there, or the file cannot be read (Pillow then says why, in the decoders' words)."""
    try:
        with open(path, "rb") as f:
            header = checked_jpeg_header(path, f.read(HEADER_BYTES))
    except OSError:
        return None
    return None if header is None else header[:2]


def checked_jpeg_header(path: str, data: bytes) -> tuple[int, int, int] | None:
    """:func:`jpeg_header` of ``data``, None also for a side of 0 pixels; an image over the pixel limit is
    refused, by its path (what every reader of JPEG headers checks before the file is decoded)."""
    header = jpeg_header(data)
    if header is None or 0 in header[:2]:
        return None
    check_pixels(path, header[1], header[0])
    return header


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from a JPEG's frame header, or None when ``data`` has none (not a JPEG)."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS:
            if pos + 10 > len(data):
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return height, width, data[pos + 9]
        pos += 2 + length
    return None


def decode(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file to RGB uint8 ``[H, W, 3]``; with ``size`` (height, width), an image of another size
    raises :class:`OtherSize` instead, from its header, before it is decoded."""
    try:
        with Image.open(path) as im:
            check_pixels(path, *im.size)
            if size is not None and (im.height, im.width) != tuple(size):
                raise OtherSize(path)
            return _to_rgb(im, path)
    except Image.DecompressionBombError as exc:
        raise _too_large(path, None) from exc
    except _UNREADABLE as exc:
        raise unreadable_file(path, exc) from exc


def _to_rgb(im: Image.Image, path: str) -> np.ndarray:
    if im.mode in _SIXTEEN_BIT:
        grey = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode == "F":
        values = np.asarray(im, dtype=np.float32)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise UserError(
                f"image {shown(path)} holds float values outside [0, 1] (from {values.min():g} to {values.max():g}): "
                "patchbench cannot map them to 8 bits faithfully; convert the file to 8-bit"
            )
        grey = np.round(values * 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode in ("I", "I;16S", "I;32", "I;32S"):
        raise UserError(
            f"image {shown(path)} holds signed or 32-bit integers (Pillow mode {im.mode}): patchbench cannot map "
            "them to 8 bits faithfully; convert the file to 8-bit"
        )
    return np.asarray(im.convert("RGB"))
