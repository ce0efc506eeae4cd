"""Gradient statistics on a model: per-example gradients, fused norms, streamed moments,
variance vs batch size, noise tracking in fit.

Oracles: a loop of ``loss_and_grad`` over single rows (the definition of a per-example
gradient), float64 two-pass moments of the explicit per-example gradients, and closed
forms for least-squares linear regression with Gaussian inputs.  Statistical tests use
fixed seeds; each states its tolerance (a z-score bound of 4 or 5: a false failure has
probability < 1e-4 per comparison, while every bias they guard against is many standard
errors large at the sizes used).
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import minigd as mg
from minigd.gradstats import GradMoments, per_example_estimates, two_batch_estimates

ACTS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu", "identity")
LOSSES = ("cross_entropy", "mse", "binary_cross_entropy")
PATHS = ("numpy", "cpu-loops", "cpu-blas")


# ============================================================================ helpers
def make(sizes, path="numpy", **kw):
    m = mg.MLP(sizes, backend="numpy" if path == "numpy" else "cpu", **kw)
    if path == "cpu-loops":
        m.backend_impl.blas_min_batch = 10**9
    elif path == "cpu-blas":
        m.backend_impl.blas_min_batch = 1
    return m


def targets(loss, n, n_out, rng, dtype=np.float64):
    if loss == "cross_entropy":
        return rng.integers(0, n_out, size=n).astype(np.int64)
    if loss == "mse":
        return rng.normal(size=(n, n_out)).astype(dtype)
    return rng.integers(0, 2, size=(n, n_out)).astype(dtype)


@st.composite
def cases(draw, max_n=9):
    """(model config, X, y): depth 0-3, widths 1-6 (and a wide-in / narrow-out layer so the
    compiled moments kernel takes its transposed sweep), every activation and loss."""
    depth = draw(st.integers(0, 3))
    n_in = draw(st.sampled_from([1, 2, 3, 5, 37]))
    hidden = [draw(st.sampled_from([1, 2, 3, 6, 35])) for _ in range(depth)]
    n_out = draw(st.integers(1, 3))
    loss = draw(st.sampled_from(LOSSES))
    act = draw(st.sampled_from(ACTS))
    n = draw(st.integers(1, max_n))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_in))
    y = targets(loss, n, n_out, rng)
    return dict(sizes=[n_in, *hidden, n_out], activation=act, loss=loss, dtype="float64", seed=seed), X, y


def oracle_per_example(m, X, y):
    """Row i = loss_and_grad on example i alone: the definition."""
    return np.stack([m.loss_and_grad(X[i : i + 1], y[i : i + 1])[1] for i in range(len(X))])


def two_pass(G):
    G = np.asarray(G, np.float64)
    return G.mean(axis=0), G.var(axis=0, ddof=1)


# ============================================================================ per-example gradients
@settings(deadline=None, max_examples=25)
@given(cases(), st.sampled_from(PATHS))
def test_per_example_grads_are_single_example_gradients_and_average_to_the_batch_gradient(case, path):
    cfg, X, y = case
    m = make(path=path, **cfg)
    G = mg.per_example_grads(m, X, y)
    assert G.shape == (len(X), m.n_params) and G.dtype == np.float64
    ref = oracle_per_example(m, X, y)
    scale = np.abs(ref).max() + 1e-300
    np.testing.assert_allclose(G, ref, rtol=0, atol=1e-12 * scale)
    _, g = m.loss_and_grad(X, y)
    np.testing.assert_allclose(G.mean(axis=0), g, rtol=0, atol=1e-12 * scale)


@settings(deadline=None, max_examples=25)
@given(cases(), st.sampled_from(PATHS))
def test_fused_norms_equal_norms_of_explicit_per_example_grads(case, path):
    cfg, X, y = case
    m = make(path=path, **cfg)
    norms = mg.per_example_grad_norms(m, X, y)
    G = oracle_per_example(m, X, y)
    ref = np.sqrt((G**2).sum(axis=1))
    assert norms.shape == (len(X),)
    np.testing.assert_allclose(norms, ref, rtol=1e-10, atol=1e-12 * (ref.max() + 1e-300))
    sq = mg.per_example_grad_norms(m, X, y, squared=True)
    np.testing.assert_allclose(sq, ref**2, rtol=1e-10, atol=1e-12 * (ref.max() ** 2 + 1e-300))


def test_per_example_grads_into_out_and_in_float32():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(20, 5)).astype(np.float32)
    y = rng.integers(0, 3, 20)
    for path in ("numpy", "cpu-blas"):  # (float32 on one cpu path: each path is a JIT compile)
        m = make([5, 7, 3], path=path, dtype="float32", activation="tanh", seed=1)
        out = np.full((20, m.n_params), np.nan, np.float32)
        G = mg.per_example_grads(m, X, y, out=out)
        assert G is out and G.dtype == np.float32 and np.isfinite(G).all()
        m64 = mg.MLP(**{**m.config(), "dtype": "float64", "backend": "numpy"}, seed=0)
        m64.params[...] = m.params
        ref = mg.per_example_grads(m64, X.astype(np.float64), y)
        np.testing.assert_allclose(G, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def test_backend_per_example_terms_agree():
    """The backend method behind everything: (layer input, per-example delta) per layer,
    same on every backend and path; with ``grad`` the batch gradient is written too."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(9, 4))
    yi, yf = rng.integers(0, 3, 9).astype(np.int64), np.empty((0, 3))
    idx = np.arange(9, dtype=np.int64)
    ref = None
    for path in PATHS:
        m = make([4, 6, 5, 3], path=path, dtype="float64", activation="gelu", seed=3)
        g = np.zeros(m.n_params)
        terms = m.backend_impl.per_example_terms(m.params, X, yi, yf, idx, 9, grad=g)
        terms = [(A.copy(), D.copy()) for A, D in terms]
        assert [(A.shape, D.shape) for A, D in terms] == [((9, 4), (9, 6)), ((9, 6), (9, 5)), ((9, 5), (9, 3))]
        np.testing.assert_allclose(g, m.loss_and_grad(X, yi)[1], rtol=1e-12, atol=1e-15)
        if ref is None:
            ref = terms
        for (A, D), (A0, D0) in zip(terms, ref):
            np.testing.assert_allclose(A, A0, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(D, D0, rtol=1e-12, atol=1e-15)


def test_per_example_grads_chunks_beyond_eval_chunk(monkeypatch):
    import minigd.gradstats.per_example as pe

    monkeypatch.setattr(pe, "EVAL_CHUNK", 7)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(23, 4))
    y = rng.integers(0, 2, 23)
    for path in PATHS:
        m = make([4, 5, 2], path=path, dtype="float64")
        G = mg.per_example_grads(m, X, y)
        np.testing.assert_allclose(G, oracle_per_example(m, X, y), rtol=0, atol=1e-13)
        n = mg.per_example_grad_norms(m, X, y)
        np.testing.assert_allclose(n, np.linalg.norm(G, axis=1), rtol=1e-12)


# ============================================================================ streamed moments
def assert_moments_equal(mom, G, rtol_var=1e-9):
    mean, var = two_pass(G)
    scale = np.abs(G).max() + 1e-300
    assert mom.n == len(G)
    np.testing.assert_allclose(mom.mean, mean, rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(mom.var, var, rtol=rtol_var, atol=1e-24 * scale**2)


@settings(deadline=None, max_examples=25)
@given(cases(max_n=30), st.sampled_from(PATHS), st.integers(1, 33))
def test_streamed_moments_equal_two_pass_for_any_chunking(case, path, chunk):
    cfg, X, y = case
    assume(len(X) >= 2)
    m = make(path=path, **cfg)
    mom = mg.grad_moments(m, X, y, chunk_size=chunk)
    assert isinstance(mom, GradMoments) and mom.mean.dtype == np.float64
    assert_moments_equal(mom, oracle_per_example(m, X, y))


@pytest.mark.parametrize("sizes", [[37, 5, 2], [3, 41, 6], [6, 9, 9, 1], [2, 1]])
@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 64])
def test_moments_kernel_blocks_and_remainders(sizes, chunk):
    """Row blocks of 4 with remainders, example blocks of 4 with remainders, and the
    transposed sweep (few outputs, many inputs), on the compiled backend."""
    rng = np.random.default_rng(sum(sizes) + chunk)
    X = rng.normal(size=(23, sizes[0]))
    y = rng.integers(0, sizes[-1], 23) if sizes[-1] > 1 else rng.normal(size=23)
    loss = "cross_entropy" if sizes[-1] > 1 else "mse"
    for path in ("cpu-loops", "cpu-blas"):
        m = make(sizes, path=path, loss=loss, activation="tanh", dtype="float64", seed=2)
        assert_moments_equal(mg.grad_moments(m, X, y, chunk_size=chunk), mg.per_example_grads(m, X, y))


def test_moments_survive_a_large_common_offset():
    """Per-example gradients with |mean| >> std: a regression whose residuals are all
    100 + 1e-5 * noise, so the bias gradient has mean 100 and std 1e-5.  The naive
    E[g^2] - E[g]^2 loses the variance to cancellation; the two-pass kernel keeps it."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(400, 3))
    w, b = np.array([0.3, -0.2, 0.1]), 0.05
    y = X @ w + b - 100.0 - 1e-5 * rng.normal(size=400)
    for path in PATHS:
        m = make([3, 1], path=path, loss="mse", dtype="float64", seed=0)
        m.params[...] = np.append(w, b)
        G = mg.per_example_grads(m, X, y)
        mom = mg.grad_moments(m, X, y, chunk_size=64)
        mean, var = two_pass(G)
        assert 0.5e-10 < var[-1] < 2e-10 and abs(mean[-1] - 100) < 1e-3
        np.testing.assert_allclose(mom.var, var, rtol=1e-6)
        naive = ((G**2).mean(0) - G.mean(0) ** 2) * 400 / 399
        assert abs(naive[-1] - var[-1]) > 1e-3 * var[-1]  # the trap is real


def test_moments_float32_within_stated_tolerance():
    """float32 models: chunk M2 is accumulated in float32 -> relative error ~1e-5."""
    rng = np.random.default_rng(7)
    X = rng.normal(size=(600, 20)).astype(np.float32)
    y = rng.integers(0, 4, 600)
    for path in ("numpy", "cpu-blas"):
        m = make([20, 30, 4], path=path, dtype="float32", seed=3)
        G = mg.per_example_grads(m, X, y).astype(np.float64)
        mom = mg.grad_moments(m, X, y, chunk_size=128)
        mean, var = two_pass(G)
        np.testing.assert_allclose(mom.mean, mean, rtol=0, atol=1e-6 * np.abs(G).max())
        big = var > 1e-6 * var.max()
        np.testing.assert_allclose(mom.var[big], var[big], rtol=2e-4)
        np.testing.assert_allclose(mom.trace_cov, var.sum(), rtol=1e-5)


def test_grad_moments_and_norms_never_form_the_per_example_matrix():
    """O(P) memory: peak traced allocation far below n * P numbers."""
    rng = np.random.default_rng(0)
    n, sizes = 3000, [60, 100, 10]
    X = rng.normal(size=(n, sizes[0]))
    y = rng.integers(0, 10, n)
    for path in ("cpu-blas", "cpu-loops"):
        m = make(sizes, path=path, dtype="float64")
        mg.grad_moments(m, X, y)  # warm-up: JIT, workspace, scratch
        mg.per_example_grad_norms(m, X, y)
        full = n * m.n_params * 8
        tracemalloc.start()
        try:
            mg.grad_moments(m, X, y)
            mg.per_example_grad_norms(m, X, y)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < full / 20, (peak, full)


# ============================================================================ closed form
def test_linear_regression_moments_match_the_analytic_gradient_distribution():
    """Least squares z = w.x + b, x ~ N(0, I_d), y = w*.x + b* + eps, eps ~ N(0, s^2).
    With delta = w - w*, beta = b - b*: per-example gradient e x (weights), e (bias),
    e = delta.x + beta - eps.  Analytically G = (delta, beta),
    Var[e x_j] = |delta|^2 + delta_j^2 + beta^2 + s^2, Var[e] = |delta|^2 + s^2,
    tr(Sigma) = (d + 2)|delta|^2 + d beta^2 + (d + 1) s^2.
    Tolerance: 5 standard errors, each estimated from the sample's own moments."""
    d, N, s = 4, 40000, 0.7
    rng = np.random.default_rng(11)
    w_star = rng.normal(size=d)
    b_star = 0.5
    X = rng.normal(size=(N, d))
    y = X @ w_star + b_star + s * rng.normal(size=N)
    delta = np.array([0.3, -0.2, 0.1, 0.4])
    beta = -0.25
    G_true = np.append(delta, beta)
    var_true = np.append(delta @ delta + delta**2 + beta**2 + s**2, delta @ delta + s**2)
    tr_true = (d + 2) * (delta @ delta) + d * beta**2 + (d + 1) * s**2
    assert math.isclose(var_true.sum(), tr_true)
    for path in PATHS:
        m = make([d, 1], path=path, loss="mse", dtype="float64")
        m.params[...] = np.append(w_star + delta, b_star + beta)
        mom = mg.grad_moments(m, X, y, chunk_size=1000)
        Gx = mg.per_example_grads(m, X[:20000], y[:20000])  # for the standard errors
        se_mean = np.sqrt(Gx.var(0) / N)
        assert np.all(np.abs(mom.mean - G_true) < 5 * se_mean), (mom.mean, G_true)
        dev = Gx - Gx.mean(0)
        se_var = np.sqrt(((dev**2 - Gx.var(0)) ** 2).mean(0) / N)
        assert np.all(np.abs(mom.var - var_true) < 5 * se_var), (mom.var, var_true)
        q = (dev**2).sum(1)
        se_tr = np.sqrt(q.var() / N)
        assert abs(mom.trace_cov - tr_true) < 5 * se_tr
        assert abs(mom.noise_scale - tr_true / (G_true @ G_true)) < 0.05 * tr_true / (G_true @ G_true)


def test_two_batch_and_per_example_estimators_are_unbiased_against_exact_moments():
    """Batches drawn with replacement from the data are i.i.d. from its empirical
    distribution, whose |G|^2 and (ddof=0) tr(Sigma) grad_moments gives exactly; the mean
    of K single-batch estimates must land within 4 standard errors."""
    rng = np.random.default_rng(2)
    N, K, b_small, b_big = 3000, 400, 4, 32
    X = rng.normal(size=(N, 6))
    y = rng.integers(0, 3, N)
    m = make([6, 8, 3], path="cpu-blas", activation="tanh", dtype="float64", seed=4)
    m.params *= 3.0  # sharper logits: a noise scale of order 10, not 1e4
    mom = mg.grad_moments(m, X, y)
    g2_true = mom.grad_norm_sq
    tr_true = mom.trace_cov * (N - 1) / N
    per_ex, two = [], []
    for _ in range(K):
        idx = rng.integers(0, N, b_big)
        Xb, yb = X[idx], y[idx]
        sq = mg.per_example_grad_norms(m, Xb, yb, squared=True)
        gb = m.loss_and_grad(Xb, yb)[1]
        per_ex.append(per_example_estimates(sq, gb @ gb))
        gs = m.loss_and_grad(Xb[:b_small], yb[:b_small])[1]
        two.append(two_batch_estimates(gs @ gs, gb @ gb, b_small, b_big))
    for est in (np.array(per_ex), np.array(two)):
        mean, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(K)
        assert abs(mean[0] - g2_true) < 4 * se[0], (mean[0], g2_true, se[0])
        assert abs(mean[1] - tr_true) < 4 * se[1], (mean[1], tr_true, se[1])
    # and the estimators are not vacuous: the per-example one is far tighter per batch
    assert np.array(per_ex)[:, 1].std() < np.array(two)[:, 1].std()


# ============================================================================ variance vs batch size
@pytest.mark.parametrize("replacement", [False, True])
def test_variance_vs_batch_size_follows_the_sampling_formula(replacement):
    rng = np.random.default_rng(8)
    N = 240
    X = rng.normal(size=(N, 5))
    y = rng.integers(0, 3, N)
    m = make([5, 7, 3], path="cpu-blas", activation="tanh", dtype="float64", seed=1)
    sizes = [1, 6, 60, 200, N]
    c = mg.variance_vs_batch_size(m, X, y, sizes, n_samples=300, replacement=replacement, seed=0)
    G = mg.per_example_grads(m, X, y)
    tr_pop = ((G - G.mean(0)) ** 2).sum() / N  # ddof=0, by hand
    B = np.array(sizes, float)
    np.testing.assert_allclose(c.predicted_with_replacement, tr_pop / B, rtol=1e-10)
    np.testing.assert_allclose(c.predicted_without_replacement, tr_pop / B * (N - B) / (N - 1), rtol=1e-10, atol=1e-18)
    np.testing.assert_allclose(
        c.predicted, c.predicted_with_replacement if replacement else c.predicted_without_replacement
    )
    np.testing.assert_allclose(c.trace_cov, tr_pop * N / (N - 1), rtol=1e-10)
    noisy = c.predicted > 0
    assert np.all(np.abs(c.z[noisy]) < 4), c
    if not replacement:
        assert c.variance[-1] < 1e-20 and abs(c.cosine[-1] - 1) < 1e-12  # B = N: no noise
        # at B = 200 of 240 the finite-population factor is 0.17: the with-replacement law
        # (1/B) would be many standard errors off
        j = sizes.index(200)
        assert abs(c.variance[j] - c.predicted_with_replacement[j]) > 10 * c.variance_se[j]
    assert np.all(np.diff(c.cosine) > 0)  # bigger batches point closer to G
    recs = c.to_records()
    assert [r["batch_size"] for r in recs] == sizes and "ratio" in recs[0]
    assert "B_simple" in str(c)


def test_variance_vs_batch_size_parity_numpy_cpu():
    rng = np.random.default_rng(9)
    X = rng.normal(size=(50, 4))
    y = rng.normal(size=(50, 2))
    kw = dict(loss="mse", activation="gelu", dtype="float64", seed=5)
    a = mg.variance_vs_batch_size(make([4, 6, 2], "numpy", **kw), X, y, [2, 10], n_samples=20, seed=3)
    b = mg.variance_vs_batch_size(make([4, 6, 2], "cpu", **kw), X, y, [2, 10], n_samples=20, seed=3)
    for f in ("variance", "variance_se", "cosine", "predicted"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-9)


# ============================================================================ parity
def test_numpy_cpu_parity_for_every_statistic():
    rng = np.random.default_rng(10)
    X = rng.normal(size=(41, 6))
    y = rng.integers(0, 2, size=(41, 3)).astype(np.float64)
    kw = dict(loss="binary_cross_entropy", activation="relu", dtype="float64", seed=6)
    ref = make([6, 9, 5, 3], "numpy", **kw)
    G_ref = mg.per_example_grads(ref, X, y)
    n_ref = mg.per_example_grad_norms(ref, X, y)
    m_ref = mg.grad_moments(ref, X, y, chunk_size=10)
    for path in ("cpu-loops", "cpu-blas"):
        m = make([6, 9, 5, 3], path, **kw)
        np.testing.assert_allclose(mg.per_example_grads(m, X, y), G_ref, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(mg.per_example_grad_norms(m, X, y), n_ref, rtol=1e-10)
        mm = mg.grad_moments(m, X, y, chunk_size=10)
        np.testing.assert_allclose(mm.mean, m_ref.mean, rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(mm.var, m_ref.var, rtol=1e-9, atol=1e-20)
        for f in ("trace_cov", "grad_norm_sq", "noise_scale", "diversity", "mean_gsnr"):
            assert math.isclose(getattr(mm, f), getattr(m_ref, f), rel_tol=1e-9), f


# ============================================================================ tracking in fit
def fit_tracked(path, X, y, **kw):
    m = make([5, 8, 3], path, activation="tanh", dtype="float64", seed=0)
    kw.setdefault("optimizer", mg.SGD(lr=0.05, momentum=0.9))
    return m, mg.fit(m, X, y, **kw)


def test_tracking_records_every_k_steps_and_merges_into_records():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 5))
    y = rng.integers(0, 3, 100)
    _, h = fit_tracked("cpu", X, y, batch_size=16, steps=20, track_noise=3, track_gsnr=6)
    assert [r["step"] for r in h.noise] == list(range(0, 20, 3))
    assert all(math.isfinite(r["noise_scale"]) for r in h.noise)
    gs = [r for r in h.noise if "gsnr_mean" in r]
    assert [r["step"] for r in gs] == [0, 6, 12, 18]
    for r in gs:  # the exact batch trace equals the per-example-norm estimate
        assert r["gsnr_mean"] > 0 and r["gsnr_median"] >= 0
        assert math.isclose(r["batch_trace_cov"], r["trace_cov_est"], rel_tol=1e-9)
    recs = h.records
    assert "noise_scale" in recs[3] and "noise_scale" not in recs[4]
    assert recs[6]["trace_cov"] == h.noise[2]["trace_cov"]
    # off: nothing recorded, nothing merged
    _, h0 = fit_tracked("cpu", X, y, batch_size=16, steps=5)
    assert h0.noise == [] and h0.noise_tracker is None and "noise_scale" not in h0.records[0]


@pytest.mark.parametrize("path", PATHS)
def test_full_batch_tracking_is_exact(path):
    """B = N without replacement: the per-step estimates are the exact |G|^2 and ddof=1
    tr(Sigma) of the training set at the parameters before the step."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 5))
    y = rng.integers(0, 3, 30)
    m = make([5, 8, 3], path, activation="tanh", dtype="float64", seed=0)
    before = m.copy()
    h = mg.fit(m, X, y, batch_size="full", steps=1, track_noise=1, noise_beta=0.0)
    mom = mg.grad_moments(before, X, y)
    r = h.noise[0]
    assert math.isclose(r["trace_cov_est"], mom.trace_cov, rel_tol=1e-10)
    assert math.isclose(r["grad_norm_sq_est"], mom.grad_norm_sq, rel_tol=1e-9)
    assert math.isclose(r["batch_grad_norm_sq"], mom.grad_norm_sq, rel_tol=1e-10)
    assert math.isclose(r["noise_scale"], mom.noise_scale, rel_tol=1e-9)


@pytest.mark.parametrize("sampler", ["shuffle", "replacement"])
def test_tracked_estimates_are_unbiased_for_the_training_set(sampler):
    """With lr = 0 the parameters stay put, so every tracked step estimates the same
    |G|^2 and tr(Sigma) (ddof=1 over the N examples).  N = 60 and B = 30 make the
    finite-population corrections large: the mean over 600 steps must be within 4 standard
    errors, and the uncorrected formula (|g_B|^2 - tr/B without replacement) would not be."""
    rng = np.random.default_rng(4)
    N, B = 60, 30
    X = rng.normal(size=(N, 5))
    y = rng.integers(0, 3, N)
    m = make([5, 8, 3], "cpu", activation="tanh", dtype="float64", seed=0)
    m.params *= 2.0
    mom = mg.grad_moments(m, X, y)
    h = mg.fit(
        m,
        X,
        y,
        batch_size=B,
        steps=600,
        optimizer=mg.SGD(lr=0.0),
        sampler=sampler,
        track_noise=1,
        noise_beta=0.999,
        seed=0,
    )
    tr = h.noise_tracker.column("trace_cov_est")
    g2 = h.noise_tracker.column("grad_norm_sq_est")
    K = len(tr)
    for est, true in ((tr, mom.trace_cov), (g2, mom.grad_norm_sq)):
        se = est.std(ddof=1) / np.sqrt(K)
        assert abs(est.mean() - true) < 4 * se, (est.mean(), true, se)
    if sampler == "shuffle":
        naive = h.noise_tracker.column("batch_grad_norm_sq") - tr / B
        se = naive.std(ddof=1) / np.sqrt(K)
        assert abs(naive.mean() - mom.grad_norm_sq) > 6 * se
    # the smoothed values track the same quantities
    assert abs(h.noise[-1]["noise_scale"] / mom.noise_scale - 1) < 0.25


def test_tracking_parity_numpy_cpu():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(64, 5))
    y = rng.integers(0, 3, 64)
    recs = {}
    for path in PATHS:
        _, h = fit_tracked(path, X, y, batch_size=8, steps=12, track_noise=2, track_gsnr=4, seed=3)
        recs[path] = h.noise
    for path in ("cpu-loops", "cpu-blas"):
        assert len(recs[path]) == len(recs["numpy"]) == 6
        for a, b in zip(recs[path], recs["numpy"]):
            assert a.keys() == b.keys()
            for k in a:
                assert math.isclose(a[k], b[k], rel_tol=1e-8, abs_tol=1e-12), (path, k, a[k], b[k])


def test_tracking_float32_every_step_is_consistent_with_the_tracker_formula():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(256, 5)).astype(np.float32)
    y = rng.integers(0, 3, 256)
    m = make([5, 8, 3], "cpu-blas", dtype="float32", seed=0)
    h = mg.fit(m, X, y, batch_size=32, epochs=2, track_noise=1, optimizer=mg.SGD(lr=0.1))
    assert len(h.noise) == h.n_steps == 16
    for r in h.noise:
        assert r["batch_size"] == 32 and np.isfinite(r["trace_cov_est"]) and r["trace_cov_est"] > 0


def test_tracking_argument_errors():
    X = np.zeros((10, 5))
    y = np.zeros(10, np.int64)
    m = make([5, 3], "cpu", dtype="float64")
    with pytest.raises(ValueError, match="track_noise: expected an integer >= 1"):
        mg.fit(m, X, y, batch_size=4, steps=1, track_noise=0)
    with pytest.raises(TypeError, match="track_noise"):
        mg.fit(m, X, y, batch_size=4, steps=1, track_noise=1.5)
    with pytest.raises(ValueError, match="track_gsnr: needs track_noise"):
        mg.fit(m, X, y, batch_size=4, steps=1, track_gsnr=2)
    with pytest.raises(ValueError, match="track_gsnr: expected a multiple of track_noise=3"):
        mg.fit(m, X, y, batch_size=4, steps=1, track_noise=3, track_gsnr=4)
    with pytest.raises(ValueError, match="noise_beta"):
        mg.fit(m, X, y, batch_size=4, steps=1, track_noise=1, noise_beta=1.0)
    with pytest.raises(ValueError, match="track_noise: needs batches of at least 2"):
        mg.fit(m, X, y, batch_size=1, steps=1, track_noise=1)


# ============================================================================ argument errors
def test_argument_errors_name_argument_expected_and_got():
    m = make([3, 2], "cpu", dtype="float64")
    X = np.zeros((4, 3))
    y = np.zeros(4, np.int64)
    with pytest.raises(TypeError, match="X: expected dtype float64"):
        mg.per_example_grads(m, X.astype(np.float32), y)
    with pytest.raises(ValueError, match="X: expected 3 columns"):
        mg.per_example_grad_norms(m, np.zeros((4, 2)), y)
    with pytest.raises(ValueError, match=r"y: expected class labels in \[0, 2\)"):
        mg.grad_moments(m, X, y + 5)
    with pytest.raises(ValueError, match="X: expected at least 2 examples"):
        mg.grad_moments(m, X[:1], y[:1])
    with pytest.raises(ValueError, match="chunk_size: expected an integer >= 1"):
        mg.grad_moments(m, X, y, chunk_size=0)
    with pytest.raises(ValueError, match=r"out: expected a writable C-contiguous array of shape \(4, 8\)"):
        mg.per_example_grads(m, X, y, out=np.zeros((4, 7)))
    with pytest.raises(TypeError, match="model: expected a minigd.MLP"):
        mg.grad_moments("model", X, y)
    with pytest.raises(ValueError, match=r"batch_sizes: expected at most the number of examples \(4\)"):
        mg.variance_vs_batch_size(m, X, y, [2, 5])
    with pytest.raises(ValueError, match="batch_sizes: expected a non-empty sequence of integers, got list"):
        mg.variance_vs_batch_size(m, X, y, [])
    with pytest.raises(TypeError, match="batch_sizes: expected a non-empty sequence of integers, got list"):
        mg.variance_vs_batch_size(m, X, y, [2, 2.5])
    with pytest.raises(
        TypeError,
        match=r"out: expected a writable C-contiguous array .* got array of shape "
        r"\(4, 8\) and dtype float32",
    ):
        mg.per_example_grads(m, X, y, out=np.zeros((4, 8), np.float32))
    with pytest.raises(ValueError, match=r"out: expected a writable .* \(read-only\)"):
        ro = np.zeros((4, 8))
        ro.setflags(write=False)
        mg.per_example_grads(m, X, y, out=ro)
    with pytest.raises(ValueError, match="n_samples: expected an integer >= 2"):
        mg.variance_vs_batch_size(m, X, y, [2], n_samples=1)
    with pytest.raises(TypeError, match="squared: expected a bool"):
        mg.per_example_grad_norms(m, X, y, squared="yes")
