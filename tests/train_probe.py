"""Runs a few training steps in a fresh process and saves the resulting parameters.

The parallelism tests start this script in subprocesses because the number of
(fake CPU) devices and the distributed runtime must be set before JAX starts:

  python tests/train_probe.py --out P.npz --data DIR --cache C --devices 8 --mode jit
  (plus --process_id/--num_processes/--port for a multi-process run;
  --data_on_device true: the batches the training loop makes with the split kept
  on the devices, data/on_device.py; --compare_paths: the Grain path, then that
  one, with the same compiled step, checking that their batches are equal)
"""

import argparse
import os
import sys
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--data", required=True)
p.add_argument("--cache", required=True)
p.add_argument("--devices", type=int, default=1)
p.add_argument("--mode", default="jit")
p.add_argument("--steps", type=int, default=3)
p.add_argument("--batch", type=int, default=24)
p.add_argument("--process_id", type=int, default=0)
p.add_argument("--num_processes", type=int, default=1)
p.add_argument("--port", type=int, default=0)
p.add_argument("--optimizer", default="sgd")
p.add_argument("--die_at_step", type=int, default=-1)
p.add_argument("--data_on_device", default="false")
p.add_argument("--compare_paths", action="store_true")
args = p.parse_args()

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if args.num_processes > 1:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=10,
    )

import numpy as np  # noqa: E402

from stagejax import datasets, recipe  # noqa: E402
from stagejax.data import input_pipeline, on_device  # noqa: E402
from stagejax.train import loop as trainer  # noqa: E402
from tests.tracing import count_traces  # noqa: E402

config = recipe.get_config()
config.model = "resnet18"
config.data_dir = args.data
config.cache_dir = args.cache
config.crop_size = 48
config.crop_range = 0
config.global_batch_size = args.batch
config.eval_batch_size = args.batch
config.parallelism = args.mode
config.num_epochs = 1
# SGD: parameters move linearly in the gradient, so float rounding differences
# between device layouts stay at rounding level (Adam's first steps are
# ~lr * sign(g) and flip for gradients that are zero up to rounding).
config.optimizer = args.optimizer
config.learning_rate = 0.001
config.data_on_device = "true" if args.compare_paths else args.data_on_device

run = trainer.Run(config, datasets.load(config))
counter = count_traces(run)
assembly = {"traces": 0}
_assemble = on_device.assemble


def _counted_assemble(*a):  # runs once per trace of the batch assembly
    assembly["traces"] += 1
    return _assemble(*a)


on_device.assemble = _counted_assemble


initial = jax.device_get(run.initial_state)


def local_rows(x) -> np.ndarray:
    """This process's examples of a device batch (jit: its shards in global order)."""
    if run.parallel.mode == "pmap":
        return np.asarray(x).reshape(-1, *np.shape(x)[2:])
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def train(batches, reference=None):
    """``args.steps`` steps from the initial state: (host losses, leaves, traces after
    step 1, whether every batch equalled ``reference``'s)."""
    state = run.parallel.put_state(initial)  # new buffers: the step donates them
    losses, same = [], True
    for step in range(args.steps):
        if step == args.die_at_step:
            os._exit(17)  # Simulates a crashed host: no clean shutdown.
        batch = next(batches)
        if reference is not None:
            ref = next(reference)
            same &= all(np.array_equal(local_rows(batch[k]), local_rows(ref[k])) for k in ref)
        state, m = run.train_step(state, batch)
        losses.append(m["loss"])
        if step == 0:
            after_first = counter["traces"]
    losses = [float(x) for x in run.parallel.metrics_to_host(losses)]
    host = run.parallel.host_state(state)
    leaves = [np.asarray(x) for x in jax.tree.leaves((host.params, host.batch_stats))]
    return losses, leaves, after_first, same


def grain_batches():
    split = run.dataset.splits["train"]
    return run.parallel.prefetch(input_pipeline.train_batches(split, config))


extra = {}
if args.compare_paths:  # the resident split, then Grain, through the same jitted step
    losses, leaves, _, same = train(trainer.train_feed(run, 0)[0], grain_batches())
    if not same:  # every process checks its own rows
        sys.exit(f"process {jax.process_index()}: resident batches differ from Grain's")
    extra = {"resident_traces": counter["traces"]}
    # pmap traces the step once more for numpy batches; none after that first step.
    grain_losses, grain_leaves, traces_after_first, _ = train(grain_batches())
    extra.update(
        grain_losses=np.array(grain_losses),
        params_equal=all(np.array_equal(a, b) for a, b in zip(leaves, grain_leaves, strict=True)),
        batches_equal=same,
    )
elif run.data_on_device.on:  # as the training loop feeds it
    losses, leaves, traces_after_first, _ = train(trainer.train_feed(run, 0)[0])
else:
    losses, leaves, traces_after_first, _ = train(grain_batches())
if jax.process_index() == 0:
    np.savez(
        args.out,
        *leaves,
        losses=np.array(losses),
        traces=counter["traces"],
        traces_after_first=traces_after_first,
        assembly_traces=assembly["traces"],
        **extra,
    )
print("probe done", jax.process_index(), losses, flush=True)
