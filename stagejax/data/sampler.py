"""Stage-balanced sampling for grain, stateless in the position.

The reference study trains on batches that hold every one of the 12 stages,
each stage drawn from its own shuffled list without replacement and
reshuffled when used up: rare stages repeat, common stages are all seen.
`StageBalancedSampler` does the same, but as a pure function of the global
position ``i`` (grain's `Sampler` protocol), so that any grain worker or JAX
process can compute any position on its own and resuming at step ``k`` needs
no iterator state: it just starts reading at position ``k * global_batch_size``.

Layout of global batch ``b`` (positions ``b*G .. b*G + G-1``, ``G`` the global
batch size, ``m = G // 12`` and ``r = G - 12*m`` leftover slots):

* ``12*m`` mandatory slots, ``m`` per stage. The ``k``-th mandatory draw of
  stage ``s`` (counted over all batches, so ``k = b*m + j``) is element
  ``k % n_s`` of permutation ``k // n_s`` of that stage's images, where
  permutation ``e`` of stage ``s`` is a pure function of ``(seed, s, e)``.
* ``r`` leftover slots, filled the same way from one stream over *all* training
  images (draw ``k = b*r + u``), so leftovers follow the data's own stage
  frequencies and every image is seen through them too. The two streams are
  independent, so an image can appear twice in one batch (always the case for
  a stage with a single image and ``m >= 2``).
* The slots are put in an order drawn from ``(seed, b)``, so that when a batch is
  split between devices each part gets a mix of stages.

`ShardedOrder` is what the grain `DataLoader` is given: it maps the loader's
read positions onto these canonical positions so that, for any number of JAX
processes and grain workers, the per-process batches of one step concatenated in
process order are exactly one global batch (see its docstring for grain's rules).
"""

from __future__ import annotations

import functools
import sys
import zlib

import grain.python as grain
import numpy as np

from stagejax.stages import NUM_STAGES, STAGES

# Stream ids mixed into the seed, so that the random streams never coincide.
_STAGE_STREAM, _LEFTOVER_STREAM, _LAYOUT_STREAM, _RECORD_RNG_STREAM = range(4)


@functools.lru_cache(maxsize=256)
def _permutation(key: tuple[int, ...], n: int) -> np.ndarray:
    """A permutation of range(n) that depends only on ``key`` (cached, read-only)."""
    perm = np.random.default_rng(key).permutation(n)
    perm.flags.writeable = False
    return perm


def _stage_name(stage: int, num_stages: int) -> str:
    return STAGES[stage] if num_stages == NUM_STAGES else str(stage)


class StageBalancedSampler:
    """Every global batch holds every stage at least ``global_batch_size // num_stages`` times.

    Implements grain's `Sampler` protocol: ``sampler[i]`` is the
    `grain.RecordMetadata` of global position ``i`` (batch ``i // global_batch_size``),
    with ``record_key`` the dataset index and ``rng`` a generator seeded by
    ``(seed, i)`` for the host-side augmentation. Endless: ``len`` is ``sys.maxsize``.
    """

    def __init__(self, labels, global_batch_size: int, seed: int, num_stages: int = NUM_STAGES):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError(f"labels: expected a non-empty 1-D array, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels: expected integer class ids, got dtype {labels.dtype}")
        if labels.min() < 0 or labels.max() >= num_stages:
            raise ValueError(
                f"labels: class ids must be in [0, {num_stages}), got "
                f"[{labels.min()}, {labels.max()}]"
            )
        if global_batch_size < num_stages:
            raise ValueError(
                f"global_batch_size: {global_batch_size} is smaller than the "
                f"{num_stages} stages that every batch must hold"
            )
        if int(seed) < 0:
            raise ValueError(f"seed: must be non-negative, got {seed}")
        self._by_stage = [np.flatnonzero(labels == s) for s in range(num_stages)]
        for s, members in enumerate(self._by_stage):
            if members.size == 0:
                raise ValueError(
                    f"labels: stage {_stage_name(s, num_stages)} (class id {s}) "
                    "has no images; every batch must hold every stage"
                )
        self.num_records = labels.size
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.num_stages = num_stages
        self.per_stage = self.global_batch_size // num_stages
        self.num_leftover = self.global_batch_size - self.per_stage * num_stages
        # Identifies the labels in __repr__ (grain compares reprs when restoring state).
        self._labels_crc = zlib.crc32(labels.astype(np.int64).tobytes())

    def __len__(self) -> int:
        return sys.maxsize

    def __repr__(self) -> str:
        return (
            f"StageBalancedSampler(num_records={self.num_records}, "
            f"global_batch_size={self.global_batch_size}, seed={self.seed}, "
            f"num_stages={self.num_stages}, labels_crc32={self._labels_crc})"
        )

    def batch_layout(self, batch: int) -> np.ndarray:
        """Slot ``q`` of ``batch`` holds canonical slot ``layout[q]``: values below
        ``12*m`` are mandatory (stage ``v // m``), the rest leftovers."""
        return _permutation((self.seed, _LAYOUT_STREAM, batch), self.global_batch_size)

    def record_key(self, i: int) -> int:
        """Dataset index at global position ``i`` (closed form, O(1) amortised)."""
        batch, q = divmod(i, self.global_batch_size)
        slot = int(self.batch_layout(batch)[q])
        num_mandatory = self.per_stage * self.num_stages
        if slot < num_mandatory:
            stage, j = divmod(slot, self.per_stage)
            members = self._by_stage[stage]
            k = batch * self.per_stage + j  # Draws of this stage before this one.
            n = members.size
            return int(members[_permutation((self.seed, _STAGE_STREAM, stage, k // n), n)[k % n]])
        k = batch * self.num_leftover + (slot - num_mandatory)
        n = self.num_records
        return int(_permutation((self.seed, _LEFTOVER_STREAM, k // n), n)[k % n])

    def __getitem__(self, i: int) -> grain.RecordMetadata:
        i = int(i)
        if i < 0:
            raise IndexError(f"StageBalancedSampler: negative position {i}")
        rng = np.random.default_rng((self.seed, _RECORD_RNG_STREAM, i))
        return grain.RecordMetadata(index=i, record_key=self.record_key(i), rng=rng)


class ShardedOrder:
    """The sampler to hand to one process's grain `DataLoader`.

    How grain 0.2.x `DataLoader` reads a sampler (data_loader.py, process_prefetch.py):
    with ``ShardOptions(p, P)`` the local element ``l`` of process ``p`` is sampler
    position ``l*P + p``; with ``W > 1`` workers, worker ``w`` gets the local
    elements ``w, w+W, w+2W, ...``, batches them ``b`` at a time, and the main
    process takes whole batches from the workers round-robin (``W`` = 0 or 1: no
    slicing). So the ``t``-th batch of process ``p`` is made of the local elements
    ``l = w + W*(m*b + j)`` with ``w = t % W``, ``m = t // W``, ``j < b``.

    This class inverts that: loader position ``g`` reads canonical position
    ``(start_step + t)*G + p*b + j`` of ``sampler``, i.e. local batch ``t`` of
    process ``p`` is slots ``[p*b, (p+1)*b)`` of global batch ``start_step + t``.
    Starting at ``start_step`` is how training resumes: no iterator state needed,
    valid for any process or worker count.
    """

    def __init__(
        self,
        sampler,
        global_batch_size: int,
        process_count: int = 1,
        worker_count: int = 0,
        start_step: int = 0,
    ):
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size: {global_batch_size} is not divisible by "
                f"the {process_count} processes"
            )
        if start_step < 0:
            raise ValueError(f"start_step: must be non-negative, got {start_step}")
        self.sampler = sampler
        self.global_batch_size = global_batch_size
        self.process_count = process_count
        self.worker_count = max(int(worker_count), 1)
        self.local_batch_size = global_batch_size // process_count
        self.start_step = start_step

    def __len__(self) -> int:
        return sys.maxsize

    def __repr__(self) -> str:
        return (
            f"ShardedOrder({self.sampler!r}, global_batch_size={self.global_batch_size}, "
            f"process_count={self.process_count}, worker_count={self.worker_count}, "
            f"start_step={self.start_step})"
        )

    def canonical_position(self, g: int) -> int:
        local, p = divmod(g, self.process_count)
        k, w = divmod(local, self.worker_count)
        m, j = divmod(k, self.local_batch_size)
        step = self.start_step + m * self.worker_count + w
        return step * self.global_batch_size + p * self.local_batch_size + j

    def __getitem__(self, g: int) -> grain.RecordMetadata:
        return self.sampler[self.canonical_position(int(g))]
