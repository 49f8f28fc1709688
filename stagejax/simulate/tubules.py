"""Simulated H-PAS tubule datasets in the study's layout (SIMULATED, not real data).

This module plans a dataset (labels drawn with the stage-duration frequencies, slides,
splits, file names), renders it in worker processes and writes::

  root/images/<slide>_<n>_<stage>-<k>.png    stage = 1..12 (I..XII), as in the study
  root/split_list/{train,validation,test}.txt
  root/label_list.txt                        1..12, one per line
  root/SIMULATED.json                        generator, arguments, scene parameters

Everything is rendered into a hidden directory beside the target and renamed into place
at the end, so a failed or interrupted run never leaves a half-written dataset.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stagejax.errors import ConfigError
from stagejax.runtime import files
from stagejax.simulate import scene
from stagejax.simulate.scene import SceneParams
from stagejax.stages import NUM_STAGES, STAGES, stage_frequencies

log = logging.getLogger(__name__)

# Bump when the images a given set of arguments produces change (invalidates caches).
# 2: images cut out by hand (SceneParams.hand_cut); 3: the tubule drawn as a section's tubule
# is (simulate.tubule_draw), laid over its neighbours and interstitium; half the images
# cut along the membrane (SceneParams.traced_fraction).
GENERATOR_VERSION = 3
# Stage names in file names and label_list.txt: 1..12 like the study (1 = stage I).
LABEL_NAMES: tuple[str, ...] = tuple(str(i + 1) for i in range(NUM_STAGES))
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
SPLIT_BY = ("slide", "random")
MIN_IMAGE_SIZE = 16
TUBULE_DIAMETER_UM = 200.0  # A mouse seminiferous tubule: sets the images' scale.
PNG_COMPRESS_LEVEL = 1  # Noisy images barely compress; level 1 is ~2x faster than 6.

# Distinct SeedSequence streams derived from the user's seed.
_LABELS, _SLIDES, _SPLITS, _IMAGES = 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class ImagePlan:
    """Everything needed to render and file one image."""

    index: int
    file_name: str
    label: int  # 0-based stage index.
    slide: int
    split: str


def image_mpp(image_size: int, params: SceneParams | None = None) -> float:
    """Micrometres per pixel of a simulated tubule image ``image_size`` px wide.

    The study does not publish its scale, so it comes from anatomy: a ~200 um tubule,
    drawn with a mean radius of mean(``params.tubule_radius``) x the image side.
    """
    if image_size < 1:
        raise ConfigError(f"image_size: {image_size} px must be positive")
    radius = float(np.mean((params or SceneParams()).tubule_radius))
    return TUBULE_DIAMETER_UM / (2 * radius * image_size)


def default_num_slides(num_images: int) -> int:
    """A few slides for small sets, 10 for study-sized ones."""
    return int(min(10, max(3, num_images // 40)))


def min_num_images() -> int:
    """The fewest images whose train split (70%) can hold every stage."""
    return next(
        n for n in range(NUM_STAGES, 4 * NUM_STAGES) if round(SPLIT_FRACTIONS[0] * n) >= NUM_STAGES
    )


def check_arguments(
    num_images: int,
    image_size: int | None = None,
    num_slides: int | None = None,
    split_by: str = "slide",
) -> None:
    """Raise ConfigError, naming the argument, for a dataset that cannot be made."""
    if split_by not in SPLIT_BY:
        raise ConfigError(f"split_by: expected 'slide' or 'random', got {split_by!r}")
    if num_images < min_num_images():
        raise ConfigError(
            f"num_images: {num_images} is too few; the train split (70%) must "
            f"hold all {NUM_STAGES} stages, so use at least {min_num_images()}"
        )
    if image_size is not None and image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size: {image_size} px is too small (at least {MIN_IMAGE_SIZE})")
    if num_slides is not None and (num_slides < 1 or (split_by == "slide" and num_slides < 3)):
        raise ConfigError(
            f"num_slides: {num_slides} is too few (at least 1, and 3 with "
            "split_by='slide': one per split)"
        )


def sample_labels(num_images: int, seed: int) -> np.ndarray:
    """Stage indices (0 = I) drawn with the stage-duration frequencies (no rendering)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _LABELS]))
    return rng.choice(NUM_STAGES, size=num_images, p=stage_frequencies())


def plan(
    num_images: int, seed: int, num_slides: int | None = None, split_by: str = "slide"
) -> list[ImagePlan]:
    """Labels, slides, splits and file names of a dataset, without rendering it.

    Splits are about 70/15/15 of the images. With ``split_by='slide'`` every slide lies in
    one split (held-out slides, as for a new batch of staining). Train always holds every
    stage: if the draw missed one, a train image of the most frequent train stage is
    relabelled (labels are decided before rendering, so this costs nothing).
    """
    check_arguments(num_images, num_slides=num_slides, split_by=split_by)
    num_slides = default_num_slides(num_images) if num_slides is None else num_slides
    labels = sample_labels(num_images, seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLITS]))
    n_train = int(round(SPLIT_FRACTIONS[0] * num_images))
    n_val = int(round(SPLIT_FRACTIONS[1] * num_images))
    counts = (n_train, n_val, num_images - n_train - n_val)
    split_of = np.repeat(np.arange(3), counts)
    rng.shuffle(split_of)
    if split_by == "slide":
        slide = _slides_by_split(split_of, num_slides, rng)
    else:
        slide = rng.integers(0, num_slides, num_images)
    train = np.flatnonzero(split_of == 0)
    for stage in range(NUM_STAGES):
        if not np.any(labels[train] == stage):
            common = np.bincount(labels[train], minlength=NUM_STAGES).argmax()
            labels[train[labels[train] == common][0]] = stage
    per_stage = np.zeros(NUM_STAGES, np.int64)
    out = []
    width = max(4, len(str(num_images - 1)))
    for i in range(num_images):
        per_stage[labels[i]] += 1
        name = (
            f"slide{slide[i]:02d}_{i:0{width}d}_{LABEL_NAMES[labels[i]]}-{per_stage[labels[i]]}.png"
        )
        out.append(ImagePlan(i, name, int(labels[i]), int(slide[i]), SPLITS[split_of[i]]))
    return out


def _slides_by_split(split_of: np.ndarray, num_slides: int, rng: np.random.Generator) -> np.ndarray:
    """A slide per image such that each slide lies in one split only."""
    order = rng.permutation(num_slides)
    n_vs = max(1, int(round(SPLIT_FRACTIONS[1] * num_slides)))
    n_ts = max(1, int(round(SPLIT_FRACTIONS[2] * num_slides)))
    n_vs, n_ts = min(n_vs, num_slides - 2), min(n_ts, num_slides - 2)
    slides_of = (
        order[: num_slides - n_vs - n_ts],
        order[num_slides - n_vs - n_ts : num_slides - n_ts],
        order[num_slides - n_ts :],
    )
    slide = np.empty(split_of.shape[0], np.int64)
    for s in range(3):
        members = np.flatnonzero(split_of == s)
        slide[members] = rng.choice(slides_of[s], size=members.size)
    return slide


def slide_stains(
    num_slides: int, seed: int, stain_shift: float, params: SceneParams
) -> list[scene.SlideStain]:
    """The staining of each simulated slide, moved by ``stain_shift``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SLIDES]))
    return [scene.sample_slide_stain(rng, stain_shift, params) for _ in range(num_slides)]


def image_seed(seed: int, index: int) -> np.random.SeedSequence:
    """The random stream of image ``index``: independent of how many workers render."""
    return np.random.SeedSequence([seed, _IMAGES, index])


def _render_and_save(job) -> str:
    path, label, stain, size, seed, index, params = job
    img = scene.render_image(label, stain, size, image_seed(seed, index), params)
    Image.fromarray(img).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return path


@dataclasses.dataclass(frozen=True)
class Spec:
    """The arguments that fix every byte of a simulated dataset; checked when made."""

    num_images: int
    image_size: int
    seed: int
    stain_shift: float = 0.0
    num_slides: int | None = None  # None: default_num_slides(num_images).
    split_by: str = "slide"
    params: SceneParams = SceneParams()

    def __post_init__(self):
        check_arguments(self.num_images, self.image_size, self.num_slides, self.split_by)

    @property
    def slides(self) -> int:
        """The number of slides, the default resolved."""
        return default_num_slides(self.num_images) if self.num_slides is None else self.num_slides


def generate(
    out: str | os.PathLike,
    num_images: int,
    image_size: int,
    seed: int,
    stain_shift: float = 0.0,
    num_slides: int | None = None,
    split_by: str = "slide",
    params: SceneParams | None = None,
    num_workers: int | None = None,
) -> Path:
    """Render a SIMULATED dataset into the new or empty folder ``out``; returns it.

    Deterministic: the same arguments give byte-identical files, whatever ``num_workers``
    (default: min(2, CPU count); 1 renders in this process). ``stain_shift`` moves the
    slides' stain distribution (e.g. 1.0: a visibly different lab staining) to make a
    held-out-staining test set. Bad arguments raise ConfigError before anything is written.
    """
    spec = Spec(
        num_images, image_size, seed, stain_shift, num_slides, split_by, params or SceneParams()
    )
    out = Path(out).expanduser()
    files.check_output_dir(out)
    if not files.new_dir(out, lambda tmp: write_dataset(tmp, spec, num_workers), "the dataset"):
        raise ConfigError(f"out: {out} was filled by someone else while rendering; nothing written")
    log.warning("wrote SIMULATED dataset (not real data): %s", out)
    return out


def write_dataset(root: Path, spec: Spec, num_workers: int | None = None) -> None:
    """Render every image of ``spec`` and write the lists and SIMULATED.json into ``root``."""
    items = plan(spec.num_images, spec.seed, spec.slides, spec.split_by)
    stains = slide_stains(spec.slides, spec.seed, spec.stain_shift, spec.params)
    (root / "images").mkdir()
    (root / "split_list").mkdir()
    log.warning(
        "Generating SIMULATED H-PAS tubule images (not real data): %d images of %d "
        "px, seed %d, stain_shift %g, %d slides, split by %s",
        spec.num_images,
        spec.image_size,
        spec.seed,
        spec.stain_shift,
        spec.slides,
        spec.split_by,
    )
    jobs = [
        (
            str(root / "images" / p.file_name),
            p.label,
            stains[p.slide],
            spec.image_size,
            spec.seed,
            p.index,
            spec.params,
        )
        for p in items
    ]
    workers = min(2, os.cpu_count() or 1) if num_workers is None else num_workers
    _run_jobs(jobs, max(1, workers))

    (root / "label_list.txt").write_text("".join(f"{n}\n" for n in LABEL_NAMES))
    for split in SPLITS:
        names = [p.file_name for p in items if p.split == split]
        (root / "split_list" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    meta = dict(
        simulated=True,
        note="SIMULATED images from stagejax.simulate (tubules); not real tissue.",
        generator_version=GENERATOR_VERSION,
        num_images=spec.num_images,
        image_size=spec.image_size,
        seed=spec.seed,
        stain_shift=spec.stain_shift,
        num_slides=spec.slides,
        split_by=spec.split_by,
        label_names=list(LABEL_NAMES),
        stages=list(STAGES),
        scene_params=dataclasses.asdict(spec.params),
    )
    (root / "SIMULATED.json").write_text(json.dumps(meta, indent=1) + "\n")


def _ignore_sigint() -> None:
    # Ctrl-C reaches the workers too; only the parent reacts (and stops the pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_jobs(jobs: list, workers: int) -> None:
    start = time.monotonic()
    every = max(1, len(jobs) // 20)

    def report(done: int) -> None:
        if done % every == 0 or done == len(jobs):
            el = time.monotonic() - start
            eta = el / done * (len(jobs) - done)
            log.info(
                "simulated %d/%d images (%.1f s, %.2f s/image, eta %.0f s)",
                done,
                len(jobs),
                el,
                el / done,
                eta,
            )

    if workers == 1 or len(jobs) < 4:
        for done, job in enumerate(jobs, 1):
            _render_and_save(job)
            report(done)
        return
    # 'spawn': safe even when the caller has already started JAX/XLA threads.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_ignore_sigint) as pool:
        for done, _ in enumerate(pool.imap_unordered(_render_and_save, jobs, chunksize=2), 1):
            report(done)
