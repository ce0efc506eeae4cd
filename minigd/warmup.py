"""Compile the CPU kernels up front, so that nothing timed afterwards pays for compilation.

Numba compiles a kernel the first time it runs with a dtype, and keeps the machine code in
its on-disk cache (``kernels/__pycache__`` or ``NUMBA_CACHE_DIR``): the first run on a
machine spends seconds compiling, later ones load.  :func:`warmup` runs every CPU kernel
once per dtype (both GEMM paths, every loss, training and evaluation) through the public
API, as a first model and ``fit`` would, under one "compiling kernels (first run only)"
notice on stderr when it takes over a second.  An optimizer chain that does not fuse
(``minigd.optim.fusion_plan``: no named optimizer) runs kernels of its own, compiled the
first time a run uses one.  From the shell::

    minigd warmup                  # float32 and float64
    minigd warmup --dtypes float32

(It lives here, above the kernels: the compute core never imports the model or ``fit``.)
"""

from __future__ import annotations

import time
from collections.abc import Iterable

#: the dtypes every kernel is compiled for
DTYPES = ("float32", "float64")


def warmup(dtypes: Iterable[str] = DTYPES) -> dict:
    """Compile (or load from Numba's on-disk cache) every CPU kernel for ``dtypes``: both the
    loop path and the BLAS path, every loss, training and evaluation.

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
    import numpy as np

    from minigd import MLP, SGD, fit
    from minigd.backends.cpu import _CompileNotice

    dts = [dtypes] if isinstance(dtypes, str) else list(dtypes)
    for dt in dts:
        try:
            ok = np.dtype(dt) in (np.float32, np.float64)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"dtypes: expected 'float32' and/or 'float64', got {dt!r}")
    out = {}
    with _CompileNotice():  # one notice for all the fits below
        for dt in dts:
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
            out[str(np.dtype(dt))] = time.perf_counter() - t0
    return out
