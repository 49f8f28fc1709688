"""The run directory: checked before any long work, so a run never overwrites
results it did not make.

A workdir is either empty/new, or holds a ``config.json`` written by an
earlier stagejax run. Re-running in it resumes that run; fields that change
what is trained (model, data, optimizer, ...) must then be the same, while
fields that only change how long or how it is logged may differ. That
config.json is read the one way every mode reads it (`stagejax.recipe.recorded`):
a field added to the recipe since counts as its default there, a field the
recipe no longer has is dropped.

While a run works in its workdir it holds it with ``lock.claim``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import ml_collections

from stagejax import recipe
from stagejax.errors import WorkdirError
from stagejax.runtime.files import atomic_write_text
from stagejax.runtime.lock import CONFIG_FILE, LOCK_FILE, Claim, claim

__all__ = [
    "CONFIG_FILE",
    "Claim",
    "claim",
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
    "cache_dir",
    "init_from",
    "device_memory_gb",
    "data_on_device",  # the same batches either way (data/on_device.py)
    "data_on_device_fraction",
    "variant",
}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """Fields (flat, ``a.b``) in which a run's ``old`` config (as `load_run_config`
    reads it) and the ``new`` config differ in what a step does."""
    old, new = _flatten(old), _flatten(new)
    missing = object()
    return sorted(
        k
        for k, value in new.items()
        if k.split(".")[0] not in RESUMABLE_FIELDS and old.get(k, missing) != value
    )


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
) -> Path:
    """Create/check ``workdir`` for ``config``; raises ``WorkdirError`` in one line."""
    path = Path(workdir).expanduser().absolute()
    cfg_path = path / CONFIG_FILE
    if must_exist and not cfg_path.is_file():
        raise WorkdirError(f"{cfg_path}: missing; is {path} the workdir of a training run?")
    _check_writable(path)
    if cfg_path.is_file() and not must_exist:
        _adopt_stain_reference(config, cfg_path)
        _check_same_run(path, json.loads(config.to_json()))
    elif (
        not cfg_path.is_file()
        and not must_exist
        and any(
            p.name not in _SCRATCH and not p.name.startswith((".write_test", ".shard-"))
            for p in path.iterdir()
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
    stain = config.stain
    if stain.normalize == "none" or stain.reference:
        return
    try:
        old = json.loads(cfg_path.read_text()).get("stain") or {}
    except json.JSONDecodeError:
        return  # _check_same_run says so
    if old.get("normalize") == stain.normalize and old.get("reference"):
        stain.reference = old["reference"]


def _check_same_run(path: Path, new: dict) -> None:
    old = json.loads(load_run_config(path).to_json())
    if diff := config_differences(old, new):
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


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The recipe a training run in ``workdir`` used, filled in (`recipe.recorded`)."""
    return recipe.recorded(Path(workdir).expanduser().absolute() / CONFIG_FILE)
