"""``--mode=predict`` through the command line, with an imported (random) ResNet-18.

A corrupt file among good ones is skipped and listed, the others predicted;
``--strict`` stops at it; an image far from the training scale is named in
a warning; each folder gets its own CSV; an existing CSV is never replaced
unless ``--overwrite``.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from stagejax import models
from stagejax.evaluate import predict
from stagejax.model import saved
from tests.conftest import error_line, run_main

CROP = 32


def _png(size: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model dir, folder "slides": good, corrupt, 4x and 1.4x images, folder "more")."""
    tmp = tmp_path_factory.mktemp("predict")
    model = saved.save_model_weights(tmp / "model", models.create("resnet18"), "resnet18")
    slides = tmp / "a" / "slides"
    slides.mkdir(parents=True)
    for i in range(4):
        (slides / f"good_{i}.png").write_bytes(_png(40, i))
    (slides / "corrupt.png").write_bytes(_png(40, 9)[:300])  # truncated
    (slides / "x4.png").write_bytes(_png(160, 5))  # 4x the others, 5x the crop
    (slides / "x1_4.png").write_bytes(_png(45, 6))  # 1.4x the crop: within tolerance
    more = tmp / "b" / "more"
    more.mkdir(parents=True)
    for i in range(2):
        (more / f"m_{i}.png").write_bytes(_png(40, 20 + i))
    (more / "._m_0.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (more / "sub").mkdir()
    (more / "sub" / "s_0.png").write_bytes(_png(40, 30))
    return model, slides, more


def _predict(workdir: Path, model: Path, folder: Path, *extra: str):
    flags = ("--mode=predict", f"--images={folder}", *extra)
    fields = {"model": "resnet18", "crop_size": CROP, "init_from": model, "eval_batch_size": 4}
    return run_main(workdir, *flags, overrides=fields)


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {r["file_name"]: r for r in csv.DictReader(f)}


def test_predict_skips_bad_files_warns_on_scale_and_keeps_outputs(tmp_path, setup):
    model, slides, more = setup
    workdir = tmp_path / "W"
    res = _predict(workdir, model, slides)
    assert res.returncode == 0, res.stderr[-3000:]
    csv_path = workdir / "predict" / "slides" / "predictions.csv"
    rows = _rows(csv_path)

    # Every readable image is predicted; the corrupt one is listed with its error.
    assert sorted(rows) == sorted(p.name for p in slides.iterdir())
    for name, row in rows.items():
        probs = [row[c] for c in row if c.startswith("prob_")]
        assert len(probs) == 12
        if name == "corrupt.png":
            assert "cannot decode image (truncated or corrupt)" in row["error"], row
            assert row["pred_stage"] == row["confidence"] == "" and set(probs) == {""}
        else:
            assert row["error"] == "" and row["pred_stage"], row
            assert sum(map(float, probs)) == pytest.approx(1.0, abs=1e-3)
    log = res.stderr
    assert f"skipping {slides / 'corrupt.png'}: cannot decode" in log
    assert "1 of 7 images could not be used and were skipped" in log

    # The 4x image, and only it, is named as off the training scale.
    assert f"{slides / 'x4.png'}: 160x160 px, 5.0x the 32 px of the crop size" in log
    assert "1 image(s) differ in size" in log and "x1_4.png" not in log

    # Predicting the same folder again is refused; the CSV stays as it was.
    before = csv_path.read_bytes()
    res = _predict(workdir, model, slides)
    line = error_line(res)
    assert res.returncode == 2 and str(csv_path) in line and "--overwrite" in line, line
    assert csv_path.read_bytes() == before

    # Another folder gets its own CSV next to the first; macOS's ._ files are not
    # images, and the subfolder it does not read is named.
    res = _predict(workdir, model, more)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(_rows(workdir / "predict" / "more" / "predictions.csv")) == ["m_0.png", "m_1.png"]
    assert "1 subfolder(s) skipped (sub)" in res.stderr and "could not be used" not in res.stderr
    assert csv_path.read_bytes() == before

    # strict: stops at the corrupt file, naming it, and writes nothing.
    res = _predict(workdir, model, slides, "--strict", "--overwrite")
    line = error_line(res)
    assert res.returncode == 2 and line.startswith(f"error: {slides / 'corrupt.png'}: "), line
    assert "--strict" in line and csv_path.read_bytes() == before

    # overwrite: replaced, and the log says so.
    os.utime(csv_path, (0, 0))
    res = _predict(workdir, model, slides, "--overwrite")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"replaced {csv_path}" in res.stderr and csv_path.stat().st_mtime > 0
    assert _rows(csv_path)["good_0.png"]["pred_stage"]


def test_reference_size_of_a_trained_run(tmp_path, tiny_sim_dir):
    """Simulated runs: the simulated image size; runs on a data folder: the median
    short side of its prepared training images; otherwise the crop."""
    from stagejax.data import prepared as prepared_lib

    config = ml_collections.ConfigDict(
        {
            "data_dir": "",
            "crop_size": CROP,
            "cache_dir": str(tmp_path / "cache"),
            "simulated": {"image_size": 112},
        }
    )
    assert predict.reference_size(config, trained=True) == (112, "the simulated training images")
    config.data_dir = str(tiny_sim_dir)
    assert predict.reference_size(config, trained=True)[0] == CROP  # not prepared yet
    prepared_lib.prepare(tiny_sim_dir, tmp_path / "cache" / "prepared")
    assert predict.reference_size(config, trained=True) == (
        48,
        "the training images (median short side)",
    )
    assert predict.reference_size(config, trained=False)[0] == CROP  # imported weights
