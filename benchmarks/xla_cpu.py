r"""XLA:CPU options against PyTorch eager and channels_last, prediction and training.

    python -m benchmarks.xla_cpu          # the full run: resnet18 and resnet50, the
                                          # DEFAULT_VARIANTS, prediction at 224 and 96 px
                                          # (batch 12), training at 96 px (batch 24)
    python -m benchmarks.xla_cpu --models=resnet18 --variants=default,eigen_conv \
        --predict_sizes=64 --train_size=64 --train_batches=12 --steps=1 --torch_rounds=1
                                          # a tiny run (plumbing only: 2-px layer4 maps)
    python -m benchmarks.xla_cpu --probe_only --variants=...  # which flags XLA accepts
    python -m benchmarks.xla_cpu --profile --profile_model=resnet50 --profile_variant=default

Why one child process per variant: XLA reads ``XLA_FLAGS`` once, when its
backend starts, and aborts on a flag it does not know; its thread pool is as
large as the CPU affinity mask (there is no thread-count flag), so the
``cores*`` variants pin the child to fewer cores before JAX starts. Each
variant is first *probed* (JAX started, one convolution forward and backward
compiled and run): refused, crashed or accepted, and whether its convolution
results differ from the default's (a flag that changes nothing there leaves
them bit-identical). Then, per model:

* ``prepare``: torchvision weights with calibrated BatchNorm statistics and
  PyTorch's logits on a check batch (`xla_cpu_children`);
* ``torch`` rounds (``--torch_rounds``, spread among the variants so that load
  that comes and goes hits both): prediction NCHW and channels_last, the tuned
  trainer's step;
* one ``jax`` child per accepted variant: prediction images/s (the eval step as
  ``--mode=predict`` compiles it) per size, training images/s (the trainer's
  jitted step) per batch, and the max abs difference of the converted weights'
  logits from PyTorch's (correct: <= 1e-4) and from the default variant's.

Every figure is the median of ``--steps`` timed calls after ``--warmup`` (the
first compiles), with the 1-minute load average before and after. Ratios:
prediction over channels_last PyTorch, training over the tuned trainer, each
against the median of the torch rounds of the same run. ``--profile`` instead
times every distinct convolution of one model, forward and both backward
convolutions, against PyTorch's (`xla_cpu_profile`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time

import numpy as np
from absl import app, flags

from benchmarks import common
from benchmarks import xla_cpu_children as children
from benchmarks import xla_cpu_profile as profile_lib
from benchmarks import xla_cpu_report as report
from benchmarks.xla_cpu_variants import (
    DEFAULT_VARIANTS,
    VARIANTS,
    Variant,
    child_env,
    child_job,
    parse_added,
    probe_child,
    run_probes,
)

MODULE = "benchmarks.xla_cpu"
log = logging.getLogger("xla_cpu")

FLAGS = flags.FLAGS


# --- measuring ---------------------------------------------------------------------------


def torch_slots(n_variants: int, rounds: int) -> set[int]:
    """Before which variant indices a torch round runs (``n_variants`` = after the last)."""
    if rounds <= 0:
        return set()
    if rounds == 1:
        return {0}
    return {round(i * n_variants / (rounds - 1)) for i in range(rounds)}


def measure_model(model: str, variants: dict, probes: dict, job: dict, deadline: float) -> dict:
    """One model: prepare, then the torch rounds interleaved with the JAX variants."""
    job = {**job, "model": model}
    cap = FLAGS.child_timeout
    out: dict = {"prepare": common.run_child_capped(MODULE, {**job, "role": "prepare"}, cap)}
    out["torch_rounds"], out["variants"] = [], {}
    if "error" in out["prepare"]:
        return out
    names = [n for n in variants if probes[n]["status"] == "accepted"]
    results = {n: {"error": f"not measured: {probes[n]['status']}"} for n in variants}
    slots = torch_slots(len(names), FLAGS.torch_rounds)
    for i in range(len(names) + 1):
        if i in slots:
            log.info("%s: torch round %d", model, len(out["torch_rounds"]) + 1)
            r = common.run_child_capped(MODULE, {**job, "role": "torch"}, cap, deadline)
            out["torch_rounds"].append(r)
        if i < len(names):
            name = names[i]
            log.info("%s: variant %s", model, name)
            sub = child_job({**job, "role": "jax", "variant": name}, variants[name])
            r = common.run_child_capped(MODULE, sub, cap, deadline, env=child_env(variants[name]))
            results[name] = {"error": f"not run: {r['skipped']}"} if "skipped" in r else r
    out["variants"] = results  # in the order asked for
    add_default_diffs(results, job)
    return out


def add_default_diffs(results: dict, job: dict) -> None:
    """Each variant's max abs logits difference from the default variant's."""
    base = children.variant_logits_path({**job, "variant": "default"})
    if not base.exists():
        return
    ref = np.load(base)
    for name, r in results.items():
        path = children.variant_logits_path({**job, "variant": name})
        if "error" not in r and path.exists():
            r["logits_max_abs_diff_vs_default"] = float(np.max(np.abs(np.load(path) - ref)))


def run_profile(variants: dict[str, Variant]) -> dict:
    """``--profile``: every distinct convolution of one model, PyTorch then JAX."""
    name = FLAGS.profile_variant
    catalogue = {**VARIANTS, **variants}
    if name not in catalogue:
        raise app.UsageError(f"--profile_variant: {name!r} is not one of {', '.join(catalogue)}")
    size, batch, model = FLAGS.profile_size, FLAGS.profile_batch, FLAGS.profile_model
    job = {"model": model, "size": size, "batch": batch, "reps": max(FLAGS.profile_reps, 1)}
    cap = FLAGS.child_timeout
    torch_out = common.run_child_capped(MODULE, {**job, "role": "conv_torch"}, cap)
    if "error" in torch_out:
        return {"error": f"torch: {torch_out['error']}"}
    sub = child_job({**job, "role": "conv_jax", "shapes": torch_out["shapes"]}, catalogue[name])
    jax_out = common.run_child_capped(MODULE, sub, cap, env=child_env(catalogue[name]))
    return profile_lib.merge(model, name, size, batch, torch_out, jax_out)


def child(job: dict) -> dict:
    """One child job; the CPU affinity is set before anything imports JAX or torch."""
    if job.get("cores"):
        os.sched_setaffinity(0, job["cores"])
    role = job["role"]
    run = {
        "probe": probe_child,
        "prepare": children.prepare,
        "torch": children.bench_torch,
        "jax": children.bench_jax,
        "conv_torch": profile_lib.torch_child,
        "conv_jax": profile_lib.jax_child,
    }[role]
    return run(job)


def selected_variants() -> dict[str, Variant]:
    try:
        added = parse_added(FLAGS.add_variant)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    catalogue = {**VARIANTS, **added}
    names = list(dict.fromkeys([*FLAGS.variants, *added]))
    bad = [n for n in names if n not in catalogue]
    if bad:
        raise app.UsageError(f"--variants: unknown {bad}; choose from {', '.join(catalogue)}")
    return {n: catalogue[n] for n in names}


def base_job(workdir: str) -> dict:
    """What every child is told; bad sizes are refused before any child starts."""
    from stagejax import models  # names only: no JAX backend starts in this process

    unknown = [m for m in FLAGS.models if m not in models.NAMES]
    if unknown:
        raise app.UsageError(f"--models: {unknown} not in {', '.join(models.NAMES)}")
    batches = [int(b) for b in FLAGS.train_batches]
    if any(b < 12 or b % 12 for b in batches):
        raise app.UsageError(f"--train_batches: {batches}: positive multiples of 12 only")
    sizes = [int(s) for s in FLAGS.predict_sizes]
    if min(sizes + [FLAGS.train_size]) < 32 or FLAGS.batch < 1 or FLAGS.steps < 1:
        raise app.UsageError("sizes must be >= 32 px, --batch and --steps >= 1")
    return {
        "workdir": workdir,
        "predict_sizes": sizes,
        "check_size": FLAGS.check_size or max(sizes),
        "tolerance": FLAGS.tolerance,
        "batch": FLAGS.batch,
        "train_size": FLAGS.train_size,
        "train_batches": batches,
        "torch_train": FLAGS.torch_train,
        "steps": FLAGS.steps,
        "warmup": max(FLAGS.warmup, 1),
        "seed": FLAGS.seed,
    }


def write(report_data: dict, text: str | None) -> None:
    if text is not None:
        print("\n" + text + "\n", flush=True)
    name = f"xla_cpu_profile_{FLAGS.profile_model}.json" if FLAGS.profile else "xla_cpu.json"
    path = FLAGS.json or str(common.REPO / "benchmarks" / "results" / name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report_data, f, indent=1)


def define_flags() -> None:
    """The command line, defined only when run as a program: several benchmark
    modules are imported into one test process, and absl's flags are global."""
    flags.DEFINE_list("models", ["resnet18", "resnet50"], "Models to measure.")
    flags.DEFINE_list("variants", DEFAULT_VARIANTS.split(","), f"From: {', '.join(VARIANTS)}.")
    flags.DEFINE_multi_string(
        "add_variant", [], "Another variant, NAME=FLAGS ('fast=--xla_cpu_foo=1 --xla_cpu_bar=2')."
    )
    flags.DEFINE_list("predict_sizes", ["224", "96"], "Prediction image sizes (px).")
    flags.DEFINE_integer("batch", 12, "Prediction batch (and the logits check batch).")
    flags.DEFINE_integer(
        "check_size", 0, "Image size of the logits check (0: the largest predict size)."
    )
    flags.DEFINE_float(
        "tolerance", 1e-4, "Max abs logits difference from PyTorch that counts as correct."
    )
    flags.DEFINE_integer("train_size", 96, "Training crop size (px).")
    flags.DEFINE_list("train_batches", ["24"], "Training batches (multiples of 12).")
    flags.DEFINE_list("torch_train", ["tuned"], "PyTorch trainers: tuned and/or study.")
    flags.DEFINE_integer("steps", 3, "Timed calls per figure (the median is reported).")
    flags.DEFINE_integer("warmup", 1, "Untimed calls first (>= 1: the first compiles).")
    flags.DEFINE_integer("torch_rounds", 2, "PyTorch rounds per model, spread among the variants.")
    flags.DEFINE_integer("seed", 0, "Weights and inputs.")
    flags.DEFINE_float("child_timeout", 600, "Seconds per child process.")
    flags.DEFINE_float("max_minutes", 20, "Children that would start later are skipped.")
    flags.DEFINE_float(
        "min_gain", 0.05, "A variant is recommended only if this much faster than the default."
    )
    flags.DEFINE_bool("probe_only", False, "Only probe which variants XLA accepts.")
    flags.DEFINE_string(
        "json",
        "",
        "Where to write the results (default: benchmarks/results/xla_cpu.json, "
        "or xla_cpu_profile_MODEL.json with --profile).",
    )
    flags.DEFINE_bool("profile", False, "Per-convolution profile instead (see --profile_*).")
    flags.DEFINE_string("profile_model", "resnet50", "Model of --profile.")
    flags.DEFINE_string("profile_variant", "default", "Variant of --profile.")
    flags.DEFINE_integer("profile_size", 224, "Image size of --profile.")
    flags.DEFINE_integer("profile_batch", 12, "Batch of --profile.")
    flags.DEFINE_integer("profile_reps", 3, "Timed calls per convolution of --profile.")
    flags.DEFINE_string("child", "", "Internal: run one child job (JSON).")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.child:
        common.emit(child(json.loads(FLAGS.child)))
        return
    logging.getLogger().setLevel(logging.INFO)
    if os.environ.get("XLA_FLAGS"):
        log.warning("XLA_FLAGS=%s ignored: each child runs its variant's", os.environ["XLA_FLAGS"])
    t0 = time.monotonic()
    deadline = t0 + 60 * FLAGS.max_minutes
    variants = selected_variants()
    data: dict = {"machine": common.machine_info(), "command": common.command_line(MODULE)}
    with tempfile.TemporaryDirectory(prefix="xla_cpu_") as workdir:
        if FLAGS.profile:
            data["profile"] = run_profile(variants)
            write(data, profile_lib.markdown(data["profile"]))
            return
        job = base_job(workdir)
        data["job"] = job
        sizes = {*job["predict_sizes"], job["train_size"]}
        warned = [common.warn_slow_xla_cpu_shape(m, s, log) for m in FLAGS.models for s in sizes]
        data["warnings"] = [w for w in warned if w]
        data["variants"] = {n: dataclasses.asdict(v) for n, v in variants.items()}
        data["probes"] = run_probes(variants)
        if not FLAGS.probe_only:
            data["models"] = models = {}
            for model in FLAGS.models:
                models[model] = measure_model(model, variants, data["probes"], job, deadline)
                data["ratios"] = report.ratios(models)
                write(data, None)  # after each model: a cut-short run keeps what it has
    data["wall_s"] = round(time.monotonic() - t0, 1)
    data["machine"]["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    data["summary"] = report.summary(data, FLAGS.min_gain) if "models" in data else {}
    write(data, report.markdown(data))
    log.info("done in %.0f s", data["wall_s"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
