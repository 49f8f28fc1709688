"""Writing a tiled pyramidal OME-TIFF (BigTIFF) tile by tile, in bounded memory.

The image comes as an array, a callable that renders one tile, or an
iterable of tiles, so a simulated section far larger than memory can be
written: only one row of tiles of level 0 is held at a time. Each level is the
one above downsampled 2x (means of 2 x 2 pixels); while a level is written,
the next one is built from its rows and spilled to a temporary raw file beside
the output, then written tile by tile in its turn.

The layout is the one QuPath writes and reads best: OME-XML with the pixel
size (PhysicalSizeX/Y in um), the reduced levels as SubIFDs of level 0, and the
TIFF resolution tags (pixels per cm) on every level for readers without OME
support. The file appears under its name only when complete (temp + rename).
"""

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import tifffile

from stagejax.runtime.files import atomic_write, staging_dir
from stagejax.slides.base import MPP_RANGE

# render(x, y, w, h) -> uint8 (h, w, 3) RGB of that region of level 0.
RenderFn = Callable[[int, int, int, int], np.ndarray]
_COMPRESSION = {"jpeg": "jpeg", "deflate": "zlib", "none": None}


def pyramid_sizes(width: int, height: int, tile_size: int) -> list[tuple[int, int]]:
    """(width, height) of each level: halved (rounding up) until one tile holds it."""
    sizes = [(width, height)]
    while max(sizes[-1]) > tile_size:
        w, h = sizes[-1]
        sizes.append(((w + 1) // 2, (h + 1) // 2))
    return sizes


def halve(rgb: np.ndarray) -> np.ndarray:
    """2x downsample by rounded means of 2 x 2 pixels; an odd last row/column is repeated."""
    h, w = rgb.shape[:2]
    if h % 2 or w % 2:
        rgb = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    total = rgb[0::2, 0::2].astype(np.uint16)  # four strided adds: ~10x faster than a
    total += rgb[1::2, 0::2]  # reshape + sum over the block axes
    total += rgb[0::2, 1::2]
    total += rgb[1::2, 1::2]
    total += 2
    return (total >> 2).astype(np.uint8)


class _Spill:
    """Rows of one level appended to a raw file, read back band by band."""

    def __init__(self, path: Path, width: int):
        self.path, self.width, self.rows = path, width, 0
        self._f = open(path, "wb")  # noqa: SIM115 (closed in `finish`)

    def append(self, rows: np.ndarray) -> None:
        self._f.write(np.ascontiguousarray(rows).tobytes())
        self.rows += rows.shape[0]

    def finish(self) -> "_Spill":
        self._f.close()
        return self

    def band(self, y: int, n: int) -> np.ndarray:
        row_bytes = self.width * 3
        data = np.fromfile(self.path, np.uint8, count=n * row_bytes, offset=y * row_bytes)
        return data.reshape(n, self.width, 3)


def _band_source(image, width: int, tile: int) -> Callable[[int, int], np.ndarray]:
    """band(y, n) -> rows y..y+n of level 0, from whichever form `image` has."""
    if isinstance(image, np.ndarray):
        return lambda y, n: image[y : y + n]
    if callable(image):

        def render_band(y: int, n: int) -> np.ndarray:
            band = np.empty((n, width, 3), np.uint8)
            for x in range(0, width, tile):
                band[:, x : x + tile] = _checked(image(x, y, min(tile, width - x), n), x, y)
            return band

        return render_band
    tiles = iter(image)

    def iter_band(y: int, n: int) -> np.ndarray:
        band = np.empty((n, width, 3), np.uint8)
        for x in range(0, width, tile):
            t = next(tiles, None)
            if t is None:
                raise ValueError(f"tile iterable ended early, at tile ({x}, {y})")
            band[:, x : x + tile] = _checked(t, x, y)[:n, : min(tile, width - x)]
        return band

    return iter_band


def _checked(t: np.ndarray, x: int, y: int) -> np.ndarray:
    t = np.asarray(t)
    if t.dtype != np.uint8 or t.ndim != 3 or t.shape[2] != 3:
        raise ValueError(f"tile at ({x}, {y}) is {t.dtype} {t.shape}; expected uint8 (h, w, 3)")
    return t


def _level_tiles(band, width: int, height: int, tile: int, spill: _Spill | None):
    """Yields the tiles of one level row-major (edge tiles padded by repeating the edge)."""
    for y in range(0, height, tile):
        rows = band(y, min(tile, height - y))
        if spill is not None:
            spill.append(halve(rows))
        for x in range(0, width, tile):
            t = rows[:, x : x + tile]
            if t.shape[:2] != (tile, tile):
                t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)), "edge")
            yield t


def write_pyramidal_tiff(
    path: str | Path,
    image: np.ndarray | RenderFn | Iterable[np.ndarray],
    mpp: float,
    *,
    size: tuple[int, int] | None = None,
    tile_size: int = 512,
    compression: str = "jpeg",
    quality: int = 90,
) -> Path:
    """Writes `image` as a tiled pyramidal OME-TIFF (BigTIFF) with its pixel size.

    Args:
      path: output file; replaced only once the new file is complete.
      image: uint8 (H, W, 3) RGB array; or render(x, y, w, h) returning that
        region of level 0 (called once per tile, row by row); or an iterable of
        tiles in row-major order, each tile_size square or clipped at the edges.
      mpp: micrometres per level-0 pixel, written to the OME and TIFF metadata.
      size: (width, height) of level 0; required unless `image` is an array.
      tile_size: tile side in pixels, a multiple of 16.
      compression: "jpeg" (lossy, `quality`), "deflate" (lossless) or "none".
    """
    path = Path(path)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image is {image.dtype} {image.shape}; expected uint8 (H, W, 3)")
        size = (image.shape[1], image.shape[0])
    if size is None:
        raise ValueError("size=(width, height) is required when image is not an array")
    if tile_size % 16 or tile_size <= 0:
        raise ValueError(f"tile_size must be a positive multiple of 16, got {tile_size}")
    if compression not in _COMPRESSION:
        raise ValueError(f"compression must be one of {sorted(_COMPRESSION)}, got {compression!r}")
    if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        raise ValueError(f"mpp {mpp} um/px is outside {MPP_RANGE}")
    sizes = pyramid_sizes(*size, tile_size)

    def write(tmp: Path) -> None:
        with staging_dir(path) as spill_dir:  # the reduced levels, spilled while built
            _write(tmp, image, mpp, sizes, tile_size, compression, quality, spill_dir)

    atomic_write(path, write)
    return path


def _write(tmp: Path, image, mpp, sizes, tile, compression, quality, spill_dir: Path) -> None:
    options = dict(
        tile=(tile, tile),
        dtype=np.uint8,
        photometric="rgb",
        compression=_COMPRESSION[compression],
        resolutionunit="CENTIMETER",
        software="stagejax",
    )
    if compression == "jpeg":
        options["compressionargs"] = {"level": quality}
    elif compression == "deflate":
        options["predictor"] = True
    band = _band_source(image, sizes[0][0], tile)
    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
        for i, (w, h) in enumerate(sizes):
            last = i == len(sizes) - 1
            spill = None if last else _Spill(spill_dir / f"level{i + 1}.raw", sizes[i + 1][0])
            per_cm = 1e4 / (mpp * 2**i)
            level_options = dict(options, shape=(h, w, 3), resolution=(per_cm, per_cm))
            if i == 0:
                meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                        "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}  # fmt: skip
                level_options.update(subifds=len(sizes) - 1, metadata=meta)
            else:
                level_options.update(subfiletype=1, metadata=None)
            tw.write(_level_tiles(band, w, h, tile, spill), **level_options)
            if spill is not None:
                spill = spill.finish()
                if spill.rows != sizes[i + 1][1]:
                    raise AssertionError(f"level {i + 1}: {spill.rows} rows, not {sizes[i + 1][1]}")
                band = spill.band
            if i > 0:
                os.unlink(spill_dir / f"level{i}.raw")  # written; free the disk
