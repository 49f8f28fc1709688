"""Pixels of a SIMULATED packed section (`packed`): stain densities, optics, scan, JPEG.

Densities of two stains (hematoxylin, and eosin or PAS) are painted per pixel
from the instance labels, then turned into RGB by Beer-Lambert with the section's
stain vectors: at about 2.5 um/px a nucleus is a dot, so epithelium is dotted
lilac with a denser basal rim, a lumen is near white, interstitium is glass with
pink clumps and red vessels, the tunica a pink band.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage


def noise(rng: np.random.Generator, shape, sigma_px: float) -> np.ndarray:
    """Smooth Gaussian noise of sd about 1 and feature size `sigma_px` (coarse features
    are drawn on a coarser grid and interpolated: a large blur is slow)."""
    k = max(1, int(sigma_px / 3))
    small = (-(-shape[0] // k) + 2, -(-shape[1] // k) + 2)
    g = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma_px / k)
    if k > 1:
        g = ndimage.zoom(g, k, order=1)
    g = g[: shape[0], : shape[1]]
    return g / (g.std() + 1e-6)


def seams(labels: np.ndarray, one_sided: bool = False) -> np.ndarray:
    """Pixels with a 4-neighbour of another label; `one_sided`: only the higher label's
    side of each seam (so that two cells with no cleft between them still touch)."""
    b = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        a = np.moveaxis(labels, axis, 0)
        out = np.moveaxis(b, axis, 0)
        out[1:] |= a[1:] > a[:-1] if one_sided else a[1:] != a[:-1]
        out[:-1] |= a[:-1] > a[1:] if one_sided else a[1:] != a[:-1]
    return b


def _tubule_densities(rng, labels: np.ndarray, look: dict, mpp: float, dots: np.ndarray):
    """(hematoxylin, second stain) densities of the tubules: epithelium, rim, lumen."""
    n = int(labels.max())
    inside = labels > 0
    d = ndimage.distance_transform_edt(~(seams(labels) | (labels == 0))).astype(np.float32) * mpp
    dmax = np.concatenate([[1.0], ndimage.maximum(d, labels, np.arange(1, n + 1))])
    rel = d / np.maximum(dmax[labels], 1e-3)
    frac = np.clip(look["lumen"] * np.exp(rng.normal(0, 0.5, n + 1)), 0, 0.6)
    frac[rng.random(n + 1) < 0.25] = 0.0  # cut through the epithelium: no lumen
    lumen = inside & (rel > 1 - frac[labels] + 0.12 * noise(rng, labels.shape, 4 / mpp))
    lumen &= frac[labels] > 0
    f = np.exp(rng.normal(0, 0.12, n + 1)).astype(np.float32)[labels]
    basal = np.exp(-d / 12.0)
    adluminal = np.exp(-np.abs(rel - (1 - frac[labels])) * dmax[labels] / 10.0)
    epi = inside & ~lumen
    h = look["h_od"] * f * (0.45 + dots * (0.6 + 0.6 * basal + 0.3 * adluminal))
    # Basement membrane and flat myoid nuclei: a seam even where tubules touch, from
    # crisp to nearly invisible (real coarse scans often show none between touching ones).
    rim = (d < 3.0) * np.float32(look["rim"])
    h = h + look["h_od"] * 0.3 * rim
    e = look["e_od"] * f * (0.75 + 0.15 * noise(rng, labels.shape, 2.0) + 0.8 * rim)
    fluff = np.clip(noise(rng, labels.shape, 1.5), 0, None)
    h = np.where(epi, h, np.where(lumen, 0.04 * look["h_od"] * fluff, 0.0))
    e = np.where(epi, e, np.where(lumen, 0.25 * look["e_od"] * fluff, 0.0))
    return h.astype(np.float32), e.astype(np.float32)


def _interstitium(rng, free, tunica, look, mpp, dots):
    """Densities outside the tubules: Leydig clumps, vessels, tunica; glass elsewhere."""
    thr = 2.0 - 2.5 * look["cellularity"]
    clumps = free & (noise(rng, free.shape, 6 / mpp) > thr)
    vessels = free & (noise(rng, free.shape, 5 / mpp) > 2.4)
    h = look["h_od"] * (0.7 * dots * clumps + 0.5 * dots * tunica)
    e = look["e_od"] * (1.1 * clumps + 2.5 * vessels + 1.3 * tunica)
    return h.astype(np.float32), e.astype(np.float32)


def _strokes(rng, shape, count: int, width_px: tuple[float, float]) -> np.ndarray:
    """A mask of `count` random thick curves (tears or folds)."""
    img = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(count):
        p = rng.uniform([0, 0], [shape[1], shape[0]])
        heading = rng.uniform(0, 2 * np.pi)
        pts = [tuple(p)]
        for _ in range(8):
            heading += rng.normal(0, 0.3)
            p = p + 0.06 * max(shape) * np.array([np.cos(heading), np.sin(heading)])
            pts.append(tuple(p))
        draw.line(pts, fill=255, width=max(1, int(rng.uniform(*width_px))))
    return np.asarray(img) > 0


def paint(rng, labels, tissue, tunica, look: dict, mpp: float) -> np.ndarray:
    """uint8 RGB of a packed section, scanned and compressed as `look` says."""
    shape = labels.shape
    dots = np.clip(noise(rng, shape, 0.35 * 3.5 / mpp + 0.3) - 0.3, 0, None)
    h, e = _tubule_densities(rng, labels, look, mpp, dots)
    hi, ei = _interstitium(rng, tissue & (labels == 0) & ~tunica, tunica, look, mpp, dots)
    h, e = h + hi, e + ei
    if look["folds"]:
        fold = _strokes(rng, shape, look["folds"], (15 / mpp, 50 / mpp)) & tissue
        h, e = np.where(fold, 1.8 * h, h), np.where(fold, 1.8 * e, e)
    if look["tears"]:
        tear = _strokes(rng, shape, look["tears"], (3 / mpp, 15 / mpp))
        h, e = np.where(tear, 0, h), np.where(tear, 0, e)
    od = h[..., None] * np.float32(look["h_vec"]) + e[..., None] * np.float32(look["e_vec"])
    od = ndimage.gaussian_filter(od, (look["blur_px"], look["blur_px"], 0))
    light = 1.0 - 0.04 * noise(rng, shape, max(shape) / 4)[..., None]
    rgb = np.float32(look["background"]) * light * 10.0 ** (-od)
    rgb += look["noise"] * rng.standard_normal(rgb.shape).astype(np.float32)
    specks = ~tissue & (noise(rng, shape, 1.0) > 3.6)
    rgb[specks] *= 0.7
    return degrade(np.clip(rgb, 0, 255).astype(np.uint8), look, mpp)


def degrade(rgb: np.ndarray, look: dict, mpp: float) -> np.ndarray:
    """Scanned at `look['scan_mpp']` (when coarser than `mpp`), JPEG, back at `mpp`."""
    h, w = rgb.shape[:2]
    img = Image.fromarray(rgb)
    factor = look["scan_mpp"] / mpp
    if factor > 1.05:
        img = img.resize((max(8, round(w / factor)), max(8, round(h / factor))), Image.BOX)
    if look["jpeg"] is not None:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=look["jpeg"])
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    return np.asarray(img)
