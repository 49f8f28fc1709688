r"""Find the seminiferous tubules of a whole H-PAS section: python -m stagejax.detect [train]

Detect (no command):

    python -m stagejax.detect --slide S.tif --out DIR [--mpp M] [--params PARAMS.json]

writes DIR/tubules.geojson (QuPath: File > Import objects; one detection per
tubule cross-section, level-0 pixel coordinates) and DIR/detections.png (the
outlines on the downsampled section). Existing files in DIR are replaced only
once the run has finished.

Fit the detector to a lab's own sections (QuPath GeoJSON exports of tubule
outlines, one file per slide, same order):

    python -m stagejax.detect train --slides S1.tif,S2.tif \
        --annotations A1.geojson,A2.geojson --out PARAMS.json [--params START.json]

`train` fits the parameters of a classical detector (thresholds, smoothing,
size and shape limits, watershed seeds) by a coordinate search that maximises
F1 at IoU >= 0.5; it is not a neural network, and a learned (U-Net) detector is
not built yet. Bad input is one `error:` line naming the file, exit status 2.
"""

import json
import logging
import signal
import time

from absl import flags

from stagejax import cli
from stagejax.detect import fit, pipeline
from stagejax.detect.params import DetectParams, load_params, save_params
from stagejax.errors import ConfigError
from stagejax.slides import open_slide

FLAGS = flags.FLAGS
flags.DEFINE_string("slide", None, "detect: the slide file (pyramidal TIFF/OME-TIFF/SVS, PNG...).")
flags.DEFINE_string("out", None, "detect: output folder; train: the PARAMS.json to write.")
flags.DEFINE_float("mpp", None, "Pixel size of level 0 in um/px; overrides the file's metadata.")
flags.DEFINE_string("params", None, "PARAMS.json from `train` (detect: use; train: start from).")
flags.DEFINE_list("slides", [], "train: slide files, comma-separated.")
flags.DEFINE_list("annotations", [], "train: QuPath GeoJSON files, one per slide, same order.")
flags.DEFINE_integer("sweeps", 2, "train: passes of the coordinate search.", lower_bound=1)

log = logging.getLogger(__name__)


def _params() -> DetectParams:
    return load_params(FLAGS.params) if FLAGS.params else DetectParams()


def detect_command() -> None:
    if not FLAGS.slide:
        raise ConfigError("--slide: required (the section to detect tubules on)")
    if not FLAGS.out:
        raise ConfigError("--out: required (the folder to write tubules.geojson to)")
    params = _params()
    start = time.monotonic()
    with open_slide(FLAGS.slide, FLAGS.mpp) as slide:
        detection = pipeline.detect_slide(slide, params)
    geojson, png = pipeline.write_outputs(FLAGS.out, detection)
    print(f"{len(detection.objects)} tubules in {time.monotonic() - start:.1f} s: {geojson}, {png}")


def train_command() -> None:
    if not FLAGS.slides or not FLAGS.annotations:
        raise ConfigError("--slides and --annotations: required for train")
    if not FLAGS.out or not FLAGS.out.endswith(".json"):
        raise ConfigError(f"--out: {FLAGS.out!r} must name the PARAMS.json file to write")
    start = _params()
    sections = fit.load_sections(FLAGS.slides, FLAGS.annotations, FLAGS.mpp)
    best, record = fit.fit(sections, start, sweeps=FLAGS.sweeps)
    save_params(FLAGS.out, best, record)
    b, a = record["before"], record["after"]
    print(json.dumps({"f1_before": b["f1"], "f1_after": a["f1"], "mean_iou_after": a["mean_iou"]}))
    print(f"wrote {FLAGS.out}")


COMMANDS = {"detect": detect_command, "train": train_command}


def main() -> None:
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    logging.getLogger("tifffile").setLevel(logging.ERROR)  # its warnings repeat our one line
    cli.run_commands(COMMANDS, interrupted="interrupted: no output was replaced", default="detect")


if __name__ == "__main__":
    main()
