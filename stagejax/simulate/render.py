"""Rasteriser of the tubule simulator: stain densities -> bright-field RGB.

Bright-field images obey Beer-Lambert: each stain adds optical density (OD) with its own
RGB absorption vector, and the camera sees ``white * exp(-OD)``. So the simulator draws
two density maps, hematoxylin (nuclei) and PAS (acrosomes, membrane, glycoproteins), plus
a neutral one (uneven illumination), and converts once at the end. That makes per-slide
staining differences (stain vectors, strengths) physically meaningful and cheap.

Speed (1,229 images of 1,152 px in minutes on 2 cores) comes from: smooth tissue layers
drawn at half resolution and upsampled; nuclei drawn as vectorised sprites (one numpy
pass per group of nuclei, accumulated with one ``np.bincount``); optical blur folded into
the soft outlines of nuclei and pre-blurred chromatin textures instead of a full-image
convolution.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from stagejax.simulate import cells

# Stain absorption vectors (unit RGB optical density), estimated by Macenko's method on
# shared/reference/real-tubule-stage-I-II.png: purple-blue hematoxylin, magenta PAS.
HEMATOXYLIN_OD = np.array([0.52, 0.77, 0.37])
PAS_OD = np.array([0.26, 0.92, 0.30])

TILE = 128  # Texture tiles are periodic TILE x TILE fields, indexed by pixel position.


@dataclasses.dataclass(frozen=True)
class Stain:
    """Staining and sensor noise of one image (slide-level draw plus per-image jitter)."""

    h_vec: np.ndarray  # Unit RGB OD of hematoxylin.
    p_vec: np.ndarray  # Unit RGB OD of PAS.
    h_scale: float  # Hematoxylin strength.
    p_scale: float  # PAS strength.
    tint_od: np.ndarray  # RGB OD of the white balance (0 = neutral).
    noise: float  # Sensor noise sd, in [0, 1] intensity units.


def unit(v: np.ndarray) -> np.ndarray:
    """v scaled to unit length."""
    return v / np.linalg.norm(v)


def _bandpass_tile(
    wavelength: float, rng: np.random.Generator, width: float = 0.45, blur: float = 0.0
):
    """Periodic noise with features of about `wavelength` px; zero mean, unit sd.

    ``blur`` (gaussian sigma, px) is applied after normalising, so blurred textures keep
    the contrast loss that optics would cause.
    """
    f = np.fft.fftfreq(TILE)
    fr = np.hypot(f[:, None], f[None, :])
    f0 = 1.0 / max(wavelength, 2.0)
    filt = np.exp(-(((fr - f0) / (width * f0)) ** 2))
    n = np.fft.ifft2(np.fft.fft2(rng.standard_normal((TILE, TILE))) * filt).real
    n = (n - n.mean()) / (n.std() + 1e-9)
    return _blur_tile(n, blur)


def _blur_tile(tile: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return tile
    f = np.fft.fftfreq(TILE)
    gauss = np.exp(-2.0 * (math.pi * sigma) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    return np.fft.ifft2(np.fft.fft2(tile) * gauss).real


def texture_tiles(r: float, rng: np.random.Generator, blur: float = 0.0) -> np.ndarray:
    """Chromatin textures [kind, TILE, TILE] at the scale of a nucleus of radius r px.

    Kinds (see cells.TEX_*): fine granular chromatin; thin and thick chromosome
    threads (zero crossings of band-pass noise are wavy lines); heterochromatin clumps.
    """
    fine = 0.5 * _bandpass_tile(0.4 * r, rng, blur=blur)
    thin = _blur_tile(np.exp(-((_bandpass_tile(0.9 * r, rng) / 0.45) ** 2)), blur)
    thick = _blur_tile(
        np.exp(-((_bandpass_tile(1.0 * r, rng) / 0.9) ** 2)) + 0.25 * _bandpass_tile(0.35 * r, rng),
        blur,
    )
    clumps = _blur_tile(np.clip(_bandpass_tile(0.7 * r, rng) - 0.5, 0.0, None), blur)
    return np.stack([fine, thin - thin.mean(), thick - thick.mean(), clumps]).astype(np.float32)


def splat_nuclei(
    groups: list[cells.Nuclei],
    size: int,
    tiles: np.ndarray,
    edge: float = 0.8,
    chunk_elems: int = 1 << 21,
):
    """Hematoxylin and PAS density maps [size, size] of all nuclei.

    ``edge`` is the width (px) of the soft outline: anti-aliasing plus optical blur.
    """
    groups = [g for g in groups if len(g)]
    halves = [
        int(math.ceil(g.extent * float(max(g.fields["a"].max(), g.fields["b"].max())) + 1.5))
        for g in groups
    ]
    # Accumulate on a canvas padded by two sprite radii (a kept sprite's centre is at most
    # one radius outside the frame), so no pixel needs a bounds check; crop at the end.
    pad = 2 * max(halves, default=0)
    width = size + 2 * pad
    idxs, hvals, pvals = [], [], []
    for g, half in zip(groups, halves, strict=True):
        inframe = (g.x > -half) & (g.x < size + half) & (g.y > -half) & (g.y < size + half)
        g = g.select(inframe)
        step = max(1, chunk_elems // (2 * half + 1) ** 2)
        for i in range(0, len(g), step):
            part = g.select(slice(i, i + step))
            idx, hv, pv = _sprites(part, half, pad, width, tiles[part.kind], edge)
            idxs.append(idx)
            hvals.append(hv)
            pvals.append(pv)
    if not idxs:
        return np.zeros((size, size), np.float32), np.zeros((size, size), np.float32)
    idx = np.concatenate(idxs)
    crop = (slice(pad, pad + size), slice(pad, pad + size))
    h = np.bincount(idx, np.concatenate(hvals), minlength=width * width)
    p = np.bincount(idx, np.concatenate(pvals), minlength=width * width)
    return (
        h.reshape(width, width)[crop].astype(np.float32),
        p.reshape(width, width)[crop].astype(np.float32),
    )


def _sprites(g: cells.Nuclei, half: int, pad: int, width: int, tile: np.ndarray, edge: float):
    """Flat indices (in the padded canvas) and H/PAS values of a group's sprite pixels."""
    f = {k: v[:, None, None] for k, v in g.fields.items()}
    o = np.arange(-half, half + 1)
    ix = np.floor(g.x).astype(np.int64)[:, None] + o  # [N, P]
    iy = np.floor(g.y).astype(np.int64)[:, None] + o
    dx = (ix - g.x[:, None]).astype(np.float32)[:, None, :]  # [N, 1, P]
    dy = (iy - g.y[:, None]).astype(np.float32)[:, :, None]  # [N, P, 1]
    c, s = np.cos(f["theta"]), np.sin(f["theta"])
    u = dx * c + dy * s
    v = dy * c - dx * s
    a, b = f["a"], f["b"]
    un = u / a
    if g.fields["bend"].any():
        v = v - f["bend"] * b * 2.0 * un * un
    w = b * np.maximum(1.0 - f["taper"] * 0.5 * (un + 1.0), 0.3)
    rad = np.sqrt(un * un + (v / w) ** 2)
    dist = np.sqrt(dx * dx + dy * dy) + 1e-3
    if g.fields["irr"].any():
        cp, sp = u / dist, v / dist
        cos3, sin3 = 4 * cp**3 - 3 * cp, 3 * sp - 4 * sp**3
        rad *= 1.0 + f["irr"] * (cos3 * np.cos(f["irr_phase"]) - sin3 * np.sin(f["irr_phase"]))
    inside = np.clip(0.5 + (1.0 - rad) * w / edge, 0.0, 1.0)
    hval = tile[(iy % TILE)[:, :, None], (ix % TILE)[:, None, :]]
    hval *= f["tex"]
    hval += f["h"]
    hval += f["rim"] * np.exp(-(((1.0 - rad) / 0.2) ** 2))
    if g.fields["dot"].any():
        dr = f["dot_r"] * b
        hval += f["dot"] * np.exp(-(((u - f["dot_off"] * a) / dr) ** 2 + (v / dr) ** 2))
    np.maximum(hval, 0.0, out=hval)
    hval *= inside
    pval = f["pas"] * inside
    if g.fields["cap"].any():
        cosang = (dx * f["cap_dx"] + dy * f["cap_dy"]) / dist
        ang = np.clip((cosang - f["cap_cos"]) / 0.06 + 0.5, 0.0, 1.0)
        pval += f["cap"] * ang * np.exp(-(((rad - 1.02) / 0.13) ** 2))
    if g.fields["gran"].any():
        gx = dx - f["cap_dx"] * a * 0.95
        gy = dy - f["cap_dy"] * a * 0.95
        gr = np.maximum(f["gran_r"] * a, 0.5)
        pval += f["gran"] * np.exp(-(gx * gx + gy * gy) / (gr * gr))
    if g.fields["halo"].any():
        # Cell body around the nucleus; fades to 0 before the sprite border.
        ring = np.clip((rad - 1.0) / (g.extent - 1.05), 0.0, 1.0)
        pval += f["halo"] * np.sin(np.pi * np.sqrt(ring)) ** 2
    idx = (iy + pad)[:, :, None] * width + (ix + pad)[:, None, :]
    return (
        np.broadcast_to(idx, hval.shape).ravel(),
        hval.ravel(),
        np.broadcast_to(pval, hval.shape).ravel(),
    )


def smooth_noise(shape: tuple[int, int], cell: float, rng: np.random.Generator):
    """Smooth random field (sd about 1) with features of about `cell` px.

    White noise on a grid of `cell / 2` px, smoothed twice with a [1, 2, 1] kernel (so the
    grid does not show), then upsampled bicubically.
    """
    gh, gw = max(4, int(2 * shape[0] / cell) + 4), max(4, int(2 * shape[1] / cell) + 4)
    small = rng.standard_normal((gh, gw))
    for _ in range(2):
        small = 0.25 * (np.roll(small, 1, 0) + 2 * small + np.roll(small, -1, 0))
        small = 0.25 * (np.roll(small, 1, 1) + 2 * small + np.roll(small, -1, 1))
    small = (small / (small.std() + 1e-9)).astype(np.float32)
    img = Image.fromarray(small, mode="F").resize((shape[1], shape[0]), Image.BICUBIC)
    return np.asarray(img)


def polar_noise(
    phi: np.ndarray, rho: np.ndarray, n_ang: int, n_rad: int, rng: np.random.Generator
) -> np.ndarray:
    """Smooth noise in tubule coordinates (periodic in phi): radial streaks when
    n_ang >> n_rad. Bilinear lookup in a small smoothed random grid; sd about 1."""
    grid = rng.standard_normal((n_rad + 2, n_ang))
    grid = 0.25 * (np.roll(grid, 1, 1) + 2 * grid + np.roll(grid, -1, 1))
    grid /= grid.std() + 1e-9
    fa = (phi % (2 * math.pi)) * (n_ang / (2 * math.pi))
    fr = np.clip(rho, 0.0, 1.0) * n_rad
    ia, ir = np.floor(fa).astype(np.int64), np.floor(fr).astype(np.int64)
    wa, wr = (fa - ia).astype(np.float32), (fr - ir).astype(np.float32)
    ia %= n_ang
    ib = (ia + 1) % n_ang
    top = grid[ir, ia] * (1 - wa) + grid[ir, ib] * wa
    bot = grid[ir + 1, ia] * (1 - wa) + grid[ir + 1, ib] * wa
    return (top * (1 - wr) + bot * wr).astype(np.float32)


def upsample(field: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a float field to size x size."""
    if field.shape[0] == size:
        return field
    img = Image.fromarray(np.ascontiguousarray(field, np.float32), mode="F")
    return np.array(img.resize((size, size), Image.BILINEAR))


def compose(
    h_od: np.ndarray,
    p_od: np.ndarray,
    n_od: np.ndarray,
    stain: Stain,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Beer-Lambert: RGB uint8 image from hematoxylin, PAS and neutral densities.

    With ``rng``, sensor noise of sd ``stain.noise`` is added before quantisation.
    """
    out = np.empty(h_od.shape + (3,), np.uint8)
    hv = stain.h_vec * stain.h_scale
    pv = stain.p_vec * stain.p_scale
    for ch in range(3):
        od = h_od * np.float32(hv[ch])
        od += p_od * np.float32(pv[ch])
        od += n_od
        od -= np.float32(math.log(255.0) - stain.tint_od[ch])  # exp(-od) in 0..255 units
        val = np.exp(-od, out=od)
        if rng is not None and stain.noise > 0:
            val += rng.standard_normal(val.shape, dtype=np.float32) * np.float32(
                stain.noise * 255.0
            )
        val += 0.5
        np.clip(val, 0, 255, out=val)
        out[..., ch] = val
    return out


def reduce(
    rgb: np.ndarray, size: int | tuple[int, int], noise: float, rng: np.random.Generator
) -> np.ndarray:
    """Downsample a supersampled render to ``size`` (square, or (width, height)) with a
    box filter, then add sensor noise."""
    img = Image.fromarray(rgb).resize((size, size) if isinstance(size, int) else size, Image.BOX)
    arr = np.asarray(img).astype(np.float32)
    if noise > 0:
        arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(noise * 255.0)
    return np.clip(arr + 0.5, 0, 255).astype(np.uint8)
