"""Metrics must agree with scikit-learn and merge exactly across batches."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from stagejax import metrics
from stagejax.stages import NUM_STAGES, STAGES


def _logits_for(pred: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random logits whose argmax is ``pred``."""
    logits = rng.normal(size=(len(pred), NUM_STAGES)).astype(np.float32)
    logits[np.arange(len(pred)), pred] = 10.0
    return logits


def _confusion(labels, pred, mask=None) -> np.ndarray:
    rng = np.random.default_rng(0)
    m = metrics.ConfusionMatrix.from_model_output(
        jnp.asarray(_logits_for(np.asarray(pred), rng)),
        jnp.asarray(labels, jnp.int32),
        None if mask is None else jnp.asarray(mask),
    )
    return np.asarray(m.compute())


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
    np.testing.assert_array_equal(
        confusion, skm.confusion_matrix(y, p, labels=range(NUM_STAGES))
    )
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


def test_merging_halves_equals_whole_and_works_under_jit():
    rng = np.random.default_rng(5)
    n = 64
    y = rng.integers(0, NUM_STAGES, size=n).astype(np.int32)
    logits = rng.normal(size=(n, NUM_STAGES)).astype(np.float32)
    loss = rng.random(n).astype(np.float32)
    mask = rng.random(n) < 0.8

    @jax.jit
    def step(logits, labels, mask, loss):
        return metrics.EvalMetrics.single_from_model_output(
            logits=logits, labels=labels, mask=mask, loss=loss
        )

    whole = step(logits, y, mask, loss)
    half = n // 2
    merged = metrics.EvalMetrics.empty()
    for sl in (slice(0, half), slice(half, n)):
        merged = merged.merge(step(logits[sl], y[sl], mask[sl], loss[sl]))
    a, b = whole.compute(), merged.compute()
    np.testing.assert_array_equal(a["confusion"], b["confusion"])
    assert a["confusion"].dtype == jnp.int32
    assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6)
    assert float(a["loss"]) == pytest.approx(loss[mask].mean(), rel=1e-6)
    np.testing.assert_array_equal(
        a["confusion"], skm.confusion_matrix(y[mask], logits[mask].argmax(-1), labels=range(12))
    )
    # Stacking per-process states and reducing (what gather_across_processes does
    # after process_allgather) also equals the whole.
    parts = [step(logits[sl], y[sl], mask[sl], loss[sl]) for sl in (slice(0, half), slice(half, n))]
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *parts)
    np.testing.assert_array_equal(stacked.reduce().compute()["confusion"], a["confusion"])
    assert metrics.gather_across_processes(whole) is whole  # single process: no-op


def test_train_metrics():
    y = jnp.array([0, 1, 2, 3], jnp.int32)
    logits = jax.nn.one_hot(jnp.array([0, 1, 5, 3]), NUM_STAGES)
    m = metrics.TrainMetrics.single_from_model_output(
        logits=logits, labels=y, loss=jnp.float32(2.0)
    ).merge(
        metrics.TrainMetrics.single_from_model_output(
            logits=logits, labels=y, loss=jnp.float32(4.0)
        )
    )
    out = m.compute()
    assert float(out["accuracy"]) == pytest.approx(0.75)
    assert float(out["loss"]) == pytest.approx(3.0)


def test_host_confusion_matrix_matches_device_metric():
    rng = np.random.default_rng(6)
    y = rng.integers(-1, NUM_STAGES, size=50)  # -1: unknown, skipped
    logits = rng.normal(size=(50, NUM_STAGES)).astype(np.float32)
    host = metrics.confusion_matrix(y, logits.argmax(-1))
    device = metrics.ConfusionMatrix.from_model_output(jnp.asarray(logits), jnp.asarray(y))
    np.testing.assert_array_equal(host, np.asarray(device.compute()))
    keep = y >= 0
    np.testing.assert_array_equal(
        host, skm.confusion_matrix(y[keep], logits[keep].argmax(-1), labels=range(NUM_STAGES))
    )
