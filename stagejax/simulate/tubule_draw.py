"""One tubule, drawn the same way for a tubule image and for a simulated section.

A model trained on the simulator's tubule images meets the tubules of a simulated
section; both must come from one drawing, or the model is tested on a tubule it never
saw. ``draw_tubule`` is that drawing (issue 25): the stage biology (``epithelium``),
the nuclei (``render.splat_nuclei``), the epithelium, lumen and membrane densities
(``paint_tubule``) and the tubule-to-tubule staining difference, as premultiplied
densities with a coverage map. ``scene`` lays it over a field of neighbours and
interstitium; ``section_render`` over a section.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np

from stagejax.simulate import cells, epithelium, render
from stagejax.simulate.cells import smoothstep

if TYPE_CHECKING:
    from stagejax.simulate.scene import SceneParams

LUMEN_HARMONICS = 7


@dataclasses.dataclass(frozen=True)
class Drawn:
    """Premultiplied hematoxylin and PAS densities and coverage, [size, size] float32.

    Laid over a background b as ``b * (1 - cover) + od``; the membrane and myoid layer
    lie just outside the coverage, so they darken what is under them.
    """

    h_od: np.ndarray
    p_od: np.ndarray
    cover: np.ndarray


def lumen_shape(t: float, rng: np.random.Generator, open_lumen: bool = True) -> dict:
    """Tubule keyword arguments of the lumen at phase t: wider around spermiation (VII-VIII);
    none where ``open_lumen`` is false (a grazing cut)."""
    wide = float(smoothstep(t, 5.5, 6.5) * (1 - smoothstep(t, 8.5, 9.5)))
    lumen = rng.uniform(0.08, 0.2) + 0.07 * wide if open_lumen else 0.0
    k = np.arange(1, LUMEN_HARMONICS + 1)
    return dict(
        lumen=lumen,
        lumen_amp=rng.normal(0, 0.22, LUMEN_HARMONICS) / k,
        lumen_phase=rng.uniform(0, 2 * math.pi, LUMEN_HARMONICS),
    )


def draw_tubule(
    tub: cells.Tubule,
    t: float,
    r: float,
    blur: float,
    size: int,
    rng: np.random.Generator,
    params: SceneParams,
) -> Drawn:
    """Tubule ``tub`` (render px, in a ``size`` square) at phase ``t`` in [0, 12).

    ``r``: round-spermatid nucleus radius, ``blur``: optical blur sigma, both render px.
    """
    groups = epithelium.tubule_nuclei(tub, t, r, rng, cell_params(params, rng), main=True)
    tiles = render.texture_tiles(r, rng, blur=blur)
    h_sp, p_sp = render.splat_nuclei(groups, size, tiles, edge=max(0.8, 2.2 * blur))
    h_lo, p_lo, cov_lo = _tissue(tub, t, size, r, rng)
    h_od = render.upsample(h_lo, size) + h_sp
    p_od = np.maximum(render.upsample(p_lo, size) + p_sp, 0.0)
    j = params.stain_jitter  # Tubule-to-tubule staining differences on one slide.
    h_od *= np.float32(np.exp(rng.normal(0, 0.05 * j)))
    p_od *= np.float32(np.exp(rng.normal(0, 0.05 * j)))
    return Drawn(h_od, p_od, render.upsample(cov_lo, size))


def _tissue(tub: cells.Tubule, t: float, size: int, r: float, rng):
    """Low-resolution epithelium, lumen and membrane densities (premultiplied) + coverage."""
    lo = size // 2 if r >= 5 else size
    scale = size / lo
    coords = (np.arange(lo, dtype=np.float32) + 0.5) * scale - 0.5
    x, y = coords[None, :], coords[:, None]
    tex = tissue_textures((lo, lo), r / scale, rng)
    h = np.zeros((lo, lo), np.float32)
    p = np.zeros((lo, lo), np.float32)
    membrane = np.zeros((lo, lo), np.float32)
    paint_tubule(tub, h, p, membrane, x, y, scale, r, tex, lumen_content(t, rng), rng)
    add_membrane(h, p, membrane)
    rho, _ = rho_phi(tub, x, y)
    cover = np.clip((1.0 - rho) * tub.mean_radius / scale + 0.5, 0.0, 1.0)
    return h, p, cover.astype(np.float32)


def cell_params(params: SceneParams, rng: np.random.Generator) -> epithelium.CellParams:
    """One tubule's (or one field's) cell randomness: the scene's knobs, a drawn density."""
    return epithelium.CellParams(
        cell_phase_sd=params.cell_phase_sd,
        acrosome_contrast=params.acrosome_contrast,
        density=rng.uniform(*params.density_range),
    )


def add_membrane(h: np.ndarray, p: np.ndarray, membrane: np.ndarray) -> None:
    """Basement membrane and myoid layer (``paint_tubule``'s map) into h and p: mostly PAS."""
    p += 0.75 * membrane
    h += 0.12 * membrane


def tissue_textures(shape: tuple[int, int], rl: float, rng: np.random.Generator) -> dict:
    """Epithelium and lumen textures, feature sizes in nucleus radii (``rl`` px)."""
    return {
        name: render.smooth_noise(shape, f * rl, rng)
        for name, f in (("grain", 0.5), ("mottle", 1.2), ("speckle", 0.3), ("floc", 1.2))
    }


def lumen_content(t: float, rng: np.random.Generator) -> float:
    """How much flocculent material fills the lumen: less after spermiation (IX-X)."""
    after = smoothstep(t, 8.0, 9.0) * (1 - smoothstep(t, 10.5, 11.5))
    return float(rng.uniform(0.3, 1.0) * (1.0 - 0.5 * after))


def rho_phi(tub: cells.Tubule, x, y):
    c, s = math.cos(tub.theta), math.sin(tub.theta)
    dx, dy = x - tub.cx, y - tub.cy
    lu = (dx * c + dy * s) / tub.ra
    lv = (dy * c - dx * s) / tub.rb
    return np.hypot(lu, lv), np.arctan2(lv, lu)


def paint_tubule(tub, h, p, membrane, x, y, scale, r, tex, content, rng) -> None:
    """Epithelium, lumen and basement membrane of one tubule, into h, p and membrane."""
    lo = x.shape[1]
    # Work on the tubule's bounding box only (neighbours are mostly out of frame).
    ext = max(tub.ra, tub.rb) + 3 * r
    x0, x1 = (
        int(np.clip((c + d) / scale, 0, lo)) for c, d in ((tub.cx, -ext), (tub.cx, ext + scale))
    )
    y0, y1 = (
        int(np.clip((c + d) / scale, 0, lo)) for c, d in ((tub.cy, -ext), (tub.cy, ext + scale))
    )
    if x1 <= x0 or y1 <= y0:
        return
    box = (slice(y0, y1), slice(x0, x1))
    grain, mottle, speckle, floc = (tex[k][box] for k in ("grain", "mottle", "speckle", "floc"))
    rho, phi = rho_phi(tub, x[:, x0:x1], y[y0:y1])
    mr = tub.mean_radius
    cover = np.clip((1.0 - rho) * mr / scale + 0.5, 0.0, 1.0)
    lum_rho = tub.lumen_rho(phi)
    lumen = np.clip((lum_rho - rho) * mr / (0.25 * r) + 0.5, 0.0, 1.0)
    depth = np.clip((1.0 - rho) / (1.0 - lum_rho), 0.0, 1.0)
    # Sertoli cytoplasm: radial streaks, stronger towards the lumen.
    streak = render.polar_noise(
        phi, rho, int(2 * math.pi * mr / (0.3 * r)), int(mr / (3 * r)) + 1, rng
    )
    amp = 0.01 + 0.025 * depth**2
    p_epi = 0.25 + amp * streak + 0.03 * grain + 0.025 * mottle + 0.03 * speckle
    h_epi = 0.11 + 0.4 * amp * streak + 0.015 * grain + 0.01 * mottle
    stuff = content * np.clip(floc + 0.2 * speckle, 0, None)
    p_lum = 0.03 + 0.2 * stuff
    h_lum = 0.01 + 0.05 * stuff
    p_t = lumen * p_lum + (1 - lumen) * p_epi
    h_t = lumen * h_lum + (1 - lumen) * h_epi
    p[box] = cover * p_t + (1 - cover) * p[box]
    h[box] = cover * h_t + (1 - cover) * h[box]
    # Basement membrane (PAS) and a fainter outer lamina with the myoid layer.
    out = (rho - 1.0) * mr
    membrane[box] += np.exp(-((out / (0.28 * r)) ** 2)) + 0.45 * np.exp(
        -(((out - 1.4 * r) / (0.3 * r)) ** 2)
    )
