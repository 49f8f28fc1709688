"""Staging a stream of tubule crops in batches on the device.

Crops are cut on the host while the device works on the previous batch (JAX
dispatch is asynchronous: the step is started, the next batch cut, and only
then are the results fetched), so memory holds two batches whatever the
slide's size and the device is not left waiting on an idle host.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

import jax
import numpy as np

from stagejax.data import stain, stain_reference
from stagejax.data.augment import CenterCrop
from stagejax.model import Model

log = logging.getLogger(__name__)


def _batches(crops: Iterable[np.ndarray], batch_size: int, crop: int) -> Iterator[dict]:
    """Fixed-size batches (the last padded with white, ``mask`` False), so the step
    compiles once."""
    centre = CenterCrop(crop)  # as evaluation crops a training-sized image
    images: list[np.ndarray] = []
    for image in crops:
        images.append(centre.map({"image": image})["image"])
        if len(images) == batch_size:
            yield {"image": np.stack(images), "mask": np.ones(batch_size, bool)}
            images = []
    if images:
        n = len(images)
        pad = [np.full_like(images[0], 255)] * (batch_size - n)
        mask = np.arange(batch_size) < n
        yield {"image": np.stack(images + pad), "mask": mask}


def stage_crops(
    model: Model,
    crops: Iterable[np.ndarray],
    num_crops: int,
    batch_size: int,
    tta: bool = False,
    desc: str = "stage",
    log_every_s: float = 10.0,
    stain_source: np.ndarray | None = None,
) -> np.ndarray:
    """float32 [num_crops, num_classes] probabilities of ``crops`` (uint8 HxWx3, at
    least ``config.crop_size`` square), in order. ``stain_source``: the slide's
    stain statistics (`slide_stain`), normalised from instead of each crop's own."""
    step, state = model.eval_step(tta), model.device_state()
    crop = int(model.config.crop_size)
    probs = np.zeros((num_crops, model.config.num_classes), np.float32)
    pending: tuple[jax.Array, np.ndarray] | None = None
    seen, t0, last = 0, time.time(), time.time()

    def collect(out, mask) -> int:
        p = np.asarray(model.parallel.gather(out)["probs"])[mask]
        probs[seen : seen + len(p)] = p
        return len(p)

    for batch in _batches(crops, batch_size, crop):
        inputs = {"image": batch["image"]}
        if stain_source is not None:
            inputs["stain"] = np.tile(stain_source, (len(batch["image"]), 1))
        out = step(state, model.parallel.put_batch(inputs))
        if pending is not None:
            seen += collect(*pending)
        pending = (out, batch["mask"])
        if time.time() - last > log_every_s:
            last = time.time()
            log.info("%s: %d/%d tubules (%.1f/s)", desc, seen, num_crops, seen / (last - t0))
    if pending is not None:
        seen += collect(*pending)
    if seen != num_crops:
        raise RuntimeError(f"{desc}: staged {seen} tubules, expected {num_crops}")
    return probs


SLIDE_STAIN_SAMPLE = 64  # Tubules a slide's stain is estimated from, spread over it.


def slide_stain(model: Model, crops: Iterable[np.ndarray], desc: str) -> np.ndarray | None:
    """One stain estimate for a whole slide, pooled over ``crops`` (a sample of its
    tubules), when the model normalises stain; None when it does not.

    A slide shares one staining, so one estimate from all its tissue is steadier
    than each tubule's own (which a tubule with little PAS-positive tissue skews).
    """
    spec = stain.spec(model.config)
    if spec is None:
        return None
    centre = CenterCrop(int(model.config.crop_size))
    images = [centre.map({"image": c})["image"] for c in crops]
    source = stain.pool(stain_reference.images_statistics(images, spec[0]), spec[0])
    if not np.all(np.isfinite(source)):
        log.warning("%s: too little tissue to estimate its stain; tubules are not normalised", desc)
    return source
