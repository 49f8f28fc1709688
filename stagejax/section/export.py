"""Corrected sections back into training data: ``python -m stagejax.section export``.

A lab opens section mode's tubules.geojson in QuPath, corrects stages, deletes what is
not a tubule, draws missed ones, marks some not stageable and exports it again;
``export_sections`` turns such files into a dataset in the study's layout::

  ROOT/images/<slide stem>_<n>_<label>-<k>.png   n: object number in the GeoJSON
  ROOT/split_list/{train,validation,test}.txt    k: running number of the label
  ROOT/label_list.txt                            the model's labels, class-id order
  ROOT/EXPORT.json                               slides, annotations, scale, counts

Each image is ``crops.cut_tubule`` at the stage model's pixel size and side, so
fine-tuning sees what section mode shows the model; the label list keeps the model's
class ids, so ``--config.init_from`` keeps its meaning. Splits hold out whole slides
by default: a section's tubules share an animal and a staining, and testing on their
siblings overstates accuracy on the next section.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import shapely
from PIL import Image
from shapely.geometry import MultiPolygon, Polygon

from stagejax.data.layout import SPLITS
from stagejax.errors import ConfigError, DatasetError
from stagejax.runtime.files import check_output_dir, new_dir
from stagejax.section.crops import cut_tubule
from stagejax.slides import SlideObject, open_slide, read_geojson
from stagejax.stages import NUM_STAGES, STAGES, parse_stage

log = logging.getLogger(__name__)

EXPORT_VERSION = 1
SPLIT_BY = ("slide", "random")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
SPLIT_TRIES = 64  # slide orders tried for the one whose train split holds the most stages
IMAGE_SIZE_RANGE = (16, 8192)
MPP_RANGE = (0.05, 20.0)  # as config.mpp
NOT_STAGEABLE = (False, "false", "False")  # the property as QuPath scripts may write it


@dataclasses.dataclass(frozen=True)
class Target:
    """What the images are cut for: the stage model's pixel size, side and class names."""

    mpp: float
    image_size: int
    label_names: tuple[str, ...]  # class-id order (label_list.txt)
    label_of_rank: dict[int, str]  # stage rank (0 = I) -> label name


@dataclasses.dataclass
class SlidePlan:
    """One slide's staged tubules, read and checked before anything is cut."""

    slide: Path
    annotations: Path
    mpp: float  # the slide's level-0 um/px
    mpp_source: str
    tubules: list[tuple[int, Polygon | MultiPolygon, str]]  # (object number, outline, label)
    skipped: collections.Counter


def _check_target(mpp: float, image_size: int, names: Sequence[str], source: str) -> None:
    """Sizes a stage model can have, and labels that survive the study's file naming."""
    if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        raise ConfigError(f"--mpp: {mpp:g} um/px is outside {MPP_RANGE[0]}-{MPP_RANGE[1]}")
    if not IMAGE_SIZE_RANGE[0] <= image_size <= IMAGE_SIZE_RANGE[1]:
        raise ConfigError(f"--image_size: {image_size} px is outside {IMAGE_SIZE_RANGE}")
    for name in names:
        if not name or name != name.strip() or any(c in name for c in "_/\\"):
            raise ConfigError(
                f"{source}: label {name!r} cannot stand in a file name ..._<label>-<k>.png"
            )


def model_target(
    workdir: str | os.PathLike | None = None,
    mpp: float | None = None,
    image_size: int | None = None,
) -> Target:
    """The scale and labels of ``workdir``'s best model; explicit ``mpp``/``image_size`` win.

    Without a workdir the labels are I..XII and both sizes must be given.
    """
    names, ranks, source = list(STAGES), list(range(NUM_STAGES)), ""
    if workdir:
        from stagejax.model.saved import MODEL_JSON, read_model_json  # jax: only here

        model_dir = Path(workdir).expanduser() / "best_model"
        meta, source = read_model_json(model_dir), str(model_dir / MODEL_JSON)
        names, ranks = meta["label_names"], meta["stage_ranks"]
        if ranks is None:
            raise ConfigError(f"{source}: labels {names[:3]}... are not stages I..XII")
        mpp = mpp or meta.get("mpp")
        image_size = image_size or meta.get("image_size")
    missing = [f for f, v in (("mpp", mpp), ("image_size", image_size)) if not v]
    if missing:
        what = f"no {' or '.join(missing)} recorded" if workdir else "no --workdir given"
        raise ConfigError(
            f"{source or '--mpp/--image_size'}: {what}; pass --mpp and --image_size "
            "(the um/px and side in px of the stage model's training images)"
        )
    _check_target(float(mpp), int(image_size), names, source)
    label_of_rank = {int(r): str(n) for n, r in zip(names, ranks, strict=True)}
    return Target(float(mpp), int(image_size), tuple(map(str, names)), label_of_rank)


def label_of(obj: SlideObject, target: Target) -> tuple[str | None, str]:
    """(label, "") for a tubule to export, else (None, why it is skipped)."""
    if obj.properties.get("stageable", True) in NOT_STAGEABLE:
        return None, "not stageable"
    if obj.classification in target.label_names:  # the model's own name, as section mode wrote
        return obj.classification, ""
    rank = parse_stage(obj.classification or "")
    if rank is None:
        return None, f"class {obj.classification!r}" if obj.classification else "unclassified"
    if rank not in target.label_of_rank:
        return None, f"stage {STAGES[rank]} (not a class of the model)"
    return target.label_of_rank[rank], ""


def plan_slide(
    slide_path: str | os.PathLike,
    annotations: str | os.PathLike,
    target: Target,
    slide_mpp: float | None = None,
) -> SlidePlan:
    """Read ``annotations`` and open the slide (bad files fail here, before any cutting)."""
    objects = read_geojson(annotations)
    with open_slide(slide_path, slide_mpp, mpp_flag="--slide_mpp") as slide:
        mpp, source, (width, height) = slide.mpp, slide.mpp_source, slide.dimensions
    frame = shapely.box(0, 0, width, height)
    tubules, skipped = [], collections.Counter()
    for n, obj in enumerate(objects):
        label, why = label_of(obj, target)
        if label is not None and not frame.intersects(obj.geometry):
            label, why = None, "outside the slide"
        if label is None:
            skipped[why] += 1
        else:
            tubules.append((n, obj.geometry, label))
    return SlidePlan(Path(slide_path), Path(annotations), mpp, source, tubules, skipped)


def _split_sizes(n: int) -> tuple[int, int, int]:
    """About 70/15/15 of ``n`` >= 3 items, each split at least one."""
    n_val = max(1, round(SPLIT_FRACTIONS[1] * n))
    n_test = max(1, round(SPLIT_FRACTIONS[2] * n))
    return n - n_val - n_test, n_val, n_test


def split_by_slide(plans: Sequence[SlidePlan], seed: int) -> list[list[str]]:
    """Each slide's tubules all in one split; of ``SPLIT_TRIES`` random slide orders,
    the first whose train slides hold the most stages."""
    used = [i for i, p in enumerate(plans) if p.tubules]
    if len(used) < 3:
        raise DatasetError(
            f"--split_by slide: {len(used)} slide(s) with staged tubules; train, validation "
            "and test each need a whole slide, so give at least 3 or use --split_by random"
        )
    n_train, n_val, _ = _split_sizes(len(used))
    rng = np.random.default_rng(seed)
    best, best_cover = None, -1
    for _ in range(SPLIT_TRIES):
        order = [used[j] for j in rng.permutation(len(used))]
        cover = len({t[2] for i in order[:n_train] for t in plans[i].tubules})
        if cover > best_cover:
            best, best_cover = order, cover
    split_of = {i: SPLITS[(j >= n_train) + (j >= n_train + n_val)] for j, i in enumerate(best)}
    return [[split_of.get(i, "")] * len(p.tubules) for i, p in enumerate(plans)]


def split_random(plans: Sequence[SlidePlan], seed: int) -> list[list[str]]:
    """Per tubule about 70/15/15; one tubule of each stage stays in train while the
    other tubules can fill validation and test."""
    labels = [t[2] for p in plans for t in p.tubules]
    if len(labels) < 3:
        raise DatasetError(f"{len(labels)} staged tubule(s); a dataset needs at least 3")
    _, n_val, n_test = _split_sizes(len(labels))
    first, rest, seen = [], [], set()
    for i in np.random.default_rng(seed).permutation(len(labels)):
        (rest if labels[i] in seen else first).append(int(i))
        seen.add(labels[i])
    room = max(2, len(rest))
    if n_val + n_test > room:
        n_val, n_test = room // 2, room - room // 2
    held = rest + first[::-1]  # a stage's only train tubule is held out last
    split = np.full(len(labels), "train", dtype=object)
    split[held[:n_val]] = "validation"
    split[held[n_val : n_val + n_test]] = "test"
    bounds = np.cumsum([0] + [len(p.tubules) for p in plans])
    return [list(split[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _cut_slide(
    plan: SlidePlan, splits: Sequence[str], target: Target, image_dir: Path, k: collections.Counter
) -> list[tuple[str, str, str]]:
    """Cut and save the slide's tubules; (file name, label, split) of each."""
    rows = []
    with open_slide(plan.slide, plan.mpp, mpp_flag="--slide_mpp") as slide:
        for (n, outline, label), split in zip(plan.tubules, splits, strict=True):
            k[label] += 1
            name = f"{plan.slide.stem}_{n:04d}_{label}-{k[label]}.png"
            crop = cut_tubule(slide, outline, target.mpp, target.image_size)
            Image.fromarray(crop).save(image_dir / name, format="PNG")
            rows.append((name, label, split))
    return rows


def _write_lists(root: Path, rows: Sequence[tuple[str, str, str]], target: Target) -> list[str]:
    """label_list.txt and the split files; returns the labels that no train image has."""
    (root / "label_list.txt").write_text("".join(f"{n}\n" for n in target.label_names))
    (root / "split_list").mkdir()
    for split in SPLITS:
        names = [name for name, _, s in rows if s == split]
        (root / "split_list" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    in_train = {label for _, label, s in rows if s == "train"}
    return [n for n in target.label_names if n not in in_train]


def _slide_record(plan: SlidePlan, rows: Sequence[tuple[str, str, str]]) -> dict:
    return dict(
        slide=str(plan.slide),
        annotations=str(plan.annotations),
        slide_mpp=plan.mpp,
        slide_mpp_source=plan.mpp_source,
        images=dict(collections.Counter(split for _, _, split in rows)),
        skipped=dict(plan.skipped),
    )


def _write_dataset(root: Path, plans, splits, target: Target, settings: dict) -> None:
    """Every image, the lists and EXPORT.json into ``root`` (the staging folder)."""
    (root / "images").mkdir()
    k, per_slide = collections.Counter(), []
    for i, (plan, slide_splits) in enumerate(zip(plans, splits, strict=True)):
        start = time.monotonic()
        per_slide.append(_cut_slide(plan, slide_splits, target, root / "images", k))
        log.info(
            "[%d/%d] %s: %d tubules in %.1f s; skipped: %s",
            *(i + 1, len(plans), plan.slide, len(plan.tubules), time.monotonic() - start),
            ", ".join(f"{n} {why}" for why, n in sorted(plan.skipped.items())) or "none",
        )
    rows = [row for slide_rows in per_slide for row in slide_rows]
    missing = _write_lists(root, rows, target)
    if missing:
        log.warning(
            "no training image of stage(s) %s: training on this dataset needs every label "
            "of label_list.txt in train (add sections with them, or try --split_by random)",
            ", ".join(missing),
        )
    meta = dict(
        note="Tubules cut from corrected QuPath annotations by stagejax.section export.",
        export_version=EXPORT_VERSION,
        **settings,
        mpp=target.mpp,
        image_size=target.image_size,
        label_names=list(target.label_names),
        slides=[_slide_record(p, r) for p, r in zip(plans, per_slide, strict=True)],
        images=len(rows),
        per_label={n: sum(r[1] == n for r in rows) for n in target.label_names},
        per_split={s: sum(r[2] == s for r in rows) for s in SPLITS},
        missing_from_train=missing,
    )
    (root / "EXPORT.json").write_text(json.dumps(meta, indent=1) + "\n")


def export_sections(
    slides: Sequence[str | os.PathLike],
    annotations: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    workdir: str | os.PathLike | None = None,
    mpp: float | None = None,
    image_size: int | None = None,
    slide_mpp: float | None = None,
    split_by: str = "slide",
    seed: int = 0,
) -> Path:
    """Write the staged tubules of ``slides`` (one corrected GeoJSON each, same order)
    as a dataset in the new or empty folder ``out``; returns it.

    Everything is read and checked first; the dataset is written beside ``out`` and
    renamed into place at the end, so a failed run leaves nothing behind.
    """
    if split_by not in SPLIT_BY:
        raise ConfigError(f"--split_by: expected 'slide' or 'random', got {split_by!r}")
    if not slides:
        raise ConfigError("--slides: required (the section files, comma-separated)")
    if len(slides) != len(annotations):
        raise ConfigError(
            f"--annotations: {len(annotations)} file(s) for {len(slides)} slide(s); "
            "give one GeoJSON per slide, in the same order"
        )
    stems = collections.Counter(Path(s).stem for s in slides)
    if dup := [s for s, n in stems.items() if n > 1]:
        raise ConfigError(f"--slides: two slides named {dup[0]!r}; image names need unique stems")
    out = Path(out).expanduser()
    check_output_dir(out)
    target = model_target(workdir, mpp, image_size)
    plans = [plan_slide(s, a, target, slide_mpp) for s, a in zip(slides, annotations, strict=True)]
    splits = (split_by_slide if split_by == "slide" else split_random)(plans, seed)
    settings = dict(workdir=None if workdir is None else str(workdir), split_by=split_by, seed=seed)
    written = new_dir(
        out, lambda tmp: _write_dataset(tmp, plans, splits, target, settings), "the dataset"
    )
    if not written:
        raise ConfigError(f"--out: {out} was filled by someone else; nothing written")
    return out
