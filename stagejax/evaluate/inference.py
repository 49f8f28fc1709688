"""Inference passes over a split or a folder of images, and a split's metrics.

Each process evaluates its own part of the data; outputs are gathered to every
host and put back in file order, so the report is the same whatever the
number of devices or hosts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from stagejax.data import input_pipeline
from stagejax.evaluate import metrics as metrics_lib
from stagejax.runtime.parallel import Parallel
from stagejax.stages import STAGES

log = logging.getLogger(__name__)


def _host_gather(x: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return x
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run_inference(
    parallel: Parallel,
    eval_step: Callable,
    state: Any,
    batches: Iterator[dict],
    num_examples: int,
    desc: str = "eval",
    log_every_s: float = 10.0,
) -> dict[str, np.ndarray]:
    """Run ``eval_step`` over ``batches`` and return per-example outputs in file order.

    Batches carry ``index`` (position in the split, -1 for padding) and ``mask``.
    """
    out: dict[str, np.ndarray] = {}
    seen = 0
    t0 = last = time.time()
    for batch in batches:
        index, mask = _host_gather(batch["index"]), _host_gather(batch["mask"])
        device_batch = parallel.put_batch(
            {k: v for k, v in batch.items() if k in ("image", "label")}
        )
        result = parallel.gather(eval_step(state, device_batch))
        for k, v in result.items():
            if k not in out:
                out[k] = np.zeros((num_examples, *v.shape[1:]), v.dtype)
            out[k][index[mask]] = v[mask]
        seen += int(mask.sum())
        now = time.time()
        if now - last > log_every_s:
            rate = seen / (now - t0)
            log.info(
                "%s: %d/%d images (%.1f images/s, ETA %.0fs)",
                desc,
                seen,
                num_examples,
                rate,
                (num_examples - seen) / max(rate, 1e-9),
            )
            last = now
    if seen != num_examples:
        raise RuntimeError(f"{desc}: evaluated {seen} images, expected {num_examples}")
    log.info("%s: %d images in %.1fs", desc, seen, time.time() - t0)
    return out


def summarize(
    labels: np.ndarray, probs: np.ndarray, loss: np.ndarray | None, label_names=STAGES, ranks=None
) -> dict:
    """Metrics of one pass (`stagejax.evaluate.metrics.summarize` of its confusion matrix).

    The matrix is counted here, on the host, from the per-example predictions
    that the report needs in file order anyway: one count, not a second one
    accumulated on the devices that would have to agree with it.
    """
    cm = metrics_lib.confusion_matrix(labels, probs.argmax(-1), probs.shape[-1])
    return metrics_lib.summarize(
        cm, None if loss is None else float(np.mean(loss)), label_names, ranks
    )


def evaluate_split(
    model, state: Any, dataset, split_name: str, tta: bool = False
) -> tuple[dict, dict[str, np.ndarray]]:
    """(metrics, per-example outputs in file order) of ``model`` (an
    `stagejax.model.Model`) with device ``state`` on one split."""
    split = dataset.splits[split_name]
    out = run_inference(
        model.parallel,
        model.eval_step(tta),
        state,
        input_pipeline.eval_batches(split, model.config),
        len(split.labels),
        desc=f"eval {split_name}",
    )
    metrics = summarize(
        split.labels, out["probs"], out.get("loss"), dataset.label_names, dataset.stage_ranks
    )
    return metrics, out
