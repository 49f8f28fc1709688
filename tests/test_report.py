"""The evaluation report: file contents, alignment, figures, and overwrite safety."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from stagejax.errors import WorkdirError
from stagejax.evaluate import metrics, report
from stagejax.stages import NUM_STAGES, STAGES


def _fake_eval(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_STAGES, size=n)
    labels[:3] = -1  # unknown stage: listed, not scored
    pred = np.where(rng.random(n) < 0.6, labels, (labels + 1) % NUM_STAGES) % NUM_STAGES
    logits = rng.normal(size=(n, NUM_STAGES))
    logits[np.arange(n), pred] += 5.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    names = [f"slide{i % 3}_{i}_{STAGES[max(y, 0)]}-{i}.png" for i, y in enumerate(labels)]
    features = rng.normal(size=(n, 6)).astype(np.float32)
    return names, labels, probs, features


def _read_csv(path):
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_report_files_and_contents(tmp_path):
    names, labels, probs, features = _fake_eval()
    out = tmp_path / "eval_test"
    m = report.write_eval_report(out, names, labels, probs, features=features, loss=1.25)

    rows = _read_csv(out / "predictions.csv")
    assert rows[0] == ["file_name", "true_stage", "pred_stage"] + [f"prob_{s}" for s in STAGES]
    assert [r[0] for r in rows[1:]] == names  # input order kept
    for r, y, p in zip(rows[1:], labels, probs, strict=True):
        assert r[1] == ("" if y < 0 else STAGES[y])
        assert r[2] == STAGES[int(p.argmax())]
        assert all(len(v.split(".")[1]) == 4 for v in r[3:])  # 4 decimals
        np.testing.assert_allclose([float(v) for v in r[3:]], p, atol=5e-5)

    # metrics.json == summarize(confusion of the labelled rows) + counts + note.
    known = labels >= 0
    confusion = np.zeros((NUM_STAGES, NUM_STAGES), int)
    np.add.at(confusion, (labels[known], probs[known].argmax(1)), 1)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(m))
    expected = metrics.summarize(confusion, loss=1.25)
    for key, value in expected.items():
        assert on_disk[key] == json.loads(json.dumps(value)), key
    assert on_disk["confusion_matrix"] == confusion.tolist()
    assert (on_disk["num_images"], on_disk["num_labeled"], on_disk["num_unlabeled"]) == (40, 37, 3)
    assert "37 tubule images" in on_disk["note"]

    # Features: same rows, same order as predictions.csv.
    np.testing.assert_array_equal(np.load(out / "features.npy"), features)
    assert (out / "features_files.txt").read_text().splitlines() == names

    for name, min_size in (
        ("confusion_matrix.png", (1200, 600)),
        ("confusion_per_stage.png", (1000, 800)),
    ):
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.format == "PNG"
            assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
            assert np.asarray(im.convert("L")).std() > 10  # not blank
    assert not [p for p in out.iterdir() if p.name.startswith(".stagejax_tmp")]


def test_rewrite_own_report_removes_stale_files(tmp_path):
    names, labels, probs, features = _fake_eval()
    out = tmp_path / "eval"
    report.write_eval_report(out, names, labels, probs, features=features)
    # Second run without features: the old features must not linger, misaligned.
    report.write_eval_report(out, names[:10], labels[:10], probs[:10])
    assert not (out / "features.npy").exists()
    assert len(_read_csv(out / "predictions.csv")) == 11


def test_refuses_foreign_directory(tmp_path):
    names, labels, probs, _ = _fake_eval()
    foreign = tmp_path / "my_data"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(WorkdirError, match="my_data"):
        report.write_eval_report(foreign, names, labels, probs)
    assert (foreign / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    # A report directory that someone added a file to is refused too.
    out = tmp_path / "eval"
    report.write_eval_report(out, names, labels, probs)
    (out / "my_analysis.xlsx").write_text("x")
    with pytest.raises(WorkdirError, match="my_analysis.xlsx"):
        report.write_eval_report(out, names, labels, probs)


def test_no_known_labels_writes_table_only(tmp_path):
    names, _, probs, _ = _fake_eval(n=5)
    m = report.write_eval_report(tmp_path / "r", names, np.full(5, -1), probs)
    assert m["accuracy"] is None and m["num_labeled"] == 0
    assert not (tmp_path / "r" / "confusion_matrix.png").exists()
    assert [r[1] for r in _read_csv(tmp_path / "r" / "predictions.csv")[1:]] == [""] * 5


def test_bad_inputs(tmp_path):
    names, labels, probs, features = _fake_eval(n=6)
    with pytest.raises(ValueError, match="softmax"):
        report.write_eval_report(tmp_path / "a", names, labels, np.log(probs))
    with pytest.raises(ValueError, match="file_names"):
        report.write_eval_report(tmp_path / "b", names[:-1], labels, probs)
    with pytest.raises(ValueError, match="features"):
        report.write_eval_report(tmp_path / "c", names, labels, probs, features=features[:-1])
    with pytest.raises(ValueError, match="labels"):
        report.write_eval_report(tmp_path / "d", names, np.full(6, 12), probs)
    assert not any((tmp_path / d).exists() for d in "abcd")  # checked before writing


def test_write_predictions(tmp_path):
    names, _, probs, _ = _fake_eval(n=7)
    path = report.write_predictions(tmp_path / "out" / "predictions.csv", names, probs)
    rows = _read_csv(path)
    assert rows[0] == (
        ["file_name", "pred_stage", "confidence"] + [f"prob_{s}" for s in STAGES] + ["error"]
    )
    assert [r[0] for r in rows[1:]] == names
    for r, p in zip(rows[1:], probs, strict=True):
        assert r[1] == STAGES[int(p.argmax())]
        assert float(r[2]) == pytest.approx(p.max(), abs=5e-5)
    report.write_predictions(path, names[:2], probs[:2])  # own file: replaced
    assert len(_read_csv(path)) == 3
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(WorkdirError, match="other.csv"):
        report.write_predictions(other, names, probs)
