"""What every stagejax command line shares (absl flags).

A bad flag and every project error (`stagejax.errors.StagejaxError`) are one
``error:`` line on stderr and exit status 2 (``STAGEJAX_TRACEBACK=1`` shows
the traceback instead); any other exception is a bug and keeps its
traceback. Commands with subcommands (``python -m stagejax.simulate tubules``,
``python -m stagejax.explain gradcam``) name them as the first positional
argument and keep them in a ``COMMANDS`` dict of name -> function.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from absl import app, flags

from stagejax.errors import ConfigError, StagejaxError
from stagejax.runtime import logs

flags.DEFINE_bool(
    "verbose",
    False,
    "Keep the libraries' start-up lines in the log (JAX backends, XLA flags, "
    "tensorflow-datasets); by default the log holds stagejax's lines and all warnings.",
)

Command = Callable[[], None]


def exit_with(line: str, code: int) -> None:
    """Print ``line`` and exit; with STAGEJAX_TRACEBACK set, re-raise the exception
    being handled instead (call it from an ``except`` block)."""
    if os.environ.get("STAGEJAX_TRACEBACK"):
        raise  # the exception being handled
    print(line, file=sys.stderr)
    sys.exit(code)


def parse_flags(
    argv: Sequence[str], check: Callable[[Sequence[str]], None] | None = None
) -> list[str]:
    """absl's parsing, with a bad flag (or what ``check(argv)`` raises) as one
    ``error:`` line and exit status 2."""
    try:
        if check is not None:
            check(argv)
        return flags.FLAGS(list(argv))
    except flags.Error as e:
        message = " ".join(str(e).split())
    except StagejaxError as e:
        message = str(e)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def pick_command(
    commands: Mapping[str, Command], argv: Sequence[str], default: str | None = None
) -> Command:
    """The command named by the one positional argument of ``argv`` (absl's
    remaining arguments: program name first); ``default`` when none is named."""
    names = ", ".join(commands)
    if len(argv) < 2 and default is not None:
        return commands[default]
    if len(argv) < 2:
        raise ConfigError(f"name a command: {names} (see --help)")
    if argv[1] not in commands:
        raise ConfigError(f"unknown command {argv[1]!r}; the commands are {names}")
    if len(argv) > 2:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[2:])}")
    return commands[argv[1]]


def run_commands(
    commands: Mapping[str, Command], interrupted: str | None = None, default: str | None = None
) -> None:
    """``app.run`` of the command named on the command line, logging at INFO.

    ``interrupted``: the line to print (exit status 130) on Ctrl-C; None keeps
    the traceback. ``default``: the command run when none is named.
    """

    def main(argv: list[str]) -> None:
        try:
            command = pick_command(commands, argv, default)
            logs.setup(flags.FLAGS.verbose)
            command()
        except StagejaxError as e:
            exit_with(f"error: {e}", 2)
        except KeyboardInterrupt:
            if interrupted is None:
                raise
            exit_with(interrupted, 130)

    app.run(main, flags_parser=parse_flags)


def path_list(values: Sequence[str], flag: str) -> list[str]:
    """The files of a repeatable list flag (``flags.DEFINE_multi_string``).

    Each value is a file that exists (its name may hold a comma), ``@LIST`` (a text
    file naming one file per line), or comma-separated names. Why: a lab's file
    names hold commas, which a plain comma-separated flag cannot pass.
    """
    out: list[str] = []
    for value in values:
        if value.startswith("@"):
            listing = Path(value[1:]).expanduser()
            if not listing.is_file():
                raise ConfigError(f"{flag}: {listing}: no such list file")
            out += [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        elif Path(value).expanduser().exists() or "," not in value:
            out.append(value)
        else:
            out += [part.strip() for part in value.split(",") if part.strip()]
    return out
