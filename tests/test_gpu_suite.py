"""The GPU suite (benchmarks/gpu_suite.sh), run here in its smoke mode as the GPU
machine runs it (through bash, the packages already importable, no wheels),
so that the script cannot rot between the rare GPU runs. No timing assertions:
the values only have to be sane."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_suite, gpu_suite_report
from benchmarks import gpu_suite_parts as parts
from tests.conftest import REPO, needs_torch

SCRIPT = REPO / "benchmarks" / "gpu_suite.sh"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run, its jobs in one process (``--in_process``; the memory job and the
    section render still in their own): its output folder and its JSON. The budget is
    generous against the work (about 2 min on 2 cores) so that load cannot cut it."""
    tmp = tmp_path_factory.mktemp("gpu_suite")
    out = tmp / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    cache = tmp_path_factory.getbasetemp() / "benchmark_cache"  # as tests/test_benchmarks.py
    args = ["--smoke", "--in_process", "--cache_dir", str(cache), "--num_workers", "0",
            "--budget_s", "1500"]  # fmt: skip
    proc = subprocess.run(["bash", str(SCRIPT), str(out), *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=1800, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, json.loads((out / gpu_suite.JSON_NAME).read_text())


def _positive_rate(summary: dict) -> bool:
    return summary["median"] > 0 and 0 < summary["min"] <= summary["max"]


@pytest.mark.slow
@needs_torch  # the smoke run trains the PyTorch baseline too
def test_smoke_reports_every_part(smoke):
    _, report = smoke
    assert report["mode"] == "smoke"
    done = report["parts"]
    assert list(done) == [p.name for p in gpu_suite.PARTS]
    for p in gpu_suite.PARTS:
        want = "pending" if p.run is None else "ok"
        assert done[p.name]["status"] == want, (p.name, done[p.name])
    assert done["prepare"]["train_images"] > 0


@pytest.mark.slow
@needs_torch  # the smoke run trains the PyTorch baseline too
def test_smoke_training_rates_loader_share_and_mfu_are_sane(smoke):
    _, report = smoke
    sizes = parts.SMOKE
    train = report["parts"]["train_throughput"]["results"]
    assert list(train) == list(sizes.train)
    for key, r in train.items():
        assert "error" not in r, (key, r)
        assert r["batch"] == int(key.split("@")[1])
        assert _positive_rate(r["end_to_end"]["images_per_s"])
        assert _positive_rate(r["model_only"]["images_per_s"])
        assert 0 < r["mfu"]["model_only"] < 1 and 0 < r["mfu"]["end_to_end"] < 1, key
        assert r["mfu"]["step_flops"] > 0
    assert train["torch@12"]["num_workers"] == 0  # the study's loader: no workers
    assert train["torch_tuned@24"]["num_workers"] == train["stagejax@24"]["num_workers"] == 0
    share = report["parts"]["loader_share"]["results"]
    assert set(share) == {k for k in sizes.train if k.startswith("stagejax")}
    for r in share.values():
        assert 0 <= r["loader_wait_fraction"] <= 1 and 0 <= r["end_to_end_slowdown"] <= 1
    mfu = report["parts"]["mfu"]["results"]
    assert set(mfu) == set(sizes.train)
    ratios = report["parts"]["train_throughput"]["ratios"]
    assert ratios["stagejax@24/torch@12 end_to_end"] > 0
    assert all(t["value"] is not None for t in report["targets"])


@pytest.mark.slow
@needs_torch  # the smoke run trains the PyTorch baseline too
def test_smoke_prediction_with_and_without_tta(smoke):
    _, report = smoke
    pred = report["parts"]["predict"]["results"]
    assert set(pred) == {"stagejax", "stagejax_tta", "torch", "torch_channels_last"}
    for name, r in pred.items():
        assert "error" not in r, (name, r)
        assert r["images_per_s"] > 0
    assert (pred["stagejax"]["views"], pred["stagejax_tta"]["views"]) == (1, 8)


@pytest.mark.slow
@needs_torch  # the smoke run trains the PyTorch baseline too
def test_smoke_training_feeds_memory_and_section_are_sane(smoke):
    _, report = smoke
    done = report["parts"]
    feeds = done["data_on_device"]["results"]
    assert set(feeds) == {"grain", "on_device"}
    for r in feeds.values():
        assert r["images_per_s"] > 0 and 0 <= r["loader_wait_fraction"] <= 1
    assert done["data_on_device"]["batch"] == parts.SMOKE.feed_batch
    pairs = gpu_suite_report.memory_pairs(report)
    assert set(pairs) == set(parts.SMOKE.memory_batches)
    for off, on in pairs.values():
        assert "error" not in off and "error" not in on, (off, on)
        assert 0 < on["temp_bytes"] < off["temp_bytes"]
        assert on["step_s"]["median"] > 0 and off["step_s"]["median"] > 0
        assert "cse_barrier_expander" in on["xla_flags"]  # as stagejax.main sets it
    render = done["section_render"]
    assert render["section_px"][0] > 0 and render["render_s"] > 0
    passes = done["section"]["results"]
    first = passes["first_pass"]
    assert first["tubules"] > 0 and first["tubules_per_second"] > 0
    assert first["total_seconds"] >= first["seconds"]["stage"] > 0
    values = {t["target"]: t["value"] for t in report["targets"]}
    assert all(v is not None for v in values.values()), values


@pytest.mark.slow
@needs_torch  # the smoke run trains the PyTorch baseline too
def test_smoke_markdown_lists_every_part_and_the_log_is_kept(smoke):
    out, report = smoke
    text = (out / gpu_suite.MARKDOWN_NAME).read_text()
    assert text == gpu_suite_report.markdown(report)
    assert "SMOKE MODE" in text
    for p in gpu_suite.PARTS:
        assert f"| {p.name} | {report['parts'][p.name]['status']} |" in text
    for heading in (
        "## Targets",
        "## Training throughput",
        "## Loader share",
        "## Training feeds",
        "## Train-step memory",
        "## Prediction",
        "## Section staging",
    ):
        assert heading in text
    assert "MFU model only" in text
    for t in report["targets"]:
        assert f"| {t['target']} |" in text
    assert "part predict" in (out / "gpu_suite.log").read_text()


def test_script_refuses_a_missing_output_folder_argument():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "usage" in proc.stderr


def _report_so_far() -> dict:
    return {
        "mode": "gpu",
        "date": "d",
        "command": "c",
        "budget_s": 520,
        "setup_s": 10,
        "num_workers": 14,
        "sizes": dataclasses.asdict(parts.GPU),
        "machine": {"cpu": "x", "cpu_count": 16, "gpu": None, "versions": {"jax": "0"}},
        "parts": {p.name: {"status": "waiting"} for p in gpu_suite.PARTS},
    }


def test_markdown_and_targets_of_a_run_cut_short():
    report = _report_so_far()
    report["parts"]["prepare"] = {"status": "failed", "error": "timed out after 90 s"}
    report["parts"]["train_throughput"] = {"status": "running", "rounds": {"stagejax@48": [{}]}}
    report["targets"] = rows = gpu_suite_report.targets(report)
    text = gpu_suite_report.markdown(report)
    assert "| prepare | failed | n/a | error: timed out after 90 s |" in text
    assert "stagejax@48: 1 round(s) done" in text
    assert len(rows) == 4 + 1 + 2 * len(parts.GPU.memory_batches) + 1 + 1
    assert [t["met"] for t in rows] == [None] * len(rows)
    assert "| section (study-scale px) staged end to end" in text
    assert text.count("| not measured |") == len(rows)


def test_part_deadlines_leave_the_later_parts_their_floors(monkeypatch):
    monkeypatch.setattr(gpu_suite.time, "monotonic", lambda: 1000.0)
    ctx = parts.Context(parts.GPU, "", 1, deadline=1300.0, report=_report_so_far())
    names = [p.name for p in gpu_suite.PARTS]
    train, last = names.index("train_throughput"), len(names) - 1
    later = sum(p.floor_s for p in gpu_suite.PARTS[train + 1 :] if p.run and not p.derived)
    assert later > 0
    assert gpu_suite.part_deadline(train, ctx) == min(
        1000 + gpu_suite.PARTS[train].cap_s, 1300 - later
    )
    assert gpu_suite.part_deadline(last, ctx) == min(1000 + gpu_suite.PARTS[last].cap_s, 1300)
    ctx.deadline = 1030.0  # little left: the cap gives way to the run's deadline
    assert gpu_suite.part_deadline(last, ctx) == 1030.0


def test_gpu_budget_caps_fit_the_run():
    """The parts' caps, with the wheel install and start-up, inside the 540 s a GPU
    command may take; the floors inside the budget."""
    runs = [p for p in gpu_suite.PARTS if p.run and not p.derived]
    assert parts.GPU.budget_s <= 520
    assert sum(p.cap_s for p in runs) <= parts.GPU.budget_s - 25
    assert sum(p.floor_s for p in runs) <= parts.GPU.budget_s - 30


def test_section_without_its_render_reports_an_error(tmp_path):
    deadline = gpu_suite.time.monotonic() + 60
    ctx = parts.Context(parts.SMOKE, str(tmp_path), 1, deadline, _report_so_far())
    out = parts.section(ctx, ctx.deadline)
    assert out == {"error": "no section: section_render did not run"}
    assert gpu_suite_report.status_of("section", out) == "failed"


def test_status_of_parts():
    ok, bad = {"images_per_s": 1.0}, {"error": "x"}
    assert gpu_suite_report.status_of("predict", {"results": {"a": ok, "b": ok}}) == "ok"
    assert gpu_suite_report.status_of("predict", {"results": {"a": ok, "b": bad}}) == "partial"
    assert gpu_suite_report.status_of("predict", {"results": {"a": bad}}) == "failed"
    assert gpu_suite_report.status_of("prepare", {"error": "x"}) == "failed"


def test_a_crashing_part_keeps_its_traceback_and_the_later_parts_run(monkeypatch, tmp_path):
    def broken(ctx, deadline):
        raise KeyError("bug")

    def fine(ctx, deadline):
        return {"results": {"x": {"images_per_s": 1.0}}}

    monkeypatch.setattr(
        gpu_suite,
        "PARTS",
        (
            gpu_suite.Part("a", broken, cap_s=10),
            gpu_suite.Part("b", fine, cap_s=10),
            gpu_suite.Part("c", None, pending="later"),
        ),
    )
    report = {**_report_so_far(), "parts": {n: {"status": "waiting"} for n in "abc"}}
    deadline = gpu_suite.time.monotonic() + 60
    ctx = parts.Context(parts.SMOKE, "", 1, deadline, report, gpu_suite.writer(tmp_path))
    gpu_suite.run_parts(ctx)
    written = json.loads((tmp_path / gpu_suite.JSON_NAME).read_text())["parts"]
    assert written["a"]["status"] == "crashed" and "KeyError: 'bug'" in written["a"]["traceback"]
    assert written["b"]["status"] == "ok" and written["c"] == {"status": "pending", "why": "later"}
    assert "| a | crashed |" in (tmp_path / gpu_suite.MARKDOWN_NAME).read_text()
