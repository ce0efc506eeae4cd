"""The one table of integer codes that the kernels branch on (import name ``minigd.kernels.codes``).

Kernels never branch on names (STYLE.md, "The kernel contract"): the Python layer checks a
name once and hands the kernels its code.  Every code, and every constant that a kernel and
its NumPy reference must agree on, is defined here and nowhere else; ``minigd.nn``,
``minigd.optim``, the model, the backends and the Numba kernels import them from this
module.  The CUDA sources cannot import Python: ``kernels/gpu_common.cuh`` repeats the
values as ``#define MGD_<NAME>`` lines, and ``tests/test_gpu_sources.py`` checks that every
one of them equals the value here.

This module imports nothing, so any layer may use it.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- activations
IDENTITY, RELU, LEAKY_RELU, TANH, SIGMOID, GELU = range(6)
#: hidden-layer activation name -> code
ACTIVATIONS = {
    "identity": IDENTITY,
    "relu": RELU,
    "leaky_relu": LEAKY_RELU,
    "tanh": TANH,
    "sigmoid": SIGMOID,
    "gelu": GELU,
}
#: negative-side slope of ``leaky_relu`` (as PyTorch's default)
LEAKY_SLOPE = 0.01

# ----------------------------------------------------------------------------- losses
CROSS_ENTROPY, MSE, BINARY_CROSS_ENTROPY = range(3)
#: loss name -> code
LOSSES = {"cross_entropy": CROSS_ENTROPY, "mse": MSE, "binary_cross_entropy": BINARY_CROSS_ENTROPY}

# ----------------------------------------------------------------------------- batch norm
#: batch-norm placement: none, before the activation (normalise z_l), after it (normalise f(z_l))
BN_NONE, BN_BEFORE, BN_AFTER = 0, 1, 2
#: the ``batch_norm=`` argument of :class:`minigd.MLP` -> placement code
BATCH_NORM = {False: BN_NONE, True: BN_BEFORE, "before": BN_BEFORE, "after": BN_AFTER}
#: placement code -> the canonical ``batch_norm=`` value (what ``MLP.batch_norm`` reports)
BATCH_NORM_ARG = {BN_NONE: False, BN_BEFORE: True, BN_AFTER: "after"}

# ----------------------------------------------------------------------------- optimizer primitives
#: op codes of the primitives of :mod:`minigd.optim` (``Primitive.code``), which the compiled
#: backends interpret in one fused call
OP_CLIP, OP_DECAY, OP_TRACE, OP_ADAM, OP_SCALE_LR, OP_SCALE = range(6)
#: loss gradients and optimizer state (momentum, Adam moments) smaller in magnitude than this
#: are flushed to 0 by the compiled backends, to keep the arithmetic out of (100x slower)
#: subnormal numbers; 1e-30 is invisible next to any value that matters, in float32 and float64
FLUSH = 1e-30

__all__ = [
    "IDENTITY",
    "RELU",
    "LEAKY_RELU",
    "TANH",
    "SIGMOID",
    "GELU",
    "ACTIVATIONS",
    "LEAKY_SLOPE",
    "CROSS_ENTROPY",
    "MSE",
    "BINARY_CROSS_ENTROPY",
    "LOSSES",
    "BN_NONE",
    "BN_BEFORE",
    "BN_AFTER",
    "BATCH_NORM",
    "BATCH_NORM_ARG",
    "OP_CLIP",
    "OP_DECAY",
    "OP_TRACE",
    "OP_ADAM",
    "OP_SCALE_LR",
    "OP_SCALE",
    "FLUSH",
]
