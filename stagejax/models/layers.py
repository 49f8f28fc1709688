"""Building blocks shared by the ResNet and MobileNetV3 families.

Why a BatchNorm of our own: the study trained in PyTorch, and imported
weights (and from-scratch training meant to reproduce it) only behave the same
if batch normalisation does exactly what ``torch.nn.BatchNorm2d`` does. Torch
normalises with the *biased* batch variance but stores the *unbiased* one in
``running_var``, and its momentum weighs the new batch
(``running = (1 - m) * running + m * batch``); ``nnx.BatchNorm`` keeps the
biased variance and uses the opposite momentum convention.

Why a ``Layers`` factory: every conv / norm / linear of a model shares the
computation dtype, the parameter dtype and the BatchNorm settings. One object
carrying those settings keeps the architecture files free of repetition.

Why ``apply_block``: rematerialisation (``remat``) is a property of how a
model runs its blocks in training, not of the blocks, so the blocks (and the
parameter tree that checkpoints and imported weights rely on) are the same
with and without it.

Why ``init_weights`` instead of per-layer initialisers: weights must start
from torchvision's distributions (so training from scratch starts where the
study's did), and running jax initialisers eagerly compiles one small program
per distinct parameter shape -- 10 to 30 s per model on a 2-core CPU. Models
are therefore built abstractly (``nnx.eval_shape``, about a second) and their
weights drawn on the host here, in one place, in well under a second.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

Dtype = Any
_zeros = nnx.initializers.zeros_init()  # placeholders: init_weights draws the real values


def init_weights(model: nnx.Module, seed: int, linear_std: float | None) -> None:
    """Draw ``model``'s weights in place the way torchvision initialises them.

    Convs: kaiming normal with fan_out (``kaiming_normal_(mode="fan_out")``),
    zero bias. BatchNorm: scale 1, bias 0, running mean 0, running var 1.
    Linear: ``linear_std=None`` gives torch.nn.Linear's default (weight and
    bias uniform in +-1/sqrt(fan_in), torchvision's ResNet); otherwise
    N(0, linear_std) weights and zero bias (torchvision's MobileNetV3).
    """
    rng = np.random.default_rng(seed)

    def put(var: nnx.Variable, value: np.ndarray) -> None:
        var[...] = jnp.asarray(value, var.dtype)

    for _, module in sorted(nnx.iter_modules(model), key=lambda pm: [str(p) for p in pm[0]]):
        if isinstance(module, nnx.Conv):
            kh, kw, _, out = module.kernel.shape
            put(module.kernel, rng.normal(0.0, (2.0 / (kh * kw * out)) ** 0.5, module.kernel.shape))
            if module.bias is not None:
                put(module.bias, np.zeros(module.bias.shape))
        elif isinstance(module, nnx.Linear):
            fan_in, _ = module.kernel.shape
            if linear_std is None:
                bound = fan_in**-0.5
                put(module.kernel, rng.uniform(-bound, bound, module.kernel.shape))
                put(module.bias, rng.uniform(-bound, bound, module.bias.shape))
            else:
                put(module.kernel, rng.normal(0.0, linear_std, module.kernel.shape))
                put(module.bias, np.zeros(module.bias.shape))
        elif isinstance(module, BatchNorm):
            for var, value in (
                (module.scale, 1.0),
                (module.bias, 0.0),
                (module.mean, 0.0),
                (module.var, 1.0),
            ):
                put(var, np.full(var.shape, value))


class BatchNorm(nnx.Module):
    """``torch.nn.BatchNorm2d`` semantics over the last (channel) axis of NHWC input.

    In train mode the batch statistics are reduced over every axis but the
    last. Under ``jit`` with a batch sharded over devices that reduction is
    already global; under ``pmap`` pass ``axis_name`` to average across
    devices (``lax.pmean``; equal per-device batch sizes assumed, as pmap
    requires). Statistics are always computed and stored in float32; the
    normalisation itself runs in ``dtype``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.1,
        epsilon: float = 1e-5,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        axis_name: str | None = None,
        use_running_average: bool = False,
    ):
        self.num_features = num_features
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.axis_name = axis_name
        self.use_running_average = use_running_average
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            mean, var = self._batch_stats(x)
        inv = lax.rsqrt(var + self.epsilon) * self.scale[...].astype(jnp.float32)
        dt = self.dtype
        return (x.astype(dt) - mean.astype(dt)) * inv.astype(dt) + self.bias[...].astype(dt)

    def _batch_stats(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        axes = tuple(range(x.ndim - 1))
        xf = x.astype(jnp.float32)
        count = 1
        for a in axes:
            count *= x.shape[a]
        mean = jnp.mean(xf, axes)
        if self.axis_name is not None:
            mean = lax.pmean(mean, self.axis_name)
        # Two passes (mean, then squared deviations from the global mean): no
        # catastrophic cancellation for activations with a large mean.
        var = jnp.mean(jnp.square(xf - mean), axes)
        if self.axis_name is not None:
            var = lax.pmean(var, self.axis_name)
            count = count * lax.psum(1, self.axis_name)
        unbiased = var * (count / jnp.maximum(count - 1, 1))
        m = self.momentum
        # set_value, not ``[...] =``: on a tracer NNX's indexed write asks for the
        # value's sharding and gets an error message built with its source origin,
        # about 6 ms per write (a third of tracing ResNet-152's train step).
        self.mean.set_value((1.0 - m) * self.mean[...] + m * mean)
        self.var.set_value((1.0 - m) * self.var[...] + m * unbiased)
        return mean, var


@dataclasses.dataclass
class Layers:
    """Creates layers with one model's dtypes and BatchNorm settings (weights: init_weights)."""

    rngs: nnx.Rngs
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_momentum: float = 0.1
    bn_epsilon: float = 1e-5

    def conv(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int = 1,
        *,
        groups: int = 1,
        use_bias: bool = False,
    ) -> nnx.Conv:
        """A conv padded like torch's ``padding=(kernel - 1) // 2`` (explicit, symmetric).

        'SAME' would pad asymmetrically for strided convs on even inputs and
        shift every feature map by a pixel relative to torch.
        """
        pad = (kernel - 1) // 2
        return nnx.Conv(
            in_ch,
            out_ch,
            (kernel, kernel),
            (stride, stride),
            padding=((pad, pad), (pad, pad)),
            feature_group_count=groups,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_zeros,
            bias_init=_zeros,
            rngs=self.rngs,
        )

    def batch_norm(self, features: int) -> BatchNorm:
        return BatchNorm(
            features,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            axis_name=self.bn_axis_name,
        )

    def linear(self, in_features: int, out_features: int) -> nnx.Linear:
        return nnx.Linear(
            in_features,
            out_features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_zeros,
            bias_init=_zeros,
            rngs=self.rngs,
        )


class ConvBN(nnx.Module):
    """conv -> BatchNorm -> optional activation: torchvision's ``Sequential(conv, bn[, act])``.

    The attribute names ``conv`` and ``bn`` stand for that Sequential's indices
    0 and 1 when weights are imported (see ``stagejax.convert``).
    """

    def __init__(
        self,
        layers: Layers,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int = 1,
        *,
        groups: int = 1,
        activation: Callable[[jax.Array], jax.Array] | None = None,
    ):
        self.conv = layers.conv(in_ch, out_ch, kernel, stride, groups=groups)
        self.bn = layers.batch_norm(out_ch)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.bn(self.conv(x))
        return x if self.activation is None else self.activation(x)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """``nn.MaxPool2d(3, stride=2, padding=1)``: padding counts as -inf, as in torch."""
    # A Python scalar init lets JAX see the max monoid, which it can differentiate.
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )


def global_avg_pool(x: jax.Array) -> jax.Array:
    """NHWC -> NC mean over the spatial axes (accumulated in float32 for low precision)."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


def example_dropout(x: jax.Array, keys: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout whose mask for example ``b`` is drawn from ``keys[b]`` alone.

    Keys derived from each example's global index make the masks the same
    however the batch is split over devices (jit on a mesh, pmap, hosts).
    """
    if keys.shape != x.shape[:1]:
        raise ValueError(f"keys: expected one per example ({x.shape[0]}), got {keys.shape}")
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, x.shape[1:]))(keys)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _call(block: nnx.Module, x: jax.Array) -> jax.Array:
    return block(x)


# Nothing inside a block is kept for the backward pass: only its input (the
# previous block's output) is saved and the block is recomputed from it. Measured
# (train step, batch 12, 224 px, float32, XLA:CPU with remat kept): temporaries
# ResNet-50 1611 -> 507 MiB, MobileNetV3-Large 809 -> 247 MiB; keeping the conv
# outputs instead (``checkpoint_dots``) leaves 945 and 432 MiB. ResNet-50 at 96 px:
# 1.39x the step time (``checkpoint_dots``: 1.26x).
_call_remat = nnx.remat(_call, policy=jax.checkpoint_policies.nothing_saveable)


def apply_block(block: nnx.Module, x: jax.Array, remat: bool) -> jax.Array:
    """``block(x)``; with ``remat`` its activations are recomputed in the backward pass.

    BatchNorm statistics updated inside a rematerialised block still reach the
    model: ``nnx.remat`` carries the block's state updates out of the checkpoint.
    Outside differentiation (eval) it computes exactly what ``block(x)`` does.
    XLA:CPU merges the recomputation back into the forward pass unless told not
    to (``stagejax.train.memory.CPU_REMAT_XLA_FLAG``).
    """
    return _call_remat(block, x) if remat else block(x)
