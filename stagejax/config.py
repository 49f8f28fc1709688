"""The config a run uses: completed on the command line, then checked.

The config is the training recipe (`stagejax.recipe`). ``complete_argv``
is the one place that decides which recipe a command line runs, before absl
parses it: for training, the variant of ``--config=FILE`` (the one named after
the colon, ``configs/resnet.py:demo``; with none named, ``demo`` (the simulated
dataset's sizes) when no ``--config.data_dir`` is given, else ``study``); for
eval, predict and section on a trained workdir, the run's own ``W/config.json``
(``--config`` is then not needed). Either way absl's ``config_flags`` loads it
once and applies the command line's ``--config.X``, which always wins.

``check_overrides`` refuses a ``--config.FIELD`` that the config does not have,
before absl parses anything, as one ``ConfigError`` line (naming the mode flag
that replaced a field that left the recipe).

``validate(config)`` turns a bad setting into one ``ConfigError`` line naming
the field (``config.global_batch_size: 0; must be >= 12 ...``) instead of a
``ZeroDivisionError`` deep in the run, a silently accepted negative learning
rate, or an unknown model reported only after the data was checked.

``init_from`` is checked here too: its ``model.json`` is a few bytes, and a
head or input that does not fit the config would otherwise fail only after
compiling (or train a 1000-class ImageNet head on 12 stages).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import inspect
import math
import re
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections

from stagejax import models, recipe
from stagejax.data import stain
from stagejax.errors import ConfigError, first_line
from stagejax.model import saved

CHOICES: dict[str, tuple[str, ...]] = {
    "model": models.NAMES,
    "optimizer": ("adam", "adamw", "sgd"),
    "schedule": ("constant", "cosine"),
    "precision": ("float32", "bfloat16"),
    "parallelism": ("jit", "pmap"),
    "eval_split": ("train", "validation", "test"),
    "stain.normalize": stain.METHODS,
    "data_on_device": ("auto", "true", "false"),
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
    "data_on_device_fraction": (lambda v: 0 < v <= 1, "in (0, 1] (of one device's memory)"),
    "augment.stain_jitter": (lambda v: v >= 0, ">= 0 (0: off)"),
    "augment.brightness": (lambda v: v >= 0, ">= 0 (0: off)"),
    "augment.contrast": (lambda v: v >= 0, ">= 0 (0: off)"),
    "simulated.num_images": (
        lambda v: v >= 18,
        ">= 18 (70% go to train, which must hold all 12 stages)",
    ),
    "simulated.image_size": (lambda v: v >= 16, ">= 16"),
    "simulated.seed": (lambda v: v >= 0, ">= 0"),
    "mpp": (lambda v: v == 0 or 0.05 <= v <= 20, "0 (the simulated data's) or 0.05-20 um/px"),
}
_INTEGER_FIELDS = {
    "num_classes",
    "eval_batch_size",
    "num_epochs",
    "crop_size",
    "crop_range",
    "seed",
    "log_every_steps",
    "checkpoint_every_steps",
    "num_workers",
    "global_batch_size",
    "simulated.num_images",
    "simulated.image_size",
    "simulated.seed",
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
    stages = _get(config, "num_classes")
    stages = 12 if stages is _MISSING else stages
    value = _get(config, "global_batch_size")
    if value is not _MISSING:
        if _number("global_batch_size", value) < stages:
            raise _fail("global_batch_size", value, f">= {stages} ({BATCH_WHY})")
        if value % num_devices:
            raise _fail("global_batch_size", value, f"a multiple of the {num_devices} devices")
    eval_batch = _get(config, "eval_batch_size")
    if eval_batch is not _MISSING and eval_batch % num_devices:
        raise _fail("eval_batch_size", eval_batch, f"a multiple of the {num_devices} devices")


def _check_simulated_sizes(config: ml_collections.ConfigDict) -> None:
    """With no data_dir the crop is cut from the simulated images."""
    size, crop = _get(config, "simulated.image_size"), _get(config, "crop_size")
    if _MISSING not in (size, crop) and not _get(config, "data_dir") and size < crop:
        raise _fail(
            "simulated.image_size",
            size,
            f">= config.crop_size ({crop}): with no data_dir the crop is cut from "
            "the simulated images",
        )


def check_init_from(config: ml_collections.ConfigDict) -> None:
    """``init_from``'s model must be the config's architecture, classes and input."""
    directory = _get(config, "init_from")
    if directory in (_MISSING, None, ""):
        return
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"config.init_from: {directory}: no such model directory (make one "
            "with python -m stagejax.convert)"
        )
    meta = saved.read_model_json(path)
    arch, classes, channels = meta["arch"], meta["num_classes"], meta["in_channels"]
    want_arch = _get(config, "model")
    want_classes = _get(config, "num_classes")
    gray = _get(config, "grayscale")
    there = f"config.init_from: {directory} holds a {arch} with {classes} classes"
    if want_arch is not _MISSING and arch != want_arch:
        raise ConfigError(
            f"{there}, but config.model is {want_arch!r}; pass --config.model={arch}, or import "
            f"{want_arch} weights with python -m stagejax.convert --arch {want_arch}"
        )
    if want_classes is not _MISSING and classes != want_classes:
        raise ConfigError(
            f"{there}, but config.num_classes is {want_classes}; re-import the weights with a "
            f"fresh {want_classes}-class head: python -m stagejax.convert --from FILE "
            f"--arch {arch} --new_head --num_classes {want_classes} --out NEW_DIR"
        )
    want_channels = 3 if gray in (_MISSING, False) else 1
    if channels != want_channels:
        raise ConfigError(
            f"{there} and {channels} input channel(s), but config.grayscale is {bool(gray)} "
            f"({want_channels} channel(s)); pass --config.grayscale={channels == 1}"
        )


def _check_stain_reference(config: ml_collections.ConfigDict) -> None:
    method, reference = _get(config, "stain.normalize"), _get(config, "stain.reference")
    if method in stain.STATS_SIZE and reference not in (_MISSING, ""):
        try:
            stain.parse_reference(str(reference), method)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def validate(
    config: ml_collections.ConfigDict, num_devices: int | None = None, sizes: bool = True
) -> None:
    """Raise ``ConfigError`` (one line naming the field) for the first bad value.

    ``config``: the config that runs (``resolve``). ``num_devices``: default
    ``jax.device_count()``. ``sizes=False``: skip the crop-vs-image check (eval,
    predict and section on a trained workdir use that run's own sizes).
    """
    num_devices = jax.device_count() if num_devices is None else num_devices
    _check_choices(config)
    _check_ranges(config)
    _check_batch(config, num_devices)
    _check_stain_reference(config)
    if sizes:
        _check_simulated_sizes(config)
    check_init_from(config)


# -- completing and checking the --config flag ------------------------------------------------

_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


def _split_spec(spec: str) -> tuple[str, str]:
    """``configs/resnet.py:demo`` -> (path, variant); no colon: variant ``""``."""
    path, _, variant = spec.partition(":")
    return path, variant


@functools.cache
def _module(path: str) -> types.ModuleType:
    """The config file at ``path``, loaded once (as ``config_flags`` loads it)."""
    spec = importlib.util.spec_from_file_location(f"stagejax_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(path: str, variant: str) -> ml_collections.ConfigDict:
    """``get_config(variant)`` of the file at ``path`` (``get_config()`` for ``""``)."""
    return _module(path).get_config(*([variant] if variant else []))


def _takes_variant(path: str) -> bool:
    """Whether the config file's ``get_config`` takes a variant (the shipped ones do)."""
    return bool(inspect.signature(_module(path).get_config).parameters)


def _takes_variant_or_fails(path: str) -> bool:
    """`_takes_variant`, False for a file that cannot be loaded (`check_overrides` then
    reports it in one line)."""
    try:
        return _takes_variant(path)
    except Exception:  # the file's own error; reported by _load_checked
        return False


def default_variant(data_dir: str, mode: str) -> str:
    """The variant when the command line names none: the simulated demo's sizes
    for a run that reads the simulated dataset, the study's recipe otherwise."""
    return "demo" if not data_dir and mode in ("train", "eval") else "study"


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    """The last value of ``--name=V`` or ``--name V`` in ``argv`` (absl's last wins)."""
    value = None
    for i, arg in enumerate(argv):
        key, eq, rest = arg.lstrip("-").partition("=")
        if not arg.startswith("-") or key != name:
            continue
        if eq:
            value = rest
        elif i + 1 < len(argv):
            value = argv[i + 1]
    return value


def complete_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--config`` naming exactly the recipe that runs.

    On a trained workdir (``W/config.json``), eval, predict and section run the
    recipe recorded there: ``--config`` becomes ``stagejax/recipe.py:W/config.json``
    (a ``--config`` given too only lends its name; the recipe is the run's own).
    Otherwise a config file named without a variant gets `default_variant`'s.
    """
    argv = [a for a in argv]
    mode = _flag_value(argv, "mode") or "train"
    workdir = _flag_value(argv, "workdir")
    spec = _flag_value(argv, "config")
    record = Path(workdir).expanduser().absolute() / recipe.RECORD if workdir else None
    if mode != "train" and record is not None and record.is_file():
        spec = f"{Path(recipe.__file__).absolute()}:{record}"
    elif spec is None or ":" in spec or not Path(spec).expanduser().is_file():
        return argv  # absl or check_overrides says what is wrong
    elif _takes_variant_or_fails(str(Path(spec).expanduser())):
        spec += ":" + default_variant(_flag_value(argv, "config.data_dir") or "", mode)
    argv = [a for i, a in enumerate(argv) if not _is_config_flag(argv, i)]
    return [argv[0], f"--config={spec}", *argv[1:]]


def _is_config_flag(argv: Sequence[str], i: int) -> bool:
    """Whether ``argv[i]`` is ``--config=V``, ``--config``, or the value after it."""
    bare = ("--config", "-config")
    if argv[i] in bare or argv[i].startswith(("--config=", "-config=")):
        return True
    return i > 0 and argv[i - 1] in bare


def check_overrides(argv: Sequence[str]) -> None:
    """``ConfigError`` for a ``--config.FIELD`` the config file does not have.

    Checked against the file's fields before absl parses the command line, so
    the message names the flag instead of a library's exception text.
    """
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return  # absl reports a missing --config
    path, variant = _split_spec(spec)
    config = _load_checked(path, variant)
    for arg in argv:
        if match := _OVERRIDE.match(arg):
            _check_field(config, match.group(1), arg.split("=", 1)[0])


def _load_checked(path: str, variant: str) -> ml_collections.ConfigDict:
    """`_load`, with a missing or broken config file as one line naming it (absl
    would print two tracebacks)."""
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"--config: {path}: no such config file (e.g. configs/resnet.py)")
    try:
        return _load(str(Path(path).expanduser()), variant)
    except ConfigError:
        raise
    except Exception as e:  # the file's own error: syntax, import, a failing get_config
        raise ConfigError(
            f"--config: {path}: cannot be loaded: {type(e).__name__}: {first_line(e)}"
        ) from None


# Fields that left the recipe for flags of the mode that uses them.
RETIRED = {
    "predict_dir": "--images",
    "section_path": "--slides",
    "tta": "--tta",
    "strict": "--strict",
    "overwrite": "--overwrite",
    "section.slide_mpp": "--slide_mpp",
    "section.detector": "--detector",
    "section.review_below": "--review_below",
    "section.seed": "--section_seed",
    "section.size_mm": "--section_size_mm",
}


def _check_field(config: ml_collections.ConfigDict, field: str, flag: str) -> None:
    if field in RETIRED:
        raise ConfigError(
            f"{flag}: no longer a config field (the recipe holds training only); "
            f"pass {RETIRED[field]} instead"
        )
    node: Any = config
    for part in field.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{flag}: no such config field{hint}")
        node = node[part]
