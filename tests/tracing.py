"""Counting how often a run's train step is traced (compiled), from outside it."""


def count_traces(run) -> dict:
    """Recompile ``run.train_step`` (a `stagejax.train.loop.Run`) through a wrapper
    whose Python body runs once per trace; the returned dict's ``traces`` counts them."""
    counter = {"traces": 0}
    step_fn = run.train_step_fn

    def counted(state, batch):
        counter["traces"] += 1
        return step_fn(state, batch)

    run.train_step = run.parallel.compile_train_step(counted)
    return counter
