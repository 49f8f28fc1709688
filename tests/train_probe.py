"""Runs a few training steps in a fresh process and saves the resulting parameters.

The parallelism tests start this script in subprocesses because the number of
(fake CPU) devices and the distributed runtime must be set before JAX starts:

  python tests/train_probe.py --out P.npz --data DIR --cache C --devices 8 --mode jit
  (plus --process_id/--num_processes/--port for a multi-process run)
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

from configs import default  # noqa: E402
from stagejax import data  # noqa: E402
from stagejax.data import input_pipeline  # noqa: E402
from stagejax.train import loop as trainer  # noqa: E402
from tests.tracing import count_traces  # noqa: E402

config = default.get_config()
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

run = trainer.Run(config, data.load(config))
counter = count_traces(run)
state = run.parallel.put_state(run.initial_state)
batches = run.parallel.prefetch(input_pipeline.train_batches(run.dataset.splits["train"], config))
losses = []
for step in range(args.steps):
    if step == args.die_at_step:
        os._exit(17)  # Simulates a crashed host: no clean shutdown.
    state, m = run.train_step(state, next(batches))
    losses.append(m["loss"])
    if step == 0:
        traces_after_first = counter["traces"]
losses = [float(x) for x in run.parallel.metrics_to_host(losses)]
host = run.parallel.host_state(state)
leaves = [np.asarray(x) for x in jax.tree.leaves((host.params, host.batch_stats))]
if jax.process_index() == 0:
    np.savez(
        args.out,
        *leaves,
        losses=np.array(losses),
        traces=counter["traces"],
        traces_after_first=traces_after_first,
    )
print("probe done", jax.process_index(), losses, flush=True)
