"""Tubule detection on whole H-PAS sections: a learned U-Net (default) and a classical detector.

Learned (`unet`, `learned`, `train_unet`, `weights`): a small Flax NNX U-Net
(4 levels, 16-32-64-128 channels, 0.48 M parameters) on the section at about
2.5 um/px predicts per pixel tubule foreground and the normalised distance to
the tubule's border; cores of that distance seed a watershed that splits
touching tubules. Inference runs in fixed-size overlapping tiles through one
`jax.jit`-compiled function (the accelerator when JAX has one, else the CPU).
The weights shipped in stagejax/detect/weights/unet.npz were trained on
SIMULATED sections only (seeds 0-15, stainings -0.5..0.5, never the held-out
seeds 100-102 or the held-out staining 1.0); they are remade by

    python -m stagejax.detect train --method=unet --simulated_seeds=0-15 --init=none \\
        --steps=650 --learning_rate=2e-3 --out=stagejax/detect/weights/unet.npz

(530 s of training on a 2-core CPU, plus ~4.5 min rendering the 16 sections
once; the command as run, date and held-out scores are in
stagejax/detect/weights/unet.json) and fine-tuned on a lab's QuPath annotations
by `python -m stagejax.detect train --method=unet --slides ... --annotations ...
--out DIR`. On held-out simulated sections it measured F1 1.000 (usual
staining) and 0.998 (held-out staining) at IoU >= 0.5 against the classical
detector's 0.901 and 0.920 (benchmarks/RESULTS.md), so it is the default.

Classical (`segment`, `params`, `fit`): colour deconvolution, thresholds,
morphology and a distance-transform watershed (numpy/scipy/scikit-image), with
parameters in micrometres that `python -m stagejax.detect train
--method=classical` fits to annotated sections (a parameter search, no network).
"""

import importlib

from stagejax.detect.choose import make_detector
from stagejax.detect.metrics import evaluate, match, pooled
from stagejax.detect.params import DetectParams, load_params, save_params
from stagejax.detect.pipeline import Detection, detect_slide, overlay, write_outputs

# JAX and Flax load only when the U-Net is used: the classical detector and the
# command line's one-line errors stay quick.
_LAZY = {"UNetDetector": "learned", "load_weights": "weights", "save_weights": "weights"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"stagejax.detect.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'stagejax.detect' has no attribute {name!r}")


__all__ = [
    "DetectParams",
    "Detection",
    "UNetDetector",
    "detect_slide",
    "evaluate",
    "load_params",
    "load_weights",
    "make_detector",
    "match",
    "overlay",
    "pooled",
    "save_params",
    "save_weights",
    "write_outputs",
]
