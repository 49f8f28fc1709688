"""Whole-section staging on SIMULATED sections: accuracy against ground truth, and time.

Accuracy (issue 14, points 2 and 5): held-out sections (seeds the detector was
not fitted on), at the usual staining and a held-out one, rendered at the stage
model's pixel size, staged end to end (detect, cut, stage) with the model of
``--workdir``. Scores of matched stageable tubules (IoU >= 0.5): accuracy,
balanced and +/-1 accuracy, and the L1 distance between predicted and true
stage-frequency vectors; beside them the same tubules cut with their
ground-truth outline instead of the detected one. Tubules are detected by section
mode's detector (``--detector``, as section mode's; default the U-Net, recorded as
``detector``; the figures of 2026-12-01 in RESULTS.md were made with the classical one).

Time (point 7): one study-scale section (4.4 x 3.5 mm at the default pixel
size, about 20,000 x 16,000 px) staged end to end; seconds per part and
tubules/s, peak RSS. ResNet-50 at the study's 896 px crop (random weights) on
such a section is the GPU suite's ``section`` part (`study_config`).

    python -m benchmarks.section --workdir=runs/demo [--seeds=100,101,102] \
        [--stain_shift=1.0] [--json=benchmarks/results/section_cpu.json]
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks import common, machine
from stagejax import images, models
from stagejax.data import layout
from stagejax.detect import choose
from stagejax.model import saved
from stagejax.runtime import workdir as workdir_lib
from stagejax.section import outputs
from stagejax.section import pipeline as section_pipeline
from stagejax.section import truth as truth_lib
from stagejax.section.crops import cut_tubule
from stagejax.section.model import StageModel, load_stage_model
from stagejax.section.options import SectionOptions
from stagejax.section.stage import stage_crops
from stagejax.simulate import cache, tubules
from stagejax.simulate import section as section_sim
from stagejax.slides import open_slide
from stagejax.stages import STAGES, parse_stage

MODULE = "benchmarks.section"
FLAGS: common.Flags = {
    "workdir": ("", "A trained workdir (e.g. the README's main command)."),
    "out": ("/tmp/stagejax_section_bench", "Render cache."),
    "seeds": (["100", "101", "102"], "Held-out section seeds."),
    "stain_shift": (1.0, "The held-out staining."),
    "size_mm": ("4.4,3.5", "Size of the accuracy sections."),
    "timing": (True, "Time a study-scale section."),
    "detector": ("unet", "Section mode's --detector (unet, classical, PARAMS.json, .npz)."),
    "reference_images": (1200, "Fresh tubule images (an unseen seed) the section figures "
                         "are set beside, per staining; 0: none."),
    "json": ("benchmarks/results/section_cpu.json", "Where to write results."),
}  # fmt: skip
log = logging.getLogger(__name__)
REFERENCE_SEED = 777  # fresh tubule images for `reference`: a seed no dataset here uses


def render(out: str, seed: int, mpp: float, shift: float, size_mm) -> Path:
    out = Path(out) / section_sim.render_name(seed, mpp, shift, size_mm)
    if not (out / "section.tif").exists():
        section_sim.render_section(out, seed, mpp=mpp, stain_shift=shift, size_mm=size_mm)
    return out


def _truth_cut_scores(path: Path, scores: dict, sm) -> dict:
    """The matched stageable tubules again, cut with their ground-truth outline."""
    truth = section_sim.read_ground_truth(path.parent / truth_lib.TRUTH_FILE)
    kept = [truth[j] for _, j in scores["pairs"]]
    with open_slide(path) as slide:
        crops = (cut_tubule(slide, o.geometry, sm.mpp, sm.image_size) for o in kept)
        probs = stage_crops(sm.model, crops, len(kept), sm.batch_size)
    ranks = np.asarray(sm.stage_ranks)
    pred = ranks[probs.argmax(1)]
    true = np.array([parse_stage(o.classification) for o in kept])
    return truth_lib.stage_scores(true, pred)


def reference(sm: StageModel, out: str, shift: float, n: int) -> dict:
    """The model on ``n`` fresh SIMULATED tubule images (REFERENCE_SEED: slides no
    training set holds) at staining ``shift``: balanced and +/-1 accuracy with a
    bootstrap 95% interval. The section figures are set beside these, not beside a
    workdir's test split, whose few images (72 in the demo) leave its balanced
    accuracy uncertain by about +/-12 points."""
    if abs(tubules.image_mpp(sm.image_size) - sm.mpp) > 0.01 * sm.mpp:
        return {"skipped": f"the model's {sm.mpp:.3f} um/px is not the tubule simulator's"}
    folder = cache.default_dataset(out, n, sm.image_size, REFERENCE_SEED, stain_shift=shift)
    lay = layout.read_layout(folder, check_images=False)
    examples = [ex for split in lay.splits.values() for ex in split]
    crops = (images.decode_image(ex.path.read_bytes(), str(ex.path)) for ex in examples)
    probs = stage_crops(sm.model, crops, len(examples), sm.batch_size)
    true = np.array([lay.stage_ranks[ex.label] for ex in examples])
    pred = np.asarray(sm.stage_ranks)[probs.argmax(1)]
    scores = truth_lib.stage_scores(true, pred)
    rng = np.random.default_rng(0)
    boot = [truth_lib.stage_scores(true[k], pred[k])["balanced_accuracy"]
            for k in (rng.integers(0, len(true), len(true)) for _ in range(500))]  # fmt: skip
    scores["balanced_accuracy_95"] = [float(np.percentile(boot, q)) for q in (2.5, 97.5)]
    return {**scores, "images": len(true), "seed": REFERENCE_SEED}


def accuracy(sm: StageModel, opts: SectionOptions, args) -> dict:
    out = {}
    detector = choose.from_config(opts.detector)  # section mode's (default: U-Net)
    size_mm = section_sim.parse_size_mm(args.size_mm)
    for shift in sorted({0.0, args.stain_shift}):
        rows = []
        for seed in map(int, args.seeds):
            path = render(args.out, seed, sm.mpp, shift, size_mm) / "section.tif"
            result, _ = section_pipeline.stage_slide(path, sm, detector, opts)
            auto = truth_lib.compare(result, truth_lib.truth_file(path))
            gt = _truth_cut_scores(path, auto, sm)
            auto.pop("pairs")
            rows.append({"seed": seed, "auto_cut": auto, "truth_cut": gt})
            log.info("seed %d shift %g: auto %s | truth-cut %s", seed, shift, auto, gt)
        out[f"stain_shift={shift:g}"] = {"per_section": rows, "mean": _means(rows)}
        if args.reference_images:
            ref = reference(sm, args.out, shift, args.reference_images)
            out[f"stain_shift={shift:g}"]["reference_tubules"] = ref
    return out


def _means(rows: list[dict]) -> dict:
    keys = ("accuracy", "balanced_accuracy", "within1_accuracy")
    mean = {f"auto_{k}": float(np.mean([r["auto_cut"][k] for r in rows])) for k in keys}
    mean.update({f"truth_cut_{k}": float(np.mean([r["truth_cut"][k] for r in rows])) for k in keys})
    mean["frequency_l1"] = float(np.mean([r["auto_cut"]["frequency_l1"] for r in rows]))
    mean["matched_stageable"] = int(sum(r["auto_cut"]["matched_stageable"] for r in rows))
    for cut in ("auto_cut", "truth_cut"):  # summed over the sections
        mean[f"{cut}_confusion"] = np.sum([r[cut]["confusion"] for r in rows], axis=0).tolist()
    return mean


def recall_rows(means: dict) -> list[list]:
    """Per-stage recall (auto cut) of each staining, in biological order: where the
    section's stages go wrong."""
    rows = []
    for name, m in means.items():
        c = np.asarray(m["auto_cut_confusion"], float)
        recall = np.diag(c) / np.maximum(c.sum(axis=1), 1)
        rows.append([name, *(f"{100 * r:.0f}%" for r in recall)])
    return rows


def timing(out: str, sm: StageModel, opts: SectionOptions) -> dict:
    folder = render(out, 1000, section_sim.DEFAULT_MPP, 0.0, section_sim.STUDY_SIZE_MM)
    return time_section(folder / "section.tif", sm, opts)


def time_section(path: Path, sm: StageModel, opts: SectionOptions | None = None) -> dict:
    """Stage the section at ``path`` end to end (detect, cut, stage, write outputs to a
    temporary folder) once: seconds per part, tubules/s, peak RSS of this process."""
    opts = opts or SectionOptions()
    load = os.getloadavg()[0]
    t = time.perf_counter()
    detector = choose.from_config(opts.detector)
    result, times = section_pipeline.stage_slide(path, sm, detector, opts)
    with tempfile.TemporaryDirectory() as tmp:
        t_write = time.perf_counter()
        outputs.write_section_outputs(Path(tmp), result)
        times["write"] = time.perf_counter() - t_write
    total = time.perf_counter() - t
    with open_slide(path) as slide:
        size = slide.dimensions
    n = len(result.tubules)
    return {
        "section_px": list(size),
        "tubules": n,
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "total_seconds": round(total, 2),
        "tubules_per_second": round(n / total, 2),
        "staging_tubules_per_second": round(n / max(times["stage"], 1e-9), 2),
        # The share of the staging loop spent waiting for crops ("cut": time blocked on
        # the cutting threads); the model waits for the host that long.
        "device_wait_share": round(times["cut"] / max(times["cut"] + times["stage"], 1e-9), 3),
        "peak_rss_mb": round(machine.peak_rss_mb()),
        "load_avg_1min_before": round(load, 2),
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
    }


def study_config(
    tmp: Path, model: str = "resnet50", crop_size: int = 896, image_size: int = 1152, **fields
):
    """A stage model of random weights (time only) saved under ``tmp``, and the recipe
    ``--mode=section`` (or `load_stage_model`) loads it by: by default ResNet-50 at the
    study's 896 px crop of 1152 px images. Its pixel size keeps a 1152 px image's field
    of view (the study's estimate) whatever ``image_size``; ``fields`` are further
    recipe fields (e.g. ``precision``)."""
    model_dir = saved.save_model_weights(
        tmp / model, models.create(model), model,
        mpp=section_sim.DEFAULT_MPP * 1152 / image_size, image_size=image_size,
    )  # fmt: skip
    return common.stagejax_config(init_from=str(model_dir), model=model, crop_size=crop_size,
                                  mpp=0.0, **fields)  # mpp 0: the model's own  # fmt: skip


def run(args) -> None:
    if not args.workdir:
        raise ValueError("--workdir: a trained run is required")
    workdir = Path(args.workdir)
    opts = SectionOptions(detector=args.detector)
    config = workdir_lib.load_run_config(workdir)
    sm = load_stage_model(config, workdir)
    result: dict = {"simulated": True, "timing": {}}
    result["stage_model"] = dict(workdir=str(workdir), model=config.model, mpp=sm.mpp,
                                 image_size=sm.image_size, crop_size=config.crop_size)  # fmt: skip
    result["detector"] = choose.describe(choose.from_config(opts.detector))
    result["accuracy"] = accuracy(sm, opts, args)
    if args.timing:
        result["timing"]["demo_model"] = timing(args.out, sm, opts)
    means = {k: v["mean"] for k, v in result.get("accuracy", {}).items()}
    rows = [[k, *(common.fmt(m[f], 3) for f in TABLE)] for k, m in means.items()]
    for k, v in result["accuracy"].items():
        ref = v.get("reference_tubules", {})
        if "balanced_accuracy" in ref:
            lo, hi = ref["balanced_accuracy_95"]
            rows.append([f"{k}, {ref['images']} fresh tubule images",
                         f"{ref['balanced_accuracy']:.3f} ({lo:.3f}-{hi:.3f})", "",
                         common.fmt(ref["within1_accuracy"], 3), ""])  # fmt: skip
    rows += [[f"time: {k}", f"{t['total_seconds']} s", f"{t['tubules']} tubules"]
             for k, t in result["timing"].items()]  # fmt: skip
    table = common.markdown_table(["", *TABLE], rows)
    recall = common.markdown_table(["recall (auto cut)", *STAGES], recall_rows(means))
    common.finish(MODULE, result, f"{table}\n\n{recall}", args.json)


TABLE = ("auto_balanced_accuracy", "truth_cut_balanced_accuracy", "auto_within1_accuracy",
         "frequency_l1")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    common.main(FLAGS, run, argv)


if __name__ == "__main__":
    main()
