"""What section mode leaves for each slide: tables, QuPath objects and two pictures.

``write_section_outputs(out_dir, result)`` writes::

  tubules.csv             one row per tubule: position, size, stage, confidence, P(stage)
  tubules.geojson         the same as QuPath detections, classified by stage
  stage_frequencies.csv   stageable tubules per stage next to the share stage durations predict
  stage_frequencies.png   the same as a bar chart
  overlay.png             the section with each tubule coloured by its stage
  review.csv              the tubules below ``review_below`` confidence, least sure first

Stages are shown by the dataset's own names (``label_names``) and always in
cycle order (stage I first), whatever order the class ids have. Only
stageable tubules count towards frequencies: grazing and edge-cut profiles
do not show their stage. Every file is replaced only once written whole, and
``tubules.csv`` comes last, so its presence means the slide's set is complete.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import shapely
from PIL import Image
from shapely.geometry import MultiPolygon, Polygon

from stagejax import stages
from stagejax.runtime.files import atomic_write, atomic_write_text, writing
from stagejax.section import figures
from stagejax.slides import SlideObject, write_geojson

log = logging.getLogger(__name__)

STAGE_COLORS = [stages.stage_color(r) for r in range(stages.NUM_STAGES)]


@dataclasses.dataclass
class StagedTubule:
    """One detected tubule and what the stage model made of it."""

    id: int  # 1..N in detection order
    geometry: Polygon | MultiPolygon  # outline, level-0 slide pixels
    stageable: bool  # False for grazing / edge-cut profiles
    probs: np.ndarray  # float [num_classes], class-id order (sum 1)


@dataclasses.dataclass
class SectionResult:
    """Everything the outputs need from staging one slide; the model's class ids are
    mapped to names and cycle positions here, so no file depends on label order."""

    slide_name: str  # e.g. "mouse3_section2" (file stem)
    slide_path: str
    mpp: float  # um per level-0 px of the slide
    label_names: list[str]  # class id -> the dataset's stage name ("1".."12" or "I".."XII")
    stage_ranks: list[int]  # class id -> biological rank 0 (stage I) .. 11 (XII)
    tubules: list[StagedTubule]
    thumbnail: np.ndarray  # uint8 RGB, the section downsampled
    thumbnail_scale: tuple[float, float]  # level-0 px per thumbnail px, in x and y
    review_below: float  # confidence threshold for review.csv


BASE_COLUMNS = (
    "id",
    "centroid_x_px",
    "centroid_y_px",
    "centroid_x_um",
    "centroid_y_um",
    "area_um2",
    "major_axis_um",
    "minor_axis_um",
    "stageable",
    "stage",
    "confidence",
)


def _check(result: SectionResult) -> None:
    k = len(result.label_names)
    if len(result.stage_ranks) != k:
        raise ValueError(
            f"{result.slide_name}: {k} label names but {len(result.stage_ranks)} stage ranks"
        )
    for t in result.tubules:
        if np.shape(t.probs) != (k,):
            raise ValueError(
                f"{result.slide_name}: tubule {t.id} has probabilities of shape "
                f"{np.shape(t.probs)}, expected ({k},) for the {k} classes"
            )


def _class_order(result: SectionResult) -> list[int]:
    """Class ids in cycle order: the order of probability columns and stage lists."""
    return stages.biological_order(result.stage_ranks)


def _prediction(result: SectionResult, t: StagedTubule) -> tuple[int, float]:
    """(class id, its probability) of the most probable class."""
    c = int(np.argmax(t.probs))
    return c, float(t.probs[c])


def _axes_px(geometry: Polygon | MultiPolygon) -> tuple[float, float]:
    """(major, minor) side of the outline's minimum rotated rectangle, in px.

    The rectangle, not second moments: for a round or oval tubule its sides are the
    diameters a person would measure with a ruler, and it needs no shape assumption.
    """
    rect = shapely.oriented_envelope(geometry)
    if not isinstance(rect, Polygon):  # a degenerate (line-like) outline
        return float(rect.length), 0.0
    p = np.asarray(rect.exterior.coords)
    a, b = float(np.hypot(*(p[1] - p[0]))), float(np.hypot(*(p[2] - p[1])))
    return max(a, b), min(a, b)


def _row(result: SectionResult, t: StagedTubule) -> dict[str, str]:
    """One tubules.csv row as text, probabilities in cycle order."""
    c, conf = _prediction(result, t)
    cen, um = t.geometry.centroid, result.mpp
    major, minor = _axes_px(t.geometry)
    row = {
        "id": str(t.id),
        "centroid_x_px": f"{cen.x:.2f}",
        "centroid_y_px": f"{cen.y:.2f}",
        "centroid_x_um": f"{cen.x * um:.3f}",
        "centroid_y_um": f"{cen.y * um:.3f}",
        "area_um2": f"{t.geometry.area * um * um:.2f}",
        "major_axis_um": f"{major * um:.3f}",
        "minor_axis_um": f"{minor * um:.3f}",
        "stageable": str(bool(t.stageable)).lower(),
        "stage": result.label_names[c],
        "confidence": f"{conf:.5f}",
    }
    for k in _class_order(result):
        row[f"p_{result.label_names[k]}"] = f"{float(t.probs[k]):.5f}"
    return row


def _columns(result: SectionResult) -> list[str]:
    return [*BASE_COLUMNS, *(f"p_{result.label_names[k]}" for k in _class_order(result))]


def _csv_text(columns: Sequence[str], rows: Sequence[dict[str, object]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _review(result: SectionResult) -> list[StagedTubule]:
    """Tubules below the review threshold, least confident first (ties by id)."""
    low = [t for t in result.tubules if _prediction(result, t)[1] < result.review_below]
    return sorted(low, key=lambda t: (_prediction(result, t)[1], t.id))


def stage_counts(result: SectionResult) -> np.ndarray:
    """int [12]: stageable tubules per predicted stage, by RANK (index 0 = stage I)."""
    counts = np.zeros(stages.NUM_STAGES, np.int64)
    for t in result.tubules:
        if t.stageable:
            counts[result.stage_ranks[_prediction(result, t)[0]]] += 1
    return counts


def _percent(counts: np.ndarray) -> np.ndarray:
    """Percent of the total; all 0 (not NaN) when there is nothing to count."""
    total = counts.sum()
    return 100.0 * counts / total if total else np.zeros(len(counts))


def _frequency_table(result: SectionResult) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(stage names, counts, percent) of the 12 stages in cycle order."""
    names = stages.names_by_rank(result.label_names, result.stage_ranks)
    counts = stage_counts(result)
    return names, counts, _percent(counts)


def write_frequency_csv(path: Path, names: Sequence[str], counts, **columns) -> Path:
    """stage_frequencies.csv: per stage (cycle order) its count, percent and the percent
    expected from stage durations; ``columns``: more columns of one value each."""
    counts = np.asarray(counts, np.int64)
    expected = 100.0 * stages.stage_frequencies()
    rows = [
        {"stage": n, "count": int(c), "percent": f"{p:.2f}", "expected_percent": f"{e:.2f}"}
        | columns
        for n, c, p, e in zip(names, counts, _percent(counts), expected, strict=True)
    ]
    header = ["stage", "count", "percent", "expected_percent", *columns]
    atomic_write_text(path, _csv_text(header, rows))
    return path


def _write_frequencies(out_dir: Path, result: SectionResult) -> list[Path]:
    names, counts, percent = _frequency_table(result)
    expected = 100.0 * stages.stage_frequencies()
    csv_path, png_path = out_dir / "stage_frequencies.csv", out_dir / "stage_frequencies.png"
    title = f"{result.slide_name}: stage frequencies, n = {int(counts.sum())} stageable tubules"
    atomic_write(
        png_path,
        lambda tmp: figures.plot_stage_frequencies(tmp, names, percent, expected, counts, title),
    )
    return [png_path, write_frequency_csv(csv_path, names, counts)]


def _slide_objects(result: SectionResult) -> list[SlideObject]:
    """The tubules as QuPath detections: class = predicted stage in its colour."""
    objects, um2 = [], result.mpp**2
    for t in result.tubules:
        c, conf = _prediction(result, t)
        m = {"Confidence": conf, "Area um^2": t.geometry.area * um2}
        m.update({f"P({result.label_names[k]})": float(t.probs[k]) for k in _class_order(result)})
        objects.append(
            SlideObject(
                geometry=t.geometry,
                classification=result.label_names[c],
                color=STAGE_COLORS[result.stage_ranks[c]],
                object_type="detection",
                measurements=m,
                properties={"stageable": bool(t.stageable), "tubule_id": t.id},
            )
        )
    return objects


def _overlay(result: SectionResult) -> Image.Image:
    """The stage map: stage colours, grey where not stageable, dashed where unsure."""
    outlines = []
    for t in result.tubules:
        c, conf = _prediction(result, t)
        color = STAGE_COLORS[result.stage_ranks[c]]
        outlines.append(
            figures.Outline(
                t.geometry,
                color if t.stageable else figures.NOT_STAGEABLE_COLOR,
                flagged=conf < result.review_below,
            )
        )
    names = stages.names_by_rank(result.label_names, result.stage_ranks)
    legend = [(f"Stage {n}", STAGE_COLORS[r]) for r, n in enumerate(names)]
    legend += [
        ("not stageable", figures.NOT_STAGEABLE_COLOR),
        (f"confidence < {result.review_below:.2f}", None),
    ]
    return figures.draw_overlay(result.thumbnail, result.thumbnail_scale, outlines, legend)


def write_section_outputs(out_dir: Path, result: SectionResult) -> list[Path]:
    """Writes the slide's six files into `out_dir` (created if missing); returns their paths.

    Pictures first and ``tubules.csv`` last: a crash part-way leaves older complete
    files or new complete files, never a half-written one, and no ``tubules.csv``
    from this run unless everything else was written.
    """
    _check(result)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not any(t.stageable for t in result.tubules):
        log.warning("%s: no stageable tubules; its stage frequencies are all 0", result.slide_name)
    overlay_path = out_dir / "overlay.png"
    overlay = _overlay(result)
    keep = [*STAGE_COLORS, figures.NOT_STAGEABLE_COLOR, *figures.DASH_COLORS]
    atomic_write(overlay_path, lambda tmp: figures.save_png(overlay, tmp, keep))
    paths = [overlay_path, *_write_frequencies(out_dir, result)]
    geojson_path = out_dir / "tubules.geojson"
    with writing(geojson_path):
        paths.append(write_geojson(geojson_path, _slide_objects(result)))
    columns = _columns(result)
    review = [_row(result, t) for t in _review(result)]
    atomic_write_text(out_dir / "review.csv", _csv_text(columns, review))
    rows = [_row(result, t) for t in result.tubules]
    atomic_write_text(out_dir / "tubules.csv", _csv_text(columns, rows))
    return [*paths, out_dir / "review.csv", out_dir / "tubules.csv"]


def summary_row(result: SectionResult) -> tuple[str, int, int, np.ndarray]:
    """(slide name, tubules, stageable tubules, counts by rank): one `write_summary` row."""
    n_stageable = sum(1 for t in result.tubules if t.stageable)
    return result.slide_name, len(result.tubules), n_stageable, stage_counts(result)


def write_summary(
    path: Path,
    rows: Sequence[tuple],
    stage_names: Sequence[str] = stages.STAGES,
) -> Path:
    """summary.csv: slide, tubules, stageable, % of stageable tubules per stage, error.

    A row is `summary_row`'s (slide, tubules, stageable, counts by rank), or a
    slide that could not be staged: (slide, None, None, None, why); its counts
    are left empty and ``error`` says why. `stage_names` are indexed by rank
    (stage I first), like the counts; the default is I..XII. For a dataset named
    otherwise pass ``stages.names_by_rank(label_names, stage_ranks)``: every
    slide of a run is staged by the same model, so one list serves all rows.
    """
    if len(stage_names) != stages.NUM_STAGES:
        raise ValueError(f"stage_names: {len(stage_names)} names, expected {stages.NUM_STAGES}")
    pct_columns = [f"pct_{n}" for n in stage_names]
    columns = ["slide", "tubules", "stageable", *pct_columns, "error"]
    out = []
    for slide, n, n_stageable, counts, *error in rows:
        row = {"slide": slide, "error": error[0] if error else ""}
        if counts is not None:
            pct = _percent(np.asarray(counts, np.int64))
            row.update({"tubules": int(n), "stageable": int(n_stageable)})
            row.update({c: f"{p:.2f}" for c, p in zip(pct_columns, pct, strict=True)})
        out.append(row)
    path = Path(path)
    atomic_write_text(path, _csv_text(columns, out))
    return path
