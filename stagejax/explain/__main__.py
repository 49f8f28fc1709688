"""CLI: ``python -m stagejax.explain {gradcam,cycle} --workdir W ...``.

Two questions a biologist asks of a trained stage classifier: which parts of
a tubule drove a call (``gradcam``), and does the network's feature space
follow the I -> XII -> I cycle (``cycle``).
"""

import argparse
import logging
import os
import sys

# `stagejax.explain.gradcam` the attribute is the function, hence the direct imports.
from stagejax.errors import StagejaxError
from stagejax.explain import cycle
from stagejax.explain.gradcam import add_arguments as gradcam_arguments
from stagejax.explain.gradcam import main as gradcam_main

COMMANDS = {
    "gradcam": (gradcam_arguments, gradcam_main,
                "Grad-CAM heatmaps of a trained model: one PNG per image + a grid per stage"),
    "cycle": (cycle.add_arguments, cycle.main,
              "PCA / t-SNE of evaluation features and a cyclic-order score"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stagejax.explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _, help_text) in COMMANDS.items():
        add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command][1](args)
    except StagejaxError as e:
        if os.environ.get("STAGEJAX_TRACEBACK"):  # as stagejax.main
            raise
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
