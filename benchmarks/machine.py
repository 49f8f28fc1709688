"""The machine a benchmark ran on: CPU, accelerator, package versions, memory, peak rate.

Every result JSON carries `machine_info`, so that a figure is never read without the
machine, load and versions that produced it."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

PACKAGES = ("jax", "jaxlib", "flax", "optax", "grain", "torch", "torchvision", "numpy", "pillow")
# bf16 dense matrix rate measured on this project's H200 (8192^3 bf16 matmul,
# random data: 769-798 TFLOP/s); the datasheet's ~990 is not reached in practice.
H200_BF16_PEAK_FLOPS = 790e12


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine_info() -> dict:
    """CPU, core count, load and package versions; the accelerator is added by callers."""
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "load_avg_1min": round(os.getloadavg()[0], 2), "versions": versions()}  # fmt: skip


def device_of_jax() -> str:
    import jax

    return f"{jax.default_backend()}: {jax.devices()[0].device_kind}"


def peak_flops(device: str) -> tuple[float | None, str]:
    """The FLOP/s that model FLOP utilisation is measured against, for a child's
    ``device`` string ("gpu: NVIDIA H200", "cuda: NVIDIA H200", "cpu: ..."), and
    where the number comes from. None for an accelerator with no known peak."""
    if "H200" in device or "H100" in device:
        return H200_BF16_PEAK_FLOPS, "bf16 matmul rate measured on an H200 here (790 TFLOP/s)"
    if device.startswith("cpu"):
        flags_text = ""
        with contextlib.suppress(OSError):
            flags_text = Path("/proc/cpuinfo").read_text()
        per_cycle = 64 if " avx512f" in flags_text else 32  # float32 FMA, two units
        cores = os.cpu_count() or 1
        why = f"{cores} cores x 3 GHz x {per_cycle} float32 FLOP/cycle"
        return cores * 3.0e9 * per_cycle, f"nominal CPU peak, an estimate: {why}"
    return None, f"no known peak for {device!r}"


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resolve_precision(precision: str) -> str:
    """``auto``: float32 on a CPU, bfloat16 on an accelerator (as training does)."""
    import jax

    if precision != "auto":
        return precision
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
