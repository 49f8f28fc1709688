"""``--mode=section``: detect, cut and stage every tubule of one slide or a folder of slides.

Per slide, ``W/sections/<slide name>/`` gets the outputs of `outputs` plus
``section.json`` (written last, with what made them: the slide's path and
content fingerprint, the stage model, the settings; see `record`). A slide
whose record matches is done: a folder run that was stopped resumes at the
first unfinished slide. Outputs of another slide or model are never replaced
unless ``--overwrite``; that is decided for every slide before the
first is staged. Every slide is opened (format, pixel size) first too.

One bad slide does not stop a folder: it is named in a warning, skipped, and
listed with its error in ``summary.csv``; the rest are staged.
``--strict`` makes the run exit with an error at the end.

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
from stagejax.errors import ConfigError, DatasetError, ResourceError
from stagejax.runtime import files
from stagejax.section import folder as folder_lib
from stagejax.section import outputs, record, truth
from stagejax.section.crops import cut_tubule, cut_tubules, default_workers
from stagejax.section.model import StageModel, load_stage_model
from stagejax.section.options import FLAG, SectionOptions
from stagejax.section.progress import Progress
from stagejax.section.stage import SLIDE_STAIN_SAMPLE, slide_stain, stage_crops
from stagejax.slides import open_slide
from stagejax.slides.reader import OPENSLIDE_SUFFIXES, PLAIN_SUFFIXES, TIFF_SUFFIXES
from stagejax.train import interrupts

log = logging.getLogger(__name__)

SECTIONS = "sections"
DONE_FILE = record.DONE_FILE
SUMMARY = folder_lib.SUMMARY
FAILED = folder_lib.FAILED
SLIDE_ERRORS = (DatasetError, ResourceError)  # a slide's own problem: skip it, go on
SLIDE_SUFFIXES = TIFF_SUFFIXES + PLAIN_SUFFIXES + OPENSLIDE_SUFFIXES
SLIDE_MPP_FIELD = FLAG["slide_mpp"]


def list_slides(path: str | Path) -> list[Path]:
    """A slide file, or the slide files of a folder (sorted; other files ignored)."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ConfigError(f"--slides: {path}: no such file or folder")
    found = sorted(
        f
        for f in p.iterdir()
        if f.is_file() and f.suffix.lower() in SLIDE_SUFFIXES and not f.name.startswith(".")
    )  # hidden files and macOS's ._* companions are not slides
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


def check_slides(paths: list[Path], slide_mpp: float | None) -> dict[Path, str]:
    """Open every slide once (format, size, pixel size) before any long work; returns
    {slide: why} for those that cannot be read. Two slides with one output name stop
    the run (one line)."""
    names: dict[str, Path] = {}
    bad: dict[Path, str] = {}
    for path in paths:
        if (other := names.setdefault(slide_name(path), path)) != path:
            raise DatasetError(f"{path}: same output name as {other}; rename one of them")
        try:
            with open_slide(path, slide_mpp, mpp_flag=SLIDE_MPP_FIELD):
                pass
        except SLIDE_ERRORS as e:
            bad[path] = str(e)
    return bad


def _detector(opts: SectionOptions):
    """DetectParams (classical) or a UNetDetector, from ``--detector``."""
    return choose.from_config(opts.detector, FLAG["detector"])


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


def stage_slide(
    path: Path, sm: StageModel, params, opts: SectionOptions
) -> tuple[outputs.SectionResult, dict[str, float]]:
    """Detect, cut and stage one slide; (its result, seconds per part)."""
    times: dict[str, float] = {}
    slide_mpp = opts.slide_mpp or None
    with open_slide(path, slide_mpp, mpp_flag=SLIDE_MPP_FIELD) as slide:
        t = time.perf_counter()
        try:
            det = detect_lib.detect_slide(slide, params)
        except DatasetError as e:  # its hint names detect's flag; here the field is another
            raise DatasetError(str(e).replace("(--mpp)", f"({SLIDE_MPP_FIELD})")) from None
        times["read_and_detect"] = time.perf_counter() - t
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
        review_below=float(opts.review_below),
    )
    return result, times


def _write_slide(out_dir: Path, result, times, sm: StageModel, truth_path, key: dict) -> dict:
    """All outputs of one slide, swapped in as one folder; returns its section.json.
    ``key``: what made them (`record`): slide_file, detector, settings."""
    counts = outputs.stage_counts(result)
    done = {
        "slide": result.slide_path,
        "slide_file": key["slide_file"],
        "settings": key["settings"],
        "slide_mpp": result.mpp,
        "detector": key["detector"],
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
        done["files"] = record.file_hashes(tmp)  # a later run sees hand edits
        (tmp / DONE_FILE).write_text(json.dumps(done, indent=1) + "\n")

    files.replace_dir(out_dir, fill, f"the outputs of {result.slide_name}")
    return done


def _slides(
    config: ml_collections.ConfigDict, opts: SectionOptions, sm: StageModel
) -> tuple[list[Path], bool]:
    """(the slides, whether they came from a folder)."""
    if opts.slides:
        slides = list_slides(opts.slides)
        return slides, Path(opts.slides).expanduser().is_dir()
    return [truth.simulated_section(config.cache_dir, opts, sm.mpp)], False


def _keys(slides, bad, sm: StageModel, config, opts, params) -> dict[Path, dict]:
    """What would make each readable slide's outputs (`record`)."""
    detector = choose.describe(params)
    now = record.settings(config, opts, sm, detector)
    return {
        p: {"slide_file": record.slide_fingerprint(p), "settings": now, "detector": detector}
        for p in slides
        if p not in bad
    }


def _plan(root: Path, keys: dict[Path, dict], sm: StageModel, overwrite: bool) -> dict[Path, str]:
    """STAGE or SKIP per slide, decided for all before any is staged (every process
    decides alike), so a refusal is one line before any work."""
    return {
        p: record.decide(
            root / slide_name(p), k["slide_file"], sm.fingerprint, k["settings"], overwrite
        )
        for p, k in keys.items()
    }


def _unreadable(bad: dict[Path, str], slides: list[Path], folder: bool, where: str) -> None:
    """A lone slide, or a folder of nothing but bad slides, stops the run (one line);
    otherwise each bad slide is named once, before any work."""
    if bad and not folder:
        raise DatasetError(next(iter(bad.values())))
    if bad and len(bad) == len(slides):
        first = next(iter(bad.values()))
        raise DatasetError(f"{where}: none of its {len(slides)} slides can be read ({first})")
    for path, why in bad.items():
        log.warning("%s: cannot be read; skipped (%s)", path.name, why.removeprefix(f"{path}: "))


def stage_sections(
    config: ml_collections.ConfigDict, workdir: str | Path, opts: SectionOptions, claim=None
) -> Path:
    """``--mode=section`` with the recipe ``config`` of ``workdir``; returns ``W/sections``."""
    workdir = Path(workdir)
    sm = load_stage_model(config, workdir)
    slides, folder = _slides(config, opts, sm)
    shard = folder_lib.parse_shard(opts.shard)
    slides = shard.take(slides)
    if not slides:  # a folder of fewer slides than shards
        log.info("shard %s: no slide of %s falls to this job; nothing to do", shard, opts.slides)
        return workdir / SECTIONS
    bad = check_slides(slides, opts.slide_mpp or None)
    _unreadable(bad, slides, folder, opts.slides)
    params = _detector(opts)
    root = workdir / SECTIONS
    keys = _keys(slides, bad, sm, config, opts, params)
    plans = _plan(root, keys, sm, opts.overwrite)
    mine = slides[jax.process_index() :: jax.process_count()]
    log.info(
        "staging %d slide(s)%s%s with %s (%.3f um/px, %d px crops)",
        len(slides),
        f" (shard {shard} of the folder)" if shard.count > 1 else "",
        f", {len(mine)} on this process" if jax.process_count() > 1 else "",
        sm.source,
        sm.mpp,
        sm.image_size,
    )
    root.mkdir(parents=True, exist_ok=True)
    done = _stage_mine(mine, root, (sm, params, opts, keys, plans, bad, folder), claim)
    if folder:
        log.info("%s", done.totals())
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("stagejax section: all slides staged")
    failed = folder_lib.failures(root, [slide_name(p) for p in slides])
    if folder and jax.process_index() == 0:
        _finish_folder(root, slides, sm, failed, shard)
    folder_lib.report_failures(failed, len(slides), root, opts.strict)
    log.info(
        "to correct them: open %s/<slide>/tubules.geojson in QuPath, export the corrected "
        "objects, then python -m stagejax.section export turns them into a training set",
        root,
    )
    return root


def _stage_mine(mine: list[Path], root: Path, plan: tuple, claim) -> Progress:
    """This process's slides in turn; a stop after some are done says how to resume."""
    progress = Progress(len(mine))
    try:
        for path in mine:
            if _stage_one(path, root, *plan, progress) and claim is not None:
                claim.keep()  # a later failure keeps the slides already finished
    except interrupts.Interrupted as e:
        finished = progress.staged + progress.skipped
        if not finished:
            raise
        raise interrupts.Interrupted(
            e.signum,
            f"stopped by {e.name} after {finished} of {len(mine)} slide(s) (outputs in {root}); "
            "rerun the same command to resume at the first unfinished slide",
        ) from None
    return progress


def _stage_one(path, root, sm, params, opts, keys, plans, bad, folder, progress) -> bool:
    """Stage ``path`` as planned; in a folder run a slide that fails is skipped and
    recorded (one bad slide does not stop a folder). Returns whether it is done."""
    failure = root / FAILED / f"{slide_name(path)}.txt"
    failure.unlink(missing_ok=True)
    where = progress.where()
    try:
        if path in bad:
            raise DatasetError(bad[path])
        if plans[path] == record.SKIP:
            progress.passed(failed=False)
            return True
        _stage(path, root / slide_name(path), sm, params, opts, keys[path], progress)
        return True
    except SLIDE_ERRORS as e:
        if not folder:
            raise
        progress.passed(failed=True)
        why = str(e).removeprefix(f"{path}: ")
        if path not in bad:  # unreadable ones were named before any work
            log.warning("%s (%s): skipped: %s", path.name, where, why)
        failure.parent.mkdir(exist_ok=True)
        failure.write_text(why + "\n")
        return False


def _stage(path: Path, out_dir: Path, sm, params, opts, key: dict, progress: Progress) -> None:
    t = time.perf_counter()
    where = progress.where()
    result, times = stage_slide(path, sm, params, opts)
    done = _write_slide(out_dir, result, times, sm, truth.truth_file(path), key)
    seconds = time.perf_counter() - t
    log.info(
        "%s (%s): %d tubules (%d stageable) in %.1f s, %s -> %s",
        path.name,
        where,
        done["tubules"],
        done["stageable"],
        seconds,
        progress.staged_one(done["tubules"], seconds),
        out_dir,
    )


def _finish_folder(root: Path, slides, sm: StageModel, failed: dict, shard) -> None:
    """summary.csv of the folder; a shard leaves it to `folder_lib.merge`, once all have ended."""
    if shard.count > 1:
        log.info(
            "shard %s done; when every shard has ended: python -m stagejax.section merge "
            "--sections %s (writes summary.csv and stage_frequencies.csv there)",
            shard,
            root,
        )
        return
    names = stages.names_by_rank(sm.label_names, sm.stage_ranks)
    path = folder_lib.write_folder_summary(root, [slide_name(p) for p in slides], names, failed)
    log.info("wrote %s (%d slides)", path, len(slides))
