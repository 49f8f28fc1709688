"""The study's data path in PyTorch: its split files, crops, per-image min-max and
balanced batches, for the baseline (`benchmarks.torch_baseline`) and the benchmarks
that feed torch the same images as stagejax."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

NUM_STAGES, FLIP_PROBABILITY = 12, 2.0 / 3.0


@dataclasses.dataclass(frozen=True)
class Split:
    paths: tuple[Path, ...]
    labels: np.ndarray  # int64 class ids, aligned with paths


def read_split(root: str | Path, split: str) -> Split:
    """One split of a study-layout folder; labels from the file names."""
    root = Path(root)
    names, files = ([x.strip() for x in (root / f).read_text().splitlines() if x.strip()]
                    for f in ("label_list.txt", f"split_list/{split}.txt"))  # fmt: skip
    labels = []
    for f in files:
        stage = f[f.rfind("_") + 1 : f.rfind("-")]
        if stage not in names:
            raise ValueError(f"{root / 'images' / f}: stage {stage!r} is not in label_list.txt")
        labels.append(names.index(stage))
    return Split(tuple(root / "images" / f for f in files), np.asarray(labels, np.int64))


def decode(path: Path) -> np.ndarray:
    """uint8 HxWx3."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def crop_origin(size: int, crop_size: int, shift: int) -> int:
    """Centred start shifted by ``shift``; 0 when that crop would leave the image."""
    start = (size - crop_size) // 2 + shift
    return start if 0 <= start <= size - crop_size else 0


def train_view(
    image: np.ndarray, crop_size: int, crop_range: int, rng: np.random.Generator
) -> np.ndarray:
    """The study's train augmentation on uint8 HWC: shifted crop, rot90 by k in
    {0..4} (4 = none, so no rotation is twice as likely), vertical flip p=2/3."""
    h, w = image.shape[:2]
    dy, dx = rng.integers(-crop_range, crop_range + 1, size=2)
    top, left = crop_origin(h, crop_size, int(dy)), crop_origin(w, crop_size, int(dx))
    out = image[top : top + crop_size, left : left + crop_size]
    out = np.rot90(out, int(rng.integers(0, 5)) % 4)
    if rng.random() < FLIP_PROBABILITY:
        out = out[::-1]
    return np.ascontiguousarray(out)


def center_view(image: np.ndarray, crop_size: int) -> np.ndarray:
    top, left = (image.shape[0] - crop_size) // 2, (image.shape[1] - crop_size) // 2
    return np.ascontiguousarray(image[top : top + crop_size, left : left + crop_size])


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Per image ([C,H,W] or [B,C,H,W]) over all channels to [0, 1]; constant -> 0."""
    flat = x.reshape(x.shape[0], -1) if x.dim() == 4 else x.reshape(1, -1)
    shape = (-1, 1, 1, 1) if x.dim() == 4 else ()
    lo = flat.min(dim=1).values.reshape(shape)
    span = flat.max(dim=1).values.reshape(shape) - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), torch.zeros_like(x))


class TubuleImages(torch.utils.data.Dataset):
    """Train items are ``(record, position)``: the position in the sample stream
    seeds that sample's crop, so the data do not depend on the worker count.
    Eval items are record indices. Yields float32 CHW in [0, 1] (host min-max,
    as the study) or, with ``host_normalize=False``, the uint8 HWC crop."""

    def __init__(self, split: Split, crop_size: int, crop_range: int, train: bool, seed: int,
                 host_normalize: bool = True):  # fmt: skip
        self.split, self.crop_size, self.crop_range = split, crop_size, crop_range
        self.train, self.seed, self.host_normalize = train, seed, host_normalize

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitem__(self, item):
        record, position = item if self.train else (item, 0)
        image = decode(self.split.paths[record])
        if self.train:
            rng = np.random.default_rng((self.seed, position))
            image = train_view(image, self.crop_size, self.crop_range, rng)
        else:
            image = center_view(image, self.crop_size)
        x, label = torch.from_numpy(image), int(self.split.labels[record])
        return (min_max(x.permute(2, 0, 1).float()) if self.host_normalize else x), label


class BalancedBatches(torch.utils.data.Sampler):
    """The study's balanced batches: ``n = batch_size / 12`` images of each stage,
    each stage's images taken from its own shuffled list without replacement;
    when fewer than ``n`` remain the list is reshuffled and restarts (a stage
    with fewer than ``n`` images repeats some within the batch). The state
    carries over between epochs. Yields lists of ``(record, position)``."""

    def __init__(self, labels: np.ndarray, batch_size: int, seed: int, num_batches: int):
        if batch_size % NUM_STAGES:
            raise ValueError(f"batch_size: {batch_size} is not a multiple of {NUM_STAGES}")
        self.per_stage, self.num_batches = batch_size // NUM_STAGES, num_batches
        self._rng = np.random.default_rng(seed)
        members = [np.flatnonzero(np.asarray(labels) == s) for s in range(NUM_STAGES)]
        for s, m in enumerate(members):
            if m.size == 0:
                raise ValueError(f"labels: stage {s + 1} has no training images")
        self._pools = [self._rng.permutation(m) for m in members]
        self._next, self._position = [0] * NUM_STAGES, 0

    def __len__(self) -> int:
        return self.num_batches

    def _take(self, s: int) -> list[int]:
        taken: list[int] = []
        while len(taken) < self.per_stage:
            pool = self._pools[s]
            want = min(self.per_stage - len(taken), pool.size)
            if self._next[s] + want > pool.size:
                self._pools[s] = pool = self._rng.permutation(pool)
                self._next[s] = 0
            taken += pool[self._next[s] : self._next[s] + want].tolist()
            self._next[s] += want
        return taken

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for _ in range(self.num_batches):
            records = [r for s in range(NUM_STAGES) for r in self._take(s)]
            yield [(r, self._position + j) for j, r in enumerate(records)]
            self._position += len(records)


class StagejaxBatches(torch.utils.data.Sampler):
    """stagejax's `StageBalancedSampler` order, so both frameworks see the same
    images in the same batches (the crops still come from this module)."""

    def __init__(self, labels: np.ndarray, batch_size: int, seed: int, num_batches: int):
        from stagejax.data.sampler import StageBalancedSampler

        self._sampler = StageBalancedSampler(np.asarray(labels, np.int32), batch_size, seed)
        self.batch_size, self.num_batches, self._batch = batch_size, num_batches, 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for _ in range(self.num_batches):
            g, b = self.batch_size, self._batch
            yield [(self._sampler.record_key(i), i) for i in range(b * g, (b + 1) * g)]
            self._batch += 1


def make_sampler(
    kind: str, labels: np.ndarray, batch_size: int, seed: int, num_batches: int
) -> torch.utils.data.Sampler:
    samplers = {"reference": BalancedBatches, "stagejax": StagejaxBatches}
    if kind not in samplers:
        raise ValueError(f"sampler: {kind!r} is not one of 'reference', 'stagejax'")
    return samplers[kind](labels, batch_size, seed, num_batches)
