"""Instance labels to polygons: the outlines detection writes and the simulator's ground truth.

Here, beside the GeoJSON they are written to, so that the detector and the
simulator (whose packed sections the detector is trained on) share one tracing
without importing each other.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from shapely.geometry import MultiPolygon, Polygon
from skimage import measure


def outlines(labels: np.ndarray, scale: tuple[float, float], grow: float = 0.0) -> list[Polygon]:
    """One simplified polygon per label 1..N (consecutive), in level-0 pixel coordinates,
    grown by `grow` level-0 px (negative: shrunk)."""
    polys = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        mask = np.pad(labels[sl] == i, 1).astype(np.float32)
        contour = max(measure.find_contours(mask, 0.5), key=len)
        rows = contour[:, 0] + sl[0].start - 1 + 0.5  # pixel centres at +0.5
        cols = contour[:, 1] + sl[1].start - 1 + 0.5
        poly = Polygon(np.stack([cols * scale[0], rows * scale[1]], -1))
        poly = poly.simplify(0.3 * min(scale), preserve_topology=True)
        poly = poly if poly.is_valid else poly.buffer(0)
        if grow:
            poly = poly.buffer(grow, join_style="round")
        if isinstance(poly, MultiPolygon):  # shrinking can cut a thin waist
            poly = max(poly.geoms, key=lambda g: g.area)
        polys.append(poly)
    return polys
