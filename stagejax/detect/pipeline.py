"""Detection of one slide: read it coarse, segment, outline in level-0 pixels, write outputs.

Memory stays bounded: the slide is read once, downsampled band by band to the
detector's resolution (`DetectParams.work_mpp`, 2.5 um/px by default: a 10 x 8
mm section is 4,000 x 3,200 px), and all later work is on that image.
"""

import dataclasses
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from stagejax.detect import segment
from stagejax.detect.params import DetectParams
from stagejax.errors import DatasetError
from stagejax.runtime.files import atomic_write
from stagejax.slides import Slide, SlideObject, write_geojson
from stagejax.slides.geometry import outlines

log = logging.getLogger(__name__)

CLASS_NAME, CLASS_COLOR = "Tubule", (40, 200, 60)
MIN_TISSUE_MM2 = 0.05  # Less than about two tubule cross-sections of tissue: none found.
STAGEABLE_MIN_UM2 = 8_000.0  # Smaller profiles are grazing cuts (about 100 um across).
OVERLAY_SIZE = 1200  # Longer side of detections.png in px.


@dataclasses.dataclass
class Detection:
    """What `detect_slide` found: the objects, plus the coarse image they were found on."""

    objects: list[SlideObject]  # one detection per tubule cross-section, level-0 px
    rgb: np.ndarray  # the coarse image
    labels: np.ndarray  # instance labels on it (object i is label i + 1)
    mpp: float  # um/px of the coarse image
    scale: tuple[float, float]  # level-0 px per coarse px in x and y


def read_coarse(slide: Slide, work_mpp: float) -> tuple[np.ndarray, float, tuple[float, float]]:
    """(RGB at about `work_mpp`, its exact um/px, level-0 px per coarse px in x and y)."""
    rgb = slide.read_downsampled(max(1.0, work_mpp / slide.mpp))
    w0, h0 = slide.dimensions
    scale = (w0 / rgb.shape[1], h0 / rgb.shape[0])
    return rgb, slide.mpp * (scale[0] * scale[1]) ** 0.5, scale


def grow_px(params, mpp: float) -> float:
    """`params.grow_um` in level-0 pixels of a slide of `mpp` um/px."""
    return params.grow_um / mpp


def segment_coarse(detector, rgb: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """(instance labels, tissue mask) of a coarse image by either detector."""
    if isinstance(detector, DetectParams):
        return segment.segment(rgb, mpp, detector)
    return detector.segment(rgb, mpp)


def _edge_cut(labels: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Per label 1..N: True where it touches the glass (cut by the tissue edge)."""
    near_glass = ndimage.binary_dilation(~tissue, iterations=2)
    n = int(labels.max())
    touching = np.bincount(labels[near_glass], minlength=n + 1)[1:]
    return touching > 0


def detect_slide(slide: Slide, detector) -> Detection:
    """The tubule cross-sections of `slide`; one-line DatasetError if none (or no tissue).

    `detector`: DetectParams (the classical detector) or a learned one
    (`stagejax.detect.learned.UNetDetector`, e.g. from `weights.load_weights`)."""
    rgb, mpp, scale = read_coarse(slide, detector.work_mpp)
    labels, tissue = segment_coarse(detector, rgb, mpp)
    tissue_mm2 = segment.tissue_area_mm2(tissue, mpp)
    if tissue_mm2 < MIN_TISSUE_MM2:
        raise DatasetError(
            f"{slide.path}: no tissue found ({tissue_mm2:.3f} mm^2 darker than glass at "
            f"optical density {detector.tissue_od:g}); is it a blank or overexposed scan?"
        )
    if labels.max() == 0:
        raise DatasetError(
            f"{slide.path}: no tubules found in {tissue_mm2:.2f} mm^2 of tissue; check the "
            "pixel size (--mpp) and stain, or fit the detector to the lab's sections "
            "(python -m stagejax.detect train)"
        )
    areas = np.bincount(labels.ravel())[1:] * mpp**2
    edge = _edge_cut(labels, tissue)
    objects = [
        SlideObject(
            geometry=poly,
            classification=CLASS_NAME,
            color=CLASS_COLOR,
            object_type="detection",
            measurements={"Area um^2": round(float(areas[i]), 1)},
            properties={"stageable": bool(areas[i] >= STAGEABLE_MIN_UM2 and not edge[i])},
        )
        for i, poly in enumerate(outlines(labels, scale, grow_px(detector, slide.mpp)))
    ]
    log.info("%s: %d tubules in %.2f mm^2 of tissue", slide.path, len(objects), tissue_mm2)
    return Detection(objects, rgb, labels, mpp, scale)


def overlay(detection: Detection, truth: list[SlideObject] | None = None) -> Image.Image:
    """The section downsampled, detected outlines in green (ground truth, if given, in blue)."""
    img = Image.fromarray(detection.rgb)
    f = min(1.0, OVERLAY_SIZE / max(img.size))
    img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))))
    draw = ImageDraw.Draw(img)
    sx, sy = (f / s for s in detection.scale)  # level-0 px -> overlay px
    layers = [(truth or [], (40, 60, 230)), (detection.objects, CLASS_COLOR)]
    for objects, colour in layers:
        for obj in objects:
            for poly in getattr(obj.geometry, "geoms", [obj.geometry]):
                xy = [(x * sx, y * sy) for x, y in poly.exterior.coords]
                draw.line(xy, fill=colour, width=2)
    return img


def write_outputs(out_dir: str | Path, detection: Detection) -> tuple[Path, Path]:
    """DIR/tubules.geojson and DIR/detections.png, each replaced only once written whole."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "detections.png"
    image = overlay(detection).quantize(colors=128)
    geojson = write_geojson(out_dir / "tubules.geojson", detection.objects)
    atomic_write(png, lambda tmp: image.save(tmp, format="PNG", optimize=True))
    return geojson, png
