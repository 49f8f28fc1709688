"""Metrics must agree with scikit-learn."""

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from stagejax.evaluate import metrics
from stagejax.stages import NUM_STAGES, STAGES


def _confusion(labels, pred, mask=None) -> np.ndarray:
    """The matrix of the examples ``mask`` keeps (padding rows are labelled -1)."""
    labels = np.asarray(labels)
    if mask is not None:
        labels = np.where(mask, labels, -1)
    return metrics.confusion_matrix(labels, np.asarray(pred))


def _sklearn_summary(y, p) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        return {
            "accuracy": skm.accuracy_score(y, p),
            "balanced_accuracy": skm.balanced_accuracy_score(y, p),
            "macro_f1": skm.f1_score(y, p, average="macro", zero_division=0),
            "micro_f1": skm.f1_score(y, p, average="micro", zero_division=0),
            "weighted_f1": skm.f1_score(y, p, average="weighted", zero_division=0),
            "recall": skm.recall_score(
                y, p, labels=range(NUM_STAGES), average=None, zero_division=0
            ),
        }


def _check_against_sklearn(y: np.ndarray, p: np.ndarray, confusion: np.ndarray) -> dict:
    np.testing.assert_array_equal(confusion, skm.confusion_matrix(y, p, labels=range(NUM_STAGES)))
    got = metrics.summarize(confusion, loss=0.5)
    want = _sklearn_summary(y, p)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "micro_f1", "weighted_f1"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    for i, name in enumerate(STAGES):
        present = (y == i).any()
        assert got["support"][name] == int((y == i).sum())
        if present:
            assert got["per_stage_recall"][name] == pytest.approx(want["recall"][i])
        else:
            assert got["per_stage_recall"][name] is None
    assert got["loss"] == 0.5
    assert got["num_examples"] == len(y)
    return got


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_predictions_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_STAGES, size=200)
    # Mostly right, often off by one: like a real stage classifier.
    p = np.where(rng.random(200) < 0.6, y, (y + rng.integers(-2, 3, size=200)) % NUM_STAGES)
    _check_against_sklearn(y, p, _confusion(y, p))


def test_mask_and_negative_labels_are_excluded():
    rng = np.random.default_rng(3)
    y = rng.integers(0, NUM_STAGES, size=100)
    p = rng.integers(0, NUM_STAGES, size=100)
    mask = rng.random(100) < 0.7
    y_padded = np.where(rng.random(100) < 0.1, -1, y)  # -1: padding / unknown
    keep = mask & (y_padded >= 0)
    confusion = _confusion(y_padded, p, mask)
    assert confusion.sum() == keep.sum()
    _check_against_sklearn(y[keep], p[keep], confusion)


def test_absent_classes():
    # Stages IV and X never occur as truth; X is predicted (F1 0), IV never (left out).
    rng = np.random.default_rng(4)
    present = np.array([s for s in range(NUM_STAGES) if s not in (3, 9)])
    y = rng.choice(present, size=80)
    p = np.where(rng.random(80) < 0.5, y, rng.choice(present, size=80))
    p[:5] = 9
    got = _check_against_sklearn(y, p, _confusion(y, p))
    assert got["per_stage_f1"]["X"] == 0.0
    assert got["per_stage_f1"]["IV"] is None
    assert got["per_stage_precision"]["IV"] is None
    # Balanced accuracy averages only the 10 stages with examples.
    recalls = [r for r in got["per_stage_recall"].values() if r is not None]
    assert len(recalls) == 10
    assert got["balanced_accuracy"] == pytest.approx(np.mean(recalls))


def test_within_one_stage_accuracy():
    y = np.array([0, 0, 11, 11, 5, 5, 5, 3])
    p = np.array([0, 11, 0, 10, 7, 4, 6, 3])
    got = metrics.summarize(_confusion(y, p))
    d = np.abs(y - p)
    assert got["within1_accuracy"] == pytest.approx(np.mean(d <= 1))  # 5/8
    assert got["within1_accuracy"] == pytest.approx(5 / 8)
    assert got["within1_cyclic_accuracy"] == pytest.approx(np.mean(np.minimum(d, 12 - d) <= 1))
    assert got["within1_cyclic_accuracy"] == pytest.approx(7 / 8)  # XII<->I now count
    assert got["accuracy"] == pytest.approx(2 / 8)


def test_empty_matrix_gives_none():
    got = metrics.summarize(np.zeros((12, 12), np.int64))
    assert got["num_examples"] == 0
    assert got["accuracy"] is None and got["balanced_accuracy"] is None
    assert got["macro_f1"] is None and got["loss"] is None


def test_summarize_rejects_wrong_shape():
    with pytest.raises(ValueError, match="label names"):
        metrics.summarize(np.zeros((3, 3)))


def test_confusion_matrix_skips_unknown_labels():
    rng = np.random.default_rng(6)
    y = rng.integers(-1, NUM_STAGES, size=50)  # -1: unknown, skipped
    logits = rng.normal(size=(50, NUM_STAGES)).astype(np.float32)
    host = metrics.confusion_matrix(y, logits.argmax(-1))
    keep = y >= 0
    np.testing.assert_array_equal(
        host, skm.confusion_matrix(y[keep], logits[keep].argmax(-1), labels=range(NUM_STAGES))
    )
