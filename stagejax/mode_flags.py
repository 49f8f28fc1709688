"""The flags of what a mode acts on (``python -m stagejax.main``): the folder to
predict, the slides to stage and how. They are given to the mode, never stored
in the training recipe; each is refused in a mode that does not use it."""

from __future__ import annotations

import os

from absl import flags

from stagejax.errors import ConfigError
from stagejax.section.folder import parse_shard
from stagejax.section.options import SectionOptions

FLAGS = flags.FLAGS
_DEFAULT = SectionOptions()

# flag -> the modes that use it
USED_BY = {
    "images": ("predict",),
    "slides": ("section",),
    "slide_mpp": ("section",),
    "detector": ("section",),
    "review_below": ("section",),
    "section_seed": ("section",),
    "section_size_mm": ("section",),
    "tta": ("predict", "section"),
    "strict": ("predict", "section"),
    "overwrite": ("eval", "predict", "section"),
    "shard": ("section",),
    "cut_workers": ("section",),
}


def define_flags() -> None:
    """Define the mode flags (once, by stagejax.main)."""
    flags.DEFINE_string("images", "", "predict: the folder of images to stage.")
    flags.DEFINE_string(
        "slides", _DEFAULT.slides, "section: a slide or a folder of slides (none: SIMULATED)."
    )
    flags.DEFINE_float(
        "slide_mpp", _DEFAULT.slide_mpp, "section: um/px of the slides (0: from each file)."
    )
    flags.register_validator(
        "slide_mpp", lambda v: v == 0 or 0.05 <= v <= 20, "must be 0 (from the file) or 0.05-20"
    )
    flags.DEFINE_string(
        "detector",
        _DEFAULT.detector,
        "section: unet | classical | a PARAMS.json or U-Net .npz of stagejax.detect train.",
    )
    flags.DEFINE_float(
        "review_below",
        _DEFAULT.review_below,
        "section: tubules staged with less confidence go to review.csv.",
        lower_bound=0.0,
        upper_bound=1.0,
    )
    flags.DEFINE_integer(
        "section_seed", _DEFAULT.seed, "section without --slides: the seed.", lower_bound=0
    )
    flags.DEFINE_string(
        "section_size_mm", _DEFAULT.size_mm, "section without --slides: width,height in mm."
    )
    flags.DEFINE_bool("tta", False, "predict/section: average the 8 rotations/flips.")
    flags.DEFINE_bool(
        "strict",
        False,
        "predict: stop at the first unreadable image; section: exit 2 if a slide was skipped.",
    )
    flags.DEFINE_bool(
        "overwrite", False, "eval/predict/section: replace earlier outputs of the same name."
    )
    flags.DEFINE_integer(
        "cut_workers",
        _DEFAULT.cut_workers,
        "section: threads cutting tubules out of a slide (0: one per core).",
        lower_bound=0,
    )
    flags.DEFINE_string(
        "shard",
        _DEFAULT.shard,
        "section: I/N stages every N-th slide of the folder from the I-th, for N independent "
        "jobs (default: a Slurm job array's task, else all); then python -m stagejax.section "
        "merge.",
    )


def check_flags(mode: str) -> None:
    """A mode flag given to a mode that does not use it is one line, before any work."""
    for name, modes in USED_BY.items():
        if FLAGS[name].present and mode not in modes:
            raise ConfigError(f"--{name}: not used by --mode={mode} (only {'/'.join(modes)})")


def section_options() -> SectionOptions:
    return SectionOptions(
        slides=FLAGS.slides,
        slide_mpp=FLAGS.slide_mpp,
        detector=FLAGS.detector,
        review_below=FLAGS.review_below,
        seed=FLAGS.section_seed,
        size_mm=FLAGS.section_size_mm,
        tta=FLAGS.tta,
        strict=FLAGS.strict,
        overwrite=FLAGS.overwrite,
        shard=FLAGS.shard,
        cut_workers=FLAGS.cut_workers,
    )


def lock_dir(mode: str, workdir: str) -> str:
    """The folder a run locks: the workdir, or for one shard of a section run its own
    (W/.shard-I-of-N), so that the shards of a folder run side by side."""
    if mode != "section":
        return workdir
    shard = parse_shard(FLAGS.shard)
    return workdir if shard.count == 1 else os.path.join(workdir, shard.lock_name)


def predict_options():
    """`stagejax.evaluate.predict.PredictOptions` from the flags (imported here: the
    model stack is not needed for --help)."""
    from stagejax.evaluate.predict import PredictOptions

    return PredictOptions(
        images=FLAGS.images, tta=FLAGS.tta, strict=FLAGS.strict, overwrite=FLAGS.overwrite
    )
