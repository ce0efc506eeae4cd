"""The noise scale of a population estimated from a subset of it: ``grad_moments(...,
population=N)``, its jackknife standard errors, and the two-batch estimator for batches drawn
without replacement.

Oracles: the exact full-data moments (``grad_moments`` over all N rows), a brute-force
delete-a-group jackknife over explicit per-example gradients, and the historical
``population=None`` path.  Statistical tests use fixed seeds and state their tolerances: a
mean over K draws must lie within 3 (unbiasedness) standard errors of the truth, while the
biases the tests guard against are about 10 or more standard errors large at the sizes
used; a standard-error calibration ratio (SD across draws / mean reported SE) must lie in a
stated band.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import minigd as mg
from minigd.gradstats import GradMoments, TwoBatchNoiseScale, two_batch_estimates
from minigd.gradstats.moments import jackknife_groups
from minigd.gradstats.per_example import accumulate_moments

N_POP = 2000


@pytest.fixture(scope="module")
def problem():
    """A 3-class problem with 20% label noise (a noise scale of about 11 examples, so a
    subset of 64 is well inside the regime where the uncorrected estimate is biased), a
    small tanh MLP in float64 on the compiled cpu backend, and its exact full-data moments."""
    rng = np.random.default_rng(15)
    X = rng.normal(size=(N_POP, 6))
    w = rng.normal(size=(6, 3))
    y = np.argmax(X @ w + rng.gumbel(size=(N_POP, 3)), axis=1)
    flip = rng.random(N_POP) < 0.2
    y[flip] = rng.integers(0, 3, int(flip.sum()))
    m = mg.MLP([6, 8, 3], activation="tanh", dtype="float64", seed=4)
    full = mg.grad_moments(m, X, y)
    return m, X, y, full


def draw_subsets(problem, n, K, seed):
    """(K, 6): corrected |G|^2, raw |g|^2, trace, and the three reported SEs, over K subsets
    of n rows drawn without replacement."""
    m, X, y, _ = problem
    rng = np.random.default_rng(seed)
    out = np.empty((K, 6))
    for k in range(K):
        idx = rng.choice(N_POP, n, replace=False)
        s = mg.grad_moments(m, X[idx], y[idx], population=N_POP)
        out[k] = (s.grad_norm_sq, s.mean_norm_sq, s.trace_cov, s.grad_norm_sq_se, s.trace_cov_se, s.noise_scale_se)
    return out


# ============================================================================ unbiasedness
def test_corrected_grad_norm_sq_is_unbiased_and_the_raw_one_is_not(problem):
    """Over 300 subsets of 64 of 2000 rows, the mean corrected |G|^2 lands within 3 SE of
    the full-data value (measured: 1.0350 +- 0.0151 against 1.0408, z = -0.4), and the same
    test rejects the raw |g|^2 (measured: 1.2070 +- 0.0155, z = 10.7; its expected bias
    (1/64 - 1/2000) tr = 0.172)."""
    *_, full = problem
    K = 300
    r = draw_subsets(problem, 64, K, seed=100)
    mean = r.mean(axis=0)
    se = r.std(axis=0, ddof=1) / math.sqrt(K)
    g2, tr = full.grad_norm_sq, full.trace_cov
    assert abs(mean[0] - g2) < 3 * se[0], (mean[0], g2, se[0])
    assert abs(mean[1] - g2) > 3 * se[1], (mean[1], g2, se[1])
    assert mean[1] > g2  # and biased upwards
    assert abs(mean[2] - tr) < 3 * se[2], (mean[2], tr, se[2])  # the trace needs no correction
    # the expected bias of the raw estimate is the correction term itself
    assert abs((mean[1] - mean[0]) - (1 / 64 - 1 / N_POP) * tr) < 0.05 * (1 / 64) * tr


@pytest.mark.parametrize(
    "n, band",
    [
        (64, (0.7, 1.4)),
        # at n = N/2 the finite-population factor is 1/2: without it the ratio would be ~0.72
        (1000, (0.85, 1.2)),
    ],
)
def test_reported_standard_errors_are_calibrated(problem, n, band):
    """The spread of the estimates across subsets matches the mean reported SE: ratio
    SD(estimate) / mean(SE) within ``band`` (measured at n = 64: 1.05 for |G|^2, 1.01 for
    the trace; at n = 1000: 0.99 and 1.02, and 0.95-1.10 over 12 other seeds)."""
    K = 300
    r = draw_subsets(problem, n, K, seed=7)
    lo, hi = band
    for est, se, name in ((0, 3, "grad_norm_sq"), (2, 4, "trace_cov")):
        ratio = r[:, est].std(ddof=1) / r[:, se].mean()
        assert lo < ratio < hi, (name, ratio)


def test_noise_scale_standard_error_is_calibrated(problem):
    """B_simple = tr/|G|^2 at n = 64 (|G|^2 resolved on every draw here, B about 11): the SD
    of the ratio across subsets within 0.7-1.4 of its mean reported SE (measured: 1.07)."""
    m, X, y, full = problem
    rng = np.random.default_rng(11)
    b, se = [], []
    for _ in range(200):
        idx = rng.choice(N_POP, 64, replace=False)
        s = mg.grad_moments(m, X[idx], y[idx], population=N_POP)
        b.append(s.noise_scale)
        se.append(s.noise_scale_se)
    b, se = np.array(b), np.array(se)
    assert np.isfinite(b).all() and np.isfinite(se).all()
    assert 0.7 < b.std(ddof=1) / se.mean() < 1.4, (b.std(ddof=1), se.mean())


# ============================================================================ the jackknife itself
def brute_force_jackknife(Gm, N):
    """Delete-a-group jackknife by recomputing every leave-one-group-out statistic from the
    explicit per-example gradients, with Busing et al.'s weights for unequal groups; the
    ratio's SE is inf when some replicate's |G|^2 estimate is <= 0 (documented rule)."""
    n, P = Gm.shape
    groups = jackknife_groups(n, P)

    def stats(rows):
        k = rows.shape[0]
        mu = rows.mean(axis=0)
        tr = rows.var(axis=0, ddof=1).sum()
        g2 = mu @ mu - (1 / k - 1 / N) * tr
        return np.array([g2, tr, tr / g2 if g2 > 0 else math.inf])

    theta = stats(Gm)
    reps = np.array([stats(np.delete(Gm, g, axis=0)) for g in groups])
    counts = np.array([len(g) for g in groups], float)
    h = n / counts
    tau = h[:, None] * theta - (h[:, None] - 1) * reps
    theta_j = len(groups) * theta - ((1 - counts / n)[:, None] * reps).sum(axis=0)
    with np.errstate(invalid="ignore"):
        v = ((tau - theta_j) ** 2 / (h[:, None] - 1)).mean(axis=0)
    se = np.sqrt(v * (1 - n / N))
    se[~np.isfinite(reps).all(axis=0)] = math.inf
    return theta, se


@pytest.mark.parametrize("n", [4, 5, 37, 64])
def test_jackknife_matches_brute_force_and_grad_moments_matches_from_grads(problem, n):
    m, X, y, _ = problem
    idx = np.random.default_rng(n).choice(N_POP, n, replace=False)
    Xs, ys = X[idx], y[idx]
    Gm = mg.per_example_grads(m, Xs, ys)
    theta, se = brute_force_jackknife(Gm, N_POP)
    for s in (
        mg.grad_moments(m, Xs, ys, population=N_POP),
        mg.grad_moments(m, Xs, ys, population=N_POP, chunk_size=3),
        GradMoments.from_grads(Gm, population=N_POP),
    ):
        assert s.population == N_POP and s.n == n
        np.testing.assert_allclose([s.grad_norm_sq, s.trace_cov, s.noise_scale], theta, rtol=1e-9)
        np.testing.assert_allclose([s.grad_norm_sq_se, s.trace_cov_se, s.noise_scale_se], se, rtol=1e-7)
        np.testing.assert_allclose(s.mean, Gm.mean(axis=0), rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(s.var, Gm.var(axis=0, ddof=1), rtol=1e-9, atol=1e-15)
        assert s.mean_norm_sq == pytest.approx(Gm.mean(0) @ Gm.mean(0), rel=1e-12)


def test_jackknife_groups_are_a_fixed_balanced_partition():
    for n, P, G in [
        (4, 10, 2),
        (5, 10, 2),
        (41, 10, 20),
        (1437, 4810, 20),
        (1000, 500_000, 16),  # 16 * 500000 * 8 bytes < 64 MiB < 17 * ...
        (1000, 10**8, 2),
    ]:  # never below 2 groups
        groups = jackknife_groups(n, P)
        assert len(groups) == G
        sizes = [len(g) for g in groups]
        assert max(sizes) - min(sizes) <= 1
        allrows = np.concatenate(groups)
        np.testing.assert_array_equal(np.sort(allrows), np.arange(n))
        assert all(np.all(np.diff(g) > 0) for g in groups)
        again = jackknife_groups(n, P)
        assert all(np.array_equal(a, b) for a, b in zip(groups, again))
    assert jackknife_groups(3, 10) == [] and jackknife_groups(2, 10) == []
    # groups are not contiguous blocks: a sorted data set must not give sorted groups
    assert not np.array_equal(jackknife_groups(40, 3)[0], np.arange(2))


def test_too_few_rows_for_a_jackknife_give_nan_errors():
    Gm = np.array([[1.0, 0.0], [3.0, 2.0], [2.0, 5.0]])
    s = GradMoments.from_grads(Gm, population=10)
    assert math.isnan(s.grad_norm_sq_se) and math.isnan(s.trace_cov_se)
    assert math.isnan(s.noise_scale_se)
    assert s.grad_norm_sq == pytest.approx(s.mean_norm_sq - (1 / 3 - 1 / 10) * s.trace_cov)


def test_population_results_are_deterministic(problem):
    m, X, y, _ = problem
    a = mg.grad_moments(m, X[:300], y[:300], population=N_POP)
    b = mg.grad_moments(m, X[:300], y[:300], population=N_POP)
    assert a.to_dict() == b.to_dict()
    assert np.array_equal(a.mean, b.mean) and np.array_equal(a.var, b.var)


# ============================================================================ exact cases, validation
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_population_none_is_the_historical_path_bitwise(dtype):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 5)).astype(dtype)
    y = rng.integers(0, 3, 300)
    m = mg.MLP([5, 7, 3], dtype=dtype, seed=2)
    X_, yi, yf = m.check_Xy(X, y)
    ref = accumulate_moments(m, X_, yi, yf, np.arange(300), 64).finalize()
    for got in (mg.grad_moments(m, X, y, chunk_size=64), mg.grad_moments(m, X, y, population=None, chunk_size=64)):
        assert got.population is None
        assert np.array_equal(got.mean, ref.mean) and np.array_equal(got.var, ref.var)
        mean64 = got.mean.astype(np.float64)
        assert got.grad_norm_sq == got.mean_norm_sq == float(np.dot(mean64, mean64))
        assert got.noise_scale == got.trace_cov / got.grad_norm_sq
        assert (got.grad_norm_sq_se, got.trace_cov_se, got.noise_scale_se) == (0.0, 0.0, 0.0)
        assert list(got.to_dict()) == [
            "n",
            "n_params",
            "trace_cov",
            "grad_norm_sq",
            "noise_scale",
            "mean_gsnr",
            "diversity",
        ]
        assert "population" not in repr(got)


def test_population_equal_to_n_is_exact(problem):
    m, X, y, _ = problem
    Xs, ys = X[:200], y[:200]
    plain = mg.grad_moments(m, Xs, ys)
    for N in (200, np.int64(200)):
        s = mg.grad_moments(m, Xs, ys, population=N)
        assert s.population == 200 and type(s.population) is int
        assert np.array_equal(s.mean, plain.mean) and np.array_equal(s.var, plain.var)
        assert s.grad_norm_sq == s.mean_norm_sq == plain.grad_norm_sq
        assert s.noise_scale == plain.noise_scale and s.diversity == plain.diversity
        assert (s.grad_norm_sq_se, s.trace_cov_se, s.noise_scale_se) == (0.0, 0.0, 0.0)
    d = s.to_dict()
    assert d["population"] == 200 and d["mean_norm_sq"] == d["grad_norm_sq"]
    assert all(type(v) in (int, float) for v in d.values())
    # one more population member makes it a sample: corrected down, errors appear
    t = mg.grad_moments(m, Xs, ys, population=201)
    assert t.grad_norm_sq < t.mean_norm_sq == pytest.approx(plain.grad_norm_sq, rel=1e-12)
    assert t.grad_norm_sq_se > 0 and t.trace_cov_se > 0 and t.noise_scale_se > 0
    assert "population=201" in repr(t) and "noise_scale_se" in t.to_dict()


@pytest.mark.parametrize(
    "bad", [63, 0, -64, 64.0, 2000.5, True, False, np.bool_(True), "2000", [2000], np.array(2000.0)]
)
def test_bad_population_values_are_refused(problem, bad):
    """An integer below n is a wrong value (ValueError); anything else -- floats, bools,
    strings, lists, float arrays -- a wrong type (TypeError)."""
    m, X, y, _ = problem
    exc = ValueError if isinstance(bad, int) and not isinstance(bad, bool) else TypeError
    with pytest.raises(
        exc,
        match=r"^population: expected None or an integer >= n=64"
        r".*got",
    ):
        mg.grad_moments(m, X[:64], y[:64], population=bad)
    with pytest.raises(exc, match=r"^population: expected"):
        GradMoments.from_grads(np.ones((64, 2)), population=bad)
    with pytest.raises(exc, match=r"^population: expected"):
        GradMoments(n=64, mean=np.ones(2), var=np.ones(2), population=bad)


def test_gradmoments_constructor_fields():
    # old constructors are unchanged: the rows are the population, no errors
    m = GradMoments(5, np.array([1.0, 2.0]), np.array([0.5, 0.0]))
    assert m.population is None and m.noise_scale_se == 0.0 and m.mean_norm_sq == 5.0
    acc = mg.gradstats.MomentAccumulator(2).update(np.array([[1.0, 0.0], [3.0, 2.0]]))
    assert acc.finalize().population is None
    # worked example: n = 4 of N = 8, mean (1, 1), var (1, 1): |g|^2 = 2, tr = 2,
    # |G|^2 = 2 - (1/4 - 1/8) * 2 = 1.75, B = 2 / 1.75
    s = GradMoments(
        n=4, mean=np.ones(2), var=np.ones(2), population=8, grad_norm_sq_se=0.1, trace_cov_se=0.2, noise_scale_se=0.3
    )
    assert s.grad_norm_sq == 1.75 and s.mean_norm_sq == 2.0
    assert s.noise_scale == pytest.approx(2 / 1.75)
    assert s.diversity == pytest.approx(((4 - 1) * 2 + 4 * 2) / (16 * 2))  # of the rows
    with pytest.raises(ValueError, match=r"grad_norm_sq_se: expected 0.0 when the rows are"):
        GradMoments(n=4, mean=np.ones(2), var=np.ones(2), grad_norm_sq_se=0.1)
    with pytest.raises(ValueError, match=r"noise_scale_se: expected 0.0 when the rows are"):
        GradMoments(n=4, mean=np.ones(2), var=np.ones(2), population=4, noise_scale_se=1.0)
    with pytest.raises(ValueError, match=r"trace_cov_se: expected a number >= 0"):
        GradMoments(n=4, mean=np.ones(2), var=np.ones(2), population=8, trace_cov_se=-1.0)
    with pytest.raises(TypeError, match=r"trace_cov_se: expected a number >= 0.*got str '1'"):
        GradMoments(n=4, mean=np.ones(2), var=np.ones(2), population=8, trace_cov_se="1")
    with pytest.raises(TypeError, match=r"mean: expected a 1-D real array.*got list"):
        GradMoments(n=4, mean=["a", "b"], var=np.ones(2))
    with pytest.raises(ValueError, match=r"var: expected a 1-D real array.*shape \(2, 1\)"):
        GradMoments(n=4, mean=np.ones(2), var=np.ones((2, 1)))


def test_unresolved_signal_gives_inf_noise_scale():
    # |g|^2 = 0.01, tr = 2: |G|^2 estimate 0.01 - (1/4 - 1/100) * 2 < 0 -> not resolved
    s = GradMoments(n=4, mean=np.array([0.1, 0.0]), var=np.ones(2), population=100)
    assert s.grad_norm_sq < 0 and s.noise_scale == math.inf
    # no noise and no signal: nan
    z = GradMoments(n=4, mean=np.zeros(2), var=np.zeros(2), population=100)
    assert z.grad_norm_sq == 0.0 and math.isnan(z.noise_scale)
    # from data: gradients that cancel give an unresolved ratio and a nan error for it
    Gm = np.array([[1.0, -1.0], [-1.0, 1.0]] * 4)
    t = GradMoments.from_grads(Gm, population=1000)
    assert t.noise_scale == math.inf and math.isnan(t.noise_scale_se)
    assert math.isfinite(t.grad_norm_sq_se) and math.isfinite(t.trace_cov_se)


# ============================================================================ two-batch estimator
def test_two_batch_estimates_with_population_are_unbiased_without_replacement():
    """A fixed population of N = 100 vectors; both batches drawn without replacement. Over
    20000 draws the corrected estimates land within 3 SE of the population's |G|^2 and
    ddof=1 trace, while the i.i.d. form's |G|^2 is off by tr/N (measured: z = -43)."""
    rng = np.random.default_rng(3)
    N, P, bs, bb, K = 100, 5, 5, 60, 20000
    pop = 0.3 + rng.normal(size=(N, P))
    G = pop.mean(axis=0)
    g2_true, tr_true = G @ G, pop.var(axis=0, ddof=1).sum()
    small = rng.random((K, N)).argsort(axis=1)[:, :bs]
    big = rng.random((K, N)).argsort(axis=1)[:, :bb]
    gs, gb = pop[small].mean(axis=1), pop[big].mean(axis=1)
    S, B = np.einsum("ij,ij->i", gs, gs), np.einsum("ij,ij->i", gb, gb)
    est = np.array(two_batch_estimates(S, B, bs, bb, population=N))
    mean, se = est.mean(axis=1), est.std(axis=1, ddof=1) / math.sqrt(K)
    assert abs(mean[0] - g2_true) < 3 * se[0], (mean[0], g2_true, se[0])
    assert abs(mean[1] - tr_true) < 3 * se[1], (mean[1], tr_true, se[1])
    iid = np.array(two_batch_estimates(S, B, bs, bb))
    assert abs(iid[0].mean() - g2_true) > 10 * se[0]
    np.testing.assert_array_equal(iid[1], est[1])  # the trace is unchanged
    np.testing.assert_allclose(est[0] - iid[0], est[1] / N, rtol=0, atol=1e-14)  # |G|^2 ~ 1
    # the streaming class makes the same per-update estimate
    tb = TwoBatchNoiseScale(bs, bb, beta=0.0, population=N)
    for k in range(3):
        tb.update(S[k], B[k])
        assert tb.last_estimate == pytest.approx((est[0, k], est[1, k]), rel=1e-12)
    assert tb.population == N and tb.to_dict()["population"] == N
    assert "population=100" in repr(tb)
    assert TwoBatchNoiseScale(bs, bb).to_dict()["population"] is None


def test_two_batch_population_equal_to_b_big_is_allowed():
    # the big batch is then the whole population: noise-free, E|G_big|^2 = |G|^2
    g2, tr = two_batch_estimates(3.0 + 1.0 * (1 / 2 - 1 / 8), 3.0, 2, 8, population=8)
    assert g2 == pytest.approx(3.0) and tr == pytest.approx(1.0)
    assert TwoBatchNoiseScale(2, 8, population=8).estimate(3.0 + 0.375, 3.0) == pytest.approx((3.0, 1.0))


def test_two_batch_population_validation():
    for bad, exc, pattern in [
        (7, ValueError, r"population: expected None or an integer >= b_big=8, got 7"),
        (0, ValueError, r"population: expected .* got 0"),
        (100.0, TypeError, r"population: expected .* got float 100.0"),
        (True, TypeError, r"population: expected .* got bool True"),
    ]:
        with pytest.raises(exc, match=pattern):
            TwoBatchNoiseScale(2, 8, population=bad)
    with pytest.raises(ValueError, match=r"population: expected a number of examples >= b_big"):
        two_batch_estimates(1.0, 1.0, 2, 8, population=7)
    with pytest.raises(ValueError, match=r"population: expected a number of examples >= b_big"):
        two_batch_estimates([1.0, 1.0], [1.0, 1.0], 2, [8, 16], population=[20, 10])
    with pytest.raises(ValueError, match=r"population: expected values > 0.0"):
        two_batch_estimates(1.0, 1.0, 2, 8, population=-5)
    with pytest.raises(ValueError, match=r"population: expected finite values"):
        two_batch_estimates(1.0, 1.0, 2, 8, population=float("nan"))
