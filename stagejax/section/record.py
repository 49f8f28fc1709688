"""What made a slide's outputs, and whether a new run may skip, redo or must refuse them.

A slide's ``section.json`` records its key: the slide (resolved path and a
content fingerprint: size, mtime and a hash of its first and last MiB), the
stage model, and every setting that changes the outputs (slide pixel size,
detector, test-time augmentation, review threshold, crop, stain). Why: outputs
are named after the slide's file name alone, so ``/data/mouse2/slideA.tif``
after ``/data/mouse1/slideA.tif`` (or a rerun with a corrected pixel size)
must not be "already staged" with the other's results.

- same slide, model and settings: skipped;
- same slide and model, other settings: staged again (a warning names what
  changed), unless the outputs were edited since they were written (e.g. a
  tubules.geojson corrected in QuPath): then refused without overwrite;
- another slide, or another model: refused in one line unless
  ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import ml_collections

from stagejax.errors import WorkdirError

log = logging.getLogger(__name__)

DONE_FILE = "section.json"
ENDS_BYTES = 1 << 20  # hashed at each end of a slide: cheap for a 10 GB scan
STAGE, SKIP = "stage", "skip"
# settings key -> the flag that sets it, for messages
FIELDS = {
    "slide_mpp": "--slide_mpp",
    "detector": "--detector",
    "tta": "--tta",
    "review_below": "--review_below",
    "crop_size": "config.crop_size",
    "model_mpp": "config.mpp",
    "image_size": "the model's image size",
    "stain": "config.stain",
}


def slide_fingerprint(path: Path) -> dict:
    """The slide's resolved path and what tells its content apart cheaply."""
    path = Path(path)
    st = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(ENDS_BYTES))
        if st.st_size > ENDS_BYTES:
            f.seek(max(ENDS_BYTES, st.st_size - ENDS_BYTES))
            digest.update(f.read(ENDS_BYTES))
    return {
        "path": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ends_sha256": digest.hexdigest(),
    }


def _stamp(value: str) -> str:
    """A detector given as a file: its size and mtime (a retrained file at the same path)."""
    p = Path(str(value)).expanduser()
    if not p.exists():
        return ""
    st = p.stat()
    return f"{st.st_size}@{st.st_mtime_ns}"


def settings(config: ml_collections.ConfigDict, opts, sm, detector: str) -> dict:
    """Every setting that changes a slide's outputs (the stage model is keyed apart):
    the mode's ``opts`` (`SectionOptions`) and the recipe's crop and stain."""
    stain = config.stain
    return {
        "slide_mpp": float(opts.slide_mpp),
        "detector": f"{detector} {_stamp(opts.detector)}".strip(),
        "tta": bool(opts.tta),
        "review_below": float(opts.review_below),
        "crop_size": int(config.crop_size),
        "model_mpp": round(float(sm.mpp), 6),
        "image_size": int(sm.image_size),
        "stain": stain.to_dict() if stain is not None else {},
    }


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every output file, so a later run sees a hand-edited one."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != DONE_FILE
    }


def read_done(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / DONE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _other_slide(done: dict, slide: dict) -> str:
    """Why ``done`` is another slide's record ("" when it is this slide's)."""
    old = done.get("slide_file") or {"path": str(Path(done.get("slide", "")).resolve())}
    if old["path"] != slide["path"]:
        return f"the results of another slide, {old['path']}"
    same = all(old.get(k, slide[k]) == slide[k] for k in ("size", "mtime_ns", "ends_sha256"))
    return "" if same else f"the results of an earlier version of {slide['path']}"


def changed(done: dict, now: dict) -> list[str]:
    """The settings that differ from the record's, as ``field old -> new``."""
    old = done.get("settings")
    if old is None:
        return ["settings not recorded (staged by an older stagejax)"]
    keys = [k for k in now if old.get(k) != now[k]]
    return [f"{FIELDS.get(k, k)} {old.get(k)!r} -> {now[k]!r}" for k in keys]


def _edited(out_dir: Path, done: dict) -> list[str]:
    recorded = done.get("files") or {}
    now = file_hashes(out_dir) if recorded else {}
    return [name for name, digest in recorded.items() if now.get(name) != digest]


def decide(out_dir: Path, slide: dict, model: str, now: dict, overwrite: bool) -> str:
    """STAGE or SKIP for the slide ``slide`` (`slide_fingerprint`) staged by ``model``
    with ``now`` (`settings`); WorkdirError (one line) when ``out_dir`` holds what
    this run may not replace."""
    done = read_done(out_dir)
    if done is None and not out_dir.exists():
        return STAGE
    why = _refusal(out_dir, done, slide, model, now)
    if why and not overwrite:
        raise WorkdirError(f"{out_dir}: holds {why}; pass --overwrite to replace them")
    if why or (overwrite and done is not None):
        log.warning("%s: replacing earlier outputs (--overwrite)", out_dir)
        return STAGE
    if diff := changed(done, now):
        log.warning(
            "%s: staged before with other settings (%s); staging again", out_dir, "; ".join(diff)
        )
        return STAGE
    log.info("%s: already staged with this model and these settings; skipped", out_dir)
    return SKIP


def _refusal(out_dir: Path, done: dict | None, slide: dict, model: str, now: dict) -> str:
    """What in ``out_dir`` a run without overwrite must keep ("" if nothing)."""
    if done is None:
        return "outputs made by an unfinished or other run"
    if other := _other_slide(done, slide):
        return other
    if done.get("model") != model:
        return f"outputs made by the model {done.get('model')}"
    if changed(done, now) and (edited := _edited(out_dir, done)):
        return f"outputs edited since they were written ({', '.join(edited)})"
    return ""
