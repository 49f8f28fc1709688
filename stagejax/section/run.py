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

import functools
import json
import logging
import time
from pathlib import Path

import jax
import ml_collections
from jax.experimental import multihost_utils

from stagejax import stages
from stagejax.detect import choose
from stagejax.errors import ConfigError, DatasetError, ResourceError
from stagejax.runtime import files
from stagejax.section import folder as folder_lib
from stagejax.section import outputs, overlap, record, truth
from stagejax.section.model import StageModel, load_stage_model
from stagejax.section.options import FLAG, SectionOptions
from stagejax.section.pipeline import SLIDE_MPP_FIELD, detect_one, slide_name, stage_detected
from stagejax.section.progress import Progress
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
    """This process's slides in turn, the next one detected and the last one written
    beside the current one's staging (`overlap`); a stop after some are done says how
    to resume."""
    sm, params, opts, keys, plans, bad, folder = plan
    progress = Progress(len(mine))
    todo = [p for p in mine if p not in bad and plans[p] == record.STAGE]
    detect = functools.partial(detect_one, params=params, opts=opts)
    ahead = overlap.Ahead(detect, todo, lambda d: d[0].close())
    behind = overlap.Behind()
    try:
        for k, path in enumerate(mine):
            _stage_one(path, f"{k + 1}/{len(mine)}", root, plan, progress, (ahead, behind, claim))
        behind.wait()
    except interrupts.Interrupted as e:
        behind.close()  # a slide staged before the stop is written and counted
        finished = progress.staged + progress.skipped
        if not finished:
            raise
        raise interrupts.Interrupted(
            e.signum,
            f"stopped by {e.name} after {finished} of {len(mine)} slide(s) (outputs in {root}); "
            "rerun the same command to resume at the first unfinished slide",
        ) from None
    finally:
        behind.close()
        ahead.close()
    return progress


def _stage_one(path, where: str, root, plan, progress, lanes) -> None:
    """Stage ``path`` as planned, its outputs written behind; in a folder run a slide
    that fails is skipped and recorded (one bad slide does not stop a folder)."""
    sm, params, opts, keys, plans, bad, folder = plan
    ahead, behind, claim = lanes
    root.joinpath(FAILED, f"{slide_name(path)}.txt").unlink(missing_ok=True)
    try:
        if path in bad:
            raise DatasetError(bad[path])
        if plans[path] == record.SKIP:
            progress.passed(failed=False)
            if claim is not None:
                claim.keep()
            return
        result, times = stage_detected(path, ahead.take(path), sm, opts)
    except SLIDE_ERRORS as e:
        _failed(path, where, e, root, folder, progress, reported=path in bad)
        return
    out_dir = root / slide_name(path)

    def write() -> None:  # on the writing thread, while the next slide is staged
        try:
            done = _write_slide(out_dir, result, times, sm, truth.truth_file(path), keys[path])
        except SLIDE_ERRORS as e:
            _failed(path, where, e, root, folder, progress, reported=False)
            return
        seconds = progress.lap()
        rate = progress.staged_one(done["tubules"], seconds)
        log.info(
            "%s (%s): %d tubules (%d stageable) in %.1f s, %s -> %s",
            *(path.name, where, done["tubules"], done["stageable"], seconds, rate, out_dir),
        )
        if claim is not None:
            claim.keep()  # a later failure keeps the slides already finished

    behind.submit(write)


def _failed(path, where, e, root, folder, progress, reported) -> None:
    """A slide of a folder that cannot be staged: warned about (unless ``reported``
    already), recorded under FAILED, counted; a lone slide's error stops the run."""
    if not folder:
        raise e
    progress.passed(failed=True)
    why = str(e).removeprefix(f"{path}: ")
    if not reported:  # unreadable ones were named before any work
        log.warning("%s (%s): skipped: %s", path.name, where, why)
    failure = root / FAILED / f"{slide_name(path)}.txt"
    failure.parent.mkdir(exist_ok=True)
    failure.write_text(why + "\n")


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
