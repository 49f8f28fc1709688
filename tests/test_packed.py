"""SIMULATED packed sections for the detector (stagejax.simulate.packed) and the U-Net's
stain normalisation and coarse-image handling (stagejax.detect.learned)."""

import numpy as np
import pytest
from scipy import ndimage
from skimage import filters

from stagejax.detect import learned, segment
from stagejax.simulate import packed, packed_paint

SIZE = (1.2, 1.0)  # mm: small, the logic is the same


@pytest.fixture(scope="module")
def sections():
    return [packed.render_packed(seed, SIZE) for seed in range(4)]


def test_same_seed_same_pixels_and_truth(sections):
    again = packed.render_packed(0, SIZE)
    assert np.array_equal(again.rgb, sections[0].rgb)
    assert np.array_equal(again.labels, sections[0].labels)
    assert again.look == sections[0].look
    assert not np.array_equal(sections[1].rgb, sections[0].rgb)


def test_truth_is_consecutive_connected_instances_on_darker_pixels(sections):
    for sec in sections:
        n = int(sec.labels.max())
        assert n >= 5
        assert set(np.unique(sec.labels)) == set(range(n + 1))
        od = segment.optical_density(sec.rgb).mean(-1)
        edges = (od[:3], od[-3:], od[:, :3], od[:, -3:])
        frame = np.concatenate([e.ravel() for e in edges])
        glass = np.median(frame)  # the section is an oval inside the frame: its edge is glass
        tubule_od = []
        for i in range(1, n + 1):
            own = sec.labels == i
            assert ndimage.label(own)[1] == 1
            tubule_od.append(od[own].mean())
        # Painted from the same labels: every tubule darker than glass, even a pale one.
        assert min(tubule_od) > glass + 0.005 and np.median(tubule_od) > glass + 0.02


def test_looks_are_randomised_per_section(sections):
    looks = [s.look for s in sections] + [packed.render_packed(s, SIZE).look for s in (4, 5)]
    for key in ("h_od", "e_od", "cleft_um", "scan_mpp", "radius_um"):
        assert len({round(lk[key], 6) for lk in looks}) == len(looks), key


def test_thin_clefts_give_touching_tubules_and_bands_lie_along_the_tunica():
    rng = np.random.default_rng(0)
    look = dict(packed.sample_look(rng), cleft_um=0.3, wobble_um=0.5, band_level=-3.0, fill=1.3)
    sec = _render_with(look)
    # Touching: some pixel of one tubule has a 4-neighbour of another.
    lab = sec.labels
    pairs = (lab[:, 1:] != lab[:, :-1]) & (lab[:, 1:] > 0) & (lab[:, :-1] > 0)
    assert pairs.sum() > 20
    # Bands: with bands everywhere, some instances are long and thin.
    aspects = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        ys, xs = np.nonzero(lab[sl] == i)
        ev = np.linalg.eigvalsh(np.cov(np.stack([xs, ys])))
        aspects.append(np.sqrt(ev[1] / max(ev[0], 1e-6)))
    assert max(aspects) > 2.5


def test_fill_makes_tubules_round_with_interstitial_corners_or_packed():
    from skimage import measure

    base = dict(packed.sample_look(np.random.default_rng(1)), cleft_um=0.5, space_fraction=0.0)
    round_, tight = (_render_with(dict(base, fill=f)) for f in (0.95, 1.3))
    assert (round_.labels > 0).mean() < 0.9 * (tight.labels > 0).mean()  # gaps at the corners
    solidity = [r.solidity for r in measure.regionprops(round_.labels)]
    assert np.median(solidity) > 0.95  # rounded, convex profiles


def _render_with(look: dict):
    """render_packed with a given look (the anatomy still drawn from seed 7)."""
    original = packed.sample_look
    packed.sample_look = lambda rng: (original(rng), look)[1]
    try:
        return packed.render_packed(7, (1.5, 1.5))
    finally:
        packed.sample_look = original


def test_degrade_keeps_size_and_changes_pixels():
    rgb = (np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)
    look = {"scan_mpp": 6.0, "jpeg": 40}
    out = packed_paint.degrade(rgb, look, 2.5)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).mean() > 10  # coarser and compressed: smoothed


def test_stain_normalisation_makes_pale_and_dark_alike(sections):
    od = segment.optical_density(sections[0].rgb)
    od *= 0.2 / np.percentile(od.mean(-1)[od.mean(-1) > 0.05], 80)  # a mid staining

    def stained(strength):
        return np.clip(255 * 10 ** (-strength * od), 0, 255).round().astype(np.uint8)

    a = segment.optical_density(learned.normalise_stain(stained(0.6))).mean(-1)
    b = segment.optical_density(learned.normalise_stain(stained(1.6))).mean(-1)
    assert abs(np.percentile(a, 90) - np.percentile(b, 90)) < 0.03
    tissue = b > max(filters.threshold_otsu(b), 0.02)  # the tissue as normalise_stain sees it
    assert np.percentile(b[tissue], 80) == pytest.approx(learned.REFERENCE_OD, abs=0.02)
    white = np.full((32, 32, 3), 255, np.uint8)
    assert np.array_equal(learned.normalise_stain(white), white)  # glass alone: unchanged


def test_coarse_images_are_enlarged_to_the_unets_resolution():
    calls = []

    class Probe(learned.UNetDetector):
        def __init__(self):  # no network: record what predict is given
            self.work_mpp, self.normalise, self.post = 2.5, False, learned.Postprocess()

        def predict(self, rgb):
            calls.append(rgb.shape)
            return np.zeros(rgb.shape[:2] + (2,), np.float32)

    sec = packed.render_packed(1, SIZE)
    small = sec.rgb[::2, ::2]  # 5 um/px
    labels, _ = Probe().segment(small, 5.0)
    assert labels.shape == small.shape[:2]
    assert calls and calls[0][0] == pytest.approx(2 * small.shape[0], abs=1)
