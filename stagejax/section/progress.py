"""Progress a person can read on a long folder run: per slide, its tubules/s and the
folder's time left; at the end, the totals.

Why: a folder of a hundred sections runs for hours; its log should say how far it
is and when it will end, not only what each slide gave. The time left is the mean
time of the slides staged so far times the slides still to come (slides already
staged by an earlier run are skipped at no cost and do not count).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def duration(seconds: float) -> str:
    """``2 h 05 min``, ``3 min 07 s`` or ``12.3 s``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class Progress:
    """Counts of one process's slides as they are staged, skipped or fail (counted
    from the staging thread and the writing one, hence the lock)."""

    def __init__(self, slides: int, clock: Callable[[], float] = time.perf_counter):
        self.slides, self.clock, self.start = slides, clock, clock()
        self.last, self.lock = self.start, threading.Lock()
        self.visited = self.staged = self.skipped = self.failed = 0
        self.tubules, self.seconds = 0, 0.0

    def lap(self) -> float:
        """Seconds since the last staged slide ended (or the start): a slide's time
        when slides overlap (one detected while another is staged, one written)."""
        with self.lock:
            now = self.clock()
            seconds, self.last = now - self.last, now
            return seconds

    def staged_one(self, tubules: int, seconds: float) -> str:
        """Count a staged slide; its rate and the folder's time left, for its log line."""
        with self.lock:
            self.visited += 1
            self.staged += 1
            self.tubules += tubules
            self.seconds += seconds
            left, mean = self.slides - self.visited, self.seconds / self.staged
        text = f"{tubules / max(seconds, 1e-9):.1f} tubules/s"
        if left:
            eta = duration(mean * left)
            text += f"; {left} slide(s) to go, about {eta} left"
        return text

    def passed(self, failed: bool) -> None:
        """Count a slide skipped (staged by an earlier run) or one that failed."""
        with self.lock:
            self.visited += 1
            if failed:
                self.failed += 1
            else:
                self.skipped += 1

    def totals(self) -> str:
        """The run's last line: what was done, how fast."""
        elapsed = self.clock() - self.start
        rate = self.tubules / max(self.seconds, 1e-9)
        text = (
            f"{self.staged} slide(s) staged, {self.tubules} tubules in {duration(elapsed)} "
            f"({rate:.1f} tubules/s while staging)"
        )
        if self.skipped:
            text += f"; {self.skipped} already staged"
        if self.failed:
            text += f"; {self.failed} could not be staged"
        return text
