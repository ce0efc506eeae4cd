"""Input validation: every public entry point checks its arguments here, once, up front.

Scalar hyper-parameters are described once in :mod:`minigd._constraints` (the table);
the ``check_*`` helpers below are thin wrappers over its constraint objects, and this
module adds the checks of arrays (X, y, magnitudes).  One error style: TypeError for a
wrong type, ValueError for a wrong value, each naming the argument, what was expected and
what was got.  Nothing is silently
coerced: a float64 array handed to a float32 model is an error, not a copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from . import nn
from ._constraints import PARAMS, Integer, Options, Real, _got  # noqa: F401  (_got: re-exported)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """One of the strings ``choices``: TypeError for a non-string, ValueError for another
    string (see :class:`minigd._constraints.Options`)."""
    return Options(tuple(choices)).check(name, value)


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """An integer (not bool) in ``[low, high]`` (see :class:`minigd._constraints.Integer`)."""
    return Integer(low, high).check(name, value)


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number (not bool) within the bounds (see
    :class:`minigd._constraints.Real`)."""
    return Real(low, high, low_open=low_open, high_open=high_open).check(name, value)


def check_dtype(name: str, value: Any) -> np.dtype:
    """float32 or float64, as a numpy.dtype (``None`` is refused, not read as a default)."""
    return PARAMS["dtype"].check(name, value)


def memory_bytes() -> int:
    """This machine's physical memory in bytes (``os.sysconf``); 1 TiB where it cannot be
    read.  Used to refuse absurd sizes with a clear error before allocating them."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return 1 << 40


def max_input(dtype: np.dtype) -> float:
    """The largest input magnitude ``fit`` accepts for ``dtype``: ``sqrt(finfo(dtype).max)``,
    about 1.8e19 for float32 and 1.3e154 for float64.  Squares of larger values (in the
    losses, the gradient norms, batch norm's variance) overflow the dtype, and a gradient
    step on such inputs makes weights of their size, whose next forward pass overflows."""
    return float(np.sqrt(np.finfo(dtype).max))


def check_magnitude(name: str, a: np.ndarray) -> None:
    """Every |entry| <= :func:`max_input` (and finite): what ``fit`` asks of its inputs and
    float targets, up front -- training on larger values diverges at once (and with a
    learning rate to blame in the message), or overflows the squared gradient norms.
    One min and one max pass, no temporary; the slow counting only when something is
    wrong."""
    lo, hi = a.min(), a.max()  # NaN propagates into both
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = int(np.count_nonzero(~np.isfinite(a)))
        raise ValueError(f"{name}: expected finite values, got {bad} NaN/inf entries")
    bound = max_input(a.dtype)
    if max(-float(lo), float(hi)) > bound:
        big = float(lo) if -float(lo) > float(hi) else float(hi)
        n_big = int(np.count_nonzero(np.abs(a) > bound))
        raise ValueError(
            f"{name}: expected entries of magnitude at most {bound:.3g} (the square root of "
            f"{a.dtype}'s largest value: beyond it the forward pass, the loss and the gradient "
            f"norms overflow to inf/NaN), got {n_big} larger entries, e.g. {big:.6g}; rescale "
            f"{name} (standardize it){' or use float64' if a.dtype == np.float32 else ''}"
        )


def check_X(X: Any, n_in: int, dtype: np.dtype, name: str = "X") -> np.ndarray:
    """A finite 2-D array of the model's dtype with ``n_in`` columns (made C-contiguous and
    writeable: a read-only array is copied).  Magnitudes are not bounded here: evaluation
    detects a forward pass that overflows (:class:`minigd.MLP`), and ``fit`` bounds its
    inputs with :func:`check_magnitude`."""
    if not isinstance(X, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {_got(X)}")
    _refuse_masked(name, X)
    if X.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (n_examples, {n_in}), got {_got(X)}")
    if X.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one example (row), got {_got(X)}")
    if X.shape[1] != n_in:
        raise ValueError(f"{name}: expected {n_in} columns (the model's input size), got {_got(X)}")
    if X.dtype != dtype:
        raise TypeError(
            f"{name}: expected dtype {dtype} (the model's dtype), got {_got(X)}; "
            f"convert explicitly, e.g. {name}.astype(np.{dtype})"
        )
    if not np.isfinite(X).all():
        bad = int(np.count_nonzero(~np.isfinite(X)))
        raise ValueError(f"{name}: expected finite values, got {bad} NaN/inf entries")
    return _kernel_ready(X)


def _refuse_masked(name: str, a: np.ndarray) -> None:
    """A masked array's finiteness check skips masked entries, but the kernels would read
    them (NaN included): refuse it rather than silently ignore the mask."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(
            f"{name}: expected a plain numpy.ndarray, got a masked array "
            f"(the mask would be ignored); fill or drop the masked entries first, "
            f"e.g. {name}.filled(0)"
        )


def _kernel_ready(a: np.ndarray) -> np.ndarray:
    """C-contiguous and writeable: Numba types read-only arrays differently, so a read-only
    input (a memmap, a broadcast, ``setflags(write=False)``) would compile every kernel a
    third time; the kernels never write inputs, but a copy is the only way to hand them
    the usual array type."""
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


def check_y(y: Any, n: int, loss_code: int, n_out: int, dtype: np.dtype, name: str = "y"):
    """Validate targets; returns ``(y_int, y_float)`` where the unused one is empty.

    * cross_entropy: integer labels of shape (n,) in ``[0, n_out)``.
    * mse / binary_cross_entropy: shape (n, n_out), or (n,) when n_out == 1, of the model's dtype.
    """
    if not isinstance(y, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {_got(y)}")
    _refuse_masked(name, y)
    if loss_code == nn.CROSS_ENTROPY:
        if y.ndim != 1 or y.shape[0] != n:
            raise ValueError(f"{name}: expected integer class labels of shape ({n},), got {_got(y)}")
        if not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"{name}: expected integer class labels for loss 'cross_entropy', got {_got(y)}")
        if n and (y.min() < 0 or y.max() >= n_out):
            raise ValueError(f"{name}: expected class labels in [0, {n_out}), got values in [{y.min()}, {y.max()}]")
        return _kernel_ready(y.astype(np.int64, copy=False)), np.empty((0, n_out), dtype)
    if y.ndim == 1 and n_out == 1:
        y = y.reshape(-1, 1)
    if y.ndim != 2 or y.shape != (n, n_out):
        raise ValueError(
            f"{name}: expected targets of shape ({n}, {n_out}){f' or ({n},)' if n_out == 1 else ''}, got {_got(y)}"
        )
    if y.dtype != dtype:
        raise TypeError(
            f"{name}: expected dtype {dtype} (the model's dtype), got {_got(y)}; "
            f"convert explicitly, e.g. {name}.astype(np.{dtype})"
        )
    if not np.isfinite(y).all():
        raise ValueError(f"{name}: expected finite values, got NaN/inf entries")
    if loss_code == nn.BINARY_CROSS_ENTROPY and (y.min() < 0 or y.max() > 1):
        raise ValueError(
            f"{name}: expected targets in [0, 1] for 'binary_cross_entropy', got values in [{y.min()}, {y.max()}]"
        )
    return np.empty(0, np.int64), _kernel_ready(y)


def check_seed(name: str, seed: Any) -> np.random.Generator:
    """A seed (a non-negative int, None or a Generator) as a numpy.random.Generator: a
    Generator is returned as is (and advanced in place by its user)."""
    seed = PARAMS["seed"].check(name, seed)
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
