"""Encoded images before decoding: the pixel limit, the pixel modes we accept, and the
8-bit RGB picture each mode gives.

Both decoders (``images.py``) first read the header with Pillow (no pixel decoded, about
30 us) and refuse, with the same reason and message on both paths:

- a **decompression bomb**: more than ``MAX_IMAGE_PIXELS`` pixels (our constant, checked
  whatever Pillow's own global says);
- a **pixel mode without a defined 8-bit RGB picture**: 32-bit integer (``I``) and float
  (``F``) pixels have no range to scale from, ``LAB`` has no colour conversion here
  (DALI reads its channels as RGB, Pillow's conversion is approximate);
- data Pillow cannot identify (the size, hence the limit, cannot be checked).

Accepted modes become 8-bit RGB as DALI decodes them: ``1`` is 0 / 255, grey is copied to
the three channels, a palette gives its colours, alpha (``LA``, ``PA``, ``RGBA``, a
palette's transparency) is dropped without compositing, ``CMYK`` and ``YCbCr`` are
converted to RGB, and 16-bit grey (``I;16``, ``I;16B``, ...) is scaled as ``round(v /
257)``. Pillow reads 16-bit RGB(A) PNGs as their high byte, DALI rounds: at most one step
apart. Multi-frame files (GIF, WebP, TIFF) give their first frame.

DALI's image decoder reads JPEG, PNG, BMP, TIFF, WebP, JPEG 2000 and PNM, but no GIF, and
fails on 1-bit TIFFs as Pillow writes them (no ``BitsPerSample``); ``pil_only`` names the
files the DALI path hands to PIL up front instead of failing a DALI batch on them.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np

from mm1_megatron.data.shards.skips import BadSample

# Pillow's default limit (a 1 GiB RGBA buffer / 3), fixed here so that a library that
# raises or disables Pillow's global (Image.MAX_IMAGE_PIXELS) cannot lift ours.
MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3

EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
REFUSED_MODES = {
    "I": "32-bit integer pixels have no defined range",
    "F": "floating-point pixels have no defined range",
    "LAB": "no conversion from CIELAB to RGB",
}
# Pillow's format names for the files DALI's decoders.image reads (MPO: camera JPEGs).
DALI_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "JPEG2000", "PPM")


@dataclass(frozen=True)
class ImageHeader:
    width: int
    height: int
    mode: str
    format: str


def corrupt(exc: Exception) -> BadSample:
    return BadSample("corrupt_image", f"{type(exc).__name__}: {exc}")


def _bomb(pixels: str) -> BadSample:
    return BadSample(
        "corrupt_image",
        f"decompression bomb: {pixels}, over the limit of {MAX_IMAGE_PIXELS} pixels "
        "(image_modes.MAX_IMAGE_PIXELS)",
    )


def check_header(width: int, height: int, mode: str) -> None:
    """``BadSample`` for a decompression bomb or a mode without an 8-bit RGB picture."""
    if width * height > MAX_IMAGE_PIXELS:
        raise _bomb(f"{width} x {height} = {width * height} pixels")
    if mode not in EIGHT_BIT_MODES + SIXTEEN_BIT_GREY_MODES:
        why = REFUSED_MODES.get(mode, "no 8-bit RGB conversion")
        raise BadSample("corrupt_image", f"unsupported pixel mode {mode}: {why}")


def open_checked(blob: bytes):
    """The Pillow image, opened lazily (header read, no pixel decoded) and checked."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ours decides
            image = Image.open(io.BytesIO(blob))
    except Image.DecompressionBombError as exc:  # over twice Pillow's own limit
        found = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow gives no width, height
        if found and int(found.group(1)) > MAX_IMAGE_PIXELS:
            raise _bomb(f"{found.group(1)} pixels") from exc
        raise BadSample("corrupt_image", f"decompression bomb: {exc}") from exc
    except Exception as exc:  # Pillow raises many types for bad data
        raise corrupt(exc) from exc
    try:
        check_header(*image.size, image.mode)
    except BadSample:
        image.close()
        raise
    return image


def read_header(blob: bytes) -> ImageHeader:
    """Size, mode and format from the header alone; ``BadSample`` as ``open_checked``."""
    with open_checked(blob) as image:
        return ImageHeader(*image.size, mode=image.mode, format=image.format or "")


def pil_only(header: ImageHeader) -> bool:
    """Whether DALI cannot decode this file (the DALI path decodes it with PIL)."""
    return header.format not in DALI_FORMATS or (header.format == "TIFF" and header.mode == "1")


def grey16_to_8(values: np.ndarray) -> np.ndarray:
    """16-bit grey ``[h, w]`` (any byte order) -> uint8 ``round(v / 257)``, as DALI."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def decode_rgb(blob: bytes):
    """The picture as displayed, as an 8-bit RGB Pillow image: checked as ``open_checked``,
    first frame, EXIF orientation applied, converted as the module docstring says;
    ``BadSample`` when anything fails."""
    from PIL import Image, ImageOps

    with open_checked(blob) as image:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = ImageOps.exif_transpose(image)  # decodes the pixels
            if image.mode in SIXTEEN_BIT_GREY_MODES:
                image = Image.fromarray(grey16_to_8(np.asarray(image)), "L")
            return image.convert("RGB")
        except Exception as exc:  # Pillow raises many types for bad data
            raise corrupt(exc) from exc
