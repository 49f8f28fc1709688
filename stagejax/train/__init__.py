"""Training: the loop (``loop``), the jitted train step and optimizer (``step``),
signal handling (``interrupts``), the memory pre-flight (``memory``) and the
restore of a run's best checkpoint (``best``).

Training builds on `stagejax.model` and `stagejax.evaluate`; neither imports it.
"""
