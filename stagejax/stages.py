"""The 12 stages of the mouse seminiferous epithelium cycle, in cycle order.

Stage facts (durations) are the classic mouse estimates quoted in
shared/reference/stages.md; a tubule section shows a stage in proportion to
its duration, so they also give the expected class frequencies.

Class ids versus stages: a dataset's class id is the 0-based line position of
its name in ``label_list.txt`` (the study's convention; imported weights
depend on it), while everything that measures "how far off" (+/-1 accuracy,
the cycle analysis, plot order) needs each class's place in the biological
cycle, its *rank* (0 = stage I ... 11 = stage XII). ``stage_ranks`` maps one
to the other from the names themselves (roman or arabic, any line order) or
from an order the user states (``config.stage_order``).
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np

from stagejax.errors import ConfigError, DatasetError

STAGES: tuple[str, ...] = (
    "I",
    "II",
    "III",
    "IV",
    "V",
    "VI",
    "VII",
    "VIII",
    "IX",
    "X",
    "XI",
    "XII",
)
NUM_STAGES = len(STAGES)

# Hours spent in each stage (classic mouse estimates, see stages.md).
STAGE_DURATION_HOURS: tuple[float, ...] = (
    22.6,
    18.1,
    8.7,
    18.6,
    11.3,
    18.1,
    20.6,
    20.8,
    15.2,
    11.3,
    18.6,
    20.0,
)

_ROMAN_RANK = {name: i for i, name in enumerate(STAGES)}


def stage_frequencies() -> np.ndarray:
    """Expected fraction of tubule sections in each stage (sums to 1)."""
    d = np.asarray(STAGE_DURATION_HOURS, dtype=np.float64)
    return d / d.sum()


def stage_color(rank: int) -> tuple[int, int, int]:
    """RGB of the stage at ``rank`` (0 = I): evenly around the hue circle, so stages
    next to each other in the cycle look alike and XII sits next to I, as in the cycle."""
    r, g, b = colorsys.hsv_to_rgb(rank / NUM_STAGES, 0.75, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def stage_distance(a, b, cyclic: bool = False):
    """|a - b| between ranks (cycle positions); with ``cyclic`` XII is next to I."""
    d = np.abs(np.asarray(a) - np.asarray(b))
    if cyclic:
        d = np.minimum(d, NUM_STAGES - d)
    return d


def parse_stage(name: str) -> int | None:
    """Rank of a roman (I..XII) or arabic (1..12) stage name, ignoring case and
    spaces ('vii', ' VII ', '7', '07' -> 6); None for anything else."""
    key = "".join(str(name).split()).upper()
    if key in _ROMAN_RANK:
        return _ROMAN_RANK[key]
    if key.isascii() and key.isdigit() and 1 <= int(key) <= NUM_STAGES:
        return int(key) - 1
    return None


def _split_order(stage_order: str | Sequence[str]) -> list[str]:
    items = stage_order.split(",") if isinstance(stage_order, str) else list(stage_order)
    return [str(s).strip() for s in items if str(s).strip()]


def stage_ranks(
    label_names: Sequence[str],
    stage_order: str | Sequence[str] = "",
    source: str = "label_list.txt",
) -> tuple[int, ...]:
    """The rank (0 = stage I ... 11 = XII) of each class id; ``label_names[i]`` is class i.

    Without ``stage_order`` every name must be a roman or arabic stage name,
    each stage at most once; otherwise ``DatasetError`` names ``source``.
    ``stage_order`` (the label names in biological order, stage I first,
    comma-separated) states the order for names that are not stage names.
    """
    names = [str(n).strip() for n in label_names]
    if _split_order(stage_order):
        return _ranks_from_order(names, _split_order(stage_order), source)
    ranks, seen = [], {}
    for name in names:
        rank = parse_stage(name)
        if rank is None:
            raise DatasetError(
                f"{source}: label {name!r} is not a stage name (I..XII or 1..12); give the "
                "biological order as --config.stage_order=NAME_OF_I,NAME_OF_II,..."
            )
        if rank in seen:
            raise DatasetError(
                f"{source}: labels {seen[rank]!r} and {name!r} are both stage {STAGES[rank]}"
            )
        seen[rank] = name
        ranks.append(rank)
    return tuple(ranks)


def _ranks_from_order(names: list[str], order: list[str], source: str) -> tuple[int, ...]:
    if len(order) > NUM_STAGES:
        raise ConfigError(
            f"config.stage_order: {len(order)} names; the cycle has {NUM_STAGES} stages"
        )
    for i, name in enumerate(order):
        if name in order[:i]:
            raise ConfigError(f"config.stage_order: {name!r} listed twice")
        if name not in names:
            raise ConfigError(f"config.stage_order: {name!r} is not a label of {source}")
    if missing := [n for n in names if n not in order]:
        raise ConfigError(f"config.stage_order: lacks {missing[0]!r} of {source}")
    return tuple(order.index(n) for n in names)


def default_label_names(num_classes: int) -> list[str]:
    """Names of a model saved without them: I..XII for 12 classes, else the class numbers."""
    if num_classes == NUM_STAGES:
        return list(STAGES)
    return [str(i + 1) for i in range(num_classes)]


def biological_order(ranks: Sequence[int]) -> list[int]:
    """Class ids sorted by rank: the order of rows and columns in reports and plots."""
    return sorted(range(len(ranks)), key=lambda i: ranks[i])


def names_by_rank(label_names: Sequence[str], ranks: Sequence[int]) -> list[str]:
    """Display name of each of the 12 cycle positions: the dataset's own where it has
    that stage, the roman numeral otherwise."""
    out = list(STAGES)
    for name, rank in zip(label_names, ranks, strict=True):
        out[rank] = name
    return out
