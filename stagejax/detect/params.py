"""The detector's parameters: physical units (um, um^2), so one set works at any pixel size.

The defaults were fitted (stagejax.detect.fit) on SIMULATED H-PAS sections
(seeds 0 and 1, 3.0 x 2.4 mm) and are measured on held-out seeds and a held-out
staining by benchmarks/detect.py. `python -m stagejax.detect train` refits them
to a lab's own annotated sections and writes PARAMS.json, which `--params` reads.
"""

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from stagejax.errors import ConfigError
from stagejax.runtime.files import atomic_write_text

FEATURES = ("hematoxylin", "od", "pas")
PARAMS_FORMAT = "stagejax.detect params"


@dataclasses.dataclass(frozen=True)
class DetectParams:
    """What the classical detector does, in micrometres (see stagejax.detect.segment)."""

    work_mpp: float = 2.5  # Resolution the detector works at (um/px).
    feature: str = "od"  # Stain channel that marks tubule epithelium (FEATURES).
    smooth_um: float = 4.0  # Gaussian sigma applied to the stain channel.
    threshold_scale: float = 0.9  # Foreground where the channel exceeds scale * Otsu threshold.
    min_contrast: float = 0.04  # Least stain difference (OD) between tubules and the rest.
    tissue_od: float = 0.06  # Mean optical density above which a pixel is tissue, not glass.
    valley_um: float = 0.0  # Widest pale seam between tubules cut out (0: none).
    valley_frac: float = 0.25  # Seam depth (fraction of the threshold) that counts as a cut.
    open_um: float = 12.0  # Opening radius that trims each tubule (attached clusters).
    max_hole_um2: float = 15_000.0  # Holes (lumens) up to this area are filled to find seeds.
    seed_sigma_um: float = 4.0  # Blur of the distance map whose maxima seed one tubule each.
    seed_distance_um: float = 90.0  # Closest two seeds (tubule centres) may be.
    seed_radius_um: float = 20.0  # Least depth of a seed (shallower: interstitial clusters).
    merge_ratio: float = 1.1  # Neighbours whose border is this deep are one tubule (>1: off).
    relief_um: float = 6.0  # Blur of the foreground mask before `body_level`.
    body_level: float = 0.5  # Blurred foreground fraction inside a tubule's outline.
    compactness: float = 0.1  # Watershed compactness (0: follow the stain; larger: rounder).
    min_area_um2: float = 1_500.0  # Smaller objects are noise or interstitial cell clusters.
    max_area_um2: float = 250_000.0  # Larger objects are unsplit clumps.
    min_solidity: float = 0.60  # Area / convex-hull area; tubule cross-sections are convex.
    convex: bool = True  # Replace each instance by its convex hull (clipped to free pixels).
    grow_um: float = -2.0  # Outlines moved outwards by this much (negative: inwards).

    def __post_init__(self):
        if self.feature not in FEATURES:
            raise ConfigError(f"params.feature: {self.feature!r} is not one of {FEATURES}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("feature", "convex"):
                continue
            if f.name == "grow_um":
                v = abs(v)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"params.{f.name}: {v!r} is not a non-negative number")
        if not 0.25 <= self.work_mpp <= 20:
            raise ConfigError(f"params.work_mpp: {self.work_mpp} um/px is outside 0.25-20")
        if self.min_area_um2 >= self.max_area_um2:
            raise ConfigError("params.min_area_um2: must be below params.max_area_um2")

    def replace(self, **changes) -> "DetectParams":
        return dataclasses.replace(self, **changes)


def save_params(path: str | Path, params: DetectParams, fit: dict[str, Any] | None = None) -> Path:
    """Writes PARAMS.json atomically: the parameters plus how they were fitted."""
    path = Path(path)
    doc = {"format": PARAMS_FORMAT, "version": 1, "params": dataclasses.asdict(params)}
    if fit is not None:
        doc["fit"] = fit
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return path


def load_params(path: str | Path) -> DetectParams:
    """Reads PARAMS.json (from `save_params`); unknown or missing fields are one-line errors."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--params: {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--params: {path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != PARAMS_FORMAT:
        raise ConfigError(f"--params: {path}: not a detector parameter file ({PARAMS_FORMAT!r})")
    values = doc.get("params")
    names = {f.name for f in dataclasses.fields(DetectParams)}
    if not isinstance(values, dict) or set(values) - names:
        unknown = sorted(set(values) - names) if isinstance(values, dict) else values
        raise ConfigError(f"--params: {path}: unknown parameters {unknown}")
    try:
        return DetectParams(**values)
    except ConfigError as e:
        raise ConfigError(f"--params: {path}: {e}") from None
