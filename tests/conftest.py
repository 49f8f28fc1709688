"""Shared fixtures: a tiny simulated dataset, made once per test session."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests run on the CPU; keep XLA from grabbing every core's worth of threads
# in each of several subprocesses.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the session, inherited by every
# subprocess a test starts: many tests compile the same tiny models (the CLI
# tests each train a ResNet-18 at 32 px), compiling is most of CI's time, and a
# cache hit loads the same executable. Programs compiling in under a second
# (JAX's default threshold) are not stored.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="stagejax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_sim_dir(tmp_path_factory) -> Path:
    """72 simulated tubules of 48 px in the study's layout (every stage in train).

    Not hand-cut: test_parallel compares 1 with 8 devices over 3 SGD steps, and on
    hand-cut images (large constant white areas) the reduction-order rounding grew to
    1e-3 of the loss by step 3 (4e-5 at step 2); on uncut ones it stays below 1e-4.
    """
    from stagejax import simulate

    out = tmp_path_factory.mktemp("sim") / "tiny"
    uncut = simulate.SceneParams(hand_cut=False)
    return simulate.generate(out, num_images=72, image_size=48, seed=0, params=uncut)


def shipped_config(overrides: dict | None = None, name: str = "resnet", variant: str = ""):
    """``configs/<name>.py`` as ``python -m stagejax.main --config=configs/<name>.py`` runs it
    with the command line's ``overrides`` (flat ``{'a.b': value}``): the variant named, or
    the one `stagejax.config.default_variant` picks for training."""
    import runpy

    from stagejax import config as config_lib

    overrides = dict(overrides or {})
    variant = variant or config_lib.default_variant(overrides.get("data_dir", ""), "train")
    config = runpy.run_path(str(REPO / "configs" / f"{name}.py"))["get_config"](variant)
    config.update_from_flattened_dict(overrides)
    return config
