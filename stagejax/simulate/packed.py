"""SIMULATED packed testis sections at detection scale, for the tubule detector (not real data).

Why a second section simulator: the stage simulator (`section`) draws every cell of
round, well separated tubules in a wide interstitium, at 0.2-1 um/px; a detector
trained on it fails on real sections (issue 22), which are packed with touching
tubules split by thin white clefts, cut obliquely or lengthwise under the tunica
(bands, slit lumens), stained with H&E or PAS-hematoxylin from pale to saturated
and scanned coarse with JPEG artefacts. This one draws those properties at the
detector's scale (about 2.5 um/px), where a nucleus is a dot, fast enough (about
a second a section) to give every training step a new look: each section draws
its own packing, cut angles, clefts, lumens, interstitium, tears, folds, stain
vectors and strengths, blur, noise, scan resolution and JPEG quality (domain
randomisation). The ground truth is exact: the instance labels the pixels were
painted from.

Anatomy: tubule cells are an anisotropic Voronoi partition of the tissue (each
seed with its own elongation and orientation: tangential and long under the
tunica, random inside), relaxed by Lloyd steps; a tubule is its cell less a cleft
of varying width (down to none: touching), cut to the cell's moment ellipse
scaled by the section's `fill` (rounded profiles with interstitial corners, up to
packed polygons flattened against each other), with a wavy border and rounded
corners. Some cells are left empty: interstitial spaces and shrinkage clefts.
Where tubules touch, the seam (basement membrane) is drawn from crisp to
invisible (`rim`), as coarse real scans show it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from scipy import ndimage, spatial

from stagejax.errors import ConfigError
from stagejax.simulate import section_layout
from stagejax.simulate.packed_paint import noise as _noise
from stagejax.simulate.packed_paint import paint, seams

DETECT_MPP = 2.5  # um/px the detector works at.
LLOYD_RASTER_UM = 10.0
STAINS = {  # Unit optical-density vectors (R, G, B): Ruifrok's H&E, scikit-image's H-PAS.
    "hematoxylin": (0.650, 0.704, 0.286),
    "eosin": (0.072, 0.990, 0.105),
    "pas": (0.175, 0.972, 0.155),
}


@dataclasses.dataclass
class PackedSection:
    """A rendered section: RGB, its exact tubule instances (0 = none), pixel size, look."""

    rgb: np.ndarray  # uint8 (H, W, 3)
    labels: np.ndarray  # int32 (H, W), 1..N
    mpp: float
    look: dict


def sample_look(rng: np.random.Generator) -> dict:
    """Per-section anatomy and appearance (the domain randomisation)."""
    second = "eosin" if rng.random() < 0.6 else "pas"
    return dict(
        stain=f"hematoxylin+{second}",
        h_vec=_jitter_vector(rng, STAINS["hematoxylin"]),
        e_vec=_jitter_vector(rng, STAINS[second]),
        h_od=float(math.exp(rng.uniform(math.log(0.06), math.log(0.45)))),
        e_od=float(math.exp(rng.uniform(math.log(0.04), math.log(0.35)))),
        radius_um=float(rng.uniform(75, 115)),
        packing=float(rng.uniform(1.05, 1.45)),  # cell area / (pi r^2)
        space_fraction=float(rng.uniform(0.0, 0.25)),  # empty cells
        cleft_um=float(rng.uniform(0.5, 9.0)),
        wobble_um=float(rng.uniform(1.0, 6.0)),
        round_um=float(rng.uniform(15.0, 45.0)),
        lumen=float(rng.uniform(0.05, 0.45)),
        band_level=float(rng.uniform(-1.0, 1.0)),  # higher: fewer lengthwise bands
        cellularity=float(rng.uniform(0.05, 0.6)),
        tears=int(rng.integers(0, 4)),
        folds=int(rng.integers(0, 3)),
        blur_px=float(rng.uniform(0.3, 1.3)),
        noise=float(rng.uniform(0.5, 4.0)),
        scan_mpp=float(math.exp(rng.uniform(math.log(0.5), math.log(6.0)))),
        jpeg=int(rng.integers(30, 96)) if rng.random() < 0.75 else None,
        background=[float(v) for v in rng.uniform(236, 255, 3)],
        fill=float(rng.uniform(0.95, 1.3)),  # ellipse scale within the cell: round .. packed
        rim=float(rng.uniform(0.0, 1.0)),  # how visible the seam between touching tubules is
    )


def _jitter_vector(rng, base) -> list[float]:
    v = np.maximum(np.asarray(base) + rng.normal(0, 0.12, 3), 0.02)
    return [float(x) for x in v / np.linalg.norm(v)]


def _seeds(rng, outline, look: dict, width: float, height: float):
    """Tubule seeds (x, y, aspect, angle, weight, empty): lengthwise bands along the
    tunica on some arcs, the rest relaxed by Lloyd steps inside."""
    r = look["radius_um"]
    band_b = 0.8 * r  # half-width of a band
    border = outline.polygon(2048)
    tangent = np.roll(border, -1, 0) - np.roll(border, 1, 0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    inward = np.stack([-tangent[:, 1], tangent[:, 0]], 1)
    if np.mean(np.sum(inward * (np.array([outline.cx, outline.cy]) - border), 1)) < 0:
        inward = -inward
    banded = _noise(rng, (1, 2048), 60)[0] > look["band_level"]
    ring = _ring_seeds(rng, border, tangent, inward, banded, outline.tunica + band_b, band_b)
    xs = np.arange(0.5, width / LLOYD_RASTER_UM) * LLOYD_RASTER_UM
    ys = np.arange(0.5, height / LLOYD_RASTER_UM) * LLOYD_RASTER_UM
    gx, gy = np.meshgrid(xs, ys)
    depth, phi = outline.depth(gx, gy)
    k = ((phi + math.pi) / (2 * math.pi) * 2048).astype(int) % 2048
    region = (depth > 0) & ~(banded[k] & (depth < outline.tunica + 2 * band_b))
    pts = np.stack([gx[region], gy[region]], 1)
    cell = look["packing"] * math.pi * r**2
    n = max(4, int(round(len(pts) * LLOYD_RASTER_UM**2 / cell)))
    c = pts[rng.choice(len(pts), n, replace=False)]
    for _ in range(6):
        label = _nearest(c, np.ones(n), np.zeros(n), np.ones(n), pts)
        cnt = np.bincount(label, minlength=n)
        for j in range(2):
            c[cnt > 0, j] = np.bincount(label, pts[:, j], minlength=n)[cnt > 0] / cnt[cnt > 0]
    tilt = np.abs(rng.normal(0, 0.55, n))
    aspect = np.minimum(1 / np.cos(np.minimum(tilt, 1.3)), 3.5)
    theta = rng.uniform(0, math.pi, n)
    weight = rng.uniform(0.85, 1.15, n)
    c, aspect, theta, weight = (
        np.concatenate([ring[0], c]), np.concatenate([ring[1], aspect]),
        np.concatenate([ring[2], theta]), np.concatenate([ring[3] / r, weight]),
    )  # fmt: skip
    return c, aspect, theta, weight, rng.random(len(c)) < look["space_fraction"]


def _ring_seeds(rng, border, tangent, inward, banded, depth, half_width):
    """Seeds of lengthwise-cut tubules lying along the tunica on the banded arcs."""
    arc = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(border, axis=0), axis=1))])
    pos, out = 0.0, []
    while pos < arc[-1]:
        a = half_width * rng.uniform(1.5, 4.0)
        i = int(np.searchsorted(arc, pos + a)) % len(border)
        if banded[i]:
            p = border[i] + inward[i] * depth * rng.uniform(0.9, 1.1)
            ang = math.atan2(tangent[i, 1], tangent[i, 0]) + rng.normal(0, 0.1)
            out.append((p[0], p[1], a / half_width, ang, math.sqrt(a * half_width)))
        pos += 2 * a
    if not out:
        return np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros(0)
    v = np.asarray(out)
    return v[:, :2], v[:, 2], v[:, 3], v[:, 4]


def _nearest(c, aspect, theta, weight, pts, k: int = 8) -> np.ndarray:
    """Index of each point's nearest seed in the seeds' anisotropic, weighted metric."""
    k = min(k, len(c))
    _, near = spatial.cKDTree(c).query(pts, k=k)
    near = near.reshape(len(pts), k)
    dx, dy = pts[:, None, 0] - c[near, 0], pts[:, None, 1] - c[near, 1]
    co, si, sq = np.cos(theta[near]), np.sin(theta[near]), np.sqrt(aspect[near])
    d = np.hypot((dx * co + dy * si) / sq, (dy * co - dx * si) * sq) / weight[near]
    return near[np.arange(len(pts)), d.argmin(1)]


def _ellipses(rng, cells, inside, fill: float) -> np.ndarray:
    """Pixels within their cell's moment ellipse scaled by about `fill`: real tubules are
    rounded, flattened only where they press on each other, with interstitial corners
    between them (Voronoi cells alone are polygons)."""
    lab = np.where(inside, cells + 1, 0).ravel()
    n = int(lab.max()) + 1
    yy, xx = np.indices(cells.shape, dtype=np.float64)
    yy, xx = yy.ravel(), xx.ravel()
    count = np.maximum(np.bincount(lab, minlength=n), 1)

    def mean(v):
        return np.bincount(lab, v, minlength=n) / count

    mx, my = mean(xx), mean(yy)
    sxx, syy, sxy = mean(xx * xx) - mx**2, mean(yy * yy) - my**2, mean(xx * yy) - mx * my
    det = np.maximum(sxx * syy - sxy**2, 1e-6)
    dx, dy = xx - mx[lab], yy - my[lab]
    mahal = (syy[lab] * dx * dx - 2 * sxy[lab] * dx * dy + sxx[lab] * dy * dy) / det[lab]
    scale = fill * np.exp(rng.normal(0, 0.05, n))  # a uniform ellipse's edge is at 4
    return (mahal <= 4 * scale[lab] ** 2).reshape(cells.shape)


def _tubules(rng, cells, empty, tissue, look, mpp) -> np.ndarray:
    """Instance labels: each non-empty cell less its cleft, wavy and rounded."""
    d = (ndimage.distance_transform_edt(~(seams(cells, one_sided=True) | ~tissue)) + 0.5) * mpp
    cleft = look["cleft_um"] * np.clip(0.6 + 0.6 * _noise(rng, cells.shape, 30 / mpp), 0, 2)
    wavy = d + look["wobble_um"] * _noise(rng, cells.shape, 12 / mpp)
    mask = (wavy > 0.5 * cleft) & tissue & ~empty[cells]
    mask &= _ellipses(rng, cells, tissue, look["fill"])
    r = look["round_um"] / mpp  # opening by a disk of radius r, by distance transforms
    core = ndimage.distance_transform_edt(mask) > r
    mask &= ndimage.distance_transform_edt(~core) <= r
    labels = np.where(mask, cells + 1, 0)
    out = np.zeros(labels.shape, np.int32)
    n = 0
    min_px = 2500.0 / mpp**2  # smaller profiles are slivers nobody outlines
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        part, k = ndimage.label(labels[sl] == i)
        if k == 0:
            continue
        sizes = np.bincount(part.ravel())[1:]
        if sizes.max() < min_px:
            continue
        n += 1
        out[sl][part == 1 + int(sizes.argmax())] = n
    return out


def render_packed(seed: int, size_mm=(3.0, 2.5), mpp: float = DETECT_MPP) -> PackedSection:
    """SIMULATED packed section `seed` of `size_mm` (width, height) at `mpp` um/px."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 31]))
    look = sample_look(rng)
    width, height = 1000.0 * size_mm[0], 1000.0 * size_mm[1]
    outline = section_layout.make_outline(rng, width, height)
    outline = dataclasses.replace(outline, tunica=float(rng.uniform(8, 35)))  # thinner here
    c, aspect, theta, weight, empty = _seeds(rng, outline, look, width, height)
    h, w = int(height / mpp), int(width / mpp)
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    gx, gy = (gx + 0.5) * mpp, (gy + 0.5) * mpp
    depth, phi = outline.depth(gx, gy)
    intact = outline.intact(phi) > 0.5
    tunica = (depth > 0) & (depth < outline.tunica) & intact
    tissue = depth > 0
    inner = tissue & ~tunica
    # Cells on a grid twice as coarse (the cleft and the rounding hide its steps).
    sub = inner[::2, ::2]
    cells = np.zeros(sub.shape, np.int64)
    cells[sub] = _nearest(
        c, aspect, theta, weight, np.stack([gx[::2, ::2][sub], gy[::2, ::2][sub]], 1)
    )
    cells = np.repeat(np.repeat(cells, 2, 0), 2, 1)[:h, :w]
    labels = _tubules(rng, cells, empty, inner, look, mpp)
    rgb = paint(rng, labels, tissue, tunica, look, mpp)
    return PackedSection(rgb, labels, mpp, look)


def write_packed(out_dir, seed: int, size_mm=(3.4, 4.2), mpp: float = DETECT_MPP) -> Path:
    """Render packed section `seed` into the new or empty folder `out_dir`: section.tif
    (pixel size in its metadata), ground_truth.geojson (one QuPath polygon per tubule,
    level-0 px) and SIMULATED.json (the look); the folder appears only once complete."""
    from stagejax.runtime import files
    from stagejax.simulate import section
    from stagejax.slides import SlideObject, write_geojson, write_pyramidal_tiff
    from stagejax.slides.geometry import outlines

    w, h = section.check_arguments(int(seed), float(mpp), 0.0, size_mm)
    out = Path(out_dir).expanduser()
    files.check_output_dir(out)
    sec = render_packed(int(seed), (w, h), float(mpp))
    truth = [SlideObject(geometry=p, classification="Tubule", properties={"tubule": i + 1})
             for i, p in enumerate(outlines(sec.labels, (1.0, 1.0)))]  # fmt: skip
    meta = dict(simulated=True, generator="stagejax.simulate.packed", seed=int(seed),
                mpp=float(mpp), size_mm=[w, h], tubules=len(truth), look=sec.look)  # fmt: skip

    def fill(tmp: Path) -> None:
        write_pyramidal_tiff(tmp / "section.tif", sec.rgb, float(mpp), tile_size=256,
                             compression="deflate")  # fmt: skip
        write_geojson(tmp / "ground_truth.geojson", truth)
        (tmp / "SIMULATED.json").write_text(json.dumps(meta, indent=1) + "\n")

    if not files.new_dir(out, fill, "the section"):
        raise ConfigError(f"out: {out} was filled by someone else while rendering")
    return out
