"""Per-pixel work of the classical detector, on one coarse RGB image (numpy/scipy, CPU).

Steps, all sized in micrometres through the image's pixel size:
  1. optical density, and the stain channel of `DetectParams.feature`: the mean
     OD, or hematoxylin / PAS by colour deconvolution with scikit-image's
     hematoxylin-PAS matrix (`skimage.color.hpx_from_rgb`);
  2. tissue: smoothed mean optical density above `tissue_od` (glass is near 0);
  3. foreground: the smoothed channel above `threshold_scale` x its Otsu
     threshold over the tissue (per section, so it follows the stain); the
     tubule "body" is where its blurred fraction exceeds `body_level`;
  4. seeds: maxima of the body's distance transform (lumens filled), one per
     tubule, at least `seed_distance_um` apart; instances: watershed of that
     distance from the seeds, so borders run along the seams between tubules;
  5. each instance: its body, holes filled, opened, made convex (clipped to its
     own region); implausible ones dropped by area (um^2) and solidity.
"""

import numpy as np
from scipy import ndimage
from skimage import color, feature, filters, morphology, segmentation

from stagejax.detect.params import DetectParams


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """float32 (H, W, 3) optical density (log10) of uint8 RGB; white glass is 0."""
    lut = (-np.log10(np.maximum(np.arange(256), 1) / 255.0)).astype(np.float32)
    return lut[rgb]


def stain_channel(od: np.ndarray, feature: str) -> np.ndarray:
    """The density of one stain: hematoxylin or PAS by deconvolution, or the mean OD."""
    if feature == "od":
        return od.mean(-1)
    column = {"hematoxylin": 0, "pas": 1}[feature]
    return np.maximum(od @ color.hpx_from_rgb[:, column].astype(np.float32), 0.0)


def tissue_smoothing_px(mpp: float) -> float:
    """The Gaussian sigma `tissue_mask` smooths with (8 um): its edge blurs this far."""
    return max(0.5, 8.0 / mpp)


def tissue_mask(od: np.ndarray, mpp: float, params: DetectParams) -> np.ndarray:
    """Tissue vs glass: smoothed mean OD over `tissue_od`, holes filled, specks dropped."""
    mean = ndimage.gaussian_filter(od.mean(-1), sigma=tissue_smoothing_px(mpp))
    tissue = ndimage.binary_fill_holes(mean > params.tissue_od)
    return morphology.remove_small_objects(tissue, max_size=max(1, int(0.02e6 / mpp**2)))


def foreground(channel: np.ndarray, tissue: np.ndarray, mpp: float, p: DetectParams):
    """(smoothed stain channel, tubule epithelium mask inside `tissue`).

    The threshold is `threshold_scale` x Otsu's over the tissue, so it follows
    each section's staining. Tubules touch; what separates them is a thin pale
    seam, found as a valley of the channel narrower than `valley_um` (its grey
    closing minus itself) and cut out when deeper than `valley_frac` x threshold.
    """
    smooth = ndimage.gaussian_filter(channel, sigma=max(0.3, p.smooth_um / mpp))
    values = smooth[tissue]
    if values.size < 2 or values.min() == values.max():
        return smooth, np.zeros_like(tissue)
    otsu = filters.threshold_otsu(values)
    if values[values > otsu].mean() - values[values <= otsu].mean() < p.min_contrast:
        return smooth, np.zeros_like(tissue)  # uniform tissue: nothing stands out as tubules
    threshold = p.threshold_scale * otsu
    fg = (smooth > threshold) & tissue
    if p.valley_um / mpp >= 1.5:
        disk = morphology.disk(max(1, int(round(p.valley_um / mpp / 2))))
        valley = ndimage.grey_closing(smooth, footprint=disk) - smooth
        fg &= valley < p.valley_frac * threshold
    return smooth, fg


def seeds(body: np.ndarray, mpp: float, p: DetectParams) -> tuple[np.ndarray, np.ndarray]:
    """(int32 seed labels, the distance map they are maxima of): one seed per tubule.

    The distance is to the outside of the tubule bodies, lumens (holes up to
    `max_hole_um2`) filled; seeds are at least `seed_distance_um` apart and
    `seed_radius_um` deep (shallower: interstitial cell clusters)."""
    filled = morphology.remove_small_holes(body, max_size=max(1, int(p.max_hole_um2 / mpp**2)))
    dist = ndimage.distance_transform_edt(filled).astype(np.float32)
    dist = ndimage.gaussian_filter(dist, sigma=max(0.5, p.seed_sigma_um / mpp))
    peaks = feature.peak_local_max(
        dist, min_distance=max(1, int(p.seed_distance_um / mpp)),
        threshold_abs=p.seed_radius_um / mpp, exclude_border=False,
    )  # fmt: skip
    markers = np.zeros(body.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return markers, dist


def split_instances(fg: np.ndarray, tissue: np.ndarray, mpp: float, p: DetectParams) -> np.ndarray:
    """int32 labels 1..N of tubule instances (0 = none), filtered by area and solidity."""
    relief = ndimage.gaussian_filter(fg.astype(np.float32), sigma=max(0.5, p.relief_um / mpp))
    body = relief > p.body_level  # the tubules, smoothly outlined
    markers, dist = seeds(body, mpp, p)
    regions = segmentation.watershed(-dist, markers, mask=tissue, compactness=p.compactness)
    regions = merge_split(regions, dist, p.merge_ratio)
    out = np.zeros(regions.shape, np.int32)
    min_px, max_px = p.min_area_um2 / mpp**2, p.max_area_um2 / mpp**2
    label = 0
    for i, sl in enumerate(ndimage.find_objects(regions), start=1):
        if sl is None:
            continue
        sl = grow_slice(sl, regions.shape, 1)
        own = regions[sl] == i
        mask = largest_part(ndimage.binary_fill_holes(own & body[sl]))
        if p.open_um / mpp >= 1:
            mask = largest_part(
                ndimage.binary_opening(mask, morphology.disk(round(p.open_um / mpp)))
            )
        area = int(mask.sum())
        if not min_px <= area <= max_px:
            continue
        hull = morphology.convex_hull_image(mask)
        if area / max(int(hull.sum()), 1) < p.min_solidity:
            continue
        if p.convex:  # the hull, but not into a neighbour's pixels
            mask = hull & ((regions[sl] == 0) | own)
        label += 1
        out[sl][mask & (out[sl] == 0)] = label
    return out


def merge_split(regions: np.ndarray, dist: np.ndarray, ratio: float) -> np.ndarray:
    """Joins neighbouring regions that are one tubule seeded twice (a ring-shaped body).

    Between two tubules the distance map drops to near 0 at the seam; inside one
    it stays high. Neighbours whose border reaches `ratio` x the lower of their
    two peak distances are merged (ratio > 1: never).
    """
    n = int(regions.max())
    if n < 2 or ratio > 1:
        return regions
    peak = ndimage.maximum(dist, regions, index=np.arange(n + 1))
    keys, saddles = [], []
    for a, b, da, db in (
        (regions[:, :-1], regions[:, 1:], dist[:, :-1], dist[:, 1:]),
        (regions[:-1], regions[1:], dist[:-1], dist[1:]),
    ):
        m = (a != b) & (a > 0) & (b > 0)
        lo, hi = np.minimum(a[m], b[m]), np.maximum(a[m], b[m])
        keys.append(lo.astype(np.int64) * (n + 1) + hi)
        saddles.append(np.minimum(da[m], db[m]))
    keys, saddles = np.concatenate(keys), np.concatenate(saddles)
    if not keys.size:
        return regions
    order = np.argsort(keys, kind="stable")
    keys, saddles = keys[order], saddles[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    parent = np.arange(n + 1)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for key, saddle in zip(keys[starts], np.maximum.reduceat(saddles, starts), strict=True):
        a, b = divmod(int(key), n + 1)
        if saddle >= ratio * min(peak[a], peak[b]):
            parent[root(b)] = root(a)
    lut = np.array([root(i) for i in range(n + 1)])
    return segmentation.relabel_sequential(lut[regions])[0]


def grow_slice(sl: tuple[slice, slice], shape, by: int) -> tuple[slice, slice]:
    return tuple(
        slice(max(s.start - by, 0), min(s.stop + by, n)) for s, n in zip(sl, shape, strict=True)
    )


def largest_part(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected part of `mask` (watershed can leave crumbs)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def segment(rgb: np.ndarray, mpp: float, params: DetectParams) -> tuple[np.ndarray, np.ndarray]:
    """(tubule instance labels, tissue mask) of a coarse RGB image at `mpp` um/px."""
    od = optical_density(rgb)
    tissue = tissue_mask(od, mpp, params)
    _, fg = foreground(stain_channel(od, params.feature), tissue, mpp, params)
    return split_instances(fg, tissue, mpp, params), tissue


def tissue_area_mm2(tissue: np.ndarray, mpp: float) -> float:
    return float(tissue.sum()) * mpp**2 / 1e6
