"""Training throughput: stagejax against the study's PyTorch recipe and a tuned PyTorch.

    python -m benchmarks.throughput --model resnet50 --image_size 896 --global_batch 48 \\
        --study_batch 12 --steps 50 --frameworks stagejax,torch,torch_tuned \\
        [--rounds 2] [--profile] [--flops] [--json out.json]

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
``--profile`` adds a breakdown of the stagejax step (`throughput_report.profile`).
``--flops`` adds each step's FLOPs (stagejax: XLA's cost analysis of the
compiled step; torch: ``torch.utils.flop_counter`` over one forward and
backward) and the model FLOP utilisation against the device's peak.
``--rounds N`` measures every framework N times, interleaved (stagejax,
torch, torch_tuned, stagejax, ...), and pools the windows of all rounds: on
a shared machine, load that comes and goes then hits every framework alike.

stagejax is built exactly as training builds it: ``stagejax.train.loop.Run`` on
``stagejax.recipe`` (``--precision auto`` = bfloat16 on an accelerator, float32 on
a CPU). The simulated images are ``image_size + 2 * crop_range`` px, the study's
1152 px for 896 px crops.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence

from benchmarks import common
from benchmarks import throughput_report as report

MODULE = "benchmarks.throughput"
FRAMEWORKS = ("stagejax", "torch", "torch_tuned")
log = logging.getLogger("throughput")

FLAGS: common.Flags = {
    "model": ("resnet50", "Architecture (a torchvision and stagejax name)."),
    "image_size": (896, "Crop size (px)."),
    "crop_range": (None, "Train crop shift (+/- px); default: 128 scaled to --image_size.", int),
    "global_batch": (48, "stagejax and torch_tuned batch, a multiple of 12."),
    "study_batch": (None, "Batch of the 'torch' (study recipe) variant only.", int),
    "steps": (50, "Measured steps per phase."),
    "warmup": (5, "Unmeasured steps per phase."),
    "window": (5, "Steps per timing window."),
    "frameworks": (",".join(FRAMEWORKS), "NAME[@BATCH],... with NAME from " + str(FRAMEWORKS)),
    "precision": ("auto", "stagejax compute dtype.", ("auto", "float32", "bfloat16")),
    "num_workers": (None, "Loader workers (stagejax, torch_tuned); default 0 on a CPU.", int),
    "torch_compile": ("auto", "torch_tuned's torch.compile (auto: CUDA).", ("auto", "on", "off")),
    "num_images": (96, "Simulated dataset size."),
    "seed": (109, "Sampler and torch seed."),
    "cache_dir": (common.DEFAULT_CACHE, "Simulated images and their ArrayRecord cache."),
    "profile": (False, "Add the stagejax step breakdown."),
    "profile_repeats": (5, "Timed calls per profiled part."),
    "flops": (False, "Add each step's FLOPs and the model FLOP utilisation."),
    "rounds": (1, "Measure every framework this many times, interleaved."),
    "timeout": (3600.0, "Per framework (s)."),
    "json": ("", "Also write all results here."),
}  # fmt: skip


# --- timing ------------------------------------------------------------------------------


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
    return {"images_per_s": common.summary(rates), "step_time_ms": common.summary(ms),
            "windows_images_per_s": rates, "windows_step_time_ms": ms}  # fmt: skip


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
        out[phase] = phase_result(rates, [t / 1e3 for t in ms])
    waits = [r["end_to_end"]["loader_wait_fraction"] for r in ok]
    out["end_to_end"]["loader_wait_fraction"] = statistics.median(waits)
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


def two_phases(job: dict, train_step, resident, batches, sync) -> dict:
    """First step, then model only (``resident`` batch) and end to end (``batches``)."""
    b, w = job["global_batch"], job["window"]
    t0 = time.perf_counter()
    sync(train_step(resident))
    out = {"first_step_s": time.perf_counter() - t0}
    timed_windows(lambda: train_step(resident), sync, job["warmup"], w, b)
    out["model_only"] = phase_result(*timed_windows(lambda: train_step(resident), sync,
                                                    job["steps"], w, b))  # fmt: skip
    clock = WaitClock(batches)
    timed_windows(lambda: train_step(next(clock)), sync, job["warmup"], w, b)
    clock.waited, t0 = 0.0, time.perf_counter()
    e2e = phase_result(*timed_windows(lambda: train_step(next(clock)), sync, job["steps"], w, b))
    e2e["loader_wait_fraction"] = clock.waited / (time.perf_counter() - t0)
    return {**out, "end_to_end": e2e}


# --- the children ------------------------------------------------------------------------


def bench_stagejax(job: dict) -> dict:
    import jax

    from stagejax.data import input_pipeline

    config, run = report.build_run(job)
    par = run.parallel
    raw = input_pipeline.train_batches(run.dataset.splits["train"], config)
    holder = {"state": par.put_state(run.initial_state)}

    def step(batch):
        holder["state"], _ = run.train_step(holder["state"], batch)
        return holder["state"]

    resident = par.put_batch(next(raw))
    out = two_phases(job, step, resident, par.prefetch(raw), jax.block_until_ready)
    flops = report.xla_flops(run.train_step, holder["state"], resident) if job["flops"] else {}
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {"framework": "stagejax", "device": common.device_of_jax(),
            "precision": config.precision, "batch": job["global_batch"],
            "num_workers": config.num_workers, **out, **flops,
            "peak_device_memory_mb": None if peak is None else peak / 2**20,
            "peak_rss_mb": common.peak_rss_mb()}  # fmt: skip


def bench_torch(job: dict, variant: str) -> dict:
    import torch

    from benchmarks import torch_baseline as tb

    device = tb.default_device()
    cuda = device.type == "cuda"
    tuned = tb.tuned(device, job["num_workers"], job["torch_compile"])
    tuning = tb.STUDY if variant == "torch" else tuned
    split = tb.read_split(job["data_dir"], "train")
    trainer = tb.Trainer(job["model"], tuning, device, seed=job["seed"])
    trainer.model.train()
    b = job["global_batch"]
    total = 1 + 2 * job["warmup"] + job["steps"] + 1
    sampler = tb.make_sampler("reference", split.labels, b, job["seed"], total)
    loader = iter(
        tb.train_loader(split, job["image_size"], job["crop_range"], sampler, tuning, job["seed"])
    )
    x, y = trainer.to_device(*next(loader))
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def sync(_):
        if cuda:
            torch.cuda.synchronize()

    batches = iter(lambda: trainer.to_device(*next(loader)), None)
    out = two_phases(job, lambda batch: trainer.train_step(*batch), (x, y), batches, sync)
    flops = {}
    if job["flops"]:
        source = "torch.utils.flop_counter, one eager forward + backward"
        flops = {"step_flops": tb.train_step_flops(trainer, x, y), "flops_source": source}
    dev = torch.cuda.get_device_name(device) if cuda else common.cpu_model()
    return {"framework": variant, "device": f"{device.type}: {dev}", "batch": b, **flops,
            "precision": "bfloat16 autocast" if tuning.bf16 else "float32",
            "num_workers": tuning.num_workers, **out,
            "peak_device_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "peak_rss_mb": common.peak_rss_mb(), "notes": trainer.notes,
            "torch_compile": trainer.compile_status,
            "torch_threads": torch.get_num_threads()}  # fmt: skip


def child(job: dict) -> dict:
    fw = job["framework"]
    if fw == "stagejax":
        xla = common.stagejax_xla_defaults()  # before JAX starts
        return {**bench_stagejax(job), "xla_flags": xla}
    if fw == "stagejax_profile":
        xla = common.stagejax_xla_defaults()
        return {**report.profile(job), "xla_flags": xla}
    return bench_torch(job, fw)


# --- running ---------------------------------------------------------------------------------


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
        default = study_batch if name == "torch" and study_batch else global_batch
        b = int(batch) if batch else default
        common.check_batch(b, f"frameworks: {item!r}: batch")
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
            sub = {**job, "framework": name, "global_batch": batch}
            out = common.run_child_capped(MODULE, sub, cap_s(key), deadline, min_s=need)
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


def validate(args) -> list[tuple[str, str, int]]:
    """Refuse settings that cannot run, before any data is generated; returns the
    ``(key, framework, batch)`` specs to measure."""
    for name in ("global_batch", "study_batch"):
        if getattr(args, name) is not None:
            common.check_batch(getattr(args, name), name)
    specs = parse_specs(args.frameworks, args.global_batch, args.study_batch)
    if not (specs or args.profile):
        raise ValueError(
            f"--frameworks: {args.frameworks!r}; a list of distinct names from "
            f"{', '.join(FRAMEWORKS)} (may be empty with --profile)"
        )
    common.check_model(args.model)
    for name in ("steps", "window", "rounds", "profile_repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup: must be >= 0, got {args.warmup}")
    common.check_image_size(args.image_size)
    return specs


def run(args) -> None:
    specs = validate(args)
    warning = common.warn_slow_xla_cpu_shape(args.model, args.image_size, log)
    crop_range = args.crop_range
    if crop_range is None:
        crop_range = common.scaled_crop_range(args.image_size)
    if args.num_workers is None:
        import torch  # cheap accelerator probe (jax would claim the device in this process)

        args.num_workers = min(8, (os.cpu_count() or 2) - 2) if torch.cuda.is_available() else 0
    root = common.simulated_root(args.num_images, args.image_size + 2 * crop_range,
                                 cache_dir=args.cache_dir)  # fmt: skip
    keys = ("model", "image_size", "global_batch", "steps", "warmup", "window", "precision",
            "num_workers", "torch_compile", "seed", "flops", "profile_repeats")  # fmt: skip
    job = {k: getattr(args, k) for k in keys}
    job.update(crop_range=crop_range, data_dir=str(root),
               cache_dir=str(os.path.expanduser(args.cache_dir)))  # fmt: skip
    results = measure(specs, job, args.rounds, lambda _: args.timeout)
    if args.profile:
        log.info("measuring stagejax_profile")
        prof = {**job, "framework": "stagejax_profile"}
        results["stagejax_profile"] = common.run_child(MODULE, prof, args.timeout)
    report.add_mfu(results)
    ratio = report.ratios(results)
    common.finish(MODULE, {"warning": warning, "job": job, "results": results, "ratios": ratio},
                  report.markdown(results, ratio), args.json)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    common.main(FLAGS, run, argv, child)


if __name__ == "__main__":
    main()
