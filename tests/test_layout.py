"""Layout reading, image decoding and every bad-input case (data.layout, stagejax.images)."""

import io
import logging
import struct
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image

from stagejax import images
from stagejax.data.layout import read_layout, stage_from_file_name
from stagejax.errors import DatasetError
from stagejax.images import decode_image

LABELS = ("1", "2", "3")
SPLIT_STAGES = {"train": ("1", "2", "3", "1"), "validation": ("2", "3"), "test": ("1",)}


def _pixels(seed: int, shape=(24, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def make_dataset(root: Path, ext: str = "png") -> dict[str, list[str]]:
    """Writes a tiny valid layout (random 24x32 RGB images); returns file names per split."""
    (root / "images").mkdir(parents=True)
    (root / "split_list").mkdir()
    (root / "label_list.txt").write_text("\n".join(LABELS) + "\n")
    names = {}
    for split, stages in SPLIT_STAGES.items():
        names[split] = [f"2021_{split}_{stage}-{i}.{ext}" for i, stage in enumerate(stages)]
        for i, name in enumerate(names[split]):
            Image.fromarray(_pixels(i + 10 * len(split))).save(root / "images" / name)
        (root / "split_list" / f"{split}.txt").write_text("\n".join(names[split]) + "\n")
    return names


def rgb16_tiff(pixels: np.ndarray) -> bytes:
    """A minimal uncompressed 16-bit RGB TIFF (Pillow cannot write one)."""
    height, width, _ = pixels.shape
    data = pixels.astype("<u2").tobytes()
    # (tag, type 3=SHORT/4=LONG, count, value); 258 and 273 point past the IFD.
    tags = [
        (256, 3, 1, width),
        (257, 3, 1, height),
        (258, 3, 3, None),
        (259, 3, 1, 1),
        (262, 3, 1, 2),
        (273, 4, 1, None),
        (277, 3, 1, 3),
        (278, 3, 1, height),
        (279, 4, 1, len(data)),
    ]
    bits_offset = 8 + 2 + 12 * len(tags) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)))
    for tag, typ, count, value in tags:
        value = {258: bits_offset, 273: bits_offset + 6}.get(tag, value)
        out += struct.pack("<HHI", tag, typ, count)
        out += struct.pack("<HH", value, 0) if typ == 3 and count == 1 else struct.pack("<I", value)
    out += struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + data
    return bytes(out)


def _encode(pixels: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _fresh_conversion_log(monkeypatch):
    monkeypatch.setattr(images, "_LOGGED", set())


# ---------------------------------------------------------------- label parsing


@pytest.mark.parametrize(
    "name,stage",
    [
        ("20211015_a_7-12.tif", "7"),
        ("slide_XII-3.png", "XII"),
        ("a_b_10-1.jpeg", "10"),
        ("sub/dir_x_4-1.png", "4"),
        ("a_7-1-2.png", "7-1"),  # the *last* '-' ends the stage
    ],
)
def test_stage_from_file_name(name, stage):
    assert stage_from_file_name(name) == stage


@pytest.mark.parametrize("name", ["plain.png", "a-1_b.png", "a_-1.png", "a_7.png"])
def test_stage_from_file_name_rejects(name):
    with pytest.raises(DatasetError, match=f"{name}: no stage"):
        stage_from_file_name(name)


def test_read_layout_labels_order_and_tolerant_lists(tmp_path):
    names = make_dataset(tmp_path)
    # Blank lines, trailing whitespace and CRLF line ends are tolerated everywhere.
    (tmp_path / "label_list.txt").write_text("1 \r\n\n2\t\r\n3\n\n\n")
    (tmp_path / "split_list" / "train.txt").write_text(
        "\n\n" + "  \r\n".join(names["train"]) + "   \n\n"
    )
    layout = read_layout(tmp_path)
    assert layout.root == tmp_path
    assert layout.label_names == ["1", "2", "3"]
    assert list(layout.splits) == ["train", "validation", "test"]
    for split, stages in SPLIT_STAGES.items():
        examples = layout.splits[split]
        assert [ex.file_name for ex in examples] == names[split]
        assert [ex.label for ex in examples] == [LABELS.index(s) for s in stages]
        assert all(ex.path == tmp_path / "images" / ex.file_name for ex in examples)


def test_class_id_is_line_position_not_numeric_value(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "label_list.txt").write_text("3\n1\n2\n")
    layout = read_layout(tmp_path)
    assert [ex.label for ex in layout.splits["train"]] == [1, 2, 0, 1]


def test_unlisted_images_are_ignored(tmp_path):
    make_dataset(tmp_path)
    Image.fromarray(_pixels(0)).save(tmp_path / "images" / "extra_1-9.png")
    layout = read_layout(tmp_path)
    assert sum(len(v) for v in layout.splits.values()) == 7


# ---------------------------------------------------------------- bad input


def _overwrite(name: str, data: bytes):
    def mutate(root: Path, names):
        (root / "images" / names["train"][int(name)]).write_bytes(data)

    return mutate


def _truncate(fmt: str, **kwargs):
    def mutate(root: Path, names):
        data = _encode(_pixels(1, (40, 40, 3)), fmt, **kwargs)
        (root / "images" / names["train"][0]).write_bytes(data[: len(data) // 2])

    return mutate


def _write(relpath: str, text: str):
    def mutate(root: Path, names):
        (root / relpath).write_text(text)

    return mutate


def _remove(relpath: str):
    def mutate(root: Path, names):
        path = root / relpath
        if path.is_dir():
            for child in path.iterdir():
                child.unlink()
            path.rmdir()
        else:
            path.unlink()

    return mutate


def _append_to_split(split: str, line: str):
    def mutate(root: Path, names):
        with open(root / "split_list" / f"{split}.txt", "a") as f:
            f.write(line + "\n")

    return mutate


def _add_image(name: str, split: str):
    def mutate(root: Path, names):
        Image.fromarray(_pixels(5)).save(root / "images" / name)
        _append_to_split(split, name)(root, names)

    return mutate


# (mutation, text that must be in the message: the file it names and the problem)
BAD_INPUTS = {
    "missing images folder": (_remove("images"), r"images: missing images folder"),
    "missing split file": (_remove("split_list/validation.txt"), r"validation.txt: missing"),
    "missing label list": (_remove("label_list.txt"), r"label_list.txt: missing"),
    "empty split": (_write("split_list/test.txt", "\n  \n"), r"test.txt: empty split"),
    "listed file absent": (
        _append_to_split("test", "2021_x_1-99.png"),
        r"2021_x_1-99.png: listed in .*test.txt but missing",
    ),
    "no stage in name": (_add_image("nostage.png", "test"), r"nostage.png: no stage"),
    "stage not in label list": (
        _add_image("s_13-1.png", "test"),
        r"s_13-1.png: stage '13' is not in .*label_list.txt",
    ),
    "duplicate label": (
        _write("label_list.txt", "1\n2\n3\n2\n"),
        r"label_list.txt: label '2' listed twice",
    ),
    "file in two splits": (
        _append_to_split("test", "2021_train_1-0.png"),
        r"test.txt: 2021_train_1-0.png listed also in split 'train'",
    ),
    "file twice in a split": (
        _append_to_split("validation", "2021_validation_2-0.png"),
        r"validation.txt: 2021_validation_2-0.png listed twice",
    ),
    "train lacks a stage": (
        _write(
            "split_list/train.txt", "2021_train_1-0.png\n2021_train_2-1.png\n2021_train_1-3.png\n"
        ),
        r"train.txt: no training image of stage '3'",
    ),
    "zero-byte file": (_overwrite("1", b""), r"2021_train_2-1.png: empty \(zero-byte\)"),
    "text with image suffix": (
        _overwrite("1", b"not an image, just text\n" * 10),
        r"2021_train_2-1.png: not a readable PNG, JPEG or TIFF",
    ),
    "GIF with png suffix": (
        _overwrite("1", _encode(_pixels(1), "GIF")),
        r"2021_train_2-1.png: GIF image",
    ),
    "truncated PNG": (_truncate("PNG"), r"2021_train_1-0.png: cannot decode"),
    "truncated JPEG": (_truncate("JPEG"), r"2021_train_1-0.png: cannot decode"),
    "truncated TIFF": (_truncate("TIFF"), r"2021_train_1-0.png: cannot decode"),
    "truncated LZW TIFF": (
        _truncate("TIFF", compression="tiff_lzw"),
        r"2021_train_1-0.png: not a readable",
    ),
    "PNG without end chunk": (
        lambda root, names: (root / "images" / names["train"][0]).write_bytes(
            _encode(_pixels(1), "PNG")[:-12]
        ),
        r"2021_train_1-0.png: cannot decode",
    ),
    "float TIFF": (
        _overwrite("0", _encode(np.zeros((24, 32), np.float32), "TIFF")),
        r"2021_train_1-0.png: unsupported pixel type F \(32 bits",
    ),
}


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow, on the cut TIFF header
@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_raises_one_line_naming_the_file(tmp_path, case):
    mutate, expected = BAD_INPUTS[case]
    names = make_dataset(tmp_path)
    mutate(tmp_path, names)
    with pytest.raises(DatasetError, match=expected) as info:
        read_layout(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path) in message


def test_image_smaller_than_crop(tmp_path):
    names = make_dataset(tmp_path)
    assert read_layout(tmp_path, crop_size=24).splits["train"]
    with pytest.raises(
        DatasetError, match=f"{names['train'][0]}: image is 24x32, smaller than crop_size 25"
    ):
        read_layout(tmp_path, crop_size=25)


def test_without_image_checks_only_names_and_existence_are_checked(tmp_path):
    names = make_dataset(tmp_path)
    (tmp_path / "images" / names["test"][0]).write_bytes(b"")
    assert len(read_layout(tmp_path, crop_size=999, check_images=False).splits["test"]) == 1
    (tmp_path / "images" / names["test"][0]).unlink()
    with pytest.raises(DatasetError, match="but missing"):
        read_layout(tmp_path, check_images=False)


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    "fmt,kwargs",
    [
        ("PNG", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
        ("TIFF", {"compression": "tiff_adobe_deflate"}),
    ],
)
def test_lossless_8bit_rgb_decodes_exactly(fmt, kwargs, caplog):
    pixels = _pixels(3)
    with caplog.at_level(logging.WARNING):
        out = decode_image(_encode(pixels, fmt, **kwargs), "x")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, pixels)
    assert not caplog.records  # nothing to convert, nothing logged


def test_jpeg_decodes_to_rgb_close_to_input():
    pixels = np.full((24, 32, 3), (200, 120, 60), np.uint8)
    out = decode_image(_encode(pixels, "JPEG", quality=95), "x.jpg")
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - pixels).max() <= 3


def test_16bit_rgb_tiff_keeps_high_byte():
    pixels = np.random.default_rng(0).integers(0, 65536, (6, 5, 3)).astype(np.uint16)
    out = decode_image(rgb16_tiff(pixels), "x.tif")
    np.testing.assert_array_equal(out, (pixels >> 8).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_12bit_data_in_16bit_files_keeps_its_grey_levels(fmt, caplog):
    """12-bit camera data scaled by its range: 256 levels, not the high byte's 16."""
    pixels = np.random.default_rng(1).integers(0, 4096, (20, 30, 3)).astype(np.uint16)
    if fmt == "PNG":
        data = imagecodecs.png_encode(pixels)
    else:
        buf = io.BytesIO()
        tifffile.imwrite(buf, pixels, photometric="rgb")
        data = buf.getvalue()
    with caplog.at_level(logging.INFO):
        out = decode_image(data, f"x.{fmt.lower()}")
    np.testing.assert_array_equal(out, (pixels >> 4).astype(np.uint8))
    assert len(np.unique(out)) > 200
    assert "holding 12-bit data" in caplog.text


def test_declared_significant_bits_win_for_dark_12bit_data():
    """A dark 12-bit image (largest value 1000) declared 12-bit is not stretched to 10."""
    gray = np.array([[0, 1000], [500, 4]], np.uint16)
    assert images.significant_bits(gray, declared=12) == 12
    assert images.significant_bits(gray) == 10
    assert images.significant_bits(np.array([65535], np.uint16), declared=12) == 16


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_gray_scaled_and_replicated(fmt):
    gray = np.array([[0, 255, 256, 1000], [30000, 65535, 511, 512]], np.uint16)
    out = decode_image(_encode(gray, fmt), "x")
    expected = np.array([[0, 0, 1, 3], [117, 255, 1, 2]], np.uint8)
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=2))


def test_gray_rgba_palette_converted_to_rgb():
    gray = _pixels(1, (8, 9))
    np.testing.assert_array_equal(
        decode_image(_encode(gray, "PNG"), "g"), np.stack([gray] * 3, axis=-1)
    )
    rgba = _pixels(2, (8, 9, 4))
    np.testing.assert_array_equal(decode_image(_encode(rgba, "PNG"), "a"), rgba[..., :3])
    palette = Image.fromarray(_pixels(3, (8, 9, 3))).quantize(colors=16)
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    np.testing.assert_array_equal(
        decode_image(buf.getvalue(), "p"), np.asarray(palette.convert("RGB"))
    )


def test_each_conversion_kind_logged_once(caplog):
    gray = _encode(_pixels(1, (8, 9)), "PNG")
    rgba = _encode(_pixels(2, (8, 9, 4)), "PNG")
    gray16 = _encode(np.full((4, 4), 4000, np.uint16), "TIFF")
    with caplog.at_level(logging.INFO):
        for name, data in [
            ("g1", gray),
            ("g2", gray),
            ("a1", rgba),
            ("a2", rgba),
            ("d1", gray16),
            ("d2", gray16),
        ]:
            decode_image(data, name)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert "grayscale" in messages[0] and "g1" in messages[0]
    assert "alpha" in messages[1] and "a1" in messages[1]
    assert "holding 12-bit data" in messages[2] and "d1" in messages[2]
