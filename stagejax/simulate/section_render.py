"""Pixels of a SIMULATED testis section, rendered block by block from its layout.

Why blocks: a study-scale section (about 20,000 x 16,000 px) is ~1 GB of RGB, so it is
never held whole. The image is cut into fixed 512 px blocks of level 0 (whatever tile
size the TIFF writer uses); each block is rendered from the global layout alone, with its
own seeded noise, so blocks can be rendered in any order and the result does not depend
on the writer's tiles. Fields that cross blocks (interstitial texture, illumination,
nuclei, tubules) are functions of global coordinates, so there are no seams.

Tubules, the expensive part, are rendered once each into their bounding box (the tubule
simulator's stage biology and nuclei at the section's render pixel size, finer than
level 0 for a coarse section, ``Look.supersampling``: ``epithelium``,
``render.splat_nuclei``, ``scene._paint_tubule``), as premultiplied H/PAS densities
plus a coverage map, by worker processes ahead of the block rows that need them, and
composited into each block they overlap.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from stagejax.simulate import cells, epithelium, render, scene
from stagejax.simulate.cells import smoothstep
from stagejax.simulate.scene import SceneParams
from stagejax.simulate.section_layout import NUCLEUS_UM, TUBULE_STREAM, TubuleCut

BLOCK = 512  # Block side (px of level 0); fixed so that noise never depends on tiling.
_SECTION, _BLOCKS = 21, 22  # SeedSequence streams of the section's look and its blocks.


@dataclasses.dataclass(frozen=True)
class Look:
    """Per-section appearance: pixel size, optics and staining."""

    seed: int
    mpp: float
    blur_um: float  # Optical blur sigma.
    noise: float  # Sensor noise sd (0..1 intensity).
    nucleus_um: float  # Round-spermatid nucleus radius.
    stain: scene.SlideStain
    params: SceneParams

    @property
    def r_px(self) -> float:
        return self.nucleus_um / self.mpp

    @property
    def supersampling(self) -> int:
        """Render px per level-0 px side, as the tubule simulator renders an image.

        Its images are drawn at least ``params.min_render_size`` px wide (a nucleus
        radius of at least ``cell_scale * min_render_size`` px) and box-reduced; a
        section at a coarse pixel size is drawn finer and reduced the same way, so
        that its tubules look like the tubule images a stage model was trained on.
        """
        least = self.params.cell_scale * self.params.min_render_size
        return max(1, math.ceil(least / self.r_px - 1e-9))


def sample_look(seed: int, mpp: float, stain_shift: float, params: SceneParams) -> Look:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SECTION]))
    # The tubule simulator's blur range is in px of a 1,152 px image at the default scale.
    blur_um = rng.uniform(*params.blur_range) * NUCLEUS_UM / (params.cell_scale * 1152)
    return Look(
        seed=seed,
        mpp=mpp,
        blur_um=float(blur_um),
        noise=float(rng.uniform(*params.noise_range)),
        nucleus_um=float(NUCLEUS_UM * rng.uniform(0.95, 1.05)),
        stain=scene.sample_slide_stain(rng, stain_shift, params),
        params=params,
    )


@dataclasses.dataclass
class Patch:
    """One rendered tubule: premultiplied densities and coverage over [y0:y0+h, x0:x0+w]."""

    index: int
    x0: int
    y0: int
    h_od: np.ndarray  # float16 (h, w)
    p_od: np.ndarray
    cover: np.ndarray

    @property
    def y1(self) -> int:
        return self.y0 + self.h_od.shape[0]

    @property
    def x1(self) -> int:
        return self.x0 + self.h_od.shape[1]


def patch_box(cut: TubuleCut, look: Look) -> tuple[int, int, int, int]:
    """(x0, y0, w, h) in level-0 px of a tubule's render: ellipse, membrane, myoid cells."""
    c, s = math.cos(cut.theta), math.sin(cut.theta)
    ex = math.hypot(cut.a * c, cut.b * s) / look.mpp + 4.5 * look.r_px + 2
    ey = math.hypot(cut.a * s, cut.b * c) / look.mpp + 4.5 * look.r_px + 2
    cx, cy = cut.cx / look.mpp - 0.5, cut.cy / look.mpp - 0.5
    x0, y0 = math.floor(cx - ex), math.floor(cy - ey)
    return x0, y0, math.ceil(cx + ex) - x0, math.ceil(cy + ey) - y0


def render_patch(cut: TubuleCut, look: Look) -> Patch:
    """The tubule simulator's tubule (stage ``cut.stage``) at the section's pixel size."""
    rng = np.random.default_rng(np.random.SeedSequence([look.seed, TUBULE_STREAM, cut.index]))
    params = look.params
    x0, y0, w, h = patch_box(cut, look)
    size = max(w, h)
    r = look.r_px * rng.uniform(0.97, 1.03)
    t = scene.phase_of(cut.stage, rng, params)
    open_lumen = float(smoothstep(t, 5.5, 6.5) * (1 - smoothstep(t, 8.5, 9.5)))
    lumen = 0.0 if cut.grazing else rng.uniform(0.08, 0.2) + 0.07 * open_lumen
    tub = cells.Tubule(
        cx=cut.cx / look.mpp - 0.5 - x0,
        cy=cut.cy / look.mpp - 0.5 - y0,
        ra=cut.a / look.mpp,
        rb=cut.b / look.mpp,
        theta=cut.theta,
        lumen=lumen,
        lumen_amp=rng.normal(0, 0.22, 7) / np.arange(1, 8),
        lumen_phase=rng.uniform(0, 2 * math.pi, 7),
    )
    cp = epithelium.CellParams(
        cell_phase_sd=params.cell_phase_sd,
        acrosome_contrast=params.acrosome_contrast,
        density=rng.uniform(*params.density_range),
    )
    blur = look.blur_um / look.mpp
    groups = epithelium.tubule_nuclei(tub, t, r, rng, cp, main=True)
    tiles = render.texture_tiles(r, rng, blur=blur)
    h_sp, p_sp = render.splat_nuclei(groups, size, tiles, edge=max(0.8, 2.2 * blur))
    h_lo, p_lo, cov_lo = _tubule_tissue(tub, t, size, r, rng)
    h_od = render.upsample(h_lo, size)[:h, :w] + h_sp[:h, :w]
    p_od = np.maximum(render.upsample(p_lo, size)[:h, :w] + p_sp[:h, :w], 0.0)
    cover = render.upsample(cov_lo, size)[:h, :w]
    j = params.stain_jitter  # Tubule-to-tubule staining differences, as between images.
    h_od *= np.float32(np.exp(rng.normal(0, 0.05 * j)))
    p_od *= np.float32(np.exp(rng.normal(0, 0.05 * j)))
    f16 = np.float16
    return Patch(cut.index, x0, y0, h_od.astype(f16), p_od.astype(f16), cover.astype(f16))


def _tubule_tissue(tub: cells.Tubule, t: float, size: int, r: float, rng):
    """Low-resolution epithelium, lumen and membrane densities (premultiplied) + coverage."""
    lo = size // 2 if r >= 5 else size
    scale = size / lo
    coords = (np.arange(lo, dtype=np.float32) + 0.5) * scale - 0.5
    x, y = coords[None, :], coords[:, None]
    rl = r / scale
    tex = {
        name: render.smooth_noise((lo, lo), f * rl, rng)
        for name, f in (("grain", 0.5), ("mottle", 1.2), ("speckle", 0.3), ("floc", 1.2))
    }
    content = rng.uniform(0.3, 1.0) * (
        1.0 - 0.5 * smoothstep(t, 8.0, 9.0) * (1 - smoothstep(t, 10.5, 11.5))
    )
    h = np.zeros((lo, lo), np.float32)
    p = np.zeros((lo, lo), np.float32)
    membrane = np.zeros((lo, lo), np.float32)
    scene._paint_tubule(tub, h, p, membrane, x, y, scale, r, tex, content, rng)
    p += 0.75 * membrane
    h += 0.12 * membrane
    rho, _ = scene._rho_phi(tub, x, y)
    cover = np.clip((1.0 - rho) * tub.mean_radius / scale + 0.5, 0.0, 1.0)
    return h, p, cover.astype(np.float32)


class LatticeNoise:
    """Smooth random field (sd about 1, features about ``cell_um``) of global position.

    A random lattice at half the feature size, smoothed, evaluated by cubic B-spline
    interpolation: each value depends on its position only, so blocks join seamlessly.
    """

    def __init__(self, rng, width_um: float, height_um: float, cell_um: float):
        self.step = cell_um / 2
        nx, ny = int(width_um / self.step) + 8, int(height_um / self.step) + 8
        g = rng.standard_normal((ny, nx))
        for ax in (0, 1):
            g = 0.25 * (np.roll(g, 1, ax) + 2 * g + np.roll(g, -1, ax))
        # B-spline interpolation of this lattice has sd ~0.8 of the lattice's.
        self.g = (g / (0.8 * g.std() + 1e-9)).astype(np.float32)

    @staticmethod
    def _weights(u: np.ndarray):
        i = np.floor(u).astype(np.int64)
        f = (u - i).astype(np.float32)
        f2, f3 = f * f, f * f * f
        w = (
            (1 - f) ** 3 / 6,
            (3 * f3 - 6 * f2 + 4) / 6,
            (-3 * f3 + 3 * f2 + 3 * f + 1) / 6,
            f3 / 6,
        )
        return i, w

    def __call__(self, xs_um: np.ndarray, ys_um: np.ndarray) -> np.ndarray:
        ix, wx = self._weights(xs_um / self.step + 2.0)
        iy, wy = self._weights(ys_um / self.step + 2.0)
        c0, c1 = int(ix.min()) - 1, int(ix.max()) + 3
        rows = sum(wy[j][:, None] * self.g[iy + j - 1, c0:c1] for j in range(4))
        return sum(rows[:, ix + j - 1 - c0] * wx[j][None, :] for j in range(4))
