"""The best epoch of a run: export its weights, evaluate it, write the report.

``export_and_evaluate`` ends every training run and ``--mode=eval`` on a trained
workdir, given the state `stagejax.train.best` restored from the best checkpoint
(restoring needs the optimizer's shape, which is training's); imported weights
evaluated in a new workdir go straight to ``evaluate_and_report``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import jax
import ml_collections

from stagejax import datasets
from stagejax.errors import WorkdirError
from stagejax.evaluate import report
from stagejax.evaluate.inference import evaluate_split
from stagejax.model import Model, TrainState
from stagejax.model.saved import BEST_MODEL, save_model_weights
from stagejax.runtime import files
from stagejax.runtime import workdir as workdir_lib
from stagejax.runtime.checkpoint import orbax_errors_silenced

log = logging.getLogger(__name__)


def export_and_evaluate(
    model: Model,
    dataset: Any,
    host_state: TrainState,
    best_epoch: int,
    workdir: Path,
    split_name: str,
    overwrite: bool = False,
) -> dict:
    """Export the best epoch's weights (``host_state``) to ``workdir/best_model``,
    evaluate them on ``split_name`` and write the report."""
    if jax.process_index() == 0:
        export_model(model, dataset, host_state, workdir / BEST_MODEL)
    state = model.parallel.put_state(host_state)
    extra = {"best_epoch": best_epoch}
    return evaluate_and_report(model, dataset, state, workdir, split_name, extra, overwrite)


def evaluate_and_report(
    model: Model,
    dataset: Any,
    state: Any,
    workdir: Path,
    split_name: str,
    extra: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Metrics of device ``state`` on ``split_name``, and their report in
    ``workdir/eval_<split>/`` (a report made from other data is replaced only with
    ``overwrite``)."""
    data = data_source(model.config)
    out_dir = workdir / eval_dir_name(model.config, workdir, split_name)
    _refuse_other_data(out_dir, data, overwrite)
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


def _refuse_other_data(out_dir: Path, data: str, overwrite: bool) -> None:
    """One line rather than replacing a report made from other data (unless overwrite)."""
    try:
        made_from = json.loads((out_dir / "metrics.json").read_text()).get("data")
    except (OSError, ValueError):
        return
    if made_from not in (None, data) and not overwrite:
        raise WorkdirError(
            f"{out_dir}: holds the report of {made_from}, not {data}; pass "
            "--overwrite to replace it"
        )


def export_model(model: Model, dataset: Any, host_state: Any, directory: Path) -> None:
    """Weights-only copy of ``host_state``'s model (what eval, predict and explain
    load), swapped in atomically."""
    config = model.config
    mpp, image_size = datasets.training_scale(config, getattr(dataset, "image_size", 0))

    def fill(tmp: Path) -> None:
        with orbax_errors_silenced():
            save_model_weights(
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
