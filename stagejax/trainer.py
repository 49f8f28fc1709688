"""The training loop: train, select the best epoch, evaluate, report.

``train_and_evaluate`` runs the study's protocol: after every epoch the
validation split is evaluated and the epoch with the best validation balanced
accuracy (ties go to the later epoch) is kept; at the end that model is
evaluated on the test split and a report is written. A run restarted in the
same workdir resumes from its latest checkpoint with the same batches.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from stagejax import checkpoint as ckpt_lib
from stagejax import data as data_lib
from stagejax import report, writers
from stagejax import train as train_lib
from stagejax import workdir as workdir_lib
from stagejax.data import input_pipeline
from stagejax.errors import StagejaxError
from stagejax.evaluate import run_inference, summarize
from stagejax.parallel import Parallel

log = logging.getLogger(__name__)


class NonFiniteLossError(StagejaxError):
    """The loss, or the weights after an update, became NaN or Inf."""


class Run:
    """Everything built from a config that both training and evaluation need."""

    def __init__(self, config: ml_collections.ConfigDict, dataset=None):
        self.config = config
        self.dataset = dataset if dataset is not None else data_lib.load(config)
        self.parallel = Parallel(config.parallelism, config.global_batch_size,
                                 config.eval_batch_size)
        model = train_lib.create_model(config, self.parallel.bn_axis_name)
        if config.init_from:
            ckpt_lib.load_weights_into(model, config.init_from)
            log.info("initialised weights from %s", config.init_from)
        self.modeldef, params, batch_stats = train_lib.split_model(model)
        self.steps_per_epoch = train_lib.steps_per_epoch(
            len(self.dataset.splits["train"].labels), config.global_batch_size)
        self.total_steps = config.num_epochs * self.steps_per_epoch
        self.tx = train_lib.create_optimizer(config, self.steps_per_epoch)
        self.initial_state = train_lib.create_train_state(params, batch_stats, self.tx,
                                                          config.seed)
        self.train_step_fn = train_lib.make_train_step(self.modeldef, self.tx, config,
                                                       self.parallel)
        self.train_step = self.parallel.compile_train_step(self.train_step_fn)
        self._eval_steps: dict[bool, Any] = {}

    def eval_step(self, tta: bool = False):
        if tta not in self._eval_steps:
            self._eval_steps[tta] = self.parallel.compile_eval_step(
                train_lib.make_eval_step(self.modeldef, self.config, self.parallel, tta=tta))
        return self._eval_steps[tta]

    def abstract_state(self):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            self.initial_state)

    def evaluate(self, state, split_name: str) -> tuple[dict, dict[str, np.ndarray]]:
        split = self.dataset.splits[split_name]
        out = run_inference(
            self.parallel, self.eval_step(), state,
            input_pipeline.eval_batches(split, self.config), len(split.labels),
            desc=f"eval {split_name}")
        return summarize(split.labels, out["probs"], out.get("loss")), out

    def model_from_state(self, host_state) -> Any:
        model = self.modeldef.merge(host_state.params, host_state.batch_stats, train=False)
        return model


def _check_finite(pending: list, step: int, ckpts: ckpt_lib.TrainCheckpoints) -> list:
    if not pending:
        return []
    finite = np.asarray(jax.device_get([m["finite"] for m in pending]))
    if not finite.all():
        ckpts.wait()
        last = ckpts.latest.latest_step()
        keep = (f"the last good checkpoint (step {last}) is kept in {ckpts.latest.directory}"
                if last is not None else "no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"loss or weights became NaN/Inf by step {step}; training stopped and {keep}. "
            "Try a lower --config.learning_rate or --config.precision=float32."
        )
    return pending


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       dataset=None) -> dict:
    """Train (resuming if possible), keep the best epoch, evaluate it on the test split."""
    workdir = Path(workdir)
    run = Run(config, dataset)  # Validates data and config before anything is written.
    par = run.parallel
    is_main = jax.process_index() == 0
    if is_main:
        workdir_lib.write_config(workdir, config)
    writer = writers.create_writers(workdir, just_logging=not is_main)
    ckpts = ckpt_lib.TrainCheckpoints(workdir)

    state = run.initial_state
    meta = {"epoch": 0, "best_balanced_accuracy": -1.0, "best_epoch": 0}
    restored = ckpts.restore_latest(run.abstract_state())
    if restored is not None:
        state, meta = restored
        log.info("resuming from step %d (epoch %d) in %s", int(state.step), meta["epoch"],
                  workdir)
    start_step = int(state.step)
    state = par.put_state(state)

    spe, total = run.steps_per_epoch, run.total_steps
    log.info("training %s: %d train images, %d steps/epoch x %d epochs, global batch %d on %d "
             "device(s) (%s)", config.model, len(run.dataset.splits["train"].labels), spe,
             config.num_epochs, config.global_batch_size, jax.device_count(), config.parallelism)
    batches = par.prefetch(input_pipeline.train_batches(
        run.dataset.splits["train"], config, start_step=start_step))
    progress = writers.ProgressLogger(total, config.global_batch_size, config.log_every_steps)
    pending: list[dict] = []

    def save_latest(step: int) -> None:
        nonlocal pending
        _check_finite(pending, step, ckpts)
        pending = []
        ckpts.save_latest(step, par.host_state(state), meta)

    for step in range(start_step, total):
        batch = next(batches)
        state, m = run.train_step(state, batch)
        pending.append(m)
        done = step + 1
        if done % config.log_every_steps == 0 or done == total:
            host = par.metrics_to_host(pending)
            _check_finite(pending, done, ckpts)
            scalars = {
                "train/loss": float(np.mean([h["loss"] for h in host])),
                "train/accuracy": float(np.mean([h["accuracy"] for h in host])),
                "train/epoch": done / spe,
            }
            scalars.update({f"perf/{k}": v for k, v in progress(done).items()})
            writer.write_scalars(done, scalars)
            pending = []
        if done % spe == 0:
            epoch = done // spe
            _check_finite(pending, done, ckpts)
            val, _ = run.evaluate(state, "validation")
            writer.write_scalars(done, {f"validation/{k}": v for k, v in val.items()
                                        if isinstance(v, float | int)})
            log.info("epoch %d/%d: validation balanced accuracy %.4f, +/-1 accuracy %.4f",
                     epoch, config.num_epochs, val["balanced_accuracy"], val["within1_accuracy"])
            meta["epoch"] = epoch
            if val["balanced_accuracy"] >= meta["best_balanced_accuracy"]:  # ties: later epoch
                meta["best_balanced_accuracy"] = float(val["balanced_accuracy"])
                meta["best_epoch"] = epoch
                ckpts.save_best(done, par.host_state(state), meta)
            save_latest(done)
        elif done % config.checkpoint_every_steps == 0:
            save_latest(done)
    writer.flush()
    ckpts.wait()
    log.info("best epoch %d (validation balanced accuracy %.4f)", meta["best_epoch"],
             meta["best_balanced_accuracy"])

    result = evaluate_best(run, ckpts, workdir, config.eval_split)
    ckpts.close()
    writer.close()
    return result


def evaluate_best(run: Run, ckpts: ckpt_lib.TrainCheckpoints, workdir: Path,
                  split_name: str) -> dict:
    """Evaluate the best checkpoint on ``split_name``; export its weights; write the report."""
    restored = ckpts.restore_best(run.abstract_state())
    if restored is None:
        raise ckpt_lib.CheckpointError(f"{ckpts.best.directory}: no best checkpoint to evaluate")
    host_state, meta = restored
    if jax.process_index() == 0:
        export_best_model(run, host_state, workdir / "best_model")
    state = run.parallel.put_state(host_state)
    return _evaluate_and_report(run, state, workdir, split_name,
                                {"best_epoch": meta["best_epoch"]})


def _evaluate_and_report(run: Run, state, workdir: Path, split_name: str, extra: dict) -> dict:
    metrics, out = run.evaluate(state, split_name)
    metrics.update(extra)
    split = run.dataset.splits[split_name]
    if jax.process_index() == 0:
        report.write_eval_report(
            workdir / f"eval_{split_name}", split.file_names, split.labels, out["probs"],
            out["features"], loss=metrics.get("loss"))
    log.info("%s: accuracy %.4f, balanced accuracy %.4f, +/-1 accuracy %.4f -> %s",
             split_name, metrics["accuracy"], metrics["balanced_accuracy"],
             metrics["within1_accuracy"], workdir / f"eval_{split_name}")
    return metrics


def export_best_model(run: Run, host_state, directory: Path) -> None:
    """Weights-only copy of the best model, swapped in atomically."""
    model = run.model_from_state(host_state)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".best_model."))
    shutil.rmtree(tmp)
    ckpt_lib.save_model_weights(tmp, model, run.config.model, run.config.num_classes,
                                1 if run.config.grayscale else 3)
    old = directory.with_name(".best_model.old")
    shutil.rmtree(old, ignore_errors=True)  # left by a run killed mid-swap; blocks rename
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)



def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """``--mode=eval``: the best checkpoint of a finished or running run, on eval_split."""
    run = Run(config)
    ckpts = ckpt_lib.TrainCheckpoints(workdir)
    try:
        if ckpts.best.latest_step() is None and config.init_from:
            # No training here: evaluate the imported weights as they are.
            state = run.parallel.put_state(run.initial_state)
            return _evaluate_and_report(run, state, Path(workdir), config.eval_split, {})
        return evaluate_best(run, ckpts, Path(workdir), config.eval_split)
    finally:
        ckpts.close()
