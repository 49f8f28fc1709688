"""StageBalancedSampler: balance, without-replacement coverage, statelessness, and
exact global batches through grain's DataLoader for any process/worker count."""

import math

import grain.python as grain
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stagejax.data.input_pipeline import ensure_absl_flags_parsed
from stagejax.data.sampler import ShardedOrder, StageBalancedSampler

NUM_STAGES = 12


@st.composite
def label_arrays(draw, max_per_stage=12):
    """Shuffled labels with every stage present, one stage with a single image."""
    counts = draw(st.lists(st.integers(1, max_per_stage), min_size=12, max_size=12))
    counts[draw(st.integers(0, 11))] = 1
    labels = np.repeat(np.arange(NUM_STAGES), counts)
    return np.random.default_rng(draw(st.integers(0, 1000))).permutation(labels)


def batch_keys(sampler, b):
    g = sampler.global_batch_size
    return [sampler[i].record_key for i in range(b * g, (b + 1) * g)]


@settings(max_examples=30, deadline=None)
@given(labels=label_arrays(), g=st.integers(12, 96), seed=st.integers(0, 2**31))
def test_every_batch_holds_every_stage(labels, g, seed):
    sampler = StageBalancedSampler(labels, g, seed)
    for b in range(5):
        keys = batch_keys(sampler, b)
        assert len(keys) == g
        assert all(0 <= k < labels.size for k in keys)
        counts = np.bincount(labels[keys], minlength=NUM_STAGES)
        assert counts.min() >= g // NUM_STAGES, (b, counts)


@settings(max_examples=30, deadline=None)
@given(labels=label_arrays(max_per_stage=30), g=st.integers(12, 96), seed=st.integers(0, 2**31))
def test_each_stage_is_drawn_without_replacement(labels, g, seed):
    sampler = StageBalancedSampler(labels, g, seed)
    m = g // NUM_STAGES
    for s in range(NUM_STAGES):
        members = set(np.flatnonzero(labels == s).tolist())
        # Black box: within ceil(n_s / m) batches every image of the stage appears.
        num_batches = math.ceil(len(members) / m)
        seen = {k for b in range(num_batches) for k in batch_keys(sampler, b)}
        assert members <= seen, s
        # The mandatory draws of stage s, in draw order, are back-to-back permutations.
        draws = {}
        for b in range(2 * num_batches):
            layout = sampler.batch_layout(b)
            for q in np.flatnonzero((layout >= s * m) & (layout < (s + 1) * m)):
                draws[b * m + int(layout[q]) - s * m] = sampler[b * g + int(q)].record_key
        seq = [draws[k] for k in range(len(draws))]
        n = len(members)
        for start in range(0, len(seq) - n + 1, n):
            assert sorted(seq[start : start + n]) == sorted(members)


@settings(max_examples=15, deadline=None)
@given(labels=label_arrays(), g=st.integers(13, 96), seed=st.integers(0, 2**31))
def test_leftover_slots_cycle_through_all_images(labels, g, seed):
    sampler = StageBalancedSampler(labels, g, seed)
    r = sampler.num_leftover
    if r == 0:
        return
    num_mandatory = NUM_STAGES * sampler.per_stage
    leftovers = []
    for b in range(math.ceil(labels.size / r)):
        layout = sampler.batch_layout(b)
        order = np.argsort(layout)[num_mandatory:]  # Leftover slots by draw number.
        leftovers += [sampler[b * g + int(q)].record_key for q in order]
    assert sorted(leftovers[: labels.size]) == list(range(labels.size))


@settings(max_examples=10, deadline=None)
@given(
    labels=label_arrays(),
    g=st.integers(12, 96),
    seed=st.integers(0, 2**31),
    order_seed=st.integers(0, 100),
)
def test_stateless_in_position(labels, g, seed, order_seed):
    positions = np.arange(6 * g)
    forward = StageBalancedSampler(labels, g, seed)
    expected = [(forward[i].record_key, forward[i].rng.integers(2**62)) for i in positions]
    shuffled = np.random.default_rng(order_seed).permutation(positions)
    fresh = StageBalancedSampler(labels.copy(), g, seed)
    got = {int(i): (fresh[i].record_key, fresh[i].rng.integers(2**62)) for i in shuffled}
    assert [got[i] for i in positions] == expected
    assert fresh[3].index == 3


def test_seed_changes_the_order():
    labels = np.repeat(np.arange(NUM_STAGES), 10)
    a = batch_keys(StageBalancedSampler(labels, 24, seed=0), 0)
    b = batch_keys(StageBalancedSampler(labels, 24, seed=1), 0)
    assert a != b


def test_bad_arguments():
    labels = np.repeat(np.arange(NUM_STAGES), 2)
    with pytest.raises(ValueError, match="global_batch_size"):
        StageBalancedSampler(labels, 11, 0)
    with pytest.raises(ValueError, match="stage VII"):
        StageBalancedSampler(labels[labels != 6], 12, 0)
    with pytest.raises(ValueError, match="labels"):
        StageBalancedSampler(np.array([0, 12]), 12, 0)
    with pytest.raises(IndexError):
        StageBalancedSampler(labels, 12, 0)[-1]
    with pytest.raises(ValueError, match="divisible"):
        ShardedOrder(StageBalancedSampler(labels, 12, 0), 12, process_count=5)


class _KeyAndDraw(grain.RandomMapTransform):
    """Record -> (record key, first draw of the record's rng), to check both."""

    def random_map(self, element, rng):
        return np.array([element, rng.integers(2**31)], np.int64)


def _loader_steps(sampler, g, process_count, worker_count, start_step, num_steps):
    iterators = []
    for p in range(process_count):
        loader = grain.DataLoader(
            data_source=list(range(sampler.num_records)),
            sampler=ShardedOrder(sampler, g, process_count, worker_count, start_step),
            operations=[_KeyAndDraw(), grain.Batch(g // process_count, drop_remainder=True)],
            worker_count=worker_count,
            shard_options=grain.ShardOptions(p, process_count),
            read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=4),
        )
        iterators.append(iter(loader))
    steps = [np.concatenate([next(it) for it in iterators]) for _ in range(num_steps)]
    del iterators
    return steps


@settings(max_examples=2, deadline=None)
@given(
    labels=label_arrays(),
    process_count=st.sampled_from([1, 2, 4]),
    batches_per_process=st.integers(3, 24),
    seed=st.integers(0, 2**31),
    start_step=st.integers(0, 3),
    worker_count=st.just(2),
)
@example(
    labels=np.repeat(np.arange(12), 2)[1:],
    process_count=4,
    batches_per_process=3,
    seed=7,
    start_step=2,
    worker_count=2,
)
@example(
    labels=np.repeat(np.arange(12), 2)[1:],
    process_count=1,
    batches_per_process=30,
    seed=8,
    start_step=0,
    worker_count=2,
)
@example(
    labels=np.repeat(np.arange(12), 2)[1:],
    process_count=2,
    batches_per_process=11,
    seed=7,
    start_step=1,
    worker_count=0,
)
def test_data_loader_shards_concatenate_to_global_batches(
    labels, process_count, batches_per_process, seed, start_step, worker_count
):
    """Per-process batches of each step, concatenated in process order, are exactly
    the global batch (keys and per-record rngs); a start step resumes exactly."""
    ensure_absl_flags_parsed()
    g = max(12, min(96, process_count * batches_per_process))
    g -= g % process_count
    sampler = StageBalancedSampler(labels, g, seed)
    got = _loader_steps(sampler, g, process_count, worker_count, start_step, num_steps=3)
    for t, batch in enumerate(got):
        positions = range((start_step + t) * g, (start_step + t + 1) * g)
        expected = [[sampler[i].record_key, sampler[i].rng.integers(2**31)] for i in positions]
        assert batch.tolist() == expected, t
