"""``--config.remat``: the same parameters and the same training, with less memory.

Why a subprocess: XLA:CPU expands the optimization barriers that keep a
rematerialised block's recomputation apart from its forward pass, and CSE then
merges the two back into one, so on a CPU the compiled step with remat is the
step without it (``test_xla_cpu_undoes_remat_without_the_flag``). Comparing
those would prove nothing; the comparisons therefore run in a child with
``XLA_FLAGS=memory.CPU_REMAT_XLA_FLAG`` (set before JAX starts), where the
recomputation is really compiled in: more convolutions, fewer temporaries.

Run as a script (``python -m tests.test_remat OUT.json``, with XLA_FLAGS set) it
does the child's part. The train steps are the trainer's (`stagejax.train.step`).
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
from flax import nnx

from stagejax import models, recipe
from stagejax.model import Model
from stagejax.train import memory
from stagejax.train import step as step_lib
from tests.conftest import REPO

STEPS = 3
BATCH = 12
# (model, crop size): one of each family, small enough for a 2-core CPU.
CASES = (("resnet18", 32), ("mobilenet_v3_small", 48))
# Temporaries with remat over those without, at most (measured: 0.55 and 0.87; the
# rest is the gradients' and the optimizer's, which remat does not touch).
MAX_TEMP_RATIO = {"resnet18": 0.7, "mobilenet_v3_small": 0.95}


def _config(name: str, size: int, remat: bool):
    config = recipe.get_config()
    config.model, config.crop_size, config.remat = name, size, remat
    config.global_batch_size = config.eval_batch_size = BATCH
    # SGD at a small rate: parameters move linearly in the gradient, so rounding stays
    # rounding (Adam's first step, ~lr * sign(g), flips for near-zero gradients; at
    # lr 0.01 three steps on one batch grow it to 0.6% of the update).
    config.optimizer, config.learning_rate = "sgd", 0.001
    config.augment.stain_jitter = 0.05  # the per-example augmentation keys too
    return config


def _batch(size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "image": rng.integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8),
        "label": (np.arange(BATCH) % 12).astype(np.int32),
    }


def train(name: str, size: int, remat: bool) -> dict:
    """STEPS trainer steps from the seed's initial state: losses, final state, memory."""
    config = _config(name, size, remat)
    model = Model.from_config(config)
    tx = step_lib.create_optimizer(config, steps_per_epoch=10)
    fn = step_lib.make_train_step(model.modeldef, tx, config, model.parallel)
    state = model.parallel.put_state(model.state(tx))
    batch = model.parallel.put_batch(_batch(size))
    compiled = model.parallel.compile_train_step(fn).lower(state, batch).compile()
    losses = []
    for _ in range(STEPS):
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    host = jax.device_get(model.parallel.host_state(state))
    return {
        "losses": losses,
        "leaves": [np.asarray(x) for x in jax.tree.leaves((host.params, host.batch_stats))],
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
        "convolutions": compiled.as_text().count(" convolution("),
    }


def compare(name: str, size: int) -> dict:
    """Remat off and on from the same initial state, as JSON-ready numbers."""
    off, on = train(name, size, False), train(name, size, True)
    # Each array's largest difference relative to its scale (BatchNorm variances reach
    # the hundreds): rounding, not a lost update, is what remains.
    diffs = [
        float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(a))))
        for a, b in zip(off["leaves"], on["leaves"], strict=True)
    ]
    return {
        **{f"{k}_{tag}": r[k] for tag, r in (("off", off), ("on", on)) for k in r if k != "leaves"},
        "max_state_diff": max(diffs),
    }


@pytest.fixture(scope="module")
def child_run(tmp_path_factory):
    """The comparisons with XLA:CPU keeping remat, started in the background as soon
    as a test of this file needs it: compiling runs mostly on one core, so it
    overlaps this process's tests on the other."""
    tmp = tmp_path_factory.mktemp("remat")
    out, log = tmp / "remat.json", tmp / "stderr.txt"
    flags = f"{os.environ.get('XLA_FLAGS', '')} {memory.CPU_REMAT_XLA_FLAG}".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    with log.open("w") as err:  # a file, not a pipe: nobody reads it until the end
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_remat", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=REPO,
        )
    yield proc, out, log
    if proc.poll() is None:  # e.g. only some tests of the file were selected
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def child(child_run) -> dict:
    proc, out, log = child_run
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    return json.loads(out.read_text())


@pytest.mark.usefixtures("child_run")  # starts it early; see the fixture
@pytest.mark.parametrize("name", [name for name, _ in CASES])
def test_remat_keeps_the_parameter_tree(name):
    trees = {}
    for remat in (False, True):
        state = nnx.state(models.create(name, remat=remat), (nnx.Param, nnx.BatchStat))
        trees[remat] = state.to_pure_dict()
    paths_off, leaves_off = zip(*jax.tree_util.tree_leaves_with_path(trees[False]), strict=True)
    paths_on, leaves_on = zip(*jax.tree_util.tree_leaves_with_path(trees[True]), strict=True)
    assert paths_on == paths_off
    for a, b in zip(leaves_off, leaves_on, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)  # same seed, same weights


@pytest.mark.usefixtures("child_run")
def test_xla_cpu_keeps_remat_without_the_flag_only_from_jaxlib_0_12():
    """The fact behind memory.cpu_undoes_remat: without CPU_REMAT_XLA_FLAG, older
    XLA:CPU compiles the step with remat into the step without it, newer keeps the
    recomputation. If this fails, the version threshold moved."""
    if memory.CPU_REMAT_XLA_FLAG in os.environ.get("XLA_FLAGS", ""):
        pytest.skip("this process already keeps remat")
    name, size = CASES[0]
    off, on = train(name, size, False), train(name, size, True)
    if memory.cpu_undoes_remat():
        assert on["convolutions"] == off["convolutions"]
        assert on["temp_bytes"] == off["temp_bytes"]
    else:
        assert on["convolutions"] > off["convolutions"]
        assert on["temp_bytes"] < MAX_TEMP_RATIO[name] * off["temp_bytes"]


@pytest.mark.parametrize("name,size", CASES)
def test_remat_trains_the_same(child, name, size):
    r = child[f"{name}@{size}"]
    # The recomputation is really in the compiled step (else this compares a step with itself).
    assert r["convolutions_on"] > r["convolutions_off"], r
    np.testing.assert_allclose(r["losses_on"], r["losses_off"], rtol=1e-5)
    assert r["max_state_diff"] < 1e-5, r  # parameters and BatchNorm statistics


@pytest.mark.parametrize("name,size", CASES)
def test_remat_needs_fewer_temporaries(child, name, size):
    r = child[f"{name}@{size}"]
    assert r["temp_bytes_on"] < MAX_TEMP_RATIO[name] * r["temp_bytes_off"], r


def test_memory_message_offers_remat(monkeypatch):
    config = _config("resnet50", 896, remat=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    text = memory.remedies(config)
    assert "--config.remat=True (with remat it may fit" in text
    note = f"on a CPU only with XLA_FLAGS={memory.CPU_REMAT_XLA_FLAG}"  # tests: a CPU
    assert (note in text) == memory.cpu_undoes_remat()
    monkeypatch.setenv("XLA_FLAGS", memory.CPU_REMAT_XLA_FLAG)
    assert "XLA_FLAGS" not in memory.remedies(config)
    config.remat = True
    assert "remat" not in memory.remedies(config)


def _main(out: str) -> None:
    results = {f"{name}@{size}": compare(name, size) for name, size in CASES}
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    _main(sys.argv[1])


def test_remat_adds_the_cpu_flag_and_keeps_the_users():
    from stagejax.train import memory

    flag = memory.CPU_REMAT_XLA_FLAG
    assert memory.xla_flags_for(False, "--a=1", "0.10.2") == "--a=1"
    assert memory.xla_flags_for(True, "", "0.10.2") == flag
    assert memory.xla_flags_for(True, "--a=1", "0.11.2") == f"--a=1 {flag}"
    assert memory.xla_flags_for(True, f"--a=1 {flag}", "0.10.2") == f"--a=1 {flag}"
    # From jaxlib 0.12 XLA:CPU keeps remat by itself: no flag to add.
    assert memory.xla_flags_for(True, "--a=1", "0.12.0.1") == "--a=1"
    assert not memory.cpu_undoes_remat("0.12.1") and memory.cpu_undoes_remat("0.10.2")
