"""The run directory: checked before any long work, so a run never overwrites
results it did not make.

A workdir is either empty/new, or holds a ``config.json`` written by an
earlier stagejax run. Re-running in it resumes that run; fields that change
what is trained (model, data, optimizer, ...) must then be the same, while
fields that only change how long or how it is logged may differ.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import ml_collections

from stagejax.errors import WorkdirError

CONFIG_FILE = "config.json"

# Fields that may change when resuming a run (they do not change what a step does).
RESUMABLE_FIELDS = {
    "num_epochs", "log_every_steps", "checkpoint_every_steps", "num_workers",
    "eval_batch_size", "eval_split", "predict_dir", "tta", "cache_dir", "init_from",
}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def prepare_workdir(workdir: str | Path, config: ml_collections.ConfigDict,
                    write: bool = True, must_exist: bool = False) -> Path:
    """Create/check ``workdir`` for ``config``; raises ``WorkdirError`` in one line."""
    path = Path(workdir).expanduser().absolute()
    cfg_path = path / CONFIG_FILE
    if must_exist and not cfg_path.is_file():
        raise WorkdirError(f"{cfg_path}: missing; is {path} the workdir of a training run?")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
            pass
    except OSError as e:
        raise WorkdirError(f"{path}: workdir is not writable ({e.strerror or e})") from None

    new = json.loads(config.to_json())
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text())
        except json.JSONDecodeError:
            raise WorkdirError(f"{cfg_path}: unreadable; choose another --workdir") from None
        a, b = _flatten(old), _flatten(new)
        diff = sorted(k for k in a.keys() | b.keys()
                      if k.split(".")[0] not in RESUMABLE_FIELDS and a.get(k) != b.get(k))
        if diff and not must_exist:
            k = diff[0]
            raise WorkdirError(
                f"{path}: holds a run with a different config ({k}: {a.get(k)!r} there, "
                f"{b.get(k)!r} now{' and more' if len(diff) > 1 else ''}); "
                "choose another --workdir"
            )
    elif any(p.name != ".write_test" for p in path.iterdir()) and not must_exist:
        raise WorkdirError(
            f"{path}: not empty and not a stagejax workdir (no {CONFIG_FILE}); "
            "choose an empty or new --workdir"
        )
    if write and not must_exist:
        write_config(path, config)
    return path


def write_config(workdir: str | Path, config: ml_collections.ConfigDict) -> None:
    """Record ``config`` as the run's config (``prepare_workdir`` checks it on resume)."""
    text = json.dumps(json.loads(config.to_json()), indent=2, sort_keys=True) + "\n"
    atomic_write_text(Path(workdir) / CONFIG_FILE, text)


# Fields that --mode=eval/predict take from the command line; the rest (model, crop,
# precision of the weights' training...) come from the run's config.json.
EVAL_FIELDS = ("eval_batch_size", "eval_split", "predict_dir", "tta", "cache_dir",
               "num_workers", "parallelism")


def eval_config(workdir: str | Path,
                cli_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config to evaluate or predict with a trained ``workdir``: the run's own,
    so the crop and model match training, with ``EVAL_FIELDS`` (and a non-empty
    ``data_dir``, to evaluate on another dataset) from the command line."""
    config = load_run_config(workdir)
    for k in EVAL_FIELDS:
        config[k] = cli_config[k]
    if cli_config.data_dir:
        config.data_dir = cli_config.data_dir
    return config


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a training run in ``workdir`` used."""
    path = Path(workdir).expanduser().absolute() / CONFIG_FILE
    if not path.is_file():
        raise WorkdirError(f"{path}: missing; is {path.parent} the workdir of a training run?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
