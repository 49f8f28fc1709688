"""Datasets on disk: the study's folder layout, its TFDS/ArrayRecord cache
(``prepared``), stage-balanced sampling, augmentation, stain normalisation and
the Grain loader.

Nothing is imported here, so the light modules (``augment``, ``stain``) load
without TFDS; which dataset a config uses (its folder, or the simulated one) is
chosen above this package, in `stagejax.datasets`.
"""
