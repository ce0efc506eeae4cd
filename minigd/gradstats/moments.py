"""Streaming first and second moments of per-example gradients.

Conventions (held throughout :mod:`minigd.gradstats`):

* The batch loss is the **mean** of per-example losses, and a per-example gradient
  :math:`g_i` is the gradient of example *i*'s own loss, so the batch gradient is the mean
  :math:`\\bar g = \\frac1n \\sum_i g_i`.
* Variances of per-example gradients use ``ddof=1`` (divide by :math:`n - 1`).
* Moments are streamed with Welford/Chan updates in float64 and O(P) memory, never as
  :math:`E[g^2] - E[g]^2`, which cancels catastrophically when :math:`|E[g]| \\gg` std.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._checks import check_int, check_int_or_none, check_param, got, safe_ratio

__all__ = ["GradMoments", "MomentAccumulator"]


@dataclass(frozen=True, eq=False, repr=False)
class GradMoments:
    """Mean and variance of per-example gradients over *n* examples, optionally as a sample
    of a larger population of *N* examples.

    Usually produced by :meth:`MomentAccumulator.finalize` (or ``minigd.grad_moments``).
    The arrays are stored as read-only copies.

    Parameters
    ----------
    n : int
        Number of examples the moments were computed over (``n >= 2``).
    mean : ndarray of shape (P,)
        Mean per-example gradient :math:`\\bar g = \\frac1n\\sum_i g_i`, in loss units per
        parameter unit. With the mean-loss convention this is the full-data (batch) gradient.
    var : ndarray of shape (P,)
        Per-parameter variance of the per-example gradients with ``ddof=1``,
        :math:`\\hat\\sigma_j^2 = \\frac1{n-1}\\sum_i (g_{ij} - \\bar g_j)^2`, in squared gradient
        units. Non-negative.
    population : int or None, default None
        N, the number of examples the *n* rows were drawn from, uniformly without
        replacement (``N >= n``). ``None`` (or ``N == n``): the rows *are* the population
        and every statistic is exact.
    grad_norm_sq_se, trace_cov_se, noise_scale_se : float, default 0.0
        Standard errors of :attr:`grad_norm_sq`, :attr:`trace_cov` and :attr:`noise_scale`
        as estimates of the population's values (``>= 0``, or ``nan``/``inf``, see
        :func:`minigd.grad_moments`); must be 0 when ``population`` is None or ``n``.

    Attributes
    ----------
    n_params : int
        P.
    trace_cov : float
        :math:`\\mathrm{tr}(\\hat\\Sigma)` = ``var.sum()``.
    mean_norm_sq : float
        :math:`|\\bar g|^2` = ``(mean ** 2).sum()``, always the raw squared norm of the mean.
    grad_norm_sq : float
        :math:`|G|^2`: :attr:`mean_norm_sq` when the rows are the population, else the
        unbiased :math:`|\\bar g|^2 - (1/n - 1/N)\\,\\mathrm{tr}(\\hat\\Sigma)`.
    noise_scale : float
        :math:`B_\\mathrm{simple}` = ``trace_cov / grad_norm_sq`` (examples).
    gsnr : ndarray of shape (P,)
        Per-parameter ``mean ** 2 / var``.
    mean_gsnr : float
        Mean of ``gsnr`` over parameters with ``var > 0``.
    diversity : float
        :math:`\\sum_i |g_i|^2 / |\\sum_i g_i|^2`.

    Notes
    -----
    Zero denominators follow one rule everywhere: a positive quantity over zero is ``inf``,
    zero over zero is ``nan`` — except :attr:`gsnr`, see there.

    **A subset is not the population.** For *n* rows drawn uniformly without replacement
    from *N* examples with full-data gradient :math:`G` and per-example covariance
    :math:`\\Sigma` (``ddof=1`` over the *N*),

    .. math::
        E\\,|\\bar g|^2 = |G|^2 + \\Big(\\frac1n - \\frac1N\\Big)\\mathrm{tr}(\\Sigma),
        \\qquad E\\,\\mathrm{tr}(\\hat\\Sigma) = \\mathrm{tr}(\\Sigma),

    so with ``population=N`` :attr:`grad_norm_sq` is the unbiased
    :math:`|\\bar g|^2 - (1/n - 1/N)\\,\\mathrm{tr}(\\hat\\Sigma)`, while the raw
    :attr:`mean_norm_sq` overestimates :math:`|G|^2` and a noise scale taken from it is
    biased low (it can never much exceed *n*). The corrected :math:`|G|^2` estimate can be
    negative on a draw: then the signal is not resolved at this *n* (the noise of the mean,
    :math:`\\mathrm{tr}(\\Sigma)/n`, swamps it) and :attr:`noise_scale` is ``inf`` (``nan``
    if also :math:`\\mathrm{tr}(\\hat\\Sigma) = 0`), meaning "larger than this sample can
    tell" — draw more rows. :attr:`noise_scale` is a ratio of unbiased estimates, not itself
    unbiased. :attr:`diversity`, :attr:`gsnr` and :attr:`mean_gsnr` always describe the
    *n* rows themselves.

    Equality (``==``) is identity; compare fields with :func:`numpy.array_equal` instead.

    References
    ----------
    .. [1] S. McCandlish, J. Kaplan, D. Amodei et al., "An Empirical Model of Large-Batch
       Training", arXiv:1812.06162, 2018 (App. A.1: the unbiased :math:`|G|^2` estimate).
    .. [2] D. Yin, A. Pananjady, M. Lam et al., "Gradient Diversity: a Key Ingredient for
       Scalable Distributed Learning", AISTATS 2018, arXiv:1706.05699.
    .. [3] J. Liu, G. Jiang, Y. Bai et al., "Understanding Why Neural Networks Generalize Well
       Through GSNR of Parameters", ICLR 2020, arXiv:2001.07384.

    Examples
    --------
    >>> import numpy as np
    >>> from minigd.gradstats import GradMoments
    >>> G = np.array([[1.0, 0.0], [3.0, 2.0]])          # two examples, P = 2
    >>> m = GradMoments.from_grads(G)
    >>> m.mean, m.var
    (array([2., 1.]), array([2., 2.]))
    >>> m.trace_cov, m.grad_norm_sq, m.noise_scale
    (4.0, 5.0, 0.8)
    """

    n: int
    """Number of examples (count)."""
    mean: np.ndarray
    """(P,) mean per-example gradient (= the full-data gradient), float."""
    var: np.ndarray
    """(P,) variance of the per-example gradients over examples, ddof=1, squared gradient units."""
    population: int | None = None
    """N, the number of examples the rows were drawn from without replacement (None: the rows
    are the population)."""
    grad_norm_sq_se: float = 0.0
    """Standard error of :attr:`grad_norm_sq` (squared gradient units); 0 when exact."""
    trace_cov_se: float = 0.0
    """Standard error of :attr:`trace_cov` (squared gradient units); 0 when exact."""
    noise_scale_se: float = 0.0
    """Standard error of :attr:`noise_scale` (examples); 0 when exact."""

    def __post_init__(self) -> None:
        n = check_int("n", self.n, low=2)
        population = check_population(self.population, n)
        ses = {}
        for name in ("grad_norm_sq_se", "trace_cov_se", "noise_scale_se"):
            v = getattr(self, name)
            v = check_param(name, v, "standard_error")
            if (population is None or population == n) and v != 0.0:
                raise ValueError(
                    f"{name}: expected 0.0 when the rows are the population (population={population}, n={n}), got {v!r}"
                )
            ses[name] = v
        mean = np.array(self.mean, copy=True)
        var = np.array(self.var, copy=True)
        for name, a in (("mean", mean), ("var", var)):
            if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)) or a.dtype == bool:
                raise TypeError(
                    f"{name}: expected a 1-D real array of shape (P,), "
                    f"got {got(self.mean if name == 'mean' else self.var)}"
                )
            if a.ndim != 1:
                raise ValueError(
                    f"{name}: expected a 1-D real array of shape (P,), "
                    f"got {got(self.mean if name == 'mean' else self.var)}"
                )
        if mean.shape != var.shape:
            raise ValueError(f"var: expected shape {mean.shape} (the shape of mean), got shape {var.shape}")
        if not np.issubdtype(mean.dtype, np.floating):
            mean = mean.astype(np.float64)
        if not np.issubdtype(var.dtype, np.floating):
            var = var.astype(np.float64)
        if not np.isfinite(mean).all():
            raise ValueError(
                f"mean: expected finite values, got {int(np.count_nonzero(~np.isfinite(mean)))} NaN/inf entries"
            )
        if not np.isfinite(var).all() or (var < 0).any():
            bad = int(np.count_nonzero(~(np.isfinite(var) & (var >= 0))))
            raise ValueError(f"var: expected finite non-negative values, got {bad} negative/NaN/inf entries")
        mean.setflags(write=False)
        var.setflags(write=False)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "var", var)
        object.__setattr__(self, "population", population)
        for name, v in ses.items():
            object.__setattr__(self, name, v)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_grads(cls, G: Any, *, dtype: Any = np.float64, population: int | None = None) -> GradMoments:
        """Moments of an explicit (n, P) matrix of per-example gradients (row i = :math:`g_i`).

        Equivalent to ``MomentAccumulator(P, dtype).update(G).finalize()``. With
        ``population=N`` the rows are a sample without replacement of *n* out of *N*
        examples, and the result carries the corrected :math:`|G|^2` and standard errors
        exactly as :func:`minigd.grad_moments` computes them (same groups, same formulas).
        """
        G = np.asarray(G)
        if G.ndim != 2:
            raise ValueError(f"G: expected a 2-D array of per-example gradients (n, P), got {got(G)}")
        if population is None:
            return MomentAccumulator(G.shape[1], dtype=dtype).update(G).finalize()
        acc = MomentAccumulator(G.shape[1], dtype=dtype)
        if G.shape[0] < 2:  # the same error finalize() gives
            return acc.update(G).finalize()
        return sample_moments(G.shape[0], acc, population, lambda idx, a: a.update(G[idx]))

    # ------------------------------------------------------------------ derived statistics
    @property
    def n_params(self) -> int:
        """P, the number of parameters (length of :attr:`mean`)."""
        return int(self.mean.shape[0])

    @property
    def trace_cov(self) -> float:
        """:math:`\\mathrm{tr}(\\hat\\Sigma) = \\sum_j \\hat\\sigma_j^2` (``ddof=1``), squared
        gradient units: the total variance of a single per-example gradient."""
        return float(np.sum(self.var, dtype=np.float64))

    @property
    def mean_norm_sq(self) -> float:
        """:math:`|\\bar g|^2 = \\sum_j \\bar g_j^2`, the raw squared norm of the mean gradient
        of the *n* rows, whatever :attr:`population` is."""
        m = self.mean.astype(np.float64, copy=False)
        return float(np.dot(m, m))

    @property
    def grad_norm_sq(self) -> float:
        """:math:`|G|^2`, the squared norm of the population's gradient: :attr:`mean_norm_sq`
        when the rows are the population (``population`` None or ``n``), else the unbiased

        .. math:: |\\bar g|^2 - \\Big(\\frac1n - \\frac1N\\Big)\\mathrm{tr}(\\hat\\Sigma)

        (McCandlish et al. 2018, App. A.1, for sampling without replacement), which may be
        negative on a draw (the signal is not resolved at this *n*)."""
        N = self.population
        if N is None or N == self.n:
            return self.mean_norm_sq
        return self.mean_norm_sq - _fpc_coef(self.n, N) * self.trace_cov

    @property
    def noise_scale(self) -> float:
        """The simple gradient noise scale :math:`B_\\mathrm{simple} = \\mathrm{tr}(\\hat\\Sigma)
        / |\\bar g|^2`, in examples (McCandlish et al. 2018).

        Roughly the batch size at which the gradient noise of a batch mean,
        :math:`\\mathrm{tr}(\\Sigma)/B`, equals the squared signal :math:`|G|^2`.
        ``inf`` when :math:`|\\bar g|^2 = 0 < \\mathrm{tr}(\\hat\\Sigma)`; ``nan`` when both are 0
        (every per-example gradient is zero).

        Note that :math:`|\\bar g|^2` of a sample of *n* out of *N* overestimates
        :math:`|G|^2` by :math:`(1/n - 1/N)\\,\\mathrm{tr}(\\Sigma)` in expectation; over a
        whole dataset (where :math:`\\bar g` *is* the full-data gradient) there is nothing
        to correct. With ``population=N`` the denominator is the corrected
        :attr:`grad_norm_sq`; where that estimate is :math:`\\le 0` (signal not resolved
        at this *n*) the result is ``inf``, or ``nan`` when the trace is 0 too.
        """
        N = self.population
        if N is None or N == self.n:
            return float(safe_ratio(self.trace_cov, self.grad_norm_sq))
        return _ratio(self.trace_cov, self.grad_norm_sq)

    @property
    def gsnr(self) -> np.ndarray:
        """(P,) per-parameter gradient signal-to-noise ratio
        :math:`r_j = \\bar g_j^2 / \\hat\\sigma_j^2` (Liu et al. 2020), dimensionless.

        Where :math:`\\hat\\sigma_j^2 = 0` (every example agrees on parameter *j*):
        ``inf`` if :math:`\\bar g_j \\ne 0` (a noise-free signal) and **0** if
        :math:`\\bar g_j = 0` (no signal at all, e.g. a dead unit) — chosen so that the result
        never contains NaN. :attr:`mean_gsnr` leaves all these parameters out.
        """
        m = self.mean.astype(np.float64)
        v = self.var.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = m * m / v
        r[(v == 0) & (m == 0)] = 0.0
        return r

    @property
    def mean_gsnr(self) -> float:
        """Mean of :attr:`gsnr` over the parameters with :math:`\\hat\\sigma_j^2 > 0`
        (dimensionless); ``nan`` if there are none."""
        v = self.var.astype(np.float64)
        keep = v > 0
        if not keep.any():
            return float("nan")
        m = self.mean.astype(np.float64)[keep]
        return float(np.mean(m * m / v[keep]))

    @property
    def diversity(self) -> float:
        """Gradient diversity :math:`\\Delta = \\sum_i |g_i|^2 / |\\sum_i g_i|^2`
        (Yin et al. 2018), dimensionless, computed exactly from the moments via

        .. math::
            \\sum_i |g_i|^2 = (n-1)\\,\\mathrm{tr}(\\hat\\Sigma) + n|\\bar g|^2, \\qquad
            |\\textstyle\\sum_i g_i|^2 = n^2 |\\bar g|^2,

        so :math:`n\\Delta = 1 + \\mathrm{tr}(\\hat\\Sigma_{\\mathrm{ddof}=0})/|\\bar g|^2`.
        Yin et al. bound the useful batch size by :math:`n\\Delta`. ``inf`` when
        :math:`\\bar g = 0` but some :math:`g_i \\ne 0`; ``nan`` when every :math:`g_i = 0`.
        """
        n = float(self.n)
        g2 = self.mean_norm_sq
        num = (n - 1.0) * self.trace_cov + n * g2
        return float(safe_ratio(num, n * n * g2))

    def to_dict(self) -> dict:
        """The scalar statistics as a plain ``dict`` (``int``/``float`` values): ``n``,
        ``n_params``, ``trace_cov``, ``grad_norm_sq``, ``noise_scale``, ``mean_gsnr`` and
        ``diversity``; when :attr:`population` is set, also ``population``,
        ``mean_norm_sq``, ``grad_norm_sq_se``, ``trace_cov_se`` and ``noise_scale_se``
        (left out when it is None, so that result keeps its historical keys)."""
        d = {
            "n": self.n,
            "n_params": self.n_params,
            "trace_cov": self.trace_cov,
            "grad_norm_sq": self.grad_norm_sq,
            "noise_scale": self.noise_scale,
            "mean_gsnr": self.mean_gsnr,
            "diversity": self.diversity,
        }
        if self.population is not None:
            d.update(
                population=self.population,
                mean_norm_sq=self.mean_norm_sq,
                grad_norm_sq_se=self.grad_norm_sq_se,
                trace_cov_se=self.trace_cov_se,
                noise_scale_se=self.noise_scale_se,
            )
        return d

    def __repr__(self) -> str:
        if self.population is None:
            return (
                f"GradMoments(n={self.n}, n_params={self.n_params}, "
                f"trace_cov={self.trace_cov:.6g}, grad_norm_sq={self.grad_norm_sq:.6g}, "
                f"noise_scale={self.noise_scale:.6g})"
            )
        return (
            f"GradMoments(n={self.n}, population={self.population}, "
            f"n_params={self.n_params}, "
            f"trace_cov={self.trace_cov:.6g} +- {self.trace_cov_se:.2g}, "
            f"grad_norm_sq={self.grad_norm_sq:.6g} +- {self.grad_norm_sq_se:.2g}, "
            f"mean_norm_sq={self.mean_norm_sq:.6g}, "
            f"noise_scale={self.noise_scale:.6g} +- {self.noise_scale_se:.2g})"
        )


class MomentAccumulator:
    """Streaming mean and variance of per-example gradients, O(P) memory.

    Feed chunks of per-example gradients with :meth:`update` (or precomputed chunk sums with
    :meth:`update_sums`), combine accumulators from disjoint data with :meth:`merge`, and
    read the result with :meth:`finalize`. Accumulation is always in float64, whatever the
    input dtype; the result equals a two-pass float64 ``np.mean`` / ``np.var(ddof=1)`` over
    all the rows fed, for any chunking, up to float64 rounding.

    Parameters
    ----------
    P : int
        Number of parameters (columns of each chunk), ``P >= 1``.
    dtype : {numpy.float64, numpy.float32}, default numpy.float64
        dtype of the ``mean`` and ``var`` arrays of :meth:`finalize`'s result. Only the output
        is cast; the running state is float64.

    Notes
    -----
    The state is the count :math:`n`, the mean :math:`\\mu` and
    :math:`M_2 = \\sum_i (g_i - \\mu)^2` (per parameter). A chunk of :math:`k` rows is
    reduced by a corrected two-pass algorithm to its own :math:`(k, \\mu_b, M_{2,b})`, which
    is then combined with the running state by Chan et al.'s parallel rule

    .. math::
        \\delta = \\mu_b - \\mu,\\quad n' = n + k,\\quad
        \\mu' = \\mu + \\delta\\,k/n',\\quad
        M_2' = M_2 + M_{2,b} + \\delta^2\\,n k / n'.

    With :math:`k = 1` this is Welford's update. :math:`E[g^2] - E[g]^2` is never formed.

    References
    ----------
    .. [1] T. F. Chan, G. H. Golub, R. J. LeVeque, "Updating Formulae and a Pairwise Algorithm
       for Computing Sample Variances", Stanford CS tech. report STAN-CS-79-773, 1979.
    .. [2] B. P. Welford, "Note on a Method for Calculating Corrected Sums of Squares and
       Products", Technometrics 4(3), 1962.

    Examples
    --------
    >>> import numpy as np
    >>> from minigd.gradstats import MomentAccumulator
    >>> G = np.random.default_rng(0).normal(size=(100, 5))
    >>> acc = MomentAccumulator(5)
    >>> for chunk in np.array_split(G, 7):
    ...     _ = acc.update(chunk)
    >>> m = acc.finalize()
    >>> bool(np.allclose(m.var, G.var(axis=0, ddof=1)))
    True
    """

    def __init__(self, P: int, dtype: Any = np.float64) -> None:
        self._P = check_int("P", P, low=1)
        self._dtype = check_param("dtype", dtype)
        self._n = 0
        self._mean = np.zeros(self._P, dtype=np.float64)
        self._m2 = np.zeros(self._P, dtype=np.float64)

    # ------------------------------------------------------------------ state
    @property
    def P(self) -> int:
        """Number of parameters."""
        return self._P

    n_params = P

    @property
    def dtype(self) -> np.dtype:
        """dtype of the finalized arrays."""
        return self._dtype

    @property
    def n(self) -> int:
        """Number of examples accumulated so far."""
        return self._n

    def copy(self) -> MomentAccumulator:
        """An independent copy of this accumulator."""
        other = MomentAccumulator(self._P, self._dtype)
        other._n = self._n
        other._mean[:] = self._mean
        other._m2[:] = self._m2
        return other

    def reset(self) -> MomentAccumulator:
        """Forget everything accumulated; returns ``self``."""
        self._n = 0
        self._mean[:] = 0.0
        self._m2[:] = 0.0
        return self

    # ------------------------------------------------------------------ updates
    def _combine(self, k: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if k == 0:
            return
        if self._n == 0:
            self._mean[:] = mean_b
            self._m2[:] = m2_b
            self._n = k
            return
        n = self._n
        n_new = n + k
        delta = mean_b - self._mean
        self._mean += delta * (k / n_new)
        delta *= delta
        delta *= n * k / n_new
        self._m2 += m2_b
        self._m2 += delta
        self._n = n_new

    def update(self, G: Any) -> MomentAccumulator:
        """Add a chunk of per-example gradients.

        Parameters
        ----------
        G : array_like of shape (k, P), or (P,) for a single example
            Row i is the gradient of example i's own loss. Any real dtype (cast to float64
            for the computation); must be finite. ``k = 0`` is a no-op.

        Returns
        -------
        self : MomentAccumulator
        """
        G = np.asarray(G)
        if G.ndim == 1:
            G = G[None, :]
        if G.dtype == bool or not (np.issubdtype(G.dtype, np.floating) or np.issubdtype(G.dtype, np.integer)):
            raise TypeError(f"G: expected a real array of shape (k, {self._P}) (or ({self._P},)), got {got(G)}")
        if G.ndim != 2 or G.shape[1] != self._P:
            raise ValueError(f"G: expected a real array of shape (k, {self._P}) (or ({self._P},)), got {got(G)}")
        k = G.shape[0]
        if k == 0:
            return self
        # one float64 working copy of the chunk; corrected two-pass mean and M2
        d = np.array(G, dtype=np.float64, order="C", copy=True)
        if not np.isfinite(d).all():
            raise ValueError(f"G: expected finite values, got {int(np.count_nonzero(~np.isfinite(d)))} NaN/inf entries")
        mean_b = d.mean(axis=0)
        d -= mean_b
        s = d.sum(axis=0)  # ~0; corrects the rounding of mean_b
        m2_b = np.einsum("ij,ij->j", d, d)
        m2_b -= s * s / k
        np.maximum(m2_b, 0.0, out=m2_b)
        mean_b += s / k
        self._combine(k, mean_b, m2_b)
        return self

    def update_sums(self, k: int, chunk_mean: Any, chunk_m2: Any) -> MomentAccumulator:
        """Add a chunk summarised by the caller.

        Parameters
        ----------
        k : int
            Number of examples in the chunk (``k >= 0``; 0 is a no-op).
        chunk_mean : array_like of shape (P,)
            Mean of the chunk's per-example gradients.
        chunk_m2 : array_like of shape (P,)
            Sum over the chunk of squared deviations from ``chunk_mean``,
            :math:`\\sum_{i\\in b} (g_i - \\mu_b)^2` (non-negative; 0 when ``k == 1``).
            Compute it by two passes or Welford, not as :math:`\\sum g^2 - k\\mu_b^2`.

        Returns
        -------
        self : MomentAccumulator
        """
        k = check_int("k", k, low=0)
        mean_b = np.asarray(chunk_mean, dtype=np.float64)
        m2_b = np.asarray(chunk_m2, dtype=np.float64)
        if mean_b.shape != (self._P,):
            raise ValueError(f"chunk_mean: expected shape ({self._P},), got {got(chunk_mean)}")
        if m2_b.shape != (self._P,):
            raise ValueError(f"chunk_m2: expected shape ({self._P},), got {got(chunk_m2)}")
        if k == 0:
            return self
        if not np.isfinite(mean_b).all():
            raise ValueError(
                f"chunk_mean: expected finite values, got {int(np.count_nonzero(~np.isfinite(mean_b)))} NaN/inf entries"
            )
        if not (np.isfinite(m2_b) & (m2_b >= 0)).all():
            bad = m2_b[~(np.isfinite(m2_b) & (m2_b >= 0))]
            raise ValueError(
                f"chunk_m2: expected finite non-negative values, got {bad.size} bad entries (first {float(bad[0])!r})"
            )
        self._combine(k, mean_b, m2_b)
        return self

    def _fold(self, k: int, fold) -> MomentAccumulator:
        """Add k examples through ``fold(n_old, mean, m2)``, which updates the float64 state
        arrays in place by Chan's rule (used by compiled backends that never materialise
        the per-example gradients, see ``minigd.grad_moments``)."""
        if k:
            fold(self._n, self._mean, self._m2)
            self._n += int(k)
        return self

    def merge(self, other: MomentAccumulator) -> MomentAccumulator:
        """Fold in another accumulator's state (from disjoint data), in place.

        ``other`` is left unchanged. Returns ``self``.
        """
        if not isinstance(other, MomentAccumulator):
            raise TypeError(f"other: expected a MomentAccumulator, got {got(other)}")
        if other._P != self._P:
            raise ValueError(f"other: expected an accumulator with P={self._P}, got P={other._P}")
        self._combine(other._n, other._mean.copy(), other._m2)
        return self

    # ------------------------------------------------------------------ result
    def finalize(self) -> GradMoments:
        """The moments so far, as a :class:`GradMoments` (the accumulator stays usable).

        Raises
        ------
        ValueError
            If fewer than 2 examples were accumulated (the ``ddof=1`` variance needs
            ``n >= 2``).
        """
        return self._finalize()

    def _finalize(self, **extra) -> GradMoments:
        """:meth:`finalize` with extra :class:`GradMoments` fields (``population``, SEs)."""
        if self._n < 2:
            raise ValueError(f"n: expected at least 2 accumulated examples for the ddof=1 variance, got n={self._n}")
        var = self._m2 / (self._n - 1)
        return GradMoments(n=self._n, mean=self._mean.astype(self._dtype), var=var.astype(self._dtype), **extra)

    def __repr__(self) -> str:
        return f"MomentAccumulator(P={self._P}, dtype={self._dtype.name}, n={self._n})"


# ====================================================================== sampling a population
#: the jackknife uses at most this many groups ...
JACKKNIFE_MAX_GROUPS = 20
#: ... and keeps at most this many bytes of group mean vectors (G * P * 8)
JACKKNIFE_MAX_BYTES = 64 * 2**20
#: seed of the fixed permutation that assigns rows to jackknife groups (results are
#: deterministic functions of the rows, their order and the model)
JACKKNIFE_SEED = 0x6A6B


def check_population(population: Any, n: int) -> int | None:
    """``population`` as an int ``>= n``, or None; else TypeError (not an integer) or
    ValueError (below n) naming it."""
    return check_int_or_none(
        "population",
        population,
        low=n,
        expected=f"None or an integer >= n={n} (the number of examples the {n} "
        f"rows were drawn from without replacement)",
    )


def _fpc_coef(n: int, N: int) -> float:
    """:math:`1/n - 1/N`, without the cancellation of the difference."""
    return (N - n) / (float(n) * float(N))


def _ratio(num: float, den: float) -> float:
    """``num / den`` for a possibly negative unbiased denominator: ``inf`` when
    ``den <= 0 < num``, ``nan`` when both are ``<= 0`` (the safe_ratio rule, extended to a
    negative estimate of a non-negative quantity)."""
    if den > 0:
        return num / den
    return math.inf if num > 0 else math.nan


def jackknife_groups(n: int, P: int) -> list:
    """Row indices (each sorted) of the delete-a-group jackknife groups for *n* rows and
    *P* parameters: ``G = min(20, n // 2)`` groups, lowered so that ``G * P * 8`` bytes stay
    within 64 MiB but never below 2, rows assigned by a fixed-seed permutation; sizes
    differ by at most one. Empty for ``n < 4`` (no group could be left out with 2 rows
    left)."""
    G = min(JACKKNIFE_MAX_GROUPS, n // 2, max(2, JACKKNIFE_MAX_BYTES // (8 * P)))
    return list(_groups(n, G)) if G >= 2 else []


@functools.lru_cache(maxsize=16)
def _groups(n: int, G: int) -> tuple:
    perm = np.random.default_rng(JACKKNIFE_SEED).permutation(n)
    out = tuple(np.sort(g) for g in np.array_split(perm, G))
    for g in out:
        g.setflags(write=False)
    return out


def jackknife_se(
    N: int, n: int, mean: np.ndarray, tr_m2: float, counts: np.ndarray, means: np.ndarray, tr_m2s: np.ndarray
) -> tuple:
    """Delete-a-group jackknife standard errors of the corrected :math:`|G|^2`,
    :math:`\\mathrm{tr}(\\hat\\Sigma)` and their ratio, with the finite-population factor.

    Parameters
    ----------
    N, n : int
        Population size and sample size, ``N > n >= 4``.
    mean : ndarray (P,) float64
        Mean of the *n* per-example gradients.
    tr_m2 : float
        :math:`\\sum_i |g_i - \\bar g|^2` over the *n* rows.
    counts : ndarray (G,) int
        Rows per group (sum *n*).
    means : ndarray (G, P) float64
        Each group's mean gradient.
    tr_m2s : ndarray (G,) float64
        Each group's :math:`\\sum_{i\\in j} |g_i - \\bar g_j|^2`.

    Returns
    -------
    grad_norm_sq_se, trace_cov_se, noise_scale_se : float

    Notes
    -----
    Leaving group *j* (:math:`k_j` rows) out leaves :math:`n_r = n - k_j` rows with mean and
    :math:`M_2` given exactly by Chan's rule run backwards, with :math:`d_j = \\bar g - \\bar g_j`:

    .. math::
        \\bar g_{(j)} = \\bar g + \\frac{k_j}{n_r} d_j, \\qquad
        M_{2,(j)} = M_2 - M_{2,j} - \\frac{n_r k_j}{n}|\\bar g_{(j)} - \\bar g_j|^2
                 = M_2 - M_{2,j} - \\frac{n k_j}{n_r}|d_j|^2,

    from which each replicate :math:`\\theta_{(j)}` is the statistic of those rows. The
    variance is the delete-:math:`m_j` jackknife for unequal groups (Busing et al. 1999),
    which for equal groups is :math:`\\frac{G-1}{G}\\sum_j(\\theta_{(j)} - \\bar\\theta)^2`:
    with :math:`h_j = n/k_j`, pseudo-values :math:`\\tau_j = h_j\\theta - (h_j - 1)\\theta_{(j)}`
    and :math:`\\theta_J = G\\theta - \\sum_j (1 - k_j/n)\\theta_{(j)}`,

    .. math:: v = \\frac1G \\sum_j \\frac{(\\tau_j - \\theta_J)^2}{h_j - 1},

    multiplied by the finite-population factor :math:`1 - n/N` (the jackknife estimates the
    variance of i.i.d. sampling; without replacement it shrinks by that factor to first
    order, and to 0 at :math:`n = N`).

    The noise-scale SE is ``nan`` when the noise scale itself is not finite, and ``inf``
    when it is but some replicate's :math:`|G|^2` estimate is :math:`\\le 0` (the ratio is
    not resolved at this *n*).

    References
    ----------
    .. [1] F. M. T. A. Busing, E. Meijer, R. van der Leeden, "Delete-m Jackknife for
       Unequal m", Statistics and Computing 9, 1999.
    .. [2] W. G. Cochran, "Sampling Techniques", 3rd ed., Wiley, 1977 (finite-population
       correction).
    """
    counts = np.asarray(counts, dtype=np.float64)
    G = counts.shape[0]
    tr = tr_m2 / (n - 1)
    g2 = float(np.dot(mean, mean)) - _fpc_coef(n, N) * tr
    theta = np.array([g2, tr, _ratio(tr, g2)])
    n_r = n - counts
    w = (counts / n_r)[:, None]
    d = np.subtract(mean, means)  # (G, P): d_j = mean - mean_j
    dd = np.einsum("ij,ij->i", d, d)
    d *= w
    d += mean  # now the leave-one-out means
    m2_r = np.maximum(tr_m2 - np.asarray(tr_m2s, dtype=np.float64) - n * counts / n_r * dd, 0.0)
    tr_r = m2_r / (n_r - 1.0)
    g2_r = np.einsum("ij,ij->i", d, d) - (N - n_r) / (n_r * N) * tr_r
    with np.errstate(divide="ignore", invalid="ignore"):
        b_r = np.where(g2_r > 0, tr_r / g2_r, np.where(tr_r > 0, math.inf, math.nan))
    reps = np.stack([g2_r, tr_r, b_r], axis=1)
    h = n / counts
    fpc = 1.0 - n / N
    se = []
    for q in range(3):
        if not np.isfinite(theta[q]):
            se.append(math.nan)
            continue
        if not np.isfinite(reps[:, q]).all():
            se.append(math.inf)
            continue
        tau = h * theta[q] - (h - 1.0) * reps[:, q]
        theta_j = G * theta[q] - float(np.sum((1.0 - counts / n) * reps[:, q]))
        v = float(np.mean((tau - theta_j) ** 2 / (h - 1.0)))
        se.append(math.sqrt(v * fpc))
    return tuple(se)


def sample_moments(
    n: int, acc: MomentAccumulator, population: Any, fold: Callable[[np.ndarray, MomentAccumulator], Any]
) -> GradMoments:
    """The :class:`GradMoments` of *n* rows drawn without replacement from ``population``.

    ``fold(idx, a)`` must add the per-example gradients of rows ``idx`` (sorted int64
    indices into the *n*) to accumulator ``a``; ``acc`` is a fresh accumulator (it fixes P
    and the output dtype). With ``population == n`` the rows are folded in order, once, and
    the result is that of ``population=None`` with the field set. Otherwise each jackknife
    group (:func:`jackknife_groups`) is folded into a scratch accumulator, summarised by its
    count, mean and trace of :math:`M_2`, and merged into ``acc`` by Chan's rule; memory is
    O(G * P) floats for the group means.
    """
    N = check_population(population, n)
    if N is None:
        raise TypeError("population: expected an integer, got None")
    if N == n:
        fold(np.arange(n, dtype=np.int64), acc)
        return acc._finalize(population=N)
    P = acc.P
    groups = jackknife_groups(n, P)
    if not groups:  # n < 4: no jackknife
        fold(np.arange(n, dtype=np.int64), acc)
        return acc._finalize(population=N, grad_norm_sq_se=math.nan, trace_cov_se=math.nan, noise_scale_se=math.nan)
    counts = np.empty(len(groups), dtype=np.int64)
    means = np.empty((len(groups), P), dtype=np.float64)
    tr_m2s = np.empty(len(groups), dtype=np.float64)
    part = MomentAccumulator(P)
    for j, idx in enumerate(groups):
        # a writable copy: the cached groups are read-only, and a read-only index array is
        # another type to Numba (each kernel would be compiled a second time for it)
        fold(idx.copy(), part.reset())
        counts[j] = part._n
        means[j] = part._mean
        tr_m2s[j] = float(np.sum(part._m2))
        acc.merge(part)
    se = jackknife_se(N, n, acc._mean, float(np.sum(acc._m2)), counts, means, tr_m2s)
    return acc._finalize(population=N, grad_norm_sq_se=se[0], trace_cov_se=se[1], noise_scale_se=se[2])
