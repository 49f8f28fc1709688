"""Classification metrics for stage prediction, built on one confusion matrix.

Why a confusion matrix: every number the study reports (accuracy, balanced
accuracy, macro/micro/weighted F1, +/-1-stage accuracy) is a function of the
12x12 matrix of (true stage, predicted stage) counts. Counts are *sums*, so a
matrix is exact however the examples were split over batches, devices or
hosts; ratios such as balanced accuracy are not, and averaging them per batch
would be wrong.

Why on the host, without ``clu.metrics``: an inference pass gathers every
example's probabilities in file order anyway (predictions.csv, features.npy,
the per-folder predictions), so the matrix is counted once from those, on
every host alike. A clu ``Collection`` accumulated on the devices would be a
second count of the same predictions that must agree with the first.
"""

from __future__ import annotations

import numpy as np

from stagejax.stages import NUM_STAGES, STAGES, biological_order, stage_distance, stage_ranks


def confusion_matrix(
    labels: np.ndarray, preds: np.ndarray, num_classes: int = NUM_STAGES
) -> np.ndarray:
    """Host-side (numpy) confusion matrix; labels outside [0, num_classes) are skipped."""
    labels = np.asarray(labels).reshape(-1)
    preds = np.asarray(preds).reshape(-1)
    if labels.shape != preds.shape:
        raise ValueError(f"preds: {preds.shape[0]} predictions for {labels.shape[0]} labels")
    keep = (labels >= 0) & (labels < num_classes)
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels[keep], preds[keep]), 1)
    return matrix


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def _per_stage_ratios(c: np.ndarray) -> tuple[list, list, list]:
    """Recall, precision and F1 per class (None where the denominator is empty)."""
    tp, support, predicted = np.diag(c), c.sum(axis=1), c.sum(axis=0)
    recall = [_ratio(t, s) for t, s in zip(tp, support, strict=True)]
    precision = [_ratio(t, p) for t, p in zip(tp, predicted, strict=True)]
    f1_den = 2 * tp + (predicted - tp) + (support - tp)  # 2TP + FP + FN
    f1 = [_ratio(2 * t, d) for t, d in zip(tp, f1_den, strict=True)]  # None: stage never seen
    return recall, precision, f1


def _cycle_distances(label_names, ranks) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Stage distances between classes (plain and cyclic) and the classes in cycle order."""
    k = len(label_names)
    r = np.asarray(stage_ranks(label_names) if ranks is None else ranks)
    if r.shape != (k,):
        raise ValueError(f"ranks: {r.shape[0]} ranks for {k} label names")
    dist = stage_distance(r[:, None], r[None, :])
    cyclic_dist = stage_distance(r[:, None], r[None, :], cyclic=True)
    return dist, cyclic_dist, biological_order(r.tolist())


def summarize(
    confusion: np.ndarray,
    loss: float | None = None,
    label_names: tuple[str, ...] | list[str] = STAGES,
    ranks: tuple[int, ...] | list[int] | None = None,
) -> dict:
    """Turns a confusion matrix (rows true, columns predicted) into report numbers.

    Rows and columns are class ids (``label_names`` order); ``ranks`` gives each
    class's place in the cycle (0 = stage I; see `stagejax.stages.stage_ranks`,
    which derives it from the names when None). The per-stage tables are listed
    in cycle order.

    Conventions (they match scikit-learn called on the same predictions):
      * balanced_accuracy: mean recall over stages that have examples
        (``balanced_accuracy_score``).
      * macro_f1: mean F1 over stages that occur as truth *or* prediction
        (``f1_score(average='macro', zero_division=0)`` with its default
        labels). A stage that is predicted but absent from the truth counts
        with F1 = 0; a stage neither present nor predicted is left out, since
        there is nothing to measure and a test split that lacks a stage should
        not lower the score.
      * micro_f1 equals accuracy for single-label prediction; weighted_f1
        weights per-stage F1 by support.
      * within1_accuracy: |rank(pred) - rank(true)| <= 1, i.e. at most one stage
        off in the cycle (as the study); within1_cyclic_accuracy also lets XII
        and I be neighbours.
    Ratios with an empty denominator are None (JSON null).
    """
    c = np.asarray(confusion, dtype=np.int64)
    k = len(label_names)
    if c.shape != (k, k):
        raise ValueError(f"confusion: shape {c.shape} does not match {k} label names")
    n = int(c.sum())
    tp, support = np.diag(c), c.sum(axis=1)  # support: true count per stage
    recall, precision, f1 = _per_stage_ratios(c)
    present_recall = [r for r in recall if r is not None]
    present_f1 = [f for f in f1 if f is not None]
    dist, cyclic_dist, order = _cycle_distances(label_names, ranks)

    def per_stage(values) -> dict:
        return {label_names[i]: values[i] for i in order}

    return {
        "num_examples": n,
        "loss": None if loss is None else float(loss),
        "accuracy": _ratio(tp.sum(), n),
        "balanced_accuracy": float(np.mean(present_recall)) if present_recall else None,
        "within1_accuracy": _ratio(c[dist <= 1].sum(), n),
        "within1_cyclic_accuracy": _ratio(c[cyclic_dist <= 1].sum(), n),
        "macro_f1": float(np.mean(present_f1)) if present_f1 else None,
        "micro_f1": _ratio(tp.sum(), n),
        "weighted_f1": (
            float(sum(support[i] * (f1[i] or 0.0) for i in range(k)) / n) if n else None
        ),
        "per_stage_recall": per_stage(recall),
        "per_stage_precision": per_stage(precision),
        "per_stage_f1": per_stage(f1),
        "support": per_stage([int(s) for s in support]),
    }
