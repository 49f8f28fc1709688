"""Data parallelism: one interface over ``jax.jit`` on a device mesh and ``jax.pmap``.

``jit`` (default): the global batch is one array sharded over a 1-D mesh axis
``data`` spanning every device of every process; the state is replicated, and
XLA inserts the gradient all-reduce. BatchNorm statistics are then computed
over the global batch with no extra code.

``pmap``: the state carries a leading device axis, each device gets
``global_batch / device_count`` examples, and gradients and BatchNorm
statistics are averaged over the named axis ``batch``.

Both take process-local numpy batches (what the Grain loader yields on each
host) and hand back host values in the same layout, so the training loop does
not care which is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stagejax.errors import ConfigError

PMAP_AXIS = "batch"


class Parallel:
    """How state and batches are laid out on the devices."""

    def __init__(
        self,
        mode: str,
        global_batch_size: int,
        eval_batch_size: int | None = None,
        local: bool = False,
    ):
        """``local``: this process's devices only (each process works on its own
        data, e.g. its own slides), with no collective across processes."""
        if mode not in ("jit", "pmap"):
            raise ConfigError(f"config.parallelism: {mode!r} is not one of 'jit', 'pmap'")
        self.local = local or jax.process_count() == 1
        devices = jax.local_devices() if self.local else jax.devices()
        n = len(devices)
        for field, size in (
            ("global_batch_size", global_batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if size is not None and size % n:
                raise ConfigError(
                    f"config.{field}: {size} does not divide by the {n} devices "
                    f"({1 if self.local else jax.process_count()} process(es)); use a "
                    f"multiple of {n}"
                )
        self.mode = mode
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // (1 if self.local else jax.process_count())
        if mode == "jit":
            # Auto axes: XLA propagates the batch sharding (classic GSPMD), so the
            # model code needs no sharding annotations.
            self.mesh = jax.make_mesh(
                (n,), ("data",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,)
            )
            self.data_sharding = NamedSharding(self.mesh, P("data"))
            self.replicated = NamedSharding(self.mesh, P())
        else:
            self.mesh = None

    @property
    def bn_axis_name(self) -> str | None:
        return PMAP_AXIS if self.mode == "pmap" else None

    # -- state ------------------------------------------------------------
    def put_state(self, state: Any) -> Any:
        """Host (or single-device) state -> the layout the step expects."""
        if self.mode == "jit":
            return jax.device_put(state, self.replicated)
        # Placed exactly as the pmapped step returns it (a named sharding over this
        # host's devices), so the step is not traced a second time on step 2.
        d = jax.local_device_count()
        stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (d, *np.shape(x))), state)
        local = jax.sharding.Mesh(np.array(jax.local_devices()), (PMAP_AXIS,))
        return jax.device_put(stacked, NamedSharding(local, P(PMAP_AXIS)))

    def host_state(self, state: Any) -> Any:
        """The state as one copy, for checkpoints and export."""
        if self.mode == "jit":
            return state
        return jax.tree.map(
            lambda x: (
                np.asarray(x.addressable_shards[0].data)[0]
                if hasattr(x, "addressable_shards")
                else x[0]
            ),
            state,
        )

    # -- batches ----------------------------------------------------------
    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """A process-local numpy batch -> global (jit) or per-device (pmap) arrays."""
        if self.mode == "jit":
            return {
                k: jax.make_array_from_process_local_data(self.data_sharding, v)
                for k, v in batch.items()
            }
        d = jax.local_device_count()
        return {k: np.asarray(v).reshape(d, -1, *v.shape[1:]) for k, v in batch.items()}

    def put_resident(self, array: np.ndarray) -> jax.Array:
        """A host array that every device keeps whole, uploaded once (the training
        split of `data.on_device`): replicated over the mesh (jit), or one copy per
        local device on a leading axis (pmap). Each process gives its own devices'
        copies, so no process needs another's data."""
        if self.mode == "jit":
            return jax.make_array_from_callback(array.shape, self.replicated, lambda i: array[i])
        d = jax.local_device_count()
        local = jax.sharding.Mesh(np.array(jax.local_devices()), (PMAP_AXIS,))
        stacked = np.broadcast_to(array, (d, *array.shape))
        return jax.device_put(stacked, NamedSharding(local, P(PMAP_AXIS)))

    def prefetch(self, batches: Iterator[dict], size: int = 2) -> Iterator[dict]:
        """Keep ``size`` batches in flight to the devices (device_put is asynchronous)."""
        queue: list[dict] = []
        for batch in batches:
            queue.append(self.put_batch(batch))
            if len(queue) > size:
                yield queue.pop(0)
        yield from queue

    def gather(self, tree: Any) -> Any:
        """Device outputs of a step -> numpy on every host, flattened to [global_batch, ...]."""
        if not self.local:
            tree = multihost_utils.process_allgather(tree, tiled=True)
        tree = jax.device_get(tree)
        if self.mode == "pmap":
            tree = jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), tree)
        return tree

    # -- compilation ------------------------------------------------------
    def compile_train_step(self, fn: Callable) -> Callable:
        if self.mode == "jit":
            return jax.jit(
                fn,
                in_shardings=(self.replicated, self.data_sharding),
                out_shardings=(self.replicated, self.replicated),
                donate_argnums=0,
            )
        return jax.pmap(fn, axis_name=PMAP_AXIS, donate_argnums=0)

    def compile_resident_fn(self, fn: Callable) -> Callable:
        """``fn(resident, batch) -> batch``: ``resident`` from `put_resident`, ``batch``
        and the result laid out as `put_batch` lays out a batch."""
        if self.mode == "jit":
            return jax.jit(
                fn,
                in_shardings=(self.replicated, self.data_sharding),
                out_shardings=self.data_sharding,
            )
        return jax.pmap(fn, axis_name=PMAP_AXIS)

    def compile_eval_step(self, fn: Callable) -> Callable:
        if self.mode == "jit":
            return jax.jit(
                fn,
                in_shardings=(self.replicated, self.data_sharding),
                out_shardings=self.data_sharding,
            )
        return jax.pmap(fn, axis_name=PMAP_AXIS)

    def metrics_to_host(self, metrics: Any) -> Any:
        """Per-step scalars -> host floats (pmap: already averaged, take device 0)."""
        metrics = jax.device_get(metrics)
        if self.mode == "pmap":
            metrics = jax.tree.map(lambda x: np.asarray(x)[0], metrics)
        return metrics
