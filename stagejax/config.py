"""Checks every config value before any data is read or anything is compiled.

``validate(config)`` turns a bad setting into one ``ConfigError`` line naming
the field (``config.global_batch_size: 0; must be >= 12 ...``) instead of a
``ZeroDivisionError`` deep in the run, a silently accepted negative learning
rate, or an unknown model reported only after the data was checked.
Fields that do not exist in ``config`` are skipped, so configs written before
a field was added (and fields other modules add) still validate.

``init_from`` is checked here too: its ``model.json`` is a few bytes, and a
head or input that does not fit the config would otherwise fail only after
compiling (or train a 1000-class ImageNet head on 12 stages).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections

from stagejax import checkpoint as ckpt_lib
from stagejax import models
from stagejax.errors import ConfigError

CHOICES: dict[str, tuple[str, ...]] = {
    "model": models.NAMES,
    "optimizer": ("adam", "adamw", "sgd"),
    "schedule": ("constant", "cosine"),
    "precision": ("float32", "bfloat16"),
    "parallelism": ("jit", "pmap"),
    "eval_split": ("train", "validation", "test"),
}

# Why 16: the networks reduce their input 4x in the stem (stride-2 conv, then a
# stride-2 pool) and 32x in all; below 16 px the residual stages see 2x2 or
# fewer pixels, so there is no spatial structure left to learn from.
CROP_WHY = "below 16 px the networks' 32x downsampling leaves no spatial structure"
BATCH_WHY = "every batch holds every stage"
_MISSING = object()

# field -> (check, what it must be). Each check gets a finite number.
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "num_classes": (lambda v: v >= 2, ">= 2"),
    "eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "num_epochs": (lambda v: v >= 1, ">= 1"),
    "crop_size": (lambda v: v >= 16, f">= 16 ({CROP_WHY})"),
    "crop_range": (lambda v: v >= 0, ">= 0"),
    "learning_rate": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "seed": (lambda v: v >= 0, ">= 0"),
    "log_every_steps": (lambda v: v >= 1, ">= 1"),
    "checkpoint_every_steps": (lambda v: v >= 1, ">= 1"),
    "num_workers": (lambda v: v >= 0, ">= 0 (0: load in the main process)"),
    "device_memory_gb": (lambda v: v >= 0, ">= 0 (0: detect)"),
    "augment.stain_jitter": (lambda v: v >= 0, ">= 0 (0: off)"),
    "augment.brightness": (lambda v: v >= 0, ">= 0 (0: off)"),
    "augment.contrast": (lambda v: v >= 0, ">= 0 (0: off)"),
    "simulated.num_images": (
        lambda v: v >= 18, ">= 18 (70% go to train, which must hold all 12 stages)"),
    "simulated.image_size": (lambda v: v >= 16, ">= 16"),
    "simulated.crop_size": (lambda v: v >= 16, f">= 16 ({CROP_WHY})"),
    "simulated.crop_range": (lambda v: v >= 0, ">= 0"),
    "simulated.num_epochs": (lambda v: v >= 1, ">= 1"),
    "simulated.seed": (lambda v: v >= 0, ">= 0"),
}
_INTEGER_FIELDS = {
    "num_classes", "eval_batch_size", "num_epochs", "crop_size", "crop_range", "seed",
    "log_every_steps", "checkpoint_every_steps", "num_workers", "global_batch_size",
    "simulated.num_images", "simulated.image_size", "simulated.crop_size",
    "simulated.crop_range", "simulated.num_epochs", "simulated.seed",
    "simulated.global_batch_size",
}


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
    value: Any = config
    for part in field.split("."):
        if not hasattr(value, "get"):
            return _MISSING
        value = value.get(part, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


def _fail(field: str, value: Any, must: str) -> ConfigError:
    return ConfigError(f"config.{field}: {value!r}; must be {must}")


def _number(field: str, value: Any) -> float:
    integer = field in _INTEGER_FIELDS
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _fail(field, value, "an integer" if integer else "a number")
    if not math.isfinite(value):
        raise _fail(field, value, "finite")
    return value


def _check_choices(config: ml_collections.ConfigDict) -> None:
    for field, choices in CHOICES.items():
        value = _get(config, field)
        if value is not _MISSING and value not in choices:
            raise _fail(field, value, "one of " + ", ".join(choices))


def _check_ranges(config: ml_collections.ConfigDict) -> None:
    for field, (ok, must) in _RANGES.items():
        value = _get(config, field)
        if value is not _MISSING and not ok(_number(field, value)):
            raise _fail(field, value, must)


def _check_batch(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Both batch sizes the run may use are range-checked; the one it will use
    must also divide by the device count (the eval batch always does)."""
    stages = _get(config, "num_classes")
    stages = 12 if stages is _MISSING else stages
    simulated = not _get(config, "data_dir")
    for field in ("global_batch_size", "simulated.global_batch_size"):
        value = _get(config, field)
        if value is _MISSING:
            continue
        if _number(field, value) < stages:
            raise _fail(field, value, f">= {stages} ({BATCH_WHY})")
        used = (field == "simulated.global_batch_size") == simulated
        if used and value % num_devices:
            raise _fail(field, value, f"a multiple of the {num_devices} devices")
    eval_batch = _get(config, "eval_batch_size")
    if eval_batch is not _MISSING and eval_batch % num_devices:
        raise _fail("eval_batch_size", eval_batch, f"a multiple of the {num_devices} devices")


def _check_simulated_sizes(config: ml_collections.ConfigDict) -> None:
    size, crop = _get(config, "simulated.image_size"), _get(config, "simulated.crop_size")
    if _MISSING not in (size, crop) and size < crop:
        raise _fail("simulated.image_size", size,
                    f">= config.simulated.crop_size ({crop}): the crop is cut from the image")


def check_init_from(config: ml_collections.ConfigDict) -> None:
    """``init_from``'s model must be the config's architecture, classes and input."""
    directory = _get(config, "init_from")
    if directory in (_MISSING, None, ""):
        return
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ConfigError(f"config.init_from: {directory}: no such model directory (make one "
                          "with python -m stagejax.convert)")
    meta = ckpt_lib.read_model_json(path)
    arch, classes, channels = meta["arch"], meta["num_classes"], meta["in_channels"]
    want_arch = _get(config, "model")
    want_classes = _get(config, "num_classes")
    gray = _get(config, "grayscale")
    there = f"config.init_from: {directory} holds a {arch} with {classes} classes"
    if want_arch is not _MISSING and arch != want_arch:
        raise ConfigError(
            f"{there}, but config.model is {want_arch!r}; pass --config.model={arch}, or import "
            f"{want_arch} weights with python -m stagejax.convert --arch {want_arch}")
    if want_classes is not _MISSING and classes != want_classes:
        raise ConfigError(
            f"{there}, but config.num_classes is {want_classes}; re-import the weights with a "
            f"fresh {want_classes}-class head: python -m stagejax.convert --from FILE "
            f"--arch {arch} --new_head --num_classes {want_classes} --out NEW_DIR")
    want_channels = 3 if gray in (_MISSING, False) else 1
    if channels != want_channels:
        raise ConfigError(
            f"{there} and {channels} input channel(s), but config.grayscale is {bool(gray)} "
            f"({want_channels} channel(s)); pass --config.grayscale={channels == 1}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise ``ConfigError`` (one line naming the field) for the first bad value.

    ``config``: as given (before ``data.resolve_config``), so both the top-level
    fields and the ``simulated`` block's are checked. ``num_devices``: default
    ``jax.device_count()``.
    """
    num_devices = jax.device_count() if num_devices is None else num_devices
    _check_choices(config)
    _check_ranges(config)
    _check_batch(config, num_devices)
    _check_simulated_sizes(config)
    check_init_from(config)
