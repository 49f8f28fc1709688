"""One builder for a model ready to run: its graph, state and compiled eval step.

Training (`stagejax.train.loop.Run`), ``--mode=eval``, ``--mode=predict``, the
explanations and the whole-section pipeline all build their model here, so
each of them runs the same eval step on the same preprocessing and the same
device layout. A model is built from a config (a new model, or the weights
of ``config.init_from``) or from a model directory (``W/best_model`` or the
output of ``stagejax.convert``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

from stagejax import models
from stagejax.model import eval_step as eval_lib
from stagejax.model import saved
from stagejax.model.state import (
    DTYPES,
    ModelDef,
    TrainState,
    compute_dtype,
    create_train_state,
    split_model,
)
from stagejax.runtime.parallel import Parallel

log = logging.getLogger(__name__)


def create_module(
    config: ml_collections.ConfigDict, bn_axis_name: str | None = None, seed: int | None = None
) -> nnx.Module:
    """A new ``config.model`` with fresh weights (``config.seed`` unless ``seed``)."""
    return models.create(
        config.model,
        num_classes=config.num_classes,
        in_channels=1 if config.grayscale else 3,
        dtype=compute_dtype(config),
        bn_axis_name=bn_axis_name,
        seed=config.seed if seed is None else seed,
        remat=bool(config.remat),
    )


def make_parallel(config: ml_collections.ConfigDict) -> Parallel:
    """The device layout ``config.parallelism`` asks for."""
    return Parallel(config.parallelism, config.global_batch_size, config.eval_batch_size)


def _with_recorded_stain(
    config: ml_collections.ConfigDict, recorded: dict | None, directory: Path
) -> ml_collections.ConfigDict:
    """``config`` with the stain normalisation the weights were trained with: a
    model only sees colours mapped as in its training."""
    if recorded is None:
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    config.stain = recorded
    log.info("stain normalisation %s, as %s records", recorded["normalize"], directory)
    return config


@dataclasses.dataclass
class Model:
    """A split model (static graph + arrays) with its device layout and eval steps.

    ``label_names``/``stage_ranks``: those saved with the weights (model
    directories only; None for a model built from a config).
    """

    config: ml_collections.ConfigDict
    parallel: Parallel
    modeldef: ModelDef
    params: Any
    batch_stats: Any
    label_names: list[str] | None = None
    stage_ranks: list[int] | None = None
    _eval_steps: dict[bool, Callable] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_config(
        cls, config: ml_collections.ConfigDict, parallel: Parallel | None = None
    ) -> Model:
        """A new ``config.model``, with the weights of ``config.init_from`` if given."""
        parallel = parallel or make_parallel(config)
        module = create_module(config, parallel.bn_axis_name)
        if config.init_from:
            saved.load_weights_into(module, config.init_from)
            log.info("initialised weights from %s", config.init_from)
        return cls(config, parallel, *split_model(module))

    @classmethod
    def from_directory(
        cls,
        config: ml_collections.ConfigDict,
        directory: str | Path,
        parallel: Parallel | None = None,
        precision: str | None = None,
    ) -> Model:
        """The model saved in ``directory``; ``precision`` overrides ``config.precision``."""
        parallel = parallel or make_parallel(config)
        directory = Path(directory).expanduser()
        meta = saved.read_model_json(directory)
        config = _with_recorded_stain(config, meta["stain"], directory)
        dtype = DTYPES[precision] if precision else compute_dtype(config)
        module = saved.load_model_weights(
            directory, dtype=dtype, bn_axis_name=parallel.bn_axis_name
        )
        return cls(
            config,
            parallel,
            *split_model(module),
            label_names=meta["label_names"],
            stage_ranks=meta["stage_ranks"],
        )

    def state(self, tx: optax.GradientTransformation | None = None) -> TrainState:
        """Host state of the model's weights (with ``tx``'s fresh optimizer state)."""
        return create_train_state(self.params, self.batch_stats, tx, self.config.seed)

    def device_state(self) -> TrainState:
        """``state()`` laid out for the eval step."""
        return self.parallel.put_state(self.state())

    def eval_step(self, tta: bool = False) -> Callable:
        """The compiled ``(state, batch) -> {'probs', 'features', 'loss'}`` step."""
        if tta not in self._eval_steps:
            fn = eval_lib.make_eval_step(self.modeldef, self.config, tta=tta)
            self._eval_steps[tta] = self.parallel.compile_eval_step(fn)
        return self._eval_steps[tta]

    def module(self, host_state: TrainState | None = None) -> nnx.Module:
        """An nnx module in eval mode over ``host_state``'s weights (default: its own)."""
        if host_state is None:
            return self.modeldef.merge(self.params, self.batch_stats, train=False)
        return self.modeldef.merge(host_state.params, host_state.batch_stats, train=False)

    def preprocess(self, images: jax.Array) -> jax.Array:
        """uint8 [B,H,W,C] -> the eval step's normalised float input."""
        return eval_lib.preprocess(images, self.config)
