"""Whole-section staging on SIMULATED sections: accuracy against ground truth, and time.

Accuracy (issue 14, points 2 and 5): held-out sections (seeds the detector was
not fitted on), at the usual staining and a held-out one, rendered at the stage
model's pixel size, staged end to end (detect, cut, stage) with the model of
``--workdir``. Scores of matched stageable tubules (IoU >= 0.5): accuracy,
balanced and +/-1 accuracy, and the L1 distance between predicted and true
stage-frequency vectors; beside them the same tubules cut with their
ground-truth outline instead of the detected one. Tubules are detected by section
mode's detector (``config.section.detector``; default the U-Net, recorded as
``detector``; the figures of 2026-12-01 in RESULTS.md were made with the classical one).

Time (point 7): one study-scale section (4.4 x 3.5 mm at the default pixel
size, about 20,000 x 16,000 px) staged end to end; seconds per part and
tubules/s, peak RSS. ``--study_model`` adds ResNet-50 at the study's 896 px
crop (random weights: time only).

    python -m benchmarks.section --workdir=runs/demo [--seeds=100,101,102] \
        [--stain_shift=1.0] [--study_model] [--json=benchmarks/results/section_cpu.json]
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import ml_collections
import numpy as np
from absl import app, flags

from benchmarks import common
from stagejax import config as config_lib
from stagejax import models
from stagejax.detect import choose
from stagejax.runtime import checkpoint
from stagejax.runtime import workdir as workdir_lib
from stagejax.section import outputs
from stagejax.section import run as run_lib
from stagejax.section import truth as truth_lib
from stagejax.section.crops import cut_tubule
from stagejax.section.model import StageModel, load_stage_model
from stagejax.section.stage import stage_crops
from stagejax.simulate import section as section_sim
from stagejax.slides import open_slide
from stagejax.stages import parse_stage

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "workdir", None, "A trained workdir (e.g. the README's main command); none: --study_model only."
)
flags.DEFINE_string("out", "/tmp/stagejax_section_bench", "Render cache.")
flags.DEFINE_list("seeds", ["100", "101", "102"], "Held-out section seeds.")
flags.DEFINE_float("stain_shift", 1.0, "The held-out staining.")
flags.DEFINE_string("size_mm", "4.4,3.5", "Size of the accuracy sections.")
flags.DEFINE_bool("timing", True, "Time a study-scale section.")
flags.DEFINE_bool("study_model", False, "Also time ResNet-50 at 896 px (random weights).")
flags.DEFINE_string("json", "benchmarks/results/section_cpu.json", "Where to write results.")

log = logging.getLogger(__name__)


def _config(workdir: Path | None, **fields) -> ml_collections.ConfigDict:
    cli, _ = config_lib.resolve(str(Path("configs/resnet.py")), fields, "section")
    return workdir_lib.eval_config(workdir, cli) if workdir else cli


def _render(seed: int, mpp: float, shift: float, size_mm) -> Path:
    out = Path(FLAGS.out) / f"seed{seed}_shift{shift:g}_mpp{mpp:.4f}_{size_mm[0]:g}x{size_mm[1]:g}"
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


def accuracy(sm, config) -> dict:
    out = {}
    detector = choose.from_config(config.section.detector)  # section mode's (default: U-Net)
    size_mm = section_sim.parse_size_mm(FLAGS.size_mm)
    for shift in sorted({0.0, FLAGS.stain_shift}):
        rows = []
        for seed in map(int, FLAGS.seeds):
            path = _render(seed, sm.mpp, shift, size_mm) / "section.tif"
            result, _ = run_lib.stage_slide(path, sm, detector, config)
            auto = truth_lib.compare(result, truth_lib.truth_file(path))
            gt = _truth_cut_scores(path, auto, sm)
            auto.pop("pairs")
            rows.append({"seed": seed, "auto_cut": auto, "truth_cut": gt})
            log.info("seed %d shift %g: auto %s | truth-cut %s", seed, shift, auto, gt)
        out[f"stain_shift={shift:g}"] = {"per_section": rows, "mean": _means(rows)}
    return out


def _means(rows: list[dict]) -> dict:
    keys = ("accuracy", "balanced_accuracy", "within1_accuracy")
    mean = {f"auto_{k}": float(np.mean([r["auto_cut"][k] for r in rows])) for k in keys}
    mean.update({f"truth_cut_{k}": float(np.mean([r["truth_cut"][k] for r in rows])) for k in keys})
    mean["frequency_l1"] = float(np.mean([r["auto_cut"]["frequency_l1"] for r in rows]))
    mean["matched_stageable"] = int(sum(r["auto_cut"]["matched_stageable"] for r in rows))
    return mean


def timing(sm, config) -> dict:
    folder = _render(1000, section_sim.DEFAULT_MPP, 0.0, section_sim.STUDY_SIZE_MM)
    return time_section(folder / "section.tif", sm, config)


def time_section(path: Path, sm: StageModel, config: ml_collections.ConfigDict) -> dict:
    """Stage the section at ``path`` end to end (detect, cut, stage, write outputs to a
    temporary folder) once: seconds per part, tubules/s, peak RSS of this process."""
    load = os.getloadavg()[0]
    t = time.perf_counter()
    detector = choose.from_config(config.section.detector)
    result, times = run_lib.stage_slide(path, sm, detector, config)
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
        "peak_rss_mb": round(common.peak_rss_mb()),
        "load_avg_1min_before": round(load, 2),
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
    }


def study_model(
    tmp: Path,
    workdir: Path | None = None,
    model: str = "resnet50",
    crop_size: int = 896,
    image_size: int = 1152,
    **fields,
) -> tuple[StageModel, ml_collections.ConfigDict]:
    """A stage model of random weights (time only) saved to and loaded from ``tmp``:
    by default ResNet-50 at the study's 896 px crop of 1152 px images. Its pixel size
    keeps a 1152 px image's field of view (the study's estimate) whatever
    ``image_size``; ``fields`` are further config fields (e.g. ``precision``)."""
    model_dir = checkpoint.save_model_weights(
        tmp / model, models.create(model), model,
        mpp=section_sim.DEFAULT_MPP * 1152 / image_size, image_size=image_size,
    )  # fmt: skip
    config = _config(workdir, init_from=str(model_dir), model=model, crop_size=crop_size)
    config.init_from, config.model, config.crop_size = str(model_dir), model, crop_size
    config.mpp = 0.0  # the model's own (the study's estimate)
    for name, value in fields.items():
        config[name] = value
    return load_stage_model(config, tmp / "none"), config


def main(argv) -> None:
    del argv
    logging.getLogger().setLevel(logging.INFO)
    if not (FLAGS.workdir or FLAGS.study_model):
        raise app.UsageError("pass --workdir=W (a trained run) and/or --study_model")
    workdir = Path(FLAGS.workdir) if FLAGS.workdir else None
    result = {
        "command": common.command_line("benchmarks.section"),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": common.machine_info(),
        "simulated": True,
        "timing": {},
    }
    if workdir:
        config = _config(workdir)
        sm = load_stage_model(config, workdir)
        result["stage_model"] = dict(
            workdir=str(workdir),
            model=config.model,
            mpp=sm.mpp,
            image_size=sm.image_size,
            crop_size=config.crop_size,
        )
        result["detector"] = choose.describe(choose.from_config(config.section.detector))
        result["accuracy"] = accuracy(sm, config)
        if FLAGS.timing:
            result["timing"]["demo_model"] = timing(sm, config)
    if FLAGS.study_model:
        with tempfile.TemporaryDirectory() as tmp:
            sm50, config50 = study_model(Path(tmp), workdir)
            result["timing"]["resnet50_896px"] = timing(sm50, config50)
    Path(FLAGS.json).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.json).write_text(json.dumps(result, indent=1) + "\n")
    if "accuracy" in result:
        print(json.dumps({k: v["mean"] for k, v in result["accuracy"].items()}, indent=1))
    print(json.dumps(result["timing"], indent=1))


if __name__ == "__main__":
    app.run(main)
