"""Model directories: a model's weights alone, as evaluation, prediction and the analyses load them.

A model directory (``W/best_model``, or the output of ``stagejax.convert``) is
small: ``model.json`` naming the architecture, the class names and the scale
and stain the model learnt at, and an Orbax item ``weights`` with the model's
parameters and batch statistics. Training checkpoints, which also hold the
optimizer state, are `stagejax.runtime.checkpoint`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from stagejax import models, stages
from stagejax.data import stain as stain_lib
from stagejax.errors import CheckpointError, DatasetError, first_line

BEST_MODEL = "best_model"  # the folder in a workdir that training exports the best epoch to
MODEL_JSON = "model.json"
WEIGHTS_ITEM = "weights"


def save_model_weights(
    directory: str | Path,
    model: nnx.Module,
    arch: str,
    num_classes: int = 12,
    in_channels: int = 3,
    label_names: list[str] | tuple[str, ...] | None = None,
    stage_ranks: list[int] | tuple[int, ...] | None = None,
    mpp: float | None = None,
    image_size: int | None = None,
    stain: dict | None = None,
) -> Path:
    """Write ``model``'s weights and architecture so ``load_model_weights`` rebuilds it.

    ``label_names`` (the training dataset's name of each class id) and
    ``stage_ranks`` (their cycle positions, 0 = stage I) go to model.json, so
    predictions name the stages as the dataset did; ``mpp`` and ``image_size``
    (um/px and side in px of the training images), so whole sections are cut
    at the scale the model learnt; ``stain`` (``{"normalize", "reference"}``), so
    every mode maps images onto the stain the model was trained on.
    """
    for field, values in (("label_names", label_names), ("stage_ranks", stage_ranks)):
        if values is not None and len(values) != num_classes:
            raise ValueError(f"{field}: {len(values)} entries for {num_classes} classes")
    directory = Path(directory).absolute()
    if (directory / WEIGHTS_ITEM).exists():
        raise CheckpointError(f"{directory / WEIGHTS_ITEM}: already exists; refusing to overwrite")
    directory.mkdir(parents=True, exist_ok=True)
    state = nnx.state(model, (nnx.Param, nnx.BatchStat)).to_pure_dict()
    state = jax.device_get(state)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / WEIGHTS_ITEM, state)
        ckptr.wait_until_finished()
    meta = {"arch": arch, "num_classes": int(num_classes), "in_channels": int(in_channels)}
    if label_names is not None:
        meta["label_names"] = [str(n) for n in label_names]
    if stage_ranks is not None:
        meta["stage_ranks"] = [int(r) for r in stage_ranks]
    if mpp:
        meta["mpp"] = float(mpp)
    if image_size:
        meta["image_size"] = int(image_size)
    if stain and stain.get("normalize", "none") != "none":
        meta["stain"] = {"normalize": str(stain["normalize"]), "reference": str(stain["reference"])}
    (directory / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_model_json(directory: str | Path) -> dict[str, Any]:
    """arch, num_classes, in_channels, label_names, stage_ranks, mpp, image_size
    and stain of a model directory.

    A model.json written without label names (older runs, ``convert``) means
    I..XII; ``stage_ranks`` is then derived from the names (None if they are
    not stage names). ``mpp``/``image_size``/``stain`` are None when not recorded.
    """
    path = Path(directory) / MODEL_JSON
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a stagejax model directory)")
    try:
        meta = json.loads(path.read_text())
        out = {k: meta[k] for k in ("arch", "num_classes", "in_channels")}
        names = meta.get("label_names") or stages.default_label_names(out["num_classes"])
        ranks = meta.get("stage_ranks")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: malformed ({e})") from None
    if len(names) != out["num_classes"] or (ranks is not None and len(ranks) != len(names)):
        raise CheckpointError(
            f"{path}: malformed (label_names or stage_ranks do not match "
            f"num_classes {out['num_classes']})"
        )
    if ranks is None:
        try:
            ranks = stages.stage_ranks(names, source=str(path))
        except DatasetError:
            ranks = None  # e.g. a 1000-class import: names only
    return {
        **out,
        "label_names": [str(n) for n in names],
        "stage_ranks": None if ranks is None else [int(r) for r in ranks],
        "mpp": float(meta["mpp"]) if meta.get("mpp") else None,
        "image_size": int(meta["image_size"]) if meta.get("image_size") else None,
        "stain": _stain_record(meta.get("stain"), path),
    }


def _stain_record(record: Any, path: Path) -> dict | None:
    if record is None:
        return None
    try:
        method, reference = record["normalize"], record["reference"]
        if method not in stain_lib.STATS_SIZE:
            raise ValueError(f"unknown method {method!r}")
        stain_lib.parse_reference(reference, method, field="stain.reference")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed stain ({e})") from None
    return {"normalize": method, "reference": reference}


def load_model_weights(directory: str | Path, **create_kwargs: Any) -> nnx.Module:
    """Rebuild the model saved by ``save_model_weights``, in eval mode.

    ``create_kwargs`` go to ``stagejax.models.create`` (e.g. ``dtype``).
    """
    directory = Path(directory).absolute()
    meta = read_model_json(directory)
    model = models.create_uninitialized(
        meta["arch"],
        num_classes=meta["num_classes"],
        in_channels=meta["in_channels"],
        **create_kwargs,
    )
    load_weights_into(model, directory)
    model.eval()
    return model


def load_weights_into(model: nnx.Module, directory: str | Path) -> None:
    """Restore saved weights into an already built model of the same architecture."""
    directory = Path(directory).absolute()
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.to_pure_dict())
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(directory / WEIGHTS_ITEM, target)
    except Exception as e:  # orbax raises a variety of errors for bad trees
        raise CheckpointError(
            f"{directory / WEIGHTS_ITEM}: cannot restore ({first_line(e)})"
        ) from None
    state.replace_by_pure_dict(restored)
    nnx.update(model, state)
