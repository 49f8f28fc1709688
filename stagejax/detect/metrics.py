"""Detection accuracy against ground-truth outlines: matching at IoU >= 0.5, as in COCO/PQ.

Detections and ground-truth tubules are paired one to one by the Hungarian
algorithm on their IoU (scipy's linear_sum_assignment); a pair counts as a true
positive when its IoU is at least `min_iou`. Precision = TP / detections,
recall = TP / ground truth, F1 their harmonic mean, and the mean IoU is over the
true-positive pairs.

The same numbers are given for stageable and non-stageable ground truth
separately (property "stageable", default true): recall and mean IoU over that
group's tubules, and precision counting its matches against the group's
detections, a detection belonging to the group of the ground-truth tubule it
overlaps most (a detection overlapping none belongs to both groups).
"""

from collections.abc import Sequence

import numpy as np
import shapely
from scipy.optimize import linear_sum_assignment

from stagejax.slides import SlideObject

MIN_IOU = 0.5


def iou_matrix(pred: Sequence, truth: Sequence) -> np.ndarray:
    """float (len(pred), len(truth)) IoU of every overlapping pair (0 elsewhere)."""
    out = np.zeros((len(pred), len(truth)))
    if not len(pred) or not len(truth):
        return out
    tree = shapely.STRtree(list(truth))
    p_idx, t_idx = tree.query(list(pred), predicate="intersects")
    for i, j in zip(p_idx, t_idx, strict=True):
        inter = pred[i].intersection(truth[j]).area
        union = pred[i].area + truth[j].area - inter
        out[i, j] = inter / union if union > 0 else 0.0
    return out


def _scores(tp: int, n_pred: int, n_truth: int, ious: list[float]) -> dict[str, float]:
    precision = tp / n_pred if n_pred else 1.0
    recall = tp / n_truth if n_truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "mean_iou": float(np.mean(ious)) if ious else 0.0,
        "num_detections": n_pred,
        "num_truth": n_truth,
        "true_positives": tp,
    }


def match(pred: Sequence, truth: Sequence, min_iou: float = MIN_IOU):
    """(pairs [(pred index, truth index, IoU)] with IoU >= min_iou, the IoU matrix)."""
    iou = iou_matrix(pred, truth)
    if not iou.size:
        return [], iou
    rows, cols = linear_sum_assignment(iou, maximize=True)
    pairs = [
        (int(i), int(j), float(iou[i, j]))
        for i, j in zip(rows, cols, strict=True)
        if iou[i, j] >= min_iou
    ]
    return pairs, iou


def evaluate(
    pred: Sequence[SlideObject], truth: Sequence[SlideObject], min_iou: float = MIN_IOU
) -> dict[str, dict[str, float]]:
    """{"all", "stageable", "non_stageable"} -> precision, recall, f1, mean_iou and counts."""
    pairs, iou = match([o.geometry for o in pred], [o.geometry for o in truth], min_iou)
    stageable = np.array([bool(o.properties.get("stageable", True)) for o in truth], bool)
    # Group of each detection: that of the truth it overlaps most; None when it overlaps none.
    owner = [int(np.argmax(r)) if r.size and r.max() > 0 else None for r in iou]
    out = {"all": _scores(len(pairs), len(pred), len(truth), [p[2] for p in pairs])}
    for name, want in (("stageable", True), ("non_stageable", False)):
        group = [p for p in pairs if stageable[p[1]] == want]
        n_pred = sum(1 for o in owner if o is None or stageable[o] == want)
        n_truth = int((stageable == want).sum())
        out[name] = _scores(len(group), n_pred, n_truth, [p[2] for p in group])
    return out


def pooled(results: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Scores of several sections pooled (counts summed; mean IoU weighted by matches)."""
    out = {}
    for name in results[0]:
        tp = sum(r[name]["true_positives"] for r in results)
        n_pred = sum(r[name]["num_detections"] for r in results)
        n_truth = sum(r[name]["num_truth"] for r in results)
        weighted = sum(r[name]["mean_iou"] * r[name]["true_positives"] for r in results)
        out[name] = _scores(tp, n_pred, n_truth, [weighted / tp] if tp else [])
    return out
