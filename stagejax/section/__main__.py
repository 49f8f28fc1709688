r"""Whole sections: python -m stagejax.section COMMAND [flags]

Commands:
  export   corrected QuPath GeoJSON (section mode's tubules.geojson, fixed by a lab;
           one file per slide, same order) back into a dataset in the study's layout,
           every staged tubule cut exactly as section mode cuts it:

    python -m stagejax.section export --slides A.tif,B.tif,C.tif \
        --annotations A.geojson,B.geojson,C.geojson --out ROOT \
        [--workdir W | --mpp M --image_size S] [--slide_mpp X] \
        [--split_by slide|random] [--seed K]

    A file name with a comma: repeat the flag (--slides "A,1.tif" --slides B.tif) or
    list the files in a text file, one per line (--slides @slides.txt).
    --workdir W takes the pixel size, image side and label names of W/best_model
    (explicit --mpp/--image_size win), so fine-tuning from W keeps its class ids.
    Objects marked `stageable: false` or without a stage class (e.g. "Tubule") are
    skipped. --split_by slide (default) puts whole slides in train/validation/test
    (at least 3 slides); random splits per tubule. ROOT must be new or empty; the
    dataset appears there only once complete. Bad input is one `error:` line, exit 2.

  merge    the slides of a folder staged by several jobs (``--mode=section --shard=I/N``,
           e.g. a Slurm job array) into one summary.csv and one stage_frequencies.csv
           (counts pooled over every staged slide):

    python -m stagejax.section merge --sections W/sections [--sections W2/sections] [--out DIR]
"""

import json
import logging
import signal

from absl import flags

from stagejax import cli
from stagejax.errors import ConfigError
from stagejax.section import export
from stagejax.section import folder as folder_lib

FLAGS = flags.FLAGS
flags.DEFINE_multi_string(
    "slides",
    [],
    "export: slide files: comma-separated, the flag repeated (for names with a comma), "
    "or @LIST.txt (one file per line).",
)
flags.DEFINE_multi_string(
    "annotations",
    [],
    "export: corrected QuPath GeoJSON, one per slide, same order; given as --slides.",
)
flags.DEFINE_string(
    "out",
    None,
    "export: the dataset folder to write (new or empty). merge: the folder for summary.csv "
    "and stage_frequencies.csv (default: the first --sections).",
)
flags.DEFINE_multi_string(
    "sections",
    [],
    "merge: the W/sections folder of each job of a sharded run (one shared folder, or one "
    "per job); given as --slides.",
)
flags.DEFINE_string("workdir", None, "export: training run whose best_model sets scale and labels.")
flags.DEFINE_float("mpp", None, "export: um/px of the images (default: the model's).")
flags.DEFINE_integer("image_size", None, "export: image side in px (default: the model's).")
flags.DEFINE_float("slide_mpp", None, "Pixel size of the slides' level 0 in um/px (default: file).")
flags.DEFINE_enum(
    "split_by", "slide", list(export.SPLIT_BY), "export: whole slides per split, or per tubule."
)
flags.DEFINE_integer("seed", 0, "export: seed of the split.", lower_bound=0)


def export_command() -> None:
    if not FLAGS.out:
        raise ConfigError("--out: required (the dataset folder to write)")
    root = export.export_sections(
        cli.path_list(FLAGS.slides, "--slides"),
        cli.path_list(FLAGS.annotations, "--annotations"),
        FLAGS.out,
        workdir=FLAGS.workdir,
        mpp=FLAGS.mpp,
        image_size=FLAGS.image_size,
        slide_mpp=FLAGS.slide_mpp,
        split_by=FLAGS.split_by,
        seed=FLAGS.seed,
    )
    meta = json.loads((root / "EXPORT.json").read_text())
    splits = ", ".join(f"{s} {n}" for s, n in meta["per_split"].items())
    print(f"wrote {meta['images']} tubule images ({splits}) to {root}")


def merge_command() -> None:
    folders = cli.path_list(FLAGS.sections, "--sections")
    if not folders:
        raise ConfigError("--sections: required (the W/sections folder of each job)")
    summary, pooled, slides = folder_lib.merge(folders, FLAGS.out or folders[0])
    failed = sum(s.counts is None for s in slides)
    print(
        f"merged {len(slides)} slides ({failed} not staged) from {len(folders)} folder(s): "
        f"{summary}, {pooled}"
    )


COMMANDS = {"export": export_command, "merge": merge_command}


def main() -> None:
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    logging.getLogger("tifffile").setLevel(logging.ERROR)  # its warnings repeat our one line
    cli.run_commands(COMMANDS, interrupted="interrupted: nothing was written")


if __name__ == "__main__":
    main()
