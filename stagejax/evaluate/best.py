"""The best checkpoint of a run: export its weights, evaluate it, write the report.

``evaluate_best`` ends every training run (and is ``--mode=eval`` on a trained
workdir); ``evaluate_workdir`` is ``--mode=eval``, which also evaluates weights
imported with ``stagejax.convert`` (``config.init_from``) in a new workdir.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import jax
import ml_collections

from stagejax import data as data_lib
from stagejax.errors import CheckpointError, WorkdirError
from stagejax.evaluate import report
from stagejax.evaluate.inference import evaluate_split
from stagejax.evaluate.model import Model
from stagejax.runtime import checkpoint as ckpt_lib
from stagejax.runtime import files
from stagejax.runtime import workdir as workdir_lib
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
    data = data_source(model.config)
    out_dir = workdir / eval_dir_name(model.config, workdir, split_name)
    _refuse_other_data(out_dir, data, model.config)
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
                data=data,
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


def data_source(config: ml_collections.ConfigDict) -> str:
    """What a run's images are: the dataset folder, or the simulated data."""
    if config.data_dir:
        return _resolved(config.data_dir)
    return "SIMULATED (stagejax.simulate, generated into cache_dir)"


def eval_dir_name(config: ml_collections.ConfigDict, workdir: Path, split_name: str) -> str:
    """``eval_<split>`` for the run's own data; ``eval_<split>_<folder>`` for other data, so
    that evaluating on another dataset never rewrites the training run's report."""
    try:
        own = workdir_lib.load_run_config(workdir).get("data_dir", "")
    except WorkdirError:  # imported weights evaluated in a new workdir: no run of its own
        own = None
    if own is None or not config.data_dir or (own and _resolved(own) == _resolved(config.data_dir)):
        return f"eval_{split_name}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(_resolved(config.data_dir)).name)
    return f"eval_{split_name}_{name or 'data'}"


def _resolved(data_dir: str) -> str:
    return str(Path(data_dir).expanduser().resolve())


def _refuse_other_data(out_dir: Path, data: str, config: ml_collections.ConfigDict) -> None:
    """One line rather than replacing a report made from other data (unless overwrite)."""
    try:
        made_from = json.loads((out_dir / "metrics.json").read_text()).get("data")
    except (OSError, ValueError):
        return
    if made_from not in (None, data) and not config.get("overwrite", False):
        raise WorkdirError(
            f"{out_dir}: holds the report of {made_from}, not {data}; pass "
            "--config.overwrite=True to replace it"
        )


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
