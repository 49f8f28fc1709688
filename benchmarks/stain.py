"""Held-out stainings (issue 16, point 2): does augmentation, normalisation or both
keep accuracy when the staining changes? On SIMULATED data.

Every model trains on the demo's simulated dataset at its usual staining; its
test tubules are then rendered again, the same tubules (same seed, same
split), with the simulator's ``stain_shift`` at each strength (hematoxylin
and PAS hues moved, hematoxylin stronger, PAS weaker, another background),
and each model is evaluated on every one. For each option (none,
augmentation, normalisation, both) and seed: balanced and +/-1-stage
accuracy per staining, and the drop from the usual staining to the
strongest shift. Finished runs are kept in ``--out`` and reused.

    python -m benchmarks.stain [--model=resnet18] [--seeds=0,1,2] \
        [--shifts=0.5,1.0,1.5] [--out=/tmp/stagejax_stain_bench]
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from benchmarks import common
from stagejax import config as config_lib
from stagejax import simulate
from stagejax.data import prepared as prepared_lib
from stagejax.evaluate.inference import evaluate_split
from stagejax.evaluate.model import Model
from stagejax.runtime import workdir as workdir_lib
from stagejax.train import loop

FLAGS = flags.FLAGS

log = logging.getLogger(__name__)
METRICS = ("balanced_accuracy", "within1_accuracy", "accuracy")


def option_fields(option: str) -> dict:
    """Config overrides of one option."""
    augment = {
        "augment.stain_jitter": FLAGS.stain_jitter,
        "augment.brightness": FLAGS.tone,
        "augment.contrast": FLAGS.tone,
    }
    normalize = {"stain.normalize": FLAGS.normalize}
    return {"none": {}, "augment": augment, "normalize": normalize, "both": augment | normalize}[
        option
    ]


def _config(option: str, seed: int):
    fields = {"model": FLAGS.model, "seed": seed}
    if FLAGS.epochs:
        fields["num_epochs"] = FLAGS.epochs
    config, _ = config_lib.resolve("configs/resnet.py:demo", fields | option_fields(option))
    config_lib.validate(config)
    return config


def staining(config, shift: float):
    """The demo's dataset with every slide's staining moved by ``shift``."""
    sim = config.simulated
    cache = Path(config.cache_dir).expanduser()
    root = simulate.default_dataset(
        cache / "simulated",
        sim.num_images,
        sim.image_size,
        sim.seed,
        stain_shift=shift,
        params=simulate.SceneParams(hand_cut=sim.hand_cut),
    )
    return prepared_lib.prepare(root, cache / "prepared", crop_size=config.crop_size)


def train(option: str, seed: int, out: Path) -> tuple[Path, float]:
    """The workdir of one trained model (trained now unless finished) and seconds."""
    epochs = f"-e{FLAGS.epochs}" if FLAGS.epochs else ""
    workdir = out / f"{FLAGS.model}{epochs}-{option}-seed{seed}"
    if (workdir / "eval_test" / "metrics.json").is_file():
        return workdir, 0.0
    config = _config(option, seed)
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


def plot(summary: dict, shifts: list[float], path: str) -> None:
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
    fig.suptitle(f"Held-out stainings, SIMULATED data, {FLAGS.model}, mean +/- sd over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def define_flags() -> None:
    """The command line, defined only when run as a program: several benchmark
    modules are imported into one test process, and absl's flags are global."""
    flags.DEFINE_string("model", "resnet18", "Architecture (the demo's data, crop and schedule).")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (config.seed).")
    flags.DEFINE_list("shifts", ["0.5", "1.0", "1.5"], "Held-out stainings (stain_shift).")
    flags.DEFINE_list("options", ["none", "augment", "normalize", "both"], "What to compare.")
    flags.DEFINE_float("stain_jitter", 0.1, "Augmentation: config.augment.stain_jitter.")
    flags.DEFINE_float("tone", 0.1, "Augmentation: config.augment.brightness and .contrast.")
    flags.DEFINE_string("normalize", "macenko", "Normalisation: config.stain.normalize.")
    flags.DEFINE_integer("epochs", 0, "Epochs (0: the demo's).")
    flags.DEFINE_string("out", "/tmp/stagejax_stain_bench", "Workdirs (the stainings: cache_dir).")
    flags.DEFINE_string("json", "benchmarks/results/stain_cpu.json", "Where to write results.")
    flags.DEFINE_string("plot", "benchmarks/results/stain_cpu.png", "Where to draw the figure.")


def main(argv) -> None:
    del argv
    out = Path(FLAGS.out)
    shifts = [float(s) for s in FLAGS.shifts]
    seeds = [int(s) for s in FLAGS.seeds]
    base = _config("none", seeds[0])
    datasets = {str(s): staining(base, s) for s in [0.0, *shifts]}
    names = {k: d.splits["test"].file_names for k, d in datasets.items()}
    assert all(v == names["0.0"] for v in names.values()), "test tubules differ between stainings"
    results: dict[str, list] = {}
    for option in FLAGS.options:
        for seed in seeds:
            workdir, seconds = train(option, seed, out)
            row = {"seed": seed, "train_s": seconds, "metrics": evaluate(workdir, datasets)}
            log.info("%s seed %d: %s", option, seed, row["metrics"])
            results.setdefault(option, []).append(row)
    summary = summarize(results, shifts)
    record = {
        "date": datetime.date.today().isoformat(),
        "command": common.command_line("benchmarks.stain"),
        "machine": common.machine_info(),
        "load_avg_end": [round(v, 2) for v in os.getloadavg()],
        "data": "SIMULATED (demo dataset, 480 hand-cut tubules of 112 px, seed 0)",
        "model": FLAGS.model,
        "options": {o: option_fields(o) for o in FLAGS.options},
        "seeds": seeds,
        "shifts": shifts,
        "backend": jax.default_backend(),
        "results": results,
        "summary": summary,
    }
    Path(FLAGS.json).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.json).write_text(json.dumps(record, indent=2) + "\n")
    plot(summary, shifts, FLAGS.plot)
    for option, row in summary.items():
        cells = "  ".join(f"{k}={100 * v[0]:.1f}+/-{100 * v[1]:.1f}" for k, v in row.items())
        print(f"{option:10s} {cells}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
