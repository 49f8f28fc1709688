"""The PyTorch baseline (benchmarks.torch_baseline, benchmarks.torch_data): its recipe
pieces equal stagejax's (crops, min-max, metrics, split files), its balanced sampler, the
tuned variant's torch.compile fallback and its FLOP count. No timing assertions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from stagejax.data import augment
from stagejax.data.sampler import StageBalancedSampler
from stagejax.evaluate import metrics as metrics_lib
from tests.conftest import require_torch

# The benchmarks compare with the PyTorch baseline: their modules import torch.
torch, _ = require_torch()

from benchmarks import torch_baseline as tb  # noqa: E402
from benchmarks import torch_data as td  # noqa: E402

# --- the baseline's recipe pieces equal stagejax's ---------------------------------------


def test_crop_origin_equals_stagejax_crop_start():
    for size in (48, 64, 97, 1152):
        for crop in (16, 47, 48, 896):
            if crop > size:
                continue
            for shift in range(-140, 141, 7):
                assert td.crop_origin(size, crop, shift) == augment.crop_start(size, crop, shift)


@pytest.mark.parametrize(
    "shape,crop,crop_range", [((40, 40), 32, 4), ((50, 37), 30, 9), ((33, 33), 33, 3)]
)
def test_train_view_equals_stagejax_train_crop_for_the_same_rng(shape, crop, crop_range):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    stagejax_crop = augment.TrainCrop(crop, crop_range)
    for seed in range(60):
        ours = td.train_view(image, crop, crop_range, np.random.default_rng(seed))
        theirs = stagejax_crop.random_map({"image": image}, np.random.default_rng(seed))["image"]
        assert ours.shape == (crop, crop, 3)
        np.testing.assert_array_equal(ours, theirs)


def test_center_view_equals_stagejax_center_crop():
    image = np.random.default_rng(1).integers(0, 256, (45, 52, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        td.center_view(image, 31), augment.CenterCrop(31).map({"image": image})["image"]
    )


def test_min_max_equals_stagejax_min_max():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (4, 9, 11, 3), dtype=np.uint8).astype(np.float32) / 255.0
    images[1] = 0.5  # constant image -> zeros in both
    images[2] = images[2] * 0.1 + 0.3  # narrow range
    theirs = np.asarray(augment.min_max(jnp.asarray(images)))
    batch = td.min_max(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    np.testing.assert_allclose(batch.numpy(), theirs, atol=1e-6)
    assert not theirs[1].any()
    single = td.min_max(torch.from_numpy(images[3]).permute(2, 0, 1)).permute(1, 2, 0)
    np.testing.assert_allclose(single.numpy(), theirs[3], atol=1e-6)


def test_stage_metrics_equal_stagejax_summary():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 12, 200)
    preds = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 12, 200))
    ours = tb.stage_metrics(labels, preds)
    cm = np.zeros((12, 12), np.int64)
    np.add.at(cm, (labels, preds), 1)
    theirs = metrics_lib.summarize(cm)
    for k in ("accuracy", "balanced_accuracy", "within1_accuracy"):
        assert ours[k] == pytest.approx(theirs[k])


def test_read_split_labels_from_file_names(tmp_path):
    (tmp_path / "split_list").mkdir()
    (tmp_path / "label_list.txt").write_text("\n".join(str(i) for i in range(1, 13)) + "\n")
    (tmp_path / "split_list" / "train.txt").write_text("a_b_7-12.png\nx_1-3.png\n\n")
    split = td.read_split(tmp_path, "train")
    assert split.labels.tolist() == [6, 0]
    assert split.paths[0] == tmp_path / "images" / "a_b_7-12.png"
    (tmp_path / "split_list" / "test.txt").write_text("x_13-1.png\n")
    with pytest.raises(ValueError, match="13"):
        td.read_split(tmp_path, "test")


# --- the baseline's balanced sampler ----------------------------------------------------


def uneven_labels() -> np.ndarray:
    """Stage s has s + 1 images (stage 0: one, so it repeats within a batch of 24)."""
    return np.concatenate([np.full(s + 1, s) for s in range(12)])


@pytest.mark.parametrize("batch", [12, 24, 36])
def test_balanced_batches_hold_every_stage_equally(batch):
    labels = uneven_labels()
    sampler = td.BalancedBatches(labels, batch, seed=5, num_batches=40)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 40
    positions = [p for b in batches for _, p in b]
    assert positions == list(range(40 * batch))  # each sample's crop seed is unique
    for b in batches:
        counts = np.bincount(labels[[r for r, _ in b]], minlength=12)
        assert counts.tolist() == [batch // 12] * 12


def test_balanced_batches_draw_each_stage_without_replacement_until_reshuffle():
    labels = uneven_labels()
    per_stage = 2
    draws: dict[int, list[int]] = {s: [] for s in range(12)}
    for b in td.BalancedBatches(labels, 12 * per_stage, seed=0, num_batches=30):
        for r, _ in b:
            draws[int(labels[r])].append(r)
    for s, seq in draws.items():
        n = s + 1
        if n < per_stage:
            continue
        cycle = (n // per_stage) * per_stage  # a pass ends when fewer than 2 remain
        for start in range(0, len(seq) - cycle + 1, cycle):
            chunk = seq[start : start + cycle]
            assert len(set(chunk)) == cycle, (s, chunk)


def test_balanced_batches_refuse_bad_inputs():
    with pytest.raises(ValueError, match="multiple of 12"):
        td.BalancedBatches(uneven_labels(), 18, 0, 1)
    with pytest.raises(ValueError, match="stage 12"):
        td.BalancedBatches(np.arange(11), 12, 0, 1)
    with pytest.raises(ValueError, match="sampler"):
        td.make_sampler("random", uneven_labels(), 12, 0, 1)


def test_stagejax_batches_follow_stagejax_sampler():
    labels = uneven_labels()
    batches = list(td.make_sampler("stagejax", labels, 24, 7, 3))
    ref = StageBalancedSampler(labels.astype(np.int32), 24, 7)
    assert [r for b in batches for r, _ in b] == [ref.record_key(i) for i in range(72)]


# --- the tuned variant and its torch.compile fallback -----------------------------------


def test_tuned_on_cpu_skips_compile_unless_asked():
    cpu = torch.device("cpu")
    auto = tb.tuned(cpu, 0, "auto")
    assert not auto.compile and any("torch.compile off" in n for n in auto.notes)
    assert tb.tuned(cpu, 0, "on").compile
    assert not tb.tuned(cpu, 0, "off").compile


@pytest.mark.parametrize("works", [False, True])
def test_trainer_records_what_torch_compile_did(monkeypatch, works):
    def fake_compile(model):
        if works:
            return model

        def broken(_):
            raise RuntimeError("inductor: no C++ compiler")

        return broken

    monkeypatch.setattr(torch, "compile", fake_compile)
    tuning = tb.Tuning(name="tuned", compile=True)
    trainer = tb.Trainer("mobilenet_v3_small", tuning, torch.device("cpu"), seed=0)
    x, y = torch.rand(12, 3, 32, 32), torch.arange(12)
    loss = trainer.train_step(x, y)
    assert torch.isfinite(loss)
    assert trainer.compile_status == ("on" if works else "failed, eager")
    assert any(("failed" in n) != works for n in trainer.notes if "compile" in n)
    assert torch.isfinite(trainer.train_step(x, y))  # later steps: no more checks


def test_torch_train_step_flops_count_forward_and_backward():
    from torch.utils.flop_counter import FlopCounterMode

    trainer = tb.Trainer("resnet18", tb.STUDY, torch.device("cpu"), seed=0)
    x, y = torch.rand(2, 3, 32, 32), torch.arange(2)
    with FlopCounterMode(display=False) as fwd:
        trainer.model(x)
    total = tb.train_step_flops(trainer, x, y)
    assert 2.0 < total / fwd.get_total_flops() < 3.1  # backward ~2x forward
    assert all(p.grad is None for p in trainer.model.parameters())
