"""Spermatids of the tubule simulator: the two generations that tell most stages apart.

* round steps 1-8 (t < 8) with the PAS acrosome growing from a granule (II-III) into a
  cap (IV-VII) that turns to face the basement membrane (VIII); then elongating steps
  9-12 (IX-XII) that get longer, thinner, darker and gather in bundles.
* elongated steps 13-16 (t < 9): bundles deep in the epithelium (I-V) that move to the
  lumen (VI-VII) and are released (VIII, spermiation), leaving residual bodies.

Called by ``epithelium.tubule_nuclei``, which explains the phase ``t``, the unit ``r``
and ``place``.
"""

from __future__ import annotations

import math

import numpy as np

from stagejax.simulate.cells import (
    TEX_CLUMPS,
    TEX_FINE,
    TWO_PI,
    angle,
    mix_dirs,
    nuclei,
    smoothstep,
)


def cap_halfwidth_deg(t):
    """Acrosome cap half-angle on round spermatids: 0 (granule only) until IV."""
    full = np.interp(t, [3.0, 4.0, 5.0, 6.0, 7.0, 8.0], [0.0, 22.0, 40.0, 120.0, 150.0, 165.0])
    return 0.5 * full


def granule_radius(t):
    """Acrosomal granule radius (units of r): appears at the end of I, grows in II-III."""
    return np.interp(t, [0.6, 1.0, 3.0, 8.0], [0.0, 0.13, 0.24, 0.22])


def elongated_depth(t):
    """Depth of elongated (steps 13-16) spermatid heads: deep bundles -> lumen at VII."""
    return np.interp(t, [0.0, 5.0, 6.0, 6.8, 8.0], [0.50, 0.53, 0.70, 0.93, 0.96])


def spermatid_cohort(groups, tub, t, r, rng, sd, cp, place) -> int:
    """Round spermatids with the PAS acrosome (I-VIII) or elongating ones (IX-XII).

    Returns how many there are (the residual bodies of spermiation scale with it).
    """
    phi, dep, x, y, nx, ny = place(0.29, 0.9, 2.25 * r)
    n = x.shape[0]
    if t < 8.0:
        _round_spermatids(groups, t, x, y, nx, ny, r, rng, sd, cp)
        return n
    # Elongating spermatids, steps 9-12: longer, thinner, darker; gathering in bundles.
    tc = np.clip(t + rng.normal(0, sd, n), 8.0, 11.999)
    e = 1.0 - (1.0 - (tc - 8.0) / 4.0) ** 2  # Shape changes fastest in IX-X.
    keep = rng.random(n) < 0.9  # A few are lost (out of the section plane).
    bundled = smoothstep(t, 9.3, 11.5) * 0.75
    bdepth = np.interp(t, [8.0, 12.0], [0.62, 0.52])
    _bundled_heads(
        groups, "elongating_spermatid", tub, rng, phi[keep], dep[keep], e[keep], r, bundled, bdepth
    )
    return n


def _round_spermatids(groups, t, x, y, nx, ny, r, rng, sd, cp) -> None:
    """Steps 1-8: round nuclei whose acrosome grows from a granule to a cap."""
    n = x.shape[0]
    tc = np.clip(t + rng.normal(0, sd, n), 0.0, 7.999)
    rad = np.interp(tc, [0, 8], [0.92, 1.05]) * r
    # Acrosome: direction random until VII, then turning to face the membrane (VIII).
    rnd = rng.uniform(0, TWO_PI, n)
    face = smoothstep(tc, 6.9, 7.6)
    cdx, cdy = mix_dirs(np.cos(rnd), np.sin(rnd), nx, ny, face)
    half = np.radians(cap_halfwidth_deg(tc) * np.exp(rng.normal(0, 0.15, n)))
    has_cap = half > 0
    groups.append(
        nuclei(
            "round_spermatid",
            TEX_FINE,
            x,
            y,
            a=rad,
            b=rad * rng.uniform(0.92, 1.0, n),
            theta=rng.uniform(0, TWO_PI, n),
            h=0.3,
            tex=0.4,
            rim=0.18,
            dot=0.8,
            dot_r=0.3,
            cap=np.where(has_cap, 0.9, 0.0) * cp.acrosome_contrast,
            cap_dx=cdx,
            cap_dy=cdy,
            cap_cos=np.where(has_cap, np.cos(half), 1.0),
            gran=smoothstep(tc, 0.6, 1.2) * 1.6 * cp.acrosome_contrast,
            gran_r=granule_radius(tc),
            halo=-0.06,
            extent=1.45,
        )
    )


def _bundled_heads(groups, name, tub, rng, phi, dep, e, r, bundled, bdepth, released=None):
    """Spermatid heads pulled together into bundles; +u (taper tip) points to the membrane."""
    n = phi.shape[0]
    if n == 0:
        return
    # Bundle centres: every ~5.5 r around the tubule; each head joins its nearest centre.
    nb = max(3, int(TWO_PI * (1 - bdepth) * tub.mean_radius / (4.5 * r)))
    centres = (np.arange(nb) + rng.uniform(-0.25, 0.25, nb)) * (TWO_PI / nb) + rng.uniform(0, 6.3)
    diff = (phi[:, None] - centres[None, :] + math.pi) % TWO_PI - math.pi
    j = np.abs(diff).argmin(1)
    thick = max(tub.thickness(), 1e-6)
    bphi = centres[j] + rng.normal(0, 0.9 * r / max(tub.mean_radius, 1e-6), n)
    bdep = bdepth + rng.normal(0, 1.6 * r / thick, n)
    # phi - diff is the bundle centre unwrapped next to phi, so the blend never wraps.
    phi_h = phi + bundled * (bphi - centres[j] - diff[np.arange(n), j])
    dep_h = np.clip((1 - bundled) * dep + bundled * bdep, 0.05, 1.0)
    x, y, nx, ny = tub.point(phi_h, dep_h)
    theta = angle(nx, ny) + rng.normal(0, 0.35 * (1 - bundled) + 0.12, n)
    if released is not None and released.any():
        # Released heads float in the lumen, in random orientations.
        k = released.sum()
        phi_l = rng.uniform(0, TWO_PI, k)
        rho = tub.lumen_rho(phi_l) * np.sqrt(rng.uniform(0.0, 0.85, k))
        xl, yl, _, _ = tub.point_rho(phi_l, rho)
        x, y = x.copy(), y.copy()
        x[released], y[released] = xl, yl
        theta = np.where(released, rng.uniform(0, TWO_PI, n), theta)
    a = (1.0 + 0.2 * e) * r * rng.uniform(0.9, 1.1, n)
    b = (1.0 - 0.72 * e) * r
    groups.append(
        nuclei(
            name,
            TEX_FINE,
            x,
            y,
            a=a,
            b=b,
            theta=theta,
            taper=0.45 * e,
            bend=0.25 * e,
            h=0.3 + 1.0 * e,
            tex=0.4 * (1 - e) + 0.1,
            rim=0.5 * (1 - e),
            dot=0.6 * (1 - e),
            cap=0.7 * (1 - 0.7 * e),
            cap_dx=np.cos(theta),
            cap_dy=np.sin(theta),
            cap_cos=np.cos(np.radians(80.0 - 30.0 * e)),
            halo=-0.03,
            extent=1.3,
        )
    )


def elongated_cohort(groups, tub, t, r, rng, sd, place, n_spermatids) -> None:
    """Steps 13-16 (I-VIII): deep bundles, move to the lumen, released at VIII."""
    if t >= 9.0:
        return
    phi, dep, *_ = place(0.40, 0.88, 2.25 * r)
    n = phi.shape[0]
    keep = rng.random(n) < 0.6
    phi, dep = phi[keep], dep[keep]
    n = phi.shape[0]
    tc = np.clip(t + rng.normal(0, sd, n), 0.0, 9.0)
    release = rng.uniform(7.05, 7.95, n)
    washed = release + rng.uniform(0.15, 1.1, n)  # Released sperm leave the section.
    released = tc >= release
    present = tc < washed
    if t >= 8.0:
        present &= released
    bdepth = float(elongated_depth(min(t, 8.0)))
    bundled = float(1.0 - smoothstep(t, 5.4, 6.8)) * 0.9
    # Lining the lumen at VII: heads spread along the lumen border.
    dep = np.where(tc > 6.3, np.maximum(dep, 0.9), dep)
    e = np.ones(n) * 1.02
    _bundled_heads(
        groups,
        "elongated_spermatid",
        tub,
        rng,
        phi[present],
        dep[present],
        e[present],
        r,
        bundled,
        bdepth,
        released=released[present],
    )
    _residual_bodies(groups, tub, t, r, rng, n_spermatids)


def _residual_bodies(groups, tub, t, r, rng, n_spermatids) -> None:
    """PAS-positive cytoplasm shed at spermiation, near the lumen (VIII-IX)."""
    amount = float(smoothstep(t, 7.2, 7.8) * (1 - smoothstep(t, 8.4, 9.0)))
    k = int(amount * 0.35 * n_spermatids)
    if k:
        phi_r = rng.uniform(0, TWO_PI, k)
        x, y, _, _ = tub.point(phi_r, rng.uniform(0.82, 0.97, k))
        groups.append(
            nuclei(
                "residual_body",
                TEX_CLUMPS,
                x,
                y,
                a=rng.uniform(0.35, 0.7, k) * r,
                b=rng.uniform(0.3, 0.6, k) * r,
                theta=phi_r,
                h=0.15,
                tex=0.5,
                pas=0.45,
                rim=0.1,
            )
        )
