"""SIMULATED H-PAS tubule images in the study's dataset layout (not real data).

Why: the study's 1,229 labelled images are private, so everything downstream (input
pipeline, training, evaluation, explanations) is developed and tested on a stand-in that
has the same layout and the same *kind* of difficulty: stage features that change
smoothly and cyclically (I -> XII -> I), so neighbouring stages are confusable, and
nuisance variation (staining per slide, illumination, blur, noise, tubule size/shape,
cell density) that a model must ignore. Numbers measured on these images say nothing
about real tissue; every dataset written here carries a ``SIMULATED.json`` saying so.

Modules, from the dataset down to the pixels:

  tubules     plan (labels, slides, splits, names), render in workers, write
  cache       the dataset of a training run, rendered once per set of arguments
  sheet       one image per stage, and the labelled contact sheet of them
  scene       one field of view: tubule, neighbours, interstitium, stain, optics
              (``SceneParams`` holds the difficulty and appearance knobs)
  epithelium  stage biology: which nuclei sit where, for a cycle phase
  spermatids  the round, elongating and elongated spermatids of that biology
  cells       nuclei groups and tubule geometry
  render      stain densities -> bright-field RGB (Beer-Lambert)
  __main__    ``python -m stagejax.simulate tubules --out DIR ...``

Whole testis sections will be a ``section`` module and command beside ``tubules``.
"""

from stagejax.simulate.cache import default_dataset
from stagejax.simulate.scene import SceneParams
from stagejax.simulate.sheet import contact_sheet, render_stage_examples
from stagejax.simulate.tubules import LABEL_NAMES, SPLITS, generate, image_mpp, plan

__all__ = [
    "LABEL_NAMES",
    "SPLITS",
    "SceneParams",
    "contact_sheet",
    "default_dataset",
    "generate",
    "image_mpp",
    "plan",
    "render_stage_examples",
]
