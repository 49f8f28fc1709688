"""Grad-CAM: where in a tubule does the network look when it calls a stage?

Experts stage a tubule from a few structures (acrosome caps of round
spermatids, position of elongated spermatid bundles, meiotic figures).  The
study showed attention maps to argue that the network uses the same
structures; this module computes the classic Grad-CAM map for that check.

The map is taken on the output of the last convolutional stage
(``model.backbone``), the deepest layer that still has a spatial layout:
each channel is weighted by the spatial mean of the gradient of one stage's
logit with respect to it, the weighted sum is rectified (only evidence *for*
the stage is kept), bilinearly upsampled to the image and scaled so that
each image's peak is 1.  Everything runs as one jitted function over a batch;
in eval mode the images of a batch do not interact, so a batch gives the same
maps as one image at a time.

``render`` (``python -m stagejax.explain gradcam``) draws the maps of a
trained run as PNGs; the model comes from `stagejax.evaluate.model.Model`, the
builder every inference pass uses, and the images are preprocessed as the
eval step preprocesses them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from stagejax import data as data_lib
from stagejax.data.augment import CenterCrop
from stagejax.data.images import decode_image, list_images
from stagejax.data.layout import stage_from_file_name
from stagejax.errors import ConfigError, DatasetError
from stagejax.evaluate.best import BEST_MODEL
from stagejax.evaluate.model import Model
from stagejax.runtime.parallel import Parallel
from stagejax.runtime.workdir import load_run_config
from stagejax.stages import parse_stage

log = logging.getLogger(__name__)

GRID_MAX_PER_STAGE = 12  # examples shown in each grid_stage_<S>.png
GRID_THUMB_SIZE = 256  # pixels, longest side of a grid cell

_PREDICTED = -1  # internal target code: "explain the predicted stage"


# --------------------------------------------------------------------------
# Core


def _normalise(cam: jax.Array, height: int, width: int) -> jax.Array:
    """Upsample [B,h,w] maps to the image and scale each to peak 1 (all-zero stays 0)."""
    cam = jax.image.resize(cam, (cam.shape[0], height, width), method="bilinear")
    cam = jnp.maximum(cam, 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)


@functools.partial(jax.jit, static_argnums=0)
def _gradcam_jit(graphdef, state, images, target):
    """Heatmaps [B,H,W] and logits [B,K] for one batch (one compiled function)."""
    model = nnx.merge(graphdef, state)
    model.eval()  # only the merged copy: the caller's module keeps its mode

    fmap = model.backbone(images)

    def target_logit(f):
        logits = model.classify(model.embed(f))
        chosen = jnp.where(target == _PREDICTED, jnp.argmax(logits, axis=-1), target)
        picked = jnp.take_along_axis(logits, chosen[:, None], axis=-1)
        # Summing over the batch is fine: in eval mode image b's logit depends
        # only on fmap[b], so d(sum)/d fmap[b] is d(logit_b)/d fmap[b].
        return picked.astype(jnp.float32).sum(), logits

    # Only the head (embed + classify) is differentiated: the backbone runs forward once.
    grads, logits = jax.grad(target_logit, has_aux=True)(fmap)
    weights = grads.astype(jnp.float32).mean(axis=(1, 2))  # [B, C]
    cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", fmap.astype(jnp.float32), weights))
    return _normalise(cam, images.shape[1], images.shape[2]), logits.astype(jnp.float32)


def gradcam_and_logits(
    model: nnx.Module, images: jax.Array | np.ndarray, target: np.ndarray | int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps [B,H,W] in [0,1] and the logits [B,K] of the same pass.

    Args:
      model: nnx module with ``backbone``, ``embed`` and ``classify`` (see
        CONTRACT.md); it is evaluated in eval mode whatever its current mode.
      images: float [B,H,W,C], preprocessed exactly as for evaluation.
      target: stage index per image ([B] ints, or one int for all); ``None``
        explains each image's predicted stage.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"images: expected float [B,H,W,C], got {images.dtype} {tuple(images.shape)}"
        )
    batch = images.shape[0]
    if target is None:
        target_arr = np.full((batch,), _PREDICTED, np.int32)
    else:
        target_arr = np.broadcast_to(np.asarray(target, np.int32), (batch,)).copy()
        if np.any(target_arr < 0):
            raise ValueError(f"target: stage indices must be >= 0, got {target_arr.tolist()}")
    graphdef, state = nnx.split(model)
    heat, logits = _gradcam_jit(graphdef, state, images, jnp.asarray(target_arr))
    if np.any(target_arr >= logits.shape[-1]):
        raise ValueError(
            f"target: stage indices must be < {logits.shape[-1]}, got {target_arr.tolist()}"
        )
    return np.asarray(heat), np.asarray(logits)


def gradcam(
    model: nnx.Module, images: jax.Array | np.ndarray, target: np.ndarray | int | None = None
) -> np.ndarray:
    """Grad-CAM heatmaps [B,H,W] in [0,1] (peak 1 per image, 0 = no evidence).

    ``target=None`` explains the predicted stage of each image, otherwise the
    given stage index (one per image).  See :func:`gradcam_and_logits`.
    """
    return gradcam_and_logits(model, images, target)[0]


def overlay(
    image_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, cmap: str = "turbo"
) -> np.ndarray:
    """Blend a [0,1] heatmap, coloured with ``cmap``, onto an image; uint8 RGB [H,W,3]."""
    import matplotlib  # heavy: imported only when drawing

    image = np.asarray(image_uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image: expected [H,W], [H,W,1] or [H,W,3], got {image.shape}")
    heat = np.asarray(heatmap, np.float32)
    if heat.shape != image.shape[:2]:
        raise ValueError(f"heatmap: shape {heat.shape} does not match image {image.shape[:2]}")
    colours = matplotlib.colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# CLI: render the maps of a trained run


def class_index(stage: str, label_names: Sequence[str],
                ranks: Sequence[int] | None = None) -> int | None:
    """The class id of ``stage``: a label name as the dataset writes it, else a roman
    or arabic stage name ('VII', '7') matched by cycle position; None if neither."""
    stage = stage.strip()
    if stage in label_names:
        return list(label_names).index(stage)
    rank = parse_stage(stage)
    if rank is None or ranks is None or rank not in ranks:
        return None
    return list(ranks).index(rank)


def _select(labels: list[int | None], max_images: int | None,
            rank: Callable[[int], int] = lambda c: c) -> list[int]:
    """All indices, or ``max_images`` of them taken in turn from each true stage
    (stages in cycle order, by ``rank`` of the class id)."""
    if max_images is None or max_images >= len(labels):
        return list(range(len(labels)))
    by_stage: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_stage.setdefault(-1 if label is None else label, []).append(i)
    queues = [by_stage[k] for k in sorted(by_stage, key=lambda c: -1 if c < 0 else rank(c))]
    chosen: list[int] = []
    for depth in range(max(map(len, queues))):
        chosen += [q[depth] for q in queues if depth < len(q)]
    return sorted(chosen[:max_images])


@dataclasses.dataclass
class _Images:
    """What to explain: file names, true class ids (None: unknown), a loader, and
    the name and cycle position (None: unknown order) of each class id."""

    names: list[str]
    labels: list[int | None]
    load: Callable[[int], np.ndarray]  # index -> uint8 [H,W,3]
    label_names: list[str]
    ranks: list[int] | None

    def rank(self, class_id: int) -> int:
        return class_id if self.ranks is None else self.ranks[class_id]


def _split_images(config, split: str) -> _Images:
    prepared = data_lib.load(config)
    if split not in prepared.splits:
        raise ConfigError(f"--split: {split!r} is not one of {', '.join(prepared.splits)}")
    source = prepared.splits[split]

    def load(i: int) -> np.ndarray:
        record = source.source[i]
        return decode_image(record["image"], record["file_name"])

    return _Images(list(source.file_names), [int(x) for x in source.labels], load,
                   list(prepared.label_names), list(prepared.stage_ranks))


def _folder_images(folder: Path, label_names: list[str], ranks: list[int] | None) -> _Images:
    paths = list_images(folder, "--images")
    labels = []
    for p in paths:  # a stage in the file name (study's naming) is shown as the true stage
        try:
            labels.append(class_index(stage_from_file_name(p.name), label_names, ranks))
        except DatasetError:
            labels.append(None)
    return _Images([p.name for p in paths], labels,
                   lambda i: decode_image(paths[i].read_bytes(), paths[i].name),
                   label_names, ranks)


def _explain_batch(model: Model, crops: list[np.ndarray], target, batch_size: int):
    """Heatmaps and stage probabilities for equal-sized uint8 crops.

    The batch is padded (repeating the last crop) to ``batch_size`` so that a
    whole split compiles once; preprocessing is the evaluation one.
    """
    n = len(crops)
    batch = jnp.asarray(np.stack(crops + [crops[-1]] * (batch_size - n)))
    heat, logits = gradcam_and_logits(model.module(), model.preprocess(batch), target)
    return heat[:n], np.asarray(jax.nn.softmax(logits[:n], axis=-1))


def _save_pair(path: Path, name: str, image, heat, true, pred, conf, target, alpha) -> None:
    """Original | overlay with a colour bar; title: true / predicted stage, confidence.

    ``true`` (None: unknown), ``pred`` and ``target`` are stage names."""
    import matplotlib  # heavy: imported only when drawing
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.imshow(image)
    left.set_title("H-PAS image (evaluation crop)")
    right.imshow(overlay(image, heat, alpha=alpha))
    right.set_title(f"Grad-CAM: evidence for stage {target}")
    for ax in (left, right):
        ax.set_axis_off()
    mappable = matplotlib.cm.ScalarMappable(cmap="turbo", norm=matplotlib.colors.Normalize(0, 1))
    bar = fig.colorbar(mappable, ax=right, fraction=0.046, pad=0.02)
    bar.set_label("relative evidence (1 = strongest in this image)")
    verdict = "" if true is None else ("  (correct)" if true == pred else "  (WRONG)")
    fig.suptitle(f"{name}\ntrue stage {true or 'unknown'}, predicted {pred} "
                 f"with probability {conf:.2f}{verdict}", fontsize=12)
    fig.savefig(path, dpi=100)


def _thumbnail(image: np.ndarray) -> np.ndarray:
    pil = Image.fromarray(image)
    pil.thumbnail((GRID_THUMB_SIZE, GRID_THUMB_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(pil)


def _save_grid(path: Path, title: str, cells: list[tuple]) -> None:
    """Overlays of one stage; each cell (file, thumbnail, true and predicted stage
    names, confidence) titled with its prediction, red when wrong."""
    from matplotlib.figure import Figure  # heavy: imported only when drawing

    cols = min(4, len(cells))
    rows = -(-len(cells) // cols)
    fig = Figure(figsize=(max(3.2 * cols, 7.0), 3.4 * rows + 0.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, (name, thumb, true, pred, conf) in zip(axes, cells, strict=False):
        ax.imshow(thumb)
        wrong = true is not None and true != pred
        ax.set_title(f"{name if len(name) <= 30 else '...' + name[-27:]}\n"
                     f"predicted {pred} ({conf:.2f})", fontsize=8,
                     color="tab:red" if wrong else "black")
    fig.suptitle(title, fontsize=12)
    fig.savefig(path, dpi=90)


def _target(stage: str | None, model: Model) -> int | None:
    """The class id to explain: ``stage``'s, or None (each image's prediction)."""
    if stage is None:
        return None
    target = class_index(stage, model.label_names, model.stage_ranks)
    if target is None:
        raise ConfigError(f"--stage: {stage!r} is not one of the model's stages "
                          f"({', '.join(model.label_names)})")
    return target


def render(workdir: str | Path, split: str = "test", images: str | Path | None = None,
           stage: str | None = None, out: str | Path | None = None,
           max_images: int | None = None, batch_size: int = 8, alpha: float = 0.4,
           data_dir: str | None = None, cache_dir: str | None = None) -> tuple[Path, int]:
    """Grad-CAM PNGs of a trained run: one per image of ``split`` (or of the folder
    ``images``), one grid per stage; returns (output folder, number of images).

    ``stage``: explain that stage instead of each image's prediction.
    ``data_dir``/``cache_dir``: where the run's dataset is now, if it moved.
    """
    if batch_size < 1 or (max_images is not None and max_images < 1):
        raise ConfigError("--batch_size and --max_images: must be >= 1")
    workdir = Path(workdir)
    config = load_run_config(workdir)
    for field, value in (("data_dir", data_dir), ("cache_dir", cache_dir)):
        if value is not None:
            config[field] = value
    # float32, as the analysis has always run, whatever precision the run trained in.
    # On one device (jit, no pmap axis in BatchNorm), whatever layout the run trained with.
    model = Model.from_directory(config, workdir / BEST_MODEL, precision="float32",
                                 parallel=Parallel("jit", jax.device_count()))
    target = _target(stage, model)
    found = (_folder_images(Path(images), model.label_names, model.stage_ranks)
             if images is not None else _split_images(config, split))
    out = Path(out) if out is not None else workdir / "explain" / "gradcam"
    out.mkdir(parents=True, exist_ok=True)
    indices = _select(found.labels, max_images, found.rank)
    grids = _render_pairs(model, found, indices, CenterCrop(int(config.crop_size)), target,
                          out, batch_size, alpha)
    by_true = all(found.labels[i] is not None for i in indices)
    names = found.label_names
    explained = "its predicted stage" if target is None else f"stage {names[target]}"
    for class_id in sorted(grids, key=found.rank):  # cycle order
        _save_grid(out / f"grid_stage_{names[class_id]}.png",
                   f"Tubules of {'true' if by_true else 'predicted'} stage "
                   f"{names[class_id]}\nGrad-CAM evidence for {explained}; red title = "
                   "misclassified", grids[class_id])
    return out, len(indices)


def _render_pairs(model: Model, found: _Images, indices: list[int], crop: CenterCrop,
                  target: int | None, out: Path, batch_size: int,
                  alpha: float) -> dict[int, list[tuple]]:
    """One overlay PNG per image; returns the grid cells per true (or, when some
    true stages are unknown, predicted) class id."""
    names = found.label_names  # class id -> the dataset's name
    by_true = all(found.labels[i] is not None for i in indices)
    grids: dict[int, list[tuple]] = {}
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        crops = [crop.map({"image": found.load(i), "file_name": found.names[i]})["image"]
                 for i in chunk]
        heats, probs = _explain_batch(model, crops, target, batch_size)
        for i, image, heat, p in zip(chunk, crops, heats, probs, strict=True):
            name, true, pred = found.names[i], found.labels[i], int(np.argmax(p))
            true_name = None if true is None else names[true]
            shown = names[pred if target is None else target]
            _save_pair(out / f"{Path(name).stem}.png", name, image, heat, true_name,
                       names[pred], float(p[pred]), shown, alpha)
            cells = grids.setdefault(true if by_true else pred, [])
            if len(cells) < GRID_MAX_PER_STAGE:
                cells.append((name, _thumbnail(overlay(image, heat, alpha=alpha)),
                              true_name, names[pred], float(p[pred])))
        log.info("Grad-CAM: %d / %d images", start + len(chunk), len(indices))
    return grids
