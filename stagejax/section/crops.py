"""Tubules cut out of a slide the way the study's images were cut by hand.

The study's images (shared/reference/real-tubule-stage-I-II.png) show one
tubule cross-section, everything outside its outline white. ``cut_tubule``
makes the same picture from a slide and an outline: a square of the stage
model's training image size, centred on the outline's bounding box, resampled
from the slide's pixel size to the model's, white outside the outline. The
model then sees a tubule at the scale and in the style it was trained on,
whether the outline came from the detector or from a person in QuPath.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from shapely.geometry import MultiPolygon, Polygon

from stagejax.slides import Slide

WHITE = 255


def crop_square(geometry: Polygon | MultiPolygon, side0: float) -> tuple[float, float]:
    """Top-left (x, y) in level-0 px of the `side0`-px square centred on `geometry`'s box."""
    x0, y0, x1, y1 = geometry.bounds
    return (x0 + x1) / 2 - side0 / 2, (y0 + y1) / 2 - side0 / 2


def outline_mask(
    geometry: Polygon | MultiPolygon, origin: tuple[float, float], scale: float, size: int
) -> np.ndarray:
    """bool [size, size]: inside `geometry` (level-0 px) in a crop whose top-left is
    `origin` (level-0 px) and whose pixels are `scale` level-0 px wide. Holes stay inside:
    a hand cut follows only the outer edge."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for poly in getattr(geometry, "geoms", [geometry]):
        xy = (np.asarray(poly.exterior.coords) - origin) / scale
        draw.polygon([tuple(p) for p in xy], fill=1, outline=1)
    return np.asarray(img, bool)


def cut_tubule(
    slide: Slide,
    geometry: Polygon | MultiPolygon,
    model_mpp: float,
    size: int,
    white_outside: bool = True,
) -> np.ndarray:
    """uint8 [size, size, 3]: the tubule at `model_mpp` um/px, white outside its outline.

    Read from the coarsest pyramid level that is still at least as detailed as
    the model needs, so a tubule costs about one crop of decoding whatever the
    slide's resolution.
    """
    ds0 = model_mpp / slide.mpp  # level-0 px per crop px
    side0 = size * ds0
    x0, y0 = crop_square(geometry, side0)
    level = slide.best_level(max(1.0, ds0))
    lds = slide.levels[level].downsample
    lx, ly, lside = x0 / lds, y0 / lds, side0 / lds
    ix, iy = math.floor(lx), math.floor(ly)
    n = math.ceil(lx + lside) - ix + 1
    region = slide.read_region(ix, iy, n, n, level)
    resample = Image.Resampling.BOX if lside >= size else Image.Resampling.BILINEAR
    box = (lx - ix, ly - iy, lx - ix + lside, ly - iy + lside)
    crop = np.asarray(Image.fromarray(region).resize((size, size), resample, box=box))
    if white_outside:
        crop = crop.copy()
        crop[~outline_mask(geometry, (x0, y0), ds0, size)] = WHITE
    return crop
