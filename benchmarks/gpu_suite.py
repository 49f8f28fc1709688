"""One prepared GPU run: every GPU measurement of the project in one go, within a time budget.

    bash benchmarks/gpu_suite.sh OUT_DIR [--smoke]    # entry point: installs .whl/ if needed
    python -m benchmarks.gpu_suite OUT_DIR [--smoke] [--budget_s S] [--cache_dir D]

The GPU machine is lent now and then for minutes, so the whole measurement is this
one script. It runs the parts of `PARTS` in order, each with a time cap, and
rewrites ``OUT_DIR/gpu_suite.json`` and ``gpu_suite.md`` after every child
process, so a run cut short still returns what it finished:

* ``prepare``: render the simulated 1152 px images (a few dozen, on every core,
  before anything is timed) and build stagejax's ArrayRecord cache of them;
* ``train_throughput``: `benchmarks.throughput`: stagejax bfloat16 at batch 48 and
  12 (Grain loader with workers) against the study's recipe in PyTorch (float32,
  batch 12, no workers) and tuned PyTorch (bf16 autocast, channels_last,
  torch.compile, fused Adam, workers), end to end and model only, interleaved; a
  second round where the time allows;
* ``loader_share`` and ``mfu``: read off those runs: the share of the stagejax
  end-to-end step spent waiting for the loader, and each step's FLOPs (XLA's cost
  analysis; torch's FLOP counter) over the device's peak (790 TFLOP/s bf16, the
  rate measured on this H200);
* ``predict``: `benchmarks.predict_speed` at 896 px, batch 64, with and without TTA;
* ``memory_remat``, ``section``: hooks for measurements whose features do not
  exist yet; each says why and is reported as pending.

``--smoke`` runs every part at toy sizes (ResNet-18, 72 px, one step per phase,
no torch.compile) on a CPU in one to a few minutes; CI runs it so that the script
cannot rot between GPU runs. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import shlex
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from benchmarks import common, predict_speed, throughput, throughput_report
from benchmarks import gpu_suite_report as report

MODULE = "benchmarks.gpu_suite"
JSON_NAME, MARKDOWN_NAME = "gpu_suite.json", "gpu_suite.md"
# Recorded beside the benchmarks' usual list: what the GPU image or the wheels bring.
MORE_PACKAGES = (
    "orbax-checkpoint",
    "tensorflow-datasets",
    "array-record",
    "protobuf",
    "jax-cuda13-plugin",
    "jax-cuda13-pjrt",
    "nvidia-cudnn-cu13",
)
log = logging.getLogger("gpu_suite")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one mode measures, and how long each child may take."""

    mode: str
    model: str
    crop_size: int
    crop_range: int
    num_images: int
    train: tuple[str, ...]  # throughput specs, NAME@BATCH, in running order
    headline: dict[str, str]  # role -> spec: stagejax, study, tuned (for the targets)
    steps: int
    warmup: int
    window: int
    rounds: int
    precision: str
    torch_compile: str
    predict_batch: int
    predict_steps: int
    predict_warmup: int
    child_cap_s: dict[str, float]  # per framework, and "predict"
    budget_s: float  # whole run, counted from the shell script's start

    @property
    def image_size(self) -> int:
        return self.crop_size + 2 * self.crop_range


GPU = Sizes(
    mode="gpu",
    model="resnet50",
    crop_size=896,
    crop_range=128,
    num_images=96,
    train=("stagejax@48", "torch@12", "torch_tuned@48", "stagejax@12"),
    headline={"stagejax": "stagejax@48", "study": "torch@12", "tuned": "torch_tuned@48"},
    steps=40,
    warmup=5,
    window=5,
    rounds=2,
    precision="bfloat16",
    torch_compile="on",
    predict_batch=64,
    predict_steps=5,
    predict_warmup=2,
    child_cap_s={"stagejax": 150, "torch": 90, "torch_tuned": 180, "predict": 75},
    budget_s=450,
)
SMOKE = Sizes(
    mode="smoke",
    model="resnet18",
    crop_size=72,
    crop_range=10,
    num_images=36,
    train=("stagejax@24", "torch@12", "torch_tuned@24", "stagejax@12"),
    headline={"stagejax": "stagejax@24", "study": "torch@12", "tuned": "torch_tuned@24"},
    steps=1,
    warmup=0,
    window=1,
    rounds=1,
    precision="float32",
    torch_compile="off",
    predict_batch=4,
    predict_steps=2,
    predict_warmup=1,
    child_cap_s={"stagejax": 90, "torch": 60, "torch_tuned": 60, "predict": 60},
    budget_s=300,
)


@dataclasses.dataclass
class Context:
    """What the parts share: sizes, paths, the run's deadline and every result so far."""

    sizes: Sizes
    out_dir: Path
    cache_dir: str
    num_workers: int
    deadline: float  # time.monotonic()
    report: dict
    data_dir: str = ""

    def save(self) -> None:
        """Rewrite the JSON and the markdown, targets included (after every child)."""
        self.report["targets"] = report.targets(self.report)
        (self.out_dir / JSON_NAME).write_text(json.dumps(self.report, indent=1) + "\n")
        (self.out_dir / MARKDOWN_NAME).write_text(report.markdown(self.report))

    def part(self, name: str) -> dict:
        return self.report["parts"][name]


# --- parts -----------------------------------------------------------------------------


def prepare(ctx: Context, deadline: float) -> dict:
    s = ctx.sizes
    job = {
        "part": "prepare",
        "num_images": s.num_images,
        "image_size": s.image_size,
        "crop_size": s.crop_size,
        "crop_range": s.crop_range,
        "cache_dir": ctx.cache_dir,
        "render_workers": os.cpu_count() or 1,
    }
    out = common.run_child_capped(MODULE, job, deadline - time.monotonic(), deadline)
    if "data_dir" in out:
        ctx.data_dir = out["data_dir"]
    return out


def prepare_child(job: dict) -> dict:
    """Render (or reuse) the simulated images and build the ArrayRecord cache."""
    from stagejax import data as data_lib

    t0 = time.monotonic()
    root = common.simulated_root(
        job["num_images"],
        job["image_size"],
        cache_dir=job["cache_dir"],
        num_workers=job["render_workers"],
    )
    render_s = time.monotonic() - t0
    config = common.stagejax_config(
        data_dir=str(root),
        cache_dir=job["cache_dir"],
        crop_size=job["crop_size"],
        crop_range=job["crop_range"],
    )
    dataset = data_lib.load(config)
    return {
        "data_dir": str(root),
        "num_images": job["num_images"],
        "image_size": job["image_size"],
        "render_workers": job["render_workers"],
        "render_s": render_s,
        "cache_s": time.monotonic() - t0 - render_s,
        "train_images": len(dataset.splits["train"].labels),
    }


def train_throughput(ctx: Context, deadline: float) -> dict:
    s = ctx.sizes
    specs = throughput.parse_specs(",".join(s.train), global_batch=12)
    job = {
        "model": s.model,
        "image_size": s.crop_size,
        "crop_range": s.crop_range,
        "steps": s.steps,
        "warmup": s.warmup,
        "window": s.window,
        "precision": s.precision,
        "num_workers": ctx.num_workers,
        "torch_compile": s.torch_compile,
        "seed": 109,
        "data_dir": ctx.data_dir,
        "cache_dir": ctx.cache_dir,
        "flops": True,
        "profile_repeats": 1,
    }
    part = ctx.part("train_throughput")
    part["rounds"] = {}

    def partial(key: str, r: int, out: dict) -> None:
        part["rounds"].setdefault(key, []).append(out)
        ctx.save()

    def cap(key: str) -> float:
        return s.child_cap_s[throughput_report.framework_of(key)]

    results = throughput.measure(specs, job, s.rounds, cap, deadline, on_result=partial)
    throughput_report.add_mfu(results)
    del part["rounds"]  # pooled into results
    return {"results": results, "ratios": throughput_report.ratios(results)}


def predict(ctx: Context, deadline: float) -> dict:
    s = ctx.sizes
    job = {
        "model": s.model,
        "image_size": s.crop_size,
        "batch": s.predict_batch,
        "steps": s.predict_steps,
        "warmup": s.predict_warmup,
        "seed": 0,
        "precision": "auto",
    }
    part = ctx.part("predict")

    def partial(name: str, out: dict) -> None:
        part.setdefault("results", {})[name] = out
        ctx.save()

    results = predict_speed.measure(
        list(predict_speed.FRAMEWORKS), job, s.child_cap_s["predict"], deadline, on_result=partial
    )
    return {"results": results, "ratios": predict_speed.ratios(results)}


@dataclasses.dataclass(frozen=True)
class Part:
    """One measurement: ``run(ctx, deadline) -> dict`` or, while it cannot exist
    yet, ``run=None`` and ``pending`` saying why. A part may use at most ``cap_s``
    and leaves ``floor_s`` for each later part."""

    name: str
    run: Callable[[Context, float], dict] | None
    cap_s: float = 0.0
    floor_s: float = 0.0
    pending: str = ""
    derived: bool = False  # read off earlier parts, no process of its own
    needs_data: bool = False  # the simulated dataset that ``prepare`` makes


PARTS = (
    Part("prepare", prepare, cap_s=90, floor_s=20),
    Part("train_throughput", train_throughput, cap_s=300, floor_s=120, needs_data=True),
    Part("loader_share", report.loader_share, derived=True),
    Part("mfu", report.mfu, derived=True),
    Part("predict", predict, cap_s=120, floor_s=50),
    # Hooks: give each a function (and a cap) once the feature exists.
    Part(
        "memory_remat",
        None,
        pending="waits for the memory issue: no remat option yet "
        "(peak device memory with and without remat at batch 48)",
    ),
    Part(
        "section",
        None,
        pending="waits for part 2 of the section work: no whole-section benchmark yet",
    ),
)


def part_deadline(index: int, ctx: Context) -> float:
    """Now + the part's cap, but leaving the later parts their floors."""
    later = sum(p.floor_s for p in PARTS[index + 1 :] if p.run and not p.derived)
    return min(time.monotonic() + PARTS[index].cap_s, ctx.deadline - later)


def run_parts(ctx: Context) -> None:
    for i, p in enumerate(PARTS):
        entry = ctx.report["parts"][p.name]
        if p.run is None:
            entry.update(status="pending", why=p.pending)
            ctx.save()
            continue
        if not p.derived and common.time_left(ctx.deadline) < 5:
            entry.update(status="not run", why="time budget spent")
            ctx.save()
            continue
        if p.needs_data and not ctx.data_dir:
            entry.update(status="not run", why="no dataset: prepare failed")
            ctx.save()
            continue
        log.info("part %s", p.name)
        entry["status"] = "running"
        ctx.save()
        t0 = time.monotonic()
        try:
            out = p.run(ctx, 0.0 if p.derived else part_deadline(i, ctx))
        except Exception:  # noqa: BLE001 -- a bug in one part must not cost the GPU run
            # the others: the traceback is kept whole and the run exits non-zero.
            log.exception("part %s crashed", p.name)
            out = {"status": "crashed", "traceback": traceback.format_exc()}
        status = out.pop("status", None) or report.status_of(p.name, out)
        entry.update(out, wall_s=time.monotonic() - t0, status=status)
        ctx.save()


# --- main ------------------------------------------------------------------------------


def gpu_info() -> str | None:
    """nvidia-smi's name, memory and driver (no CUDA context in this process)."""
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None


def child_env(sizes: Sizes, cache_dir: str) -> None:
    """Environment every child inherits. On the GPU: JAX's persistent compilation
    cache (a second round, or the same shape again, compiles from disk) and no
    up-front grab of 75% of the GPU memory (loader workers import jax too)."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if sizes.mode == "gpu":
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(cache_dir) / "jax_cache"))
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def command_line(args: argparse.Namespace) -> str:
    """How this run was started, as typed (without the script's own --started_at)."""
    words = ["bash", "benchmarks/gpu_suite.sh", args.out_dir] + (["--smoke"] if args.smoke else [])
    for name in ("budget_s", "num_workers"):
        if getattr(args, name) is not None:
            words += [f"--{name}", str(getattr(args, name))]
    return shlex.join(words)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", nargs="?", default="", help="where the JSON and markdown go")
    p.add_argument("--smoke", action="store_true", help="toy sizes on a CPU (CI)")
    p.add_argument(
        "--budget_s",
        type=float,
        default=None,
        help="whole run, from --started_at (default: 450 s GPU, 300 s smoke)",
    )
    p.add_argument(
        "--started_at",
        type=float,
        default=None,
        help="the shell script's start (Unix time), so the install counts",
    )
    p.add_argument(
        "--cache_dir",
        default="/tmp/stagejax_gpu_suite",
        help="simulated images, their ArrayRecord cache, compilation caches",
    )
    p.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="loader workers (stagejax, tuned torch); default CPUs - 2, smoke 1",
    )
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.child:
        common.emit(prepare_child(json.loads(args.child)))
        return
    if not args.out_dir:
        raise SystemExit("usage: python -m benchmarks.gpu_suite OUT_DIR [--smoke]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sizes = SMOKE if args.smoke else GPU
    budget = args.budget_s if args.budget_s is not None else sizes.budget_s
    spent = time.time() - args.started_at if args.started_at else 0.0
    workers = (
        args.num_workers
        if args.num_workers is not None
        else (1 if args.smoke else max(1, (os.cpu_count() or 2) - 2))
    )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    child_env(sizes, args.cache_dir)
    ctx = Context(
        sizes=sizes,
        out_dir=out_dir,
        cache_dir=args.cache_dir,
        num_workers=workers,
        deadline=time.monotonic() + budget - spent,
        report={
            "suite": MODULE,
            "mode": sizes.mode,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": command_line(args),
            "machine": {
                **common.machine_info(),
                "gpu": gpu_info(),
                "versions": common.versions(common.PACKAGES + MORE_PACKAGES),
            },
            "budget_s": budget,
            "setup_s": spent,
            "num_workers": workers,
            "sizes": dataclasses.asdict(sizes),
            "parts": {p.name: {"status": "waiting"} for p in PARTS},
        },
    )
    run_parts(ctx)
    ctx.report["wall_s"] = spent + budget - common.time_left(ctx.deadline)
    ctx.save()
    print("\n" + report.markdown(ctx.report) + "\n", flush=True)
    if any(e["status"] == "crashed" for e in ctx.report["parts"].values()):
        raise SystemExit("error: a part crashed; its traceback is in the JSON and the log")


if __name__ == "__main__":
    main()
