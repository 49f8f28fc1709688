"""Shared fixtures: a tiny simulated dataset, made once per test session."""

import os
from pathlib import Path

import pytest

# Tests run on the CPU; keep XLA from grabbing every core's worth of threads
# in each of several subprocesses.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_sim_dir(tmp_path_factory) -> Path:
    """72 simulated tubules of 48 px in the study's layout (every stage in train)."""
    from stagejax import simulate

    out = tmp_path_factory.mktemp("sim") / "tiny"
    return simulate.generate(out, num_images=72, image_size=48, seed=0)
