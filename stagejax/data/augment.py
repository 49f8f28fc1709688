"""Augmentation: geometric on the host in uint8, photometric on the device in float.

Why the split (benchmarks/loader.py on the 2-core dev CPU, 1152 px PNG -> 896 px
crop, per image): PNG decoding is the host's real cost (~19 ms); crop + rot90 +
flip on uint8 add ~2.5 ms and the crop shrinks the image 1.65x. Converting to
float32 on the host would cost little CPU (~1.4 ms for min-max) but make every
batch 4x bigger through worker shared memory and the host->device copy (2.4 MB
-> 9.6 MB per crop), and the float photometric augmentation (stain jitter, tone
curves) costs 40-80 ms per image on a CPU, 2-4x the decode. On an accelerator
that is one fused elementwise kernel inside the jitted step, so all float work
runs there.

Host side (grain transforms on records ``dict(image=uint8 HxWx3, ...)``):

* `TrainCrop`: the reference recipe's crop (centred, shifted by a uniform
  integer in ``[-crop_range, crop_range]`` per axis; an axis whose shifted crop
  would leave the image falls back to offset 0), then ``rot90`` by ``k`` with
  ``k`` uniform in {0,1,2,3,4} (4 == no rotation, so no rotation is twice as
  likely), then a vertical (top-bottom) flip with probability 2/3. Its
  randomness is the record's ``rng`` from the sampler, so it is a pure function
  of (seed, position).
* `CenterCrop`: evaluation.

Device side: `device_preprocess`, pure jax (the config and flags are static): stain
normalisation (`stagejax.data.stain`), then the photometric augmentation.
"""

from __future__ import annotations

import grain.python as grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stagejax.data import stain as stain_lib
from stagejax.errors import DatasetError

FLIP_PROBABILITY = 2.0 / 3.0


def _check_size(image: np.ndarray, crop_size: int, element: dict) -> None:
    h, w = image.shape[:2]
    if h < crop_size or w < crop_size:
        name = element.get("file_name", "<image>")
        raise DatasetError(f"{name}: image is {h}x{w}, smaller than crop_size {crop_size}")


def crop_start(size: int, crop_size: int, shift: int) -> int:
    """Start of the train crop on one axis: centred plus ``shift``, or 0 when
    that crop would leave the image (the reference recipe's rule)."""
    start = (size - crop_size) // 2 + shift
    return start if 0 <= start <= size - crop_size else 0


def sample_train_params(rng: np.random.Generator, crop_range: int) -> tuple[int, int, int, bool]:
    """``(shift_y, shift_x, k, flip)``: always the same four draws, whatever is enabled."""
    shift_y, shift_x = (int(v) for v in rng.integers(-crop_range, crop_range, 2, endpoint=True))
    k = int(rng.integers(0, 5))  # 0..4; k=4 is the identity rotation.
    flip = bool(rng.random() < FLIP_PROBABILITY)
    return shift_y, shift_x, k, flip


class TrainCrop(grain.RandomMapTransform):
    """Reference train crop, rot90 and vertical flip on ``element['image']`` (uint8 HWC)."""

    def __init__(self, crop_size: int, crop_range: int, rot90: bool = True, flip: bool = True):
        self.crop_size = int(crop_size)
        self.crop_range = int(crop_range)
        self.rot90 = rot90
        self.flip = flip

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = element["image"]
        _check_size(image, self.crop_size, element)
        shift_y, shift_x, k, flip = sample_train_params(rng, self.crop_range)
        top = crop_start(image.shape[0], self.crop_size, shift_y)
        left = crop_start(image.shape[1], self.crop_size, shift_x)
        out = image[top : top + self.crop_size, left : left + self.crop_size]
        if self.rot90:
            out = np.rot90(out, k % 4)
        if self.flip and flip:
            out = out[::-1]
        return {**element, "image": np.ascontiguousarray(out)}


class CenterCrop(grain.MapTransform):
    """The centred ``crop_size`` square (evaluation, prediction)."""

    def __init__(self, crop_size: int):
        self.crop_size = int(crop_size)

    def map(self, element: dict) -> dict:
        image = element["image"]
        _check_size(image, self.crop_size, element)
        top = (image.shape[0] - self.crop_size) // 2
        left = (image.shape[1] - self.crop_size) // 2
        out = image[top : top + self.crop_size, left : left + self.crop_size]
        return {**element, "image": np.ascontiguousarray(out)}


# ---------------------------------------------------------------------------
# Device side.


def rgb_to_stains(x: jax.Array) -> jax.Array:
    """RGB in [0, 1] -> stain concentrations (H, PAS, residual), scikit-image's H-PAS matrix."""
    return stain_lib.to_od(x) @ stain_lib.HPX_FROM_RGB


def stains_to_rgb(c: jax.Array) -> jax.Array:
    return stain_lib.from_od(c @ stain_lib.RGB_FROM_HPX)


def stain_jitter(x: jax.Array, rng: jax.Array, strength: float) -> jax.Array:
    """Per image, scale each stain's concentration by U(1-s, 1+s) and shift it by
    U(-s, s) (haematoxylin and PAS only; the residual is left alone)."""
    b = x.shape[0]
    k_scale, k_shift = jax.random.split(rng)
    scale = jax.random.uniform(k_scale, (b, 1, 1, 2), minval=1 - strength, maxval=1 + strength)
    shift = jax.random.uniform(k_shift, (b, 1, 1, 2), minval=-strength, maxval=strength)
    c = rgb_to_stains(x)
    c = jnp.concatenate([c[..., :2] * scale + shift, c[..., 2:]], axis=-1)
    return stains_to_rgb(c)


def to_gray(x: jax.Array) -> jax.Array:
    """ITU-R BT.601 luma, one channel."""
    return x @ jnp.array([[0.299], [0.587], [0.114]], x.dtype)


def min_max(x: jax.Array) -> jax.Array:
    """Per image over all channels to [0, 1]; a (nearly) constant image becomes all
    zeros. The threshold is far below one uint8 step (1/255) and absorbs rounding
    differences between XLA's fused kernels."""
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    span = x.max(axis=(1, 2, 3), keepdims=True) - lo
    return jnp.where(span > 1e-6, (x - lo) / jnp.maximum(span, 1e-6), 0.0)


def _random_exponent(rng: jax.Array, b: int, strength: float) -> jax.Array:
    return jnp.exp(jax.random.uniform(rng, (b, 1, 1, 1), minval=-strength, maxval=strength))


def brightness_curve(x: jax.Array, rng: jax.Array, strength: float) -> jax.Array:
    """Gamma ``x ** exp(U(-s, s))`` on [0, 1] images. A tone curve that keeps 0
    and 1 fixed, because the final min-max would undo any affine brightness."""
    return x ** _random_exponent(rng, x.shape[0], strength)


def contrast_curve(x: jax.Array, rng: jax.Array, strength: float) -> jax.Array:
    """``x^a / (x^a + (1-x)^a)`` with ``a = exp(U(-s, s))``: an S-curve (a > 1,
    more contrast) or its inverse (a < 1), 0 and 1 fixed, for the same reason."""
    a = _random_exponent(rng, x.shape[0], strength)
    xa = x**a
    return xa / (xa + (1.0 - x) ** a)


def device_preprocess(
    images_uint8: jax.Array,
    rng: jax.Array | None,
    aug: ml_collections.ConfigDict | None,
    train: bool,
    grayscale: bool,
    stain: tuple[str, np.ndarray] | None = None,
    stain_source: jax.Array | None = None,
) -> jax.Array:
    """uint8 [B,H,W,3] -> float32 [B,H,W,C] in [0, 1], C = 1 if ``grayscale`` else 3.

    ``stain`` = (method, reference statistics): first map each image onto the
    reference stain, from ``stain_source`` ([B, K]) when given (a slide's), else
    from each image's own statistics. In train mode, when enabled in ``aug``
    (fields ``stain_jitter``, ``brightness``, ``contrast``: strengths, 0 = off):
    stain jitter on the RGB image, then gray conversion, per-image min-max,
    brightness and contrast tone curves, and a final min-max. ``aug``, ``train``,
    ``grayscale`` and ``stain`` are static; ``rng`` is only used in train mode
    with something enabled.
    """
    x = images_uint8.astype(jnp.float32) / 255.0
    if stain is not None:
        x = stain_lib.normalize(x, stain[0], stain[1], stain_source)
    stain_strength = float(aug.stain_jitter) if (train and aug is not None) else 0.0
    bright = float(aug.brightness) if (train and aug is not None) else 0.0
    contrast = float(aug.contrast) if (train and aug is not None) else 0.0
    if stain_strength or bright or contrast:
        k_stain, k_bright, k_contrast = jax.random.split(rng, 3)
    if stain_strength:
        x = stain_jitter(x, k_stain, stain_strength)
    if grayscale:
        x = to_gray(x)
    x = min_max(x)
    if bright:
        x = brightness_curve(x, k_bright, bright)
    if contrast:
        x = contrast_curve(x, k_contrast, contrast)
    if bright or contrast:
        x = min_max(x)
    return x
