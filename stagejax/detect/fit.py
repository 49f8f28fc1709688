"""`train --method=classical`: the classical detector's parameters fitted to annotated sections.

This is a parameter fit of a CLASSICAL detector (thresholds, smoothing,
morphology, size and shape limits, watershed seeds), not the training of a
neural network: a coordinate search over a small grid per parameter, keeping a
change only when it raises the F1 at IoU >= 0.5 (ties: the mean IoU) pooled
over the annotated sections. It therefore never ends worse than where it
started (the defaults, or --params). The learned (U-Net) detector is trained
instead by `stagejax.detect.train_unet` (`train --method=unet`).

Annotations are QuPath GeoJSON exports: every polygon is a ground-truth tubule,
except objects classified "Region", which mark the part of the slide that was
annotated (detections outside all regions are then not scored). A boolean
property "stageable" (false for grazing or edge-cut tubules) is optional.
"""

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import shapely

from stagejax.detect import metrics, pipeline
from stagejax.detect.params import FEATURES, DetectParams
from stagejax.errors import ConfigError, DatasetError
from stagejax.slides import SlideObject, open_slide, read_geojson
from stagejax.slides.geometry import outlines

log = logging.getLogger(__name__)

REGION_CLASS = "region"
GRID: dict[str, tuple] = {
    "work_mpp": (1.5, 2.0, 2.5, 3.0, 4.0),
    "feature": FEATURES,
    "threshold_scale": (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.35, 1.5),
    "smooth_um": (1.0, 2.0, 4.0, 6.0, 9.0, 12.0),
    "open_um": (0.0, 3.0, 6.0, 9.0, 12.0, 16.0),
    "max_hole_um2": (5_000.0, 15_000.0, 30_000.0, 60_000.0),
    "seed_sigma_um": (0.0, 2.0, 4.0, 8.0, 12.0),
    "seed_distance_um": (50.0, 70.0, 90.0, 110.0, 140.0),
    "seed_radius_um": (10.0, 15.0, 20.0, 30.0, 40.0),
    "merge_ratio": (0.5, 0.6, 0.7, 0.8, 0.9, 1.1),
    "relief_um": (2.0, 4.0, 6.0, 9.0, 14.0),
    "body_level": (0.3, 0.4, 0.5, 0.6, 0.7),
    "compactness": (0.0, 0.001, 0.01, 0.1),
    "valley_um": (0.0, 8.0, 12.0, 16.0),
    "valley_frac": (0.15, 0.25, 0.4),
    "min_area_um2": (500.0, 1_000.0, 1_500.0, 3_000.0, 5_000.0),
    "min_solidity": (0.6, 0.7, 0.8, 0.85, 0.9),
    "convex": (True, False),
    "grow_um": (-4.0, -2.0, 0.0, 2.0, 4.0, 6.0),
}


@dataclasses.dataclass
class Section:
    """One annotated section; its coarse image is read once per working resolution."""

    path: Path
    mpp: float | None  # the --mpp override, or None for the file's
    truth: list[SlideObject]
    region: object | None  # shapely geometry of the annotated part, or None for all
    _coarse: dict = dataclasses.field(default_factory=dict)

    def coarse(self, work_mpp: float):
        """(RGB, its um/px, level-0 px per coarse px, level-0 um/px) at `work_mpp`."""
        if work_mpp not in self._coarse:
            with open_slide(self.path, self.mpp) as slide:
                rgb, mpp, scale = pipeline.read_coarse(slide, work_mpp)
                self._coarse[work_mpp] = rgb, mpp, scale, slide.mpp
        return self._coarse[work_mpp]

    def score(self, detector) -> dict:
        """Scores of `detector` (DetectParams, or a learned detector) on this section."""
        rgb, mpp, scale, slide_mpp = self.coarse(detector.work_mpp)
        labels, _ = pipeline.segment_coarse(detector, rgb, mpp)
        grow = pipeline.grow_px(detector, slide_mpp)
        polys = outlines(labels, scale, grow) if labels.max() else []
        if self.region is not None:
            polys = [p for p in polys if self.region.contains(p.centroid)]
        pred = [SlideObject(geometry=p, object_type="detection") for p in polys]
        return metrics.evaluate(pred, self.truth)


def load_sections(
    slides: Sequence[str], annotations: Sequence[str], mpp: float | None
) -> list[Section]:
    """The annotated sections, each slide with its GeoJSON (same order)."""
    if len(slides) != len(annotations):
        raise ConfigError(
            f"--annotations: {len(annotations)} file(s) for {len(slides)} slide(s); "
            "give one GeoJSON per slide, in the same order"
        )
    sections = []
    for slide_path, ann_path in zip(slides, annotations, strict=True):
        objects = read_geojson(ann_path)
        regions = [o for o in objects if (o.classification or "").lower() == REGION_CLASS]
        truth = [o for o in objects if (o.classification or "").lower() != REGION_CLASS]
        if not truth:
            raise DatasetError(f"{ann_path}: no tubule polygons to fit the detector to")
        with open_slide(slide_path, mpp) as slide:  # bad slides fail here, before any fitting
            _check_on_slide(truth, slide, ann_path)
        region = shapely.union_all([o.geometry for o in regions]) if regions else None
        sections.append(Section(Path(slide_path), mpp, truth, region))
    return sections


def hold_out(
    sections: Sequence[Section], fraction: float, seed: int = 0
) -> tuple[list[Section], list[Section]]:
    """(sections to train on, sections to check on): `fraction` of each section's outlines,
    drawn at random, set aside. A held-out tubule is cut out of the training region (it is
    neither tubule nor background there) and is the only region of its check section, so
    the check scores the detections whose centroid lies in a held-out tubule."""
    rng = np.random.default_rng(seed)
    train, check = [], []
    for sec in sections:
        k = int(round(fraction * len(sec.truth)))
        if k < 1 or k >= len(sec.truth):
            raise ConfigError(
                f"--holdout: {fraction:g} of {sec.path.name}'s {len(sec.truth)} outlines is "
                f"{k}; outline more tubules or choose a fraction that keeps some of each"
            )
        held = set(rng.choice(len(sec.truth), k, replace=False).tolist())
        kept = [o for i, o in enumerate(sec.truth) if i not in held]
        aside = [o for i, o in enumerate(sec.truth) if i in held]
        cut = shapely.union_all([o.geometry.buffer(2.0) for o in aside])
        region = sec.region
        if region is None:  # the whole slide was annotated
            with open_slide(sec.path, sec.mpp) as slide:
                region = shapely.box(0, 0, *slide.dimensions)
        train.append(Section(sec.path, sec.mpp, kept, region.difference(cut), sec._coarse))
        where = shapely.union_all([o.geometry for o in aside])
        check.append(Section(sec.path, sec.mpp, aside, where, sec._coarse))
    return train, check


def _check_on_slide(truth: Sequence[SlideObject], slide, ann_path) -> None:
    """Refuse outlines that miss the slide (another slide's, or not in level-0 pixels)."""
    w, h = slide.dimensions
    frame = shapely.box(0, 0, w, h)
    inside = sum(frame.intersection(o.geometry).area > 0.5 * o.geometry.area for o in truth)
    if inside < max(1, len(truth) // 2):
        raise DatasetError(
            f"{ann_path}: {len(truth) - inside} of its {len(truth)} outlines lie off "
            f"{slide.path} ({w} x {h} px); is it that slide's export, in level-0 pixels?"
        )


def objective(sections: Sequence[Section], params: DetectParams) -> tuple[float, float, dict]:
    """(pooled F1, pooled mean IoU, the pooled scores) of `params` on `sections`."""
    scores = metrics.pooled([s.score(params) for s in sections])
    return scores["all"]["f1"], scores["all"]["mean_iou"], scores


def fit(
    sections: Sequence[Section],
    start: DetectParams,
    sweeps: int = 2,
    grid: dict[str, Sequence] | None = None,
) -> tuple[DetectParams, dict]:
    """Coordinate search from `start` over `grid` (default `GRID`); returns the best
    parameters and a record of the fit (scores before and after)."""
    best = start
    f1, miou, scores = objective(sections, best)
    before = scores["all"]
    log.info("start: F1 %.3f, mean IoU %.3f", f1, miou)
    for sweep in range(sweeps):
        changed = False
        for name, values in (GRID if grid is None else grid).items():
            for value in values:
                if value == getattr(best, name):
                    continue
                try:
                    trial = best.replace(**{name: value})
                except ConfigError:  # e.g. min_area above max_area
                    continue
                t_f1, t_miou, t_scores = objective(sections, trial)
                if t_f1 > f1 + 1e-9 or (abs(t_f1 - f1) <= 1e-9 and t_miou > miou + 1e-6):
                    best, f1, miou, scores, changed = trial, t_f1, t_miou, t_scores, True
                    log.info(
                        "sweep %d: %s=%s -> F1 %.3f, mean IoU %.3f", sweep, name, value, f1, miou
                    )
        if not changed:
            break
    record = {
        "method": "coordinate search over a parameter grid (classical detector, no network)",
        "min_iou": metrics.MIN_IOU,
        "sections": [s.path.name for s in sections],
        "before": before,
        "after": scores["all"],
        "after_by_group": scores,
    }
    return best, record
