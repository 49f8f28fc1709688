"""No silent CPU fallback (`stagejax.runtime.accelerator`): a run on the CPU with an
accelerator plugin installed, or a GPU visible, says so in one line; with
``--require_accelerator`` it stops. The plugin is faked with a package record
only (a ``*.dist-info`` folder), which JAX itself never loads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from stagejax.runtime import accelerator
from stagejax.runtime.accelerator import Installed
from tests.conftest import error_line, run_main

MISMATCHED = Installed("0.11.2", "0.11.2", {"jax-cuda12-pjrt": "0.12.0.1"})


def fake_plugin(root: Path, name: str = "jax_cuda12_plugin", version: str = "0.12.0.1") -> Path:
    """A folder that makes ``name`` look installed to importlib.metadata."""
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n"
    )
    return root


def test_a_plugin_beside_a_cpu_backend_is_named_with_every_version():
    line = accelerator.cpu_fallback("cpu", None, MISMATCHED, None)
    assert line.startswith("JAX runs on the CPU only, although jax-cuda12-pjrt is installed")
    assert "jax 0.11.2, jaxlib 0.11.2, jax-cuda12-pjrt 0.12.0.1" in line
    assert "not at jaxlib's version" in line
    assert line.endswith('fix: pip install -e ".[cuda12]" in the stagejax folder')
    assert "\n" not in line
    matched = Installed("0.12.0.1", "0.12.0.1", {"jax-cuda12-plugin": "0.12.0.1"})
    assert "not at jaxlib's version" not in accelerator.cpu_fallback("cpu", "", matched, None)


def test_a_visible_gpu_without_a_plugin_is_named():
    line = accelerator.cpu_fallback("cpu", None, Installed("0.10.2", "0.10.2"), "/dev/nvidia0")
    assert "an NVIDIA GPU is visible (/dev/nvidia0) and no JAX CUDA plugin is installed" in line
    assert 'pip install -e ".[cuda12]"' in line


@pytest.mark.parametrize(
    "platform, setting, packages, gpu",
    [
        ("gpu", None, MISMATCHED, "/dev/nvidia0"),  # on the accelerator: all is well
        ("cpu", "cpu", MISMATCHED, "/dev/nvidia0"),  # the user asked for the CPU
        ("cpu", " cpu ", MISMATCHED, None),
        ("cpu", None, Installed("0.10.2", "0.10.2"), None),  # nothing to fall back from
    ],
)
def test_no_line_when_the_cpu_is_what_was_meant(platform, setting, packages, gpu):
    assert accelerator.cpu_fallback(platform, setting, packages, gpu) is None


def test_the_fix_installs_the_extra_of_the_plugin_found():
    def fix(*names):
        return accelerator.fix_command(Installed("1", "1", dict.fromkeys(names, "1")), None)

    assert '".[cuda13]"' in fix("jax-cuda13-plugin", "jax-cuda13-pjrt")
    assert '".[tpu]"' in fix("libtpu")
    assert "ROCm" in fix("jax-rocm7-plugin")
    # libtpu keeps its own version numbers: never reported as a mismatch.
    assert Installed("0.12.0.1", "0.12.0.1", {"libtpu": "0.0.51"}).mismatched() == []


def test_installed_reads_package_records_without_importing(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_plugin(tmp_path)))
    found = accelerator.installed()
    assert found.plugins["jax-cuda12-plugin"] == "0.12.0.1"
    assert found.jaxlib and found.jax
    assert "jax_cuda12_plugin" not in sys.modules


def test_main_warns_on_a_faked_plugin_and_require_accelerator_stops(tmp_path):
    env = {"PYTHONPATH": str(fake_plugin(tmp_path / "site")), "JAX_PLATFORMS": None}
    # A workdir with no model: the run ends with its own error, after the warning.
    res = run_main(tmp_path / "w", "--mode=eval", config=None, env=env)
    warnings = [ln for ln in res.stderr.splitlines() if "JAX runs on the CPU only" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING"), res.stderr
    assert "jax-cuda12-plugin 0.12.0.1" in warnings[0]
    assert error_line(res, 2).startswith("error: no trained model")
    res = run_main(tmp_path / "w", "--mode=eval", "--require_accelerator", config=None, env=env)
    line = error_line(res, 2)
    assert line.startswith("error: JAX runs on the CPU only, although jax-cuda12-plugin")
    assert line.endswith("(--require_accelerator)")
    assert not (tmp_path / "w").exists()
