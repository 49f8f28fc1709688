"""ArrayRecord cache: round trip through grain, reuse, rebuild, half-built caches."""

import io
import os
import pickle
import sys
from pathlib import Path

import grain.python as grain
import numpy as np
import pytest
from PIL import Image

from stagejax.data import prepared as prepared_lib
from stagejax.errors import DatasetError
from stagejax.images import decode_image
from stagejax.runtime.files import TMP_PREFIX

LABELS = ("I", "II", "III")
# (stage, how the image is stored) per split; train covers every stage.
SPLITS = {
    "train": [("I", "png"), ("II", "tif"), ("III", "jpg"), ("I", "gray16.tif"), ("II", "rgba.png")],
    "validation": [("III", "png"), ("I", "gray.png")],
    "test": [("II", "png")],
}


def _save(path: Path, rgb: np.ndarray, kind: str) -> np.ndarray:
    """Writes `rgb` as `kind`; returns the RGB uint8 pixels a reader should get back."""
    if kind == "gray16.tif":
        gray16 = rgb[..., 0].astype(np.uint16) * 256 + 7  # high byte == rgb[..., 0]
        Image.fromarray(gray16).save(path)
        return np.repeat(rgb[..., :1], 3, axis=2)
    if kind == "gray.png":
        Image.fromarray(rgb[..., 0]).save(path)
        return np.repeat(rgb[..., :1], 3, axis=2)
    if kind == "rgba.png":
        Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(path)
        return rgb
    Image.fromarray(rgb).save(path, quality=95)
    return np.asarray(Image.open(path).convert("RGB"))  # JPEG: what the decoder yields


def make_dataset(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Writes a tiny layout of 24x32 images in mixed formats; returns expected pixels by name."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "split_list").mkdir()
    (root / "label_list.txt").write_text("\n".join(LABELS) + "\n")
    expected = {}
    for split, items in SPLITS.items():
        names = []
        for i, (stage, kind) in enumerate(items):
            name = f"slide_{split}_{stage}-{i}.{kind.split('.')[-1]}"
            rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
            expected[name] = _save(root / "images" / name, rgb, kind)
            names.append(name)
        (root / "split_list" / f"{split}.txt").write_text("\n".join(reversed(names)) + "\n")
    return expected


@pytest.fixture
def count_builds(monkeypatch):
    calls = []
    real_build = prepared_lib._build
    monkeypatch.setattr(prepared_lib, "_build", lambda *a: (calls.append(a), real_build(*a)))
    return calls


def _shard_mtimes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in path.rglob("*array_record*")}


def test_records_round_trip_through_grain(tmp_path):
    expected = make_dataset(tmp_path / "data")
    prepared = prepared_lib.prepare(tmp_path / "data", tmp_path / "cache", crop_size=24)
    assert prepared.label_names == list(LABELS)
    assert "tensorflow" not in sys.modules
    for split, items in SPLITS.items():
        ss = prepared.splits[split]
        listed = (tmp_path / "data" / "split_list" / f"{split}.txt").read_text().split()
        assert ss.file_names == listed  # split-list order, not the tfds key-hash order
        assert ss.labels.dtype == np.int32
        assert ss.labels.tolist() == [LABELS.index(n.split("_")[-1].split("-")[0]) for n in listed]
        records = list(grain.MapDataset.source(ss.source))
        assert len(ss.source) == len(records) == len(items)
        for record, name, label in zip(records, ss.file_names, ss.labels, strict=True):
            assert record["file_name"] == name and isinstance(record["file_name"], str)
            assert record["label"] == label and isinstance(record["label"], int)
            assert isinstance(record["image"], bytes)
            np.testing.assert_array_equal(decode_image(record["image"], name), expected[name])


def test_rgb_files_stored_byte_for_byte_converted_ones_as_png(tmp_path):
    make_dataset(tmp_path / "data")
    train = prepared_lib.prepare(tmp_path / "data", tmp_path / "cache").splits["train"]
    for i, name in enumerate(train.file_names):
        stored = train.source[i]["image"]
        original = (tmp_path / "data" / "images" / name).read_bytes()
        if name in ("slide_train_I-3.tif", "slide_train_II-4.png"):  # gray16 / RGBA
            assert stored != original
            assert Image.open(io.BytesIO(stored)).format == "PNG"
            assert Image.open(io.BytesIO(stored)).mode == "RGB"
        else:
            assert stored == original


def test_source_pickles_for_grain_workers(tmp_path):
    make_dataset(tmp_path / "data")
    source = prepared_lib.prepare(tmp_path / "data", tmp_path / "cache").splits["train"].source
    clone = pickle.loads(pickle.dumps(source))
    assert clone[2] == source[2]
    assert repr(clone) == repr(source) and "split='train'" in repr(source)
    assert source.__getitems__([1, 0]) == [source[1], source[0]]


def test_cache_reused_while_unchanged(tmp_path, count_builds):
    make_dataset(tmp_path / "data")
    first = prepared_lib.prepare(tmp_path / "data", tmp_path / "cache")
    mtimes = _shard_mtimes(first.cache_path)
    assert len(mtimes) == 3
    second = prepared_lib.prepare(tmp_path / "data", tmp_path / "cache")
    assert len(count_builds) == 1
    assert second.cache_path == first.cache_path
    assert _shard_mtimes(second.cache_path) == mtimes
    assert second.splits["test"].source[0] == first.splits["test"].source[0]


def test_rebuilt_after_an_image_changes(tmp_path, count_builds):
    make_dataset(tmp_path / "data")
    first = prepared_lib.prepare(tmp_path / "data", tmp_path / "cache")
    name = first.splits["test"].file_names[0]
    new_pixels = np.full((30, 30, 3), 77, np.uint8)
    path = tmp_path / "data" / "images" / name
    Image.fromarray(new_pixels).save(path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # mtime surely differs
    second = prepared_lib.prepare(tmp_path / "data", tmp_path / "cache")
    assert len(count_builds) == 2
    assert second.cache_path != first.cache_path
    np.testing.assert_array_equal(
        decode_image(second.splits["test"].source[0]["image"], name), new_pixels
    )


def test_rebuilt_after_split_list_changes(tmp_path, count_builds):
    make_dataset(tmp_path / "data")
    first = prepared_lib.prepare(tmp_path / "data", tmp_path / "cache")
    moved = first.splits["validation"].file_names[0]
    split_list = tmp_path / "data" / "split_list"
    (split_list / "validation.txt").write_text(first.splits["validation"].file_names[1])
    (split_list / "test.txt").write_text(f"{first.splits['test'].file_names[0]}\n{moved}\n")
    second = prepared_lib.prepare(tmp_path / "data", tmp_path / "cache")
    assert len(count_builds) == 2
    assert second.splits["test"].file_names[1] == moved
    assert second.splits["test"].source[1]["file_name"] == moved


def test_half_built_caches_are_ignored_and_rebuilt(tmp_path, count_builds):
    make_dataset(tmp_path / "data")
    good = prepared_lib.prepare(tmp_path / "data", tmp_path / "cache")
    expected = [good.splits["train"].source[i] for i in range(5)]

    # 1. A finished directory that lost its marker (e.g. a partial copy) with a broken shard.
    (good.cache_path / prepared_lib._MARKER).unlink()
    for shard in good.cache_path.rglob("*train.array_record*"):
        shard.write_bytes(b"garbage")
    # 2. A crashed build left in a temporary directory next to it.
    leftover = tmp_path / "cache" / f"{TMP_PREFIX}{good.cache_path.name}.crashed"
    (leftover / "stagejax_layout").mkdir(parents=True)

    again = prepared_lib.prepare(tmp_path / "data", tmp_path / "cache")
    assert len(count_builds) == 2
    assert again.cache_path == good.cache_path
    assert (again.cache_path / prepared_lib._MARKER).is_file()
    assert [again.splits["train"].source[i] for i in range(5)] == expected
    leftovers = sorted(p.name for p in (tmp_path / "cache").iterdir() if TMP_PREFIX in p.name)
    assert leftovers == [leftover.name]  # never touched: it might be another process's build


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    make_dataset(tmp_path / "data")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepared_lib, "to_storable", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prepared_lib.prepare(tmp_path / "data", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_bad_input_raises_before_anything_is_built(tmp_path, count_builds):
    make_dataset(tmp_path / "data")
    bad = tmp_path / "data" / "images" / "slide_test_II-0.png"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(DatasetError, match="slide_test_II-0.png: cannot decode"):
        prepared_lib.prepare(tmp_path / "data", tmp_path / "cache")
    assert count_builds == []
    assert not (tmp_path / "cache").exists()


def test_crop_size_checked_also_when_cache_is_reused(tmp_path, count_builds):
    make_dataset(tmp_path / "data")
    prepared_lib.prepare(tmp_path / "data", tmp_path / "cache", crop_size=24)
    with pytest.raises(
        DatasetError,
        match=r"images/slide_train_\w+-\d\.\w+: image is 24x32, "
        r"smaller than crop_size 25",
    ):
        prepared_lib.prepare(tmp_path / "data", tmp_path / "cache", crop_size=25)
    assert len(count_builds) == 1
