"""Compile the CPU kernels up front, so that nothing timed afterwards pays for compilation.

Numba compiles a kernel the first time it runs with a dtype, and keeps the machine code in
its on-disk cache (``kernels/__pycache__``, ``NUMBA_CACHE_DIR``, or numba's user-wide cache
directory when the package directory is not writable): the first run on a machine spends
seconds compiling, later ones load.  :func:`warmup` runs, per dtype, what a first model,
``fit`` and ``minigd study`` run (:data:`COVERS`), through the public API, under one
"compiling kernels (first run only)" notice on stderr when it compiles for over a second.
``make install`` runs it (``python -m minigd warmup``), so a checkout's first ``fit`` loads
its kernels from the cache; the wheel a plain ``pip install`` builds runs it too, into the
wheel's copy of the cache (``_build_backend/minigd_build.py``; bench/results/cold_start.md).  Not covered, compiled the first time a run uses them: batch
norm and dropout, an optimizer chain that does not fuse (``minigd.optim.fusion_plan``), and
the variants of the gradient moments a default call does not take.  From the shell::

    minigd warmup                  # float32 and float64
    minigd warmup --dtypes float32

(It lives here, above the kernels: the compute core never imports the model or ``fit``.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager

#: the dtypes every kernel is compiled for
DTYPES = ("float32", "float64")

#: what :func:`warmup` runs for each dtype (``minigd warmup`` prints it)
COVERS = (
    "training steps of the named optimizers (loop and BLAS paths, with and without per-example norms)",
    "loss and gradient",
    "evaluation (outputs, per-example losses)",
    "per-example gradients",
    "gradient moments (the study's noise scale)",
)


def _check_dtypes(dtypes) -> list[str]:
    import numpy as np

    dts = [dtypes] if isinstance(dtypes, str) else list(dtypes)
    out = []
    for dt in dts:
        try:
            ok = np.dtype(dt) in (np.float32, np.float64)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"dtypes: expected 'float32' and/or 'float64', got {dt!r}")
        out.append(str(np.dtype(dt)))
    return out


def warmup(dtypes: Iterable[str] = DTYPES) -> dict:
    """Compile (or load from Numba's on-disk cache) the CPU kernels for ``dtypes``: what
    :data:`COVERS` lists, on both the loop and the BLAS path.

    Parameters
    ----------
    dtypes : iterable of str
        Any of ``"float32"``, ``"float64"`` (numpy dtypes accepted too).

    Returns
    -------
    dict
        ``{dtype: seconds}`` spent on each (the first run on a machine compiles; later
        runs load from the cache and take well under a second).

    Examples
    --------
    >>> from minigd.warmup import warmup
    >>> sorted(warmup(("float32",)))
    ['float32']
    """
    from minigd.backends.cpu import _CompileNotice

    dts = _check_dtypes(dtypes)
    with _CompileNotice():  # one notice for all the fits below
        return {dt: _warm_one(dt) for dt in dts}


def _warm_one(dt: str) -> float:
    import numpy as np

    from minigd import MLP, SGD, fit, grad_moments, per_example_grads

    t0 = time.perf_counter()
    for loss in ("cross_entropy", "mse"):
        X = np.ones((4, 3), dt)
        y = np.zeros(4, np.int64) if loss == "cross_entropy" else np.zeros((4, 2), dt)
        for blas_min_batch in (1, 10**9):  # force each path once (the active BLAS flavour)
            m = MLP([3, 2, 2], loss=loss, dtype=dt, backend="cpu", seed=0)
            m.backend_impl.blas_min_batch = blas_min_batch
            m.loss_and_grad(X, y)
            m.loss(X, y)
            m.forward(X)
            fit(m, X, y, batch_size=2, steps=1, optimizer=SGD(lr=0.0))
            fit(m, X, y, batch_size=2, steps=1, optimizer=SGD(lr=0.0), track_noise=1)
            if loss == "cross_entropy":  # the same kernels for every loss
                per_example_grads(m, X, y)
                grad_moments(m, X, y)
    return time.perf_counter() - t0


@contextmanager
def _notices_off():
    """The "compiling kernels" notice stays silent inside (the caller speaks instead)."""
    from minigd.backends.cpu import _CompileNotice

    _CompileNotice._depth += 1  # nested notices are silent
    try:
        yield
    finally:
        _CompileNotice._depth -= 1


def where() -> str:
    """Where the compiled kernels are kept, in words: the cache directory, or why there is none."""
    import minigd.backends.cpu  # noqa: F401  (imports every kernel module: the locations are known)
    from minigd.kernels import _jit

    dirs = _jit.cache_dirs()
    if _jit.cache_status() != "enabled" or not dirs:
        return (
            f"no cache ({_jit.cache_status()}): kernels compiled now are lost when the process "
            f"ends; set NUMBA_CACHE_DIR to a writable directory to keep them"
        )
    return ", ".join(dirs)


def announce_warmup(dtypes: Iterable[str], say: Callable[[str], object] = print) -> dict:
    """:func:`warmup`, saying before it what it does and after each dtype how it went
    (compiled, and in how many seconds, or loaded from the cache); used by ``minigd warmup``
    and ``minigd study``, which compile once before their workers start.  Returns
    ``{dtype: (seconds, numba compilations)}``."""
    from minigd.kernels._jit import compile_count

    dts = _check_dtypes(dtypes)
    say(f"compiling kernels (first run only; cached after) or loading them from numba's cache: {', '.join(dts)}")
    out = {}
    with _notices_off():
        for dt in dts:
            n0 = compile_count()
            sec = warmup((dt,))[dt]
            n = compile_count() - n0
            out[dt] = (sec, n)
            if n:
                say(f"  {dt}: compiled in {sec:.1f} s ({n} numba compilations; cached for later runs)")
            else:
                say(f"  {dt}: loaded from numba's cache in {sec:.2f} s")
    return out
