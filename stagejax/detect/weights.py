"""The learned detector's weights file (.npz): parameters plus what is needed to use them.

One file holds the U-Net's parameters (float32 arrays named by their path in
the model, e.g. ``down/0/a/kernel``) and, under ``__meta__``, a JSON record:
the file format, the channels per level, the resolution it learnt
(`work_mpp`), the post-processing thresholds and how it was trained. A JSON
copy of that record is written beside it (``unet.json`` for ``unet.npz``) for
people to read. Files are written atomically; a bad file is one line naming it.

The shipped weights (`SHIPPED`) were made by the command in their record, also
in stagejax/detect/__init__.py and the README.
"""

import io
import json
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from stagejax.detect import unet
from stagejax.detect.learned import Postprocess, UNetDetector
from stagejax.detect.unet import UNet
from stagejax.errors import ConfigError
from stagejax.runtime.files import atomic_write_bytes, atomic_write_text

WEIGHTS_FORMAT = "stagejax.detect unet"
META_KEY = "__meta__"
SHIPPED_NAME = "unet.npz"


def shipped_path() -> Path:
    """The weights that come with the package (stagejax/detect/weights/unet.npz)."""
    return Path(str(resources.files("stagejax.detect").joinpath("weights", SHIPPED_NAME)))


def _flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "/"))
        else:
            out[name] = np.asarray(value, np.float32)
    return out


def _nest(flat: dict[str, np.ndarray], template: dict, path: str, prefix: str = "") -> dict:
    out = {}
    for key, value in template.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out[key] = _nest(flat, value, path, name + "/")
            continue
        if name not in flat or flat[name].shape != np.shape(value):
            got = flat[name].shape if name in flat else "missing"
            raise ConfigError(
                f"--weights: {path}: parameter {name} is {got}, not {np.shape(value)}"
            )
        out[key] = flat[name]
    return out


def save_weights(path: str | Path, model: UNet, meta: dict[str, Any]) -> Path:
    """Writes the weights file and its JSON record, each atomically; returns the .npz path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": WEIGHTS_FORMAT, "version": 1, "channels": list(model.channels), **meta}
    arrays = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays, **{META_KEY: np.array(json.dumps(meta))})
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
    return path


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise ConfigError(f"--weights: {path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ConfigError(f"--weights: {path}: not a U-Net weights file ({e})") from None
    try:
        meta = json.loads(str(arrays.pop(META_KEY)))
    except (KeyError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != WEIGHTS_FORMAT:
        raise ConfigError(f"--weights: {path}: not a U-Net weights file ({WEIGHTS_FORMAT!r})")
    return arrays, meta


def load_weights(path: str | Path | None = None) -> UNetDetector:
    """The detector of a weights file (default: the shipped weights)."""
    path = Path(path) if path is not None else shipped_path()
    if path.is_dir():  # the folder `train --out DIR` wrote
        path = path / SHIPPED_NAME
    if not path.is_file() and path == shipped_path():
        raise ConfigError(
            f"--weights: {path}: the shipped U-Net weights are missing; remake them with "
            "`python -m stagejax.detect train --method=unet --simulated_seeds=0-15` "
            "(see stagejax/detect/__init__.py) or use --method=classical"
        )
    arrays, meta = _read(path)
    try:
        channels = tuple(int(c) for c in meta["channels"])
        work_mpp = float(meta["work_mpp"])
        post = Postprocess.from_dict(meta.get("postprocess", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"--weights: {path}: bad record ({e!r})") from None
    graphdef, state = nnx.split(unet.abstract(channels))
    pure = _nest(arrays, nnx.to_pure_dict(state), str(path))
    extra = sorted(set(arrays) - set(_flat(pure)))
    if extra:
        raise ConfigError(f"--weights: {path}: unknown parameters {extra[:3]}")
    nnx.replace_by_pure_dict(state, pure)
    return UNetDetector(nnx.merge(graphdef, state), work_mpp, post, str(path), meta)
