"""Training throughput: stagejax against the study's PyTorch recipe and a tuned PyTorch.

    python -m benchmarks.throughput --model resnet50 --image_size 896 --global_batch 48 \\
        --study_batch 12 --steps 50 --frameworks stagejax,torch,torch_tuned \\
        [--rounds 2] [--profile] [--json out.json]

``--study_batch`` sets the batch of the ``torch`` variant alone (the study
trained with 12), so that "stagejax against the study's recipe" compares
each as it would be run; ``torch_tuned`` uses ``--global_batch`` like stagejax.

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
``--profile`` adds a breakdown of the stagejax step (see `profile_stagejax`).
``--rounds N`` measures every framework N times, interleaved (stagejax,
torch, torch_tuned, stagejax, ...), and pools the windows of all rounds: on
a shared machine, load that comes and goes then hits every framework alike.

stagejax is built exactly as training builds it: ``trainer.Run`` on a config
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

import numpy as np

from benchmarks import common

MODULE = "benchmarks.throughput"
FRAMEWORKS = ("stagejax", "torch", "torch_tuned")
log = logging.getLogger("throughput")


# --- timing ----------------------------------------------------------------------------

def timed_windows(step: Callable[[], object], sync: Callable[[object], None], steps: int,
                  window: int, batch: int) -> tuple[list[float], list[float]]:
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
            "windows_images_per_s": rates, "windows_step_time_ms": ms}


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
                r[phase]["loader_wait_fraction"] for r in ok)
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

def stagejax_config(job: dict):
    return common.stagejax_config(
        model=job["model"], data_dir=job["data_dir"], cache_dir=job["cache_dir"],
        crop_size=job["image_size"], crop_range=job["crop_range"],
        global_batch_size=job["global_batch"], eval_batch_size=job["global_batch"],
        num_workers=job["num_workers"], precision=job["precision"], seed=job["seed"],
    )


def build_run(job: dict):
    """The config (``--precision auto`` resolved for this backend) and the trainer's ``Run``."""
    import jax

    from stagejax import trainer
    from stagejax.data import input_pipeline

    input_pipeline.ensure_absl_flags_parsed()
    config = stagejax_config(job)
    if config.precision == "auto":
        config.precision = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return config, trainer.Run(config)


def jax_peak_memory_mb() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


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
    return {"framework": "stagejax", "device": f"{jax.default_backend()}: "
            f"{jax.devices()[0].device_kind}", "precision": config.precision, "batch": b,
            "num_workers": config.num_workers, "first_step_s": first_step_s,
            "model_only": model_only, "end_to_end": e2e,
            "peak_device_memory_mb": jax_peak_memory_mb(), "peak_rss_mb": common.peak_rss_mb()}


def _block_time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` (already compiled by a first call)."""
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def profile_stagejax(job: dict) -> dict:
    """Where a stagejax train step's time goes: each part jitted and timed alone
    (median of ``--profile_repeats``), plus XLA's FLOP count of the whole step.

    Parts: host loader (decode + crop + batch, in this process), host->device
    copy, ``device_preprocess``, forward (train mode), forward+backward, the
    optimizer update, the full step. Parts overlap in the real step (XLA fuses
    across them), so they need not add up exactly.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from stagejax import train as train_lib
    from stagejax.data import input_pipeline

    config, run = build_run(job)
    par = run.parallel
    state = par.put_state(run.initial_state)
    reps = job["profile_repeats"]
    dtype = train_lib.compute_dtype(config)
    out: dict = {"framework": "stagejax_profile", "precision": config.precision}

    raw = input_pipeline.train_batches(run.dataset.splits["train"], config)
    host = next(raw)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        next(raw)
        times.append(time.perf_counter() - t0)
    parts = {"host_loader_next_batch": float(np.median(times))}
    parts["host_to_device"] = _block_time(lambda: par.put_batch(host), reps)
    batch = par.put_batch(host)

    prep = jax.jit(lambda s, x: train_lib._preprocess(x, s.rng, s.step, config, True, 0))
    parts["device_preprocess"] = _block_time(lambda: prep(state, batch["image"]), reps)
    images = prep(state, batch["image"]).astype(dtype)

    def loss_fn(model, x, y):
        logits = model(x).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def forward(s, x, y):
        return loss_fn(run.modeldef.merge(s.params, s.batch_stats, train=True), x, y)

    def forward_backward(s, x, y):
        # Merged outside the differentiated function, as the train step does:
        # BatchNorm statistics are mutated at the trace level they were made at.
        model = run.modeldef.merge(s.params, s.batch_stats, train=True)
        return nnx.value_and_grad(loss_fn)(model, x, y)

    fwd, grad = jax.jit(forward), jax.jit(forward_backward)
    parts["forward"] = _block_time(lambda: fwd(state, images, batch["label"]), reps)
    parts["forward_backward"] = _block_time(lambda: grad(state, images, batch["label"]), reps)
    grads = grad(state, images, batch["label"])[1]

    def update(s, g):
        updates, opt_state = run.tx.update(g, s.opt_state, s.params)
        return optax.apply_updates(s.params, updates), opt_state

    upd = jax.jit(update)
    parts["optimizer_update"] = _block_time(lambda: upd(state, grads), reps)

    # The real step donates its state: time it on a private copy.
    step_state = {"s": par.put_state(run.initial_state)}

    def full():
        step_state["s"], _ = run.train_step(step_state["s"], batch)
        return step_state["s"]

    parts["full_train_step"] = _block_time(full, reps)
    out["parts_ms"] = {k: 1e3 * v for k, v in parts.items()}
    try:
        cost = run.train_step.lower(step_state["s"], batch).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0))
        out["step_gflops"] = flops / 1e9
        out["achieved_gflops_per_s"] = flops / 1e9 / parts["full_train_step"]
    except Exception as e:  # noqa: BLE001 -- cost analysis is optional per backend
        out["step_gflops"] = f"unavailable ({type(e).__name__})"
    return out


# --- torch -----------------------------------------------------------------------------

def bench_torch(job: dict, variant: str) -> dict:
    import torch

    from benchmarks import torch_baseline as tb

    device = tb.default_device()
    tuning = tb.STUDY if variant == "torch" else tb.tuned(device, job["num_workers"],
                                                          job["torch_compile"])
    split = tb.read_split(job["data_dir"], "train")
    trainer = tb.Trainer(job["model"], tuning, device, seed=job["seed"])
    trainer.model.train()
    b, w = job["global_batch"], job["window"]
    total = 1 + 2 * job["warmup"] + job["steps"] + 1
    sampler = tb.make_sampler("reference", split.labels, b, job["seed"], total)
    loader = iter(tb.train_loader(split, job["image_size"], job["crop_range"], sampler,
                                  tuning, job["seed"]))
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
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else common.cpu_model()
    return {"framework": variant, "device": f"{device.type}: {dev}", "batch": b,
            "precision": "bfloat16 autocast" if tuning.bf16 else "float32",
            "num_workers": tuning.num_workers, "first_step_s": first_step_s,
            "model_only": model_only, "end_to_end": e2e,
            "peak_device_memory_mb": (torch.cuda.max_memory_allocated() / 2**20
                                      if device.type == "cuda" else None),
            "peak_rss_mb": common.peak_rss_mb(), "notes": trainer.notes,
            "torch_compile": trainer.compile_status,
            "torch_threads": torch.get_num_threads()}


def child(job: dict) -> dict:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    fw = job["framework"]
    if fw == "stagejax":
        return bench_stagejax(job)
    if fw == "stagejax_profile":
        return profile_stagejax(job)
    return bench_torch(job, fw)


# --- report ----------------------------------------------------------------------------

def _rate(r: dict, phase: str) -> float | None:
    return r.get(phase, {}).get("images_per_s", {}).get("median")


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """stagejax images/s over each torch variant's, from this run."""
    out = {}
    sj = results.get("stagejax", {})
    for other in ("torch", "torch_tuned"):
        if other not in results:
            continue
        for phase in ("end_to_end", "model_only"):
            a, b = _rate(sj, phase), _rate(results[other], phase)
            if a and b:
                out[f"stagejax/{other} {phase}"] = a / b
    return out


def _notes_line(name: str, r: dict) -> str:
    """What each framework actually ran with (rounds, torch.compile, bf16, Adam)."""
    parts = [f"{r.get('rounds', 1)} round(s)"]
    if "torch_compile" in r:
        parts.append(f"torch.compile {r['torch_compile']}")
    parts += list(r.get("notes", []))
    return f"- {name}: " + "; ".join(parts)


def markdown(results: dict[str, dict], ratio: dict[str, float]) -> str:
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name] + [f"error: {r['error']}"] + [""] * 9)
            continue
        if name == "stagejax_profile":
            continue
        e, m = r["end_to_end"], r["model_only"]
        mem = r["peak_device_memory_mb"]
        rows.append([
            name, str(r.get("batch", "")), r["precision"], str(r["num_workers"]),
            f"{e['images_per_s']['median']:.2f} ({e['images_per_s']['min']:.2f}-"
            f"{e['images_per_s']['max']:.2f})",
            f"{m['images_per_s']['median']:.2f} ({m['images_per_s']['min']:.2f}-"
            f"{m['images_per_s']['max']:.2f})",
            e["step_time_ms"]["median"], m["step_time_ms"]["median"],
            f"{100 * e['loader_wait_fraction']:.1f}%",
            r["first_step_s"],
            f"{mem:.0f} (device)" if mem is not None else f"{r['peak_rss_mb']:.0f} (RSS)"])
    text = common.markdown_table(
        ["framework", "batch", "precision", "loader workers", "end-to-end images/s (min-max)",
         "model-only images/s (min-max)", "e2e step ms", "model step ms", "loader wait",
         "first step s", "peak MB"], rows)
    if ratio:
        text += "\n\n" + common.markdown_table(
            ["same-run ratio (median images/s)", "value"],
            [[k, f"{v:.2f}x"] for k, v in ratio.items()])
    notes = [_notes_line(name, r) for name, r in results.items()
             if "error" not in r and name != "stagejax_profile"]
    if notes:
        text += "\n\n" + "\n".join(notes)
    prof = results.get("stagejax_profile")
    if prof and "parts_ms" in prof:
        text += "\n\n" + common.markdown_table(
            ["stagejax step part (timed alone)", "ms (median)"],
            [[k, v] for k, v in prof["parts_ms"].items()])
        if isinstance(prof.get("step_gflops"), float):
            text += (f"\n\nXLA cost analysis: {prof['step_gflops']:.1f} GFLOP per step, "
                     f"{prof['achieved_gflops_per_s']:.1f} GFLOP/s achieved.")
    return text


def validate(args: argparse.Namespace) -> list[str]:
    """Refuse settings that cannot run, before any data is generated; returns the
    frameworks to measure."""
    from stagejax import models

    names = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    bad = [n for n in names if n not in FRAMEWORKS]
    if bad or len(set(names)) != len(names) or not (names or args.profile):
        raise ValueError(f"--frameworks: {args.frameworks!r}; a list of distinct names from "
                         f"{', '.join(FRAMEWORKS)} (may be empty with --profile)")
    if args.model not in models.NAMES:
        raise ValueError(f"--model: {args.model!r} is not one of {', '.join(models.NAMES)}")
    for name in ("global_batch", "study_batch"):
        b = getattr(args, name)
        if b is not None and (b < 12 or b % 12):
            raise ValueError(f"--{name}: {b} is not a positive multiple of 12 (the study's "
                             "sampler takes batch / 12 images of every stage)")
    for name in ("steps", "window", "rounds", "profile_repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup: must be >= 0, got {args.warmup}")
    if args.image_size < 32:
        raise ValueError(f"--image_size: {args.image_size} is below the 32 px a ResNet "
                         "downsamples by")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image_size", type=int, default=896, help="crop size (px)")
    p.add_argument("--crop_range", type=int, default=None,
                   help="default: 128 scaled to image_size")
    p.add_argument("--global_batch", type=int, default=48)
    p.add_argument("--study_batch", type=int, default=None,
                   help="batch of the 'torch' (study recipe) variant only; the study used 12. "
                        "Default: --global_batch")
    p.add_argument("--steps", type=int, default=50, help="measured steps per phase")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured steps per phase")
    p.add_argument("--window", type=int, default=5, help="steps per timing window")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    p.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="stagejax compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--num_workers", type=int, default=None,
                   help="loader workers for stagejax and torch_tuned (torch, as the study, "
                        "uses 0); default: 0 on a CPU-only machine, else min(8, CPUs - 2)")
    p.add_argument("--torch_compile", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--num_images", type=int, default=96, help="simulated dataset size")
    p.add_argument("--seed", type=int, default=109)
    p.add_argument("--cache_dir", default=common.DEFAULT_CACHE)
    p.add_argument("--profile", action="store_true", help="add the stagejax step breakdown")
    p.add_argument("--profile_repeats", type=int, default=5)
    p.add_argument("--timeout", type=float, default=3600, help="per framework (s)")
    p.add_argument("--json", default="", help="also write all results here")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every framework this many times, interleaved (noisy machines)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.child:
        common.emit(child(json.loads(args.child)))
        return

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        names = validate(args)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    shape_warning = common.warn_slow_xla_cpu_shape(args.model, args.image_size, log)
    crop_range = args.crop_range if args.crop_range is not None else \
        common.scaled_crop_range(args.image_size)
    if args.num_workers is None:
        import torch  # cheap accelerator probe (jax would claim the device in this process)

        args.num_workers = min(8, (os.cpu_count() or 2) - 2) if torch.cuda.is_available() else 0
    root = common.simulated_root(args.num_images, args.image_size + 2 * crop_range,
                                 cache_dir=args.cache_dir)
    job = {"model": args.model, "image_size": args.image_size, "crop_range": crop_range,
           "global_batch": args.global_batch, "steps": args.steps, "warmup": args.warmup,
           "window": args.window, "precision": args.precision, "num_workers": args.num_workers,
           "torch_compile": args.torch_compile, "seed": args.seed, "data_dir": str(root),
           "cache_dir": str(os.path.expanduser(args.cache_dir)),
           "profile_repeats": args.profile_repeats}
    per_round: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):  # interleaved, so load drift hits every framework
        for name in names:
            log.info("measuring %s (round %d/%d)", name, r + 1, args.rounds)
            batch = args.study_batch if (name == "torch" and args.study_batch) else \
                args.global_batch
            per_round[name].append(common.run_child(
                MODULE, {**job, "framework": name, "global_batch": batch}, args.timeout))
            print(json.dumps({"name": name, "round": r + 1, **per_round[name][-1]}),
                  flush=True)
    results = {name: pool_rounds(rs) for name, rs in per_round.items()}
    if args.profile:
        log.info("measuring stagejax_profile")
        results["stagejax_profile"] = common.run_child(
            MODULE, {**job, "framework": "stagejax_profile"}, args.timeout)
        print(json.dumps({"name": "stagejax_profile", **results["stagejax_profile"]}),
              flush=True)
    ratio = ratios(results)
    common.finish(MODULE, job, results, ratio, markdown(results, ratio), shape_warning,
                  args.json)


if __name__ == "__main__":
    main()
