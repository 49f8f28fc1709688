"""Preprocessing and the eval step, shared by training's validation and every inference mode."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from stagejax.data import augment
from stagejax.data import stain as stain_lib
from stagejax.model.state import ModelDef, TrainState, compute_dtype


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
