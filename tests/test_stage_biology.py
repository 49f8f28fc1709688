"""The simulator's stage biology, without rendering: acrosomes, spermatid generations,
spermiation, meiosis, which phases look alike, nuclei at the border."""

import numpy as np
import pytest

from stagejax import simulate
from stagejax.simulate import (
    cells,
    epithelium,
    render,
    scene,
    spermatids,
    tubules,
)
from stagejax.stages import NUM_STAGES

# Cheap rendering for layout tests: appearance does not matter there.
# --- stage biology (no rendering) ------------------------------------------------------


def _tubule(lumen=0.15):
    return cells.Tubule(
        cx=500.0,
        cy=500.0,
        ra=420.0,
        rb=380.0,
        theta=0.3,
        lumen=lumen,
        lumen_amp=np.zeros(3),
        lumen_phase=np.zeros(3),
    )


def _counts(t, seed=0):
    groups = epithelium.tubule_nuclei(_tubule(), t, 15.0, np.random.default_rng(seed))
    out: dict[str, int] = {}
    for g in groups:
        out[g.name] = out.get(g.name, 0) + len(g)
    return out, {g.name: g for g in groups}


def test_acrosome_grows_from_granule_to_cap():
    t = np.linspace(0.0, 7.99, 200)
    cap = spermatids.cap_halfwidth_deg(t)
    assert np.all(np.diff(cap) >= 0)
    assert cap[t < 3.0].max() == 0.0  # I-III: granule only
    assert 5 < spermatids.cap_halfwidth_deg(4.5) <= 20  # V: up to ~40 degrees in total
    assert spermatids.cap_halfwidth_deg(7.5) > 60  # VIII: > 120 degrees
    assert spermatids.granule_radius(0.2) == 0 and spermatids.granule_radius(2.0) > 0.1


def test_spermatid_generations_follow_the_cycle():
    for stage in range(NUM_STAGES):
        counts, groups = _counts(stage + 0.5)
        round_ = counts.get("round_spermatid", 0)
        elongating = counts.get("elongating_spermatid", 0)
        if stage < 8:  # I-VIII: round spermatids (+ elongated of the previous cycle)
            assert round_ > 100 and elongating == 0, (stage, counts)
        else:  # IX-XII: no round spermatids, one generation of elongating ones
            assert round_ == 0 and elongating > 50, (stage, counts)
    # Elongating heads get longer relative to width and darker from IX to XII.
    g9, g12 = _counts(8.5)[1]["elongating_spermatid"], _counts(11.5)[1]["elongating_spermatid"]
    ratio = lambda g: np.median(g.fields["a"] / g.fields["b"])
    assert ratio(g12) > 1.8 * ratio(g9)
    assert np.median(g12.fields["h"]) > np.median(g9.fields["h"]) + 0.4


def test_spermiation_moves_heads_into_the_lumen():
    tub = _tubule()

    def lumen_fraction(t):
        g = _counts(t, seed=1)[1]["elongated_spermatid"]
        c, s = np.cos(tub.theta), np.sin(tub.theta)
        dx, dy = g.x - tub.cx, g.y - tub.cy
        rho = np.hypot((dx * c + dy * s) / tub.ra, (dy * c - dx * s) / tub.rb)
        return np.mean(rho < tub.lumen * 1.05), np.median(rho)

    frac_iii, rho_iii = lumen_fraction(2.5)
    frac_vii, rho_vii = lumen_fraction(6.5)
    frac_viii, _ = lumen_fraction(7.9)
    assert frac_iii == 0 and frac_vii < 0.1 and frac_viii > 0.5
    assert rho_vii < rho_iii - 0.1  # bundles moved from deep to the lumen
    assert "elongated_spermatid" not in _counts(10.5)[1]  # gone after IX


def test_meiosis_and_spermatocyte_sizes():
    assert "metaphase" in _counts(11.6)[1]
    assert "metaphase" not in _counts(6.5)[1]
    assert "preleptotene" in _counts(6.7)[1] and "preleptotene" not in _counts(3.5)[1]
    sizes = epithelium.pachytene_radius(np.array([3.0, 8.0, 12.0, 16.0]))  # lepto -> pachy
    assert np.all(np.diff(sizes) > 0)


def test_neighbouring_phases_look_alike_more_than_distant_ones():
    """Continuity, cyclic included: XII (t=11.9) is closer to I (t=0.1) than to VI."""
    size = 128
    params = simulate.SceneParams(min_render_size=size, noise_range=(0.0, 0.0))
    stain = tubules.slide_stains(1, seed=0, stain_shift=0.0, params=params)[0]
    yy, xx = np.mgrid[:size, :size] + 0.5 - size / 2
    ring = np.minimum(np.hypot(yy, xx) / (size / 2) * 10, 10).astype(int)

    def profile(t, seed):
        # Same seed -> same tubule geometry; mean colour in rings around the centre
        # summarises the layers independently of where single nuclei fall.
        img = scene.render_image_at_phase(t, stain, size, np.random.SeedSequence(seed), params)
        return np.stack([img[ring == k].mean(0) for k in range(10)])

    dist = {t: 0.0 for t in (0.1, 11.0, 5.5)}
    for seed in range(4):
        xii = profile(11.9, seed)
        for t in dist:
            dist[t] += np.abs(profile(t, seed) - xii).mean() / 4
    assert dist[0.1] < 0.8 * dist[5.5], dist
    assert dist[11.0] < 0.8 * dist[5.5], dist


def test_nuclei_at_the_border_are_clipped_not_wrapped():
    tiles = np.zeros((4, render.TILE, render.TILE), np.float32)
    size, r = 64, 6.0

    def splat(x, y):
        g = cells.nuclei("test", cells.TEX_FINE, np.array([x]), np.array([y]), a=r, b=r, h=1.0)
        return render.splat_nuclei([g], size, tiles)[0]

    inside, edge = splat(32.0, 32.0), splat(-2.0, 0.5)
    assert inside.sum() == pytest.approx(np.pi * r * r, rel=0.1)
    assert 0 < edge.sum() < 0.35 * inside.sum()  # about a quarter is in the frame
    assert edge[:, size // 2 :].sum() == 0 and edge[size // 2 :, :].sum() == 0
    assert splat(-3 * r, 10.0).sum() == 0
