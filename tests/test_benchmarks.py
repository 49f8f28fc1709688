"""The benchmarks' own logic: the shared helpers and child processes, throughput's
ratios, pooling and argument checks, prediction speed, memory and accuracy reports
(tests/test_torch_baseline.py: the PyTorch baseline; tests/test_benchmark_commands.py:
every command line run). No timing assertions."""

from __future__ import annotations

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import require_torch

# The benchmarks compare with the PyTorch baseline: their modules import torch.
torch, _ = require_torch()

from benchmarks import accuracy, common, machine, predict_speed, step_profile, throughput  # noqa: E402
from benchmarks import memory as memory_bench  # noqa: E402
from benchmarks import torch_baseline as tb  # noqa: E402

# --- common -----------------------------------------------------------------------------


def test_common_helpers():
    assert common.scaled_crop_range(896) == 128
    assert common.scaled_crop_range(64) == 9
    assert common.scaled_crop_range(1) == 1
    assert common.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    table = common.markdown_table(["a", "b"], [["x", 1.234], ["y", None]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x | 1.2 |", "| y | n/a |"]


def test_resnet_final_map_and_the_xla_cpu_shape_warning():
    sizes = {32: 1, 48: 2, 64: 2, 65: 3, 80: 3, 96: 3, 224: 7, 896: 28}
    assert {s: common.resnet_final_map(s) for s in sizes} == sizes
    log = logging.getLogger("test")
    assert "2-px layer4" in common.warn_slow_xla_cpu_shape("resnet18", 64, log)
    assert common.warn_slow_xla_cpu_shape("resnet50", 96, log) is None
    assert common.warn_slow_xla_cpu_shape("mobilenet_v3_small", 64, log) is None


def test_run_child_without_a_result_is_an_error_not_an_exception():
    out = common.run_child("benchmarks.common", {"x": 1}, timeout=60)
    assert "error" in out and "no result" in out["error"]


def test_run_child_reports_the_end_of_a_crash():
    out = common.run_child("benchmarks.gpu_suite", {"part": "render"}, timeout=120)
    assert "exit code 1" in out["error"] and "KeyError" in out["error"]


def test_an_in_process_job_runs_here_and_its_crash_is_an_error(monkeypatch):
    monkeypatch.setattr(common, "IN_PROCESS", True)
    out = common.run_child("benchmarks.gpu_suite", {"part": "render"})
    assert out["error"].startswith("in process:") and "KeyError" in out["error"]
    assert "error" in common.run_child("benchmarks.common", {}, env={"X": "1"})  # a process


def test_emit_is_what_run_child_reads(capsys):
    common.emit({"a": 1})
    line = capsys.readouterr().out.strip()
    assert line.startswith(common.RESULT_PREFIX)
    assert json.loads(line[len(common.RESULT_PREFIX) :]) == {"a": 1}


# --- throughput -------------------------------------------------------------------------


def fake_throughput(e2e: float, model: float, windows: int = 3) -> dict:
    def phase(rate):
        return throughput.phase_result([rate] * windows, [24 / rate] * windows)

    e = phase(e2e)
    e["loader_wait_fraction"] = 0.1
    return {
        "framework": "x",
        "precision": "float32",
        "num_workers": 0,
        "first_step_s": 2.0,
        "model_only": phase(model),
        "end_to_end": e,
        "peak_device_memory_mb": None,
        "peak_rss_mb": 100.0,
    }


def test_throughput_ratios_and_table():
    results = {
        "stagejax": fake_throughput(30, 60),
        "torch": fake_throughput(10, 20),
        "torch_tuned": {"error": "timed out after 5 s"},
    }
    ratio = throughput.ratios(results)
    assert ratio == {
        "stagejax/torch end_to_end": pytest.approx(3.0),
        "stagejax/torch model_only": pytest.approx(3.0),
    }
    text = throughput.markdown(results, ratio)
    assert "| torch_tuned | error: timed out after 5 s |" in text
    assert "3.00x" in text
    header, rule, *rows = text.split("\n\n")[0].splitlines()
    assert all(row.count("|") == header.count("|") for row in rows)


def test_throughput_table_says_what_torch_compile_did():
    r = {**fake_throughput(10, 20), "torch_compile": "failed, eager", "notes": ["Adam: fused"]}
    text = throughput.markdown({"torch_tuned": r}, {})
    assert "- torch_tuned: 1 round(s); torch.compile failed, eager; Adam: fused" in text


def test_throughput_pools_rounds_and_drops_failed_ones():
    a, b = fake_throughput(10, 20), fake_throughput(30, 40)
    b["first_step_s"], b["end_to_end"]["loader_wait_fraction"] = 4.0, 0.3
    pooled = throughput.pool_rounds([a, {"error": "boom"}, b])
    assert pooled["rounds"] == 2 and pooled["failed_rounds"] == ["boom"]
    assert pooled["end_to_end"]["images_per_s"] == {"median": 20.0, "min": 10.0, "max": 30.0}
    assert pooled["model_only"]["images_per_s"]["median"] == pytest.approx(30.0)
    assert pooled["first_step_s"] == pytest.approx(3.0)
    assert pooled["end_to_end"]["loader_wait_fraction"] == pytest.approx(0.2)
    assert throughput.pool_rounds([{"error": "x"}]) == {"error": "x"}


def test_throughput_timed_windows_cover_every_step():
    calls = []
    rates, times = throughput.timed_windows(lambda: calls.append(1), lambda _: None, 7, 3, 12)
    assert len(calls) == 7 and len(rates) == len(times) == 3


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--frameworks", "stagejax,jax"], "frameworks"),
        (["--frameworks", "torch,torch"], "frameworks"),
        (["--frameworks", ""], "frameworks"),
        (["--global_batch", "30"], "multiple of 12"),
        (["--study_batch", "6"], "study_batch"),
        (["--model", "vgg16"], "model"),
        (["--steps", "0"], "steps"),
        (["--image_size", "16"], "image_size"),
    ],
)
def test_throughput_refuses_bad_arguments(argv, match):
    args, _ = common.parse(throughput.FLAGS, ["t", *argv])
    with pytest.raises(ValueError, match=match):
        throughput.validate(args)


def test_throughput_frameworks_may_name_their_batch():
    specs = throughput.parse_specs("stagejax@48, torch,torch_tuned@24,stagejax@12", 36, 12)
    assert specs == [
        ("stagejax@48", "stagejax", 48),
        ("torch", "torch", 12),
        ("torch_tuned@24", "torch_tuned", 24),
        ("stagejax@12", "stagejax", 12),
    ]
    assert throughput.parse_specs("torch", 36) == [("torch", "torch", 36)]
    for bad, match in (
        ("stagejax@30", "multiple of 12"),
        ("stagejax@x", "NAME"),
        ("jax@12", "NAME"),
        ("torch@12,torch@12", "twice"),
    ):
        with pytest.raises(ValueError, match=match):
            throughput.parse_specs(bad, 12)


class FakeChild:
    """`common.Child` as a child that takes 20 s and reports 10 images/s per image of
    its batch; records (framework, batch, timeout) of each."""

    calls: list = []
    clock = {"t": 0.0}

    def __init__(self, module, job, env=None):
        self.job = job

    def wait(self, timeout=None):
        FakeChild.calls.append((self.job.get("framework"), self.job.get("global_batch"), timeout))
        FakeChild.clock["t"] += 20.0
        return fake_throughput(10.0 * self.job.get("global_batch", 1), 20.0)


def test_throughput_measure_interleaves_and_skips_rounds_that_do_not_fit(monkeypatch):
    FakeChild.calls, FakeChild.clock["t"] = [], 0.0
    monkeypatch.setattr(common, "Child", FakeChild)
    monkeypatch.setattr(common.time, "monotonic", lambda: FakeChild.clock["t"])
    monkeypatch.setattr(common, "DEADLINE", 70.0)
    specs = throughput.parse_specs("stagejax@24,torch@12", 12)
    results = throughput.measure(specs, {"x": 1}, rounds=2, cap_s=50.0)
    # Interleaved; each child capped by its cap and by the deadline; round 2 of torch
    # is left out: 10 s are left and its first round took 20.
    assert FakeChild.calls == [("stagejax", 24, 50.0), ("torch", 12, 50.0), ("stagejax", 24, 30.0)]
    assert results["stagejax@24"]["rounds"] == 2 and "skipped_rounds" not in results["stagejax@24"]
    assert results["torch@12"]["rounds"] == 1 and results["torch@12"]["skipped_rounds"] == 1
    assert results["stagejax@24"]["end_to_end"]["images_per_s"]["median"] == 240.0
    monkeypatch.setattr(common, "DEADLINE", FakeChild.clock["t"] + 1)
    late = throughput.measure(specs, {}, 1, 30.0)
    assert all(r["error"].startswith("not run: time budget") for r in late.values())


def test_add_mfu_uses_the_compiled_count_unless_it_is_implausible():
    def result(flops, hlo, device):
        r = {
            **fake_throughput(48.0, 96.0),
            "batch": 48,
            "device": device,
            "step_flops": flops,
            "step_flops_hlo": hlo,
            "flops_source": "compiled",
        }
        return r

    results = {
        "stagejax@48": result(1e13, 1.1e13, "gpu: NVIDIA H200"),
        "odd": result(1e9, 1e13, "gpu: NVIDIA H200"),
        "cpu": result(1e9, None, "cpu: cpu"),
        "none": fake_throughput(1, 1),
    }
    step_profile.add_mfu(results)
    m = results["stagejax@48"]["mfu"]
    # 96 images/s at batch 48 = 2 steps/s of 1e13 FLOPs over the H200's 790 TFLOP/s.
    assert m["model_only"] == pytest.approx(2e13 / 790e12)
    assert m["end_to_end"] == pytest.approx(1e13 / 790e12)
    assert m["flops_source"] == "compiled"
    assert results["odd"]["mfu"]["step_flops"] == 1e13
    assert "before optimisation" in results["odd"]["mfu"]["flops_source"]
    assert 0 < results["cpu"]["mfu"]["model_only"] < 1
    assert "mfu" not in results["none"]
    assert "GFLOP per step" in throughput.markdown(results, {})


def test_peak_flops_by_device():
    assert machine.peak_flops("gpu: NVIDIA H200")[0] == 790e12
    assert machine.peak_flops("cuda: NVIDIA H200")[0] == 790e12
    assert machine.peak_flops("cpu: cpu")[0] > 0
    assert machine.peak_flops("gpu: Some GPU")[0] is None


def test_xla_flops_counts_a_matmul():
    import jax

    from benchmarks.step_profile import xla_flops

    f = jax.jit(lambda a, b: a @ b)
    a = jnp.ones((32, 64))
    out = xla_flops(f, a, jnp.ones((64, 16)))
    assert out["step_flops"] == pytest.approx(2 * 32 * 64 * 16, rel=0.1)
    assert out["step_flops_hlo"] == pytest.approx(2 * 32 * 64 * 16, rel=0.1)


def test_throughput_accepts_profile_alone():
    args, _ = common.parse(throughput.FLAGS, ["t", "--frameworks=", "--profile"])
    assert throughput.validate(args) == []


# --- predict_speed ----------------------------------------------------------------------


def test_predict_speed_rates_and_ratios():
    r = predict_speed.rate_summary([2.0, 4.0, 1.0], batch=8)
    assert r["images_per_s"] == pytest.approx(4.0)
    assert (r["images_per_s_min"], r["images_per_s_max"]) == (2.0, 8.0)
    results = {
        "stagejax": {"images_per_s": 6.0},
        "torch": {"images_per_s": 3.0},
        "torch_channels_last": {"error": "x"},
    }
    assert predict_speed.ratios(results) == {"stagejax/torch": pytest.approx(2.0)}
    assert "error: x" in predict_speed.markdown({"torch_channels_last": {"error": "x"}}, {})


def test_predict_speed_ratios_leave_tta_out_and_measure_stops_at_the_deadline(monkeypatch):
    results = {
        "stagejax": {"images_per_s": 8.0},
        "stagejax_tta": {"images_per_s": 1.0},
        "torch": {"images_per_s": 4.0},
    }
    assert predict_speed.ratios(results) == {"stagejax/torch": pytest.approx(2.0)}
    FakeChild.calls = []
    monkeypatch.setattr(common, "Child", FakeChild)
    out = predict_speed.measure(["stagejax", "torch"], {}, cap_s=10)
    assert [c[0] for c in FakeChild.calls] == ["stagejax", "torch"]
    assert out["torch"]["wall_s"] >= 0 and FakeChild.calls[0][2] == 10
    monkeypatch.setattr(common, "DEADLINE", common.time.monotonic())
    out = predict_speed.measure(["stagejax"], {}, cap_s=10)
    assert out["stagejax"]["error"].startswith("not run: time budget")


def test_predict_speed_times_only_the_steps_after_warmup():
    calls = []
    out = predict_speed.time_batches(lambda: calls.append(1), warmup=3, steps=4)
    assert len(calls) == 1 + 2 + 4 and len(out["batch_s"]) == 4


def test_predict_speed_input_is_seeded_uint8():
    a = predict_speed.input_batch(2, 16, seed=3)
    assert a.dtype == np.uint8 and a.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(a, predict_speed.input_batch(2, 16, seed=3))


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--frameworks", "stagejax,tf"], "frameworks"),
        (["--model", "alexnet"], "model"),
        (["--batch", "0"], "batch"),
        (["--image_size", "8"], "image_size"),
    ],
)
def test_predict_speed_refuses_bad_arguments(argv, match):
    with pytest.raises(ValueError, match=match):
        predict_speed.validate(common.parse(predict_speed.FLAGS, ["p", *argv])[0])


# --- memory (remat) ---------------------------------------------------------------------


def test_memory_jobs_pair_remat_off_and_on():
    args, _ = common.parse(memory_bench.FLAGS, ["m", "--models=resnet18", "--sizes=64,96"])
    jobs = memory_bench.validate(args)
    assert len(jobs) == 2 * 2 * 2  # sizes x precisions x remat
    assert [j["remat"] for j in jobs[:2]] == [False, True]
    assert {memory_bench.key(j) for j in jobs} == {
        f"resnet18@{s}px/{p}/remat={r}"
        for s in (64, 96)
        for p in ("float32", "bfloat16")
        for r in ("off", "on")
    }


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--models", "alexnet"], "models"),
        (["--sizes", "224,x"], "sizes"),
        (["--sizes", "16"], "sizes"),
        (["--precisions", "float16"], "precisions"),
        (["--batch", "6"], "batch"),
    ],
)
def test_memory_refuses_bad_arguments(argv, match):
    with pytest.raises(ValueError, match=match):
        memory_bench.validate(common.parse(memory_bench.FLAGS, ["m", *argv])[0])


def test_memory_table_compares_remat_off_and_on():
    job = {"model": "resnet50", "size": 224, "precision": "float32", "batch": 12}
    gib = common.GIB
    results = [
        {"job": {**job, "remat": False}, "temp_bytes": 3 * gib, "step_s": {"median": 1.0}},
        {"job": {**job, "remat": True}, "temp_bytes": gib, "step_s": {"median": 1.5}},
        {"job": {**job, "size": 896, "remat": False}, "error": "timed out after 5 s"},
    ]
    assert memory_bench.rows(results) == [
        ["resnet50", "224", "float32", "3.000", "1.000", "3.00x", "1.000", "1.500", "1.50x", ""],
        ["resnet50", "896", "float32", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a",
         "timed out after 5 s; not run"],
    ]  # fmt: skip
    header, rule, *rows = memory_bench.markdown(results, 12).split("\n\n")[1].splitlines()
    assert all(row.count("|") == header.count("|") for row in rows)


# --- accuracy ---------------------------------------------------------------------------


def run(fw: str, seed: int, bal: float, wall: float = 10.0) -> dict:
    return {
        "framework": fw,
        "seed": seed,
        "balanced_accuracy": bal,
        "accuracy": bal - 0.05,
        "within1_accuracy": 0.9,
        "best_epoch": 3,
        "wall_s": wall,
    }


def test_accuracy_aggregate_and_parity():
    runs = [
        run("stagejax", 1, 0.50),
        run("torch", 1, 0.53),
        run("stagejax", 2, 0.60),
        run("torch", 2, 0.55),
        {"framework": "torch", "seed": 3, "error": "boom"},
    ]
    agg = accuracy.aggregate(runs)
    assert agg["stagejax"]["runs"] == 2 and agg["torch"]["runs"] == 2
    assert agg["stagejax"]["balanced_accuracy"]["mean"] == pytest.approx(0.55)
    assert agg["stagejax"]["balanced_accuracy"]["std"] == pytest.approx(np.std([0.5, 0.6], ddof=1))
    par = accuracy.parity(agg)
    assert par["stagejax_minus_torch_points"] == pytest.approx(1.0) and par["met"]
    text = accuracy.markdown(runs, agg, par)
    assert "error: boom" in text and "SIMULATED" in text and "met" in text


def test_accuracy_parity_missed_beyond_two_points():
    agg = accuracy.aggregate([run("stagejax", 1, 0.40), run("torch", 1, 0.43)])
    par = accuracy.parity(agg)
    assert par["stagejax_minus_torch_points"] == pytest.approx(-3.0) and not par["met"]
    assert accuracy.aggregate([run("torch", 1, 0.4)])["torch"]["wall_s"]["std"] == 0.0
    assert accuracy.parity(accuracy.aggregate([run("torch", 1, 0.4)])) is None


def test_accuracy_seeds():
    assert accuracy.parse_seeds("109, 110,111") == [109, 110, 111]
    for bad in ("", "1,1", "a,b", "-1"):
        with pytest.raises(ValueError, match="seeds"):
            accuracy.parse_seeds(bad)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--batch", "18"], "multiple of 12"),
        (["--frameworks", "stagejax,keras"], "frameworks"),
        (["--crop_size", "120", "--image_size", "96"], "crop_size"),
        (["--epochs", "0"], "epochs"),
    ],
)
def test_accuracy_refuses_bad_arguments(argv, match):
    with pytest.raises(ValueError, match=match):
        accuracy.validate(common.parse(accuracy.FLAGS, ["a", *argv])[0])


def test_accuracy_stagejax_config_is_the_study_recipe():
    job = {
        "model": "resnet18",
        "data_dir": "/d",
        "cache_dir": "/c",
        "crop_size": 80,
        "crop_range": 8,
        "batch": 24,
        "eval_batch": 24,
        "epochs": 6,
        "seed": 110,
    }
    c = accuracy.stagejax_config(job)
    assert (c.optimizer, c.learning_rate, c.weight_decay) == ("adam", 1e-3, 5e-4)
    assert (c.schedule, c.label_smoothing, c.precision) == ("constant", 0.0, "float32")
    assert c.augment.rot90 and c.augment.flip
    assert not (c.augment.stain_jitter or c.augment.brightness or c.augment.contrast)
    assert (c.global_batch_size, c.num_epochs, c.seed, c.data_dir) == (24, 6, 110, "/d")
    recipe = tb.Recipe()
    assert (recipe.learning_rate, recipe.weight_decay) == (c.learning_rate, c.weight_decay)
