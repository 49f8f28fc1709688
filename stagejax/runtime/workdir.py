"""The run directory: checked before any long work, so a run never overwrites
results it did not make.

A workdir is either empty/new, or holds a ``config.json`` written by an
earlier stagejax run. Re-running in it resumes that run; fields that change
what is trained (model, data, optimizer, ...) must then be the same, while
fields that only change how long or how it is logged may differ. A field
added to the configs after that run (absent from its config.json) counts as
the current config's default there; a field the current configs no longer
have is not read by this code and is not compared.

While a run works in its workdir it holds it with ``lock.claim``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import ml_collections

from stagejax.errors import WorkdirError
from stagejax.runtime.files import atomic_write_text
from stagejax.runtime.lock import CONFIG_FILE, LOCK_FILE, Claim, claim

__all__ = [
    "CONFIG_FILE",
    "Claim",
    "claim",
    "eval_config",
    "load_run_config",
    "prepare_workdir",
    "write_config",
]

_SCRATCH = {".write_test", LOCK_FILE}  # ours, never a sign of someone else's files

# Fields that may change when resuming a run (they do not change what a step does).
RESUMABLE_FIELDS = {
    "num_epochs",
    "log_every_steps",
    "checkpoint_every_steps",
    "num_workers",
    "eval_batch_size",
    "eval_split",
    "predict_dir",
    "tta",
    "cache_dir",
    "init_from",
    "strict",
    "overwrite",
    "device_memory_gb",
    "data_on_device",  # the same batches either way (data/on_device.py)
    "data_on_device_fraction",
    "variant",
}

# Fields that --mode=eval/predict take from the command line; the rest (model, crop,
# precision of the weights' training...) come from the run's config.json.
EVAL_FIELDS = (
    "eval_batch_size",
    "eval_split",
    "predict_dir",
    "tta",
    "cache_dir",
    "num_workers",
    "parallelism",
    "strict",
    "overwrite",
    "mpp",
    "section_path",
    "section",
)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict, new: dict, defaults: dict | None = None) -> list[str]:
    """Fields (flat, ``a.b``) in which a run's ``old`` config.json and the ``new``
    config differ in what a step does; ``defaults``: the current config before
    command-line overrides, standing in for fields ``old`` lacks (default ``new``)."""
    old, new = _flatten(old), _flatten(new)
    defaults = new if defaults is None else _flatten(defaults)
    missing = object()
    diff = []
    for k, value in new.items():
        if k.split(".")[0] in RESUMABLE_FIELDS:
            continue
        there = old.get(k, defaults.get(k, missing))
        if there != value:
            diff.append(k)
    return sorted(diff)


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
            pass
    except OSError as e:
        raise WorkdirError(f"{path}: workdir is not writable ({e.strerror or e})") from None


def prepare_workdir(
    workdir: str | Path,
    config: ml_collections.ConfigDict,
    write: bool = True,
    must_exist: bool = False,
    defaults: ml_collections.ConfigDict | None = None,
) -> Path:
    """Create/check ``workdir`` for ``config``; raises ``WorkdirError`` in one line.

    ``defaults``: the config file's values without the command line's overrides
    (see ``config_differences``).
    """
    path = Path(workdir).expanduser().absolute()
    cfg_path = path / CONFIG_FILE
    if must_exist and not cfg_path.is_file():
        raise WorkdirError(f"{cfg_path}: missing; is {path} the workdir of a training run?")
    _check_writable(path)
    if cfg_path.is_file() and not must_exist:
        _adopt_stain_reference(config, cfg_path)
        _check_same_run(
            path,
            json.loads(config.to_json()),
            None if defaults is None else json.loads(defaults.to_json()),
        )
    elif (
        not cfg_path.is_file()
        and not must_exist
        and any(
            p.name not in _SCRATCH and not p.name.startswith(".write_test") for p in path.iterdir()
        )
    ):
        raise WorkdirError(
            f"{path}: not empty and not a stagejax workdir (no {CONFIG_FILE}); "
            "choose an empty or new --workdir"
        )
    if write and not must_exist:
        write_config(path, config)
    return path


def _adopt_stain_reference(config: ml_collections.ConfigDict, cfg_path: Path) -> None:
    """A resumed run keeps the stain reference its first part estimated (an empty
    ``stain.reference`` means "estimate it", which that part did)."""
    stain = config.get("stain")
    if stain is None or stain.normalize == "none" or stain.reference:
        return
    try:
        old = json.loads(cfg_path.read_text()).get("stain") or {}
    except json.JSONDecodeError:
        return  # _check_same_run says so
    if old.get("normalize") == stain.normalize and old.get("reference"):
        stain.reference = old["reference"]


def _check_same_run(path: Path, new: dict, defaults: dict | None) -> None:
    cfg_path = path / CONFIG_FILE
    try:
        old = json.loads(cfg_path.read_text())
    except json.JSONDecodeError:
        raise WorkdirError(f"{cfg_path}: unreadable; choose another --workdir") from None
    if diff := config_differences(old, new, defaults):
        k = diff[0]
        flat_old, flat_new = _flatten(old), _flatten(new)
        there = flat_old.get(k, "(absent)")
        raise WorkdirError(
            f"{path}: holds a run with a different config ({k}: {there!r} there, "
            f"{flat_new.get(k)!r} now{' and more' if len(diff) > 1 else ''}); "
            "choose another --workdir"
        )


def write_config(workdir: str | Path, config: ml_collections.ConfigDict) -> None:
    """Record ``config`` as the run's config (``prepare_workdir`` checks it on resume)."""
    text = json.dumps(json.loads(config.to_json()), indent=2, sort_keys=True) + "\n"
    atomic_write_text(Path(workdir) / CONFIG_FILE, text)


def eval_config(
    workdir: str | Path, cli_config: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """The config to evaluate or predict with a trained ``workdir``: the run's own,
    so the crop and model match training, with ``EVAL_FIELDS`` (and a non-empty
    ``data_dir``, to evaluate on another dataset, or ``init_from``) from the command line. Fields
    the run's config.json lacks (added to the configs later) come from
    ``cli_config`` too."""
    config = load_run_config(workdir)
    _fill_missing(config, cli_config)
    for k in EVAL_FIELDS:
        config[k] = cli_config[k]
    if cli_config.data_dir:
        config.data_dir = cli_config.data_dir
    if cli_config.get("init_from"):  # a workdir without a trained model: other weights
        config.init_from = cli_config.init_from
    return config


def _fill_missing(config: ml_collections.ConfigDict, source: Any) -> None:
    for k, v in source.items():
        if k not in config:
            config[k] = v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v
        elif isinstance(v, ml_collections.ConfigDict) and isinstance(
            config[k], ml_collections.ConfigDict
        ):
            _fill_missing(config[k], v)


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a training run in ``workdir`` used."""
    path = Path(workdir).expanduser().absolute() / CONFIG_FILE
    if not path.is_file():
        raise WorkdirError(f"{path}: missing; is {path.parent} the workdir of a training run?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))
