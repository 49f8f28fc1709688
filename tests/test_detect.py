"""Tubule detection (stagejax.detect) on small drawn and simulated sections."""

import json

import numpy as np
import pytest
from shapely import affinity
from shapely.geometry import box

from stagejax.detect import DetectParams, detect_slide, evaluate, fit, load_params
from stagejax.slides import (
    SlideObject,
    open_slide,
    read_geojson,
    write_geojson,
    write_pyramidal_tiff,
)
from tests.conftest import DRAWN_MPP, draw_section, run_cli


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """A drawn section as a pyramidal TIFF with its pixel size, and its truth GeoJSON."""
    root = tmp_path_factory.mktemp("drawn")
    rgb, truth = draw_section(np.random.default_rng(0))
    write_pyramidal_tiff(root / "s.tif", rgb, DRAWN_MPP, tile_size=256, compression="deflate")
    write_geojson(root / "truth.geojson", truth)
    return root / "s.tif", root / "truth.geojson", truth


def test_detection_finds_the_drawn_tubules(drawn):
    path, _, truth = drawn
    with open_slide(path) as slide:
        found = detect_slide(slide, DetectParams()).objects
    scores = evaluate(found, truth)["all"]
    assert len(truth) >= 15
    assert scores["f1"] >= 0.9, scores
    assert scores["mean_iou"] >= 0.8, scores


def test_cli_writes_qupath_geojson_and_overlay(drawn, tmp_path):
    path, _, truth = drawn
    out = tmp_path / "out"
    proc = run_cli("stagejax.detect", "--slide", str(path), "--out", str(out), "--method=classical")
    assert proc.returncode == 0, proc.stderr
    raw = json.loads((out / "tubules.geojson").read_text())
    assert raw["type"] == "FeatureCollection"
    feature = raw["features"][0]
    assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
    assert feature["properties"]["objectType"] == "detection"
    assert feature["properties"]["classification"]["name"] == "Tubule"
    objects = read_geojson(out / "tubules.geojson")  # the reader QuPath-style files go through
    assert len(objects) == len(raw["features"])
    assert all(o.object_type == "detection" for o in objects)
    assert evaluate(objects, truth)["all"]["f1"] >= 0.9  # level-0 px, not coarse px
    assert (out / "detections.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _obj(geom, stageable=True):
    return SlideObject(geometry=geom, properties={"stageable": stageable})


def test_metrics_on_hand_made_cases():
    truth = [_obj(box(0, 0, 10, 10)), _obj(box(20, 0, 30, 10)), _obj(box(40, 0, 50, 10), False)]
    perfect = evaluate(truth, truth)
    assert perfect["all"]["f1"] == 1.0 and perfect["all"]["mean_iou"] == 1.0
    missed = evaluate(truth[:2], truth)
    assert missed["all"]["precision"] == 1.0 and missed["all"]["recall"] == pytest.approx(2 / 3)
    assert missed["stageable"]["recall"] == 1.0 and missed["non_stageable"]["recall"] == 0.0
    # The first tubule split 60/40: the larger part matches (IoU 0.6), the smaller is a FP.
    split = [_obj(box(0, 0, 6, 10)), _obj(box(6, 0, 10, 10))] + truth[1:]
    s = evaluate(split, truth)["all"]
    assert (s["true_positives"], s["precision"], s["recall"]) == (3, 0.75, 1.0)
    assert s["mean_iou"] == pytest.approx((0.6 + 1 + 1) / 3)
    # Split in three: no part reaches IoU 0.5, the tubule is missed.
    thirds = [_obj(box(i * 10 / 3, 0, (i + 1) * 10 / 3, 10)) for i in range(3)] + truth[1:]
    t = evaluate(thirds, truth)["all"]
    assert (t["true_positives"], t["recall"]) == (2, pytest.approx(2 / 3))


def test_train_fits_small_tubules_and_params_file_is_used(tmp_path):
    """Prepubertal-size tubules (60 um across) defeat the adult defaults; the fit recovers."""
    rgb, truth = draw_section(np.random.default_rng(1), radius_um=30.0, size_um=(700, 560))
    write_pyramidal_tiff(tmp_path / "small.tif", rgb, DRAWN_MPP, tile_size=256,
                         compression="deflate")  # fmt: skip
    write_geojson(tmp_path / "small.geojson", truth)
    sections = fit.load_sections([str(tmp_path / "small.tif")], [str(tmp_path / "small.geojson")],
                                 None)  # fmt: skip
    names = ("work_mpp", "smooth_um", "relief_um", "open_um", "seed_distance_um", "seed_radius_um",
             "min_area_um2")  # fmt: skip
    grid = {k: fit.GRID[k] for k in names}
    best, record = fit.fit(sections, DetectParams(), sweeps=2, grid=grid)
    assert record["before"]["f1"] < 0.6
    assert record["after"]["f1"] >= 0.9 > record["before"]["f1"]
    params = tmp_path / "params.json"
    from stagejax.detect import save_params

    save_params(params, best, record)
    assert load_params(params) == best
    out = tmp_path / "out"
    proc = run_cli("stagejax.detect", "--slide", str(tmp_path / "small.tif"), "--out", str(out),
                   "--params", str(params))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert evaluate(read_geojson(out / "tubules.geojson"), truth)["all"]["f1"] >= 0.9


def test_train_cli_never_worsens_f1(drawn, tmp_path):
    path, truth_path, truth = drawn
    params = tmp_path / "p.json"
    proc = run_cli("stagejax.detect", "train", "--method=classical", "--slides", str(path),
                   "--annotations", str(truth_path), "--out", str(params),
                   "--sweeps", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(params.read_text())
    before = doc["fit"]["before"]["f1"]
    assert doc["fit"]["after"]["f1"] >= before
    assert load_params(params) == DetectParams(**doc["params"])
    out = tmp_path / "out"
    proc = run_cli(
        "stagejax.detect", "--slide", str(path), "--out", str(out), "--params", str(params)
    )
    assert proc.returncode == 0, proc.stderr
    f1 = evaluate(read_geojson(out / "tubules.geojson"), truth)["all"]["f1"]
    assert f1 == pytest.approx(doc["fit"]["after"]["f1"]) and f1 >= before


@pytest.mark.parametrize("case", ["garbage", "no_mpp", "absurd_mpp", "no_tissue", "no_tubules",
                                  "unsupported"])  # fmt: skip
def test_bad_input_is_one_line_and_output_untouched(case, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    out.mkdir()
    (out / "tubules.geojson").write_text("previous")
    args = []
    if case == "garbage":
        slide = tmp_path / "s.tif"
        slide.write_bytes(b"II*\x00" + b"\x00" * 64)
    elif case == "unsupported":
        slide = tmp_path / "s.czi"
        slide.write_bytes(b"ZISRAWFILE")
    elif case in ("no_mpp", "absurd_mpp"):
        slide = tmp_path / "s.png"
        Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(slide)
        args = ["--mpp", "100"] if case == "absurd_mpp" else []
    else:
        rgb = np.full((300, 300, 3), 250, np.uint8)
        if case == "no_tubules":  # pale pink tissue without any structure
            yy, xx = np.mgrid[0:300, 0:300]
            rgb[np.hypot(xx - 150, yy - 150) < 120] = (225, 190, 205)
        slide = tmp_path / "s.png"
        Image.fromarray(rgb).save(slide)
        args = ["--mpp", str(DRAWN_MPP)]
    # --overwrite: the existing file may be replaced, yet a failed run must leave it as it was.
    proc = run_cli(
        "stagejax.detect", "--slide", str(slide), "--out", str(out), "--overwrite", *args
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(slide) in lines[0], lines
    want = {"no_tissue": "no tissue", "no_tubules": "no tubules", "no_mpp": "pixel size",
            "absurd_mpp": "pixel size", "unsupported": "unsupported"}  # fmt: skip
    assert want.get(case, "") in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["tubules.geojson"]
    assert (out / "tubules.geojson").read_text() == "previous"


def test_detection_on_a_tiny_simulated_section(tmp_path):
    section = pytest.importorskip("stagejax.simulate.section")
    root = section.render_section(tmp_path / "sec", seed=3, mpp=2.0, size_mm=(1.2, 1.0))
    truth = read_geojson(root / "ground_truth.geojson")
    with open_slide(root / "section.tif") as slide:
        found = detect_slide(slide, DetectParams()).objects
    scores = evaluate(found, truth)
    assert scores["stageable"]["f1"] >= 0.8, scores
    assert scores["all"]["mean_iou"] >= 0.8, scores


def test_existing_outputs_are_replaced_only_when_asked(drawn, tmp_path):
    path, truth_path, _ = drawn
    out = tmp_path / "out"
    out.mkdir()
    (out / "tubules.geojson").write_text("corrected in QuPath")
    proc = run_cli("stagejax.detect", "--slide", str(path), "--out", str(out), "--method=classical")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "tubules.geojson exists" in lines[0] and "--overwrite" in lines[0]
    assert (out / "tubules.geojson").read_text() == "corrected in QuPath"
    proc = run_cli("stagejax.detect", "--slide", str(path), "--out", str(out), "--method=classical",
                   "--overwrite")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert read_geojson(out / "tubules.geojson")
    params = tmp_path / "p.json"
    params.write_text("{}")
    for method, target in (("classical", params), ("unet", tmp_path / "w.npz")):
        target.write_text("{}")
        proc = run_cli("stagejax.detect", "train", f"--method={method}", "--slides", str(path),
                       "--annotations", str(truth_path), "--out", str(target))  # fmt: skip
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and str(target) in lines[0], proc.stderr
        assert target.read_text() == "{}"


def test_annotations_off_the_slide_are_refused_before_training(drawn, tmp_path):
    path, _, truth = drawn
    shifted = [SlideObject(geometry=affinity.translate(o.geometry, 1e5, 1e5)) for o in truth]
    write_geojson(tmp_path / "off.geojson", shifted)
    comma = tmp_path / "mouse 1, slide A.tif"  # a lab's file name with a comma
    comma.write_bytes(path.read_bytes())
    proc = run_cli("stagejax.detect", "train", "--method=unet", "--slides", str(comma),
                   "--annotations", str(tmp_path / "off.geojson"),
                   "--out", str(tmp_path / "w"))  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "lie off" in lines[0] and "off.geojson" in lines[0] and str(comma) in lines[0]
    assert not (tmp_path / "w").exists()
    proc = run_cli("stagejax.detect", "train", "--method=unet", "--slides", str(path),
                   "--annotations", str(tmp_path / "off.geojson"), "--holdout", "1.5",
                   "--out", str(tmp_path / "w"))  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--holdout: 1.5" in lines[0], proc.stderr
