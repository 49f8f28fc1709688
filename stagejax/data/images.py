"""Decoding tubule images (TIFF, PNG, JPEG) to 8-bit RGB arrays.

Microscopes write a zoo of pixel formats: 8-bit RGB is the norm, but 16-bit
TIFFs, grayscale exports and RGBA screenshots turn up too. Everything after
this module (cropping, stain jitter, min-max normalisation, the models) assumes
uint8 HxWx3, so all conversions happen here, in one place, and each kind of
conversion is logged once per process so it is never silent.

16-bit samples are scaled to 8 bit by keeping the high byte (v // 256). That is
what Pillow does itself for 16-bit RGB, so gray and colour 16-bit files agree.
Images that use only the low bits (e.g. 12-bit camera data) lose precision this
way; convert those to 8 bit before training.

A full decode is the only check that reliably finds truncated files (a JPEG or
TIFF header can be intact while the pixel data is cut short), so `check_image`
decodes everything; PNGs are also verified chunk by chunk, which finds a missing
end chunk even when all pixel rows are present.
"""

import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from stagejax.errors import DatasetError, first_line

log = logging.getLogger(__name__)

FORMATS = ("PNG", "JPEG", "TIFF")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".tif", ".tiff")  # the files of FORMATS

# Kinds of conversion already reported in this process (see `_note`).
_LOGGED: set[str] = set()

_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_MODE_KINDS = {
    "L": ("grayscale",),
    "1": ("grayscale",),
    "LA": ("grayscale", "alpha"),
    "La": ("grayscale", "alpha"),
    "RGBA": ("alpha",),
    "RGBa": ("alpha",),
    "RGBX": ("alpha",),
    "P": ("palette",),
    "PA": ("palette", "alpha"),
    "CMYK": ("CMYK",),
    "YCbCr": ("YCbCr",),
}
_MESSAGES = {
    "16-bit": "16-bit image(s) scaled to 8 bit (high byte kept)",
    "grayscale": "grayscale image(s) converted to RGB (gray copied to 3 channels)",
    "alpha": "image(s) with an alpha channel: alpha dropped",
    "palette": "palette image(s) converted to RGB",
    "CMYK": "CMYK image(s) converted to RGB",
    "YCbCr": "YCbCr image(s) converted to RGB",
}


def _note(kinds: tuple[str, ...], name: str) -> None:
    """Logs each kind of conversion the first time it happens in this process."""
    for kind in kinds:
        if kind not in _LOGGED:
            _LOGGED.add(kind)
            log.warning("%s (first: %s); further ones are not logged.", _MESSAGES[kind], name)


def _bits_per_sample(im: Image.Image, data: bytes) -> int:
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, 8)
        return max(bits) if isinstance(bits, tuple) else int(bits)
    if im.format == "PNG" and data[12:16] == b"IHDR":
        return data[24]
    return 8


def _decode(data: bytes, name: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Returns (uint8 HxWx3 RGB array, kinds of conversion applied)."""
    if not data:
        raise DatasetError(f"{name}: empty (zero-byte) file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in FORMATS:
                raise DatasetError(f"{name}: {im.format} image; expected one of {FORMATS}")
            if im.format == "PNG":
                im.verify()  # chunk CRCs up to the end chunk; `im` is unusable afterwards
        with Image.open(io.BytesIO(data)) as im:
            bits = _bits_per_sample(im, data)
            im.load()  # full decode: raises on truncated pixel data
            return _to_rgb(im, bits, name)
    except DatasetError:
        raise
    except UnidentifiedImageError:
        raise DatasetError(
            f"{name}: not a readable PNG, JPEG or TIFF image (other format, or corrupt header)"
        ) from None
    except Image.DecompressionBombError as e:
        raise DatasetError(f"{name}: image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DatasetError(
            f"{name}: cannot decode image (truncated or corrupt): {first_line(e)}"
        ) from None


def _to_rgb(im: Image.Image, bits: int, name: str) -> tuple[np.ndarray, tuple[str, ...]]:
    if bits > 16 or im.mode == "F" or (im.mode == "I" and bits <= 8):
        raise DatasetError(f"{name}: unsupported pixel type {im.mode} ({bits} bits per sample)")
    kinds: tuple[str, ...] = ()
    if bits > 8 or im.mode in _16BIT_MODES:
        kinds += ("16-bit",)
    if im.mode in _16BIT_MODES:  # 16-bit gray; Pillow already reduced 16-bit RGB(A) to 8 bit
        im = Image.fromarray((np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8))
    if im.mode != "RGB":
        if im.mode not in _MODE_KINDS:
            raise DatasetError(f"{name}: unsupported pixel type {im.mode}")
        kinds += _MODE_KINDS[im.mode]
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8), kinds


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decodes encoded image bytes to uint8 HxWx3 RGB, converting unusual formats.

    `name` is only used in messages. Raises DatasetError for anything that is not
    a complete PNG, JPEG or TIFF image.
    """
    rgb, kinds = _decode(data, name)
    _note(kinds, name)
    return rgb


def image_info(data: bytes, name: str) -> tuple[int, int]:
    """Fully decodes `data` (raising DatasetError if it is not a usable image); returns (H, W)."""
    rgb, kinds = _decode(data, name)
    _note(kinds, name)
    return rgb.shape[:2]


def to_storable(data: bytes, name: str) -> tuple[bytes, tuple[int, int]]:
    """Returns (bytes that `decode_image` turns into RGB uint8 unchanged, (H, W)).

    Files that already decode to 8-bit RGB are kept byte for byte; anything that
    needed a conversion is re-encoded as a lossless PNG of the converted pixels,
    so readers of the cache never convert (or log) again.
    """
    rgb, kinds = _decode(data, name)
    _note(kinds, name)
    if kinds:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
        data = buf.getvalue()
    return data, rgb.shape[:2]


def list_images(folder: str | os.PathLike, flag: str) -> list[Path]:
    """The image files (``IMAGE_SUFFIXES``) of ``folder``, sorted; ``flag`` names the
    setting that gave the folder in the error when it is not one or has none."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{folder}: {flag} is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths
