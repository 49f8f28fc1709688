"""The stagejax side of the throughput benchmark: building the trainer's ``Run`` as
training does, XLA's FLOP count of a jitted step, and the step profile.

    python -m benchmarks.throughput ... --profile    # runs `profile_stagejax`
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from benchmarks import common


def stagejax_config(job: dict):
    return common.stagejax_config(
        model=job["model"],
        data_dir=job["data_dir"],
        cache_dir=job["cache_dir"],
        crop_size=job["image_size"],
        crop_range=job["crop_range"],
        global_batch_size=job["global_batch"],
        eval_batch_size=job["global_batch"],
        num_workers=job["num_workers"],
        precision=job["precision"],
        seed=job["seed"],
    )


def build_run(job: dict):
    """The config (``--precision auto`` resolved for this backend) and the trainer's ``Run``."""
    import jax

    from stagejax.data import input_pipeline
    from stagejax.train import loop as trainer

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


def xla_flops(jitted, *args) -> dict:
    """FLOPs of one call of ``jitted`` from XLA's cost analysis: of the compiled
    executable (``step_flops``; the step was already compiled, so this costs no
    compile) and of the HLO before optimisation (``step_flops_hlo``, a cross-check:
    on a GPU the convolutions become cuDNN calls). None where a backend has no count."""
    import jax

    lowered = jitted.lower(*args)
    out: dict = {"flops_source": "XLA cost analysis of the compiled train step"}
    for name, stage in (("step_flops", lowered.compile), ("step_flops_hlo", lambda: lowered)):
        try:
            cost = stage().cost_analysis()
        except (NotImplementedError, jax.errors.JaxRuntimeError) as e:
            out[name], out[f"{name}_error"] = None, f"{type(e).__name__}: {e}"[:200]
            continue
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float((cost or {}).get("flops", 0.0))
        out[name] = flops if flops > 0 else None
    return out


def block_time(fn: Callable[[], object], repeats: int) -> float:
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

    from stagejax.data import input_pipeline
    from stagejax.train import step as step_lib

    config, run = build_run(job)
    par = run.parallel
    state = par.put_state(run.initial_state)
    reps = job["profile_repeats"]
    dtype = step_lib.compute_dtype(config)
    out: dict = {"framework": "stagejax_profile", "precision": config.precision}

    raw = input_pipeline.train_batches(run.dataset.splits["train"], config)
    host = next(raw)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        next(raw)
        times.append(time.perf_counter() - t0)
    parts = {"host_loader_next_batch": float(np.median(times))}
    parts["host_to_device"] = block_time(lambda: par.put_batch(host), reps)
    batch = par.put_batch(host)

    prep = jax.jit(lambda s, x: step_lib._preprocess(x, s.rng, s.step, config, True, 0))
    parts["device_preprocess"] = block_time(lambda: prep(state, batch["image"]), reps)
    images = prep(state, batch["image"]).astype(dtype)

    def loss_fn(model, x, y):
        logits = model(x).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def forward(s, x, y):
        return loss_fn(run.model.modeldef.merge(s.params, s.batch_stats, train=True), x, y)

    def forward_backward(s, x, y):
        # Merged outside the differentiated function, as the train step does:
        # BatchNorm statistics are mutated at the trace level they were made at.
        model = run.model.modeldef.merge(s.params, s.batch_stats, train=True)
        return nnx.value_and_grad(loss_fn)(model, x, y)

    fwd, grad = jax.jit(forward), jax.jit(forward_backward)
    parts["forward"] = block_time(lambda: fwd(state, images, batch["label"]), reps)
    parts["forward_backward"] = block_time(lambda: grad(state, images, batch["label"]), reps)
    grads = grad(state, images, batch["label"])[1]

    def update(s, g):
        updates, opt_state = run.tx.update(g, s.opt_state, s.params)
        return optax.apply_updates(s.params, updates), opt_state

    upd = jax.jit(update)
    parts["optimizer_update"] = block_time(lambda: upd(state, grads), reps)

    # The real step donates its state: time it on a private copy.
    step_state = {"s": par.put_state(run.initial_state)}

    def full():
        step_state["s"], _ = run.train_step(step_state["s"], batch)
        return step_state["s"]

    parts["full_train_step"] = block_time(full, reps)
    out["parts_ms"] = {k: 1e3 * v for k, v in parts.items()}
    flops = xla_flops(run.train_step, step_state["s"], batch)["step_flops"]
    if flops:
        out["step_gflops"] = flops / 1e9
        out["achieved_gflops_per_s"] = flops / 1e9 / parts["full_train_step"]
    else:
        out["step_gflops"] = "unavailable on this backend"
    return out
