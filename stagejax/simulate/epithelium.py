"""Stage biology of the tubule simulator: which nuclei sit where, for a cycle phase.

The simulator needs neighbouring stages to be *genuinely* confusable, as they are for
experts, so every feature here is a continuous function of a latent phase ``t`` in
[0, 12): stage k (0 = I) occupies [k, k + 1), and t = 12 is t = 0 again (XII runs into I).
The germ-cell cohorts follow the classic mouse timetable (shared/reference/stages.md):

* basal cohort: A/intermediate/B spermatogonia (t < 6) -> preleptotene (VII-VIII) ->
  leptotene (IX-X) -> zygotene (XI-XII); clock ``m = t - 6`` once t >= 6.
* pachytene cohort, clock ``m = t + 6`` in [6, 18): pachytene growing through I-X,
  diplotene at XI, meiotic divisions at XII (metaphase plates, secondary spermatocytes,
  then tetrads of new spermatids, so that late XII already resembles I).
* spermatid cohort: round steps 1-8 (I-VIII), elongating steps 9-12 (IX-XII), and the
  elongated cohort (steps 13-16, released at VIII); see ``spermatids``.

Each cell also gets a small private phase offset (asynchrony within a tubule). All sizes
are in units of ``r`` = round-spermatid nucleus radius in pixels, so the same code draws
1,152 px and 48 px images. Output is a list of ``cells.Nuclei`` groups for the renderer.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from stagejax.simulate import spermatids
from stagejax.simulate.cells import (
    TEX_CLUMPS,
    TEX_FINE,
    TEX_THREADS_THICK,
    TEX_THREADS_THIN,
    TWO_PI,
    Nuclei,
    Tubule,
    angle,
    individualise,
    layer,
    nuclei,
    smoothstep,
)


def pachytene_radius(m):
    """Spermatocyte nucleus radius (units of r) along the meiotic clock m (0 = preleptotene)."""
    return np.interp(m, [0, 2, 4, 6, 8, 12, 16, 17], [0.78, 0.84, 0.92, 1.0, 1.1, 1.27, 1.45, 1.52])


@dataclasses.dataclass(frozen=True)
class CellParams:
    """Per-cell randomness; raising these makes neighbouring stages harder to tell apart."""

    cell_phase_sd: float = 0.15  # Asynchrony of cells within a tubule (stage units).
    acrosome_contrast: float = 1.0  # Scales the PAS density of acrosomes (granule/cap).
    density: float = 1.0  # Scales the number of germ cells.


def tubule_nuclei(
    tub: Tubule,
    t: float,
    r: float,
    rng: np.random.Generator,
    cp: CellParams = CellParams(),
    main: bool = True,
    frame: float | None = None,
) -> list[Nuclei]:
    """Every nucleus of one tubule at phase t (list of groups, one per texture kind).

    ``main`` adds the myoid cells around the membrane; ``frame`` (image size) skips cells
    that cannot be seen.
    """
    groups: list[Nuclei] = []
    sd = cp.cell_phase_sd
    dens = cp.density

    def place(d0, d1, spacing, fill=1.0):
        """Cells in depths [d0, d1] about ``spacing`` apart: (phi, depth, x, y, nx, ny)."""
        phi, dep = layer(tub, d0, d1, spacing / math.sqrt(dens), rng, fill, frame)
        x, y, nx, ny = tub.point(phi, dep)
        return phi, dep, x, y, nx, ny

    _sertoli(groups, r, rng, place)
    if main:
        _myoid(groups, tub, r, rng)
    _spermatogonia_a(groups, r, rng, place)
    _basal_cohort(groups, tub, t, r, rng, sd, place)
    _pachytene_cohort(groups, t, r, rng, sd, place)
    n_spermatids = spermatids.spermatid_cohort(groups, tub, t, r, rng, sd, cp, place)
    spermatids.elongated_cohort(groups, tub, t, r, rng, sd, place, n_spermatids)
    return [individualise(g, rng) for g in groups if len(g)]


def _sertoli(groups, r, rng, place) -> None:
    """Sertoli nuclei: pale, irregular, prominent nucleolus, at the base."""
    _, _, x, y, nx, ny = place(0.03, 0.09, 4.8 * r, fill=0.85)
    n = x.shape[0]
    groups.append(
        nuclei(
            "sertoli",
            TEX_FINE,
            x,
            y,
            a=rng.uniform(1.15, 1.4, n) * r,
            b=rng.uniform(0.7, 0.9, n) * r,
            theta=angle(nx, ny) + rng.normal(0, 0.5, n),
            h=0.26,
            tex=0.35,
            rim=0.35,
            dot=0.9,
            dot_r=0.28,
            irr=0.12,
            irr_phase=rng.uniform(0, TWO_PI, n),
            halo=-0.04,
        )
    )


def _myoid(groups, tub, r, rng) -> None:
    """Myoid cells: flat nuclei along the outside of the basement membrane."""
    phi = np.sort(rng.uniform(0, TWO_PI, int(TWO_PI * tub.mean_radius / (9 * r))))
    x, y, nx, ny = tub.point_rho(phi, 1.0 + 0.9 * r / tub.mean_radius)
    n = x.shape[0]
    groups.append(
        nuclei(
            "myoid",
            TEX_FINE,
            x,
            y,
            a=rng.uniform(1.4, 2.0, n) * r,
            b=rng.uniform(0.25, 0.35, n) * r,
            theta=angle(nx, ny) + math.pi / 2,
            h=0.85,
            tex=0.2,
            rim=0.2,
        )
    )


def _spermatogonia_a(groups, r, rng, place) -> None:
    """Type A spermatogonia: few, flattened against the membrane, all stages."""
    _, _, x, y, nx, ny = place(0.015, 0.03, 8.0 * r, fill=0.5)
    n = x.shape[0]
    groups.append(
        nuclei(
            "spermatogonium_a",
            TEX_FINE,
            x,
            y,
            a=rng.uniform(1.1, 1.3, n) * r,
            b=rng.uniform(0.6, 0.75, n) * r,
            theta=angle(nx, ny) + math.pi / 2,
            h=0.55,
            tex=0.5,
            rim=0.4,
            dot=0.3,
        )
    )


def _basal_cohort(groups, tub, t, r, rng, sd, place) -> None:
    """Intermediate/B spermatogonia (t < 6), then preleptotene/leptotene/zygotene."""
    _, _, x, y, nx, ny = place(0.03, 0.17, 2.3 * r)
    tc = t + rng.normal(0, sd, x.shape[0])
    if t < 6.0:
        _spermatogonia(groups, x, y, nx, ny, tc, r, rng)
    else:
        _young_spermatocytes(groups, tub, x, y, nx, ny, tc, r, rng)


def _spermatogonia(groups, x, y, nx, ny, tc, r, rng) -> None:
    """Intermediate and B spermatogonia, multiplying towards VI, some in mitosis."""
    # Spermatogonia multiply: the visible fraction grows towards VI.
    frac = np.interp(tc, [0, 1, 3, 5, 6], [0.12, 0.18, 0.3, 0.45, 0.6])
    keep = rng.random(x.shape[0]) < frac
    x, y, nx, ny, tc = x[keep], y[keep], nx[keep], ny[keep], tc[keep]
    n = x.shape[0]
    # Mitoses of intermediate (II-III) and B (VI) spermatogonia.
    p_mit = 0.25 * (smoothstep(tc, 1.0, 1.5) - smoothstep(tc, 2.6, 3.0))
    p_mit = p_mit + 0.3 * smoothstep(tc, 5.3, 5.8)
    mit = rng.random(n) < p_mit
    crust = smoothstep(tc, 3.0, 4.5)  # B spermatogonia: heterochromatin on the envelope.
    rad = 0.85 * r
    groups.append(
        nuclei(
            "spermatogonium",
            TEX_CLUMPS,
            x[~mit],
            y[~mit],
            a=rad * 1.1,
            b=rad * 0.9,
            theta=angle(nx, ny)[~mit] + math.pi / 2,
            h=0.45,
            tex=0.6 + 0.4 * crust[~mit],
            rim=0.5 + 0.9 * crust[~mit],
            halo=-0.05,
        )
    )
    _metaphase(groups, x[mit], y[mit], 0.8 * r, rng)


def _young_spermatocytes(groups, tub, x, y, nx, ny, tc, r, rng) -> None:
    """The new generation along the meiotic clock m = t - 6 in [0, 6): preleptotene
    (VII-VIII), then leptotene and zygotene threads (IX-XII)."""
    m = np.clip(tc - 6.0, 0.0, 5.999)
    appear = rng.uniform(0.0, 0.9, x.shape[0])  # Preleptotene appear during VII.
    keep = m >= appear
    m, x, y, nx, ny = m[keep], x[keep], y[keep], nx[keep], ny[keep]
    # They move slightly away from the membrane as they progress.
    lift = np.interp(m, [0, 2, 6], [0.0, 0.02, 0.06]) * tub.thickness()
    x, y = x - nx * lift, y - ny * lift
    rad = pachytene_radius(m) * r
    threads = smoothstep(m, 1.6, 2.6)  # Leptotene threads replace preleptotene granules.
    pre = threads < 0.5
    groups.append(
        nuclei(
            "preleptotene",
            TEX_FINE,
            x[pre],
            y[pre],
            a=rad[pre],
            b=rad[pre] * 0.95,
            theta=rng.uniform(0, TWO_PI, pre.sum()),
            h=0.62,
            tex=0.6,
            rim=0.35,
            halo=-0.05,
        )
    )
    groups.append(
        nuclei(
            "leptotene_zygotene",
            TEX_THREADS_THIN,
            x[~pre],
            y[~pre],
            a=rad[~pre],
            b=rad[~pre] * 0.95,
            theta=rng.uniform(0, TWO_PI, (~pre).sum()),
            h=0.3,
            tex=0.8 + 0.5 * smoothstep(m[~pre], 3.5, 6.0),
            rim=0.3,
            halo=-0.06,
        )
    )


def _metaphase(groups, x, y, size, rng, pale_halo=0.12) -> None:
    """Metaphase plates: dense, ragged chromosome bars in a clear spindle area."""
    n = len(x)
    if n == 0:
        return
    groups.append(
        nuclei(
            "metaphase",
            TEX_CLUMPS,
            x,
            y,
            a=size * rng.uniform(1.1, 1.4, n),
            b=size * rng.uniform(0.28, 0.4, n),
            theta=rng.uniform(0, TWO_PI, n),
            h=1.3,
            tex=1.2,
            irr=0.25,
            irr_phase=rng.uniform(0, TWO_PI, n),
            halo=-pale_halo,
            extent=1.5,
        )
    )


def _pachytene_cohort(groups, t, r, rng, sd, place) -> None:
    """Pachytene (I-X) growing, diplotene (XI), meiotic divisions (XII); clock m = t + 6."""
    older = t >= 6.0  # VII-XII: this generation sits above the new basal one.
    d0, d1 = (0.15, 0.34) if older else (0.05, 0.27)
    _, _, x, y, nx, ny = place(d0, d1, 2.9 * r)
    n = x.shape[0]
    m = np.clip(t + 6.0 + rng.normal(0, sd, n), 6.0, 17.999)
    # Per cell: metaphase in the 0.4 stage before div_time, then two secondary
    # spermatocytes, then (0.25 later) four new round spermatids, so that the end of XII
    # already shows the young spermatids of stage I.
    div_time = rng.uniform(17.0, 17.7, n)
    state = np.select([m < div_time - 0.4, m < div_time, m < div_time + 0.25], [0, 1, 2], 3)
    rad = pachytene_radius(m) * r
    diplo = smoothstep(m, 15.8, 16.6)
    late = state == 0
    # Pachytene/diplotene: thick dark threads; diplotene loosens and condenses to clumps.
    thread = late & (diplo < 0.5)
    groups.append(
        nuclei(
            "pachytene",
            TEX_THREADS_THICK,
            x[thread],
            y[thread],
            a=rad[thread],
            b=rad[thread] * 0.95,
            theta=rng.uniform(0, TWO_PI, thread.sum()),
            h=0.55 + 0.2 * smoothstep(m[thread], 6.0, 12.0),
            tex=1.3,
            rim=0.25,
            halo=-0.1,
            extent=1.4,
        )
    )
    clump = late & (diplo >= 0.5)
    groups.append(
        nuclei(
            "diplotene",
            TEX_CLUMPS,
            x[clump],
            y[clump],
            a=rad[clump],
            b=rad[clump] * 0.95,
            theta=rng.uniform(0, TWO_PI, clump.sum()),
            h=0.2,
            tex=1.5,
            rim=0.2,
            halo=-0.1,
        )
    )
    _metaphase(groups, x[state == 1], y[state == 1], 1.0 * r, rng)
    _secondary_spermatocytes(groups, x[state == 2], y[state == 2], r, rng)
    new = state == 3
    _new_spermatids(groups, x[new], y[new], nx[new], ny[new], m[new] - div_time[new], r, rng)


def _secondary_spermatocytes(groups, x, y, r, rng) -> None:
    """Two smaller nuclei where one spermatocyte divided."""
    ang = rng.uniform(0, TWO_PI, x.shape[0])
    off = 1.05 * r
    xs = np.concatenate([x + off * np.cos(ang), x - off * np.cos(ang)])
    ys = np.concatenate([y + off * np.sin(ang), y - off * np.sin(ang)])
    groups.append(
        nuclei(
            "secondary_spermatocyte",
            TEX_FINE,
            xs,
            ys,
            a=0.9 * r,
            b=0.85 * r,
            theta=rng.uniform(0, TWO_PI, xs.shape[0]),
            h=0.6,
            tex=0.8,
            rim=0.4,
            dot=0.4,
            halo=-0.05,
        )
    )


def _new_spermatids(groups, x, y, nx, ny, since_division, r, rng) -> None:
    """Tetrads of new spermatids (look like step 1 round spermatids), drifting to the lumen."""
    k = x.shape[0]
    ang = rng.uniform(0, TWO_PI, k)[:, None] + np.arange(4) * (TWO_PI / 4)
    drift = (1.0 + 2.0 * np.clip(since_division - 0.25, 0, None))[:, None] * r
    xs = (x[:, None] + 1.1 * r * np.cos(ang) - nx[:, None] * drift).ravel()
    ys = (y[:, None] + 1.1 * r * np.sin(ang) - ny[:, None] * drift).ravel()
    groups.append(
        nuclei(
            "early_spermatid",
            TEX_FINE,
            xs,
            ys,
            a=0.88 * r,
            b=0.84 * r,
            theta=rng.uniform(0, TWO_PI, 4 * k),
            h=0.3,
            tex=0.3,
            rim=0.3,
            dot=0.7,
            dot_r=0.3,
            halo=-0.08,
            extent=1.4,
        )
    )
