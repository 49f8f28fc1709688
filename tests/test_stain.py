"""Stain normalisation: the maths on synthetic H-PAS images, and the path through
training, the recorded reference, evaluation and whole sections.

Synthetic images are mixed from two concentration maps with known stain
vectors, so a change of staining (other vectors, other strengths) is exact:
normalising both stainings onto one reference must bring them together.
"""

from __future__ import annotations

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from stagejax import config as config_lib
from stagejax import models
from stagejax.data import augment, stain
from stagejax.errors import CheckpointError, ConfigError
from stagejax.model import Model, saved
from stagejax.section import stage
from tests.conftest import REPO, cli_command, main_args, shipped_config

H_PAS = np.array([[0.644, 0.717, 0.267], [0.175, 0.972, 0.155]])
# Another staining day: both hues moved, hematoxylin stronger, PAS weaker.
SHIFTED = np.array([[0.75, 0.62, 0.23], [0.10, 0.95, 0.30]])
SHIFT_SCALE = np.array([1.35, 0.7])


def _images(vectors, scale=(1.0, 1.0), n=4, size=40, seed=0) -> np.ndarray:
    """[n, size, size, 3] in [0, 1]: a white border around overlapping blobs, each of
    one stain (nuclei, PAS-positive structures)."""
    rng = np.random.default_rng(seed)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    yy, xx = np.mgrid[:size, :size] / size
    out = []
    for _ in range(n):
        c = np.zeros((size, size, 2))
        for _ in range(6):
            cy, cx, r = rng.uniform(0.25, 0.75, 2).tolist() + [rng.uniform(0.08, 0.2)]
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)
            c[..., rng.integers(2)] += blob * rng.uniform(0.3, 1.2)
        c[(yy - 0.5) ** 2 + (xx - 0.5) ** 2 > 0.16] = 0  # white outside the "tubule"
        od = (c * np.asarray(scale)) @ vectors
        out.append(np.clip((np.exp(-od) * 256 - 1) / 255, 0, 1))
    return np.stack(out).astype(np.float32)


# Reinhard matches each H-PAS channel's mean and spread and so cannot undo a change
# of hue (which mixes the channels); Macenko re-estimates the stain vectors.
@pytest.mark.parametrize(
    "method,vectors,left",
    [("macenko", SHIFTED, 0.1), ("reinhard", H_PAS, 0.35), ("reinhard", SHIFTED, 0.9)],
)
def test_two_stainings_of_the_same_tissue_come_together(method, vectors, left):
    usual, shifted = _images(H_PAS), _images(vectors, SHIFT_SCALE)
    reference = stain.pool(np.asarray(stain.estimate(jnp.asarray(usual), method)), method)
    a = np.asarray(stain.normalize(jnp.asarray(usual), method, reference))
    b = np.asarray(stain.normalize(jnp.asarray(shifted), method, reference))
    raw = np.abs(usual - shifted).mean()
    assert np.abs(a - b).mean() < left * raw, (np.abs(a - b).mean(), raw)
    # The white background stays white.
    assert np.all(b[:, 0, 0] > 0.99)


def test_macenko_finds_the_stain_vectors_hematoxylin_first():
    stats = np.asarray(stain.estimate(jnp.asarray(_images(SHIFTED, n=2)), "macenko"))
    want = SHIFTED / np.linalg.norm(SHIFTED, axis=1, keepdims=True)
    for row in stats:
        np.testing.assert_allclose(row[:6].reshape(2, 3), want, atol=0.05)


def test_onto_its_own_stain_an_image_is_unchanged_and_white_passes_through():
    x = jnp.asarray(_images(H_PAS, n=2))
    for method in ("macenko", "reinhard"):
        own = stain.estimate(x, method)
        for i in range(len(x)):
            one = stain.normalize(x[i : i + 1], method, own[i], own[i : i + 1])
            np.testing.assert_allclose(one, x[i : i + 1], atol=2e-3)
    white = jnp.ones((1, 16, 16, 3))
    assert np.all(np.isnan(np.asarray(stain.estimate(white, "macenko"))))
    reference = stain.estimate(x, "macenko")[0]
    np.testing.assert_array_equal(stain.normalize(white, "macenko", reference), white)


def test_jitted_equals_eager_and_slide_statistics_are_used_when_given():
    x = jnp.asarray(_images(SHIFTED, SHIFT_SCALE, n=3))
    ref = stain.pool(np.asarray(stain.estimate(jnp.asarray(_images(H_PAS)), "macenko")), "macenko")
    jitted = jax.jit(lambda im: stain.normalize(im, "macenko", ref))
    np.testing.assert_allclose(jitted(x), stain.normalize(x, "macenko", ref), atol=1e-5)
    u8 = jnp.asarray(np.round(np.asarray(x) * 255).astype(np.uint8))
    spec = ("macenko", ref)
    own = augment.device_preprocess(u8, None, None, False, False, spec)
    slide = np.tile(
        stain.pool(np.asarray(stain.estimate(u8 / 255.0, "macenko")), "macenko"), (3, 1)
    )
    pooled = augment.device_preprocess(u8, None, None, False, False, spec, jnp.asarray(slide))
    assert not np.allclose(own, pooled, atol=1e-3)  # the slide's estimate is what is used


def test_pool_ignores_images_without_tissue_and_the_reference_round_trips():
    rows = np.array([[1.0, 2, 3, 4, 5, 6], [np.nan] * 6, [3.0, 2, 1, 4, 5, 8]])
    np.testing.assert_allclose(stain.pool(rows, "reinhard"), [2, 2, 2, 4, 5, 7])
    ref = stain.pool(np.asarray(stain.estimate(jnp.asarray(_images(H_PAS)), "macenko")), "macenko")
    np.testing.assert_allclose(
        stain.parse_reference(stain.format_reference(ref), "macenko"), ref, rtol=1e-5
    )
    with pytest.raises(ValueError, match="config.stain.reference.*8 comma-separated"):
        stain.parse_reference("1,2,3", "macenko")


def _config(**stain_fields) -> ml_collections.ConfigDict:
    overrides = {"model": "resnet18", "crop_size": 32}
    config = shipped_config(overrides)
    config.stain.update(stain_fields)
    return config


def test_bad_stain_fields_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="config.stain.normalize: 'lab'"):
        config_lib.validate(_config(normalize="lab"), num_devices=1)
    with pytest.raises(ConfigError, match="config.stain.reference: '0.1,x'"):
        config_lib.validate(_config(normalize="reinhard", reference="0.1,x"), num_devices=1)
    with pytest.raises(ConfigError, match="config.stain.reference: empty"):
        stain.spec(_config(normalize="macenko"))


def test_a_model_directory_brings_its_stain_and_a_malformed_one_is_refused(tmp_path):
    reference = stain.format_reference(np.arange(1, 7) / 10)
    recorded = {"normalize": "reinhard", "reference": reference}
    directory = saved.save_model_weights(
        tmp_path / "m", models.create("resnet18"), "resnet18", stain=recorded
    )
    assert saved.read_model_json(directory)["stain"] == recorded
    config = _config()  # normalisation off on the command line: the weights' wins
    model = Model.from_directory(config, directory)
    assert model.config.stain.to_dict() == recorded and config.stain.normalize == "none"
    meta = json.loads((directory / saved.MODEL_JSON).read_text())
    meta["stain"]["reference"] = "1,2"
    (directory / saved.MODEL_JSON).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model.json: malformed stain"):
        saved.read_model_json(directory)


def test_slide_stain_pools_its_tubules_only_when_the_model_normalises():
    crops = [np.round(im * 255).astype(np.uint8) for im in _images(SHIFTED, SHIFT_SCALE, n=5)]
    model = Model.from_config(_config())
    assert stage.slide_stain(model, iter(crops), "s") is None
    ref = stain.format_reference(np.r_[H_PAS.ravel() / 1.0, 1.0, 1.0])
    model = Model.from_config(_config(normalize="macenko", reference=ref))
    source = stage.slide_stain(model, iter(crops), "s")
    want = SHIFTED / np.linalg.norm(SHIFTED, axis=1, keepdims=True)
    np.testing.assert_allclose(source[:6].reshape(2, 3), want, atol=0.05)


def test_training_records_the_reference_and_eval_reuses_it(tiny_sim_dir, tmp_path):
    workdir = tmp_path / "w"
    fields = {"data_dir": tiny_sim_dir, "cache_dir": tmp_path / "cache", "model": "resnet18"}
    fields |= {"crop_size": 32, "crop_range": 4, "optimizer": "sgd", "log_every_steps": 1}
    base = cli_command("stagejax.main", *main_args(workdir, overrides=fields))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    train = [*base, "--config.num_epochs=1", "--config.stain.normalize=macenko"]
    res = subprocess.run(train, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stain reference (macenko, from the training images)" in res.stderr
    ran = json.loads((workdir / "config.json").read_text())["stain"]
    reference = stain.parse_reference(ran["reference"], "macenko")
    assert np.all(np.isfinite(reference)) and ran["normalize"] == "macenko"
    assert saved.read_model_json(workdir / "best_model")["stain"] == ran
    trained = json.loads((workdir / "eval_test" / "metrics.json").read_text())
    (workdir / "eval_test").rename(workdir / "eval_test_train")
    res = subprocess.run([*base, "--mode=eval"], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((workdir / "eval_test" / "metrics.json").read_text())
    assert again["balanced_accuracy"] == trained["balanced_accuracy"]


def test_the_stain_benchmark_reports_the_drop_to_the_strongest_shift():
    from benchmarks import stain as bench

    def run(usual, shifted):
        return {"metrics": {"0.0": usual, "1.5": shifted, "0.5": usual}}

    m = lambda b: {"balanced_accuracy": b, "within1_accuracy": b + 0.2}  # noqa: E731
    results = {"none": [run(m(0.5), m(0.3)), run(m(0.6), m(0.2))], "both": [run(m(0.5), m(0.5))]}
    summary = bench.summarize(results, [0.5, 1.5])
    np.testing.assert_allclose(summary["none"]["balanced_drop"], (0.3, 0.1))
    np.testing.assert_allclose(summary["none"]["balanced_accuracy@1.5"], (0.25, 0.05))
    np.testing.assert_allclose(summary["both"]["within1_accuracy@0"], (0.7, 0.0))


@pytest.mark.slow
def test_the_stain_benchmark_command_trains_once_and_scores_every_staining(tmp_path, capsys):
    from benchmarks import common
    from benchmarks import stain as bench

    out, plot = tmp_path / "s.json", tmp_path / "s.png"
    argv = ["--model=resnet18", "--seeds=0", "--shifts=1.0", "--options=both",
            "--stain_jitter=0.05", "--tone=0.05", "--normalize=macenko", "--epochs=1", "--tiny",
            f"--cache_dir={tmp_path / 'c'}", f"--out={tmp_path / 'w'}", f"--json={out}",
            f"--plot={plot}"]  # fmt: skip
    assert set(bench.FLAGS) == {a.split("=")[0][2:] for a in argv}
    bench.main(argv)
    result = json.loads(out.read_text())
    (run,) = result["results"]["both"]
    assert set(run["metrics"]) == {"0.0", "1.0"} and run["train_s"] > 0
    assert set(result["summary"]["both"]) >= {"balanced_accuracy@1", "balanced_drop"}
    assert plot.stat().st_size > 0 and "| both |" in capsys.readouterr().out
    args = common.parse(bench.FLAGS, ["stain", *argv])[0]
    assert bench.train("both", 0, args)[1] == 0.0  # the finished run is reused, not trained
