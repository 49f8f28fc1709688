"""Per-slide outputs of section mode (stagejax.section.outputs, .figures)."""

import csv
import json
import logging
import math

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import Point, box

from stagejax import stages
from stagejax.runtime.files import TMP_PREFIX
from stagejax.section import figures, outputs
from stagejax.section.outputs import SectionResult, StagedTubule
from stagejax.simulate import section as simulate_section
from stagejax.slides import read_geojson

MPP = 0.5  # um per level-0 px
SCALE = 4.0  # level-0 px per thumbnail px
BACKGROUND = (200, 170, 190)  # mid-tone: the white/black review dashes stand out
ARABIC = [str(i + 1) for i in range(12)]  # class id = rank
ROMAN_LEX = sorted(stages.STAGES)  # I, II, III, IV, IX, V, ...: class id != rank
FILES = ["overlay.png", "stage_frequencies.png", "stage_frequencies.csv", "tubules.geojson",
         "review.csv", "tubules.csv"]  # fmt: skip

# (id, outline, stageable, rank of the most probable stage, its probability)
TUBULES = [
    (1, box(100, 100, 300, 300), True, 6, 0.9),  # a 200 px square: 100 um side
    (2, Point(600, 300).buffer(80), True, 2, 0.7),
    (3, box(700, 600, 1000, 700), False, 11, 0.8),  # grazing: 150 x 50 um
    (4, box(150, 600, 350, 800), True, 0, 0.35),  # unsure
    (5, box(450, 650, 550, 750), False, 4, 0.3),  # unsure and not stageable
]
REVIEW_BELOW = 0.5


def probs_for(rank: int, conf: float, ranks: list[int]) -> np.ndarray:
    """Class-id-order probabilities: `conf` on the class of `rank`, the rest unequal."""
    by_rank = np.array([r + 1.0 for r in range(12)])
    by_rank[rank] = 0
    by_rank *= (1 - conf) / by_rank.sum()
    by_rank[rank] = conf
    return by_rank[np.asarray(ranks)]


def make_result(names=ARABIC, tubules=TUBULES, name="mouse3_section2", thumb_side=(300, 250)):
    ranks = list(stages.stage_ranks(names))
    staged = [
        StagedTubule(i, geom, ok, probs_for(rank, conf, ranks))
        for i, geom, ok, rank, conf in tubules
    ]
    w, h = thumb_side
    thumb = np.empty((h, w, 3), np.uint8)
    thumb[:] = BACKGROUND
    scale = (1200 / w, 1000 / h)
    return SectionResult(name, f"/slides/{name}.tif", MPP, list(names), ranks, staged, thumb,
                         scale, REVIEW_BELOW)  # fmt: skip


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def header(path):
    with open(path, newline="") as f:
        return next(csv.reader(f))


def bio_names(result):
    return [result.label_names[c] for c in stages.biological_order(result.stage_ranks)]


def test_stage_color_matches_the_simulator():
    for rank in range(12):
        assert stages.stage_color(rank) == simulate_section.stage_color(rank)
    assert len({stages.stage_color(r) for r in range(12)}) == 12


@pytest.mark.parametrize("names", [ARABIC, ROMAN_LEX], ids=["arabic", "roman_lexicographic"])
def test_tubules_csv_values(tmp_path, names):
    result = make_result(names)
    paths = outputs.write_section_outputs(tmp_path / "out", result)
    assert sorted(p.name for p in paths) == sorted(FILES)
    assert all(p.is_file() for p in paths)

    csv_path = tmp_path / "out" / "tubules.csv"
    prob_cols = [f"p_{n}" for n in bio_names(result)]
    assert header(csv_path) == [*outputs.BASE_COLUMNS, *prob_cols]
    names_bio = ARABIC if names is ARABIC else list(stages.STAGES)
    assert prob_cols == [f"p_{n}" for n in names_bio]  # stage I first, whatever the ids

    rows = {int(r["id"]): r for r in read_csv(csv_path)}
    assert list(rows) == [1, 2, 3, 4, 5]
    square = rows[1]
    assert float(square["centroid_x_px"]) == pytest.approx(200)
    assert float(square["centroid_y_px"]) == pytest.approx(200)
    assert float(square["centroid_x_um"]) == pytest.approx(100)
    assert float(square["centroid_y_um"]) == pytest.approx(100)
    assert float(square["area_um2"]) == pytest.approx(100 * 100)
    assert float(square["major_axis_um"]) == pytest.approx(100)
    assert float(square["minor_axis_um"]) == pytest.approx(100)
    assert square["stageable"] == "true" and rows[3]["stageable"] == "false"
    assert float(rows[3]["major_axis_um"]) == pytest.approx(150)
    assert float(rows[3]["minor_axis_um"]) == pytest.approx(50)
    circle = result.tubules[1].geometry
    assert float(rows[2]["area_um2"]) == pytest.approx(circle.area * MPP**2, abs=0.01)
    assert float(rows[2]["major_axis_um"]) == pytest.approx(80, rel=0.01)  # diameter

    for (tid, _, _, rank, conf), t in zip(TUBULES, result.tubules, strict=True):
        row = rows[tid]
        assert row["stage"] == names_bio[rank]
        assert float(row["confidence"]) == pytest.approx(conf, abs=1e-5)
        for n in names:
            assert float(row[f"p_{n}"]) == pytest.approx(t.probs[names.index(n)], abs=1e-5)


@pytest.mark.parametrize("names", [ARABIC, ROMAN_LEX], ids=["arabic", "roman_lexicographic"])
def test_geojson_round_trip(tmp_path, names):
    result = make_result(names)
    outputs.write_section_outputs(tmp_path, result)
    objects = read_geojson(tmp_path / "tubules.geojson")
    assert len(objects) == len(result.tubules)
    for obj, t, (_, _, ok, rank, conf) in zip(objects, result.tubules, TUBULES, strict=True):
        assert obj.object_type == "detection"
        assert obj.geometry.hausdorff_distance(t.geometry) < 0.01  # coordinates to 0.01 px
        name = stages.names_by_rank(names, result.stage_ranks)[rank]
        assert obj.classification == name
        assert obj.color == stages.stage_color(rank)
        assert obj.properties["stageable"] is ok
        assert obj.properties["tubule_id"] == t.id
        m = obj.measurements
        assert list(m) == ["Confidence", "Area um^2", *(f"P({n})" for n in bio_names(result))]
        assert m["Confidence"] == pytest.approx(conf)
        assert m["Area um^2"] == pytest.approx(t.geometry.area * MPP**2)
        for n in names:
            assert m[f"P({n})"] == pytest.approx(t.probs[names.index(n)])


@pytest.mark.parametrize("names", [ARABIC, ROMAN_LEX], ids=["arabic", "roman_lexicographic"])
def test_frequencies_count_only_stageable_tubules(tmp_path, names):
    result = make_result(names)
    outputs.write_section_outputs(tmp_path, result)
    expected_counts = np.zeros(12, int)
    expected_counts[[6, 2, 0]] = 1  # tubules 1, 2, 4; 3 and 5 are not stageable
    np.testing.assert_array_equal(outputs.stage_counts(result), expected_counts)

    rows = read_csv(tmp_path / "stage_frequencies.csv")
    assert header(tmp_path / "stage_frequencies.csv") == [
        "stage", "count", "percent", "expected_percent"]  # fmt: skip
    assert [r["stage"] for r in rows] == stages.names_by_rank(names, result.stage_ranks)
    np.testing.assert_array_equal([int(r["count"]) for r in rows], expected_counts)
    np.testing.assert_allclose([float(r["percent"]) for r in rows], expected_counts / 3 * 100,
                               atol=0.005)  # fmt: skip
    np.testing.assert_allclose([float(r["expected_percent"]) for r in rows],
                               stages.stage_frequencies() * 100, atol=0.005)  # fmt: skip


def test_review_holds_the_unsure_tubules_least_sure_first(tmp_path):
    outputs.write_section_outputs(tmp_path, make_result())
    rows = read_csv(tmp_path / "review.csv")
    assert header(tmp_path / "review.csv") == header(tmp_path / "tubules.csv")
    assert [int(r["id"]) for r in rows] == [5, 4]
    assert [float(r["confidence"]) for r in rows] == pytest.approx([0.3, 0.35])
    assert [r["stageable"] for r in rows] == ["false", "true"]
    everything = {r["id"]: r for r in read_csv(tmp_path / "tubules.csv")}
    assert all(r == everything[r["id"]] for r in rows)


def _box_pixels(img: np.ndarray, geometry, f: float) -> np.ndarray:
    """Pixels of `img` (map px = level-0 px * f) in `geometry`'s box, 3 px beyond its edge."""
    x0, y0, x1, y1 = (round(v * f) for v in geometry.bounds)
    return img[y0 - 3 : y1 + 4, x0 - 3 : x1 + 4].reshape(-1, 3).astype(int)


def test_overlay_colours_tubules_and_marks_unsure_ones(tmp_path):
    result = make_result()
    outputs.write_section_outputs(tmp_path, result)
    with Image.open(tmp_path / "overlay.png") as im:
        assert im.mode == "P"  # quantised
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape[0] >= 250 and 300 < rgb.shape[1] <= 2000  # map plus legend panel
    f = 1 / SCALE  # level-0 px -> map px (the thumbnail is small: not resized)
    a = figures.FILL_ALPHA / 255
    for tid, colour in ((1, stages.stage_color(6)), (3, figures.NOT_STAGEABLE_COLOR)):
        cx, cy = (round(v * f) for v in result.tubules[tid - 1].geometry.centroid.coords[0])
        blend = (1 - a) * np.array(BACKGROUND) + a * np.array(colour)
        np.testing.assert_allclose(rgb[cy, cx], blend, atol=12)
    assert tuple(rgb[5, 5]) == pytest.approx(BACKGROUND, abs=6)  # outside every tubule
    colours = {tuple(c) for c in rgb.reshape(-1, 3)}
    for rank in range(12):  # the legend keeps the exact stage colours through quantising
        assert stages.stage_color(rank) in colours

    def has_dashes(tid):
        px = _box_pixels(rgb, result.tubules[tid - 1].geometry, f)
        return (px.min(1) > 240).any() and (px.max(1) < 20).any()

    assert has_dashes(4) and has_dashes(5)  # below review_below: white/black dashes
    assert not has_dashes(1) and not has_dashes(3)


def test_overlay_of_a_large_thumbnail_is_at_most_2000_px(tmp_path):
    outputs.write_section_outputs(tmp_path, make_result(thumb_side=(3600, 3000)))
    with Image.open(tmp_path / "overlay.png") as im:
        assert max(im.size) <= 2000 and min(im.size) > 1000
    assert (tmp_path / "overlay.png").stat().st_size < 2_000_000


def test_frequency_chart_is_a_readable_png(tmp_path):
    outputs.write_section_outputs(tmp_path, make_result())
    with Image.open(tmp_path / "stage_frequencies.png") as im:
        im.load()
        assert im.format == "PNG"
        assert 600 <= im.width <= 3000 and 300 <= im.height <= 2000


@pytest.mark.parametrize("tubules", [[t[:2] + (False,) + t[3:] for t in TUBULES], []],
                         ids=["none_stageable", "no_tubules"])  # fmt: skip
def test_no_stageable_tubules_still_writes_everything(tmp_path, caplog, tubules):
    result = make_result(tubules=tubules, name="empty_slide")
    with caplog.at_level(logging.WARNING, logger="stagejax.section.outputs"):
        paths = outputs.write_section_outputs(tmp_path, result)
    assert sorted(p.name for p in paths) == sorted(FILES)
    assert any("empty_slide" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)  # fmt: skip
    rows = read_csv(tmp_path / "stage_frequencies.csv")
    assert len(rows) == 12
    assert all(int(r["count"]) == 0 and float(r["percent"]) == 0 for r in rows)
    assert not any(math.isnan(float(r["percent"])) for r in rows)
    assert len(read_csv(tmp_path / "tubules.csv")) == len(tubules)
    assert len(read_geojson(tmp_path / "tubules.geojson")) == len(tubules)
    for png in ("overlay.png", "stage_frequencies.png"):
        with Image.open(tmp_path / png) as im:
            im.load()


def test_summary_rows_and_percentages(tmp_path):
    a = make_result(name="slide_a")
    b = make_result(tubules=[t[:2] + (False,) + t[3:] for t in TUBULES], name="slide_b")
    rows = [outputs.summary_row(a), outputs.summary_row(b)]
    path = outputs.write_summary(tmp_path / "summary.csv", rows)
    assert path == tmp_path / "summary.csv"
    pct = [f"pct_{s}" for s in stages.STAGES]
    assert header(path) == ["slide", "tubules", "stageable", *pct, "error"]
    got = read_csv(path)
    assert [(r["slide"], r["tubules"], r["stageable"]) for r in got] == [
        ("slide_a", "5", "3"), ("slide_b", "5", "0")]  # fmt: skip
    pct_a = [float(got[0][f"pct_{s}"]) for s in stages.STAGES]
    np.testing.assert_allclose(pct_a, np.where(np.isin(range(12), [0, 2, 6]), 100 / 3, 0),
                               atol=0.005)  # fmt: skip
    assert all(float(got[1][f"pct_{s}"]) == 0 for s in stages.STAGES)

    arabic = stages.names_by_rank(ARABIC, range(12))
    outputs.write_summary(tmp_path / "summary.csv", rows, stage_names=arabic)
    assert header(path)[3:] == [*(f"pct_{n}" for n in ARABIC), "error"]
    with pytest.raises(ValueError, match="stage_names"):
        outputs.write_summary(tmp_path / "bad.csv", rows, stage_names=["I", "II"])


def test_failed_write_keeps_the_old_files(tmp_path, monkeypatch):
    outputs.write_section_outputs(tmp_path, make_result())
    before = {name: (tmp_path / name).read_bytes() for name in FILES}

    def broken_chart(path, *args):
        path.write_bytes(b"half a PNG")
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(figures, "plot_stage_frequencies", broken_chart)
    changed = make_result(tubules=[t[:4] + (0.95,) for t in TUBULES])
    with pytest.raises(RuntimeError, match="drawing failed"):
        outputs.write_section_outputs(tmp_path, changed)
    for name in FILES[1:]:  # everything from the chart on: untouched, tubules.csv included
        assert (tmp_path / name).read_bytes() == before[name], name
    with Image.open(tmp_path / "overlay.png") as im:  # replaced before, but whole
        im.load()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((TMP_PREFIX, "."))]


def test_probabilities_of_the_wrong_length_are_refused(tmp_path):
    result = make_result()
    result.tubules[2].probs = np.full(11, 1 / 11)
    with pytest.raises(ValueError, match="tubule 3"):
        outputs.write_section_outputs(tmp_path, result)


def test_section_record_decides_skip_redo_or_refuse(tmp_path):
    """`record.decide`: the slide's path and content, the model and every setting key
    a slide's outputs; hand-edited outputs are never redone without overwrite."""
    from stagejax.errors import WorkdirError
    from stagejax.section import record

    slide = tmp_path / "slideA.tif"
    slide.write_bytes(b"pixels" * 1000)
    out = tmp_path / "sections" / "slideA"
    out.mkdir(parents=True)
    (out / "tubules.geojson").write_text("{}")
    key = record.slide_fingerprint(slide)
    now = {"slide_mpp": 0.0, "detector": "unet", "tta": False}
    done = {"slide_file": key, "model": "m1", "settings": now, "files": record.file_hashes(out)}
    (out / record.DONE_FILE).write_text(json.dumps(done))

    def decide(slide_key=key, model="m1", settings=now, overwrite=False):
        return record.decide(out, slide_key, model, settings, overwrite)

    assert decide() == record.SKIP
    assert decide(settings={**now, "detector": "classical"}) == record.STAGE
    with pytest.raises(WorkdirError, match=f"another slide, {key['path']}"):
        decide(slide_key={**key, "path": "/data/mouse2/slideA.tif"})
    with pytest.raises(WorkdirError, match="an earlier version of"):
        decide(slide_key={**key, "size": key["size"] + 1})
    with pytest.raises(WorkdirError, match="the model m1"):
        decide(model="m2")
    assert decide(model="m2", overwrite=True) == record.STAGE
    (out / "tubules.geojson").write_text('{"corrected": "in QuPath"}')
    assert decide() == record.SKIP  # same settings: nothing to redo
    with pytest.raises(WorkdirError, match=r"edited since they were written \(tubules.geojson\)"):
        decide(settings={**now, "slide_mpp": 0.5})
