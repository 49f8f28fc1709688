"""The stage model of ``--mode=section`` and the scale its tubules must be cut at.

A tubule is cut at the pixel size and image side the model was trained on:
both are in ``model.json`` of a trained workdir's ``best_model``. Weights
without them (``stagejax.convert``, older runs) take ``config.mpp`` and the
crop the config names; without a pixel size anywhere the run stops with one
line naming the field, since a tubule cut at the wrong scale gets a confident
but meaningless stage.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import ml_collections

from stagejax import datasets
from stagejax.errors import CheckpointError, ConfigError
from stagejax.evaluate.predict import model_directory
from stagejax.model import Model, saved
from stagejax.runtime.parallel import Parallel
from stagejax.simulate.section import DEFAULT_MPP

MPP_FIELD = "config.mpp"


@dataclasses.dataclass
class StageModel:
    model: Model
    mpp: float  # um/px of the training images
    image_size: int  # side of the training images in px (crops are cut this large)
    label_names: list[str]
    stage_ranks: list[int]
    fingerprint: str  # names the weights, so outputs of another model are recognised
    source: str  # for the log
    batch_size: int


def _scale(config: ml_collections.ConfigDict, meta: dict, trained: bool) -> tuple[float, int]:
    mpp = float(config.mpp) or meta.get("mpp") or 0.0
    size = meta.get("image_size") or 0
    if trained and not (mpp and size):  # a run from before model.json recorded them
        run_mpp, run_size = datasets.training_scale(config)
        mpp, size = mpp or run_mpp, size or run_size
    if not mpp:
        raise ConfigError(
            f"{MPP_FIELD}: the pixel size of the stage model's training images is unknown; "
            f"pass --{MPP_FIELD}=UM_PER_PX (the study's images: about {DEFAULT_MPP:.3f}, "
            "an estimate)"
        )
    size = size or int(config.crop_size + 2 * config.crop_range)
    if size < config.crop_size:
        raise ConfigError(
            f"config.crop_size: {config.crop_size} is larger than the model's training "
            f"images ({size} px)"
        )
    return float(mpp), int(size)


def load_stage_model(config: ml_collections.ConfigDict, workdir: Path) -> StageModel:
    """The model of ``workdir`` (or ``config.init_from``) on this process's devices."""
    directory, trained = model_directory(config, workdir)
    meta = saved.read_model_json(directory)
    if meta["stage_ranks"] is None:
        raise CheckpointError(
            f"{directory}: its classes {meta['label_names'][:3]}... are not the 12 stages"
        )
    mpp, size = _scale(config, meta, trained)
    n = jax.local_device_count()
    batch = n * math.ceil(config.eval_batch_size / n)
    parallel = Parallel(config.parallelism, batch, batch, local=True)
    model = Model.from_directory(config, directory, parallel)
    stamp = (directory / saved.MODEL_JSON).stat().st_mtime_ns
    return StageModel(
        model=model,
        mpp=mpp,
        image_size=size,
        label_names=meta["label_names"],
        stage_ranks=meta["stage_ranks"],
        fingerprint=f"{directory.resolve()}@{stamp}",
        source=str(directory),
        batch_size=batch,
    )
