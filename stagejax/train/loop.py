"""The training loop: train, select the best epoch, evaluate, report.

``train_and_evaluate`` runs the study's protocol: after every epoch the
validation split is evaluated and the epoch with the best validation balanced
accuracy (ties go to the later epoch) is kept; at the end that model is
evaluated on the test split and a report is written. A run restarted in the
same workdir resumes from its latest checkpoint with the same batches.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import signal
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import parameter_overview

from stagejax import datasets
from stagejax.data import input_pipeline, on_device, stain_reference
from stagejax.errors import StagejaxError
from stagejax.evaluate.inference import evaluate_split
from stagejax.model import Model
from stagejax.runtime import checkpoint as ckpt_lib
from stagejax.runtime import lock, writers
from stagejax.runtime import workdir as workdir_lib
from stagejax.train import best, interrupts, memory
from stagejax.train import step as step_lib

log = logging.getLogger(__name__)


class NonFiniteLossError(StagejaxError):
    """The loss, or the weights after an update, became NaN or Inf."""


class Run:
    """Everything training builds from a config: data, model, optimizer, steps."""

    def __init__(self, config: ml_collections.ConfigDict, dataset=None):
        self.config = config
        self.dataset = dataset if dataset is not None else datasets.load(config)
        stain_reference.ensure_reference(config, self.dataset.splits["train"])
        self.model = Model.from_config(config)
        self.parallel = self.model.parallel
        self.steps_per_epoch = step_lib.steps_per_epoch(
            len(self.dataset.splits["train"].labels), config.global_batch_size
        )
        self.total_steps = config.num_epochs * self.steps_per_epoch
        self.tx = step_lib.create_optimizer(config, self.steps_per_epoch)
        self.initial_state = self.model.state(self.tx)
        self.train_step_fn = step_lib.make_train_step(
            self.model.modeldef, self.tx, config, self.parallel
        )
        self.train_step = self.parallel.compile_train_step(self.train_step_fn)

    @functools.cached_property
    def data_on_device(self) -> on_device.Decision:
        """Which path feeds training: Grain, or the split kept on the devices
        (`data.on_device`). Decided on first use (what ``Run`` is built for by the
        benchmarks may have no images); `train_and_evaluate` asks at once."""
        train = self.dataset.splits["train"]
        return on_device.decide(self.config, train, memory.device_capacity(self.config))

    def abstract_state(self):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.initial_state)

    def evaluate(self, state, split_name: str) -> tuple[dict, dict[str, np.ndarray]]:
        """(metrics, per-example outputs) of device ``state`` on one split."""
        return evaluate_split(self.model, state, self.dataset, split_name)


def _check_finite(pending: list, step: int, ckpts: ckpt_lib.TrainCheckpoints) -> None:
    if not pending:
        return
    finite = np.asarray(jax.device_get([m["finite"] for m in pending]))
    if not finite.all():
        last = ckpts.latest_step()
        keep = (
            f"the last good checkpoint (step {last}) is kept in {ckpts.directory('latest')}"
            if last is not None
            else "no checkpoint had been written yet"
        )
        raise NonFiniteLossError(
            f"loss or weights became NaN/Inf by step {step}; training stopped and {keep}. "
            "Try a lower --config.learning_rate or --config.precision=float32."
        )


def compile_train_step(run: Run, state, batch, resident_bytes: int = 0) -> Any:
    """The train step compiled for these shapes (the one compilation of the run),
    after checking that it fits in device memory (``memory.check_train_step``) beside
    ``resident_bytes`` of training images kept there (`data.on_device`)."""
    compiled = run.train_step.lower(state, batch).compile()
    memory.check_train_step(compiled, run.config, resident_bytes)
    return compiled


def train_feed(run: Run, start_step: int) -> tuple[Any, int]:
    """Device batches ``{'image', 'label'}`` from ``start_step`` on, the same from
    either path, and the bytes per device of the training split kept there (0: Grain)."""
    split = run.dataset.splits["train"]
    if run.data_on_device.on and start_step < run.total_steps:
        resident = on_device.load(split, run.config, run.parallel, run.data_on_device.sizes)
        return resident.batches(start_step), resident.nbytes
    raw = input_pipeline.train_batches(split, run.config, start_step=start_step)
    return run.parallel.prefetch(raw), 0


class _Loop:
    """The training loop's state: train state, pending metrics, checkpoints, writers."""

    def __init__(
        self,
        run: Run,
        ckpts: ckpt_lib.TrainCheckpoints,
        writer,
        state,
        meta: dict,
        claim: lock.Claim | None,
    ):
        self.run, self.ckpts, self.writer, self.claim = run, ckpts, writer, claim
        self.state, self.meta = state, meta
        self.pending: list[dict] = []
        self.saved_step: int | None = None
        self.progress = writers.ProgressLogger(
            run.total_steps, run.config.global_batch_size, run.config.log_every_steps
        )

    def _committed(self, step: int) -> None:
        self.saved_step = step
        if self.claim is not None:
            self.claim.keep()  # from now on a failure keeps this run's checkpoints

    def save_latest(self, step: int) -> None:
        _check_finite(self.pending, step, self.ckpts)
        self.pending = []
        self.ckpts.save_latest(step, self.run.parallel.host_state(self.state), self.meta)
        self._committed(step)

    def log_train(self, done: int) -> None:
        host = self.run.parallel.metrics_to_host(self.pending)
        _check_finite(self.pending, done, self.ckpts)
        scalars = {
            "train/loss": float(np.mean([h["loss"] for h in host])),
            "train/accuracy": float(np.mean([h["accuracy"] for h in host])),
            "train/epoch": done / self.run.steps_per_epoch,
        }
        scalars.update({f"perf/{k}": v for k, v in self.progress(done).items()})
        self.writer.write_scalars(done, scalars)
        self.pending = []

    def end_epoch(self, done: int) -> None:
        run, meta = self.run, self.meta
        epoch = done // run.steps_per_epoch
        _check_finite(self.pending, done, self.ckpts)
        val, _ = run.evaluate(self.state, "validation")
        self.writer.write_scalars(
            done, {f"validation/{k}": v for k, v in val.items() if isinstance(v, float | int)}
        )
        log.info(
            "epoch %d/%d: validation balanced accuracy %.4f, +/-1 accuracy %.4f",
            epoch,
            run.config.num_epochs,
            val["balanced_accuracy"],
            val["within1_accuracy"],
        )
        meta["epoch"] = epoch
        if val["balanced_accuracy"] >= meta["best_balanced_accuracy"]:  # ties: later epoch
            meta["best_balanced_accuracy"] = float(val["balanced_accuracy"])
            meta["best_epoch"] = epoch
            # Before the latest checkpoint whose ``meta`` names this epoch.
            self.ckpts.save_best(done, run.parallel.host_state(self.state), meta)
            self._committed(done)
        self.save_latest(done)

    def train(self, step_fn, batches, start_step: int, where: dict) -> None:
        """Steps ``start_step`` to the end; a first SIGINT/SIGTERM stops it after the
        step under way, with a checkpoint of that step."""
        config, spe, total = self.run.config, self.run.steps_per_epoch, self.run.total_steps
        with interrupts.deferred():
            for step in range(start_step, total):
                self.state, m = step_fn(self.state, next(batches))
                self.pending.append(m)
                done = where["step"] = step + 1
                if done % config.log_every_steps == 0 or done == total:
                    self.log_train(done)
                if done % spe == 0:
                    self.end_epoch(done)
                elif done % config.checkpoint_every_steps == 0:
                    self.save_latest(done)
                if (signum := interrupts.pending()) is not None:
                    if self.saved_step != done:
                        self.save_latest(done)
                    raise interrupts.Interrupted(
                        signum,
                        (
                            f"stopped by {signal.Signals(signum).name} at step {done} (checkpoint "
                            f"saved in {self.ckpts.directory('latest')}); rerun the same command "
                            "to resume"
                        ),
                    )


def _stopped(
    e: interrupts.Interrupted, ckpts: ckpt_lib.TrainCheckpoints, step: int
) -> interrupts.Interrupted:
    """The one line of a run stopped at once (outside the loop, or a second signal)."""
    last = ckpts.latest_step()
    if last is None:
        text = (
            f"stopped by {e.name} at step {step}, before the first checkpoint; the workdir "
            "is as it was; rerun the same command to start again"
        )
    else:
        text = (
            f"stopped by {e.name} at step {step}; rerun the same command to resume from "
            f"the checkpoint of step {last} in {ckpts.directory('latest')}"
        )
    return interrupts.Interrupted(e.signum, text)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    dataset=None,
    claim: lock.Claim | None = None,
) -> dict:
    """Train (resuming if possible), keep the best epoch, evaluate it on the test split.

    Nothing is written before the data, the model and the compiled step's memory
    need have been checked; ``claim`` (``runtime.lock.claim``) is told when the run's
    first checkpoint is committed, so that an earlier failure can be undone.
    """
    workdir = Path(workdir)
    run = Run(config, dataset)  # Validates data and config before anything is written.
    log.info("%s", run.data_on_device.reason)  # data_on_device=true that cannot fit: stop
    ckpts = ckpt_lib.TrainCheckpoints(workdir)
    where = {"step": 0}
    try:
        return _train_and_evaluate(run, ckpts, workdir, claim, where)
    except interrupts.Interrupted as e:
        if e.final:
            raise
        raise _stopped(e, ckpts, where["step"]) from None
    finally:
        ckpts.close()


def _train_and_evaluate(
    run: Run, ckpts: ckpt_lib.TrainCheckpoints, workdir: Path, claim: lock.Claim | None, where: dict
) -> dict:
    config, par = run.config, run.parallel
    is_main = jax.process_index() == 0
    state = run.initial_state
    meta = {"epoch": 0, "best_balanced_accuracy": -1.0, "best_epoch": 0}
    restored = ckpts.restore_latest(run.abstract_state())
    if restored is not None:
        state, meta = restored
        log.info("resuming from step %d (epoch %d) in %s", int(state.step), meta["epoch"], workdir)
    start_step = where["step"] = int(state.step)
    state = par.put_state(state)

    log.info(
        "training %s (%s parameters): %d train images, %d steps/epoch x %d epochs, "
        "global batch %d on %d device(s) (%s)",
        config.model,
        f"{parameter_overview.count_parameters(run.model.params.to_pure_dict()):,}",
        len(run.dataset.splits["train"].labels),
        run.steps_per_epoch,
        config.num_epochs,
        config.global_batch_size,
        jax.device_count(),
        config.parallelism,
    )
    batches, resident_bytes = train_feed(run, start_step)
    step_fn = None
    if start_step < run.total_steps:
        first = next(batches)
        step_fn = compile_train_step(run, state, first, resident_bytes)
        batches = itertools.chain([first], batches)
    if is_main:
        workdir_lib.write_config(workdir, config)
    writer = writers.create_writers(workdir, just_logging=not is_main)
    try:
        loop = _Loop(run, ckpts, writer, state, meta, claim)
        if step_fn is not None:
            loop.train(step_fn, batches, start_step, where)
        writer.flush()
        log.info(
            "best epoch %d (validation balanced accuracy %.4f)",
            meta["best_epoch"],
            meta["best_balanced_accuracy"],
        )
        result = best.evaluate_best(run.model, run.dataset, ckpts, workdir, config.eval_split)
    except BaseException:
        with contextlib.suppress(Exception):  # the error under way is the one to report
            writer.close()
        raise
    writer.close()
    return result
