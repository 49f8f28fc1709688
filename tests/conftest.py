"""Shared fixtures and helpers: a tiny simulated dataset made once per session, running
the command line as a user does, and test doubles several test files use."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Tests run on the CPU; keep XLA from grabbing every core's worth of threads
# in each of several subprocesses.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the session, inherited by every
# subprocess a test starts: many tests compile the same tiny models (the CLI
# tests each train a ResNet-18 at 32 px), compiling is most of CI's time, and a
# cache hit loads the same executable. Small programs are stored too (JAX's
# default keeps only those compiling for a second or more): each CLI process
# compiles about 60 of them, and loading them saves about a second per process.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="stagejax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]

# PyTorch is the oracle of the parity tests. The test extra installs it on Python 3.11
# only (from this machine's disk; elsewhere a CUDA build of several GB), so on newer
# Pythons a test that needs it is skipped, with the reason; on 3.11 a missing torch is
# an import error, never a silent skip.
TORCH_OPTIONAL = sys.version_info >= (3, 12)


NO_TORCH = "torch/torchvision not installed (the test extra has them on Python 3.11 only)"


def import_torch():
    """(torch, torchvision), or (None, None) where the test extra leaves them out;
    tests that use them carry `needs_torch`."""
    try:
        import torch
        import torchvision
    except ImportError:
        if not TORCH_OPTIONAL:
            raise
        return None, None
    return torch, torchvision


def require_torch():
    """(torch, torchvision) for a test file that needs them throughout: where the test
    extra leaves them out, the whole file is skipped, with the reason."""
    torch, torchvision = import_torch()
    if torch is None:
        pytest.skip(NO_TORCH, allow_module_level=True)
    return torch, torchvision


needs_torch = pytest.mark.skipif(TORCH_OPTIONAL and import_torch()[0] is None, reason=NO_TORCH)


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


# -- the command line, as a user runs it ------------------------------------------------


def cli_env(env: dict | None = None) -> dict[str, str]:
    """This process's environment on the CPU, with ``env`` on top (None removes a variable)."""
    merged = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return {k: v for k, v in merged.items() if v is not None}


def cli_command(module: str, *args) -> list[str]:
    """``python -m module args`` with this interpreter, for `subprocess.Popen`."""
    return [sys.executable, "-m", module, *map(str, args)]


def run_cli(
    module: str, *args, env: dict | None = None, cwd=REPO, timeout: float = 600, **popen
) -> subprocess.CompletedProcess:
    """``python -m module args`` run to the end as a user runs it (from the checkout, on
    the CPU: `cli_env`), stdout and stderr captured as text."""
    return subprocess.run(
        cli_command(module, *args),
        env=cli_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def main_args(
    workdir, *flags: str, config: str | None = "resnet", overrides: dict | None = None
) -> list[str]:
    """``stagejax.main``'s arguments: ``configs/<config>.py`` (none if None), the workdir,
    ``--config.K=V`` for each override, then ``flags``."""
    head = [f"--config={REPO / 'configs' / f'{config}.py'}"] if config else []
    fields = [f"--config.{k}={v}" for k, v in (overrides or {}).items()]
    return [*head, f"--workdir={workdir}", *fields, *flags]


def run_main(
    workdir, *flags: str, config: str | None = "resnet", overrides: dict | None = None, **kw
) -> subprocess.CompletedProcess:
    """`run_cli` of ``stagejax.main`` with `main_args` (``kw``: env, cwd, timeout)."""
    return run_cli(
        "stagejax.main", *main_args(workdir, *flags, config=config, overrides=overrides), **kw
    )


def error_line(res: subprocess.CompletedProcess, returncode: int | None = None) -> str:
    """The run failed (with ``returncode`` if given) with exactly one ``error:`` line, last
    on stderr, and no traceback; that line."""
    if returncode is None:
        assert res.returncode != 0, res.stderr[-3000:]
    else:
        assert res.returncode == returncode, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    return errors[0]


# -- checkpoints of a finished run, compared bit for bit ---------------------------------


def latest_state(workdir: Path) -> tuple[int, dict]:
    """The newest latest-checkpoint step and its full train state (params, batch
    statistics, optimizer state, step, RNG) as numpy."""
    import jax
    import orbax.checkpoint as ocp

    root = workdir / "checkpoints" / "latest"
    step = max(int(p.name) for p in root.iterdir() if p.name.isdigit())
    with ocp.StandardCheckpointer() as ckptr:
        return step, jax.device_get(ckptr.restore(root / str(step) / "state"))


def best_model(workdir: Path) -> dict:
    import jax
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return jax.device_get(ckptr.restore(workdir / "best_model" / "weights"))


def assert_trees_equal(a, b, what: str) -> None:
    import jax
    import numpy as np

    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, f"{what}: different tree structure"
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=what)


class FakeCompiled:
    """A compiled train step whose memory analysis says 24.5 GiB (24 of temporaries)."""

    def memory_analysis(self):
        from stagejax.train.memory import GIB

        return type(
            "Stats",
            (),
            dict(
                temp_size_in_bytes=24 * GIB,
                argument_size_in_bytes=GIB // 2,
                output_size_in_bytes=GIB // 2,
                alias_size_in_bytes=GIB // 2,
            ),
        )()


# -- a drawn section, for the tubule detector --------------------------------------------

DRAWN_MPP = 2.0  # um/px of the drawn sections


def draw_section(rng, radius_um=95.0, size_um=(1400, 1100), stain=(0.30, 0.55, 0.25)):
    """A section drawn directly: touching purple discs with a pale lumen on pink stroma,
    inside an elliptical tissue outline on white glass. Returns (RGB, truth objects)."""
    import numpy as np
    from shapely.geometry import Point

    from stagejax.slides import SlideObject

    mpp = DRAWN_MPP
    w, h = int(size_um[0] / mpp), int(size_um[1] / mpp)
    yy, xx = np.mgrid[0:h, 0:w] * mpp
    cx, cy = size_um[0] / 2, size_um[1] / 2
    tissue = ((xx - cx) / (0.46 * size_um[0])) ** 2 + ((yy - cy) / (0.45 * size_um[1])) ** 2 < 1
    od = np.zeros((h, w, 3), np.float32)
    od[tissue] = (0.05, 0.12, 0.06)  # pink interstitium
    truth, step = [], 2 * radius_um + 4
    for j, y in enumerate(np.arange(cy % step, size_um[1], step * 0.87)):
        for x in np.arange((j % 2) * step / 2 + cx % step, size_um[0], step):
            x0, y0 = x + rng.uniform(-3, 3), y + rng.uniform(-3, 3)
            r = radius_um * rng.uniform(0.9, 1.0)
            inside = np.hypot(xx - x0, yy - y0) < r
            if not ((inside & tissue).sum() > 0.95 * inside.sum() > 0):
                continue
            lumen = np.hypot(xx - x0, yy - y0) < 0.3 * r
            od[inside & ~lumen] = stain
            od[lumen] = (0.03, 0.06, 0.04)
            circle = Point(x0 / mpp, y0 / mpp).buffer(r / mpp, quad_segs=16)
            truth.append(SlideObject(geometry=circle, object_type="annotation"))
    od *= rng.uniform(0.7, 1.3, od.shape[:2])[..., None].astype(np.float32)  # nuclei-like grain
    rgb = np.clip(255 * 10**-od, 0, 255).astype(np.uint8)
    return rgb, truth


# -- tests/train_probe.py: one training configuration in processes of its own ------------

PROBE = str(REPO / "tests" / "train_probe.py")


def tree_bytes(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for folders): equal before and
    after a command that must leave the folder as it found it."""
    return {
        str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


def free_port() -> int:
    """A TCP port free on this machine now, for a JAX coordinator."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_probe(tmp_path: Path, name: str, data, *extra: str, procs: int = 1, timeout=600):
    """Train with tests/train_probe.py in ``procs`` processes (the number of fake devices
    and the distributed runtime are fixed at JAX start); (leaves, losses, traces)."""
    import numpy as np

    out = tmp_path / f"{name}.npz"
    base = [sys.executable, PROBE, "--out", str(out), "--data", str(data)]
    base += ["--cache", str(tmp_path / "cache"), *extra]
    if procs == 1:
        res = subprocess.run(base, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, res.stderr[-3000:]
    else:
        port = free_port()
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


# The files that take longest, started first: pytest runs on two workers, one file per
# worker at a time (pyproject.toml), and a long file started last would run alone.
LONGEST_FIRST = (  # measured with --durations=0, 2026-12-07
    "test_train_all_models.py",
    "test_section_mode.py",
    "test_parallel.py",
    "test_resume.py",
    "test_remat.py",
    "test_real_sections.py",
    "test_reliability.py",
    "test_workdir_safety.py",
    "test_convert.py",
    "test_benchmark_commands.py",
    "test_stain.py",
    "test_gpu_suite.py",
    "test_config.py",
    "test_multiprocess_failure.py",
    "test_detect_unet.py",
    "test_simulate.py",
)


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
