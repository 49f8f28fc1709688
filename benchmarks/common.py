"""What the benchmark scripts share: the machine's description, the simulated
dataset, one child process per measurement, statistics and markdown tables.

Why child processes: JAX and PyTorch each size their thread pools to the whole
machine, and peak memory (RSS on a CPU) is per process, so each framework is
measured in a fresh process and the parent only collects JSON.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import logging
import math
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = "~/.cache/stagejax"
RESULT_PREFIX = "BENCHMARK_RESULT "
PACKAGES = ("jax", "jaxlib", "flax", "optax", "grain", "torch", "torchvision", "numpy", "pillow")
# The tubule simulator, imported through this one name only (it may move).
SIMULATOR_MODULE = "stagejax.simulate"
# bf16 dense matrix rate measured on this project's H200 (8192^3 bf16 matmul,
# random data: 769-798 TFLOP/s); the datasheet's ~990 is not reached in practice.
H200_BF16_PEAK_FLOPS = 790e12


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(names: Sequence[str] = PACKAGES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in names:
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


def stagejax_xla_defaults() -> str:
    """Give a stagejax child the XLA:CPU flags ``python -m stagejax.main`` sets
    (`stagejax.runtime.xla_flags`), before it imports JAX, so that a benchmark
    times what a user runs; returns the ``XLA_FLAGS`` the child runs with."""
    from stagejax.runtime import xla_flags

    xla_flags.apply_cpu_defaults()
    return os.environ.get("XLA_FLAGS", "")


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
    if not (
        model.startswith(("resnet", "resnext", "wide_resnet")) and resnet_final_map(image_size) <= 2
    ):
        return None
    msg = (
        f"{model} at {image_size} px has a {resnet_final_map(image_size)}-px layer4 map: "
        "XLA:CPU's 3x3 conv is very slow there, so stagejax CPU numbers are not "
        "representative; use >= 65 px"
    )
    log.warning(msg)
    return msg


def simulator():
    """The tubule simulator module (``default_dataset``, ``render_stage_examples``)."""
    return importlib.import_module(SIMULATOR_MODULE)


def simulated_root(
    num_images: int,
    image_size: int,
    seed: int = 0,
    cache_dir: str = DEFAULT_CACHE,
    split_by: str = "slide",
    num_workers: int | None = None,
) -> Path:
    """The simulated layout folder (generated once, then reused from the cache).

    ``split_by='slide'`` holds whole slides (stainings) out for validation and
    test, the harder and default case; ``'random'`` mixes every slide into
    every split. ``num_workers``: render processes (default: the simulator's)."""
    return simulator().default_dataset(
        Path(cache_dir).expanduser() / "simulated",
        num_images,
        image_size,
        seed,
        split_by=split_by,
        num_workers=num_workers,
    )


def peak_flops(device: str) -> tuple[float | None, str]:
    """The FLOP/s that model FLOP utilisation is measured against, for a child's
    ``device`` string ("gpu: NVIDIA H200", "cuda: NVIDIA H200", "cpu: ..."), and
    where the number comes from. None for an accelerator with no known peak."""
    if "H200" in device or "H100" in device:
        return H200_BF16_PEAK_FLOPS, "bf16 matmul rate measured on an H200 here (790 TFLOP/s)"
    if device.startswith("cpu"):
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            flags = ""
        per_cycle = 64 if " avx512f" in flags else 32  # float32 FMA, two units
        cores = os.cpu_count() or 1
        return (
            cores * 3.0e9 * per_cycle,
            f"nominal CPU peak, an estimate: {cores} cores x 3 GHz x {per_cycle} "
            "float32 FLOP/cycle",
        )
    return None, f"no known peak for {device!r}"


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": float(statistics.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
    }


def command_line(module: str) -> str:
    """This invocation as a user would type it (``python -m module ...``), for the report."""
    return shlex.join(["python", "-m", module, *sys.argv[1:]])


def emit(result: dict) -> None:
    """A child's answer: one prefixed JSON line on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def child_pythonpath() -> str:
    """The repository first, then whatever PYTHONPATH already holds (on the GPU
    machine: the wheels installed into /tmp/site)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def _pump(stream, keep: collections.deque, echo=None) -> threading.Thread:
    """Read ``stream`` line by line in a thread, keeping the lines (and echoing them)."""

    def run() -> None:
        for line in stream:
            keep.append(line)
            if echo is not None:
                echo.write(line)
                echo.flush()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def run_child(
    module: str, job: dict, timeout: float | None = None, env: dict[str, str] | None = None
) -> dict:
    """Run ``python -m module --child JOB_JSON`` and return the JSON it emitted.

    The child's log goes to this process's stderr as it runs; a failure comes
    back as ``{"error": ...}`` with the last lines of that log, so that one
    framework's failure does not lose the others' numbers. The child runs in its
    own process group: on a timeout its loader workers are killed with it.
    """
    cmd = [sys.executable, "-m", module, "--child", json.dumps(job)]
    child_env = {**os.environ, "PYTHONPATH": child_pythonpath(), **(env or {})}
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        process_group=0,
    )
    out: collections.deque = collections.deque()
    err: collections.deque = collections.deque(maxlen=3)
    pumps = [_pump(proc.stdout, out), _pump(proc.stderr, err, echo=sys.stderr)]
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    with contextlib.suppress(ProcessLookupError):  # the group may be gone already
        os.killpg(proc.pid, signal.SIGKILL)  # leftover workers too
    proc.wait()
    for pump in pumps:
        pump.join(timeout=10)
    if timed_out:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(out):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = " | ".join(line.strip() for line in err if line.strip())
    return {"error": f"exit code {proc.returncode}, no result ({tail[-400:]})"}


def time_left(deadline: float | None) -> float:
    """Seconds until ``deadline`` (a ``time.monotonic()`` value; None: no limit)."""
    return math.inf if deadline is None else deadline - time.monotonic()


def run_child_capped(
    module: str,
    job: dict,
    cap_s: float,
    deadline: float | None = None,
    min_s: float = 5.0,
    env: dict[str, str] | None = None,
) -> dict:
    """``run_child`` for at most ``cap_s`` and never past ``deadline``; with less
    than ``min_s`` left it does not start and says so (``{"skipped": ...}``).
    The child's wall time is added as ``wall_s``."""
    left = time_left(deadline)
    if left < min_s:
        return {"skipped": f"time budget: {max(left, 0):.0f} s left, {min_s:.0f} s needed"}
    t0 = time.monotonic()
    out = run_child(module, job, timeout=min(cap_s, left), env=env)
    out["wall_s"] = time.monotonic() - t0
    return out


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join(fmt(v) if not isinstance(v, str) else v for v in row) + " |"
        for row in rows
    ]
    return "\n".join(lines)


def stagejax_config(**fields):
    """``configs/default.py`` with ``fields`` set: every benchmark builds stagejax the
    way ``python -m stagejax.main`` would, from the study's recipe."""
    from configs import default

    config = default.get_config()
    for key, value in fields.items():
        config[key] = value
    return config


def finish(
    module: str,
    job: dict,
    results: dict,
    ratio: dict,
    table: str,
    warning: str | None,
    json_path: str | None,
) -> None:
    """Print the markdown table and write the JSON report (machine, command, results)."""
    report = {
        "machine": machine_info(),
        "command": command_line(module),
        "warning": warning,
        "job": job,
        "results": results,
        "ratios": ratio,
    }
    print("\n" + table + "\n")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)


def child_main(children: dict[str, Callable[[dict], dict]], argv: list[str] | None = None) -> None:
    """``python -m MODULE --child JOB_JSON`` for a module of several child kinds:
    runs ``children[job["part"]]`` and prints its JSON for `run_child`."""
    p = argparse.ArgumentParser(description="a benchmark child process")
    p.add_argument("--child", required=True, help="the job, as JSON")
    job = json.loads(p.parse_args(argv).child)
    emit(children[job["part"]](job))


def start(parser, argv, child: Callable[[dict], dict], validate: Callable):
    """The opening every benchmark's ``main`` shares: parse ``argv``; as a child
    (``--child JOB``), run the job, print its JSON and return None; else set up
    logging and return ``(args, validate(args))``, a ``ValueError`` from which is
    the exit message."""
    args = parser.parse_args(argv)
    if args.child:
        emit(child(json.loads(args.child)))
        return None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        return args, validate(args)
    except ValueError as e:
        raise SystemExit(str(e)) from None
