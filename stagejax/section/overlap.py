"""The host's slow steps of a folder run beside staging: the next slide is read and
detected, and the last one's outputs written, each on its own thread, while the
current slide is cut and staged.

Why: with an accelerator the stage model is the quick part of a slide; reading and
detecting a slide (its post-processing is host work) and writing its CSV, GeoJSON
and pictures take host seconds in which the device would otherwise sit idle.
At most one slide is detected ahead and one written behind, so a run holds the
work of at most three slides whatever the folder's size. Slides are detected,
staged and written in the folder's order, and an error of either lane is raised
on the calling thread, so errors and outputs are those of the serial run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Ahead:
    """``fn(item)`` for each of ``items``, taken in their order, the next one started
    on a thread as soon as the current one is taken."""

    def __init__(self, fn: Callable, items: Sequence, discard: Callable[[Any], None]):
        self._fn, self._discard = fn, discard
        self._next = dict(zip(items[:-1], items[1:], strict=True))  # item -> the one after
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stagejax-ahead")
        self._futures: dict[Any, Future] = {}
        if items:
            self._futures[items[0]] = self._pool.submit(fn, items[0])

    def take(self, item):
        """``fn(item)`` (or its exception), once the next item's work has been started."""
        future = self._futures.pop(item)  # started when the one before it was taken
        if item in self._next:
            after = self._next[item]
            self._futures[after] = self._pool.submit(self._fn, after)
        return future.result()

    def close(self) -> None:
        """Drop work not taken: cancelled if not started, else its result discarded."""
        for future in self._futures.values():
            future.cancel()
        self._pool.shutdown(wait=True)
        for future in self._futures.values():
            if not future.cancelled() and future.exception() is None:
                self._discard(future.result())
        self._futures.clear()


class Behind:
    """One job at a time on a thread, the next submitted once the last has ended; a
    job's error is raised on the calling thread by the next `submit` or `wait`."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stagejax-write")
        self._pending: Future | None = None

    def submit(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` behind, once the job before it has ended."""
        self.wait()
        self._pending = self._pool.submit(fn)

    def wait(self) -> None:
        """Wait for the job in flight, if any; its error is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """`wait`, for a run that ends early: a slide being written at the stop is
        kept; that job's own error is dropped, as the run already ends on another."""
        try:
            self.wait()
        except Exception:  # noqa: BLE001 (the error the run ends on is the one to report)
            pass
        finally:
            self._pool.shutdown(wait=True)
