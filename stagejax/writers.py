"""Metric writers (log, TensorBoard, JSON lines) and a training-speed logger.

Why not ``clu.metric_writers``: it imports TensorFlow, which this project does
not install. These writers keep clu's ``MetricWriter`` method names
(``write_scalars``, ``write_images``, ``write_texts``, ``write_hparams``,
``flush``, ``close``) so the training loop reads like the Flax examples and
could switch back to clu unchanged.

* ``ConsoleWriter``: one absl log line per write, for every process.
* ``TensorBoardWriter``: event files via tensorboardX (no TensorFlow needed).
* ``JsonlWriter``: ``metrics.jsonl``, one JSON object per write, trivially
  parsed by pandas or ``json``; appended to, so a resumed run continues it (a
  step repeated after a resume appears twice; readers keep the last one).
"""

from __future__ import annotations

import collections
import datetime
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from stagejax import workdir as workdir_lib

Scalar = int | float | np.number | np.ndarray


def _to_float(value: Any) -> float:
    """Scalars may arrive as Python numbers, numpy or (replicated-free) jax arrays."""
    return float(np.asarray(value).reshape(()))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dicts -> flat {'a.b': value} (hparams must be flat scalars)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


class MetricWriter:
    """The clu MetricWriter interface; every method is a no-op by default."""

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        pass

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        pass

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        pass

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()


class ConsoleWriter(MetricWriter):
    """Logs each write as one line: ``[step] name=value, ...``."""

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        values = ", ".join(f"{k}={_to_float(v):.6g}" for k, v in sorted(scalars.items()))
        logging.info("[%d] %s", step, values)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        shapes = ", ".join(f"{k} {np.shape(v)}" for k, v in sorted(images.items()))
        logging.info("[%d] images: %s", step, shapes)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        values = ", ".join(f"{k}={v!r}" for k, v in sorted(texts.items()))
        logging.info("[%d] %s", step, values)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        values = ", ".join(f"{k}={v!r}" for k, v in sorted(_flatten(hparams).items()))
        logging.info("hparams: %s", values)


class TensorBoardWriter(MetricWriter):
    """Writes TensorBoard event files into ``logdir`` with tensorboardX's protos.

    Events are written and flushed in the caller's thread (tensorboardX's
    ``SummaryWriter`` writes from a background thread that, on a full disk, dies
    and then blocks the training loop forever), so a failed write is raised at
    the step that made it.
    """

    def __init__(self, logdir: str | os.PathLike):
        # Imported here: heavy, and only process 0 needs it.
        from tensorboardX.event_file_writer import EventsWriter

        self.logdir = Path(logdir)
        with workdir_lib.writing(self.logdir, "TensorBoard events"):
            self.logdir.mkdir(parents=True, exist_ok=True)
            self._events = EventsWriter(os.fspath(self.logdir / "events"))

    def _write(self, step: int | None, summaries: Sequence[Any]) -> None:
        from tensorboardX.proto import event_pb2

        with workdir_lib.writing(self.logdir, "TensorBoard events"):
            for summary in summaries:
                event = event_pb2.Event(wall_time=time.time(), summary=summary)
                if step is not None:
                    event.step = int(step)
                self._events.write_event(event)
            self._events.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        from tensorboardX import summary

        self._write(step, [summary.scalar(k, _to_float(v)) for k, v in scalars.items()])

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Images are [N,H,W,C] or [H,W,C], uint8 or float in [0, 1] (like clu)."""
        from tensorboardX import summary

        out = []
        for key, value in images.items():
            value = np.asarray(value)
            out.append(summary.image(key, value[None] if value.ndim == 3 else value,
                                     dataformats="NHWC"))
        self._write(step, out)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        from tensorboardX import summary

        self._write(step, [summary.text(k, v) for k, v in texts.items()])

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Feeds TensorBoard's HParams tab; non-scalar values are shown as text."""
        from tensorboardX.summary import hparams as hparams_summary

        flat = {
            k: v if isinstance(v, bool | int | float | str) else str(v)
            for k, v in _flatten(hparams).items()
        }
        self._write(None, list(hparams_summary(flat, {})))

    def flush(self) -> None:
        with workdir_lib.writing(self.logdir, "TensorBoard events"):
            self._events.flush()

    def close(self) -> None:
        with workdir_lib.writing(self.logdir, "TensorBoard events"):
            self._events.close()


class JsonlWriter(MetricWriter):
    """Appends one JSON object per write to ``path`` (e.g. workdir/metrics.jsonl).

    Scalar writes are flat records ``{"step", "wall_time", name: value, ...}``;
    texts go under ``"texts"`` and hparams under ``"hparams"``. Images are not
    recorded (TensorBoard has them). A NaN loss is written as ``NaN`` (read
    back by Python's json). The file is opened per write, so nothing is lost
    if the job is killed, and resuming simply appends.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _append(self, record: dict) -> None:
        with workdir_lib.writing(self.path), self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        clash = {"step", "wall_time"} & set(scalars)
        if clash:
            raise ValueError(f"scalar names {sorted(clash)} are reserved in {self.path}")
        record = {"step": int(step), "wall_time": time.time()}
        record.update({k: _to_float(v) for k, v in scalars.items()})
        self._append(record)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self._append({"step": int(step), "wall_time": time.time(), "texts": dict(texts)})

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        flat = {k: v if isinstance(v, bool | int | float | str | None) else str(v)
                for k, v in _flatten(hparams).items()}
        self._append({"step": None, "wall_time": time.time(), "hparams": flat})


class MultiWriter(MetricWriter):
    """Forwards every call to each of ``writers``."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for w in self.writers:
            w.write_images(step, images)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for w in self.writers:
            w.write_texts(step, texts)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write_hparams(hparams)

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
        import jax

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
        logging.info(
            "step %d/%d (%.1f%%): %.2f steps/s, %.1f images/s, ETA %s",
            step, self.total_steps, 100.0 * step / max(self.total_steps, 1),
            out["steps_per_sec"], out["images_per_sec"],
            datetime.timedelta(seconds=round(eta)),
        )
        return out
