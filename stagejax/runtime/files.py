"""Writing files safely: whole or not at all, and a full disk as one line.

* ``atomic_write``: ``write(tmp)`` fills a temporary sibling (any writer: PIL, a
  streaming TIFF writer), then it is renamed over the target, so readers never see
  half a file and a failed write leaves the old file and no temporary one.
* ``atomic_write_bytes`` / ``atomic_write_text``: the same for bytes or text in hand.
* ``replace_dir``: the same for a directory (the exported best model).
* ``new_dir``: a new output folder (a dataset, a section) that appears whole or not
  at all, after ``check_output_dir`` refused a non-empty one before the long work.
* ``staging_dir``: a hidden scratch folder beside an output, removed on exit.
* ``writing``: turns a full disk, quota or read-only file system into one
  ``ResourceError`` line naming the path and the free space.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from stagejax.errors import ConfigError, ResourceError, StagejaxError

TMP_PREFIX = ".stagejax_tmp_"  # temporary siblings: TMP_PREFIX + target name + "." + random

# errno values that mean "this storage cannot take the write": the user's to fix.
WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _file_mode(mode: int = 0o666) -> int:
    """What a plainly created file (or, with 0o777, folder) gets: mkstemp's and
    mkdtemp's 0600/0700 would hide outputs from a lab's group."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _tmp_prefix(path: Path) -> str:
    """The one temporary-name scheme: hidden, naming the target, unique per call."""
    return f"{TMP_PREFIX}{path.name}."


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temporary sibling of ``path``, which then replaces it."""
    path = Path(path)
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path))
        os.close(fd)
        try:
            write(Path(tmp))
            os.chmod(tmp, _file_mode())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def replace_dir(directory: Path, fill: Callable[[Path], None], what: str = "") -> None:
    """``fill(tmp)`` writes a new directory, which is then swapped in for ``directory``;
    a failure (disk full) leaves the old one and no partial copy."""
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=_tmp_prefix(directory)))
    shutil.rmtree(tmp)  # ``fill`` creates it (Orbax refuses an existing directory)
    try:
        with writing(directory, what):
            fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)  # left by a run killed mid-swap; blocks rename
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def check_output_dir(out: Path, flag: str = "out") -> None:
    """Refuse an ``out`` (given as ``flag``) that is a file or a folder with anything
    in it, before the long work that ``new_dir`` then publishes there."""
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{flag}: {out} is not empty; name a new or empty folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag}: {out} exists and is not a folder")


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``final``, removed on exit unless renamed away."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_tmp_prefix(final)))
    try:
        os.chmod(tmp, _file_mode(0o777))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def new_dir(out: Path, fill: Callable[[Path], None], what: str = "") -> bool:
    """``fill(tmp)`` writes a folder beside ``out`` that is then renamed to ``out`` (absent
    or empty), so readers never see half of it and a failure or Ctrl-C leaves nothing.
    False, with nothing written, when someone else filled ``out`` in the meantime."""
    with staging_dir(out) as tmp:
        with writing(out, what):
            fill(tmp)
        try:
            os.rename(tmp, out)  # replaces an empty folder; fails on a non-empty one
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            return False
    return True


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
    return ResourceError(
        f"{path}: cannot write{what} ({reason}, {free_space(path)} free); "
        f"{note}free some space (or choose another --workdir) and rerun"
    )


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
    line naming the file (``path`` for one of our temporaries); any other error
    passes unchanged."""
    try:
        yield
    except StagejaxError:
        raise
    except Exception as e:
        reason = storage_failure(e)
        if reason is None:
            raise
        name = getattr(e, "filename", None)
        if not name or TMP_PREFIX in str(name):
            name = path
        raise write_error(name, reason, what) from None
