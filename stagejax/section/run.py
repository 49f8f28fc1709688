"""``--mode=section``: detect, cut and stage every tubule of one slide or a folder of slides.

Per slide, ``W/sections/<slide name>/`` gets the outputs of `outputs` plus
``section.json`` (written last, with the stage model it came from and the time
of each part). A slide whose ``section.json`` names the same stage model is
done: a folder run that was stopped resumes at the first unfinished slide.
Outputs a different model made are never replaced unless
``config.overwrite=True``. Every slide is opened (format, pixel size) before
the first one is staged, so a bad file stops the run at once.

With several JAX processes the slides are dealt out between them; each stages
its own on its local devices, and process 0 writes ``summary.csv`` once all
are done.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from stagejax import stages
from stagejax.detect import choose
from stagejax.detect import pipeline as detect_lib
from stagejax.errors import ConfigError, DatasetError, WorkdirError
from stagejax.runtime import files
from stagejax.section import outputs, truth
from stagejax.section.crops import cut_tubule
from stagejax.section.model import StageModel, load_stage_model
from stagejax.section.stage import SLIDE_STAIN_SAMPLE, slide_stain, stage_crops
from stagejax.slides import open_slide
from stagejax.slides.reader import OPENSLIDE_SUFFIXES, PLAIN_SUFFIXES, TIFF_SUFFIXES
from stagejax.train import interrupts

log = logging.getLogger(__name__)

SECTIONS = "sections"
DONE_FILE = "section.json"
SUMMARY = "summary.csv"
SLIDE_SUFFIXES = TIFF_SUFFIXES + PLAIN_SUFFIXES + OPENSLIDE_SUFFIXES
SLIDE_MPP_FIELD = "--config.section.slide_mpp"


def list_slides(path: str | Path) -> list[Path]:
    """A slide file, or the slide files of a folder (sorted; other files ignored)."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ConfigError(f"config.section_path: {path}: no such file or folder")
    found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SLIDE_SUFFIXES)
    if not found:
        raise DatasetError(f"{p}: no slide files ({'/'.join(SLIDE_SUFFIXES)})")
    return found


def slide_name(path: Path) -> str:
    """Output folder name of a slide: its file name without the (double) suffix."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def check_slides(paths: list[Path], slide_mpp: float | None) -> None:
    """Open every slide once (format, size, pixel size): one line before any long work."""
    names: dict[str, Path] = {}
    for path in paths:
        with open_slide(path, slide_mpp, mpp_flag=SLIDE_MPP_FIELD):
            pass
        if (other := names.setdefault(slide_name(path), path)) != path:
            raise DatasetError(f"{path}: same output name as {other}; rename one of them")


def _detector(config: ml_collections.ConfigDict):
    """DetectParams (classical) or a UNetDetector, from ``config.section.detector``."""
    return choose.from_config(config.section.detector)


def _stain_sample(slide, objects, sm: StageModel) -> Iterator[np.ndarray]:
    """Up to SLIDE_STAIN_SAMPLE tubules spread over the slide, cut as for staging
    (lazily: nothing is cut when the model does not normalise stain)."""
    picks = np.unique(np.linspace(0, len(objects) - 1, min(len(objects), SLIDE_STAIN_SAMPLE)))
    for k in picks.round().astype(int):
        yield cut_tubule(slide, objects[k].geometry, sm.mpp, sm.image_size)


def stage_slide(
    path: Path, sm: StageModel, params, config: ml_collections.ConfigDict
) -> tuple[outputs.SectionResult, dict[str, float]]:
    """Detect, cut and stage one slide; (its result, seconds per part)."""
    times: dict[str, float] = {}
    slide_mpp = config.section.slide_mpp or None
    with open_slide(path, slide_mpp, mpp_flag=SLIDE_MPP_FIELD) as slide:
        t = time.perf_counter()
        det = detect_lib.detect_slide(slide, params)
        times["read_and_detect"] = time.perf_counter() - t
        cut_s = [0.0]
        t = time.perf_counter()
        source = slide_stain(sm.model, _stain_sample(slide, det.objects, sm), path.name)
        times["stain"] = time.perf_counter() - t

        def crops():
            for obj in det.objects:
                t0 = time.perf_counter()
                crop = cut_tubule(slide, obj.geometry, sm.mpp, sm.image_size)
                cut_s[0] += time.perf_counter() - t0
                yield crop

        t = time.perf_counter()
        probs = stage_crops(
            sm.model,
            crops(),
            len(det.objects),
            sm.batch_size,
            config.tta,
            desc=path.name,
            stain_source=source,
        )
        times["cut"] = cut_s[0]
        times["stage"] = time.perf_counter() - t - cut_s[0]
        mpp = slide.mpp
    tubules = [
        outputs.StagedTubule(i + 1, o.geometry, bool(o.properties.get("stageable", True)), p)
        for i, (o, p) in enumerate(zip(det.objects, probs, strict=True))
    ]
    result = outputs.SectionResult(
        slide_name=slide_name(path),
        slide_path=str(path),
        mpp=mpp,
        label_names=sm.label_names,
        stage_ranks=sm.stage_ranks,
        tubules=tubules,
        thumbnail=det.rgb,
        thumbnail_scale=det.scale,
        review_below=float(config.section.review_below),
    )
    return result, times


def _done(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / DONE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _should_stage(out_dir: Path, sm: StageModel, overwrite: bool) -> bool:
    """False for a slide this model already staged; WorkdirError for another model's
    outputs (kept unless ``overwrite``)."""
    done = _done(out_dir)
    if done is None and not out_dir.exists():
        return True
    if done is not None and done.get("model") == sm.fingerprint and not overwrite:
        log.info("%s: already staged with this model; skipped", out_dir)
        return False
    if overwrite:
        log.warning("%s: replacing earlier outputs (config.overwrite=True)", out_dir)
        return True
    made_by = f"by the model {done.get('model')}" if done else "by an unfinished or other run"
    raise WorkdirError(
        f"{out_dir}: holds outputs made {made_by}; pass --config.overwrite=True to replace them"
    )


def _write_slide(
    out_dir: Path, result, times, sm: StageModel, truth_path, detector: str = ""
) -> dict:
    """All outputs of one slide, swapped in as one folder; returns its section.json."""
    counts = outputs.stage_counts(result)
    done = {
        "slide": result.slide_path,
        "slide_mpp": result.mpp,
        "detector": detector,
        "model": sm.fingerprint,
        "model_mpp": sm.mpp,
        "image_size": sm.image_size,
        "tubules": len(result.tubules),
        "stageable": int(sum(t.stageable for t in result.tubules)),
        "counts_by_rank": [int(c) for c in counts],
        "seconds": {k: round(v, 3) for k, v in times.items()},
    }
    if truth_path is not None:
        done["truth"] = truth.compare(result, truth_path)
        truth.log_scores(result.slide_name, done["truth"])

    def fill(tmp: Path) -> None:
        t = time.perf_counter()
        outputs.write_section_outputs(tmp, result)
        done["seconds"]["write"] = round(time.perf_counter() - t, 3)
        (tmp / DONE_FILE).write_text(json.dumps(done, indent=1) + "\n")

    files.replace_dir(out_dir, fill, f"the outputs of {result.slide_name}")
    return done


def _slides(config: ml_collections.ConfigDict, sm: StageModel) -> tuple[list[Path], bool]:
    """(the slides, whether they came from a folder)."""
    if config.section_path:
        slides = list_slides(config.section_path)
        return slides, Path(config.section_path).expanduser().is_dir()
    return [truth.simulated_section(config, sm.mpp)], False


def stage_sections(config: ml_collections.ConfigDict, workdir: str | Path, claim=None) -> Path:
    """``--mode=section``; returns ``W/sections``."""
    workdir = Path(workdir)
    sm = load_stage_model(config, workdir)
    slides, folder = _slides(config, sm)
    check_slides(slides, config.section.slide_mpp or None)
    params = _detector(config)
    root = workdir / SECTIONS
    mine = slides[jax.process_index() :: jax.process_count()]
    log.info(
        "staging %d slide(s)%s with %s (%.3f um/px, %d px crops)",
        len(slides),
        f", {len(mine)} on this process" if jax.process_count() > 1 else "",
        sm.source,
        sm.mpp,
        sm.image_size,
    )
    root.mkdir(parents=True, exist_ok=True)
    finished = 0
    try:
        for path in mine:
            _stage_one(path, root, sm, params, config, f"{finished + 1}/{len(mine)}")
            finished += 1
            if claim is not None:
                claim.keep()  # a later failure keeps the slides already finished
    except interrupts.Interrupted as e:
        if not finished:
            raise
        raise interrupts.Interrupted(
            e.signum,
            f"stopped by {e.name} after {finished} of {len(mine)} slide(s) (outputs in {root}); "
            "rerun the same command to resume at the first unfinished slide",
        ) from None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("stagejax section: all slides staged")
    if folder and jax.process_index() == 0:
        _write_summary(root, slides, sm)
    return root


def _stage_one(path: Path, root: Path, sm, params, config, where: str) -> None:
    """Stage ``path`` unless this model already did."""
    out_dir = root / slide_name(path)
    if not _should_stage(out_dir, sm, bool(config.get("overwrite", False))):
        return
    t = time.perf_counter()
    result, times = stage_slide(path, sm, params, config)
    done = _write_slide(out_dir, result, times, sm, truth.truth_file(path), choose.describe(params))
    log.info(
        "%s (%s): %d tubules (%d stageable) in %.1f s -> %s",
        path.name,
        where,
        done["tubules"],
        done["stageable"],
        time.perf_counter() - t,
        out_dir,
    )


def _write_summary(root: Path, slides: list[Path], sm: StageModel) -> Path:
    rows = []
    for path in slides:
        done = _done(root / slide_name(path))
        if done is None:
            raise WorkdirError(f"{root / slide_name(path)}: {DONE_FILE} missing after staging")
        counts = np.asarray(done["counts_by_rank"])
        rows.append((slide_name(path), done["tubules"], done["stageable"], counts))
    names = stages.names_by_rank(sm.label_names, sm.stage_ranks)
    path = outputs.write_summary(root / SUMMARY, rows, names)
    log.info("wrote %s (%d slides)", path, len(rows))
    return path
