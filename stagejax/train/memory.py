"""Memory pre-flight: will the compiled train step fit on the device?

The train step is compiled ahead of time and its memory analysis (temporaries,
arguments, outputs not aliased to donated inputs) compared with what a device
has: the allocator's limit on GPU/TPU, the host's available RAM on CPU, or
``config.device_memory_gb`` when set (a device shared with other jobs). A step
that cannot fit stops the run before any training with one line naming the
fields to change; an out-of-memory error that still happens at run time is
turned into the same kind of line by ``out_of_memory``.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata
from typing import Any

import jax
import ml_collections

from stagejax.errors import ResourceError

log = logging.getLogger(__name__)

GIB = 2**30
HOST_RAM = "host RAM available"  # the capacity's source on CPU: what is free right now


def _gib(n: float, scale: float | None = None) -> str:
    """GiB with 1 decimal, or 3 when ``scale`` (the line's largest figure) is small."""
    return f"{n / GIB:.1f}" if (scale or n) >= 0.5 * GIB else f"{n / GIB:.3f}"


def step_need(compiled: Any) -> dict[str, int] | None:
    """Bytes per device of one call of ``compiled`` (None if the backend cannot tell)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    outputs = max(stats.output_size_in_bytes - stats.alias_size_in_bytes, 0)
    need = {
        "temporaries": stats.temp_size_in_bytes,
        "arguments": stats.argument_size_in_bytes,
        "outputs": outputs,
    }
    need["total"] = sum(need.values())
    return need


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_capacity(config: ml_collections.ConfigDict) -> tuple[int, str]:
    """(bytes one device may use, where the figure comes from)."""
    if config.device_memory_gb:
        return int(config.device_memory_gb * GIB), "config.device_memory_gb"
    devices = jax.local_devices()
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
    if all(limits):
        return min(limits), f"{devices[0].platform} memory limit"
    # CPU: the devices share the host's RAM.
    return _host_available() // len(devices), HOST_RAM + (
        f" / {len(devices)} devices" if len(devices) > 1 else ""
    )


# Whether remat makes the step fit is not known without compiling it a second time
# (a whole compilation), hence "may": rematerialised, ResNet-50 and MobileNetV3
# need about a third of the temporaries at 224 px (benchmarks/memory.py).
_REMAT_MAY_FIT = "with remat it may fit: each block keeps only its input for the backward pass"
# Older XLA:CPU expands the optimization barriers that keep a block's recomputation
# apart from its forward pass, and CSE then merges the two: remat saves nothing there
# unless this pass is disabled (XLA_FLAGS, before JAX starts).
CPU_REMAT_XLA_FLAG = "--xla_disable_hlo_passes=cse_barrier_expander"
# The jaxlib from which XLA:CPU keeps remat by itself (tests/test_remat.py: jaxlib
# 0.10.2 undoes it, 0.12.0.1 keeps it; 0.11 was not measured and gets the flag).
CPU_KEEPS_REMAT_FROM = (0, 12)


def cpu_undoes_remat(jaxlib_version: str | None = None) -> bool:
    """Whether this jaxlib's XLA:CPU undoes remat without `CPU_REMAT_XLA_FLAG`."""
    version = jaxlib_version or metadata.version("jaxlib")
    major_minor = tuple(int(p) for p in version.split(".")[:2])
    return major_minor < CPU_KEEPS_REMAT_FROM


def xla_flags_for(remat: bool, xla_flags: str, jaxlib_version: str | None = None) -> str:
    """``xla_flags`` with `CPU_REMAT_XLA_FLAG` added when ``remat`` is on and the jaxlib
    needs it (a user's flags are kept; the flag only keeps the optimisation barriers
    that remat places)."""
    if not remat or CPU_REMAT_XLA_FLAG in xla_flags or not cpu_undoes_remat(jaxlib_version):
        return xla_flags
    return f"{xla_flags} {CPU_REMAT_XLA_FLAG}".strip()


def remedies(config: ml_collections.ConfigDict) -> str:
    """The config fields that shrink a train step, as a clause."""
    out = [
        f"config.crop_size ({config.crop_size})",
        f"config.global_batch_size ({config.global_batch_size})",
    ]
    text = "lower " + " or ".join(out)
    extra = []
    if config.precision != "bfloat16":
        extra.append("--config.precision=bfloat16")
    suggest_remat = "remat" in config and not config.remat
    if suggest_remat:
        extra.append("--config.remat=True")
    if extra:
        text += ", or use " + " or ".join(extra)
    if suggest_remat:
        text += f" ({_REMAT_MAY_FIT}{_cpu_remat_note()})"
    return text


def _cpu_remat_note() -> str:
    on_cpu = jax.local_devices()[0].platform == "cpu"
    flag_set = CPU_REMAT_XLA_FLAG in os.environ.get("XLA_FLAGS", "")
    if not on_cpu or flag_set or not cpu_undoes_remat():
        return ""
    return f"; on a CPU only with XLA_FLAGS={CPU_REMAT_XLA_FLAG}"


def check_train_step(
    compiled: Any, config: ml_collections.ConfigDict, resident_bytes: int = 0
) -> None:
    """Log the step's need against the capacity; ``ResourceError`` if it cannot fit.

    ``resident_bytes``: the training split each device already keeps
    (`data.on_device`); the step must fit beside it. (Host RAM available, the
    CPU's capacity, is measured after it was placed, so it is not taken twice.)"""
    if config.remat and _cpu_remat_note():
        log.warning(
            "memory: config.remat is on but XLA:CPU undoes it; set XLA_FLAGS=%s before "
            "starting to keep the memory it saves",
            CPU_REMAT_XLA_FLAG,
        )
    need = step_need(compiled)
    if need is None:
        log.info("memory: this backend gives no estimate of the train step's need")
        return
    capacity, source = device_capacity(config)
    total = need["total"]
    parts = ", ".join(
        f"{k} {_gib(need[k], total)}" for k in ("temporaries", "arguments", "outputs")
    )
    beside = ""
    if resident_bytes:  # the training split kept on the device (data/on_device.py)
        beside = f" free beside the {_gib(resident_bytes)} GiB of training images"
        if not source.startswith(HOST_RAM):  # a limit, not what is free now
            capacity -= resident_bytes
    log.info(
        "memory: train step needs %s GiB per device (%s); device has %s GiB (%s)%s",
        _gib(total),
        parts,
        _gib(capacity),
        source,
        beside,
    )
    if total > capacity:
        off = ", or --config.data_on_device=false" if resident_bytes else ""
        raise ResourceError(
            f"memory: the train step needs {_gib(total)} GiB per device ({parts}) but the "
            f"device has {_gib(capacity)} GiB ({source}){beside}; {remedies(config)}{off}"
        )


def out_of_memory(error: Exception, config: ml_collections.ConfigDict) -> ResourceError | None:
    """The one-line error for a device out-of-memory ``error`` (None for other errors)."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    first = next(
        (line.strip() for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line),
        "RESOURCE_EXHAUSTED",
    )
    return ResourceError(f"out of device memory ({first}); {remedies(config)}")
