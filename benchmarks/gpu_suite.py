"""One prepared GPU run: every GPU measurement of the project in one go, within a time budget.

    bash benchmarks/gpu_suite.sh OUT_DIR [--smoke]    # entry point: installs .whl/ if needed
    python -m benchmarks.gpu_suite OUT_DIR [--smoke] [--budget_s=S] [--cache_dir=D]

The GPU machine is lent now and then for minutes, so the whole measurement is this one
script, a driver: each part runs a maintained benchmark at the GPU's sizes (`MODES`) --
its command line in this process, or its functions in a child of this module -- with
every child held to the part's end (`common.DEADLINE`), and rewrites
``OUT_DIR/gpu_suite.json`` and ``gpu_suite.md`` after it, so a run cut short keeps what
it finished. RESULTS.md ("GPU suite") says what each part measures. The parts may use
at most their cap and leave each later part its floor (`PARTS`; estimates for a first
run) within 520 s from the shell script's start (the wheel install counted), so that a
run ends inside the 540 s of a device call. The section renders in the background
(``section_render``, ``section`` collects it): its main process draws and encodes every
tile (93 s wall on 2 cores), so it renders while the device-bound parts run.

``--smoke`` runs every part at toy sizes on a CPU under one generous budget; CI runs
it (with ``--in_process``) so that the script cannot rot between GPU runs. Its numbers
mean nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shlex
import subprocess
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from benchmarks import common, machine, memory, predict_speed, throughput
from benchmarks import gpu_suite_report as gpu_report

MODULE = "benchmarks.gpu_suite"
JSON_NAME, MARKDOWN_NAME = "gpu_suite.json", "gpu_suite.md"
# Recorded beside the benchmarks' usual list: what the GPU image or the wheels bring.
MORE_PACKAGES = ("orbax-checkpoint", "tensorflow-datasets", "array-record", "protobuf",
                 "tifffile", "imagecodecs", "shapely", "scikit-image", "jax-cuda13-plugin",
                 "jax-cuda13-pjrt", "nvidia-cudnn-cu13")  # fmt: skip
SEED = 109  # throughput's seed: the feeds child compiles the same step (from the cache)
SECTION_SEED = 1000  # benchmarks.section's timing section
EXIT_MARGIN_S = 10.0  # a child that times itself stops this long before its cap
log = logging.getLogger("gpu_suite")

FLAGS: common.Flags = {
    "smoke": (False, "Toy sizes on a CPU (CI)."),
    "budget_s": (None, "Whole run, from --started_at (default: 520 s GPU, 1500 s smoke).", float),
    "started_at": (None, "The shell script's start (Unix time), so the install counts.", float),
    "cache_dir": ("/tmp/stagejax_gpu_suite", "Simulated images, caches, compilation caches."),
    "num_workers": (None, "Loader workers (stagejax, tuned torch); default CPUs - 2, smoke 0.",
                    int),
}  # fmt: skip

MODES = {
    "gpu": dict(model="resnet50", crop=896, crop_range=128, images=96, batch=48,
                precision="bfloat16", train="stagejax@48,torch@12,torch_tuned@48,stagejax@12",
                steps=30, warmup=5, window=5, torch_compile="on", train_cap=110,
                predict=(64, 5, 2), predict_cap=30, feeds=(10, 2, 2), memory_batches=[12, 48],
                memory_steps=5, memory_cap=45, section_mm=[4.4, 3.5], render_workers=4,
                budget_s=520),
    "smoke": dict(model="resnet18", crop=32, crop_range=4, images=36, batch=24,
                  precision="float32", train="stagejax@24,torch@12,torch_tuned@24", steps=1,
                  warmup=0, window=1, torch_compile="off", train_cap=600, predict=(2, 1, 1),
                  predict_cap=600, feeds=(1, 1, 1), memory_batches=[12], memory_steps=1,
                  memory_cap=600, section_mm=[0.8, 0.6], render_workers=1, budget_s=1500),
}  # fmt: skip  # predict: (batch, steps, warm-up); feeds: (timed steps, rounds, warm-up)


@dataclasses.dataclass
class Suite:
    """One run: its mode's sizes, where it writes, its deadline and report so far."""

    s: dict
    out_dir: Path
    cache_dir: str
    workers: int
    deadline: float  # time.monotonic()
    report: dict
    render: common.Child | None = None  # the background section render

    def save(self) -> None:
        self.report["targets"] = gpu_report.targets(self.report)
        (self.out_dir / JSON_NAME).write_text(json.dumps(self.report, indent=1) + "\n")
        (self.out_dir / MARKDOWN_NAME).write_text(gpu_report.markdown(self.report))

    def data_dir(self) -> str:
        """The simulated images (``prepare``'s; '' when it failed)."""
        return self.report["parts"]["prepare"].get("data_dir", "")


# --- the parts ----------------------------------------------------------------------------


def run_benchmark(module, argv: list[str]) -> dict:
    """A maintained benchmark's command line, run here (its children under
    `common.DEADLINE`): its report and markdown, less what the suite records once."""
    return {k: v for k, v in module.main(argv).items() if k not in ("machine", "date")}


def prepare(suite: Suite) -> dict:
    """Render the images and build their cache before anything is timed, in a child."""
    s = suite.s
    job = {"part": "prepare", "num_images": s["images"], "crop_size": s["crop"],
           "crop_range": s["crop_range"], "cache_dir": suite.cache_dir}  # fmt: skip
    return common.run_child(MODULE, job)


NO_DATA = {"status": "not run", "why": "no dataset: prepare failed"}


def train_throughput(suite: Suite) -> dict:
    s = suite.s
    if not suite.data_dir():
        return dict(NO_DATA)
    return run_benchmark(throughput, [
        f"--model={s['model']}", f"--image_size={s['crop']}", f"--crop_range={s['crop_range']}",
        f"--frameworks={s['train']}", f"--steps={s['steps']}", f"--warmup={s['warmup']}",
        f"--window={s['window']}", f"--precision={s['precision']}", f"--seed={SEED}",
        f"--torch_compile={s['torch_compile']}", f"--num_images={s['images']}", "--flops",
        f"--num_workers={suite.workers}", f"--cache_dir={suite.cache_dir}",
        f"--timeout={s['train_cap']}"])  # fmt: skip


def data_on_device(suite: Suite) -> dict:
    s = suite.s
    if not suite.data_dir():
        return dict(NO_DATA)
    job = {"part": "feeds", "model": s["model"], "image_size": s["crop"],
           "crop_range": s["crop_range"], "precision": s["precision"], "seed": SEED,
           "num_workers": suite.workers, "data_dir": suite.data_dir(),
           "cache_dir": suite.cache_dir, "global_batch": s["batch"], "feeds": s["feeds"],
           "budget_s": common.time_left(common.DEADLINE) - EXIT_MARGIN_S}  # fmt: skip
    return common.run_child(MODULE, job, min_s=20)


def section_render(suite: Suite) -> dict:
    """Start rendering the section (``section`` collects it)."""
    s = suite.s
    name = f"seed{SECTION_SEED}_{s['section_mm'][0]}x{s['section_mm'][1]}mm"
    job = {"out": str(Path(suite.cache_dir) / "section" / name), "size_mm": s["section_mm"],
           "num_workers": s["render_workers"]}  # fmt: skip
    suite.render = common.Child(MODULE, {"part": "render", **job})
    return {"status": "started", **job, "why": "rendering in the background (see section)"}


def memory_remat(suite: Suite) -> dict:
    """Remat off and on per batch (the study's first), each in its own process so that
    peaks do not mix; the cse_barrier flag that stagejax sets with remat (without
    remat it changes nothing)."""
    s, runs = suite.s, []
    for batch in s["memory_batches"]:
        runs.append(run_benchmark(memory, [
            f"--models={s['model']}", f"--sizes={s['crop']}", f"--precisions={s['precision']}",
            f"--batch={batch}", f"--time_steps={s['memory_steps']}", "--xla_keep_remat",
            f"--timeout={s['memory_cap']}",
            f"--json={suite.cache_dir}/memory_{batch}.json"]))  # fmt: skip
    return {"results": [r for run in runs for r in run["results"]],
            "markdown": "\n\n".join(run["markdown"] for run in runs)}  # fmt: skip


def predict(suite: Suite) -> dict:
    s = suite.s
    batch, steps, warmup = s["predict"]
    return run_benchmark(predict_speed, [
        f"--model={s['model']}", f"--image_size={s['crop']}", f"--batch={batch}",
        f"--steps={steps}", f"--warmup={warmup}", "--precision=auto", "--seed=0",
        f"--frameworks={','.join(predict_speed.FRAMEWORKS)}",
        f"--timeout={s['predict_cap']}"])  # fmt: skip


def section(suite: Suite) -> dict:
    """Wait for the render (recorded in its own part), then stage it."""
    s, entry, t0 = suite.s, suite.report["parts"]["section_render"], time.monotonic()
    if suite.render is None:
        return {"error": "no section: section_render did not run"}
    render = suite.render.wait(max(0.0, common.time_left(common.DEADLINE)))
    suite.render = None
    entry.pop("why", None)
    entry.update(render, status=status_of(render), waited_for_s=time.monotonic() - t0)
    if "error" in render:
        return {"error": f"no section: {render['error']}"}
    job = {"part": "stage", "path": render["path"], "model": s["model"], "crop_size": s["crop"],
           "image_size": s["crop"] + 2 * s["crop_range"], "precision": s["precision"],
           "budget_s": common.time_left(common.DEADLINE) - EXIT_MARGIN_S}  # fmt: skip
    return common.run_child(MODULE, job, min_s=20)


# (name, run, cap s, floor s): a part may use at most its cap and leaves each later part
# its floor (GPU mode).
PARTS = (("prepare", prepare, 40, 15), ("train_throughput", train_throughput, 150, 80),
         ("data_on_device", data_on_device, 70, 40), ("section_render", section_render, 5, 0),
         ("memory_remat", memory_remat, 100, 60), ("predict", predict, 55, 30),
         ("section", section, 70, 45))  # fmt: skip


def part_deadline(index: int, suite: Suite) -> float:
    """Now + the part's cap, but leaving the later parts their floors; in smoke mode
    the run's deadline (a slow CI machine must not cut a part short)."""
    if suite.report["mode"] == "smoke":
        return suite.deadline
    later = sum(floor for *_, floor in PARTS[index + 1 :])
    return min(time.monotonic() + PARTS[index][2], suite.deadline - later)


def status_of(out: dict) -> str:
    """ok, partial (some of its measurements failed or were not run) or failed."""
    results = out.get("results", {"": out})
    results = list(results.values()) if isinstance(results, dict) else results
    bad = sum("error" in r for r in results)
    return "failed" if "error" in out or bad == len(results) else "partial" if bad else "ok"


def run_parts(suite: Suite) -> None:
    for i, (name, part, *_) in enumerate(PARTS):
        entry = suite.report["parts"][name]
        if common.time_left(suite.deadline) < 5:
            entry.update(status="not run", why="time budget spent")
            suite.save()
            continue
        log.info("part %s", name)
        entry["status"], t0 = "running", time.monotonic()
        suite.save()
        common.DEADLINE = part_deadline(i, suite)
        try:
            out = part(suite)
        except (Exception, SystemExit):  # noqa: BLE001 -- one part's bug must not cost the
            # GPU run the others: the traceback is kept whole and the run exits non-zero.
            log.exception("part %s crashed", name)
            out = {"status": "crashed", "traceback": traceback.format_exc()}
        finally:
            common.DEADLINE = None
        status = out.pop("status", None) or status_of(out)
        entry.update(out, status=status, wall_s=time.monotonic() - t0)
        suite.save()


# --- the children (python -m benchmarks.gpu_suite --child JOB) -------------------------------


def prepare_child(job: dict) -> dict:
    """Render (or reuse) the simulated images on every core and build their cache."""
    from stagejax import datasets as data_lib

    t0, size = time.monotonic(), job["crop_size"] + 2 * job["crop_range"]
    workers = os.cpu_count() or 1
    root = str(common.simulated_root(job["num_images"], size, cache_dir=job["cache_dir"],
                                     num_workers=workers))  # fmt: skip
    render_s = time.monotonic() - t0
    keys = ("cache_dir", "crop_size", "crop_range")
    dataset = data_lib.load(common.stagejax_config(data_dir=root, **{k: job[k] for k in keys}))
    return {"data_dir": root, "num_images": job["num_images"], "image_size": size,
            "render_workers": workers, "render_s": render_s,
            "cache_s": time.monotonic() - t0 - render_s,
            "train_images": len(dataset.splits["train"].labels)}  # fmt: skip


def feeds_child(job: dict) -> dict:
    """Both training feeds of the simulated dataset (`loader.compare_feeds`)."""
    xla = common.stagejax_xla_defaults()  # before JAX starts
    from benchmarks import loader
    from stagejax.data import on_device

    steps, trials, warmup = job["feeds"]
    config, run = throughput.build_run(job)
    config.data_on_device = "true"  # read when the run first asks (`Run.data_on_device`)
    split = run.dataset.splits["train"]
    out = loader.compare_feeds(run, split, trials, steps, warmup,
                               time.perf_counter() + job["budget_s"])  # fmt: skip
    return {"results": out.pop("paths"), **out, "batch": config.global_batch_size,
            "train_images": len(split.labels), "timed_steps_per_round": steps,
            "resident_bytes": on_device.resident_bytes(run.data_on_device.sizes),
            "decision": run.data_on_device.reason, "xla_flags": xla,
            "device": machine.device_of_jax()}  # fmt: skip


def render_child(job: dict) -> dict:
    """Render (or reuse) the section; its size and the seconds it took."""
    from stagejax.simulate import section as section_sim

    out, t0 = Path(job["out"]), time.monotonic()
    cached = (out / "section.tif").exists()
    if not cached:
        section_sim.render_section(out, SECTION_SEED, size_mm=tuple(job["size_mm"]),
                                   num_workers=job["num_workers"])  # fmt: skip
    meta = json.loads((out / "SIMULATED.json").read_text())
    return {"path": str(out / "section.tif"), "render_s": time.monotonic() - t0,
            "cached": cached, "section_px": meta["size_px"], "size_mm": meta["size_mm"],
            "tubules_drawn": meta["tubules"], "num_workers": job["num_workers"]}  # fmt: skip


def stage_child(job: dict) -> dict:
    """A random-weights stage model, then the section staged once (the eval step
    compiles), where the time allows once more (compiled), and then a folder of three
    copies through ``--mode=section`` (the seconds each further slide adds)."""
    xla = common.stagejax_xla_defaults()  # before JAX starts
    from benchmarks import section as bench
    from benchmarks.section_throughput import folder_run
    from stagejax.section.crops import default_workers
    from stagejax.section.model import load_stage_model

    deadline, path = time.perf_counter() + job["budget_s"], Path(job["path"])
    keys = ("model", "crop_size", "image_size", "precision")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        config = bench.study_config(Path(tmp), **{k: job[k] for k in keys})
        sm = load_stage_model(config, Path(tmp) / "none")
        out = {
            **{k: job[k] for k in keys},
            "eval_batch": sm.batch_size,
            "xla_flags": xla,
            "model_setup_s": time.perf_counter() - t0,
            "device": machine.device_of_jax(),
        }
        first = bench.time_section(path, sm)
        out["results"] = {"first_pass": first}
        if deadline - time.perf_counter() > 1.2 * first["total_seconds"]:
            out["results"]["second_pass"] = bench.time_section(path, sm)
        # Four more slides, their models compiled from the persistent cache: about four
        # compiled passes.
        per = out["results"].get("second_pass", first)["total_seconds"]
        if deadline - time.perf_counter() > 5 * per + 10:
            out["folder"] = folder_run(path, config, 3, default_workers(), Path(tmp))
    return out


CHILDREN = {"prepare": prepare_child, "feeds": feeds_child, "render": render_child,
            "stage": stage_child}  # fmt: skip


def child(job: dict) -> dict:
    return CHILDREN[job["part"]](job)


# --- running -----------------------------------------------------------------------------------


def gpu_info() -> str | None:
    """nvidia-smi's name, memory and driver (no CUDA context in this process)."""
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        proc = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None


def new_suite(args) -> Suite:
    mode = "smoke" if args.smoke else "gpu"
    s = MODES[mode]
    budget = args.budget_s if args.budget_s is not None else s["budget_s"]
    spent = time.time() - args.started_at if args.started_at else 0.0
    workers = args.num_workers
    if workers is None:
        workers = 0 if args.smoke else max(1, (os.cpu_count() or 2) - 2)
    words = [a for a in common.ARGV or [] if not a.startswith("--started_at")]
    host = {**machine.machine_info(), "gpu": gpu_info(),
            "versions": machine.versions(machine.PACKAGES + MORE_PACKAGES)}  # fmt: skip
    report = {"suite": MODULE, "mode": mode,
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "command": shlex.join(["bash", "benchmarks/gpu_suite.sh", *words]),
              "machine": host, "budget_s": budget, "setup_s": spent, "num_workers": workers,
              "sizes": s, "parts": {p[0]: {"status": "waiting"} for p in PARTS}}  # fmt: skip
    deadline = time.monotonic() + budget - spent
    return Suite(s, Path(args.positional[0]), args.cache_dir, workers, deadline, report)


def run(args) -> None:
    if not args.positional:
        raise ValueError("usage: python -m benchmarks.gpu_suite OUT_DIR [--smoke]")
    suite = new_suite(args)
    suite.out_dir.mkdir(parents=True, exist_ok=True)
    # Every child inherits: JAX's persistent compilation cache (the feeds child compiles
    # the headline stagejax step from disk) and, on the GPU, no up-front grab of 75% of
    # its memory (loader workers import jax too).
    env = {"PYTHONUNBUFFERED": "1", "JAX_COMPILATION_CACHE_DIR": f"{args.cache_dir}/jax_cache",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
           **({} if args.smoke else {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})}  # fmt: skip
    for k, value in env.items():
        os.environ.setdefault(k, value)
    try:
        run_parts(suite)
    finally:
        if suite.render is not None:  # the part that would collect it was cut or not run
            suite.render.kill()
            why = "ended with the run: nothing used it"
            suite.report["parts"]["section_render"].update(status="stopped", why=why)
    r = suite.report
    r["wall_s"] = r["setup_s"] + r["budget_s"] - common.time_left(suite.deadline)
    suite.save()
    print("\n" + gpu_report.markdown(r) + "\n", flush=True)
    if any(e["status"] == "crashed" for e in r["parts"].values()):
        raise SystemExit("error: a part crashed; its traceback is in the JSON and the log")


def main(argv: Sequence[str] | None = None) -> None:
    common.main(FLAGS, run, argv, child, positional=1)


if __name__ == "__main__":
    main()
