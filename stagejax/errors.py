"""The project's own errors: the user's to fix, shown as one ``error:`` line.

Everything that derives from ``StagejaxError`` is printed as its message alone
and exits with status 2 (set ``STAGEJAX_TRACEBACK=1`` to see the traceback);
any other exception is a bug and keeps its traceback.
"""


class StagejaxError(Exception):
    """Base of the errors a user fixes: bad data, settings, workdir or weights."""


class ConfigError(StagejaxError):
    """A config field or command-line flag has a value that cannot run."""


class DatasetError(StagejaxError):
    """Bad dataset input; the message names the file and the problem."""


class CheckpointError(StagejaxError):
    """A checkpoint or model directory that cannot be read or does not fit the model."""


class ConversionError(CheckpointError):
    """A PyTorch file that cannot be read or does not fit the architecture."""


class WorkdirError(StagejaxError):
    """The workdir cannot be used for this run."""


class ResourceError(StagejaxError):
    """Not enough memory or disk for what the run needs."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type's name if it has none), for
    one-line reports of a library's error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
