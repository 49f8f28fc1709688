"""Run plumbing: checkpoints, the workdir (its config, lock and undo), safe file
writes, metric writers and the data-parallel layout (jit mesh or pmap)."""
