"""The vectorised e^x of the softmax cross-entropy kernel (kernels.cpu._exp64) against
extended precision, at its special values, and inside a loop (where LLVM vectorises it)."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigd.kernels import cpu as K
from minigd.kernels._jit import FASTMATH

LONG = np.finfo(np.longdouble).eps < np.finfo(np.float64).eps  # x87 80-bit: a real oracle


@numba.njit(cache=False, fastmath=set(FASTMATH))  # the kernels' flags; no cache dir of its own
def _exp_loop(x, out64, out32):
    """e^x over a 1-D float64 array, as the softmax kernel calls it (in a vector loop);
    also rounded to float32 (what a float32 model stores)."""
    for i in range(x.shape[0]):
        y = K._exp64(x[i])
        out64[i] = y
        out32[i] = np.float32(y)


def _run(x):
    x = np.ascontiguousarray(x, dtype=np.float64)
    o64 = np.empty_like(x)
    o32 = np.empty(x.shape, np.float32)
    _exp_loop(x, o64, o32)
    return o64, o32


def _points(seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [
            rng.uniform(-120.0, 0.0, 200_000),  # the softmax's shifted logits
            rng.uniform(-1.0, 1.0, 50_000),
            rng.uniform(-745.0, 709.0, 50_000),
            # around the reduction's rounding points n = round(x / ln 2)
            (np.arange(-1000, 1000) + 0.5) * math.log(2.0),
        ]
    )


@pytest.mark.skipif(not LONG, reason="needs an extended-precision long double as the oracle")
def test_float64_within_one_ulp_of_extended_precision():
    x = _points()
    y, _ = _run(x)
    ref = np.exp(x.astype(np.longdouble))
    normal = np.abs(ref) >= np.finfo(np.float64).tiny
    ulp = np.spacing(ref[normal].astype(np.float64)).astype(np.longdouble)
    err = np.abs(y[normal].astype(np.longdouble) - ref[normal]) / ulp
    assert float(err.max()) < 1.0, float(err.max())
    # most results are the correctly rounded ones (measured 94%)
    assert np.mean(y[normal] == ref[normal].astype(np.float64)) > 0.9


@pytest.mark.skipif(not LONG, reason="needs an extended-precision long double as the oracle")
def test_float32_rounding_is_correctly_rounded():
    x = _points(1).astype(np.float32).astype(np.float64)  # a float32 model's shifted logits
    _, y32 = _run(x)
    with np.errstate(over="ignore", under="ignore"):
        ref = np.exp(x.astype(np.longdouble)).astype(np.float32)
    np.testing.assert_array_equal(y32, ref)


def test_special_values():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 710.0, 709.78, -746.0, -745.2, -1e300, 1e300])
    y, y32 = _run(x)
    assert y[0] == 1.0 and y[1] == 1.0
    assert y[2] == np.inf and y[3] == 0.0
    assert np.isnan(y[4]) and np.isnan(y[5]) and np.isnan(y32[4])
    assert y[6] == np.inf and np.isfinite(y[7]) and y[7] > 1e308
    assert y[8] == 0.0 and y[9] == 0.0
    assert y[10] == 0.0 and y[11] == np.inf


def test_subnormal_results_round_once():
    # e^x for -745 < x < -708 is subnormal: the scale by 2^n in two factors rounds once
    x = np.linspace(-745.0, -708.5, 20_001)
    y, _ = _run(x)
    ref = np.exp(x)  # libm: correctly rounded to within one subnormal step
    tiny = np.finfo(np.float64).smallest_subnormal
    assert np.max(np.abs(y - ref)) <= tiny
    assert np.all(np.diff(y) >= 0)  # monotone


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True, width=64))
def test_agrees_with_libm(v):
    y, _ = _run(np.array([v]))
    with np.errstate(over="ignore", under="ignore"):
        ref = np.exp(np.float64(v))
    if np.isnan(ref):
        assert np.isnan(y[0])
    elif ref == 0 or np.isinf(ref):
        assert y[0] == ref
    elif ref < np.finfo(np.float64).tiny:
        assert abs(y[0] - ref) <= np.finfo(np.float64).smallest_subnormal
    else:
        assert abs(y[0] - ref) <= 2 * np.spacing(ref)


def test_softmax_cross_entropy_matches_the_row_by_row_form():
    """The three-pass kernel against the textbook row-by-row softmax cross-entropy in
    float64 NumPy, with a NaN row and a row whose logits lie far apart."""
    import minigd as mg

    rng = np.random.default_rng(3)
    for dtype in ("float32", "float64"):
        B, n = 37, 7
        m = mg.MLP([5, n], dtype=dtype, backend="cpu", seed=0)
        X = rng.standard_normal((B, 5)).astype(dtype)
        X[3] *= 200.0  # a row with logits far apart: e^(z - max) underflows to 0
        y = rng.integers(0, n, B)
        impl = m.backend_impl
        idx = np.arange(B, dtype=np.int64)
        X[5, 0] = np.nan  # a NaN logit row: its loss is NaN, the others are untouched
        yf = np.empty((0, 0), dtype)
        rows = impl.losses(m.params, X, y.astype(np.int64), yf, idx, B).copy()
        Z = X.astype(np.float64) @ m.params[: 5 * n].reshape(5, n).astype(np.float64) + m.params[5 * n :]
        Zs = Z - Z.max(axis=1, keepdims=True)
        ref = np.log(np.exp(Zs).sum(axis=1)) - Zs[np.arange(B), y]
        tol = 1e-5 if dtype == "float32" else 1e-12
        assert np.isnan(rows[5]) and np.isnan(ref[5])
        np.testing.assert_allclose(rows, ref, rtol=tol, atol=tol)


@numba.njit(cache=False, fastmath=set(FASTMATH))
def _sigmoid(z, a):
    K._act_forward(K.SIGMOID, z, a)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_activation_through_the_vectorised_exp(dtype):
    rng = np.random.default_rng(5)
    z = np.concatenate(
        [rng.standard_normal(5000) * 10, [0.0, -0.0, 1e3, -1e3, 88.0, -88.0, 746.0, -746.0, np.inf, -np.inf, np.nan]]
    ).astype(dtype)
    a = np.empty_like(z)
    _sigmoid(z, a)
    with np.errstate(over="ignore"):
        ref = (1.0 / (1.0 + np.exp(-z.astype(np.float64)))).astype(dtype)
    # float32: rounded once from float64 (the same as the float64 reference rounded);
    # float64: within 2 ulp of libm's e^x through the same formula
    np.testing.assert_array_max_ulp(a[np.isfinite(ref)], ref[np.isfinite(ref)], maxulp=1 if dtype == np.float32 else 2)
    assert np.isnan(a[-1])
    assert a[-3] == 1.0 and a[-2] == 0.0  # sigmoid(+inf) = 1, sigmoid(-inf) = 0
    assert np.all((a[:-1] >= 0) & (a[:-1] <= 1))
