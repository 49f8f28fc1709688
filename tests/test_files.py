"""Safe writes (stagejax.runtime.files): a write is whole or absent, a full disk is one
line naming the file, and a failure leaves the old file or folder and no temporary."""

import errno
import os
import stat

import numpy as np
import pytest

from stagejax.errors import ConfigError, ResourceError
from stagejax.runtime import files
from stagejax.slides import write_pyramidal_tiff


def _disk_full(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _boom(path):
    raise RuntimeError("writer failed")


def _mode(path):
    umask = os.umask(0)
    os.umask(umask)
    return stat.S_IMODE(path.stat().st_mode), umask


def test_atomic_write_bytes_and_text(tmp_path):
    files.atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    files.atomic_write_text(tmp_path / "b.txt", "é\n")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_bytes() == "é\n".encode()
    mode, umask = _mode(tmp_path / "a.bin")
    assert mode == 0o666 & ~umask  # a plain file's permissions, not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt"]


@pytest.mark.parametrize("write", [_boom, _disk_full])
def test_failed_atomic_write_keeps_the_old_file(tmp_path, write):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises((RuntimeError, ResourceError)) as info:
        files.atomic_write(target, write)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    if write is _disk_full:
        message = str(info.value)
        assert len(message.splitlines()) == 1
        assert "cannot write" in message and "No space left on device" in message


def test_atomic_write_bytes_on_a_full_disk_names_the_target(tmp_path, monkeypatch):
    target = tmp_path / "w.npz"
    target.write_bytes(b"old")
    monkeypatch.setattr(type(target), "write_bytes", lambda self, data: _disk_full(self))
    with pytest.raises(ResourceError) as info:
        files.atomic_write_bytes(target, b"new")
    assert str(info.value).startswith(f"{target}: cannot write (No space left on device, ")
    assert len(str(info.value).splitlines()) == 1
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]


def test_staging_dir_is_removed_even_on_failure(tmp_path):
    final = tmp_path / "sub" / "out"
    with pytest.raises(RuntimeError):
        with files.staging_dir(final) as tmp:
            assert tmp.parent == final.parent and tmp.name.startswith(files.TMP_PREFIX + "out.")
            mode, umask = _mode(tmp)
            assert mode == 0o777 & ~umask  # not mkdtemp's 0700: outputs renamed from it
            (tmp / "x").write_text("x")
            raise RuntimeError
    assert list(final.parent.iterdir()) == []


def test_check_output_dir(tmp_path):
    files.check_output_dir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    files.check_output_dir(tmp_path / "empty")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="full is not empty"):
        files.check_output_dir(tmp_path / "full")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        files.check_output_dir(tmp_path / "full" / "x")


@pytest.mark.parametrize("exists", [False, True])
def test_new_dir_appears_whole(tmp_path, exists):
    out = tmp_path / "out"
    if exists:
        out.mkdir()  # an empty folder is replaced
    assert files.new_dir(out, lambda tmp: (tmp / "a.txt").write_text("a"))
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("fill", [_boom, _disk_full])
def test_failed_new_dir_leaves_nothing(tmp_path, fill):
    out = tmp_path / "out"

    def write(tmp):
        (tmp / "half.txt").write_text("half")
        fill(tmp / "half.txt")

    with pytest.raises((RuntimeError, ResourceError)) as info:
        files.new_dir(out, write, "the dataset")
    assert list(tmp_path.iterdir()) == []
    if fill is _disk_full:
        assert len(str(info.value).splitlines()) == 1
        assert "cannot write the dataset (No space left" in str(info.value)


def test_new_dir_filled_meanwhile_keeps_theirs(tmp_path):
    out = tmp_path / "out"

    def write(tmp):
        (tmp / "mine.txt").write_text("mine")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")

    assert not files.new_dir(out, write)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_replace_dir_keeps_the_old_folder(tmp_path):
    directory = tmp_path / "best"
    directory.mkdir()
    (directory / "old.txt").write_text("old")

    def fill(tmp):
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
        _disk_full(tmp / "new.txt")

    with pytest.raises(ResourceError):
        files.replace_dir(directory, fill, "the best model")
    assert [p.name for p in directory.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_failed_pyramid_keeps_the_old_slide_and_no_spill(tmp_path):
    """The streaming writer: a tile that fails mid-file leaves the old file, no
    temporary file and no spilled levels."""
    target = tmp_path / "section.tif"
    target.write_bytes(b"old")
    calls = []

    def render(x, y, w, h):
        calls.append((x, y))
        if len(calls) > 3:
            raise RuntimeError("render failed")
        return np.full((h, w, 3), 200, np.uint8)

    with pytest.raises(RuntimeError, match="render failed"):
        write_pyramidal_tiff(target, render, 0.5, size=(64, 64), tile_size=16)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["section.tif"]
    write_pyramidal_tiff(target, np.zeros((64, 64, 3), np.uint8), 0.5, tile_size=16)
    assert target.read_bytes()[:2] == b"II"
    assert [p.name for p in tmp_path.iterdir()] == ["section.tif"]
