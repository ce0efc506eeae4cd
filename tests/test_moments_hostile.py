"""Float32 gradient moments on data that breaks rounding models: tiny per-example gradients
(subnormal squares), exact zeros, and repeated rows after a large one.

The oracle is that of tests/test_moments_shortcut.py (the stored factors' per-example
gradients, products and two-pass sums in ``np.longdouble``); the bound is the issue's,
relative error of each M2 <= 1e-6.  Found on 2026-12-08: the blocked form lost up to 5e-3
of M2 where a saturated softmax's deltas (~1e-20) made the squares subnormal, and the
one-pass form kept M2 = -B S1^2 < 0 where the squares underflowed to 0 (``grad_moments``
then raised), and was 3e-6 off on duplicated rows (its rounding estimate is statistical:
see ``moments_update_onepass``), which is why the backend no longer takes it by default.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_moments_blocked import run_blocked
from test_moments_onepass import run_onepass, sums
from test_moments_shortcut import _blocks, crafted, oracle, rel_err

import minigd as mg
from minigd.kernels import _tiles
from minigd.kernels import cpu_stats as KS


@pytest.fixture(scope="module", autouse=True)
def _built():
    _tiles.ensure()


def _regrad(impl, g, B):
    """The batch gradient of the B rows of factors the workspace now holds (float32, as
    loss_grad forms it)."""
    wb, bb = impl.layout.views(g)
    for l, (A, D) in enumerate(zip(*_blocks(impl, B))):
        wb[l][...] = A.T @ D
        bb[l][...] = D.sum(axis=0)


def _n_weights(sizes):
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


# ============================================================================ subnormal squares
@pytest.mark.parametrize("tiles", [False, True], ids=["loops", "tiles"])
@pytest.mark.parametrize("B", [24, 100, 512])
@pytest.mark.parametrize("k", [0, 40, 60, 64, 80])
def test_tiny_deltas_within_1e6(k, B, tiles):
    """Deltas scaled by 2^-k (exactly): at k = 60-64 the squared deviations (~1e-42) are
    subnormal floats, each off by up to 2^-150 absolute -- the relative bound fails (the
    sums lost up to 5e-3) -- and at 80 they round to 0; the underflow floor of the guard
    recomputes those weights exactly, and only those."""
    sizes = [7, 40, 3]
    _, impl, g = crafted(sizes, "float32", B, 1.0)
    for D in _blocks(impl, B)[1]:
        D *= np.float32(2.0**-k)
    _regrad(impl, g, B)
    nbad, _, m2 = run_blocked(impl, g, B, tiles=tiles)
    _, om2 = oracle(impl, B)
    assert rel_err(m2, om2) <= 1e-6, (k, B, rel_err(m2, om2))
    if k <= 40:
        assert nbad == 0  # normal squares: nothing recomputed
    else:
        assert nbad == _n_weights(sizes)  # every weight below the floor: all recomputed


def test_the_floor_is_what_catches_the_subnormal_squares():
    """The same factors at k = 60 with the guard's SNR limit out of the way: still every
    weight is refused (by the floor alone), and the float32 sums themselves, unguarded, are
    off by far more than 1e-6 -- what the floor protects against."""
    B = 512
    _, impl, g = crafted([7, 40, 3], "float32", B, 1.0)
    for D in _blocks(impl, B)[1]:
        D *= np.float32(2.0**-60)
    _regrad(impl, g, B)
    nbad, _, m2 = run_blocked(impl, g, B, snr_max=np.inf)
    _, om2 = oracle(impl, B)
    assert nbad == _n_weights([7, 40, 3]) and rel_err(m2, om2) <= 1e-6
    # the sums the guard refused: the kernel's float32 sweep, unguarded, for layer 0
    _, _, _, mus, acc = impl._stats_scratch(B)
    sc = impl._blocked_scratch(B)
    KS._blocked_sums(B, 0, g, impl.ws.buf, impl.ws.lay, mus, acc, sc[0], sc[1], sc[5], sc[6], sc[7], True)
    n0 = 7 * 40
    assert rel_err(sc[0][:n0] * float(B) ** 2, np.asarray(om2[:n0], dtype=np.float64)) > 1e-5


def test_dead_units_are_kept_as_zero_not_recomputed():
    """An input column of exact zeros (a dead ReLU unit): every product is 0, the sums and
    the mean are 0, and the guard keeps M2 = 0 without an exact recompute."""
    B = 512
    _, impl, g = crafted([7, 40, 3], "float32", B, 1.0)
    A = _blocks(impl, B)[0][1]
    A[:, :5] = 0.0  # layer 1: units 0..4 dead
    _regrad(impl, g, B)
    nbad, _, m2 = run_blocked(impl, g, B)
    _, om2 = oracle(impl, B)
    assert nbad == 0 and rel_err(m2, om2) <= 1e-6
    o = 7 * 40 + 40  # layer 1's weights
    assert (m2[o : o + 5 * 3] == 0.0).all()


def _underflowing(B, seed=0):
    """Factors of layer 0 whose products are all ~2^-83 (normal) but whose squares (~2^-166)
    round to 0 in float32 even after the one-pass form's column scaling: each column's
    largest entry meets the other factor's smallest."""
    sizes = [4, 16, 3]
    _, impl, g = crafted(sizes, "float32", B, 1.0, seed=seed)
    A, D = _blocks(impl, B)[0][0], _blocks(impl, B)[1][0]
    rng = np.random.default_rng(seed)
    A[...] = (2.0**-42 * (1 + 0.3 * rng.random(A.shape))).astype(np.float32)
    D[...] = (2.0**-41 * (1 + 0.3 * rng.random(D.shape))).astype(np.float32)
    A[0], D[0] = 1.0, 2.0**-83
    A[1], D[1] = 2.0**-83, 1.0
    _regrad(impl, g, B)
    return sizes, impl, g


@pytest.mark.parametrize("B", [512, 1024])
def test_onepass_refuses_squares_that_underflowed(B):
    """S2 = 0 with S1 != 0: the squares underflowed, not a weight whose gradients are all 0.
    The one-pass form kept it (M2 = -B S1^2 < 0, and ``grad_moments`` raised on the negative
    variance); now it is refused and recomputed exactly."""
    sizes, impl, g = _underflowing(B)
    nbad, _, m2 = run_onepass(impl, g, B)
    _, om2 = oracle(impl, B)
    assert nbad >= 4 * 16 and (m2 >= 0).all()
    assert rel_err(m2, om2) <= 1e-6


# ============================================================================ repeated rows
def test_onepass_sums_round_alike_on_repeated_rows():
    """Why the one-pass form is not the default: one large square, then the same small one
    63 times, each just above half an ulp of the float32 partial sum -- every addition
    rounds up, and S2 is off by ~50 u where its guard assumes ~8 u (independent roundings)."""
    B = 512
    x = np.float32(np.sqrt(0.55 * 2.0**-24))
    P = np.full((B, 1), x, np.float32)
    P[0, 0] = np.float32(0.75)
    S = sums(P, np.ones((B, 16), np.float32))
    exact = float(np.sum(P[:, 0].astype(np.float64) ** 2))
    err_u = abs(S[0, 1] - exact) / exact / 2.0**-24
    assert err_u > 40 > KS.onepass_err(B, KS.ONEPASS_ROWS) / 2.0**-24


def _duplicated(B, scale, seed):
    """A chunk of B rows: one row repeated, with every 64th row replaced by a scaled outlier
    of another class (duplicated rows after a large one: the one-pass form's worst case)."""
    rng = np.random.default_rng(seed)
    x0, xd = rng.standard_normal(8), rng.standard_normal(8)
    X = np.tile(xd, (B, 1))
    X[::64] = x0 * scale
    y = np.ones(B, np.int64)
    y[::64] = 2
    return X.astype(np.float32), y


def _one_chunk(X, y, seed, onepass):
    m = mg.MLP([8, 16, 4], dtype="float32", backend="cpu", seed=seed)
    impl = m.backend_impl
    impl.moments_onepass = onepass
    B = len(X)
    Xc, yi, yf = m.check_Xy(X, y)
    impl.reserve(B)
    g = np.zeros(m.n_params, np.float32)
    mean, m2 = np.zeros(m.n_params), np.zeros(m.n_params)
    impl.moments_update(m.params, g, Xc, yi, yf, np.arange(B, dtype=np.int64), B, 0, mean, m2)
    return m2, oracle(impl, B)[1]


@pytest.mark.parametrize("B", [100, 512, 2048])
@pytest.mark.parametrize("scale", [3.0, 30.0])
def test_duplicated_rows_within_1e6_by_default(B, scale):
    """The default float32 moments on duplicated rows with outliers (at scale 30 the softmax
    saturates: deltas of ~1e-20 too) stay within 1e-6; ``grad_moments`` returns."""
    worst = 0.0
    for seed in range(4):
        X, y = _duplicated(B, scale, seed)
        m2, om2 = _one_chunk(X, y, seed, onepass=False)
        worst = max(worst, rel_err(m2, om2))
        m = mg.MLP([8, 16, 4], dtype="float32", backend="cpu", seed=seed)
        r = mg.grad_moments(m, X, y, chunk_size=min(B, 512))
        assert np.isfinite(r.var).all() and (r.var >= 0).all()
    assert worst <= 1e-6, worst


def test_the_one_pass_form_misses_the_bound_on_duplicated_rows():
    """The same data through the one-pass form (opted in): off by more than 1e-6."""
    assert mg.MLP([8, 4], dtype="float32").backend_impl.moments_onepass is False
    X, y = _duplicated(512, 3.0, 0)
    m2, om2 = _one_chunk(X, y, 0, onepass=True)
    assert rel_err(m2, om2) > 1e-6


# ============================================================================ overflow
@pytest.mark.parametrize("scale", [1e25, 1e35])
def test_squares_that_overflow_float32_are_recomputed_in_float64(scale):
    """Inputs of ~1e25 (finite float32): the per-example gradients' squares overflow float32
    in the blocked sweep (+inf), and the guard refuses them; the float64 recompute gives the
    variance the float64 shortcut gives.  ``grad_moments`` used to raise on the inf."""
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((300, 6)) * scale).astype(np.float32)
    y = rng.integers(0, 3, 300)
    a = mg.grad_moments(mg.MLP([6, 8, 3], dtype="float32", seed=0), X, y, chunk_size=128)
    b = mg.grad_moments(mg.MLP([6, 8, 3], dtype="float32", seed=0), X, y, chunk_size=128, exact=False)
    assert np.isfinite(a.var).all() and a.var.max() > 1e40
    np.testing.assert_allclose(a.var, b.var, rtol=2e-6, atol=0)
    with pytest.raises(ValueError, match="exact: True .* overflowed"):
        mg.grad_moments(mg.MLP([6, 8, 3], dtype="float32", seed=0), X, y, chunk_size=128, exact=True)
