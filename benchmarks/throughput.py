"""Training throughput: stagejax against the study's PyTorch recipe and a tuned PyTorch.

    python -m benchmarks.throughput --model resnet50 --image_size 896 --global_batch 48 \\
        --study_batch 12 --steps 50 --frameworks stagejax,torch,torch_tuned \\
        [--rounds 2] [--profile] [--json out.json]

``--study_batch`` sets the batch of the ``torch`` variant alone (the study
trained with 12), so that "stagejax against the study's recipe" compares
each as it would be run; ``torch_tuned`` uses ``--global_batch`` like stagejax.
A framework may name its own batch, ``NAME@BATCH``, and appear once per batch:
``--frameworks stagejax@48,stagejax@12,torch@12,torch_tuned@48``.

Each framework runs in its own process on the same device (JAX's default
backend; CUDA for torch when present) and trains for ``--warmup`` then
``--steps`` steps twice:

* model-only: one batch kept on the device, so only the step is timed;
* end to end: the real loader on the simulated dataset (PNG decode, crop,
  rot90, flip, batching, host->device copy), so the loader's cost shows as
  the difference, and directly as the time the loop waits for the next batch.

Steps are timed in windows of ``--window`` steps (synchronised at the end of
each window); images/s is reported as the median and range over windows. The
first step (trace + compile + run) is reported separately. Peak memory is
the device's peak (GPU) or the process's peak RSS (CPU; main process only).
``--profile`` adds a breakdown of the stagejax step (`stagejax_step.profile_stagejax`).
``--flops`` adds each step's FLOPs (stagejax: XLA's cost analysis of the
compiled step; torch: ``torch.utils.flop_counter`` over one forward and
backward) and the model FLOP utilisation against the device's peak
(`common.peak_flops`).
``--rounds N`` measures every framework N times, interleaved (stagejax,
torch, torch_tuned, stagejax, ...), and pools the windows of all rounds: on
a shared machine, load that comes and goes then hits every framework alike.

stagejax is built exactly as training builds it: ``stagejax.train.loop.Run`` on a config
from ``configs/default.py`` (``--precision auto`` = bfloat16 on an accelerator,
float32 on a CPU). The simulated images are ``image_size + 2 * crop_range``
px, the study's 1152 px for 896 px crops.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable

from benchmarks import common
from benchmarks import throughput_report as report
from benchmarks.stagejax_step import build_run, jax_peak_memory_mb, profile_stagejax, xla_flops

MODULE = "benchmarks.throughput"
FRAMEWORKS = ("stagejax", "torch", "torch_tuned")
log = logging.getLogger("throughput")


# --- timing ----------------------------------------------------------------------------


def timed_windows(
    step: Callable[[], object], sync: Callable[[object], None], steps: int, window: int, batch: int
) -> tuple[list[float], list[float]]:
    """Run ``steps`` steps in windows; returns (images/s per window, s/step per window)."""
    rates, step_times = [], []
    done = 0
    while done < steps:
        n = min(window, steps - done)
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
            out = step()
        sync(out)
        dt = time.perf_counter() - t0
        rates.append(n * batch / dt)
        step_times.append(dt / n)
        done += n
    return rates, step_times


def phase_result(rates: list[float], step_times: list[float]) -> dict:
    """Summaries plus the raw windows (kept so that rounds can be pooled)."""
    ms = [1e3 * t for t in step_times]
    return {
        "images_per_s": common.summary(rates),
        "step_time_ms": common.summary(ms),
        "windows_images_per_s": rates,
        "windows_step_time_ms": ms,
    }


def pool_rounds(rounds: list[dict]) -> dict:
    """One framework's results from several rounds (processes) as one: every
    window of every round pooled into the summaries, first-step time and
    loader wait as medians. Rounds that failed are counted and dropped."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return rounds[0]
    out = {**ok[0], "rounds": len(ok)}
    if len(ok) < len(rounds):
        out["failed_rounds"] = [r["error"] for r in rounds if "error" in r]
    out["first_step_s"] = statistics.median(r["first_step_s"] for r in ok)
    for phase in ("model_only", "end_to_end"):
        rates = [v for r in ok for v in r[phase]["windows_images_per_s"]]
        ms = [v for r in ok for v in r[phase]["windows_step_time_ms"]]
        merged = phase_result(rates, [t / 1e3 for t in ms])
        if phase == "end_to_end":
            merged["loader_wait_fraction"] = statistics.median(
                r[phase]["loader_wait_fraction"] for r in ok
            )
        out[phase] = merged
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    return out


class WaitClock:
    """Wraps a batch iterator and adds up the time spent waiting in ``next``."""

    def __init__(self, it):
        self.it, self.waited = it, 0.0

    def __next__(self):
        t0 = time.perf_counter()
        item = next(self.it)
        self.waited += time.perf_counter() - t0
        return item


# --- stagejax --------------------------------------------------------------------------


def bench_stagejax(job: dict) -> dict:
    import jax

    from stagejax.data import input_pipeline

    config, run = build_run(job)
    par = run.parallel
    state = par.put_state(run.initial_state)
    split = run.dataset.splits["train"]
    b, w = job["global_batch"], job["window"]

    raw = input_pipeline.train_batches(split, config)
    resident = par.put_batch(next(raw))
    t0 = time.perf_counter()
    state, _ = run.train_step(state, resident)
    jax.block_until_ready(state)
    first_step_s = time.perf_counter() - t0

    holder = {"state": state}

    def model_step():
        holder["state"], _ = run.train_step(holder["state"], resident)
        return holder["state"]

    sync = jax.block_until_ready
    timed_windows(model_step, sync, job["warmup"], w, b)
    model_only = phase_result(*timed_windows(model_step, sync, job["steps"], w, b))

    batches = WaitClock(par.prefetch(raw))

    def e2e_step():
        holder["state"], _ = run.train_step(holder["state"], next(batches))
        return holder["state"]

    timed_windows(e2e_step, sync, job["warmup"], w, b)
    batches.waited = 0.0
    t0 = time.perf_counter()
    e2e = phase_result(*timed_windows(e2e_step, sync, job["steps"], w, b))
    e2e["loader_wait_fraction"] = batches.waited / (time.perf_counter() - t0)
    flops = xla_flops(run.train_step, holder["state"], resident) if job.get("flops") else {}
    return {
        "framework": "stagejax",
        "device": f"{jax.default_backend()}: {jax.devices()[0].device_kind}",
        "precision": config.precision,
        "batch": b,
        "num_workers": config.num_workers,
        "first_step_s": first_step_s,
        "model_only": model_only,
        "end_to_end": e2e,
        **flops,
        "peak_device_memory_mb": jax_peak_memory_mb(),
        "peak_rss_mb": common.peak_rss_mb(),
    }


# --- torch -----------------------------------------------------------------------------


def bench_torch(job: dict, variant: str) -> dict:
    import torch

    from benchmarks import torch_baseline as tb

    device = tb.default_device()
    tuning = (
        tb.STUDY
        if variant == "torch"
        else tb.tuned(device, job["num_workers"], job["torch_compile"])
    )
    split = tb.read_split(job["data_dir"], "train")
    trainer = tb.Trainer(job["model"], tuning, device, seed=job["seed"])
    trainer.model.train()
    b, w = job["global_batch"], job["window"]
    total = 1 + 2 * job["warmup"] + job["steps"] + 1
    sampler = tb.make_sampler("reference", split.labels, b, job["seed"], total)
    loader = iter(
        tb.train_loader(split, job["image_size"], job["crop_range"], sampler, tuning, job["seed"])
    )
    x, y = trainer.to_device(*next(loader))

    def sync(_):
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    sync(trainer.train_step(x, y))
    first_step_s = time.perf_counter() - t0

    def model_step():
        return trainer.train_step(x, y)

    timed_windows(model_step, sync, job["warmup"], w, b)
    model_only = phase_result(*timed_windows(model_step, sync, job["steps"], w, b))

    batches = WaitClock(loader)

    def e2e_step():
        return trainer.train_step(*trainer.to_device(*next(batches)))

    timed_windows(e2e_step, sync, job["warmup"], w, b)
    batches.waited = 0.0
    t0 = time.perf_counter()
    e2e = phase_result(*timed_windows(e2e_step, sync, job["steps"], w, b))
    e2e["loader_wait_fraction"] = batches.waited / (time.perf_counter() - t0)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    flops = {}
    if job.get("flops"):
        flops = {
            "step_flops": tb.train_step_flops(trainer, x, y),
            "flops_source": "torch.utils.flop_counter, one eager forward + backward",
        }
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else common.cpu_model()
    return {
        "framework": variant,
        "device": f"{device.type}: {dev}",
        "batch": b,
        **flops,
        "precision": "bfloat16 autocast" if tuning.bf16 else "float32",
        "num_workers": tuning.num_workers,
        "first_step_s": first_step_s,
        "model_only": model_only,
        "end_to_end": e2e,
        "peak_device_memory_mb": peak_mb,
        "peak_rss_mb": common.peak_rss_mb(),
        "notes": trainer.notes,
        "torch_compile": trainer.compile_status,
        "torch_threads": torch.get_num_threads(),
    }


def child(job: dict) -> dict:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    fw = job["framework"]
    if fw == "stagejax":
        xla = common.stagejax_xla_defaults()  # before JAX starts
        return {**bench_stagejax(job), "xla_flags": xla}
    if fw == "stagejax_profile":
        xla = common.stagejax_xla_defaults()
        return {**profile_stagejax(job), "xla_flags": xla}
    return bench_torch(job, fw)


# --- running -----------------------------------------------------------------------------


def parse_specs(
    text: str, global_batch: int, study_batch: int | None = None
) -> list[tuple[str, str, int]]:
    """``NAME[@BATCH],...`` -> ``(key, framework, batch)``; without ``@BATCH``,
    ``torch`` takes ``study_batch`` (when given) and the others ``global_batch``."""
    specs = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, _, batch = item.partition("@")
        if name not in FRAMEWORKS or (batch and not batch.isdigit()):
            raise ValueError(
                f"--frameworks: {item!r}; NAME[@BATCH] with NAME one of {', '.join(FRAMEWORKS)}"
            )
        b = (
            int(batch)
            if batch
            else (study_batch if name == "torch" and study_batch else global_batch)
        )
        if b < 12 or b % 12:
            raise ValueError(
                f"--frameworks: {item!r}: batch {b} is not a positive multiple of "
                "12 (the study's sampler takes batch / 12 images of every stage)"
            )
        specs.append((item, name, b))
    keys = [k for k, _, _ in specs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"--frameworks: {text!r} names a framework twice")
    return specs


def measure(
    specs: list[tuple[str, str, int]],
    job: dict,
    rounds: int,
    cap_s: Callable[[str], float],
    deadline: float | None = None,
    on_result: Callable[[str, int, dict], None] | None = None,
) -> dict[str, dict]:
    """Every spec ``rounds`` times, interleaved (spec 1, spec 2, ..., spec 1, ...), each
    child in a fresh process for at most ``cap_s(key)`` seconds and never past
    ``deadline``; the rounds of each spec pooled. A later round is left out (and
    counted in ``skipped_rounds``) when less time is left than its first round took."""
    per_round: dict[str, list[dict]] = {key: [] for key, _, _ in specs}
    skipped = dict.fromkeys(per_round, 0)
    for r in range(rounds):
        for key, name, batch in specs:
            done = per_round[key]
            need = done[0].get("wall_s", 5.0) if done else 5.0
            log.info("measuring %s (round %d/%d)", key, r + 1, rounds)
            out = common.run_child_capped(
                MODULE,
                {**job, "framework": name, "global_batch": batch},
                cap_s(key),
                deadline,
                min_s=need,
            )
            if "skipped" in out:
                if not done:
                    done.append({"error": f"not run: {out['skipped']}"})
                else:
                    skipped[key] += 1
                continue
            done.append(out)
            if on_result:
                on_result(key, r + 1, out)
    results = {key: pool_rounds(rs) for key, rs in per_round.items()}
    for key, n in skipped.items():
        if n and "error" not in results[key]:
            results[key]["skipped_rounds"] = n
    return results


def validate(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """Refuse settings that cannot run, before any data is generated; returns the
    ``(key, framework, batch)`` specs to measure."""
    from stagejax import models

    for name in ("global_batch", "study_batch"):
        b = getattr(args, name)
        if b is not None and (b < 12 or b % 12):
            raise ValueError(
                f"--{name}: {b} is not a positive multiple of 12 (the study's "
                "sampler takes batch / 12 images of every stage)"
            )
    specs = parse_specs(args.frameworks, args.global_batch, args.study_batch)
    if not (specs or args.profile):
        raise ValueError(
            f"--frameworks: {args.frameworks!r}; a list of distinct names from "
            f"{', '.join(FRAMEWORKS)} (may be empty with --profile)"
        )
    if args.model not in models.NAMES:
        raise ValueError(f"--model: {args.model!r} is not one of {', '.join(models.NAMES)}")
    for name in ("steps", "window", "rounds", "profile_repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup: must be >= 0, got {args.warmup}")
    if args.image_size < 32:
        raise ValueError(
            f"--image_size: {args.image_size} is below the 32 px a ResNet downsamples by"
        )
    return specs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image_size", type=int, default=896, help="crop size (px)")
    p.add_argument("--crop_range", type=int, default=None, help="default: 128 scaled to image_size")
    p.add_argument("--global_batch", type=int, default=48)
    p.add_argument(
        "--study_batch",
        type=int,
        default=None,
        help="batch of the 'torch' (study recipe) variant only; the study used 12. "
        "Default: --global_batch",
    )
    p.add_argument("--steps", type=int, default=50, help="measured steps per phase")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured steps per phase")
    p.add_argument("--window", type=int, default=5, help="steps per timing window")
    p.add_argument(
        "--frameworks",
        default=",".join(FRAMEWORKS),
        help="NAME[@BATCH],... with NAME from " + ", ".join(FRAMEWORKS),
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="stagejax compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)",
    )
    p.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="loader workers for stagejax and torch_tuned (torch, as the study, "
        "uses 0); default: 0 on a CPU-only machine, else min(8, CPUs - 2)",
    )
    p.add_argument("--torch_compile", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--num_images", type=int, default=96, help="simulated dataset size")
    p.add_argument("--seed", type=int, default=109)
    p.add_argument("--cache_dir", default=common.DEFAULT_CACHE)
    p.add_argument("--profile", action="store_true", help="add the stagejax step breakdown")
    p.add_argument("--profile_repeats", type=int, default=5)
    p.add_argument(
        "--flops", action="store_true", help="add each step's FLOPs and the model FLOP utilisation"
    )
    p.add_argument("--timeout", type=float, default=3600, help="per framework (s)")
    p.add_argument("--json", default="", help="also write all results here")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat every framework this many times, interleaved (noisy machines)",
    )
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    return p


def make_job(args: argparse.Namespace, data_dir: str, crop_range: int) -> dict:
    """What every child is told (the framework and its batch are added per child)."""
    return {
        "model": args.model,
        "image_size": args.image_size,
        "crop_range": crop_range,
        "global_batch": args.global_batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "window": args.window,
        "precision": args.precision,
        "num_workers": args.num_workers,
        "torch_compile": args.torch_compile,
        "seed": args.seed,
        "data_dir": data_dir,
        "flops": args.flops,
        "cache_dir": str(os.path.expanduser(args.cache_dir)),
        "profile_repeats": args.profile_repeats,
    }


def main(argv: list[str] | None = None) -> None:
    started = common.start(build_parser(), argv, child, validate)
    if started is None:
        return
    args, specs = started
    shape_warning = common.warn_slow_xla_cpu_shape(args.model, args.image_size, log)
    crop_range = (
        args.crop_range
        if args.crop_range is not None
        else common.scaled_crop_range(args.image_size)
    )
    if args.num_workers is None:
        import torch  # cheap accelerator probe (jax would claim the device in this process)

        args.num_workers = min(8, (os.cpu_count() or 2) - 2) if torch.cuda.is_available() else 0
    root = common.simulated_root(
        args.num_images, args.image_size + 2 * crop_range, cache_dir=args.cache_dir
    )
    job = make_job(args, str(root), crop_range)

    def show(key: str, r: int, out: dict) -> None:
        print(json.dumps({"name": key, "round": r, **out}), flush=True)

    results = measure(specs, job, args.rounds, lambda _: args.timeout, on_result=show)
    if args.profile:
        log.info("measuring stagejax_profile")
        results["stagejax_profile"] = common.run_child(
            MODULE, {**job, "framework": "stagejax_profile"}, args.timeout
        )
        print(json.dumps({"name": "stagejax_profile", **results["stagejax_profile"]}), flush=True)
    report.add_mfu(results)
    ratio = report.ratios(results)
    common.finish(
        MODULE, job, results, ratio, report.markdown(results, ratio), shape_warning, args.json
    )


if __name__ == "__main__":
    main()
