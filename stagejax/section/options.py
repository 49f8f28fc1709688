"""What ``--mode=section`` acts on and how: flags of that mode (stagejax/mode_flags.py),
not fields of the training recipe, so that staging slides never changes what a
workdir's config.json says was trained."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SectionOptions:
    """The section mode's settings; the defaults are the flags' defaults."""

    slides: str = ""  # a slide file or a folder of slides ("": a SIMULATED section)
    slide_mpp: float = 0.0  # um/px of the slides' level 0 (0: from each file)
    # unet (the shipped U-Net weights), classical (its default parameters), a PARAMS.json
    # or a U-Net .npz of `python -m stagejax.detect train`.
    detector: str = "unet"
    review_below: float = 0.5  # tubules staged with less confidence go to review.csv
    seed: int = 1000  # the simulated section's seed (held out from the detector's fit)
    size_mm: str = "4.4,3.5"  # the simulated section's width,height in mm
    tta: bool = False  # average the 8 rotations/flips of every crop
    strict: bool = False  # exit with an error when a slide of a folder was skipped
    overwrite: bool = False  # replace earlier outputs of another slide, model or setting
    cut_workers: int = 0  # threads cutting tubules (0: one per core)
    shard: str = ""  # "I/N": every N-th slide from the I-th ("": a Slurm array task's, or all)


# Each setting's flag, for messages.
FLAG = {
    "slides": "--slides",
    "slide_mpp": "--slide_mpp",
    "detector": "--detector",
    "review_below": "--review_below",
    "seed": "--section_seed",
    "size_mm": "--section_size_mm",
    "tta": "--tta",
    "strict": "--strict",
    "overwrite": "--overwrite",
    "cut_workers": "--cut_workers",
    "shard": "--shard",
}
