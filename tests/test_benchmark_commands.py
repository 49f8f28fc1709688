"""Every benchmark's command line (throughput, predict_speed, memory, accuracy, loader,
torch_baseline) run with each of its flags at toy sizes, and a bad flag as one error
line. No timing assertions."""

from __future__ import annotations

import json

import pytest

from stagejax.train.memory import CPU_REMAT_XLA_FLAG
from tests.conftest import require_torch

# The benchmarks compare with the PyTorch baseline: their modules import torch.
torch, _ = require_torch()

from benchmarks import accuracy, common, predict_speed, throughput  # noqa: E402
from benchmarks import memory as memory_bench  # noqa: E402
from benchmarks import torch_baseline as tb  # noqa: E402

# --- every command line, run with every flag at toy sizes -----------------------------------


@pytest.fixture
def bench_cache(tmp_path_factory):
    """The simulated data of the throughput and accuracy commands and of the GPU smoke
    (tests/test_gpu_suite.py): the same 36 images of 40 px, made once."""
    return tmp_path_factory.getbasetemp() / "benchmark_cache"


def _run(module, argv: list[str], capsys) -> str:
    module.main(argv)
    return capsys.readouterr().out


def _flags_used(module, argv: list[str]) -> None:
    """The test names every flag the benchmark has."""
    used = {a.split("=")[0].lstrip("-").removeprefix("no") for a in argv if a.startswith("--")}
    assert set(module.FLAGS) <= used, set(module.FLAGS) - used


def test_throughput_command_with_the_profile(bench_cache, tmp_path, capsys):
    """--profile (the stagejax step breakdown) and torch's FLOPs, one step each."""
    out = tmp_path / "t.json"
    # The GPU suite smoke's sizes and data (tests/test_gpu_suite.py): one dataset, and
    # its compiled steps are reused.
    argv = ["--model=resnet18", "--image_size=32", "--crop_range=4", "--global_batch=24",
            "--study_batch=12", "--steps=1", "--warmup=0", "--window=1",
            "--frameworks=torch", "--precision=float32", "--num_workers=0",
            "--torch_compile=off", "--num_images=36", "--seed=109",
            f"--cache_dir={bench_cache}", "--profile", "--profile_repeats=1", "--flops",
            "--rounds=1", "--timeout=600", f"--json={out}", "--in_process"]  # fmt: skip
    _flags_used(throughput, argv)
    text = _run(throughput, argv, capsys)
    results = json.loads(out.read_text())["results"]
    assert "error" not in results["torch"], results["torch"]
    assert results["torch"]["mfu"]["step_flops"] > 0
    prof = results["stagejax_profile"]
    assert "error" not in prof, prof
    assert set(prof["parts_ms"]) >= {"device_preprocess", "forward_backward", "full_train_step"}
    assert all(v > 0 for v in prof["parts_ms"].values())
    assert "stagejax step part (timed alone)" in text


def test_predict_speed_command(tmp_path, capsys):
    out = tmp_path / "p.json"
    argv = ["--model=resnet18", "--image_size=32", "--batch=2", "--steps=1", "--warmup=1",
            "--frameworks=stagejax_tta,torch_channels_last", "--precision=float32",
            "--seed=0", "--timeout=600", f"--json={out}", "--in_process"]  # fmt: skip
    _flags_used(predict_speed, argv)
    text = _run(predict_speed, argv, capsys)
    results = json.loads(out.read_text())["results"]
    assert (
        results["stagejax_tta"]["views"] == 8 and results["torch_channels_last"]["images_per_s"] > 0
    )
    assert "stagejax_tta" in text


def test_memory_command(tmp_path, capsys, monkeypatch):
    """The jobs measured here, in this process; the environment they would get as
    children recorded (--xla_keep_remat's effect is the GPU smoke's: remat on < off)."""
    envs = []

    def here(module, job, timeout=None, env=None):
        envs.append(env)
        return memory_bench.child(job)

    monkeypatch.setattr(common, "run_child", here)
    out = tmp_path / "m.json"
    argv = ["--models=resnet18", "--sizes=32", "--precisions=float32", "--batch=12",
            "--time_steps=1", "--timeout=600", "--xla_keep_remat", f"--json={out}",
            "--in_process"]  # fmt: skip
    _flags_used(memory_bench, argv)
    text = _run(memory_bench, argv, capsys)
    off, on = json.loads(out.read_text())["results"]
    assert "error" not in off and "error" not in on, (off, on)
    assert on["temp_bytes"] > 0 and on["step_s"]["median"] > 0 and on["fits"]
    assert [e["XLA_FLAGS"].split()[-1] for e in envs] == [CPU_REMAT_XLA_FLAG] * 2
    assert "| resnet18 | 32 | float32 |" in text


def test_accuracy_command(bench_cache, tmp_path, capsys):
    out = tmp_path / "a.json"
    argv = ["--model=resnet18", "--num_images=36", "--image_size=40", "--crop_size=32",
            "--crop_range=4", "--batch=12", "--eval_batch=12", "--epochs=1", "--seeds=1",
            "--frameworks=stagejax,torch", "--data_seed=0", "--split_by=slide",
            f"--cache_dir={bench_cache}", f"--workdir={tmp_path / 'w'}", "--timeout=600",
            f"--json={out}", "--in_process"]  # fmt: skip
    _flags_used(accuracy, argv)
    text = _run(accuracy, argv, capsys)
    runs = json.loads(out.read_text())["runs"]
    assert [r["framework"] for r in runs] == ["stagejax", "torch"]
    assert all("error" not in r and 0 <= r["balanced_accuracy"] <= 1 for r in runs), runs
    assert "SIMULATED" in text


def test_loader_commands(tmp_path, capsys):
    from benchmarks import loader

    out = tmp_path / "l.json"
    argv = ["--workers=0", "--image_size=40", "--crop_size=32",
            "--num_images=12", "--num_batches=1", "--trials=1", "--repeats=1",
            f"--json={out}"]  # fmt: skip
    text = _run(loader, argv, capsys)
    assert json.loads(out.read_text())["loader"][0]["images_per_s"] > 0
    assert "| grain workers |" in text
    paths = ["--train_paths", "--model=resnet18", "--global_batch=12"]
    _flags_used(loader, argv + paths)
    text = _run(loader, [*argv, *paths], capsys)
    feeds = json.loads(out.read_text())["train_paths"]["paths"]
    assert set(feeds) == {"grain", "on_device"} and "| on_device |" in text


def test_torch_baseline_command(tiny_sim_dir, tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = [f"--data_dir={tiny_sim_dir}", "--model=resnet18", "--crop_size=32",
            "--crop_range=4", "--batch_size=12", "--eval_batch_size=12",
            "--learning_rate=0.001", "--weight_decay=0.0005", "--num_epochs=1", "--seed=1",
            "--sampler=stagejax", "--variant=tuned", "--num_workers=0",
            "--torch_compile=off", f"--json={out}"]  # fmt: skip
    _flags_used(tb, argv)
    text = _run(tb, argv, capsys)
    result = json.loads(out.read_text())
    assert result["variant"] == "tuned" and result["recipe"]["sampler"] == "stagejax"
    assert 0 <= result["balanced_accuracy"] <= 1 and "| tuned |" in text


def test_a_bad_flag_is_one_error_line():
    with pytest.raises(SystemExit, match="error: .*no_such_flag"):
        throughput.main(["--no_such_flag=1"])
    with pytest.raises(SystemExit, match="error: --frameworks"):
        throughput.main(["--frameworks=jax"])
    with pytest.raises(SystemExit, match="unexpected arguments"):
        predict_speed.main(["extra"])
