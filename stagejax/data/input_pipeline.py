"""Grain loaders yielding per-process numpy batches (uint8 images) for train, eval, predict.

Host work is decoding, cropping, rot90 and flips, in uint8 (see augment.py for
why); the float work runs on the device in `augment.device_preprocess`.

Config fields read: ``crop_size``, ``crop_range``, ``global_batch_size``,
``eval_batch_size`` (global, like ``global_batch_size``; split evenly between
processes), ``seed``, ``num_workers`` (grain worker processes per JAX process,
0 = in the main process), ``augment.rot90``, ``augment.flip``. The photometric
``augment.*`` fields are for `device_preprocess`.

Training is endless and stateless: batch ``s`` of every process is a pure
function of (seed, s, process index), so resuming at step ``k`` is starting at
``k`` (no iterator state in checkpoints, any worker count on resume).
Evaluation is one pass in which every process yields the same number of
fixed-size batches; global batch ``t`` is examples ``[t*E, (t+1)*E)`` of the
split, padded at the end, and process ``p`` gets its ``p``-th contiguous part.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import grain.python as grain
import jax
import ml_collections
import numpy as np
from absl import flags

from stagejax.data.augment import CenterCrop, TrainCrop
from stagejax.data.sampler import ShardedOrder, StageBalancedSampler
from stagejax.errors import ConfigError, DatasetError
from stagejax.images import decode_image


def ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside an absl app (tests,
    notebooks, benchmarks) nothing parsed them, so mark the defaults as parsed."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    return (
        jax.process_index() if process_index is None else process_index,
        jax.process_count() if process_count is None else process_count,
    )


def _local_batch_size(field: str, batch_size: int, process_count: int) -> int:
    if batch_size < 1 or batch_size % process_count:
        raise ConfigError(
            f"config.{field}: {batch_size} is not a positive multiple of the "
            f"{process_count} processes"
        )
    return batch_size // process_count


class _Decode(grain.MapTransform):
    def map(self, element: dict) -> dict:
        return {**element, "image": decode_image(element["image"], element["file_name"])}


class _TrainOutput(grain.MapTransform):
    def map(self, element: dict) -> dict:
        return {"image": element["image"], "label": np.int32(element["label"])}


def train_batches(
    split,
    config: ml_collections.ConfigDict,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict]:
    """Endless ``{'image': uint8 [B/P, crop, crop, 3], 'label': int32 [B/P]}``, steps
    ``start_step, start_step + 1, ...``; the batches of one step concatenated in
    process order are global batch ``step`` of `StageBalancedSampler`."""
    process_index, process_count = _processes(process_index, process_count)
    local = _local_batch_size("global_batch_size", config.global_batch_size, process_count)
    sampler = StageBalancedSampler(split.labels, config.global_batch_size, config.seed)
    order = ShardedOrder(
        sampler, config.global_batch_size, process_count, config.num_workers, start_step
    )
    if config.num_workers:
        ensure_absl_flags_parsed()
    loader = grain.DataLoader(
        data_source=split.source,
        sampler=order,
        operations=[
            _Decode(),
            TrainCrop(
                config.crop_size,
                config.crop_range,
                rot90=config.augment.rot90,
                flip=config.augment.flip,
            ),
            _TrainOutput(),
            grain.Batch(local, drop_remainder=True),
        ],
        worker_count=config.num_workers,
        shard_options=grain.ShardOptions(process_index, process_count),
        # Encoded images are large: read a couple of batches ahead, not grain's 500.
        read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * local),
    )
    return iter(loader)


def eval_positions(
    num_examples: int, eval_batch_size: int, process_index: int, process_count: int
) -> np.ndarray:
    """``[num_batches, eval_batch_size // process_count]`` split positions of one
    process, -1 for padding; the same shape on every process."""
    local = _local_batch_size("eval_batch_size", eval_batch_size, process_count)
    num_batches = -(-num_examples // eval_batch_size)
    padded = np.full(num_batches * eval_batch_size, -1, np.int32)
    padded[:num_examples] = np.arange(num_examples, dtype=np.int32)
    return padded.reshape(num_batches, process_count, local)[:, process_index]


class _PaddedSource:
    """The records at ``positions`` of ``source`` with their ``index``; -1 is padding."""

    def __init__(self, source, positions: np.ndarray):
        self._source = source
        self._positions = positions

    def __len__(self) -> int:
        return len(self._positions)

    def __repr__(self) -> str:
        return f"_PaddedSource({self._source!r}, {len(self._positions)} positions)"

    def __getitem__(self, k: int) -> dict:
        pos = int(self._positions[k])
        return {"index": -1} if pos < 0 else {**self._source[pos], "index": pos}


class _FileSource:
    """Unlabelled image files as records ``dict(image=bytes, label=0, file_name)``; a
    file that cannot be read has ``read_error`` (the message) and no bytes."""

    def __init__(self, paths: Sequence[str | Path]):
        self._paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self._paths)

    def __repr__(self) -> str:
        return f"_FileSource({len(self._paths)} files)"

    def __getitem__(self, k: int) -> dict:
        path = self._paths[k]
        record = {"image": b"", "label": 0, "file_name": str(path)}
        try:
            record["image"] = path.read_bytes()
        except OSError as e:
            record["read_error"] = f"{path}: cannot read ({e.strerror or type(e).__name__})"
        return record


class _EvalExample(grain.MapTransform):
    """Decode and centre-crop; padding becomes a black image with ``mask`` False
    (and label 0, so that it is a valid class id everywhere).

    Also gives ``size`` (the image's [height, width] before the crop, 0 for
    padding) and ``error`` (empty). With ``skip_errors`` (prediction) a file
    that cannot be read, decoded or cropped raises nothing: it becomes a black
    image with ``mask`` True and ``error`` the message, so that one bad file
    does not stop a folder (the caller drops its row).
    """

    def __init__(self, crop_size: int, skip_errors: bool = False):
        self._crop = CenterCrop(crop_size)
        self._skip_errors = skip_errors

    def map(self, element: dict) -> dict:
        index = np.int32(element["index"])
        crop = self._crop.crop_size
        out = {
            "image": np.zeros((crop, crop, 3), np.uint8),
            "label": np.int32(0),
            "index": index,
            "mask": np.bool_(index >= 0),
            "size": np.zeros(2, np.int32),
            "error": "",
        }
        if index < 0:
            return out
        name = element["file_name"]
        try:
            if "read_error" in element:
                raise DatasetError(element["read_error"])
            image = decode_image(element["image"], name)
            out["size"] = np.asarray(image.shape[:2], np.int32)
            out["image"] = self._crop.map({"image": image, "file_name": name})["image"]
        except DatasetError as e:
            if not self._skip_errors:
                raise
            out["error"] = str(e)
        out["label"] = np.int32(element["label"])
        return out


def _one_pass(
    source,
    num_examples: int,
    config: ml_collections.ConfigDict,
    process_index: int | None,
    process_count: int | None,
    keys: tuple[str, ...],
    skip_errors: bool = False,
) -> Iterator[dict]:
    process_index, process_count = _processes(process_index, process_count)
    positions = eval_positions(num_examples, config.eval_batch_size, process_index, process_count)
    num_batches, local = positions.shape
    if num_batches == 0:
        return iter(())
    if config.num_workers:
        ensure_absl_flags_parsed()
    # Batched here, not with grain.Batch in the workers: workers take every W-th
    # element, so worker-side batches would not be contiguous and the last ones
    # would be short. Element by element, grain returns the exact sampler order.
    loader = grain.DataLoader(
        data_source=_PaddedSource(source, positions.reshape(-1)),
        sampler=grain.SequentialSampler(positions.size),
        operations=[_EvalExample(config.crop_size, skip_errors)],
        worker_count=config.num_workers,
        worker_buffer_size=local,
        shard_options=grain.NoSharding(),
        read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * local),
    )

    def batches():
        it = iter(loader)
        for _ in range(num_batches):
            items = [next(it) for _ in range(local)]
            yield {k: np.stack([x[k] for x in items]) for k in keys}

    return batches()


def eval_batches(
    split,
    config: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict]:
    """One pass over ``split``, centre crop: ``{'image': uint8 [E/P, crop, crop, 3],
    'label': int32, 'index': int32 (position in split.file_names, -1 = padding),
    'mask': bool}``. Every example appears exactly once over all processes."""
    return _one_pass(
        split.source,
        len(split.labels),
        config,
        process_index,
        process_count,
        ("image", "label", "index", "mask"),
    )


def predict_batches(
    image_paths: Sequence[str | Path],
    config: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict]:
    """Like `eval_batches` for unlabelled files: ``{'image', 'index' (position in
    image_paths), 'mask', 'size' (int32 [B, 2]: height, width before the crop),
    'error' (str: empty, or why the file could not be used)}``.

    A file that cannot be read, decoded or centre-cropped does not raise: its
    ``error`` says why and its ``image`` is black (see `_EvalExample`).
    """
    return _one_pass(
        _FileSource(image_paths),
        len(image_paths),
        config,
        process_index,
        process_count,
        ("image", "index", "mask", "size", "error"),
        skip_errors=True,
    )


def predict_file_error(path: str | Path, crop_size: int) -> str:
    """Why `predict_batches` cannot use ``path`` (empty if it can): the same read,
    decode and centre crop, for one file."""
    element = {**_FileSource([path])[0], "index": 0}
    return _EvalExample(crop_size, skip_errors=True).map(element)["error"]
