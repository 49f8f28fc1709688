"""The best checkpoint of a training run, restored and handed to evaluation.

Restoring a training checkpoint needs the shape of the whole train state,
optimizer state included, so it is training's; what is done with the restored
weights (export ``best_model``, evaluate, report) is `stagejax.evaluate.best`'s.
``evaluate_best`` ends every training run; ``evaluate_workdir`` is
``--mode=eval``, which also evaluates weights imported with ``stagejax.convert``
(``config.init_from``) in a new workdir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections

from stagejax import datasets
from stagejax.errors import CheckpointError
from stagejax.evaluate import best as evaluate_lib
from stagejax.model import Model
from stagejax.runtime import checkpoint as ckpt_lib
from stagejax.train import step as step_lib


def evaluate_best(
    model: Model,
    dataset: Any,
    ckpts: ckpt_lib.TrainCheckpoints,
    workdir: Path,
    split_name: str,
    overwrite: bool = False,
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
    return evaluate_lib.export_and_evaluate(
        model, dataset, host_state, meta["best_epoch"], workdir, split_name, overwrite
    )


def evaluate_workdir(
    config: ml_collections.ConfigDict, workdir: str | Path, overwrite: bool = False
) -> dict:
    """``--mode=eval``: the best checkpoint of a finished (or stopped) run, on eval_split;
    without one, the weights of ``config.init_from`` as they are. ``overwrite``: replace
    a report made from other data."""
    workdir = Path(workdir)
    dataset = datasets.load(config)
    model = Model.from_config(config)
    ckpts = ckpt_lib.TrainCheckpoints(workdir)
    try:
        if not ckpts.has_best() and config.init_from:
            return evaluate_lib.evaluate_and_report(
                model, dataset, model.device_state(), workdir, config.eval_split, None, overwrite
            )
        return evaluate_best(model, dataset, ckpts, workdir, config.eval_split, overwrite)
    finally:
        ckpts.close()
