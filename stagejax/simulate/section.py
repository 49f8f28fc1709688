"""SIMULATED whole transverse sections of a mouse testis, with ground truth (not real data).

``render_section(out, seed)`` writes::

  out/section.tif             tiled pyramidal OME-TIFF (BigTIFF), pixel size in its metadata
  out/ground_truth.geojson    one QuPath Feature per tubule cross-section: Polygon in
                              level-0 px, classification = stage I..XII, properties
                              stageable (false for grazing and edge-cut tubules), cut
  out/SIMULATED.json          generator, arguments, pixel size

Anatomy is in micrometres (``section_layout``), pixels come block by block
(``section_blocks``, ``section_render``); every tubule carries the tubule simulator's
stage features, so tubules cut out of a section look like the tubule dataset's.

Pixel size: the study does not publish one. ``DEFAULT_MPP`` is an estimate: its 1,152 px
images show one tubule (the tubule simulator draws it with a mean radius of 0.40 of the
image, about 920 px across), and a mouse tubule is about 200 um across, so
200 um / (2 x 0.40 x 1,152 px) = 0.217 um/px. A study-scale section of 4.4 x 3.5 mm is
then 20,276 x 16,129 px.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import Polygon

from stagejax.errors import ConfigError
from stagejax.runtime import files
from stagejax.simulate import section_layout, tubules
from stagejax.simulate.scene import SceneParams
from stagejax.simulate.section_blocks import SectionRenderer
from stagejax.simulate.section_render import sample_look
from stagejax.slides import SlideObject, read_geojson, write_geojson, write_pyramidal_tiff
from stagejax.slides.base import MPP_RANGE
from stagejax.stages import STAGES, parse_stage, stage_color

log = logging.getLogger(__name__)

SCENE = SceneParams()
DEFAULT_MPP = tubules.image_mpp(1152)  # ~0.217 um/px, estimated
STUDY_SIZE_MM = (4.4, 3.5)  # A mouse testis cross-section; ~20,000 x 16,000 px at DEFAULT_MPP.
SIZE_MM_RANGE = (0.5, 12.0)
MPP_LIMITS = (0.1, 4.0)  # Finer wastes time; coarser leaves nuclei under a pixel.
MAX_PIXELS = 2_000_000_000
GENERATOR_VERSION = 2  # 2: coarse sections drawn finer and box-reduced (Look.supersampling)


def check_arguments(seed: int, mpp: float, stain_shift: float, size_mm) -> tuple[float, float]:
    """Raise ConfigError naming the argument; returns size_mm as two floats."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed: expected an integer >= 0, got {seed!r}")
    if not (isinstance(mpp, int | float) and math.isfinite(mpp)) or not (
        max(MPP_LIMITS[0], MPP_RANGE[0]) <= mpp <= min(MPP_LIMITS[1], MPP_RANGE[1])
    ):
        raise ConfigError(f"mpp: {mpp!r} um/px is outside {MPP_LIMITS[0]}..{MPP_LIMITS[1]}")
    if (
        not (isinstance(stain_shift, int | float) and math.isfinite(stain_shift))
        or abs(stain_shift) > 3
    ):
        raise ConfigError(f"stain_shift: {stain_shift!r} is not a number within -3..3")
    try:
        w, h = (float(v) for v in size_mm)
    except (TypeError, ValueError):
        raise ConfigError(f"size_mm: expected (width, height) in mm, got {size_mm!r}") from None
    lo, hi = SIZE_MM_RANGE
    if not (lo <= w <= hi and lo <= h <= hi):
        raise ConfigError(f"size_mm: {w:g} x {h:g} mm; each side must be within {lo}..{hi} mm")
    pixels = (1000 * w / mpp) * (1000 * h / mpp)
    if pixels > MAX_PIXELS:
        raise ConfigError(
            f"mpp: {mpp:g} um/px makes a {w:g} x {h:g} mm section {pixels / 1e9:.1f} Gpx "
            f"(at most {MAX_PIXELS / 1e9:g}); use a larger --mpp or a smaller --size_mm"
        )
    return w, h


def render_name(seed: int, mpp: float, stain_shift: float, size_mm) -> str:
    """A folder name for a rendered section in a cache: the generator version and every
    argument that changes its pixels, so a cache never serves an older render."""
    w, h = size_mm
    return f"v{GENERATOR_VERSION}_seed{seed}_shift{stain_shift:g}_mpp{mpp:.4f}_{w:g}x{h:g}"


def parse_size_mm(text: str) -> tuple[float, float]:
    """'4.4,3.5' -> (4.4, 3.5); ConfigError otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(
            f"size_mm: expected WIDTH,HEIGHT in mm (e.g. 4.4,3.5), got {text!r}"
        ) from None


def ground_truth(layout: section_layout.Layout, mpp: float) -> list[SlideObject]:
    """One QuPath annotation per tubule cross-section, its visible outline in level-0 px."""
    tissue = Polygon(layout.outline.polygon(1440) / mpp)
    frame = shapely.box(0, 0, layout.width / mpp, layout.height / mpp)
    out = []
    for t in layout.tubules:
        poly = Polygon(t.polygon(96) / mpp)
        if t.edge_cut or not tissue.contains(poly):
            poly = poly.intersection(tissue).intersection(frame)
        if poly.is_empty or poly.area <= 0:
            continue
        if poly.geom_type != "Polygon":  # A torn edge can split a tubule: keep its largest part.
            poly = max(poly.geoms, key=lambda g: g.area)
        cut = "grazing" if t.grazing else ("edge" if t.edge_cut else "full")
        out.append(
            SlideObject(
                geometry=poly,
                classification=STAGES[t.stage],
                color=stage_color(t.stage),
                measurements={"Major axis um": 2 * t.a, "Minor axis um": 2 * t.b},
                properties={"stageable": t.stageable, "cut": cut, "tubule": t.index},
            )
        )
    return out


def read_ground_truth(path: str | os.PathLike) -> list[SlideObject]:
    """The tubules of a section's ground_truth.geojson (or of the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "ground_truth.geojson"
    objects = read_geojson(path)
    for obj in objects:
        if parse_stage(obj.classification or "") is None:
            raise ConfigError(f"{path}: classification {obj.classification!r} is not a stage")
    return objects


def ground_truth_overview(
    section_dir: str | os.PathLike, png: str | os.PathLike, max_size: int = 1200
) -> Path:
    """A downsampled view of a section with its ground-truth outlines (stage colours;
    white dashes: not stageable), as a palette PNG; docs/section_ground_truth.png."""
    from PIL import Image, ImageDraw  # Only for this picture.

    from stagejax.slides import open_slide

    section_dir = Path(section_dir)
    with open_slide(section_dir / "section.tif") as slide:
        thumb = Image.fromarray(slide.thumbnail(max_size))
        k = thumb.width / slide.dimensions[0]
    draw = ImageDraw.Draw(thumb)
    for obj in read_ground_truth(section_dir):
        pts = [(x * k, y * k) for x, y in obj.geometry.exterior.coords]
        stageable = obj.properties.get("stageable", True)
        color = obj.color or (0, 0, 0) if stageable else (255, 255, 255)
        draw.line(pts, fill=color, width=3 if stageable else 2)
        if stageable:
            c = obj.geometry.centroid
            draw.text((c.x * k - 6, c.y * k - 5), obj.classification, fill=(0, 0, 0))
    thumb.quantize(192, dither=Image.Dither.NONE).save(png, optimize=True)
    return Path(png)


def render_section(
    out_dir: str | os.PathLike,
    seed: int,
    mpp: float | None = None,
    stain_shift: float = 0.0,
    size_mm: tuple[float, float] = STUDY_SIZE_MM,
    *,
    tile_size: int = 512,
    compression: str = "jpeg",
    num_workers: int | None = None,
    params: SceneParams | None = None,
) -> Path:
    """Render SIMULATED section ``seed`` into the new or empty folder ``out_dir``; returns it.

    ``mpp`` (um/px, default ``DEFAULT_MPP``, an estimate of the study's scale) changes the
    resolution, not the anatomy. ``stain_shift`` moves the staining as for the tubule
    simulator (e.g. 1.0: a held-out staining). The same arguments give the same pixels,
    whatever ``tile_size`` or ``num_workers`` (default min(2, CPUs)). The folder appears
    only once complete; bad arguments raise ConfigError before anything is written.
    """
    mpp = DEFAULT_MPP if mpp is None else mpp
    size_mm = check_arguments(seed, mpp, stain_shift, size_mm)
    params = params or SCENE
    out = Path(out_dir).expanduser()
    files.check_output_dir(out)
    start = time.monotonic()
    layout = section_layout.plan_section(int(seed), size_mm)
    look = sample_look(int(seed), float(mpp), float(stain_shift), params)
    workers = min(2, os.cpu_count() or 1) if num_workers is None else max(1, num_workers)
    renderer = SectionRenderer(layout, look, workers)
    log.warning(
        "Rendering SIMULATED section (not real data): %d x %d px%s, %d tubules, seed %d",
        renderer.width,
        renderer.height,
        f" (drawn {renderer.k}x finer, then reduced)" if renderer.k > 1 else "",
        len(layout.tubules),
        seed,
    )

    def fill(tmp: Path) -> None:
        try:
            write_pyramidal_tiff(
                tmp / "section.tif",
                renderer.region,
                float(mpp),
                size=(renderer.width, renderer.height),
                tile_size=tile_size,
                compression=compression,
            )
        finally:
            renderer.close()
        write_geojson(tmp / "ground_truth.geojson", ground_truth(layout, float(mpp)))
        _write_meta(tmp, seed, mpp, stain_shift, size_mm, layout, renderer)

    if not files.new_dir(out, fill, "the section"):
        raise ConfigError(f"out: {out} was filled by someone else while rendering")
    log.info("%s: section in %.1f s", out, time.monotonic() - start)
    return out


def _write_meta(root: Path, seed, mpp, stain_shift, size_mm, layout, renderer) -> None:
    n = len(layout.tubules)
    meta = dict(
        simulated=True,
        note="SIMULATED testis section from stagejax.simulate (section); not real tissue.",
        generator_version=GENERATOR_VERSION,
        seed=int(seed),
        mpp=float(mpp),
        mpp_note="default mpp is an estimate of the study's scale (see stagejax.simulate.section)",
        stain_shift=float(stain_shift),
        size_mm=list(size_mm),
        size_px=[renderer.width, renderer.height],
        tubules=n,
        stageable=sum(t.stageable for t in layout.tubules),
        stages=list(STAGES),
    )
    (root / "SIMULATED.json").write_text(json.dumps(meta, indent=1) + "\n")
