"""stagejax's XLA:CPU defaults (`stagejax.runtime.xla_flags`).

The mechanism is tested with a made-up flag list: a user's flag of the same name
wins, the others are merged in, merging is idempotent, and nothing is added off
the CPU or on another jaxlib.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import pytest

from stagejax.runtime import xla_flags
from tests.conftest import REPO

DEFAULTS = ("--xla_cpu_enable_fast_math=false", "--xla_cpu_use_xnnpack=false")
VERSION = xla_flags.CPU_DEFAULTS_JAXLIB


def test_flag_names():
    assert xla_flags.flag_names("--a=1  --b -c=x\t--d_e=--f") == {"a", "b", "c", "d_e"}
    assert xla_flags.flag_names("") == set()


def test_merge_adds_defaults_after_the_users_flags():
    merged = xla_flags.merge_xla_flags(DEFAULTS, "--xla_dump_to=/tmp/d")
    assert merged == "--xla_dump_to=/tmp/d " + " ".join(DEFAULTS)
    assert xla_flags.merge_xla_flags(DEFAULTS, "") == " ".join(DEFAULTS)


def test_a_users_flag_of_the_same_name_wins():
    user = "--xla_cpu_use_xnnpack=true"
    merged = xla_flags.merge_xla_flags(DEFAULTS, user)
    assert merged == f"{user} --xla_cpu_enable_fast_math=false"
    assert "--xla_cpu_use_xnnpack=false" not in merged


def test_merge_is_idempotent():
    once = xla_flags.merge_xla_flags(DEFAULTS, "--xla_cpu_use_xnnpack=true")
    assert xla_flags.merge_xla_flags(DEFAULTS, once) == once
    assert xla_flags.merge_xla_flags((), "--x=1 ") == "--x=1 "  # no defaults: untouched


def test_a_malformed_default_is_refused():
    with pytest.raises(ValueError, match="one XLA flag"):
        xla_flags.merge_xla_flags(("--a=1 --b=2",), "")
    with pytest.raises(ValueError, match="one XLA flag"):
        xla_flags.merge_xla_flags(("xla_a=1",), "")


def test_cpu_only():
    assert xla_flags.cpu_only("cpu", ["xla_cuda12"])
    assert not xla_flags.cpu_only("cuda,cpu", [])
    assert xla_flags.cpu_only(None, [])
    assert not xla_flags.cpu_only(None, ["xla_cuda12"])
    assert not xla_flags.cpu_only("", ["libtpu"])


def test_defaults_only_on_the_cpu_with_the_measured_jaxlib():
    def flags(platforms, plugins=(), version=VERSION):
        return xla_flags.cpu_xla_flags("--u=1", platforms, plugins, version, DEFAULTS)

    assert flags("cpu") == "--u=1 " + " ".join(DEFAULTS)
    assert flags("cuda") == "--u=1"
    assert flags(None, ["xla_cuda12"]) == "--u=1"
    assert flags("cpu", version="9.9.9") == "--u=1"
    assert xla_flags.cpu_xla_flags("--u=1", "cpu", [], VERSION, ()) == "--u=1"


def test_the_shipped_default_is_the_measured_flag_and_the_user_still_wins(monkeypatch):
    # Chosen on quiet cores by a study since removed (RESULTS.md, "XLA:CPU options").
    eigen = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
    assert xla_flags.CPU_DEFAULT_XLA_FLAGS == (eigen,)
    assert xla_flags.CPU_DEFAULTS_JAXLIB == "0.10.2"
    # With another jaxlib (e.g. 0.12 on Python 3.12) nothing is added.
    installed = metadata.version("jaxlib")
    if installed != "0.10.2":
        assert xla_flags.apply_cpu_defaults({"XLA_FLAGS": "--u=1"}, platforms="cpu") is None
    # The rest as with the jaxlib it was measured with.
    monkeypatch.setattr(xla_flags, "CPU_DEFAULTS_JAXLIB", installed)
    env = {"XLA_FLAGS": "--u=1"}
    assert xla_flags.apply_cpu_defaults(env, platforms="cpu") == env["XLA_FLAGS"]
    assert env["XLA_FLAGS"].split() == ["--u=1", eigen]
    assert xla_flags.apply_cpu_defaults(env, platforms="cpu") is None  # idempotent
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"}
    assert xla_flags.apply_cpu_defaults(dict(mine), platforms="cpu") is None
    assert xla_flags.apply_cpu_defaults({"XLA_FLAGS": ""}, platforms="cuda") is None


def test_main_merges_the_defaults_before_jax_starts():
    # In a fresh interpreter: stagejax.main defines absl flags (workdir, ...) that
    # other command modules imported by earlier tests also define.
    script = f"""
import os
import subprocess
import sys
from importlib import metadata
from importlib import metadata
from stagejax.runtime import xla_flags
from tests.conftest import REPO
xla_flags.CPU_DEFAULT_XLA_FLAGS = {DEFAULTS!r}
xla_flags.CPU_DEFAULTS_JAXLIB = metadata.version("jaxlib")
from stagejax import main
print(main._cpu_xla_defaults())
print(os.environ["XLA_FLAGS"])
print(main._cpu_xla_defaults())
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_use_xnnpack=true", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    expected = "--xla_cpu_use_xnnpack=true --xla_cpu_enable_fast_math=false"
    # the merged value, the environment after it, and None: a second call changes nothing
    assert res.stdout.splitlines()[-3:] == [expected, expected, "None"]
