"""Tubule detection on whole H-PAS sections: a classical detector with fittable parameters.

Colour deconvolution, thresholds, morphology and a distance-transform watershed
at a coarse resolution (numpy/scipy/scikit-image on the CPU); its parameters
have defaults in micrometres and can be fitted to a lab's annotated sections
(`python -m stagejax.detect train`). It is not a neural network; a learned
(U-Net) detector is not built yet.
"""

from stagejax.detect.metrics import evaluate, match, pooled
from stagejax.detect.params import DetectParams, load_params, save_params
from stagejax.detect.pipeline import Detection, detect_slide, overlay, write_outputs

__all__ = [
    "DetectParams",
    "Detection",
    "detect_slide",
    "evaluate",
    "load_params",
    "match",
    "overlay",
    "pooled",
    "save_params",
    "write_outputs",
]
