"""Held-out stainings (issue 16, point 2): does augmentation, normalisation or both
keep accuracy when the staining changes? On SIMULATED data.

Every model trains on the demo's simulated dataset at its usual staining; the same test
tubules are rendered again with the simulator's ``stain_shift`` at each strength (hues
moved, hematoxylin stronger, PAS weaker, another background) and each model evaluated on
every one. Per option (none, augmentation, normalisation, both) and seed: balanced and
+/-1-stage accuracy per staining, and the drop to the strongest shift. Finished runs
are kept in ``--out`` and reused.

    python -m benchmarks.stain [--model=resnet18] [--seeds=0,1,2] \
        [--shifts=0.5,1.0,1.5] [--out=/tmp/stagejax_stain_bench]
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from benchmarks import common
from stagejax import config as config_lib
from stagejax import simulate
from stagejax.data import prepared as prepared_lib
from stagejax.evaluate.inference import evaluate_split
from stagejax.model import Model
from stagejax.runtime import workdir as workdir_lib
from stagejax.train import loop  # training's public entry

log = logging.getLogger(__name__)
METRICS = ("balanced_accuracy", "within1_accuracy", "accuracy")
OPTIONS = ("none", "augment", "normalize", "both")
TINY = {"simulated.num_images": 36, "simulated.image_size": 48, "simulated.hand_cut": False,
        "crop_size": 40, "crop_range": 4, "global_batch_size": 12,
        "eval_batch_size": 12}  # fmt: skip
FLAGS: common.Flags = {
    "model": ("resnet18", "Architecture (the demo's data, crop and schedule)."),
    "seeds": (["0", "1", "2"], "Training seeds (config.seed)."),
    "shifts": (["0.5", "1.0", "1.5"], "Held-out stainings (stain_shift)."),
    "options": (list(OPTIONS), "What to compare."),
    "stain_jitter": (0.1, "Augmentation: config.augment.stain_jitter."),
    "tone": (0.1, "Augmentation: config.augment.brightness and .contrast."),
    "normalize": ("macenko", "Normalisation: config.stain.normalize."),
    "epochs": (0, "Epochs (0: the demo's)."),
    "tiny": (False, "CI size: 36 uncut images of 48 px, 40 px crops, batches of 12."),
    "cache_dir": (common.DEFAULT_CACHE, "The stainings (simulated datasets, their caches)."),
    "out": ("/tmp/stagejax_stain_bench", "Workdirs."),
    "json": ("benchmarks/results/stain_cpu.json", "Where to write results."),
    "plot": ("benchmarks/results/stain_cpu.png", "Where to draw the figure."),
}  # fmt: skip


def option_fields(option: str, args) -> dict:
    """Config overrides of one option."""
    augment = {"augment.stain_jitter": args.stain_jitter, "augment.brightness": args.tone,
               "augment.contrast": args.tone}  # fmt: skip
    normalize = {"stain.normalize": args.normalize}
    return {"none": {}, "augment": augment, "normalize": normalize,
            "both": augment | normalize}[option]  # fmt: skip


def _config(option: str, seed: int, args):
    fields = {"model": args.model, "seed": seed, "cache_dir": args.cache_dir}
    fields |= option_fields(option, args) | (TINY if args.tiny else {})
    if args.epochs:
        fields["num_epochs"] = args.epochs
    config = common.stagejax_config("demo", **fields)
    config_lib.validate(config)
    return config


def staining(config, shift: float):
    """The demo's dataset with every slide's staining moved by ``shift``."""
    sim = config.simulated
    cache = Path(config.cache_dir).expanduser()
    root = simulate.default_dataset(cache / "simulated", sim.num_images, sim.image_size,
                                    sim.seed, stain_shift=shift,
                                    params=simulate.SceneParams(hand_cut=sim.hand_cut),
                                    num_workers=1 if sim.num_images < 100 else None)  # fmt: skip
    return prepared_lib.prepare(root, cache / "prepared", crop_size=config.crop_size)


def train(option: str, seed: int, args) -> tuple[Path, float]:
    """The workdir of one trained model (trained now unless finished) and seconds."""
    size = (f"-e{args.epochs}" if args.epochs else "") + ("-tiny" if args.tiny else "")
    workdir = Path(args.out) / f"{args.model}{size}-{option}-seed{seed}"
    if (workdir / "eval_test" / "metrics.json").is_file():
        return workdir, 0.0
    config = _config(option, seed, args)
    workdir_lib.prepare_workdir(workdir, config)
    t = time.time()
    loop.train_and_evaluate(config, workdir)
    return workdir, time.time() - t


def evaluate(workdir: Path, datasets: dict) -> dict:
    """Test metrics of ``workdir``'s best model on each staining."""
    config = workdir_lib.load_run_config(workdir)
    model = Model.from_directory(config, workdir / "best_model")
    state = model.device_state()
    out = {}
    for shift, dataset in datasets.items():
        metrics, _ = evaluate_split(model, state, dataset, "test")
        out[shift] = {k: float(metrics[k]) for k in METRICS}
    return out


def summarize(results: dict, shifts: list[float]) -> dict:
    """Per option: mean and sd over seeds per staining, and the drop to the strongest."""
    summary = {}
    for option, runs in results.items():
        row = {}
        for shift in [0.0, *shifts]:
            for k in METRICS[:2]:
                values = [r["metrics"][str(shift)][k] for r in runs]
                row[f"{k}@{shift:g}"] = (float(np.mean(values)), float(np.std(values)))
        worst = max(shifts)
        drops = [
            r["metrics"]["0.0"]["balanced_accuracy"] - r["metrics"][str(worst)]["balanced_accuracy"]
            for r in runs
        ]
        row["balanced_drop"] = (float(np.mean(drops)), float(np.std(drops)))
        summary[option] = row
    return summary


def plot(summary: dict, shifts: list[float], path: str, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [0.0, *shifts]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharex=True)
    for ax, k, title in zip(
        axes, METRICS[:2], ("balanced accuracy", "+/-1-stage accuracy"), strict=False
    ):
        for option, row in summary.items():
            mean = [100 * row[f"{k}@{s:g}"][0] for s in xs]
            sd = [100 * row[f"{k}@{s:g}"][1] for s in xs]
            ax.errorbar(xs, mean, yerr=sd, marker="o", capsize=3, label=option)
        ax.set_xlabel("stain_shift of the test tubules (0 = training staining)")
        ax.set_ylabel(f"{title} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(title="option")
    fig.suptitle(f"Held-out stainings, SIMULATED data, {model}, mean +/- sd over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> None:
    shifts = [float(s) for s in args.shifts]
    seeds = common.integers(args.seeds, "seeds")
    options = common.names(args.options, "options", OPTIONS)
    base = _config("none", seeds[0], args)
    datasets = {str(s): staining(base, s) for s in [0.0, *shifts]}
    names = {k: d.splits["test"].file_names for k, d in datasets.items()}
    assert all(v == names["0.0"] for v in names.values()), "test tubules differ between stainings"
    results: dict[str, list] = {}
    for option in options:
        for seed in seeds:
            workdir, seconds = train(option, seed, args)
            row = {"seed": seed, "train_s": seconds, "metrics": evaluate(workdir, datasets)}
            log.info("%s seed %d: %s", option, seed, row["metrics"])
            results.setdefault(option, []).append(row)
    summary = summarize(results, shifts)
    record = {"load_avg_end": [round(v, 2) for v in os.getloadavg()],
              "data": "SIMULATED, " + ("36 uncut tubules of 48 px (--tiny)" if args.tiny
                                       else "the demo's 480 hand-cut tubules of 112 px"),
              "model": args.model, "options": {o: option_fields(o, args) for o in options},
              "seeds": seeds, "shifts": shifts, "backend": jax.default_backend(),
              "results": results, "summary": summary}  # fmt: skip
    rows = [[o, *(f"{100 * m:.1f} +/- {100 * sd:.1f}" for m, sd in row.values())]
            for o, row in summary.items()]  # fmt: skip
    header = ["option", *next(iter(summary.values()))]
    common.finish("benchmarks.stain", record, common.markdown_table(header, rows), args.json)
    if args.plot:
        plot(summary, shifts, args.plot, args.model)


def main(argv: Sequence[str] | None = None) -> None:
    common.main(FLAGS, run, argv)


if __name__ == "__main__":
    main()
