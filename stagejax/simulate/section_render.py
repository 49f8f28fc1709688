"""Pixels of a SIMULATED testis section, rendered block by block from its layout.

Why blocks: a study-scale section (about 20,000 x 16,000 px) is ~1 GB of RGB, so it is
never held whole. The image is cut into fixed 512 px blocks of level 0 (whatever tile
size the TIFF writer uses); each block is rendered from the global layout alone, with its
own seeded noise, so blocks can be rendered in any order and the result does not depend
on the writer's tiles. Fields that cross blocks (interstitial texture, illumination,
nuclei, tubules) are functions of global coordinates, so there are no seams.

Tubules, the expensive part, are rendered once each into their bounding box (``tubule_draw``,
the tubule images' own drawing, at the section's render pixel size, finer than
level 0 for a coarse section, ``Look.supersampling``), as premultiplied H/PAS densities
plus a coverage map, by worker processes ahead of the block rows that need them, and
composited into each block they overlap.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from stagejax.simulate import cells, scene, tubule_draw
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
    x0, y0, w, h = patch_box(cut, look)
    r = look.r_px * rng.uniform(0.97, 1.03)
    t = scene.phase_of(cut.stage, rng, look.params)
    tub = cells.Tubule(
        cx=cut.cx / look.mpp - 0.5 - x0,
        cy=cut.cy / look.mpp - 0.5 - y0,
        ra=cut.a / look.mpp,
        rb=cut.b / look.mpp,
        theta=cut.theta,
        **tubule_draw.lumen_shape(t, rng, open_lumen=not cut.grazing),
    )
    d = tubule_draw.draw_tubule(tub, t, r, look.blur_um / look.mpp, max(w, h), rng, look.params)
    h_od, p_od, cover = (a[:h, :w].astype(np.float16) for a in (d.h_od, d.p_od, d.cover))
    return Patch(cut.index, x0, y0, h_od, p_od, cover)


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
