"""Host crops/rotations/flips (reference rules and rates) and device preprocessing."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stagejax.data import augment
from stagejax.data.sampler import StageBalancedSampler
from stagejax.errors import DatasetError


def coord_image(h, w):
    """uint8 image whose pixel (y, x) holds (y, x, 7): crops are readable."""
    y, x = np.mgrid[:h, :w]
    return np.stack([y, x, np.full_like(y, 7)], -1).astype(np.uint8)


def aug_config(**kw):
    c = ml_collections.ConfigDict(
        dict(rot90=True, flip=True, stain_jitter=0.0, brightness=0.0, contrast=0.0)
    )
    c.update(kw)
    return c


@settings(max_examples=200, deadline=None)
@given(size=st.integers(8, 300), crop=st.integers(1, 300), shift=st.integers(-150, 150))
def test_crop_start_stays_inside_and_falls_back_to_zero(size, crop, shift):
    if crop > size:
        return
    start = augment.crop_start(size, crop, shift)
    assert 0 <= start <= size - crop
    centred = (size - crop) // 2 + shift
    if 0 <= centred <= size - crop:
        assert start == centred
    else:
        assert start == 0


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(20, 80),
    w=st.integers(20, 80),
    crop=st.integers(4, 20),
    crop_range=st.integers(0, 30),
    seed=st.integers(0, 2**31),
)
def test_train_crop_matches_reference_rules(h, w, crop, crop_range, seed):
    image = coord_image(h, w)
    out = augment.TrainCrop(crop, crop_range).random_map(
        {"image": image, "label": 3}, np.random.default_rng(seed)
    )
    shift_y, shift_x, k, flip = augment.sample_train_params(np.random.default_rng(seed), crop_range)
    top, left = augment.crop_start(h, crop, shift_y), augment.crop_start(w, crop, shift_x)
    expected = np.rot90(image[top : top + crop, left : left + crop], k % 4)
    expected = expected[::-1] if flip else expected
    assert out["label"] == 3
    assert out["image"].dtype == np.uint8 and out["image"].flags.c_contiguous
    np.testing.assert_array_equal(out["image"], expected)
    # Without rotation and flip, the corner pixel is the crop's top-left.
    plain = augment.TrainCrop(crop, crop_range, rot90=False, flip=False).random_map(
        {"image": image}, np.random.default_rng(seed)
    )["image"]
    assert tuple(plain[0, 0, :2]) == (top, left)


def test_rotation_flip_and_shift_rates():
    rng = np.random.default_rng(0)
    n = 20000
    draws = np.array([augment.sample_train_params(rng, 3) for _ in range(n)], dtype=np.int64)
    shifts, k, flip = draws[:, :2], draws[:, 2], draws[:, 3]

    def close(count, p):  # within 5 binomial standard deviations
        return abs(count - n * p) < 5 * np.sqrt(n * p * (1 - p))

    assert set(k.tolist()) == {0, 1, 2, 3, 4}
    assert close((k % 4 == 0).sum(), 2 / 5)  # no rotation is twice as likely
    for r in (1, 2, 3):
        assert close((k == r).sum(), 1 / 5)
    assert close(flip.sum(), 2 / 3)
    assert set(shifts.ravel().tolist()) == set(range(-3, 4))
    for v in range(-3, 4):
        assert close((shifts[:, 0] == v).sum(), 1 / 7)


def test_same_seed_and_position_give_the_same_crop():
    labels = np.repeat(np.arange(12), 3)
    image = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    crop = augment.TrainCrop(24, 8)

    def at(i):
        return crop.random_map({"image": image}, StageBalancedSampler(labels, 12, 5)[i].rng)

    np.testing.assert_array_equal(at(17)["image"], at(17)["image"])
    assert any(not np.array_equal(at(17)["image"], at(j)["image"]) for j in range(18, 24))


def test_center_crop_and_too_small_images():
    image = coord_image(30, 41)
    out = augment.CenterCrop(10).map({"image": image})["image"]
    assert out.shape == (10, 10, 3)
    assert tuple(out[0, 0, :2]) == (10, 15)
    with pytest.raises(DatasetError, match="a.png.*smaller than crop_size 32"):
        augment.CenterCrop(32).map({"image": image, "file_name": "a.png"})
    with pytest.raises(DatasetError, match="smaller than crop_size"):
        augment.TrainCrop(31, 0).random_map({"image": image}, np.random.default_rng(0))


def numpy_min_max(x):
    x = x.astype(np.float64) / 255.0
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
    return (x - lo) / (hi - lo)


def random_images(seed, b=3, size=16):
    return np.random.default_rng(seed).integers(10, 240, (b, size, size, 3), dtype=np.uint8)


def preprocess(images, rng, aug, train, grayscale=False):
    fn = jax.jit(
        functools.partial(augment.device_preprocess, aug=aug, train=train, grayscale=grayscale)
    )
    return np.asarray(fn(jnp.asarray(images), rng))


def test_identity_colour_is_min_max():
    images = random_images(0)
    for train in (False, True):
        out = preprocess(images, jax.random.key(0), aug_config(), train)
        assert out.dtype == np.float32 and out.shape == images.shape
        np.testing.assert_allclose(out, numpy_min_max(images), atol=1e-6)


def test_constant_image_becomes_zeros():
    images = np.full((2, 8, 8, 3), 77, np.uint8)
    aug = aug_config(brightness=0.2, contrast=0.2)  # Stain jitter would tint a gray image.
    for train in (False, True):
        out = preprocess(images, jax.random.key(0), aug, train=train)
        np.testing.assert_array_equal(out, 0.0)


def test_zero_strength_stain_jitter_is_a_no_op():
    images = random_images(1)
    off = preprocess(images, jax.random.key(3), aug_config(stain_jitter=0.0), train=True)
    plain = preprocess(images, None, None, train=False)
    np.testing.assert_array_equal(off, plain)
    # The jitter's colour round trip itself is lossless.
    x = jnp.asarray(images, jnp.float32) / 255
    np.testing.assert_allclose(augment.stains_to_rgb(augment.rgb_to_stains(x)), x, atol=1e-5)


def test_more_haematoxylin_darkens_red_and_green_most():
    x = jnp.full((1, 1, 1, 3), 0.8)
    c = augment.rgb_to_stains(x)
    darker = augment.stains_to_rgb(c.at[..., 0].add(0.3))[0, 0, 0]
    drop = 0.8 - np.asarray(darker)
    assert drop[0] > drop[2] > 0 and drop[1] > drop[2]


@pytest.mark.parametrize("grayscale", [False, True])
def test_full_augmentation_range_and_determinism(grayscale):
    images = random_images(2, b=4)
    aug = aug_config(stain_jitter=0.1, brightness=0.3, contrast=0.3)
    a = preprocess(images, jax.random.key(1), aug, True, grayscale)
    b = preprocess(images, jax.random.key(1), aug, True, grayscale)
    c = preprocess(images, jax.random.key(2), aug, True, grayscale)
    plain = preprocess(images, None, aug, False, grayscale)
    assert a.shape == (4, 16, 16, 1 if grayscale else 3)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, plain)
    for out in (a, plain):
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out.min(axis=(1, 2, 3)), 0.0, atol=1e-6)
        np.testing.assert_allclose(out.max(axis=(1, 2, 3)), 1.0, atol=1e-6)


def test_gray_is_one_channel_luma():
    images = random_images(3)
    out = preprocess(images, None, aug_config(), train=False, grayscale=True)
    luma = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert out.shape == images.shape[:3] + (1,)
    np.testing.assert_allclose(out, numpy_min_max(luma[..., None] * 1.0), atol=1e-5)


def test_tone_curves_fix_black_and_white_and_are_monotone():
    x = jnp.linspace(0, 1, 101).reshape(1, 1, 101, 1).repeat(8, axis=0)
    for curve in (augment.brightness_curve, augment.contrast_curve):
        y = np.asarray(curve(x, jax.random.key(4), 0.5))
        np.testing.assert_allclose(y[..., 0, 0], 0.0, atol=1e-6)
        np.testing.assert_allclose(y[..., -1, 0], 1.0, atol=1e-6)
        assert (np.diff(y[:, 0, :, 0], axis=1) >= 0).all()
        assert not np.allclose(y, np.asarray(x))
