"""Tubule detection on whole H-PAS sections: a learned U-Net (default) and a classical detector.

Learned (`unet`, `learned`, `train_unet`, `weights`): a small Flax NNX U-Net
(4 levels, 16-32-64-128 channels, 0.48 M parameters) on the section at about
2.5 um/px predicts per pixel tubule foreground and the normalised distance to
the tubule's border; cores of that distance (split further where a faint seam
leaves two tubules one core) seed a watershed that splits touching tubules.
Inference runs in fixed-size overlapping tiles through one
`jax.jit`-compiled function (the accelerator when JAX has one, else the CPU).
The weights shipped in stagejax/detect/weights/unet.npz were trained on
SIMULATED sections only: packed sections drawn the way real ones look
(`stagejax.simulate.packed`: rounded touching tubules, faint seams, lengthwise
bands, H&E or PAS, coarse JPEG scans) and stage-simulator sections, in five runs of
`python -m stagejax.detect train --method=unet` (the command line, each run's
record and held-out scores are in stagejax/detect/weights/unet.json). They are
fine-tuned on a lab's QuPath annotations by `python -m stagejax.detect train
--method=unet --slides ... --annotations ... --out DIR`. On held-out simulated
sections they measured F1 0.992 and 0.994 (usual and held-out staining), on a
real H&E section (never trained on) F1 0.877 (benchmarks/RESULTS.md), against
the classical detector's 0.90-0.92 and 0.15, so the U-Net is the default.

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
