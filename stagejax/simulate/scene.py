"""One simulated field of view: a tubule at a given phase, its neighbours, interstitium.

The scene is where nuisance variation lives (tubule size/shape/position, lumen, stain,
illumination, blur, noise), kept apart from the stage biology in ``epithelium`` so
the difficulty of the task can be tuned without touching what a stage looks like.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from stagejax.simulate import cells, epithelium, render, tubule_draw
from stagejax.simulate.cells import smoothstep
from stagejax.stages import NUM_STAGES


@dataclasses.dataclass(frozen=True)
class SceneParams:
    """Difficulty and appearance knobs of the simulator.

    Defaults are a first guess, not yet calibrated against a trained model. Harder: larger
    ``phase_jitter`` / ``cell_phase_sd``, smaller ``acrosome_contrast``, larger
    ``noise_range`` / ``blur_range`` / ``stain_jitter`` / ``density_range`` spread.
    """

    # Latent phase of an image = stage + 0.5 + phase_jitter * (U[0,1) - 0.5), in stage units.
    # 1.0 spreads images uniformly over their stage; > 1 lets features overlap neighbours.
    phase_jitter: float = 1.0
    cell_phase_sd: float = 0.15  # Asynchrony of cells within one tubule (stage units).
    acrosome_contrast: float = 1.0  # PAS density of acrosome granule/cap.
    density_range: tuple[float, float] = (0.85, 1.15)  # Germ-cell density factor per image.
    noise_range: tuple[float, float] = (0.008, 0.025)  # Sensor noise sd (intensity 0..1).
    blur_range: tuple[float, float] = (1.0, 2.4)  # Blur sigma in px of a 1,152 px image.
    stain_jitter: float = 1.0  # Scales slide-to-slide and image-to-image stain variation.
    vignette_range: tuple[float, float] = (0.0, 0.25)  # Uneven illumination strength.
    tubule_radius: tuple[float, float] = (0.34, 0.46)  # Mean tubule radius / image size.
    cell_scale: float = 0.015  # Round-spermatid nucleus radius / image size.
    min_render_size: int = 256  # Smaller images are rendered at least this large, then reduced.
    # White outside a hand-drawn outline of the main tubule, as the study cut its images.
    hand_cut: bool = True
    # Of those, the share cut along the membrane itself, as section mode cuts a section's
    # tubules (the detector's outline): a model that saw only the study's loose cuts
    # stages section tubules worse than its own images (benchmarks/RESULTS.md, "One
    # drawing for both").
    traced_fraction: float = 0.5


@dataclasses.dataclass(frozen=True)
class SlideStain:
    """Staining of one simulated slide (shared by its images)."""

    h_vec: np.ndarray
    p_vec: np.ndarray
    h_scale: float
    p_scale: float
    tint_od: np.ndarray


def sample_slide_stain(
    rng: np.random.Generator, stain_shift: float, params: SceneParams
) -> SlideStain:
    """Slide stain: random hue/strength around the reference, moved by ``stain_shift``.

    A positive shift gives a bluer, stronger hematoxylin and weaker PAS with a cooler
    white balance (a different lab's staining); negative the opposite.
    """
    j = params.stain_jitter
    h_vec = (
        render.HEMATOXYLIN_OD
        + rng.normal(0, 0.035 * j, 3)
        + stain_shift * np.array([0.16, 0.0, -0.12])
    )
    p_vec = render.PAS_OD + rng.normal(0, 0.03 * j, 3) + stain_shift * np.array([0.05, 0.0, 0.08])
    h_vec, p_vec = np.clip(h_vec, 0.05, None), np.clip(p_vec, 0.05, None)
    return SlideStain(
        h_vec=render.unit(h_vec),
        p_vec=render.unit(p_vec),
        h_scale=float(np.exp(rng.normal(0, 0.12 * j) + 0.3 * stain_shift)),
        p_scale=float(np.exp(rng.normal(0, 0.12 * j) - 0.3 * stain_shift)),
        tint_od=np.clip(
            rng.normal(0.02, 0.015 * j, 3) + stain_shift * np.array([0.04, 0.0, -0.03]), -0.05, None
        ),
    )


def phase_of(label: int, rng: np.random.Generator, params: SceneParams) -> float:
    """Latent cycle phase in [0, 12) of an image labelled with stage index ``label``."""
    return float((label + 0.5 + params.phase_jitter * (rng.random() - 0.5)) % NUM_STAGES)


def render_image(
    label: int, slide: SlideStain, size: int, seed: np.random.SeedSequence, params: SceneParams
) -> np.ndarray:
    """RGB uint8 [size, size, 3] image of a tubule in stage ``label`` (0 = I)."""
    rng = np.random.default_rng(seed)
    return _render(phase_of(label, rng, params), slide, size, rng, params)


def render_image_at_phase(
    t: float, slide: SlideStain, size: int, seed: np.random.SeedSequence, params: SceneParams
) -> np.ndarray:
    """Like :func:`render_image` at a given latent phase t in [0, 12)."""
    return _render(float(t) % NUM_STAGES, slide, size, np.random.default_rng(seed), params)


def _render(
    t: float, slide: SlideStain, size: int, rng: np.random.Generator, params: SceneParams
) -> np.ndarray:
    k = max(1, math.ceil(params.min_render_size / size))
    rs = size * k  # Render size.
    r = params.cell_scale * rs * rng.uniform(0.93, 1.07)
    main = _random_tubule(
        rng,
        rs * rng.uniform(*params.tubule_radius),
        centre=rs / 2 + rng.normal(0, 0.04 * rs, 2),
        **tubule_draw.lumen_shape(t, rng),
    )
    neighbours = _neighbours(main, rs, r, rng)
    # Optical blur (render px) enters as soft nucleus outlines and blurred textures.
    blur = rng.uniform(*params.blur_range) * rs / 1152.0
    # The tubule as a section's tubule is drawn (one drawing for both: issue 25) ...
    drawn = tubule_draw.draw_tubule(main, t, r, blur, rs, rng, params)
    # ... laid over its neighbours and the interstitium.
    h_od, p_od, n_od = _surroundings(main, neighbours, rs, r, blur, rng, params)
    keep = 1.0 - drawn.cover
    h_od = h_od * keep + drawn.h_od
    p_od = p_od * keep + drawn.p_od
    stain = render.Stain(
        h_vec=slide.h_vec,
        p_vec=slide.p_vec,
        h_scale=slide.h_scale,
        p_scale=slide.p_scale,
        tint_od=slide.tint_od + rng.normal(0, 0.006 * params.stain_jitter, 3),
        noise=rng.uniform(*params.noise_range),
    )
    if rs == size:
        img = render.compose(h_od, p_od, n_od, stain, rng)
    else:
        img = render.reduce(render.compose(h_od, p_od, n_od, stain), size, stain.noise, rng)
    if params.hand_cut:  # Drawn last: the uncut image is the same with or without it.
        traced = bool(rng.random() < params.traced_fraction)
        img[~outline_mask(hand_outline(main, rs, rng, traced), size, k)] = 255
    return img


def _surroundings(main, neighbours, rs, r, blur, rng, params):
    """H, PAS and neutral densities [rs, rs] of the neighbours and the interstitium."""
    lo = rs // 2 if rs >= 256 else rs
    h_lo, p_lo, n_lo, tissue = _tissue_fields(neighbours, rs, lo, r, rng, params)
    cp = tubule_draw.cell_params(params, rng)
    groups = []
    for nb in neighbours:
        groups += epithelium.tubule_nuclei(
            nb, rng.uniform(0, NUM_STAGES), r, rng, cp, main=False, frame=rs
        )
    groups += _interstitial(main, neighbours, tissue, rs, r, rng)
    tiles = render.texture_tiles(r, rng, blur=blur)
    h_sp, p_sp = render.splat_nuclei(groups, rs, tiles, edge=max(0.8, 2.2 * blur))
    h_od = render.upsample(h_lo, rs) + h_sp
    p_od = np.maximum(render.upsample(p_lo, rs) + p_sp, 0.0)
    return h_od, p_od, render.upsample(n_lo, rs)


def hand_outline(
    tub: cells.Tubule, rs: int, rng: np.random.Generator, traced: bool = False
) -> np.ndarray:
    """(n, 2) vertices (x, y), in render px, of a cut around ``tub``: 20-40 straight strokes.

    Like the study's cut-outs, loosely a few um (1-3% of the image side) outside the
    basement membrane, now and then clipping it; ``traced``: along the membrane itself,
    as a QuPath trace or the section detector's outline cuts a section's tubule.
    """
    n = int(rng.integers(20, 41))
    start = rng.uniform(0, cells.TWO_PI)
    phi = start + (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * (cells.TWO_PI / n)
    x, y, nx, ny = tub.point_rho(phi, 1.0)
    if traced:
        off = rng.normal(0, 0.003 * rs, n)
    else:
        margin = rng.uniform(0.01, 0.03) * rs
        off = np.maximum(margin + rng.normal(0, 0.006 * rs, n), -0.004 * rs)
    return np.stack([x + off * nx, y + off * ny], axis=-1)


def outline_mask(poly: np.ndarray, size: int, k: int = 1) -> np.ndarray:
    """[size, size] bool: pixels of the image (render reduced k times) inside ``poly``.

    ``poly`` is in render px; output pixel i is centred on render px i * k + (k - 1) / 2.
    Even-odd scanline fill of pixel centres: a sharp edge, clipped by the image border.
    """
    pts = (np.asarray(poly, np.float64) - (k - 1) / 2) / k
    x0, y0 = pts[:, 0], pts[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    rows = np.arange(size, dtype=np.float64)[:, None]
    row, edge = np.nonzero((y0 <= rows) != (y1 <= rows))  # Edges crossing each row.
    frac = (row - y0[edge]) / (y1[edge] - y0[edge])
    xc = x0[edge] + frac * (x1[edge] - x0[edge])
    # Each crossing flips inside/outside from the first pixel centre at or right of it.
    flips = np.zeros((size, size + 1), np.int32)
    np.add.at(flips, (row, np.clip(np.ceil(xc), 0, size).astype(np.int64)), 1)
    return np.cumsum(flips[:, :size], axis=1) % 2 == 1


def _random_tubule(rng, radius, centre, **lumen) -> cells.Tubule:
    aspect = rng.uniform(0.72, 1.0)
    return cells.Tubule(
        cx=float(centre[0]),
        cy=float(centre[1]),
        ra=radius / math.sqrt(aspect),
        rb=radius * math.sqrt(aspect),
        theta=rng.uniform(0, math.pi),
        **lumen,
    )


def _neighbours(main: cells.Tubule, rs: int, r: float, rng) -> list[cells.Tubule]:
    """Fragments of adjacent tubules cut by the image border."""
    out: list[cells.Tubule] = []
    start = rng.uniform(0, 2 * math.pi)
    for i in range(rng.integers(3, 7)):
        ang = start + i * 2 * math.pi / 6 + rng.normal(0, 0.3)
        rad = main.mean_radius * rng.uniform(0.7, 1.1)
        dist = main.mean_radius * 1.05 + rng.uniform(1.5, 6.0) * r + rad
        cx, cy = main.cx + dist * math.cos(ang), main.cy + dist * math.sin(ang)
        # Visible at all, and not overlapping a neighbour already placed?
        nearest = max(-cx, cx - rs, -cy, cy - rs, 0.0)
        if nearest > rad * 0.9:
            continue
        if any(math.hypot(cx - o.cx, cy - o.cy) < rad + o.mean_radius + 2 * r for o in out):
            continue
        lumen = tubule_draw.lumen_shape(rng.uniform(0, NUM_STAGES), rng)
        out.append(_random_tubule(rng, rad, (cx, cy), **lumen))
    return out


def _tissue_fields(neighbours, rs, lo, r, rng, params):
    """Low-resolution H, PAS and neutral densities of the interstitium and neighbours."""
    scale = rs / lo
    coords = (np.arange(lo, dtype=np.float32) + 0.5) * scale - 0.5
    x, y = coords[None, :], coords[:, None]
    shape = (lo, lo)
    rl = r / scale  # Nucleus radius in low-res px.

    # Interstitium: patches of pink connective tissue between empty (white) spaces.
    tissue = smoothstep(render.smooth_noise(shape, 6 * rl, rng), -0.5, 0.6)
    fibres = render.smooth_noise(shape, 0.8 * rl, rng)
    p = (tissue * (0.2 + 0.07 * fibres) + 0.015).astype(np.float32)
    h = (tissue * (0.05 + 0.02 * fibres) + 0.005).astype(np.float32)
    membrane = np.zeros(shape, np.float32)
    tex = tubule_draw.tissue_textures(shape, rl, rng)
    for tub in neighbours:
        content = tubule_draw.lumen_content(rng.uniform(0, NUM_STAGES), rng)
        tubule_draw.paint_tubule(tub, h, p, membrane, x, y, scale, r, tex, content, rng)
    tubule_draw.add_membrane(h, p, membrane)

    # Uneven illumination as a neutral density: vignetting around an off-centre point.
    vig = rng.uniform(*params.vignette_range)
    c0 = rs * (0.5 + rng.normal(0, 0.15, 2))
    n_od = vig * ((x - c0[0]) ** 2 + (y - c0[1]) ** 2) / (0.5 * rs * rs)
    n_od = n_od + rng.normal(0, 0.03) * (x / rs - 0.5) + rng.normal(0, 0.03) * (y / rs - 0.5)
    return (
        h.astype(np.float32),
        p.astype(np.float32),
        n_od.astype(np.float32),
        tissue.astype(np.float32),
    )


def _interstitial(main, neighbours, tissue, rs, r, rng) -> list[cells.Nuclei]:
    """Leydig and fibroblast nuclei in interstitial tissue, outside every tubule."""
    n = int((rs / (3.0 * r)) ** 2 * 0.25)
    x, y = rng.uniform(0, rs, n), rng.uniform(0, rs, n)
    keep = np.ones(n, bool)
    for tub in [main, *neighbours]:
        rho, _ = tubule_draw.rho_phi(tub, x, y)
        keep &= rho > 1.0 + 2.2 * r / tub.mean_radius
    lo = tissue.shape[0]
    ti = tissue[
        np.clip((y * lo / rs).astype(int), 0, lo - 1), np.clip((x * lo / rs).astype(int), 0, lo - 1)
    ]
    keep &= rng.random(n) < ti * 0.6
    return cells.interstitial_nuclei(x[keep], y[keep], r, rng)
