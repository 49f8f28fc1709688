"""Simulator: dataset layout, determinism, label frequencies, colour, the hand cut and
the image scale (tests/test_simulate_cli.py: the command line; tests/test_stage_biology.py:
the stage biology)."""

import json

import numpy as np
import pytest
from PIL import Image

from stagejax import simulate
from stagejax.errors import ConfigError
from stagejax.simulate import (
    cache,
    scene,
    section,
    sheet,
    tubule_draw,
    tubules,
)
from stagejax.stages import NUM_STAGES, stage_frequencies
from tests.conftest import tree_bytes

# Cheap rendering for layout tests: appearance does not matter there.
FAST = simulate.SceneParams(min_render_size=64)


def _stage_of(file_name: str) -> str:
    return file_name[file_name.rindex("_") + 1 : file_name.rindex("-")]


def _read_layout(root):
    labels = (root / "label_list.txt").read_text().split()
    splits = {s: (root / "split_list" / f"{s}.txt").read_text().split() for s in tubules.SPLITS}
    return labels, splits


@pytest.mark.parametrize("split_by", ["slide", "random"])
def test_plan_layout(split_by):
    items = tubules.plan(300, seed=3, num_slides=8, split_by=split_by)
    names = [p.file_name for p in items]
    assert len(set(names)) == 300
    for p in items:
        assert _stage_of(p.file_name) == tubules.LABEL_NAMES[p.label]
        assert p.file_name.startswith(f"slide{p.slide:02d}_")
    counts = {s: sum(p.split == s for p in items) for s in tubules.SPLITS}
    assert counts == {"train": 210, "validation": 45, "test": 45}
    train_stages = {p.label for p in items if p.split == "train"}
    assert train_stages == set(range(NUM_STAGES))
    slides = {s: {p.slide for p in items if p.split == s} for s in tubules.SPLITS}
    if split_by == "slide":
        assert not slides["train"] & slides["validation"]
        assert not slides["train"] & slides["test"]
        assert not slides["validation"] & slides["test"]
    else:
        assert len(slides["train"]) == 8


@pytest.mark.parametrize("seed", range(5))
def test_train_has_every_stage_even_when_tiny(seed):
    items = tubules.plan(tubules.min_num_images(), seed=seed)
    assert {p.label for p in items if p.split == "train"} == set(range(NUM_STAGES))


def test_labels_follow_stage_durations():
    labels = tubules.sample_labels(600, seed=0)
    counts = np.bincount(labels, minlength=NUM_STAGES)
    expected = stage_frequencies() * labels.size
    # Pearson chi-square, 11 degrees of freedom: 31.3 is the 0.1% critical value.
    assert ((counts - expected) ** 2 / expected).sum() < 31.3
    assert counts.argmin() == 2  # III, the shortest stage, is the rarest
    # A uniform draw would fail the same test: the check has power.
    uniform = np.full(NUM_STAGES, labels.size / NUM_STAGES)
    assert ((uniform - expected) ** 2 / expected).sum() > 31.3
    np.testing.assert_array_equal(labels, tubules.sample_labels(600, seed=0))


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="num_images"):
        tubules.plan(tubules.min_num_images() - 1, seed=0)
    with pytest.raises(ConfigError, match="split_by"):
        tubules.plan(100, seed=0, split_by="mouse")
    with pytest.raises(ConfigError, match="num_slides"):
        tubules.plan(100, seed=0, num_slides=2, split_by="slide")
    with pytest.raises(ConfigError, match="image_size"):
        tubules.generate(tmp_path / "x", 24, 8, seed=0, params=FAST, num_workers=1)
    assert not any(tmp_path.iterdir())  # refused before anything was written
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    before = tree_bytes(tmp_path)
    with pytest.raises(ConfigError, match="not empty"):
        tubules.generate(tmp_path / "full", 24, 32, seed=0, params=FAST, num_workers=1)
    assert tree_bytes(tmp_path) == before


def test_generate_layout_determinism_and_seeds(tmp_path):
    a = simulate.generate(tmp_path / "a", 24, 40, seed=1, params=FAST, num_workers=1)
    labels, splits = _read_layout(a)
    assert labels == [str(i) for i in range(1, 13)]
    files = sorted(p.name for p in (a / "images").iterdir())
    listed = [n for s in tubules.SPLITS for n in splits[s]]
    assert sorted(listed) == files and len(set(listed)) == len(listed) == 24
    assert {_stage_of(n) for n in splits["train"]} == set(labels)
    img = np.asarray(Image.open(a / "images" / files[0]))
    assert img.shape == (40, 40, 3) and img.dtype == np.uint8
    meta = json.loads((a / "SIMULATED.json").read_text())
    assert meta["simulated"] is True and meta["seed"] == 1

    # Same seed: identical bytes, also when rendered by 2 worker processes, and an
    # existing empty folder is a valid --out.
    (tmp_path / "b").mkdir()
    b = simulate.generate(tmp_path / "b", 24, 40, seed=1, params=FAST, num_workers=2)
    for name in files:
        assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes()
    assert _read_layout(a) == _read_layout(b)

    c = simulate.generate(tmp_path / "c", 24, 40, seed=2, params=FAST, num_workers=1)
    files_c = sorted(p.name for p in (c / "images").iterdir())
    assert files_c != files
    first_a = np.asarray(Image.open(a / "images" / files[0]), np.float32)
    first_c = np.asarray(Image.open(c / "images" / files_c[0]), np.float32)
    assert np.abs(first_a - first_c).mean() > 5.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp dirs


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("cached", [False, True])
def test_failed_render_leaves_no_partial_dataset(tmp_path, monkeypatch, exc, cached):
    render_and_save = tubules._render_and_save
    done = []

    def fail_on_the_third(job):
        if len(done) == 2:
            raise exc("injected")
        done.append(render_and_save(job))
        return done[-1]

    monkeypatch.setattr(tubules, "_render_and_save", fail_on_the_third)
    with pytest.raises(exc, match="injected"):
        if cached:
            simulate.default_dataset(tmp_path, 24, 32, seed=0, params=FAST, num_workers=1)
        else:
            simulate.generate(tmp_path / "out", 24, 32, seed=0, params=FAST, num_workers=1)
    assert len(done) == 2  # it failed mid-way, with images already rendered
    assert list(tmp_path.iterdir()) == []  # neither a dataset nor its temp folder


def _mean_rgb(stain_shift: float, size: int = 96) -> np.ndarray:
    images = simulate.render_stage_examples(size, seed=4, stain_shift=stain_shift)
    return np.stack(images).reshape(-1, 3).astype(np.float64).mean(0)


def test_images_look_like_hpas_and_stain_shift_moves_colour():
    base = _mean_rgb(0.0)
    r, g, b = base
    # Pink/magenta overall (PAS, cytoplasm), light background: R and B above G.
    assert r > g + 10 and b > g + 10, base
    assert 120 < base.mean() < 240, base
    shifted = _mean_rgb(1.0)
    # Positive shift: bluer, stronger hematoxylin and weaker PAS -> B - R grows.
    assert (shifted[2] - shifted[0]) - (b - r) > 3.0, (base, shifted)
    assert np.abs(shifted - base).max() > 4.0


def test_stain_shift_moves_slide_distribution():
    params = simulate.SceneParams()
    s0 = tubules.slide_stains(20, seed=0, stain_shift=0.0, params=params)
    s1 = tubules.slide_stains(20, seed=0, stain_shift=1.0, params=params)
    h0 = np.mean([s.h_scale for s in s0])
    h1 = np.mean([s.h_scale for s in s1])
    assert h1 > 1.2 * h0
    assert np.mean([s.p_scale for s in s1]) < 0.85 * np.mean([s.p_scale for s in s0])


def test_default_dataset_is_cached_atomically(tmp_path, monkeypatch):
    root = simulate.default_dataset(tmp_path, 20, 32, seed=0, params=FAST, num_workers=1)
    assert (root / "SIMULATED.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temp dirs left
    before = {p.name: p.stat().st_mtime_ns for p in (root / "images").iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("should reuse the cache")

    monkeypatch.setattr(tubules, "write_dataset", fail)
    again = simulate.default_dataset(tmp_path, 20, 32, seed=0, params=FAST, num_workers=1)
    assert again == root
    assert {p.name: p.stat().st_mtime_ns for p in (root / "images").iterdir()} == before
    # Different arguments get a different cache entry.
    with pytest.raises(AssertionError, match="reuse"):
        simulate.default_dataset(tmp_path, 20, 32, seed=1, params=FAST, num_workers=1)


def test_contact_sheet(tmp_path):
    path = sheet.contact_sheet(tmp_path / "s.png", render_size=64, tile=32, columns=7)
    with Image.open(path) as im:  # 12 stages in 7 columns: 2 rows of (overview, detail)
        assert im.size == (7 * 40 + 8, 4 * (32 + 8 + 26) + 8)
    with pytest.raises(ConfigError, match="reference"):
        sheet.contact_sheet(
            tmp_path / "t.png", reference=tmp_path / "missing.png", render_size=64, tile=32
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]


# --- hand cut and scale ----------------------------------------------------------------


def _cut_render(monkeypatch, seed: int, size: int = 64, **params):
    """A stage-I image and what it was cut with: its tubule, render size, outline."""
    seen = {}
    outline = scene.hand_outline

    def spy(tub, rs, rng, traced):
        seen.update(tub=tub, rs=rs, traced=traced, poly=outline(tub, rs, rng, traced))
        return seen["poly"]

    p = simulate.SceneParams(min_render_size=128, **params)
    stain = tubules.slide_stains(1, seed, 0.0, p)[0]
    with monkeypatch.context() as m:
        m.setattr(scene, "hand_outline", spy)
        return scene.render_image(0, stain, size, tubules.image_seed(seed, 0), p), seen


def _inside_and_distance(poly: np.ndarray, size: int, k: int):
    """Per output pixel: centre inside ``poly`` (ray casting), distance to it (render px)."""
    c = np.arange(size) * k + (k - 1) / 2
    px, py = (v.reshape(-1, 1) for v in np.meshgrid(c, c))
    a, b = poly, np.roll(poly, -1, axis=0)
    spans = (a[:, 1] > py) != (b[:, 1] > py)
    dy = np.where(b[:, 1] == a[:, 1], 1.0, b[:, 1] - a[:, 1])
    x_at = a[:, 0] + (py - a[:, 1]) * (b[:, 0] - a[:, 0]) / dy
    inside = (spans & (px < x_at)).sum(1) % 2 == 1
    d = b - a
    t = np.clip(((px - a[:, 0]) * d[:, 0] + (py - a[:, 1]) * d[:, 1]) / (d**2).sum(1), 0, 1)
    dist = np.hypot(px - a[:, 0] - t * d[:, 0], py - a[:, 1] - t * d[:, 1]).min(1)
    return inside.reshape(size, size), dist.reshape(size, size)


@pytest.mark.parametrize("seed,traced", [(0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0)])
def test_hand_cut_whites_out_everything_outside_the_outline(monkeypatch, seed, traced):
    size = 64
    img, seen = _cut_render(monkeypatch, seed, size, traced_fraction=traced)
    tub, rs, poly = seen["tub"], seen["rs"], seen["poly"]
    k = rs // size
    assert 20 <= len(poly) <= 40 and seen["traced"] == bool(traced)
    rho, _ = tubule_draw.rho_phi(tub, poly[:, 0], poly[:, 1])
    out = (rho - 1) * tub.mean_radius / rs
    if traced:  # Along the basement membrane (rho = 1), as a detector's outline.
        assert np.abs(out).max() < 0.012 and abs(out.mean()) < 0.003, out
    else:  # A hand-drawn polygon a few um outside it, as the study cut its images.
        assert out.min() > -0.01 and out.max() < 0.06 and 0.005 < out.mean() < 0.04, out
    inside, dist = _inside_and_distance(poly, size, k)
    white = (img == 255).all(-1)
    outside = ~inside & (dist > k)  # One output pixel from the edge: no rounding doubt.
    assert outside.mean() > 0.2 and (img[outside] == 255).all()
    assert white[inside & (dist > k)].mean() < 0.02  # The tubule is not cut away.
    border = np.concatenate([white[0], white[-1], white[:, 0], white[:, -1]])
    assert border.mean() > 0.5, border.mean()
    cx, cy = (int(round((v - (k - 1) / 2) / k)) for v in (tub.cx, tub.cy))
    assert not white[cy - 1 : cy + 2, cx - 1 : cx + 2].any()


def test_hand_cut_only_adds_white_and_is_deterministic(monkeypatch):
    cut, _ = _cut_render(monkeypatch, 5)
    again, _ = _cut_render(monkeypatch, 5)
    uncut, seen = _cut_render(monkeypatch, 5, hand_cut=False)
    assert seen == {}  # No outline drawn: the rng stream of an uncut image is untouched.
    assert np.array_equal(cut, again)
    changed = (cut != uncut).any(-1)
    assert changed.mean() > 0.1 and (cut[changed] == 255).all()
    other, _ = _cut_render(monkeypatch, 6)
    assert not np.array_equal((other == 255).all(-1), (cut == 255).all(-1))


def test_half_the_images_are_cut_along_the_membrane(monkeypatch):
    """SceneParams.traced_fraction: section mode cuts along the detected outline, so the
    simulated images are cut that way as often as the study's loose way."""
    traced = [_cut_render(monkeypatch, seed, 32)[1]["traced"] for seed in range(40)]
    assert 10 <= sum(traced) <= 30, sum(traced)


def test_outline_mask_is_sharp_and_clipped_by_the_border():
    square = np.array([[1.5, 1.5], [5.5, 1.5], [5.5, 4.5], [1.5, 4.5]])
    mask = scene.outline_mask(square, 8)
    expected = np.zeros((8, 8), bool)
    expected[2:5, 2:6] = True
    assert np.array_equal(mask, expected)
    # At 2x reduction, output pixel i sits at render px 2i + 0.5; a polygon past the border.
    big = np.array([[-10.0, -10.0], [8.0, -10.0], [8.0, 30.0], [-10.0, 30.0]])
    mask = scene.outline_mask(big, 8, k=2)
    assert mask[:, :4].all() and not mask[:, 4:].any()


def test_hand_cut_has_its_own_cache_entry():
    spec = tubules.Spec(24, 32, 0)
    uncut = tubules.Spec(24, 32, 0, params=simulate.SceneParams(hand_cut=False))
    assert cache.cache_key(spec) == f"sim-v{tubules.GENERATOR_VERSION}-n24-s32-seed0"
    assert cache.cache_key(uncut) != cache.cache_key(spec)
    assert tubules.GENERATOR_VERSION >= 2  # Uncut datasets of version 1 are stale.


def test_image_mpp_from_tubule_anatomy():
    assert simulate.image_mpp(1152) == pytest.approx(0.217, abs=5e-4)
    assert simulate.image_mpp(288) == pytest.approx(4 * simulate.image_mpp(1152))
    assert section.DEFAULT_MPP == pytest.approx(simulate.image_mpp(1152))
    wide = simulate.SceneParams(tubule_radius=(0.5, 0.5))
    assert tubules.image_mpp(200, wide) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="image_size"):
        tubules.image_mpp(0)
