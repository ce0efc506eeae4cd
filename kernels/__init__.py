"""minigd's compute core (import name ``minigd.kernels``).

``workspace`` describes every buffer (shape, dtype, offset) from the layer sizes and the
largest batch; ``cpu`` holds the Numba kernels.  See ``kernels/cpu.py`` for the contract
every backend follows.
"""
from .workspace import ParamLayout, Workspace  # noqa: F401


def warmup(dtypes=("float32", "float64")) -> dict:
    """Compile (or load from the on-disk cache) every CPU kernel for the given dtypes.

    Returns a dict dtype -> seconds spent.  Useful before timing anything.
    """
    import time

    import numpy as np

    from minigd import MLP, SGD
    from minigd.backends.cpu import CpuBackend

    out = {}
    for dt in dtypes:
        t0 = time.perf_counter()
        for loss in ("cross_entropy", "mse"):
            m = MLP([3, 2, 2], loss=loss, dtype=dt, backend="cpu", seed=0)
            X = np.ones((CpuBackend.BLAS_MIN_BATCH_FLOOR, 3), dt)
            y = np.zeros(len(X), np.int64) if loss == "cross_entropy" else np.zeros((len(X), 2), dt)
            m.loss_and_grad(X, y)
            m.loss_and_grad(X[:1], y[:1])
            from minigd.train import fit
            fit(m, X, y, batch_size=1, steps=1, optimizer=SGD(lr=0.0))
        out[dt] = time.perf_counter() - t0
    return out
