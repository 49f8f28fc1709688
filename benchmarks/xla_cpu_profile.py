r"""Per-convolution profile of one model: where XLA:CPU's time goes, forward or backward.

    python -m benchmarks.xla_cpu --profile --profile_model=resnet50 \
        --profile_variant=default --profile_size=224 --profile_batch=12

Why single convolutions: a ResNet's step is its convolutions (RESULTS.md:
preprocessing, copy and optimizer are about 3% of it), and each distinct
shape is one kernel choice of XLA's. Every distinct convolution of the model
(found by forward hooks on the torchvision model, counted by how often it
occurs) is timed alone in both frameworks at the same batch: the forward
convolution and the two of the backward pass, input gradient and weight
gradient. JAX runs in a child under the variant's XLA_FLAGS; PyTorch in
another child, channels_last (the tuned layout), the backward ones through
``aten.convolution_backward``. A convolution alone loses the fusions around
it (BatchNorm, ReLU) in both frameworks, so the table compares kernels, not
whole steps. The stem's input gradient is left out of the totals: training
never computes it (the image needs no gradient).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from benchmarks import common

NHWC = ("NHWC", "HWIO", "NHWC")
PARTS = ("forward", "input_grad", "weight_grad")
SHAPE_KEYS = ("cin", "cout", "kernel", "stride", "padding", "height", "width")


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median ms of ``fn`` after one untimed call (which compiles)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def conv_shapes(model_name: str, size: int, batch: int) -> list[dict]:
    """The model's distinct convolutions at ``size`` px, in order of first use."""
    import torch

    from benchmarks import torch_baseline as tb

    model = tb.create_model(model_name).eval()
    found: dict[tuple, dict] = {}

    def hook(conv, inputs, _output):
        _, c, h, w = inputs[0].shape
        k, st, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        key = (c, conv.out_channels, k, st, p, h, w)
        if key not in found:
            ho, wo = (h + 2 * p - k) // st + 1, (w + 2 * p - k) // st + 1
            macs = batch * conv.out_channels * ho * wo * c * k * k // conv.groups
            found[key] = dict(zip(SHAPE_KEYS, key, strict=True))
            found[key].update(groups=conv.groups, count=0, gflop=2 * macs / 1e9, first=not found)
        found[key]["count"] += 1

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    return list(found.values())


def _torch_times(s: dict, batch: int, reps: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    cl = torch.channels_last
    x = torch.randn(batch, s["cin"], s["height"], s["width"]).to(memory_format=cl)
    w = torch.randn(s["cout"], s["cin"] // s["groups"], s["kernel"], s["kernel"])
    w = w.to(memory_format=cl)
    stride, pad = [s["stride"]] * 2, [s["padding"]] * 2
    with torch.inference_mode():
        g = torch.randn_like(F.conv2d(x, w, stride=stride, padding=pad, groups=s["groups"]))
        g = g.contiguous(memory_format=cl)

        def backward(mask: list[bool]):
            return lambda: torch.ops.aten.convolution_backward(
                g, x, w, None, stride, pad, [1, 1], False, [0, 0], s["groups"], mask
            )

        forward = lambda: F.conv2d(x, w, stride=stride, padding=pad, groups=s["groups"])
        return {
            "forward": _median_ms(forward, reps),
            "input_grad": _median_ms(backward([True, False, False]), reps),
            "weight_grad": _median_ms(backward([False, True, False]), reps),
        }


def torch_child(job: dict) -> dict:
    import torch

    shapes = conv_shapes(job["model"], job["size"], job["batch"])
    for s in shapes:
        s["torch_ms"] = _torch_times(s, job["batch"], job["reps"])
    return {"shapes": shapes, "torch_threads": torch.get_num_threads()}


def _jax_times(s: dict, batch: int, reps: int, rng: np.random.Generator) -> dict[str, float]:
    import jax

    k, p, st = s["kernel"], s["padding"], s["stride"]
    x = jax.device_put(rng.standard_normal((batch, s["height"], s["width"], s["cin"]), np.float32))
    w = jax.device_put(rng.standard_normal((k, k, s["cin"] // s["groups"], s["cout"]), np.float32))

    def conv(x, w):
        pad = [(p, p), (p, p)]
        groups = s["groups"]
        return jax.lax.conv_general_dilated(
            x, w, (st, st), pad, dimension_numbers=NHWC, feature_group_count=groups
        )

    g = jax.device_put(rng.standard_normal(jax.eval_shape(conv, x, w).shape, np.float32))
    calls = {
        "forward": (jax.jit(conv), (x, w)),
        "input_grad": (
            jax.jit(lambda x, w, g: jax.vjp(lambda a: conv(a, w), x)[1](g)[0]),
            (x, w, g),
        ),
        "weight_grad": (
            jax.jit(lambda x, w, g: jax.vjp(lambda b: conv(x, b), w)[1](g)[0]),
            (x, w, g),
        ),
    }
    return {
        part: _median_ms(lambda f=f, a=a: jax.block_until_ready(f(*a)), reps)
        for part, (f, a) in calls.items()
    }


def jax_child(job: dict) -> dict:
    import os

    rng = np.random.default_rng(0)
    shapes = [{**s, "jax_ms": _jax_times(s, job["batch"], job["reps"], rng)} for s in job["shapes"]]
    return {"shapes": shapes, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def totals(shapes: list[dict]) -> dict:
    """ms per model pass, each shape weighted by its count: forward, backward, all."""
    out = {}
    for fw in ("jax", "torch"):
        parts = {
            part: sum(
                s["count"] * s[f"{fw}_ms"][part]
                for s in shapes
                if not (part == "input_grad" and s["first"])
            )
            for part in PARTS
        }
        parts["backward"] = parts["input_grad"] + parts["weight_grad"]
        parts["all"] = parts["forward"] + parts["backward"]
        out[fw] = parts
    return out


def markdown(profile: dict) -> str:
    if "error" in profile:
        return f"profile failed: {profile['error']}"
    shapes = profile["shapes"]
    rows = []
    for s in shapes:
        j, t = s["jax_ms"], s["torch_ms"]
        excess = sum(j[p] - t[p] for p in PARTS if not (p == "input_grad" and s["first"]))
        rows.append(
            [
                f"{s['cin']}->{s['cout']} {s['kernel']}x{s['kernel']}/{s['stride']} "
                f"on {s['height']}x{s['width']}",
                s["count"],
                f"{s['gflop']:.2f}",
                *[f"{j[p]:.1f} / {t[p]:.1f} ({j[p] / t[p]:.2f}x)" for p in PARTS],
                f"{s['count'] * excess:.0f}",
            ]
        )
    header = ["convolution (in->out kxk/stride on HxW)", "count", "GFLOP each"]
    header += [f"{p} ms jax / torch" for p in PARTS] + ["count x (jax - torch) ms"]
    tot = totals(shapes)
    lines = [
        f"{fw}: forward {v['forward']:.0f} ms, backward {v['backward']:.0f} ms "
        f"(input grad {v['input_grad']:.0f}, weight grad {v['weight_grad']:.0f}), "
        f"all {v['all']:.0f} ms"
        for fw, v in tot.items()
    ]
    head = (
        f"### Convolutions of {profile['model']} at {profile['size']} px, batch "
        f"{profile['batch']}, variant {profile['variant']} (`{profile['xla_flags']}`)"
    )
    return "\n\n".join([head, common.markdown_table(header, rows), "\n".join(lines)])


def merge(model: str, variant: str, size: int, batch: int, torch_out: dict, jax_out: dict) -> dict:
    """The two children's per-shape timings as one record."""
    for r in (torch_out, jax_out):
        if "error" in r or "skipped" in r:
            return {"error": r.get("error") or r.get("skipped")}
    pairs = zip(jax_out["shapes"], torch_out["shapes"], strict=True)
    shapes = [{**j, "torch_ms": t["torch_ms"]} for j, t in pairs]
    return {
        "model": model,
        "variant": variant,
        "size": size,
        "batch": batch,
        "xla_flags": jax_out["xla_flags"],
        "torch_threads": torch_out["torch_threads"],
        "shapes": shapes,
        "totals_ms": totals(shapes),
    }
