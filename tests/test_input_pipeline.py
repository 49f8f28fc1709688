"""Train/eval/predict loaders on a tiny in-memory split of PNG records."""

import io
import types

import ml_collections
import numpy as np
import pytest
from PIL import Image

from stagejax.data import input_pipeline
from stagejax.data.sampler import StageBalancedSampler
from stagejax.errors import ConfigError, DatasetError

COUNTS = [1, 2, 3, 4, 2, 3, 2, 1, 3, 2, 4, 3]  # 30 images, stage I and VIII single.
SIZE, CROP = 40, 32


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def record_image(index, label, size=SIZE):
    """Channel 0 = dataset index, channel 1 = 10 * label (constant, so crops, rot90
    and flips keep them), channel 2 a gradient."""
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0] = index
    image[..., 1] = 10 * label
    image[..., 2] = np.arange(size, dtype=np.uint8)[None, :]
    return image


def make_split():
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(12), COUNTS))
    names = [f"slide_{i}_{label + 1}-{i}.png" for i, label in enumerate(labels)]
    source = [
        dict(image=png_bytes(record_image(i, int(label))), label=int(label), file_name=names[i])
        for i, label in enumerate(labels)
    ]
    return types.SimpleNamespace(source=source, labels=labels.astype(np.int32), file_names=names)


def make_config(**kw):
    c = ml_collections.ConfigDict(
        dict(
            crop_size=CROP,
            crop_range=4,
            global_batch_size=24,
            eval_batch_size=8,
            seed=3,
            num_workers=0,
            augment=dict(rot90=True, flip=True, stain_jitter=0.0, brightness=0.0, contrast=0.0),
        )
    )
    c.update(kw)
    return c


SPLIT = make_split()


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_train_batches_shapes_stages_and_images():
    config = make_config()
    batches = take(input_pipeline.train_batches(SPLIT, config, process_index=0, process_count=1), 4)
    sampler = StageBalancedSampler(SPLIT.labels, 24, config.seed)
    for step, batch in enumerate(batches):
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (24, CROP, CROP, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (24,) and batch["label"].dtype == np.int32
        assert np.bincount(batch["label"], minlength=12).min() >= 2
        keys = [sampler[i].record_key for i in range(step * 24, (step + 1) * 24)]
        np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], keys)
        np.testing.assert_array_equal(batch["label"], SPLIT.labels[keys])
        np.testing.assert_array_equal(batch["image"][:, 5, 7, 1], 10 * batch["label"])


def test_train_batches_two_processes_with_workers_and_resume():
    config = make_config(num_workers=2)
    single = take(
        input_pipeline.train_batches(SPLIT, make_config(), process_index=0, process_count=1), 3
    )
    parts = [
        take(
            input_pipeline.train_batches(
                SPLIT, config, start_step=1, process_index=p, process_count=2
            ),
            2,
        )
        for p in range(2)
    ]
    for t in range(2):
        for key in ("image", "label"):
            got = np.concatenate([parts[0][t][key], parts[1][t][key]])
            np.testing.assert_array_equal(got, single[t + 1][key])


def test_eval_two_processes_cover_each_example_once():
    config = make_config(num_workers=0)
    per_process = [
        list(input_pipeline.eval_batches(SPLIT, config, process_index=p, process_count=2))
        for p in range(2)
    ]
    assert len(per_process[0]) == len(per_process[1]) == 4  # ceil(30 / 8)
    seen = []
    for batches in per_process:
        for batch in batches:
            assert batch["image"].shape == (4, CROP, CROP, 3)
            assert batch["index"].dtype == np.int32 and batch["mask"].dtype == bool
            np.testing.assert_array_equal(batch["mask"], batch["index"] >= 0)
            idx = batch["index"][batch["mask"]]
            seen += idx.tolist()
            np.testing.assert_array_equal(batch["label"][batch["mask"]], SPLIT.labels[idx])
            np.testing.assert_array_equal(batch["image"][batch["mask"]][:, 0, 0, 0], idx)
            assert not batch["image"][~batch["mask"]].any()
            # Centre crop: the gradient channel starts at (SIZE - CROP) // 2.
            assert (batch["image"][batch["mask"]][:, 0, 0, 2] == (SIZE - CROP) // 2).all()
    assert sorted(seen) == list(range(30))


def test_eval_with_workers_keeps_the_exact_order():
    config = make_config(num_workers=2, eval_batch_size=6)
    batches = list(input_pipeline.eval_batches(SPLIT, config, process_index=1, process_count=2))
    expected = input_pipeline.eval_positions(30, 6, 1, 2)
    np.testing.assert_array_equal(np.stack([b["index"] for b in batches]), expected)
    got = np.stack([b["image"][:, 0, 0, 0] for b in batches])
    np.testing.assert_array_equal(got, np.where(expected >= 0, expected, 0))


def test_eval_batch_size_must_split_between_processes():
    with pytest.raises(ConfigError, match="eval_batch_size"):
        input_pipeline.eval_batches(
            SPLIT, make_config(eval_batch_size=5), process_index=0, process_count=2
        )


def test_predict_batches_from_files(tmp_path):
    paths = []
    for i in range(3):
        path = tmp_path / f"unlabelled_{i}.png"
        path.write_bytes(png_bytes(record_image(50 + i, 0, size=36)))
        paths.append(path)
    batches = list(
        input_pipeline.predict_batches(
            paths, make_config(eval_batch_size=2), process_index=0, process_count=1
        )
    )
    assert [set(b) for b in batches] == [{"image", "index", "mask", "size", "error"}] * 2
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index, [0, 1, 2, -1])
    images = np.concatenate([b["image"] for b in batches])
    np.testing.assert_array_equal(images[:3, 0, 0, 0], [50, 51, 52])
    assert (images[:3, 0, 0, 2] == 2).all()
    assert np.concatenate([b["size"] for b in batches]).tolist() == [[36, 36]] * 3 + [[0, 0]]
    assert all(e == "" for b in batches for e in b["error"])

    # Files that cannot be used do not stop the pass: their error says why, the
    # rest is predicted.
    small = tmp_path / "small.png"
    small.write_bytes(png_bytes(record_image(0, 0, size=20)))
    files = [small, tmp_path / "missing.png", paths[0]]
    (batch,) = input_pipeline.predict_batches(
        files, make_config(eval_batch_size=3), process_index=0, process_count=1
    )
    assert batch["mask"].all()
    assert "small.png: image is 20x20, smaller than crop_size 32" in batch["error"][0]
    assert "missing.png: cannot read" in batch["error"][1] and batch["error"][2] == ""
    np.testing.assert_array_equal(batch["image"][2], images[0])
    assert not batch["image"][:2].any()  # black stand-ins
    assert input_pipeline.predict_file_error(small, 32) == batch["error"][0]
    assert input_pipeline.predict_file_error(paths[0], 32) == ""

    # Evaluation still stops at a bad record (its data were checked when prepared).
    split = types.SimpleNamespace(
        source=[dict(image=b"junk", label=0, file_name="junk.png")],
        labels=np.zeros(1, np.int32),
        file_names=["junk.png"],
    )
    with pytest.raises(DatasetError, match="junk.png"):
        list(input_pipeline.eval_batches(split, make_config(), process_index=0, process_count=1))
