"""Training data kept on the devices: decoded once, each batch assembled there.

Why: the Grain path decodes one PNG per example per step (about 20 ms for a
1152 px image on one CPU core, see augment.py), which a fast accelerator
outruns. When the decoded training split fits in a fraction of device memory
(``config.data_on_device_fraction``, 40%), it is decoded once and kept on the
devices as uint8; the host then only runs the stage-balanced sampler and the
per-example random draws, and sends small int arrays per batch (in the main
process: ``num_workers`` is not used on this path).

Same batches as the Grain path, bit for bit: global position ``i`` is read
through the same `StageBalancedSampler` (record key and ``rng``), the same four
draws are taken from that ``rng`` (`augment.sample_train_params`), the crop
start comes from `augment.crop_start` with the record's own height and width,
and the device does only index moves on uint8 (slice, transpose, reversals), in
a small program of its own (`compile_assembly`), so the unchanged train step
gets the very array `TrainCrop` and `Parallel.put_batch` would have given it.
Local batch ``t`` of process ``p`` is slots ``[p*b, (p+1)*b)`` of global batch
``start_step + t``, as `ShardedOrder` gives them: resuming is again starting
at the checkpoint's step, and one or several processes give the same batches.

Images of different sizes are zero-padded to the largest height and width;
the crop start is computed from each image's real size, so a crop never reads
padding. The padding is counted in the size that must fit.

Layout: every device holds the whole split (``jit``: replicated over the
mesh; ``pmap``: one copy per local device on a leading axis), so each device
gathers its own examples with no communication, and each process uploads the
whole split to its own devices. Sharding the split would divide its memory by
the device count but need an all-to-all of images every step.

``config.data_on_device``: ``auto`` (on when it fits; the smallest capacity
over all processes decides, so that every process takes the same path),
``true`` (a ``ConfigError`` before training when it does not fit) or ``false``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stagejax.data.augment import crop_start, sample_train_params
from stagejax.data.sampler import StageBalancedSampler
from stagejax.errors import ConfigError, DatasetError
from stagejax.images import decode_image

log = logging.getLogger(__name__)

CHOICES = ("auto", "true", "false")
BATCH_KEYS = ("index", "top", "left", "k", "flip", "label")

# Per rot90 k (0..3), the moves whose composition is np.rot90(crop, k): an optional
# transpose, then optional reversals of the rows (V) and of the columns (H).
# k=1: V(T(x)); k=2: V(H(x)); k=3: H(T(x)). A vertical flip after it toggles V.
_TRANSPOSE = (False, True, False, True)
_REVERSE_ROWS = (False, True, True, False)
_REVERSE_COLS = (False, False, True, True)


def _gib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


@dataclasses.dataclass(frozen=True)
class Decision:
    """Which path feeds training, and the one line that says why."""

    on: bool
    reason: str
    sizes: np.ndarray | None = None  # int32 [N, 2] height, width; None when not needed


def split_sizes(split) -> np.ndarray:
    """int32 ``[N, 2]`` (height, width) of each training image: the prepared
    index's, or (splits built in memory) from decoding the records."""
    sizes = getattr(split, "sizes", None)
    if sizes is None:
        sizes = [_decode(split.source, i).shape[:2] for i in range(len(split.labels))]
    return np.asarray(sizes, np.int32).reshape(-1, 2)


def resident_bytes(sizes: np.ndarray) -> int:
    """Bytes of the padded uint8 stack one device keeps: N x max H x max W x 3."""
    return int(len(sizes) * int(sizes[:, 0].max()) * int(sizes[:, 1].max()) * 3)


def _smallest_capacity(capacity: int) -> int:
    """The smallest per-device capacity over all processes (MiB-rounded there), so
    that ``auto`` takes the same path everywhere."""
    if jax.process_count() == 1:
        return capacity
    from jax.experimental import multihost_utils

    mib = multihost_utils.process_allgather(np.int32(min(capacity // 2**20, 2**31 - 1)))
    return int(np.min(mib)) * 2**20


def decide(config: ml_collections.ConfigDict, split, capacity: tuple[int, str]) -> Decision:
    """The path for ``config.data_on_device``, the training ``split`` and one device's
    ``(bytes, source)`` (`train.memory.device_capacity`)."""
    mode = config.data_on_device
    if mode not in CHOICES:
        raise ConfigError(f"config.data_on_device: {mode!r}; must be one of {', '.join(CHOICES)}")
    if mode == "false":
        return Decision(False, "training data: Grain loader (config.data_on_device=false)")
    fraction = float(config.data_on_device_fraction)
    sizes = split_sizes(split)
    need = resident_bytes(sizes)
    cap = _smallest_capacity(capacity[0])
    h, w = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    what = (
        f"the decoded training split ({len(sizes)} images, padded to {h}x{w}x3 uint8) "
        f"is {_gib(need)} per device"
    )
    budget = f"{fraction:.0%} of {_gib(cap)} per device ({capacity[1]}): {_gib(fraction * cap)}"
    if need <= fraction * cap:
        return Decision(True, f"training data: on the devices ({what}, within {budget})", sizes)
    if mode == "true":
        raise ConfigError(
            f"config.data_on_device: true, but {what}, more than {budget}; use "
            "--config.data_on_device=auto or false, or raise --config.data_on_device_fraction"
        )
    reason = f"training data: Grain loader ({what}, more than {budget})"
    return Decision(False, reason, sizes)


def _decode(source, i: int) -> np.ndarray:
    record = source[i]
    return decode_image(record["image"], record["file_name"])


def decode_split(split, crop_size: int, sizes: np.ndarray) -> np.ndarray:
    """uint8 ``[N, max H, max W, 3]``: every training image, zero-padded at the
    bottom and right; decoded in threads (PIL releases the GIL while decoding)."""
    h, w = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    stack = np.zeros((len(sizes), h, w, 3), np.uint8)

    def one(i: int) -> None:
        image = _decode(split.source, i)
        if tuple(image.shape[:2]) != tuple(sizes[i]):
            raise DatasetError(
                f"{split.file_names[i]}: decodes to {image.shape[0]}x{image.shape[1]}, "
                f"the dataset index says {sizes[i][0]}x{sizes[i][1]}; delete the cache to rebuild"
            )
        if min(image.shape[:2]) < crop_size:
            raise DatasetError(
                f"{split.file_names[i]}: image is {image.shape[0]}x{image.shape[1]}, "
                f"smaller than crop_size {crop_size}"
            )
        stack[i, : image.shape[0], : image.shape[1]] = image

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        list(pool.map(one, range(len(sizes))))
    return stack


def _example(sampler: StageBalancedSampler, i: int, sizes, config) -> tuple[int, ...]:
    """``(index, top, left, k, flip)`` of global position ``i``: the record and
    the draws `augment.TrainCrop` makes for it, in the same order."""
    meta = sampler[i]
    key = meta.record_key
    shift_y, shift_x, k, flip = sample_train_params(meta.rng, config.crop_range)
    top = crop_start(int(sizes[key, 0]), config.crop_size, shift_y)
    left = crop_start(int(sizes[key, 1]), config.crop_size, shift_x)
    k = k % 4 if config.augment.rot90 else 0
    return key, top, left, k, int(flip and config.augment.flip)


def index_batches(
    labels: np.ndarray,
    sizes: np.ndarray,
    config: ml_collections.ConfigDict,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless per-process int32 batches ``{index, top, left, k, flip, label}`` [B/P],
    steps ``start_step, start_step + 1, ...``; what `assemble` turns into the images of
    `input_pipeline.train_batches` for the same steps."""
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    g = config.global_batch_size
    if g % n:
        raise ConfigError(
            f"config.global_batch_size: {g} is not a positive multiple of the {n} processes"
        )
    local = g // n
    labels = np.asarray(labels, np.int32)
    sampler = StageBalancedSampler(labels, g, config.seed)
    for step in itertools.count(start_step):
        base = step * g + p * local
        rows = np.array([_example(sampler, base + j, sizes, config) for j in range(local)])
        rows = np.concatenate([rows, labels[rows[:, :1]]], axis=1).astype(np.int32)
        yield dict(zip(BATCH_KEYS, rows.T.copy(), strict=True))


def assemble(images: jax.Array, batch: dict, crop_size: int) -> jax.Array:
    """uint8 ``[B, crop, crop, 3]`` from the resident ``images`` [N, H, W, 3] and an
    `index_batches` batch: crop, then rot90 by ``k``, then the vertical flip."""

    def one(i, top, left, k, flip):
        x = jax.lax.dynamic_slice(images, (i, top, left, 0), (1, crop_size, crop_size, 3))[0]
        x = jnp.where(jnp.asarray(_TRANSPOSE)[k], x.transpose(1, 0, 2), x)
        x = jnp.where(jnp.asarray(_REVERSE_ROWS)[k] ^ (flip != 0), x[::-1], x)
        return jnp.where(jnp.asarray(_REVERSE_COLS)[k], x[:, ::-1], x)

    keys = ("index", "top", "left", "k", "flip")
    return jax.vmap(one)(*(batch[k] for k in keys))


def compile_assembly(parallel, crop_size: int) -> Callable:
    """``(images, index batch) -> {'image', 'label'}`` on the devices, laid out as
    ``parallel.put_batch`` lays out a Grain batch.

    A program of its own, not fused into the train step: the step then stays the
    very executable the Grain path runs, fed the same array, so training gives the
    same bits. Fused into the step, XLA compiled the rest of it differently: on 8
    CPU devices (jit and pmap) the third step's loss moved by 5e-7 of itself (on
    one device it did not). An extra launch of index moves per step is the price.
    """

    def fn(images: jax.Array, batch: dict) -> dict:
        return {"image": assemble(images, batch, crop_size), "label": batch["label"]}

    return parallel.compile_resident_fn(fn)


@dataclasses.dataclass(frozen=True)
class ResidentSplit:
    """A training split on the devices and what the host needs to sample from it."""

    images: jax.Array
    sizes: np.ndarray
    labels: np.ndarray
    config: ml_collections.ConfigDict
    parallel: Any
    assembly: Callable

    @property
    def nbytes(self) -> int:
        """Bytes of the split on each device."""
        return resident_bytes(self.sizes)

    def batches(self, start_step: int = 0) -> Iterator[dict]:
        """Device batches ``{'image', 'label'}`` of steps ``start_step, ...``: those of
        ``parallel.prefetch(input_pipeline.train_batches(...))``, bit for bit."""
        index = index_batches(self.labels, self.sizes, self.config, start_step=start_step)
        for batch in self.parallel.prefetch(index):
            yield self.assembly(self.images, batch)


def load(split, config: ml_collections.ConfigDict, parallel, sizes: np.ndarray) -> ResidentSplit:
    """Decode ``split`` once and upload it with ``parallel.put_resident``."""
    stack = decode_split(split, config.crop_size, sizes)
    images = parallel.put_resident(stack)
    log.info(
        "training data: %d images (%s) decoded and placed on %d local device(s)",
        len(sizes),
        _gib(stack.nbytes),
        jax.local_device_count(),
    )
    labels = np.asarray(split.labels, np.int32)
    assembly = compile_assembly(parallel, config.crop_size)
    return ResidentSplit(images, sizes, labels, config, parallel, assembly)
