"""The folder run's two lanes beside staging (stagejax.section.overlap): the next
slide detected ahead, the last one written behind, results taken in order."""

from __future__ import annotations

import threading

import pytest

from stagejax.section.overlap import Ahead, Behind


def test_ahead_starts_the_next_item_while_the_current_one_is_used():
    started, release = [], {k: threading.Event() for k in "abc"}

    def work(item):
        started.append(item)
        release[item].wait(5)
        return item.upper(), threading.current_thread().name

    release["a"].set()
    ahead = Ahead(work, ["a", "b", "c"], discard=lambda r: None)
    value, thread = ahead.take("a")
    assert value == "A" and thread.startswith("stagejax-ahead")
    for _ in range(100):  # b is started as a is taken, before anyone asks for it
        if started == ["a", "b"]:
            break
        threading.Event().wait(0.01)
    assert started == ["a", "b"]
    release["b"].set()
    assert ahead.take("b")[0] == "B"
    release["c"].set()
    assert ahead.take("c")[0] == "C"
    ahead.close()


def test_ahead_raises_an_items_error_when_it_is_taken_and_discards_what_is_left():
    discarded, ok_started = [], threading.Event()

    def work(item):
        if item == "bad":
            raise ValueError(f"{item}: unreadable")
        ok_started.set()
        return item

    ahead = Ahead(work, ["bad", "ok", "never"], discard=discarded.append)
    with pytest.raises(ValueError, match="bad: unreadable"):
        ahead.take("bad")
    assert ok_started.wait(5)  # started when "bad" was taken
    ahead.close()  # ... but never taken: its result (an open slide) is discarded
    assert discarded == ["ok"]


def test_behind_runs_one_job_at_a_time_and_raises_its_error_here():
    events, release = [], threading.Event()

    def job(name, wait=False):
        def run():
            if wait:
                release.wait(5)
            events.append((name, threading.current_thread().name))
            if name == "bad":
                raise OSError("disk full")

        return run

    behind = Behind()
    behind.submit(job("a", wait=True))
    assert events == []  # behind: the caller goes on
    release.set()
    behind.submit(job("bad"))  # a has ended before bad starts
    assert events[0][0] == "a" and events[0][1].startswith("stagejax-write")
    with pytest.raises(OSError, match="disk full"):
        behind.wait()
    assert [e[0] for e in events] == ["a", "bad"]
    behind.close()


def test_behind_close_waits_for_the_job_and_drops_its_error():
    written = []
    behind = Behind()
    behind.submit(lambda: written.append("slide"))
    behind.close()
    assert written == ["slide"]  # a slide being written at a stop is kept
    failing = Behind()
    failing.submit(lambda: 1 / 0)
    failing.close()  # the run already ends on another error: this one is not raised
