"""Which detector a command uses: the learned U-Net (default) or the classical one.

The default is the one that measured best on the held-out simulated sections
(benchmarks/RESULTS.md, "Whole sections"): the U-Net with its shipped weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stagejax.detect.params import DetectParams, load_params
from stagejax.errors import ConfigError

if TYPE_CHECKING:
    from stagejax.detect.learned import UNetDetector

METHODS = ("unet", "classical")
DEFAULT_METHOD = "unet"


def make_detector(
    method: str | None = None, weights: str | None = None, params: str | None = None
) -> DetectParams | UNetDetector:
    """The detector of the command-line flags --method, --weights, --params.

    No --method: classical when --params is given, otherwise the U-Net (the
    shipped weights unless --weights names others)."""
    if not method:
        method = "classical" if params and not weights else DEFAULT_METHOD
    if method not in METHODS:
        raise ConfigError(f"--method: {method!r} is not one of {', '.join(METHODS)}")
    if method == "unet":
        if params:
            raise ConfigError("--params: is for --method=classical; the U-Net reads --weights")
        from stagejax.detect.weights import load_weights  # JAX/Flax only for the U-Net

        return load_weights(weights or None)
    if weights:
        raise ConfigError("--weights: is for --method=unet; the classical detector reads --params")
    return load_params(params) if params else DetectParams()


def from_config(value: str, field: str = "--detector") -> DetectParams | UNetDetector:
    """A config field's detector: "unet" (shipped weights), "classical" (its defaults),
    a PARAMS.json of the classical fit, or a U-Net weights file (.npz, or the folder
    `train --method=unet --out DIR` wrote)."""
    value = str(value or DEFAULT_METHOD).strip()
    if value in METHODS:
        return make_detector(value)
    path = Path(value).expanduser()
    if path.suffix.lower() == ".json":
        return make_detector("classical", params=str(path))
    if path.suffix.lower() == ".npz" or path.is_dir():
        return make_detector("unet", weights=str(path))
    raise ConfigError(
        f"{field}: {value!r} is not 'unet', 'classical', a PARAMS.json or a U-Net .npz file"
    )


def describe(detector) -> str:
    """What a record says about the detector used: 'classical' or 'unet <weights file>'."""
    if isinstance(detector, DetectParams):
        return "classical"
    return f"unet {detector.source}"
