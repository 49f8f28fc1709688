"""No silent CPU fallback: say when JAX runs on the CPU although an accelerator was meant.

Why: installing JAX for a GPU in two steps (``jax[cuda12]``, then a project
that pins another jax) leaves a CUDA plugin of one version beside a jaxlib of
another; JAX then refuses the plugin and trains on the CPU, or crashes while
starting (jax-ml/jax issue 24901). A run that lands on the CPU should say so
in one line, with the versions that disagree and the command that fixes them,
and a cluster job should be able to make that an error (``--require_accelerator``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from stagejax.errors import StagejaxError

log = logging.getLogger(__name__)

# The distributions that bring JAX an accelerator: jax-cuda12-plugin and its pjrt,
# their CUDA 13 and ROCm siblings, and libtpu.
_PLUGIN = re.compile(r"^(jax[-_](cuda|rocm)\d+[-_](plugin|pjrt)|libtpu)$")
# Where a visible NVIDIA GPU shows on Linux (the driver, then the device files).
NVIDIA_FILES = ("/proc/driver/nvidia/version", "/dev/nvidia0")


class AcceleratorError(StagejaxError):
    """An accelerator is required (``--require_accelerator``) but JAX runs on the CPU."""


@dataclass(frozen=True)
class Installed:
    """The JAX packages installed: versions by distribution name (None: not installed)."""

    jax: str | None
    jaxlib: str | None
    plugins: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        names = {"jax": self.jax, "jaxlib": self.jaxlib, **self.plugins}
        return ", ".join(f"{n} {v or 'not installed'}" for n, v in names.items())

    def mismatched(self) -> list[str]:
        """The CUDA/ROCm plugins whose version is not jaxlib's (libtpu has its own)."""
        return [
            f"{name} {version}"
            for name, version in self.plugins.items()
            if name != "libtpu" and version != self.jaxlib
        ]


def installed() -> Installed:
    """What is installed, read from the package metadata (nothing is imported)."""
    plugins = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if _PLUGIN.match(name):
            plugins[name] = dist.version
    return Installed(_version("jax"), _version("jaxlib"), dict(sorted(plugins.items())))


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def nvidia_visible(files: tuple[str, ...] = NVIDIA_FILES) -> str | None:
    """The first of ``files`` that exists (a sign of an NVIDIA GPU), or None."""
    return next((f for f in files if Path(f).exists()), None)


def fix_command(packages: Installed, gpu_file: str | None) -> str:
    """The install line that brings JAX and its plugin at one version."""
    names = " ".join(packages.plugins)
    extra = "tpu" if "libtpu" in names else "cuda13" if "cuda13" in names else "cuda12"
    if "rocm" in names and "cuda" not in names:
        return "reinstall jax, jaxlib and the ROCm plugin at one version"
    if not packages.plugins and not gpu_file:
        return 'pip install -e ".[cuda12]" (or ".[cuda13]", ".[tpu]") in the stagejax folder'
    return f'pip install -e ".[{extra}]" in the stagejax folder'


def cpu_fallback(
    platform: str, platforms_setting: str | None, packages: Installed, gpu_file: str | None
) -> str | None:
    """The line to say when JAX runs on the CPU (``platform``) although a plugin is
    installed or an NVIDIA GPU is visible; None when all is as meant, including a
    user's own ``JAX_PLATFORMS=cpu``."""
    if platform != "cpu" or _only_cpu(platforms_setting):
        return None
    if packages.plugins:
        names = ", ".join(packages.plugins)
        why = f"{names} {'is' if len(packages.plugins) == 1 else 'are'} installed"
    elif gpu_file:
        why = f"an NVIDIA GPU is visible ({gpu_file}) and no JAX CUDA plugin is installed"
    else:
        return None
    note = " (the plugin is not at jaxlib's version)" if packages.mismatched() else ""
    return (
        f"JAX runs on the CPU only, although {why}: {packages.describe()}{note}; "
        f"fix: {fix_command(packages, gpu_file)}"
    )


def _only_cpu(platforms_setting: str | None) -> bool:
    names = {p.strip() for p in (platforms_setting or "").split(",") if p.strip()}
    return names == {"cpu"}


def check(platform: str, platforms_setting: str | None, require: bool) -> None:
    """Warn when JAX runs on this machine's CPU by accident (`cpu_fallback`); with
    ``require``, stop instead, and stop on any CPU run."""
    packages, gpu_file = installed(), nvidia_visible()
    line = cpu_fallback(platform, platforms_setting, packages, gpu_file)
    if require and platform == "cpu":
        line = line or (
            f"JAX runs on the CPU only ({packages.describe()}); "
            f"fix: {fix_command(packages, gpu_file)}"
        )
        raise AcceleratorError(f"{line} (--require_accelerator)")
    if line:
        log.warning("%s", line)
