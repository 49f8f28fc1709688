"""Decoding tubule images (TIFF, PNG, JPEG) to 8-bit RGB arrays.

Microscopes write a zoo of pixel formats: 8-bit RGB is the norm, but 16-bit
TIFFs, grayscale exports and RGBA screenshots turn up too. Everything after
this module (cropping, stain jitter, min-max normalisation, the models) assumes
uint8 HxWx3, so all conversions happen here, in one place, and each kind of
conversion is logged once per process so it is never silent.

16-bit samples are scaled to 8 bit by the range they use: many cameras write
12-bit data into 16-bit files, and keeping the high byte (what Pillow does for
16-bit RGB) would leave them 16 grey levels. The range is the file's declared
significant bits (TIFF BitsPerSample, PNG sBIT) when the data fits in them,
else the bits the largest colour value needs (at least 8); ``v >> (bits - 8)``
maps it onto 0..255, so a full-range 16-bit file keeps its high byte as before.
One info line says which range was used.

A full decode is the only check that reliably finds truncated files (a JPEG or
TIFF header can be intact while the pixel data is cut short), so `check_image`
decodes everything; PNGs are also verified chunk by chunk, which finds a missing
end chunk even when all pixel rows are present.

A top-level module that imports nothing of stagejax but its errors: datasets,
slides and the simulator all decode here without importing one another.
"""

import io
import logging
import os
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
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
            if kind in _MESSAGES:
                log.warning("%s (first: %s); further ones are not logged.", _MESSAGES[kind], name)
            else:  # "<N>-bit": the data's own range, not a loss
                log.info(
                    "16-bit image(s) holding %s data scaled to 8 bit by that range, not by "
                    "keeping the high byte (first: %s); further ones are not logged.",
                    kind,
                    name,
                )


def significant_bits(samples: np.ndarray, declared: int = 16) -> int:
    """The bits 16-bit colour ``samples`` use: ``declared`` (the file's BitsPerSample or
    sBIT) when 8 < declared < 16 and the data fit in it, else what the largest needs."""
    top = int(samples.max()) if samples.size else 0
    bits = max(8, top.bit_length())
    if 8 < declared < 16 and top < 1 << declared:
        bits = max(bits, declared)
    return min(bits, 16)


def _png_sbit(data: bytes) -> int:
    """The largest significant-bits value of a PNG's sBIT chunk (16 without one)."""
    i = data.find(b"sBIT")
    if i < 8 or -1 < data.find(b"IDAT") < i:
        return 16
    length = int.from_bytes(data[i - 4 : i], "big")
    return max(data[i + 4 : i + 4 + length], default=16)


def _samples16(im: Image.Image, data: bytes) -> tuple[np.ndarray, int]:
    """(the 16-bit samples, H x W [x C], the declared significant bits). Pillow keeps
    only the high byte of 16-bit RGB, so colour files are decoded again here."""
    if im.mode in _16BIT_MODES:
        return np.asarray(im).astype(np.uint16), _bits_per_sample(im, data)
    if im.format == "TIFF":
        return tifffile.TiffFile(io.BytesIO(data)).pages[0].asarray(), _bits_per_sample(im, data)
    return imagecodecs.png_decode(data), _png_sbit(data)


def _from16(im: Image.Image, data: bytes) -> tuple[Image.Image, str]:
    """``im``'s 16-bit samples scaled to 8 bit by their range; (image, kind)."""
    try:
        raw, declared = _samples16(im, data)
    except (tifffile.TiffFileError, imagecodecs.PngError, ValueError):
        return im, "16-bit"  # a layout only Pillow reads: its high byte, as before
    raw = raw.squeeze(-1) if raw.ndim == 3 and raw.shape[2] == 1 else raw
    colour = raw if raw.ndim == 2 else raw[..., : 3 if raw.shape[2] >= 3 else 1]
    bits = significant_bits(colour, declared)
    kind = f"{bits}-bit" if bits < 16 else "16-bit"
    return Image.fromarray((raw >> (bits - 8)).astype(np.uint8)), kind


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
            return _to_rgb(im, bits, name, data)
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


def _to_rgb(
    im: Image.Image, bits: int, name: str, data: bytes
) -> tuple[np.ndarray, tuple[str, ...]]:
    if bits > 16 or im.mode == "F" or (im.mode == "I" and bits <= 8):
        raise DatasetError(f"{name}: unsupported pixel type {im.mode} ({bits} bits per sample)")
    kinds: tuple[str, ...] = ()
    if bits > 8 or im.mode in _16BIT_MODES:
        im, kind = _from16(im, data)
        kinds += (kind,)
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
    setting that gave the folder in the error when it is not one or has none.

    Hidden files are not images: macOS leaves a ``._name.png`` beside every file it
    copies to a foreign disk, which would count as a failed image. Subfolders are
    not read; the log says how many there were.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{folder}: {flag} is not a folder")
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    paths = sorted(p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    subfolders = sorted(p.name for p in entries if p.is_dir())
    if subfolders:
        shown = ", ".join(subfolders[:5]) + (", ..." if len(subfolders) > 5 else "")
        log.warning(
            "%s: %d subfolder(s) skipped (%s); only the images directly in it are read, "
            "pass a subfolder as %s to read its images",
            folder,
            len(subfolders),
            shown,
            flag,
        )
    if not paths:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths
