"""Train-step memory with and without rematerialisation (``--config.remat``).

    python -m benchmarks.memory [--models resnet50,mobilenet_v3_large] \\
        [--sizes 224,448,896] [--precisions float32,bfloat16] [--batch 12] \\
        [--time_steps 10] [--json benchmarks/results/memory-DATE.json]

For each model, crop size and precision the trainer's step is built as training builds
it (``stagejax.train.loop.Run`` on the recipe, a stand-in dataset of the right size)
with remat off and on, compiled for a uint8 batch, and XLA's memory analysis recorded:
temporaries, arguments, outputs and outputs aliased to the donated state (what the
memory pre-flight, `stagejax.train.memory`, adds up). ``--time_steps N`` then times N
steps after a warm-up (the median, and on an accelerator the device's peak memory).
Each configuration runs in its own process, so one that runs out of memory loses only
its own numbers. On XLA:CPU before jaxlib 0.12 remat saves nothing unless XLA_FLAGS holds
``memory.CPU_REMAT_XLA_FLAG``; ``--xla_keep_remat`` adds it to the children's.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
import types
from collections.abc import Sequence

from benchmarks import common, machine

MODULE = "benchmarks.memory"
PRECISIONS = ("float32", "bfloat16")
log = logging.getLogger("memory")

FLAGS: common.Flags = {
    "models": ("resnet50,mobilenet_v3_large", "Architectures."),
    "sizes": ("224,448,896", "Crop sizes (px)."),
    "precisions": (",".join(PRECISIONS), "From " + ", ".join(PRECISIONS)),
    "batch": (12, "Global batch (the study's: 12)."),
    "time_steps": (0, "Timed steps after a warm-up (0: compile only)."),
    "timeout": (1800.0, "Per configuration (s)."),
    "xla_keep_remat": (False, "Add memory.CPU_REMAT_XLA_FLAG to the children's XLA_FLAGS "
                       "(XLA:CPU undoes remat without it)."),
    "json": ("", "Default: benchmarks/results/memory-DATE.json."),
}  # fmt: skip


# --- one configuration (child) ---------------------------------------------------------


def _stand_in_dataset(batch: int):
    """What ``Run`` reads of a dataset: the train split's size (one epoch of 10 steps)."""
    import numpy as np

    train = types.SimpleNamespace(labels=np.zeros(10 * batch, np.int32))
    return types.SimpleNamespace(splits={"train": train})


def _batch(run, size: int, batch: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    channels = 1 if run.config.grayscale else 3
    host = {
        "image": rng.integers(0, 256, (batch, size, size, channels), dtype=np.uint8),
        "label": (np.arange(batch) % run.config.num_classes).astype(np.int32),
    }
    return run.parallel.put_batch(host)


def _time_steps(compiled, state, batch, steps: int) -> tuple[list[float], object]:
    """Seconds of each of ``steps`` steps after one warm-up step (the state is donated)."""
    import jax

    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return times, state


def child(job: dict) -> dict:
    """Compile (and optionally time) the trainer's step for one configuration, with
    the XLA:CPU flags stagejax sets."""
    common.stagejax_xla_defaults()  # before JAX starts
    import jax

    from stagejax.data import input_pipeline
    from stagejax.train import loop as trainer  # training's public entry
    from stagejax.train import memory

    input_pipeline.ensure_absl_flags_parsed()
    config = common.stagejax_config(model=job["model"], crop_size=job["size"],
                                    global_batch_size=job["batch"], eval_batch_size=job["batch"],
                                    precision=job["precision"], remat=job["remat"])  # fmt: skip
    run = trainer.Run(config, _stand_in_dataset(job["batch"]))
    state = run.parallel.put_state(run.initial_state)
    batch = _batch(run, job["size"], job["batch"])
    t0 = time.perf_counter()
    compiled = run.train_step.lower(state, batch).compile()  # as loop.compile_train_step
    out: dict = {"device": machine.device_of_jax(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
                 "compile_s": time.perf_counter() - t0}  # fmt: skip
    stats = compiled.memory_analysis()
    if stats is None:
        return {**out, "error": "this backend gives no memory analysis"}
    for name in ("temp", "argument", "output", "alias"):
        out[f"{name}_bytes"] = int(getattr(stats, f"{name}_size_in_bytes"))
    out["need_bytes"] = memory.step_need(compiled)["total"]
    capacity, source = memory.device_capacity(config)
    out.update(capacity_bytes=capacity, capacity_source=source, fits=out["need_bytes"] <= capacity)
    if job["time_steps"] > 0 and out["fits"]:
        times, state = _time_steps(compiled, state, batch, job["time_steps"])
        out["step_s"] = common.summary(times)
        peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
        out["peak_device_bytes"] = peak
    out["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    return out


# --- the report -------------------------------------------------------------------------


def key(job: dict) -> str:
    remat = "on" if job["remat"] else "off"
    return f"{job['model']}@{job['size']}px/{job['precision']}/remat={remat}"


def _ratio(a, b, digits: int = 2) -> str:
    return "n/a" if not a or not b else f"{a / b:.{digits}f}x"


def rows(results: list[dict]) -> list[list[str]]:
    """One table row per (model, size, precision): remat off against on."""
    by_key = {key(r["job"]): r for r in results}
    out = []
    for r in results:
        job = r["job"]
        if job["remat"]:
            continue
        on = by_key.get(key({**job, "remat": True}), {"error": "not run"})
        off_t, on_t = r.get("temp_bytes"), on.get("temp_bytes")
        off_s = r.get("step_s", {}).get("median")
        on_s = on.get("step_s", {}).get("median")
        errors = "; ".join(x["error"][:60] for x in (r, on) if "error" in x)
        out.append([job["model"], str(job["size"]), job["precision"], common.gib(off_t, 3),
                    common.gib(on_t, 3), _ratio(off_t, on_t), common.fmt(off_s, 3),
                    common.fmt(on_s, 3), _ratio(on_s, off_s), errors])  # fmt: skip
    return out


HEADER = ("model", "px", "precision", "temp GiB off", "temp GiB on", "off/on", "s/step off",
          "s/step on", "slowdown", "errors")  # fmt: skip


def markdown(results: list[dict], batch: int) -> str:
    note = f"Batch {batch}; temporaries from XLA's memory analysis of the compiled train step."
    return note + "\n\n" + common.markdown_table(HEADER, rows(results))


# --- running ----------------------------------------------------------------------------


def validate(args) -> list[dict]:
    """The jobs, in order (remat off then on for each configuration)."""
    models = common.names(args.models, "models")
    for m in models:
        common.check_model(m, "models")
    precisions = common.names(args.precisions, "precisions", PRECISIONS)
    sizes = common.integers(args.sizes, "sizes", low=32)
    if args.batch < 12 or args.time_steps < 0:
        raise ValueError("--batch must be >= 12 (one image per stage), --time_steps >= 0")
    return [{"model": m, "size": s, "precision": p, "remat": r, "batch": args.batch,
             "time_steps": args.time_steps}
            for m in models for s in sizes for p in precisions for r in (False, True)]  # fmt: skip


def child_env(keep_remat: bool) -> dict[str, str] | None:
    if not keep_remat:
        return None
    from stagejax.train.memory import CPU_REMAT_XLA_FLAG

    return {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {CPU_REMAT_XLA_FLAG}".strip()}


def run(args) -> dict:
    jobs = validate(args)
    path = args.json or f"benchmarks/results/memory-{datetime.date.today():%Y-%m-%d}.json"
    env = child_env(args.xla_keep_remat)
    report = {"args": {k: getattr(args, k) for k in FLAGS if k != "json"}, "results": []}
    for job in jobs:  # the JSON after each child: a run cut short keeps what it has
        log.info("measuring %s", key(job))
        report["results"].append({"job": job, **common.run_child(MODULE, job, args.timeout, env)})
        common.finish(MODULE, report, "", path)
    log.info("load average at the end: %.2f; wrote %s", os.getloadavg()[0], path)
    return common.finish(MODULE, report, markdown(report["results"], args.batch), path)


def main(argv: Sequence[str] | None = None) -> dict | None:
    return common.main(FLAGS, run, argv, child)


if __name__ == "__main__":
    main()
