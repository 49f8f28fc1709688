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

import collections
import math
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

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
    return np.asarray(_outline_image(geometry, origin, scale, size), bool)


def _outline_image(geometry, origin, scale: float, size: int) -> Image.Image:
    """`outline_mask` as an 8-bit image, 255 inside: a mask PIL pastes through."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for poly in getattr(geometry, "geoms", [geometry]):
        xy = (np.asarray(poly.exterior.coords) - origin) / scale
        draw.polygon([tuple(p) for p in xy], fill=255, outline=255)
    return img


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
    crop = Image.fromarray(region).resize((size, size), resample, box=box)
    if white_outside:  # pasted onto white through the outline: 8x faster than indexing
        cut = Image.new("RGB", (size, size), (WHITE,) * 3)
        cut.paste(crop, mask=_outline_image(geometry, (x0, y0), ds0, size))
        crop = cut
    return np.asarray(crop)


def cut_tubules(
    slide: Slide,
    geometries: Iterable[Polygon | MultiPolygon],
    model_mpp: float,
    size: int,
    workers: int = 1,
) -> Iterator[np.ndarray]:
    """`cut_tubule` of each of ``geometries``, in order, by ``workers`` threads.

    Why threads: tile decoding (imagecodecs), resampling and pasting (Pillow) release
    the GIL, so the cuts of several tubules run on several cores, while the device
    stages the previous batch. At most ``2 * workers`` crops are in flight, so memory
    stays bounded whatever the slide's size; the crops are the serial ones, byte for byte.
    """
    if workers <= 1:
        yield from (cut_tubule(slide, g, model_mpp, size) for g in geometries)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="stagejax-cut") as pool:
        pending: collections.deque = collections.deque()
        for geometry in geometries:
            pending.append(pool.submit(cut_tubule, slide, geometry, model_mpp, size))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def default_workers() -> int:
    """One cutting thread per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
