"""Training checkpoints: the train state, latest and best kept apart.

Two Orbax managers live under ``workdir/checkpoints``: ``latest`` (saved every N
steps and at each epoch end, the last two kept so that a corrupt newest one can
fall back to its predecessor) and ``best`` (the epoch with the best validation
balanced accuracy). Orbax writes each step into a temporary directory and
renames it when complete, so a killed run never leaves a half-written
checkpoint that looks valid; restore skips any step that is not whole.

Model weights alone (what evaluation, prediction and the analyses load) are
`stagejax.model.saved`'s.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from stagejax.errors import CheckpointError, first_line
from stagejax.runtime import files

log = logging.getLogger(__name__)

STEP_ITEMS = ("state", "meta")
TMP_MARKER = ".orbax-checkpoint-tmp"  # Orbax writes step N into "N.orbax-checkpoint-tmp"


class TrainCheckpoints:
    """The ``latest`` and ``best`` training checkpoints of one workdir.

    Items: ``state`` (the train state pytree) and ``meta`` (JSON: epoch, best
    validation balanced accuracy so far, ...). Nothing is created before the
    first save. Saves are synchronous, so a failed one (disk full) is reported
    at its step; a new checkpoint is committed before any old one is removed,
    and removal renames a step out of the way first, so whatever moment a run
    is killed, every step directory left is complete or is skipped on restore.
    """

    def __init__(self, workdir: str | Path, keep_latest: int = 2):
        self.root = Path(workdir).absolute() / "checkpoints"
        self._keep = {"latest": keep_latest, "best": 1}
        self._managers: dict[str, ocp.CheckpointManager] = {}
        self._unreadable: set[int] = set()  # latest steps restore_latest had to skip
        self.skipped: dict[str, list[str]] = {"latest": [], "best": []}

    def directory(self, name: str) -> Path:
        return self.root / name

    def _manager(self, name: str, create: bool = False) -> ocp.CheckpointManager | None:
        if name not in self._managers:
            if not create and not self.directory(name).is_dir():
                return None
            opts = ocp.CheckpointManagerOptions(
                max_to_keep=None, create=True, enable_async_checkpointing=False
            )
            self._managers[name] = ocp.CheckpointManager(
                self.directory(name), options=opts, item_names=STEP_ITEMS
            )
        return self._managers[name]

    def _all_steps(self, name: str) -> list[int]:
        mngr = self._manager(name)
        return sorted(mngr.all_steps()) if mngr is not None else []

    def _incomplete(self, name: str, step: int) -> str | None:
        """Why step directory ``step`` is not a whole checkpoint (None if it is)."""
        missing = [i for i in STEP_ITEMS if not (self.directory(name) / str(step) / i).is_dir()]
        return f"no {' or '.join(repr(i) for i in missing)} item" if missing else None

    def steps(self, name: str) -> list[int]:
        """The complete steps of ``name`` ('latest' or 'best'), oldest first."""
        return [s for s in self._all_steps(name) if self._incomplete(name, s) is None]

    def latest_step(self) -> int | None:
        return max(self.steps("latest"), default=None)

    def has_best(self) -> bool:
        """Whether a best checkpoint was started (complete or not)."""
        return bool(self._all_steps("best"))

    # -- saving -----------------------------------------------------------
    def save_latest(self, step: int, state: Any, meta: dict) -> None:
        self._save("latest", step, state, meta)

    def save_best(self, step: int, state: Any, meta: dict) -> None:
        # Saved before the latest checkpoint whose ``meta`` names its epoch.
        self._save("best", step, state, meta)

    def _save(self, name: str, step: int, state: Any, meta: dict) -> None:
        mngr = self._manager(name, create=True)
        if step in mngr.all_steps():
            if self._incomplete(name, step) is None and not (
                name == "latest" and step in self._unreadable
            ):
                return  # Same step re-reached after a resume: content is identical.
            self._unreadable.discard(step)
            self._remove(name, step)  # a broken one: replace it
        self._remove_leftovers(name)
        _ignore_closed_loop_callbacks()
        try:
            with orbax_errors_silenced():
                mngr.save(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                    ),
                )
                mngr.wait_until_finished()
        except Exception as e:  # only a full or read-only disk becomes one line
            self._discard_manager(name)
            self._remove_leftovers(name, settle=True)
            reason = files.storage_failure(e)
            if reason is None:
                raise
            _drop_unretrieved_storage_failures()
            previous = max(self.steps(name), default=None)
            kept = (
                f"the previous checkpoint (step {previous}) is intact"
                if previous is not None
                else "no earlier checkpoint here"
            )
            size = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state))
            raise files.write_error(
                self.directory(name),
                f"{reason}; it needs about {files.format_bytes(size)}",
                f"the checkpoint of step {step}",
                kept,
            ) from None
        if why := self._incomplete(name, step):
            raise CheckpointError(f"{self.directory(name) / str(step)}: not written ({why})")
        keep = self.steps(name)[-self._keep[name] :]
        for old in self._all_steps(name):  # older ones, and any broken one
            if old not in keep:
                self._remove(name, old)

    def _remove(self, name: str, step: int) -> None:
        """Delete a step: renamed first, so a kill mid-way leaves no partial step."""
        directory = self.directory(name)
        if jax.process_index() == 0:
            trash = directory / f".deleting-{step}"
            shutil.rmtree(trash, ignore_errors=True)
            (directory / str(step)).rename(trash)
            shutil.rmtree(trash)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"stagejax:remove:{name}:{step}")
        self._manager(name).reload()

    def _discard_manager(self, name: str) -> None:
        """Close and forget a manager whose save failed: closing waits for the threads
        still writing that step, which would otherwise recreate its temporary
        directories after they were removed; the next use opens a fresh one."""
        mngr = self._managers.pop(name, None)
        if mngr is not None:
            with contextlib.suppress(Exception), orbax_errors_silenced():
                mngr.close()

    def _remove_leftovers(self, name: str, settle: bool = False) -> None:
        """Temporary directories of an interrupted or failed save or removal. With
        ``settle`` (a failed save, whose last writes may still land), repeated until
        none has reappeared 0.2 s later, for at most ~3 s."""
        if jax.process_index() != 0:
            return
        for _ in range(15 if settle else 1):
            found = [
                p
                for p in self.directory(name).iterdir()
                if TMP_MARKER in p.name or p.name.startswith(".deleting-")
            ]
            if not found and settle:
                return
            for p in found:
                shutil.rmtree(p, ignore_errors=True)
            time.sleep(0.2 if settle else 0)

    # -- restoring --------------------------------------------------------
    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The newest readable latest checkpoint, falling back to older ones."""
        return self._restore("latest", abstract_state)

    def restore_best(self, abstract_state: Any) -> tuple[Any, dict] | None:
        return self._restore("best", abstract_state)

    def _restore(self, name: str, abstract_state: Any) -> tuple[Any, dict] | None:
        mngr = self._manager(name)
        if mngr is not None:
            for p in sorted(self.directory(name).glob(f"*{TMP_MARKER}*")):
                log.warning(
                    "checkpoint %s is an unfinished save (its run was stopped while "
                    "writing it); ignoring it",
                    p,
                )
        for step in reversed(self._all_steps(name)):
            if why := self._incomplete(name, step):
                self._skip(
                    name,
                    step,
                    f"is incomplete ({why}: its run was stopped while writing or deleting it)",
                    "skipping it",
                )
                continue
            try:
                out = mngr.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                    ),
                )
                return out["state"], dict(out["meta"])
            except Exception as e:  # corrupt or truncated files
                self._skip(
                    name,
                    step,
                    f"is unreadable ({first_line(e)})",
                    "falling back to the previous one",
                )
        return None

    def _skip(self, name: str, step: int, problem: str, action: str) -> None:
        if name == "latest":
            self._unreadable.add(step)
        self.skipped[name].append(f"step {step} {problem}")
        log.warning("checkpoint %s/%d %s; %s", self.directory(name), step, problem, action)

    def wait(self) -> None:
        """Saves are synchronous; kept so callers need not know."""

    def close(self) -> None:
        for mngr in self._managers.values():
            mngr.close()


def _ignore_closed_loop_callbacks() -> None:
    """After a failed save, tensorstore's writes still in flight complete into the
    closed event loop of the save, each printing ``RuntimeError: Event loop is
    closed`` (an unraisable exception) at some later moment; drop exactly those."""
    previous = sys.unraisablehook
    if getattr(previous, "_stagejax", False):
        return

    def hook(unraisable) -> None:
        exc = unraisable.exc_value
        if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
            previous(unraisable)

    hook._stagejax = True
    sys.unraisablehook = hook


class _UnretrievedStorageFailures(logging.Filter):
    """asyncio's "exception was never retrieved" for tensorstore writes of a failed
    save that the full disk refused too: the save's error is already reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        unretrieved = "exception was never retrieved" in record.getMessage()
        return not (unretrieved and exc is not None and files.storage_failure(exc))


def _drop_unretrieved_storage_failures() -> None:
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedStorageFailures) for f in asyncio_log.filters):
        asyncio_log.addFilter(_UnretrievedStorageFailures())


class _OrbaxErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or "/orbax/" not in record.pathname


@contextlib.contextmanager
def orbax_errors_silenced():
    """Orbax logs a failed save's traceback from each of its threads (hundreds of
    lines) and then raises it; the raised error is reported once, by the caller."""
    quiet = _OrbaxErrors()
    loggers = [logging.getLogger("absl"), logging.getLogger()]
    for lg in loggers:
        lg.addFilter(quiet)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(quiet)
