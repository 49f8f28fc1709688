"""Anatomy of a SIMULATED testis section, in micrometres: outline, tubules, interstitium.

A transverse section of a mouse testis is a few mm across: a thin tunica around densely
packed seminiferous tubule cross-sections (~200 um across; elongated where the tubule is
cut obliquely, small and without a lumen where it is grazed), with interstitium between
them (Leydig cell clusters in the triangular spaces, vessels, fibroblasts). Everything
here is in micrometres and independent of the pixel size, so ``mpp`` changes the
resolution of a render, never the anatomy.

Packing: seeds in the tissue are relaxed by a few Lloyd steps of an *anisotropic*
Voronoi partition (each seed has its own elongation and orientation, so oblique cuts get
elongated cells), computed on a 5 um raster; each tubule is then the largest ellipse of
its seed's shape inside its cell, less a small interstitial gap. On one or two arcs the
tunica is torn and the tissue edge cuts through tubules (not stageable).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage, spatial

from stagejax.simulate import cells
from stagejax.stages import NUM_STAGES, stage_frequencies

RASTER_UM = 5.0  # Packing raster.
LLOYD_STEPS = 10
CELL_AREA = 1.6  # Voronoi cell area per tubule, in units of pi * TUBULE_RADIUS_UM^2.
TUBULE_RADIUS_UM = 100.0  # Mean tubule radius (a mouse tubule is about 200 um across).
NUCLEUS_UM = 3.75  # Round-spermatid nucleus radius, as the tubule simulator's default.
TUNICA_UM = (35.0, 60.0)  # Thickness of the tunica albuginea.
MARGIN_UM = 60.0  # Glass between the tissue and the image border (at least).
GRAZING_FRACTION = 0.04  # Seeds drawn as grazing cuts (small profiles, no lumen).
MIN_VISIBLE = 0.9  # Edge-cut tubules showing less of their area are not stageable.

# SeedSequence streams below the user's seed (the tubules stream also seeds renders).
_OUTLINE, _PACKING, _STAGES, _INTERSTITIUM, TUBULE_STREAM = 11, 12, 13, 14, 15


@dataclasses.dataclass(frozen=True)
class Outline:
    """The tissue boundary: an ellipse with a wavy border, torn (no tunica) on some arcs."""

    cx: float
    cy: float
    ra: float
    rb: float
    theta: float
    wave_amp: np.ndarray  # Harmonics 2.. of the border radius (relative).
    wave_phase: np.ndarray
    torn: tuple[tuple[float, float], ...]  # (centre angle, half width) of torn arcs.
    tunica: float  # Tunica thickness, um.

    def polar(self, x, y):
        """(rho, phi): rho = 1 on the border, < 1 inside; phi the ellipse angle."""
        c, s = math.cos(self.theta), math.sin(self.theta)
        dx, dy = np.asarray(x) - self.cx, np.asarray(y) - self.cy
        u, v = (dx * c + dy * s) / self.ra, (dy * c - dx * s) / self.rb
        phi = np.arctan2(v, u)
        return np.hypot(u, v) / self.border(phi), phi

    def border(self, phi):
        """Relative border radius at ellipse angle phi (a table lookup: cheap per pixel)."""
        table = self.__dict__.get("_table")
        if table is None:
            grid = np.linspace(-math.pi, math.pi, 4097)
            k = np.arange(2, 2 + len(self.wave_amp))
            wave = (self.wave_amp * np.cos(k * grid[:, None] + self.wave_phase)).sum(-1)
            table = (grid, 1.0 + wave)
            object.__setattr__(self, "_table", table)  # A cache on a frozen dataclass.
        return np.interp(phi, *table, period=2 * math.pi)

    def intact(self, phi):
        """1 where the tunica is present, 0 on torn arcs (smooth in between)."""
        out = np.ones_like(np.asarray(phi, np.float64))
        for centre, half in self.torn:
            d = np.abs((np.asarray(phi) - centre + math.pi) % (2 * math.pi) - math.pi)
            out = out * cells.smoothstep(d, half, half + 0.08)
        return out

    def depth(self, x, y):
        """(distance inside the border in um, approximately; phi)."""
        rho, phi = self.polar(x, y)
        return (1.0 - rho) * math.sqrt(self.ra * self.rb) * self.border(phi), phi

    def polygon(self, n: int = 720) -> np.ndarray:
        """(n, 2) border points in um."""
        phi = np.linspace(0, 2 * math.pi, n, endpoint=False)
        rad = self.border(phi)
        u, v = self.ra * rad * np.cos(phi), self.rb * rad * np.sin(phi)
        c, s = math.cos(self.theta), math.sin(self.theta)
        return np.stack([self.cx + c * u - s * v, self.cy + s * u + c * v], 1)


@dataclasses.dataclass(frozen=True)
class TubuleCut:
    """One tubule cross-section: an ellipse in um, its stage and how it was cut."""

    index: int
    cx: float
    cy: float
    a: float  # Semi-axes, a >= b.
    b: float
    theta: float
    stage: int  # 0 = I.
    grazing: bool  # Tangential cut: small, no lumen.
    edge_cut: bool = False  # Cut by the tissue edge (a torn arc).

    @property
    def stageable(self) -> bool:
        return not (self.grazing or self.edge_cut)

    def polygon(self, n: int = 96) -> np.ndarray:
        """(n, 2) basement-membrane outline in um."""
        phi = np.linspace(0, 2 * math.pi, n, endpoint=False)
        c, s = math.cos(self.theta), math.sin(self.theta)
        u, v = self.a * np.cos(phi), self.b * np.sin(phi)
        return np.stack([self.cx + c * u - s * v, self.cy + s * u + c * v], 1)

    def rho(self, x, y):
        c, s = math.cos(self.theta), math.sin(self.theta)
        dx, dy = np.asarray(x) - self.cx, np.asarray(y) - self.cy
        return np.hypot((dx * c + dy * s) / self.a, (dy * c - dx * s) / self.b)


@dataclasses.dataclass(frozen=True)
class Vessel:
    cx: float
    cy: float
    radius: float


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything a render needs, in um; the nuclei are (kind -> (N, 2) positions)."""

    width: float
    height: float
    outline: Outline
    tubules: tuple[TubuleCut, ...]
    vessels: tuple[Vessel, ...]
    nuclei: dict[str, np.ndarray]  # leydig, fibroblast, tunica, endothelial, rbc.
    angles: dict[str, np.ndarray]  # Orientation of the elongated ones (radians).


def make_outline(rng: np.random.Generator, width: float, height: float) -> Outline:
    wave = rng.normal(0, 0.018, 4) / np.arange(1, 5)
    ra = 0.5 * width - MARGIN_UM
    rb = 0.5 * height - MARGIN_UM
    # Keep the wavy, slightly rotated border inside the frame.
    shrink = 1.0 / (1.0 + np.abs(wave).sum() + 0.02)
    n_torn = int(rng.integers(1, 3))
    start = rng.uniform(0, 2 * math.pi)
    torn = tuple(
        (float(start + i * rng.uniform(2.0, 4.0)), float(rng.uniform(0.25, 0.45)))
        for i in range(n_torn)
    )
    return Outline(
        cx=0.5 * width,
        cy=0.5 * height,
        ra=ra * shrink,
        rb=rb * shrink,
        theta=float(rng.normal(0, 0.03)),
        wave_amp=wave,
        wave_phase=rng.uniform(0, 2 * math.pi, 4),
        torn=torn,
        tunica=float(rng.uniform(*TUNICA_UM)),
    )


def _raster(width: float, height: float):
    xs = (np.arange(int(math.ceil(width / RASTER_UM))) + 0.5) * RASTER_UM
    ys = (np.arange(int(math.ceil(height / RASTER_UM))) + 0.5) * RASTER_UM
    return np.meshgrid(xs, ys)


def _metric_dist(pts, c, asp, theta, w):
    """Anisotropic, weighted distance of pts [..., 2] to seeds c [..., 2]."""
    dx, dy = pts[..., 0] - c[..., 0], pts[..., 1] - c[..., 1]
    co, si = np.cos(theta), np.sin(theta)
    sq = np.sqrt(asp)
    return np.hypot((dx * co + dy * si) / sq, (dy * co - dx * si) * sq) / w


def _pack(rng, outline: Outline, region: np.ndarray, gx, gy):
    """Seeds relaxed into an anisotropic centroidal Voronoi partition of ``region``."""
    pts = np.stack([gx[region], gy[region]], 1)
    cell_area = CELL_AREA * math.pi * TUBULE_RADIUS_UM**2
    n = max(3, int(round(pts.shape[0] * RASTER_UM**2 / cell_area)))
    c = pts[rng.choice(pts.shape[0], n, replace=False)] + rng.uniform(-2, 2, (n, 2))
    # Oblique cuts: aspect 1/cos(angle of the tubule axis to the section normal).
    tilt = np.abs(rng.normal(0, 0.55, n))
    asp = np.minimum(1.0 / np.cos(np.minimum(tilt, 1.15)), 2.4)
    theta = rng.uniform(0, math.pi, n)
    grazing = rng.random(n) < GRAZING_FRACTION
    w = np.where(grazing, rng.uniform(0.45, 0.65, n), rng.uniform(0.92, 1.08, n))
    k = min(10, n)
    for _ in range(LLOYD_STEPS):
        _, near = spatial.cKDTree(c).query(pts, k=k)
        near = near.reshape(pts.shape[0], k)
        d = _metric_dist(pts[:, None], c[near], asp[near], theta[near], w[near])
        label = near[np.arange(pts.shape[0]), d.argmin(1)]
        cnt = np.bincount(label, minlength=n)
        ok = cnt > 0
        for j in range(2):
            s = np.bincount(label, pts[:, j], minlength=n)
            c[ok, j] = s[ok] / cnt[ok]
    full = np.full(gx.shape, -1, np.int64)
    full[region] = label
    return c, asp, theta, w, grazing, full


def _fit(i, c, labels, gx, gy) -> tuple[float, float, float, float, float] | None:
    """(cx, cy, a, b, theta) of the largest ellipse of cell i's own shape (its second
    moments) inside the cell; None for an empty cell."""
    own = labels == i if labels.size < 4096 else None
    ys, xs = np.nonzero(own) if own is not None else _cell_pixels(i, c, labels)
    if len(xs) < 3:
        return None
    px, py = gx[ys, xs], gy[ys, xs]
    mx, my = px.mean(), py.mean()
    cov = np.cov(np.stack([px - mx, py - my]))
    ev, vec = np.linalg.eigh(cov + np.eye(2) * RASTER_UM**2 / 12)
    a, b = 2 * math.sqrt(ev[1]), 2 * math.sqrt(ev[0])
    theta = math.atan2(vec[1, 1], vec[0, 1])
    reach = 2.5 * a + 2 * RASTER_UM
    ix0, iy0 = max(0, int((mx - reach) / RASTER_UM)), max(0, int((my - reach) / RASTER_UM))
    ix1 = min(gx.shape[1], int((mx + reach) / RASTER_UM) + 1)
    iy1 = min(gx.shape[0], int((my + reach) / RASTER_UM) + 1)
    win = (slice(iy0, iy1), slice(ix0, ix1))
    other = labels[win] != i
    co, si = math.cos(theta), math.sin(theta)
    dx, dy = gx[win][other] - mx, gy[win][other] - my
    rho = np.hypot((dx * co + dy * si) / a, (dy * co - dx * si) / b)
    s = float(rho.min()) if len(rho) else 1.0
    shrink = 0.75 * RASTER_UM  # The nearest foreign raster centre, less half a cell.
    return float(mx), float(my), s * a - shrink, s * b - shrink, theta


def _cell_pixels(i, c, labels):
    reach = int(6 * TUBULE_RADIUS_UM / RASTER_UM)
    x0, y0 = max(0, int(c[i, 0] / RASTER_UM) - reach), max(0, int(c[i, 1] / RASTER_UM) - reach)
    sub = labels[y0 : y0 + 2 * reach, x0 : x0 + 2 * reach] == i
    ys, xs = np.nonzero(sub)
    return ys + y0, xs + x0


def _tubules(rng, outline, width, height, gx, gy) -> list[TubuleCut]:
    depth, phi = outline.depth(gx, gy)
    intact = outline.intact(phi)
    # Inside the tunica where it is intact; past the torn border by up to half a tubule.
    limit = intact * (outline.tunica + 4.0) - (1 - intact) * 0.6 * TUBULE_RADIUS_UM
    region = depth > limit
    region &= (gx > 0) & (gx < width) & (gy > 0) & (gy < height)
    c, asp, theta, w, grazing, labels = _pack(rng, outline, region, gx, gy)
    freq = stage_frequencies()
    stage_rng = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])
    out: list[TubuleCut] = []
    for i in range(c.shape[0]):
        fit = _fit(i, c, labels, gx, gy)
        stage = int(stage_rng.choice(NUM_STAGES, p=freq))
        if fit is None:
            continue
        cx, cy, a, b, th = fit
        gap = rng.uniform(1.5, 7.0)  # Each side of the interstitial gap.
        a, b = a - gap, b - gap
        if b < 0.25 * TUBULE_RADIUS_UM:
            continue  # A sliver: real sections have those, but nobody outlines them.
        graze = bool(grazing[i] or b < 0.6 * TUBULE_RADIUS_UM)
        out.append(TubuleCut(len(out), cx, cy, a, b, th % math.pi, stage, graze))
    return out


def _interstitium(rng, outline, tubules, width, height, gx, gy):
    """Vessels and the positions of interstitial and tunica nuclei."""
    inside = np.zeros(gx.shape, bool)
    for t in tubules:
        r = max(t.a, t.b) + RASTER_UM
        win = (np.abs(gx - t.cx) < r) & (np.abs(gy - t.cy) < r)
        inside[win] |= t.rho(gx[win], gy[win]) < 1.0 + 2.0 / t.b
    depth, phi = outline.depth(gx, gy)
    free = ~inside & (depth > outline.tunica)
    gap = ndimage.distance_transform_edt(free) * RASTER_UM  # Distance to the nearest wall.
    peaks = (gap == ndimage.maximum_filter(gap, size=7)) & (gap >= 10.0)
    py, px = np.nonzero(peaks)
    order = rng.permutation(len(px))
    px, py = px[order], py[order]
    n_vessel = max(1, int(0.12 * len(px)))
    vessels = [
        Vessel(float(gx[0, x]), float(gy[y, 0]), float(min(0.8 * gap[y, x], rng.uniform(6, 22))))
        for x, y in zip(px[:n_vessel], py[:n_vessel], strict=True)
    ]
    leydig = []
    for x, y in zip(px[n_vessel:], py[n_vessel:], strict=True):
        if rng.random() > 0.75:
            continue
        rad = 1.05 * gap[y, x]
        k = rng.poisson(0.22 * rad**2 / 16.0)
        ang, dist = rng.uniform(0, 2 * math.pi, k), rad * np.sqrt(rng.random(k))
        leydig.append(np.stack([gx[0, x] + dist * np.cos(ang), gy[y, 0] + dist * np.sin(ang)], 1))
    leydig = np.concatenate(leydig) if leydig else np.zeros((0, 2))
    area = free.sum() * RASTER_UM**2
    fib = np.stack(
        [rng.uniform(0, width, int(area / 500)), rng.uniform(0, height, int(area / 500))], 1
    )
    nuclei = {"leydig": _keep_free(leydig, gap, 4.0), "fibroblast": _keep_free(fib, gap, 2.0)}
    # Tunica: flat fibroblasts along the border where it is intact.
    n_t = int(2 * math.pi * math.sqrt(outline.ra * outline.rb) * outline.tunica / 260)
    tp = rng.uniform(-math.pi, math.pi, n_t)
    keep = rng.random(n_t) < outline.intact(tp)
    border = outline.polygon(2048)
    idx = ((tp[keep] + math.pi) % (2 * math.pi) / (2 * math.pi) * 2048).astype(int) % 2048
    inward = np.array([outline.cx, outline.cy]) - border[idx]
    inward /= np.linalg.norm(inward, axis=1, keepdims=True)
    frac = rng.uniform(0.1, 0.9, len(idx))[:, None] * outline.tunica
    nuclei["tunica"] = border[idx] + inward * frac
    tangent = border[(idx + 1) % 2048] - border[idx - 1]
    angles = {"tunica": np.arctan2(tangent[:, 1], tangent[:, 0])}
    endo, rbc, endo_ang = [], [], []
    for v in vessels:
        k = max(2, int(2 * math.pi * v.radius / 20))
        a = rng.uniform(0, 2 * math.pi) + np.arange(k) * 2 * math.pi / k
        endo.append(np.stack([v.cx + v.radius * np.cos(a), v.cy + v.radius * np.sin(a)], 1))
        endo_ang.append(a + math.pi / 2)
        m = rng.poisson(0.4 * (v.radius / 3.0) ** 2)
        a, d = rng.uniform(0, 2 * math.pi, m), (v.radius - 3.0) * np.sqrt(rng.random(m))
        rbc.append(np.stack([v.cx + d * np.cos(a), v.cy + d * np.sin(a)], 1))
    nuclei["endothelial"] = np.concatenate(endo) if endo else np.zeros((0, 2))
    nuclei["rbc"] = np.concatenate(rbc) if rbc else np.zeros((0, 2))
    angles["endothelial"] = np.concatenate(endo_ang) if endo_ang else np.zeros(0)
    return tuple(vessels), nuclei, angles


def _keep_free(p: np.ndarray, gap: np.ndarray, min_um: float) -> np.ndarray:
    if not len(p):
        return p
    iy = np.clip((p[:, 1] / RASTER_UM).astype(int), 0, gap.shape[0] - 1)
    ix = np.clip((p[:, 0] / RASTER_UM).astype(int), 0, gap.shape[1] - 1)
    return p[gap[iy, ix] >= min_um]


def plan_section(seed: int, size_mm: tuple[float, float]) -> Layout:
    """The anatomy of section ``seed`` of ``size_mm`` (width, height): no pixels."""
    width, height = 1000.0 * size_mm[0], 1000.0 * size_mm[1]
    gx, gy = _raster(width, height)
    outline = make_outline(
        np.random.default_rng(np.random.SeedSequence([seed, _OUTLINE])), width, height
    )
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PACKING]))
    tubules = _tubules(rng, outline, width, height, gx, gy)
    tubules = [c for t in tubules if (c := _mark_edge_cut(t, outline)) is not None]
    tubules = [dataclasses.replace(t, index=i) for i, t in enumerate(tubules)]
    rng = np.random.default_rng(np.random.SeedSequence([seed, _INTERSTITIUM]))
    vessels, nuclei, angles = _interstitium(rng, outline, tubules, width, height, gx, gy)
    return Layout(width, height, outline, tuple(tubules), vessels, nuclei, angles)


def _mark_edge_cut(t: TubuleCut, outline: Outline) -> TubuleCut | None:
    """Flag a tubule that the tissue border cuts (less than MIN_VISIBLE of it inside);
    None for a fragment too small to outline."""
    poly = t.polygon(64)
    depth, _ = outline.depth(poly[:, 0], poly[:, 1])
    if depth.min() > 0:
        return t
    # Fraction of the ellipse area inside the tissue, by sampling.
    g = np.linspace(-1, 1, 25)
    u, v = np.meshgrid(g, g)
    m = u * u + v * v <= 1
    c, s = math.cos(t.theta), math.sin(t.theta)
    x = t.cx + c * t.a * u[m] - s * t.b * v[m]
    y = t.cy + s * t.a * u[m] + c * t.b * v[m]
    visible = float((outline.depth(x, y)[0] > 0).mean())
    if visible < 0.15:
        return None
    return dataclasses.replace(t, edge_cut=visible < MIN_VISIBLE) if visible < 1 else t
