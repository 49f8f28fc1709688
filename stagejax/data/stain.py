"""Stain normalisation in hematoxylin-PAS optical-density space, on the device.

Staining differs between days, labs and scanners; a model trained on one
staining may read another one's colour as a different stage. Normalisation
maps each image's stain onto a reference recorded with the model, so that
training, evaluation, prediction and whole sections all feed the network the
same colours. Everything here is jnp, runs inside the jitted steps, and is the
one code path for every mode.

Two methods, each described by a fixed-length vector of *stain statistics*
(of one image, or pooled over a whole slide, or the reference):

* ``macenko`` (Macenko et al. 2009, ISBI): the two stain colours are the
  extreme angles of the tissue's optical densities in the plane of their two
  main directions; the statistics are the 2 unit stain vectors (hematoxylin
  first) and each stain's 99th-percentile concentration (8 numbers). An image
  is unmixed with its own vectors and remixed with the reference's.
* ``reinhard`` (after Reinhard et al. 2001, here in stain space rather than
  Lab): the mean and standard deviation over the tissue of the H, PAS and
  residual concentrations from scikit-image's H-PAS matrix (6 numbers); each
  is matched to the reference's. Near-white pixels are left as they are.

An image with too little tissue to estimate from (statistics NaN) is passed
through unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from skimage import color

from stagejax.errors import ConfigError

METHODS = ("none", "macenko", "reinhard")
STATS_SIZE = {"macenko": 8, "reinhard": 6}

# Rows: optical density of hematoxylin, PAS and a residual (scikit-image's H-PAS
# matrix, Ruifrok & Johnston 2001); od = concentrations @ RGB_FROM_HPX.
RGB_FROM_HPX = np.asarray(color.rgb_from_hpx, np.float32)
HPX_FROM_RGB = np.asarray(color.hpx_from_rgb, np.float32)

# A pixel is tissue when its mean OD exceeds this. Macenko's beta (0.15) asks it of
# every channel, which in H-PAS drops pale PAS-only tissue (little red absorbance).
TISSUE_OD = 0.15
MIN_TISSUE_FRACTION = 0.01  # Less tissue than this: no estimate (NaN statistics).
ANGLE_PERCENTILE = 1.0  # Robust extremes of the stain angles (Macenko's alpha).
MAX_PERCENTILE = 99.0  # The "maximum" concentration of a stain.


def to_od(x: jax.Array) -> jax.Array:
    """RGB in [0, 1] -> optical density (0 for white; finite for black)."""
    return -jnp.log((x * 255.0 + 1.0) / 256.0)


def from_od(od: jax.Array) -> jax.Array:
    return jnp.clip((jnp.exp(-od) * 256.0 - 1.0) / 255.0, 0.0, 1.0)


def _tissue(od: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mask of tissue pixels, whether there are enough of them) of [N, 3] densities."""
    mask = od.mean(axis=-1) > TISSUE_OD
    return mask, mask.mean() >= MIN_TISSUE_FRACTION


def _masked_percentile(v: jax.Array, mask: jax.Array, q) -> jax.Array:
    """Percentile over the rows of ``v`` where ``mask`` (per column for 2-D ``v``)."""
    m = mask if v.ndim == 1 else mask[:, None]
    return jnp.nanpercentile(jnp.where(m, v, jnp.nan), q, axis=0)


def _macenko_vectors(od: jax.Array, mask: jax.Array) -> jax.Array:
    """[2, 3] unit stain vectors, hematoxylin first, from tissue densities."""
    w = mask.astype(od.dtype)[:, None]
    n = jnp.maximum(w.sum(), 1.0)
    centred = (od - (w * od).sum(0) / n) * w
    _, vecs = jnp.linalg.eigh(centred.T @ centred / n)  # eigenvalues ascending
    plane = vecs[:, ::-1][:, :2]
    plane = plane * jnp.where(plane.sum(0) < 0, -1.0, 1.0)  # densities are positive
    proj = od @ plane
    phi = jnp.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = _masked_percentile(phi, mask, jnp.array([ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE]))
    a = plane @ jnp.stack([jnp.cos(lo), jnp.sin(lo)])
    b = plane @ jnp.stack([jnp.cos(hi), jnp.sin(hi)])
    # Hematoxylin absorbs red more than PAS does (its first OD component is larger).
    h, p = jnp.where(a[0] >= b[0], a, b), jnp.where(a[0] >= b[0], b, a)
    vectors = jnp.stack([h, p])
    return vectors / jnp.linalg.norm(vectors, axis=1, keepdims=True)


def _unmix(od: jax.Array, vectors: jax.Array) -> jax.Array:
    """Least-squares concentrations [N, 2] of densities [N, 3] in two stain vectors."""
    return od @ jnp.linalg.pinv(vectors)


def _macenko_stats(od: jax.Array) -> jax.Array:
    mask, enough = _tissue(od)
    vectors = _macenko_vectors(od, mask)
    maxc = _masked_percentile(_unmix(od, vectors), mask, MAX_PERCENTILE)
    stats = jnp.concatenate([vectors.ravel(), maxc])
    return jnp.where(enough & jnp.all(maxc > 0), stats, jnp.nan)


def _reinhard_stats(od: jax.Array) -> jax.Array:
    mask, enough = _tissue(od)
    c = od @ HPX_FROM_RGB
    w = mask.astype(od.dtype)[:, None]
    n = jnp.maximum(w.sum(), 1.0)
    mean = (w * c).sum(0) / n
    std = jnp.sqrt((w * (c - mean) ** 2).sum(0) / n)
    return jnp.where(enough & jnp.all(std > 1e-4), jnp.concatenate([mean, std]), jnp.nan)


def _macenko_apply(od: jax.Array, source: jax.Array, reference: jax.Array) -> jax.Array:
    c = _unmix(od, source[:6].reshape(2, 3)) * (reference[6:] / source[6:])
    return c @ reference[:6].reshape(2, 3)


def _reinhard_apply(od: jax.Array, source: jax.Array, reference: jax.Array) -> jax.Array:
    c = od @ HPX_FROM_RGB
    mapped = (c - source[:3]) / source[3:] * reference[3:] + reference[:3]
    weight = jnp.clip(od.mean(axis=-1, keepdims=True) / TISSUE_OD, 0.0, 1.0)  # 0 on white
    return (c + weight * (mapped - c)) @ RGB_FROM_HPX


_STATS = {"macenko": _macenko_stats, "reinhard": _reinhard_stats}
_APPLY = {"macenko": _macenko_apply, "reinhard": _reinhard_apply}


def _check(method: str) -> None:
    if method not in _STATS:
        raise ValueError(f"stain normalisation method {method!r}; one of {', '.join(_STATS)}")


def estimate(x: jax.Array, method: str) -> jax.Array:
    """[B, H, W, 3] RGB in [0, 1] -> [B, K] stain statistics, one row per image."""
    _check(method)
    return jax.vmap(lambda im: _STATS[method](to_od(im.reshape(-1, 3))))(x)


def normalize(x: jax.Array, method: str, reference, source: jax.Array | None = None) -> jax.Array:
    """[B, H, W, 3] RGB in [0, 1] mapped onto ``reference``'s stain.

    ``source``: [B, K] statistics to map from (e.g. one slide's, repeated); by
    default each image's own. A NaN row leaves its image unchanged.
    """
    _check(method)
    reference = jnp.asarray(reference, jnp.float32)
    if source is None:
        source = estimate(x, method)

    def one(im, src):
        od = to_od(im.reshape(-1, 3))
        out = from_od(_APPLY[method](od, src, reference)).reshape(im.shape)
        return jnp.where(jnp.all(jnp.isfinite(src)), out, im)

    return jax.vmap(one)(x, source)


def pool(stats: np.ndarray, method: str) -> np.ndarray:
    """One statistics vector from many (rows; NaN rows ignored): the median, with
    Macenko's stain vectors renormalised. Used for the reference (over training
    images) and for a slide (over its tubules)."""
    _check(method)
    stats = np.asarray(stats, np.float64)
    stats = stats[np.all(np.isfinite(stats), axis=1)]
    if not len(stats):
        return np.full(STATS_SIZE[method], np.nan, np.float32)
    out = np.median(stats, axis=0)
    if method == "macenko":
        vectors = out[:6].reshape(2, 3)
        out[:6] = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).ravel()
    return out.astype(np.float32)


def format_reference(stats: np.ndarray) -> str:
    """The config/model.json form of a statistics vector."""
    return ",".join(f"{float(v):.6g}" for v in stats)


def parse_reference(text: str, method: str, field: str = "config.stain.reference") -> np.ndarray:
    """Inverse of :func:`format_reference`; ValueError naming ``field`` if malformed."""
    try:
        values = np.array([float(v) for v in text.split(",")], np.float32)
    except ValueError:
        values = np.zeros(0, np.float32)
    if values.shape != (STATS_SIZE[method],) or not np.all(np.isfinite(values)):
        raise ValueError(
            f"{field}: {text!r} is not {STATS_SIZE[method]} comma-separated numbers "
            f"(the {method} statistics a training run records)"
        )
    return values


def spec(config) -> tuple[str, np.ndarray] | None:
    """(method, reference) of ``config.stain``, or None when normalisation is off.

    The reference must be set by then: a training run estimates it from its
    training images (`stagejax.train.loop`), a trained model records it.
    """
    section = config.get("stain")
    method = section.normalize if section is not None else "none"
    if method == "none":
        return None
    if not section.reference:
        raise ConfigError(
            f"config.stain.reference: empty, and these weights record no {method} reference; "
            "pass one (as a training run's config.json records it) or --config.stain.normalize=none"
        )
    return method, parse_reference(section.reference, method)
