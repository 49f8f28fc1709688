"""Corrected sections back into training data (stagejax.section export), round trip
through a small simulated section edited the way a lab edits one in QuPath."""

import collections
import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest
from shapely.geometry import box

from stagejax.data.layout import SPLITS, read_layout, stage_from_file_name
from stagejax.errors import ConfigError, DatasetError
from stagejax.images import decode_image
from stagejax.section import export
from stagejax.section.crops import crop_square, cut_tubule, outline_mask
from stagejax.slides import SlideObject, open_slide, read_geojson, write_geojson
from stagejax.stages import STAGES, parse_stage
from tests.conftest import run_cli

MPP, SIZE = 4.0, 64  # the "model's" um/px and image side


def _edit_like_a_lab(objects: list[SlideObject]) -> list[SlideObject]:
    """Two stages changed, one tubule deleted, one drawn (copied outline, new stage, no
    stageable property), one marked not stageable, one left as a plain "Tubule"."""
    by_stage = collections.defaultdict(list)
    for i, o in enumerate(objects):
        if o.properties["stageable"]:
            by_stage[o.classification].append(i)
    assert len(by_stage["I"]) >= 3 and len(by_stage["VIII"]) >= 2 and len(by_stage["II"]) >= 2
    assert "X" not in by_stage  # the edit below brings the 12th stage
    objects = [dataclasses.replace(o, properties=dict(o.properties)) for o in objects]
    objects[by_stage["I"][0]].classification = "X"
    objects[by_stage["VIII"][0]].classification = "ix"  # any case, as parse_stage reads it
    objects[by_stage["II"][0]].properties["stageable"] = False
    drawn = SlideObject(objects[by_stage["I"][1]].geometry, classification="12")
    plain = SlideObject(objects[by_stage["II"][1]].geometry, classification="Tubule")
    del objects[by_stage["I"][2]]
    return objects + [drawn, plain]


def _expected_labels(objects: list[SlideObject]) -> collections.Counter:
    out = collections.Counter()
    for o in objects:
        rank = parse_stage(o.classification or "")
        if rank is not None and o.properties.get("stageable", True) is not False:
            out[STAGES[rank]] += 1
    return out


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    """(slide, corrected annotations, the objects as read back from them)."""
    from stagejax.simulate.section import render_section

    root = tmp_path_factory.mktemp("export")
    sim = render_section(root / "sim", seed=3, mpp=MPP, stain_shift=0.0, size_mm=(1.6, 1.4))
    edited = _edit_like_a_lab(read_geojson(sim / "ground_truth.geojson"))
    path = write_geojson(root / "corrected.geojson", edited)
    return sim / "section.tif", path, read_geojson(path)


@pytest.fixture(scope="module")
def exported(section, tmp_path_factory):
    slide, ann, _ = section
    out = tmp_path_factory.mktemp("random") / "ds"
    export.export_sections([slide], [ann], out, mpp=MPP, image_size=SIZE, split_by="random")
    return out


def _images(root):
    return sorted(p.name for p in (root / "images").iterdir())


def test_layout_reads_exactly_the_corrected_tubules(section, exported):
    _, _, objects = section
    layout = read_layout(exported, crop_size=SIZE)
    assert layout.label_names == list(STAGES)
    got = collections.Counter(
        layout.label_names[ex.label] for exs in layout.splits.values() for ex in exs
    )
    assert got == _expected_labels(objects)
    assert len(_images(exported)) == sum(got.values())
    assert all(stage_from_file_name(n) in STAGES for n in _images(exported))
    meta = json.loads((exported / "EXPORT.json").read_text())
    assert meta["images"] == sum(got.values()) and (meta["mpp"], meta["image_size"]) == (MPP, SIZE)
    assert meta["slides"][0]["skipped"]["class 'Tubule'"] == 1
    assert not meta["missing_from_train"]


def test_image_is_the_section_mode_crop_white_outside(section, exported):
    slide_path, _, objects = section
    for name in _images(exported)[:3]:
        n = int(name.split("_")[-2])
        outline = objects[n].geometry
        with open_slide(slide_path) as slide:
            expected = cut_tubule(slide, outline, MPP, SIZE)
            ds0 = MPP / slide.mpp
            inside = outline_mask(outline, crop_square(outline, SIZE * ds0), ds0, SIZE)
        got = decode_image((exported / "images" / name).read_bytes(), name)
        assert got.dtype == np.uint8 and got.shape == (SIZE, SIZE, 3)
        assert got.tobytes() == expected.tobytes()
        assert (got[~inside] == 255).all() and (got[inside] < 250).any()


def test_skipped_objects_are_counted_in_one_line(section, tmp_path, caplog):
    slide, ann, _ = section
    with caplog.at_level(logging.INFO, logger="stagejax.section.export"):
        export.export_sections(
            [slide], [ann], tmp_path / "ds", mpp=MPP, image_size=SIZE, split_by="random", seed=1
        )
    lines = [r.getMessage() for r in caplog.records if "tubules in" in r.getMessage()]
    assert len(lines) == 1 and "not stageable" in lines[0] and "'Tubule'" in lines[0]


def test_workdir_gives_labels_and_scale_and_flags_win(section, tmp_path):
    slide, ann, _ = section
    names = ["12"] + [str(i) for i in range(1, 12)]  # class 0 is stage XII
    model = tmp_path / "w" / "best_model"
    model.mkdir(parents=True)
    meta = {"arch": "resnet18", "num_classes": 12, "in_channels": 3, "label_names": names}
    (model / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"mpp or image_size.*--mpp and --image_size"):
        export.export_sections(
            [slide], [ann], tmp_path / "x", workdir=tmp_path / "w", split_by="random"
        )
    (model / "model.json").write_text(json.dumps({**meta, "mpp": MPP, "image_size": SIZE}))
    out = export.export_sections(
        [slide], [ann], tmp_path / "ds", workdir=tmp_path / "w", image_size=48, split_by="random"
    )
    layout = read_layout(out, crop_size=48)
    assert layout.label_names == names and layout.stage_ranks[0] == 11
    files = _images(out)
    assert {stage_from_file_name(n) for n in files} == set(names)
    assert decode_image((out / "images" / files[0]).read_bytes(), "").shape == (48, 48, 3)


def _cli(*args):
    return run_cli("stagejax.section", "export", *args)


def _one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_cli_errors_are_one_line(section, tmp_path):
    slide, ann, _ = section
    scale = ["--mpp", str(MPP), "--image_size", str(SIZE), "--split_by", "random"]
    missing = tmp_path / "missing.geojson"
    line = _one_error_line(
        _cli(
            "--slides",
            str(slide),
            "--annotations",
            str(missing),
            "--out",
            str(tmp_path / "a"),
            *scale,
        )
    )
    assert str(missing) in line
    line = _one_error_line(
        _cli(
            "--slides",
            f"{slide},{slide}",
            "--annotations",
            str(ann),
            "--out",
            str(tmp_path / "b"),
            *scale,
        )
    )
    assert "1 file(s) for 2 slide(s)" in line
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    line = _one_error_line(
        _cli(
            "--slides",
            str(slide),
            "--annotations",
            str(ann),
            "--out",
            str(tmp_path / "full"),
            *scale,
        )
    )
    assert "not empty" in line
    line = _one_error_line(
        _cli(
            "--slides",
            str(slide),
            "--annotations",
            str(ann),
            "--out",
            str(tmp_path / "c"),
            "--mpp",
            str(MPP),
            "--image_size",
            str(SIZE),
        )
    )
    assert "--split_by random" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_cli_slide_split_keeps_each_slide_in_one_split(section, tmp_path):
    slide, ann, objects = section
    slides = [tmp_path / f"{name}.tif" for name in ("mouse1", "mouse2", "mouse3")]
    for s in slides:
        shutil.copy(slide, s)
    proc = _cli(
        "--slides",
        ",".join(map(str, slides)),
        "--annotations",
        ",".join([str(ann)] * 3),
        "--out",
        str(tmp_path / "ds"),
        "--mpp",
        str(MPP),
        "--image_size",
        str(SIZE),
    )
    assert proc.returncode == 0, proc.stderr
    layout = read_layout(tmp_path / "ds", check_images=False)
    split_of = collections.defaultdict(set)
    for split, exs in layout.splits.items():
        for ex in exs:
            split_of[ex.file_name.rsplit("_", 2)[0]].add(split)
    assert set(split_of) == {"mouse1", "mouse2", "mouse3"}
    assert sorted(s for v in split_of.values() for s in v) == sorted(SPLITS)
    n = sum(_expected_labels(objects).values())
    assert all(len(exs) == n for exs in layout.splits.values())


def _plan(name, labels):
    tubules = [(i, box(0, 0, 1, 1), lab) for i, lab in enumerate(labels)]
    return export.SlidePlan(name, name, 1.0, "test", tubules, collections.Counter())


def test_random_split_keeps_one_of_each_stage_in_train():
    plans = [_plan("a", list(STAGES)), _plan("b", ["I", "V", "V"])]  # 15 tubules, 12 stages
    for seed in range(20):
        splits = export.split_random(plans, seed)
        flat = [
            (t[2], s)
            for p, ss in zip(plans, splits, strict=True)
            for t, s in zip(p.tubules, ss, strict=True)
        ]
        assert {lab for lab, s in flat if s == "train"} == set(STAGES)
        assert {s for _, s in flat} == set(SPLITS)
    with pytest.raises(DatasetError, match="at least 3"):
        export.split_random([_plan("a", ["I", "II"])], 0)


def test_slide_split_prefers_train_slides_that_hold_every_stage():
    plans = [_plan("rare", list(STAGES))] + [_plan(f"s{i}", ["I", "II"]) for i in range(5)]
    plans.append(_plan("empty", []))
    splits = export.split_by_slide(plans, seed=0)
    assert splits[0][0] == "train" and splits[-1] == []
    per_slide = [set(ss) for ss in splits if ss]
    assert all(len(s) == 1 for s in per_slide)
    assert {s for ss in per_slide for s in ss} == set(SPLITS)
    with pytest.raises(DatasetError, match="--split_by random"):
        export.split_by_slide(plans[:2] + [plans[-1]], seed=0)


def test_cli_file_names_with_a_comma(section, tmp_path):
    """A name with a comma: the flag repeated, or a list file (@LIST, one per line)."""
    slide, ann, _ = section
    slides = [tmp_path / "mouse,1.tif", tmp_path / "mouse2.tif"]
    for s in slides:
        shutil.copy(slide, s)
    shutil.copy(ann, tmp_path / "a,1.geojson")
    listing = tmp_path / "annotations.txt"
    listing.write_text(f"{tmp_path / 'a,1.geojson'}\n{ann}\n")
    scale = ["--mpp", str(MPP), "--image_size", str(SIZE), "--split_by", "random"]
    proc = _cli(
        *("--slides", str(slides[0]), "--slides", str(slides[1])),
        *("--annotations", f"@{listing}", "--out", str(tmp_path / "ds"), *scale),
    )
    assert proc.returncode == 0, proc.stderr
    names = {p.name.rsplit("_", 2)[0] for p in (tmp_path / "ds" / "images").iterdir()}
    assert names == {"mouse,1", "mouse2"}
    meta = json.loads((tmp_path / "ds" / "EXPORT.json").read_text())
    assert str(slides[0]) in json.dumps(meta)
