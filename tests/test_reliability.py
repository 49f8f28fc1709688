"""Bad input and diverging runs through the real command line.

Every malformed dataset, workdir or config override must stop
``python -m stagejax.main`` with a non-zero exit and one ``error:`` line on
stderr naming the file or field, before training starts and without touching
the workdir. A run whose loss or weights become NaN/Inf must stop the same way
and keep only finite checkpoints.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from tests.conftest import error_line, run_main, shipped_config

STAGES = [str(s) for s in range(1, 13)]
SIZE, CROP = 40, 32


def _image(seed: int, size: int = SIZE) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _write_split(root: Path, split: str, names: list[str]) -> None:
    (root / "split_list" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))


def _add_image(root: Path, split: str, name: str, content: bytes | None = None) -> None:
    """Write images/``name`` (random pixels unless ``content``) and list it in ``split``."""
    path = root / "images" / name
    if content is None:
        _image(len(name)).save(path)
    else:
        path.write_bytes(content)
    names = (root / "split_list" / f"{split}.txt").read_text().split()
    _write_split(root, split, [*names, name])


@pytest.fixture(scope="module")
def valid_dir(tmp_path_factory) -> Path:
    """A valid layout: 2 train images per stage (2 steps/epoch at batch 12), 3 validation,
    3 test; random pixels, SIZE px."""
    root = tmp_path_factory.mktemp("data") / "valid"
    (root / "images").mkdir(parents=True)
    (root / "split_list").mkdir()
    (root / "label_list.txt").write_text("".join(f"{s}\n" for s in STAGES))
    stages = {"train": STAGES * 2, "validation": ["1", "5", "9"], "test": ["2", "6", "10"]}
    seed = 0
    for split, split_stages in stages.items():
        names = []
        for i, stage in enumerate(split_stages):
            names.append(f"2021_{split}_{stage}-{i}.png")
            _image(seed).save(root / "images" / names[-1])
            seed += 1
        _write_split(root, split, names)
    return root


def _first_listed(root: Path, split: str = "train") -> str:
    return (root / "split_list" / f"{split}.txt").read_text().split()[0]


def _replace_first(root: Path, new_name: str, content: bytes) -> None:
    """Swap the first train image for ``new_name`` with ``content`` (same stage)."""
    old = _first_listed(root)
    (root / "images" / old).unlink()
    (root / "images" / new_name).write_bytes(content)
    names = (root / "split_list" / "train.txt").read_text().split()
    _write_split(root, "train", [new_name, *names[1:]])


def _encoded(fmt: str, size: int = SIZE) -> bytes:
    buf = io.BytesIO()
    _image(7, size).save(buf, format=fmt)
    return buf.getvalue()


# Each case breaks a copy of the valid layout and returns (data_dir, text the
# error line must contain: the offending file or field).
def _missing_folder(root: Path) -> tuple[Path, str]:
    return root / "no_such_dataset", "no_such_dataset"


def _missing_split_file(root: Path) -> tuple[Path, str]:
    (root / "split_list" / "test.txt").unlink()
    return root, "test.txt"


def _empty_split(root: Path) -> tuple[Path, str]:
    (root / "split_list" / "validation.txt").write_text("\n")
    return root, "validation.txt"


def _listed_file_missing(root: Path) -> tuple[Path, str]:
    name = _first_listed(root, "test")
    (root / "images" / name).unlink()
    return root, name


def _no_stage_in_name(root: Path) -> tuple[Path, str]:
    _add_image(root, "train", "nostage.png")
    return root, "nostage.png"


def _unknown_stage(root: Path) -> tuple[Path, str]:
    _add_image(root, "validation", "2021_validation_13-7.png")
    return root, "2021_validation_13-7.png"


def _truncated_tiff(root: Path) -> tuple[Path, str]:
    data = _encoded("TIFF")
    _replace_first(root, "2021_train_1-0.tif", data[: len(data) // 2])
    return root, "2021_train_1-0.tif"


def _zero_byte_file(root: Path) -> tuple[Path, str]:
    name = _first_listed(root, "validation")
    (root / "images" / name).write_bytes(b"")
    return root, name


def _not_an_image(root: Path) -> tuple[Path, str]:
    _replace_first(root, "2021_train_1-0.tif", b"slide notes, not a TIFF\n" * 20)
    return root, "2021_train_1-0.tif"


def _smaller_than_crop(root: Path) -> tuple[Path, str]:
    name = _first_listed(root, "test")
    (root / "images" / name).write_bytes(_encoded("PNG", CROP - 8))
    return root, name


def _duplicate_across_splits(root: Path) -> tuple[Path, str]:
    name = _first_listed(root, "train")
    names = (root / "split_list" / "test.txt").read_text().split()
    _write_split(root, "test", [*names, name])
    return root, name


def _train_lacks_stage(root: Path) -> tuple[Path, str]:
    names = (root / "split_list" / "train.txt").read_text().split()
    _write_split(root, "train", [n for n in names if "_7-" not in n])
    return root, "train.txt"


def _duplicate_label(root: Path) -> tuple[Path, str]:
    (root / "label_list.txt").write_text("".join(f"{s}\n" for s in [*STAGES, "3"]))
    return root, "label_list.txt"


DATA_CASES: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "missing_folder": _missing_folder,
    "missing_split_file": _missing_split_file,
    "empty_split": _empty_split,
    "listed_file_missing": _listed_file_missing,
    "no_stage_in_name": _no_stage_in_name,
    "unknown_stage": _unknown_stage,
    "truncated_tiff": _truncated_tiff,
    "zero_byte_file": _zero_byte_file,
    "non_image_with_tif_suffix": _not_an_image,
    "smaller_than_crop": _smaller_than_crop,
    "duplicate_across_splits": _duplicate_across_splits,
    "train_lacks_stage": _train_lacks_stage,
    "duplicate_label": _duplicate_label,
}


def _overrides(data_dir: Path, cache_dir: Path) -> dict:
    return {
        "data_dir": str(data_dir),
        "cache_dir": str(cache_dir),
        "model": "resnet18",
        "crop_size": CROP,
        "crop_range": 4,
        "num_epochs": 3,
    }


def _existing_workdir(path: Path, overrides: dict) -> None:
    """A workdir of an earlier run with this config (so the new run would resume it)."""
    from stagejax.runtime import workdir

    config = shipped_config(overrides)
    path.mkdir(parents=True)
    workdir.write_config(path, config)
    (path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.5}\n')
    (path / "notes.txt").write_text("do not delete\n")


def _snapshot(path: Path) -> dict[str, tuple]:
    """Every file and folder under ``path``: bytes and mtime, so any write shows."""
    out = {}
    for p in sorted(path.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(path))] = (
            (p.read_bytes(), st.st_mtime_ns) if p.is_file() else ("dir", st.st_mtime_ns)
        )
    return out


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_dataset_is_one_error_line_and_leaves_workdir_untouched(case, tmp_path, valid_dir):
    root = tmp_path / "data"
    shutil.copytree(valid_dir, root)
    data_dir, culprit = DATA_CASES[case](root)
    overrides = _overrides(data_dir, tmp_path / "cache")
    workdir = tmp_path / "workdir"
    _existing_workdir(workdir, overrides)
    before = _snapshot(workdir)

    res = run_main(workdir, overrides=overrides)

    line = error_line(res)
    assert culprit in line, line
    assert "training resnet18" not in res.stderr  # stopped before the training loop
    assert _snapshot(workdir) == before  # nothing written, changed or deleted
    assert not (workdir / "checkpoints").exists()
    assert not list((tmp_path / "cache").rglob("layout-*"))  # no dataset cache built


def test_bad_dataset_leaves_a_new_workdir_empty(tmp_path, valid_dir):
    root = tmp_path / "data"
    shutil.copytree(valid_dir, root)
    _, culprit = _truncated_tiff(root)
    workdir = tmp_path / "new_workdir"

    res = run_main(workdir, overrides=_overrides(root, tmp_path / "cache"))

    assert culprit in error_line(res)
    assert not workdir.exists() or not any(workdir.iterdir())


def test_unwritable_workdir(tmp_path, valid_dir):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop root from writing")
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    workdir.chmod(0o555)
    try:
        res = run_main(workdir, overrides=_overrides(valid_dir, tmp_path / "cache"))
        line = error_line(res)
    finally:
        workdir.chmod(0o755)
    assert str(workdir) in line and "not writable" in line, line
    assert not any(workdir.iterdir())


def test_workdir_that_cannot_be_created(tmp_path, valid_dir):
    """Also when running as root: a workdir inside a regular file."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    workdir = blocker / "workdir"

    res = run_main(workdir, overrides=_overrides(valid_dir, tmp_path / "cache"))

    line = error_line(res)
    assert str(workdir) in line and "not writable" in line, line
    assert blocker.read_text() == "not a folder\n"


@pytest.mark.parametrize(
    "flag,field",
    [
        ("--config.nosuchfield=1", "nosuchfield"),
        ("--config.augment.nosuchfield=1", "nosuchfield"),
        ("--config.num_epochs=abc", "num_epochs"),
        ("--config.crop_size=1.5", "crop_size"),
    ],
)
def test_bad_config_override_is_one_error_line(flag, field, tmp_path, valid_dir):
    overrides = _overrides(valid_dir, tmp_path / "cache")
    workdir = tmp_path / "workdir"
    _existing_workdir(workdir, overrides)
    before = _snapshot(workdir)

    res = run_main(workdir, flag, overrides=overrides)

    line = error_line(res)
    assert field in line, line
    assert _snapshot(workdir) == before
    assert not (tmp_path / "cache").exists()


def _params_finite(step_dir: Path) -> bool:
    with ocp.StandardCheckpointer() as ckptr:
        state = jax.device_get(ckptr.restore(step_dir / "state"))
    leaves = jax.tree.leaves((state["params"], state["batch_stats"]))
    return bool(leaves) and all(np.isfinite(x).all() for x in leaves)


def test_diverging_run_stops_and_keeps_only_finite_checkpoints(tmp_path, valid_dir):
    """Step 1 has learning rate 0 (warmup from 0), step 2 a learning rate near the
    float32 maximum: its loss is still finite (computed before the update) but the
    update overflows the weights. No checkpoint may hold them."""
    overrides = {
        **_overrides(valid_dir, tmp_path / "cache"),
        "optimizer": "sgd",
        "learning_rate": 3e38,
        "schedule": "cosine",
        "warmup_epochs": 0.5,
        "checkpoint_every_steps": 1,
        "log_every_steps": 10,
    }
    workdir = tmp_path / "workdir"

    res = run_main(workdir, overrides=overrides)

    line = error_line(res)
    assert res.returncode == 2
    assert "NaN/Inf by step 2" in line and "last good checkpoint (step 1)" in line, line
    latest = workdir / "checkpoints" / "latest"
    assert sorted(p.name for p in latest.iterdir()) == ["1"]
    assert _params_finite(latest / "1")
    assert not (workdir / "checkpoints" / "best").exists()  # created by its first save
    assert not (workdir / "best_model").exists()
