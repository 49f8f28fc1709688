"""Data parallelism: jit over a mesh, pmap, and several processes give one result.

Each configuration runs in its own process (tests/train_probe.py) because the
number of fake CPU devices and the distributed runtime are fixed at JAX start.
"""

import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

PROBE = str(REPO / "tests" / "train_probe.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe(tmp_path, name, data, *extra, procs=1, timeout=600):
    out = tmp_path / f"{name}.npz"
    base = [
        sys.executable,
        PROBE,
        "--out",
        str(out),
        "--data",
        str(data),
        "--cache",
        str(tmp_path / "cache"),
        *extra,
    ]
    if procs == 1:
        res = subprocess.run(base, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, res.stderr[-3000:]
    else:
        port = _free_port()
        ps = [
            subprocess.Popen(
                base + ["--num_processes", str(procs), "--process_id", str(i), "--port", str(port)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(procs)
        ]
        for p in ps:
            _, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-3000:]
    z = np.load(out)
    leaves = [z[f"arr_{i}"] for i in range(sum(k.startswith("arr_") for k in z.files))]
    # Traced during the first step only; never again (no retracing per step).
    assert int(z["traces"]) == int(z["traces_after_first"])
    return leaves, z["losses"], int(z["traces"])


def _assert_same(a, b, rtol=2e-4, atol=5e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_sim_dir):
    tmp = tmp_path_factory.mktemp("single")
    return _probe(tmp, "one", tiny_sim_dir, "--devices", "1")


def test_jit_mesh_and_pmap_match_one_device(tmp_path, tiny_sim_dir, single):
    ref_leaves, ref_losses, traces = single
    assert traces == 1, "the jitted train step was traced more than once"
    for mode in ("jit", "pmap"):
        leaves, losses, traces = _probe(
            tmp_path, mode, tiny_sim_dir, "--devices", "8", "--mode", mode
        )
        assert traces == 1, f"{mode}: the train step was traced more than once"
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
        _assert_same(leaves, ref_leaves)
    # Training moved the parameters: the comparison is not between two initial states.
    assert ref_losses[0] != ref_losses[-1]


def test_two_processes_match_one_process(tmp_path, tiny_sim_dir):
    one, losses1, _ = _probe(tmp_path, "p1", tiny_sim_dir, "--devices", "4")
    two, losses2, _ = _probe(tmp_path, "p2", tiny_sim_dir, "--devices", "2", procs=2)
    np.testing.assert_allclose(losses2, losses1, rtol=1e-4)
    _assert_same(two, one)


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path, tiny_sim_dir):
    res = subprocess.run(
        [
            sys.executable,
            PROBE,
            "--out",
            str(tmp_path / "x.npz"),
            "--data",
            str(tiny_sim_dir),
            "--cache",
            str(tmp_path / "cache"),
            "--devices",
            "8",
            "--batch",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0
    assert "config.global_batch_size: 20 does not divide by the 8 devices" in res.stderr
