"""The training split kept on the devices gives the Grain loader's batches, bit for bit.

In this process (one CPU device): the assembled uint8 batches equal
``input_pipeline.train_batches``' for several steps, from a resumed step, for
each of two processes, with images of several sizes, with rot90/flip off.
(8 devices under jit and pmap and 2 processes x 2 devices train to the same bits
on both paths: tests/test_parallel.py, which runs those probes once for both checks.)
"""

import types

import jax
import numpy as np
import pytest

from stagejax import config as config_lib
from stagejax.data import input_pipeline, on_device
from stagejax.errors import ConfigError
from tests.test_input_pipeline import SPLIT, make_config, png_bytes, take

STEPS = 3


def _split_of_sizes(sizes) -> types.SimpleNamespace:
    """Random-noise images of the given (h, w), every stage present: any wrong offset,
    rotation or flip changes the pixels."""
    rng = np.random.default_rng(1)
    labels = np.arange(len(sizes), dtype=np.int32) % 12
    names = [f"s_{i}_{label + 1}-{i}.png" for i, label in enumerate(labels)]
    source = [
        dict(
            image=png_bytes(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
            label=int(label),
            file_name=name,
        )
        for (h, w), label, name in zip(sizes, labels, names, strict=True)
    ]
    return types.SimpleNamespace(source=source, labels=labels, file_names=names)


def _assert_same_batches(split, config, start_step=0, process_count=1):
    sizes = on_device.split_sizes(split)
    stack = on_device.decode_split(split, config.crop_size, sizes)
    assemble = jax.jit(lambda im, b: on_device.assemble(im, b, config.crop_size))
    for p in range(process_count):
        kw = dict(start_step=start_step, process_index=p, process_count=process_count)
        grain = take(input_pipeline.train_batches(split, config, **kw), STEPS)
        index = take(on_device.index_batches(split.labels, sizes, config, **kw), STEPS)
        for g, b in zip(grain, index, strict=True):
            np.testing.assert_array_equal(np.asarray(assemble(stack, b)), g["image"])
            np.testing.assert_array_equal(b["label"], g["label"])


@pytest.mark.parametrize("start_step,process_count", [(0, 1), (5, 1), (2, 2)])
def test_assembled_batches_are_the_grain_batches(start_step, process_count):
    _assert_same_batches(SPLIT, make_config(), start_step, process_count)


def test_images_of_several_sizes_are_padded_and_cropped_as_grain_does():
    # 36 px: a shift of -4..4 around the centre leaves the image, so the start falls
    # back to 0 (the reference rule); 52 px: the padding is never read.
    sizes = [(40, 40), (36, 52), (52, 36), (44, 40)] * 6
    split = _split_of_sizes(sizes)
    assert on_device.resident_bytes(on_device.split_sizes(split)) == 24 * 52 * 52 * 3
    _assert_same_batches(split, make_config(crop_range=6), start_step=1)


def test_rot90_and_flip_off():
    config = make_config()
    config.augment.rot90 = False
    config.augment.flip = False
    _assert_same_batches(SPLIT, config)


def _decide(mode, capacity, fraction=0.4):
    config = make_config(data_on_device=mode, data_on_device_fraction=fraction)
    return on_device.decide(config, SPLIT, (capacity, "test memory"))


def test_auto_uses_the_devices_when_the_split_fits_in_the_fraction():
    need = len(SPLIT.labels) * 40 * 40 * 3  # 144,000 bytes
    assert _decide("auto", int(need / 0.4) + 1).on
    fits_not = _decide("auto", int(need / 0.4) - 100)
    assert not fits_not.on and "Grain loader" in fits_not.reason
    assert _decide("auto", need, fraction=1.0).on
    off = _decide("false", 10**12)
    assert not off.on and off.sizes is None and "data_on_device=false" in off.reason


def test_true_that_does_not_fit_is_a_one_line_error_with_the_sizes():
    assert _decide("true", 10**9).on
    with pytest.raises(ConfigError) as err:
        _decide("true", 10**5)
    message = str(err.value)
    assert message.startswith("config.data_on_device: true, but ") and "\n" not in message
    assert "30 images, padded to 40x40x3" in message and "is 0.1 MiB per device" in message
    assert "40% of" in message
    with pytest.raises(ConfigError, match=r"^config.data_on_device: 'yes'; must be one of"):
        _decide("yes", 10**9)


@pytest.mark.parametrize(
    "field,value,must",
    [
        ("data_on_device", "yes", "one of auto, true, false"),
        ("data_on_device_fraction", 0.0, "in (0, 1] (of one device's memory)"),
        ("data_on_device_fraction", 1.5, "in (0, 1] (of one device's memory)"),
    ],
)
def test_bad_values_are_refused_naming_the_field(field, value, must):
    from stagejax import recipe

    config = recipe.get_config("demo")
    config[field] = value
    with pytest.raises(ConfigError) as err:
        config_lib.validate(config, num_devices=1)
    assert str(err.value) == f"config.{field}: {value!r}; must be {must}"


def test_loader_benchmark_times_both_training_feeds():
    from benchmarks import loader

    split = _split_of_sizes([(40, 40)] * 12)
    args = types.SimpleNamespace(
        model="resnet18", crop_size=32, global_batch=12, workers="0", trials=1, num_batches=1
    )
    result = loader.train_paths(split, args)
    assert set(result["paths"]) == {"grain", "on_device"}
    for row in result["paths"].values():
        assert row["images_per_s"] > 0 and 0 <= row["loader_wait_fraction"] < 1


def test_readme_recipe_trains_to_the_same_bits_on_both_feeds(tiny_sim_dir, tmp_path):
    """The README command's recipe (demo variant: Adam with the L2 term, warm-up and
    cosine, rot90 and flips), on one device: what keeps its metrics unchanged."""
    from stagejax import datasets, recipe
    from stagejax.train import loop as trainer

    config = recipe.get_config("demo")
    config.update(
        dict(data_dir=str(tiny_sim_dir), cache_dir=str(tmp_path), model="resnet18", crop_size=32)
    )
    config.crop_range = 4
    run = trainer.Run(config, datasets.load(config))
    assert run.data_on_device.on  # auto, the default: the README command takes this path
    initial = jax.device_get(run.initial_state)
    split = run.dataset.splits["train"]
    grain = run.parallel.prefetch(input_pipeline.train_batches(split, config))
    results = []
    for batches in (trainer.train_feed(run, 0)[0], grain):
        state, losses = run.parallel.put_state(initial), []
        for _ in range(STEPS):
            state, m = run.train_step(state, next(batches))
            losses.append(float(m["loss"]))
        results.append((losses, [np.asarray(x) for x in jax.tree.leaves(state)]))
    (losses, leaves), (grain_losses, grain_leaves) = results
    assert losses == grain_losses and losses[0] != losses[-1]
    assert all(np.array_equal(a, b) for a, b in zip(leaves, grain_leaves, strict=True))


def test_memory_check_counts_the_resident_split_against_a_device_limit():

    from stagejax import recipe
    from stagejax.errors import ResourceError
    from stagejax.train import memory
    from tests.conftest import FakeCompiled

    config = recipe.get_config("study")  # the study's recipe, these fields set
    config.update(
        dict(crop_size=896, global_batch_size=12, precision="bfloat16", device_memory_gb=30.0)
    )
    memory.check_train_step(FakeCompiled(), config)  # 24.5 GiB in 30
    with pytest.raises(ResourceError) as e:
        memory.check_train_step(FakeCompiled(), config, resident_bytes=6 * memory.GIB)
    message = str(e.value)
    assert (
        "but the device has 24.0 GiB (config.device_memory_gb) free beside the 6.0 GiB" in message
    )
    assert message.endswith("or --config.data_on_device=false") and "\n" not in message


def test_true_that_does_not_fit_stops_training_before_anything_is_written(tiny_sim_dir, tmp_path):
    from stagejax import datasets, recipe
    from stagejax.train import loop as trainer

    config = recipe.get_config("demo")
    config.update(dict(data_dir=str(tiny_sim_dir), cache_dir=str(tmp_path / "c"), crop_size=32))
    config.update(dict(model="resnet18", data_on_device="true", device_memory_gb=1e-4))
    workdir = tmp_path / "w"
    with pytest.raises(ConfigError, match=r"^config.data_on_device: true, but .*\(50 images"):
        trainer.train_and_evaluate(config, workdir, datasets.load(config))
    assert not (workdir / "config.json").exists()
