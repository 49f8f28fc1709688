"""What a failing, competing, interrupted or starved run does to its workdir.

Through ``python -m stagejax.main`` as a user runs it, on the tiny simulated
dataset: a run that fails before its first checkpoint leaves the workdir byte
for byte as it found it and the fixed retry runs; a second process on a
workdir in use is refused at once; a stale lock is taken over; SIGINT and
SIGTERM stop with one line, and the resumed run ends exactly where an
uninterrupted one does; an incomplete checkpoint is never used; a full disk is
one line with the previous checkpoint intact; a train step that cannot fit in
memory is refused before training.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from stagejax import recipe
from stagejax.errors import ResourceError
from stagejax.runtime import checkpoint as ckpt_lib
from stagejax.train import memory
from tests.conftest import (
    REPO,
    FakeCompiled,
    assert_trees_equal,
    best_model,
    cli_command,
    cli_env,
    error_line,
    latest_state,
    main_args,
    run_cli,
)

STEPS = 8  # 50 train images // batch 12 = 4 steps per epoch, 2 epochs
TIMEOUT = 240


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """CPU; one persistent compilation cache, so later launches load the compiled steps."""
    cache = tmp_path_factory.mktemp("xla_cache")
    return cli_env(
        {"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    )


@pytest.fixture(scope="module")
def cmd(tiny_sim_dir, tmp_path_factory):
    """``stagejax.main``'s arguments for a workdir: 2 epochs of SGD on the tiny dataset."""
    fields = {"data_dir": tiny_sim_dir, "cache_dir": tmp_path_factory.mktemp("data_cache")}
    fields |= {"model": "resnet18", "crop_size": 32, "crop_range": 4, "num_epochs": 2}
    fields |= {"optimizer": "sgd", "log_every_steps": 1}
    return lambda workdir, *extra: main_args(workdir, *extra, overrides=fields)


def _last_line(stderr: str) -> str:
    """The one closing line of a stopped run: last on stderr, and no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.strip()][-1]


def _tree(path: Path) -> dict[str, tuple]:
    """Every entry under ``path`` (and itself): bytes or 'dir', and mtime."""
    out = {".": ("dir", path.stat().st_mtime_ns)}
    for p in sorted(path.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(path))] = (p.read_bytes() if p.is_file() else "dir", st.st_mtime_ns)
    return out


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cmd, env) -> dict:
    """A run that diverges at step 2 (before any checkpoint) in an existing workdir,
    then the same command with a sane learning rate, which is the reference run; a
    stale lock (a killed run's) is left in the workdir before the retry."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    workdir.mkdir()
    os.utime(workdir, ns=(10**18, 10**18))
    before = _tree(workdir)
    diverging = ("--config.learning_rate=3e38", "--config.schedule=cosine")
    failed = run_cli(
        "stagejax.main",
        *cmd(workdir, *diverging, "--config.warmup_epochs=0.25"),
        env=env,
        timeout=TIMEOUT,
    )
    after = _tree(workdir)
    stale_pid = _dead_pid()
    (workdir / ".stagejax.lock").write_text(
        json.dumps({"pid": stale_pid, "host": "elsewhere", "started": "2026-01-01 00:00:00"})
    )
    retry = run_cli(
        "stagejax.main", *cmd(workdir), env={**env, "JAX_LOG_COMPILES": "1"}, timeout=TIMEOUT
    )
    assert retry.returncode == 0, retry.stderr[-3000:]
    return {
        "workdir": workdir,
        "failed": failed,
        "before": before,
        "after": after,
        "retry": retry,
        "stale_pid": stale_pid,
    }


def test_failure_before_first_checkpoint_leaves_workdir_as_found(reference):
    line = error_line(reference["failed"], returncode=2)
    assert "NaN/Inf by step 2" in line, line
    assert "[1] " in reference["failed"].stderr  # it did train and log a step first
    assert reference["after"] == reference["before"]  # no config.json, metrics, lock...
    # ... so the same command with the fixed setting runs to the end.
    assert (reference["workdir"] / "eval_test" / "metrics.json").is_file()


def test_stale_lock_is_taken_over_with_a_warning(reference):
    warnings = [
        line
        for line in reference["retry"].stderr.splitlines()
        if "taking over the stale lock" in line
    ]
    assert len(warnings) == 1 and warnings[0].startswith("W"), reference["retry"].stderr[-3000:]
    assert f"pid {reference['stale_pid']} on elsewhere" in warnings[0]
    assert not (reference["workdir"] / ".stagejax.lock").exists()  # released at the end


def test_every_run_logs_its_memory_need_and_compiles_the_step_once(reference):
    stderr = reference["retry"].stderr
    lines = [line for line in stderr.splitlines() if "memory: " in line]
    assert len(lines) == 1, stderr[-3000:]
    assert re.search(
        r"train step needs [\d.]+ GiB per device \(temporaries [\d.]+, "
        r"arguments [\d.]+, outputs [\d.]+\); device has [\d.]+ GiB",
        lines[0],
    )
    # The step compiled ahead of time for the estimate is the one that trains.
    assert stderr.count("Compiling jit(step_fn)") == 1, stderr[-3000:]


def _wait_for(predicate, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert proc.poll() is None, f"exited before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"too slow: {what}"
        time.sleep(0.05)


def _trained_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(x)["step"] for x in lines if x.endswith("}") and "train/loss" in x]


def test_second_process_is_refused_and_sigint_resumes_to_the_same_result(
    tmp_path, cmd, env, reference
):
    workdir, log = tmp_path / "run", tmp_path / "first.log"
    args = cmd(workdir)
    with log.open("w") as f:
        first = subprocess.Popen(
            cli_command("stagejax.main", *args), cwd=REPO, env=env, stdout=f, stderr=f
        )
    try:
        _wait_for(lambda: _trained_steps(workdir), first, log, "step 1")
        first.send_signal(signal.SIGSTOP)  # holds the lock, for certain, while the second runs
        second = run_cli("stagejax.main", *args, env=env, timeout=TIMEOUT)
        line = error_line(second, returncode=2)
        assert f"in use by another stagejax run (pid {first.pid} on " in line, line
        assert "training resnet18" not in second.stderr  # refused before reading the data
        first.send_signal(signal.SIGINT)
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=TIMEOUT) == 130, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    line = _last_line(log.read_text())
    m = re.fullmatch(
        r"stopped by SIGINT at step (\d+) \(checkpoint saved in (.+)\); "
        r"rerun the same command to resume",
        line,
    )
    assert m and int(m[1]) < STEPS and m[2] == str(workdir / "checkpoints" / "latest"), line
    assert latest_state(workdir)[0] == int(m[1])

    resumed = run_cli("stagejax.main", *args, env=env, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {m[1]} " in resumed.stderr
    ref = reference["workdir"]
    for name in ("metrics.json", "predictions.csv"):
        assert (workdir / "eval_test" / name).read_bytes() == (
            ref / "eval_test" / name
        ).read_bytes()
    (step, state), (ref_step, ref_state) = latest_state(workdir), latest_state(ref)
    assert step == ref_step == STEPS
    assert_trees_equal(state, ref_state, "final train state")
    assert_trees_equal(best_model(workdir), best_model(ref), "best_model weights")


def test_sigterm_before_the_first_checkpoint_removes_the_new_workdir(tmp_path, cmd, env):
    workdir, log = tmp_path / "new" / "run", tmp_path / "run.log"
    # No compilation cache: compiling keeps the run before its first checkpoint long after
    # the lock appears (with cached steps the 2 epochs can end before the signal lands).
    cold = {**env, "JAX_ENABLE_COMPILATION_CACHE": "false"}
    with log.open("w") as f:
        args = cli_command("stagejax.main", *cmd(workdir))
        proc = subprocess.Popen(args, cwd=REPO, env=cold, stdout=f, stderr=f)
    lock = workdir / ".stagejax.lock"
    try:
        _wait_for(
            lambda: lock.is_file() and str(proc.pid) in lock.read_text(), proc, log, "the lock"
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 143, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    line = _last_line(log.read_text())
    assert line.startswith("stopped by SIGTERM") and "rerun the same command" in line, line
    assert not (tmp_path / "new").exists()


def test_memory_preflight_refuses_a_step_that_cannot_fit(tmp_path, cmd, env):
    workdir = tmp_path / "new"
    res = run_cli(
        "stagejax.main", *cmd(workdir, "--config.device_memory_gb=0.01"), env=env, timeout=TIMEOUT
    )
    line = error_line(res, returncode=2)
    m = re.search(r"train step needs ([\d.]+) GiB .* device has ([\d.]+) GiB", line)
    assert m and float(m[1]) > float(m[2]) == 0.01, line
    for field in ("config.crop_size", "config.global_batch_size", "precision=bfloat16"):
        assert field in line, line
    assert "[1] " not in res.stderr  # nothing trained
    assert not workdir.exists()


def test_eval_of_an_incomplete_best_checkpoint_is_one_line(tmp_path, cmd, env, reference):
    workdir = tmp_path / "run"
    shutil.copytree(reference["workdir"], workdir)
    (step_dir,) = (workdir / "checkpoints" / "best").iterdir()
    shutil.rmtree(step_dir / "meta")  # as a kill in the middle of deleting it would
    res = run_cli("stagejax.main", *cmd(workdir, "--mode=eval"), env=env, timeout=TIMEOUT)
    line = error_line(res, returncode=2)
    assert f"{step_dir.parent}: no best checkpoint" in line and "incomplete" in line, line
    assert "'meta'" in line, line
    assert any(
        x.startswith("W") and f"{step_dir} is incomplete" in x for x in res.stderr.splitlines()
    ), res.stderr[-3000:]


@pytest.fixture
def tmpfs(tmp_path):
    """A small file system of its own (root only); yields a function mounting it."""
    mounted = []

    def mount(size_bytes: int) -> Path:
        path = tmp_path / "tmpfs"
        path.mkdir()
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if res.returncode:
            pytest.skip(f"cannot mount a tmpfs ({res.stderr.strip()}); see the injected test below")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(
    tmp_path, cmd, env, reference, tmpfs
):
    ref_step = reference["workdir"] / "checkpoints" / "latest" / str(STEPS)
    size = sum(p.stat().st_size for p in ref_step.rglob("*") if p.is_file())
    # Room for two checkpoints and a half: latest 2 fits, then best 4, then latest 4 not.
    workdir = tmpfs(int(2.5 * size)) / "run"
    res = run_cli(
        "stagejax.main",
        *cmd(workdir, "--config.checkpoint_every_steps=2"),
        env=env,
        timeout=TIMEOUT,
    )
    line = error_line(res, returncode=2)
    assert line.startswith(
        f"error: {workdir / 'checkpoints' / 'latest'}: cannot write the "
        "checkpoint of step 4 (No space left on device"
    ), line
    assert re.search(r", [\d.]+ (bytes|KiB|MiB|GiB) free\)", line), line
    assert "the previous checkpoint (step 2) is intact" in line, line
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(workdir / "checkpoints" / "latest" / "2" / "state")
    assert int(state["step"]) == 2
    leftovers = [p for p in workdir.rglob("*") if "tmp" in p.name or p.name.startswith(".")]
    assert not leftovers, leftovers
    assert sorted(p.name for p in (workdir / "checkpoints" / "latest").iterdir()) == ["2"]


# -- in-process checks of the same guarantees, fast and without root -----------


def _tiny_state(value: float) -> dict:
    return {"w": np.full((64,), value, np.float32)}


def _abstract() -> dict:
    return {"w": jax.ShapeDtypeStruct((64,), np.float32)}


def test_injected_disk_full_is_one_line_and_leaves_no_temporary_directory(tmp_path, monkeypatch):
    ckpts = ckpt_lib.TrainCheckpoints(tmp_path)
    ckpts.save_latest(1, _tiny_state(1.0), {"epoch": 0})
    real_save = ocp.CheckpointManager.save

    def full_disk(self, step, *args, **kwargs):
        (Path(self.directory) / f"{step}{ckpt_lib.TMP_MARKER}" / "state").mkdir(parents=True)
        raise ValueError(
            'RESOURCE_EXHAUSTED: Error writing "w/0": Failed to write 256 bytes '
            "to file 11: No space left on device [os_error_code='28']"
        )

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(ResourceError) as e:
        ckpts.save_latest(2, _tiny_state(2.0), {"epoch": 0})
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    msg = str(e.value)
    assert msg.startswith(
        f"{tmp_path / 'checkpoints' / 'latest'}: cannot write the checkpoint "
        "of step 2 (No space left on device"
    ), msg
    assert "free)" in msg and "previous checkpoint (step 1) is intact" in msg, msg
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "latest").iterdir()) == ["1"]
    state, _ = ckpts.restore_latest(_abstract())
    np.testing.assert_array_equal(state["w"], 1.0)
    ckpts.close()


class _Killed(BaseException):
    pass


def _killed(*args):
    raise _Killed


def test_new_best_is_committed_before_the_old_one_goes(tmp_path, monkeypatch, caplog):
    ckpts = ckpt_lib.TrainCheckpoints(tmp_path)
    ckpts.save_best(4, _tiny_state(4.0), {"best_epoch": 1})
    # A run killed right after committing the new best, before removing the old one.
    monkeypatch.setattr(ckpt_lib.TrainCheckpoints, "_remove", _killed)
    with pytest.raises(_Killed):
        ckpts.save_best(8, _tiny_state(8.0), {"best_epoch": 2})
    monkeypatch.undo()
    ckpts.close()
    best = tmp_path / "checkpoints" / "best"
    assert sorted(p.name for p in best.iterdir()) == ["4", "8"]
    # Newer steps left incomplete (killed while being deleted, or while being written)
    # are skipped, with a warning.
    (best / "12" / "state").mkdir(parents=True)
    (best / f"14{ckpt_lib.TMP_MARKER}" / "state").mkdir(parents=True)
    ckpts = ckpt_lib.TrainCheckpoints(tmp_path)
    state, meta = ckpts.restore_best(_abstract())
    assert meta["best_epoch"] == 2 and float(state["w"][0]) == 8.0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("best/12 is incomplete (no 'meta' item" in w for w in warnings), warnings
    assert any(f"best/14{ckpt_lib.TMP_MARKER} is an unfinished save" in w for w in warnings)
    ckpts.save_best(16, _tiny_state(16.0), {"best_epoch": 3})
    assert sorted(p.name for p in best.iterdir()) == ["16"]  # and nothing else is left
    ckpts.close()


def test_out_of_memory_at_run_time_is_one_line():
    config = recipe.get_config("study")  # the study's recipe, these fields set
    config.update({"crop_size": 896, "global_batch_size": 12, "precision": "float32"})
    err = memory.out_of_memory(
        jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory allocating 25598862696 bytes.\nmore detail"
        ),
        config,
    )
    assert isinstance(err, ResourceError)
    assert "\n" not in str(err) and "25598862696 bytes" in str(err)
    assert "config.crop_size (896)" in str(err) and "bfloat16" in str(err)
    assert memory.out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: a bug"), config) is None


class _FakeDevice:
    platform = "gpu"

    def memory_stats(self):
        return {"bytes_limit": 23 * memory.GIB}


def test_memory_check_uses_the_accelerator_limit_and_the_override(monkeypatch):
    monkeypatch.setattr(jax, "local_devices", lambda: [_FakeDevice(), _FakeDevice()])
    config = recipe.get_config("study")  # the study's recipe, these fields set
    config.update(
        {
            "crop_size": 896,
            "global_batch_size": 12,
            "precision": "float32",
            "device_memory_gb": 0.0,
            "remat": False,
        }
    )
    assert memory.device_capacity(config) == (23 * memory.GIB, "gpu memory limit")
    with pytest.raises(ResourceError) as e:
        memory.check_train_step(FakeCompiled(), config)
    assert str(e.value).startswith(
        "memory: the train step needs 24.5 GiB per device (temporaries 24.0, arguments 0.5, "
        "outputs 0.0) but the device has 23.0 GiB (gpu memory limit); lower "
        "config.crop_size (896) or config.global_batch_size (12), or use "
        "--config.precision=bfloat16 or --config.remat=True"
    ), str(e.value)
    config.device_memory_gb = 30.0  # e.g. a larger share, or a smaller one for a shared GPU
    memory.check_train_step(FakeCompiled(), config)
