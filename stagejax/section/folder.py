"""A folder run's end (its summary.csv, the slides that failed), and a folder of
slides over many independent jobs with one summary of them all.

Why: a study has hundreds of sections, a toxicology study thousands, and a
cluster gives many machines that do not talk to each other. ``--shard=I/N``
makes a job stage every N-th slide of the sorted folder, starting at the I-th
(under a Slurm job array it defaults to the array task's index and count), and
write those slides' outputs as usual. No job waits for another; when all have
ended, `merge` reads every slide's ``section.json`` (from one shared
``W/sections`` or from each job's own) into one ``summary.csv`` and one pooled
``stage_frequencies.csv``. Within a job, several JAX processes still deal the
shard's slides out among themselves (`stagejax.section.run`).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from stagejax import stages
from stagejax.errors import ConfigError, DatasetError, WorkdirError
from stagejax.section import outputs, record

log = logging.getLogger(__name__)

SHARD_FLAG = "--shard"
FAILED = ".failed"  # W/sections/.failed/<slide name>.txt: why a slide was not staged
FREQUENCIES = "stage_frequencies.csv"
SUMMARY = "summary.csv"


@dataclasses.dataclass(frozen=True)
class Shard:
    """This job's part of a folder: slides index, index + count, ... of the sorted list."""

    index: int = 0
    count: int = 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def take(self, slides: Sequence[Path]) -> list[Path]:
        return list(slides[self.index :: self.count])

    @property
    def lock_name(self) -> str:
        """The folder in the workdir whose lock is this job's (shards run side by side)."""
        return f".shard-{self.index}-of-{self.count}"


def parse_shard(text: str, environ: Mapping[str, str] | None = None) -> Shard:
    """``I/N`` (0 <= I < N); empty: a Slurm job array's task (its index from the array's
    first id, its step and count), else the whole folder."""
    if not text:
        return _slurm_shard(os.environ if environ is None else environ)
    try:
        index, count = (int(p) for p in text.split("/"))
    except ValueError:
        raise ConfigError(f"{SHARD_FLAG}: {text!r} is not I/N (e.g. 0/4)") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"{SHARD_FLAG}: {text!r}: needs 0 <= I < N (e.g. 0/4 ... 3/4)")
    return Shard(index, count)


def _slurm_shard(env: Mapping[str, str]) -> Shard:
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return Shard()
    try:
        task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", "1")) or 1
    except ValueError:
        raise ConfigError(
            f"{SHARD_FLAG}: the SLURM_ARRAY_TASK_* variables are not numbers; pass {SHARD_FLAG}=I/N"
        ) from None
    return parse_shard(f"{(task - first) // step}/{count}")


@dataclasses.dataclass(frozen=True)
class Staged:
    """One slide as a job left it: its counts (None when it failed) and why not."""

    name: str
    tubules: int | None
    stageable: int | None
    counts: np.ndarray | None
    model: str = ""
    error: str = ""


def read_folder(sections: Path) -> tuple[list[Staged], list[str]]:
    """The slides staged in one ``W/sections`` folder, and their stage names by rank."""
    found, names = [], None
    for out in sorted(p for p in sections.iterdir() if p.is_dir() and not p.name.startswith(".")):
        done = record.read_done(out)
        if done is None:
            continue  # a slide still being staged, or not a slide's folder
        counts = np.asarray(done["counts_by_rank"], np.int64)
        found.append(Staged(out.name, done["tubules"], done["stageable"], counts, done["model"]))
        names = names or _stage_names(out / FREQUENCIES)
    for why in sorted((sections / FAILED).glob("*.txt")):
        found.append(Staged(why.stem, None, None, None, error=why.read_text().strip()))
    return found, names or list(stages.STAGES)


def _stage_names(path: Path) -> list[str] | None:
    try:
        with path.open(newline="") as f:
            return [row["stage"] for row in csv.DictReader(f)]
    except (OSError, KeyError):
        return None


def failures(root: Path, names: Sequence[str]) -> dict[str, str]:
    """slide name -> why it was not staged (from every process's records in ``root``)."""
    found = {}
    for name in names:
        failure = root / FAILED / f"{name}.txt"
        if failure.is_file():
            found[name] = failure.read_text().strip()
    return found


def report_failures(failed: Mapping[str, str], total: int, root: Path, strict: bool) -> None:
    """One warning naming the skipped slides; an error when all ``total`` were, or
    under ``strict``."""
    if not failed:
        return
    names = ", ".join(failed)
    if len(failed) == total:
        raise DatasetError(f"{root}: none of the {total} slides could be staged: {names}")
    log.warning(
        "%d of %d slide(s) could not be staged and were skipped (column error of %s): %s",
        len(failed),
        total,
        root / SUMMARY,
        names,
    )
    if strict:
        raise DatasetError(
            f"{len(failed)} of {total} slide(s) could not be staged: {names}; the others "
            f"are in {root} (--strict makes this an error)"
        )


def write_folder_summary(
    root: Path, slides: Sequence[str], names: Sequence[str], failed: Mapping[str, str]
) -> Path:
    """``root``/summary.csv of one run's folder of ``slides`` (output names, in order);
    ``failed``: slide name -> why it was not staged."""
    rows = []
    for name in slides:
        if name in failed:
            rows.append((name, None, None, None, failed[name]))
            continue
        done = record.read_done(root / name)
        if done is None:
            raise WorkdirError(f"{root / name}: {record.DONE_FILE} missing after staging")
        counts = np.asarray(done["counts_by_rank"])
        rows.append((name, done["tubules"], done["stageable"], counts, ""))
    return outputs.write_summary(root / SUMMARY, rows, names)


def merge(folders: Sequence[str | Path], out: str | Path) -> tuple[Path, Path, list[Staged]]:
    """One summary.csv and one stage_frequencies.csv (pooled over every staged slide)
    in ``out`` from the ``W/sections`` folders of several jobs; returns their paths
    and the slides. Two jobs' copies of one slide, or slides of different models, are
    a one-line error (their percentages would not add up)."""
    slides: dict[str, Staged] = {}
    names = list(stages.STAGES)
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ConfigError(f"--sections: {folder}: no such folder")
        found, names = read_folder(folder)
        for s in found:
            if s.name in slides and not (s.error or slides[s.name].error):
                raise WorkdirError(f"{folder / s.name}: slide {s.name} was staged by two jobs")
            if s.name not in slides or slides[s.name].error:
                slides[s.name] = s  # a slide staged after an earlier job failed on it
    staged = [s for s in slides.values() if s.counts is not None]
    if not staged:
        raise WorkdirError(f"{', '.join(map(str, folders))}: no staged slide (no section.json)")
    if len({s.model for s in staged}) > 1:
        raise WorkdirError("the slides were staged by different models; merge each model apart")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ordered = sorted(slides.values(), key=lambda s: s.name)
    rows = [(s.name, s.tubules, s.stageable, s.counts, s.error) for s in ordered]
    summary = outputs.write_summary(out / SUMMARY, rows, names)
    return summary, _write_pooled(out / FREQUENCIES, staged, names), ordered


def _write_pooled(path: Path, staged: list[Staged], names: list[str]) -> Path:
    counts = np.sum([s.counts for s in staged], axis=0)
    return outputs.write_frequency_csv(path, names, counts, slides=len(staged))
