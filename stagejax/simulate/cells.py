"""Building blocks of the tubule simulator: nuclei groups and tubule geometry.

A tubule cross-section is an ellipse with a wavy lumen; cells sit at (phi, depth) inside it
(depth 0 at the basement membrane, 1 at the lumen). Nuclei of one cell type are kept as one
:class:`Nuclei` group of per-nucleus arrays, so the renderer draws each group in a single
vectorised pass. The stage biology that decides which nuclei exist lives in
``epithelium``; all sizes are in pixels of the render.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

TWO_PI = 2.0 * math.pi

# Texture kinds understood by the renderer (index into its texture tiles).
TEX_FINE, TEX_THREADS_THIN, TEX_THREADS_THICK, TEX_CLUMPS = 0, 1, 2, 3

# Fields of a Nuclei group and their defaults (per nucleus, float32 arrays).
# a/b: semi-axes (px); theta: direction of the long axis (+u points to the taper tip);
# taper/bend: comma/hook shape of spermatid heads; h: hematoxylin optical density of the
# nucleoplasm; tex: amplitude of the chromatin texture; rim: nuclear envelope darkening;
# dot: chromocenter/nucleolus density (radius dot_r * b, offset dot_off * a along +u);
# irr: irregular (lobed) outline; cap: PAS density of the acrosome cap, centred on
# direction (cap_dx, cap_dy) and covering cos(angle) > cap_cos; gran/gran_r: PAS acrosomal
# granule on the nuclear surface; halo: PAS density change in the surrounding cytoplasm
# (< 0 pale cell body, > 0 pink cytoplasm); pas: PAS density inside the shape.
_DEFAULTS = dict(
    a=1.0,
    b=1.0,
    theta=0.0,
    taper=0.0,
    bend=0.0,
    h=0.4,
    tex=0.0,
    rim=0.0,
    dot=0.0,
    dot_r=0.25,
    dot_off=0.0,
    irr=0.0,
    irr_phase=0.0,
    cap=0.0,
    cap_dx=1.0,
    cap_dy=0.0,
    cap_cos=1.0,
    gran=0.0,
    gran_r=0.2,
    halo=0.0,
    pas=0.0,
)


@dataclasses.dataclass
class Nuclei:
    """A batch of nuclei of one cell type, drawn in one vectorised sprite pass."""

    name: str  # Cell type, e.g. 'round_spermatid' (for tests and debugging).
    kind: int  # Chromatin texture, TEX_*.
    x: np.ndarray
    y: np.ndarray
    fields: dict[str, np.ndarray]
    extent: float = 1.25  # Sprite half-size in units of max(a), to fit caps and halos.

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def select(self, keep: np.ndarray) -> Nuclei:
        return Nuclei(
            self.name,
            self.kind,
            self.x[keep],
            self.y[keep],
            {k: v[keep] for k, v in self.fields.items()},
            self.extent,
        )


def nuclei(name: str, kind: int, x, y, extent: float = 1.25, **fields) -> Nuclei:
    """Nuclei group with scalar fields broadcast to one value per nucleus."""
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    unknown = set(fields) - set(_DEFAULTS)
    if unknown:
        raise ValueError(f"Nuclei: unknown fields {sorted(unknown)}")
    full = {
        k: np.broadcast_to(np.asarray(fields.get(k, d), np.float32), (n,)).copy()
        for k, d in _DEFAULTS.items()
    }
    return Nuclei(name, kind, x, np.asarray(y, np.float32), full, extent)


def smoothstep(x, x0: float, x1: float):
    """0 below x0, 1 above x1, smooth in between."""
    s = np.clip((np.asarray(x, np.float64) - x0) / (x1 - x0), 0.0, 1.0)
    return s * s * (3.0 - 2.0 * s)


@dataclasses.dataclass
class Tubule:
    """Elliptical tubule cross-section; ``rho`` = 1 at the basement membrane.

    Positions inside use (phi, depth): phi the ellipse parameter angle, depth 0 at the
    basement membrane and 1 at the (wavy) lumen border.
    """

    cx: float
    cy: float
    ra: float
    rb: float
    theta: float
    lumen: float  # Mean lumen radius as a fraction of the tubule radius.
    lumen_amp: np.ndarray  # Harmonics 2.. of the lumen border (relative amplitudes).
    lumen_phase: np.ndarray

    @property
    def mean_radius(self) -> float:
        return math.sqrt(0.5 * (self.ra**2 + self.rb**2))

    def __post_init__(self):
        # Lumen border radius tabulated over phi: cheap to look up for whole images.
        self._grid = np.linspace(0.0, TWO_PI, 721)
        k = np.arange(2, 2 + self.lumen_amp.shape[0])
        wave = (self.lumen_amp * np.cos(k * self._grid[:, None] + self.lumen_phase)).sum(-1)
        self._table = self.lumen * np.clip(1.0 + wave, 0.3, 2.0)

    def lumen_rho(self, phi):
        return np.interp(phi, self._grid, self._table, period=TWO_PI)

    def point(self, phi, depth):
        """(x, y, nx, ny): image position and outward unit normal (toward the membrane)."""
        phi = np.asarray(phi, np.float64)
        rho = 1.0 - np.asarray(depth) * (1.0 - self.lumen_rho(phi))
        return self.point_rho(phi, rho)

    def point_rho(self, phi, rho):
        c, s = math.cos(self.theta), math.sin(self.theta)
        lx, ly = self.ra * rho * np.cos(phi), self.rb * rho * np.sin(phi)
        gx, gy = np.cos(phi) / self.ra, np.sin(phi) / self.rb
        norm = np.hypot(gx, gy)
        gx, gy = gx / norm, gy / norm
        return (
            self.cx + c * lx - s * ly,
            self.cy + s * lx + c * ly,
            c * gx - s * gy,
            s * gx + c * gy,
        )

    def thickness(self) -> float:
        return (1.0 - self.lumen) * self.mean_radius


def layer(
    tub: Tubule,
    d0: float,
    d1: float,
    spacing: float,
    rng: np.random.Generator,
    fill: float = 1.0,
    frame: float | None = None,
    relax: int = 4,
):
    """Cell positions (phi, depth) filling depths [d0, d1] at about `spacing` px apart.

    Random (Poisson) positions, then a few rounds of pairwise repulsion: irregular like
    tissue, without rows or rings, and with few overlapping nuclei. With ``frame``, only
    cells that can appear in a frame x frame image are kept (neighbouring tubules).
    """
    lum = tub.lumen
    thick = max((1.0 - lum) * tub.mean_radius, 1e-6)
    rho0, rho1 = 1.0 - d0 * (1.0 - lum), 1.0 - d1 * (1.0 - lum)
    area = math.pi * tub.ra * tub.rb * (rho0**2 - rho1**2)
    n = rng.poisson(fill * 0.85 * area / (0.866 * spacing**2))
    # The ellipse map is linear in rho, so rho^2 uniform means area-uniform positions.
    rho = np.sqrt(rng.uniform(rho1**2, rho0**2, n))
    dep = (1.0 - rho) / (1.0 - lum)
    phi = rng.uniform(0, TWO_PI, n)
    if frame is not None:
        x, y, _, _ = tub.point(phi, dep)
        m = 3 * spacing
        keep = (x > -m) & (x < frame + m) & (y > -m) & (y < frame + m)
        phi, dep = phi[keep], dep[keep]
    eye = np.eye(phi.shape[0]) * 1e9
    for _ in range(relax if phi.shape[0] > 1 else 0):
        circ = tub.mean_radius * (1.0 - dep * (1.0 - lum))
        ds = (
            ((phi[:, None] - phi[None, :] + math.pi) % TWO_PI - math.pi)
            * 0.5
            * (circ[:, None] + circ[None, :])
        )
        dq = (dep[:, None] - dep[None, :]) * thick
        dist = np.hypot(ds, dq) + eye
        push = np.clip(0.9 * spacing - dist, 0.0, None) / dist * 0.5
        phi = phi + (push * ds).sum(1) / circ
        dep = np.clip(dep + (push * dq).sum(1) / thick, d0, d1)
    return phi, dep


def angle(nx, ny):
    """Direction (radians) of the vector (nx, ny), e.g. of a tubule's outward normal."""
    return np.arctan2(ny, nx)


def mix_dirs(ax, ay, bx, by, w):
    """Unit vectors interpolated from a to b by weight w (per element)."""
    x, y = (1 - w) * ax + w * bx, (1 - w) * ay + w * by
    n = np.maximum(np.hypot(x, y), 1e-6)
    return x / n, y / n


def individualise(g: Nuclei, rng: np.random.Generator) -> Nuclei:
    """Natural variation: no two nuclei exactly the same size or perfectly round."""
    n = len(g)
    f = dict(g.fields)
    f["a"] = f["a"] * rng.uniform(0.93, 1.07, n).astype(np.float32)
    f["b"] = f["b"] * rng.uniform(0.93, 1.07, n).astype(np.float32)
    if not f["taper"].any():  # Spermatid heads keep their smooth outline.
        plain = f["irr"] == 0
        f["irr"] = np.where(plain, rng.uniform(0.02, 0.06, n), f["irr"]).astype(np.float32)
        f["irr_phase"] = np.where(plain, rng.uniform(0, TWO_PI, n), f["irr_phase"]).astype(
            np.float32
        )
    return Nuclei(g.name, g.kind, g.x, g.y, f, g.extent)


def interstitial_nuclei(x, y, r, rng: np.random.Generator) -> list[Nuclei]:
    """Leydig cells (round nuclei in pink cytoplasm) and flat fibroblast nuclei."""
    n = x.shape[0]
    leydig = rng.random(n) < 0.6
    k = leydig.sum()
    out = [
        nuclei(
            "leydig",
            TEX_FINE,
            x[leydig],
            y[leydig],
            a=rng.uniform(0.8, 1.0, k) * r,
            b=rng.uniform(0.7, 0.9, k) * r,
            theta=rng.uniform(0, TWO_PI, k),
            h=0.55,
            tex=0.6,
            rim=0.4,
            dot=0.5,
            halo=0.3,
            extent=1.9,
        )
    ]
    k = n - k
    out.append(
        nuclei(
            "fibroblast",
            TEX_FINE,
            x[~leydig],
            y[~leydig],
            a=rng.uniform(1.2, 1.8, k) * r,
            b=rng.uniform(0.25, 0.4, k) * r,
            theta=rng.uniform(0, TWO_PI, k),
            h=0.8,
            tex=0.3,
        )
    )
    return out
