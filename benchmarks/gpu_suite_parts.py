"""The GPU suite's measuring parts (`benchmarks.gpu_suite` runs them in order): the
dataset, training throughput, the two training feeds, train-step memory with and
without remat, and prediction speed. The section parts are in `gpu_suite_section`.

Each part is ``part(ctx, deadline) -> dict`` (``ctx``: the suite's ``Context``) and
runs its measurements in child processes, ``python -m benchmarks.gpu_suite_parts
--child JOB`` for the ones defined here, so that a crash or a time-out costs only
that child's numbers.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from benchmarks import common, memory, predict_speed, throughput, throughput_report

if TYPE_CHECKING:
    from benchmarks.gpu_suite import Context

MODULE = "benchmarks.gpu_suite_parts"
FEED_SEED = 109  # the throughput children's seed: the same compiled step (and cache entry)
EXIT_MARGIN_S = 10.0  # a child that times itself stops this long before its cap


def prepare(ctx: Context, deadline: float) -> dict:
    s = ctx.sizes
    job = {
        "part": "prepare",
        "num_images": s.num_images,
        "image_size": s.image_size,
        "crop_size": s.crop_size,
        "crop_range": s.crop_range,
        "cache_dir": ctx.cache_dir,
        "render_workers": os.cpu_count() or 1,
    }
    out = common.run_child_capped(MODULE, job, deadline - time.monotonic(), deadline)
    if "data_dir" in out:
        ctx.data_dir = out["data_dir"]
    return out


def prepare_child(job: dict) -> dict:
    """Render (or reuse) the simulated images and build the ArrayRecord cache."""
    from stagejax import data as data_lib

    t0 = time.monotonic()
    root = common.simulated_root(
        job["num_images"],
        job["image_size"],
        cache_dir=job["cache_dir"],
        num_workers=job["render_workers"],
    )
    render_s = time.monotonic() - t0
    config = common.stagejax_config(
        data_dir=str(root),
        cache_dir=job["cache_dir"],
        crop_size=job["crop_size"],
        crop_range=job["crop_range"],
    )
    dataset = data_lib.load(config)
    return {
        "data_dir": str(root),
        "num_images": job["num_images"],
        "image_size": job["image_size"],
        "render_workers": job["render_workers"],
        "render_s": render_s,
        "cache_s": time.monotonic() - t0 - render_s,
        "train_images": len(dataset.splits["train"].labels),
    }


def _train_job(ctx: Context) -> dict:
    """What every stagejax training child of the suite is built from."""
    s = ctx.sizes
    return {
        "model": s.model,
        "image_size": s.crop_size,
        "crop_range": s.crop_range,
        "precision": s.precision,
        "num_workers": ctx.num_workers,
        "seed": FEED_SEED,
        "data_dir": ctx.data_dir,
        "cache_dir": ctx.cache_dir,
    }


def train_throughput(ctx: Context, deadline: float) -> dict:
    s = ctx.sizes
    specs = throughput.parse_specs(",".join(s.train), global_batch=12)
    job = {
        **_train_job(ctx),
        "steps": s.steps,
        "warmup": s.warmup,
        "window": s.window,
        "torch_compile": s.torch_compile,
        "flops": True,
        "profile_repeats": 1,
    }
    part = ctx.part("train_throughput")
    part["rounds"] = {}

    def partial(key: str, r: int, out: dict) -> None:
        part["rounds"].setdefault(key, []).append(out)
        ctx.save()

    def cap(key: str) -> float:
        return s.child_cap_s[throughput_report.framework_of(key)]

    results = throughput.measure(specs, job, s.rounds, cap, deadline, on_result=partial)
    throughput_report.add_mfu(results)
    del part["rounds"]  # pooled into results
    return {"results": results, "ratios": throughput_report.ratios(results)}


def data_on_device(ctx: Context, deadline: float) -> dict:
    """Issue 15 point 3: the Grain feed against the training split kept on the
    devices, through the trainer's own step, in one process, interleaved."""
    s = ctx.sizes
    cap = min(s.child_cap_s["feed"], common.time_left(deadline))
    job = {
        **_train_job(ctx),
        "part": "feeds",
        "global_batch": s.feed_batch,
        "trials": s.feed_trials,
        "num_batches": s.feed_batches,
        "warmup": s.feed_warmup,
        "budget_s": cap - EXIT_MARGIN_S,
    }
    out = common.run_child_capped(MODULE, job, cap, deadline, min_s=20)
    if "paths" not in out:
        return {"error": out.get("error") or out.get("skipped")}
    return {"results": out.pop("paths"), **out}


def feed_child(job: dict) -> dict:
    """Both training feeds of the prepared dataset (`loader.compare_feeds`), with the
    XLA:CPU flags the throughput children use."""
    xla = common.stagejax_xla_defaults()  # before JAX starts
    import jax

    from benchmarks import loader, stagejax_step
    from stagejax.data import input_pipeline, on_device
    from stagejax.train import loop as trainer

    deadline = time.perf_counter() + job["budget_s"]
    input_pipeline.ensure_absl_flags_parsed()
    config = stagejax_step.stagejax_config(job)
    config.data_on_device = "true"
    run = trainer.Run(config)
    out = loader.compare_feeds(
        run,
        run.dataset.splits["train"],
        job["trials"],
        job["num_batches"],
        warmup=job["warmup"],
        deadline=deadline,
    )
    return {
        **out,
        "batch": config.global_batch_size,
        "train_images": len(run.dataset.splits["train"].labels),
        "timed_steps_per_round": job["num_batches"],
        "resident_bytes": on_device.resident_bytes(run.data_on_device.sizes),
        "decision": run.data_on_device.reason,
        "xla_flags": xla,
        "device": f"{jax.default_backend()}: {jax.devices()[0].device_kind}",
    }


def _memory_jobs(s) -> list[dict]:
    return [
        {
            "model": s.model,
            "size": s.crop_size,
            "precision": s.precision,
            "remat": remat,
            "batch": batch,
            "time_steps": s.memory_steps,
        }
        for batch in s.memory_batches
        for remat in (False, True)
    ]


def _memory_name(job: dict) -> str:
    return f"{memory.key(job)}/batch={job['batch']}"


def memory_remat(ctx: Context, deadline: float) -> dict:
    """Issue 15 point 1: `benchmarks.memory`'s children, remat off and on per batch
    (the study's first), each in its own process so that peaks do not mix; XLA_FLAGS
    as ``stagejax.main`` sets them (the cse_barrier flag with remat, on any backend).
    Smoke mode (a CPU: no peak to mix) runs them in one child, flag set, to save a
    start-up."""
    s = ctx.sizes
    jobs = _memory_jobs(s)
    if not s.memory_per_process:
        cap = s.child_cap_s["memory"] * len(jobs)
        job = {"part": "memory", "jobs": jobs}
        out = common.run_child_capped(MODULE, job, cap, deadline, 20, memory.child_env(True))
        error = {"error": out.get("error") or out.get("skipped")}
        outs = out.get("results") or [error] * len(jobs)
        results = {_memory_name(j): {"job": j, **o} for j, o in zip(jobs, outs, strict=True)}
        return {"results": results, "batches": list(s.memory_batches)}
    results: dict[str, dict] = {}
    for job in jobs:
        out = common.run_child_capped(
            memory.MODULE,
            job,
            s.child_cap_s["memory"],
            deadline,
            min_s=20,
            env=memory.child_env(job["remat"]),
        )
        if "skipped" in out:
            out = {"error": f"not run: {out.pop('skipped')}"}
        results[_memory_name(job)] = {"job": job, **out}
        ctx.part("memory_remat")["results"] = results
        ctx.save()
    return {"results": results, "batches": list(s.memory_batches)}


def memory_child(job: dict) -> dict:
    """Several `benchmarks.memory` configurations in one process (smoke mode)."""
    return {"results": [memory.measure_one(j) for j in job["jobs"]]}


def predict(ctx: Context, deadline: float) -> dict:
    s = ctx.sizes
    job = {
        "model": s.model,
        "image_size": s.crop_size,
        "batch": s.predict_batch,
        "steps": s.predict_steps,
        "warmup": s.predict_warmup,
        "seed": 0,
        "precision": "auto",
    }
    part = ctx.part("predict")

    def partial(name: str, out: dict) -> None:
        part.setdefault("results", {})[name] = out
        ctx.save()

    results = predict_speed.measure(
        list(predict_speed.FRAMEWORKS), job, s.child_cap_s["predict"], deadline, on_result=partial
    )
    return {"results": results, "ratios": predict_speed.ratios(results)}


CHILDREN = {"prepare": prepare_child, "feeds": feed_child, "memory": memory_child}


def main(argv: list[str] | None = None) -> None:
    common.child_main(CHILDREN, argv)


if __name__ == "__main__":
    main()
