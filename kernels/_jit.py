"""The only place that calls ``numba.njit``: caching and fastmath policy live here.

* ``fastmath`` is a fixed set of LLVM flags that lets reductions vectorise
  (``reassoc``, ``contract``, ...) but deliberately leaves out ``nnan`` and ``ninf``:
  divergence detection relies on NaN and inf propagating.
* ``cache=True`` writes compiled machine code next to the source (``__pycache__``) or to
  ``NUMBA_CACHE_DIR``.  When no cache location is writable, numba refuses ``cache=True``
  at decoration time (numba issue #5566); we then warn once and compile without a cache
  instead of failing at import.
"""
from __future__ import annotations

import os
import warnings

import numba

FASTMATH = frozenset({"nsz", "arcp", "contract", "reassoc"})

_cache_disabled_reason: str | None = None
if os.environ.get("MINIGD_NO_CACHE"):
    _cache_disabled_reason = "MINIGD_NO_CACHE is set"


def jit(fn=None, *, cache: bool = True, fastmath: bool = True, inline: str = "never"):
    """``numba.njit`` with minigd's policy; use as ``@jit`` or ``@jit(cache=False)``."""
    if fn is None:
        return lambda f: jit(f, cache=cache, fastmath=fastmath, inline=inline)
    global _cache_disabled_reason
    opts = dict(fastmath=set(FASTMATH) if fastmath else False, error_model="numpy", inline=inline,
                nogil=True)
    if cache and _cache_disabled_reason is None:
        try:
            return numba.njit(cache=True, **opts)(fn)
        except RuntimeError as exc:  # no writable cache locator (numba#5566)
            _cache_disabled_reason = str(exc)
            warnings.warn(
                "minigd: numba cannot write its compile cache here "
                f"({exc}); kernels will be compiled on every import (set NUMBA_CACHE_DIR "
                "to a writable directory to keep them)", RuntimeWarning, stacklevel=2)
    return numba.njit(cache=False, **opts)(fn)


def cache_status() -> str:
    """'enabled', or why the on-disk compile cache is off."""
    return "enabled" if _cache_disabled_reason is None else f"disabled: {_cache_disabled_reason}"
