"""One slide through section mode: opened, its tubules detected, cut as the study
cut them and staged in batches, the cutting threads feeding the device.

`stage_slide` is the whole of it; a folder run (`stagejax.section.run`) calls its
two halves, `detect_one` and `stage_detected`, so that the next slide is detected
while the current one is staged (`stagejax.section.overlap`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from stagejax.detect import pipeline as detect_lib
from stagejax.errors import DatasetError
from stagejax.section import outputs
from stagejax.section.crops import cut_tubule, cut_tubules, default_workers
from stagejax.section.model import StageModel
from stagejax.section.options import FLAG, SectionOptions
from stagejax.section.stage import SLIDE_STAIN_SAMPLE, slide_stain, stage_crops
from stagejax.slides import Slide, open_slide

SLIDE_MPP_FIELD = FLAG["slide_mpp"]
Detected = tuple[Slide, detect_lib.Detection, dict[str, float]]


def slide_name(path: Path) -> str:
    """Output folder name of a slide: its file name without the (double) suffix."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _stain_sample(slide, objects, sm: StageModel) -> Iterator[np.ndarray]:
    """Up to SLIDE_STAIN_SAMPLE tubules spread over the slide, cut as for staging
    (lazily: nothing is cut when the model does not normalise stain)."""
    picks = np.unique(np.linspace(0, len(objects) - 1, min(len(objects), SLIDE_STAIN_SAMPLE)))
    for k in picks.round().astype(int):
        yield cut_tubule(slide, objects[k].geometry, sm.mpp, sm.image_size)


def _waited(items: Iterator, seconds: list[float]) -> Iterator:
    """``items``, adding to ``seconds[0]`` the time spent waiting for each (how long
    staging waited for the cutting threads)."""
    items = iter(items)
    while True:
        t = time.perf_counter()
        item = next(items, None)
        seconds[0] += time.perf_counter() - t
        if item is None:
            return
        yield item


def detect_one(path: Path, params, opts: SectionOptions) -> Detected:
    """Open ``path`` and detect its tubules: (the slide, left open for cutting, its
    detection, seconds). The job `overlap.Ahead` runs for the next slide."""
    slide = open_slide(path, opts.slide_mpp or None, mpp_flag=SLIDE_MPP_FIELD)
    try:
        t = time.perf_counter()
        det = detect_lib.detect_slide(slide, params)
        return slide, det, {"read_and_detect": time.perf_counter() - t}
    except DatasetError as e:  # its hint names detect's flag; here the field is another
        slide.close()
        raise DatasetError(str(e).replace("(--mpp)", f"({SLIDE_MPP_FIELD})")) from None
    except BaseException:
        slide.close()
        raise


def stage_detected(
    path: Path, detected: Detected, sm: StageModel, opts: SectionOptions
) -> tuple[outputs.SectionResult, dict[str, float]]:
    """Cut and stage the tubules of a detected slide, then close it; (its result,
    seconds per part)."""
    slide, det, times = detected
    with slide:
        cut_s = [0.0]
        t = time.perf_counter()
        source = slide_stain(sm.model, _stain_sample(slide, det.objects, sm), path.name)
        times["stain"] = time.perf_counter() - t
        workers = opts.cut_workers or default_workers()
        cuts = cut_tubules(slide, (o.geometry for o in det.objects), sm.mpp, sm.image_size, workers)
        t = time.perf_counter()
        probs = stage_crops(
            sm.model,
            _waited(cuts, cut_s),
            len(det.objects),
            sm.batch_size,
            opts.tta,
            desc=path.name,
            stain_source=source,
        )
        times["cut"] = cut_s[0]
        times["stage"] = time.perf_counter() - t - cut_s[0]
    tubules = [
        outputs.StagedTubule(i + 1, o.geometry, bool(o.properties.get("stageable", True)), p)
        for i, (o, p) in enumerate(zip(det.objects, probs, strict=True))
    ]
    result = outputs.SectionResult(
        slide_name=slide_name(path),
        slide_path=str(path),
        mpp=slide.mpp,
        label_names=sm.label_names,
        stage_ranks=sm.stage_ranks,
        tubules=tubules,
        thumbnail=det.rgb,
        thumbnail_scale=det.scale,
        review_below=float(opts.review_below),
    )
    return result, times


def stage_slide(
    path: Path, sm: StageModel, params, opts: SectionOptions
) -> tuple[outputs.SectionResult, dict[str, float]]:
    """Detect, cut and stage one slide, nothing beside it; (its result, seconds per part)."""
    return stage_detected(path, detect_one(path, params, opts), sm, opts)
