"""The optimizer and the jitted train step.

The step is a pure function ``(state, batch) -> (state, metrics)`` over the
split model of `stagejax.model` (a static graph merged back inside the step,
and a `TrainState` pytree that Orbax saves and ``jax.jit`` donates).
Randomness (device augmentation, dropout) comes from ``state.rng`` folded with
the step and each example's global index, never from random state kept in the
model: the step is deterministic per seed and gives the same result under jit
and pmap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from stagejax import model as model_lib
from stagejax.errors import ConfigError
from stagejax.model.state import create_train_state
from stagejax.runtime.parallel import PMAP_AXIS, Parallel


def create_learning_rate(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    total = config.num_epochs * steps_per_epoch
    if config.schedule == "constant":
        return optax.constant_schedule(config.learning_rate)
    if config.schedule == "cosine":
        warmup = int(round(config.warmup_epochs * steps_per_epoch))
        return optax.warmup_cosine_decay_schedule(
            0.0,
            config.learning_rate,
            warmup_steps=max(warmup, 0),
            decay_steps=max(total, warmup + 1),
        )
    raise ConfigError(f"config.schedule: {config.schedule!r} is not one of 'constant', 'cosine'")


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
    """Optax transform. ``adam`` adds the L2 term to the gradient before the
    moments, as PyTorch's ``Adam(weight_decay=...)`` does (this is not AdamW)."""
    lr = create_learning_rate(config, steps_per_epoch)
    wd = config.weight_decay
    if config.optimizer == "adam":
        return optax.chain(optax.add_decayed_weights(wd), optax.adam(lr))
    if config.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=wd)
    if config.optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=config.momentum))
    raise ConfigError(
        f"config.optimizer: {config.optimizer!r} is not one of 'adam', 'adamw', 'sgd'"
    )


DROPOUT_STREAM = 0x64726F70  # folded into the run's key: a stream apart from augmentation's


def _dropout_keys(rng_data, step, example_offset, batch: int) -> jax.Array:
    """One dropout key per example, from (seed, step, global example index)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(rng_data), DROPOUT_STREAM)
    key = jax.random.fold_in(key, step)
    idx = example_offset + jnp.arange(batch)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)


def _example_offset(parallel_mode: str, per_device: int):
    if parallel_mode == "pmap":
        return jax.lax.axis_index(PMAP_AXIS) * per_device
    return 0


def make_train_step(
    modeldef: model_lib.ModelDef,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    parallel: Parallel,
) -> Callable:
    """A pure ``(state, batch) -> (state, metrics)`` to hand to ``parallel.compile_train_step``."""
    dtype = model_lib.compute_dtype(config)
    pmap = parallel.mode == "pmap"
    smoothing = config.label_smoothing
    num_classes = config.num_classes

    def step_fn(state: model_lib.TrainState, batch: dict) -> tuple[model_lib.TrainState, dict]:
        labels = batch["label"]
        offset = _example_offset(parallel.mode, labels.shape[0])
        images = model_lib.preprocess(batch["image"], config, True, state.rng, state.step, offset)
        images = images.astype(dtype)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)

        dropout_keys = _dropout_keys(state.rng, state.step, offset, labels.shape[0])

        def loss_fn(params):
            # Merged inside the differentiated function: the forward pass updates the
            # BatchNorm statistics of a module that lives in this trace only.
            model = modeldef.merge(params, state.batch_stats, train=True)
            logits = model(images, dropout_keys=dropout_keys).astype(jnp.float32)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            return loss, (logits, nnx.state(model, nnx.BatchStat))

        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        if pmap:
            grads = jax.lax.pmean(grads, PMAP_AXIS)
            loss = jax.lax.pmean(loss, PMAP_AXIS)
            accuracy = jax.lax.pmean(accuracy, PMAP_AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
        )
        # The loss of step s is computed before its update: a finite loss can still
        # leave NaN/Inf weights behind. The flag covers what a checkpoint would save.
        finite = jnp.isfinite(loss) & _all_finite((params, new_stats))
        metrics = {"loss": loss, "accuracy": accuracy, "finite": finite}
        return new_state, metrics

    return step_fn


def _all_finite(tree: Any) -> jax.Array:
    """True when no leaf of ``tree`` holds a NaN or Inf."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def steps_per_epoch(num_train: int, global_batch_size: int) -> int:
    """As the reference: floor(N_train / batch) batches per epoch (at least one)."""
    return max(1, math.floor(num_train / global_batch_size))


def abstract_train_state(
    params: Any, batch_stats: Any, config: ml_collections.ConfigDict
) -> model_lib.TrainState:
    """Shapes and dtypes of a run's train state, which restoring a checkpoint needs.

    Needs no dataset: the optimizer state's structure does not depend on the
    schedule's length, so one step per epoch stands in for the real count.
    """
    tx = create_optimizer(config, steps_per_epoch=1)
    shapes = jax.eval_shape(lambda: create_train_state(params, batch_stats, tx, config.seed))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), shapes)
