"""Model registry, torchvision parity of sizes, PyTorch BatchNorm semantics, dtypes, modes.

Numerical parity with torchvision forward passes lives in test_convert.py.
JAX runs un-jitted here: compiling nine architectures on a 2-core CI machine
would dominate the suite, while eager ops on 32 px inputs are cheap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stagejax import models
from stagejax.errors import ConfigError
from stagejax.models.layers import BatchNorm
from tests.conftest import import_torch, needs_torch

torch, torchvision = import_torch()

# (backbone channels, embedding size) per architecture
DIMS = {
    "resnet18": (512, 512),
    "resnet34": (512, 512),
    "resnet50": (2048, 2048),
    "resnet101": (2048, 2048),
    "resnet152": (2048, 2048),
    "resnext50_32x4d": (2048, 2048),
    "wide_resnet50_2": (2048, 2048),
    "mobilenet_v3_large": (960, 1280),
    "mobilenet_v3_small": (576, 1024),
}


def n_params(model: nnx.Module) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def forward(model: nnx.Module, x: jax.Array, chained: bool = False) -> jax.Array:
    """``model(x)`` or, if ``chained``, ``classify(embed(backbone(x)))``.

    Jitted for MobileNetV3: one compile beats eagerly compiling its ~100 op shapes.
    """
    fn = (lambda m, v: m.classify(m.embed(m.backbone(v)))) if chained else (lambda m, v: m(v))
    if isinstance(model, models.mobilenet.MobileNetV3):
        return nnx.jit(fn)(model, x)
    return fn(model, x)


@pytest.fixture(scope="module")
def resnet18() -> nnx.Module:
    return models.create("resnet18")


def test_names_and_unknown_name():
    assert models.NAMES == tuple(DIMS)
    with pytest.raises(ConfigError, match="resnet51.*unknown"):
        models.create("resnet51")


@needs_torch
@pytest.mark.parametrize("name", models.NAMES)
def test_parameter_count_and_feature_shapes(name):
    with torch.device("meta"):  # shapes only: no memory, no init time
        reference = getattr(torchvision.models, name)(num_classes=12)
    model = models.create_uninitialized(name, num_classes=12)
    assert n_params(model) == sum(p.numel() for p in reference.parameters())
    assert sum(
        int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    ) == sum(b.numel() for n, b in reference.named_buffers() if "running" in n)

    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    fmap = nnx.eval_shape(lambda m, x: m.backbone(x), model, x)
    emb = nnx.eval_shape(lambda m, f: m.embed(f), model, fmap)
    logits = nnx.eval_shape(lambda m, e: m.classify(e), model, emb)
    channels, dim = DIMS[name]
    assert fmap.shape == (2, 2, 2, channels)
    assert emb.shape == (2, dim) and model.embed_dim == dim
    assert logits.shape == (2, 12)


def test_create_uninitialized_has_the_same_structure():
    a = models.create("mobilenet_v3_small", num_classes=5, in_channels=1)
    b = models.create_uninitialized("mobilenet_v3_small", num_classes=5, in_channels=1)
    assert nnx.graphdef(a) == nnx.graphdef(b)
    shapes = lambda m: jax.tree.map(lambda v: (v.shape, v.dtype), nnx.state(m))
    assert shapes(a) == shapes(b)
    assert not np.any(np.asarray(b.head.kernel[...]))


def test_torchvision_initialisation(resnet18):
    # conv: kaiming normal, fan_out; fc: torch.nn.Linear default; BN: ones / zeros.
    k = np.asarray(resnet18.conv1.kernel[...])
    assert k.std() == pytest.approx((2.0 / (64 * 49)) ** 0.5, rel=0.05)
    bound = 512**-0.5
    kernel, bias = np.asarray(resnet18.fc.kernel[...]), np.asarray(resnet18.fc.bias[...])
    assert 0.95 * bound < np.abs(kernel).max() <= bound  # U(-bound, bound), 6144 draws
    assert 0 < np.abs(bias).max() <= bound
    assert np.all(np.asarray(resnet18.bn1.scale[...]) == 1.0)
    assert np.all(np.asarray(resnet18.layer1[0].bn1.var[...]) == 1.0)
    # MobileNetV3: N(0, 0.01) linear layers with zero bias; SE convs get zero bias.
    mobilenet = models.create("mobilenet_v3_large")
    assert np.asarray(mobilenet.hidden.kernel[...]).std() == pytest.approx(0.01, rel=0.02)
    assert not np.any(np.asarray(mobilenet.head.bias[...]))
    se = mobilenet.features[4].block[2]
    assert not np.any(np.asarray(se.fc1.bias[...]))
    assert np.asarray(se.fc1.kernel[...]).std() == pytest.approx((2.0 / 24) ** 0.5, rel=0.1)
    # The seed decides the weights.
    again, other = models.create("resnet18", seed=0), models.create("resnet18", seed=1)
    np.testing.assert_array_equal(again.conv1.kernel[...], resnet18.conv1.kernel[...])
    assert np.any(np.asarray(other.conv1.kernel[...]) != k)


@needs_torch
@pytest.mark.parametrize("momentum,eps", [(0.1, 1e-5), (0.01, 1e-3)])  # ResNet, MobileNetV3
def test_batchnorm_follows_torch(momentum, eps):
    rng = np.random.default_rng(0)
    xs = [rng.normal(2.0, 3.0, (4, 5, 5, 3)).astype(np.float32) for _ in range(2)]
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.normal(0, 0.3, 3)
    ref = torch.nn.BatchNorm2d(3, eps=eps, momentum=momentum)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(gamma)), ref.bias.copy_(torch.tensor(beta))
    bn = BatchNorm(3, momentum=momentum, epsilon=eps)
    bn.scale[...], bn.bias[...] = jnp.asarray(gamma, jnp.float32), jnp.asarray(beta, jnp.float32)

    def torch_apply(x):
        with torch.no_grad():
            return ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)

    for i, x in enumerate(xs):  # train mode: batch statistics, running stats updated
        np.testing.assert_allclose(bn(jnp.asarray(x)), torch_apply(x), rtol=1e-5, atol=1e-5)
        if i == 0:  # unbiased variance in the running average, torch momentum
            flat = x.reshape(-1, 3).astype(np.float64)
            expected = (1 - momentum) * 1.0 + momentum * flat.var(0, ddof=1)
            np.testing.assert_allclose(bn.var[...], expected, rtol=1e-5)
            np.testing.assert_allclose(bn.mean[...], momentum * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.mean[...], ref.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.var[...], ref.running_var.numpy(), rtol=1e-5)

    ref.eval()
    bn.eval()
    before = np.asarray(bn.var[...])
    np.testing.assert_allclose(bn(jnp.asarray(xs[0])), torch_apply(xs[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(bn.var[...], before)  # eval mode leaves statistics alone


def test_batchnorm_axis_name_gives_global_statistics():
    """Under pmap (emulated by vmap with the same axis name) every shard sees global stats."""
    x = jnp.asarray(np.random.default_rng(1).normal(1.0, 2.0, (8, 3, 3, 4)), jnp.float32)
    full = BatchNorm(4)
    y_full = full(x)
    graphdef, state = nnx.split(BatchNorm(4, axis_name="devices"))

    def forward(state, shard):
        bn = nnx.merge(graphdef, state)
        return bn(shard), nnx.state(bn)

    y, states = jax.vmap(forward, in_axes=(None, 0), axis_name="devices")(
        state, x.reshape(2, 4, 3, 3, 4)
    )
    np.testing.assert_allclose(y.reshape(x.shape), y_full, rtol=1e-5, atol=1e-5)
    for d in range(2):
        np.testing.assert_allclose(states["mean"][...][d], full.mean[...], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(states["var"][...][d], full.var[...], rtol=1e-5)


def small_mobilenet(**kwargs) -> nnx.Module:
    return models.create("mobilenet_v3_small", seed=3, **kwargs)


def test_forward_is_backbone_embed_classify(resnet18):
    x = jnp.asarray(np.random.default_rng(2).uniform(0, 1, (2, 32, 32, 3)), jnp.float32)
    for model in (resnet18, small_mobilenet()):
        model.eval()
        logits = forward(model, x)
        assert logits.shape == (2, 12) and np.all(np.isfinite(logits))
        np.testing.assert_allclose(logits, forward(model, x, chained=True), rtol=1e-6, atol=1e-6)
        assert np.ptp(np.asarray(logits)) > 0
        model.train()


def test_bfloat16_computation_with_float32_parameters(resnet18):
    x = jnp.asarray(np.random.default_rng(4).uniform(0, 1, (2, 32, 32, 3)), jnp.float32)
    pairs = [
        (resnet18, models.create("resnet18", dtype=jnp.bfloat16)),  # same seed, same weights
        (small_mobilenet(), small_mobilenet(dtype=jnp.bfloat16)),
    ]
    for f32, bf16 in pairs:
        params = jax.tree.leaves(nnx.state(bf16, nnx.Param))
        assert {v.dtype for v in params} == {np.dtype(np.float32)}
        f32.eval(), bf16.eval()
        ref, out = np.asarray(forward(f32, x)), forward(bf16, x)
        assert out.dtype == jnp.bfloat16
        err = np.abs(np.asarray(out, np.float32) - ref).max()
        assert err <= 0.05 * max(1.0, np.abs(ref).max()), err
        f32.train()
    bf16 = pairs[0][1]  # BatchNorm is shared code: one architecture shows train mode
    bf16.train()
    before = np.asarray(bf16.bn1.var[...])
    bf16(x)  # batch statistics are still accumulated in float32
    stats = jax.tree.leaves(nnx.state(bf16, nnx.BatchStat))
    assert {v.dtype for v in stats} == {np.dtype(np.float32)}
    assert np.any(np.asarray(bf16.bn1.var[...]) != before)


def test_single_channel_input():
    for name, first in (("resnet18", ("conv1",)), ("mobilenet_v3_small", ("features", 0, "conv"))):
        model = models.create(name, in_channels=1, num_classes=7)
        conv = model
        for part in first:
            conv = conv[part] if isinstance(part, int) else getattr(conv, part)
        assert conv.kernel.shape[2] == 1
        model.eval()
        logits = forward(model, jnp.ones((2, 32, 32, 1)))
        assert logits.shape == (2, 7) and np.all(np.isfinite(logits))


def test_mobilenet_dropout_in_train_mode_only():
    model = small_mobilenet()
    fmap = jnp.asarray(np.random.default_rng(6).normal(0, 1, (4, 1, 1, 576)), jnp.float32)
    model.eval()
    clean = np.asarray(model.embed(fmap))
    np.testing.assert_array_equal(model.embed(fmap), clean)
    model.train()
    first, second = np.asarray(model.embed(fmap)), np.asarray(model.embed(fmap))
    live = clean != 0
    dropped = (first == 0) & live
    assert 0.1 < dropped.sum() / live.sum() < 0.3  # p = 0.2
    kept = (first != 0) & live
    np.testing.assert_allclose(first[kept], clean[kept] / 0.8, rtol=1e-5)
    assert np.any(first != second)  # the 'dropout' stream advances


def test_train_and_eval_modes_switch_batchnorm(resnet18):
    x = jnp.ones((2, 32, 32, 3))
    resnet18.eval()
    before = np.asarray(resnet18.bn1.mean[...])
    resnet18(x)
    np.testing.assert_array_equal(resnet18.bn1.mean[...], before)
    resnet18.train()
    resnet18(x * 2)
    assert np.any(np.asarray(resnet18.bn1.mean[...]) != before)
