"""Imported PyTorch weights drive `--mode=eval` and `--mode=predict` with no training run.

The oracle is torchvision itself: the same weights, the same centre crop and
per-image min-max, evaluated by torch, must give the probabilities stagejax
writes into its CSV files.
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stagejax import convert
from tests.conftest import require_torch, run_main

torch, torchvision = require_torch()

from tests.test_convert import randomize  # noqa: E402

CROP = 32


def _torch_probs(model: torch.nn.Module, path: Path, tta: bool = False) -> np.ndarray:
    """Centre crop, per-image min-max, softmax; with ``tta`` averaged over the 8
    rotations/flips of the crop."""
    image = np.asarray(Image.open(path).convert("RGB"), np.float32)
    h, w = image.shape[:2]
    top, left = (h - CROP) // 2, (w - CROP) // 2
    x = image[top : top + CROP, left : left + CROP]
    x = torch.from_numpy((x - x.min()) / (x.max() - x.min())).permute(2, 0, 1)[None]
    views = [x]
    if tta:
        views = [
            v for k in range(4) for r in [torch.rot90(x, k, dims=(2, 3))] for v in (r, r.flip(3))
        ]
    with torch.inference_mode():
        return np.mean([torch.softmax(model(v), -1)[0].numpy() for v in views], axis=0)


def _read_probs(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in rows[0] if c.startswith("prob_")]
    assert len(cols) == 12
    return {r["file_name"]: np.array([float(r[c]) for c in cols]) for r in rows}


def _main(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    fields = {"model": "resnet18", "crop_size": CROP, "crop_range": 4}
    return run_main(workdir, *args, overrides={**fields, "cache_dir": workdir.parent / "cache"})


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    reference = randomize(torchvision.models.resnet18(num_classes=12)).eval()
    tmp = tmp_path_factory.mktemp("imported")
    torch.save(reference.state_dict(), tmp / "resnet18.pth")
    return reference, convert.convert_file(tmp / "resnet18.pth", "resnet18", tmp / "model")


def test_eval_and_predict_with_imported_weights(tmp_path, tiny_sim_dir, imported):
    reference, model_dir = imported
    images = tiny_sim_dir / "images"
    test_files = (tiny_sim_dir / "split_list" / "test.txt").read_text().split()
    expected = {f: _torch_probs(reference, images / f) for f in test_files}

    workdir = tmp_path / "eval"
    r = _main(
        workdir,
        "--mode=eval",
        f"--config.init_from={model_dir}",
        f"--config.data_dir={tiny_sim_dir}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = _read_probs(workdir / "eval_test" / "predictions.csv")
    assert sorted(got) == sorted(test_files)
    for f in test_files:
        np.testing.assert_allclose(got[f], expected[f], atol=1e-4, err_msg=f)
    assert not list(workdir.glob("checkpoints/*/[0-9]*")), "evaluation must not train"

    # That workdir now holds a config.json: a later run there needs only --workdir; it
    # takes the model, data and crop from it, and the split from the command line.
    r = run_main(workdir, "--mode=eval", "--config.eval_split=validation", config=None)
    assert r.returncode == 0, r.stderr[-2000:]
    val_files = (tiny_sim_dir / "split_list" / "validation.txt").read_text().split()
    got = _read_probs(workdir / "eval_validation" / "predictions.csv")
    assert sorted(got) == sorted(val_files)
    for f in val_files:
        np.testing.assert_allclose(
            got[f], _torch_probs(reference, images / f), atol=1e-4, err_msg=f
        )

    folder = tmp_path / "unlabeled"
    folder.mkdir()
    for f in test_files[:5]:
        (folder / f).write_bytes((images / f).read_bytes())
    workdir = tmp_path / "predict"
    r = _main(
        workdir,
        "--mode=predict",
        f"--config.init_from={model_dir}",
        f"--images={folder}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = _read_probs(workdir / "predict" / "unlabeled" / "predictions.csv")
    assert sorted(got) == sorted(test_files[:5])
    for f in test_files[:5]:
        np.testing.assert_allclose(got[f], expected[f], atol=1e-4, err_msg=f)

    # Test-time augmentation: the mean over the 8 rotations/flips, not the plain crop.
    workdir = tmp_path / "predict_tta"
    r = _main(
        workdir,
        "--mode=predict",
        f"--config.init_from={model_dir}",
        f"--images={folder}",
        "--tta",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = _read_probs(workdir / "predict" / "unlabeled" / "predictions.csv")
    for f in test_files[:5]:
        tta = _torch_probs(reference, images / f, tta=True)
        np.testing.assert_allclose(got[f], tta, atol=1e-4, err_msg=f)
    assert (
        max(
            np.abs(_torch_probs(reference, images / f, tta=True) - expected[f]).max()
            for f in test_files[:5]
        )
        > 1e-3
    )  # TTA changes the answer: the check has teeth


def test_eval_without_a_model_is_a_one_line_error(tmp_path, tiny_sim_dir):
    r = _main(tmp_path / "nothing", "--mode=predict", f"--images={tiny_sim_dir}")
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "config.json" in lines[0], r.stderr[-2000:]
