"""Class ids come from label_list.txt's lines; stage order and names from the names.

A label_list in another line order (lexicographic roman: I, II, III, IV, IX,
V, ...) must give the same true/predicted stages and the same +/-1 numbers as
the canonical order; arabic names work; names that are not stages are one
error line unless ``config.stage_order`` states the order.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stagejax import models
from stagejax.data.layout import read_layout, stage_from_file_name
from stagejax.errors import ConfigError, DatasetError
from stagejax.evaluate import metrics, report
from stagejax.model.saved import read_model_json, save_model_weights
from stagejax.stages import NUM_STAGES, STAGES, parse_stage, stage_ranks
from tests.conftest import REPO

LEXICOGRAPHIC = sorted(STAGES)  # I, II, III, IV, IX, V, VI, VII, VIII, X, XI, XII
ARABIC_LEXICOGRAPHIC = sorted(str(i) for i in range(1, 13))  # 1, 10, 11, 12, 2, ...
CUSTOM = [f"st{c}" for c in "abcdefghijkl"]  # not stage names; biological order a..l


def test_lexicographic_is_not_the_canonical_order():
    assert LEXICOGRAPHIC[4] == "IX" and LEXICOGRAPHIC != list(STAGES)


@pytest.mark.parametrize("names", [LEXICOGRAPHIC, ARABIC_LEXICOGRAPHIC, list(STAGES)])
def test_ranks_follow_the_names_in_any_line_order(names):
    ranks = stage_ranks(names)
    for name, rank in zip(names, ranks, strict=True):
        expected = STAGES.index(name) if name in STAGES else int(name) - 1
        assert rank == expected


def test_names_are_case_and_space_tolerant():
    assert [parse_stage(n) for n in (" vii ", "Vii", "V I I", "07", "12", "xii")] == [
        6,
        6,
        6,
        6,
        11,
        11,
    ]
    assert [parse_stage(n) for n in ("13", "0", "IIII", "7b", "", "٧")] == [None] * 6


def test_unknown_names_fail_in_one_line_naming_the_file():
    with pytest.raises(DatasetError) as e:
        stage_ranks(CUSTOM, source="/data/label_list.txt")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("/data/label_list.txt: label 'sta'")
    assert "stage_order" in msg
    with pytest.raises(DatasetError, match="'VII' and '7' are both stage VII"):
        stage_ranks(["VII", "7"])


def test_stage_order_rescues_unknown_names():
    shuffled = [CUSTOM[i] for i in (3, 0, 11, 5, 1, 2, 4, 6, 7, 8, 9, 10)]
    ranks = stage_ranks(shuffled, ", ".join(CUSTOM))
    assert ranks == (3, 0, 11, 5, 1, 2, 4, 6, 7, 8, 9, 10)
    with pytest.raises(ConfigError, match="config.stage_order: 'stz' is not a label"):
        stage_ranks(CUSTOM[:2], "sta,stz")
    with pytest.raises(ConfigError, match="config.stage_order: lacks 'stb'"):
        stage_ranks(CUSTOM[:2], "sta")
    with pytest.raises(ConfigError, match="listed twice"):
        stage_ranks(CUSTOM[:2], "sta,stb,sta")


# --------------------------------------------------------------------------
# Metrics and report: lexicographic order gives the canonical numbers


def _biological_eval(n: int = 300, seed: int = 0):
    """True and predicted biological stages (0..11), mostly right or one off."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, NUM_STAGES, n)
    off = rng.choice([-2, -1, 0, 0, 0, 1, 3], n)
    return true, (true + off) % NUM_STAGES


def _as_class_ids(stages: np.ndarray, names: list[str]) -> np.ndarray:
    """Biological stages -> class ids of a label_list holding ``names`` in that order."""
    return np.array([names.index(STAGES[s]) for s in stages])


def test_summarize_is_the_same_in_lexicographic_order():
    true, pred = _biological_eval()
    canonical = metrics.summarize(metrics.confusion_matrix(true, pred))
    t, p = _as_class_ids(true, LEXICOGRAPHIC), _as_class_ids(pred, LEXICOGRAPHIC)
    lex = metrics.summarize(metrics.confusion_matrix(t, p), label_names=LEXICOGRAPHIC)
    # Oracle: distances counted directly on the biological stage numbers.
    dist = np.abs(true - pred)
    assert lex["within1_accuracy"] == pytest.approx(np.mean(dist <= 1))
    assert lex["within1_cyclic_accuracy"] == pytest.approx(
        np.mean(np.minimum(dist, NUM_STAGES - dist) <= 1)
    )
    assert np.mean(np.minimum(dist, NUM_STAGES - dist) <= 1) > np.mean(dist <= 1)  # wraps
    for key in (
        "accuracy",
        "balanced_accuracy",
        "within1_accuracy",
        "within1_cyclic_accuracy",
        "macro_f1",
        "weighted_f1",
    ):
        assert lex[key] == pytest.approx(canonical[key]), key
    assert lex["per_stage_recall"] == pytest.approx(canonical["per_stage_recall"])
    assert list(lex["per_stage_recall"]) == list(STAGES)  # listed in cycle order
    # The bug this guards against: line order read as stage order.
    wrong = metrics.summarize(metrics.confusion_matrix(t, p))
    assert wrong["within1_accuracy"] != pytest.approx(canonical["within1_accuracy"])


def _probs(pred: np.ndarray, k: int = NUM_STAGES) -> np.ndarray:
    probs = np.full((len(pred), k), 0.02)
    probs[np.arange(len(pred)), pred] = 1 - 0.02 * (k - 1)
    return probs


def test_report_names_and_numbers_in_lexicographic_order(tmp_path):
    true, pred = _biological_eval(60)
    files = [f"slide_{i}_{STAGES[s]}-{i}.png" for i, s in enumerate(true)]
    t, p = _as_class_ids(true, LEXICOGRAPHIC), _as_class_ids(pred, LEXICOGRAPHIC)
    lex = report.write_eval_report(tmp_path / "lex", files, t, _probs(p), label_names=LEXICOGRAPHIC)
    canonical = report.write_eval_report(tmp_path / "canon", files, true, _probs(pred))
    with (tmp_path / "lex" / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["true_stage"] for r in rows] == [stage_from_file_name(n) for n in files]
    assert [r["pred_stage"] for r in rows] == [STAGES[s] for s in pred]
    assert all(float(r[f"prob_{STAGES[s]}"]) > 0.5 for r, s in zip(rows, pred, strict=True))
    for key in ("within1_accuracy", "within1_cyclic_accuracy", "balanced_accuracy"):
        assert lex[key] == pytest.approx(canonical[key])
    saved = json.loads((tmp_path / "lex" / "metrics.json").read_text())
    assert saved["label_names"] == LEXICOGRAPHIC and saved["stage_order"] == list(STAGES)
    assert saved["stage_ranks"] == list(stage_ranks(LEXICOGRAPHIC))


def test_report_with_a_stated_order(tmp_path):
    true, pred = _biological_eval(40)
    names = list(reversed(CUSTOM))  # line order: the reverse of the biological order
    ranks = stage_ranks(names, ",".join(CUSTOM))
    t = np.array([names.index(CUSTOM[s]) for s in true])
    p = np.array([names.index(CUSTOM[s]) for s in pred])
    got = report.write_eval_report(
        tmp_path / "r", [f"f{i}" for i in range(40)], t, _probs(p), label_names=names, ranks=ranks
    )
    assert got["within1_accuracy"] == pytest.approx(np.mean(np.abs(true - pred) <= 1))
    assert got["stage_order"] == CUSTOM
    with pytest.raises(DatasetError, match="stage_order"):  # no order stated
        report.write_eval_report(
            tmp_path / "r2", ["f"], [0], _probs(np.array([0])), label_names=names
        )


# --------------------------------------------------------------------------
# Layout and exported model


def _layout(root: Path, label_lines: list[str], stages: list[str]) -> Path:
    """Two images per stage in every split; file names carry ``stages``."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "split_list").mkdir()
    (root / "label_list.txt").write_text("".join(f"{n}\n" for n in label_lines))
    pixels = np.zeros((8, 8, 3), np.uint8)
    for split in ("train", "validation", "test"):
        files = [f"s_{split}{i}_{s}-{i}.png" for i, s in enumerate(stages * 2)]
        for name in files:
            Image.fromarray(pixels).save(root / "images" / name)
        (root / "split_list" / f"{split}.txt").write_text("\n".join(files) + "\n")
    return root


def test_layout_keeps_line_positions_and_finds_ranks(tmp_path):
    layout = read_layout(_layout(tmp_path / "lex", LEXICOGRAPHIC, list(STAGES)), check_images=False)
    for ex in layout.splits["test"]:
        assert layout.label_names[ex.label] == stage_from_file_name(ex.file_name)
        assert ex.label == LEXICOGRAPHIC.index(stage_from_file_name(ex.file_name))
    assert [STAGES[r] for r in layout.stage_ranks] == LEXICOGRAPHIC


def test_layout_with_unknown_names(tmp_path):
    root = _layout(tmp_path / "custom", CUSTOM[::-1], CUSTOM)
    with pytest.raises(DatasetError, match=r"label_list.txt: label 'stl' is not a stage"):
        read_layout(root, check_images=False)
    layout = read_layout(root, check_images=False, stage_order=",".join(CUSTOM))
    assert layout.stage_ranks == tuple(range(11, -1, -1))


def test_exported_model_carries_the_label_names(tmp_path):
    model = models.create("resnet18")
    ranks = stage_ranks(LEXICOGRAPHIC)
    save_model_weights(tmp_path / "m", model, "resnet18", 12, 3, LEXICOGRAPHIC, ranks)
    meta = read_model_json(tmp_path / "m")
    assert meta["label_names"] == LEXICOGRAPHIC and meta["stage_ranks"] == list(ranks)
    # model.json of an older run (no label names) means I..XII.
    path = tmp_path / "m" / "model.json"
    old = {
        k: v
        for k, v in json.loads(path.read_text()).items()
        if k not in ("label_names", "stage_ranks")
    }
    path.write_text(json.dumps(old))
    meta = read_model_json(tmp_path / "m")
    assert meta["label_names"] == list(STAGES) and meta["stage_ranks"] == list(range(12))


# --------------------------------------------------------------------------
# End to end: `python -m stagejax.main` on a lexicographic label_list


def _roman_lexicographic_copy(sim_dir: Path, root: Path) -> Path:
    """The simulated dataset (arabic names 1..12) renamed to roman stage names, with
    label_list.txt in lexicographic order."""
    shutil.copytree(sim_dir, root)
    rename = {}
    for path in sorted((root / "images").iterdir()):
        stage = stage_from_file_name(path.name)
        new = path.name.replace(f"_{stage}-", f"_{STAGES[int(stage) - 1]}-")
        path.rename(path.with_name(new))
        rename[path.name] = new
    for split_file in (root / "split_list").iterdir():
        names = split_file.read_text().split()
        split_file.write_text("".join(f"{rename[n]}\n" for n in names))
    (root / "label_list.txt").write_text("".join(f"{n}\n" for n in LEXICOGRAPHIC))
    return root


def test_cli_train_and_predict_with_a_lexicographic_label_list(tmp_path, tiny_sim_dir):
    data = _roman_lexicographic_copy(tiny_sim_dir, tmp_path / "data")
    workdir = tmp_path / "run"
    common = [
        f"--config={REPO / 'configs' / 'resnet.py'}",
        f"--workdir={workdir}",
        "--config.model=resnet18",
        f"--config.cache_dir={tmp_path / 'cache'}",
        "--config.crop_size=32",
        "--config.crop_range=4",
        "--config.num_epochs=1",
        "--config.global_batch_size=12",
        "--config.eval_batch_size=12",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def main(*flags: str, recipe: bool = True) -> None:
        """``recipe=False``: only --workdir, as a user of a trained workdir types it."""
        args = common if recipe else [f"--workdir={workdir}"]
        res = subprocess.run(
            [sys.executable, "-m", "stagejax.main", *args, *flags],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-3000:]

    main(f"--config.data_dir={data}")
    with (workdir / "eval_test" / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["true_stage"] == stage_from_file_name(r["file_name"]) for r in rows)
    assert set(r["pred_stage"] for r in rows) <= set(STAGES)
    saved = json.loads((workdir / "eval_test" / "metrics.json").read_text())
    assert saved["label_names"] == LEXICOGRAPHIC and list(saved["support"]) == list(STAGES)
    assert read_model_json(workdir / "best_model")["label_names"] == LEXICOGRAPHIC
    assert saved["data"] == str(data.resolve())

    # Eval on other data writes its own report and leaves the training run's as it was.
    other = shutil.copytree(data, tmp_path / "other data")
    before = (workdir / "eval_test" / "predictions.csv").read_bytes()
    main("--mode=eval", f"--config.data_dir={other}", recipe=False)
    assert (workdir / "eval_test" / "predictions.csv").read_bytes() == before
    report = json.loads((workdir / "eval_test_other_data" / "metrics.json").read_text())
    assert report["data"] == str(other.resolve())

    # Predict names the stages as the dataset does, probabilities in class-id order.
    main("--mode=predict", f"--images={data / 'images'}", recipe=False)
    out = next((workdir / "predict").rglob("predictions.csv"))
    with out.open(newline="") as f:
        header = next(csv.reader(f))
    assert [h.removeprefix("prob_") for h in header if h.startswith("prob_")] == LEXICOGRAPHIC


# --------------------------------------------------------------------------
# The analyses: cycle positions and Grad-CAM classes from the dataset's names


def test_cycle_analysis_reads_biological_positions(tmp_path):
    from stagejax.explain import cycle

    true, _ = _biological_eval(36)
    files = [f"slide_{i}_{STAGES[s]}-{i}.png" for i, s in enumerate(true)]
    t = _as_class_ids(true, LEXICOGRAPHIC)
    features = np.random.default_rng(0).normal(size=(36, 4))
    report.write_eval_report(
        tmp_path, files, t, _probs(t), features=features, label_names=LEXICOGRAPHIC
    )
    _, positions, names = cycle.read_eval_outputs(tmp_path)
    np.testing.assert_array_equal(positions, true)  # cycle positions, not class ids
    assert names == files
    assert cycle.read_stage_names(tmp_path)[1] == list(STAGES)


def test_gradcam_stage_names_map_to_class_ids():
    from stagejax.explain.gradcam_report import class_index

    ranks = stage_ranks(LEXICOGRAPHIC)
    assert class_index("IX", LEXICOGRAPHIC, ranks) == 4  # the label as written
    assert class_index("9", LEXICOGRAPHIC, ranks) == 4  # the same stage by number
    assert class_index("V", LEXICOGRAPHIC, ranks) == 5
    assert class_index("XIII", LEXICOGRAPHIC, ranks) is None
    assert class_index("stb", CUSTOM, stage_ranks(CUSTOM, ",".join(CUSTOM))) == 1
