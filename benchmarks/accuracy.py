"""Accuracy parity: stagejax and the PyTorch baseline, same recipe, same simulated images.

    python -m benchmarks.accuracy --model resnet18 --num_images 480 --image_size 96 \\
        --crop_size 80 --crop_range 8 --batch 12 --epochs 5 --split_by random \\
        --seeds 109,110,111 [--json out.json]

Both train with the study's recipe from scratch (Adam lr 1e-3 with an L2 term of 5e-4,
stage-balanced batches, shifted crop + rot90 + flip, per-image min-max), test the epoch
with the best validation balanced accuracy (ties: the later): stagejax through
``stagejax.train.loop.train_and_evaluate`` (float32, its own workdir), PyTorch through
``benchmarks.torch_baseline`` (``study``). Every (seed, framework) run is a fresh
process, interleaved seed by seed so that load on a shared machine hits both alike; wall
time is the training function's (not dataset generation or stagejax's one-off cache).

The defaults finish in about 12 minutes on an idle 2-core CPU and still learn. With
slides held out (``--split_by slide``) validation stays near chance for both in a CPU
budget (RESULTS.md), so the default splits at random. The images are SIMULATED: the
numbers compare two implementations of one recipe, not how they do on real tubules.
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import common

MODULE = "benchmarks.accuracy"
FRAMEWORKS = ("stagejax", "torch")
METRICS = ("balanced_accuracy", "accuracy", "within1_accuracy")
CHANCE = 1.0 / 12
PARITY_POINTS = 2.0  # issue target: stagejax mean balanced accuracy within 2 points of torch
log = logging.getLogger("accuracy")

FLAGS: common.Flags = {
    "model": ("resnet18", "Architecture (a torchvision and stagejax name)."),
    "num_images": (480, "Simulated dataset size."),
    "image_size": (96, "Simulated image size (px)."),
    "crop_size": (80, "Train and test crop (px)."),
    "crop_range": (8, "Train crop shift (+/- px)."),
    "batch": (12, "Train batch, a multiple of 12 (the study: 12)."),
    "eval_batch": (24, "Evaluation batch."),
    "epochs": (5, "Epochs per run."),
    "seeds": ("109,110,111", "Training seeds, one run per framework each."),
    "frameworks": (",".join(FRAMEWORKS), "From " + ", ".join(FRAMEWORKS)),
    "data_seed": (0, "Simulator seed."),
    "split_by": ("random", "Simulator split (see the module doc).", ("slide", "random")),
    "cache_dir": (common.DEFAULT_CACHE, "Simulated images and their ArrayRecord cache."),
    "workdir": ("", "stagejax run folders (default: a temp dir)."),
    "timeout": (3600.0, "Per run (s)."),
    "json": ("", "Also write all results here."),
}  # fmt: skip


# --- children --------------------------------------------------------------------------


def stagejax_config(job: dict):
    """The study's recipe; no loader workers (as the study's DataLoader and the torch
    side), one log line per epoch, epoch-end checkpoints only."""
    return common.stagejax_config(
        model=job["model"], data_dir=job["data_dir"], cache_dir=job["cache_dir"],
        crop_size=job["crop_size"], crop_range=job["crop_range"], global_batch_size=job["batch"],
        eval_batch_size=job["eval_batch"], num_epochs=job["epochs"], seed=job["seed"],
        precision="float32", num_workers=0, log_every_steps=1000,
        checkpoint_every_steps=100000)  # fmt: skip


def run_stagejax(job: dict) -> dict:
    from stagejax import datasets as data_lib
    from stagejax.data import input_pipeline
    from stagejax.train import loop as trainer  # training's public entry

    input_pipeline.ensure_absl_flags_parsed()
    config = stagejax_config(job)
    dataset = data_lib.load(config)  # the cached ArrayRecord conversion, not timed
    workdir = Path(job["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)  # as stagejax.main does
    t0 = time.perf_counter()
    metrics = trainer.train_and_evaluate(config, workdir, dataset)
    return {"framework": "stagejax", "seed": job["seed"], "wall_s": time.perf_counter() - t0,
            "best_epoch": int(metrics["best_epoch"]), **{k: float(metrics[k]) for k in METRICS},
            "workdir": str(workdir)}  # fmt: skip


def run_torch(job: dict) -> dict:
    from benchmarks import torch_baseline as tb

    recipe = tb.Recipe(model=job["model"], crop_size=job["crop_size"],
                       crop_range=job["crop_range"], batch_size=job["batch"],
                       eval_batch_size=job["eval_batch"], num_epochs=job["epochs"],
                       seed=job["seed"])  # fmt: skip
    r = tb.train_and_evaluate(job["data_dir"], recipe, tb.STUDY)
    return {"framework": "torch", "seed": job["seed"], "wall_s": r["wall_s"],
            "best_epoch": r["best_epoch"], **{k: r[k] for k in METRICS}}  # fmt: skip


def child(job: dict) -> dict:
    fmt = f"%(asctime)s {job['framework']} seed {job['seed']}: %(message)s"
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=fmt)
    return run_stagejax(job) if job["framework"] == "stagejax" else run_torch(job)


# --- summary ---------------------------------------------------------------------------


def aggregate(runs: list[dict]) -> dict[str, dict]:
    """Per framework: mean and sample std (0 for one run) of each metric and wall time."""
    out: dict[str, dict] = {}
    for fw in dict.fromkeys(r["framework"] for r in runs if "error" not in r):
        rs = [r for r in runs if r.get("framework") == fw and "error" not in r]
        agg: dict = {"runs": len(rs)}
        for k in (*METRICS, "wall_s"):
            vals = [float(r[k]) for r in rs]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            agg[k] = {"mean": statistics.fmean(vals), "std": std}
        out[fw] = agg
    return out


def parity(agg: dict[str, dict], points: float = PARITY_POINTS) -> dict | None:
    """The issue's target: stagejax mean balanced accuracy >= torch's minus ``points``."""
    if "stagejax" not in agg or "torch" not in agg:
        return None
    sj = agg["stagejax"]["balanced_accuracy"]["mean"]
    pt = agg["torch"]["balanced_accuracy"]["mean"]
    gap = 100 * (sj - pt)
    return {"stagejax_minus_torch_points": gap, "tolerance_points": points, "met": gap >= -points}


def markdown(runs: list[dict], agg: dict[str, dict], par: dict | None) -> str:
    def pct(v: float) -> str:
        return f"{100 * v:.1f}"

    rows = [[r["framework"], str(r["seed"]), f"error: {r['error']}", "", "", "", ""]
            if "error" in r else [r["framework"], str(r["seed"]), *(pct(r[k]) for k in METRICS),
                                  str(r["best_epoch"]), f"{r['wall_s']:.0f}"]
            for r in runs]  # fmt: skip
    for fw, a in agg.items():
        rows.append([f"**{fw} mean +/- std**", f"{a['runs']} seeds",
                     *(f"{pct(a[k]['mean'])} +/- {pct(a[k]['std'])}" for k in METRICS), "",
                     f"{a['wall_s']['mean']:.0f} +/- {a['wall_s']['std']:.0f}"])  # fmt: skip
    header = ["framework", "seed", "test balanced acc %", "test acc %", "test +/-1 acc %",
              "best epoch", "wall s"]  # fmt: skip
    text = common.markdown_table(header, rows)
    text += f"\n\nChance: {100 * CHANCE:.1f}% (12 stages). SIMULATED images."
    if par is not None:
        met = "met" if par["met"] else "missed"
        text += (f"\n\nParity (stagejax mean balanced accuracy - torch's): "
                 f"{par['stagejax_minus_torch_points']:+.1f} points; target >= "
                 f"-{par['tolerance_points']:.0f}: {met}.")  # fmt: skip
    return text


# --- command line ----------------------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
    return common.integers(text, "seeds")


def validate(args) -> tuple[list[int], list[str]]:
    """Refuse settings the recipe cannot run, before generating or training anything."""
    seeds = parse_seeds(args.seeds)
    names = common.names(args.frameworks, "frameworks", FRAMEWORKS)
    common.check_batch(args.batch, "batch")
    if args.epochs < 1 or args.eval_batch < 1 or args.num_images < 12 * 3:
        raise ValueError("--epochs and --eval_batch must be >= 1 and --num_images >= 36")
    if args.crop_range < 0:
        raise ValueError(f"--crop_range: must be >= 0, got {args.crop_range}")
    if args.crop_size > args.image_size:
        raise ValueError(f"--crop_size: {args.crop_size} exceeds --image_size {args.image_size}")
    return seeds, names


def run(args) -> None:
    seeds, names = validate(args)
    warning = common.warn_slow_xla_cpu_shape(args.model, args.crop_size, log)
    root = common.simulated_root(args.num_images, args.image_size, args.data_seed,
                                 args.cache_dir, split_by=args.split_by)  # fmt: skip
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="stagejax-accuracy-"))
    keys = ("model", "crop_size", "crop_range", "batch", "eval_batch", "epochs")
    base = {k: getattr(args, k) for k in keys}
    base.update(data_dir=str(root), cache_dir=str(Path(args.cache_dir).expanduser()))
    runs = []
    t0 = time.perf_counter()
    for seed in seeds:
        for fw in names:
            log.info("training %s, seed %d", fw, seed)
            run_dir = workdir / f"{fw}-seed{seed}"
            if run_dir.exists():  # stagejax would resume it: not a fresh, timed run
                raise ValueError(f"{run_dir}: exists; pass an empty --workdir")
            job = {**base, "framework": fw, "seed": seed, "workdir": str(run_dir)}
            out = common.run_child(MODULE, job, args.timeout)
            runs.append({"framework": fw, "seed": seed, **out})
    agg = aggregate(runs)
    par = parity(agg)
    setting = {**base, **{k: getattr(args, k) for k in ("num_images", "image_size",
                                                          "data_seed", "split_by")},
               "seeds": seeds}  # fmt: skip
    report = {"warning": warning, "setting": setting, "simulated_data": True, "runs": runs,
              "summary": agg, "parity": par, "total_wall_s": time.perf_counter() - t0}  # fmt: skip
    common.finish(MODULE, report, markdown(runs, agg, par), args.json)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    common.main(FLAGS, run, argv, child)


if __name__ == "__main__":
    main()
