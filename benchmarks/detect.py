"""Tubule detection accuracy and time on held-out SIMULATED sections (stagejax.detect).

Sections of seeds the detector was not fitted on (seeds 0 and 1, stain_shift 0), at the
usual and a held-out staining, scored against their ground truth: precision, recall, F1
at IoU >= 0.5 and mean IoU of matched tubules, for all, stageable and non-stageable
tubules (pooled over the seeds); then the detection of one study-scale section (4.4 x
3.5 mm, about 20,000 x 16,000 px) timed, reading included.

    python -m benchmarks.detect [--method unet|classical] [--seeds 100,101,102] \
        [--stain_shift 1.0] [--weights W.npz | --params PARAMS.json] [--json FILE]
    python -m benchmarks.detect --real ../shared/real [--overlays DIR] [--finetune_steps N] \
        [--finetune_tubules 10,30,all]

`--real`: REAL sections (H&E, downsampled figure images; `benchmarks.real_sections`):
section A scored against the experts' outlines, overlays of A, B and D written outside
the repository, and with `--finetune_steps` the fine-tuning curve (10, 30 and all
tubules of A's top part; scored on the bottom part); skipped when the folder is absent.
JSON by default: benchmarks/results/detect_unet_cpu.json (U-Net), detect_cpu.json
(classical), detect_real_cpu.json (--real). The U-Net compiles on the first accuracy
section (in its `seconds`), so the study-scale timing is warm.

Targets (issue 13): F1 >= 0.95 and mean IoU >= 0.85, on the held-out staining too.
Times move with the machine's load, which the JSON records.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax

from benchmarks import common, machine, real_sections
from stagejax.detect import DetectParams, choose, detect_slide, evaluate, pooled
from stagejax.simulate import section
from stagejax.slides import open_slide, read_geojson

log = logging.getLogger(__name__)
MODULE = "benchmarks.detect"
FLAGS: common.Flags = {
    "out": ("/tmp/stagejax_detect_bench", "Render cache."),
    "seeds": ("100,101,102", "Held-out section seeds."),
    "stain_shift": (1.0, "The held-out staining."),
    "mpp": (1.0, "um/px of the accuracy sections."),
    "size_mm": ("3.0,2.4", "Size of the accuracy sections (mm)."),
    "method": (None, "unet (default) or classical.", str),
    "weights": (None, "U-Net .npz (default: the shipped).", str),
    "params": (None, "PARAMS.json (default: the defaults).", str),
    "no_timing": (False, "Skip the study-scale section."),
    "json": (None, "Where to write results (default: see the module doc).", str),
    "real": (None, "Folder of the REAL images (shared/real).", str),
    "overlays": ("/tmp/stagejax_real_overlays", "--real: where the overlays go."),
    "finetune_steps": (0, "--real: the fine-tuning curve's steps."),
    "finetune_tubules": ("10,30,all", "--real: the curve's points: how many of the top "
                         "part's tubules each run is given (all: every one)."),
}  # fmt: skip


def _render(root: Path, seed: int, mpp: float | None, shift: float, size_mm) -> Path:
    out = root / section.render_name(seed, mpp or section.DEFAULT_MPP, shift, size_mm)
    if not (out / "section.tif").exists():
        section.render_section(out, seed, mpp=mpp, stain_shift=shift, size_mm=size_mm)
    return out


def _score(folder: Path, detector) -> tuple[dict, float, int]:
    start = time.perf_counter()
    with open_slide(folder / "section.tif") as slide:
        found = detect_slide(slide, detector).objects
    seconds = time.perf_counter() - start
    return evaluate(found, read_geojson(folder / "ground_truth.geojson")), seconds, len(found)


def run(args) -> None:
    detector = choose.make_detector(args.method, args.weights, args.params)
    if args.real is not None:
        return real_main(args, detector)
    classical = isinstance(detector, DetectParams)
    args.json = args.json or f"benchmarks/results/detect{'' if classical else '_unet'}_cpu.json"
    trained_on = [0, 1] if classical else detector.meta.get("training", {}).get("seeds")
    if not classical:
        detector.meta["file"] = detector.source
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    size_mm = section.parse_size_mm(args.size_mm)
    seeds = common.integers(args.seeds, "seeds")
    held_out = {"seeds": seeds, "fitted_on_seeds": trained_on, "mpp": args.mpp,
                "size_mm": list(size_mm)}  # fmt: skip
    result = {"simulated": True, "method": "classical" if classical else "unet",
              "device": str(jax.devices()[0]), "load_avg_1min_before": round(os.getloadavg()[0], 2),
              **({"params": detector.__dict__} if classical else {"weights": detector.meta}),
              "held_out": held_out, "accuracy": {}, "per_section": []}  # fmt: skip
    for shift in sorted({0.0, args.stain_shift}):
        scores = []
        for seed in seeds:
            folder = _render(root, seed, args.mpp, shift, size_mm)
            s, seconds, n = _score(folder, detector)
            scores.append(s)
            result["per_section"].append({"seed": seed, "stain_shift": shift, "seconds": seconds,
                                          "detections": n, **s["all"]})  # fmt: skip
            log.info("seed %d shift %g: F1 %.3f, mean IoU %.3f", seed, shift,
                     s["all"]["f1"], s["all"]["mean_iou"])  # fmt: skip
        result["accuracy"][f"stain_shift={shift:g}"] = pooled(scores)
    if not args.no_timing:
        folder = _render(root, 1000, None, 0.0, section.STUDY_SIZE_MM)
        s, seconds, n = _score(folder, detector)
        with open_slide(folder / "section.tif") as slide:
            size = slide.dimensions
        result["timing"] = {"section_px": list(size), "mpp": section.DEFAULT_MPP,
                            "detect_seconds": round(seconds, 2), "detections": n,
                            "peak_rss_mb": round(machine.peak_rss_mb()), "accuracy": s,
                            "load_avg_1min_after": round(os.getloadavg()[0], 2)}  # fmt: skip
    rows = [
        [k, *(common.fmt(a["all"][f], 3) for f in SCORES)] for k, a in result["accuracy"].items()
    ]
    if "timing" in result:
        rows.append(["study-scale section", f"{result['timing']['detect_seconds']} s"])
    common.finish(MODULE, result, common.markdown_table(["", *SCORES], rows), args.json)


SCORES = ("precision", "recall", "f1", "mean_iou")


def _curve_points(text: str) -> list[str]:
    """``--finetune_tubules``' points: positive integers or ``all``."""
    points = common.names(text, "finetune_tubules")
    if not all(p == "all" or (p.isdigit() and int(p) > 0) for p in points):
        raise ValueError(f"--finetune_tubules: {text!r}: positive integers or 'all'")
    return points


def real_main(args, detector) -> None:
    """The REAL-section benchmark (see the module docstring)."""
    real = Path(args.real)
    counts = [None if n == "all" else int(n) for n in _curve_points(args.finetune_tubules)]
    if not (real / real_sections.TRUTH).exists():
        print(f"skipped: {real} has no {real_sections.TRUTH} (the real images are not here)")
        return
    classical = isinstance(detector, DetectParams)
    result = {"data": "REAL, H&E, downsampled figure image (shared/real); not simulated",
              "method": "classical" if classical else "unet",
              "weights": None if classical else detector.source, "device": str(jax.devices()[0]),
              "load_avg_1min_before": round(os.getloadavg()[0], 2)}  # fmt: skip
    scores = real_sections.score_section_a(detector, real, ("all", "bottom"))
    result.update(section_A=scores["all"], section_A_bottom=scores["bottom"])
    result["overlays"] = [
        str(p) for p in real_sections.write_overlays(detector, real, Path(args.overlays))
    ]
    if args.finetune_steps:
        result["finetune"] = real_sections.finetune_curve(
            real, Path(args.overlays) / "finetune", counts, args.finetune_steps
        )
    result["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    path = args.json or "benchmarks/results/detect_real_cpu.json"
    rows = [[k, *(common.fmt(result[k][f], 3) for f in (*SCORES, "pixel_iou"))]
            for k in ("section_A", "section_A_bottom")]  # fmt: skip
    common.finish(MODULE, result, common.markdown_table(["", *SCORES, "pixel_iou"], rows), path)


def main(argv: Sequence[str] | None = None) -> None:
    common.main(FLAGS, run, argv)


if __name__ == "__main__":
    main()
