"""The per-slide pictures of section mode: a stage-frequency chart and a stage map.

Both take plain values (names, percentages, outlines with colours), not a
``SectionResult``, so they can be drawn and tested on their own; ``outputs``
decides what goes in them. The chart uses matplotlib's Agg canvas directly (no
pyplot, no global backend state), imported only when drawing; the map is drawn
with PIL at the thumbnail's own pixels, so its size is exact and thousands of
tubules stay cheap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from shapely.geometry import MultiPolygon, Polygon

RGB = tuple[int, int, int]
NOT_STAGEABLE_COLOR: RGB = (150, 150, 150)
OBSERVED_COLOR = "#3a6fb0"
EXPECTED_COLOR = "#c8c8c8"
FILL_ALPHA = 110  # of 255: the tissue stays visible under the stage colour
DASH_COLORS: tuple[RGB, RGB] = ((255, 255, 255), (0, 0, 0))  # seen on light and dark tissue
OVERLAY_MAX_SIDE = 2000


@dataclasses.dataclass(frozen=True)
class Outline:
    """One tubule on the map: filled with `color`; `flagged` adds a dashed white/black
    edge (low confidence: look at it again)."""

    geometry: Polygon | MultiPolygon  # level-0 slide px
    color: RGB
    flagged: bool = False


def plot_stage_frequencies(
    path: Path,
    names: Sequence[str],
    percent: np.ndarray,
    expected_percent: np.ndarray,
    counts: np.ndarray,
    title: str,
) -> None:
    """Observed % per stage (count above each bar) next to the % expected from stage
    durations (grey, hatched), stages in cycle order; PNG to `path`. One colour for the
    observed bars: stage colours would make the legend's swatch read as one stage."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy: only when drawing
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.arange(len(names))
    bars = ax.bar(
        x - 0.2,
        percent,
        0.4,
        color=OBSERVED_COLOR,
        edgecolor="#333333",
        lw=0.8,
        label="this slide: % of stageable tubules (count on top)",
    )
    ax.bar(
        x + 0.2,
        expected_percent,
        0.4,
        color=EXPECTED_COLOR,
        edgecolor="#777777",
        hatch="//",
        lw=0.8,
        label="expected from stage durations",
    )
    ax.bar_label(bars, [str(int(c)) for c in counts], fontsize=9, color="#333333", padding=2)
    top = max(float(np.max(percent, initial=0)), float(np.max(expected_percent, initial=0)))
    ax.set_ylim(0, 1.2 * top if top > 0 else 1)
    if not np.any(counts):
        ax.text(
            0.5,
            0.6,
            "no stageable tubules",
            transform=ax.transAxes,
            ha="center",
            fontsize=14,
            color="#c0392b",
        )
    ax.set_xticks(x, list(names), fontsize=11)
    ax.set_xlabel("Stage", fontsize=12)
    ax.set_ylabel("Tubule cross-sections (%)", fontsize=12)
    ax.set_title(title, fontsize=13)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=10, frameon=False, loc="upper right")
    fig.savefig(path, format="png")


def _legend_panel(entries: Sequence[tuple[str, RGB | None]], font_px: int) -> Image.Image:
    """White panel: a swatch and a label per entry; colour None = the dashed 'flagged' edge."""
    font = ImageFont.load_default(size=font_px)  # scalable where FreeType is
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((probe.textbbox((0, 0), t, font=font)[2] for t, _ in entries), default=0)
    pad, sw, line = font_px, font_px, round(1.6 * font_px)
    panel = Image.new(
        "RGB", (2 * pad + sw + font_px // 2 + text_w, 2 * pad + line * len(entries)), "white"
    )
    draw = ImageDraw.Draw(panel)
    for i, (text, color) in enumerate(entries):
        y = pad + i * line
        box = [(pad, y), (pad + sw, y), (pad + sw, y + sw), (pad, y + sw), (pad, y)]
        if color is None:
            _dashed_line(draw, box, max(2, font_px // 6), max(3, font_px // 3))
        else:
            draw.rectangle([pad, y, pad + sw, y + sw], fill=color, outline=(60, 60, 60))
        draw.text((pad + sw + font_px // 2, y + sw / 2), text, fill="black", font=font, anchor="lm")
    return panel


def _dashed_line(draw: ImageDraw.ImageDraw, xy, width: int, dash: float) -> None:
    """`xy` as dashes of length `dash` alternating DASH_COLORS, following every corner."""
    pts = np.asarray(xy, np.float64)
    cum = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(pts, axis=0).T))])
    if len(pts) < 2 or cum[-1] <= 0:
        return
    marks = np.append(np.arange(0.0, cum[-1], dash), cum[-1])
    at = np.stack([np.interp(marks, cum, pts[:, 0]), np.interp(marks, cum, pts[:, 1])], 1)
    for i in range(len(marks) - 1):
        inner = pts[(cum > marks[i]) & (cum < marks[i + 1])]
        seg = [tuple(at[i]), *map(tuple, inner), tuple(at[i + 1])]
        draw.line(seg, fill=DASH_COLORS[i % 2], width=width, joint="curve")


def _rings(geometry: Polygon | MultiPolygon, sx: float, sy: float) -> list[list[tuple]]:
    """Outer edges in map px (holes are drawn filled: a tubule's lumen is part of it)."""
    return [
        [(x * sx, y * sy) for x, y in poly.exterior.coords]
        for poly in getattr(geometry, "geoms", [geometry])
    ]


def _draw_outlines(img: Image.Image, outlines: Sequence[Outline], sx: float, sy: float) -> None:
    """Fills (semi-transparent), then edges, then dashed flags on top of everything."""
    width = max(1, round(max(img.size) / 1000))
    fills = Image.new("RGBA", img.size, (0, 0, 0, 0))
    fill_draw = ImageDraw.Draw(fills)
    for o in outlines:
        for ring in _rings(o.geometry, sx, sy):
            fill_draw.polygon(ring, fill=(*o.color, FILL_ALPHA))
    img.paste(Image.alpha_composite(img.convert("RGBA"), fills).convert("RGB"))
    draw = ImageDraw.Draw(img)
    for o in outlines:
        for ring in _rings(o.geometry, sx, sy):
            draw.line(ring, fill=o.color, width=width, joint="curve")
    for o in (o for o in outlines if o.flagged):
        for ring in _rings(o.geometry, sx, sy):
            _dashed_line(draw, ring, width + 1, 4 * (width + 1))


def draw_overlay(
    thumbnail: np.ndarray,
    scale: tuple[float, float],
    outlines: Sequence[Outline],
    legend: Sequence[tuple[str, RGB | None]],
    max_side: int = OVERLAY_MAX_SIDE,
) -> Image.Image:
    """The section with every tubule filled by its colour and `legend` on a panel to the
    right; `scale` = level-0 px per thumbnail px. The whole picture fits `max_side`."""
    img = Image.fromarray(np.asarray(thumbnail, np.uint8)).convert("RGB")
    font_px = int(np.clip(min(max(img.size), max_side) / 70, 11, 28))
    panel = _legend_panel(legend, font_px)
    f = min(1.0, (max_side - panel.width) / img.width, max_side / img.height)
    img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))))
    sx, sy = img.width / thumbnail.shape[1] / scale[0], img.height / thumbnail.shape[0] / scale[1]
    _draw_outlines(img, outlines, sx, sy)
    canvas = Image.new("RGB", (img.width + panel.width, max(img.height, panel.height)), "white")
    canvas.paste(img, (0, 0))
    canvas.paste(panel, (img.width, 0))
    return canvas


def save_png(img: Image.Image, path: Path, keep: Sequence[RGB] = ()) -> None:
    """A palette PNG: an adaptive palette for the tissue plus the `keep` colours exactly
    (stage colours cover too few pixels to win palette entries of their own), no
    dithering, which would defeat the compression."""
    keep = list(dict.fromkeys(tuple(int(v) for v in c) for c in keep))[:128]
    n = 256 - len(keep)
    adaptive = img.quantize(colors=n, dither=Image.Dither.NONE).getpalette()[: 3 * n]
    flat = adaptive + [v for c in keep for v in c]
    palette = Image.new("P", (1, 1))
    palette.putpalette(flat + flat[-3:] * (256 - len(flat) // 3))
    quantized = img.quantize(palette=palette, dither=Image.Dither.NONE)
    quantized.save(path, format="PNG", optimize=True)
