"""Argument checks for :mod:`minigd.gradstats`: thin wrappers over the parameter table
(:mod:`minigd._constraints`), so gradstats speaks minigd's one error style -- a wrong type
is a :class:`TypeError`, a wrong value a :class:`ValueError`, each in the form
``"<name>: expected <what>, got <value>"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minigd._constraints import PARAMS, Integer, NoneOr, Real, RealArray, _got, check_param  # noqa: F401


def got(value: Any) -> str:
    """A short description of ``value`` for error messages (a tiny array's entries too)."""
    return _got(value, small_arrays=True)


def check_int(name: str, value: Any, *, low: int | None = None, expected: str | None = None) -> int:
    """An integer (Python or numpy, not bool) ``>= low``; ``expected`` replaces the
    message's "an integer >= low"."""
    return Integer(low, expected=expected).check(name, value)


def check_int_or_none(name: str, value: Any, *, low: int | None = None, expected: str | None = None) -> int | None:
    """None (returned as is) or what :func:`check_int` accepts."""
    return NoneOr(Integer(low, expected=expected)).check(name, value)


def check_scalar(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    low_open: bool = False,
    high: float | None = None,
    high_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """A real number (not bool; a 0-d array too), finite unless ``allow_inf``, within the
    given bounds."""
    return Real(low, high, low_open=low_open, high_open=high_open, finite=not allow_inf).check(name, value)


def check_array(
    name: str, value: Any, *, low: float | None = None, low_open: bool = False, allow_inf: bool = False
) -> np.ndarray:
    """A real array-like (any shape) as float64, non-NaN, finite unless ``allow_inf``, ``>= low``
    (``> low`` with ``low_open``)."""
    return RealArray(low, low_open=low_open, finite=not allow_inf).check(name, value)


def as_result(a: np.ndarray):
    """A Python float for 0-d results, else the array."""
    a = np.asarray(a)
    return float(a) if a.ndim == 0 else a


def safe_ratio(num, den):
    """``num / den`` elementwise with ``x/0 = inf`` for ``x > 0`` and ``0/0 = nan``, no warnings."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den
