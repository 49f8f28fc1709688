"""A log a biologist can read: stagejax's own lines and every warning, nothing else.

Why: every run used to open with the libraries' start-up chatter (JAX's
``Unable to initialize backend 'tpu' ... libtpu.so`` on machines without one,
the XLA flags, tensorflow-datasets' ``Downloading and preparing dataset
Unknown size`` although nothing is downloaded), lines a user cannot act on and
that hide the run's own. By default the log keeps stagejax's lines at INFO and
anything at WARNING or above; ``--verbose`` keeps everything, as before.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

from absl import logging as absl_logging

_OWN = ("stagejax", "__main__", "benchmarks")
_state = {"verbose": False}


def verbose() -> bool:
    """Whether the run keeps the libraries' INFO lines and printed output."""
    return _state["verbose"]


class QuietLibraries(logging.Filter):
    """Drops the INFO (and lower) records of every logger that is not stagejax's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or _state["verbose"]:
            return True
        return record.name.split(".")[0] in _OWN


def setup(verbose_run: bool = False) -> None:
    """INFO for stagejax's loggers; the libraries' INFO only when ``verbose_run``.

    Not verbose, a line is ``LEVEL HH:MM:SS message``, without absl's thread id and
    source line; tifffile's warnings about a broken file are left out too (the
    run's own line names the file and the problem).
    """
    _state["verbose"] = bool(verbose_run)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in root.handlers:
        if not any(isinstance(f, QuietLibraries) for f in handler.filters):
            handler.addFilter(QuietLibraries())
    if verbose_run:
        return
    logging.getLogger("tifffile").setLevel(logging.ERROR)
    handler = absl_logging.get_absl_handler().python_handler
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s", "%H:%M:%S"))


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Swallow what a library prints to stdout (tensorflow-datasets' banners), unless
    the run is verbose."""
    if _state["verbose"]:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
