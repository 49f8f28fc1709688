"""Grad-CAM: where in a tubule does the network look when it calls a stage?

Experts stage a tubule from a few structures (acrosome caps of round
spermatids, position of elongated spermatid bundles, meiotic figures).  The
study showed attention maps to argue that the network uses the same
structures; this module computes the classic Grad-CAM map for that check.

The map is taken on the output of the last convolutional stage
(``model.backbone``), the deepest layer that still has a spatial layout:
each channel is weighted by the spatial mean of the gradient of one stage's
logit with respect to it, the weighted sum is rectified (only evidence *for*
the stage is kept), bilinearly upsampled to the image and scaled so that
each image's peak is 1.  Everything runs as one jitted function over a batch;
in eval mode the images of a batch do not interact, so a batch gives the same
maps as one image at a time.

`stagejax.explain.gradcam_report` draws the maps of a trained run as PNGs
(``python -m stagejax.explain gradcam``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_PREDICTED = -1  # internal target code: "explain the predicted stage"


# --------------------------------------------------------------------------
# Core


def _normalise(cam: jax.Array, height: int, width: int) -> jax.Array:
    """Upsample [B,h,w] maps to the image and scale each to peak 1 (all-zero stays 0)."""
    cam = jax.image.resize(cam, (cam.shape[0], height, width), method="bilinear")
    cam = jnp.maximum(cam, 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)


@functools.partial(jax.jit, static_argnums=0)
def _gradcam_jit(graphdef, state, images, target):
    """Heatmaps [B,H,W] and logits [B,K] for one batch (one compiled function)."""
    model = nnx.merge(graphdef, state)
    model.eval()  # only the merged copy: the caller's module keeps its mode

    fmap = model.backbone(images)

    def target_logit(f):
        logits = model.classify(model.embed(f))
        chosen = jnp.where(target == _PREDICTED, jnp.argmax(logits, axis=-1), target)
        picked = jnp.take_along_axis(logits, chosen[:, None], axis=-1)
        # Summing over the batch is fine: in eval mode image b's logit depends
        # only on fmap[b], so d(sum)/d fmap[b] is d(logit_b)/d fmap[b].
        return picked.astype(jnp.float32).sum(), logits

    # Only the head (embed + classify) is differentiated: the backbone runs forward once.
    grads, logits = jax.grad(target_logit, has_aux=True)(fmap)
    weights = grads.astype(jnp.float32).mean(axis=(1, 2))  # [B, C]
    cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", fmap.astype(jnp.float32), weights))
    return _normalise(cam, images.shape[1], images.shape[2]), logits.astype(jnp.float32)


def gradcam_and_logits(
    model: nnx.Module, images: jax.Array | np.ndarray, target: np.ndarray | int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps [B,H,W] in [0,1] and the logits [B,K] of the same pass.

    Args:
      model: nnx module with ``backbone``, ``embed`` and ``classify`` (see
        CONTRACT.md); it is evaluated in eval mode whatever its current mode.
      images: float [B,H,W,C], preprocessed exactly as for evaluation.
      target: stage index per image ([B] ints, or one int for all); ``None``
        explains each image's predicted stage.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"images: expected float [B,H,W,C], got {images.dtype} {tuple(images.shape)}"
        )
    batch = images.shape[0]
    if target is None:
        target_arr = np.full((batch,), _PREDICTED, np.int32)
    else:
        target_arr = np.broadcast_to(np.asarray(target, np.int32), (batch,)).copy()
        if np.any(target_arr < 0):
            raise ValueError(f"target: stage indices must be >= 0, got {target_arr.tolist()}")
    graphdef, state = nnx.split(model)
    heat, logits = _gradcam_jit(graphdef, state, images, jnp.asarray(target_arr))
    if np.any(target_arr >= logits.shape[-1]):
        raise ValueError(
            f"target: stage indices must be < {logits.shape[-1]}, got {target_arr.tolist()}"
        )
    return np.asarray(heat), np.asarray(logits)


def gradcam(
    model: nnx.Module, images: jax.Array | np.ndarray, target: np.ndarray | int | None = None
) -> np.ndarray:
    """Grad-CAM heatmaps [B,H,W] in [0,1] (peak 1 per image, 0 = no evidence).

    ``target=None`` explains the predicted stage of each image, otherwise the
    given stage index (one per image).  See :func:`gradcam_and_logits`.
    """
    return gradcam_and_logits(model, images, target)[0]


def overlay(
    image_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, cmap: str = "turbo"
) -> np.ndarray:
    """Blend a [0,1] heatmap, coloured with ``cmap``, onto an image; uint8 RGB [H,W,3]."""
    import matplotlib  # heavy: imported only when drawing

    image = np.asarray(image_uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image: expected [H,W], [H,W,1] or [H,W,3], got {image.shape}")
    heat = np.asarray(heatmap, np.float32)
    if heat.shape != image.shape[:2]:
        raise ValueError(f"heatmap: shape {heat.shape} does not match image {image.shape[:2]}")
    colours = matplotlib.colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
