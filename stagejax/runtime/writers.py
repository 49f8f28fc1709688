"""Metric writers (log, TensorBoard, JSON lines) and a training-speed logger.

Why not ``clu.metric_writers`` (clu is a dependency): in clu 0.0.12 importing
any ``clu.metric_writers`` submodule runs the package's ``__init__``, which
imports TensorFlow, and ``clu.periodic_actions`` imports ``metric_writers``
too; this project does not install TensorFlow. So these few writers keep
clu's ``MetricWriter`` method names for what the loop writes (scalars):

* ``ConsoleWriter``: one log line per write, on every process.
* ``TensorBoardWriter``: event files via tensorboardX (no TensorFlow needed).
* ``JsonlWriter``: ``metrics.jsonl``, one JSON object per write, trivially
  parsed by pandas or ``json``; appended to, so a resumed run continues it (a
  step repeated after a resume appears twice; readers keep the last one).
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from stagejax.runtime.files import writing

log = logging.getLogger(__name__)

Scalar = int | float | np.number | np.ndarray


def _to_float(value: Scalar) -> float:
    """Scalars may arrive as Python numbers, numpy or (replicated-free) jax arrays."""
    return float(np.asarray(value).reshape(()))


class MetricWriter:
    """clu's MetricWriter interface, as far as the loop uses it."""

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()


class ConsoleWriter(MetricWriter):
    """Logs each write as one line: ``[step] name=value, ...``."""

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        values = ", ".join(f"{k}={_to_float(v):.6g}" for k, v in sorted(scalars.items()))
        log.info("[%d] %s", step, values)


def _tensorboardx():
    """tensorboardX's scalar summary, event writer and Event proto, imported without
    PyTorch. Why: its package imports torch when that is installed, only to accept
    torch tensors, which stagejax never passes; that is 3.4 s at every training start
    on a machine with the PyTorch baseline (0.3 s without). Imported here, by
    training only: eval, predict and section runs write no events."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
    try:
        from tensorboardX import summary
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2
    finally:
        if hide:
            del sys.modules["torch"]
    return summary, EventsWriter, event_pb2


class TensorBoardWriter(MetricWriter):
    """Writes TensorBoard event files into ``logdir`` with tensorboardX's protos.

    Events are written and flushed in the caller's thread (tensorboardX's
    ``SummaryWriter`` writes from a background thread that, on a full disk, dies
    and then blocks the training loop forever), so a failed write is raised at
    the step that made it.
    """

    def __init__(self, logdir: str | os.PathLike):
        summary, EventsWriter, event_pb2 = _tensorboardx()
        self._summary, self._event_pb2 = summary, event_pb2
        self.logdir = Path(logdir)
        with writing(self.logdir, "TensorBoard events"):
            self.logdir.mkdir(parents=True, exist_ok=True)
            self._events = EventsWriter(os.fspath(self.logdir / "events"))

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        with writing(self.logdir, "TensorBoard events"):
            for k, v in scalars.items():
                summary = self._summary.scalar(k, _to_float(v))
                event = self._event_pb2.Event(
                    wall_time=time.time(), step=int(step), summary=summary
                )
                self._events.write_event(event)
            self._events.flush()

    def flush(self) -> None:
        with writing(self.logdir, "TensorBoard events"):
            self._events.flush()

    def close(self) -> None:
        with writing(self.logdir, "TensorBoard events"):
            self._events.close()


class JsonlWriter(MetricWriter):
    """Appends one JSON object ``{"step", "wall_time", name: value, ...}`` per write
    to ``path`` (e.g. workdir/metrics.jsonl).

    A NaN loss is written as ``NaN`` (read back by Python's json). The file is
    opened per write, so nothing is lost if the job is killed, and resuming
    simply appends.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        clash = {"step", "wall_time"} & set(scalars)
        if clash:
            raise ValueError(f"scalar names {sorted(clash)} are reserved in {self.path}")
        record = {"step": int(step), "wall_time": time.time()}
        record.update({k: _to_float(v) for k, v in scalars.items()})
        with writing(self.path), self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")


class MultiWriter(MetricWriter):
    """Forwards every call to each of ``writers``."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        for w in self.writers:
            w.write_scalars(step, scalars)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


def create_writers(workdir: str | os.PathLike, just_logging: bool | None = None) -> MultiWriter:
    """Log lines everywhere; on process 0 also ``workdir/tensorboard/`` and ``metrics.jsonl``.

    ``just_logging`` defaults to ``jax.process_index() > 0`` so that only one
    process of a multi-host job writes files.
    """
    if just_logging is None:
        just_logging = jax.process_index() > 0
    writers: list[MetricWriter] = [ConsoleWriter()]
    if not just_logging:
        workdir = Path(workdir)
        writers.append(TensorBoardWriter(workdir / "tensorboard"))
        writers.append(JsonlWriter(workdir / "metrics.jsonl"))
    return MultiWriter(writers)


class ProgressLogger:
    """Logs training speed and time left, robust to compile time and eval pauses.

    Call it after each training step finishes with the number of steps done so
    far (calling only every few steps also works). The first call only starts
    the clock, so the first step of a run or resume, which includes XLA
    compilation, is never timed. Speed is the median over the last ``window``
    intervals between calls, so an occasional slow interval (evaluation,
    checkpointing) does not swing the numbers. Every ``every_steps`` steps (and
    at ``total_steps``) it logs one line and returns
    ``{'steps_per_sec', 'images_per_sec', 'eta_seconds'}``; otherwise, and
    before any interval has been timed, it returns an empty dict, so
    ``scalars.update(progress(step))`` is always safe.
    """

    def __init__(
        self,
        total_steps: int,
        global_batch_size: int,
        every_steps: int,
        window: int = 20,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if every_steps < 1:
            raise ValueError(f"every_steps: must be >= 1, got {every_steps}")
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.every_steps = every_steps
        self._clock = clock
        self._seconds_per_step: collections.deque[float] = collections.deque(maxlen=window)
        self._last: tuple[int, float] | None = None  # (step, time) of the previous call
        self._last_logged_step: int | None = None

    def __call__(self, step: int) -> dict[str, float]:
        now = self._clock()
        if self._last is not None and step > self._last[0]:
            self._seconds_per_step.append((now - self._last[1]) / (step - self._last[0]))
        self._last = (step, now)

        due = step % self.every_steps == 0 or step >= self.total_steps
        if not due or step == self._last_logged_step or not self._seconds_per_step:
            return {}
        self._last_logged_step = step
        sec_per_step = statistics.median(self._seconds_per_step)
        steps_per_sec = 1.0 / sec_per_step if sec_per_step > 0 else math.inf
        eta = max(self.total_steps - step, 0) * sec_per_step
        out = {
            "steps_per_sec": steps_per_sec,
            "images_per_sec": steps_per_sec * self.global_batch_size,
            "eta_seconds": eta,
        }
        log.info(
            "step %d/%d (%.1f%%): %.2f steps/s, %.1f images/s, ETA %s",
            step,
            self.total_steps,
            100.0 * step / max(self.total_steps, 1),
            out["steps_per_sec"],
            out["images_per_sec"],
            datetime.timedelta(seconds=round(eta)),
        )
        return out
