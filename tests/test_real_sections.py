"""The real-section detection benchmark (benchmarks.real_sections, benchmarks.detect --real),
on a stand-in folder laid out like ../shared/real (made from a SIMULATED packed section),
and on the real images themselves when ../shared/real is here."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import detect
from benchmarks import real_sections as rs
from stagejax.detect import weights
from stagejax.simulate import packed
from stagejax.slides import read_geojson

REAL = Path(__file__).resolve().parents[2] / "shared" / "real"


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """A folder with section_A_HE.png and its instance PNG (3 um/px, 1,000 rows)."""
    root = tmp_path_factory.mktemp("real_stand_in")
    sec = packed.render_packed(6, (1.5, 3.0), mpp=3.0)
    Image.fromarray(sec.rgb).save(root / "section_A_HE.png")
    Image.fromarray(sec.labels.astype(np.uint16)).save(root / rs.TRUTH)
    return root, sec


def test_truth_and_scores_of_a_perfect_and_an_empty_detector(stand_in):
    root, sec = stand_in
    truth = rs.read_truth(root)
    assert len(truth.polygons) == sec.labels.max()
    top, bottom = rs.split_top_bottom(truth)
    assert top and bottom and not set(top) & set(bottom)
    assert all(truth.polygons[i].bounds[3] <= rs.SPLIT_ROW for i in top)
    assert rs.pixel_iou(truth.polygons, truth.labels) > 0.97
    assert rs.pixel_iou([], truth.labels) == 0.0


def test_the_bottom_part_ignores_tubules_crossing_the_split_row(stand_in):
    root, _ = stand_in
    truth = rs.read_truth(root)
    _, bottom = rs.split_top_bottom(truth)
    crossing = [i for i, p in enumerate(truth.polygons)
                if p.bounds[1] < rs.SPLIT_ROW < p.bounds[3]]  # fmt: skip
    assert crossing
    # Every tubule found: a crossing one whose centroid lies below the row is neither a
    # hit nor a false detection of the bottom part.
    scores = rs._score(truth, truth.objects(), "bottom")
    assert scores["num_truth"] == len(bottom)
    assert scores["precision"] == 1.0 and scores["recall"] == 1.0
    # A detection that matches no tubule still counts against precision.
    stray = truth.objects([bottom[0]])[0]
    stray = type(stray)(geometry=stray.geometry.buffer(40), classification="Tubule")
    worse = rs._score(truth, [*truth.objects(bottom), stray], "bottom")
    assert worse["num_detections"] == len(bottom) + 1 and worse["precision"] < 1.0


def test_finetune_annotations_mark_only_annotated_ground(stand_in, tmp_path):
    root, _ = stand_in
    truth = rs.read_truth(root)
    top, _ = rs.split_top_bottom(truth)
    for count, expect in ((3, 3), (None, len(top))):
        objects = read_geojson(rs.finetune_annotations(root, tmp_path, count))
        regions = [o for o in objects if o.classification == "Region"]
        tubules = [o for o in objects if o.classification != "Region"]
        assert len(regions) == 1 and len(tubules) == expect
        region = regions[0].geometry
        assert region.bounds[3] <= rs.SPLIT_ROW + 1
        for poly in truth.polygons:  # unannotated tubules stay outside
            if all(not t.geometry.equals(poly) for t in tubules):
                assert region.intersection(poly).area < 0.05 * poly.area


def test_benchmark_command_scores_the_stand_in_and_skips_without_images(stand_in, tmp_path):
    root, _ = stand_in
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "benchmarks.detect", "--real", str(root), "--json", str(out),
           "--overlays", str(tmp_path / "ov"), "--finetune_steps=1",
           "--finetune_tubules=10,all"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    a = result["section_A"]
    # A PAS packed section (JPEG) at 3 um/px, read from PNG, enlarged to the U-Net's scale.
    assert a["num_truth"] > 20 and a["f1"] >= 0.8 and a["pixel_iou"] >= 0.8, a
    assert "REAL" in result["data"]
    assert (tmp_path / "ov" / "section_A_detections.png").exists()
    # The fine-tuning curve: 10, then every top tubule, one step each, each new model
    # scored on the bottom half.
    curve = result["finetune"]
    top = len(rs.split_top_bottom(rs.read_truth(root))[0])
    assert [r["tubules"] for r in curve] == [min(10, top), top]
    assert all(r["steps"] == 1 and 0 <= r["bottom"]["f1"] <= 1 for r in curve), curve
    assert (tmp_path / "ov" / "finetune").is_dir()
    proc = subprocess.run(cmd[:3] + ["--real", str(tmp_path / "none")], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "skipped" in proc.stdout
    with pytest.raises(SystemExit, match="error: --finetune_tubules: '10,0': positive"):
        detect.main(["--real", str(root), "--finetune_tubules=10,0", "--finetune_steps=1"])


@pytest.mark.skipif(not (REAL / rs.TRUTH).exists(), reason="../shared/real is not here")
def test_shipped_unet_on_real_section_a_holds_what_was_measured():
    """REAL, H&E, downsampled figure image: section A, never trained on. Measured
    2026-12-07 with the shipped weights: F1 0.877, mean IoU 0.796 (issue 22's
    targets: 0.85 and 0.75); this guards them (the weights of 2026-12-01 gave 0.17)."""
    scores = rs.score_section_a(weights.load_weights(), REAL)["all"]
    assert scores["f1"] >= 0.85, scores
    assert scores["mean_iou"] >= 0.75, scores
