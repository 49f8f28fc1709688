"""The training state, optimizer, and the jitted train and eval steps.

The step is a pure function ``(state, batch) -> (state, metrics)``: the Flax
NNX model is split once into a static graph definition and array state, and
merged back inside the step, so the step compiles once and the state is a
plain pytree that Orbax saves and ``jax.jit`` donates. Randomness (device
augmentation, dropout) comes from ``state.rng`` folded with the step and each
example's global index, never from random state kept in the model: the step
is deterministic per seed and gives the same result under jit and pmap.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct

from stagejax.data import augment
from stagejax.data import stain as stain_lib
from stagejax.errors import ConfigError
from stagejax.runtime.parallel import PMAP_AXIS, Parallel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data: checkpoints hold plain arrays


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of a split model, one graph for training and one for eval."""

    train_graph: Any
    eval_graph: Any
    rest: Any  # Other state (the eager 'dropout' stream), unused and unchanged by the steps.

    def merge(self, params: Any, batch_stats: Any, train: bool) -> nnx.Module:
        """A fresh module whose Variables are new objects over the same arrays.

        NNX refuses to mutate a Variable created in another trace (outside the
        jitted step, or outside ``jax.grad``), so each merge makes its own.
        """
        graph = self.train_graph if train else self.eval_graph
        state = jax.tree.map(lambda x: x, (params, batch_stats, self.rest))
        return nnx.merge(graph, *state)


def compute_dtype(config: ml_collections.ConfigDict):
    if config.precision not in DTYPES:
        raise ConfigError(f"config.precision: {config.precision!r} is not one of {list(DTYPES)}")
    return DTYPES[config.precision]


def split_model(model: nnx.Module) -> tuple[ModelDef, Any, Any]:
    model.train()
    train_graph, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    model.eval()
    eval_graph, *_ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return ModelDef(train_graph, eval_graph, rest), params, batch_stats


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


def create_train_state(
    params: Any, batch_stats: Any, tx: optax.GradientTransformation | None, seed: int
) -> TrainState:
    """Step 0 of a run; without ``tx`` (inference only) there is no optimizer state."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=None if tx is None else tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def preprocess(
    images: jax.Array,
    config: ml_collections.ConfigDict,
    train: bool = False,
    rng_data: jax.Array | None = None,
    step: jax.Array | int = 0,
    example_offset: jax.Array | int = 0,
    stain_source: jax.Array | None = None,
) -> jax.Array:
    """uint8 batch -> normalised float images, as the train and eval steps see them.

    In train mode the random device augmentations draw one key per example (the
    global example index folded into the step's key of ``rng_data``), so jit and
    pmap, with any number of devices, augment each example identically.
    ``stain_source``: per-example stain statistics to normalise from (a slide's);
    by default each image's own (`stagejax.data.stain`).
    """
    aug = config.augment
    stain = stain_lib.spec(config)
    randomized = train and (aug.stain_jitter or aug.brightness or aug.contrast)
    if not randomized:
        return augment.device_preprocess(
            images, None, aug, train, config.grayscale, stain, stain_source
        )
    key = jax.random.fold_in(jax.random.wrap_key_data(rng_data), step)
    idx = example_offset + jnp.arange(images.shape[0])
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)

    def one(img, k):
        x = augment.device_preprocess(img[None], k, aug, True, config.grayscale, stain)
        return x[0]

    return jax.vmap(one)(images, keys)


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
    modeldef: ModelDef,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    parallel: Parallel,
) -> Callable:
    """A pure ``(state, batch) -> (state, metrics)`` to hand to ``parallel.compile_train_step``."""
    dtype = compute_dtype(config)
    pmap = parallel.mode == "pmap"
    smoothing = config.label_smoothing
    num_classes = config.num_classes

    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        labels = batch["label"]
        offset = _example_offset(parallel.mode, labels.shape[0])
        images = preprocess(batch["image"], config, True, state.rng, state.step, offset)
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


def make_eval_step(
    modeldef: ModelDef, config: ml_collections.ConfigDict, tta: bool = False
) -> Callable:
    """``(state, batch) -> {'probs', 'features', 'loss'}`` per example, in eval mode.

    With ``tta`` the 8 rotations/flips of each image are averaged (probabilities
    and features).
    """
    dtype = compute_dtype(config)

    def eval_fn(state: TrainState, batch: dict) -> dict:
        images = preprocess(batch["image"], config, stain_source=batch.get("stain"))
        model = modeldef.merge(state.params, state.batch_stats, train=False)
        views = _dihedral_views(images) if tta else [images]
        probs, feats = 0.0, 0.0
        for v in views:
            emb = model.embed(model.backbone(v.astype(dtype)))
            logits = model.classify(emb).astype(jnp.float32)
            probs = probs + jax.nn.softmax(logits) / len(views)
            feats = feats + emb.astype(jnp.float32) / len(views)
        label = batch.get("label")
        out = {"probs": probs, "features": feats}
        if label is not None:
            out["loss"] = -jnp.log(
                jnp.take_along_axis(probs, jnp.maximum(label, 0)[:, None], axis=1)[:, 0] + 1e-12
            )
        return out

    return eval_fn


def _dihedral_views(x):
    """The 8 rotations/flips of a batch of NHWC square images."""
    views = []
    for k in range(4):
        r = jnp.rot90(x, k, axes=(1, 2))
        views += [r, r[:, ::-1]]
    return views


def steps_per_epoch(num_train: int, global_batch_size: int) -> int:
    """As the reference: floor(N_train / batch) batches per epoch (at least one)."""
    return max(1, math.floor(num_train / global_batch_size))


def abstract_train_state(
    params: Any, batch_stats: Any, config: ml_collections.ConfigDict
) -> TrainState:
    """Shapes and dtypes of a run's train state, which restoring a checkpoint needs.

    Needs no dataset: the optimizer state's structure does not depend on the
    schedule's length, so one step per epoch stands in for the real count.
    """
    tx = create_optimizer(config, steps_per_epoch=1)
    shapes = jax.eval_shape(lambda: create_train_state(params, batch_stats, tx, config.seed))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), shapes)
