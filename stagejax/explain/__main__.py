r"""Explain a trained stage classifier: python -m stagejax.explain COMMAND --workdir W [flags]

Commands:
  gradcam   Grad-CAM heatmaps of a trained model: one PNG per image and a grid
            per stage (which parts of a tubule drove the call)
  cycle     PCA / t-SNE of the evaluation features and a cyclic-order score
            (does the feature space follow the I -> XII -> I cycle)

    python -m stagejax.explain gradcam --workdir W [--split test | --images DIR] [--stage VIII]
    python -m stagejax.explain cycle --workdir W
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from absl import flags

from stagejax import cli
from stagejax.errors import ConfigError
from stagejax.explain import cycle, gradcam_report

FLAGS = flags.FLAGS

# Both commands.
flags.DEFINE_string("workdir", None, "Training run: config.json, best_model/, eval_<split>/.")
flags.DEFINE_string("split", None, "Dataset split to explain or score (default: test).")
flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/explain/<command>).")
# gradcam only.
flags.DEFINE_string("images", None, "gradcam: a folder of images to explain instead of a split.")
flags.DEFINE_string(
    "stage", None, "gradcam: explain this stage (I..XII or 1..12) instead of the prediction."
)
flags.DEFINE_integer(
    "max_images", None, "gradcam: at most this many images, taken in turn from each true stage."
)
flags.DEFINE_integer("batch_size", 8, "gradcam: images per jitted batch.")
flags.DEFINE_float("alpha", 0.4, "gradcam: heatmap opacity in the overlays.")
flags.DEFINE_string(
    "data_dir", None, "gradcam: dataset root if it moved since training (default: the run's)."
)
flags.DEFINE_string(
    "cache_dir", None, "gradcam: dataset cache if it moved since training (default: the run's)."
)
# cycle only.
flags.DEFINE_integer(
    "num_permutations", 200, "cycle: label shuffles for the random baseline (>= 1)."
)
flags.DEFINE_integer("seed", 0, "cycle: seed of the shuffles and of t-SNE.")


def _workdir() -> Path:
    if not FLAGS.workdir:
        raise ConfigError("--workdir: required (the training run to explain)")
    return Path(FLAGS.workdir)


def gradcam_command() -> None:
    """``gradcam``: overlays and per-stage grids."""
    if FLAGS.images and FLAGS.split:
        raise ConfigError("--split and --images: give one (a dataset split or a folder)")
    out, count = gradcam_report.render(
        _workdir(),
        split=FLAGS.split or "test",
        images=FLAGS.images,
        stage=FLAGS.stage,
        out=FLAGS.out,
        max_images=FLAGS.max_images,
        batch_size=FLAGS.batch_size,
        alpha=FLAGS.alpha,
        data_dir=FLAGS.data_dir,
        cache_dir=FLAGS.cache_dir,
    )
    print(f"Grad-CAM of {count} images written to {out}")


def cycle_command() -> None:
    """``cycle``: embeddings, plots and the cycle score."""
    path = cycle.analyse(
        _workdir(),
        split=FLAGS.split or "test",
        out=FLAGS.out,
        num_permutations=FLAGS.num_permutations,
        seed=FLAGS.seed,
    )
    print(cycle.summary_line(path))


COMMANDS: dict[str, cli.Command] = {"gradcam": gradcam_command, "cycle": cycle_command}


def run(argv: Sequence[str]) -> None:
    """Parse ``argv`` (command first, no program name) and run it; raises the
    project's errors instead of exiting (for tests and other Python callers)."""
    FLAGS.unparse_flags()
    rest = FLAGS(["stagejax.explain", *argv])
    cli.pick_command(COMMANDS, rest)()


def main() -> None:
    cli.run_commands(COMMANDS)


if __name__ == "__main__":
    main()
