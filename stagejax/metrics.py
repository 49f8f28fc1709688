"""Classification metrics for stage prediction, built on one confusion matrix.

Why a confusion matrix: every number the study reports (accuracy, balanced
accuracy, macro/micro/weighted F1, +/-1-stage accuracy) is a function of the
12x12 matrix of (true stage, predicted stage) counts. Counts are *sums*, so the
matrix from two batches, two devices or two hosts is just the sum of theirs;
ratios such as balanced accuracy are not, and averaging them per batch would be
wrong. So the device side accumulates counts only (`ConfusionMatrix`, a clu
Metric) and `summarize` turns the final matrix into numbers on the host.

Distributed evaluation. Metric states here hold only sums (the confusion
matrix; clu's `Average` holds total and count), so merging is addition and
either of two patterns gives exact global numbers:

* jit on a globally sharded batch (the pattern this project uses): the step
  computes ``EvalMetrics.single_from_model_output(...)`` from the global
  ``jax.Array``; the reductions inside run over the whole global batch and XLA
  inserts the cross-device / cross-host sums, so every process holds the
  same, already global, metric state.
* per-process accumulation of local batches: each process merges its own
  states, then `gather_across_processes` (``process_allgather`` followed by a
  sum over the new leading axis, i.e. clu's ``reduce``) combines them.

Padding examples (eval batches are padded to a fixed size) are excluded with
``mask`` or a negative label.
"""

# NOTE: no ``from __future__ import annotations`` here: clu's Collection reads
# the metric classes from ``__annotations__`` and needs real classes, not strings.

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from stagejax.stages import NUM_STAGES, STAGES, biological_order, stage_distance, stage_ranks


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
    """Counts of (true class, predicted class) pairs; rows are true, columns predicted.

    Examples whose mask is False or whose label is outside [0, num_classes)
    (e.g. -1 for padding or unknown) are not counted.
    """

    matrix: jnp.ndarray  # int32 [num_classes, num_classes]

    @classmethod
    def empty(cls, num_classes: int = NUM_STAGES) -> "ConfusionMatrix":
        return cls(matrix=jnp.zeros((num_classes, num_classes), jnp.int32))

    @classmethod
    def from_model_output(
        cls, logits: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray | None = None, **_
    ) -> "ConfusionMatrix":
        """Builds the matrix of one batch: logits [..., C], labels and mask [...]."""
        num_classes = logits.shape[-1]
        logits = jnp.reshape(logits, (-1, num_classes))
        labels = jnp.reshape(labels, (-1,))
        if labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"labels: {labels.shape[0]} examples but logits has {logits.shape[0]}"
            )
        valid = (labels >= 0) & (labels < num_classes)
        if mask is not None:
            valid = valid & jnp.reshape(mask, (-1,)).astype(bool)
        # Scatter-add of 0/1 weights: exact integer counts on every backend;
        # invalid rows add 0 at a clipped (harmless) position.
        matrix = jnp.zeros((num_classes, num_classes), jnp.int32).at[
            jnp.clip(labels, 0, num_classes - 1), jnp.argmax(logits, axis=-1)
        ].add(valid.astype(jnp.int32))
        return cls(matrix=matrix)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if self.matrix.shape != other.matrix.shape:
            raise ValueError(
                f"confusion matrix shapes differ: {self.matrix.shape} vs {other.matrix.shape}"
            )
        return type(self)(matrix=self.matrix + other.matrix)

    def compute(self) -> jnp.ndarray:
        return self.matrix


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
    """Evaluation: masked mean of the per-example ``loss`` [B] and the confusion matrix.

    Use ``EvalMetrics.single_from_model_output(logits=, labels=, mask=, loss=)``
    with a per-example loss so the mask applies to it too.
    """

    loss: clu_metrics.Average.from_output("loss")
    confusion: ConfusionMatrix


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    """Training: mean loss and accuracy of the augmented training batches."""

    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Accuracy


def gather_across_processes(metrics):
    """Sums metric states (Metric or Collection) accumulated separately per process.

    Only needed when each process accumulated its own local batches; states
    computed under jit from globally sharded arrays are already global.
    """
    if jax.process_count() == 1:
        return metrics
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(metrics)  # leading axis: process
    return gathered.reduce()


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
    tp = np.diag(c)
    support = c.sum(axis=1)  # true count per stage
    predicted = c.sum(axis=0)  # predicted count per stage

    recall = [_ratio(tp[i], support[i]) for i in range(k)]
    precision = [_ratio(tp[i], predicted[i]) for i in range(k)]
    f1_den = 2 * tp + (predicted - tp) + (support - tp)  # 2TP + FP + FN
    f1 = [_ratio(2 * tp[i], f1_den[i]) for i in range(k)]  # None iff stage never seen

    present_recall = [r for r in recall if r is not None]
    present_f1 = [f for f in f1 if f is not None]
    r = np.asarray(stage_ranks(label_names) if ranks is None else ranks)
    if r.shape != (k,):
        raise ValueError(f"ranks: {r.shape[0]} ranks for {k} label names")
    dist = stage_distance(r[:, None], r[None, :])
    cyclic_dist = stage_distance(r[:, None], r[None, :], cyclic=True)
    order = biological_order(r.tolist())

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
