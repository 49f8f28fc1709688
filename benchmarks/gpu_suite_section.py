"""The GPU suite's section parts: render a SIMULATED section in the background, then
stage it end to end with the study's model (`benchmarks.section.time_section`).

Why in the background: the section simulator's main process renders the
interstitium, composites and encodes every tile itself; only the tubules go to
worker processes. On 2 cores a study-scale section took 93 s wall for 153 s of
CPU, and a profile of a smaller one put about 40% of the CPU in the tubule
workers, so more workers cannot bring it much under the main process's time:
rendering it in ``prepare`` would cost about a sixth of the GPU run. So
``section_render`` starts it after the parts that time the host loader
(``train_throughput``, ``data_on_device``) and it renders while the device-bound
parts run; ``section`` waits for it (the time waited is recorded) and stages it.

    python -m benchmarks.gpu_suite_section --child JOB    # the suite's children
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import common

if TYPE_CHECKING:
    from benchmarks.gpu_suite import Context

MODULE = "benchmarks.gpu_suite_section"
SEED = 1000  # benchmarks.section's timing section
RENDER = "section_render"


@dataclasses.dataclass
class Background:
    """A child that runs beside the suite's parts; its result line goes to a file."""

    proc: subprocess.Popen
    result_path: Path
    started: float  # time.monotonic()

    def wait(self, deadline: float) -> dict:
        """Its result, or an error once ``deadline`` passes (the child is then killed)."""
        try:
            self.proc.wait(timeout=max(0.0, common.time_left(deadline)))
        except subprocess.TimeoutExpired:
            self.kill()
            return {"error": f"not done at the part's deadline, {self.age():.0f} s after its start"}
        self.kill()  # its worker processes, if any are left
        lines = self.result_path.read_text().splitlines()
        for line in reversed(lines):
            if line.startswith(common.RESULT_PREFIX):
                return json.loads(line[len(common.RESULT_PREFIX) :])
        return {"error": f"exit code {self.proc.returncode}, no result (its log is the suite's)"}

    def age(self) -> float:
        return time.monotonic() - self.started

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def start_child(job: dict, result_path: Path) -> Background:
    """``python -m benchmarks.gpu_suite_section --child JOB`` in its own process group,
    its stderr into the suite's log."""
    result_path.parent.mkdir(parents=True, exist_ok=True)
    with open(result_path, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", MODULE, "--child", json.dumps(job)],
            cwd=common.REPO,
            env={**os.environ, "PYTHONPATH": common.child_pythonpath()},
            stdout=out,
            process_group=0,
        )
    return Background(proc, result_path, time.monotonic())


def section_render(ctx: Context, _deadline: float) -> dict:
    """Start rendering the section (``section`` collects it)."""
    s = ctx.sizes
    job = {
        "part": "render",
        "out": str(
            Path(ctx.cache_dir) / "section" / f"seed{SEED}_{s.section_mm[0]}x{s.section_mm[1]}mm"
        ),
        "size_mm": list(s.section_mm),
        "num_workers": s.render_workers,
    }
    ctx.background[RENDER] = start_child(job, Path(ctx.cache_dir) / "section_render.out")
    where = {k: v for k, v in job.items() if k != "part"}
    return {"status": "started", **where, "why": "rendering in the background (see section)"}


def render_child(job: dict) -> dict:
    """Render (or reuse) the section; its size and the seconds it took."""
    from stagejax.simulate import section as section_sim

    out = Path(job["out"])
    t0 = time.monotonic()
    cached = (out / "section.tif").exists()
    if not cached:
        section_sim.render_section(
            out, SEED, size_mm=tuple(job["size_mm"]), num_workers=job["num_workers"]
        )
    meta = json.loads((out / "SIMULATED.json").read_text())
    return {
        "path": str(out / "section.tif"),
        "render_s": time.monotonic() - t0,
        "cached": cached,
        "section_px": meta["size_px"],
        "size_mm": meta["size_mm"],
        "tubules_drawn": meta["tubules"],
        "num_workers": job["num_workers"],
    }


def _collect_render(ctx: Context, deadline: float) -> dict:
    """The render's result, recorded in its own part; ``{"error": ...}`` if none."""
    bg = ctx.background.pop(RENDER, None)
    if bg is None:
        return {"error": "section_render did not run"}
    t0 = time.monotonic()
    out = bg.wait(deadline)
    entry = ctx.part(RENDER)
    entry.pop("why", None)
    entry.update(
        out, status="failed" if "error" in out else "ok", waited_for_s=time.monotonic() - t0
    )
    ctx.save()
    return out


def section(ctx: Context, deadline: float) -> dict:
    """Stage the rendered section with the suite's model at its crop (random weights)."""
    s = ctx.sizes
    render = _collect_render(ctx, deadline)
    if "error" in render:
        return {"error": f"no section: {render['error']}"}
    cap = min(s.child_cap_s["section"], common.time_left(deadline))
    job = {
        "part": "stage",
        "path": render["path"],
        "model": s.model,
        "crop_size": s.crop_size,
        "image_size": s.image_size,
        "precision": s.precision,
        "budget_s": cap - 10.0,
    }
    out = common.run_child_capped(MODULE, job, cap, deadline, min_s=20)
    if "first_pass" not in out:
        return {"error": out.get("error") or out.get("skipped")}
    passes = {k: out.pop(k) for k in ("first_pass", "second_pass") if k in out}
    return {
        "results": passes,
        "section_px": render["section_px"],
        "size_mm": render["size_mm"],
        **out,
    }


def stage_child(job: dict) -> dict:
    """A stage model of random weights, then the section staged once (the eval step
    compiles in it) and, where the time allows, once more (compiled). XLA:CPU flags
    as stagejax sets them."""
    xla = common.stagejax_xla_defaults()  # before JAX starts
    import jax

    from benchmarks import section as bench

    deadline = time.perf_counter() + job["budget_s"]
    path = Path(job["path"])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sm, config = bench.study_model(
            Path(tmp),
            model=job["model"],
            crop_size=job["crop_size"],
            image_size=job["image_size"],
            precision=job["precision"],
        )
        out = {
            "model": job["model"],
            "crop_size": job["crop_size"],
            "precision": job["precision"],
            "eval_batch": sm.batch_size,
            "model_setup_s": time.perf_counter() - t0,
            "device": f"{jax.default_backend()}: {jax.devices()[0].device_kind}",
            "xla_flags": xla,
        }
        out["first_pass"] = bench.time_section(path, sm, config)
        if deadline - time.perf_counter() > 1.2 * out["first_pass"]["total_seconds"]:
            out["second_pass"] = bench.time_section(path, sm, config)
    return out


CHILDREN = {"render": render_child, "stage": stage_child}


def main(argv: list[str] | None = None) -> None:
    common.child_main(CHILDREN, argv)


if __name__ == "__main__":
    main()
