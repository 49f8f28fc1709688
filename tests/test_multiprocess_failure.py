"""A multi-process run whose peer dies must fail, not hang.

Two CPU processes x 2 devices train through the real command line; once
training is under way one of them is SIGKILLed (a crashed host: no clean
shutdown). The survivor is blocked in a collective that will never complete;
JAX's coordination service notices the missing heartbeats and stops it with an
error within ``--heartbeat_timeout`` seconds plus polling slack.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

HEARTBEAT = 10  # s, --heartbeat_timeout of the test processes
START_TIMEOUT = 240  # s, until both processes are training
EXIT_BOUND = 120  # s, from the kill until the survivor has exited


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trained_steps(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train/loss" in record:
            steps.append(record["step"])
    return max(steps)


@pytest.mark.parametrize("victim", [1, 0], ids=["worker_dies", "coordinator_dies"])
def test_survivor_exits_with_an_error_when_a_peer_is_killed(victim, tmp_path, tiny_sim_dir):
    workdir = tmp_path / "run"
    port = _free_port()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = []
    for i in range(2):
        cmd = [
            sys.executable,
            "-m",
            "stagejax.main",
            f"--config={REPO / 'configs' / 'resnet.py'}",
            f"--workdir={workdir}",
            f"--config.data_dir={tiny_sim_dir}",
            f"--config.cache_dir={tmp_path / 'cache'}",
            "--config.model=resnet18",
            "--config.crop_size=32",
            "--config.crop_range=4",
            "--config.num_epochs=100",
            "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=1000",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            f"--heartbeat_timeout={HEARTBEAT}",
            "--initialization_timeout=120",
        ]
        with logs[i].open("w") as log:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log))
    try:
        # Both processes are in the training loop once process 0 logged step 2:
        # every step is a collective over all 4 devices.
        deadline = time.monotonic() + START_TIMEOUT
        while _trained_steps(workdir) < 2:
            for i, p in enumerate(procs):
                assert p.poll() is None, f"process {i} exited early:\n{logs[i].read_text()[-3000:]}"
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)

        procs[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert procs[victim].wait(timeout=30) == -signal.SIGKILL
        survivor = procs[1 - victim]
        try:
            rc = survivor.wait(timeout=EXIT_BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"process {1 - victim} still running {EXIT_BOUND} s after its peer "
                f"died:\n{logs[1 - victim].read_text()[-3000:]}"
            )
        elapsed = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    out = logs[1 - victim].read_text()
    assert rc != 0, out[-3000:]
    # It was stopped by the failure detection, not by finishing or by chance.
    assert "JAX distributed service detected fatal errors" in out, out[-3000:]
    assert "test: accuracy" not in out
    assert elapsed < EXIT_BOUND
