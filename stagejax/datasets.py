"""The dataset a config trains and evaluates on: its ``data_dir``, or the simulated stand-in.

The one place that chooses between real and simulated images. It sits above
`stagejax.data` (which validates and prepares any dataset folder) and
`stagejax.simulate` (which renders one), so that neither imports the other:
reading data never loads the simulator, and the simulator's slides never load
the dataset stack (TFDS).
"""

from __future__ import annotations

import logging
from pathlib import Path

import ml_collections

log = logging.getLogger(__name__)


def uses_simulated_data(config: ml_collections.ConfigDict) -> bool:
    return not config.data_dir


def training_scale(config: ml_collections.ConfigDict, image_size: int = 0) -> tuple[float, int]:
    """(um/px, side in px) of the images the model learns from; um/px 0 when unknown.

    The simulated images' pixel size is known from their anatomy; real data's is
    ``config.mpp``. ``image_size``: the dataset's median short side, if known.
    """
    if uses_simulated_data(config):
        from stagejax.simulate import tubules  # the renderer: only when needed

        size = int(config.simulated.image_size)
        return float(config.mpp or tubules.image_mpp(size)), size
    size = image_size or int(config.crop_size + 2 * config.crop_range)
    return float(config.mpp), size


def load(config: ml_collections.ConfigDict):
    """Validate and prepare the dataset (generating the simulated one if needed).

    Every problem with the data raises ``DatasetError`` here, before anything
    is compiled or trained.
    """
    from stagejax.data import prepared  # TFDS: only when a dataset is loaded

    cache = Path(config.cache_dir).expanduser()
    root = _simulated_root(config, cache) if uses_simulated_data(config) else config.data_dir
    return prepared.prepare(
        Path(root).expanduser(),
        cache / "prepared",
        crop_size=config.crop_size,
        stage_order=config.stage_order,
    )


def _simulated_root(config: ml_collections.ConfigDict, cache: Path) -> Path:
    """The simulated dataset of ``config.simulated``, rendered into the cache if not there."""
    from stagejax import simulate  # the renderer: only when the dataset is simulated

    sim = config.simulated
    hand_cut = bool(sim.get("hand_cut", True))
    root = simulate.default_dataset(
        cache / "simulated",
        sim.num_images,
        sim.image_size,
        sim.seed,
        params=simulate.SceneParams(hand_cut=hand_cut),
    )
    log.warning(
        "No data_dir given: using the SIMULATED H-PAS dataset (%d %s images of %d px, "
        "seed %d) at %s. Numbers from this run say nothing about real tubules.",
        sim.num_images,
        "hand-cut" if hand_cut else "uncut",
        sim.image_size,
        sim.seed,
        root,
    )
    return root
