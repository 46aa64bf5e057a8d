"""Training loop, optimizers, EMA, checkpointing and logging."""
