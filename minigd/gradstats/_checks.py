"""Argument checks for :mod:`minigd.gradstats`.

Every bad argument raises :class:`ValueError` whose message names the argument, what was
expected and what was got, in the form ``"<name>: expected <what>, got <value>"``.
"""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def got(value: Any) -> str:
    """A short description of ``value`` for error messages."""
    if isinstance(value, np.ndarray):
        if value.size <= 4:
            return f"array {value.tolist()!r} of shape {value.shape} and dtype {value.dtype}"
        return f"array of shape {value.shape} and dtype {value.dtype}"
    r = repr(value)
    if len(r) > 60:
        r = r[:57] + "..."
    return f"{type(value).__name__} {r}"


def check_int(name: str, value: Any, *, low: int | None = None) -> int:
    """An integer (Python or numpy, not bool) ``>= low``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an integer{'' if low is None else f' >= {low}'}, "
                         f"got {got(value)}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value}")
    return value


def check_scalar(name: str, value: Any, *, low: float | None = None, low_open: bool = False,
                 high: float | None = None, high_open: bool = False,
                 allow_inf: bool = False) -> float:
    """A real number (not bool), finite unless ``allow_inf``, within the given bounds."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a real number, got {got(value)}")
    v = float(value)
    if np.isnan(v) or (np.isinf(v) and not allow_inf):
        raise ValueError(f"{name}: expected a {'non-NaN' if allow_inf else 'finite'} number, "
                         f"got {v}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name}: expected a number {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"{name}: expected a number {'<' if high_open else '<='} {high}, got {v}")
    return v


def check_array(name: str, value: Any, *, low: float | None = None, low_open: bool = False,
                allow_inf: bool = False) -> np.ndarray:
    """A real array-like (any shape) as float64, non-NaN, finite unless ``allow_inf``, ``>= low``
    (``> low`` with ``low_open``)."""
    try:
        a = np.asarray(value)
    except Exception:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name}: expected a real number or array, got {got(value)}") from None
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer)
                               or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name}: expected a real number or array, got {got(value)}")
    a = a.astype(np.float64, copy=False)
    bad = np.isnan(a) | (np.isinf(a) if not allow_inf else False)
    if np.any(bad):
        what = "non-NaN" if allow_inf else "finite"
        raise ValueError(f"{name}: expected {what} values, got {int(np.count_nonzero(bad))} "
                         f"NaN/inf entries in {got(value)}")
    if low is not None:
        bad = (a <= low) if low_open else (a < low)
        if bad.any():
            raise ValueError(f"{name}: expected values {'>' if low_open else '>='} {low}, "
                             f"got {float(a[bad].ravel()[0])!r} (in {got(value)})")
    return a


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
