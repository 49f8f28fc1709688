"""Training: the loop (``loop``), the jitted steps, state and optimizer (``step``),
signal handling (``interrupts``) and the memory pre-flight (``memory``).

No imports here: ``stagejax.evaluate`` builds on ``train.step`` while
``train.loop`` builds on ``stagejax.evaluate``.
"""
