"""Prediction speed: images/s of stagejax's jitted eval forward against PyTorch eval mode.

    python -m benchmarks.predict_speed --model resnet50 --image_size 896 --batch 8 \\
        --steps 5 --warmup 1 [--frameworks stagejax,stagejax_tta,torch,torch_channels_last] \\
        [--precision auto] [--json out.json]

What is timed is what ``--mode=predict`` does per batch once the images are decoded
and centre-cropped: uint8 NHWC -> [0, 1] -> per-image min-max -> the model in eval mode
-> softmax, on the same random uint8 batch and fresh weights for every framework:
``stagejax`` (the eval step as ``--mode=predict`` compiles it, in ``--precision``;
auto: float32 on a CPU, bfloat16 on an accelerator), ``stagejax_tta`` (the 8
rotations/flips averaged; images/s counts images), ``torch`` (``model.eval()`` under
``torch.inference_mode``, NCHW float32: how the study predicts) and
``torch_channels_last`` (the first thing a PyTorch user tunes on a CPU). Each runs in
its own process: ``--warmup`` batches (compilation) are discarded, then ``--steps``
batches timed one by one; images/s is batch / median seconds per batch, and the ratios
are stagejax's over each torch variant's from the same invocation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from benchmarks import common, machine

MODULE = "benchmarks.predict_speed"
FRAMEWORKS = ("stagejax", "stagejax_tta", "torch", "torch_channels_last")
log = logging.getLogger("predict_speed")

FLAGS: common.Flags = {
    "model": ("resnet50", "Architecture (a torchvision and stagejax name)."),
    "image_size": (896, "Crop size fed to the model (px)."),
    "batch": (8, "Images per batch."),
    "steps": (5, "Timed batches."),
    "warmup": (1, "Untimed batches (>= 1: compiles)."),
    "frameworks": ("stagejax,torch,torch_channels_last", "From " + ", ".join(FRAMEWORKS)),
    "precision": ("auto", "stagejax compute dtype (auto: float32 on a CPU).",
                  ("auto", "float32", "bfloat16")),
    "seed": (0, "Seed of the random input batch and torch's weights."),
    "timeout": (3600.0, "Per framework (s)."),
    "json": ("", "Also write all results here."),
}  # fmt: skip


def input_batch(batch: int, image_size: int, seed: int) -> np.ndarray:
    """The uint8 NHWC batch every framework predicts."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)


def time_batches(predict: Callable[[], object], warmup: int, steps: int) -> dict:
    """Seconds of the first call, then of each of ``steps`` calls after ``warmup``
    (``predict`` returns only when its result is computed: each timing is one batch)."""
    t0 = time.perf_counter()
    predict()
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        predict()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        predict()
        times.append(time.perf_counter() - t0)
    return {"first_batch_s": first, "batch_s": times}


def rate_summary(batch_s: list[float], batch: int) -> dict:
    """Images/s at the median, fastest and slowest timed batch."""
    s = common.summary(batch_s)
    return {"images_per_s": batch / s["median"], "images_per_s_min": batch / s["max"],
            "images_per_s_max": batch / s["min"], "batch_s": s}  # fmt: skip


def bench_stagejax(job: dict, tta: bool) -> dict:
    import jax

    from stagejax.model import Model

    precision = machine.resolve_precision(job["precision"])
    config = common.stagejax_config(model=job["model"], crop_size=job["image_size"],
                                    eval_batch_size=job["batch"], precision=precision,
                                    seed=job["seed"])  # fmt: skip
    # As predict.py builds it: weights and BatchNorm statistics, no optimizer.
    model = Model.from_config(config)
    par, state, step = model.parallel, model.device_state(), model.eval_step(tta)
    batch = par.put_batch({"image": input_batch(job["batch"], job["image_size"], job["seed"])})
    out = {"probs": None}

    def run() -> None:
        out["probs"] = jax.block_until_ready(step(state, batch))["probs"]

    timing = time_batches(run, job["warmup"], job["steps"])
    return {"framework": "stagejax_tta" if tta else "stagejax", "device": machine.device_of_jax(),
            "precision": precision, "views": 8 if tta else 1, **timing,
            **rate_summary(timing["batch_s"], job["batch"]),
            "peak_rss_mb": machine.peak_rss_mb()}  # fmt: skip


def bench_torch(job: dict, channels_last: bool) -> dict:
    import torch

    from benchmarks import torch_baseline as tb
    from benchmarks import torch_data as td

    torch.manual_seed(job["seed"])
    device = tb.default_device()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = tb.create_model(job["model"]).to(device).to(memory_format=fmt).eval()
    images = torch.from_numpy(input_batch(job["batch"], job["image_size"], job["seed"])).to(device)
    out = {"probs": None}

    @torch.inference_mode()
    def run() -> None:
        x = td.min_max(images.permute(0, 3, 1, 2).float() / 255.0)
        x = x.contiguous(memory_format=fmt)
        out["probs"] = torch.softmax(model(x).float(), dim=-1)
        if device.type == "cuda":
            torch.cuda.synchronize()

    timing = time_batches(run, job["warmup"], job["steps"])
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else machine.cpu_model()
    return {"framework": "torch_channels_last" if channels_last else "torch",
            "device": f"{device.type}: {dev}", "precision": "float32", **timing,
            **rate_summary(timing["batch_s"], job["batch"]), "peak_rss_mb": machine.peak_rss_mb(),
            "torch_threads": torch.get_num_threads()}  # fmt: skip


def child(job: dict) -> dict:
    if job["framework"].startswith("stagejax"):
        xla = common.stagejax_xla_defaults()
        return {**bench_stagejax(job, tta=job["framework"] == "stagejax_tta"), "xla_flags": xla}
    return bench_torch(job, channels_last=job["framework"] == "torch_channels_last")


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """stagejax's median images/s over each torch variant's (only those that ran)."""
    sj = results.get("stagejax", {}).get("images_per_s")
    return {f"stagejax/{name}": sj / r["images_per_s"] for name, r in results.items()
            if name.startswith("torch") and sj and r.get("images_per_s")}  # fmt: skip


def measure(names: list[str], job: dict, cap_s: float) -> dict[str, dict]:
    """Each framework in its own process, one after the other, each for at most
    ``cap_s`` seconds and never past `common.DEADLINE` (later ones are then not run)."""
    results = {}
    for name in names:
        log.info("measuring %s", name)
        t0 = time.monotonic()
        results[name] = common.run_child(MODULE, {**job, "framework": name}, cap_s)
        results[name].setdefault("wall_s", time.monotonic() - t0)
    return results


COLUMNS = {
    "precision": lambda r: r.get("precision", ""),
    "images/s (median batch)": lambda r: f"{r['images_per_s']:.3f}",
    "images/s range": lambda r: f"{r['images_per_s_min']:.3f}-{r['images_per_s_max']:.3f}",
    "s/batch (median)": lambda r: f"{r['batch_s']['median']:.2f}",
    "first batch s (incl. compile)": lambda r: f"{r['first_batch_s']:.1f}",
    "peak RSS MB": lambda r: f"{r['peak_rss_mb']:.0f}",
}


def markdown(results: dict[str, dict], ratio: dict[str, float]) -> str:
    table = common.results_table(results, COLUMNS, "framework")
    return table + ("\n\n" + common.ratio_table(ratio) if ratio else "")


def validate(args) -> list[str]:
    """Refuse sizes that cannot run, before any child starts; returns the frameworks."""
    common.check_model(args.model)
    for name in ("image_size", "batch", "steps", "warmup"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    common.check_image_size(args.image_size)
    return common.names(args.frameworks, "frameworks", FRAMEWORKS)


def run(args) -> dict:
    names = validate(args)
    warning = common.warn_slow_xla_cpu_shape(args.model, args.image_size, log)
    keys = ("model", "image_size", "batch", "steps", "warmup", "seed", "precision")
    job = {k: getattr(args, k) for k in keys}
    results = measure(names, job, args.timeout)
    ratio = ratios(results)
    report = {"warning": warning, "job": job, "results": results, "ratios": ratio}
    return common.finish(MODULE, report, markdown(results, ratio), args.json)


def main(argv: Sequence[str] | None = None) -> dict | None:
    return common.main(FLAGS, run, argv, child)


if __name__ == "__main__":
    main()
