"""The model registry: every architecture the study used, plus the rest of the families.

``create(name, ...)`` is the one way the trainer, the importer and the
analyses build a model, so an architecture name in a config or ``model.json``
always means the same network. Every model takes NHWC float input and offers
``backbone(x)`` (last conv feature map, for Grad-CAM), ``embed(fmap)``
(penultimate features, for t-SNE), ``classify(emb)`` and ``__call__(x)``
(the three chained). Like torch modules, models start in train mode; switch
with ``model.train()`` / ``model.eval()``. ``__call__(x, dropout_keys)`` takes
one random key per example for the models with dropout (MobileNetV3), so a
jitted train step draws its masks functionally, from keys it was given, rather
than by advancing the model's own random stream (state that a jitted step must
not mutate); without keys, eager calls use that stream.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stagejax.errors import ConfigError
from stagejax.models import mobilenet, resnet
from stagejax.models.layers import Layers, init_weights

NAMES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
)


def create(name: str, seed: int = 0, **kwargs: Any) -> nnx.Module:
    """Build architecture ``name`` (one of ``NAMES``) with fresh torchvision-style weights.

    ``kwargs`` as `create_uninitialized`: ``num_classes``, ``in_channels``,
    ``dtype`` (the computation dtype, e.g. ``jnp.bfloat16`` on accelerators;
    parameters stay in ``param_dtype`` and BatchNorm statistics in float32) and
    ``bn_axis_name`` (the pmap axis to average BatchNorm statistics over; not
    needed under ``jit``, where a sharded batch's mean is already global) and
    ``remat`` (recompute each residual block's activations in the backward pass:
    less memory per train step for more compute; same parameters, same results).
    ``seed`` determines the initial weights and (as seed + 1) the 'dropout' stream.
    """
    model = create_uninitialized(name, seed=seed, **kwargs)
    init_weights(model, seed, linear_std=0.01 if name in mobilenet.CONFIGS else None)
    return model


def create_uninitialized(
    name: str,
    num_classes: int = 12,
    in_channels: int = 3,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    bn_axis_name: str | None = None,
    seed: int = 0,
    remat: bool = False,
) -> nnx.Module:
    """``create`` with all-zero weights, for filling from a checkpoint.

    The model is traced once (``nnx.eval_shape``, about a second) instead of
    being built eagerly (see ``layers.init_weights`` for why); only the
    non-weight state (the dropout random stream) is computed for real.
    """
    if name not in NAMES:
        raise ConfigError(f"model name {name!r}: unknown; choose one of {', '.join(NAMES)}")
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(
            f"model {name}: num_classes={num_classes} and in_channels={in_channels} must be >= 1"
        )
    build = lambda: _build(
        name, num_classes, in_channels, dtype, param_dtype, bn_axis_name, seed, remat
    )
    graphdef, weights, rest = nnx.split(nnx.eval_shape(build), (nnx.Param, nnx.BatchStat), ...)
    weights = jax.tree.map(lambda s: jnp.asarray(np.zeros(s.shape, s.dtype)), weights)
    if jax.tree.leaves(rest):
        rest = jax.jit(lambda: nnx.split(build(), (nnx.Param, nnx.BatchStat), ...)[2])()
    return nnx.merge(graphdef, weights, rest)


def _build(
    name: str,
    num_classes: int,
    in_channels: int,
    dtype: Any,
    param_dtype: Any,
    bn_axis_name: str | None,
    seed: int,
    remat: bool,
) -> nnx.Module:
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    if name in mobilenet.CONFIGS:
        blocks, last_channel = mobilenet.CONFIGS[name]
        layers = Layers(rngs, dtype, param_dtype, bn_axis_name, bn_momentum=0.01, bn_epsilon=1e-3)
        return mobilenet.MobileNetV3(
            blocks, last_channel, num_classes, in_channels, layers, remat=remat
        )
    layers = Layers(rngs, dtype, param_dtype, bn_axis_name)
    return resnet.ResNet(resnet.CONFIGS[name], num_classes, in_channels, layers, remat=remat)


__all__ = ["NAMES", "create", "create_uninitialized"]
