"""The state every step computes on: a model split into a static graph and arrays.

The Flax NNX model is split once into a static graph definition (`ModelDef`)
and array state (`TrainState`), and merged back inside a step, so a step
compiles once and the state is a plain pytree that Orbax saves and
``jax.jit`` donates. Training, evaluation, prediction, the explanations and
the section pipeline all hold a model this way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct

from stagejax.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data: checkpoints hold plain arrays


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of a split model, one graph for training and one for eval."""

    train_graph: Any
    eval_graph: Any
    rest: Any  # Other state (the eager 'dropout' stream), unused and unchanged by the steps.

    def merge(self, params: Any, batch_stats: Any, train: bool) -> nnx.Module:
        """A fresh module whose Variables are new objects over the same arrays.

        NNX refuses to mutate a Variable created in another trace (outside the
        jitted step, or outside ``jax.grad``), so each merge makes its own.
        """
        graph = self.train_graph if train else self.eval_graph
        state = jax.tree.map(lambda x: x, (params, batch_stats, self.rest))
        return nnx.merge(graph, *state)


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    """The dtype ``config.precision`` names, for activations and the forward pass."""
    if config.precision not in DTYPES:
        raise ConfigError(f"config.precision: {config.precision!r} is not one of {list(DTYPES)}")
    return DTYPES[config.precision]


def split_model(model: nnx.Module) -> tuple[ModelDef, Any, Any]:
    """(static graphs, params, batch statistics) of ``model``."""
    model.train()
    train_graph, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    model.eval()
    eval_graph, *_ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return ModelDef(train_graph, eval_graph, rest), params, batch_stats


def create_train_state(
    params: Any, batch_stats: Any, tx: optax.GradientTransformation | None, seed: int
) -> TrainState:
    """Step 0 of a run; without ``tx`` (inference only) there is no optimizer state."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=None if tx is None else tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
