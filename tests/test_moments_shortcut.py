"""The guarded float64 shortcut of the cpu backend's gradient moments (issue 20).

Per weight and chunk of B rows the shortcut forms M2 = S2 - S1^2 / B with S2 = sum_r g_r^2
one float64 GEMM of squared factors; where the squared mean comes within the safety
factor delta(B) of the mean square it recomputes the entry by the two-pass form.

Oracle: the exact per-example gradients of the factors the backward pass stored
(``g_r = a_r * (B d_r)``, products formed in extended precision) and their two-pass
mean / M2 in ``np.longdouble``.  Signal-to-noise ratios (mean^2 / variance of each
weight's per-example gradients) 1 .. 1e8 are built by giving the factors a large common
mean.  Tolerance: relative error of the variance <= 1e-6 everywhere (the issue's bound;
the guard enforces 1e-7 per chunk).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minigd as mg
from minigd.kernels import cpu_stats as KS
from minigd.kernels.cpu import R_D, R_MISC, R_SIZE

SNRS = (1.0, 1e2, 1e4, 1e6, 1e8)
DTYPES = ("float64", "float32")


# ============================================================================ helpers
def _blocks(impl, B):
    """Writable (B, n) views of the workspace: the input block of each layer and its deltas."""
    ws = impl.ws
    lay = ws.lay
    L = int(lay[R_MISC, 3])
    buf = ws.buf
    ins, ds = [], []
    for l in range(L):
        fi, fo = int(lay[R_SIZE, l]), int(lay[R_SIZE, l + 1])
        if l == 0:
            o = int(lay[R_MISC, 0])
        else:
            o = int(lay[5, l - 1])  # R_A of layer l-1
        ins.append(buf[o : o + B * fi].reshape(B, fi))
        od = int(lay[R_D, l])
        ds.append(buf[od : od + B * fo].reshape(B, fo))
    return ins, ds


def digits_chunk(sizes, B):
    """(model, backend, batch gradient) of a float32 ReLU MLP after ``loss_grad`` on the
    first B rows of scikit-learn's digits: sparse layers (zero pixels, inactive units), whose
    factors the workspace then holds."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X, y = (d.data[:B] / 16).astype(np.float32), d.target[:B]
    m = mg.MLP(sizes, seed=0)
    impl = m.backend_impl
    Xc, yi, yf = m.check_Xy(X, y)
    impl.reserve(B)
    g = np.zeros(m.n_params, np.float32)
    impl.loss_grad(m.params, g, Xc, yi, yf, np.arange(B, dtype=np.int64), B)
    return m, impl, g


def crafted(sizes, dtype, B, snr, seed=0):
    """A backend whose workspace holds factors with per-example SNR ~ ``snr`` for every
    weight (inputs 1 + s*xi with random signs, deltas m + s*eta), and the batch gradient
    of those factors computed in the model dtype."""
    rng = np.random.default_rng(seed)
    m = mg.MLP(sizes, dtype=dtype, activation="tanh", loss="mse", seed=seed)
    impl = m.backend_impl
    X = rng.normal(size=(B, sizes[0])).astype(dtype)
    y = rng.normal(size=(B, sizes[-1])).astype(dtype)
    Xc, yi, yf = m.check_Xy(X, y)
    g = np.zeros(m.n_params, m.dtype)
    impl.loss_grad(m.params, g, Xc, yi, yf, np.arange(B, dtype=np.int64), B)
    s = 1.0 / np.sqrt(2.0 * snr)  # g = a x with a ~ x ~ 1 + s N(0, 1): SNR ~ 1/(2 s^2)
    ins, ds = _blocks(impl, B)
    grads = []
    for A, D in zip(ins, ds):
        sa = rng.choice([-1.0, 1.0], size=A.shape[1]) * rng.uniform(0.5, 2.0, A.shape[1])
        sd = rng.choice([-1.0, 1.0], size=D.shape[1]) * rng.uniform(0.5, 2.0, D.shape[1])
        A[...] = (sa * (1.0 + s * rng.normal(size=A.shape))).astype(dtype)
        D[...] = (sd * (1.0 + s * rng.normal(size=D.shape)) / B).astype(dtype)
        grads.append((A.T @ D, D.sum(axis=0)))  # model dtype, BLAS: as loss_grad forms it
    wb, bb = m.backend_impl.layout.views(g)
    for l, (gw, gb) in enumerate(grads):
        wb[l][...] = gw
        bb[l][...] = gb
    return m, impl, g


def oracle(impl, B):
    """Exact (mean, M2) of the stored factors' per-example gradients, flat W0, b0, ...:
    products and the two-pass sums in np.longdouble."""
    return oracle_full(impl, B)[:2]


def oracle_full(impl, B):
    """:func:`oracle` plus each entry's sum of squares S2 and a mask of the weights (the
    entries the guard may refuse; biases always take the two-pass form)."""
    ins, ds = _blocks(impl, B)
    mean, m2, s2, weight = [], [], [], []
    ld = np.longdouble
    for A, D in zip(ins, ds):
        a = A.astype(ld)
        x = D.astype(np.float64).astype(ld) * ld(B)
        for G, w in ((np.einsum("ri,rj->rij", a, x).reshape(B, -1), True), (x, False)):
            mu = G.sum(axis=0) / ld(B)
            dev = G - mu
            mean.append(mu)
            m2.append((dev * dev).sum(axis=0) - dev.sum(axis=0) ** 2 / ld(B))
            s2.append((G * G).sum(axis=0))
            weight.append(np.full(G.shape[1], w))
    return tuple(np.concatenate(v) for v in (mean, m2, s2, weight))


def run_kernel(impl, g, B, n_old=0, mean=None, m2=None, tau=KS.SHORTCUT_TAU):
    P = g.shape[0]
    mean = np.zeros(P) if mean is None else mean
    m2 = np.zeros(P) if m2 is None else m2
    need_s1 = bool(impl.dtype == np.float32)
    sc = impl._shortcut_scratch(B, need_s1)
    nbad = KS.moments_update_shortcut(B, g, impl.ws.buf, impl.ws.lay, n_old, mean, m2, *sc, need_s1, tau)
    return nbad, mean, m2


def rel_err(got, ref):
    ref = np.asarray(ref, dtype=np.longdouble)
    den = np.maximum(np.abs(ref), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(np.asarray(got, dtype=np.longdouble) - ref) / den))


# ============================================================================ kernel level
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("snr", SNRS)
def test_shortcut_variance_within_1e6_at_every_snr_and_falls_back_at_high_snr(dtype, snr):
    sizes, B = [7, 40, 3], 512  # 1/delta(512) ~ 3e5: SNR 1e4 well below, 1e6 well above
    _, impl, g = crafted(sizes, dtype, B, snr)
    nbad, mean, m2 = run_kernel(impl, g, B)
    om, om2 = oracle(impl, B)
    assert rel_err(m2, om2) <= 1e-6, (snr, rel_err(m2, om2))
    n_weights = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    delta = KS.shortcut_delta(float(B), KS.SHORTCUT_TAU)
    if snr <= 1e4:
        # far from the guard: every weight takes the GEMM
        assert 1.0 / delta > 10 * snr
        assert nbad == 0
    else:
        # the squared mean is within delta of the mean square: every weight falls back
        assert snr > 2.0 / delta
        assert nbad == n_weights
    if dtype == "float64":  # the merged mean is the batch gradient itself
        assert np.array_equal(mean, g)
    else:  # float32: S1 / B formed in float64
        assert np.max(np.abs(mean - om.astype(np.float64))) <= 1e-12 * float(np.max(np.abs(om)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_the_guard_high_snr_loses_the_variance(dtype):
    """The trap is real: with the guard switched off (tau huge -> delta ~ 0) the one-GEMM
    form E[g^2] - E[g]^2 loses the variance at SNR 1e12 (at 1e8 float64 still keeps ~7
    digits: typically 2e-7 off, the worst-case bound is ~3e-6); with it the result is exact."""
    B = 96
    _, impl, g = crafted([7, 40, 3], dtype, B, 1e12)
    _, om2 = oracle(impl, B)
    nbad_off, _, m2_off = run_kernel(impl, g.copy(), B, tau=1e300)
    nbad_on, _, m2_on = run_kernel(impl, g.copy(), B)
    assert nbad_off == 0 and nbad_on > 0
    assert rel_err(m2_off, om2) > 1e-3
    assert rel_err(m2_on, om2) <= 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_snr_falls_back_only_where_needed(dtype):
    """A layer whose inputs have very different common means: the guard refuses exactly
    the weights whose computed ratio crosses 1 - delta, and all are accurate."""
    B = 64
    _, impl, g = crafted([6, 5], dtype, B, 1.0, seed=3)
    rng = np.random.default_rng(4)
    (A,), (D,) = _blocks(impl, B)
    noise = [1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5]  # per input column: SNR ~ 1/(2 s^2)
    A[...] = (1.0 + np.array(noise) * rng.normal(size=A.shape)).astype(dtype)
    D[...] = ((1.0 + 1e-6 * rng.normal(size=D.shape)) / B).astype(dtype)
    wb, bb = impl.layout.views(g)
    wb[0][...] = A.T @ D
    bb[0][...] = D.sum(axis=0)
    nbad, _, m2 = run_kernel(impl, g, B)
    _, om2 = oracle(impl, B)
    assert rel_err(m2, om2) <= 1e-6
    # which entries did the guard refuse?  recompute the guard's test from the oracle
    S2 = (A.astype(np.float64) ** 2).T @ ((D.astype(np.float64) * B) ** 2)
    kappa = S2 / om2[:30].reshape(6, 5).astype(np.float64)
    delta = KS.shortcut_delta(float(B), KS.SHORTCUT_TAU)
    assert np.all(kappa[:2] < 0.5 / delta) and np.all(kappa[-2:] > 2.0 / delta)
    assert 10 <= nbad <= 20  # the last two (or three) input rows, 5 outputs each


@settings(deadline=None, max_examples=30)
@given(
    st.lists(st.integers(1, 37), min_size=2, max_size=4),
    st.integers(2, 70),
    st.sampled_from(SNRS),
    st.sampled_from(DTYPES),
    st.integers(0, 2**16),
)
def test_shortcut_property_any_shape_batch_and_snr(sizes, B, snr, dtype, seed):
    """Any shapes, batch sizes (2 rows included: their sample SNR can be anything) and
    SNRs: the variance within 1e-6, and the guard refuses every weight whose exact ratio
    S2 / M2 is beyond 2 / delta and none below 0.5 / delta (the slack covers rounding)."""
    _, impl, g = crafted(sizes, dtype, B, snr, seed=seed)
    nbad, _, m2 = run_kernel(impl, g, B)
    _, om2, os2, weight = oracle_full(impl, B)
    assert rel_err(m2, om2) <= 1e-6
    delta = KS.shortcut_delta(float(B), KS.SHORTCUT_TAU)
    with np.errstate(divide="ignore"):
        kappa = (os2[weight] / om2[weight]).astype(np.float64)  # inf where M2 = 0
    assert np.count_nonzero(kappa > 2.0 / delta) <= nbad <= np.count_nonzero(kappa > 0.5 / delta)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chan_merge_across_chunks_at_high_snr(dtype):
    """Chunks merged by Chan's rule: the running (mean, M2) after three shortcut chunks
    equals the exact moments of all their rows."""
    B = 48
    mean = m2 = None
    rows = []
    n_old = 0
    for k in range(3):
        _, impl, g = crafted([5, 9, 2], dtype, B, 1e6, seed=k)
        if mean is None:
            mean, m2 = np.zeros(g.shape[0]), np.zeros(g.shape[0])
        run_kernel(impl, g, B, n_old, mean, m2)
        n_old += B
        ins, ds = _blocks(impl, B)
        per = []
        for A, D in zip(ins, ds):
            a = A.astype(np.longdouble)
            x = D.astype(np.float64).astype(np.longdouble) * B
            per += [np.einsum("ri,rj->rij", a, x).reshape(B, -1), x]
        rows.append(np.concatenate(per, axis=1))
    G = np.concatenate(rows)
    mu = G.mean(axis=0)
    ref = ((G - mu) ** 2).sum(axis=0)
    assert rel_err(m2, ref) <= 1e-6
    assert rel_err(mean, mu) <= 1e-12


def test_delta_follows_the_documented_formula():
    u = 2.0**-53
    gam = lambda n: n * u / (1 - n * u)  # noqa: E731
    for B in (2, 64, 2048):
        E = gam(B + 5) + gam(B + 1) * (2 + gam(B + 1)) + 2 * u
        assert KS.shortcut_delta(float(B), 1e-7) == pytest.approx(2 * E / 1e-7, rel=1e-12)
    assert KS.shortcut_delta(64.0, 1e-7) == pytest.approx(4.46e-7, rel=0.01)
    assert KS.shortcut_delta(2048.0, 1e-7) == pytest.approx(1.366e-5, rel=0.01)


# ============================================================================ model level
def _offset_regression(dtype, snr, n=256, seed=0):
    """A linear least-squares model whose per-example gradients share a large mean:
    inputs 1 + s*xi, residuals -(1 + s*eta) (SNR ~ 1/(2 s^2))."""
    rng = np.random.default_rng(seed)
    s = 1.0 / np.sqrt(2.0 * snr)
    X = (1.0 + s * rng.normal(size=(n, 4))).astype(dtype)
    y = (1.0 + s * rng.normal(size=(n, 2))).astype(dtype)
    m = mg.MLP([4, 2], loss="mse", dtype=dtype, seed=0)
    m.params[...] = 0.0  # predictions 0: residuals -y
    return m, X, y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("snr", SNRS)
def test_grad_moments_shortcut_against_the_two_pass_form(dtype, snr):
    n = 256
    m, X, y = _offset_regression(dtype, snr, n)
    impl = m.backend_impl
    short = mg.grad_moments(m, X, y, chunk_size=n, exact=False)
    nbad = impl.last_moments_fallbacks
    _, om2 = oracle(impl, n)  # the workspace holds this single chunk
    assert rel_err(short.var, om2 / (n - 1)) <= 1e-6
    exact = mg.grad_moments(m, X, y, chunk_size=n, exact=True)
    assert impl.last_moments_fallbacks == 0
    if dtype == "float64":
        # the two-pass form is itself float64-accurate: the two agree to 1e-6
        assert rel_err(short.var, exact.var) <= 1e-6
        assert np.array_equal(short.mean, exact.mean)
    if snr >= 1e6:
        assert nbad == 8  # every weight fell back (the biases always two-pass)
    elif snr <= 1e4:
        assert nbad == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_is_the_shortcut_for_float64_and_the_blocked_form_for_float32(dtype):
    m, X, y = _offset_regression(dtype, 1e8, 300)
    impl = m.backend_impl
    before = impl.moments_fallbacks
    d = mg.grad_moments(m, X, y, chunk_size=100)
    used = impl.moments_fallbacks - before
    e = mg.grad_moments(m, X, y, chunk_size=100, exact=True)
    f = mg.grad_moments(m, X, y, chunk_size=100, exact=False)
    assert used > 0  # the default's guard ran (and fell back: SNR 1e8)
    if dtype == "float64":
        assert np.array_equal(d.var, f.var) and np.array_equal(d.mean, f.mean)
    else:  # tests/test_moments_blocked.py: the blocked two-pass form
        assert not np.array_equal(d.var, e.var)


def test_exact_true_is_the_historical_kernel_bitwise():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(150, 6))
    y = rng.integers(0, 3, 150)
    m = mg.MLP([6, 11, 3], dtype="float64", seed=1)
    Xc, yi, yf = m.check_Xy(X, y)
    impl = m.backend_impl
    impl.reserve(50)
    mean, m2 = np.zeros(m.n_params), np.zeros(m.n_params)
    g = np.empty(m.n_params)
    _, tr, dsc, mus, acc = impl._stats_scratch(50)
    n_old = 0
    for s in range(0, 150, 50):
        idx = np.arange(s, s + 50, dtype=np.int64)
        impl.loss_grad(m.params, g, Xc, yi, yf, idx, 50)
        KS.moments_update(50, g, impl.ws.buf, impl.ws.lay, n_old, mean, m2, tr, dsc, mus, acc)
        n_old += 50
    r = mg.grad_moments(m, X, y, chunk_size=50, exact=True)
    assert np.array_equal(r.mean, mean) and np.array_equal(r.var, m2 / 149)


@pytest.mark.parametrize("dtype", DTYPES)
def test_python_driven_gemms_match_the_compiled_path(dtype):
    """Without SciPy's BLAS bindings the GEMMs run from Python between compiled steps."""
    m, X, y = _offset_regression(dtype, 1e8, 200)
    a = mg.grad_moments(m, X, y, chunk_size=64, exact=False)
    na = m.backend_impl.moments_fallbacks
    m.backend_impl.compiled_blas = False
    b = mg.grad_moments(m, X, y, chunk_size=64, exact=False)
    assert m.backend_impl.moments_fallbacks - na == na > 0
    np.testing.assert_allclose(b.var, a.var, rtol=1e-12)
    np.testing.assert_allclose(b.mean, a.mean, rtol=1e-14)


def test_population_and_jackknife_with_the_shortcut():
    rng = np.random.default_rng(8)
    X = rng.normal(size=(240, 5))
    y = rng.integers(0, 3, 240)
    m = mg.MLP([5, 13, 3], dtype="float64", seed=4)
    e = mg.grad_moments(m, X, y, population=2400, exact=True)
    s = mg.grad_moments(m, X, y, population=2400, exact=False)
    assert np.array_equal(s.mean, e.mean)
    assert rel_err(s.var, e.var) <= 1e-6
    for f in ("grad_norm_sq", "trace_cov", "noise_scale", "grad_norm_sq_se", "trace_cov_se", "noise_scale_se"):
        assert getattr(s, f) == pytest.approx(getattr(e, f), rel=1e-9), f


def test_one_row_chunks_and_a_wide_narrow_model():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(9, 40))
    y = rng.integers(0, 2, 9)
    m = mg.MLP([40, 3, 2], dtype="float64", seed=0)
    G = mg.per_example_grads(m, X, y)
    ref = G.var(axis=0, ddof=1)
    for chunk in (1, 2, 4, 9):
        r = mg.grad_moments(m, X, y, chunk_size=chunk, exact=False)
        np.testing.assert_allclose(r.var, ref, rtol=1e-9, atol=1e-30)
        np.testing.assert_allclose(r.mean, G.mean(axis=0), rtol=1e-12, atol=1e-15)


def test_scratch_is_allocated_once_per_capacity():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8))
    y = rng.integers(0, 3, 300)
    m = mg.MLP([8, 16, 3], dtype="float64", seed=0)
    mg.grad_moments(m, X, y, chunk_size=100)
    sc = m.backend_impl._sc
    mg.grad_moments(m, X, y, chunk_size=100)
    mg.grad_moments(m, X, y, chunk_size=60)  # smaller chunks reuse it
    assert m.backend_impl._sc is sc


@pytest.mark.parametrize("bad", [1, "yes", 0.0, np.array(True)])
def test_exact_must_be_none_or_a_bool(bad):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(10, 3))
    y = rng.integers(0, 2, 10)
    m = mg.MLP([3, 2], dtype="float64")
    with pytest.raises(TypeError, match=r"^exact: expected None, True or False, got "):
        mg.grad_moments(m, X, y, exact=bad)
