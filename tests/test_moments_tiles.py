"""The register-blocked tiles of the float32 moments sweep (``kernels._tiles``, driven by
``kernels.cpu_stats._sq_dev_tiled``; issue 20).

The tiles are LLVM IR compiled for the host; they build and run on any CPU (the kernels use
them only where ``_tiles.FAST``: AVX-512), so everything here runs everywhere.  Checked:
exact results on integer data (any indexing, padding or pass-boundary slip changes an
integer), the error bound of the float32 partial sums against an extended-precision
oracle, agreement with the loops (``_sq_dev``) they replace, no write outside the result
and the documented scratch, and the moments through the backend with the tiles on and off.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minigd as mg
from minigd.kernels import _tiles
from minigd.kernels import cpu_stats as KS

W = _tiles.LANES
EVERY = KS._EVERY[1]
U = 2.0**-24


@pytest.fixture(scope="module", autouse=True)
def _built():
    _tiles.ensure()


def _scratch(no, fill=np.nan, margin=0):
    """(qt, mt, st) of the documented minimal sizes, followed by ``margin`` sentinels."""
    qt = np.full(3 * W * KS.TILE_PASS_ROWS + margin, fill, np.float32)
    mt = np.full(W * no + margin, fill, np.float32)
    st_ = np.full(W * no + margin, fill, np.float64)
    return qt, mt, st_


def tiled(P, Q, M):
    no, nj = P.shape[1], Q.shape[1]
    S = np.full((no, nj), np.nan)
    KS._sq_dev_tiled(P, Q, M, S, EVERY, *_scratch(no))
    return S


def oracle(P, Q, M):
    """sum_r (fl32(P[r, o] Q[r, j] - M[o, j]))^2 ... in long double, from the float32 inputs:
    the deviations exactly (a float32 product is exact in float64), squared and summed in
    extended precision."""
    d = P.T.astype(np.longdouble)[:, :, None] * Q.astype(np.longdouble)[None] - M.astype(np.longdouble)[:, None, :]
    return (d * d).sum(axis=1)


def _ints(rng, shape, lo=-3, hi=4):
    return rng.integers(lo, hi, size=shape).astype(np.float32)


def test_the_module_builds_and_registers_every_tile():
    mod = llvm.parse_assembly(_tiles.module_ir())
    mod.verify()
    names = {f.name for f in mod.functions}
    for i in range(1, _tiles.ROWS + 1):
        for j in range(1, _tiles.VECS + 1):
            assert _tiles.name(i, j) in names
            assert llvm.address_of_symbol(_tiles.name(i, j))  # registered by ensure()


def test_fast_only_with_avx512():
    if not _tiles.host_has_avx512():
        assert not _tiles.FAST


@pytest.mark.parametrize(
    "B,no,nj",
    [
        (1, 1, 1),
        (3, 5, 17),
        (64, 4, 48),
        (65, 7, 33),
        (128, 31, 16),  # Q in place (no < PACK_ROWS)
        (129, 32, 64),  # Q through the panel; 64 columns = blocks 2 + 2
        (300, 33, 100),  # 100 = 3 + 3 vectors + 4 columns padded
        (257, 9, 160),  # 10 vectors: 3 + 3 + 2 + 2
        (200, 40, 7),  # only the padded vector
    ],
)
def test_exact_on_integer_data(B, no, nj):
    """Small integers: every deviation, square and partial sum is exact in float32 (sums below
    2^24), so the result is the exact integer; a wrong row, column, pass or padding is not."""
    rng = np.random.default_rng(B * 1000 + no * 10 + nj)
    P, Q, M = _ints(rng, (B, no)), _ints(rng, (B, nj)), _ints(rng, (no, nj), -5, 6)
    S = tiled(P, Q, M)
    ref = ((P.T.astype(np.int64)[:, :, None] * Q.astype(np.int64)[None] - M.astype(np.int64)[:, None, :]) ** 2).sum(1)
    np.testing.assert_array_equal(S, ref.astype(np.float64))


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 300),
    no=st.integers(1, 70),
    nj=st.integers(1, 120),
    seed=st.integers(0, 2**31 - 1),
    centred=st.booleans(),
)
def test_property_within_the_partial_sum_bound_and_like_the_loops(B, no, nj, seed, centred):
    """Gaussian factors, centres the chunk means (the moments' case) or noise: relative error
    at most (EVERY + 3) u against the oracle (each deviation one rounding, each float32
    partial sum at most EVERY rows deep, then float64), and within twice that of the loops."""
    rng = np.random.default_rng(seed)
    P = rng.standard_normal((B, no)).astype(np.float32)
    Q = rng.standard_normal((B, nj)).astype(np.float32)
    M = (P.T @ Q / B).astype(np.float32) if centred else rng.standard_normal((no, nj)).astype(np.float32)
    S = tiled(P, Q, M)
    ref = oracle(P, Q, M)
    pos = ref > 0
    bound = (EVERY + 3) * U
    assert np.all(np.abs(S[pos] - ref[pos]) <= bound * ref[pos])
    assert np.all(S[~pos] == 0)
    out, S2 = np.empty((no, nj), np.float32), np.empty((no, nj))
    KS._sq_dev(np.ascontiguousarray(P).T, Q, M, out, S2, EVERY)
    assert np.all(np.abs(S[pos] - S2[pos]) <= 2 * bound * ref[pos])


@pytest.mark.parametrize("B,no,nj", [(300, 40, 100), (70, 5, 20), (129, 33, 48)])
def test_writes_nothing_outside_the_result_and_the_scratch(B, no, nj):
    rng = np.random.default_rng(7)
    P = rng.standard_normal((B, no)).astype(np.float32)
    Q = rng.standard_normal((B, nj)).astype(np.float32)
    M = rng.standard_normal((no, nj)).astype(np.float32)
    Pc, Qc, Mc = P.copy(), Q.copy(), M.copy()
    margin = 64
    buf = np.full(no * nj + 2 * margin, -7.0)
    S = buf[margin : margin + no * nj].reshape(no, nj)
    qt, mt, st_ = _scratch(no, fill=-5.0, margin=margin)
    KS._sq_dev_tiled(P, Q, M, S, EVERY, qt, mt, st_)
    assert np.all(buf[:margin] == -7.0) and np.all(buf[-margin:] == -7.0)
    for a in (qt, mt, st_):
        assert np.all(a[-margin:] == -5.0)
    np.testing.assert_array_equal(P, Pc)
    np.testing.assert_array_equal(Q, Qc)
    np.testing.assert_array_equal(M, Mc)
    np.testing.assert_allclose(S, oracle(P, Q, M).astype(np.float64), rtol=(EVERY + 3) * U)


def test_nan_and_inf_propagate():
    rng = np.random.default_rng(3)
    B, no, nj = 100, 8, 40
    P = rng.standard_normal((B, no)).astype(np.float32)
    Q = rng.standard_normal((B, nj)).astype(np.float32)
    M = np.zeros((no, nj), np.float32)
    P[70, 2] = np.nan
    Q[5, 33] = np.inf
    S = tiled(P, Q, M)
    assert np.all(np.isnan(S[2]))
    col = np.delete(np.arange(no), 2)
    assert np.all(np.isinf(S[col, 33]) | np.isnan(S[col, 33]))
    rest = np.ones((no, nj), bool)
    rest[2] = False
    rest[:, 33] = False
    assert np.all(np.isfinite(S[rest]))


@pytest.mark.parametrize("B", [16, 100, 512])
def test_backend_moments_agree_with_and_without_tiles(B):
    """grad_moments' float32 default through the backend: the tiles and the loops give the
    same moments to float32 partial-sum accuracy (they differ only in the order of the sums)."""
    rng = np.random.default_rng(B)
    X = rng.standard_normal((B, 20)).astype(np.float32)
    y = rng.integers(0, 5, B)
    res = {}
    for tiles in (False, True):
        m = mg.MLP([20, 33, 17, 5], dtype="float32", seed=1)
        m.backend_impl.moments_tiles = tiles
        res[tiles] = mg.grad_moments(m, X, y, chunk_size=B)
    a, b = res[False], res[True]
    np.testing.assert_allclose(a.mean, b.mean, rtol=0, atol=0)  # the mean: the batch gradient either way
    np.testing.assert_allclose(a.var, b.var, rtol=2 * (EVERY + 3) * U, atol=0)


@pytest.mark.parametrize("big_row", [0, 64, 128, 192])
def test_partial_sums_are_flushed_every_block_of_rows(big_row):
    """A term of 2^24 at the first row of a block swallows the 1s after it in that block's
    float32 sum (2^24 + 1 rounds to 2^24), and only there: the other blocks' 1s are added in
    float64.  So the result is exactly 2^24 + the 1s outside that block -- the block
    boundaries at multiples of ``EVERY`` from row 0, across passes of ``TILE_PASS_ROWS``."""
    B, no, nj = 300, 6, 50
    P = np.ones((B, no), np.float32)
    Q = np.ones((B, nj), np.float32)
    Q[big_row] = 4096.0  # (4096 * 1 - 0)^2 = 2^24
    M = np.zeros((no, nj), np.float32)
    S = tiled(P, Q, M)
    block_end = min(big_row + EVERY, B)
    expect = 2.0**24 + (B - (block_end - big_row))
    np.testing.assert_array_equal(S, np.full((no, nj), expect))
