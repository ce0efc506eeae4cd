"""The only place that calls ``numba.njit``: caching and fastmath policy live here.

* ``fastmath`` is a fixed set of LLVM flags that lets reductions vectorise
  (``reassoc``, ``contract``, ...) but deliberately leaves out ``nnan`` and ``ninf``:
  divergence detection relies on NaN and inf propagating.
* ``cache=True`` writes compiled machine code next to the source (``__pycache__``) or to
  ``NUMBA_CACHE_DIR``.  Numba invalidates a cached function only when *its own* file
  changes, not when a kernel it calls from another file does; so the cache stamp of every
  minigd kernel is *replaced* by a digest of the contents of all ``kernels/*.py`` sources
  (:func:`_sources_stamp`: names relative to the package, bytes, and NumPy's version), with
  no modification time and no absolute path in it.  A cache filled in one copy of the
  package is then valid in any other copy with the same sources: the wheel ships the one
  its build filled (``_build_backend/minigd_build.py``), and pip's copying (new mtimes, a new directory) does not
  invalidate it.  When no cache location is writable, numba refuses ``cache=True``
  at decoration time (numba issue #5566); we then warn once and compile without a cache
  instead of failing at import.  Numba itself tries the package's ``__pycache__`` first and
  falls back to a user-wide directory (``$XDG_CACHE_HOME/numba`` or ``~/.cache/numba``)
  when that is not writable: :func:`cache_dirs` says where the kernels went.  The entries a
  wheel shipped in the package's ``__pycache__`` are then copied there first
  (:func:`_seed_from_shipped`), so that a read-only install still loads them.
* :func:`compile_count` counts numba's compilations in this process (cache misses: a kernel
  loaded from the cache is not one), so that the "compiling kernels" notice and ``minigd
  warmup`` say what really happened.
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import os
import shutil
import warnings

import numba
from numba.core import event as _event

FASTMATH = frozenset({"nsz", "arcp", "contract", "reassoc"})
#: :data:`FASTMATH` without ``reassoc``: for loops whose float sums must keep the order they
#: are written in (a grouping that bounds a rounding error; reassociation may undo it)
FASTMATH_ORDERED = FASTMATH - {"reassoc"}

_cache_disabled_reason: str | None = None
if os.environ.get("MINIGD_NO_CACHE"):
    _cache_disabled_reason = "MINIGD_NO_CACHE is set"


_compiles = 0
#: the directories numba writes minigd's compiled kernels to (see :func:`cache_dirs`)
_cache_paths: set = set()


class _CompileCounter(_event.Listener):
    """Counts the starts of numba's "numba:compile" events: one per dispatcher and signature
    compiled (nested callees included); loading from the on-disk cache fires none."""

    def on_start(self, event):
        global _compiles
        _compiles += 1

    def on_end(self, event):
        pass


_event.register("numba:compile", _CompileCounter())


def compile_count() -> int:
    """How many numba compilations (any dispatcher, nested ones included) this process has
    started so far: the difference over a block of code says whether it compiled anything
    or only loaded from the cache."""
    return _compiles


def cache_dirs() -> list[str]:
    """Where numba keeps minigd's compiled kernels (normally one directory: the package's
    ``kernels/__pycache__``, or ``NUMBA_CACHE_DIR``, or numba's user-wide cache directory
    when the package directory is not writable); empty when the cache is off
    (:func:`cache_status`)."""
    return sorted(_cache_paths)


def _sources_stamp() -> str:
    """A digest of the kernel sources' contents: every ``*.py`` file under ``kernels/`` (as
    installed: ``minigd/kernels/``), by its name relative to that directory and its bytes,
    plus NumPy's major.minor version.

    No modification time and no absolute path: pip copies the files (new mtimes, another
    directory), and the cache the wheel's build filled must stay valid after that.  NumPy's
    version is in because numba's cache does not key on it, and a shipped cache crosses
    environments (numba's own version, the Python version and the CPU are in numba's keys
    already: a mismatch of any of them is a cache miss, and the kernel compiles)."""
    import numpy as np

    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for path in sorted(glob.glob(os.path.join(here, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, here).replace(os.sep, "/")
        with open(path, "rb") as f:
            data = f.read()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    h.update(("numpy " + ".".join(np.__version__.split(".")[:2])).encode())
    return "minigd-sources-sha256:" + h.hexdigest()


_STAMP = _sources_stamp()
#: whether the stamp could be replaced (False: numba's internals changed shape, and numba's
#: own per-file stamp is in use: a shipped cache may then not load, and kernels compile)
stamp_replaced = False


def _widen_stamp(dispatcher):
    """Make the on-disk cache entry depend on all kernel sources' contents, and on nothing
    path- or time-dependent: numba's per-file stamp (a hash of the function's file in recent
    numba, its (mtime, size) in older ones) is replaced by :data:`_STAMP`.  Numba internals: if they
    change shape, numba's default stamp stays and things just compile when it does not
    match."""
    global stamp_replaced
    cf = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if cf is not None and hasattr(cf, "_source_stamp"):
        cf._source_stamp = _STAMP
        stamp_replaced = True
    return dispatcher


def _seed_from_shipped(dispatcher) -> None:
    """Where numba caches in its user-wide directory (the package's ``__pycache__`` is not
    writable: a system-wide install, a container image run as another user), copy the
    entries the wheel shipped in ``__pycache__`` there first, unless that directory already
    holds a valid index of the kernel: numba would otherwise never read the shipped cache
    and compile instead.  Not done for ``NUMBA_CACHE_DIR`` (an explicit choice, e.g. for
    an empty cache).  Best effort, numba internals: any failure leaves numba to compile."""
    try:
        from numba.core.caching import UserWideCacheLocator

        cache = dispatcher._cache
        if not isinstance(cache._impl.locator, UserWideCacheLocator):
            return
        cf = cache._cache_file
        shipped = os.path.join(os.path.dirname(os.path.abspath(inspect.getfile(dispatcher.py_func))), "__pycache__")
        index = cf._index_name
        if not os.path.isfile(os.path.join(shipped, index)) or cf._load_index():
            return  # nothing shipped, or the user-wide cache is valid already
        base = cache._impl.filename_base + "."
        data = [n for n in os.listdir(shipped) if n.startswith(base) and n.endswith(".nbc")]
        for name in data + [index]:  # the index last: it names the data files
            tmp = os.path.join(cf._cache_path, f"{name}.seed.{os.getpid()}")
            shutil.copyfile(os.path.join(shipped, name), tmp)
            os.replace(tmp, os.path.join(cf._cache_path, name))
    except Exception:  # noqa: BLE001 - best effort: numba compiles as it would have
        pass


def jit(fn=None, *, cache: bool = True, fastmath: bool | frozenset = True, inline: str = "never"):
    """``numba.njit`` with minigd's policy; use as ``@jit`` or ``@jit(cache=False)``
    (``fastmath``: True for :data:`FASTMATH`, a set of LLVM flags such as
    :data:`FASTMATH_ORDERED`, or False for none)."""
    if fn is None:
        return lambda f: jit(f, cache=cache, fastmath=fastmath, inline=inline)
    global _cache_disabled_reason
    flags = set(FASTMATH) if fastmath is True else (set(fastmath) if fastmath else False)
    opts = dict(fastmath=flags, error_model="numpy", inline=inline, nogil=True)
    if cache and _cache_disabled_reason is None:
        try:
            dispatcher = _widen_stamp(numba.njit(cache=True, **opts)(fn))
            _seed_from_shipped(dispatcher)
            path = getattr(getattr(dispatcher, "_cache", None), "_cache_path", None)
            if path:  # numba internals: without them, no location to report
                _cache_paths.add(path)
            return dispatcher
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
