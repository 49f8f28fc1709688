"""Checkpoints: training state (latest and best, kept apart) and model weights.

Two Orbax managers live under ``workdir/checkpoints``: ``latest`` (saved every N
steps and at each epoch end, the last two kept so that a corrupt newest one can
fall back to its predecessor) and ``best`` (the epoch with the best validation
balanced accuracy). Orbax writes each step into a temporary directory and
renames it when complete, so a killed run never leaves a half-written
checkpoint that looks valid.

Model weights alone (for import from PyTorch, evaluation, prediction and the
analyses) are a small directory: ``model.json`` naming the architecture and an
Orbax item ``weights`` with the model's parameters and batch statistics.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from stagejax.errors import CheckpointError

log = logging.getLogger(__name__)

MODEL_JSON = "model.json"
WEIGHTS_ITEM = "weights"


def save_model_weights(
    directory: str | Path,
    model: nnx.Module,
    arch: str,
    num_classes: int = 12,
    in_channels: int = 3,
) -> Path:
    """Write ``model``'s weights and architecture so ``load_model_weights`` rebuilds it."""
    directory = Path(directory).absolute()
    if (directory / WEIGHTS_ITEM).exists():
        raise CheckpointError(f"{directory / WEIGHTS_ITEM}: already exists; refusing to overwrite")
    directory.mkdir(parents=True, exist_ok=True)
    state = nnx.state(model, (nnx.Param, nnx.BatchStat)).to_pure_dict()
    state = jax.device_get(state)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / WEIGHTS_ITEM, state)
        ckptr.wait_until_finished()
    meta = {"arch": arch, "num_classes": int(num_classes), "in_channels": int(in_channels)}
    (directory / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_model_json(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MODEL_JSON
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a stagejax model directory)")
    try:
        meta = json.loads(path.read_text())
        return {k: meta[k] for k in ("arch", "num_classes", "in_channels")}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: malformed ({e})") from None


def load_model_weights(directory: str | Path, **create_kwargs: Any) -> nnx.Module:
    """Rebuild the model saved by ``save_model_weights``, in eval mode.

    ``create_kwargs`` go to ``stagejax.models.create`` (e.g. ``dtype``).
    """
    from stagejax import models

    directory = Path(directory).absolute()
    meta = read_model_json(directory)
    model = models.create(
        meta["arch"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
        **create_kwargs,
    )
    load_weights_into(model, directory)
    model.eval()
    return model


def load_weights_into(model: nnx.Module, directory: str | Path) -> None:
    """Restore saved weights into an already built model of the same architecture."""
    directory = Path(directory).absolute()
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.to_pure_dict()
    )
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(directory / WEIGHTS_ITEM, target)
    except Exception as e:  # orbax raises a variety of errors for bad trees
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{directory / WEIGHTS_ITEM}: cannot restore ({first})") from None
    state.replace_by_pure_dict(restored)
    nnx.update(model, state)


class TrainCheckpoints:
    """The ``latest`` and ``best`` training checkpoints of one workdir.

    Items: ``state`` (the train state pytree) and ``meta`` (JSON: epoch, best
    validation balanced accuracy so far, ...).
    """

    def __init__(self, workdir: str | Path, keep_latest: int = 2):
        root = Path(workdir).absolute() / "checkpoints"
        async_ok = jax.process_count() == 1

        def manager(name: str, keep: int) -> ocp.CheckpointManager:
            opts = ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_ok,
                cleanup_tmp_directories=True,
            )
            return ocp.CheckpointManager(root / name, options=opts, item_names=("state", "meta"))

        self.latest = manager("latest", keep_latest)
        self.best = manager("best", 1)
        self._unreadable: set[int] = set()  # latest steps restore_latest had to skip

    @staticmethod
    def _save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
        if step in mngr.all_steps():
            return  # Same step re-reached after a resume: content is identical.
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )

    def save_latest(self, step: int, state: Any, meta: dict) -> None:
        # ``meta`` names the best epoch: its (asynchronous) best checkpoint must be
        # committed before a latest one that refers to it, or a run killed in
        # between resumes past that epoch with no best checkpoint left.
        self.best.wait_until_finished()
        if step in self._unreadable:  # re-reached after falling back: replace the bad one
            self._unreadable.discard(step)
            self.latest.delete(step)
        self._save(self.latest, step, state, meta)

    def save_best(self, step: int, state: Any, meta: dict) -> None:
        # Only one is kept; wait so the previous best is gone before a new one lands.
        self.best.wait_until_finished()
        for old in self.best.all_steps():
            if old != step:
                self.best.delete(old)
        self._save(self.best, step, state, meta)

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The newest readable latest checkpoint, falling back to older ones."""
        self.latest.wait_until_finished()
        for step in sorted(self.latest.all_steps(), reverse=True):
            try:
                out = self.latest.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
                return out["state"], dict(out["meta"])
            except Exception as e:  # corrupt or truncated files
                self._unreadable.add(step)
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                log.warning(
                    "checkpoint %s/%d is unreadable (%s); falling back to the previous one",
                    self.latest.directory, step, msg,
                )
        return None

    def restore_best(self, abstract_state: Any) -> tuple[Any, dict] | None:
        self.best.wait_until_finished()
        step = self.best.latest_step()
        if step is None:
            return None
        out = self.best.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], dict(out["meta"])

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()
