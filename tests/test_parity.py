"""`benchmarks.parity` at CI size: stagejax and PyTorch from one init on the same batches.

The run (TINY: ResNet-18, 40 px crops of the session's uncut 48 px simulated
images, batch 12, 3 steps) must agree step by step to 1e-3 in the loss, or stay nearer
torch float64 than torch float32 does where torch float32 itself is close to 1e-3 from
float64 (step 3 on the tubule generator 3 set; from step 4 on version 2's), so no
float32 pair can be held to more steps. The step-1 gradients are
held to torch float32's error against float64 on the same ReLU branch (issue 23).
The file takes about 80 s of CPU time (most of it compiling JAX steps; 1.5-2.5 min
wall on the shared 2-core machine).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tests.conftest import require_torch

torch, torchvision = require_torch()

from benchmarks import parity  # noqa: E402
from benchmarks import parity_pair as pp  # noqa: E402

LOSSES = ("loss_jax", "loss_torch")


@pytest.fixture(scope="module")
def setting(tiny_sim_dir, tmp_path_factory) -> parity.Setting:
    cache = tmp_path_factory.mktemp("parity_cache")
    return dataclasses.replace(parity.TINY, data_dir=str(tiny_sim_dir), cache_dir=str(cache))


@pytest.fixture(scope="module")
def report(setting, tmp_path_factory) -> dict:
    """The CI run through the command line, every flag given (TINY's values)."""
    out = tmp_path_factory.mktemp("parity") / "parity.json"
    argv = [f"--{f.name}={getattr(setting, f.name)}" for f in dataclasses.fields(setting)]
    argv += ["--tiny", f"--out={out}"]
    used = {a[2:].split("=")[0] for a in argv}
    assert set(parity.FLAGS) <= used, set(parity.FLAGS) - used
    parity.main(argv)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_initial_logits_agree_with_torch(report):
    for mode in ("train", "eval"):
        logits = report["initial_logits"][mode]
        assert logits["stagejax_vs_torch64"] < 1e-4, mode
        assert logits["stagejax_vs_torch32"] < 1e-4, mode


@pytest.mark.slow
def test_every_step_loss_within_1e3_of_torch(report):
    steps = report["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert steps[0]["rel_diff"] < 1e-5  # same weights, same batch: forward and loss only
    for s in steps:
        assert abs(s["loss_jax"] - s["loss_torch"]) / s["loss_torch"] == pytest.approx(
            s["rel_diff"]
        )
        # Within 1e-3 of torch; or, where torch float32 itself has left torch float64 (on
        # the tiny set of tubule generator 3 it does by 8.9e-4 at step 3, and the pair
        # parts by 1.07e-3), nearer float64 than torch float32 is (there: 1.8e-4).
        jax64, torch64 = (abs(s[k] - s["loss_torch64"]) / s["loss_torch64"] for k in LOSSES)
        assert jax64 < parity.LOSS_TARGET, s
        assert s["rel_diff"] < parity.LOSS_TARGET or jax64 < torch64, s
    assert report["loss"]["stagejax_vs_float64"]["first_step_at_or_over_target"] is None


@pytest.mark.slow
def test_running_statistics_follow_torch_after_a_step(report):
    # torch's momentum convention and unbiased running_var; a flax-style 0.9 momentum
    # or a biased variance would be off by far more.
    assert report["checks"]["batch_stats_after_step_1_rel_diff"]["max"] < 1e-4


@pytest.mark.slow
def test_both_float32_sides_are_near_float64(report):
    loss = report["loss"]
    assert loss["stagejax_vs_float64"]["max_rel_diff"] < parity.LOSS_TARGET
    assert loss["torch_vs_float64"]["max_rel_diff"] < parity.LOSS_TARGET


@pytest.mark.slow
def test_step1_gradients_as_exact_as_torch_float32(report):
    # Issue 23: within 10x torch float32's error against float64, or under 1e-4. Against
    # float64 on the float32 pass's own ReLU/max-pool branch (parity_branches: against
    # float64's own branch a ReLU input within rounding of zero decides, by luck, and
    # the error is 1e-3..5e-2 for either framework). A loss in bfloat16 gives 2e-3.
    grads = report["step1_gradients_vs_float64"]
    ours, torch32 = grads["stagejax"]["branch_matched"], grads["torch32"]["branch_matched"]
    for key in ("median_tensor_rel_error", "max_tensor_rel_error"):
        assert ours[key] <= 10 * torch32[key] or ours[key] < 1e-4, (key, ours, torch32)
    assert ours["sign_flip_share"] < 1e-4
    # The forward passes part from float64 at a handful of kinks at most.
    for side in ("stagejax", "torch32"):
        assert sum(grads[side]["branch_matched"]["choices_unlike_float64"].values()) <= 10


def test_float64_forced_onto_a_branch_is_that_branch():
    from benchmarks import parity_branches as pb

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=12)
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 5])
    own, b32 = pb.Branches([], []), pb.Branches([], [])
    free = pb.torch_gradients(model, x, y, torch.float64, record=own)
    forced = pb.torch_gradients(model, x, y, torch.float64, force=own)
    assert max(np.max(np.abs(forced[n] - g)) for n, g in free.items()) < 1e-12
    assert len(own.relu) == 17 and len(own.pool) == 1  # stem + 2 per BasicBlock; one pool
    pb.torch_gradients(model, x, y, torch.float32, record=b32)
    assert pb.comparable(b32, own) and pb.flips(b32, own)["relu"] <= 10
    # Every ReLU off: the same network, another branch, other gradients.
    off = pb.Branches([np.zeros_like(m) for m in own.relu], own.pool)
    forced = pb.torch_gradients(model, x, y, torch.float64, force=off)
    assert np.max(np.abs(forced["fc.bias"] - free["fc.bias"])) > 1e-3


@pytest.mark.slow
def test_test_metrics_of_both_come_from_the_same_crops(report, tiny_sim_dir):
    test = report["test"]
    num_test = len((tiny_sim_dir / "split_list" / "test.txt").read_text().split())
    for side in ("stagejax", "torch"):
        assert test[side]["num_examples"] == num_test
        assert 0.0 <= test[side]["balanced_accuracy"] <= 1.0
    gap = 100 * (test["stagejax"]["balanced_accuracy"] - test["torch"]["balanced_accuracy"])
    assert report["accuracy_target"]["gap_points"] == pytest.approx(gap)
    assert report["accuracy_target"]["met"] == (abs(gap) <= parity.POINTS_TARGET)
    text = parity.markdown(report)
    assert "stagejax float32 vs torch float64" in text and "SIMULATED" in text


@pytest.mark.slow
def test_a_model_that_differs_from_torch_is_refused(setting):
    config = parity.stagejax_config(setting, setting.data_dir)
    pair = pp.build_pair(setting.model, setting.seed, config, steps_per_epoch=1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 40, 40, 3), dtype=np.uint8)
    labels = np.arange(12, dtype=np.int32)
    # (The same pair passes: test_initial_logits_agree_with_torch.) A running mean that
    # torch does not have: eval-mode logits move, train-mode ones do not.
    stats = pair.model.batch_stats
    stats["bn1"]["mean"][...] = stats["bn1"]["mean"][...] + 0.5
    with pytest.raises(pp.ParityError, match="eval-mode logits"):
        pp.initial_logits(pair, images, labels, setting.logit_tolerance)
    params = pair.model.params
    params["fc"]["bias"][...] = params["fc"]["bias"][...] + 1e-3
    with pytest.raises(pp.ParityError, match="imported weights differ"):
        pp.initial_logits(pair, images, labels, setting.logit_tolerance)


def test_batchnorm_conventions_are_checked_layer_by_layer():
    from stagejax import models

    reference = torchvision.models.resnet18(num_classes=12)
    module = models.create_uninitialized("resnet18")
    pp.check_batchnorm_conventions(module, reference)
    reference.layer3[1].bn2.momentum = 0.9  # flax's convention, in one layer
    with pytest.raises(pp.ParityError, match="momentum"):
        pp.check_batchnorm_conventions(module, reference)


def _adam_trajectories(optimizer: str, steps: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """stagejax's optimiser for ``optimizer`` and torch's Adam(weight_decay=5e-4) fed
    the same gradients; half the gradients are tiny, where the L2 term decides."""
    import jax.numpy as jnp
    import optax

    from stagejax.train import step as step_lib

    config = parity.stagejax_config(parity.TINY, "")
    config.optimizer = optimizer
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=64).astype(np.float32)
    scale = np.where(np.arange(64) < 32, 1.0, 1e-6)
    grads = (rng.normal(size=(steps, 64)) * scale).astype(np.float32)
    tx = step_lib.create_optimizer(config, steps_per_epoch=1)
    w, opt_state = jnp.asarray(w0), tx.init(jnp.asarray(w0))
    ref = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    torch_opt = torch.optim.Adam([ref], lr=1e-3, weight_decay=5e-4)
    for g in grads:
        updates, opt_state = tx.update(jnp.asarray(g), opt_state, w)
        w = optax.apply_updates(w, updates)
        ref.grad = torch.from_numpy(g.copy())
        torch_opt.step()
    return np.asarray(w), ref.detach().numpy()


def test_study_optimiser_is_torch_adam_with_l2():
    ours, theirs = _adam_trajectories("adam")
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    decoupled, theirs = _adam_trajectories("adamw")  # AdamW is not the study's optimiser
    assert np.max(np.abs(decoupled - theirs)) > 1e-4


def test_loss_summary_finds_where_the_trajectories_part():
    steps = [
        {"step": i + 1, "loss_jax": 2.0, "loss_torch": 2.0, "rel_diff": r}
        for i, r in enumerate([1e-7, 1e-5, 2e-3, 1e-4])
    ]
    summary = parity.loss_summary(steps, window=2)
    assert summary["met"] and summary["max_rel_diff"] == 1e-5
    assert summary["first_step_at_or_over_target"] == 3
    assert not parity.loss_summary(steps, window=3)["met"]


def test_flags_start_from_tiny_and_explicit_flags_win():
    from benchmarks import common

    args, _ = common.parse(parity.FLAGS, ["parity", "--tiny", "--steps=2", "--model=resnet34"])
    assert parity.setting_from_flags(args) == dataclasses.replace(
        parity.TINY, steps=2, model="resnet34"
    )
    assert parity.setting_from_flags(common.parse(parity.FLAGS, ["parity"])[0]) == parity.Setting()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"batch": 18}, "multiple of 12"),
        ({"model": "vgg16"}, "--model"),
        ({"crop_size": 112}, "exceeds --image_size"),
        ({"split_by": "stain"}, "--split_by"),
    ],
)
def test_settings_that_cannot_run_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        parity.validate(dataclasses.replace(parity.Setting(), **change))
