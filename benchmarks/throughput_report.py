"""The throughput benchmark's stagejax side and report: building the trainer's ``Run``
as training does, XLA's FLOP count of a jitted step, the step profile
(``--profile``), same-run ratios, model FLOP utilisation and the markdown.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from benchmarks import common

TORCH_FRAMEWORKS = ("torch", "torch_tuned")


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
        num_workers=job["num_workers"], precision=common.resolve_precision(job["precision"]),
        seed=job["seed"])  # fmt: skip
    return config, trainer.Run(config)


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


def profile(job: dict) -> dict:
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

    from stagejax import model as model_lib
    from stagejax.data import input_pipeline

    config, run = build_run(job)
    par = run.parallel
    state = par.put_state(run.initial_state)
    reps = job["profile_repeats"]
    dtype = model_lib.compute_dtype(config)
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

    prep = jax.jit(lambda s, x: model_lib.preprocess(x, config, True, s.rng, s.step))
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


def framework_of(key: str) -> str:
    """``stagejax@48`` -> ``stagejax``."""
    return key.split("@", 1)[0]


def _rate(r: dict, phase: str) -> float | None:
    return r.get(phase, {}).get("images_per_s", {}).get("median")


def add_mfu(results: dict[str, dict]) -> None:
    """Model FLOP utilisation of every result with a FLOP count: the step's FLOPs
    times steps/s over the device's peak (`common.peak_flops`), per phase. Where
    XLA's count of the compiled step is missing or under half of its count of the
    HLO before optimisation, the latter is used and the result says so."""
    for r in results.values():
        flops = r.get("step_flops")
        if "error" in r or not (flops or r.get("step_flops_hlo")):
            continue
        source = r.get("flops_source", "")
        hlo = r.get("step_flops_hlo")
        if hlo and (not flops or flops < 0.5 * hlo):
            source = (
                f"XLA cost analysis of the step's HLO before optimisation (the "
                f"compiled step counted {flops or 0:.3g})"
            )
            flops = hlo
        peak, peak_source = common.peak_flops(r.get("device", ""))
        mfu = {"step_flops": flops, "flops_source": source, "peak_flops": peak,
               "peak_source": peak_source}  # fmt: skip
        for phase in ("model_only", "end_to_end"):
            rate = _rate(r, phase)
            achieved = flops * rate / r["batch"] if rate else None
            mfu[f"achieved_flops_per_s_{phase}"] = achieved
            mfu[phase] = achieved / peak if (achieved and peak) else None
        r["mfu"] = mfu


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """Each stagejax result's images/s over each torch result's, from this run."""
    out = {}
    sj_keys = [k for k in results if framework_of(k) == "stagejax"]
    others = [k for k in results if framework_of(k) in TORCH_FRAMEWORKS]
    for sj in sj_keys:
        for other in others:
            for phase in ("end_to_end", "model_only"):
                a, b = _rate(results[sj], phase), _rate(results[other], phase)
                if a and b:
                    out[f"{sj}/{other} {phase}"] = a / b
    return out


def _notes_line(name: str, r: dict) -> str:
    """What each framework actually ran with (rounds, torch.compile, bf16, Adam)."""
    parts = [f"{r.get('rounds', 1)} round(s)"]
    if r.get("skipped_rounds"):
        parts.append(f"{r['skipped_rounds']} more skipped (time budget)")
    if "torch_compile" in r:
        parts.append(f"torch.compile {r['torch_compile']}")
    parts += list(r.get("notes", []))
    return f"- {name}: " + "; ".join(parts)


def _range(summary: dict) -> str:
    return f"{summary['median']:.2f} ({summary['min']:.2f}-{summary['max']:.2f})"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def mfu_table(results: dict[str, dict]) -> str:
    rows = [[name, f"{m['step_flops'] / 1e9:.1f}", _pct(m["model_only"]), _pct(m["end_to_end"]),
             m["flops_source"], m["peak_source"]]
            for name, m in ((k, r["mfu"]) for k, r in results.items() if "mfu" in r)]  # fmt: skip
    header = ["framework", "GFLOP per step", "MFU model only", "MFU end to end", "FLOPs from",
              "peak"]  # fmt: skip
    return common.markdown_table(header, rows) if rows else ""


def markdown(results: dict[str, dict], ratio: dict[str, float]) -> str:
    rows = []
    for name, r in results.items():
        if name == "stagejax_profile":
            continue
        if "error" in r:
            rows.append([name] + [f"error: {r['error']}"] + [""] * 9)
            continue
        e, m = r["end_to_end"], r["model_only"]
        mem = r["peak_device_memory_mb"]
        peak = f"{mem:.0f} (device)" if mem is not None else f"{r['peak_rss_mb']:.0f} (RSS)"
        rows.append([name, str(r.get("batch", "")), r["precision"], str(r["num_workers"]),
                     _range(e["images_per_s"]), _range(m["images_per_s"]),
                     e["step_time_ms"]["median"], m["step_time_ms"]["median"],
                     _pct(e["loader_wait_fraction"]), r["first_step_s"], peak])  # fmt: skip
    header = ["framework", "batch", "precision", "loader workers",
              "end-to-end images/s (min-max)", "model-only images/s (min-max)", "e2e step ms",
              "model step ms", "loader wait", "first step s", "peak MB"]  # fmt: skip
    text = common.markdown_table(header, rows)
    for table in (common.ratio_table(ratio), mfu_table(results)):
        text += "\n\n" + table if table else ""
    notes = [
        _notes_line(name, r)
        for name, r in results.items()
        if "error" not in r and name != "stagejax_profile"
    ]
    if notes:
        text += "\n\n" + "\n".join(notes)
    prof = results.get("stagejax_profile")
    if prof and "parts_ms" in prof:
        text += "\n\n" + common.markdown_table(
            ["stagejax step part (timed alone)", "ms (median)"],
            [[k, v] for k, v in prof["parts_ms"].items()],
        )
        if isinstance(prof.get("step_gflops"), float):
            text += (
                f"\n\nXLA cost analysis: {prof['step_gflops']:.1f} GFLOP per step, "
                f"{prof['achieved_gflops_per_s']:.1f} GFLOP/s achieved."
            )
    return text
