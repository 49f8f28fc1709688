"""Opening a slide: the backend by file name, the pixel size, and plain PNG/JPEG sections.

- pyramidal (Big)TIFF, OME-TIFF and Aperio SVS go through tifffile (`_tiff.py`),
  which decodes only the tiles (or strips) a region touches;
- plain PNG / JPEG are decoded whole by stagejax.images (small sections);
- the other vendor formats (NDPI, MRXS, SCN, ...) go through OpenSlide, the
  optional extra ``stagejax[slides]`` (`_openslide.py`).

The pixel size comes from the file (OME PhysicalSizeX, Aperio ``MPP = ``, TIFF
or PNG/JPEG resolution) unless the caller passes one; without either, or with
one outside `base.MPP_RANGE`, opening fails with one line naming the file and
the flag to pass.
"""

from pathlib import Path

import numpy as np
from PIL import Image

from stagejax import images
from stagejax.errors import DatasetError
from stagejax.slides import _openslide, _tiff
from stagejax.slides.base import Level, Slide, resolve_mpp

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf2", ".tf8", ".qptiff")
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg")
# Vendor formats that tifffile cannot read tile by tile; OpenSlide can.
OPENSLIDE_SUFFIXES = (".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm")
# Largest plain PNG/JPEG decoded whole (Pillow's own decompression-bomb limit).
MAX_PLAIN_PIXELS = 89_478_485


class PlainImageSlide(Slide):
    """A PNG or JPEG section held in memory: one level, decoded by stagejax.images."""

    def __init__(self, path: Path, mpp: float | None, mpp_flag: str):
        with Image.open(path) as im:  # reads the header only
            fmt, (w, h), dpi = im.format, im.size, im.info.get("dpi")
        if fmt not in ("PNG", "JPEG"):
            raise DatasetError(f"{path}: {fmt} data in a {path.suffix} file; expected PNG or JPEG")
        if w * h > MAX_PLAIN_PIXELS:
            raise DatasetError(
                f"{path}: {w} x {h} px is too large to load as a plain {fmt}; save the "
                "section as a tiled pyramidal TIFF (e.g. OME-TIFF from QuPath)"
            )
        file_mpp = 25400.0 / float(dpi[0]) if dpi and float(dpi[0]) > 0 else None
        mpp, source = resolve_mpp(path, file_mpp, f"the {fmt} resolution (dpi)", mpp, mpp_flag)
        self._rgb = images.decode_image(path.read_bytes(), str(path))
        super().__init__(path, fmt.lower(), [Level(w, h, 1.0)], mpp, source)

    def _read(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        return self._rgb[y : y + h, x : x + w]


def _unsupported(path: Path) -> DatasetError:
    return DatasetError(
        f"{path}: unsupported slide format '{path.suffix}'; readable: "
        f"{'/'.join(TIFF_SUFFIXES + PLAIN_SUFFIXES)}, and with the stagejax[slides] extra "
        f"(OpenSlide) {'/'.join(OPENSLIDE_SUFFIXES)}; convert others to OME-TIFF "
        "(e.g. with QuPath or bfconvert)"
    )


def open_slide(
    path: str | Path,
    mpp: float | None = None,
    *,
    backend: str | None = None,
    mpp_flag: str = "--mpp",
) -> Slide:
    """Opens a slide for reading (use it as a context manager, or call `close`).

    Args:
      path: the slide file.
      mpp: pixel size of level 0 in um/px; overrides the file's metadata.
      backend: "tifffile", "openslide" or "plain" to override the choice by file name.
      mpp_flag: the flag or config field a user sets the pixel size with, for messages.

    Raises DatasetError (one line naming the file) for a missing, unreadable,
    truncated or unsupported file, and for a pixel size that is missing or absurd.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such slide file")
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder, not a slide file")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: empty (zero-byte) file")
    suffix = path.suffix.lower()
    if backend is None:
        if suffix in TIFF_SUFFIXES:
            backend = "tifffile"
        elif suffix in PLAIN_SUFFIXES:
            backend = "plain"
        elif suffix in OPENSLIDE_SUFFIXES:
            backend = "openslide"
        else:
            raise _unsupported(path)
    if backend == "tifffile":
        return _tiff.TiffSlide(path, mpp, mpp_flag)
    if backend == "openslide":
        return _openslide.OpenSlideSlide(path, mpp, mpp_flag)
    if backend == "plain":
        try:
            return PlainImageSlide(path, mpp, mpp_flag)
        except OSError as e:  # Pillow cannot parse the header (UnidentifiedImageError too)
            raise DatasetError(f"{path}: not a readable PNG or JPEG image: {e}") from None
    raise ValueError(f"unknown backend {backend!r}")
