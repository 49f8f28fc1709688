"""The simulated dataset of a training run: rendered once per set of arguments, then reused.

``stagejax.datasets.load`` calls :func:`default_dataset` when no ``data_dir`` is given, and
the benchmarks call it for their data; the cache folder's name encodes the arguments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

from stagejax.errors import DatasetError
from stagejax.runtime import files
from stagejax.simulate import tubules
from stagejax.simulate.scene import SceneParams

log = logging.getLogger(__name__)


def cache_key(spec: tubules.Spec) -> str:
    """Folder name of a dataset: readable for the defaults, with a digest otherwise."""
    key = f"sim-v{tubules.GENERATOR_VERSION}-n{spec.num_images}-s{spec.image_size}-seed{spec.seed}"
    extra = dict(
        stain_shift=spec.stain_shift,
        num_slides=spec.num_slides,
        split_by=spec.split_by,
        config=dataclasses.asdict(spec.params),
    )
    default = dict(
        stain_shift=0.0, num_slides=None, split_by="slide", config=dataclasses.asdict(SceneParams())
    )
    if extra != default:
        digest = hashlib.sha1(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:10]
        key += f"-{digest}"
    return key


def default_dataset(
    cache_dir: str | os.PathLike,
    num_images: int,
    image_size: int,
    seed: int,
    *,
    stain_shift: float = 0.0,
    num_slides: int | None = None,
    split_by: str = "slide",
    params: SceneParams | None = None,
    num_workers: int | None = None,
) -> Path:
    """The SIMULATED dataset for these arguments, generated once into ``cache_dir``.

    Rendered beside its final name and renamed into place, so a crash leaves no
    half-written entry; a concurrent caller that finishes first wins, the other uses it.
    """
    spec = tubules.Spec(
        num_images, image_size, seed, stain_shift, num_slides, split_by, params or SceneParams()
    )
    final = Path(cache_dir).expanduser() / cache_key(spec)
    if (final / "SIMULATED.json").exists():
        log.warning("Using cached SIMULATED dataset (not real data): %s", final)
        return final
    written = files.new_dir(
        final, lambda tmp: tubules.write_dataset(tmp, spec, num_workers), "the simulated dataset"
    )
    if not written:
        if not (final / "SIMULATED.json").exists():
            raise DatasetError(
                f"{final}: a folder that is not a finished simulated dataset is in the way; "
                "delete it and rerun"
            )
        log.info("Another process cached %s first; using it", final)
    log.warning("SIMULATED dataset ready (not real data): %s", final)
    return final
