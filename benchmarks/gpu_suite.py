"""One prepared GPU run: every GPU measurement of the project in one go, within a time budget.

    bash benchmarks/gpu_suite.sh OUT_DIR [--smoke]    # entry point: installs .whl/ if needed
    python -m benchmarks.gpu_suite OUT_DIR [--smoke] [--budget_s=S] [--cache_dir=D]

The GPU machine is lent now and then for minutes, so the whole measurement is this
one script. It runs the parts of `PARTS` in order, each with a time cap, and
rewrites ``OUT_DIR/gpu_suite.json`` and ``gpu_suite.md`` after every child
process, so a run cut short still returns what it finished (the parts and the
two modes' sizes are in `gpu_suite_parts`, the report and targets in
`gpu_suite_report`):

* ``prepare``: render the simulated 1152 px images (a few dozen, on every core,
  before anything is timed) and build stagejax's ArrayRecord cache of them;
* ``train_throughput``: `benchmarks.throughput`: stagejax bfloat16 at batch 48
  (Grain loader with workers) against the study's recipe in PyTorch (float32,
  batch 12, no workers) and tuned PyTorch (bf16 autocast, channels_last,
  torch.compile, fused Adam, workers), end to end and model only, one round;
  stagejax at batch 12 last, where the part's time allows;
* ``loader_share`` and ``mfu``: read off those runs: the share of the stagejax
  end-to-end step spent waiting for the loader, and each step's FLOPs (XLA's cost
  analysis; torch's FLOP counter) over the device's peak (790 TFLOP/s bf16, the
  rate measured on this H200);
* ``data_on_device`` (issue 15 point 3): images/s and loader-wait share of the
  trainer's step fed by Grain (the suite's workers) and by the training split kept
  on the device (``--config.data_on_device``), one process, interleaved rounds;
* ``section_render``: start rendering a study-scale SIMULATED section in the
  background (host work; `gpu_suite_parts` says why not in ``prepare``), after
  the parts that time the host loader;
* ``memory_remat`` (issue 15 point 1): `benchmarks.memory` at 896 px, bfloat16,
  batch 12 then 48, remat off and on: XLA's memory analysis of the compiled step,
  the peak device memory and seconds per step;
* ``predict``: `benchmarks.predict_speed` at 896 px, batch 64, with and without TTA;
* ``section``: wait for the render, then stage the section end to end (detect,
  cut, stage, write) with ResNet-50 at 896 px (random weights; time only).

Budget (GPU): 520 s from the shell script's start, so that the run ends inside
540 s with the wheel install (about 20-30 s) and Python's start-up counted. Each
part may use at most its cap and leaves each later part its floor (s, cap /
floor): prepare 40 / 15; train_throughput 150 / 80 (per child: stagejax 70,
torch 45, tuned torch 110; stagejax@12 only runs on what the first three leave);
data_on_device 70 / 40; section_render 5 / 0; memory_remat 100 / 60 (45 per child;
the batch-48 pair runs second, so it is what a short run loses); predict 55 / 30
(30 per child; it has no target, so it gave way to section); section 70 / 45 (the
wait for the render included). The caps add up to 490 s, the budget less about 30 s
of setup; they are estimates for a first run, not measurements. To make room,
``train_throughput`` runs one round (it ran two) of 30 steps (40). A part that runs
out of time is cut short or "not run"; the others keep their numbers. Time a part
leaves unused is not handed on (each is held to its cap): the run then ends early.

``--smoke`` runs every part at toy sizes (ResNet-18, 32 px, one step per phase,
no torch.compile, a 0.8 x 0.6 mm section) on a CPU, under one generous budget
instead of the parts' caps; CI runs it (with ``--in_process``, `common`) so that
the script cannot rot between GPU runs. Its numbers mean nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shlex
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks import common
from benchmarks import gpu_suite_parts as parts
from benchmarks import gpu_suite_report as report
from benchmarks.gpu_suite_parts import child  # run_child's in-process jobs: MODULE.child

MODULE = "benchmarks.gpu_suite"
JSON_NAME, MARKDOWN_NAME = "gpu_suite.json", "gpu_suite.md"
# Recorded beside the benchmarks' usual list: what the GPU image or the wheels bring.
MORE_PACKAGES = ("orbax-checkpoint", "tensorflow-datasets", "array-record", "protobuf",
                 "tifffile", "imagecodecs", "shapely", "scikit-image", "jax-cuda13-plugin",
                 "jax-cuda13-pjrt", "nvidia-cudnn-cu13")  # fmt: skip
log = logging.getLogger("gpu_suite")

FLAGS: common.Flags = {
    "smoke": (False, "Toy sizes on a CPU (CI)."),
    "budget_s": (None, "Whole run, from --started_at (default: 520 s GPU, 1500 s smoke).", float),
    "started_at": (None, "The shell script's start (Unix time), so the install counts.", float),
    "cache_dir": ("/tmp/stagejax_gpu_suite", "Simulated images, caches, compilation caches."),
    "num_workers": (None, "Loader workers (stagejax, tuned torch); default CPUs - 2, smoke 0.",
                    int),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Part:
    """One measurement: ``run(ctx, deadline) -> dict`` (``derived``: ``run(report)``,
    read off earlier parts, no process of its own) or, while it cannot exist yet,
    ``run=None`` and ``pending`` saying why. A part may use at most ``cap_s`` and
    leaves ``floor_s`` for each later part."""

    name: str
    run: Callable | None
    cap_s: float = 0.0
    floor_s: float = 0.0
    pending: str = ""
    derived: bool = False
    needs_data: bool = False  # the simulated dataset that ``prepare`` makes


PARTS = (
    Part("prepare", parts.prepare, cap_s=40, floor_s=15),
    Part("train_throughput", parts.train_throughput, cap_s=150, floor_s=80, needs_data=True),
    Part("loader_share", report.loader_share, derived=True),
    Part("mfu", report.mfu, derived=True),
    Part("data_on_device", parts.data_on_device, cap_s=70, floor_s=40, needs_data=True),
    Part("section_render", parts.section_render, cap_s=5),
    Part("memory_remat", parts.memory_remat, cap_s=100, floor_s=60),
    Part("predict", parts.predict, cap_s=55, floor_s=30),
    Part("section", parts.section, cap_s=70, floor_s=45),
)


def part_deadline(index: int, ctx: parts.Context) -> float:
    """Now + the part's cap, but leaving the later parts their floors; in smoke mode
    the run's deadline (a slow CI machine must not cut a part short)."""
    if ctx.sizes.mode == "smoke":
        return ctx.deadline
    later = sum(p.floor_s for p in PARTS[index + 1 :] if p.run and not p.derived)
    return min(time.monotonic() + PARTS[index].cap_s, ctx.deadline - later)


def _skip(p: Part, ctx: parts.Context) -> tuple[str, str] | None:
    if p.run is None:
        return "pending", p.pending
    if not p.derived and common.time_left(ctx.deadline) < 5:
        return "not run", "time budget spent"
    if p.needs_data and not ctx.data_dir:
        return "not run", "no dataset: prepare failed"
    return None


def run_parts(ctx: parts.Context) -> None:
    for i, p in enumerate(PARTS):
        entry = ctx.report["parts"][p.name]
        if skip := _skip(p, ctx):
            entry.update(status=skip[0], why=skip[1])
            ctx.save()
            continue
        log.info("part %s", p.name)
        entry["status"] = "running"
        ctx.save()
        t0 = time.monotonic()
        try:
            out = p.run(ctx.report) if p.derived else p.run(ctx, part_deadline(i, ctx))
        except Exception:  # noqa: BLE001 -- a bug in one part must not cost the GPU run
            # the others: the traceback is kept whole and the run exits non-zero.
            log.exception("part %s crashed", p.name)
            out = {"status": "crashed", "traceback": traceback.format_exc()}
        status = out.pop("status", None) or report.status_of(p.name, out)
        entry.update(out, wall_s=time.monotonic() - t0, status=status)
        ctx.save()


def writer(out_dir: Path) -> Callable[[dict], None]:
    """Rewrite the JSON and the markdown, targets included (after every child)."""

    def save(rep: dict) -> None:
        rep["targets"] = report.targets(rep)
        (out_dir / JSON_NAME).write_text(json.dumps(rep, indent=1) + "\n")
        (out_dir / MARKDOWN_NAME).write_text(report.markdown(rep))

    return save


def gpu_info() -> str | None:
    """nvidia-smi's name, memory and driver (no CUDA context in this process)."""
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        proc = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None


def child_env(sizes: parts.Sizes, cache_dir: str) -> None:
    """Environment every child inherits: JAX's persistent compilation cache (the
    same step again, as ``data_on_device`` builds the headline stagejax step,
    compiles from disk) and, on the GPU, no up-front grab of 75% of the GPU memory
    (loader workers import jax too)."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(cache_dir) / "jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    if sizes.mode == "gpu":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def command_line(args) -> str:
    """How this run was started, as typed (without the script's own --started_at)."""
    words = ["bash", "benchmarks/gpu_suite.sh", args.positional[0]]
    words += ["--smoke"] * args.smoke + ["--in_process"] * args.in_process
    for name in ("budget_s", "num_workers"):
        if getattr(args, name) is not None:
            words += [f"--{name}", str(getattr(args, name))]
    return shlex.join(words)


def new_context(args) -> parts.Context:
    sizes = parts.SMOKE if args.smoke else parts.GPU
    budget = args.budget_s if args.budget_s is not None else sizes.budget_s
    spent = time.time() - args.started_at if args.started_at else 0.0
    workers = args.num_workers
    if workers is None:
        workers = 0 if args.smoke else max(1, (os.cpu_count() or 2) - 2)
    versions = common.versions(common.PACKAGES + MORE_PACKAGES)
    rep = {
        "suite": MODULE,
        "mode": sizes.mode,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command_line(args),
        "machine": {**common.machine_info(), "gpu": gpu_info(), "versions": versions},
        "budget_s": budget,
        "setup_s": spent,
        "num_workers": workers,
        "sizes": dataclasses.asdict(sizes),
        "parts": {p.name: {"status": "waiting"} for p in PARTS},
    }
    deadline = time.monotonic() + budget - spent
    return parts.Context(sizes, args.cache_dir, workers, deadline, rep)


def run(args) -> None:
    if not args.positional:
        raise ValueError("usage: python -m benchmarks.gpu_suite OUT_DIR [--smoke]")
    out_dir = Path(args.positional[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = new_context(args)
    ctx.on_save = writer(out_dir)
    child_env(ctx.sizes, args.cache_dir)
    try:
        run_parts(ctx)
    finally:
        ctx.stop_background()
    ctx.report["wall_s"] = (
        ctx.report["setup_s"] + ctx.report["budget_s"] - common.time_left(ctx.deadline)
    )
    ctx.save()
    print("\n" + report.markdown(ctx.report) + "\n", flush=True)
    if any(e["status"] == "crashed" for e in ctx.report["parts"].values()):
        raise SystemExit("error: a part crashed; its traceback is in the JSON and the log")


def main(argv: Sequence[str] | None = None) -> None:
    common.main(FLAGS, run, argv, child, positional=1)


if __name__ == "__main__":
    main()
