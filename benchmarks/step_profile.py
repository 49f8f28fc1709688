"""A train step's cost for `benchmarks.throughput`: its FLOPs and the model FLOP
utilisation (``--flops``), and where a stagejax step's time goes (``--profile``): each
part jitted and timed alone (median of ``--profile_repeats`` calls after a
first one): host loader (decode + crop + batch, in this process), host->device copy,
``preprocess``, forward (train mode), forward+backward, the optimizer update, the full
step; plus XLA's FLOP count of the whole step. XLA fuses across the parts in the real
step, so they need not add up exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from benchmarks import machine


def xla_flops(jitted, *args) -> dict:
    """FLOPs of one call of ``jitted`` from XLA's cost analysis: of the compiled
    executable (``step_flops``; already compiled, so no compile) and of the HLO before
    optimisation (``step_flops_hlo``, a cross-check: on a GPU the convolutions become
    cuDNN calls). None where a backend has no count."""
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


def add_mfu(results: dict[str, dict]) -> None:
    """Model FLOP utilisation of every result with a FLOP count: FLOPs times steps/s
    over the device's peak (`machine.peak_flops`), per phase. Where XLA's count of the
    compiled step is missing or under half its count of the HLO before optimisation,
    the latter is used and the result says so."""
    for r in results.values():
        flops, hlo = r.get("step_flops"), r.get("step_flops_hlo")
        if "error" in r or not (flops or hlo):
            continue
        source = r.get("flops_source", "")
        if hlo and (not flops or flops < 0.5 * hlo):
            source = (f"XLA cost analysis of the step's HLO before optimisation (the "
                      f"compiled step counted {flops or 0:.3g})")  # fmt: skip
            flops = hlo
        peak, peak_source = machine.peak_flops(r.get("device", ""))
        mfu = {"step_flops": flops, "flops_source": source, "peak_flops": peak,
               "peak_source": peak_source}  # fmt: skip
        for phase in ("model_only", "end_to_end"):
            rate = r.get(phase, {}).get("images_per_s", {}).get("median")
            achieved = flops * rate / r["batch"] if rate else None
            mfu[f"achieved_flops_per_s_{phase}"] = achieved
            mfu[phase] = achieved / peak if (achieved and peak) else None
        r["mfu"] = mfu


def block_time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` after a first (compiling) call."""
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def profile(job: dict) -> dict:
    """The parts' medians (``parts_ms``) and the step's GFLOP and GFLOP/s."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from benchmarks import throughput  # (it imports this module)
    from stagejax import model as model_lib
    from stagejax.data import input_pipeline

    config, run = throughput.build_run(job)
    par, reps = run.parallel, job["profile_repeats"]
    state = par.put_state(run.initial_state)
    raw = input_pipeline.train_batches(run.dataset.splits["train"], config)
    host = next(raw)
    parts = {"host_loader_next_batch": block_time(lambda: next(raw), reps)}
    parts["host_to_device"] = block_time(lambda: par.put_batch(host), reps)
    batch = par.put_batch(host)
    prep = jax.jit(lambda s, x: model_lib.preprocess(x, config, True, s.rng, s.step))
    parts["device_preprocess"] = block_time(lambda: prep(state, batch["image"]), reps)
    images = prep(state, batch["image"]).astype(model_lib.compute_dtype(config))
    labels = batch["label"]

    def loss_fn(model, x, y):
        logits = model(x).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def forward_backward(s, x, y):
        # Merged outside the differentiated function, as the train step does:
        # BatchNorm statistics are mutated at the trace level they were made at.
        model = run.model.modeldef.merge(s.params, s.batch_stats, train=True)
        return nnx.value_and_grad(loss_fn)(model, x, y)

    fwd = jax.jit(lambda s, x, y: loss_fn(run.model.modeldef.merge(s.params, s.batch_stats,
                                                                   train=True), x, y))  # fmt: skip
    grad = jax.jit(forward_backward)
    parts["forward"] = block_time(lambda: fwd(state, images, labels), reps)
    parts["forward_backward"] = block_time(lambda: grad(state, images, labels), reps)
    grads = grad(state, images, labels)[1]

    def update(s, g):
        updates, opt_state = run.tx.update(g, s.opt_state, s.params)
        return optax.apply_updates(s.params, updates), opt_state

    upd = jax.jit(update)
    parts["optimizer_update"] = block_time(lambda: upd(state, grads), reps)
    step_state = {"s": par.put_state(run.initial_state)}  # the real step donates its state

    def full():
        step_state["s"], _ = run.train_step(step_state["s"], batch)
        return step_state["s"]

    parts["full_train_step"] = block_time(full, reps)
    out = {"framework": "stagejax_profile", "precision": config.precision,
           "parts_ms": {k: 1e3 * v for k, v in parts.items()}}  # fmt: skip
    flops = xla_flops(run.train_step, step_state["s"], batch)["step_flops"]
    out["step_gflops"] = flops / 1e9 if flops else "unavailable on this backend"
    if flops:
        out["achieved_gflops_per_s"] = flops / 1e9 / parts["full_train_step"]
    return out
