"""Figures of the stage-cycle analysis: an embedding coloured by stage, with the
stage centroids joined in cycle order (XII back to I)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stagejax.stages import NUM_STAGES, STAGES


def stage_colours() -> np.ndarray:
    """Cyclic colours for the 12 stages: XII sits next to I on the colour wheel."""
    import matplotlib  # heavy: imported only when drawing

    return matplotlib.colormaps["hsv"](np.arange(NUM_STAGES) / NUM_STAGES)


def plot_embedding(
    path: Path,
    points: np.ndarray,
    labels: np.ndarray,
    title: str,
    xlabel: str,
    ylabel: str,
    stage_names: Sequence[str] = STAGES,
) -> None:
    """Scatter coloured by stage (``labels``: cycle positions), stage centroids joined
    in cycle order (XII -> I); stages named by ``stage_names``."""
    from matplotlib.figure import Figure  # heavy: imported only when drawing
    from matplotlib.lines import Line2D

    colours = stage_colours()
    fig = Figure(figsize=(10.5, 8), layout="constrained")
    ax = fig.subplots()
    stages = np.unique(labels)
    for s in stages:
        pts = points[labels == s]
        ax.scatter(
            pts[:, 0],
            pts[:, 1],
            s=22,
            color=colours[s],
            edgecolors="0.25",
            linewidths=0.4,
            alpha=0.8,
            label=f"{stage_names[s]}  (n={len(pts)})",
        )
    _draw_cycle(ax, points, labels, stages, colours, stage_names)
    handles, names = ax.get_legend_handles_labels()
    handles.append(
        Line2D([], [], color="black", marker="o", markerfacecolor="white", markersize=11, lw=1.4)
    )
    first, last = stage_names[stages[0]], stage_names[stages[-1]]
    names.append(f"stage centroid,\njoined {first} -> ... -> {last} -> {first}")
    ax.legend(
        handles,
        names,
        title="true stage",
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        frameon=False,
    )
    fig.suptitle(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.savefig(path, dpi=110)


def score_text(name: str, stats: dict) -> str:
    n = len(stats["stages"])
    return (
        f"cycle score {name}: {stats['score']:.2f} "
        f"(random labels: {stats['random_mean']:.2f} ± {stats['random_std']:.2f}); "
        f"nearest centroid is a neighbouring stage for "
        f"{round(stats['neighbour_fraction'] * n)}/{n} stages"
    )


def _draw_cycle(ax, points, labels, stages, colours, stage_names) -> None:
    """The stage centroids, joined in cycle order with arrows, labelled by stage."""
    centroids = np.stack([points[labels == s].mean(axis=0) for s in stages])
    loop = np.concatenate([centroids, centroids[:1]])
    ax.plot(loop[:, 0], loop[:, 1], color="black", lw=1.4, alpha=0.7, zorder=3)
    for k, (s, c) in enumerate(zip(stages, centroids, strict=True)):
        nxt = loop[k + 1]  # arrow at mid-segment: direction of the cycle
        mid = (c + nxt) / 2
        ax.annotate(
            "",
            xy=mid,
            xytext=c + 0.45 * (nxt - c),
            zorder=3,
            arrowprops=dict(arrowstyle="-|>", color="black", lw=1.2, alpha=0.7),
        )
        ax.scatter(*c, s=420, color=colours[s], edgecolors="black", linewidths=1.5, zorder=4)
        r, g, b = colours[s][:3]
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # white text on dark markers
        ax.text(
            *c,
            stage_names[s],
            ha="center",
            va="center",
            fontsize=8,
            fontweight="bold",
            color="white" if dark else "black",
            zorder=5,
        )
