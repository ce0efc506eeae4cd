"""Which BLAS the cpu backend's compiled GEMMs call (``CpuBackend.blas``), and the fused
epilogues of the BLAS path.

* ``blas="numpy"`` (NumPy's own OpenBLAS through its CBLAS symbol, ``kernels/_blas.py``) and
  ``blas="scipy"`` (numba's ``np.dot``) both match the NumPy reference within the parity
  tolerances, in both dtypes, for every activation and loss;
* the compiled step with NumPy's BLAS makes the very GEMM calls the Python-driven path makes
  through ``np.matmul(out=...)``, with the same epilogue arithmetic: bitwise the same
  parameters after several steps (this also pins the fused epilogues -- bias + activation
  row by row, activation backward + bias gradient in one pass -- to the separate kernels the
  Python-driven path calls);
* the choice is a fixed rule (the same in every backend and process), validated, and kept in
  the workspace's layout table across growth;
* without NumPy's CBLAS symbol (``MINIGD_NO_NUMPY_BLAS``) the kernels still link and train,
  and the default is SciPy's.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from strategies import assert_close, make_targets

import minigd as mg
from minigd.backends.cpu import DEFAULT_BLAS, HAVE_SCIPY
from minigd.kernels import _blas
from minigd.kernels import cpu as K

needs_scipy = pytest.mark.skipif(not HAVE_SCIPY, reason="the compiled BLAS path needs SciPy")
TRAIN_TOL = {"float64": 1e-10, "float32": 1e-3}

CASES = [
    ((6, 9, 7, 4), "relu", "cross_entropy"),
    ((5, 8, 3), "gelu", "binary_cross_entropy"),
    ((4, 6, 6, 2), "tanh", "mse"),
    ((4, 5, 3), "sigmoid", "cross_entropy"),
    ((3, 7, 2), "leaky_relu", "mse"),
]


def _train(sizes, act, loss, dtype, backend, setup=None, steps=4, B=11, opt=None):
    rng = np.random.default_rng(7)
    m = mg.MLP(list(sizes), activation=act, loss=loss, dtype=dtype, backend=backend, seed=3)
    m.params[...] += (0.1 * rng.normal(size=m.n_params)).astype(dtype)  # non-zero biases
    if setup is not None:
        setup(m.backend_impl)
    n = 3 * B
    X = rng.normal(size=(n, sizes[0])).astype(dtype)
    y = make_targets(loss, n, sizes[-1], rng, dtype)
    yi, yf = (y, np.empty((0, sizes[-1]), dtype)) if loss == "cross_entropy" else (np.empty(0, np.int64), y)
    st = (opt or mg.SGD(lr=0.05, momentum=0.9)).init(m.params)
    impl = m.backend_impl
    losses = []
    for t in range(steps):
        idx = rng.permutation(n)[:B].astype(np.int64)
        loss_v, ok, _ = impl.train_step(m.params, m._grad, X, yi, yf, idx, B, st, 0.05, t + 1)
        assert ok
        losses.append(loss_v)
    return m.params.copy(), np.asarray(losses)


def _compiled(blas):
    def setup(impl):
        impl.blas_min_batch = 1
        impl.blas = blas

    return setup


def _python(impl):
    impl.blas_min_batch = 1
    impl.compiled_blas = False


@needs_scipy
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}-{c[2]}")
@pytest.mark.parametrize("blas", ["numpy", "scipy"])
def test_each_blas_matches_the_reference(blas, case, dtype):
    if blas == "numpy" and not _blas.AVAILABLE:
        pytest.skip(f"NumPy's CBLAS not found: {_blas.SOURCE}")
    ref_p, ref_l = _train(*case, dtype, "numpy")
    got_p, got_l = _train(*case, dtype, "cpu", _compiled(blas))
    assert_close(got_p, ref_p, TRAIN_TOL[dtype], f"params, blas={blas}")
    assert_close(got_l, ref_l, TRAIN_TOL[dtype], f"losses, blas={blas}")


def _from_cache(dispatcher, dtype) -> bool:
    """Whether this process loaded the dispatcher's ``dtype`` specialisation from numba's
    on-disk cache (rather than compiling it)."""
    hits = getattr(getattr(dispatcher, "stats", None), "cache_hits", {})
    return any(n and str(sig[0]).startswith(f"array({dtype}") for sig, n in hits.items())


@needs_scipy
@pytest.mark.skipif(not _blas.AVAILABLE, reason="NumPy's CBLAS not found")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}-{c[2]}")
def test_compiled_numpy_blas_is_bitwise_the_python_driven_step(case, dtype):
    for opt in (mg.SGD(lr=0.05, momentum=0.9), mg.Adam(lr=0.01)):
        a = _train(*case, dtype, "cpu", _compiled("numpy"), B=37, opt=opt)
        b = _train(*case, dtype, "cpu", _python, B=37, opt=opt)
        if _from_cache(K.run_steps_blas, dtype):
            # numba optimises code it loads from its cache differently from code it has just
            # compiled (numba#10617; seen here: 2 of 154 float64 weights off by an ulp after
            # one step): the claim is about the arithmetic, which a fresh compile shows
            assert_close(a[0], b[0], TRAIN_TOL[dtype], "params (compiled step from numba's cache)")
            continue
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_the_choice_is_a_fixed_rule_kept_in_the_layout_table():
    assert DEFAULT_BLAS == ("numpy" if _blas.AVAILABLE else "scipy")
    impls = [mg.MLP([3, 5, 2], backend="cpu", seed=s).backend_impl for s in range(3)]
    assert {i.blas for i in impls} == {DEFAULT_BLAS}
    impl = impls[0]
    code = {"scipy": 0, "numpy": 1}
    impl.reserve(4)
    assert impl.ws.lay[K.R_MISC, 4] == code[DEFAULT_BLAS]
    impl.blas = "scipy"
    assert impl.ws.lay[K.R_MISC, 4] == 0
    impl.reserve(1000)  # a new, larger workspace keeps the choice
    assert impl.ws.capacity >= 1000 and impl.ws.lay[K.R_MISC, 4] == 0
    if _blas.AVAILABLE:
        impl.blas = "numpy"
        assert impl.ws.lay[K.R_MISC, 4] == 1
        impl.reserve(5000)
        assert impl.ws.lay[K.R_MISC, 4] == 1


def test_blas_is_validated():
    impl = mg.MLP([3, 2], backend="cpu").backend_impl
    with pytest.raises(TypeError, match=r"blas: expected 'numpy' or 'scipy', got int 1"):
        impl.blas = 1
    with pytest.raises(ValueError, match=r"blas: expected 'numpy' or 'scipy', got 'mkl'"):
        impl.blas = "mkl"
    assert impl.blas == DEFAULT_BLAS


_NO_NUMPY_BLAS = """
import numpy as np
import minigd as mg
from minigd.kernels import _blas
from minigd.backends.cpu import DEFAULT_BLAS
m = mg.MLP([4, 6, 3], backend="cpu", seed=0)
assert not _blas.AVAILABLE and DEFAULT_BLAS == "scipy" and m.backend_impl.blas == "scipy"
try:
    m.backend_impl.blas = "numpy"
except ValueError as e:
    assert "MINIGD_NO_NUMPY_BLAS" in str(e), e
else:
    raise AssertionError("blas='numpy' accepted without NumPy's CBLAS")
rng = np.random.default_rng(0)
X = rng.normal(size=(64, 4)).astype(np.float32); y = rng.integers(0, 3, 64)
mg.fit(m, X, y, batch_size=32, steps=3)
assert np.isfinite(m.params).all()
print("ok")
"""


@needs_scipy
def test_without_numpy_blas_the_kernels_link_and_default_to_scipy():
    env = dict(os.environ, MINIGD_NO_NUMPY_BLAS="1")
    out = subprocess.run([sys.executable, "-c", _NO_NUMPY_BLAS], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
