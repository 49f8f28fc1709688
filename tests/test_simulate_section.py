"""The whole-section simulator: files, ground truth, determinism, scale, bad arguments."""

import subprocess
import sys

import numpy as np
import pytest
import shapely
from numpy.random import SeedSequence
from PIL import Image
from scipy import ndimage
from skimage.color import hpx_from_rgb, separate_stains

from stagejax import simulate
from stagejax.errors import ConfigError
from stagejax.section.crops import cut_tubule
from stagejax.simulate import scene, section, section_blocks, section_layout
from stagejax.simulate.scene import SceneParams
from stagejax.simulate.section_render import sample_look
from stagejax.slides import open_slide
from stagejax.slides.writer import pyramid_sizes
from stagejax.stages import NUM_STAGES, STAGES, parse_stage, stage_frequencies

SMALL = (1.5, 1.2)  # mm: ~19 tubules; at 1 um/px 1,500 x 1,200 px, rendered in ~2 s.


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("sec") / "s0"
    return section.render_section(out, 0, mpp=1.0, size_mm=SMALL, num_workers=1)


def test_section_reads_back_as_a_pyramid_with_its_pixel_size(small):
    with open_slide(small / "section.tif") as slide:
        assert slide.dimensions == (1500, 1200)
        assert slide.mpp == pytest.approx(1.0)
        sizes = [(lv.width, lv.height) for lv in slide.levels]
        assert sizes == pyramid_sizes(1500, 1200, 512)
        level0 = slide.read_level(0)
    # Tissue in the middle (stained, darker), glass at the corners (near white).
    assert level0[550:650, 700:800].mean() < 200
    assert level0[:20, :20].mean() > 225
    assert (small / "SIMULATED.json").is_file()


def test_ground_truth_tubules_lie_in_the_image_with_stages(small):
    objects = section.read_ground_truth(small)
    assert len(objects) >= 12
    frame = shapely.box(0, 0, 1500, 1200)
    for obj in objects:
        assert frame.contains(obj.geometry)
        assert obj.classification in STAGES
        assert isinstance(obj.properties["stageable"], bool)
        assert obj.properties["stageable"] == (obj.properties["cut"] == "full")
        assert 120 < obj.measurements["Minor axis um"] < 260 or obj.properties["cut"] != "full"
    # Tubules do not overlap.
    union = shapely.unary_union([o.geometry for o in objects])
    assert union.area == pytest.approx(sum(o.geometry.area for o in objects), rel=1e-3)


def test_edge_cut_and_grazing_tubules_are_not_stageable():
    for seed in range(3):
        layout = section_layout.plan_section(seed, SMALL)
        objs = {o.properties["tubule"]: o for o in section.ground_truth(layout, 1.0)}
        edge = [t for t in layout.tubules if t.edge_cut]
        assert edge, f"seed {seed}: no tubule cut by the tissue edge"
        for t in edge:
            # The outline is the visible part, cut at the tissue border.
            assert objs[t.index].geometry.area < np.pi * t.a * t.b * section_layout.MIN_VISIBLE
            assert objs[t.index].properties["stageable"] is False
        assert all(
            objs[t.index].properties["stageable"] is False for t in layout.tubules if t.grazing
        )


def test_stages_follow_the_stage_frequencies_loosely():
    stages = [t.stage for s in range(12) for t in section_layout.plan_section(s, SMALL).tubules]
    freq = np.bincount(stages, minlength=NUM_STAGES) / len(stages)
    assert len(stages) > 150
    assert np.abs(freq - stage_frequencies()).sum() < 0.3


def test_same_seed_same_pixels_whatever_the_tile_size(tmp_path, small):
    a = section.render_section(
        tmp_path / "a",
        0,
        mpp=1.0,
        size_mm=SMALL,
        tile_size=256,
        compression="deflate",
        num_workers=1,
    )
    b = section.render_section(
        tmp_path / "b",
        0,
        mpp=1.0,
        size_mm=SMALL,
        tile_size=512,
        compression="deflate",
        num_workers=2,
    )
    c = section.render_section(
        tmp_path / "c", 1, mpp=1.0, size_mm=SMALL, compression="deflate", num_workers=1
    )
    with open_slide(a / "section.tif") as sa, open_slide(b / "section.tif") as sb:
        pa, pb = sa.read_level(0), sb.read_level(0)
    np.testing.assert_array_equal(pa, pb)
    with open_slide(c / "section.tif") as sc:
        assert np.abs(sc.read_level(0).astype(int) - pa).mean() > 10
    assert (a / "ground_truth.geojson").read_bytes() == (b / "ground_truth.geojson").read_bytes()
    # JPEG output of the same seed matches the lossless one up to compression error.
    with open_slide(small / "section.tif") as s0:
        assert (
            np.abs(s0.read_region(400, 300, 512, 512).astype(int) - pa[300:812, 400:912]).mean() < 8
        )


def test_blocks_join_without_seams(monkeypatch):
    layout = section_layout.plan_section(2, (1.0, 0.8))
    look = sample_look(2, 2.0, 0.0, SceneParams(noise_range=(0.0, 0.0)))
    whole = section_blocks.SectionRenderer(layout, look).region(0, 0, 500, 400)
    monkeypatch.setattr(section_blocks, "BLOCK", 128)
    parts = section_blocks.SectionRenderer(layout, look).region(0, 0, 500, 400)
    assert np.abs(whole.astype(int) - parts).max() <= 2


def test_mpp_changes_resolution_not_anatomy():
    layout = section_layout.plan_section(4, (1.0, 0.8))
    imgs = {}
    for mpp in (1.0, 2.0):
        look = sample_look(4, mpp, 0.0, SceneParams())
        r = section_blocks.SectionRenderer(layout, look)
        imgs[mpp] = r.region(0, 0, r.width, r.height).mean(-1)
        objs = section.ground_truth(layout, mpp)
        axes = [o.measurements["Minor axis um"] for o in objs]
        areas_um2 = [o.geometry.area * mpp**2 for o in objs]
        if mpp == 1.0:
            axes1, areas1 = axes, areas_um2
    assert imgs[1.0].shape == (800, 1000) and imgs[2.0].shape == (400, 500)
    np.testing.assert_allclose(axes, axes1)
    np.testing.assert_allclose(areas_um2, areas1, rtol=0.01)
    # The same anatomy: at 8 um/px the two renders agree.
    a = imgs[1.0].reshape(100, 8, 125, 8).mean((1, 3))
    b = imgs[2.0].reshape(100, 4, 125, 4).mean((1, 3))
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(mpp=0.01), "mpp"),
        (dict(mpp=float("nan")), "mpp"),
        (dict(size_mm=(0.1, 1.0)), "size_mm"),
        (dict(size_mm=(1.0,)), "size_mm"),
        (dict(stain_shift=float("inf")), "stain_shift"),
        (dict(seed=-1), "seed"),
        (dict(mpp=0.1, size_mm=(12, 12)), "mpp"),
    ],
)
def test_bad_arguments_raise_config_errors_naming_them(tmp_path, kwargs, field):
    args = dict(seed=0, mpp=1.0, size_mm=SMALL) | kwargs
    with pytest.raises(ConfigError, match=f"^{field}:"):
        section.render_section(tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()


def test_cli_bad_argument_is_one_error_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stagejax.simulate",
            "section",
            "--out",
            str(tmp_path / "x"),
            "--size_mm",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: size_mm: expected WIDTH,HEIGHT in mm (e.g. 4.4,3.5), got '3'"
    ]


def _sharpness(rgb: np.ndarray) -> float:
    """Mean |Laplacian| of the grey level over the tissue (not the white outside)."""
    grey = rgb.mean(axis=2)
    return float(np.abs(ndimage.laplace(grey))[rgb.min(axis=2) < 235].mean())


def test_a_coarse_section_is_drawn_finer_and_reduced_as_the_tubule_images_are(tmp_path):
    """At the demo's pixel size (112 px tubule images, 2.23 um/px) the tubule simulator
    draws each image 3x finer and box-reduces it; a section at that pixel size is drawn
    the same way, so its tubules are as soft as the images a stage model trained on.
    Drawn at the section's own pixel size they were about 1.8x as sharp (89 against 49)."""
    mpp = simulate.image_mpp(112)
    params = SceneParams()
    assert sample_look(0, mpp, 0.0, params).supersampling == 3  # ceil(256 / 112)
    assert sample_look(0, section.DEFAULT_MPP, 0.0, params).supersampling == 1
    sec = section.render_section(tmp_path / "s", 100, mpp=mpp, size_mm=SMALL, num_workers=1)
    stageable = [o for o in section.read_ground_truth(sec) if o.properties["stageable"]]
    with open_slide(sec / "section.tif") as slide:
        crops = [cut_tubule(slide, o.geometry, mpp, 112) for o in stageable]
    data = simulate.generate(tmp_path / "t", num_images=36, image_size=112, seed=0)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(data.rglob("*.png"))]
    ratio = np.median([_sharpness(c) for c in crops]) / np.median([_sharpness(i) for i in images])
    assert len(crops) >= 5 and 0.75 < ratio < 1.33, (len(crops), ratio)
    # One drawing for both (simulate.tubule_draw): with the section's own stain, tubule
    # images of the same stages carry the same hematoxylin, PAS and grey level.
    stain = sample_look(100, mpp, 0.0, params).stain
    same = [
        scene.render_image(parse_stage(o.classification), stain, 112, SeedSequence([7, i]), params)
        for i, o in enumerate(stageable)
    ]
    sec_h, sec_p, sec_grey = _densities(crops)
    img_h, img_p, img_grey = _densities(same)
    assert abs(sec_h / img_h - 1) < 0.15 and abs(sec_p / img_p - 1) < 0.15, (
        sec_h,
        img_h,
        sec_p,
        img_p,
    )
    assert abs(sec_grey - img_grey) < 6, (sec_grey, img_grey)


def _densities(rgbs: list[np.ndarray]) -> tuple[float, float, float]:
    """Medians over images of the median hematoxylin and PAS optical density (scikit-image's
    H-PAS space) and grey level over the tissue."""
    rows = []
    for rgb in rgbs:
        tissue = rgb.min(axis=2) < 235
        od = separate_stains(rgb, hpx_from_rgb)[tissue]
        rows.append((np.median(od[:, 0]), np.median(od[:, 1]), np.median(rgb.mean(2)[tissue])))
    return tuple(float(v) for v in np.median(rows, axis=0))
