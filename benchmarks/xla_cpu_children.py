"""The child processes of `benchmarks.xla_cpu`, one job each.

* ``prepare`` (torch): a torchvision model whose BatchNorm statistics are
  calibrated on the check batch, its weights as .npz, the check batch and
  PyTorch's logits for it (float32 NCHW, as the study predicts, and float64).
* ``torch``: PyTorch's prediction (NCHW and channels_last, via
  `predict_speed.bench_torch`) and the tuned trainer's step (`torch_baseline`).
* ``jax``: under one XLA:CPU variant (``XLA_FLAGS`` and the CPU affinity are set
  by the parent before JAX starts), the eval step as ``--mode=predict``
  compiles it, the trainer's jitted train step, and the logits of the
  converted weights on the check batch.

Why calibrate: with torchvision's fresh statistics (mean 0, variance 1) the
activations of an eval-mode ResNet grow block after block, so logits are
large and any difference in summation order shows as a large absolute error.
Statistics measured on a batch of the same kind of images (24 or more, not
the check batch itself: a few images give near-zero variances that amplify
rounding) keep every layer near unit scale, as in a trained network, and make
the 1e-4 check mean what it says. PyTorch's own float32-vs-float64 and
channels_last-vs-NCHW differences are reported beside it: the floor of what
float32 can agree on.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import numpy as np

from benchmarks import common
from benchmarks.predict_speed import input_batch, rate_summary, time_batches

NUM_CLASSES = 12
CALIBRATION_BATCH = 24


def paths(job: dict) -> dict[str, Path]:
    """Where the prepare child leaves one model's files for the others."""
    root, m = Path(job["workdir"]), job["model"]
    return {
        "weights": root / f"{m}_weights.npz",
        "input": root / f"{m}_check_input.npy",  # float32 NHWC, min-max normalised
        "torch": root / f"{m}_logits_torch.npy",
        "torch64": root / f"{m}_logits_torch_float64.npy",
    }


def variant_logits_path(job: dict) -> Path:
    return Path(job["workdir"]) / f"{job['model']}_{job['variant']}_logits.npy"


def measured(fn, *args) -> dict:
    """``fn(*args)`` with the 1-minute load average before and after it."""
    before = os.getloadavg()[0]
    out = fn(*args)
    return {**out, "load_before": round(before, 2), "load_after": round(os.getloadavg()[0], 2)}


def timed(fn, job: dict, batch: int) -> dict:
    """Images/s of ``fn`` (one batch per call): median over ``job["steps"]`` timed
    calls after ``job["warmup"]``; the raw seconds are kept in ``times_s``."""
    t = time_batches(fn, job["warmup"], job["steps"])
    return {
        "first_call_s": t["first_batch_s"],
        "times_s": t["batch_s"],
        **rate_summary(t["batch_s"], batch),
    }


def check_input(job: dict, batch: int | None = None, seed_offset: int = 1) -> np.ndarray:
    """The check batch as both frameworks see it: uint8 -> [0, 1] -> per-image min-max."""
    batch = batch or job["batch"]
    x = input_batch(batch, job["check_size"], job["seed"] + seed_offset).astype(np.float32)
    x /= 255.0
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    return ((x - lo) / (x.max(axis=(1, 2, 3), keepdims=True) - lo)).astype(np.float32)


def diffs(logits: np.ndarray, job: dict) -> dict:
    """Max abs difference of ``logits`` from PyTorch's (the pass mark) and from float64."""
    p = paths(job)
    ref, ref64 = np.load(p["torch"]), np.load(p["torch64"])
    diff = float(np.max(np.abs(logits.astype(np.float64) - ref)))
    return {
        "logits_max_abs_diff": diff,
        "logits_max_abs_diff_float64": float(np.max(np.abs(logits.astype(np.float64) - ref64))),
        "logits_pass": bool(diff <= job["tolerance"]),
    }


# --- torch -------------------------------------------------------------------------------


def torch_model(job: dict, channels_last: bool = False):
    """The prepared weights in a torchvision model (eval mode)."""
    import torch

    from benchmarks import torch_baseline as tb

    model = tb.create_model(job["model"])
    weights = np.load(paths(job)["weights"])
    model.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights.files})
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(memory_format=fmt).eval()


def prepare(job: dict) -> dict:
    import torch

    from benchmarks import torch_baseline as tb

    torch.manual_seed(job["seed"])
    model = tb.create_model(job["model"])
    x_nhwc = check_input(job)
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the batch's own statistics
    model.train()
    with torch.no_grad():  # on other images than the check batch, never fewer than 24
        calibration = check_input(job, max(CALIBRATION_BATCH, job["batch"]), seed_offset=2)
        model(torch.from_numpy(calibration).permute(0, 3, 1, 2).contiguous())
    model.eval()
    p = paths(job)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    np.savez(p["weights"], **state)
    np.save(p["input"], x_nhwc)
    with torch.inference_mode():
        ref = model(x).double().numpy()
        ref64 = model.double()(x.double()).numpy()
    np.save(p["torch"], ref)
    np.save(p["torch64"], ref64)
    return {
        "role": "prepare",
        "logits_abs_max": float(np.abs(ref).max()),
        "torch_float32_vs_float64": float(np.abs(ref - ref64).max()),
    }


def torch_train(job: dict, batch: int, variant: str) -> dict:
    """The tuned (or the study's) trainer's step on one resident batch (no loader)."""
    import torch

    from benchmarks import torch_baseline as tb

    device = torch.device("cpu")
    tuning = tb.tuned(device, 0, "off") if variant == "tuned" else tb.STUDY
    trainer = tb.Trainer(job["model"], tuning, device, seed=job["seed"])
    trainer.model.train()
    images = torch.from_numpy(input_batch(batch, job["train_size"], job["seed"]))
    labels = torch.arange(batch) % NUM_CLASSES
    if not tuning.device_normalize:  # the study normalises on the host, NCHW float
        images = tb.min_max(images.permute(0, 3, 1, 2).float())
    x, y = trainer.to_device(images, labels)
    return {**timed(lambda: trainer.train_step(x, y), job, batch), "notes": trainer.notes}


def bench_torch(job: dict) -> dict:
    import torch

    from benchmarks import predict_speed

    out: dict = {"predict": {}, "train": {}, "torch_threads": torch.get_num_threads()}
    for size in job["predict_sizes"]:
        sub = {**job, "image_size": size, "precision": "float32"}
        out["predict"][str(size)] = {
            name: measured(predict_speed.bench_torch, sub, name == "channels_last")
            for name in ("eager", "channels_last")
        }
    for batch in job["train_batches"]:
        out["train"][str(batch)] = {
            name: measured(torch_train, job, batch, name) for name in job["torch_train"]
        }
    x = torch.from_numpy(np.load(paths(job)["input"])).permute(0, 3, 1, 2)
    with torch.inference_mode():
        cl = torch_model(job, True)(x.contiguous(memory_format=torch.channels_last))
    out["channels_last_logits"] = diffs(cl.double().numpy(), job)
    out["peak_rss_mb"] = common.peak_rss_mb()
    return out


# --- jax ---------------------------------------------------------------------------------


def _converted(job: dict):
    from stagejax.convert import convert_state_dict

    weights = np.load(paths(job)["weights"])
    return convert_state_dict({k: weights[k] for k in weights.files}, job["model"])


def jax_predict(job: dict, module, size: int) -> dict:
    """The eval step as ``--mode=predict`` compiles it, on the converted weights."""
    import jax

    from stagejax.evaluate.model import Model, make_parallel
    from stagejax.train import step as step_lib

    config = common.stagejax_config(
        model=job["model"],
        crop_size=size,
        eval_batch_size=job["batch"],
        precision="float32",
        seed=job["seed"],
    )
    model = Model(config, make_parallel(config), *step_lib.split_model(module))
    state, step = model.device_state(), model.eval_step()
    batch = model.parallel.put_batch({"image": input_batch(job["batch"], size, job["seed"])})

    def run() -> None:
        jax.block_until_ready(step(state, batch)["probs"])

    return timed(run, job, job["batch"])


def jax_logits(job: dict, module) -> np.ndarray:
    """The converted model's logits on the check batch (eval mode, jitted)."""
    import jax
    from flax import nnx

    module.eval()
    graph, state = nnx.split(module)
    forward = jax.jit(lambda s, x: nnx.merge(graph, s)(x))
    return np.asarray(forward(state, np.load(paths(job)["input"])), dtype=np.float64)


def jax_train(job: dict, batch: int) -> dict:
    """The trainer's jitted train step (`stagejax.train.loop.Run`) on one resident batch."""
    import jax

    from stagejax.train import loop

    config = common.stagejax_config(
        model=job["model"],
        crop_size=job["train_size"],
        global_batch_size=batch,
        eval_batch_size=batch,
        num_workers=0,
        precision="float32",
        seed=job["seed"],
    )
    labels = (np.arange(10 * batch) % NUM_CLASSES).astype(np.int32)
    stand_in = types.SimpleNamespace(splits={"train": types.SimpleNamespace(labels=labels)})
    run = loop.Run(config, dataset=stand_in)  # no images are read: one resident batch
    holder = {"state": run.parallel.put_state(run.initial_state)}
    data = run.parallel.put_batch(
        {"image": input_batch(batch, job["train_size"], job["seed"]), "label": labels[:batch]}
    )

    def step() -> None:
        holder["state"], _ = run.train_step(holder["state"], data)
        jax.block_until_ready(holder["state"])

    return timed(step, job, batch)


def bench_jax(job: dict) -> dict:
    import jax

    module = _converted(job)
    logits = jax_logits(job, module)
    np.save(variant_logits_path(job), logits)
    out: dict = {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cores": sorted(os.sched_getaffinity(0)),
        "device": f"{jax.default_backend()}: {jax.devices()[0].device_kind}",
        **diffs(logits, job),
        "predict": {str(s): measured(jax_predict, job, module, s) for s in job["predict_sizes"]},
        "train": {str(b): measured(jax_train, job, b) for b in job["train_batches"]},
        "peak_rss_mb": common.peak_rss_mb(),
    }
    return out
