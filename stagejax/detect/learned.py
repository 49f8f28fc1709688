"""The learned detector: U-Net maps by tiled, batched, jitted inference, then instances.

Why tiles of one fixed shape: a whole section at 2.5 um/px is ~1,800 x 1,400 px
and its size varies; fixed (BATCH, TILE, TILE, 3) batches (the last one padded
with glass) make `jax.jit` compile once per process, on the accelerator when
JAX has one, else on the CPU. Tiles overlap by MARGIN px on every side, more
than the network's receptive radius, and only their cores are kept, so the
stitched maps equal those of the untiled (glass-padded) image.

Instances: connected cores (predicted normalised distance above
`seed_threshold`) seed a watershed of the distance inside the predicted
foreground; touching tubules are split where the distance dips along their
seam. Where a seam's dip is shallow (tight packing, lengthwise bands) one core
spans two tubules, so a core is split into its parts at higher thresholds
(every `split_step` up to `split_top`) as long as two or more of them are large
enough to be tubules' own cores (`min_split_um2`): a core splits where it has
two tubule-sized peaks, not at every ripple. Each instance is hole-filled and
kept whole if its area is plausible.
"""

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from PIL import Image
from scipy import ndimage
from skimage import filters, segmentation

from stagejax.detect import segment
from stagejax.detect.params import DetectParams
from stagejax.detect.unet import UNet

log = logging.getLogger(__name__)

TILE = 384  # Tile side (coarse px); a multiple of the U-Net's pooling grid (8).
MARGIN = 48  # Context kept around each tile's core; above the receptive radius (46 px).
BATCH = 8  # Tiles per jitted call.
REFERENCE_OD = 0.3  # Tissue's 80th-percentile mean optical density after `normalise_stain`.
TRACES = {"forward": 0}  # How often the forward pass was traced (compiled), for tests.


@dataclasses.dataclass(frozen=True)
class Postprocess:
    """From the U-Net's maps to instances (thresholds on probabilities, sizes in um^2).

    The defaults were chosen on SIMULATED validation sections (seeds 20-25,
    stainings 0 and +/-0.5; the split fields on seeds 20-22 at 0 and +0.5 and packed
    seeds 300-307, 2026-12-07), not on the benchmark's held-out seeds or real images."""

    fg_threshold: float = 0.5  # Foreground probability above which a pixel is tubule.
    seed_threshold: float = 0.35  # Normalised distance above which a pixel is a tubule's core.
    seed_sigma_um: float = 0.0  # Blur of the distance map before its cores are taken.
    min_seed_um2: float = 800.0  # Smaller cores are noise (a 5,000 um^2 tubule's is ~2,000).
    split_step: float = 0.1  # Thresholds above seed_threshold at which a core may split...
    split_top: float = 0.65  # ...up to this one (below seed_threshold: never split)...
    min_split_um2: float = 4_500.0  # ...into parts each at least this large.
    min_area_um2: float = 1_000.0  # Smaller instances are dropped.
    max_area_um2: float = 250_000.0  # Larger ones are unsplit clumps.

    @classmethod
    def from_dict(cls, values: dict) -> "Postprocess":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: float(v) for k, v in values.items() if k in names})


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tiles):
    """Sigmoid maps of a batch of uint8 tiles; traced once per tile/batch shape."""
    TRACES["forward"] += 1
    model = nnx.merge(graphdef, params)
    return jax.nn.sigmoid(model(tiles))


def tile_origins(height: int, width: int, core: int) -> list[tuple[int, int]]:
    """Top-left corners (in the padded image) of the tiles whose cores cover H x W."""
    ny, nx = max(1, math.ceil(height / core)), max(1, math.ceil(width / core))
    return [(y * core, x * core) for y in range(ny) for x in range(nx)]


def predict_tiled(
    forward: Callable[[np.ndarray], np.ndarray],
    rgb: np.ndarray,
    tile: int = TILE,
    margin: int = MARGIN,
    batch: int = BATCH,
) -> np.ndarray:
    """float32 (H, W, C) maps of `forward` over a uint8 (H, W, 3) image, tile by tile.

    The image is padded with white (glass) by `margin` px and to whole cores;
    every call of `forward` gets a (batch, tile, tile, 3) array.
    """
    core = tile - 2 * margin
    h, w = rgb.shape[:2]
    origins = tile_origins(h, w, core)
    ny, nx = origins[-1][0] // core + 1, origins[-1][1] // core + 1
    padded = np.full((ny * core + 2 * margin, nx * core + 2 * margin, 3), 255, np.uint8)
    padded[margin : margin + h, margin : margin + w] = rgb
    pending = []
    for b in range(0, len(origins), batch):
        chunk = origins[b : b + batch]
        tiles = np.full((batch, tile, tile, 3), 255, np.uint8)
        for k, (y, x) in enumerate(chunk):
            tiles[k] = padded[y : y + tile, x : x + tile]
        pending.append((chunk, forward(tiles)))  # dispatched; gathered below
    out, inner = None, slice(margin, margin + core)
    for chunk, maps in pending:
        maps = np.asarray(maps, np.float32)
        if out is None:
            out = np.zeros((ny * core, nx * core, maps.shape[-1]), np.float32)
        for k, (y, x) in enumerate(chunk):
            out[y : y + core, x : x + core] = maps[k, inner, inner]
    return out[:h, :w]


def normalise_stain(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB with its optical density scaled so that the tissue's 80th-percentile mean
    density is REFERENCE_OD: pale PAS and saturated H&E sections reach the network alike.
    One factor for the whole image (a gamma on intensities), so tiles stay consistent."""
    od = segment.optical_density(rgb).mean(-1)
    if od.max() - od.min() < 0.02:
        return rgb  # glass (or one flat colour) alone
    tissue = od[od > max(filters.threshold_otsu(od), 0.02)]  # Otsu: tissue apart from glass
    if tissue.size < 100:
        return rgb
    k = float(np.clip(REFERENCE_OD / max(np.percentile(tissue, 80), 1e-3), 0.25, 4.0))
    lut = 255.0 * (np.maximum(np.arange(256), 1) / 255.0) ** k
    return np.clip(np.round(lut), 0, 255).astype(np.uint8)[rgb]


def _stain_contrast(rgb: np.ndarray, mpp: float, inner: bool = False) -> tuple[np.ndarray, bool]:
    """(tissue mask, whether any tissue stands out by its stain): the classical
    detector's test for an image with no tubule to find (glass, one flat colour).
    ``inner``: looked for away from the tissue's edge (three times the mask's smoothing),
    where a density-scaled image's step from glass to tissue would pass for stain."""
    od = segment.optical_density(rgb)
    params = DetectParams()
    tissue = segment.tissue_mask(od, mpp, params)
    probe = tissue
    if inner:
        depth = math.ceil(3 * segment.tissue_smoothing_px(mpp))
        probe = ndimage.binary_erosion(tissue, iterations=depth)
    _, stained = segment.foreground(segment.stain_channel(od, "od"), probe, mpp, params)
    return tissue, bool(stained.any())


def _resize_maps(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of float (H, W, C) maps to `shape`."""
    size = (shape[1], shape[0])
    return np.stack(
        [np.asarray(Image.fromarray(maps[..., c]).resize(size, Image.BILINEAR)) for c in
         range(maps.shape[-1])], -1)  # fmt: skip


def split_cores(dist: np.ndarray, mask: np.ndarray, mpp: float, post: Postprocess) -> np.ndarray:
    """int32 seed labels: the cores of `dist` above `seed_threshold` in `mask`, each split
    at the higher thresholds while it holds two or more parts of `min_split_um2`."""
    above = np.arange(post.seed_threshold + post.split_step, post.split_top + 1e-6, post.split_step)
    min_seed, min_split = post.min_seed_um2 / mpp**2, post.min_split_um2 / mpp**2
    base, _ = ndimage.label((dist > post.seed_threshold) & mask)
    seeds, n = np.zeros(dist.shape, np.int32), 0
    for i, sl in enumerate(ndimage.find_objects(base), start=1):
        if sl is None:
            continue
        core = base[sl] == i
        if core.sum() < min_seed:
            continue
        for part in _split(dist[sl], core, above, min_split):
            n += 1
            seeds[sl][part] = n
    return seeds


def _split(dist: np.ndarray, core: np.ndarray, levels: np.ndarray, min_px: float) -> list:
    """`core` as one part, or its large parts at the next levels where there are two."""
    for k, level in enumerate(levels):
        parts, n = ndimage.label(core & (dist > level))
        sizes = np.bincount(parts.ravel(), minlength=n + 1)[1:]
        big = np.flatnonzero(sizes >= min_px) + 1
        if len(big) >= 2:
            return [p for j in big for p in _split(dist, parts == j, levels[k + 1 :], min_px)]
        if len(big) == 0:
            break
    return [core]


def instances(fg: np.ndarray, dist: np.ndarray, mpp: float, post: Postprocess) -> np.ndarray:
    """int32 labels 1..N of tubule instances from foreground and distance probability maps."""
    mask = fg > post.fg_threshold
    if post.seed_sigma_um > 0:
        dist = ndimage.gaussian_filter(dist, post.seed_sigma_um / mpp)
    regions = segmentation.watershed(-dist, split_cores(dist, mask, mpp, post), mask=mask)
    out = np.zeros(regions.shape, np.int32)
    lo, hi = post.min_area_um2 / mpp**2, post.max_area_um2 / mpp**2
    label = 0
    for i, sl in enumerate(ndimage.find_objects(regions), start=1):
        if sl is None:
            continue
        sl = segment.grow_slice(sl, regions.shape, 1)
        own = regions[sl] == i
        part = segment.largest_part(ndimage.binary_fill_holes(own))
        if not lo <= part.sum() <= hi:
            continue
        label += 1
        out[sl][part & (out[sl] == 0) & ((regions[sl] == 0) | own)] = label
    return out


class UNetDetector:
    """The learned detector: a U-Net with its post-processing, at the resolution it learnt."""

    def __init__(self, model: UNet, work_mpp: float, post: Postprocess, source: str, meta=None):
        self.model = model
        self.work_mpp = float(work_mpp)
        self.post = post
        self.source = source  # the weights file, for messages and records
        self.meta = dict(meta or {})
        self.grow_um = 0.0
        self.tissue_od = DetectParams().tissue_od
        self.normalise = bool(self.meta.get("normalise_stain", False))  # older weights: off
        self._graphdef, params = nnx.split(model, nnx.Param)
        self._params = jax.device_put(params)  # once, onto the default (accelerator) device

    def forward(self, tiles: np.ndarray):
        """Probability maps of one (BATCH, TILE, TILE, 3) batch (jitted, asynchronous)."""
        return _forward(self._graphdef, self._params, tiles)

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """float32 (H, W, 2) probabilities (foreground, normalised distance)."""
        return predict_tiled(self.forward, rgb)

    def segment(self, rgb: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray]:
        """(tubule instance labels, tissue mask) of a coarse RGB image at `mpp` um/px.

        An image coarser than the U-Net's resolution is enlarged to it for the network
        (tubules keep the size it learnt) and its maps brought back to `mpp`."""
        x = normalise_stain(rgb) if self.normalise else rgb
        tissue, stained = _stain_contrast(rgb, mpp)
        if not stained and self.normalise:  # a pale stain: asked again at the reference density
            tissue, stained = _stain_contrast(x, mpp, inner=True)
        if not stained:  # no stain contrast in the tissue (the classical guard): none
            return np.zeros(rgb.shape[:2], np.int32), tissue
        factor = mpp / self.work_mpp
        if factor > 1.1:
            size = (round(rgb.shape[1] * factor), round(rgb.shape[0] * factor))
            x = np.asarray(Image.fromarray(x).resize(size, Image.BILINEAR))
            maps = _resize_maps(self.predict(x), rgb.shape[:2])
        else:
            maps = self.predict(x)
        return instances(maps[..., 0], maps[..., 1], mpp, self.post), tissue

    def describe(self) -> str:
        return f"U-Net {Path(self.source).name}"
