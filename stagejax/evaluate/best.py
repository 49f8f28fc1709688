"""The best checkpoint of a run: export its weights, evaluate it, write the report.

``evaluate_best`` ends every training run (and is ``--mode=eval`` on a trained
workdir); ``evaluate_workdir`` is ``--mode=eval``, which also evaluates weights
imported with ``stagejax.convert`` (``config.init_from``) in a new workdir.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections

from stagejax import data as data_lib
from stagejax.errors import CheckpointError
from stagejax.evaluate import report
from stagejax.evaluate.inference import evaluate_split
from stagejax.evaluate.model import Model
from stagejax.runtime import checkpoint as ckpt_lib
from stagejax.runtime import files
from stagejax.train import step as step_lib

log = logging.getLogger(__name__)

BEST_MODEL = "best_model"


def evaluate_best(
    model: Model, dataset: Any, ckpts: ckpt_lib.TrainCheckpoints, workdir: Path, split_name: str
) -> dict:
    """Evaluate the best checkpoint on ``split_name``; export its weights; write the report."""
    abstract = step_lib.abstract_train_state(model.params, model.batch_stats, model.config)
    restored = ckpts.restore_best(abstract)
    if restored is None:
        why = "; ".join(ckpts.skipped["best"])
        raise CheckpointError(
            f"{ckpts.directory('best')}: no best checkpoint to evaluate{f' ({why})' if why else ''}"
        )
    host_state, meta = restored
    if jax.process_index() == 0:
        export_model(model, dataset, host_state, workdir / BEST_MODEL)
    state = model.parallel.put_state(host_state)
    return evaluate_and_report(
        model, dataset, state, workdir, split_name, {"best_epoch": meta["best_epoch"]}
    )


def evaluate_and_report(
    model: Model,
    dataset: Any,
    state: Any,
    workdir: Path,
    split_name: str,
    extra: dict | None = None,
) -> dict:
    """Metrics of device ``state`` on ``split_name``, and their report in
    ``workdir/eval_<split>/``."""
    out_dir = workdir / f"eval_{split_name}"
    with files.writing(out_dir, "the report"):
        metrics, out = evaluate_split(model, state, dataset, split_name)
        metrics.update(extra or {})
        split = dataset.splits[split_name]
        if jax.process_index() == 0:
            report.write_eval_report(
                out_dir,
                split.file_names,
                split.labels,
                out["probs"],
                out["features"],
                loss=metrics.get("loss"),
                label_names=dataset.label_names,
                ranks=dataset.stage_ranks,
            )
    log.info(
        "%s: accuracy %.4f, balanced accuracy %.4f, +/-1 accuracy %.4f -> %s",
        split_name,
        metrics["accuracy"],
        metrics["balanced_accuracy"],
        metrics["within1_accuracy"],
        out_dir,
    )
    return metrics


def export_model(model: Model, dataset: Any, host_state: Any, directory: Path) -> None:
    """Weights-only copy of ``host_state``'s model (what eval, predict and explain
    load), swapped in atomically."""
    config = model.config
    mpp, image_size = data_lib.training_scale(config, getattr(dataset, "image_size", 0))

    def fill(tmp: Path) -> None:
        with ckpt_lib.orbax_errors_silenced():
            ckpt_lib.save_model_weights(
                tmp,
                model.module(host_state),
                config.model,
                config.num_classes,
                1 if config.grayscale else 3,
                dataset.label_names,
                dataset.stage_ranks,
                mpp=mpp or None,
                image_size=image_size,
                stain=config.stain.to_dict() if "stain" in config else None,
            )

    files.replace_dir(directory, fill, "the best model")


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """``--mode=eval``: the best checkpoint of a finished (or stopped) run, on eval_split;
    without one, the weights of ``config.init_from`` as they are."""
    workdir = Path(workdir)
    dataset = data_lib.load(config)
    model = Model.from_config(config)
    ckpts = ckpt_lib.TrainCheckpoints(workdir)
    try:
        if not ckpts.has_best() and config.init_from:
            return evaluate_and_report(
                model, dataset, model.device_state(), workdir, config.eval_split
            )
        return evaluate_best(model, dataset, ckpts, workdir, config.eval_split)
    finally:
        ckpts.close()
