"""Import PyTorch weights (torchvision's or the study's) into a stagejax model directory.

``convert_file`` does it; ``python -m stagejax.convert`` is its command line
(`stagejax.convert.__main__`).

Why by name: the stagejax modules keep torchvision's attribute names, so each
PyTorch key has exactly one place to go and anything that does not fit (wrong
architecture, a truncated file, another class count) is reported key by key
instead of silently producing a different network. The study's own ResNet-50
only renames torchvision's ``downsample`` to ``identity_downsample``.

Why the pickle guard: the study saves whole modules with ``torch.save(model)``;
unpickling such a file runs arbitrary code, so it is refused unless the user
says they trust it (``--trust_pickle``). Classes that cannot be imported here
(the study's own ResNet class) are replaced by plain ``torch.nn.Module``
stand-ins, which is enough to read the weights back out.

Torch is imported only to read a file (`stagejax.convert.torch_file`): it is an
optional dependency (``pip install stagejax[baseline]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from stagejax import models
from stagejax.convert.torch_file import load_torch_state_dict
from stagejax.errors import ConfigError, ConversionError
from stagejax.model.saved import save_model_weights
from stagejax.runtime import files

# stagejax variable name -> torch parameter/buffer name
_LEAF_NAMES = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
# stagejax module name -> torch module name (see layers.ConvBN and mobilenet.MobileNetV3)
_MODULE_NAMES = {"conv": "0", "bn": "1", "hidden": "classifier.0", "head": "classifier.3"}
# torch names that carry no weights stagejax needs
_IGNORED_SUFFIXES = (".num_batches_tracked",)
# the study's ResNet-50 naming -> torchvision's
_STUDY_RENAMES = (("identity_downsample.", "downsample."),)
_FIRST_CONV = ("conv1.weight", "features.0.0.weight")
_LAST_LINEAR = ("fc.weight", "classifier.3.weight")
_MAX_LISTED = 10


def torch_name(path: tuple[Any, ...]) -> str:
    """The torch state_dict key of the stagejax variable at ``path`` (from ``nnx.state``)."""
    modules = [_MODULE_NAMES.get(str(p), str(p)) for p in path[:-1]]
    return ".".join([*modules, _LEAF_NAMES[path[-1]]])


def to_torch_layout(value: np.ndarray) -> np.ndarray:
    """stagejax layout -> torch layout (HWIO conv -> OIHW, [in, out] linear -> [out, in])."""
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2:
        return value.T
    return value


def from_torch_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        return value.T
    return value


def normalize_names(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision names for a torchvision- or study-style state_dict.

    Drops the "module." prefix of (Distributed)DataParallel, renames the
    study's ``identity_downsample`` and drops ``num_batches_tracked`` counters.
    """
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    out = {}
    for key, value in state.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        for old, new in _STUDY_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def _infer(state: dict[str, np.ndarray], names: tuple[str, ...], axis: int) -> int | None:
    for name in names:
        if name in state and state[name].ndim > axis:
            return int(state[name].shape[axis])
    return None


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


# torch's registration order of the names that occur among siblings (torchvision's
# ResNet and MobileNetV3); used to list keys in state_dict order.
_TORCH_ORDER = (
    "conv1",
    "bn1",
    "conv2",
    "bn2",
    "conv3",
    "bn3",
    "layer1",
    "layer2",
    "layer3",
    "layer4",
    "downsample",
    "features",
    "block",
    "fc1",
    "fc2",
    "fc",
    "classifier",
    "weight",
    "bias",
    "running_mean",
    "running_var",
)


def _torch_order(name: str) -> list[tuple[int, int]]:
    return [(0, int(p)) if p.isdigit() else (1, _TORCH_ORDER.index(p)) for p in name.split(".")]


def torch_names(model: nnx.Module) -> list[str]:
    """The torch state_dict keys (without counters) of ``model``'s weights, in torch's order."""
    return list(_expected(model))


def _expected(model: nnx.Module) -> dict[str, tuple[nnx.Variable, tuple[int, ...]]]:
    """torch name -> (stagejax variable, torch-layout shape) for every weight of ``model``."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        shape = to_torch_layout(np.empty(var.shape, dtype=np.uint8)).shape
        out[torch_name(path)] = (var, shape)
    return {k: out[k] for k in sorted(out, key=_torch_order)}


def _mismatches(
    expected: dict[str, tuple[nnx.Variable, tuple[int, ...]]], state: dict[str, np.ndarray]
) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {expected[k][1]}"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != expected[k][1]
    ]
    return missing, unexpected, shapes


def _guess_arch(state: dict[str, np.ndarray], num_classes: int, in_channels: int) -> str | None:
    """The architecture whose names and shapes the file matches exactly, if any."""
    for name in models.NAMES:
        candidate = models.create_uninitialized(name, num_classes, in_channels)
        if not any(_mismatches(_expected(candidate), state)):
            return name
    return None


def convert_state_dict(
    state: dict[str, np.ndarray],
    arch: str,
    num_classes: int | None = None,
    new_head: bool = False,
) -> nnx.Module:
    """A stagejax ``arch`` model (eval mode) holding the torch weights ``state``.

    ``state``: torch names -> arrays in torch layout (as ``load_torch_state_dict`` returns).
    ``new_head``: drop the file's final classifier layer (e.g. ImageNet's 1000
    classes) and start a ``num_classes`` (default 12) one from torchvision's
    initialisation: fine-tuning from pretrained weights.
    """
    state = normalize_names(state)
    if arch not in models.NAMES:
        raise ConversionError(f"--arch {arch!r}: unknown; choose one of {', '.join(models.NAMES)}")
    heads = tuple(k.rsplit(".", 1)[0] + "." for k in _LAST_LINEAR)
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith(heads)}
        num_classes = num_classes or 12
    elif num_classes is None:
        num_classes = _infer(state, _LAST_LINEAR, 0) or 12
    in_channels = _infer(state, _FIRST_CONV, 1) or 3
    build = models.create if new_head else models.create_uninitialized
    model = build(arch, num_classes=num_classes, in_channels=in_channels)
    expected = _expected(model)
    if new_head:
        expected = {k: v for k, v in expected.items() if not k.startswith(heads)}
    missing, unexpected, shapes = _mismatches(expected, state)
    if shapes and not (missing or unexpected) and all(m.startswith(heads) for m in shapes):
        raise ConversionError(_head_message(arch, state, num_classes, shapes))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listing(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {_listing(shapes)}")
        if missing or unexpected:
            guess = _guess_arch(state, num_classes, in_channels)
            if guess is not None and guess != arch:
                parts.append(f"the file matches --arch {guess}")
        raise ConversionError(f"{arch}: " + "; ".join(parts))

    for name, (var, _) in expected.items():
        var[...] = jnp.array(from_torch_layout(state[name]), dtype=var.dtype)  # a copy
    model.eval()
    return model


def _head_message(
    arch: str, state: dict[str, np.ndarray], num_classes: int, shapes: list[str]
) -> str:
    """Only the final classifier does not fit: say how to replace or keep it."""
    found = _infer(state, _LAST_LINEAR, 0)
    return (
        f"{arch}: the file's final classifier has {found} outputs, not --num_classes "
        f"{num_classes} ({shapes[0]}); pass --new_head to replace it with a freshly "
        f"initialised {num_classes}-class layer (to fine-tune, e.g. from ImageNet weights), "
        f"or --num_classes {found} to keep it"
    )


def convert_file(
    src: str | Path,
    arch: str,
    out: str | Path,
    num_classes: int | None = None,
    trust_pickle: bool = False,
    new_head: bool = False,
) -> Path:
    """Read torch weights from ``src`` and write a stagejax model directory at ``out``
    (new or empty: checked before anything is read; it appears only once complete)."""
    out = Path(out).expanduser().absolute()
    files.check_output_dir(out, "--out")
    state = load_torch_state_dict(src, trust_pickle=trust_pickle)
    model = convert_state_dict(state, arch, num_classes, new_head)

    def fill(tmp: Path) -> None:
        save_model_weights(
            tmp, model, arch, num_classes=model.num_classes, in_channels=model.in_channels
        )

    if not files.new_dir(out, fill, "the model"):
        raise ConfigError(f"--out: {out} was filled by someone else; nothing written")
    return out
