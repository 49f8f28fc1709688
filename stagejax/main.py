r"""Train, evaluate or predict spermatogenic stages.

  python -m stagejax.main --config=configs/resnet.py --workdir=runs/resnet50
  python -m stagejax.main --config=configs/resnet.py:study --workdir=runs/r50 \
      --config.data_dir=/path/to/root
  python -m stagejax.main --workdir=runs/resnet50 --mode=eval
  python -m stagejax.main --workdir=runs/resnet50 --mode=predict --images=/path/to/images
  python -m stagejax.main --workdir=runs/resnet50 --mode=section --slides=/path/to/slides

The config is the training recipe: any field can be overridden
(``--config.global_batch_size=48``) and a field given on the command line
always wins (`stagejax.recipe`). On a trained workdir the recipe is the run's
own W/config.json, so eval, predict and section need only ``--workdir``. What
a mode acts on (``--images``, ``--slides``, ``--tta``, ...) are its own flags.
Corrected outlines go back into a dataset with ``python -m stagejax.section export``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from stagejax import cli, mode_flags
from stagejax import config as config_lib
from stagejax.errors import ConfigError, StagejaxError, WorkdirError
from stagejax.runtime import accelerator, lock, logs
from stagejax.runtime import workdir as workdir_lib
from stagejax.runtime import xla_flags as xla_flags_lib
from stagejax.runtime.files import writing
from stagejax.train import interrupts, memory

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file (configs/*.py[:study|demo]); required to train. On a trained workdir the "
    "recipe is W/config.json's.",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "predict", "section"],
    "train: train, keep the best epoch, evaluate it on the test split. "
    "eval: evaluate the best checkpoint. predict: stage unlabeled images (--images). "
    "section: detect and stage every tubule of whole slides (--slides; none: a simulated "
    "section); python -m stagejax.section export turns corrected outlines into a dataset.",
)
mode_flags.define_flags()
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_integer(
    "heartbeat_timeout",
    60,
    "Multi-host: seconds without a heartbeat after which a process counts "
    "as dead and all the others stop with an error instead of hanging.",
)
flags.DEFINE_integer(
    "initialization_timeout", 300, "Multi-host: seconds to wait for every process to join."
)
flags.DEFINE_bool(
    "require_accelerator",
    False,
    "Stop with an error when JAX runs on the CPU (e.g. a GPU/TPU job whose JAX and plugin "
    "versions disagree); without it such a run warns and goes on.",
)
flags.mark_flags_as_required(["workdir"])

log = logging.getLogger("stagejax")


def initialize_distributed() -> None:
    """Join a multi-process run: explicit flags, or automatic on a multi-host TPU VM.

    Must run before anything touches the devices.
    """
    timeouts = dict(
        initialization_timeout=FLAGS.initialization_timeout,
        heartbeat_timeout_seconds=FLAGS.heartbeat_timeout,
    )
    if FLAGS.coordinator_address or FLAGS.num_processes:
        # CPU processes need a collectives backend to talk to each other (gloo is
        # jax 0.10's default; set it so that a changed default cannot hang a run).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
            **timeouts,
        )
    elif len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        jax.distributed.initialize(**timeouts)  # Cloud TPU VM slice: JAX finds its peers.


def _keep_remat_on_cpu() -> None:
    """With ``--config.remat=True``, keep XLA:CPU from undoing it (`memory.xla_flags_for`);
    set before JAX starts."""
    flags_now = os.environ.get("XLA_FLAGS", "")
    wanted = memory.xla_flags_for(bool(FLAGS.config and FLAGS.config.remat), flags_now)
    if wanted != flags_now:
        os.environ["XLA_FLAGS"] = wanted


def _cpu_xla_defaults() -> str | None:
    """Merge stagejax's XLA:CPU defaults into XLA_FLAGS (a user's flag of the same name
    wins), on CPU runs only; set before JAX starts. JAX's platform setting is read
    from its config, which starts no backend (`xla_flags_lib.apply_cpu_defaults`)."""
    return xla_flags_lib.apply_cpu_defaults(platforms=jax.config.jax_platforms)


def _what_runs(config) -> str:
    """The run's first line, in the user's terms: what it does, on what, where."""
    data = config.data_dir or (
        f"the SIMULATED dataset ({config.simulated.num_images} images of "
        f"{config.simulated.image_size} px, not real tubules)"
    )
    model = config.init_from or f"the model trained in {FLAGS.workdir}"
    if FLAGS.mode == "train":
        return f"Training {config.model} on {data}; results go to {FLAGS.workdir}"
    if FLAGS.mode == "eval":
        return f"Evaluating {model} on the {config.eval_split} split of {data}"
    if FLAGS.mode == "predict":
        return f"Staging the images in {FLAGS.images or '(no folder given)'} with {model}"
    slides = FLAGS.slides or "a SIMULATED section"
    return f"Staging every tubule of {slides} with {model}"


def _check_model_there(config) -> None:
    """eval/predict/section need a trained workdir or ``init_from``; training needs a
    recipe: say so first, before a size check of training fields the run will not use."""
    if FLAGS.mode != "train" and not _trained(FLAGS.workdir) and not (config and config.init_from):
        raise WorkdirError(
            f"no trained model in {FLAGS.workdir} (no {workdir_lib.CONFIG_FILE}); train "
            "there first (--mode=train) or pass --config=FILE --config.init_from=MODEL_DIR"
        )
    if config is None:
        raise ConfigError("--config: required to train (e.g. --config=configs/resnet.py)")


def run(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    interrupts.install()  # Ctrl-C / SIGTERM: one line, never a traceback
    config = None
    try:
        _keep_remat_on_cpu()
        xla_defaults = _cpu_xla_defaults()
        initialize_distributed()
        logs.setup(FLAGS.verbose)
        accelerator.check(
            jax.default_backend(), jax.config.jax_platforms, FLAGS.require_accelerator
        )
        mode_flags.check_flags(FLAGS.mode)
        _check_model_there(FLAGS.config)
        config = ml_collections.ConfigDict(FLAGS.config.to_dict())  # unlocked: the run's own
        log.info("%s", _what_runs(config))
        if xla_defaults and FLAGS.verbose:
            log.info("XLA_FLAGS=%s (stagejax's CPU defaults added)", xla_defaults)
        log.info(
            "on %d %s device(s), %d process(es) (JAX %s)",
            jax.device_count(),
            jax.devices()[0].platform.upper(),
            jax.process_count(),
            jax.__version__,
        )
        # Every value, before any data is read; a trained workdir brings its own sizes.
        config_lib.validate(config, sizes=FLAGS.mode == "train" or not _trained(FLAGS.workdir))
        agree = _all_agree if jax.process_count() > 1 else None
        lock_dir = mode_flags.lock_dir(FLAGS.mode, FLAGS.workdir)
        # The lock is taken before the data is read (a second run is refused at once);
        # a failure before the run's first checkpoint takes back what it wrote.
        with (
            writing(FLAGS.workdir),
            lock.claim(lock_dir, hold=jax.process_index() == 0, agree=agree) as claim,
        ):
            _run_mode(config, claim)
        if lock_dir != FLAGS.workdir:  # a shard's own lock folder, empty once released
            with contextlib.suppress(OSError):
                os.rmdir(lock_dir)
    except StagejaxError as e:
        cli.exit_with(f"error: {e}", 2)
    except interrupts.Interrupted as e:  # exit status 130 (SIGINT) or 143 (SIGTERM)
        when = "before training started" if FLAGS.mode == "train" else f"(--mode={FLAGS.mode})"
        cli.exit_with(
            str(e)
            if e.final
            else f"{e} {when}; the workdir is as it was; rerun the same command to start again",
            e.exit_code,
        )
    except jax.errors.JaxRuntimeError as e:
        oom = memory.out_of_memory(e, config) if config is not None else None
        if oom is None:
            raise
        cli.exit_with(f"error: {oom}", 2)


def _all_agree(ok: bool) -> bool:
    """Multi-host: process 0's ``ok``, on every process (it alone takes the lock)."""
    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def _run_mode(config, claim: lock.Claim) -> None:
    # Imported here: they load the model and data stack, which --help does not need.
    from stagejax.evaluate import predict
    from stagejax.section import run as section_run
    from stagejax.train import best, loop

    workdir = _prepare_workdir(config)
    if FLAGS.mode == "train":
        loop.train_and_evaluate(config, workdir, claim=claim)
    elif FLAGS.mode == "eval":
        best.evaluate_workdir(config, workdir, overwrite=FLAGS.overwrite)
    elif FLAGS.mode == "section":
        section_run.stage_sections(config, workdir, mode_flags.section_options(), claim)
    else:
        predict.predict_folder(config, workdir, mode_flags.predict_options())


def _trained(workdir: str) -> bool:
    """Whether ``workdir`` holds a run's config.json (eval/predict/section use it)."""
    return (Path(workdir).expanduser() / workdir_lib.CONFIG_FILE).is_file()


def _prepare_workdir(config) -> Path:
    """The checked workdir. A training run's workdir brings its own recipe (so model and
    crop match training; `config_lib.complete_argv`); without one, ``--config.init_from``
    (e.g. weights from ``stagejax.convert``) is evaluated as it is, in a new workdir."""
    if FLAGS.mode == "train":
        return workdir_lib.prepare_workdir(FLAGS.workdir, config, write=False)
    if _trained(FLAGS.workdir):
        return workdir_lib.prepare_workdir(FLAGS.workdir, config, must_exist=True)
    return workdir_lib.prepare_workdir(FLAGS.workdir, config, write=jax.process_index() == 0)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing; a bad flag or config override (a field that does not exist,
    a value of the wrong type) is one ``error:`` line and exit 2 (`stagejax.cli`)."""
    return cli.parse_flags(config_lib.complete_argv(argv), check=config_lib.check_overrides)


def main() -> None:
    app.run(run, flags_parser=_parse_flags)


if __name__ == "__main__":
    main()
