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

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._checks import check_int, got, safe_ratio

__all__ = ["GradMoments", "MomentAccumulator"]


@dataclass(frozen=True, eq=False, repr=False)
class GradMoments:
    """Mean and variance of per-example gradients over *n* examples.

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

    Attributes
    ----------
    n_params : int
        P.
    trace_cov : float
        :math:`\\mathrm{tr}(\\hat\\Sigma)` = ``var.sum()``.
    grad_norm_sq : float
        :math:`|\\bar g|^2` = ``(mean ** 2).sum()``.
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

    Equality (``==``) is identity; compare fields with :func:`numpy.array_equal` instead.

    References
    ----------
    .. [1] S. McCandlish, J. Kaplan, D. Amodei et al., "An Empirical Model of Large-Batch
       Training", arXiv:1812.06162, 2018.
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

    def __post_init__(self) -> None:
        n = check_int("n", self.n, low=2)
        mean = np.array(self.mean, copy=True)
        var = np.array(self.var, copy=True)
        for name, a in (("mean", mean), ("var", var)):
            if a.ndim != 1 or not (np.issubdtype(a.dtype, np.floating)
                                   or np.issubdtype(a.dtype, np.integer)) or a.dtype == bool:
                raise ValueError(f"{name}: expected a 1-D real array of shape (P,), "
                                 f"got {got(self.mean if name == 'mean' else self.var)}")
        if mean.shape != var.shape:
            raise ValueError(f"var: expected shape {mean.shape} (the shape of mean), "
                             f"got shape {var.shape}")
        if not np.issubdtype(mean.dtype, np.floating):
            mean = mean.astype(np.float64)
        if not np.issubdtype(var.dtype, np.floating):
            var = var.astype(np.float64)
        if not np.isfinite(mean).all():
            raise ValueError(f"mean: expected finite values, got "
                             f"{int(np.count_nonzero(~np.isfinite(mean)))} NaN/inf entries")
        if not np.isfinite(var).all() or (var < 0).any():
            bad = int(np.count_nonzero(~(np.isfinite(var) & (var >= 0))))
            raise ValueError(f"var: expected finite non-negative values, got {bad} "
                             f"negative/NaN/inf entries")
        mean.setflags(write=False)
        var.setflags(write=False)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "var", var)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_grads(cls, G: Any, *, dtype: Any = np.float64) -> "GradMoments":
        """Moments of an explicit (n, P) matrix of per-example gradients (row i = :math:`g_i`).

        Equivalent to ``MomentAccumulator(P, dtype).update(G).finalize()``.
        """
        G = np.asarray(G)
        if G.ndim != 2:
            raise ValueError(f"G: expected a 2-D array of per-example gradients (n, P), "
                             f"got {got(G)}")
        return MomentAccumulator(G.shape[1], dtype=dtype).update(G).finalize()

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
    def grad_norm_sq(self) -> float:
        """:math:`|\\bar g|^2 = \\sum_j \\bar g_j^2`, the squared norm of the mean gradient."""
        m = self.mean.astype(np.float64, copy=False)
        return float(np.dot(m, m))

    @property
    def noise_scale(self) -> float:
        """The simple gradient noise scale :math:`B_\\mathrm{simple} = \\mathrm{tr}(\\hat\\Sigma)
        / |\\bar g|^2`, in examples (McCandlish et al. 2018).

        Roughly the batch size at which the gradient noise of a batch mean,
        :math:`\\mathrm{tr}(\\Sigma)/B`, equals the squared signal :math:`|G|^2`.
        ``inf`` when :math:`|\\bar g|^2 = 0 < \\mathrm{tr}(\\hat\\Sigma)`; ``nan`` when both are 0
        (every per-example gradient is zero).

        Note that :math:`|\\bar g|^2` of a finite sample overestimates :math:`|G|^2` by
        :math:`\\mathrm{tr}(\\Sigma)/n` in expectation; over a whole dataset (where
        :math:`\\bar g` *is* the full-data gradient) there is nothing to correct.
        """
        return float(safe_ratio(self.trace_cov, self.grad_norm_sq))

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
        g2 = self.grad_norm_sq
        num = (n - 1.0) * self.trace_cov + n * g2
        return float(safe_ratio(num, n * n * g2))

    def to_dict(self) -> dict:
        """The scalar statistics as a plain ``dict`` (``int``/``float`` values): ``n``,
        ``n_params``, ``trace_cov``, ``grad_norm_sq``, ``noise_scale``, ``mean_gsnr`` and
        ``diversity``."""
        return {
            "n": self.n,
            "n_params": self.n_params,
            "trace_cov": self.trace_cov,
            "grad_norm_sq": self.grad_norm_sq,
            "noise_scale": self.noise_scale,
            "mean_gsnr": self.mean_gsnr,
            "diversity": self.diversity,
        }

    def __repr__(self) -> str:
        return (f"GradMoments(n={self.n}, n_params={self.n_params}, "
                f"trace_cov={self.trace_cov:.6g}, grad_norm_sq={self.grad_norm_sq:.6g}, "
                f"noise_scale={self.noise_scale:.6g})")


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
        try:
            dt = np.dtype(dtype)
        except TypeError:
            dt = None
        if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"dtype: expected float32 or float64, got {got(dtype)}")
        self._dtype = dt
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

    def copy(self) -> "MomentAccumulator":
        """An independent copy of this accumulator."""
        other = MomentAccumulator(self._P, self._dtype)
        other._n = self._n
        other._mean[:] = self._mean
        other._m2[:] = self._m2
        return other

    def reset(self) -> "MomentAccumulator":
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

    def update(self, G: Any) -> "MomentAccumulator":
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
        if G.ndim != 2 or G.shape[1] != self._P or G.dtype == bool or not (
                np.issubdtype(G.dtype, np.floating) or np.issubdtype(G.dtype, np.integer)):
            raise ValueError(f"G: expected a real array of shape (k, {self._P}) "
                             f"(or ({self._P},)), got {got(G)}")
        k = G.shape[0]
        if k == 0:
            return self
        # one float64 working copy of the chunk; corrected two-pass mean and M2
        d = np.array(G, dtype=np.float64, order="C", copy=True)
        if not np.isfinite(d).all():
            raise ValueError(f"G: expected finite values, got "
                             f"{int(np.count_nonzero(~np.isfinite(d)))} NaN/inf entries")
        mean_b = d.mean(axis=0)
        d -= mean_b
        s = d.sum(axis=0)                        # ~0; corrects the rounding of mean_b
        m2_b = np.einsum("ij,ij->j", d, d)
        m2_b -= s * s / k
        np.maximum(m2_b, 0.0, out=m2_b)
        mean_b += s / k
        self._combine(k, mean_b, m2_b)
        return self

    def update_sums(self, k: int, chunk_mean: Any, chunk_m2: Any) -> "MomentAccumulator":
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
            raise ValueError("chunk_mean: expected finite values, got "
                             f"{int(np.count_nonzero(~np.isfinite(mean_b)))} NaN/inf entries")
        if not (np.isfinite(m2_b) & (m2_b >= 0)).all():
            bad = m2_b[~(np.isfinite(m2_b) & (m2_b >= 0))]
            raise ValueError(f"chunk_m2: expected finite non-negative values, got "
                             f"{bad.size} bad entries (first {float(bad[0])!r})")
        self._combine(k, mean_b, m2_b)
        return self

    def _fold(self, k: int, fold) -> "MomentAccumulator":
        """Add k examples through ``fold(n_old, mean, m2)``, which updates the float64 state
        arrays in place by Chan's rule (used by compiled backends that never materialise
        the per-example gradients, see ``minigd.grad_moments``)."""
        if k:
            fold(self._n, self._mean, self._m2)
            self._n += int(k)
        return self

    def merge(self, other: "MomentAccumulator") -> "MomentAccumulator":
        """Fold in another accumulator's state (from disjoint data), in place.

        ``other`` is left unchanged. Returns ``self``.
        """
        if not isinstance(other, MomentAccumulator):
            raise ValueError(f"other: expected a MomentAccumulator, got {got(other)}")
        if other._P != self._P:
            raise ValueError(f"other: expected an accumulator with P={self._P}, "
                             f"got P={other._P}")
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
        if self._n < 2:
            raise ValueError(f"n: expected at least 2 accumulated examples for the ddof=1 "
                             f"variance, got n={self._n}")
        var = self._m2 / (self._n - 1)
        return GradMoments(n=self._n, mean=self._mean.astype(self._dtype),
                           var=var.astype(self._dtype))

    def __repr__(self) -> str:
        return f"MomentAccumulator(P={self._P}, dtype={self._dtype.name}, n={self._n})"
