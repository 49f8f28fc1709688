"""The GPU suite's two modes (`Sizes`), what its parts share (`Context`), and the
measuring parts (`benchmarks.gpu_suite` runs them in order; its docstring says how
the GPU budget is split).

Each part is ``part(ctx, deadline) -> dict`` and runs its measurements in child
processes (``python -m benchmarks.gpu_suite --child JOB`` for the jobs of
`CHILDREN`, or another benchmark's children), so that a crash or a time-out costs
only that child's numbers.

Why the section renders in the background: the section simulator's main process
renders the interstitium, composites and encodes every tile itself; only the
tubules go to worker processes. On 2 cores a study-scale section took 93 s wall for
153 s of CPU, so rendering it in ``prepare`` would cost about a sixth of the GPU
run. ``section_render`` starts it after the parts that time the host loader and it
renders while the device-bound parts run; ``section`` waits for it (the time waited
is recorded) and stages it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import common, memory, predict_speed, throughput, throughput_report

MODULE = "benchmarks.gpu_suite"  # the children run through the suite's command line
FEED_SEED = 109  # the throughput children's seed: the same compiled step (and cache entry)
EXIT_MARGIN_S = 10.0  # a child that times itself stops this long before its cap
SECTION_SEED = 1000  # benchmarks.section's timing section
RENDER = "section_render"


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
    # data_on_device: batch (the headline stagejax batch: the same compiled step),
    # timed steps per round, rounds, warm-up steps per round
    feed_batch: int
    feed_batches: int
    feed_trials: int
    feed_warmup: int
    memory_batches: tuple[int, ...]  # memory_remat, in running order
    memory_steps: int
    memory_per_process: bool  # one child per configuration (peaks on a GPU do not mix)
    section_mm: tuple[float, float]
    render_workers: int  # the section simulator's tubule processes
    child_cap_s: dict[str, float]  # per framework, and per part's child
    budget_s: float  # whole run, counted from the shell script's start

    @property
    def image_size(self) -> int:
        return self.crop_size + 2 * self.crop_range


GPU = Sizes(
    mode="gpu", model="resnet50", crop_size=896, crop_range=128, num_images=96,
    train=("stagejax@48", "torch@12", "torch_tuned@48", "stagejax@12"),
    headline={"stagejax": "stagejax@48", "study": "torch@12", "tuned": "torch_tuned@48"},
    steps=30, warmup=5, window=5, rounds=1, precision="bfloat16", torch_compile="on",
    predict_batch=64, predict_steps=5, predict_warmup=2,
    feed_batch=48, feed_batches=10, feed_trials=2, feed_warmup=2,
    memory_batches=(12, 48), memory_steps=5, memory_per_process=True,
    section_mm=(4.4, 3.5),  # the study's scale: 20,275 x 16,128 px
    render_workers=4,
    child_cap_s={"stagejax": 70, "torch": 45, "torch_tuned": 110, "predict": 30, "feed": 70,
                 "memory": 45, "section": 70},
    budget_s=520,
)  # fmt: skip
SMOKE = Sizes(
    mode="smoke", model="resnet18", crop_size=32, crop_range=4, num_images=36,
    train=("stagejax@24", "torch@12", "torch_tuned@24"),
    headline={"stagejax": "stagejax@24", "study": "torch@12", "tuned": "torch_tuned@24"},
    steps=1, warmup=0, window=1, rounds=1, precision="float32", torch_compile="off",
    predict_batch=2, predict_steps=1, predict_warmup=1,
    feed_batch=24, feed_batches=1, feed_trials=1, feed_warmup=1,
    memory_batches=(12,), memory_steps=1, memory_per_process=False,
    section_mm=(0.8, 0.6), render_workers=1,
    child_cap_s=dict.fromkeys(("stagejax", "torch", "torch_tuned", "predict", "feed", "memory",
                               "section"), 600),
    budget_s=1500,
)  # fmt: skip


@dataclasses.dataclass
class Context:
    """What the parts share: sizes, paths, the run's deadline and every result so far.
    ``on_save(report)`` rewrites the suite's JSON and markdown (after every child)."""

    sizes: Sizes
    cache_dir: str
    num_workers: int
    deadline: float  # time.monotonic()
    report: dict
    on_save: Callable[[dict], None] = lambda report: None
    data_dir: str = ""
    background: dict[str, common.Child] = dataclasses.field(default_factory=dict)

    def save(self) -> None:
        self.on_save(self.report)

    def part(self, name: str) -> dict:
        return self.report["parts"][name]

    def stop_background(self) -> None:
        """End the children nothing collected (the part that would was cut or not run)."""
        for name, child in self.background.items():
            child.kill()
            self.part(name).update(status="stopped", why="ended with the run: nothing used it")
        self.background.clear()


# --- the parts ------------------------------------------------------------------------------


def prepare(ctx: Context, deadline: float) -> dict:
    s = ctx.sizes
    job = {"part": "prepare", "num_images": s.num_images, "image_size": s.image_size,
           "crop_size": s.crop_size, "crop_range": s.crop_range, "cache_dir": ctx.cache_dir,
           "render_workers": os.cpu_count() or 1}  # fmt: skip
    out = common.run_child_capped(MODULE, job, deadline - time.monotonic(), deadline)
    ctx.data_dir = out.get("data_dir", "")
    return out


def _train_job(ctx: Context) -> dict:
    """What every stagejax training child of the suite is built from."""
    s = ctx.sizes
    return {"model": s.model, "image_size": s.crop_size, "crop_range": s.crop_range,
            "precision": s.precision, "num_workers": ctx.num_workers, "seed": FEED_SEED,
            "data_dir": ctx.data_dir, "cache_dir": ctx.cache_dir}  # fmt: skip


def train_throughput(ctx: Context, deadline: float) -> dict:
    s = ctx.sizes
    specs = throughput.parse_specs(",".join(s.train), global_batch=12)
    job = {**_train_job(ctx), "steps": s.steps, "warmup": s.warmup, "window": s.window,
           "torch_compile": s.torch_compile, "flops": True, "profile_repeats": 1}  # fmt: skip
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


def data_on_device(ctx: Context, deadline: float) -> dict:
    """Issue 15 point 3: the Grain feed against the training split kept on the
    devices, through the trainer's own step, in one process, interleaved."""
    s = ctx.sizes
    cap = min(s.child_cap_s["feed"], common.time_left(deadline))
    job = {**_train_job(ctx), "part": "feeds", "global_batch": s.feed_batch,
           "trials": s.feed_trials, "num_batches": s.feed_batches, "warmup": s.feed_warmup,
           "budget_s": cap - EXIT_MARGIN_S}  # fmt: skip
    out = common.run_child_capped(MODULE, job, cap, deadline, min_s=20)
    if "paths" not in out:
        return {"error": out.get("error") or out.get("skipped")}
    return {"results": out.pop("paths"), **out}


def _memory_jobs(s: Sizes) -> list[dict]:
    return [{"model": s.model, "size": s.crop_size, "precision": s.precision, "remat": remat,
             "batch": batch, "time_steps": s.memory_steps}
            for batch in s.memory_batches for remat in (False, True)]  # fmt: skip


def memory_remat(ctx: Context, deadline: float) -> dict:
    """Issue 15 point 1: `benchmarks.memory`'s children, remat off and on per batch
    (the study's first), each in its own process so that peaks do not mix; XLA_FLAGS
    as ``stagejax.main`` sets them (the cse_barrier flag with remat, on any backend).
    Smoke mode (a CPU: no peak to mix) runs them in one child, flag set, to save a
    start-up."""
    s, jobs = ctx.sizes, _memory_jobs(ctx.sizes)
    names = [f"{memory.key(j)}/batch={j['batch']}" for j in jobs]
    results: dict[str, dict] = {}
    if not s.memory_per_process:
        cap = s.child_cap_s["memory"] * len(jobs)
        job = {"part": "memory", "jobs": jobs}
        out = common.run_child_capped(MODULE, job, cap, deadline, 20, memory.child_env(True))
        outs = out.get("results") or [{"error": out.get("error") or out.get("skipped")}] * len(jobs)
        results = {n: {"job": j, **o} for n, j, o in zip(names, jobs, outs, strict=True)}
        return {"results": results, "batches": list(s.memory_batches)}
    for name, job in zip(names, jobs, strict=True):
        out = common.run_child_capped(memory.MODULE, job, s.child_cap_s["memory"], deadline,
                                      min_s=20, env=memory.child_env(job["remat"]))  # fmt: skip
        if "skipped" in out:
            out = {"error": f"not run: {out.pop('skipped')}"}
        results[name] = {"job": job, **out}
        ctx.part("memory_remat")["results"] = results
        ctx.save()
    return {"results": results, "batches": list(s.memory_batches)}


def predict(ctx: Context, deadline: float) -> dict:
    s = ctx.sizes
    job = {"model": s.model, "image_size": s.crop_size, "batch": s.predict_batch,
           "steps": s.predict_steps, "warmup": s.predict_warmup, "seed": 0,
           "precision": "auto"}  # fmt: skip
    part = ctx.part("predict")

    def partial(name: str, out: dict) -> None:
        part.setdefault("results", {})[name] = out
        ctx.save()

    names = list(predict_speed.FRAMEWORKS)
    results = predict_speed.measure(names, job, s.child_cap_s["predict"], deadline, partial)
    return {"results": results, "ratios": predict_speed.ratios(results)}


def section_render(ctx: Context, _deadline: float) -> dict:
    """Start rendering the section (``section`` collects it)."""
    s = ctx.sizes
    name = f"seed{SECTION_SEED}_{s.section_mm[0]}x{s.section_mm[1]}mm"
    job = {"part": "render", "out": str(Path(ctx.cache_dir) / "section" / name),
           "size_mm": list(s.section_mm), "num_workers": s.render_workers}  # fmt: skip
    ctx.background[RENDER] = common.Child(MODULE, job)
    where = {k: v for k, v in job.items() if k != "part"}
    return {"status": "started", **where, "why": "rendering in the background (see section)"}


def _collect_render(ctx: Context, deadline: float) -> dict:
    """The render's result, recorded in its own part; ``{"error": ...}`` if none."""
    child = ctx.background.pop(RENDER, None)
    if child is None:
        return {"error": "section_render did not run"}
    t0 = time.monotonic()
    out = child.wait(max(0.0, common.time_left(deadline)))
    entry = ctx.part(RENDER)
    entry.pop("why", None)
    status = "failed" if "error" in out else "ok"
    entry.update(out, status=status, waited_for_s=time.monotonic() - t0)
    ctx.save()
    return out


def section(ctx: Context, deadline: float) -> dict:
    """Stage the rendered section with the suite's model at its crop (random weights)."""
    s = ctx.sizes
    render = _collect_render(ctx, deadline)
    if "error" in render:
        return {"error": f"no section: {render['error']}"}
    cap = min(s.child_cap_s["section"], common.time_left(deadline))
    job = {"part": "stage", "path": render["path"], "model": s.model, "crop_size": s.crop_size,
           "image_size": s.image_size, "precision": s.precision,
           "budget_s": cap - EXIT_MARGIN_S}  # fmt: skip
    out = common.run_child_capped(MODULE, job, cap, deadline, min_s=20)
    if "first_pass" not in out:
        return {"error": out.get("error") or out.get("skipped")}
    passes = {k: out.pop(k) for k in ("first_pass", "second_pass") if k in out}
    return {"results": passes, "section_px": render["section_px"], "size_mm": render["size_mm"],
            **out}  # fmt: skip


# --- the children (python -m benchmarks.gpu_suite --child JOB) -----------------------------------


def prepare_child(job: dict) -> dict:
    """Render (or reuse) the simulated images and build the ArrayRecord cache."""
    from stagejax import datasets as data_lib

    t0 = time.monotonic()
    root = common.simulated_root(job["num_images"], job["image_size"], cache_dir=job["cache_dir"],
                                 num_workers=job["render_workers"])  # fmt: skip
    render_s = time.monotonic() - t0
    config = common.stagejax_config(data_dir=str(root), cache_dir=job["cache_dir"],
                                    crop_size=job["crop_size"],
                                    crop_range=job["crop_range"])  # fmt: skip
    dataset = data_lib.load(config)
    return {"data_dir": str(root), "num_images": job["num_images"],
            "image_size": job["image_size"], "render_workers": job["render_workers"],
            "render_s": render_s, "cache_s": time.monotonic() - t0 - render_s,
            "train_images": len(dataset.splits["train"].labels)}  # fmt: skip


def feed_child(job: dict) -> dict:
    """Both training feeds of the prepared dataset (`loader.compare_feeds`), with the
    XLA:CPU flags the throughput children use."""
    xla = common.stagejax_xla_defaults()  # before JAX starts
    from benchmarks import loader
    from stagejax.data import on_device

    deadline = time.perf_counter() + job["budget_s"]
    config, run = throughput_report.build_run(job)
    config.data_on_device = "true"  # read when the run first asks (`Run.data_on_device`)
    split = run.dataset.splits["train"]
    out = loader.compare_feeds(run, split, job["trials"], job["num_batches"],
                               warmup=job["warmup"], deadline=deadline)  # fmt: skip
    return {**out, "batch": config.global_batch_size, "train_images": len(split.labels),
            "timed_steps_per_round": job["num_batches"],
            "resident_bytes": on_device.resident_bytes(run.data_on_device.sizes),
            "decision": run.data_on_device.reason, "xla_flags": xla,
            "device": common.device_of_jax()}  # fmt: skip


def memory_child(job: dict) -> dict:
    """Several `benchmarks.memory` configurations in one process (smoke mode)."""
    return {"results": [memory.child(j) for j in job["jobs"]]}


def render_child(job: dict) -> dict:
    """Render (or reuse) the section; its size and the seconds it took."""
    from stagejax.simulate import section as section_sim

    out = Path(job["out"])
    t0 = time.monotonic()
    cached = (out / "section.tif").exists()
    if not cached:
        section_sim.render_section(out, SECTION_SEED, size_mm=tuple(job["size_mm"]),
                                   num_workers=job["num_workers"])  # fmt: skip
    meta = json.loads((out / "SIMULATED.json").read_text())
    return {"path": str(out / "section.tif"), "render_s": time.monotonic() - t0,
            "cached": cached, "section_px": meta["size_px"], "size_mm": meta["size_mm"],
            "tubules_drawn": meta["tubules"], "num_workers": job["num_workers"]}  # fmt: skip


def stage_child(job: dict) -> dict:
    """A stage model of random weights, then the section staged once (the eval step
    compiles in it) and, where the time allows, once more (compiled). XLA:CPU flags
    as stagejax sets them."""
    xla = common.stagejax_xla_defaults()  # before JAX starts
    from benchmarks import section as bench

    deadline = time.perf_counter() + job["budget_s"]
    path = Path(job["path"])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sm = bench.study_model(Path(tmp), model=job["model"], crop_size=job["crop_size"],
                               image_size=job["image_size"],
                               precision=job["precision"])  # fmt: skip
        out = {"model": job["model"], "crop_size": job["crop_size"],
               "precision": job["precision"], "eval_batch": sm.batch_size,
               "model_setup_s": time.perf_counter() - t0, "device": common.device_of_jax(),
               "xla_flags": xla}  # fmt: skip
        out["first_pass"] = bench.time_section(path, sm)
        if deadline - time.perf_counter() > 1.2 * out["first_pass"]["total_seconds"]:
            out["second_pass"] = bench.time_section(path, sm)
    return out


CHILDREN = {"prepare": prepare_child, "feeds": feed_child, "memory": memory_child,
            "render": render_child, "stage": stage_child}  # fmt: skip


def child(job: dict) -> dict:
    return CHILDREN[job["part"]](job)
