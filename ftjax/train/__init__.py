"""The train loop (`run`), its step functions, optimizer, checkpointing and metrics."""

from ftjax.train.loop import NonFiniteLossError, run
