"""Evaluation report a biologist can open: numbers, a table per image, and figures.

``write_eval_report`` fills one directory (``workdir/eval_<split>/``):

* ``metrics.json``: `stagejax.evaluate.metrics.summarize` of the confusion matrix, the
  matrix itself, counts, and a short plain-language note.
* ``predictions.csv``: one row per image in the given order (file_name,
  true_stage, pred_stage, one prob_<name> per class in label_list order).
* ``confusion_matrix.png``: counts and row-normalised matrices side by side,
  stages in cycle order (I..XII, whatever the label_list's line order); the
  correct-stage diagonal is boxed and the +/-1-stage band outlined, since
  the study's point is that errors fall on neighbouring stages.
* ``confusion_per_stage.png``: one-vs-rest 2x2 table per stage, as the study
  shows them, in cycle order.

Every file names the stages as the dataset does (``label_names``); the cycle
position of each class (``stage_ranks``) only decides order and distances.
* ``features.npy`` + ``features_files.txt``: penultimate features, rows in
  predictions.csv order (for t-SNE / UMAP).

A report directory is claimed with a marker file. The writer refuses a
directory that holds anything not written by an earlier stagejax report, so a
mistyped ``--out`` can never overwrite someone's data.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stagejax import __version__
from stagejax.errors import WorkdirError
from stagejax.evaluate.metrics import confusion_matrix, summarize
from stagejax.evaluate.report_figures import plot_confusion_matrix, plot_per_stage
from stagejax.runtime.files import TMP_PREFIX, atomic_write
from stagejax.stages import STAGES, biological_order, stage_ranks

MARKER = ".stagejax_report"
REPORT_FILES = (
    "metrics.json",
    "predictions.csv",
    "confusion_matrix.png",
    "confusion_per_stage.png",
    "features.npy",
    "features_files.txt",
)


# ---------------------------------------------------------------------------
# Directory ownership and file writing.


def _claim_dir(out_dir: Path) -> None:
    """Makes ``out_dir`` ours: new, empty, or a previous stagejax report (then cleared)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise WorkdirError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = set(os.listdir(out_dir))
    ours = set(REPORT_FILES) | {MARKER}
    if entries and MARKER not in entries:
        raise WorkdirError(
            f"{out_dir}: not empty and not a stagejax report directory; "
            "choose a new output directory"
        )
    foreign = sorted(e for e in entries if e not in ours and not e.startswith(TMP_PREFIX))
    if foreign:
        raise WorkdirError(
            f"{out_dir}: holds files a stagejax report did not write ({foreign[0]!r}, ...); "
            "refusing to overwrite"
        )
    # Clear the old report so a stale file (e.g. features.npy) cannot survive.
    for name in entries - {MARKER}:
        (out_dir / name).unlink()
    (out_dir / MARKER).write_text(
        json.dumps({"written_by": f"stagejax {__version__}", "files": list(REPORT_FILES)}) + "\n"
    )


def _fmt_probs(row: np.ndarray) -> list[str]:
    return [f"{p:.4f}" for p in row]


def _check_inputs(file_names: Sequence[str], probs: np.ndarray, label_names) -> None:
    k = len(label_names)
    if probs.ndim != 2 or probs.shape[1] != k:
        raise ValueError(f"probs: expected shape [N, {k}], got {probs.shape}")
    if len(file_names) != probs.shape[0]:
        raise ValueError(f"file_names: {len(file_names)} names for {probs.shape[0]} rows of probs")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError("probs: must be finite, non-negative (softmax of the logits)")
    if probs.shape[0] and not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probs: rows must sum to 1 (softmax of the logits)")


# ---------------------------------------------------------------------------
# Public API.


def write_predictions(
    out_path: str | os.PathLike,
    file_names: Sequence[str],
    probs: np.ndarray,
    label_names: Sequence[str] = STAGES,
    errors: Sequence[str] | None = None,
) -> Path:
    """Writes predictions for unlabeled images: file_name, pred_stage, confidence,
    prob_*, error.

    ``errors``: per image, empty or why it could not be predicted; such rows keep
    their file name and error but leave the prediction columns empty (their
    ``probs`` rows are ignored). An existing file is replaced only if it is an
    earlier stagejax predictions file.
    """
    out_path = Path(out_path)
    probs = np.asarray(probs, dtype=np.float64)
    errors = [""] * len(file_names) if errors is None else list(errors)
    if len(errors) != len(file_names):
        raise ValueError(f"errors: {len(errors)} entries for {len(file_names)} file names")
    if probs.ndim != 2 or len(probs) != len(file_names):
        _check_inputs(file_names, probs, label_names)  # raises: wrong shape
    good = np.array([not e for e in errors], bool)
    _check_inputs(
        [n for n, e in zip(file_names, errors, strict=True) if not e], probs[good], label_names
    )
    header = ["file_name", "pred_stage", "confidence", *(f"prob_{s}" for s in label_names), "error"]
    if out_path.exists():
        with out_path.open(newline="", encoding="utf-8") as f:
            first = next(csv.reader(f), None)
        if not first or first[:3] != header[:3]:
            raise WorkdirError(f"{out_path}: exists and is not a stagejax predictions file")
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for name, row, error in zip(file_names, probs, errors, strict=True):
                if error:
                    w.writerow([name, "", "", *([""] * len(label_names)), error])
                else:
                    p = int(row.argmax())
                    w.writerow([name, label_names[p], f"{row[p]:.4f}", *_fmt_probs(row), ""])

    atomic_write(out_path, write)
    return out_path


def write_eval_report(
    out_dir: str | os.PathLike,
    file_names: Sequence[str],
    labels: np.ndarray,
    probs: np.ndarray,
    features: np.ndarray | None = None,
    loss: float | None = None,
    label_names: Sequence[str] = STAGES,
    ranks: Sequence[int] | None = None,
    data: str | None = None,
) -> dict:
    """Writes the report (see module docstring) and returns the metrics dict.

    Args:
      file_names: image file names, one per row.
      labels: int class index per image, -1 where the true stage is unknown
        (such rows are listed in predictions.csv but not scored).
      probs: [N, num_stages] predicted probabilities.
      features: optional [N, D] penultimate features.
      loss: optional mean evaluation loss.
      label_names: the dataset's name of each class id (label_list.txt order).
      ranks: each class's cycle position (0 = stage I); None derives it from
        the names (`stagejax.stages.stage_ranks`).
      data: what the images are (a dataset folder, or simulated), recorded in metrics.json.
    """
    out_dir = Path(out_dir)
    label_names = list(label_names)
    ranks = list(stage_ranks(label_names) if ranks is None else ranks)
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    features = None if features is None else np.asarray(features)
    _check_report_inputs(file_names, labels, probs, features, label_names)
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    known = labels >= 0
    confusion = confusion_matrix(labels, pred, len(label_names))
    summary = summarize(confusion, loss, label_names, ranks)
    metrics = {
        **summary,
        "num_images": int(len(labels)),
        "num_labeled": int(known.sum()),
        "num_unlabeled": int((~known).sum()),
        "label_names": label_names,  # class id order: rows/columns of confusion_matrix
        "stage_ranks": [int(r) for r in ranks],  # cycle position of each class (0 = I)
        "stage_order": [label_names[i] for i in biological_order(ranks)],
        "confusion_matrix": confusion.tolist(),
        "note": _note(summary, confusion, label_names),
    }
    if data is not None:
        metrics["data"] = data

    _claim_dir(out_dir)
    atomic_write(
        out_dir / "metrics.json",
        lambda p: p.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n"),
    )

    _write_eval_csv(out_dir / "predictions.csv", file_names, labels, pred, probs, label_names)
    if known.any():
        _write_figures(out_dir, confusion, label_names, ranks, summary)
    if features is not None:
        atomic_write(out_dir / "features.npy", lambda p: _save_npy(p, features))
        atomic_write(
            out_dir / "features_files.txt",
            lambda p: p.write_text("".join(f"{n}\n" for n in file_names), encoding="utf-8"),
        )
    return metrics


def _check_report_inputs(file_names, labels, probs, features, label_names) -> None:
    k = len(label_names)
    _check_inputs(file_names, probs, label_names)
    if labels.shape[0] != probs.shape[0]:
        raise ValueError(f"labels: {labels.shape[0]} labels for {probs.shape[0]} rows of probs")
    if np.any((labels < -1) | (labels >= k)):
        raise ValueError(f"labels: values must be in [0, {k}) or -1 for unknown")
    if features is not None and (features.ndim != 2 or features.shape[0] != probs.shape[0]):
        raise ValueError(f"features: expected shape [{probs.shape[0]}, D], got {features.shape}")


def _write_eval_csv(path: Path, file_names, labels, pred, probs, label_names) -> None:
    """predictions.csv of a labelled split: file_name, true_stage, pred_stage, prob_*."""
    header = ["file_name", "true_stage", "pred_stage"] + [f"prob_{s}" for s in label_names]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for name, y, p, row in zip(file_names, labels, pred, probs, strict=True):
                true = label_names[y] if y >= 0 else ""
                w.writerow([name, true, label_names[p], *_fmt_probs(row)])

    atomic_write(path, write)


def _write_figures(
    out_dir: Path,
    confusion: np.ndarray,
    label_names: list[str],
    ranks: Sequence[int],
    summary: dict,
) -> None:
    """The two figures, in cycle order: the +/-1 band is then the matrix's tridiagonal."""
    order = biological_order(ranks)
    cycle_confusion = confusion[np.ix_(order, order)]
    cycle_names = [label_names[i] for i in order]
    atomic_write(
        out_dir / "confusion_matrix.png",
        lambda p: plot_confusion_matrix(p, cycle_confusion, cycle_names, summary),
    )
    atomic_write(
        out_dir / "confusion_per_stage.png",
        lambda p: plot_per_stage(p, cycle_confusion, cycle_names),
    )


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:  # a file object: np.save would append ".npy" to the tmp name
        np.save(f, array)


# ---------------------------------------------------------------------------
# Plain-language summary.


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _note(summary: dict, confusion: np.ndarray, label_names: list[str]) -> str:
    n = summary["num_examples"]
    if n == 0:
        return "No image has a known stage, so nothing is scored; see predictions.csv."
    parts = [
        f"{n} tubule images with a known stage.",
        f"Exact stage correct: {_pct(summary['accuracy'])}; within +/-1 stage: "
        f"{_pct(summary['within1_accuracy'])} "
        f"({_pct(summary['within1_cyclic_accuracy'])} if XII and I count as neighbours).",
        f"Balanced accuracy (mean of per-stage recall over the "
        f"{sum(r is not None for r in summary['per_stage_recall'].values())} stages present): "
        f"{_pct(summary['balanced_accuracy'])}.",
    ]
    recalls = [(r, s) for s, r in summary["per_stage_recall"].items() if r is not None]
    weakest = sorted(recalls)[:2]
    parts.append("Lowest recall: " + ", ".join(f"stage {s} {_pct(r)}" for r, s in weakest) + ".")
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    if off.any():
        t, p = np.unravel_index(np.argmax(off), off.shape)
        parts.append(
            f"Most frequent error: true {label_names[t]} predicted as {label_names[p]} "
            f"({off[t, p]} images)."
        )
    parts.append("In confusion_matrix.png rows are true stages and columns predicted stages.")
    return " ".join(parts)
