"""Evaluation report a biologist can open: numbers, a table per image, and figures.

``write_eval_report`` fills one directory (``workdir/eval_<split>/``):

* ``metrics.json``: `stagejax.metrics.summarize` of the confusion matrix, the
  matrix itself, counts, and a short plain-language note.
* ``predictions.csv``: one row per image in the given order (file_name,
  true_stage, pred_stage, prob_I..prob_XII).
* ``confusion_matrix.png``: counts and row-normalised matrices side by side;
  the correct-stage diagonal is boxed and the +/-1-stage band outlined, since
  the study's point is that errors fall on neighbouring stages.
* ``confusion_per_stage.png``: one-vs-rest 2x2 table per stage, as the study
  shows them.
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
from stagejax.metrics import confusion_matrix, summarize
from stagejax.stages import STAGES

MARKER = ".stagejax_report"
REPORT_FILES = (
    "metrics.json",
    "predictions.csv",
    "confusion_matrix.png",
    "confusion_per_stage.png",
    "features.npy",
    "features_files.txt",
)
_TMP_PREFIX = ".stagejax_tmp_"


# ---------------------------------------------------------------------------
# Directory ownership and file writing.


def _claim_dir(out_dir: Path) -> None:
    """Makes ``out_dir`` ours: new, empty, or a previous stagejax report (then cleared)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = set(os.listdir(out_dir))
    ours = set(REPORT_FILES) | {MARKER}
    if entries and MARKER not in entries:
        raise FileExistsError(
            f"{out_dir}: not empty and not a stagejax report directory; "
            "choose a new output directory"
        )
    foreign = sorted(e for e in entries if e not in ours and not e.startswith(_TMP_PREFIX))
    if foreign:
        raise FileExistsError(
            f"{out_dir}: holds files a stagejax report did not write ({foreign[0]!r}, ...); "
            "refusing to overwrite"
        )
    # Clear the old report so a stale file (e.g. features.npy) cannot survive.
    for name in entries - {MARKER}:
        (out_dir / name).unlink()
    (out_dir / MARKER).write_text(
        json.dumps({"written_by": f"stagejax {__version__}", "files": list(REPORT_FILES)}) + "\n"
    )


def _atomic_write(path: Path, write) -> None:
    """Writes via a temporary file then renames, so readers never see half a file."""
    tmp = path.with_name(_TMP_PREFIX + path.name)
    write(tmp)
    os.replace(tmp, path)


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
) -> Path:
    """Writes predictions for unlabeled images: file_name, pred_stage, confidence, prob_*.

    An existing file is replaced only if it is an earlier stagejax predictions file.
    """
    out_path = Path(out_path)
    probs = np.asarray(probs, dtype=np.float64)
    _check_inputs(file_names, probs, label_names)
    header = ["file_name", "pred_stage", "confidence"] + [f"prob_{s}" for s in label_names]
    if out_path.exists():
        with out_path.open(newline="", encoding="utf-8") as f:
            first = next(csv.reader(f), None)
        if first != header:
            raise FileExistsError(f"{out_path}: exists and is not a stagejax predictions file")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, int)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for name, p, row in zip(file_names, pred, probs, strict=True):
                w.writerow([name, label_names[p], f"{row[p]:.4f}", *_fmt_probs(row)])

    _atomic_write(out_path, write)
    return out_path


def write_eval_report(
    out_dir: str | os.PathLike,
    file_names: Sequence[str],
    labels: np.ndarray,
    probs: np.ndarray,
    features: np.ndarray | None = None,
    loss: float | None = None,
    label_names: Sequence[str] = STAGES,
) -> dict:
    """Writes the report (see module docstring) and returns the metrics dict.

    Args:
      file_names: image file names, one per row.
      labels: int class index per image, -1 where the true stage is unknown
        (such rows are listed in predictions.csv but not scored).
      probs: [N, num_stages] predicted probabilities.
      features: optional [N, D] penultimate features.
      loss: optional mean evaluation loss.
    """
    out_dir = Path(out_dir)
    label_names = list(label_names)
    k = len(label_names)
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    _check_inputs(file_names, probs, label_names)
    if labels.shape[0] != probs.shape[0]:
        raise ValueError(f"labels: {labels.shape[0]} labels for {probs.shape[0]} rows of probs")
    if np.any((labels < -1) | (labels >= k)):
        raise ValueError(f"labels: values must be in [0, {k}) or -1 for unknown")
    if features is not None:
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[0] != probs.shape[0]:
            raise ValueError(
                f"features: expected shape [{probs.shape[0]}, D], got {features.shape}"
            )

    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    known = labels >= 0
    confusion = confusion_matrix(labels, pred, k)
    summary = summarize(confusion, loss, label_names)
    metrics = {
        **summary,
        "num_images": int(len(labels)),
        "num_labeled": int(known.sum()),
        "num_unlabeled": int((~known).sum()),
        "label_names": label_names,
        "confusion_matrix": confusion.tolist(),
        "note": _note(summary, confusion, label_names),
    }

    _claim_dir(out_dir)
    _atomic_write(
        out_dir / "metrics.json",
        lambda p: p.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n"),
    )

    header = ["file_name", "true_stage", "pred_stage"] + [f"prob_{s}" for s in label_names]

    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for name, y, p, row in zip(file_names, labels, pred, probs, strict=True):
                true = label_names[y] if y >= 0 else ""
                w.writerow([name, true, label_names[p], *_fmt_probs(row)])

    _atomic_write(out_dir / "predictions.csv", write_csv)

    if known.any():
        _atomic_write(
            out_dir / "confusion_matrix.png",
            lambda p: plot_confusion_matrix(p, confusion, label_names, summary),
        )
        _atomic_write(
            out_dir / "confusion_per_stage.png",
            lambda p: plot_per_stage(p, confusion, label_names),
        )
    if features is not None:
        _atomic_write(out_dir / "features.npy", lambda p: _save_npy(p, features))
        _atomic_write(
            out_dir / "features_files.txt",
            lambda p: p.write_text("".join(f"{n}\n" for n in file_names), encoding="utf-8"),
        )
    return metrics


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


# ---------------------------------------------------------------------------
# Figures (matplotlib's Agg canvas directly: no pyplot, no global backend state).


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _outline_band(ax, k: int) -> None:
    """Boxes the diagonal and draws the edges of the +/-1-stage band."""
    from matplotlib.patches import Rectangle

    for i in range(k):
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, ec="#c0392b", lw=2.2))
    # Staircase edges of the band |true - pred| <= 1 (cell (i, j) spans j +/- 0.5, i +/- 0.5).
    for side in (-1, 1):
        xs, ys = [], []
        for i in range(k):
            j = min(max(i + side, 0), k - 1)
            x = j + 0.5 * side
            xs += [x, x]
            ys += [i - 0.5, i + 0.5]
        ax.plot(xs, ys, color="#e67e22", lw=1.6, ls="--")
    # The cycle wraps: XII -> I neighbours sit in the two far corners.
    for i, j in ((0, k - 1), (k - 1, 0)):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="#e67e22", lw=1.6,
                               ls=":"))


def plot_confusion_matrix(
    path: Path, confusion: np.ndarray, label_names: Sequence[str], summary: dict
) -> None:
    """Two panels, counts and row-normalised; rows true stage, columns predicted."""
    import matplotlib as mpl
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    k = len(label_names)
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(support[:, None] > 0, confusion / support[:, None], np.nan)

    fig = _new_figure(16, 7.6)
    axes = fig.subplots(1, 2)
    cmap = mpl.colormaps["Blues"].with_extremes(bad="#d9d9d9")  # grey: rows without examples
    panels = [
        (axes[0], confusion.astype(float), max(int(confusion.max()), 1),
         "Number of images", lambda v: f"{int(v)}"),
        (axes[1], norm, 1.0, "Fraction of each true stage (row sums to 100%)",
         lambda v: f"{100 * v:.0f}%"),
    ]
    for ax, data, vmax, title, fmt in panels:
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0, vmax=vmax)
        for i in range(k):
            for j in range(k):
                v = data[i, j]
                if np.isfinite(v) and confusion[i, j] > 0:
                    ax.text(j, i, fmt(v), ha="center", va="center", fontsize=10,
                            color="white" if v > 0.55 * vmax else "black")
        _outline_band(ax, k)
        ax.set_xticks(range(k), label_names, fontsize=11)
        ax.set_yticks(range(k), label_names, fontsize=11)
        ax.set_xlabel("Predicted stage", fontsize=13)
        ax.set_ylabel("True stage", fontsize=13)
        ax.set_title(title, fontsize=13)
        ax.tick_params(top=False, length=0)
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        cb.ax.tick_params(labelsize=10)
        if vmax == 1.0:
            cb.ax.yaxis.set_major_formatter(mpl.ticker.PercentFormatter(1.0))
        else:
            cb.ax.yaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    # Number of images per true stage next to the counts panel.
    right = axes[0].secondary_yaxis("right")
    right.set_yticks(range(k), [f"n={s}" for s in support], fontsize=9, color="#555555")
    right.tick_params(length=0)

    fig.suptitle(
        f"Accuracy {_pct(summary['accuracy'])}   |   "
        f"Balanced accuracy {_pct(summary['balanced_accuracy'])}   |   "
        f"\u00b11 stage accuracy {_pct(summary['within1_accuracy'])}   "
        f"({summary['num_examples']} images)",
        fontsize=15, fontweight="bold",
    )
    fig.legend(
        handles=[
            Patch(fill=False, ec="#c0392b", lw=2.2, label="correct stage"),
            Line2D([], [], color="#e67e22", lw=1.6, ls="--", label="\u00b11 stage band"),
            Patch(fill=False, ec="#e67e22", lw=1.6, ls=":",
                  label=f"XII\u2013I neighbours (cycle wraps; \u00b11 with wrap "
                        f"{_pct(summary['within1_cyclic_accuracy'])})"),
            Patch(color="#d9d9d9", label="no images of this true stage"),
        ],
        loc="outside lower center", ncols=4, fontsize=11, frameon=False,
    )
    fig.savefig(path, format="png")


def plot_per_stage(path: Path, confusion: np.ndarray, label_names: Sequence[str]) -> None:
    """One-vs-rest 2x2 tables (stage vs all other stages), 3 rows x 4 columns."""
    k = len(label_names)
    n = int(confusion.sum())
    ncols = 4
    nrows = -(-k // ncols)
    fig = _new_figure(3.4 * ncols, 3.3 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).reshape(-1)
    for s, ax in enumerate(axes):
        if s >= k:
            ax.axis("off")
            continue
        tp = int(confusion[s, s])
        fn = int(confusion[s].sum()) - tp
        fp = int(confusion[:, s].sum()) - tp
        tn = n - tp - fn - fp
        table = np.array([[tp, fn], [fp, tn]])
        rows = table.sum(axis=1, keepdims=True)
        frac = np.divide(table, rows, out=np.zeros(table.shape), where=rows > 0)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(table[i, j]), ha="center", va="center", fontsize=13,
                        color="white" if frac[i, j] > 0.55 else "black")
        name = label_names[s]
        ax.set_xticks([0, 1], [f"pred {name}", "pred other"], fontsize=10)
        ax.set_yticks([0, 1], [f"true {name}", "true other"], fontsize=10)
        ax.tick_params(length=0)
        recall = _pct(tp / (tp + fn)) if tp + fn else "n/a"
        precision = _pct(tp / (tp + fp)) if tp + fp else "n/a"
        ax.set_title(f"Stage {name}\nrecall {recall}, precision {precision}", fontsize=11)
    fig.suptitle("Each stage against all others (counts; colour = fraction of the row)",
                 fontsize=14, fontweight="bold")
    fig.savefig(path, format="png")
