"""Every architecture of ``stagejax.models.NAMES`` trains and evaluates, under jit and pmap.

The forward-equality tests in test_models.py never run a train step, so a
model whose step cannot be traced (MobileNetV3's dropout once mutated random
state from another trace level) went unnoticed. Here each architecture takes
a few real train steps (the trainer's ``Run``: data pipeline, jitted step,
evaluation) at 32 px and batch 12, twice from the same state (a pure step
repeats itself). Under pmap (2 fake CPU devices, in a subprocess since the
device count is fixed when JAX starts) ResNet-18 and MobileNetV3-Small
train too, and MobileNetV3's steps equal those of jit on the same two
devices: dropout and augmentation keys depend on the global example index.

Run as a script (``python -m tests.test_train_all_models OUT.json CACHE DATA``,
with XLA_FLAGS set) it does the two-device part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from stagejax import datasets, models, recipe
from stagejax.data import input_pipeline
from stagejax.train import loop as trainer
from tests.conftest import REPO
from tests.tracing import count_traces

STEPS = 2
# pmap for the two kinds of train step: ResNet-18's (every ResNet, ResNeXt and
# Wide-ResNet runs the same step: convolutions, BatchNorm, no random state) and
# MobileNetV3's (dropout: random state per example). pmap maps that one step over the
# devices whatever the layers; every NAMES entry is trained under jit below, and
# each further one here added 20-40 s of CPU to a 2-core CI for no path pmap does not run.
PMAP_MODELS = ("resnet18", "mobilenet_v3_small")
# Also under jit on the same 2 devices, compared with pmap (dropout: MobileNetV3;
# tests/test_parallel.py compares jit and pmap for resnet18).
COMPARE_MODELS = ("mobilenet_v3_small",)


def _config(model: str, data_dir: Path, cache_dir: Path, parallelism: str):
    config = recipe.get_config()
    config.model = model
    config.data_dir = str(data_dir)
    config.cache_dir = str(cache_dir)
    config.crop_size = 32
    config.crop_range = 4
    config.global_batch_size = 12
    config.eval_batch_size = 12
    config.num_epochs = 1
    config.parallelism = parallelism
    # SGD: parameters move linearly in the gradient, so jit and pmap agree to
    # rounding (Adam's first step, ~lr * sign(g), flips for near-zero gradients).
    config.optimizer = "sgd"
    config.learning_rate = 0.01
    config.augment.stain_jitter = 0.05  # exercises the per-example augmentation keys too
    return config


def _train(run: trainer.Run, config, initial) -> tuple[list, list, object]:
    """STEPS steps from host state ``initial``: host metrics per step, final params, state."""
    state = run.parallel.put_state(initial)  # new device buffers: the step donates them
    batches = run.parallel.prefetch(
        input_pipeline.train_batches(run.dataset.splits["train"], config)
    )
    metrics = []
    for _ in range(STEPS):
        state, m = run.train_step(state, next(batches))
        metrics.append(m)
    params = jax.tree.leaves(run.parallel.host_state(state).params)
    return run.parallel.metrics_to_host(metrics), [np.asarray(x) for x in params], state


def train_briefly(model: str, data_dir: Path, cache_dir: Path, parallelism: str) -> dict:
    """STEPS train steps (twice, from the same state), one validation pass; numbers
    for the assertions."""
    config = _config(model, data_dir, cache_dir, parallelism)
    run = trainer.Run(config, datasets.load(config))
    counter = count_traces(run)
    initial = jax.device_get(run.initial_state)
    before = jax.tree.leaves(initial.params)
    host, after, state = _train(run, config, initial)
    # Same state and batches again, same compiled step: a step that kept random
    # state between calls (a dropout stream) would not repeat itself.
    host_again, after_again, _ = _train(run, config, initial)
    summary, out = run.evaluate(state, "validation")
    return {
        "losses": [float(h["loss"]) for h in host],
        "finite": [bool(h["finite"]) for h in host],
        "traces": counter["traces"],
        "changed": float(np.mean([np.any(a != b) for a, b in zip(after, before, strict=True)])),
        "repeats": [float(h["loss"]) for h in host_again] == [float(h["loss"]) for h in host]
        and all(np.array_equal(a, b) for a, b in zip(after, after_again, strict=True)),
        "params": after,
        "probs": out["probs"],
        "balanced_accuracy": summary["balanced_accuracy"],
    }


def _check(result: dict, name: str) -> None:
    assert all(np.isfinite(result["losses"])) and all(result["finite"]), (name, result["losses"])
    assert result["traces"] == 1, f"{name}: the train step was traced {result['traces']} times"
    assert result["repeats"], f"{name}: the same steps from the same state gave other results"
    # Every parameter array moved (a model whose update is lost, or only the head's, fails).
    assert result["changed"] == 1.0, f"{name}: {result['changed']:.0%} of the arrays changed"
    probs = np.asarray(result["probs"])
    assert probs.shape[1] == 12 and np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_sim_dir) -> Path:
    """The tiny dataset prepared once; the two-device subprocess reuses this cache."""
    cache = tmp_path_factory.mktemp("cache")
    datasets.load(_config("resnet18", tiny_sim_dir, cache, "jit"))
    return cache


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory, tiny_sim_dir, cache_dir):
    """The two-device run, started in the background as soon as the first test of
    this file needs it: XLA compiles mostly on one core, so it overlaps the jit
    tests on the other (half the file's time on 2 cores)."""
    tmp = tmp_path_factory.mktemp("pmap")
    out, log = tmp / "pmap.json", tmp / "stderr.txt"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    with log.open("w") as err:  # a file, not a pipe: nobody reads it until the end
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.test_train_all_models",
                str(out),
                str(cache_dir),
                str(tiny_sim_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=REPO,
        )
    yield proc, out, log
    if proc.poll() is None:  # e.g. only some tests of the file were selected
        proc.kill()
        proc.wait()


@pytest.mark.usefixtures("two_devices")  # starts it early; see the fixture
@pytest.mark.parametrize("name", models.NAMES)
def test_trains_and_evaluates_under_jit(name, tiny_sim_dir, cache_dir):
    _check(train_briefly(name, tiny_sim_dir, cache_dir, "jit"), name)


def test_trains_under_pmap_and_matches_jit(two_devices):
    proc, out, log = two_devices
    assert proc.wait(timeout=1200) == 0, log.read_text()[-3000:]
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(PMAP_MODELS)
    for name, r in results.items():
        assert r["devices"] == 2
        _check(r["pmap"], f"{name} (pmap)")
    # Dropout and augmentation keys depend on the global example index only, so
    # pmap's per-device batches get the masks that jit's one global batch gets.
    for name in COMPARE_MODELS:
        r = results[name]
        np.testing.assert_allclose(r["pmap"]["losses"], r["jit"]["losses"], rtol=1e-4)
        assert r["max_param_diff"] < 1e-4, (name, r["max_param_diff"])
        assert r["max_prob_diff"] < 1e-4, (name, r["max_prob_diff"])


def _json_ready(result: dict) -> dict:
    return {
        **{k: v for k, v in result.items() if k != "params"},
        "probs": np.asarray(result["probs"]).tolist(),
    }


def _two_device_main(out: str, cache: str, data_dir: str) -> None:
    """Each of PMAP_MODELS under pmap; COMPARE_MODELS also under jit on the same
    two devices, with the largest differences."""
    results = {}
    for name in PMAP_MODELS:
        modes = ("pmap", "jit") if name in COMPARE_MODELS else ("pmap",)
        runs = {mode: train_briefly(name, Path(data_dir), Path(cache), mode) for mode in modes}
        results[name] = {
            "devices": jax.device_count(),
            **{mode: _json_ready(r) for mode, r in runs.items()},
        }
        if "jit" in runs:
            a, b = runs["pmap"], runs["jit"]
            results[name]["max_param_diff"] = max(
                float(np.max(np.abs(x - y))) for x, y in zip(a["params"], b["params"], strict=True)
            )
            results[name]["max_prob_diff"] = float(np.max(np.abs(a["probs"] - b["probs"])))
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    _two_device_main(*sys.argv[1:4])
