r"""Find the seminiferous tubules of a whole H-PAS section: python -m stagejax.detect [train]

Detect (no command):

    python -m stagejax.detect --slide S.tif --out DIR [--mpp M] \
        [--method unet|classical] [--weights W.npz | --params PARAMS.json]

writes DIR/tubules.geojson (QuPath: File > Import objects; one detection per
tubule cross-section, level-0 pixel coordinates) and DIR/detections.png (the
outlines on the downsampled section). Existing files in DIR are replaced only
once the run has finished. The default method is the learned U-Net with the
weights shipped in the package (`--weights` for others); `--params` (or
`--method=classical`) uses the classical detector.

Fine-tune the U-Net on a lab's own sections (QuPath GeoJSON exports of tubule
outlines, one file per slide, same order; objects classified "Region" mark the
annotated part):

    python -m stagejax.detect train --method=unet --slides S1.tif,S2.tif \
        --annotations A1.geojson,A2.geojson --out DIR_OR_W.npz [--init shipped|none|W.npz] \
        [--steps 300] [--holdout 0.2]   (names with commas: repeat --slides/--annotations,
        or @LIST.txt)

`--holdout 0.2` sets a fifth of the outlines aside, never trained on, and scores the old
and the new weights on them: a warning says when fine-tuning made things worse.

writes DIR/unet.npz (or W.npz) and its record (unet.json), which `--weights`
(or `--detector=DIR/unet.npz` of `--mode=section`) uses. The shipped weights were
made from SIMULATED sections only (`--packed_seeds`: packed sections drawn the
way real ones look; `--simulated_seeds`: stage-simulator sections; never the
held-out seeds) by five runs whose one command line is in
stagejax/detect/weights/unet.json ("reproduce"). Existing outputs are replaced
only with --overwrite.

Fit the classical detector's parameters instead (a coordinate search that
maximises F1 at IoU >= 0.5; no network):

    python -m stagejax.detect train --method=classical --slides S1.tif,S2.tif \
        --annotations A1.geojson,A2.geojson --out PARAMS.json [--params START.json]

Bad input is one `error:` line naming the file, exit status 2.
"""

import json
import logging
import signal
import time
from pathlib import Path

from absl import flags

from stagejax import cli
from stagejax.detect import choose, fit, pipeline
from stagejax.detect.params import DetectParams, load_params, save_params
from stagejax.errors import ConfigError
from stagejax.slides import open_slide

FLAGS = flags.FLAGS
flags.DEFINE_string("slide", None, "detect: the slide file (pyramidal TIFF/OME-TIFF/SVS, PNG...).")
flags.DEFINE_string("out", None, "detect: output folder; train: the file (or folder) to write.")
flags.DEFINE_float("mpp", None, "Pixel size of level 0 in um/px; overrides the file's metadata.")
flags.DEFINE_string("method", None, "unet (default) or classical.")
flags.DEFINE_string("weights", None, "detect: U-Net weights (.npz or the folder train wrote).")
flags.DEFINE_string("params", None, "PARAMS.json from `train` (detect: use; train: start from).")
flags.DEFINE_multi_string(
    "slides", [], "train: slide files (comma-separated, repeat the flag, or @LIST.txt)."
)
flags.DEFINE_multi_string(
    "annotations", [], "train: QuPath GeoJSON files, one per slide, same order (as --slides)."
)
flags.DEFINE_integer(
    "sweeps", 2, "train, classical: passes of the coordinate search.", lower_bound=1
)
flags.DEFINE_string("init", "shipped", "train, unet: start from shipped, none or a weights file.")
flags.DEFINE_integer("steps", 300, "train, unet: Adam steps.", lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "train, unet: peak learning rate.", lower_bound=0)
flags.DEFINE_string("simulated_seeds", None, "train, unet: SIMULATED sections instead (e.g. 0-15).")
flags.DEFINE_float(
    "holdout",
    0.0,
    "train, unet: set aside this fraction of each section's outlines (at "
    "random) to check the new weights on; a warning when they score worse than --init's.",
)
flags.DEFINE_string("packed_seeds", None, "train, unet: SIMULATED packed sections too (e.g. 0-47).")
flags.DEFINE_boolean(
    "overwrite", False, "Replace existing outputs (tubules.geojson may hold QuPath corrections)."
)
flags.DEFINE_string("cache_dir", "~/.cache/stagejax/detect_sections", "train: simulated renders.")

log = logging.getLogger(__name__)


def detect_command() -> None:
    if not FLAGS.slide:
        raise ConfigError("--slide: required (the section to detect tubules on)")
    if not FLAGS.out:
        raise ConfigError("--out: required (the folder to write tubules.geojson to)")
    start = time.monotonic()
    with open_slide(FLAGS.slide, FLAGS.mpp) as slide:  # a bad slide fails before JAX loads
        _refuse_existing(Path(FLAGS.out) / "tubules.geojson", Path(FLAGS.out) / "detections.png")
        detector = choose.make_detector(FLAGS.method, FLAGS.weights, FLAGS.params)
        detection = pipeline.detect_slide(slide, detector)
    geojson, png = pipeline.write_outputs(FLAGS.out, detection)
    print(f"{len(detection.objects)} tubules in {time.monotonic() - start:.1f} s: {geojson}, {png}")


def _refuse_existing(*paths: Path) -> None:
    """One line instead of replacing a file a person may have edited (--overwrite allows it)."""
    for path in paths:
        if path.exists() and not FLAGS.overwrite:
            raise ConfigError(
                f"--out: {path} exists (it may hold corrections); pass --overwrite to "
                "replace it, or name another --out"
            )


def _slide_lists() -> tuple[list[str], list[str]]:
    """--slides and --annotations as files (names may hold commas: see cli.path_list)."""
    return cli.path_list(FLAGS.slides, "--slides"), cli.path_list(
        FLAGS.annotations, "--annotations"
    )


def train_classical() -> None:
    if not FLAGS.out or not FLAGS.out.endswith(".json"):
        raise ConfigError(f"--out: {FLAGS.out!r} must name the PARAMS.json file to write")
    _refuse_existing(Path(FLAGS.out))
    start = load_params(FLAGS.params) if FLAGS.params else DetectParams()
    sections = fit.load_sections(*_slide_lists(), FLAGS.mpp)
    best, record = fit.fit(sections, start, sweeps=FLAGS.sweeps)
    save_params(FLAGS.out, best, record)
    b, a = record["before"], record["after"]
    print(json.dumps({"f1_before": b["f1"], "f1_after": a["f1"], "mean_iou_after": a["mean_iou"]}))
    print(f"wrote {FLAGS.out}")


def train_learned() -> None:
    from stagejax.detect import train_unet  # JAX/Flax only for the U-Net

    out = train_unet.weights_target(FLAGS.out)
    _refuse_existing(out)
    packed = (
        train_unet.parse_seeds(FLAGS.packed_seeds, "--packed_seeds") if FLAGS.packed_seeds else []
    )
    check = []
    if not 0.0 <= FLAGS.holdout < 0.9:
        raise ConfigError(f"--holdout: {FLAGS.holdout:g} must be a fraction in [0, 0.9)")
    if FLAGS.holdout and (not FLAGS.slides or FLAGS.simulated_seeds):
        raise ConfigError("--holdout: sets aside outlines of --slides/--annotations only")
    if FLAGS.simulated_seeds:
        seeds = train_unet.parse_seeds(FLAGS.simulated_seeds)
        sections = train_unet.simulated_sections(seeds, FLAGS.cache_dir)
        about = train_unet.simulated_about(seeds)
    elif FLAGS.slides:
        sections = fit.load_sections(*_slide_lists(), FLAGS.mpp)
        about = {"simulated": False}
        if FLAGS.holdout:
            sections, check = fit.hold_out(sections, FLAGS.holdout)
            about["holdout"] = FLAGS.holdout
    else:
        sections, about = [], {"simulated": True}
    if packed:
        about["packed_seeds"] = packed
        about["packed_size_mm"] = list(train_unet.PACKED_SIZE_MM)
    spec = train_unet.TrainSpec(steps=FLAGS.steps, learning_rate=FLAGS.learning_rate)
    record = train_unet.run(sections, FLAGS.init, spec, out, about, packed, check)
    keys = ("f1_before", "f1_after", "held_out_f1_before", "held_out_f1_after",
            "mean_iou_after", "loss_first_100", "loss_last_100")  # fmt: skip
    print(json.dumps({k: record[k] for k in keys if k in record}))
    print(f"wrote {out}")


def train_command() -> None:
    method = FLAGS.method or ("classical" if FLAGS.params else choose.DEFAULT_METHOD)
    if method not in choose.METHODS:
        raise ConfigError(f"--method: {method!r} is not one of {', '.join(choose.METHODS)}")
    simulated = FLAGS.simulated_seeds or FLAGS.packed_seeds
    if not simulated and (not FLAGS.slides or not FLAGS.annotations):
        raise ConfigError("--slides and --annotations: required for train")
    if method == "classical":
        if simulated:
            raise ConfigError("--simulated_seeds, --packed_seeds: are for --method=unet")
        train_classical()
    else:
        if FLAGS.params:
            raise ConfigError("--params: is for --method=classical; the U-Net starts from --init")
        train_learned()


COMMANDS = {"detect": detect_command, "train": train_command}


def main() -> None:
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    logging.getLogger("tifffile").setLevel(logging.ERROR)  # its warnings repeat our one line
    cli.run_commands(COMMANDS, interrupted="interrupted: no output was replaced", default="detect")


if __name__ == "__main__":
    main()
