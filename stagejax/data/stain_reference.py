"""The reference stain of a training run: estimated once from its training images.

Every process reads the same images in the same order, so all hosts of a
multi-host run agree on the reference without communicating.
"""

from __future__ import annotations

import functools
import logging

import jax
import ml_collections
import numpy as np

from stagejax.data import stain
from stagejax.data.augment import CenterCrop
from stagejax.errors import ConfigError
from stagejax.images import decode_image

log = logging.getLogger(__name__)

MAX_IMAGES = 96  # Spread over the split; the median of their statistics is stable.
BATCH = 16


@functools.partial(jax.jit, static_argnames="method")
def _estimate(images_uint8: jax.Array, method: str) -> jax.Array:
    return stain.estimate(images_uint8.astype(np.float32) / 255.0, method)


def images_statistics(images: list[np.ndarray], method: str) -> np.ndarray:
    """[N, K] stain statistics of same-size uint8 RGB images, in fixed-size batches
    (one compilation)."""
    rows = []
    for i in range(0, len(images), BATCH):
        chunk = images[i : i + BATCH]
        pad = [chunk[-1]] * (BATCH - len(chunk))
        rows.append(np.asarray(_estimate(np.stack(chunk + pad), method))[: len(chunk)])
    return np.concatenate(rows) if rows else np.zeros((0, stain.STATS_SIZE[method]), np.float32)


def from_split(split, crop_size: int, method: str) -> np.ndarray:
    """The pooled statistics of up to ``MAX_IMAGES`` centre crops of ``split``."""
    n = len(split.labels)
    picks = np.unique(np.linspace(0, n - 1, min(n, MAX_IMAGES)).round().astype(int))
    crop = CenterCrop(crop_size)
    images = []
    for k in picks:
        record = split.source[int(k)]
        image = decode_image(record["image"], record["file_name"])
        images.append(crop.map({"image": image, "file_name": record["file_name"]})["image"])
    return stain.pool(images_statistics(images, method), method)


def ensure_reference(config: ml_collections.ConfigDict, train_split) -> None:
    """Fill ``config.stain.reference`` from the training images when normalisation
    is on and no reference was given."""
    method = config.stain.normalize
    if method == "none" or config.stain.reference:
        return
    reference = from_split(train_split, config.crop_size, method)
    if not np.all(np.isfinite(reference)):
        raise ConfigError(
            f"config.stain.normalize={method}: no training image has enough tissue "
            f"(each channel's optical density over {stain.TISSUE_OD}) to estimate a stain from"
        )
    config.stain.reference = stain.format_reference(reference)
    log.info("stain reference (%s, from the training images): %s", method, config.stain.reference)
