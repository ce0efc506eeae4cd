"""Optimizers (composable primitives over the flat parameter vector) and schedules."""

from .aliases import SGD, Adam, AdamW
from .base import Optimizer, OptState, Primitive, chain
from .schedules import BatchSizeSchedule, constant, cosine, exponential, scale_lr, step_decay, warmup
from .transforms import add_decayed_weights, clip_by_global_norm, scale, scale_by_adam, scale_by_lr, trace

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "Optimizer",
    "OptState",
    "Primitive",
    "chain",
    "BatchSizeSchedule",
    "constant",
    "cosine",
    "exponential",
    "scale_lr",
    "step_decay",
    "warmup",
    "add_decayed_weights",
    "clip_by_global_norm",
    "scale",
    "scale_by_adam",
    "scale_by_lr",
    "trace",
]
