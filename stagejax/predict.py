"""``--mode=predict``: stage every image of a folder with a trained model.

Images are read, centre-cropped and normalised as in evaluation; the result is
``workdir/predict/predictions.csv`` with the stage and the 12 probabilities.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from stagejax import checkpoint as ckpt_lib
from stagejax import report
from stagejax import train as train_lib
from stagejax.data import input_pipeline
from stagejax.data.layout import DatasetError
from stagejax.errors import ConfigError
from stagejax.evaluate import run_inference
from stagejax.parallel import Parallel

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg"}


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{folder}: predict_dir is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DatasetError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def predict_folder(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """Predict ``config.predict_dir`` with ``workdir/best_model`` (else ``config.init_from``).

    Returns the CSV path.
    """
    if not config.predict_dir:
        raise ConfigError("config.predict_dir: empty; pass --config.predict_dir=FOLDER")
    workdir = Path(workdir)
    paths = list_images(config.predict_dir)
    parallel = Parallel(config.parallelism, config.global_batch_size, config.eval_batch_size)
    model_dir = workdir / "best_model"
    if not model_dir.is_dir():
        if not config.init_from:
            raise ckpt_lib.CheckpointError(
                f"{model_dir}: missing; train first or pass --config.init_from=MODEL_DIR")
        model_dir = Path(config.init_from).expanduser()
    model = ckpt_lib.load_model_weights(model_dir,
                                        dtype=train_lib.compute_dtype(config),
                                        bn_axis_name=parallel.bn_axis_name)
    modeldef, params, batch_stats = train_lib.split_model(model)
    state = train_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=None,
        rng=jax.random.key_data(jax.random.key(config.seed)))
    state = parallel.put_state(state)
    step = parallel.compile_eval_step(
        train_lib.make_eval_step(modeldef, config, parallel, tta=config.tta))
    log.info("predicting %d images from %s%s", len(paths), config.predict_dir,
             " with 8-fold test-time augmentation" if config.tta else "")
    out = run_inference(parallel, step, state, input_pipeline.predict_batches(paths, config),
                        len(paths), desc="predict")
    dest = workdir / "predict" / "predictions.csv"
    if jax.process_index() == 0:
        report.write_predictions(dest, [p.name for p in paths], out["probs"])
        log.info("wrote %s", dest)
    return dest
