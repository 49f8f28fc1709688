"""Reading a PyTorch checkpoint file into numpy arrays, safely.

Why the pickle guard: the study saves whole modules with ``torch.save(model)``;
unpickling such a file runs arbitrary code, so it is refused unless the user
says they trust it (``--trust_pickle``). Classes that cannot be imported here
(the study's own ResNet class) are replaced by plain ``torch.nn.Module``
stand-ins, which is enough to read the weights back out.

Torch is imported when a file is read, not with this module: it is an optional
dependency (``pip install stagejax[baseline]``).
"""

from __future__ import annotations

import importlib
import pickle
import types
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from stagejax.errors import ConversionError


def _import_torch() -> Any:
    try:
        return importlib.import_module("torch")
    except ImportError:
        raise ConversionError(
            "importing PyTorch weights needs torch: pip install 'stagejax[baseline]'"
        ) from None


def _lenient_pickle_module(torch: Any, stand_ins: list[str]) -> types.ModuleType:
    """A ``pickle`` look-alike whose unpickler replaces unimportable classes by empty Modules.

    An ``nn.Module`` pickles as its ``__dict__`` (``_parameters``, ``_buffers``,
    ``_modules``), which ``nn.Module.__setstate__`` restores on any subclass,
    so ``state_dict()`` works on the stand-in without the original source.
    """

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                stand_ins.append(f"{module}.{name}")
                return type(name, (torch.nn.Module,), {"__module__": module})

    mod = types.ModuleType("stagejax_lenient_pickle")
    mod.Unpickler = Unpickler
    mod.load = lambda f, **kw: Unpickler(f, **kw).load()
    return mod


def load_torch_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """Read a torch checkpoint into float32 numpy arrays keyed by the file's names.

    Accepts a state_dict, a dict holding one under 'state_dict' or 'model',
    and (only with ``trust_pickle``) a whole pickled module.
    """
    torch = _import_torch()
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    with path.open("rb") as f:  # torch.save writes a zip archive (or, before 1.6, a pickle)
        if not (zipfile.is_zipfile(f) or (f.seek(0) == 0 and f.read(1) == b"\x80")):
            raise ConversionError(f"{path}: not a readable torch file (neither zip nor pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ConversionError(f"{path}: not a readable torch file ({e})") from None
        if not trust_pickle:
            raise ConversionError(
                f"{path}: holds a pickled Python object (e.g. a whole torch module saved with "
                "torch.save(model)); unpickling it can execute arbitrary code, so it is refused. "
                "Pass --trust_pickle (trust_pickle=True) if you trust where the file came from"
            ) from None
        warnings.warn(
            f"{path}: unpickling with weights_only=False because --trust_pickle was given; "
            "this runs any code the file contains",
            stacklevel=2,
        )
        stand_ins: list[str] = []
        try:
            obj = torch.load(
                path,
                map_location="cpu",
                weights_only=False,
                pickle_module=_lenient_pickle_module(torch, stand_ins),
            )
        except Exception as e:
            raise ConversionError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from None
        if stand_ins:
            warnings.warn(
                f"{path}: classes not importable here were read as plain torch Modules: "
                + ", ".join(sorted(set(stand_ins))),
                stacklevel=2,
            )
    except Exception as e:
        raise ConversionError(f"{path}: not a readable torch file ({type(e).__name__})") from None

    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and not isinstance(obj[key], torch.Tensor):
                obj = obj[key]
                break
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(
            f"{path}: expected a state_dict (names -> tensors), found {type(obj).__name__}"
        )
    return {k: v.detach().cpu().to(torch.float32).numpy().copy() for k, v in obj.items()}
