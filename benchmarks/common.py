"""What every benchmark shares: its command line, its child processes, its report.

* Command line: absl flags declared as a `Flags` dict (name -> default and help),
  parsed by `main` into private flag values, so that several benchmarks run in one
  process (the tests, the GPU suite) without clashing in absl's global flags.
* Child processes: `run_child` runs ``python -m MODULE --child JOB`` and reads back
  the one JSON line it `emit`s. Why: JAX and PyTorch each size their thread pools to
  the whole machine, and peak memory is per process, so each measurement runs in a
  fresh process. ``--in_process`` runs each job's ``MODULE.child`` here instead (a
  check that the code runs; its timings mean little). `DEADLINE` (the GPU suite's)
  holds every child to one end time.
* Report: `finish` prints the markdown (`markdown_table`, `results_table`) and writes
  the JSON (machine, command, results), by convention under ``benchmarks/results/``.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import importlib
import json
import logging
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import flags

from benchmarks import machine

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = "~/.cache/stagejax"
RESULT_PREFIX = "BENCHMARK_RESULT "

# name -> (default, help) or (default, help, type or choices): see `define`.
Flags = dict[str, tuple]
COMMON_FLAGS: Flags = {"help": (False, "Show the flags and exit.")}
CHILD_FLAGS: Flags = {  # a benchmark with child processes
    "child": ("", "(internal) run one job, given as JSON"),
    "in_process": (False, "Run the jobs in this process (a quick check: timings mix)."),
}
IN_PROCESS = False  # set by --in_process for the run of one `main`
ARGV: list[str] | None = None  # that run's arguments (the command line the JSON records)
DEADLINE: float | None = None  # time.monotonic() by which every child must have ended
GIB = 2**30


# --- the command line --------------------------------------------------------------------


def define(spec: Flags, fv: flags.FlagValues) -> None:
    """absl flags from ``spec``: the type follows the default (a list is a
    comma-separated list flag); a third item names the type when the default is
    None, or is the tuple of allowed values (an enum flag)."""
    makers = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              str: flags.DEFINE_string, list: flags.DEFINE_list}  # fmt: skip
    for name, (default, text, *kind) in spec.items():
        if kind and isinstance(kind[0], tuple):
            flags.DEFINE_enum(name, default, kind[0], text, flag_values=fv)
        else:
            makers[kind[0] if kind else type(default)](name, default, text, flag_values=fv)


def parse(
    spec: Flags, argv: Sequence[str], children: bool = True
) -> tuple[types.SimpleNamespace, list[str]]:
    """(the flags of ``spec``, `COMMON_FLAGS` and, with ``children``, `CHILD_FLAGS`;
    the positional arguments); a bad flag is a SystemExit with one ``error:`` line."""
    fv = flags.FlagValues()
    define({**spec, **COMMON_FLAGS, **(CHILD_FLAGS if children else {})}, fv)
    try:
        rest = fv(list(argv))
    except flags.Error as e:
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None
    if fv.help:
        print(fv.main_module_help() or fv.get_help())
        raise SystemExit(0)
    args = types.SimpleNamespace(**{name: fv[name].value for name in fv})
    args.given = {name for name in spec if fv[name].present}
    return args, rest[1:]


def main(spec: Flags, run: Callable[[types.SimpleNamespace], dict | None],
         argv: Sequence[str] | None, child: Callable[[dict], dict] | None = None,
         positional: int = 0) -> dict | None:  # fmt: skip
    """A benchmark's ``main``: parse ``argv`` (default ``sys.argv``); as a child
    (``--child JOB``) print ``child(job)`` for `run_child`; else log at INFO and
    ``run(args)``, a ``ValueError`` from which is the ``error:`` exit line.
    ``positional``: how many positional arguments it takes (``args.positional``).
    Returns what ``run`` returns (`finish`'s report): the GPU suite runs benchmarks so."""
    global IN_PROCESS, ARGV
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = parse(spec, ["benchmark", *argv], bool(child))
    if getattr(args, "child", ""):
        emit(child(json.loads(args.child)))
        return None
    if len(rest) > positional:
        raise SystemExit(f"error: unexpected arguments: {' '.join(rest[positional:])}")
    args.positional = rest
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO)
    saved = IN_PROCESS, ARGV
    IN_PROCESS, ARGV = IN_PROCESS or getattr(args, "in_process", False), argv
    try:
        return run(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        IN_PROCESS, ARGV = saved


def names(text: str | list[str], flag: str, allowed: Sequence[str] = ()) -> list[str]:
    """A comma-separated (or list) flag's distinct, non-empty names, from ``allowed``."""
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    items = [s for s in items if s]
    if not items or len(set(items)) != len(items) or (allowed and set(items) - set(allowed)):
        choices = f"; choose from {', '.join(allowed)}" if allowed else ""
        raise ValueError(f"--{flag}: {text!r}: distinct names{choices}")
    return items


def integers(text: str | list[str], flag: str, low: int = 0) -> list[int]:
    """A comma-separated (or list) flag of distinct integers >= ``low``."""
    try:
        values = [int(s) for s in names(text, flag)]
    except ValueError:
        raise ValueError(f"--{flag}: {text!r}: distinct integers >= {low}") from None
    if min(values) < low:
        raise ValueError(f"--{flag}: {text!r}: distinct integers >= {low}")
    return values


def check_model(name: str, flag: str = "model") -> None:
    from stagejax import models

    if name not in models.NAMES:
        raise ValueError(f"--{flag}: {name!r} is not one of {', '.join(models.NAMES)}")


def check_image_size(size: int) -> None:
    if size < 32:
        raise ValueError(f"--image_size: {size} is below the 32 px a ResNet downsamples by")


def check_batch(batch: int, flag: str) -> None:
    if batch < 12 or batch % 12:
        raise ValueError(f"--{flag}: {batch} is not a positive multiple of 12 (the study's "
                         "sampler takes batch / 12 images of every stage)")  # fmt: skip


# --- the study's setting ---------------------------------------------------------------------


def scaled_crop_range(crop_size: int) -> int:
    """The study's +/-128 px shift for 896 px crops, scaled to ``crop_size``."""
    return max(1, round(128 * crop_size / 896))


def resnet_final_map(image_size: int) -> int:
    """Side of a ResNet's layer4 feature map for ``image_size`` px input (torch's
    padding: 7x7/2 conv, 3x3/2 max pool, three stride-2 stages)."""
    s = (image_size + 2 * 3 - 7) // 2 + 1
    for _ in range(4):  # the max pool, then three stride-2 stages
        s = (s + 2 - 3) // 2 + 1
    return s


def warn_slow_xla_cpu_shape(model: str, image_size: int, log) -> str | None:
    """Why: on XLA:CPU a 3x3 conv over a 2x2 (or 1x1) map -- ResNet layer4 for
    crops up to 64 px -- runs at ~1/50 of its usual FLOP rate (RESULTS.md,
    profile), so a small CPU setting there measures that one kernel, not the
    framework."""
    final = resnet_final_map(image_size)
    if not (model.startswith(("resnet", "resnext", "wide_resnet")) and final <= 2):
        return None
    msg = (f"{model} at {image_size} px has a {final}-px layer4 map: XLA:CPU's 3x3 conv is "
           "very slow there, so stagejax CPU numbers are not representative; "
           "use >= 65 px")  # fmt: skip
    log.warning(msg)
    return msg


def stagejax_xla_defaults() -> str:
    """Give a stagejax child the XLA:CPU flags ``python -m stagejax.main`` sets
    (`stagejax.runtime.xla_flags`), before it imports JAX, so that a benchmark
    times what a user runs; returns the ``XLA_FLAGS`` the child runs with. Not
    in process (``--in_process``): JAX has started there, and the compilation
    cache would file the executable under flags it was not compiled with."""
    from stagejax.runtime import xla_flags

    if not IN_PROCESS:
        xla_flags.apply_cpu_defaults()
    return os.environ.get("XLA_FLAGS", "")


def simulated_root(num_images: int, image_size: int, seed: int = 0,
                   cache_dir: str = DEFAULT_CACHE, split_by: str = "slide",
                   num_workers: int | None = None, **params) -> Path:  # fmt: skip
    """The SIMULATED layout folder (generated once, then reused from the cache).

    ``split_by='slide'`` holds whole slides (stainings) out for validation and
    test, the harder case; ``'random'`` mixes every slide into every split.
    ``params``: `stagejax.simulate.SceneParams` fields (e.g. ``hand_cut``). Under
    100 images render in this process by default: faster than starting a pool."""
    from stagejax import simulate

    if num_workers is None and num_images < 100:
        num_workers = 1
    extra = {"params": simulate.SceneParams(**params)} if params else {}
    return simulate.default_dataset(Path(cache_dir).expanduser() / "simulated", num_images,
                                    image_size, seed, split_by=split_by,
                                    num_workers=num_workers, **extra)  # fmt: skip


def stagejax_config(variant: str | None = None, **fields):
    """``stagejax.recipe`` (of ``variant``) with ``fields`` set (a dotted name sets a
    nested field): every benchmark builds stagejax the way ``python -m stagejax.main``
    would, from the study's recipe."""
    from stagejax import recipe

    config = recipe.get_config(variant)
    config.update_from_flattened_dict(fields)
    return config


# --- child processes ---------------------------------------------------------------------------


def emit(result: dict) -> None:
    """A child's answer: one prefixed JSON line on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


class Child:
    """``python -m module --child JOB_JSON``, started now, in its own process group
    (so that a kill takes its loader workers too). Its log goes to this process's
    stderr as it runs; `wait` returns the JSON it emitted or ``{"error": ...}``
    with the last lines of that log, so that one failure does not lose the others."""

    def __init__(self, module: str, job: dict, env: dict[str, str] | None = None):
        # The repository first on its path, then what PYTHONPATH holds (on the GPU
        # machine: the wheels installed into /tmp/site).
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--child", json.dumps(job)], cwd=REPO, text=True,
            env={**os.environ, "PYTHONPATH": path, **(env or {})}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, process_group=0)  # fmt: skip
        self.out: collections.deque = collections.deque()
        self.err: collections.deque = collections.deque(maxlen=3)
        self.pumps = [_pump(self.proc.stdout, self.out), _pump(self.proc.stderr, self.err, True)]

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # the group may be gone already
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def wait(self, timeout: float | None = None) -> dict:
        timed_out = False
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        self.kill()  # leftover workers too
        for pump in self.pumps:
            pump.join(timeout=10)
        if timed_out:
            return {"error": f"timed out after {timeout:.0f} s"}
        for line in reversed(self.out):
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX) :])
        tail = " | ".join(line.strip() for line in self.err if line.strip())
        return {"error": f"exit code {self.proc.returncode}, no result ({tail[-400:]})"}


def _pump(stream, keep: collections.deque, echo: bool = False) -> threading.Thread:
    """Read ``stream`` line by line in a thread, keeping the lines (echoed to stderr)."""

    def run() -> None:
        for line in stream:
            keep.append(line)
            if echo:
                sys.stderr.write(line)
                sys.stderr.flush()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def run_child(module: str, job: dict, timeout: float | None = None,
              env: dict[str, str] | None = None, min_s: float = 5.0) -> dict:  # fmt: skip
    """Run one child to its end (see `Child`) within ``timeout`` and `DEADLINE` and
    return what it emitted; with less than ``min_s`` left before `DEADLINE` it does
    not start (``{"error": "not run: ..."}``). With ``--in_process`` and no ``env``,
    ``module.child(job)`` here (no time limit), an exception as ``{"error": ...}``
    with its last lines, as a crashed child's would be."""
    left = time_left(DEADLINE)
    if left < min_s:
        return {"error": f"not run: time budget: {max(left, 0):.0f} s left, {min_s:.0f} s needed"}
    if DEADLINE is not None:
        timeout = min(timeout or math.inf, left)
    if not IN_PROCESS or env:
        return Child(module, job, env).wait(timeout)
    try:
        return importlib.import_module(module).child(job)
    except Exception:  # noqa: BLE001 -- as a crashed child: one job's numbers lost
        lines = traceback.format_exc().strip().splitlines()
        return {"error": "in process: " + " | ".join(lines[-3:])[-400:]}


def time_left(deadline: float | None) -> float:
    """Seconds until ``deadline`` (a ``time.monotonic()`` value; None: no limit)."""
    return math.inf if deadline is None else deadline - time.monotonic()


# --- the report ----------------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": float(statistics.median(values)), "min": float(min(values)),
            "max": float(max(values))}  # fmt: skip


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def gib(n: float | None, digits: int = 2) -> str:
    return "n/a" if n is None else f"{n / GIB:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """The one table renderer: strings as they are, numbers through `fmt`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(v if isinstance(v, str) else fmt(v) for v in row) + " |"
              for row in rows]  # fmt: skip
    return "\n".join(lines)


def results_table(
    results: dict[str, dict], columns: dict[str, Callable[[dict], object]], first: str
) -> str:
    """One row per result: its name, then each column's value of it (a header ->
    function dict); a failed result (``error``) shows its error instead."""
    blank = [""] * (len(columns) - 1)
    rows = [[k, f"error: {r['error']}", *blank] if "error" in r
            else [k, *(f(r) for f in columns.values())] for k, r in results.items()]  # fmt: skip
    return markdown_table([first, *columns], rows)


def ratio_table(ratio: dict[str, float]) -> str:
    """Same-run ratios (``a/b`` -> value) as a table; '' when there are none."""
    if not ratio:
        return ""
    rows = [[k, f"{v:.2f}x"] for k, v in ratio.items()]
    return markdown_table(["same-run ratio (median images/s)", "value"], rows)


def command_line(module: str) -> str:
    """This invocation as a user would type it (``python -m module ...``)."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if ARGV is None else ARGV)])


def finish(module: str, report: dict, table: str, json_path: str | Path | None) -> dict:
    """The one result writer: print ``table`` (markdown) and write ``report`` with
    the command, date and machine to ``json_path`` (none when empty); returns it, with
    the table as ``markdown``."""
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    full = {
        "command": command_line(module),
        "date": date,
        "machine": machine.machine_info(),
        **report,
    }
    if table:
        print("\n" + table.strip() + "\n", flush=True)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(full, indent=1) + "\n")
    return {**full, "markdown": table}
