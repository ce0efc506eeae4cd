"""The only place that calls ``numba.njit``: caching and fastmath policy live here.

* ``fastmath`` is a fixed set of LLVM flags that lets reductions vectorise
  (``reassoc``, ``contract``, ...) but deliberately leaves out ``nnan`` and ``ninf``:
  divergence detection relies on NaN and inf propagating.
* ``cache=True`` writes compiled machine code next to the source (``__pycache__``) or to
  ``NUMBA_CACHE_DIR``.  Numba invalidates a cached function only when *its own* file
  changes, not when a kernel it calls from another file does; so the cache stamp of every
  minigd kernel is widened to cover all ``kernels/*.py`` sources (:func:`_sources_stamp`).  When no cache location is writable, numba refuses ``cache=True``
  at decoration time (numba issue #5566); we then warn once and compile without a cache
  instead of failing at import.
"""

from __future__ import annotations

import glob
import hashlib
import os
import warnings

import numba

FASTMATH = frozenset({"nsz", "arcp", "contract", "reassoc"})

_cache_disabled_reason: str | None = None
if os.environ.get("MINIGD_NO_CACHE"):
    _cache_disabled_reason = "MINIGD_NO_CACHE is set"


def _sources_stamp() -> str:
    """A digest of every kernel source file (name, size, mtime)."""
    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for path in sorted(glob.glob(os.path.join(here, "**", "*.py"), recursive=True)):
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, here)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


_STAMP = _sources_stamp()


def _widen_stamp(dispatcher):
    """Make the on-disk cache entry depend on all kernel sources (numba internals; if
    they change shape we keep numba's default per-file stamp)."""
    try:
        cf = dispatcher._cache._cache_file
        cf._source_stamp = (cf._source_stamp, _STAMP)
    except AttributeError:  # pragma: no cover - depends on numba internals
        pass
    return dispatcher


def jit(fn=None, *, cache: bool = True, fastmath: bool = True, inline: str = "never"):
    """``numba.njit`` with minigd's policy; use as ``@jit`` or ``@jit(cache=False)``."""
    if fn is None:
        return lambda f: jit(f, cache=cache, fastmath=fastmath, inline=inline)
    global _cache_disabled_reason
    opts = dict(fastmath=set(FASTMATH) if fastmath else False, error_model="numpy", inline=inline, nogil=True)
    if cache and _cache_disabled_reason is None:
        try:
            return _widen_stamp(numba.njit(cache=True, **opts)(fn))
        except RuntimeError as exc:  # no writable cache locator (numba#5566)
            _cache_disabled_reason = str(exc)
            warnings.warn(
                "minigd: numba cannot write its compile cache here "
                f"({exc}); kernels will be compiled on every import (set NUMBA_CACHE_DIR "
                "to a writable directory to keep them)",
                RuntimeWarning,
                stacklevel=2,
            )
    return numba.njit(cache=False, **opts)(fn)


def cache_status() -> str:
    """'enabled', or why the on-disk compile cache is off."""
    return "enabled" if _cache_disabled_reason is None else f"disabled: {_cache_disabled_reason}"
