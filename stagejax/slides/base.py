"""What every slide backend shares: levels, region reads, tiles and downsampled reads.

A backend implements `Slide._read` for regions wholly inside a level; this
class adds the rest. Every read returns uint8 HxWx3 RGB. Coordinates of a
region are pixels of the level it is read from (`Slide.to_level0` converts);
parts of a region outside the slide read as white (glass), so crops around
objects at the slide's edge need no special case.

Memory is bounded by what a call returns: `read_region` and `read_level`
refuse more than `MAX_READ_BYTES`; `read_downsampled`, `thumbnail` and
`tiles` stream band by band, whatever the slide's size.
"""

import abc
import dataclasses
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from stagejax.errors import DatasetError, ResourceError

log = logging.getLogger(__name__)

# Pixel sizes outside this range (um/px) are placeholders or unit mix-ups (72 dpi
# is 352.8 um/px; a nanometre value read as micrometres is 1000x too large).
MPP_RANGE = (0.05, 20.0)
# Largest array one read returns (1 GiB: about 18,900 x 18,900 RGB pixels).
MAX_READ_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class Level:
    """One resolution of a slide: its size in pixels and its downsample from level 0."""

    width: int
    height: int
    downsample: float

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.width, self.height


@dataclasses.dataclass(frozen=True)
class Tile:
    """A region from `Slide.tiles`: top-left (x, y) in pixels of `level`, and its pixels."""

    x: int
    y: int
    level: int
    image: np.ndarray  # uint8 HxWx3; smaller than the tile size at the right/bottom edge


class Slide(abc.ABC):
    """A slide opened for reading; use `open_slide`. Not safe to share between threads."""

    def __init__(self, path: Path, kind: str, levels: list[Level], mpp: float, mpp_source: str):
        self.path = path
        self.kind = kind  # e.g. "ome-tiff", "svs", "tiff", "png", "openslide:hamamatsu"
        self.levels: tuple[Level, ...] = tuple(levels)
        self.mpp = mpp  # micrometres per level-0 pixel
        self.mpp_source = mpp_source  # where `mpp` came from, for messages and logs
        self.tile_shape = (512, 512)  # (rows, cols) a backend decodes at once; band size hint

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.levels[0].dimensions

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.levels[level].downsample

    def best_level(self, downsample: float) -> int:
        """The smallest level that is at least as detailed as `downsample`."""
        fits = [i for i, lv in enumerate(self.levels) if lv.downsample <= downsample * (1 + 1e-3)]
        return max(fits, key=lambda i: self.levels[i].downsample, default=0)

    def to_level0(self, x: float, y: float, level: int) -> tuple[float, float]:
        ds = self.levels[level].downsample
        return x * ds, y * ds

    @abc.abstractmethod
    def _read(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        """uint8 (h, w, 3) RGB of a region that lies wholly inside `level`."""

    def close(self) -> None:  # noqa: B027 (backends without resources keep the no-op)
        """Releases the file; the slide cannot be read afterwards."""

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """uint8 (h, w, 3) RGB of the region at (x, y) in pixels of `level`; outside is white."""
        if not 0 <= level < len(self.levels):
            raise ValueError(f"level {level} not in 0..{len(self.levels) - 1}")
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w} x {h}")
        self._check_size(w, h, f"region of {w} x {h} px")
        lw, lh = self.levels[level].dimensions
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if (x0, y0, x1, y1) == (x, y, x + w, y + h):
            return self._read(x, y, w, h, level)
        out = np.full((h, w, 3), 255, np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read(x0, y0, x1 - x0, y1 - y0, level)
        return out

    def read_level(self, level: int) -> np.ndarray:
        """The whole of `level` as one array (refused above `MAX_READ_BYTES`)."""
        w, h = self.levels[level].dimensions
        return self.read_region(0, 0, w, h, level)

    def tiles(self, tile_size: int, overlap: int = 0, level: int = 0) -> Iterator[Tile]:
        """Row-major tiles of `level` that cover it; neighbours share `overlap` pixels."""
        if not 0 <= overlap < tile_size:
            raise ValueError(f"need 0 <= overlap < tile_size, got {overlap}, {tile_size}")
        self._check_size(tile_size, tile_size, f"tile of {tile_size} px")
        lw, lh = self.levels[level].dimensions
        for y in _starts(lh, tile_size, overlap):
            for x in _starts(lw, tile_size, overlap):
                w, h = min(tile_size, lw - x), min(tile_size, lh - y)
                yield Tile(x, y, level, self._read(x, y, w, h, level))

    def read_downsampled(self, downsample: float) -> np.ndarray:
        """The whole slide at 1/`downsample` of level 0, read band by band from the best level.

        The size is level 0's divided by `downsample`, rounded. Pixels are box
        averages, so the result is the same whichever levels the file has.
        """
        if not downsample >= 1:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        w0, h0 = self.dimensions
        out_w, out_h = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
        level = self.best_level(downsample)
        lw, lh = self.levels[level].dimensions
        k = max(1, int(downsample / self.levels[level].downsample + 1e-6))
        band = k * math.ceil(max(self.tile_shape[0], 256) / k)
        img_w, img_h = math.ceil(lw / k), math.ceil(lh / k)  # before the final resampling
        self._check_size(img_w, img_h, f"image downsampled {downsample:g}x ({img_w} x {img_h} px)")
        img = np.empty((img_h, img_w, 3), np.uint8)
        for y in range(0, lh, band):
            rows = self._read(0, y, lw, min(band, lh - y), level)
            img[y // k : y // k + math.ceil(rows.shape[0] / k)] = block_mean(rows, k)
        if img.shape[:2] != (out_h, out_w):
            img = np.asarray(Image.fromarray(img).resize((out_w, out_h), Image.Resampling.BOX))
        return img

    def thumbnail(self, max_size: int) -> np.ndarray:
        """The whole slide with its longer side `max_size` px (or level 0 if that is smaller)."""
        return self.read_downsampled(max(1.0, max(self.dimensions) / max_size))

    def _check_size(self, w: int, h: int, what: str) -> None:
        if w * h * 3 > MAX_READ_BYTES:
            raise ResourceError(
                f"{self.path}: {what} is {w * h * 3 / 2**30:.1f} GiB as RGB, over the "
                f"{MAX_READ_BYTES / 2**30:.0f} GiB one read may return; read it in tiles "
                "(Slide.tiles) or downsampled (Slide.read_downsampled)"
            )


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    starts = [0]
    while starts[-1] + tile < length:
        starts.append(starts[-1] + tile - overlap)
    return starts


def block_mean(rgb: np.ndarray, k: int) -> np.ndarray:
    """Means of k x k blocks (rounded); the last partial row/column of blocks repeats its edge."""
    if k == 1:
        return rgb
    h, w = rgb.shape[:2]
    ph, pw = -h % k, -w % k
    if ph or pw:
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="edge")
    total = np.zeros((rgb.shape[0] // k, rgb.shape[1] // k, rgb.shape[2]), np.uint32)
    for dy in range(k):  # strided adds: much faster than reshape + sum over block axes
        for dx in range(k):
            total += rgb[dy::k, dx::k]
    return ((total + k * k // 2) // (k * k)).astype(np.uint8)


def check_mpp(path: Path, mpp: float, source: str, mpp_flag: str) -> float:
    """Returns `mpp` if it is a plausible microscope pixel size, else a one-line DatasetError."""
    lo, hi = MPP_RANGE
    if not (math.isfinite(mpp) and lo <= mpp <= hi):
        hint = "" if source == mpp_flag else f"; pass {mpp_flag} with the real value"
        raise DatasetError(
            f"{path}: pixel size {mpp:.4g} um/px (from {source}) is outside {lo:g}-{hi:g} "
            f"um/px, a placeholder or a unit mix-up{hint}"
        )
    return float(mpp)


def resolve_mpp(
    path: Path, file_mpp: float | None, source: str, mpp: float | None, mpp_flag: str
) -> tuple[float, str]:
    """(pixel size, its source): the argument wins over the file's metadata."""
    if mpp is not None:
        if file_mpp is not None and not math.isclose(mpp, file_mpp, rel_tol=1e-3):
            log.info("%s: using %s %g um/px, not %g from %s", path, mpp_flag, mpp, file_mpp, source)
        return check_mpp(path, mpp, mpp_flag, mpp_flag), mpp_flag
    if file_mpp is None:
        raise DatasetError(
            f"{path}: no pixel size in the file's metadata; pass {mpp_flag} (micrometres per pixel)"
        )
    return check_mpp(path, file_mpp, source, mpp_flag), source
