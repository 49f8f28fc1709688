"""The run directory: checked before any long work, so a run never overwrites
results it did not make.

A workdir is either empty/new, or holds a ``config.json`` written by an
earlier stagejax run. Re-running in it resumes that run; fields that change
what is trained (model, data, optimizer, ...) must then be the same, while
fields that only change how long or how it is logged may differ.

A run holds its workdir with ``claim``: a lock, so that a second process is
refused at once, and a record of what was there, so that a run that fails
before its first checkpoint leaves the workdir as it found it and the retry
with a fixed setting simply runs.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_collections

from stagejax.errors import ResourceError, StagejaxError, WorkdirError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
LOCK_FILE = ".stagejax.lock"
_SCRATCH = {".write_test", LOCK_FILE}  # ours, never a sign of someone else's files

# Fields that may change when resuming a run (they do not change what a step does).
RESUMABLE_FIELDS = {
    "num_epochs", "log_every_steps", "checkpoint_every_steps", "num_workers",
    "eval_batch_size", "eval_split", "predict_dir", "tta", "cache_dir", "init_from",
    "strict", "overwrite",
}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def prepare_workdir(workdir: str | Path, config: ml_collections.ConfigDict,
                    write: bool = True, must_exist: bool = False) -> Path:
    """Create/check ``workdir`` for ``config``; raises ``WorkdirError`` in one line."""
    path = Path(workdir).expanduser().absolute()
    cfg_path = path / CONFIG_FILE
    if must_exist and not cfg_path.is_file():
        raise WorkdirError(f"{cfg_path}: missing; is {path} the workdir of a training run?")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
            pass
    except OSError as e:
        raise WorkdirError(f"{path}: workdir is not writable ({e.strerror or e})") from None

    new = json.loads(config.to_json())
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text())
        except json.JSONDecodeError:
            raise WorkdirError(f"{cfg_path}: unreadable; choose another --workdir") from None
        a, b = _flatten(old), _flatten(new)
        diff = sorted(k for k in a.keys() | b.keys()
                      if k.split(".")[0] not in RESUMABLE_FIELDS and a.get(k) != b.get(k))
        if diff and not must_exist:
            k = diff[0]
            raise WorkdirError(
                f"{path}: holds a run with a different config ({k}: {a.get(k)!r} there, "
                f"{b.get(k)!r} now{' and more' if len(diff) > 1 else ''}); "
                "choose another --workdir"
            )
    elif any(p.name not in _SCRATCH and not p.name.startswith(".write_test")
             for p in path.iterdir()) and not must_exist:
        raise WorkdirError(
            f"{path}: not empty and not a stagejax workdir (no {CONFIG_FILE}); "
            "choose an empty or new --workdir"
        )
    if write and not must_exist:
        write_config(path, config)
    return path


def write_config(workdir: str | Path, config: ml_collections.ConfigDict) -> None:
    """Record ``config`` as the run's config (``prepare_workdir`` checks it on resume)."""
    text = json.dumps(json.loads(config.to_json()), indent=2, sort_keys=True) + "\n"
    atomic_write_text(Path(workdir) / CONFIG_FILE, text)


# Fields that --mode=eval/predict take from the command line; the rest (model, crop,
# precision of the weights' training...) come from the run's config.json.
EVAL_FIELDS = ("eval_batch_size", "eval_split", "predict_dir", "tta", "cache_dir",
               "num_workers", "parallelism", "strict", "overwrite")


def eval_config(workdir: str | Path,
                cli_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config to evaluate or predict with a trained ``workdir``: the run's own,
    so the crop and model match training, with ``EVAL_FIELDS`` (and a non-empty
    ``data_dir``, to evaluate on another dataset) from the command line."""
    config = load_run_config(workdir)
    for k in EVAL_FIELDS:
        config[k] = cli_config[k]
    if cli_config.data_dir:
        config.data_dir = cli_config.data_dir
    return config


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a training run in ``workdir`` used."""
    path = Path(workdir).expanduser().absolute() / CONFIG_FILE
    if not path.is_file():
        raise WorkdirError(f"{path}: missing; is {path.parent} the workdir of a training run?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename: readers never see half a file, and a
    failed write (disk full) leaves the old file and no temporary one."""
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# -- write failures ---------------------------------------------------------

# errno values that mean "this storage cannot take the write": the user's to fix.
WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def free_space(path: str | Path) -> str:
    """Free space of the file system holding ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return format_bytes(shutil.disk_usage(path).free)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def write_error(path: str | Path, reason: str, what: str = "", note: str = "") -> ResourceError:
    """The one-line error of a write to ``path`` that the storage refused."""
    what = f" {what}" if what else ""
    note = f"{note}; " if note else ""
    return ResourceError(f"{path}: cannot write{what} ({reason}, {free_space(path)} free); "
                         f"{note}free some space (or choose another --workdir) and rerun")


def storage_failure(error: BaseException) -> str | None:
    """The reason, when ``error`` (or its cause) says the storage refused a write."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in WRITE_FAILURES:
            return error.strerror or str(error)
        text = str(error)
        for code in WRITE_FAILURES:
            # tensorstore (Orbax): "... No space left on device [os_error_code='28']"
            if f"os_error_code='{code}'" in text or os.strerror(code) in text:
                return os.strerror(code)
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def writing(path: str | Path, what: str = "") -> Iterator[None]:
    """Turn a full disk, quota or read-only file system under ``path`` into one
    line; any other error passes unchanged."""
    try:
        yield
    except StagejaxError:
        raise
    except Exception as e:
        reason = storage_failure(e)
        if reason is None:
            raise
        raise write_error(getattr(e, "filename", None) or path, reason, what) from None


# -- the lock and the undo of a failed run ------------------------------------

class _Lock:
    """``fcntl.flock`` on ``workdir/.stagejax.lock``, which names the holder.

    The kernel drops the lock when its process dies, so a lock file that can be
    locked is stale (its run was killed) and is taken over.
    """

    def __init__(self, root: Path):
        self.path = root / LOCK_FILE
        while True:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder()
                os.close(self.fd)
                raise WorkdirError(
                    f"{root}: in use by another stagejax run ({holder}); wait for it to end "
                    "or choose another --workdir") from None
            # The holder may have released (and removed) the file between open and flock.
            if self._same_file():
                break
            os.close(self.fd)
        if stale := self._holder(default=""):
            log.warning("%s: taking over the stale lock of %s, which ended without releasing "
                        "it", root, stale)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(sep=" ", timespec="seconds")}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(info) + "\n").encode(), 0)

    def _same_file(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def _holder(self, default: str = "pid unknown") -> str:
        try:
            info = json.loads(os.pread(self.fd, 4096, 0) or b"null")
            return f"pid {info['pid']} on {info['host']}, started {info['started']}"
        except (ValueError, TypeError, KeyError):
            return default

    def release(self) -> None:
        if self._same_file():
            self.path.unlink()  # before unlocking: a waiter then sees a removed file
        os.close(self.fd)


class _Snapshot:
    """What ``root`` held, to take back what a failed run added (files, folders,
    appended lines, a rewritten config.json) and restore modification times."""

    def __init__(self, root: Path, root_mtime: tuple[int, int]):
        self.root = root
        self.stats: dict[str, tuple[bool, int, int, int]] = {}
        for path in self._walk():
            st = path.lstat()
            self.stats[str(path.relative_to(root))] = (
                path.is_dir() and not path.is_symlink(), st.st_size, st.st_atime_ns,
                st.st_mtime_ns)
        self.stats["."] = (True, 0, *root_mtime)
        config = root / CONFIG_FILE
        self.config = config.read_bytes() if config.is_file() else None

    def _walk(self) -> list[Path]:
        out = []
        for parent, dirs, files in os.walk(self.root):
            out += [Path(parent) / n for n in dirs + files]
        return [p for p in out if p != self.root / LOCK_FILE]

    def undo(self) -> None:
        """Everything but the lock file and the root folder's time, which the
        caller restores once it has released the lock."""
        for path in sorted(self._walk(), key=lambda p: len(p.parts), reverse=True):
            old = self.stats.get(str(path.relative_to(self.root)))
            if old is None:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            elif not old[0] and path.is_file() and path.stat().st_size > old[1]:
                os.truncate(path, old[1])  # lines appended to metrics.jsonl
        if self.config is not None:
            config = self.root / CONFIG_FILE
            if not config.is_file() or config.read_bytes() != self.config:
                atomic_write_text(config, self.config.decode())
        self.restore_times(skip_root=True)

    def restore_times(self, skip_root: bool = False) -> None:
        for rel, (_, _, atime, mtime) in sorted(self.stats.items(), reverse=True):
            if rel == "." and skip_root:
                continue
            path = self.root / rel
            if path.exists() or path.is_symlink():
                os.utime(path, ns=(atime, mtime), follow_symlinks=False)


class Claim:
    """A run's hold on its workdir; ``keep()`` once the run has results worth keeping
    (its first committed checkpoint): a failure after that leaves its files."""

    def __init__(self, path: Path):
        self.path = path
        self.kept = False

    def keep(self) -> None:
        self.kept = True


def _make_dirs(path: Path) -> Path | None:
    """Create ``path`` and its missing parents; the topmost one created, if any."""
    missing = [p for p in [path, *path.parents] if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"{path}: workdir is not writable ({e.strerror or e})") from None
    return missing[-1] if missing else None


def _take(path: Path) -> tuple[_Lock, Path | None, os.stat_result]:
    """Create ``path`` if needed and lock it: (lock, topmost folder created, stat before)."""
    created = _make_dirs(path)
    st = path.stat()
    try:
        try:
            return _Lock(path), created, st
        except OSError as e:
            raise WorkdirError(f"{path}: workdir is not writable ({e.strerror or e})") from None
    except BaseException:
        for p in [path, *path.parents] if created is not None else []:
            with contextlib.suppress(OSError):
                p.rmdir()  # only what is still empty: never another run's files
            if p == created:
                break
        raise


@contextlib.contextmanager
def claim(workdir: str | Path, hold: bool = True,
          agree: Callable[[bool], bool] | None = None) -> Iterator[Claim]:
    """Lock ``workdir`` for this run, and undo what the run added if it fails
    before ``Claim.keep()`` (a workdir it created is removed again).

    ``hold``: False on the processes other than 0 of a multi-host run (one lock
    per run). ``agree(ok)``: multi-host, called once on every process; True when
    process 0 holds the lock.
    """
    path = Path(workdir).expanduser().absolute()
    if not hold:
        if agree is not None and not agree(True):
            raise WorkdirError(f"{path}: process 0 could not take the workdir; see its log")
        yield Claim(path)
        return
    try:
        lock, created, st = _take(path)
    except WorkdirError:
        if agree is not None:
            agree(False)
        raise
    if agree is not None:
        agree(True)
    try:
        snapshot = _Snapshot(path, (st.st_atime_ns, st.st_mtime_ns))
    except BaseException:
        lock.release()
        raise
    held = Claim(path)
    failed = False
    try:
        yield held
    except BaseException:
        failed = not held.kept
        if failed:
            snapshot.undo()
        raise
    finally:
        lock.release()
        if failed and created is not None:
            shutil.rmtree(created, ignore_errors=True)
        elif failed:
            snapshot.restore_times()
