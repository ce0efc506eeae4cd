"""minigd's compute core (import name ``minigd.kernels``).

``workspace`` describes every buffer (shape, dtype, offset) from the layer sizes and the
largest batch; ``cpu`` holds the Numba kernels.  See ``kernels/cpu.py`` for the contract
every backend follows.
"""
from .workspace import ParamLayout, Workspace  # noqa: F401


def warmup(dtypes=("float32", "float64")) -> dict:
    """Compile (or load from numba's on-disk cache) every CPU kernel for the given dtypes:
    both the loop path and the BLAS path, every loss, training and evaluation.

    Returns {dtype: seconds}.  Call it before timing anything.
    """
    import time

    import numpy as np

    from minigd import MLP, SGD, fit

    out = {}
    for dt in dtypes:
        t0 = time.perf_counter()
        for loss in ("cross_entropy", "mse"):
            X = np.ones((4, 3), dt)
            y = np.zeros(4, np.int64) if loss == "cross_entropy" else np.zeros((4, 2), dt)
            for blas_min_batch in (1, 10**9):   # force each path once (the active BLAS flavour)
                m = MLP([3, 2, 2], loss=loss, dtype=dt, backend="cpu", seed=0)
                m.backend_impl.blas_min_batch = blas_min_batch
                m.loss_and_grad(X, y)
                m.loss(X, y)
                m.forward(X)
                fit(m, X, y, batch_size=2, steps=1, optimizer=SGD(lr=0.0))
        out[dt] = time.perf_counter() - t0
    return out
