"""The GPU suite (benchmarks/gpu_suite.sh), run here in its smoke mode as the GPU
machine runs it (through bash, the packages already importable, no wheels),
so that the script cannot rot between the rare GPU runs. No timing assertions:
the values only have to be sane."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_suite
from benchmarks import gpu_suite_report as gpu_report
from tests.conftest import REPO, needs_torch

SCRIPT = REPO / "benchmarks" / "gpu_suite.sh"
NAMES = [name for name, *_ in gpu_suite.PARTS]
SMOKE = gpu_suite.MODES["smoke"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run, its jobs in one process (``--in_process``; the memory jobs and the
    section render still in their own): its output folder and its JSON. The budget is
    generous against the work (about 2 min on 2 cores) so that load cannot cut it."""
    tmp = tmp_path_factory.mktemp("gpu_suite")
    out = tmp / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    cache = (
        tmp_path_factory.getbasetemp() / "benchmark_cache"
    )  # as tests/test_benchmark_commands.py
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
    assert report["mode"] == "smoke" and list(report["parts"]) == NAMES
    for name, entry in report["parts"].items():
        assert entry["status"] == "ok", (name, entry)
    assert report["parts"]["prepare"]["render_s"] >= 0
    assert "--started_at" not in report["command"] and "--smoke" in report["command"]


@pytest.mark.slow
@needs_torch  # the smoke run trains the PyTorch baseline too
def test_smoke_training_rates_loader_share_and_mfu_are_sane(smoke):
    _, report = smoke
    train = report["parts"]["train_throughput"]["results"]
    assert list(train) == SMOKE["train"].split(",")
    for key, r in train.items():
        assert "error" not in r, (key, r)
        assert r["batch"] == int(key.split("@")[1])
        assert _positive_rate(r["end_to_end"]["images_per_s"])
        assert _positive_rate(r["model_only"]["images_per_s"])
        assert 0 < r["mfu"]["model_only"] < 1 and 0 < r["mfu"]["end_to_end"] < 1, key
        assert r["mfu"]["step_flops"] > 0 and 0 <= r["end_to_end"]["loader_wait_fraction"] <= 1
    assert train["torch@12"]["num_workers"] == 0  # the study's loader: no workers
    assert train["torch_tuned@24"]["num_workers"] == train["stagejax@24"]["num_workers"] == 0
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
    assert done["data_on_device"]["batch"] == SMOKE["batch"]
    for batch in SMOKE["memory_batches"]:
        off, on = gpu_report.memory_pair(report, batch)
        assert "error" not in off and "error" not in on, (off, on)
        assert 0 < on["temp_bytes"] < off["temp_bytes"]
        assert on["step_s"]["median"] > 0 and off["step_s"]["median"] > 0
        assert "cse_barrier_expander" in on["xla_flags"]  # as stagejax.main sets it
    render = done["section_render"]
    assert render["section_px"][0] > 0 and render["render_s"] > 0
    first = done["section"]["results"]["first_pass"]
    assert first["tubules"] > 0 and first["tubules_per_second"] > 0
    assert first["total_seconds"] >= first["seconds"]["stage"] > 0
    folder = done["section"]["folder"]  # three copies through --mode=section
    assert folder["slides"] == 3 and 0 < folder["seconds_per_further_slide"]
    values = {t["target"]: t["value"] for t in report["targets"]}
    assert all(v is not None for v in values.values()), values


@pytest.mark.slow
@needs_torch  # the smoke run trains the PyTorch baseline too
def test_smoke_markdown_lists_every_part_and_the_log_is_kept(smoke):
    out, report = smoke
    text = (out / gpu_suite.MARKDOWN_NAME).read_text()
    assert text == gpu_report.markdown(report)
    assert "SMOKE MODE" in text
    for name in NAMES:
        assert f"| {name} | {report['parts'][name]['status']} |" in text
    for heading in (
        "## Targets",
        "## Training throughput",
        "## Training feeds",
        "## Train-step memory",
        "## Prediction",
        "## Section staging",
    ):
        assert heading in text
    assert "MFU model only" in text and "| on_device |" in text and "| first_pass |" in text
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
        "sizes": gpu_suite.MODES["gpu"],
        "machine": {"cpu": "x", "cpu_count": 16, "gpu": None, "versions": {"jax": "0"}},
        "parts": {name: {"status": "waiting"} for name in NAMES},
    }


def test_markdown_and_targets_of_a_run_cut_short():
    report = _report_so_far()
    report["parts"]["prepare"] = {"status": "failed", "error": "timed out after 90 s"}
    report["parts"]["train_throughput"] = {"status": "running"}
    report["targets"] = rows = gpu_report.targets(report)
    text = gpu_report.markdown(report)
    assert "| prepare | failed | n/a | error: timed out after 90 s |" in text
    assert "| train_throughput | running | n/a |  |" in text
    assert len(rows) == 4 + 1 + 2 * len(gpu_suite.MODES["gpu"]["memory_batches"]) + 1 + 4
    assert [t["met"] for t in rows] == [None] * len(rows)
    assert "| section (study-scale px) staged end to end" in text
    assert text.count("| not measured |") == len(rows)


def _suite(tmp_path, mode: str, deadline: float, parts=NAMES) -> gpu_suite.Suite:
    report = {**_report_so_far(), "mode": mode, "parts": {n: {"status": "waiting"} for n in parts}}
    return gpu_suite.Suite(gpu_suite.MODES[mode], tmp_path, str(tmp_path), 1, deadline, report)


def test_part_deadlines_leave_the_later_parts_their_floors(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_suite.time, "monotonic", lambda: 1000.0)
    suite = _suite(tmp_path, "gpu", 1300.0)
    train, last = NAMES.index("train_throughput"), len(NAMES) - 1
    later = sum(floor for *_, floor in gpu_suite.PARTS[train + 1 :])
    assert later > 0
    cap = gpu_suite.PARTS[train][2]
    assert gpu_suite.part_deadline(train, suite) == min(1000 + cap, 1300 - later)
    assert gpu_suite.part_deadline(last, suite) == min(1000 + gpu_suite.PARTS[last][2], 1300)
    suite.deadline = 1030.0  # little left: the cap gives way to the run's deadline
    assert gpu_suite.part_deadline(last, suite) == 1030.0
    assert gpu_suite.part_deadline(train, _suite(tmp_path, "smoke", 1300.0)) == 1300.0


def test_gpu_budget_caps_fit_the_run():
    """The parts' caps, with the wheel install and start-up, inside the 540 s a GPU
    command may take; the floors inside the budget."""
    budget = gpu_suite.MODES["gpu"]["budget_s"]
    assert budget <= 520
    assert sum(cap for _, _, cap, _ in gpu_suite.PARTS) <= budget - 25
    assert sum(floor for *_, floor in gpu_suite.PARTS) <= budget - 30


def test_section_without_its_render_reports_an_error(tmp_path):
    suite = _suite(tmp_path, "smoke", gpu_suite.time.monotonic() + 60)
    out = gpu_suite.section(suite)
    assert out == {"error": "no section: section_render did not run"}
    assert gpu_suite.status_of(out) == "failed"


def test_status_of_parts():
    ok, bad = {"images_per_s": 1.0}, {"error": "x"}
    assert gpu_suite.status_of({"results": {"a": ok, "b": ok}}) == "ok"
    assert gpu_suite.status_of({"results": [ok, bad]}) == "partial"
    assert gpu_suite.status_of({"results": {"a": bad}}) == "failed"
    assert gpu_suite.status_of({"error": "x"}) == "failed"
    assert gpu_suite.status_of({"data_dir": "d"}) == "ok"


def test_a_crashing_part_keeps_its_traceback_and_the_later_parts_run(monkeypatch, tmp_path):
    def broken(suite):
        raise KeyError("bug")

    def fine(suite):
        return {"results": {"x": {"images_per_s": 1.0}}}

    def refused(suite):  # a benchmark's bad flag: its main exits
        raise SystemExit("error: --x")

    parts = (("prepare", broken, 10, 0), ("predict", fine, 10, 0), ("section", refused, 10, 0))
    monkeypatch.setattr(gpu_suite, "PARTS", parts)
    suite = _suite(tmp_path, "smoke", gpu_suite.time.monotonic() + 60, [p[0] for p in parts])
    gpu_suite.run_parts(suite)
    written = json.loads((tmp_path / gpu_suite.JSON_NAME).read_text())["parts"]
    assert written["prepare"]["status"] == "crashed"
    assert "KeyError: 'bug'" in written["prepare"]["traceback"]
    assert written["predict"]["status"] == "ok" and written["section"]["status"] == "crashed"
    text = (tmp_path / gpu_suite.MARKDOWN_NAME).read_text()
    assert "| prepare | crashed |" in text and "SystemExit: error: --x" in text
