"""stagejax's XLA:CPU defaults (`stagejax.runtime.xla_flags`) and `benchmarks.xla_cpu`.

The default flag list is empty until the benchmark has decided it, so the
mechanism is tested here with a non-empty one: a user's flag of the same name
wins, the others are merged in, merging is idempotent, and nothing is added
off the CPU or on another jaxlib. The benchmark's children run as they do in
a real run (subprocesses, XLA_FLAGS set before JAX starts), at toy sizes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import common, xla_cpu
from benchmarks import xla_cpu_report as report
from benchmarks import xla_cpu_variants as variants
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


def test_the_shipped_default_is_the_measured_flag_and_the_user_still_wins():
    # benchmarks/xla_cpu.py chose it on quiet cores (RESULTS.md, "XLA:CPU options").
    eigen = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
    assert xla_flags.CPU_DEFAULT_XLA_FLAGS == (eigen,)
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
from benchmarks import common
from stagejax.runtime import xla_flags
from tests.conftest import REPO
xla_flags.CPU_DEFAULT_XLA_FLAGS = {DEFAULTS!r}
xla_flags.CPU_DEFAULTS_JAXLIB = common.versions(["jaxlib"])["jaxlib"]
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


# --- the benchmark ---------------------------------------------------------------------


def test_classify_probe_outcomes():
    ok = common.RESULT_PREFIX + '{"conv_digest": {"forward": "ab"}}'
    assert variants.classify(0, ok, "")["status"] == "accepted"
    bad = "F1201 12:00:00.0 1 parse_flags_from_env.cc:234] Unknown flag in XLA_FLAGS: --x=1"
    out = variants.classify(1, "", "noise\n" + bad)
    assert out["status"] == "refused"
    assert out["reason"] == "Unknown flag in XLA_FLAGS: --x=1"
    crash = "F1201 12:00:00.0 1 object_pool.h:117] Check failed: x"
    out = variants.classify(-6, ok, crash)
    assert out["status"] == "crashed" and out["crashed_after_result"]


def test_a_refused_flag_is_reported_as_refused():
    bogus = variants.Variant(("--xla_cpu_no_such_flag_in_any_xla=true",))
    out = variants.probe("bogus", bogus, timeout=120)
    assert out["status"] == "refused"
    assert "xla_cpu_no_such_flag_in_any_xla" in out["reason"]
    assert variants.probe("default", variants.VARIANTS["default"])["status"] == "accepted"


def test_torch_slots_spread_the_rounds():
    assert xla_cpu.torch_slots(9, 2) == {0, 9}
    assert xla_cpu.torch_slots(8, 3) == {0, 4, 8}
    assert xla_cpu.torch_slots(5, 1) == {0}
    assert xla_cpu.torch_slots(5, 0) == set()


def test_the_jax_child_for_a_tiny_variant(tmp_path):
    """prepare (torch) then one JAX variant's child, resnet18 at 32 px, 1 rep."""
    job = {
        "workdir": str(tmp_path),
        "model": "resnet18",
        "predict_sizes": [32],
        "check_size": 32,
        "batch": 2,
        "train_size": 32,
        "train_batches": [12],
        "torch_train": ["tuned"],
        "steps": 1,
        "warmup": 1,
        "seed": 0,
        "tolerance": 1e-4,
    }
    prep = common.run_child(xla_cpu.MODULE, {**job, "role": "prepare"}, timeout=300)
    assert "error" not in prep, prep
    variant = variants.VARIANTS["eigen_conv"]
    sub = variants.child_job({**job, "role": "jax", "variant": "eigen_conv"}, variant)
    out = common.run_child(xla_cpu.MODULE, sub, timeout=300, env=variants.child_env(variant))
    assert "error" not in out, out
    assert out["xla_flags"] == " ".join(variant.flags)
    for key in ("logits_max_abs_diff", "logits_max_abs_diff_float64", "logits_pass"):
        assert key in out
    assert 0 <= out["logits_max_abs_diff"] < 1e-3
    for cell in (out["predict"]["32"], out["train"]["12"]):
        assert cell["images_per_s"] > 0 and len(cell["times_s"]) == 1
        assert {"first_call_s", "load_before", "load_after"} <= set(cell)

    # The report reads it with a torch round beside it.
    torch_round = {
        "predict": {"32": {"eager": {"images_per_s": 1.0}, "channels_last": {"images_per_s": 2.0}}},
        "train": {"12": {"tuned": {"images_per_s": 4.0}}},
        "channels_last_logits": {"logits_max_abs_diff": 1e-6},
    }
    models = {"resnet18": {"prepare": prep, "torch_rounds": [torch_round]}}
    models["resnet18"]["variants"] = {"default": out, "cores1": {"error": "not measured"}}
    data = {"probes": {}, "models": models, "variants": {"default": {"flags": [], "cores": None}}}
    data["ratios"] = report.ratios(models)
    cell = data["ratios"]["resnet18"]["default"]
    assert np.isclose(cell["predict_32"], out["predict"]["32"]["images_per_s"] / 2.0)
    assert np.isclose(cell["train_12"], out["train"]["12"]["images_per_s"] / 4.0)
    data["summary"] = report.summary(data)
    text = report.markdown(data)
    assert "resnet18" in text and "x channels_last" in text and "not measured" in text
