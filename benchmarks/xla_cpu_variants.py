"""The XLA:CPU variants `benchmarks.xla_cpu` measures, and the probe that says
whether XLA accepts each one.

Why a probe: a flag XLA does not know, or a value it cannot parse, aborts the
process when the backend starts, and some accepted settings crash later (the
oneDNN dot fusion at exit, in some runs). Each variant is started once in a
child with a 3x3 convolution forward and backward: refused (XLA's own reason
line kept), crashed or accepted, and whether the convolution's results are
bit-identical to the default's -- a flag that leaves them so did not change
the convolution path. Flag values are as jaxlib 0.10.2 spells them; its
default already sends convolutions to YNNPACK (XNNPACK's successor: the ynn
fusion list holds individual_convolution), which ``eigen_conv`` takes away.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np

from benchmarks import common

CHILD_MODULE = "benchmarks.xla_cpu"  # whose --child runs `probe_child`
NHWC = ("NHWC", "HWIO", "NHWC")
log = logging.getLogger("xla_cpu")

_YNN = "--xla_cpu_experimental_ynn_fusion_type"


@dataclasses.dataclass(frozen=True)
class Variant:
    flags: tuple[str, ...] = ()
    cores: int | None = None  # pin to this many cores (None: all)
    note: str = ""


VARIANTS = {
    "default": Variant(note="jaxlib's own settings (YNNPACK convolutions, XNNPACK off)"),
    "eigen_conv": Variant((f"{_YNN}=-individual_convolution",), note="convolutions on Eigen"),
    "ynn_off": Variant((f"{_YNN}=",), note="no YNNPACK fusions at all"),
    "onednn": Variant(("--xla_cpu_use_onednn=true",), note="oneDNN thunks"),
    "onednn_conv": Variant(
        (
            "--xla_cpu_use_onednn=true",
            "--xla_cpu_experimental_onednn_fusion_type=individual_convolution",
            f"{_YNN}=-individual_convolution",
        ),
        note="oneDNN thunks offered the convolutions",
    ),
    "onednn_dot": Variant(
        ("--xla_cpu_use_onednn=true", "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise"),
        note="oneDNN dot and elementwise fusions",
    ),
    "onednn_custom_call": Variant(
        ("--xla_cpu_experimental_onednn_custom_call=true",), note="the oneDNN custom-call path"
    ),
    "xnnpack": Variant(("--xla_cpu_use_xnnpack=true",), note="XNNPACK on"),
    "xnnpack_graph": Variant(
        (
            "--xla_cpu_use_xnnpack=true",
            "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
        ),
        note="XNNPACK on, greedy XNN graph fusion",
    ),
    "xnnpack_off": Variant(("--xla_cpu_use_xnnpack=false",), note="XNNPACK off (the default)"),
    "eigen_1thread": Variant(
        ("--xla_cpu_multi_thread_eigen=false",), note="Eigen kernels single-threaded"
    ),
    "fast_math": Variant(("--xla_cpu_enable_fast_math=true",), note="fast math"),
    "fast_runtime": Variant(
        ("--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",), note="optimisation preset"
    ),
    "legacy_runtime": Variant(
        ("--xla_cpu_use_thunk_runtime=false",), note="deprecated: XLA ignores it"
    ),
    "codegen_split1": Variant(
        ("--xla_cpu_parallel_codegen_split_count=1",), note="compile-time only"
    ),
    "cores1": Variant(cores=1, note="XLA's thread pool on 1 core (CPU affinity)"),
}
# What a full run measures (about 11 minutes on 2 quiet cores); the rest on request.
DEFAULT_VARIANTS = "default,eigen_conv,onednn,onednn_custom_call,xnnpack,eigen_1thread,cores1"


def parse_added(items: list[str]) -> dict[str, Variant]:
    """``--add_variant NAME=FLAGS`` -> variants."""
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip() or name.strip() in VARIANTS:
            raise ValueError(f"--add_variant: {item!r} is not NEW_NAME=FLAGS")
        out[name.strip()] = Variant(tuple(text.split()), note="added on the command line")
    return out


def child_env(variant: Variant) -> dict[str, str]:
    """A child's environment: exactly the variant's XLA flags, on the CPU."""
    return {"XLA_FLAGS": " ".join(variant.flags), "JAX_PLATFORMS": "cpu"}


def child_job(job: dict, variant: Variant) -> dict:
    """The job with the cores the child pins itself to before JAX starts."""
    cores = sorted(os.sched_getaffinity(0))
    return {**job, "cores": cores[: variant.cores] if variant.cores else cores}


def probe_child(job: dict) -> dict:
    """Start JAX and run a 3x3 convolution forward and backward: bit patterns of
    the results tell whether a variant changes the convolution path."""
    import hashlib

    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 28, 28, 64), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 64, 64), np.float32))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)

    y = jax.jit(conv)(x, w)
    dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))(x, w)
    named = {"forward": y, "input_grad": dx, "weight_grad": dw}
    digest = {k: hashlib.sha1(np.asarray(v).tobytes()).hexdigest()[:12] for k, v in named.items()}
    return {"conv_digest": digest, "backend": jax.default_backend()}


def classify(returncode: int, stdout: str, stderr: str) -> dict:
    """A probe's outcome from its exit status and output: accepted, refused (XLA
    would not parse the flags) or crashed, with XLA's own reason line."""
    result = None
    for line in stdout.splitlines():
        if line.startswith(common.RESULT_PREFIX):
            result = json.loads(line[len(common.RESULT_PREFIX) :])
    fatal = [ln for ln in stderr.splitlines() if re.match(r"^[EF]\d{4} ", ln)]
    reason = next((ln for ln in fatal if "Illegal value" in ln or "Unknown flag" in ln), None)
    reason = reason or (fatal[-1] if fatal else None)
    warnings = [ln.split("] ", 1)[-1] for ln in stderr.splitlines() if "no longer supported" in ln]
    if returncode == 0 and result is not None:
        return {"status": "accepted", **result, **({"warnings": warnings} if warnings else {})}
    parse_failure = any(k in stderr for k in ("Unknown flag in XLA_FLAGS", "Flag parsing failed"))
    out = {"status": "refused" if parse_failure else "crashed", "returncode": returncode}
    if result is not None:
        out.update(result, crashed_after_result=True)
    out["reason"] = (reason.split("] ", 1)[-1] if reason else stderr.strip()[-300:])[:300]
    return out


def probe(name: str, variant: Variant, timeout: float = 120) -> dict:
    """Run the probe child for ``variant``; never raises for a refused flag."""
    job = child_job({"role": "probe"}, variant)
    cmd = [sys.executable, "-m", CHILD_MODULE, "--child", json.dumps(job)]
    env = {**os.environ, "PYTHONPATH": common.child_pythonpath(), **child_env(variant)}
    try:
        proc = subprocess.run(
            cmd, cwd=common.REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"status": "crashed", "reason": f"probe timed out after {timeout:.0f} s"}
    out = classify(proc.returncode, proc.stdout, proc.stderr)
    log.info("probe %s (%s): %s", name, " ".join(variant.flags), out["status"])
    return {"xla_flags": " ".join(variant.flags), "cores": variant.cores, **out}


def run_probes(variants: dict[str, Variant]) -> dict[str, dict]:
    probes = {name: probe(name, v) for name, v in variants.items()}
    base = probes.get("default", {}).get("conv_digest")
    for p in probes.values():
        if base and "conv_digest" in p:
            p["conv_results_differ_from_default"] = p["conv_digest"] != base
    return probes
