"""Helpers shared by the test modules: backend paths, model/data builders, hypothesis
strategies for architectures.  (Imported as a plain module: pytest puts tests/ on sys.path.)
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

import minigd as mg
from minigd import nn

ACTIVATIONS = tuple(nn.ACTIVATIONS)  # relu, leaky_relu, tanh, sigmoid, gelu, identity
LOSSES = tuple(nn.LOSSES)  # cross_entropy, mse, binary_cross_entropy

#: every core test runs on these.  The cpu backend has three regimes, pinned through its
#: instance attributes: "cpu-loops" (hand-written loops; ``blas_min_batch = 10**9``),
#: "cpu-blas" (the GEMMs in BLAS inside one compiled call; ``blas_min_batch = 1``) and
#: "cpu-pyblas" (BLAS driven from Python between compiled epilogues, the fallback without
#: SciPy; ``compiled_blas = False`` too)
BACKEND_PATHS = ("numpy", "cpu-loops", "cpu-blas", "cpu-pyblas")
CPU_PATHS = ("cpu-loops", "cpu-blas", "cpu-pyblas")


def force_path(model, path: str):
    """Pin a cpu model to one of its regimes (no-op for 'numpy' / 'cpu')."""
    impl = model.backend_impl
    if path == "cpu-loops":
        impl.blas_min_batch = 10**9
    elif path == "cpu-blas":
        impl.blas_min_batch = 1
        if not impl.compiled_blas:
            pytest.skip("the compiled BLAS path needs SciPy")
    elif path == "cpu-pyblas":
        impl.blas_min_batch = 1
        impl.compiled_blas = False
    return model


def backend_of(path: str) -> str:
    return "numpy" if path == "numpy" else "cpu"


def make_model(sizes, path: str = "numpy", **kw):
    """An MLP on the backend behind ``path`` ('numpy', 'cpu' or one of CPU_PATHS)."""
    return force_path(mg.MLP(sizes, backend=backend_of(path), **kw), path)


def make_targets(loss: str, n: int, n_out: int, rng, dtype=np.float64):
    """Valid targets for ``loss``: int64 labels, or (n, n_out) floats (BCE: in [0, 1])."""
    if loss == "cross_entropy":
        return rng.integers(0, n_out, size=n).astype(np.int64)
    if loss == "mse":
        return rng.normal(size=(n, n_out)).astype(dtype)
    # binary cross-entropy: mostly hard 0/1 labels, some soft ones
    y = rng.integers(0, 2, size=(n, n_out)).astype(np.float64)
    soft = rng.random((n, n_out)) < 0.3
    y[soft] = rng.random(int(soft.sum()))
    return y.astype(dtype)


def hidden_preacts(model, X):
    """Pre-activations z_l of every hidden layer (float64 numpy, independent of backends)."""
    a = X.astype(np.float64)
    out = []
    L = len(model.weights)
    for l, (W, b) in enumerate(zip(model.weights, model.biases)):
        z = a @ W.astype(np.float64) + b.astype(np.float64)
        if l < L - 1:
            out.append(z)
            a = nn.activation(nn.ACTIVATIONS[model.activations[l]], z)
    return out


@st.composite
def architectures(draw, max_depth=3, widths=(1, 2, 3, 5)):
    """dict(sizes, activation, loss): depth 0 (linear / logistic regression) to
    ``max_depth`` hidden layers, widths including 1, one activation for all hidden layers
    or one per layer."""
    depth = draw(st.integers(0, max_depth))
    n_in = draw(st.integers(1, 4))
    hidden = [draw(st.sampled_from(widths)) for _ in range(depth)]
    loss = draw(st.sampled_from(LOSSES))
    n_out = draw(st.integers(1, 3))
    if draw(st.booleans()) or depth == 0:
        act = draw(st.sampled_from(ACTIVATIONS))
    else:
        act = [draw(st.sampled_from(ACTIVATIONS)) for _ in range(depth)]
    return dict(sizes=[n_in, *hidden, n_out], activation=act, loss=loss)


def assert_close(actual, desired, tol, what=""):
    """|actual - desired| <= tol * max(1, max|desired|), elementwise."""
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, what
    scale = max(1.0, float(np.max(np.abs(desired))) if desired.size else 1.0)
    np.testing.assert_allclose(actual, desired, rtol=0, atol=tol * scale, err_msg=what)
