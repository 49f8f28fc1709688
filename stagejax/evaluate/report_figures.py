"""The report's figures: confusion matrix and per-stage one-vs-rest tables.

Both take matrices and names already in cycle order (stage I first), so the
+/-1-stage band is the matrix's tridiagonal. matplotlib's Agg canvas is used
directly: no pyplot, no global backend state. matplotlib is imported inside
the functions (heavy; only needed when a report is written).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy: only when drawing
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _outline_band(ax, k: int) -> None:
    """Boxes the diagonal and draws the edges of the +/-1-stage band."""
    from matplotlib.patches import Rectangle  # heavy: imported only when drawing

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
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="#e67e22", lw=1.6, ls=":"))


def _draw_panel(fig, ax, data, confusion, vmax, title, fmt, label_names, cmap) -> None:
    """One matrix panel: cells with their values, the +/-1 band, axes and colour bar."""
    import matplotlib as mpl  # heavy: imported only when drawing

    k = len(label_names)
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0, vmax=vmax)
    for i in range(k):
        for j in range(k):
            v = data[i, j]
            if np.isfinite(v) and confusion[i, j] > 0:
                ax.text(
                    j,
                    i,
                    fmt(v),
                    ha="center",
                    va="center",
                    fontsize=10,
                    color="white" if v > 0.55 * vmax else "black",
                )
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


def _title_and_legend(fig, summary: dict) -> None:
    from matplotlib.lines import Line2D  # heavy: imported only when drawing
    from matplotlib.patches import Patch

    fig.suptitle(
        f"Accuracy {_pct(summary['accuracy'])}   |   "
        f"Balanced accuracy {_pct(summary['balanced_accuracy'])}   |   "
        f"\u00b11 stage accuracy {_pct(summary['within1_accuracy'])}   "
        f"({summary['num_examples']} images)",
        fontsize=15,
        fontweight="bold",
    )
    fig.legend(
        handles=[
            Patch(fill=False, ec="#c0392b", lw=2.2, label="correct stage"),
            Line2D([], [], color="#e67e22", lw=1.6, ls="--", label="\u00b11 stage band"),
            Patch(
                fill=False,
                ec="#e67e22",
                lw=1.6,
                ls=":",
                label=f"XII\u2013I neighbours (cycle wraps; \u00b11 with wrap "
                f"{_pct(summary['within1_cyclic_accuracy'])})",
            ),
            Patch(color="#d9d9d9", label="no images of this true stage"),
        ],
        loc="outside lower center",
        ncols=4,
        fontsize=11,
        frameon=False,
    )


def plot_confusion_matrix(
    path: Path, confusion: np.ndarray, label_names: Sequence[str], summary: dict
) -> None:
    """Two panels, counts and row-normalised; rows true stage, columns predicted.

    ``confusion`` and ``label_names`` must already be in cycle order (stage I first).
    """
    import matplotlib as mpl  # heavy: imported only when drawing

    k = len(label_names)
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(support[:, None] > 0, confusion / support[:, None], np.nan)

    fig = _new_figure(16, 7.6)
    axes = fig.subplots(1, 2)
    cmap = mpl.colormaps["Blues"].with_extremes(bad="#d9d9d9")  # grey: rows without examples
    panels = [
        (
            axes[0],
            confusion.astype(float),
            max(int(confusion.max()), 1),
            "Number of images",
            lambda v: f"{int(v)}",
        ),
        (
            axes[1],
            norm,
            1.0,
            "Fraction of each true stage (row sums to 100%)",
            lambda v: f"{100 * v:.0f}%",
        ),
    ]
    for ax, data, vmax, title, fmt in panels:
        _draw_panel(fig, ax, data, confusion, vmax, title, fmt, label_names, cmap)
    # Number of images per true stage next to the counts panel.
    right = axes[0].secondary_yaxis("right")
    right.set_yticks(range(k), [f"n={s}" for s in support], fontsize=9, color="#555555")
    right.tick_params(length=0)

    _title_and_legend(fig, summary)
    fig.savefig(path, format="png")


def plot_per_stage(path: Path, confusion: np.ndarray, label_names: Sequence[str]) -> None:
    """One-vs-rest 2x2 tables (stage vs all other stages), 3 rows x 4 columns, in
    the order given (cycle order)."""
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
                ax.text(
                    j,
                    i,
                    str(table[i, j]),
                    ha="center",
                    va="center",
                    fontsize=13,
                    color="white" if frac[i, j] > 0.55 else "black",
                )
        name = label_names[s]
        ax.set_xticks([0, 1], [f"pred {name}", "pred other"], fontsize=10)
        ax.set_yticks([0, 1], [f"true {name}", "true other"], fontsize=10)
        ax.tick_params(length=0)
        recall = _pct(tp / (tp + fn)) if tp + fn else "n/a"
        precision = _pct(tp / (tp + fp)) if tp + fp else "n/a"
        ax.set_title(f"Stage {name}\nrecall {recall}, precision {precision}", fontsize=11)
    fig.suptitle(
        "Each stage against all others (counts; colour = fraction of the row)",
        fontsize=14,
        fontweight="bold",
    )
    fig.savefig(path, format="png")
