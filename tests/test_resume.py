"""Kill-and-resume: a training run killed with SIGKILL at random points and
restarted with the same command ends with exactly the result of a run that was
never interrupted, and a corrupt newest checkpoint is skipped, not trusted.

Everything goes through the real command line, one process at a time. On the
CPU, XLA is deterministic for a given program and inputs, the batches are a
pure function of the step and the RNG lives in the checkpointed state, so the
comparison is bitwise: any difference means a resume changed what was trained.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import (
    REPO,
    assert_trees_equal,
    best_model,
    cli_command,
    cli_env,
    latest_state,
    main_args,
    run_cli,
)

EPOCHS = 5
STEPS_PER_EPOCH = 4  # 50 train images of tiny_sim_dir // global batch 12
TOTAL = EPOCHS * STEPS_PER_EPOCH
NUM_KILLS = 4
LAUNCH_TIMEOUT = 180  # s, one process from start to exit


def _args(workdir: Path, data: Path, cache: Path) -> list[str]:
    fields = {"model": "resnet18", "crop_size": 32, "crop_range": 4, "num_epochs": EPOCHS}
    fields |= {"checkpoint_every_steps": 2, "log_every_steps": 1}
    return main_args(workdir, overrides={"data_dir": data, "cache_dir": cache, **fields})


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """CPU only; a shared persistent compilation cache so that each restart loads the
    compiled steps instead of compiling them again (the same executable either way)."""
    cache = tmp_path_factory.mktemp("xla_cache")
    return cli_env(
        {"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_sim_dir, env) -> dict:
    """One uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    workdir, cache = tmp / "run", tmp / "cache"
    res = run_cli(
        "stagejax.main", *_args(workdir, tiny_sim_dir, cache), env=env, timeout=LAUNCH_TIMEOUT
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return {"workdir": workdir, "cache": cache}


def _records(workdir: Path, offset: int = 0) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    with path.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode().splitlines()
    # A line being written when the process was killed may be incomplete.
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _meta(step_dir: Path) -> dict:
    return json.loads((step_dir / "meta" / "metadata").read_text())


def _best_meta(workdir: Path) -> tuple[str, dict]:
    """(step, meta) of the best checkpoint: the best epoch and its validation score."""
    (step_dir,) = (workdir / "checkpoints" / "best").iterdir()
    return step_dir.name, _meta(step_dir)


def _assert_same_result(workdir: Path, ref: Path) -> None:
    """Final metrics, predictions, best epoch and every weight bitwise equal to ``ref``'s."""
    got = json.loads((workdir / "eval_test" / "metrics.json").read_text())
    want = json.loads((ref / "eval_test" / "metrics.json").read_text())
    assert got == want
    # The same epoch was chosen as best, from the same validation history.
    assert _best_meta(workdir) == _best_meta(ref)
    assert _meta(workdir / "checkpoints" / "latest" / str(TOTAL)) == _best_meta(ref)[1] | {
        "epoch": EPOCHS
    }
    assert (workdir / "eval_test" / "predictions.csv").read_bytes() == (
        ref / "eval_test" / "predictions.csv"
    ).read_bytes()
    step, state = latest_state(workdir)
    ref_step, ref_state = latest_state(ref)
    assert step == ref_step == TOTAL
    assert_trees_equal(state, ref_state, "final train state")
    assert_trees_equal(best_model(workdir), best_model(ref), "best_model weights")


def _by_step(records: list[dict], key: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in records:
        if key in r:
            out.setdefault(r["step"], []).append(r[key])
    return out


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_sim_dir, env, reference):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    # Steps after which each of the kills comes (plus a random delay, so kills also
    # land inside checkpoint writes, evaluations and the step itself).
    targets = sorted(rng.sample(range(1, TOTAL - 2), NUM_KILLS))
    delays = [rng.uniform(0.0, 0.6) for _ in targets]
    info = f"seed {seed}, kill after steps {targets} + delays {np.round(delays, 2).tolist()}"
    workdir = tmp_path / "run"
    cmd = cli_command("stagejax.main", *_args(workdir, tiny_sim_dir, tmp_path / "cache"))
    logs: list[Path] = []
    reached: list[int] = []  # the last step logged when each kill came
    for i, (target, delay) in enumerate([*zip(targets, delays, strict=True), (None, None)]):
        log_path = tmp_path / f"launch{i}.log"
        logs.append(log_path)
        offset = (
            (workdir / "metrics.jsonl").stat().st_size
            if (workdir / "metrics.jsonl").is_file()
            else 0
        )
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=log_file)
        try:
            if target is None:  # the last launch runs to the end
                assert proc.wait(timeout=LAUNCH_TIMEOUT) == 0, (
                    f"{info}\n{log_path.read_text()[-3000:]}"
                )
                break
            deadline = time.monotonic() + LAUNCH_TIMEOUT
            while not any(
                r.get("step", 0) >= target and "train/loss" in r for r in _records(workdir, offset)
            ):
                assert proc.poll() is None, (
                    f"{info}: launch {i} exited before step {target}\n"
                    f"{log_path.read_text()[-3000:]}"
                )
                assert time.monotonic() < deadline, f"{info}: launch {i} too slow"
                time.sleep(0.05)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL, f"{info}: launch {i} ended itself"
            reached.append(max(r["step"] for r in _records(workdir) if "train/loss" in r))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # Asynchronous checkpoints can take a few steps to commit, so a launch may restart
    # from an older checkpoint than the last one started (or from scratch); never from
    # a step beyond what the killed launch had reached.
    resumed = 0
    for i, path in enumerate(logs[1:]):
        if m := re.search(r"resuming from step (\d+) ", path.read_text()):
            resumed += 1
            assert int(m.group(1)) <= reached[i], f"{info}: launch {i + 1} resumed at {m[1]}"
    assert resumed, f"{info}: no launch resumed from a checkpoint"
    ref = reference["workdir"]
    _assert_same_result(workdir, ref)

    # Every step was trained and logged, and a step replayed after a resume had exactly
    # the loss and accuracy of the uninterrupted run; so had each epoch's validation.
    records, ref_records = _records(workdir), _records(ref)
    for key in ("train/loss", "train/accuracy", "validation/balanced_accuracy", "validation/loss"):
        want = {s: v[0] for s, v in _by_step(ref_records, key).items()}
        got = _by_step(records, key)
        assert set(got) == set(want), f"{info}: {key} logged at different steps"
        for s, values in got.items():
            assert all(v == want[s] for v in values), f"{info}: {key} at step {s}: {values}"
    # No unfinished checkpoint is left behind.
    leftovers = [p for p in (workdir / "checkpoints").rglob("*") if "tmp" in p.name]
    assert not leftovers, f"{info}: {leftovers}"


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(
    tmp_path, env, reference, tiny_sim_dir
):
    ref = reference["workdir"]
    workdir = tmp_path / "run"
    shutil.copytree(ref, workdir)
    latest = workdir / "checkpoints" / "latest"
    steps = sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    assert steps[-1] == TOTAL and len(steps) == 2
    # Truncate the array data of the newest checkpoint, as a full disk or a crash
    # of the storage underneath Orbax could.
    data_files = [
        p
        for p in (latest / str(TOTAL) / "state").rglob("*")
        if p.is_file() and p.parent.name == "d"
    ]
    assert data_files
    for p in data_files:
        os.truncate(p, p.stat().st_size // 2)
    # Leftovers of a run killed while swapping in best_model must not block the export.
    (workdir / ".best_model.old").mkdir()
    (workdir / ".best_model.old" / "junk").write_text("x")
    shutil.rmtree(workdir / "eval_test")

    args = _args(workdir, tiny_sim_dir, reference["cache"])
    res = run_cli("stagejax.main", *args, env=env, timeout=LAUNCH_TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    warnings = [
        line for line in res.stderr.splitlines() if f"{latest}/{TOTAL} is unreadable" in line
    ]
    assert len(warnings) == 1 and warnings[0].startswith("W"), res.stderr[-3000:]
    assert f"resuming from step {steps[0]} " in res.stderr
    # The steps after the fallback were trained again and the corrupt checkpoint
    # was replaced by a good one: the result is the uninterrupted run's.
    _assert_same_result(workdir, ref)
    assert not (workdir / ".best_model.old").exists()
