"""stagejax's default XLA:CPU flags, merged into ``XLA_FLAGS`` before JAX starts.

Why before: XLA reads ``XLA_FLAGS`` once, when the first backend starts; a
flag set later does nothing. Why a user's flag wins: whoever sets
``XLA_FLAGS=--xla_cpu_...=...`` by hand means it, so a default is added only
when the user's flags do not name the same flag. Why pinned to a jaxlib
version: an XLA flag that a jaxlib does not know aborts the process at
startup, and the meaning of the ones it knows changes between releases, so
the defaults apply only to the jaxlib they were measured with.

Why CPU only, decided without starting a backend: on an accelerator the CPU
flags would only touch host-side work, and asking JAX for its devices would
start the backends before the flags are in place. JAX's platform setting
(``JAX_PLATFORMS``) and the accelerator plugins that are installed decide.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pkgutil
import re
from collections.abc import MutableMapping, Sequence
from importlib import metadata

log = logging.getLogger(__name__)

# The XLA:CPU flags stagejax sets by default, each "--name=value", as a one-off
# study chose them on quiet cores (benchmarks/RESULTS.md, "XLA:CPU options against
# PyTorch", 2026-12-01; its script since removed): convolutions through XLA's own
# (Eigen) kernels instead of YNNPACK's, 1.22x the default's speed (geometric mean
# over ResNet-18/50 prediction and training), logits within 2.3e-5 of PyTorch's.
CPU_DEFAULT_XLA_FLAGS: tuple[str, ...] = (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
)
# The jaxlib the list above was measured with; with another one it is not applied.
CPU_DEFAULTS_JAXLIB = "0.10.2"

_FLAG_NAME = re.compile(r"(?:^|\s)--?([A-Za-z_][A-Za-z0-9_]*)")


def flag_names(xla_flags: str) -> set[str]:
    """The flag names an ``XLA_FLAGS`` string sets (``--a=1 --b`` -> {a, b})."""
    return set(_FLAG_NAME.findall(xla_flags))


def merge_xla_flags(defaults: Sequence[str], xla_flags: str) -> str:
    """``xla_flags`` with each of ``defaults`` appended whose name it does not set.

    The user's string is kept as it is (their values, their order) and comes
    first; merging twice gives the same string as merging once.
    """
    names = flag_names(xla_flags)
    added = []
    for flag in defaults:
        found = flag_names(flag)
        if len(found) != 1 or not flag.startswith("--"):
            raise ValueError(f"not one XLA flag of the form --name=value: {flag!r}")
        name = found.pop()
        if name not in names:
            added.append(flag)
            names.add(name)
    return " ".join([xla_flags.strip(), *added]).strip() if added else xla_flags


def cpu_only(platforms: str | None, accelerator_plugins: Sequence[str]) -> bool:
    """Whether JAX will run on the CPU: ``platforms`` (JAX_PLATFORMS, e.g. "cpu"
    or "cuda,cpu") names only the CPU, or, when unset, no accelerator plugin is
    installed."""
    if platforms:
        return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
    return not accelerator_plugins


def installed_accelerator_plugins() -> list[str]:
    """The JAX accelerator plugins installed (CUDA, ROCm, TPU, ...), found as JAX
    finds them but without importing them: the ``jax_plugins`` namespace
    packages, the ``jax_plugins`` entry points, and libtpu."""
    found = [ep.name for ep in metadata.entry_points(group="jax_plugins")]
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        found += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
    if importlib.util.find_spec("libtpu") is not None:
        found.append("libtpu")
    return sorted(set(found))


def cpu_xla_flags(
    xla_flags: str,
    platforms: str | None,
    accelerator_plugins: Sequence[str],
    jaxlib_version: str,
    defaults: Sequence[str] | None = None,
    measured_jaxlib: str | None = None,
) -> str:
    """The ``XLA_FLAGS`` to run with: ``xla_flags`` with ``defaults`` (default:
    `CPU_DEFAULT_XLA_FLAGS`) merged in when JAX will run on the CPU with the jaxlib
    they were measured with (``measured_jaxlib``, default `CPU_DEFAULTS_JAXLIB`)."""
    defaults = CPU_DEFAULT_XLA_FLAGS if defaults is None else defaults
    measured_jaxlib = measured_jaxlib or CPU_DEFAULTS_JAXLIB
    if not defaults or not cpu_only(platforms, accelerator_plugins):
        return xla_flags
    if jaxlib_version != measured_jaxlib:
        log.debug(  # nothing a user can act on: said only where debugging asks
            "XLA:CPU defaults %s were measured with jaxlib %s, not %s: not applied",
            " ".join(defaults),
            measured_jaxlib,
            jaxlib_version,
        )
        return xla_flags
    return merge_xla_flags(defaults, xla_flags)


def apply_cpu_defaults(
    environ: MutableMapping[str, str] | None = None, platforms: str | None = None
) -> str | None:
    """Set ``XLA_FLAGS`` in ``environ`` (default: ``os.environ``) as `cpu_xla_flags`
    decides; returns the new value, or None when nothing changed. Must run before
    anything starts a JAX backend. ``platforms``: JAX's platform setting (default:
    the ``JAX_PLATFORMS`` of ``environ``)."""
    env = os.environ if environ is None else environ
    platforms = env.get("JAX_PLATFORMS") if platforms is None else platforms
    now = env.get("XLA_FLAGS", "")
    try:
        jaxlib_version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        jaxlib_version = "unknown"
    plugins = installed_accelerator_plugins() if not platforms else []
    wanted = cpu_xla_flags(now, platforms, plugins, jaxlib_version)
    if wanted == now:
        return None
    env["XLA_FLAGS"] = wanted
    return wanted
