"""SIGINT and SIGTERM: stop at a step boundary with a checkpoint, in one line.

``install()`` (the CLI) makes both signals raise ``Interrupted`` instead of a
``KeyboardInterrupt`` traceback. Inside ``deferred()`` (the training loop) the
first signal is only recorded: the loop finishes its step, saves a checkpoint
and raises ``Interrupted`` itself; a second signal stops at once (checkpoints
are still whole: see ``checkpoint.TrainCheckpoints``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):  # noqa: N818 (not an error: the user asked to stop)
    """The run was stopped by a signal; ``str()`` is the one line to print.

    A ``BaseException``, as ``KeyboardInterrupt``: a library's ``except Exception``
    (tensorflow_datasets wraps its imports in one) must not swallow the stop.
    """

    def __init__(self, signum: int, message: str = ""):
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.final = bool(message)  # says where the run stopped and how to go on
        super().__init__(message or f"stopped by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 SIGINT, 143 SIGTERM


class _State:
    def __init__(self):
        self.deferring = False
        self.pending: int | None = None


_STATE = _State()


def _handler(signum: int, frame) -> None:
    del frame
    if _STATE.deferring and _STATE.pending is None:
        _STATE.pending = signum
        log.warning(
            "%s received: stopping after this step with a checkpoint (send it again "
            "to stop at once)",
            signal.Signals(signum).name,
        )
        return
    raise Interrupted(signum)


def install() -> None:
    """Route SIGINT and SIGTERM through ``Interrupted`` (main thread only)."""
    for s in SIGNALS:
        signal.signal(s, _handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within: the first signal waits for ``pending()`` to be checked."""
    _STATE.deferring, _STATE.pending = True, None
    try:
        yield
    finally:
        _STATE.deferring = False


def pending() -> int | None:
    """The signal received inside ``deferred()``, if any."""
    return _STATE.pending
