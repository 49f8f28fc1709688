"""Explanations of a trained stage classifier.

``gradcam``: where in the tubule the evidence for a stage lies (Grad-CAM on
the last convolutional stage).  ``cycle``: whether the penultimate features
arrange the stages along the biological cycle I..XII -> I (PCA, t-SNE and a
permutation-calibrated cyclic-order score).
"""

from stagejax.explain.cycle import cycle_score
from stagejax.explain.gradcam import gradcam, gradcam_and_logits, overlay

__all__ = ["cycle_score", "gradcam", "gradcam_and_logits", "overlay"]
