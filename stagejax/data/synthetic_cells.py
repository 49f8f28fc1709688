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
* spermatid cohort: round steps 1-8 (t < 8) with the PAS acrosome growing from a granule
  (II-III) into a cap (IV-VII) that turns to face the basement membrane (VIII); then
  elongating steps 9-12 (IX-XII) that get longer, thinner, darker and gather in bundles.
* elongated cohort (t < 8, steps 13-16): bundles deep in the epithelium (I-V) that move to
  the lumen (VI-VII) and are released (VIII, spermiation).

Each cell also gets a small private phase offset (asynchrony within a tubule). All sizes
are in units of ``r`` = round-spermatid nucleus radius in pixels, so the same code draws
1,152 px and 48 px images. Output is a list of :class:`Nuclei` groups for the renderer.
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
    a=1.0, b=1.0, theta=0.0, taper=0.0, bend=0.0, h=0.4, tex=0.0, rim=0.0, dot=0.0,
    dot_r=0.25, dot_off=0.0, irr=0.0, irr_phase=0.0, cap=0.0, cap_dx=1.0, cap_dy=0.0,
    cap_cos=1.0, gran=0.0, gran_r=0.2, halo=0.0, pas=0.0,
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
        return Nuclei(self.name, self.kind, self.x[keep], self.y[keep],
                      {k: v[keep] for k, v in self.fields.items()}, self.extent)


def nuclei(name: str, kind: int, x, y, extent: float = 1.25, **fields) -> Nuclei:
    """Nuclei group with scalar fields broadcast to one value per nucleus."""
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    unknown = set(fields) - set(_DEFAULTS)
    if unknown:
        raise ValueError(f"Nuclei: unknown fields {sorted(unknown)}")
    full = {k: np.broadcast_to(np.asarray(fields.get(k, d), np.float32), (n,)).copy()
            for k, d in _DEFAULTS.items()}
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
        return math.sqrt(0.5 * (self.ra ** 2 + self.rb ** 2))

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
        return (self.cx + c * lx - s * ly, self.cy + s * lx + c * ly,
                c * gx - s * gy, s * gx + c * gy)

    def thickness(self) -> float:
        return (1.0 - self.lumen) * self.mean_radius


def layer(tub: Tubule, d0: float, d1: float, spacing: float, rng: np.random.Generator,
          fill: float = 1.0, frame: float | None = None, relax: int = 4):
    """Cell positions (phi, depth) filling depths [d0, d1] at about `spacing` px apart.

    Random (Poisson) positions, then a few rounds of pairwise repulsion: irregular like
    tissue, without rows or rings, and with few overlapping nuclei. With ``frame``, only
    cells that can appear in a frame x frame image are kept (neighbouring tubules).
    """
    lum = tub.lumen
    thick = max((1.0 - lum) * tub.mean_radius, 1e-6)
    rho0, rho1 = 1.0 - d0 * (1.0 - lum), 1.0 - d1 * (1.0 - lum)
    area = math.pi * tub.ra * tub.rb * (rho0 ** 2 - rho1 ** 2)
    n = rng.poisson(fill * 0.85 * area / (0.866 * spacing ** 2))
    # The ellipse map is linear in rho, so rho^2 uniform means area-uniform positions.
    rho = np.sqrt(rng.uniform(rho1 ** 2, rho0 ** 2, n))
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
        ds = ((phi[:, None] - phi[None, :] + math.pi) % TWO_PI - math.pi) * 0.5 * (
            circ[:, None] + circ[None, :])
        dq = (dep[:, None] - dep[None, :]) * thick
        dist = np.hypot(ds, dq) + eye
        push = np.clip(0.9 * spacing - dist, 0.0, None) / dist * 0.5
        phi = phi + (push * ds).sum(1) / circ
        dep = np.clip(dep + (push * dq).sum(1) / thick, d0, d1)
    return phi, dep


def _angle(nx, ny):
    return np.arctan2(ny, nx)


def _mix_dirs(ax, ay, bx, by, w):
    """Unit vectors interpolated from a to b by weight w (per element)."""
    x, y = (1 - w) * ax + w * bx, (1 - w) * ay + w * by
    n = np.maximum(np.hypot(x, y), 1e-6)
    return x / n, y / n


# --- stage timeline: scalar or per-cell functions of phase -------------------------------

def cap_halfwidth_deg(t):
    """Acrosome cap half-angle on round spermatids: 0 (granule only) until IV."""
    full = np.interp(t, [3.0, 4.0, 5.0, 6.0, 7.0, 8.0], [0.0, 22.0, 40.0, 120.0, 150.0, 165.0])
    return 0.5 * full


def granule_radius(t):
    """Acrosomal granule radius (units of r): appears at the end of I, grows in II-III."""
    return np.interp(t, [0.6, 1.0, 3.0, 8.0], [0.0, 0.13, 0.24, 0.22])


def pachytene_radius(m):
    """Spermatocyte nucleus radius (units of r) along the meiotic clock m (0 = preleptotene)."""
    return np.interp(m, [0, 2, 4, 6, 8, 12, 16, 17], [0.78, 0.84, 0.92, 1.0, 1.1, 1.27, 1.45, 1.52])


def elongated_depth(t):
    """Depth of elongated (steps 13-16) spermatid heads: deep bundles -> lumen at VII."""
    return np.interp(t, [0.0, 5.0, 6.0, 6.8, 8.0], [0.50, 0.53, 0.70, 0.93, 0.96])


@dataclasses.dataclass(frozen=True)
class CellParams:
    """Per-cell randomness; raising these makes neighbouring stages harder to tell apart."""

    cell_phase_sd: float = 0.15  # Asynchrony of cells within a tubule (stage units).
    acrosome_contrast: float = 1.0  # Scales the PAS density of acrosomes (granule/cap).
    density: float = 1.0  # Scales the number of germ cells.


def tubule_nuclei(tub: Tubule, t: float, r: float, rng: np.random.Generator,
                  cp: CellParams = CellParams(), main: bool = True,
                  frame: float | None = None) -> list[Nuclei]:
    """Every nucleus of one tubule at phase t (list of groups, one per texture kind).

    ``main`` adds the myoid cells around the membrane; ``frame`` (image size) skips cells
    that cannot be seen.
    """
    groups: list[Nuclei] = []
    sd = cp.cell_phase_sd
    dens = cp.density

    def place(d0, d1, spacing, fill=1.0):
        phi, dep = layer(tub, d0, d1, spacing / math.sqrt(dens), rng, fill, frame)
        x, y, nx, ny = tub.point(phi, dep)
        return phi, dep, x, y, nx, ny

    # Sertoli nuclei: pale, irregular, prominent nucleolus, at the base.
    _, _, x, y, nx, ny = place(0.03, 0.09, 4.8 * r, fill=0.85)
    n = x.shape[0]
    groups.append(nuclei(
        "sertoli", TEX_FINE, x, y, a=rng.uniform(1.15, 1.4, n) * r, b=rng.uniform(0.7, 0.9, n) * r,
        theta=_angle(nx, ny) + rng.normal(0, 0.5, n), h=0.26, tex=0.35, rim=0.35,
        dot=0.9, dot_r=0.28, irr=0.12, irr_phase=rng.uniform(0, TWO_PI, n), halo=-0.04))

    # Myoid cells: flat nuclei along the outside of the basement membrane.
    if main:
        phi = np.sort(rng.uniform(0, TWO_PI, int(TWO_PI * tub.mean_radius / (9 * r))))
        x, y, nx, ny = tub.point_rho(phi, 1.0 + 0.9 * r / tub.mean_radius)
        n = x.shape[0]
        groups.append(nuclei(
            "myoid", TEX_FINE, x, y,
            a=rng.uniform(1.4, 2.0, n) * r, b=rng.uniform(0.25, 0.35, n) * r,
            theta=_angle(nx, ny) + math.pi / 2, h=0.85, tex=0.2, rim=0.2))

    # Type A spermatogonia: few, flattened against the membrane, all stages.
    _, _, x, y, nx, ny = place(0.015, 0.03, 8.0 * r, fill=0.5)
    n = x.shape[0]
    groups.append(nuclei(
        "spermatogonium_a", TEX_FINE, x, y,
        a=rng.uniform(1.1, 1.3, n) * r, b=rng.uniform(0.6, 0.75, n) * r,
        theta=_angle(nx, ny) + math.pi / 2, h=0.55, tex=0.5, rim=0.4, dot=0.3))

    _basal_cohort(groups, tub, t, r, rng, sd, place)
    _pachytene_cohort(groups, tub, t, r, rng, sd, place)
    n_spermatids = _spermatid_cohort(groups, tub, t, r, rng, sd, cp, place)
    _elongated_cohort(groups, tub, t, r, rng, sd, place, n_spermatids)
    return [_individualise(g, rng) for g in groups if len(g)]


def _individualise(g: Nuclei, rng: np.random.Generator) -> Nuclei:
    """Natural variation: no two nuclei exactly the same size or perfectly round."""
    n = len(g)
    f = dict(g.fields)
    f["a"] = f["a"] * rng.uniform(0.93, 1.07, n).astype(np.float32)
    f["b"] = f["b"] * rng.uniform(0.93, 1.07, n).astype(np.float32)
    if not f["taper"].any():  # Spermatid heads keep their smooth outline.
        plain = f["irr"] == 0
        f["irr"] = np.where(plain, rng.uniform(0.02, 0.06, n), f["irr"]).astype(np.float32)
        f["irr_phase"] = np.where(plain, rng.uniform(0, TWO_PI, n),
                                  f["irr_phase"]).astype(np.float32)
    return Nuclei(g.name, g.kind, g.x, g.y, f, g.extent)


def _basal_cohort(groups, tub, t, r, rng, sd, place):
    """Intermediate/B spermatogonia (t < 6), then preleptotene/leptotene/zygotene."""
    phi, dep, x, y, nx, ny = place(0.03, 0.17, 2.3 * r)
    n = x.shape[0]
    tc = t + rng.normal(0, sd, n)
    if t < 6.0:
        # Spermatogonia multiply: the visible fraction grows towards VI.
        frac = np.interp(tc, [0, 1, 3, 5, 6], [0.12, 0.18, 0.3, 0.45, 0.6])
        keep = rng.random(n) < frac
        x, y, nx, ny, tc, dep = x[keep], y[keep], nx[keep], ny[keep], tc[keep], dep[keep]
        n = x.shape[0]
        # Mitoses of intermediate (II-III) and B (VI) spermatogonia.
        p_mit = 0.25 * (smoothstep(tc, 1.0, 1.5) - smoothstep(tc, 2.6, 3.0)) \
            + 0.3 * smoothstep(tc, 5.3, 5.8)
        mit = rng.random(n) < p_mit
        crust = smoothstep(tc, 3.0, 4.5)  # B spermatogonia: heterochromatin on the envelope.
        rad = 0.85 * r
        groups.append(nuclei(
            "spermatogonium", TEX_CLUMPS, x[~mit], y[~mit], a=rad * 1.1, b=rad * 0.9,
            theta=_angle(nx, ny)[~mit] + math.pi / 2, h=0.45, tex=0.6 + 0.4 * crust[~mit],
            rim=0.5 + 0.9 * crust[~mit], halo=-0.05))
        _metaphase(groups, x[mit], y[mit], 0.8 * r, rng)
        return
    # Spermatocytes of the new generation along the meiotic clock m = t - 6 in [0, 6).
    m = np.clip(tc - 6.0, 0.0, 5.999)
    appear = rng.uniform(0.0, 0.9, n)  # Preleptotene appear during VII.
    keep = m >= appear
    m, x, y, nx, ny, dep = m[keep], x[keep], y[keep], nx[keep], ny[keep], dep[keep]
    # They move slightly away from the membrane as they progress.
    lift = np.interp(m, [0, 2, 6], [0.0, 0.02, 0.06]) * tub.thickness()
    x, y = x - nx * lift, y - ny * lift
    rad = pachytene_radius(m) * r
    threads = smoothstep(m, 1.6, 2.6)  # Leptotene threads replace preleptotene granules.
    pre = threads < 0.5
    groups.append(nuclei(
        "preleptotene", TEX_FINE, x[pre], y[pre], a=rad[pre], b=rad[pre] * 0.95,
        theta=rng.uniform(0, TWO_PI, pre.sum()), h=0.62, tex=0.6, rim=0.35, halo=-0.05))
    groups.append(nuclei(
        "leptotene_zygotene", TEX_THREADS_THIN, x[~pre], y[~pre], a=rad[~pre], b=rad[~pre] * 0.95,
        theta=rng.uniform(0, TWO_PI, (~pre).sum()), h=0.3,
        tex=0.8 + 0.5 * smoothstep(m[~pre], 3.5, 6.0), rim=0.3, halo=-0.06))


def _metaphase(groups, x, y, size, rng, pale_halo=0.12):
    """Metaphase plates: dense, ragged chromosome bars in a clear spindle area."""
    n = len(x)
    if n == 0:
        return
    groups.append(nuclei(
        "metaphase", TEX_CLUMPS, x, y,
        a=size * rng.uniform(1.1, 1.4, n), b=size * rng.uniform(0.28, 0.4, n),
        theta=rng.uniform(0, TWO_PI, n), h=1.3, tex=1.2, irr=0.25,
        irr_phase=rng.uniform(0, TWO_PI, n), halo=-pale_halo, extent=1.5))


def _pachytene_cohort(groups, tub, t, r, rng, sd, place):
    """Pachytene (I-X) growing, diplotene (XI), meiotic divisions (XII); clock m = t + 6."""
    older = t >= 6.0  # VII-XII: this generation sits above the new basal one.
    d0, d1 = (0.15, 0.34) if older else (0.05, 0.27)
    phi, dep, x, y, nx, ny = place(d0, d1, 2.9 * r)
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
    groups.append(nuclei(
        "pachytene", TEX_THREADS_THICK, x[thread], y[thread], a=rad[thread], b=rad[thread] * 0.95,
        theta=rng.uniform(0, TWO_PI, thread.sum()),
        h=0.55 + 0.2 * smoothstep(m[thread], 6.0, 12.0), tex=1.3, rim=0.25, halo=-0.1,
        extent=1.4))
    clump = late & (diplo >= 0.5)
    groups.append(nuclei(
        "diplotene", TEX_CLUMPS, x[clump], y[clump], a=rad[clump], b=rad[clump] * 0.95,
        theta=rng.uniform(0, TWO_PI, clump.sum()), h=0.2, tex=1.5, rim=0.2, halo=-0.1))
    _metaphase(groups, x[state == 1], y[state == 1], 1.0 * r, rng)
    # Secondary spermatocytes: two smaller nuclei where one spermatocyte divided.
    sec = state == 2
    ang = rng.uniform(0, TWO_PI, sec.sum())
    off = 1.05 * r
    xs = np.concatenate([x[sec] + off * np.cos(ang), x[sec] - off * np.cos(ang)])
    ys = np.concatenate([y[sec] + off * np.sin(ang), y[sec] - off * np.sin(ang)])
    groups.append(nuclei(
        "secondary_spermatocyte", TEX_FINE, xs, ys,
        a=0.9 * r, b=0.85 * r, theta=rng.uniform(0, TWO_PI, xs.shape[0]),
        h=0.6, tex=0.8, rim=0.4, dot=0.4, halo=-0.05))
    # Tetrads of new spermatids (look like step 1 round spermatids), drifting to the lumen.
    new = state == 3
    k = int(new.sum())
    ang = rng.uniform(0, TWO_PI, k)[:, None] + np.arange(4) * (TWO_PI / 4)
    drift = (1.0 + 2.0 * np.clip(m[new] - div_time[new] - 0.25, 0, None))[:, None] * r
    xs = (x[new, None] + 1.1 * r * np.cos(ang) - nx[new, None] * drift).ravel()
    ys = (y[new, None] + 1.1 * r * np.sin(ang) - ny[new, None] * drift).ravel()
    groups.append(nuclei(
        "early_spermatid", TEX_FINE, xs, ys, a=0.88 * r, b=0.84 * r,
        theta=rng.uniform(0, TWO_PI, 4 * k), h=0.3, tex=0.3, rim=0.3, dot=0.7, dot_r=0.3,
        halo=-0.08, extent=1.4))


def _spermatid_cohort(groups, tub, t, r, rng, sd, cp, place) -> int:
    """Round spermatids with the PAS acrosome (I-VIII) or elongating ones (IX-XII)."""
    phi, dep, x, y, nx, ny = place(0.29, 0.9, 2.25 * r)
    n = x.shape[0]
    if t < 8.0:
        tc = np.clip(t + rng.normal(0, sd, n), 0.0, 7.999)
        rad = np.interp(tc, [0, 8], [0.92, 1.05]) * r
        # Acrosome: direction random until VII, then turning to face the membrane (VIII).
        rnd = rng.uniform(0, TWO_PI, n)
        face = smoothstep(tc, 6.9, 7.6)
        cdx, cdy = _mix_dirs(np.cos(rnd), np.sin(rnd), nx, ny, face)
        half = np.radians(cap_halfwidth_deg(tc) * np.exp(rng.normal(0, 0.15, n)))
        has_cap = half > 0
        groups.append(nuclei(
            "round_spermatid", TEX_FINE, x, y, a=rad, b=rad * rng.uniform(0.92, 1.0, n),
            theta=rng.uniform(0, TWO_PI, n), h=0.3, tex=0.4, rim=0.18, dot=0.8, dot_r=0.3,
            cap=np.where(has_cap, 0.9, 0.0) * cp.acrosome_contrast, cap_dx=cdx, cap_dy=cdy,
            cap_cos=np.where(has_cap, np.cos(half), 1.0),
            gran=smoothstep(tc, 0.6, 1.2) * 1.6 * cp.acrosome_contrast,
            gran_r=granule_radius(tc), halo=-0.06, extent=1.45))
        return n
    # Elongating spermatids, steps 9-12: longer, thinner, darker; gathering in bundles.
    tc = np.clip(t + rng.normal(0, sd, n), 8.0, 11.999)
    e = 1.0 - (1.0 - (tc - 8.0) / 4.0) ** 2  # Shape changes fastest in IX-X.
    keep = rng.random(n) < 0.9  # A few are lost (out of the section plane).
    bundled = smoothstep(t, 9.3, 11.5) * 0.75
    bdepth = np.interp(t, [8.0, 12.0], [0.62, 0.52])
    _bundled_heads(groups, "elongating_spermatid", tub, rng, phi[keep], dep[keep], e[keep], r,
                   bundled, bdepth)
    return n


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
    theta = _angle(nx, ny) + rng.normal(0, 0.35 * (1 - bundled) + 0.12, n)
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
    groups.append(nuclei(
        name, TEX_FINE, x, y, a=a, b=b, theta=theta, taper=0.45 * e, bend=0.25 * e,
        h=0.3 + 1.0 * e, tex=0.4 * (1 - e) + 0.1, rim=0.5 * (1 - e), dot=0.6 * (1 - e),
        cap=0.7 * (1 - 0.7 * e), cap_dx=np.cos(theta), cap_dy=np.sin(theta),
        cap_cos=np.cos(np.radians(80.0 - 30.0 * e)), halo=-0.03, extent=1.3))


def _elongated_cohort(groups, tub, t, r, rng, sd, place, n_spermatids):
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
    _bundled_heads(groups, "elongated_spermatid", tub, rng, phi[present], dep[present],
                   e[present], r, bundled,
                   bdepth, released=released[present])
    # Residual bodies: PAS-positive cytoplasm shed at spermiation, near the lumen (VIII-IX).
    amount = float(smoothstep(t, 7.2, 7.8) * (1 - smoothstep(t, 8.4, 9.0)))
    k = int(amount * 0.35 * n_spermatids)
    if k:
        phi_r = rng.uniform(0, TWO_PI, k)
        x, y, _, _ = tub.point(phi_r, rng.uniform(0.82, 0.97, k))
        groups.append(nuclei(
            "residual_body", TEX_CLUMPS, x, y,
            a=rng.uniform(0.35, 0.7, k) * r, b=rng.uniform(0.3, 0.6, k) * r,
            theta=phi_r, h=0.15, tex=0.5, pas=0.45, rim=0.1))


def interstitial_nuclei(x, y, r, rng: np.random.Generator) -> list[Nuclei]:
    """Leydig cells (round nuclei in pink cytoplasm) and flat fibroblast nuclei."""
    n = x.shape[0]
    leydig = rng.random(n) < 0.6
    k = leydig.sum()
    out = [nuclei("leydig", TEX_FINE, x[leydig], y[leydig], a=rng.uniform(0.8, 1.0, k) * r,
                  b=rng.uniform(0.7, 0.9, k) * r, theta=rng.uniform(0, TWO_PI, k), h=0.55,
                  tex=0.6, rim=0.4, dot=0.5, halo=0.3, extent=1.9)]
    k = n - k
    out.append(nuclei("fibroblast", TEX_FINE, x[~leydig], y[~leydig],
                      a=rng.uniform(1.2, 1.8, k) * r, b=rng.uniform(0.25, 0.4, k) * r,
                      theta=rng.uniform(0, TWO_PI, k), h=0.8, tex=0.3))
    return out
