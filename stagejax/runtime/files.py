"""Writing files safely: whole or not at all, and a full disk as one line.

* ``atomic_write`` / ``atomic_write_text``: write a temporary sibling, then
  rename it over the target, so readers never see half a file and a failed
  write leaves the old file and no temporary one.
* ``replace_dir``: the same for a directory (the exported best model).
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

from stagejax.errors import ResourceError, StagejaxError

TMP_PREFIX = ".stagejax_tmp_"  # temporary siblings of files being written

# errno values that mean "this storage cannot take the write": the user's to fix.
WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _file_mode() -> int:
    """What a plainly created file gets (mkstemp's 0600 would hide outputs from a lab's
    group)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temporary sibling of ``path``, which then replaces it."""
    path = Path(path)
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
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


def replace_dir(directory: Path, fill: Callable[[Path], None], what: str = "") -> None:
    """``fill(tmp)`` writes a new directory, which is then swapped in for ``directory``;
    a failure (disk full) leaves the old one and no partial copy."""
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f"{TMP_PREFIX}{directory.name}."))
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
