r"""Write SIMULATED H-PAS images (not real data): python -m stagejax.simulate COMMAND [flags]

Commands:
  tubules   a dataset of single-tubule images in the study's layout (images/,
            split_list/, label_list.txt; split by simulated slide), and/or a
            contact sheet of one image per stage:

    python -m stagejax.simulate tubules --out DIR --num_images 1229 \
        --image_size 1152 --seed 0 [--stain_shift 0.3] [--contact_sheet sheet.png]

    Images are white outside a hand-drawn outline of the tubule, as the study cut
    them out of its slides; --hand_cut=false keeps the whole field.

  section   a whole transverse section of a mouse testis (tunica, packed tubule
            cross-sections each in a stage, interstitium, glass) as a pyramidal
            BigTIFF, with ground_truth.geojson (one QuPath polygon per tubule):

    python -m stagejax.simulate section --out DIR --seed 0 [--mpp 0.217] \
        [--stain_shift 0.3] [--size_mm 4.4,3.5]

    The default --mpp (0.217 um/px) is an ESTIMATE of the study's scale, which the study
    does not publish: a mouse tubule is ~200 um across and fills ~0.8 of its 1,152 px
    images (the tubule simulator's default), so 200 / (0.8 x 1,152) = 0.217 um/px.

  packed    a SIMULATED section at detection scale, packed and hard the way real
            sections are (touching tubules, lengthwise cuts, H&E or PAS from pale to
            saturated, coarse JPEG scans; stagejax.simulate.packed), the kind the
            tubule detector is trained on, with ground_truth.geojson:

    python -m stagejax.simulate packed --out DIR --seed 0 [--mpp 2.5] [--size_mm 3.4,4.2]

--out must be a new or empty folder; the dataset (or section) appears there only once
complete. Bad arguments are one `error:` line and exit status 2.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

from absl import flags

from stagejax import cli
from stagejax.errors import ConfigError
from stagejax.simulate import section, sheet, tubules
from stagejax.simulate.scene import SceneParams

FLAGS = flags.FLAGS
_DEFAULT = SceneParams()

# Every command.
flags.DEFINE_string("out", None, "Folder to write: new or empty.")
flags.DEFINE_integer("seed", 0, "Random seed: the same flags give byte-identical files.")
flags.DEFINE_float(
    "stain_shift",
    0.0,
    "Shift of the slides' stain distribution (e.g. 0.5 "
    "or 1.0: a held-out staining; negative: the other way).",
)
# tubules only.
flags.DEFINE_integer("num_images", 1229, "tubules: number of images (the study had 1,229).")
flags.DEFINE_integer("image_size", 1152, "tubules: image side in px (the study's: 1,152).")
flags.DEFINE_integer("num_slides", None, "tubules: simulated slides (default: 3-10 by num_images).")
flags.DEFINE_enum(
    "split_by",
    "slide",
    list(tubules.SPLIT_BY),
    "tubules: slide: each slide in one split (held-out slides); random: per image.",
)
flags.DEFINE_integer(
    "num_workers", None, "tubules: render processes (default: min(2, CPUs)).", lower_bound=1
)
flags.DEFINE_float(
    "phase_jitter",
    _DEFAULT.phase_jitter,
    "tubules: spread of an image's cycle phase in stage units (1: uniform "
    "within its stage; > 1 overlaps neighbours).",
    lower_bound=0.0,
)
flags.DEFINE_float(
    "cell_phase_sd",
    _DEFAULT.cell_phase_sd,
    "tubules: asynchrony of the cells within one tubule (stage units); larger is harder.",
    lower_bound=0.0,
)
flags.DEFINE_float(
    "acrosome_contrast",
    _DEFAULT.acrosome_contrast,
    "tubules: PAS density of the acrosome granule and cap; smaller is harder.",
    lower_bound=0.0,
)
flags.DEFINE_float(
    "stain_jitter",
    _DEFAULT.stain_jitter,
    "tubules: scales slide-to-slide and image-to-image stain variation.",
    lower_bound=0.0,
)
flags.DEFINE_boolean(
    "hand_cut",
    _DEFAULT.hand_cut,
    "tubules: cut each image out like the study's: white outside a hand-drawn outline "
    "of its tubule (--hand_cut=false: neighbours and interstitium to the border).",
)
flags.DEFINE_string(
    "contact_sheet",
    None,
    "tubules: also (or, without --out, only) write this PNG: one labelled "
    "image per stage, rendered at 1,152 px.",
)
flags.DEFINE_string("reference", None, "tubules: real image to show on the contact sheet.")
# section only.
flags.DEFINE_float(
    "mpp",
    None,
    f"section: um per pixel (default {section.DEFAULT_MPP:.3f}: an ESTIMATE of the study's "
    "scale, 200 um tubule / ~920 px tubule in its 1,152 px images). Changes resolution, "
    "not anatomy.",
)
flags.DEFINE_string(
    "size_mm",
    "4.4,3.5",
    "section: WIDTH,HEIGHT of the image in mm (e.g. 1.5,1.2: a small test section).",
)

log = logging.getLogger(__name__)


def tubules_command() -> None:
    """``tubules``: the single-tubule dataset and/or its contact sheet."""
    if not FLAGS.out and not FLAGS.contact_sheet:
        raise ConfigError(
            "--out: required (the folder to write), unless --contact_sheet alone is wanted"
        )
    if FLAGS.reference and not FLAGS.contact_sheet:
        raise ConfigError("--reference: only used with --contact_sheet")
    if FLAGS.reference and not Path(FLAGS.reference).is_file():
        raise ConfigError(f"--reference: {FLAGS.reference} is not a file")
    params = SceneParams(
        phase_jitter=FLAGS.phase_jitter,
        cell_phase_sd=FLAGS.cell_phase_sd,
        acrosome_contrast=FLAGS.acrosome_contrast,
        stain_jitter=FLAGS.stain_jitter,
        hand_cut=FLAGS.hand_cut,
    )
    if FLAGS.out:
        start = time.monotonic()
        out = tubules.generate(
            FLAGS.out,
            FLAGS.num_images,
            FLAGS.image_size,
            FLAGS.seed,
            stain_shift=FLAGS.stain_shift,
            num_slides=FLAGS.num_slides,
            split_by=FLAGS.split_by,
            params=params,
            num_workers=FLAGS.num_workers,
        )
        log.info("%s: %d images in %.1f s", out, FLAGS.num_images, time.monotonic() - start)
    if FLAGS.contact_sheet:
        path = sheet.contact_sheet(
            FLAGS.contact_sheet,
            seed=FLAGS.seed,
            reference=FLAGS.reference,
            stain_shift=FLAGS.stain_shift,
        )
        log.info("wrote contact sheet %s", path)


def section_command() -> None:
    """``section``: one simulated whole section and its ground truth."""
    if not FLAGS.out:
        raise ConfigError("--out: required (the folder to write)")
    size = section.parse_size_mm(FLAGS.size_mm)
    section.render_section(FLAGS.out, FLAGS.seed, FLAGS.mpp, FLAGS.stain_shift, size)


def packed_command() -> None:
    """``packed``: one packed section at detection scale and its ground truth."""
    from stagejax.simulate import packed

    if not FLAGS.out:
        raise ConfigError("--out: required (the folder to write)")
    size = section.parse_size_mm(FLAGS.size_mm)
    out = packed.write_packed(FLAGS.out, FLAGS.seed, size, FLAGS.mpp or packed.DETECT_MPP)
    log.info("wrote SIMULATED packed section %s", out)


COMMANDS: dict[str, Callable[[], None]] = {
    "tubules": tubules_command,
    "section": section_command,
    "packed": packed_command,
}


def main() -> None:
    # SIGTERM stops a render like Ctrl-C: temporary files are removed on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cli.run_commands(COMMANDS, interrupted="interrupted: no partial dataset was left behind")


if __name__ == "__main__":
    main()
