"""What a run's log holds by default: its own lines, in the user's terms, and warnings.

JAX's "Unable to initialize backend 'tpu' ... libtpu.so" (JAX_PLATFORMS unset,
no TPU), the XLA flags and tensorflow-datasets' "Downloading and preparing
dataset Unknown size" banner are left out; ``--verbose`` keeps them.
"""

from __future__ import annotations

import os
import subprocess
import sys

from stagejax import models
from stagejax.model import saved
from tests.conftest import REPO

NOISE = ("Unable to initialize backend", "libtpu", "XLA_FLAGS=", "Downloading and preparing")


def _eval(tmp_path, model, data_dir, name: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "stagejax.main",
        f"--config={REPO / 'configs' / 'resnet.py'}",
        f"--workdir={tmp_path / name}",
        "--mode=eval",
        "--config.model=resnet18",
        f"--config.init_from={model}",
        f"--config.data_dir={data_dir}",
        f"--config.cache_dir={tmp_path / name / 'cache'}",  # a fresh dataset cache
        "--config.crop_size=32",
        "--config.crop_range=0",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # as a user runs it
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_default_log_is_the_runs_own_and_verbose_keeps_the_rest(tmp_path, tiny_sim_dir):
    model = saved.save_model_weights(tmp_path / "model", models.create("resnet18"), "resnet18")
    res = _eval(tmp_path, model, tiny_sim_dir, "quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    text = res.stdout + res.stderr
    assert not [n for n in NOISE if n in text], text[-3000:]
    first = res.stderr.splitlines()[0]
    assert first.startswith("INFO ") and "] " not in first  # no thread id, no source line
    assert f"Evaluating {model} on the test split of {tiny_sim_dir}" in first
    res = _eval(tmp_path, model, tiny_sim_dir, "verbose", "--verbose")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Downloading and preparing dataset" in res.stdout + res.stderr
