"""Small helpers shared by the bench scripts (imported from the scripts' own directory)."""
from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else platform.processor(), else "?")."""
    from minigd.study.executors import cpu_model as _model
    return _model(default=platform.processor() or "?")


def synthetic_data(rng, sizes, n):
    """Gaussian float32 inputs (n, sizes[0]) and int64 labels in [0, sizes[-1])."""
    import numpy as np

    X = rng.standard_normal((n, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], n).astype(np.int64)
    return X, y
