"""Training throughput: stagejax against the study's PyTorch recipe and a tuned PyTorch.

    python -m benchmarks.throughput --model resnet50 --image_size 896 --global_batch 48 \\
        --study_batch 12 --steps 50 --frameworks stagejax,torch,torch_tuned \\
        [--rounds 2] [--profile] [--flops] [--json out.json]

``--study_batch`` is the batch of ``torch`` (the study's recipe: 12) alone;
``NAME@BATCH`` gives a framework its own batch. Each framework runs in its own process
and trains ``--warmup`` then ``--steps`` steps, model only (one batch kept on the
device) and end to end (the real loader on the simulated dataset: its cost shows as the
difference and as the time the loop waits for a batch), timed in windows of
``--window`` (images/s: median and range over windows; the first step apart).
``--rounds N`` interleaves N measurements of every framework and pools their windows,
so that load that comes and goes on a shared machine hits all alike. ``--flops`` adds
each step's FLOPs and the model FLOP utilisation, ``--profile`` a breakdown of the
stagejax step (`benchmarks.step_profile`). stagejax is built as training builds it
(``train.loop.Run`` on the recipe; ``--precision auto``: bfloat16 on an accelerator) on
SIMULATED ``image_size + 2 * crop_range`` px images (1152 px for 896 px crops).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence

from benchmarks import common, machine, step_profile

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
    rates, step_times, done = [], [], 0
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
    """One framework's rounds (processes) as one: every window pooled into the
    summaries, first-step time and loader wait as medians; failed rounds dropped."""
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


def two_phases(job: dict, train_step, resident, batches, sync) -> dict:
    """First step, then model only (``resident`` batch) and end to end (``batches``,
    the time spent waiting in ``next`` added up)."""
    b, w, waited = job["global_batch"], job["window"], [0.0]

    def fed():
        t0 = time.perf_counter()
        batch = next(batches)
        waited[0] += time.perf_counter() - t0
        return train_step(batch)

    t0 = time.perf_counter()
    sync(train_step(resident))
    out = {"first_step_s": time.perf_counter() - t0}
    timed_windows(lambda: train_step(resident), sync, job["warmup"], w, b)
    out["model_only"] = phase_result(*timed_windows(lambda: train_step(resident), sync,
                                                    job["steps"], w, b))  # fmt: skip
    timed_windows(fed, sync, job["warmup"], w, b)
    waited[0], t0 = 0.0, time.perf_counter()
    e2e = phase_result(*timed_windows(fed, sync, job["steps"], w, b))
    e2e["loader_wait_fraction"] = waited[0] / (time.perf_counter() - t0)
    return {**out, "end_to_end": e2e}


# --- the children ------------------------------------------------------------------------


def build_run(job: dict):
    """The config (``--precision auto`` resolved for this backend) and the trainer's
    ``Run`` (`stagejax.train.loop.Run`: training's public entry to its steps)."""
    from stagejax.data import input_pipeline
    from stagejax.train import loop as trainer

    input_pipeline.ensure_absl_flags_parsed()
    config = common.stagejax_config(
        model=job["model"], data_dir=job["data_dir"], cache_dir=job["cache_dir"],
        crop_size=job["image_size"], crop_range=job["crop_range"],
        global_batch_size=job["global_batch"], eval_batch_size=job["global_batch"],
        num_workers=job["num_workers"], precision=machine.resolve_precision(job["precision"]),
        seed=job["seed"])  # fmt: skip
    return config, trainer.Run(config)


def bench_stagejax(job: dict) -> dict:
    import jax

    from stagejax.data import input_pipeline

    config, run = build_run(job)
    par = run.parallel
    raw = input_pipeline.train_batches(run.dataset.splits["train"], config)
    holder = {"state": par.put_state(run.initial_state)}

    def step(batch):
        holder["state"], _ = run.train_step(holder["state"], batch)
        return holder["state"]

    resident = par.put_batch(next(raw))
    out = two_phases(job, step, resident, par.prefetch(raw), jax.block_until_ready)
    flops = (
        step_profile.xla_flops(run.train_step, holder["state"], resident) if job["flops"] else {}
    )
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return {"framework": "stagejax", "device": machine.device_of_jax(),
            "precision": config.precision, "batch": job["global_batch"],
            "num_workers": config.num_workers, **out, **flops,
            "peak_device_memory_mb": None if peak is None else peak / 2**20,
            "peak_rss_mb": machine.peak_rss_mb()}  # fmt: skip


def bench_torch(job: dict, variant: str) -> dict:
    import torch

    from benchmarks import torch_baseline as tb
    from benchmarks import torch_data as td

    device = tb.default_device()
    cuda = device.type == "cuda"
    tuning = tb.STUDY if variant == "torch" else tb.tuned(device, job["num_workers"],
                                                          job["torch_compile"])  # fmt: skip
    split = td.read_split(job["data_dir"], "train")
    trainer = tb.Trainer(job["model"], tuning, device, seed=job["seed"])
    trainer.model.train()
    b = job["global_batch"]
    total = 1 + 2 * job["warmup"] + job["steps"] + 1
    sampler = td.make_sampler("reference", split.labels, b, job["seed"], total)
    loader = iter(
        tb.train_loader(split, job["image_size"], job["crop_range"], sampler, tuning, job["seed"])
    )
    x, y = trainer.to_device(*next(loader))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync = torch.cuda.synchronize if cuda else lambda: None
    batches = iter(lambda: trainer.to_device(*next(loader)), None)
    out = two_phases(job, lambda batch: trainer.train_step(*batch), (x, y), batches,
                     lambda _: sync())  # fmt: skip
    if job["flops"]:
        out["step_flops"] = tb.train_step_flops(trainer, x, y)
        out["flops_source"] = "torch.utils.flop_counter, one eager forward + backward"
    dev = torch.cuda.get_device_name(device) if cuda else machine.cpu_model()
    return {"framework": variant, "device": f"{device.type}: {dev}", "batch": b,
            "precision": "bfloat16 autocast" if tuning.bf16 else "float32",
            "num_workers": tuning.num_workers, **out,
            "peak_device_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "peak_rss_mb": machine.peak_rss_mb(), "notes": trainer.notes,
            "torch_compile": trainer.compile_status,
            "torch_threads": torch.get_num_threads()}  # fmt: skip


def child(job: dict) -> dict:
    fw = job["framework"]
    if fw == "stagejax":
        xla = common.stagejax_xla_defaults()  # before JAX starts
        return {**bench_stagejax(job), "xla_flags": xla}
    if fw == "stagejax_profile":
        xla = common.stagejax_xla_defaults()
        return {**step_profile.profile(job), "xla_flags": xla}
    return bench_torch(job, fw)


# --- the report -----------------------------------------------------------------------------


def framework_of(key: str) -> str:
    """``stagejax@48`` -> ``stagejax``."""
    return key.split("@", 1)[0]


def _rate(r: dict, phase: str) -> float | None:
    return r.get(phase, {}).get("images_per_s", {}).get("median")


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """Each stagejax result's images/s over each torch result's, from this run."""
    out = {}
    for sj in (k for k in results if framework_of(k) == "stagejax"):
        for other in (k for k in results if framework_of(k) in ("torch", "torch_tuned")):
            for phase in ("end_to_end", "model_only"):
                a, b = _rate(results[sj], phase), _rate(results[other], phase)
                if a and b:
                    out[f"{sj}/{other} {phase}"] = a / b
    return out


def _range(s: dict) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def _peak(r: dict) -> str:
    mem = r["peak_device_memory_mb"]
    return f"{mem:.0f} (device)" if mem is not None else f"{r['peak_rss_mb']:.0f} (RSS)"


def _notes(name: str, r: dict) -> str:
    """What each framework actually ran with (rounds, torch.compile, bf16, Adam)."""
    parts = [f"{r.get('rounds', 1)} round(s)"]
    if r.get("skipped_rounds"):
        parts.append(f"{r['skipped_rounds']} more skipped (time budget)")
    if "torch_compile" in r:
        parts.append(f"torch.compile {r['torch_compile']}")
    return f"- {name}: " + "; ".join(parts + list(r.get("notes", [])))


COLUMNS = {
    "batch": lambda r: str(r.get("batch", "")), "precision": lambda r: r["precision"],
    "loader workers": lambda r: str(r["num_workers"]),
    "end-to-end images/s (min-max)": lambda r: _range(r["end_to_end"]["images_per_s"]),
    "model-only images/s (min-max)": lambda r: _range(r["model_only"]["images_per_s"]),
    "e2e step ms": lambda r: r["end_to_end"]["step_time_ms"]["median"],
    "model step ms": lambda r: r["model_only"]["step_time_ms"]["median"],
    "loader wait": lambda r: common.pct(r["end_to_end"]["loader_wait_fraction"]),
    "first step s": lambda r: r["first_step_s"], "peak MB": _peak,
}  # fmt: skip
MFU_COLUMNS = {
    "GFLOP per step": lambda r: f"{r['mfu']['step_flops'] / 1e9:.1f}",
    "MFU model only": lambda r: common.pct(r["mfu"]["model_only"]),
    "MFU end to end": lambda r: common.pct(r["mfu"]["end_to_end"]),
    "FLOPs from": lambda r: r["mfu"]["flops_source"], "peak": lambda r: r["mfu"]["peak_source"],
}  # fmt: skip


def markdown(results: dict[str, dict], ratio: dict[str, float]) -> str:
    runs = {k: r for k, r in results.items() if k != "stagejax_profile"}
    with_mfu = {k: r for k, r in runs.items() if "mfu" in r}
    tables = [common.results_table(runs, COLUMNS, "framework"), common.ratio_table(ratio),
              common.results_table(with_mfu, MFU_COLUMNS, "framework") if with_mfu else "",
              "\n".join(_notes(k, r) for k, r in runs.items() if "error" not in r)]  # fmt: skip
    prof = results.get("stagejax_profile", {})
    if "parts_ms" in prof:
        rows = [[k, v] for k, v in prof["parts_ms"].items()]
        tables.append(common.markdown_table(["stagejax step part (timed alone)", "ms (median)"],
                                            rows))  # fmt: skip
        if isinstance(prof.get("step_gflops"), float):
            tables.append(f"XLA cost analysis: {prof['step_gflops']:.1f} GFLOP per step, "
                          f"{prof['achieved_gflops_per_s']:.1f} GFLOP/s achieved.")  # fmt: skip
    return "\n\n".join(t for t in tables if t)


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
    if len({k for k, _, _ in specs}) != len(specs):
        raise ValueError(f"--frameworks: {text!r} names a framework twice")
    return specs


def measure(specs: list[tuple[str, str, int]], job: dict, rounds: int, cap_s: float) -> dict:
    """Every spec ``rounds`` times, interleaved (spec 1, spec 2, ..., spec 1, ...), each
    child in a fresh process for at most ``cap_s`` seconds and never past
    `common.DEADLINE`; the rounds of each spec pooled. A later round is left out (and
    counted in ``skipped_rounds``) when less time is left than its first round took."""
    per_round: dict[str, list[dict]] = {key: [] for key, _, _ in specs}
    skipped = dict.fromkeys(per_round, 0)
    for r in range(rounds):
        for key, name, batch in specs:
            done = per_round[key]
            log.info("measuring %s (round %d/%d)", key, r + 1, rounds)
            t0 = time.monotonic()
            out = common.run_child(MODULE, {**job, "framework": name, "global_batch": batch},
                                   cap_s, min_s=done[0]["wall_s"] if done else 5.0)  # fmt: skip
            out.setdefault("wall_s", time.monotonic() - t0)
            if done and out.get("error", "").startswith("not run"):
                skipped[key] += 1
            else:
                done.append(out)
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


def run(args) -> dict:
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
    results = measure(specs, job, args.rounds, args.timeout)
    if args.profile:
        log.info("measuring stagejax_profile")
        prof = {**job, "framework": "stagejax_profile"}
        results["stagejax_profile"] = common.run_child(MODULE, prof, args.timeout)
    step_profile.add_mfu(results)
    ratio = ratios(results)
    report = {"warning": warning, "job": job, "results": results, "ratios": ratio}
    return common.finish(MODULE, report, markdown(results, ratio), args.json)


def main(argv: Sequence[str] | None = None) -> dict | None:
    return common.main(FLAGS, run, argv, child)


if __name__ == "__main__":
    main()
