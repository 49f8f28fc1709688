"""What the benchmark scripts share: the machine's description, the simulated
dataset, one child process per measurement, statistics and markdown tables.

Why child processes: JAX and PyTorch each size their thread pools to the whole
machine, and peak memory (RSS on a CPU) is per process, so each framework is
measured in a fresh process and the parent only collects JSON.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = "~/.cache/stagejax"
RESULT_PREFIX = "BENCHMARK_RESULT "
PACKAGES = ("jax", "jaxlib", "flax", "optax", "grain", "torch", "torchvision", "numpy", "pillow")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine_info() -> dict:
    """CPU, core count, load and package versions; the accelerator is added by callers."""
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "versions": versions(),
    }


def scaled_crop_range(crop_size: int) -> int:
    """The study's +/-128 px shift for 896 px crops, scaled to ``crop_size``."""
    return max(1, round(128 * crop_size / 896))


def resnet_final_map(image_size: int) -> int:
    """Side of a ResNet's layer4 feature map for ``image_size`` px input (torch's
    padding: 7x7/2 conv, 3x3/2 max pool, three stride-2 stages)."""
    s = (image_size + 2 * 3 - 7) // 2 + 1
    s = (s + 2 - 3) // 2 + 1
    for _ in range(3):
        s = (s + 2 - 3) // 2 + 1
    return s


def warn_slow_xla_cpu_shape(model: str, image_size: int, log) -> str | None:
    """Why: on XLA:CPU a 3x3 conv over a 2x2 (or 1x1) map -- ResNet layer4 for
    crops up to 64 px -- runs at ~1/50 of its usual FLOP rate (RESULTS.md,
    profile), so a small CPU setting there measures that one kernel, not the
    framework."""
    if not (model.startswith(("resnet", "resnext", "wide_resnet"))
            and resnet_final_map(image_size) <= 2):
        return None
    msg = (f"{model} at {image_size} px has a {resnet_final_map(image_size)}-px layer4 map: "
           "XLA:CPU's 3x3 conv is very slow there, so stagejax CPU numbers are not "
           "representative; use >= 65 px")
    log.warning(msg)
    return msg


def simulated_root(num_images: int, image_size: int, seed: int = 0,
                   cache_dir: str = DEFAULT_CACHE, split_by: str = "slide") -> Path:
    """The simulated layout folder (generated once, then reused from the cache).

    ``split_by='slide'`` holds whole slides (stainings) out for validation and
    test, the harder and default case; ``'random'`` mixes every slide into
    every split."""
    from stagejax.data import synthetic

    return synthetic.default_dataset(Path(cache_dir).expanduser() / "simulated", num_images,
                                     image_size, seed, split_by=split_by)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": float(statistics.median(values)), "min": float(min(values)),
            "max": float(max(values))}


def command_line(module: str) -> str:
    """This invocation as a user would type it (``python -m module ...``), for the report."""
    return shlex.join(["python", "-m", module, *sys.argv[1:]])


def emit(result: dict) -> None:
    """A child's answer: one prefixed JSON line on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(module: str, job: dict, timeout: float | None = None,
              env: dict[str, str] | None = None) -> dict:
    """Run ``python -m module --child JOB_JSON`` and return the JSON it emitted.

    The child's log goes to this process's stderr as it runs; a failure comes
    back as ``{"error": ...}`` so that one framework's failure does not lose
    the others' numbers.
    """
    cmd = [sys.executable, "-m", module, "--child", json.dumps(job)]
    child_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env, stdout=subprocess.PIPE,
                              stderr=None, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
    return {"error": f"exit code {proc.returncode}, no result ({tail})"}


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) if not isinstance(v, str) else v for v in row) + " |"
              for row in rows]
    return "\n".join(lines)


def stagejax_config(**fields):
    """``configs/default.py`` with ``fields`` set: every benchmark builds stagejax the
    way ``python -m stagejax.main`` would, from the study's recipe."""
    from configs import default

    config = default.get_config()
    for key, value in fields.items():
        config[key] = value
    return config


def finish(module: str, job: dict, results: dict, ratio: dict, table: str,
           warning: str | None, json_path: str | None) -> None:
    """Print the markdown table and write the JSON report (machine, command, results)."""
    report = {"machine": machine_info(), "command": command_line(module),
              "warning": warning, "job": job, "results": results, "ratios": ratio}
    print("\n" + table + "\n")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
