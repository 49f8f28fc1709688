"""Tubule detection on REAL sections: ../shared/real (H&E, downsampled figure images).

Section A has the experts' hand-traced outlines as instances (16-bit PNG, 0 =
background); a detection counts when matched one to one with a tubule at IoU >= 0.5
(`stagejax.detect.metrics`, as on simulated sections); the pixel IoU compares the union
of the detections with the experts' mask. B and D have no outlines: their overlays are
for a person to look at. The images are never committed (overlays go outside the
repository) and section A is an evaluation set: no default is tuned to it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image
from shapely.geometry import box

from stagejax.detect import detect_slide, evaluate, metrics, overlay
from stagejax.detect.pipeline import outlines
from stagejax.errors import DatasetError
from stagejax.slides import SlideObject, open_slide

log = logging.getLogger(__name__)

# (file, um/px stated in ../shared/real/README.md). D's "about 5-6" is taken as 5.5.
SECTIONS = {"A": ("section_A_HE.png", 3.0), "B": ("section_B_HE.png", 3.0),
            "D": ("section_D_HE.png", 5.5)}  # fmt: skip
TRUTH = "section_A_tubule_instances.png"
SPLIT_ROW = 700  # Fine-tuning split of section A: tubules wholly above this row train.


@dataclasses.dataclass
class Truth:
    """Section A's expert tubules: instance labels and one polygon per tubule (px)."""

    labels: np.ndarray
    polygons: list

    def objects(self, keep=None) -> list[SlideObject]:
        idx = range(len(self.polygons)) if keep is None else keep
        return [SlideObject(geometry=self.polygons[i], classification="Tubule") for i in idx]


def read_truth(real_dir: Path) -> Truth:
    labels = np.asarray(Image.open(real_dir / TRUTH)).astype(np.int32)
    ids = np.unique(labels)
    ids = ids[ids > 0]
    dense = np.zeros(int(labels.max()) + 1, np.int32)
    dense[ids] = np.arange(1, len(ids) + 1)  # consecutive labels for `outlines`
    labels = dense[labels]
    return Truth(labels, outlines(labels, (1.0, 1.0)))


def split_top_bottom(truth: Truth, row: int = SPLIT_ROW) -> tuple[list[int], list[int]]:
    """(tubules wholly above `row`, tubules wholly below it): the fine-tuning split."""
    top = [i for i, p in enumerate(truth.polygons) if p.bounds[3] <= row]
    bottom = [i for i, p in enumerate(truth.polygons) if p.bounds[1] >= row]
    return top, bottom


def pixel_iou(detected: list, truth_labels: np.ndarray) -> float:
    """IoU of the union of detected polygons (px) with the union of the truth's tubules."""
    from stagejax.detect.train_unet import rasterise

    mask = rasterise(detected, truth_labels.shape, (1.0, 1.0)) > 0
    gt = truth_labels > 0
    union = (mask | gt).sum()
    return float((mask & gt).sum() / union) if union else 0.0


def _detect(slide, detector) -> list[SlideObject]:
    """The detections, none when the detector finds no tubule (a score, not an error)."""
    try:
        return detect_slide(slide, detector).objects
    except DatasetError as e:
        log.warning("%s", e)
        return []


def score_section_a(detector, real_dir: Path, parts=("all",)) -> dict:
    """{part: P, R, F1 at IoU >= 0.5, mean IoU, pixel IoU} of `detector` on section A,
    detected once. A part is "all", or "bottom" (tubules wholly below SPLIT_ROW and the
    detections whose centroid lies below it, less those of tubules crossing the row: the
    fine-tuning experiment's held-out part)."""
    name, mpp = SECTIONS["A"]
    truth = read_truth(real_dir)
    start = time.perf_counter()
    with open_slide(real_dir / name, mpp) as slide:
        detected = _detect(slide, detector)
    seconds = round(time.perf_counter() - start, 2)
    return {part: {**_score(truth, detected, part), "seconds": seconds} for part in parts}


def _score(truth: Truth, found: list, part: str) -> dict:
    keep, labels = None, truth.labels
    if part == "bottom":
        keep = split_top_bottom(truth)[1]
        h, w = labels.shape
        found = [o for o in found if box(0, SPLIT_ROW, w, h).contains(o.geometry.centroid)]
        found = _not_of_straddling(truth, found, keep)
        labels = np.where(np.isin(labels, np.asarray(keep) + 1), labels, 0)
        labels[:SPLIT_ROW] = 0
    scores = evaluate(found, truth.objects(keep))["all"]
    scores["pixel_iou"] = pixel_iou([o.geometry for o in found], labels)
    return scores


def _not_of_straddling(truth: Truth, found: list, keep: list[int]) -> list:
    """`found` less the detections of tubules that cross SPLIT_ROW (IoU >= 0.5 with one):
    those tubules are in neither part, so finding them is neither right nor wrong."""
    straddling = [p for i, p in enumerate(truth.polygons) if i not in set(keep)
                  and p.bounds[1] < SPLIT_ROW < p.bounds[3]]  # fmt: skip
    if not straddling or not found:
        return found
    iou = metrics.iou_matrix([o.geometry for o in found], straddling)
    return [o for o, row in zip(found, iou, strict=True) if row.max() < metrics.MIN_IOU]


def write_overlays(detector, real_dir: Path, out: Path) -> list[Path]:
    """Detections (green; section A's expert outlines in blue) over sections A, B, D."""
    out.mkdir(parents=True, exist_ok=True)
    truth = read_truth(real_dir)
    written = []
    for key, (name, mpp) in SECTIONS.items():
        if not (real_dir / name).exists():
            continue
        with open_slide(real_dir / name, mpp) as slide:
            try:
                det = detect_slide(slide, detector)
            except DatasetError as e:
                log.warning("%s: no overlay (%s)", name, e)
                continue
        img = overlay(det, truth.objects() if key == "A" else None)
        path = out / f"section_{key}_detections.png"
        img.save(path)
        written.append(path)
        log.info("%s: %d detections -> %s", name, len(det.objects), path)
    return written


def finetune_annotations(real_dir: Path, out: Path, count: int | None, seed: int = 0) -> Path:
    """GeoJSON of `count` (None: all) tubules of section A's top part, with the Region a
    lab would have annotated: the top box for all of them; around the chosen ones (less
    every other tubule) for a subset."""
    import shapely

    from stagejax.slides import write_geojson

    truth = read_truth(real_dir)
    top, _ = split_top_bottom(truth)
    h, w = truth.labels.shape
    if count is None or count >= len(top):
        chosen = top
        others = [p for i, p in enumerate(truth.polygons) if i not in set(top)]
        region = box(0, 0, w, SPLIT_ROW).difference(shapely.union_all(others).buffer(2))
    else:
        chosen = sorted(np.random.default_rng(seed).choice(top, count, replace=False).tolist())
        others = [p for i, p in enumerate(truth.polygons) if i not in set(chosen)]
        near = shapely.union_all([truth.polygons[i].buffer(12) for i in chosen])
        region = near.difference(shapely.union_all(others).buffer(2))
    objects = truth.objects(chosen) + [SlideObject(geometry=region, classification="Region")]
    path = out / f"section_A_top_{len(chosen)}.geojson"
    out.mkdir(parents=True, exist_ok=True)
    write_geojson(path, objects)
    return path


def finetune_curve(real_dir: Path, out: Path, counts, steps: int) -> list[dict]:
    """Fine-tune the shipped U-Net on `counts` top tubules of section A; score the bottom."""
    from stagejax.detect import fit, load_weights, train_unet

    rows = []
    name, mpp = SECTIONS["A"]
    for count in counts:
        ann = finetune_annotations(real_dir, out, count)
        sections = fit.load_sections([str(real_dir / name)], [str(ann)], mpp)
        spec = train_unet.TrainSpec(steps=steps, learning_rate=1e-3)
        weights = out / f"unet_top_{ann.stem.rsplit('_', 1)[1]}.npz"
        start = time.perf_counter()
        record = train_unet.run(sections, "shipped", spec, weights, {"simulated": False})
        seconds = time.perf_counter() - start
        bottom = score_section_a(load_weights(weights), real_dir, ("bottom",))["bottom"]
        rows.append({"tubules": len(sections[0].truth), "steps": steps,
                     "train_seconds": round(seconds, 1), "f1_top_before": record.get("f1_before"),
                     "f1_top_after": record["f1_after"], "bottom": bottom})  # fmt: skip
        log.info("fine-tuned on %d tubules: bottom F1 %.3f", rows[-1]["tubules"], bottom["f1"])
    return rows
