"""A run's hold on its workdir: a lock, and the undo of a run that fails early.

``claim`` takes ``fcntl.flock`` on ``workdir/.stagejax.lock`` (a second run
is refused at once; the kernel drops the lock of a killed run) and records
what the workdir held, so that a run that fails before its first checkpoint
leaves the workdir as it found it and the retry with a fixed setting simply
runs.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from stagejax.errors import WorkdirError
from stagejax.runtime.files import atomic_write_text

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
LOCK_FILE = ".stagejax.lock"


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
                    "or choose another --workdir"
                ) from None
            # The holder may have released (and removed) the file between open and flock.
            if self._same_file():
                break
            os.close(self.fd)
        if stale := self._holder(default=""):
            log.warning(
                "%s: taking over the stale lock of %s, which ended without releasing it",
                root,
                stale,
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(sep=" ", timespec="seconds"),
        }
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
                path.is_dir() and not path.is_symlink(),
                st.st_size,
                st.st_atime_ns,
                st.st_mtime_ns,
            )
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
def claim(
    workdir: str | Path, hold: bool = True, agree: Callable[[bool], bool] | None = None
) -> Iterator[Claim]:
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
