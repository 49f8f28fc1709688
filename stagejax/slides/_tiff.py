"""Pyramidal (Big)TIFF, OME-TIFF and SVS through tifffile, one tile (or strip) at a time.

tifffile finds the pyramid (`series[0].levels`: OME/SubIFD pyramids, SVS and
main-chain reduced pages); a region read fetches only the segments it touches
(`FileHandle.read_segments`) and decodes each with the page's own codec
(`TiffPage.decode`), so memory is the region plus one segment. No zarr.

Checks at open, so a bad file fails before any work: the first series is a
2-D image of 8/16-bit unsigned samples in a colour model we convert; no
segment decodes to more than `MAX_SEGMENT_BYTES`; the data of every level
lies inside the file (a truncated copy fails here, not halfway through a run);
tifffile logged no error while parsing the tags.
"""

import collections
import logging
import math
import threading
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from stagejax import images
from stagejax.errors import DatasetError
from stagejax.slides.base import Level, Slide, resolve_mpp

log = logging.getLogger(__name__)

# A strip or tile larger than this (decoded) is a whole image stored in one piece.
MAX_SEGMENT_BYTES = 512 << 20
# What a codec raises for corrupt data (not DelayedImportError: a missing codec is a bug).
_CODEC_ERRORS = (tifffile.TiffFileError, zlib.error) + tuple(
    error
    for name in dir(imagecodecs)
    if name.endswith("Error")
    and name != "DelayedImportError"
    and isinstance(error := getattr(imagecodecs, name), type)
)
_PHOTOMETRIC = tifffile.PHOTOMETRIC
# Codecs that return YCbCr data as RGB (JPEG; JPEG 2000 incl. Aperio's 33003/33005).
_YCBCR_CODECS = (6, 7, 33003, 33005, 34712)
_SUPPORTED = (_PHOTOMETRIC.MINISWHITE, _PHOTOMETRIC.MINISBLACK, _PHOTOMETRIC.RGB,
              _PHOTOMETRIC.PALETTE, _PHOTOMETRIC.YCBCR)  # fmt: skip
_UM_PER_RESUNIT = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}  # inch, cm, mm, um (1: no unit)
_UM_PER_OME_UNIT = {"µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3,
                    "cm": 1e4, "m": 1e6, "Å": 1e-4, "pm": 1e-6}  # fmt: skip


class _ErrorLog(logging.Handler):
    """Collects the errors tifffile logs (instead of raising) for broken tags."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _open(path: Path) -> tifffile.TiffFile:
    errors = _ErrorLog()
    tf_log = logging.getLogger("tifffile")
    tf_log.addHandler(errors)
    try:
        tf = tifffile.TiffFile(path)
        series = tf.series  # parses every page
    except tifffile.TiffFileError as e:
        raise DatasetError(f"{path}: not a readable TIFF (corrupt or truncated): {e}") from None
    finally:
        tf_log.removeHandler(errors)
    if errors.messages or not series:
        tf.close()
        why = errors.messages[0] if errors.messages else "no image in the file"
        raise DatasetError(f"{path}: corrupt or truncated TIFF: {why}")
    return tf


def _ome_mpp(tf: tifffile.TiffFile) -> float | None:
    try:
        root = ET.fromstring(tf.ome_metadata)
    except ET.ParseError as e:
        log.warning("%s: unreadable OME-XML (%s); using the TIFF resolution tags", tf.filename, e)
        return None
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    unit = pixels.get("PhysicalSizeXUnit", "µm")
    if unit not in _UM_PER_OME_UNIT:
        log.warning("%s: unknown OME PhysicalSizeXUnit %r; pixel size ignored", tf.filename, unit)
        return None
    return float(pixels.get("PhysicalSizeX")) * _UM_PER_OME_UNIT[unit]


def _file_mpp(tf: tifffile.TiffFile, page: tifffile.TiffPage) -> tuple[float | None, str]:
    """(um/px of level 0, where it came from) from the file's metadata; None if absent."""
    if tf.is_ome and (mpp := _ome_mpp(tf)) is not None:
        return mpp, "OME PhysicalSizeX"
    if tf.is_svs:
        mpp = tifffile.tifffile.svs_description_metadata(page.description).get("MPP")
        if isinstance(mpp, int | float) and mpp > 0:
            return float(mpp), "the Aperio MPP"
    if page.tags.get(282) is None:  # no XResolution
        return None, "TIFF resolution"
    xres = page.get_resolution()[0]
    unit = int(page.resolutionunit)
    if unit == 1 and (tf.imagej_metadata or {}).get("unit") in ("micron", "um", "µm"):
        return (1.0 / xres if xres > 0 else None), "the ImageJ resolution"
    if unit not in _UM_PER_RESUNIT or xres <= 0:
        return None, "TIFF resolution"
    return _UM_PER_RESUNIT[unit] / xres, "the TIFF XResolution"


def _check_page(path: Path, page: tifffile.TiffPage) -> None:
    what = f"{path}: level of {page.imagewidth} x {page.imagelength} px"
    if page.imagedepth > 1:
        raise DatasetError(f"{what} is a volume (depth {page.imagedepth}); expected a 2-D slide")
    if page.dtype not in (np.uint8, np.uint16):
        raise DatasetError(f"{what}: unsupported pixel type {page.dtype}; expected 8/16-bit")
    if page.photometric not in _SUPPORTED or (
        page.photometric == _PHOTOMETRIC.YCBCR and page.compression not in _YCBCR_CODECS
    ):
        raise DatasetError(f"{what}: unsupported colour model {page.photometric.name}")
    rows, cols = _segment_shape(page)
    if rows * cols * page.samplesperpixel * page.dtype.itemsize > MAX_SEGMENT_BYTES:
        raise DatasetError(
            f"{what} is stored in {rows} x {cols} px pieces, too large to read in bounded "
            "memory; save it as a tiled pyramidal TIFF (e.g. OME-TIFF from QuPath)"
        )


def _segment_shape(page: tifffile.TiffPage) -> tuple[int, int]:
    if page.is_tiled:
        return page.tilelength, page.tilewidth
    return min(page.rowsperstrip or page.imagelength, page.imagelength), page.imagewidth


def _data_end(page: tifffile.TiffPage) -> int:
    offsets = np.asarray(page.dataoffsets, np.int64)
    counts = np.asarray(page.databytecounts, np.int64)
    return int((offsets + counts).max(initial=0))


class TiffSlide(Slide):
    """A TIFF-based slide read through tifffile, one segment at a time."""

    def __init__(self, path: Path, mpp: float | None, mpp_flag: str):
        self._tf = _open(path)
        self._tf.filehandle.set_lock(True)  # regions are read from several threads
        self._cache = _TileCache()
        try:
            self._setup(path, mpp, mpp_flag)
        except BaseException:
            self._tf.close()
            raise

    def _setup(self, path: Path, mpp: float | None, mpp_flag: str) -> None:
        tf = self._tf
        pages = [lv.keyframe for lv in tf.series[0].levels]
        size = tf.filehandle.size
        for page in pages:
            _check_page(path, page)
            if (end := _data_end(page)) > size:
                raise DatasetError(
                    f"{path}: truncated: image data runs to byte {end:,} but the file has {size:,}"
                )
        w0, h0 = pages[0].imagewidth, pages[0].imagelength
        levels = [
            Level(p.imagewidth, p.imagelength, (w0 / p.imagewidth + h0 / p.imagelength) / 2)
            for p in pages
        ]
        file_mpp, source = _file_mpp(tf, pages[0])
        mpp, source = resolve_mpp(path, file_mpp, source, mpp, mpp_flag)
        kind = "ome-tiff" if tf.is_ome else "svs" if tf.is_svs else "tiff"
        super().__init__(path, kind, levels, mpp, source)
        self._pages = pages
        self.tile_shape = _segment_shape(pages[0])
        page = pages[0]
        self._shift = 8 * (page.dtype.itemsize - 1)  # 16-bit: the high byte, until known
        if page.dtype == np.uint16:
            self._shift = self._significant_bits() - 8
            bits = self._shift + 8
            log.info(
                "%s: 16-bit samples scaled to 8 bit %s",
                path,
                "(high byte kept)" if bits == 16 else f"by their {bits}-bit range",
            )
        if page.samplesperpixel in (1, 2) and page.photometric != _PHOTOMETRIC.PALETTE:
            log.info("%s: grayscale slide converted to RGB", path)

    def close(self) -> None:
        self._tf.close()

    def _significant_bits(self) -> int:
        """The bits the slide's 16-bit samples use (`images.significant_bits`): the
        declared BitsPerSample, else SMaxSampleValue, else the largest value of a
        grid of regions of the smallest level (a 12-bit scan must not become 16 grey
        levels; tiles must all be scaled alike)."""
        page, level = self._pages[0], len(self._pages) - 1
        declared = int(page.bitspersample)
        if (smax := page.tags.get(281)) is not None:
            top = np.asarray(smax.value, np.uint16)
        else:
            lw, lh = self.levels[level].dimensions
            side = 256
            xs = np.unique(np.linspace(0, max(lw - side, 0), 8).astype(int))
            ys = np.unique(np.linspace(0, max(lh - side, 0), 8).astype(int))
            top = np.array([
                self._read_raw(x, y, min(side, lw - x), min(side, lh - y), level)[..., :3].max()
                for y in ys for x in xs
            ])  # fmt: skip
        return images.significant_bits(top, declared)

    def _read(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        return _to_rgb8(self._read_raw(x, y, w, h, level), self._pages[level], self._shift)

    def _read_raw(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        """The region's samples as stored (h, w, samples per pixel)."""
        page = self._pages[level]
        rows, cols = _segment_shape(page)
        nrow, ncol = math.ceil(page.imagelength / rows), math.ceil(page.imagewidth / cols)
        spp = page.samplesperpixel
        planes = spp if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE else 1
        indices = [
            p * nrow * ncol + r * ncol + c
            for p in range(planes)
            for r in range(y // rows, (y + h - 1) // rows + 1)
            for c in range(x // cols, (x + w - 1) // cols + 1)
        ]
        white = 0 if page.photometric == _PHOTOMETRIC.MINISWHITE else np.iinfo(page.dtype).max
        raw = np.empty((h, w, spp), page.dtype)
        for seg, (s, _, sy, sx, _), shape in self._segments(level, indices):
            y0, y1 = max(y, sy), min(y + h, sy + shape[1])
            x0, x1 = max(x, sx), min(x + w, sx + shape[2])
            dst = raw[y0 - y : y1 - y, x0 - x : x1 - x, s : s + shape[3]]
            dst[...] = white if seg is None else seg[0, y0 - sy : y1 - sy, x0 - sx : x1 - sx]
        return raw

    def _segments(self, level: int, indices: list[int]) -> list[tuple]:
        """The decoded segments ``indices`` of ``level`` (page.decode's (data, place,
        shape)), from the tile cache where they are; the others read and decoded."""
        page = self._pages[level]
        found = {i: self._cache.get((level, i)) for i in indices}
        missing = [i for i, tile in found.items() if tile is None]
        segments = self._tf.filehandle.read_segments(
            [page.dataoffsets[i] for i in missing], [page.databytecounts[i] for i in missing],
            missing, sort=True,
        ) if missing else []  # fmt: skip
        for data, index in segments:
            try:
                found[index] = page.decode(data, index, jpegtables=page.jpegtables)
            except _CODEC_ERRORS as e:
                raise DatasetError(f"{self.path}: cannot decode tile {index} of level {level} "
                                   f"(corrupt file): {e}") from None  # fmt: skip
            self._cache.put((level, index), found[index])
        return [found[i] for i in indices]


class _TileCache:
    """Decoded tiles, the most recently used kept up to ``max_bytes``.

    Why: the crops of neighbouring tubules overlap (a tubule's 1,152 px square at the
    study's scale spans 9-16 tiles of 512 px, and its neighbours' squares share
    about half of them), so without it section mode decodes most tiles twice.
    Thread-safe: several threads cut tubules from one slide.
    """

    def __init__(self, max_bytes: int = 128 << 20):
        self.max_bytes, self.bytes = max_bytes, 0
        self._tiles: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
            return tile

    def put(self, key, tile) -> None:
        size = tile[0].nbytes if tile[0] is not None else 0
        with self._lock:
            if key in self._tiles or size > self.max_bytes:
                return
            self._tiles[key] = tile
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._tiles.popitem(last=False)
                self.bytes -= old[0].nbytes if old[0] is not None else 0


def _to_rgb8(raw: np.ndarray, page: tifffile.TiffPage, shift: int = 8) -> np.ndarray:
    """uint8 RGB from decoded samples, converting as stagejax.images does;
    16-bit samples are shifted right by ``shift`` (16 - 8: the high byte)."""
    if page.photometric == _PHOTOMETRIC.PALETTE:
        lut = (np.asarray(page.colormap).T >> 8).astype(np.uint8)  # (entries, 3) RGB
        return lut[raw[..., 0]]
    if raw.dtype == np.uint16:
        raw = np.minimum(raw >> shift, 255).astype(np.uint8)
    if page.photometric == _PHOTOMETRIC.MINISWHITE:
        raw = 255 - raw
    if raw.shape[2] < 3:  # gray, or gray + alpha
        return np.repeat(raw[..., :1], 3, axis=2)
    return np.ascontiguousarray(raw[..., :3])  # alpha and extra samples dropped
