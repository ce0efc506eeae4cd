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

import os
import subprocess
import sys
import textwrap

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
#: the sweeps' error bound in u (first order; the margin covers the second-order terms)
BOUND_U = KS.BLOCKED_ULPS + 0.5


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


def test_the_module_builds_and_registers_its_entry():
    mod = llvm.parse_assembly(_tiles.module_ir())
    mod.verify()
    names = {f.name for f in mod.functions}
    assert {_tiles.name(i, j) for i in range(1, _tiles.ROWS + 1) for j in range(1, _tiles.VECS + 1)} <= names
    assert _tiles.ENTRY in names
    assert llvm.address_of_symbol(_tiles.ENTRY)  # registered by ensure()


@pytest.mark.parametrize("I", range(1, _tiles.ROWS + 1))
@pytest.mark.parametrize("J", range(1, _tiles.VECS + 1))
def test_the_entry_runs_the_tile_asked_for(I, J):
    """Each (I, J) through the entry point sweeps exactly I rows x 16 J columns of a larger
    block (integer data: exact), and leaves the rest of S alone."""
    rng = np.random.default_rng(10 * I + J)
    B, no, nj = 70, 6, 64
    P, Q, M = _ints(rng, (B, no)), _ints(rng, (B, nj)), _ints(rng, (no, nj), -5, 6)
    S = np.full((no, nj), -1.0)
    KS._tile(I, J, P.ctypes.data, no, Q.ctypes.data, nj, M.ctypes.data, nj, S.ctypes.data, nj, B, EVERY, 1)
    ref = ((P.T.astype(np.int64)[:, :, None] * Q.astype(np.int64)[None] - M.astype(np.int64)[:, None, :]) ** 2).sum(1)
    np.testing.assert_array_equal(S[:I, : W * J], ref[:I, : W * J])
    assert np.all(S[I:] == -1.0) and np.all(S[:, W * J :] == -1.0)


def _run(code, **env):
    """Run ``code`` in a fresh interpreter (a crash must not take pytest with it)."""
    e = dict(os.environ, **env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=e, capture_output=True, text=True, timeout=600
    )


def test_fast_follows_the_cpu_and_minigd_no_tiles():
    assert _tiles.FAST == (_tiles.host_has_avx512() and not os.environ.get("MINIGD_NO_TILES"))
    out = _run(
        """
        import minigd as mg
        from minigd.kernels import _tiles
        m = mg.MLP([4, 3, 2], dtype="float32")
        print(_tiles.FAST, m.backend_impl.moments_tiles)
        """,
        MINIGD_NO_TILES="1",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("B,tiles", [(8, False), (15, False), (16, True), (300, True)])
def test_the_backend_uses_the_tiles_from_tile_min_rows(monkeypatch, B, tiles):
    seen = []
    real = KS.moments_update_blocked

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(KS, "moments_update_blocked", spy)
    rng = np.random.default_rng(0)
    m = mg.MLP([6, 20, 3], dtype="float32", seed=0)
    m.backend_impl.moments_tiles = True
    mg.grad_moments(m, rng.standard_normal((B, 6)).astype(np.float32), rng.integers(0, 3, B), chunk_size=B)
    assert seen == [tiles] and KS.TILE_MIN_ROWS == 16
    m.backend_impl.moments_tiles = False
    mg.grad_moments(m, rng.standard_normal((B, 6)).astype(np.float32), rng.integers(0, 3, B), chunk_size=B)
    assert seen == [tiles, False]


def test_bad_arguments_are_refused_not_looped_on():
    """``every`` = 0 (``_sq_dev``'s "no flush") would never end a block; a transposed view
    would be read with the wrong strides; a short scratch would be overrun."""
    rng = np.random.default_rng(0)
    P = rng.standard_normal((10, 5)).astype(np.float32)
    Q = rng.standard_normal((10, 20)).astype(np.float32)
    M = np.zeros((5, 20), np.float32)
    S = np.zeros((5, 20))
    for every in (0, -1, 48):
        with pytest.raises(ValueError, match="every"):
            KS._sq_dev_tiled(P, Q, M, S, every, *_scratch(5))
    with pytest.raises(ValueError, match="C-contiguous"):
        KS._sq_dev_tiled(np.asfortranarray(P), Q, M, S, EVERY, *_scratch(5))
    with pytest.raises(ValueError, match="shapes"):
        KS._sq_dev_tiled(P, Q[:9], M, S, EVERY, *_scratch(5))
    qt, mt, st_ = _scratch(5)
    with pytest.raises(ValueError, match="scratch"):
        KS._sq_dev_tiled(P, Q, M, S, EVERY, qt, mt[:-1], st_)


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
    at most ``BLOCKED_ULPS`` u against the oracle (each deviation one rounding, each float32
    partial sum at most EVERY rows deep in groups, then float64), and within twice that of
    the loops."""
    rng = np.random.default_rng(seed)
    P = rng.standard_normal((B, no)).astype(np.float32)
    Q = rng.standard_normal((B, nj)).astype(np.float32)
    M = (P.T @ Q / B).astype(np.float32) if centred else rng.standard_normal((no, nj)).astype(np.float32)
    S = tiled(P, Q, M)
    ref = oracle(P, Q, M)
    pos = ref > 0
    bound = BOUND_U * U
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
    np.testing.assert_allclose(S, oracle(P, Q, M).astype(np.float64), rtol=BOUND_U * U)


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


@pytest.mark.parametrize(
    "sizes,n,chunk",
    [
        ([20, 33, 17, 5], 16, 16),
        ([20, 33, 17, 5], 300, 100),
        ([5, 33, 17, 3], 513, 512),
        ([100, 7, 40, 2], 250, 64),  # swapped sweeps (fan-out 2, 7 < 32 < fan-in)
        ([70, 20, 1], 129, 129),
        ([3, 64, 200, 10], 200, 33),
    ],
)
def test_backend_moments_agree_with_and_without_tiles(sizes, n, chunk):
    """grad_moments' float32 default through the backend: the tiles and the loops give the
    same moments to float32 partial-sum accuracy (the same arithmetic; at most the loops'
    contraction differs)."""
    rng = np.random.default_rng(n)
    X = rng.standard_normal((n, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], n) if sizes[-1] > 1 else rng.standard_normal((n, 1)).astype(np.float32)
    res = {}
    for tiles in (False, True):
        m = mg.MLP(sizes, dtype="float32", seed=1, loss="cross_entropy" if sizes[-1] > 1 else "mse")
        m.backend_impl.moments_tiles = tiles
        res[tiles] = mg.grad_moments(m, X, y, chunk_size=chunk)
    a, b = res[False], res[True]
    np.testing.assert_allclose(a.mean, b.mean, rtol=0, atol=0)  # the mean: the batch gradient either way
    np.testing.assert_allclose(a.var, b.var, rtol=2 * BOUND_U * U, atol=0)


@pytest.mark.parametrize("big_row", [0, 32, 64, 128, 192, 296])
@pytest.mark.parametrize("loops", [False, True], ids=["tiles", "loops"])
def test_partial_sums_are_flushed_every_group_and_block_of_rows(big_row, loops):
    """A term of 2^24 at the first row of a group swallows the 1s after it in that group's
    float32 sum (2^24 + 1 rounds to 2^24), and only there: the next groups' sums (8, or 4 by
    the loops) are added exactly.  A term of 2^28 swallows the groups' sums after it in its
    block too (2^28 + 8 rounds to 2^28), and only there: the other blocks are added in
    float64.  So the results are exactly the big term plus the 1s outside its group, or its
    block -- the groups and blocks at multiples of their sizes from row 0, across passes of
    ``TILE_PASS_ROWS``."""
    B, no, nj = 300, 6, 50
    group = 4 if loops else _tiles.GROUP_ROWS
    cases = [(4096.0, big_row + group)]  # (big * 1 - 0)^2 = 2^24 at a group's first row
    if big_row % EVERY == 0:
        cases.append((16384.0, big_row + EVERY))  # 2^28 at a block's first row
    for big, end in cases:
        P = np.ones((B, no), np.float32)
        Q = np.ones((B, nj), np.float32)
        Q[big_row] = big
        M = np.zeros((no, nj), np.float32)
        if loops:
            S = np.empty((no, nj))
            KS._sq_dev(np.ascontiguousarray(P).T, Q, M, np.empty((no, nj), np.float32), S, EVERY)
        else:
            S = tiled(P, Q, M)
        expect = big * big + (B - (min(end, B) - big_row))
        np.testing.assert_array_equal(S, np.full((no, nj), expect))


def test_the_bound_holds_where_one_large_row_dominates_many_zero_products():
    """The sparse ReLU case, crafted: one large product, then rows whose products are exactly
    0, each adding the same (-M)^2 to a float32 sum the large term dominates, so that every
    addition rounds the same way.  Summed row after row over a 64-row block (the arithmetic
    before the groups, emulated here in float32) that error adds up to 41 u; the tiles and
    the loops stay within ``BLOCKED_ULPS`` u of the oracle (6-7 u)."""
    B, no, nj = 256, 4, 48
    rng = np.random.default_rng(5)
    P = np.zeros((B, no), np.float32)
    Q = np.zeros((B, nj), np.float32)
    P[::64] = 1.0  # one nonzero product per 64 rows
    Q[::64] = rng.uniform(0.9, 1.1, size=(B // 64, nj)).astype(np.float32)
    M = (rng.uniform(0.002, 0.003, size=(no, nj))).astype(np.float32)  # (-M)^2 ~ 2^-17 of the large square
    ref = oracle(P, Q, M)
    worst = {}
    S = tiled(P, Q, M)
    worst["tiles"] = float(np.max(np.abs(S - ref) / ref))
    S2 = np.empty((no, nj))
    KS._sq_dev(np.ascontiguousarray(P).T, Q, M, np.empty((no, nj), np.float32), S2, EVERY)
    worst["loops"] = float(np.max(np.abs(S2 - ref) / ref))
    # the sequential float32 sum over 64-row blocks, as the tiles summed before
    t = (P.T[:, :, None] * Q[None] - M[:, None, :]).astype(np.float32)  # (exact: products of 0 or 1 * q)
    seq = np.zeros((no, nj))
    for b0 in range(0, B, 64):
        acc = np.zeros((no, nj), np.float32)
        for r in range(b0, b0 + 64):
            acc = (acc + t[:, r] * t[:, r]).astype(np.float32)
        seq += acc
    worst["sequential"] = float(np.max(np.abs(seq - ref) / ref))
    assert worst["tiles"] <= BOUND_U * U and worst["loops"] <= BOUND_U * U, worst
    assert worst["sequential"] > 2 * KS.BLOCKED_ULPS * U, worst  # (the defect the groups fix)


_GUARDED = """
import ctypes, mmap, sys
import numpy as np
from minigd.kernels import _tiles
from minigd.kernels import cpu_stats as KS

libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = mmap.PAGESIZE
keep = []


def guarded(n, dtype, at_end):
    # n items whose last byte touches an inaccessible page (at_end) or whose first follows one
    dtype = np.dtype(dtype)
    size = n * dtype.itemsize
    pages = (size + PAGE - 1) // PAGE + 2
    mm = mmap.mmap(-1, pages * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    guard = base + (pages - 1) * PAGE if at_end else base
    assert libc.mprotect(guard, PAGE, 0) == 0
    start = (pages - 1) * PAGE - size if at_end else PAGE
    keep.append(mm)
    a = np.frombuffer(mm, np.uint8)[start : start + size].view(dtype)
    a[...] = np.nan if dtype.kind == "f" else 0
    return a


_tiles.ensure()
W, every = _tiles.LANES, KS._EVERY[1]
rng = np.random.default_rng(0)
shapes = [(B, no, nj) for B in (1, 63, 64, 65, 128, 129, 257) for no in (1, 3, 5, 31, 32, 33) for nj in (1, 15, 16, 17, 47, 48, 49, 64, 97)]
shapes += [(int(rng.integers(1, 300)), int(rng.integers(1, 70)), int(rng.integers(1, 150))) for _ in range(60)]
worst = 0.0
for k, (B, no, nj) in enumerate(shapes):
    at_end = bool(k % 2)
    P = guarded(B * no, np.float32, at_end).reshape(B, no)
    Q = guarded(B * nj, np.float32, at_end).reshape(B, nj)
    M = guarded(no * nj, np.float32, at_end).reshape(no, nj)
    S = guarded(no * nj, np.float64, at_end).reshape(no, nj)
    P[...] = rng.standard_normal((B, no))
    Q[...] = rng.standard_normal((B, nj))
    M[...] = P.T.astype(np.float64) @ Q / B
    qt = guarded(3 * W * min(B, KS.TILE_PASS_ROWS), np.float32, at_end)
    mt, st = guarded(W * no, np.float32, at_end), guarded(W * no, np.float64, at_end)
    KS._sq_dev_tiled(P, Q, M, S, every, qt, mt, st)
    d = P.T.astype(np.longdouble)[:, :, None] * Q.astype(np.longdouble)[None] - M.astype(np.longdouble)[:, None, :]
    ref = (d * d).sum(axis=1)
    worst = max(worst, float(np.max(np.abs(S - ref) / ref)))
    keep.clear()
print(len(shapes), worst / 2.0**-24)
"""


def test_no_read_or_write_beyond_any_array():
    """Every array at its documented minimum size, against an inaccessible page after it
    (or before it): an access out of bounds is a crash of the child process."""
    out = _run(_GUARDED)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    n, worst_u = out.stdout.split()
    assert int(n) > 300 and float(worst_u) <= BOUND_U


def test_a_failed_build_warns_and_falls_back_to_the_loops():
    """Should the IR not build, the names are bound to a scalar loop with the tiles'
    contract: float32 moments still work (by the loops), and a caller that asks for the
    tiles anyway gets the right sums from the fallback."""
    out = _run(
        """
        import warnings
        import numpy as np
        import minigd as mg
        from minigd.kernels import _tiles
        from minigd.kernels import cpu_stats as KS

        def broken():
            raise RuntimeError("no LLVM here")

        _tiles._build = broken
        rng = np.random.default_rng(0)
        X, y = rng.standard_normal((300, 9)).astype(np.float32), rng.integers(0, 3, 300)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            a = mg.grad_moments(mg.MLP([9, 40, 3], dtype="float32", seed=0), X, y, chunk_size=100)
        assert any("could not be built" in str(x.message) for x in w), [str(x.message) for x in w]
        assert _tiles.BUILT is False
        m = mg.MLP([9, 40, 3], dtype="float32", seed=0)
        b = mg.grad_moments(m, X, y, chunk_size=100)
        np.testing.assert_array_equal(a.var, b.var)
        P = rng.standard_normal((130, 37)).astype(np.float32)
        Q = rng.standard_normal((130, 50)).astype(np.float32)
        M = (P.T @ Q / 130).astype(np.float32)
        S = np.empty((37, 50))
        W = _tiles.LANES
        scratch = (np.empty(3 * W * 128, np.float32), np.empty(W * 37, np.float32), np.empty(W * 37))
        KS._sq_dev_tiled(P, Q, M, S, KS._EVERY[1], *scratch)
        d = P.T.astype(np.float64)[:, :, None] * Q[None] - M[:, None, :]
        np.testing.assert_allclose(S, (d * d).sum(1), rtol=1e-5)
        print("ok")
        """
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


def test_a_fresh_process_needs_no_set_up_before_the_kernel():
    """The kernel names the tiles even where it does not call them (a chunk below
    TILE_MIN_ROWS, ``tiles=False``): the first call in a process, loaded from the cache or
    compiled, must find them registered (an unresolved name was a segfault)."""
    for code in (
        """
        import numpy as np, minigd as mg
        m = mg.MLP([3, 2, 2], dtype="float32", seed=0)
        v = mg.grad_moments(m, np.ones((4, 3), np.float32), np.zeros(4, np.int64)).var
        print(bool(np.all(np.isfinite(v))))
        """,
        """
        import numpy as np, minigd as mg
        from minigd.kernels import cpu_stats as KS
        m = mg.MLP([3, 5, 2], dtype="float32", seed=0)
        impl = m.backend_impl
        X, y = np.ones((6, 3), np.float32), np.zeros(6, np.int64)
        Xc, yi, yf = m.check_Xy(X, y)
        impl.reserve(6)
        g, mean, m2 = np.zeros(m.n_params, np.float32), np.zeros(m.n_params), np.zeros(m.n_params)
        impl.loss_grad(m.params, g, Xc, yi, yf, np.arange(6), 6)
        _, _, _, mus, acc = impl._stats_scratch(6)
        snr = KS.blocked_snr_max(6.0, KS.BLOCKED_TAU)
        KS.moments_update_blocked(6, g, impl.ws.buf, impl.ws.lay, 0, mean, m2, mus, acc, *impl._blocked_scratch(6), snr, False)
        print(bool(np.all(np.isfinite(m2))))
        """,
    ):
        out = _run(code)
        assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
        assert out.stdout.strip() == "True"
