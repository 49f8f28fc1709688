"""``--mode=section`` through the command line, on small SIMULATED sections.

A random ResNet-18 imported as a model directory (with the pixel size and
image side a trained model records) stages two tiny sections: every detected
tubule gets one row, the outputs match each other, a rerun skips finished
slides, another model's outputs are kept unless overwrite, a folder gets one
summary, bad input is one line before any work, and two JAX processes split
the slides and write the summary once.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile

from stagejax import models
from stagejax.model import saved
from stagejax.section import crops
from stagejax.simulate.section import render_section
from stagejax.slides import open_slide, read_geojson, write_pyramidal_tiff
from stagejax.stages import STAGES
from tests.conftest import (
    REPO,
    cli_command,
    cli_env,
    error_line,
    free_port,
    main_args,
    run_cli,
)

MPP, IMAGE, CROP = 4.0, 56, 48


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """(model dir, folder of two simulated sections)."""
    tmp = tmp_path_factory.mktemp("section")
    model = saved.save_model_weights(
        tmp / "model", models.create("resnet18"), "resnet18", mpp=MPP, image_size=IMAGE
    )
    slides = tmp / "slides"
    slides.mkdir()
    for seed in (3, 4):
        sim = render_section(tmp / f"sim{seed}", seed, mpp=2.0, size_mm=(1.4, 1.1))
        shutil.copy(sim / "section.tif", slides / f"s{seed}.tif")
    return model, slides


def _args(workdir: Path, model: Path, *extra: str) -> list[str]:
    fields = {"model": "resnet18", "init_from": model, "crop_size": CROP}
    fields |= {"crop_range": 0, "eval_batch_size": 8}
    return main_args(workdir, "--mode=section", *extra, overrides=fields)


def _run(workdir, model, *extra):
    return run_cli("stagejax.main", *_args(workdir, model, *extra))


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_folder_outputs_resume_and_summary(setup, tmp_path):
    model, slides = setup
    w = tmp_path / "w"
    res = _run(w, model, f"--slides={slides}")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("s3", "s4"):
        out = w / "sections" / name
        done = json.loads((out / "section.json").read_text())
        rows = _rows(out / "tubules.csv")
        assert len(rows) == done["tubules"] > 10
        assert sum(r["stageable"] == "true" for r in rows) == done["stageable"]
        objects = read_geojson(out / "tubules.geojson")
        assert [o.classification for o in objects] == [r["stage"] for r in rows]
        probs = np.array([[float(r[f"p_{s}"]) for s in STAGES] for r in rows])
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
        conf = np.array([float(r["confidence"]) for r in rows])
        np.testing.assert_allclose(conf, probs.max(1), atol=1e-4)
        freq = _rows(out / "stage_frequencies.csv")
        assert sum(int(r["count"]) for r in freq) == done["stageable"]
        assert done["counts_by_rank"] == [int(r["count"]) for r in freq]
        assert set(done["seconds"]) >= {"read_and_detect", "cut", "stage", "write"}
        for png in ("overlay.png", "stage_frequencies.png"):
            assert (out / png).stat().st_size > 1000
    summary = _rows(w / "sections" / "summary.csv")
    assert [r["slide"] for r in summary] == ["s3", "s4"]
    assert "; 1 slide(s) to go, about" in res.stderr and "2 slide(s) staged, " in res.stderr
    # A rerun skips both (same model), leaving the files untouched.
    before = (w / "sections" / "s3" / "tubules.csv").stat().st_mtime_ns
    res = _run(w, model, f"--slides={slides}")
    assert res.returncode == 0 and "already staged" in res.stderr, res.stderr[-3000:]
    assert (w / "sections" / "s3" / "tubules.csv").stat().st_mtime_ns == before
    _shards_equal_one_run(w, model, slides, tmp_path / "sharded")


def _shards_equal_one_run(one: Path, model: Path, slides: Path, w: Path) -> None:
    """Two shards of the folder (one named by --shard, one by a Slurm array's variables)
    into one workdir, then merge: the outputs of the one run, byte for byte (section.json
    but for its timings), and its summary."""
    res = _run(w, model, f"--slides={slides}", "--shard=1/2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "shard 1/2 done" in res.stderr and not (w / "sections" / "summary.csv").exists()
    slurm = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}
    res = run_cli("stagejax.main", *_args(w, model, f"--slides={slides}"), env=slurm)
    assert res.returncode == 0 and "shard 0/2 done" in res.stderr, res.stderr[-3000:]
    assert sorted(p.name for p in w.iterdir()) == ["config.json", "sections"]  # no lock left
    res = run_cli("stagejax.section", "merge", f"--sections={w / 'sections'}")
    assert res.returncode == 0 and "merged 2 slides (0 not staged)" in res.stdout, res.stderr
    for name in ("s3", "s4"):
        a, b = one / "sections" / name, w / "sections" / name
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for f in a.iterdir():
            if f.name != "section.json":
                assert f.read_bytes() == (b / f.name).read_bytes(), f
        done_a, done_b = (json.loads((d / "section.json").read_text()) for d in (a, b))
        assert {**done_a, "seconds": 0} == {**done_b, "seconds": 0}
    summary = (w / "sections" / "summary.csv").read_bytes()
    assert summary == (one / "sections" / "summary.csv").read_bytes()
    pooled = _rows(w / "sections" / "stage_frequencies.csv")
    counts = [
        np.array(json.loads((one / "sections" / n / "section.json").read_text())["counts_by_rank"])
        for n in ("s3", "s4")
    ]
    assert [int(r["count"]) for r in pooled] == (counts[0] + counts[1]).tolist()


def test_without_a_path_a_simulated_section_is_staged_and_scored(setup, tmp_path):
    model, _ = setup
    w = tmp_path / "w"
    extra = (f"--config.cache_dir={tmp_path / 'cache'}", "--section_size_mm=1.4,1.1")
    res = _run(w, model, *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SIMULATED section" in res.stderr
    out = w / "sections" / "simulated-seed1000"
    done = json.loads((out / "section.json").read_text())
    assert done["slide_mpp"] == pytest.approx(MPP)  # rendered at the model's scale
    scores = done["truth"]
    assert 0 < scores["matched_stageable"] <= scores["truth_stageable"]
    assert scores["num_examples"] == scores["matched_stageable"]
    assert 0 <= scores["frequency_l1"] <= 2
    assert "vs its SIMULATED ground truth" in res.stderr


def test_outputs_of_another_model_are_kept_unless_overwrite(setup, tmp_path):
    model, slides = setup
    w = tmp_path / "w"
    one = slides / "s3.tif"
    assert _run(w, model, f"--slides={one}").returncode == 0
    other = saved.save_model_weights(
        tmp_path / "other", models.create("resnet18", seed=5), "resnet18", mpp=MPP, image_size=IMAGE
    )
    line = error_line(_run(w, other, f"--slides={one}"))
    assert "sections/s3" in line and "--overwrite" in line
    res = _run(w, other, f"--slides={one}", "--overwrite")
    assert res.returncode == 0, res.stderr[-3000:]
    done = json.loads((w / "sections" / "s3" / "section.json").read_text())
    assert str(other.resolve()) in done["model"]


def test_crops_are_cut_at_the_model_scale_and_white_outside(setup, tmp_path):
    _, slides = setup
    with open_slide(slides / "s3.tif") as slide:
        truth = read_geojson(slides.parent / "sim3" / "ground_truth.geojson")
        full = sorted(
            (o for o in truth if o.properties["stageable"]), key=lambda o: o.geometry.area
        )
        obj = full[len(full) // 2]  # a typical tubule, about 200 um across
        crop = crops.cut_tubule(slide, obj.geometry, MPP, IMAGE)
        assert crop.shape == (IMAGE, IMAGE, 3)
        inside = crops.outline_mask(
            obj.geometry,
            crops.crop_square(obj.geometry, IMAGE * MPP / slide.mpp),
            MPP / slide.mpp,
            IMAGE,
        )
        assert (crop[~inside] == 255).all() and inside.mean() > 0.2
        assert crop[inside].mean() < 230  # stained tissue inside
        # The outline's extent at the model's scale: its size in um / MPP.
        x0, _, x1, _ = obj.geometry.bounds
        cols = np.where(inside.any(0))[0]
        assert abs((cols[-1] - cols[0] + 1) - (x1 - x0) * slide.mpp / MPP) <= 2


def test_threads_cut_the_serial_crops_byte_for_byte(setup):
    """`crops.cut_tubules` on several threads gives, in order, the crops of one thread,
    and those equal the cut as first written (white set by boolean indexing)."""
    from PIL import Image
    from shapely.geometry import Point

    _, slides = setup
    rng = np.random.default_rng(0)
    with open_slide(slides / "s3.tif") as slide:
        w, h = slide.dimensions
        outlines = [
            Point(rng.uniform(0, w), rng.uniform(0, h)).buffer(rng.uniform(20, 60), 7)
            for _ in range(13)
        ]  # some cross the slide's edge
        serial = [crops.cut_tubule(slide, g, MPP, IMAGE) for g in outlines]
        threaded = list(crops.cut_tubules(slide, outlines, MPP, IMAGE, workers=3))
        for g, a, b in zip(outlines, serial, threaded, strict=True):
            np.testing.assert_array_equal(a, b)
            plain = crops.cut_tubule(slide, g, MPP, IMAGE, white_outside=False).copy()
            origin = crops.crop_square(g, IMAGE * MPP / slide.mpp)
            plain[~crops.outline_mask(g, origin, MPP / slide.mpp, IMAGE)] = 255
            np.testing.assert_array_equal(a, plain)
        assert Image.fromarray(serial[0]).size == (IMAGE, IMAGE)


def test_bad_input_is_one_line_before_any_work(setup, tmp_path):
    model, slides = setup
    bad = tmp_path / "b.tif"
    bad.write_bytes(b"II*\x00 not a tiff at all")
    w = tmp_path / "w"
    line = error_line(_run(w, model, f"--slides={bad}"))
    assert "b.tif" in line and "corrupt or truncated TIFF" in line
    assert not (w / "sections").exists()
    # A model without a recorded pixel size, and none given: the field is named.
    bare = saved.save_model_weights(tmp_path / "bare", models.create("resnet18"), "resnet18")
    line = error_line(_run(tmp_path / "w2", bare, f"--slides={slides / 's3.tif'}"))
    assert "config.mpp" in line
    line = error_line(_run(tmp_path / "w3", model, "--slides=/no/such/slides"))
    assert "--slides: /no/such/slides: no such file or folder" in line
    # The old config field names the flag that replaced it; a flag of another mode is refused.
    line = error_line(_run(tmp_path / "w3", model, f"--config.section_path={slides}"))
    assert "--config.section_path: no longer a config field" in line and "--slides" in line
    line = error_line(_run(tmp_path / "w3", model, f"--images={slides}"))
    assert "--images: not used by --mode=section" in line
    line = error_line(_run(tmp_path / "w4", model, f"--slides={slides}", "--shard=2/2"))
    assert line == "error: --shard: '2/2': needs 0 <= I < N (e.g. 0/4 ... 3/4)"
    assert not (tmp_path / "w4").exists()


def test_two_processes_split_the_slides(setup, tmp_path):
    model, slides = setup
    w, port = tmp_path / "w", free_port()
    env = cli_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    procs = [
        subprocess.Popen(
            cli_command(
                "stagejax.main",
                *_args(
                    w,
                    model,
                    f"--slides={slides}",
                    f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2",
                    f"--process_id={i}",
                ),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for i in range(2)
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    assert "1 on this process" in errs[0] and "1 on this process" in errs[1]
    summary = _rows(w / "sections" / "summary.csv")
    assert [r["slide"] for r in summary] == ["s3", "s4"]
    assert sum("wrote" in e and "summary.csv" in e for e in errs) == 1


def test_a_stopped_folder_run_resumes_at_the_first_unfinished_slide(
    setup, tmp_path, monkeypatch, caplog
):
    import signal

    from stagejax import recipe
    from stagejax.section import run as run_lib
    from stagejax.section.options import SectionOptions
    from stagejax.train import interrupts

    model, slides = setup
    overrides = {
        "model": "resnet18",
        "init_from": str(model),
        "crop_size": CROP,
        "crop_range": 0,
        "eval_batch_size": 8,
    }
    config = recipe.get_config("study")
    config.update(overrides)
    opts = SectionOptions(slides=str(slides))
    w = tmp_path / "w"
    real, calls = run_lib.stage_detected, []

    def stop_at_second(path, detected, *args):
        calls.append(path.name)
        if len(calls) == 2:  # the first slide's outputs are being written behind
            detected[0].close()
            raise interrupts.Interrupted(signal.SIGINT)
        return real(path, detected, *args)

    monkeypatch.setattr(run_lib, "stage_detected", stop_at_second)
    with pytest.raises(interrupts.Interrupted) as e:
        run_lib.stage_sections(config, w, opts)
    assert e.value.final and "after 1 of 2 slide(s)" in str(e.value)
    assert sorted(p.name for p in (w / "sections").iterdir()) == ["s3"]  # no partial s4
    assert (w / "sections" / "s3" / "section.json").is_file()  # s3 written before the stop
    monkeypatch.setattr(run_lib, "stage_detected", real)
    calls.clear()
    with caplog.at_level("INFO"):
        run_lib.stage_sections(config, w, opts)
    assert "already staged" in caplog.text
    assert (w / "sections" / "s4" / "section.json").is_file()
    assert (w / "sections" / "summary.csv").is_file()


def _plain_slide(path: Path, rgb: tuple[int, int, int]) -> None:
    """A 1.4 x 1.1 mm slide of one colour: glass (a blank scan) or stain without tubules."""
    noise = np.random.default_rng(0).integers(-5, 6, (550, 700, 3))
    write_pyramidal_tiff(path, np.clip(np.add(rgb, noise), 0, 255).astype(np.uint8), 2.0)


def test_one_bad_slide_does_not_stop_a_folder(setup, tmp_path):
    model, slides = setup
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(slides / "s3.tif", folder / "a.tif")
    (folder / "b.tif").write_bytes(b"II*\x00 not a tiff at all")
    _plain_slide(folder / "c.tif", (250, 250, 250))  # a blank scan
    _plain_slide(folder / "d.tif", (200, 140, 190))  # tissue, no tubule
    (folder / "._a.tif").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (folder / ".hidden.tif").write_bytes(b"not a slide")
    w = tmp_path / "w"
    res = _run(w, model, f"--slides={folder}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "b.tif: cannot be read; skipped (corrupt or truncated TIFF" in res.stderr
    assert "c.tif (3/4): skipped: no tissue found" in res.stderr
    assert "3 of 4 slide(s) could not be staged and were skipped" in res.stderr
    summary = {r["slide"]: r for r in _rows(w / "sections" / "summary.csv")}
    assert list(summary) == ["a", "b", "c", "d"]  # no ._a, no .hidden
    assert summary["a"]["error"] == "" and int(summary["a"]["tubules"]) > 10
    assert summary["b"]["tubules"] == "" and "corrupt or truncated" in summary["b"]["error"]
    assert "no tissue found" in summary["c"]["error"]
    # The hint names section mode's pixel-size field, not detect's --mpp.
    assert "no tubules found" in summary["d"]["error"]
    assert "(--slide_mpp)" in summary["d"]["error"]
    # Strict: the same folder ends with one error line naming them; a's outputs stay.
    line = error_line(_run(w, model, f"--slides={folder}", "--strict"))
    assert "3 of 4 slide(s) could not be staged: b, c, d" in line and "--strict" in line
    assert (w / "sections" / "a" / "section.json").is_file()


def test_outputs_are_keyed_by_the_slide_and_the_settings(setup, tmp_path):
    model, slides = setup
    w = tmp_path / "w"
    mouse1 = slides / "s3.tif"
    mouse2 = tmp_path / "mouse2" / "s3.tif"  # the same file name, another slide
    mouse2.parent.mkdir()
    shutil.copy(slides / "s4.tif", mouse2)
    assert _run(w, model, f"--slides={mouse1}").returncode == 0
    done_file = w / "sections" / "s3" / "section.json"
    before = done_file.read_text()
    line = error_line(_run(w, model, f"--slides={mouse2}"))
    assert f"holds the results of another slide, {mouse1.resolve()}" in line
    assert "--overwrite" in line and done_file.read_text() == before
    # A corrected pixel size, then another detector: the same slide is staged again.
    mpp = "--slide_mpp=2.2"
    res = _run(w, model, f"--slides={mouse1}", mpp)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--slide_mpp 0.0 -> 2.2); staging again" in res.stderr
    assert json.loads(done_file.read_text())["slide_mpp"] == pytest.approx(2.2)
    classical = "--detector=classical"
    res = _run(w, model, f"--slides={mouse1}", mpp, classical)
    assert res.returncode == 0 and "staging again" in res.stderr, res.stderr[-3000:]
    assert "--detector" in res.stderr
    assert json.loads(done_file.read_text())["detector"] == "classical"


def test_a_12bit_slide_in_16bit_samples_is_detected(setup, tmp_path):
    """12-bit data in a 16-bit TIFF keeps its grey levels: the same tubules as 8 bit."""
    _, slides = setup
    with open_slide(slides / "s3.tif") as slide:
        rgb8, mpp = slide.read_level(0), slide.mpp
    path = tmp_path / "s3_12bit.tif"
    res_cm = (1e4 / mpp, 1e4 / mpp)
    rgb12 = (rgb8.astype(np.uint32) * 4095 // 255).astype(np.uint16)
    tifffile.imwrite(path, rgb12, tile=(256, 256),
                     photometric="rgb", resolution=res_cm, resolutionunit="CENTIMETER")  # fmt: skip
    counts = []
    for slide_path in (slides / "s3.tif", path):
        out = tmp_path / slide_path.stem
        res = run_cli(
            "stagejax.detect", f"--slide={slide_path}", f"--out={out}", "--method=classical"
        )
        assert res.returncode == 0, res.stderr[-3000:]
        counts.append(int(res.stdout.split()[0]))  # "N tubules in ..."
    assert "16-bit samples scaled to 8 bit by their 12-bit range" in res.stderr
    assert counts[0] > 10 and abs(counts[1] - counts[0]) <= 0.1 * counts[0], counts
