"""Contact sheet: one labelled SIMULATED tubule per stage, to see what the simulator draws.

docs/contact_sheet.png is made with
``python -m stagejax.simulate tubules --contact_sheet docs/contact_sheet.png``, without
``--reference``: the real reference image (H&E, another study) states no licence, so
pictures committed to the repository must not embed it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stagejax.errors import ConfigError
from stagejax.runtime import files
from stagejax.simulate import scene
from stagejax.simulate.scene import SceneParams
from stagejax.simulate.tubules import image_seed, slide_stains
from stagejax.stages import NUM_STAGES, STAGES

# (overview title, overview tile, detail title, detail tile) of one column.
Panel = tuple[str, Image.Image, str, Image.Image]


def render_stage_examples(
    image_size: int,
    seed: int = 0,
    stain_shift: float = 0.0,
    params: SceneParams | None = None,
    phase_in_stage: float = 0.5,
) -> list[np.ndarray]:
    """One image per stage I..XII, same slide, at ``phase_in_stage`` within each stage."""
    params = params or SceneParams()
    stain = slide_stains(1, seed, stain_shift, params)[0]
    return [
        scene.render_image_at_phase(
            s + phase_in_stage, stain, image_size, image_seed(seed, 10_000 + s), params
        )
        for s in range(NUM_STAGES)
    ]


def contact_sheet(
    path: str | os.PathLike,
    seed: int = 0,
    reference: str | os.PathLike | None = None,
    render_size: int = 1152,
    tile: int = 384,
    columns: int = 7,
    stain_shift: float = 0.0,
) -> Path:
    """Labelled grid: per stage, the whole simulated field and a 1:1 detail of it.

    Images are rendered at ``render_size`` (the study's 1,152 px); overview tiles are
    reduced to ``tile`` px, detail tiles are unscaled crops from the membrane to the lumen.
    With ``reference`` (the real stage I-II image), it is shown the same two ways, its
    detail scaled so that nuclei have the same size in pixels as in the simulation.
    """
    if reference is not None and not Path(reference).is_file():
        raise ConfigError(f"reference: {reference} is not a file")
    images = render_stage_examples(render_size, seed, stain_shift=stain_shift)
    x0, y0 = int(0.5 * render_size - 0.42 * render_size), (render_size - tile) // 2
    panels: list[Panel] = []
    for s, img in enumerate(images):
        full = Image.fromarray(img)
        panels.append(
            (
                f"stage {STAGES[s]} (SIMULATED)",
                full.resize((tile, tile), Image.LANCZOS),
                f"stage {STAGES[s]}, detail 1:1",
                full.crop((x0, y0, x0 + tile, y0 + tile)),
            )
        )
    if reference is not None:
        panels.append(_reference_panel(Path(reference), render_size, tile))
    sheet = _grid(panels, tile, columns)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # An adaptive 256-colour palette keeps the file small; H-PAS hues are few.
    quantized = sheet.quantize(
        256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG
    )
    files.atomic_write(path, lambda tmp: quantized.save(tmp, format="PNG", optimize=True))
    return path


def _reference_panel(reference: Path, render_size: int, tile: int) -> Panel:
    """The real image, whole and as a detail at the simulation's nucleus size in pixels."""
    ref = Image.open(reference).convert("RGB")
    over = ref.copy()
    over.thumbnail((tile, tile))
    canvas = Image.new("RGB", (tile, tile), "white")
    canvas.paste(over, ((tile - over.width) // 2, (tile - over.height) // 2))
    # Real round-spermatid nuclei are ~15 px in radius there; scale to ours.
    scale = SceneParams().cell_scale * render_size / 15.0
    side = int(tile / scale)
    detail = ref.crop((20, 300, 20 + side, 300 + side)).resize((tile, tile), Image.LANCZOS)
    return (
        "REAL reference, stage I-II",
        canvas,
        "REAL reference, detail (same nucleus scale)",
        detail,
    )


def _grid(panels: list[Panel], tile: int, columns: int) -> Image.Image:
    """Panels in rows of ``columns``, each as a titled overview above its titled detail."""
    pad, head = 8, 26
    font = ImageFont.load_default(size=18)
    n_rows = 2 * math.ceil(len(panels) / columns)
    sheet = Image.new(
        "RGB", (columns * (tile + pad) + pad, n_rows * (tile + pad + head) + pad), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for i, (title, over, dtitle, detail) in enumerate(panels):
        x = pad + (i % columns) * (tile + pad)
        for k, (t, im) in enumerate(((title, over), (dtitle, detail))):
            y = pad + (2 * (i // columns) + k) * (tile + pad + head)
            draw.text((x + 4, y + 3), t, fill="black", font=font)
            sheet.paste(im, (x, y + head))
    return sheet
