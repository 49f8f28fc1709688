"""A folder of slides over independent jobs (`stagejax.section.folder`) and a folder
run's progress (`stagejax.section.progress`). The command-line run of two shards and
their merge, against one unsharded run: tests/test_section_mode.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from stagejax.errors import ConfigError, WorkdirError
from stagejax.section import folder as folder_lib
from stagejax.section.folder import Shard, parse_shard
from stagejax.section.progress import Progress, duration
from stagejax.stages import STAGES


@pytest.mark.parametrize("text, shard", [("0/1", Shard(0, 1)), ("3/4", Shard(3, 4))])
def test_parse_shard(text, shard):
    assert parse_shard(text, {}) == shard


@pytest.mark.parametrize("text", ["4/4", "-1/2", "1/0", "1", "a/b", "1/2/3"])
def test_a_bad_shard_is_one_line_naming_the_flag(text):
    with pytest.raises(ConfigError, match=r"^--shard: "):
        parse_shard(text, {})


def test_the_default_is_a_slurm_array_task_or_the_whole_folder():
    assert parse_shard("", {}) == Shard(0, 1)
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert parse_shard("", env) == Shard(2, 4)
    # --array=1-4: ids 1..4; --array=10-16:2: ids 10, 12, 14, 16.
    assert parse_shard("", {**env, "SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1"}) == (
        Shard(3, 4)
    )
    step = {"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_STEP": "2"}
    assert parse_shard("", {**env, **step}) == Shard(2, 4)
    assert parse_shard("1/2", env) == Shard(1, 2)  # the flag wins
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK"):
        parse_shard("", {**env, "SLURM_ARRAY_TASK_ID": "x"})


def test_shards_split_a_folder_into_disjoint_parts_that_cover_it():
    slides = [Path(f"s{i:02d}.tif") for i in range(11)]
    parts = [Shard(i, 4).take(slides) for i in range(4)]
    assert sorted(p for part in parts for p in part) == slides
    assert [len(p) for p in parts] == [3, 3, 3, 2]
    assert Shard(3, 20).take(slides) == [slides[3]] and Shard(15, 20).take(slides) == []


def _staged(sections: Path, name: str, counts, model: str = "m1") -> None:
    """A slide's outputs as section mode leaves them, as far as merge reads them."""
    out = sections / name
    out.mkdir(parents=True)
    counts = [int(c) for c in counts]
    done = {"tubules": sum(counts) + 2, "stageable": sum(counts), "counts_by_rank": counts}
    (out / "section.json").write_text(json.dumps({**done, "model": model}))
    rows = "".join(f"{s},{c},0,0\n" for s, c in zip(STAGES, counts, strict=True))
    (out / "stage_frequencies.csv").write_text("stage,count,percent,expected_percent\n" + rows)


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_merge_pools_the_slides_of_every_job(tmp_path):
    a, b = tmp_path / "a" / "sections", tmp_path / "b" / "sections"
    rng = np.random.default_rng(0)
    counts = {name: rng.integers(0, 9, 12) for name in ("s1", "s2", "s3")}
    _staged(a, "s1", counts["s1"])
    _staged(b, "s2", counts["s2"])
    _staged(b, "s3", counts["s3"])
    (a / ".failed").mkdir()
    (a / ".failed" / "s4.txt").write_text("s4.tif: not a TIFF\n")
    (a / "s5").mkdir()  # a slide still being staged: no section.json yet
    summary, pooled, slides = folder_lib.merge([a, b], tmp_path / "out")
    rows = _rows(summary)
    assert [r["slide"] for r in rows] == ["s1", "s2", "s3", "s4"]
    assert rows[3]["error"] == "s4.tif: not a TIFF" and rows[3]["tubules"] == ""
    s2 = counts["s2"]
    assert float(rows[1]["pct_IV"]) == pytest.approx(100 * s2[3] / s2.sum(), abs=0.005)
    freq = _rows(pooled)
    total = sum(counts.values())
    assert [int(r["count"]) for r in freq] == total.tolist()
    assert [r["stage"] for r in freq] == list(STAGES) and {r["slides"] for r in freq} == {"3"}
    assert float(freq[0]["percent"]) == pytest.approx(100 * total[0] / total.sum(), abs=0.005)
    assert len(slides) == 4


def test_merge_of_one_folder_equals_its_own_summary(tmp_path):
    sections = tmp_path / "sections"
    for i, name in enumerate(("b", "a")):
        _staged(sections, name, np.arange(12) + i)
    own = folder_lib.write_folder_summary(sections, ["a", "b"], list(STAGES), {})
    before = own.read_bytes()
    summary, _, _ = folder_lib.merge([sections], tmp_path / "merged")
    assert summary.read_bytes() == before


def test_merge_refuses_a_slide_of_two_jobs_and_two_models(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _staged(a, "s1", np.ones(12))
    _staged(b, "s1", np.ones(12))
    with pytest.raises(WorkdirError, match="slide s1 was staged by two jobs"):
        folder_lib.merge([a, b], tmp_path / "out")
    c = tmp_path / "c"
    _staged(c, "s2", np.ones(12), model="m2")
    with pytest.raises(WorkdirError, match="different models"):
        folder_lib.merge([a, c], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorkdirError, match="no staged slide"):
        folder_lib.merge([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(ConfigError, match="--sections: .*missing: no such folder"):
        folder_lib.merge([tmp_path / "missing"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_progress_gives_the_rate_and_the_time_left():
    now = [0.0]
    p = Progress(4, clock=lambda: now[0])
    p.passed(failed=False)  # staged by an earlier run: no cost, no time estimate from it
    now[0] = 20.0
    assert p.lap() == 20.0
    assert p.staged_one(40, 20.0) == "2.0 tubules/s; 2 slide(s) to go, about 40.0 s left"
    now[0] = 80.0
    assert p.lap() == 60.0  # since the last slide ended, not since the start
    assert p.staged_one(30, 60.0) == "0.5 tubules/s; 1 slide(s) to go, about 40.0 s left"
    p.passed(failed=True)
    assert p.totals() == (
        "2 slide(s) staged, 70 tubules in 1 min 20 s (0.9 tubules/s while staging); "
        "1 already staged; 1 could not be staged"
    )
    assert [duration(s) for s in (5.04, 187, 7500)] == ["5.0 s", "3 min 07 s", "2 h 05 min"]
