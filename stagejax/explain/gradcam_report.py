"""The Grad-CAM report of a trained run: one overlay per image, one grid per stage.

``render`` (``python -m stagejax.explain gradcam``) explains the images of a
split or of a folder with the run's ``best_model``. The model comes from
`stagejax.model.Model`, the builder every inference pass uses, and
the images are centre-cropped and preprocessed exactly as the eval step sees
them, so the maps explain the calls that evaluation and prediction make.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from stagejax import datasets
from stagejax.data.augment import CenterCrop
from stagejax.data.layout import stage_from_file_name
from stagejax.errors import ConfigError, DatasetError
from stagejax.explain.gradcam import gradcam_and_logits, overlay
from stagejax.images import decode_image, list_images
from stagejax.model import Model
from stagejax.model.saved import BEST_MODEL
from stagejax.runtime.parallel import Parallel
from stagejax.runtime.workdir import load_run_config
from stagejax.stages import parse_stage

log = logging.getLogger(__name__)

GRID_MAX_PER_STAGE = 12  # examples shown in each grid_stage_<S>.png
GRID_THUMB_SIZE = 256  # pixels, longest side of a grid cell


def class_index(
    stage: str, label_names: Sequence[str], ranks: Sequence[int] | None = None
) -> int | None:
    """The class id of ``stage``: a label name as the dataset writes it, else a roman
    or arabic stage name ('VII', '7') matched by cycle position; None if neither."""
    stage = stage.strip()
    if stage in label_names:
        return list(label_names).index(stage)
    rank = parse_stage(stage)
    if rank is None or ranks is None or rank not in ranks:
        return None
    return list(ranks).index(rank)


def _select(
    labels: list[int | None], max_images: int | None, rank: Callable[[int], int] = lambda c: c
) -> list[int]:
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
    prepared = datasets.load(config)
    if split not in prepared.splits:
        raise ConfigError(f"--split: {split!r} is not one of {', '.join(prepared.splits)}")
    source = prepared.splits[split]

    def load(i: int) -> np.ndarray:
        record = source.source[i]
        return decode_image(record["image"], record["file_name"])

    return _Images(
        list(source.file_names),
        [int(x) for x in source.labels],
        load,
        list(prepared.label_names),
        list(prepared.stage_ranks),
    )


def _folder_images(folder: Path, label_names: list[str], ranks: list[int] | None) -> _Images:
    paths = list_images(folder, "--images")
    labels = []
    for p in paths:  # a stage in the file name (study's naming) is shown as the true stage
        try:
            labels.append(class_index(stage_from_file_name(p.name), label_names, ranks))
        except DatasetError:
            labels.append(None)
    return _Images(
        [p.name for p in paths],
        labels,
        lambda i: decode_image(paths[i].read_bytes(), paths[i].name),
        label_names,
        ranks,
    )


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
    fig.suptitle(
        f"{name}\ntrue stage {true or 'unknown'}, predicted {pred} "
        f"with probability {conf:.2f}{verdict}",
        fontsize=12,
    )
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
        ax.set_title(
            f"{name if len(name) <= 30 else '...' + name[-27:]}\npredicted {pred} ({conf:.2f})",
            fontsize=8,
            color="tab:red" if wrong else "black",
        )
    fig.suptitle(title, fontsize=12)
    fig.savefig(path, dpi=90)


def _target(stage: str | None, model: Model) -> int | None:
    """The class id to explain: ``stage``'s, or None (each image's prediction)."""
    if stage is None:
        return None
    target = class_index(stage, model.label_names, model.stage_ranks)
    if target is None:
        raise ConfigError(
            f"--stage: {stage!r} is not one of the model's stages ({', '.join(model.label_names)})"
        )
    return target


def render(
    workdir: str | Path,
    split: str = "test",
    images: str | Path | None = None,
    stage: str | None = None,
    out: str | Path | None = None,
    max_images: int | None = None,
    batch_size: int = 8,
    alpha: float = 0.4,
    data_dir: str | None = None,
    cache_dir: str | None = None,
) -> tuple[Path, int]:
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
    model = Model.from_directory(
        config,
        workdir / BEST_MODEL,
        precision="float32",
        parallel=Parallel("jit", jax.device_count()),
    )
    target = _target(stage, model)
    found = (
        _folder_images(Path(images), model.label_names, model.stage_ranks)
        if images is not None
        else _split_images(config, split)
    )
    out = Path(out) if out is not None else workdir / "explain" / "gradcam"
    out.mkdir(parents=True, exist_ok=True)
    indices = _select(found.labels, max_images, found.rank)
    grids = _render_pairs(
        model, found, indices, CenterCrop(int(config.crop_size)), target, out, batch_size, alpha
    )
    by_true = all(found.labels[i] is not None for i in indices)
    names = found.label_names
    explained = "its predicted stage" if target is None else f"stage {names[target]}"
    for class_id in sorted(grids, key=found.rank):  # cycle order
        _save_grid(
            out / f"grid_stage_{names[class_id]}.png",
            f"Tubules of {'true' if by_true else 'predicted'} stage "
            f"{names[class_id]}\nGrad-CAM evidence for {explained}; red title = "
            "misclassified",
            grids[class_id],
        )
    return out, len(indices)


def _render_pairs(
    model: Model,
    found: _Images,
    indices: list[int],
    crop: CenterCrop,
    target: int | None,
    out: Path,
    batch_size: int,
    alpha: float,
) -> dict[int, list[tuple]]:
    """One overlay PNG per image; returns the grid cells per true (or, when some
    true stages are unknown, predicted) class id."""
    names = found.label_names  # class id -> the dataset's name
    by_true = all(found.labels[i] is not None for i in indices)
    grids: dict[int, list[tuple]] = {}
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        crops = [
            crop.map({"image": found.load(i), "file_name": found.names[i]})["image"] for i in chunk
        ]
        heats, probs = _explain_batch(model, crops, target, batch_size)
        for i, image, heat, p in zip(chunk, crops, heats, probs, strict=True):
            name, true, pred = found.names[i], found.labels[i], int(np.argmax(p))
            true_name = None if true is None else names[true]
            shown = names[pred if target is None else target]
            _save_pair(
                out / f"{Path(name).stem}.png",
                name,
                image,
                heat,
                true_name,
                names[pred],
                float(p[pred]),
                shown,
                alpha,
            )
            cells = grids.setdefault(true if by_true else pred, [])
            if len(cells) < GRID_MAX_PER_STAGE:
                cells.append(
                    (
                        name,
                        _thumbnail(overlay(image, heat, alpha=alpha)),
                        true_name,
                        names[pred],
                        float(p[pred]),
                    )
                )
        log.info("Grad-CAM: %d / %d images", start + len(chunk), len(indices))
    return grids
