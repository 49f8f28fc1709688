"""Simulated H-PAS tubule images in the study's dataset layout (SIMULATED, not real data).

Why: the study's 1,229 labelled images are private, so everything downstream (input
pipeline, training, evaluation, explanations) is developed and tested on a stand-in that
has the same layout and the same *kind* of difficulty: stage features that change
smoothly and cyclically (I -> XII -> I), so neighbouring stages are confusable, and
nuisance variation (staining per slide, illumination, blur, noise, tubule size/shape,
cell density) that a model must ignore. Numbers measured on these images say nothing
about real tissue; every dataset written here carries a ``SIMULATED.json`` saying so.

Pieces: ``synthetic_cells`` (stage biology -> nuclei), ``synthetic_scene`` (tubule,
neighbours, interstitium, stain, optics; ``SimConfig`` holds the difficulty knobs),
``synthetic_render`` (density maps -> RGB). This module plans a dataset (labels drawn
with the stage-duration frequencies, slides, splits, file names), renders it in worker
processes and writes::

  root/images/<slide>_<n>_<stage>-<k>.png    stage = 1..12 (I..XII), as in the study
  root/split_list/{train,validation,test}.txt
  root/label_list.txt                        1..12, one per line
  root/SIMULATED.json                        generator, arguments, knobs

Usage::

  python -m stagejax.data.synthetic --out /tmp/sim --num_images 1229 --image_size 1152 \\
      --seed 0 [--stain_shift 0.5] [--num_slides 10] [--split_by slide|random]
  python -m stagejax.data.synthetic --contact_sheet docs/contact_sheet.png
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from stagejax.data import synthetic_scene as scene
from stagejax.data.synthetic_scene import SimConfig
from stagejax.stages import NUM_STAGES, STAGES, stage_frequencies

__all__ = ["SimConfig", "LABEL_NAMES", "sample_labels", "plan", "generate", "default_dataset",
           "render_stage_examples", "contact_sheet"]

log = logging.getLogger(__name__)

# Bump when the images a given set of arguments produces change (invalidates caches).
GENERATOR_VERSION = 1
# Stage names in file names and label_list.txt: 1..12 like the study (1 = stage I).
LABEL_NAMES: tuple[str, ...] = tuple(str(i + 1) for i in range(NUM_STAGES))
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
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


def default_num_slides(num_images: int) -> int:
    """A few slides for small sets, 10 for study-sized ones."""
    return int(min(10, max(3, num_images // 40)))


def sample_labels(num_images: int, seed: int) -> np.ndarray:
    """Stage indices (0 = I) drawn with the stage-duration frequencies (no rendering)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _LABELS]))
    return rng.choice(NUM_STAGES, size=num_images, p=stage_frequencies())


def plan(num_images: int, seed: int, num_slides: int | None = None,
         split_by: str = "slide") -> list[ImagePlan]:
    """Labels, slides, splits and file names of a dataset, without rendering it.

    Splits are about 70/15/15 of the images. With ``split_by='slide'`` every slide lies in
    one split (held-out slides, as for a new batch of staining). Train always holds every
    stage: if the draw missed one, a train image of the most frequent train stage is
    relabelled (labels are decided before rendering, so this costs nothing).
    """
    if split_by not in ("slide", "random"):
        raise ValueError(f"split_by: expected 'slide' or 'random', got {split_by!r}")
    num_slides = default_num_slides(num_images) if num_slides is None else num_slides
    n_train = int(round(SPLIT_FRACTIONS[0] * num_images))
    if n_train < NUM_STAGES:
        raise ValueError(f"num_images: {num_images} gives {n_train} training images, fewer "
                         f"than the {NUM_STAGES} stages; use at least 18")
    if num_slides < 1 or (split_by == "slide" and num_slides < 3):
        raise ValueError(f"num_slides: {num_slides} is too few (split_by='slide' needs >= 3)")
    labels = sample_labels(num_images, seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLITS]))
    n_val = int(round(SPLIT_FRACTIONS[1] * num_images))
    counts = (n_train, n_val, num_images - n_train - n_val)
    split_of = np.repeat(np.arange(3), counts)
    rng.shuffle(split_of)
    if split_by == "slide":
        order = rng.permutation(num_slides)
        n_vs = max(1, int(round(SPLIT_FRACTIONS[1] * num_slides)))
        n_ts = max(1, int(round(SPLIT_FRACTIONS[2] * num_slides)))
        n_vs, n_ts = min(n_vs, num_slides - 2), min(n_ts, num_slides - 2)
        slides_of = (order[: num_slides - n_vs - n_ts], order[num_slides - n_vs - n_ts:
                     num_slides - n_ts], order[num_slides - n_ts:])
        slide = np.empty(num_images, np.int64)
        for s in range(3):
            members = np.flatnonzero(split_of == s)
            slide[members] = rng.choice(slides_of[s], size=members.size)
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
        name = (f"slide{slide[i]:02d}_{i:0{width}d}_{LABEL_NAMES[labels[i]]}"
                f"-{per_stage[labels[i]]}.png")
        out.append(ImagePlan(i, name, int(labels[i]), int(slide[i]), SPLITS[split_of[i]]))
    return out


def slide_stains(num_slides: int, seed: int, stain_shift: float,
                 cfg: SimConfig) -> list[scene.SlideStain]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SLIDES]))
    return [scene.sample_slide_stain(rng, stain_shift, cfg) for _ in range(num_slides)]


def _image_seed(seed: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, _IMAGES, index])


def _render_and_save(job) -> str:
    path, label, stain, size, seed, index, cfg = job
    img = scene.render_image(label, stain, size, _image_seed(seed, index), cfg)
    Image.fromarray(img).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return path


def generate(out_dir: str | os.PathLike, num_images: int, image_size: int, seed: int,
             stain_shift: float = 0.0, num_slides: int | None = None,
             split_by: str = "slide", config: SimConfig | None = None,
             num_workers: int | None = None) -> Path:
    """Render a SIMULATED dataset into ``out_dir`` (study layout); returns ``out_dir``.

    Deterministic: the same arguments give byte-identical files, whatever ``num_workers``
    (default: min(2, CPU count); 1 renders in this process). ``stain_shift`` moves the
    slides' stain distribution (e.g. 1.0: a visibly different lab staining) to make a
    held-out-staining test set.
    """
    cfg = config or SimConfig()
    if image_size < 16:
        raise ValueError(f"image_size: {image_size} is too small (>= 16)")
    out = Path(out_dir)
    if (out / "images").exists():
        raise ValueError(f"out_dir: {out / 'images'} already exists; choose a new directory")
    num_slides = default_num_slides(num_images) if num_slides is None else num_slides
    items = plan(num_images, seed, num_slides, split_by)
    stains = slide_stains(num_slides, seed, stain_shift, cfg)
    (out / "images").mkdir(parents=True)
    (out / "split_list").mkdir()
    log.warning("Generating SIMULATED H-PAS tubule images (not real data): %d images of %d "
                "px, seed %d, stain_shift %g, %d slides, split by %s -> %s", num_images,
                image_size, seed, stain_shift, num_slides, split_by, out)
    jobs = [(str(out / "images" / p.file_name), p.label, stains[p.slide], image_size, seed,
             p.index, cfg) for p in items]
    workers = min(2, os.cpu_count() or 1) if num_workers is None else num_workers
    _run_jobs(jobs, max(1, workers))

    (out / "label_list.txt").write_text("".join(f"{n}\n" for n in LABEL_NAMES))
    for split in SPLITS:
        names = [p.file_name for p in items if p.split == split]
        (out / "split_list" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    meta = dict(
        simulated=True,
        note="SIMULATED images from stagejax.data.synthetic; not real tissue.",
        generator_version=GENERATOR_VERSION, num_images=num_images, image_size=image_size,
        seed=seed, stain_shift=stain_shift, num_slides=num_slides, split_by=split_by,
        label_names=list(LABEL_NAMES), stages=list(STAGES),
        config=dataclasses.asdict(cfg))
    (out / "SIMULATED.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def _run_jobs(jobs: list, workers: int) -> None:
    start = time.monotonic()
    every = max(1, len(jobs) // 20)

    def report(done: int) -> None:
        if done % every == 0 or done == len(jobs):
            el = time.monotonic() - start
            eta = el / done * (len(jobs) - done)
            log.info("simulated %d/%d images (%.1f s, %.2f s/image, eta %.0f s)",
                     done, len(jobs), el, el / done, eta)

    if workers == 1 or len(jobs) < 4:
        for done, job in enumerate(jobs, 1):
            _render_and_save(job)
            report(done)
        return
    # 'spawn': safe even when the caller has already started JAX/XLA threads.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        for done, _ in enumerate(pool.imap_unordered(_render_and_save, jobs, chunksize=2), 1):
            report(done)


def _cache_key(num_images, image_size, seed, stain_shift, num_slides, split_by, cfg) -> str:
    key = f"sim-v{GENERATOR_VERSION}-n{num_images}-s{image_size}-seed{seed}"
    extra = dict(stain_shift=stain_shift, num_slides=num_slides, split_by=split_by,
                 config=dataclasses.asdict(cfg))
    default = dict(stain_shift=0.0, num_slides=None, split_by="slide",
                   config=dataclasses.asdict(SimConfig()))
    if extra != default:
        digest = hashlib.sha1(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:10]
        key += f"-{digest}"
    return key


def default_dataset(cache_dir: str | os.PathLike, num_images: int, image_size: int,
                    seed: int, *, stain_shift: float = 0.0, num_slides: int | None = None,
                    split_by: str = "slide", config: SimConfig | None = None,
                    num_workers: int | None = None) -> Path:
    """The SIMULATED dataset for these arguments, generated once into ``cache_dir``.

    Written to a temporary directory and renamed into place, so a crash or a concurrent
    caller never leaves a half-written dataset under the final name.
    """
    cfg = config or SimConfig()
    cache = Path(cache_dir).expanduser()
    final = cache / _cache_key(num_images, image_size, seed, stain_shift, num_slides,
                               split_by, cfg)
    if (final / "SIMULATED.json").exists():
        log.warning("Using cached SIMULATED dataset (not real data): %s", final)
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        generate(tmp, num_images, image_size, seed, stain_shift=stain_shift,
                 num_slides=num_slides, split_by=split_by, config=cfg,
                 num_workers=num_workers)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "SIMULATED.json").exists():
                raise
            log.info("Another process cached %s first; using it", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.warning("SIMULATED dataset ready (not real data): %s", final)
    return final


# --- contact sheet --------------------------------------------------------------------

def render_stage_examples(image_size: int, seed: int = 0, stain_shift: float = 0.0,
                          config: SimConfig | None = None,
                          phase_in_stage: float = 0.5) -> list[np.ndarray]:
    """One image per stage I..XII, same slide, at ``phase_in_stage`` within each stage."""
    cfg = config or SimConfig()
    stain = slide_stains(1, seed, stain_shift, cfg)[0]
    return [scene.render_image_at_phase(s + phase_in_stage, stain, image_size,
                                        _image_seed(seed, 10_000 + s), cfg)
            for s in range(NUM_STAGES)]


def contact_sheet(path: str | os.PathLike, seed: int = 0,
                  reference: str | os.PathLike | None = None, render_size: int = 1152,
                  tile: int = 384, columns: int = 7) -> Path:
    """Labelled grid: per stage, the whole simulated field and a 1:1 detail of it.

    Images are rendered at ``render_size`` (the study's 1,152 px); overview tiles are
    reduced to ``tile`` px, detail tiles are unscaled crops from the membrane to the lumen.
    With ``reference`` (the real stage I-II image), it is shown the same two ways, its
    detail scaled so that nuclei have the same size in pixels as in the simulation.
    """
    from PIL import ImageDraw, ImageFont

    images = render_stage_examples(render_size, seed)
    x0, y0 = int(0.5 * render_size - 0.42 * render_size), (render_size - tile) // 2
    panels: list[tuple[str, Image.Image, str, Image.Image]] = []
    for s, img in enumerate(images):
        full = Image.fromarray(img)
        panels.append((f"stage {STAGES[s]} (SIMULATED)",
                       full.resize((tile, tile), Image.LANCZOS),
                       f"stage {STAGES[s]}, detail 1:1",
                       full.crop((x0, y0, x0 + tile, y0 + tile))))
    if reference is not None and Path(reference).exists():
        ref = Image.open(reference).convert("RGB")
        over = ref.copy()
        over.thumbnail((tile, tile))
        canvas = Image.new("RGB", (tile, tile), "white")
        canvas.paste(over, ((tile - over.width) // 2, (tile - over.height) // 2))
        # Real round-spermatid nuclei are ~15 px in radius there; scale to ours.
        scale = SimConfig().cell_scale * render_size / 15.0
        side = int(tile / scale)
        detail = ref.crop((20, 300, 20 + side, 300 + side)).resize((tile, tile), Image.LANCZOS)
        panels.append(("REAL reference, stage I-II", canvas,
                       "REAL reference, detail (same nucleus scale)", detail))
    pad, head = 8, 26
    font = ImageFont.load_default(size=18)
    n_rows = 2 * math.ceil(len(panels) / columns)
    sheet = Image.new("RGB", (columns * (tile + pad) + pad, n_rows * (tile + pad + head) + pad),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for i, (title, over, dtitle, detail) in enumerate(panels):
        x = pad + (i % columns) * (tile + pad)
        for k, (t, im) in enumerate(((title, over), (dtitle, detail))):
            y = pad + (2 * (i // columns) + k) * (tile + pad + head)
            draw.text((x + 4, y + 3), t, fill="black", font=font)
            sheet.paste(im, (x, y + head))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # An adaptive 256-colour palette keeps the file small; H-PAS hues are few.
    sheet.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG
                   ).save(path, optimize=True)
    return path


# --- command line ---------------------------------------------------------------------

def _parse_set(items: Sequence[str], cfg: SimConfig) -> SimConfig:
    """``name=value`` overrides of SimConfig fields (tuples as ``a,b``)."""
    fields = {f.name: f for f in dataclasses.fields(SimConfig)}
    changes = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in fields:
            raise ValueError(f"--set: unknown SimConfig field {name!r} ({', '.join(fields)})")
        current = getattr(cfg, name)
        if isinstance(current, tuple):
            changes[name] = tuple(float(v) for v in value.split(","))
        else:
            changes[name] = type(current)(value)
    return dataclasses.replace(cfg, **changes)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m stagejax.data.synthetic",
        description="Write a SIMULATED H-PAS tubule dataset in the study's layout.")
    p.add_argument("--out", help="output directory (must not hold images/ yet)")
    p.add_argument("--num_images", type=int, default=1229)
    p.add_argument("--image_size", type=int, default=1152)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stain_shift", type=float, default=0.0,
                   help="shift of the slide stain distribution (held-out staining)")
    p.add_argument("--num_slides", type=int, default=None)
    p.add_argument("--split_by", choices=("slide", "random"), default="slide")
    p.add_argument("--num_workers", type=int, default=None)
    p.add_argument("--phase_jitter", type=float, default=None,
                   help="latent phase window per stage (1: uniform in the stage)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any SimConfig field, e.g. noise_range=0.01,0.04")
    p.add_argument("--contact_sheet", default=None, metavar="PNG",
                   help="instead of a dataset, write one labelled image per stage")
    p.add_argument("--reference", default=None, help="real image to show on the sheet")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = _parse_set(args.set, SimConfig())
    if args.phase_jitter is not None:
        cfg = dataclasses.replace(cfg, phase_jitter=args.phase_jitter)
    if args.contact_sheet:
        path = contact_sheet(args.contact_sheet, seed=args.seed, reference=args.reference)
        log.info("wrote %s", path)
        return
    if not args.out:
        p.error("--out is required")
    start = time.monotonic()
    out = generate(args.out, args.num_images, args.image_size, args.seed,
                   stain_shift=args.stain_shift, num_slides=args.num_slides,
                   split_by=args.split_by, config=cfg, num_workers=args.num_workers)
    log.warning("wrote SIMULATED dataset %s in %.1f s", out, time.monotonic() - start)


if __name__ == "__main__":
    main()
