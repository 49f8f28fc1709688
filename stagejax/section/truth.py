"""Simulated sections for the demo, and how a staged section compares with its ground truth.

A SIMULATED section (``stagejax.simulate.section``) lies beside its
``ground_truth.geojson``: every detected tubule is matched to a true one
(IoU >= 0.5, as the detection benchmark), and the stages of matched stageable
tubules give accuracy, balanced and +/-1 accuracy; the section's predicted
stage frequencies (all stageable detections) are compared with the true ones
(all stageable ground truth) as an L1 distance (0: equal, 2: disjoint).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from stagejax.detect.metrics import MIN_IOU, match
from stagejax.evaluate import metrics as metrics_lib
from stagejax.simulate import section as section_sim
from stagejax.stages import NUM_STAGES, parse_stage

log = logging.getLogger(__name__)

TRUTH_FILE = "ground_truth.geojson"
MARKER = "SIMULATED.json"


def simulated_section(cache_dir: str, opts, mpp: float) -> Path:
    """The demo slide: SIMULATED section ``opts.seed`` (`SectionOptions`) rendered at the
    model's pixel size (once; cached in ``cache_dir``)."""
    size_mm = section_sim.parse_size_mm(opts.size_mm)
    mpp = float(np.clip(mpp, *section_sim.MPP_LIMITS))
    key = f"v{section_sim.GENERATOR_VERSION}-seed{opts.seed}-mpp{mpp:.4f}-"
    key += f"{size_mm[0]:g}x{size_mm[1]:g}mm"
    out = Path(cache_dir).expanduser() / "simulated_sections" / key
    if not (out / MARKER).is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        section_sim.render_section(out, int(opts.seed), mpp, 0.0, size_mm)
    log.warning("No --slides given: staging the SIMULATED section %s (not real tissue)", out)
    named = out / f"simulated-seed{opts.seed}.tif"  # its outputs' folder name
    if not named.exists():
        named.symlink_to("section.tif")
    return named


def truth_file(slide_path: Path) -> Path | None:
    """The ground truth of a simulated section's slide, if it is one."""
    folder = Path(slide_path).parent
    if (folder / MARKER).is_file() and (folder / TRUTH_FILE).is_file():
        return folder / TRUTH_FILE
    return None


def frequencies(ranks: np.ndarray) -> np.ndarray:
    """Fractions per stage rank (zeros when empty)."""
    counts = np.bincount(np.asarray(ranks, int), minlength=NUM_STAGES).astype(float)
    return counts / counts.sum() if counts.sum() else counts


def stage_scores(true_ranks: np.ndarray, pred_ranks: np.ndarray) -> dict:
    """accuracy, balanced and +/-1 accuracy of stage ranks (0 = stage I), and the
    confusion matrix (rows: the true stage, columns: the stage given; I first)."""
    c = metrics_lib.confusion_matrix(true_ranks, pred_ranks)
    s = metrics_lib.summarize(c)
    keys = ("num_examples", "accuracy", "balanced_accuracy", "within1_accuracy")
    return {**{k: s[k] for k in keys}, "confusion": c.tolist()}


def compare(result, truth_path: Path, min_iou: float = MIN_IOU) -> dict:
    """Stage scores of matched stageable tubules, and the frequency L1 distance."""
    truth = section_sim.read_ground_truth(truth_path)
    pairs, _ = match([t.geometry for t in result.tubules], [o.geometry for o in truth], min_iou)
    ranks = np.asarray(result.stage_ranks)
    pred = np.array([ranks[int(np.argmax(t.probs))] for t in result.tubules], int)
    true_rank = np.array([parse_stage(o.classification or "") for o in truth], object)
    stageable = [bool(o.properties.get("stageable", True)) for o in truth]
    kept = [(i, j) for i, j, _ in pairs if stageable[j] and true_rank[j] is not None]
    det_stageable = np.array([t.stageable for t in result.tubules], bool)
    true_freq = frequencies([r for r, s in zip(true_rank, stageable, strict=True) if s])
    pred_freq = frequencies(pred[det_stageable])
    return {
        "matched_stageable": len(kept),
        "truth_stageable": int(sum(stageable)),
        **stage_scores(
            np.array([true_rank[j] for _, j in kept], int), np.array([pred[i] for i, _ in kept])
        ),
        "frequency_l1": float(np.abs(true_freq - pred_freq).sum()),
        "pairs": [[int(i), int(j)] for i, j in kept],
    }


def log_scores(name: str, scores: dict) -> None:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    log.info(
        "%s vs its SIMULATED ground truth: %d of %d stageable tubules matched; accuracy %s, "
        "balanced %s, +/-1 %s; stage-frequency L1 distance %.3f",
        name,
        scores["matched_stageable"],
        scores["truth_stageable"],
        pct(scores["accuracy"]),
        pct(scores["balanced_accuracy"]),
        pct(scores["within1_accuracy"]),
        scores["frequency_l1"],
    )
