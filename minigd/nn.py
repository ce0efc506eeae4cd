"""Activations and losses by name, and their NumPy reference formulas.

Kernels never branch on names: the Python layer validates a name once and hands the
kernels its integer code, from the one table :mod:`minigd.kernels.codes` (re-exported
here: ``nn.ACTIVATIONS``, ``nn.LOSSES``, ``nn.RELU``, ...).  The NumPy formulas below are
the readable definitions that the reference backend uses and every other backend is
tested against.

Conventions (per example i; a batch loss is the *mean* of per-example losses):

* ``cross_entropy``: ``-log softmax(z_i)[y_i]`` with integer labels ``y_i in [0, n_out)``.
* ``mse``: ``1/2 * sum_k (z_ik - y_ik)**2``.
* ``binary_cross_entropy``: ``sum_k softplus(z_ik) - y_ik * z_ik`` (logits in, targets in [0, 1]).
"""

from __future__ import annotations

import math

import numpy as np

# the codes and the constants the kernels share live in one table (minigd.kernels.codes)
from minigd.kernels.codes import (  # noqa: F401
    ACTIVATIONS,
    BINARY_CROSS_ENTROPY,
    CROSS_ENTROPY,
    GELU,
    IDENTITY,
    LEAKY_RELU,
    LEAKY_SLOPE,
    LOSSES,
    MSE,
    RELU,
    SIGMOID,
    TANH,
)

INITS = ("he_uniform", "he_normal", "glorot_uniform", "glorot_normal")

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[x.dtype])(x) if x.size else x.copy()


def activation(code: int, z: np.ndarray) -> np.ndarray:
    """Reference activation ``a = f(z)`` (returns a new array)."""
    if code == IDENTITY:
        return z.copy()
    if code == RELU:
        return np.maximum(z, 0)
    if code == LEAKY_RELU:
        return np.where(z > 0, z, z * z.dtype.type(LEAKY_SLOPE))
    if code == TANH:
        return np.tanh(z)
    if code == SIGMOID:
        return 1 / (1 + np.exp(-z))
    if code == GELU:  # exact GELU, z * Phi(z)
        return 0.5 * z * (1 + _erf(z * z.dtype.type(_SQRT_HALF)))
    raise ValueError(f"unknown activation code {code}")


def activation_grad(code: int, z: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Reference derivative ``f'(z)`` given both ``z`` and ``a = f(z)``."""
    one = z.dtype.type(1)
    if code == IDENTITY:
        return np.ones_like(z)
    if code == RELU:
        return (z > 0).astype(z.dtype)
    if code == LEAKY_RELU:
        return np.where(z > 0, one, z.dtype.type(LEAKY_SLOPE))
    if code == TANH:
        return one - a * a
    if code == SIGMOID:
        return a * (one - a)
    if code == GELU:
        phi = np.exp(-0.5 * z * z) * z.dtype.type(_INV_SQRT_2PI)
        return 0.5 * (1 + _erf(z * z.dtype.type(_SQRT_HALF))) + z * phi
    raise ValueError(f"unknown activation code {code}")


def per_example_loss(code: int, z: np.ndarray, y_int: np.ndarray, y_float: np.ndarray) -> np.ndarray:
    """Reference per-example losses (n,) in float64, see the module docstring."""
    z64 = z.astype(np.float64)
    if code == CROSS_ENTROPY:
        m = z64.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(z64 - m).sum(axis=1))
        return lse - z64[np.arange(len(z64)), y_int]
    if code == MSE:
        return 0.5 * ((z64 - y_float) ** 2).sum(axis=1)
    if code == BINARY_CROSS_ENTROPY:
        softplus = np.maximum(z64, 0) + np.log1p(np.exp(-np.abs(z64)))
        return (softplus - y_float * z64).sum(axis=1)
    raise ValueError(f"unknown loss code {code}")


def loss_grad(code: int, z: np.ndarray, y_int: np.ndarray, y_float: np.ndarray) -> np.ndarray:
    """Reference gradient of each *per-example* loss with respect to its logits, (n, n_out)."""
    if code == CROSS_ENTROPY:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        p[np.arange(len(z)), y_int] -= 1
        return p
    if code == MSE:
        return z - y_float
    if code == BINARY_CROSS_ENTROPY:
        return 1 / (1 + np.exp(-z)) - y_float
    raise ValueError(f"unknown loss code {code}")
