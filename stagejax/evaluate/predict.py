"""``--mode=predict``: stage every image of a folder with a trained model.

Images are read, centre-cropped and normalised as in evaluation. Each folder
gets its own ``workdir/predict/<folder name>/predictions.csv``: per image the
stage, its probability, the 12 probabilities and an ``error`` column.

* One unreadable image should not cost the hundreds of readable ones: it is
  skipped, named in the log and in the CSV's ``error`` column (its prediction
  columns left empty) and counted in a final warning. ``--strict``
  stops at the first one instead.
* The model sees the centred ``crop_size`` crop at the scale it was trained
  on; an image from another magnification gets a confident but meaningless
  answer. Images whose short side differs from the training images' by more
  than ``SCALE_TOLERANCE`` are therefore named in a warning.
* An existing CSV is never replaced silently: predicting a folder again (or
  another folder of the same name) is refused unless ``--overwrite``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from stagejax.data import input_pipeline, layout
from stagejax.data import prepared as prepared_lib
from stagejax.errors import CheckpointError, ConfigError, DatasetError, WorkdirError
from stagejax.evaluate import report
from stagejax.evaluate.inference import run_inference
from stagejax.images import list_images
from stagejax.model import Model
from stagejax.model.saved import BEST_MODEL, read_model_json

log = logging.getLogger(__name__)

SCALE_TOLERANCE = 1.5
_MAX_NAMED = 10  # files named one by one in a summary line


def output_path(workdir: str | Path, predict_dir: str | Path) -> Path:
    """``workdir/predict/<name of predict_dir>/predictions.csv``."""
    name = Path(predict_dir).expanduser().resolve().name or "root"
    return Path(workdir) / "predict" / name / "predictions.csv"


def _named(names: list[str]) -> str:
    more = f", ... ({len(names) - _MAX_NAMED} more)" if len(names) > _MAX_NAMED else ""
    return ", ".join(names[:_MAX_NAMED]) + more


def _prepared_image_size(config: ml_collections.ConfigDict) -> int | None:
    """Median short side of the run's training images, from its prepared dataset's
    index (best effort: None if the data folder or its cache is not here)."""
    try:
        data = layout.read_layout(Path(config.data_dir).expanduser(), check_images=False)
    except DatasetError:
        return None
    key = prepared_lib.cache_key(data)
    index = Path(config.cache_dir).expanduser() / "prepared" / f"layout-{key}" / "index.json"
    if not index.is_file():
        return None
    sizes = json.loads(index.read_text())["splits"]["train"]["sizes"]
    return int(np.median([min(h, w) for h, w in sizes])) if sizes else None


def reference_size(config: ml_collections.ConfigDict, trained: bool) -> tuple[int, str]:
    """(short side in px, what it is) of the images the model was trained on:
    the run's training images when known, else the crop it was trained at."""
    if trained and not config.data_dir:
        return int(config.simulated.image_size), "the simulated training images"
    if trained and (size := _prepared_image_size(config)):
        return size, "the training images (median short side)"
    return int(config.crop_size), "the crop size the model was trained at"


def _merge_processes(x: np.ndarray) -> np.ndarray:
    """Per-example arrays that each process filled for its own examples (zeros
    elsewhere), combined: every process gets all of them."""
    if jax.process_count() == 1:
        return x
    return np.asarray(multihost_utils.process_allgather(x)).max(axis=0)


class _FileProblems:
    """Watches the prediction batches for files that could not be used and
    records every image's size, so that the rest of the folder goes on."""

    def __init__(self, paths: list[Path], crop_size: int, strict: bool):
        self.paths, self.crop_size, self.strict = paths, crop_size, strict
        self.bad = np.zeros(len(paths), bool)
        self.sizes = np.zeros((len(paths), 2), np.int32)
        self.messages: dict[int, str] = {}

    def watch(self, batches):
        for batch in batches:
            index, mask = batch["index"], batch["mask"]
            self.sizes[index[mask]] = batch["size"][mask]
            bad = mask & (batch["error"] != "")
            for i, message in zip(index[bad], batch["error"][bad], strict=True):
                self.bad[i] = True
                self.messages[int(i)] = str(message)
            if self.strict:
                self._stop_at_first_bad(index, bad)
            for message in batch["error"][bad]:
                log.warning("skipping %s", message)
            yield batch

    def _stop_at_first_bad(self, index: np.ndarray, bad: np.ndarray) -> None:
        """``bad``: per batch row, masked (padding is never bad)."""
        if jax.process_count() > 1:  # every process stops at the same file
            index = np.asarray(multihost_utils.process_allgather(index, tiled=True))
            bad = np.asarray(multihost_utils.process_allgather(bad, tiled=True))
        if bad.any():
            i = int(index[bad].min())
            raise DatasetError(
                f"{self.message(i)} (--strict stops at the first "
                "unusable image; without it such images are skipped and listed)"
            )

    def message(self, i: int) -> str:
        """Why image ``i`` was skipped, starting with its path (found again if
        another process read it)."""
        if i not in self.messages:
            self.messages[i] = input_pipeline.predict_file_error(self.paths[i], self.crop_size)
        return self.messages[i]

    def gather(self) -> None:
        self.bad = _merge_processes(self.bad)
        self.sizes = _merge_processes(self.sizes)

    def errors(self) -> list[str]:
        """Per image: empty, or why it was skipped (without its path: the CSV has it)."""
        return [
            self.message(i).removeprefix(f"{p}: ") if b else ""
            for i, (p, b) in enumerate(zip(self.paths, self.bad, strict=True))
        ]


def _warn_off_scale(problems: _FileProblems, reference: tuple[int, str], crop: int) -> None:
    ref, what = reference
    off = []
    for path, (h, w), bad in zip(problems.paths, problems.sizes, problems.bad, strict=True):
        ratio = min(h, w) / ref
        if not bad and max(ratio, 1 / ratio) > SCALE_TOLERANCE:
            off.append(path.name)
            if len(off) <= _MAX_NAMED:
                log.warning(
                    "%s: %dx%d px, %.1fx the %d px of %s; the model sees its centre "
                    "%d px crop at the training scale, so at another magnification its "
                    "stage is unreliable",
                    path,
                    h,
                    w,
                    ratio,
                    ref,
                    what,
                    crop,
                )
    if off:
        log.warning(
            "%d image(s) differ in size from %s (%d px) by more than %gx: %s",
            len(off),
            what,
            ref,
            SCALE_TOLERANCE,
            _named(off),
        )


def model_directory(config: ml_collections.ConfigDict, workdir: Path) -> tuple[Path, bool]:
    """(model directory, whether it is the workdir's trained model): ``best_model``,
    else ``config.init_from``."""
    model_dir = workdir / BEST_MODEL
    if model_dir.is_dir():
        return model_dir, True
    if not config.init_from:
        raise CheckpointError(
            f"{model_dir}: missing; train first or pass --config.init_from=MODEL_DIR"
        )
    return Path(config.init_from).expanduser(), False


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """What ``--mode=predict`` acts on (its flags; not in the training recipe)."""

    images: str  # the folder of images to stage
    tta: bool = False  # average the 8 rotations/flips
    strict: bool = False  # stop at the first unreadable image (default: skip, list it)
    overwrite: bool = False  # replace an earlier prediction of a folder of the same name


def predict_folder(
    config: ml_collections.ConfigDict, workdir: str | Path, opts: PredictOptions
) -> Path:
    """Predict ``opts.images`` with ``workdir/best_model`` (else ``config.init_from``).

    Returns the CSV path.
    """
    if not opts.images:
        raise ConfigError("--images: required with --mode=predict (the folder to stage)")
    workdir = Path(workdir)
    paths = list_images(opts.images, "--images")
    dest = output_path(workdir, opts.images)
    replacing = dest.exists()
    if replacing and not opts.overwrite:
        raise WorkdirError(
            f"{dest}: exists (an earlier prediction of a folder named "
            f"{dest.parent.name!r}); pass --overwrite to replace it"
        )
    model_dir, trained = model_directory(config, workdir)
    model = Model.from_directory(config, model_dir)
    log.info(
        "predicting %d images from %s%s",
        len(paths),
        opts.images,
        " with 8-fold test-time augmentation" if opts.tta else "",
    )
    problems = _FileProblems(paths, config.crop_size, opts.strict)
    out = run_inference(
        model.parallel,
        model.eval_step(opts.tta),
        model.device_state(),
        problems.watch(input_pipeline.predict_batches(paths, config)),
        len(paths),
        desc="predict",
    )
    problems.gather()
    skipped = [p.name for p, b in zip(paths, problems.bad, strict=True) if b]
    if jax.process_index() == 0:
        report.write_predictions(
            dest, [p.name for p in paths], out["probs"], model.label_names, errors=problems.errors()
        )
        log.log(
            logging.WARNING if replacing else logging.INFO,
            "replaced %s (--overwrite)" if replacing else "wrote %s",
            dest,
        )
        recorded = read_model_json(model_dir)["image_size"]
        reference = (
            (recorded, "the training images (recorded with the model)")
            if recorded
            else reference_size(config, trained)
        )
        _warn_off_scale(problems, reference, config.crop_size)
        if skipped:
            log.warning(
                "%d of %d images could not be used and were skipped (column error of %s): %s",
                len(skipped),
                len(paths),
                dest,
                _named(skipped),
            )
    if len(skipped) == len(paths):
        raise DatasetError(
            f"{opts.images}: none of the {len(paths)} images could be "
            f"used ({problems.message(0)}); see {dest}"
        )
    return dest
