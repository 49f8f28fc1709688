"""The model core that training, evaluation, prediction, sections and explanations share.

A model split into a static graph (`ModelDef`) and array state (`TrainState`),
the preprocessing and eval step every inference pass runs, and one builder
(`Model`) of a model ready to run, from a config or a saved model directory
(`stagejax.model.saved`). Nothing here imports training or evaluation.
"""

from stagejax.model.build import Model, create_module, make_parallel
from stagejax.model.eval_step import make_eval_step, preprocess
from stagejax.model.state import ModelDef, TrainState, compute_dtype, split_model

__all__ = [
    "Model",
    "ModelDef",
    "TrainState",
    "compute_dtype",
    "create_module",
    "make_eval_step",
    "make_parallel",
    "preprocess",
    "split_model",
]
