"""The 12 stages of the mouse seminiferous epithelium cycle, in cycle order.

Stage facts (durations) are the classic mouse estimates quoted in
shared/reference/stages.md; a tubule section shows a stage in proportion to
its duration, so they also give the expected class frequencies.
"""

import numpy as np

STAGES: tuple[str, ...] = (
    "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII",
)
NUM_STAGES = len(STAGES)

# Hours spent in each stage (classic mouse estimates, see stages.md).
STAGE_DURATION_HOURS: tuple[float, ...] = (
    22.6, 18.1, 8.7, 18.6, 11.3, 18.1, 20.6, 20.8, 15.2, 11.3, 18.6, 20.0,
)


def stage_frequencies() -> np.ndarray:
    """Expected fraction of tubule sections in each stage (sums to 1)."""
    d = np.asarray(STAGE_DURATION_HOURS, dtype=np.float64)
    return d / d.sum()


def stage_distance(a, b, cyclic: bool = False):
    """|a - b| in stage order; with ``cyclic`` XII is next to I."""
    d = np.abs(np.asarray(a) - np.asarray(b))
    if cyclic:
        d = np.minimum(d, NUM_STAGES - d)
    return d
