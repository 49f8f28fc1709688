"""Vendor slide formats (NDPI, MRXS, SCN, VMS, BIF, ...) through OpenSlide.

OpenSlide is the optional extra ``stagejax[slides]`` (openslide-python plus the
openslide-bin wheel with the C library); without it, opening such a slide
fails with one line naming the extra.
"""

import importlib
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from stagejax.errors import DatasetError
from stagejax.slides.base import Level, Slide, resolve_mpp

log = logging.getLogger(__name__)

EXTRA = "pip install 'stagejax[slides]'"


def _import_openslide():
    try:
        return importlib.import_module("openslide")  # optional extra
    except (ImportError, OSError):  # OSError: openslide-python without its C library
        return None


class OpenSlideSlide(Slide):
    """A slide read by OpenSlide; regions come back RGBA and are composited on white."""

    def __init__(self, path: Path, mpp: float | None, mpp_flag: str):
        openslide = _import_openslide()
        if openslide is None:
            raise DatasetError(f"{path}: reading {path.suffix} slides needs OpenSlide: {EXTRA}")
        self._errors = (openslide.OpenSlideError,)
        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise DatasetError(f"{path}: OpenSlide does not recognise this file's format") from None
        except openslide.OpenSlideError as e:
            raise DatasetError(f"{path}: OpenSlide cannot read this slide: {e}") from None
        try:
            props = self._osr.properties
            file_mpp = props.get(openslide.PROPERTY_NAME_MPP_X)
            file_mpp = float(file_mpp) if file_mpp else None
            mpp, source = resolve_mpp(path, file_mpp, "the slide's MPP", mpp, mpp_flag)
            levels = [
                Level(w, h, float(ds))
                for (w, h), ds in zip(
                    self._osr.level_dimensions, self._osr.level_downsamples, strict=True
                )
            ]
            vendor = props.get(openslide.PROPERTY_NAME_VENDOR) or "unknown"
            super().__init__(path, f"openslide:{vendor}", levels, mpp, source)
            self.tile_shape = (512, 512)
        except BaseException:
            self._osr.close()
            raise

    def close(self) -> None:
        self._osr.close()

    def _read(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        x0, y0 = self.to_level0(x, y, level)  # OpenSlide takes the corner in level-0 pixels
        try:
            rgba = self._osr.read_region((round(x0), round(y0)), level, (w, h))
        except self._errors as e:
            msg = f"{self.path}: OpenSlide cannot read a region (corrupt file?): {e}"
            raise DatasetError(msg) from None
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
