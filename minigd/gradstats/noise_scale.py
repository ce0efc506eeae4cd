"""Gradient noise scale: its unbiased estimators (two batches, or one batch's per-example
norms), the streaming :class:`TwoBatchNoiseScale`, and the predicted variance of a
mini-batch gradient. The formulas built on the noise scale live in :mod:`.batch_rules`
(norm test, AdaScale gain, Pollux efficiency and goodput) and :mod:`.tradeoff` (steps and
examples to a target, the fit of the tradeoff curve).

Conventions: the batch gradient is the mean of per-example gradients; :math:`G` is the true
(full-data) gradient, :math:`\\Sigma` the covariance of a single per-example gradient, and for
a batch of :math:`B` i.i.d. examples

.. math:: E\\,|G_B|^2 = |G|^2 + \\mathrm{tr}(\\Sigma)/B.

Batches drawn without replacement from N examples (``population=N`` where offered) have
:math:`E|G_B|^2 = |G|^2 + (1/B - 1/N)\\,\\mathrm{tr}(\\Sigma)`, :math:`\\Sigma` with ``ddof=1``
over the N.

Everything here is pure numpy. Functions taking numbers broadcast over arrays and return a
Python ``float`` when every input is a scalar, else an ``ndarray``. Bad arguments raise
:class:`TypeError` (a wrong type) or :class:`ValueError` (a wrong value) naming the
argument, what was expected and what was got (minigd's parameter table,
:mod:`minigd._constraints`).

References
----------
.. [McC18] S. McCandlish, J. Kaplan, D. Amodei and the OpenAI Dota team, "An Empirical Model
   of Large-Batch Training", arXiv:1812.06162, 2018.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._checks import as_result, check_array, check_int, check_int_or_none, check_param, check_scalar, got

__all__ = ["TwoBatchNoiseScale", "two_batch_estimates", "per_example_estimates", "minibatch_variance_prediction"]


# ====================================================================== two-batch estimator
def two_batch_estimates(sq_norm_small: Any, sq_norm_big: Any, b_small: Any, b_big: Any, *, population: Any = None):
    """Unbiased estimates of :math:`|G|^2` and :math:`\\mathrm{tr}(\\Sigma)` from two batch
    gradients taken at the same parameters (McCandlish et al. 2018, App. A.1).

    .. math::
        |\\mathcal G|^2 = \\frac{B_\\mathrm{big}|G_\\mathrm{big}|^2
                          - B_\\mathrm{small}|G_\\mathrm{small}|^2}
                          {B_\\mathrm{big} - B_\\mathrm{small}}
                          \\;\\Big[+ \\frac{\\mathcal S}{N}\\Big], \\qquad
        \\mathcal S = \\frac{|G_\\mathrm{small}|^2 - |G_\\mathrm{big}|^2}
                          {1/B_\\mathrm{small} - 1/B_\\mathrm{big}}.

    Each is unbiased given :math:`E|G_B|^2 = |G|^2 + \\mathrm{tr}(\\Sigma)/B` (batches of
    i.i.d. examples, e.g. drawn with replacement); either can be negative on a single draw.
    With ``population=N`` each batch is drawn uniformly without replacement from N
    examples, :math:`E|G_B|^2 = |G|^2 + (1/B - 1/N)\\,\\mathrm{tr}(\\Sigma)` with
    :math:`\\Sigma` the ``ddof=1`` covariance over the N, and the bracketed term
    :math:`+\\mathcal S/N` keeps :math:`|\\mathcal G|^2` unbiased (:math:`\\mathcal S` is
    unchanged). Their ratio is **not** an unbiased estimate of :math:`B_\\mathrm{simple}`;
    average numerator and denominator separately first (:class:`TwoBatchNoiseScale`).

    Parameters
    ----------
    sq_norm_small, sq_norm_big : float or array_like
        :math:`|G_\\mathrm{small}|^2` and :math:`|G_\\mathrm{big}|^2`, squared Euclidean norms of
        mean-loss batch gradients over ``b_small`` and ``b_big`` examples; finite, >= 0.
    b_small, b_big : float or array_like
        The batch sizes, ``0 < b_small < b_big`` (examples). With ``b_small = 1`` and
        ``sq_norm_small`` the mean of per-example squared norms this is
        :func:`per_example_estimates`.
    population : float or array_like or None, default None
        N, the number of examples both batches are drawn from without replacement
        (``N >= b_big``; broadcast with the other arguments). None: i.i.d. batches (or an
        infinite population).

    Returns
    -------
    grad_norm_sq, trace_cov : float or ndarray
        Estimates of :math:`|G|^2` and :math:`\\mathrm{tr}(\\Sigma)` (squared gradient units).

    References
    ----------
    .. [1] S. McCandlish, J. Kaplan, D. Amodei et al., "An Empirical Model of Large-Batch
       Training", arXiv:1812.06162, 2018, Appendix A.1.
    """
    s = check_array("sq_norm_small", sq_norm_small, low=0.0)
    b = check_array("sq_norm_big", sq_norm_big, low=0.0)
    bs = check_array("b_small", b_small, low=0.0, low_open=True)
    bb = check_array("b_big", b_big, low=0.0, low_open=True)
    if np.any(bs >= bb):
        raise ValueError(f"b_big: expected a batch size > b_small, got b_small={b_small!r}, b_big={b_big!r}")
    if population is not None:
        N = check_array("population", population, low=0.0, low_open=True)
        if np.any(N < bb):
            raise ValueError(
                f"population: expected a number of examples >= b_big, got population={population!r}, b_big={b_big!r}"
            )
    g2 = (bb * b - bs * s) / (bb - bs)
    tr = (s - b) / (1.0 / bs - 1.0 / bb)
    if population is not None:
        g2 = g2 + tr / N
    return as_result(g2), as_result(tr)


def per_example_estimates(sq_norms: Any, sq_norm_mean: Any):
    """Unbiased :math:`|G|^2` and :math:`\\mathrm{tr}(\\Sigma)` from one batch's per-example
    gradient norms and its mean gradient's norm (the two-batch estimator with
    :math:`B_\\mathrm{small} = 1`, McCandlish et al. 2018, App. A.1).

    .. math::
        \\mathcal S = \\frac{\\sum_i |g_i|^2 - B|\\bar g|^2}{B - 1}, \\qquad
        |\\mathcal G|^2 = |\\bar g|^2 - \\mathcal S / B.

    Parameters
    ----------
    sq_norms : array_like of shape (B,)
        :math:`|g_i|^2`, squared norms of the B >= 2 per-example gradients (e.g. the squares of
        ``minigd.per_example_grad_norms``), finite, >= 0.
    sq_norm_mean : float
        :math:`|\\bar g|^2`, the squared norm of their mean (the batch gradient).

    Returns
    -------
    grad_norm_sq, trace_cov : float
    """
    q = check_array("sq_norms", sq_norms, low=0.0)
    if q.ndim != 1 or q.shape[0] < 2:
        raise ValueError(f"sq_norms: expected a 1-D array of at least 2 per-example squared norms, got {got(sq_norms)}")
    g = check_scalar("sq_norm_mean", sq_norm_mean, low=0.0)
    B = q.shape[0]
    tr = (float(np.sum(q)) - B * g) / (B - 1)
    return g - tr / B, tr


class TwoBatchNoiseScale:
    """Streaming two-batch estimate of the gradient noise scale
    :math:`B_\\mathrm{simple} = \\mathrm{tr}(\\Sigma)/|G|^2` (McCandlish et al. 2018, App. A.1).

    Each :meth:`update` turns the squared norms of a small-batch and a big-batch gradient,
    taken at the same parameters, into unbiased estimates of :math:`|G|^2` and
    :math:`\\mathrm{tr}(\\Sigma)` (:func:`two_batch_estimates`). The two are smoothed by
    **separate** exponential moving averages with Adam-style bias correction, and the noise
    scale is the ratio of the smoothed values. (A moving average of per-update ratios would
    be badly biased: the ratio of noisy, possibly negative estimates has heavy tails.)

    Parameters
    ----------
    b_small, b_big : int
        Batch sizes of the two gradients (examples), ``1 <= b_small < b_big``. A common
        choice: ``b_small`` = per-device batch, ``b_big`` = the all-reduced batch.
    beta : float, default 0.99
        EMA decay, ``0 <= beta < 1``; ``beta = 0`` keeps only the latest estimate.
        The effective window is about ``1 / (1 - beta)`` updates.
    population : int or None, default None
        N, the number of examples each batch is drawn from uniformly without replacement
        (e.g. the training set, for a shuffling sampler), ``N >= b_big``; the estimates then
        use :math:`E|G_B|^2 = |G|^2 + (1/B - 1/N)\\,\\mathrm{tr}(\\Sigma)`, so the
        :math:`|G|^2` estimate gains :math:`+\\mathrm{tr}(\\Sigma)/N` (see
        :func:`two_batch_estimates`) and both stay unbiased for the N examples' full-data
        :math:`|G|^2` and ``ddof=1`` :math:`\\mathrm{tr}(\\Sigma)`. None: i.i.d. batches.

    Attributes
    ----------
    grad_norm_sq : float
        Smoothed, bias-corrected :math:`|G|^2`.
    trace_cov : float
        Smoothed, bias-corrected :math:`\\mathrm{tr}(\\Sigma)`.
    noise_scale : float
        ``trace_cov / grad_norm_sq`` (examples).
    n_updates : int
        Updates since construction or :meth:`reset`.
    last_estimate : tuple of float
        The unsmoothed ``(grad_norm_sq, trace_cov)`` of the latest update.

    Notes
    -----
    After :math:`t` updates with raw estimates :math:`x_1, \\dots, x_t`, the smoothed value is

    .. math:: \\hat x_t = \\frac{m_t}{1 - \\beta^t}, \\qquad
              m_t = \\beta m_{t-1} + (1 - \\beta) x_t,\\ m_0 = 0,

    a weighted mean of the :math:`x_s` with weights summing to 1, hence unbiased for
    :math:`|G|^2` and :math:`\\mathrm{tr}(\\Sigma)` when these are constant. The properties are
    ``nan`` before the first update. :attr:`noise_scale` can be negative or ``inf`` early on,
    while the smoothed :math:`|G|^2` or :math:`\\mathrm{tr}(\\Sigma)` is still dominated by
    noise; nothing is clipped (clipping would bias the estimates).

    References
    ----------
    .. [1] S. McCandlish, J. Kaplan, D. Amodei et al., "An Empirical Model of Large-Batch
       Training", arXiv:1812.06162, 2018, Appendix A.1.
    .. [2] D. P. Kingma, J. Ba, "Adam: A Method for Stochastic Optimization",
       arXiv:1412.6980, 2014 (bias correction).

    Examples
    --------
    >>> import numpy as np
    >>> from minigd.gradstats import TwoBatchNoiseScale
    >>> rng = np.random.default_rng(0)
    >>> G, sigma2 = np.full(10, 0.1), np.full(10, 1.0)     # |G|^2 = 0.1, tr(Sigma) = 10
    >>> est = TwoBatchNoiseScale(b_small=8, b_big=128, beta=0.999)
    >>> for _ in range(3000):
    ...     g_s = G + rng.normal(size=10) * np.sqrt(sigma2 / 8)
    ...     g_b = G + rng.normal(size=10) * np.sqrt(sigma2 / 128)
    ...     _ = est.update(g_s @ g_s, g_b @ g_b)
    >>> round(est.noise_scale, -1)     # true B_simple = 10 / 0.1 = 100
    100.0
    """

    def __init__(self, b_small: int, b_big: int, beta: float = 0.99, *, population: int | None = None) -> None:
        self._b_small = check_int("b_small", b_small, low=1)
        self._b_big = check_int("b_big", b_big, low=1)
        if self._b_big <= self._b_small:
            raise ValueError(f"b_big: expected an integer > b_small={self._b_small}, got {self._b_big}")
        self._beta = check_scalar("beta", beta, low=0.0, high=1.0, high_open=True)
        self._population = check_int_or_none(
            "population", population, low=self._b_big, expected=f"None or an integer >= b_big={self._b_big}"
        )
        self.reset()

    # ------------------------------------------------------------------ configuration
    @property
    def b_small(self) -> int:
        """The small batch size (examples)."""
        return self._b_small

    @property
    def b_big(self) -> int:
        """The big batch size (examples)."""
        return self._b_big

    @property
    def beta(self) -> float:
        """The EMA decay."""
        return self._beta

    @property
    def population(self) -> int | None:
        """N, the number of examples the batches are drawn from without replacement, or
        None (i.i.d. batches)."""
        return self._population

    # ------------------------------------------------------------------ state
    def reset(self) -> TwoBatchNoiseScale:
        """Forget all updates; returns ``self``."""
        self._t = 0
        self._ema_g2 = 0.0
        self._ema_tr = 0.0
        self._last = (math.nan, math.nan)
        return self

    @property
    def n_updates(self) -> int:
        """Number of updates since construction or :meth:`reset`."""
        return self._t

    def _correction(self) -> float:
        if self._t == 0:
            return math.nan
        if self._beta == 0.0:
            return 1.0
        return -math.expm1(self._t * math.log(self._beta))  # 1 - beta**t, accurately

    @property
    def grad_norm_sq(self) -> float:
        """Smoothed, bias-corrected estimate of :math:`|G|^2` (squared gradient units)."""
        return self._ema_g2 / self._correction() if self._t else math.nan

    @property
    def trace_cov(self) -> float:
        """Smoothed, bias-corrected estimate of :math:`\\mathrm{tr}(\\Sigma)`, the total
        variance of one per-example gradient (squared gradient units)."""
        return self._ema_tr / self._correction() if self._t else math.nan

    @property
    def noise_scale(self) -> float:
        """:attr:`trace_cov` / :attr:`grad_norm_sq` (examples): the ratio of the smoothed
        estimates. ``inf`` when the smoothed :math:`|G|^2 \\le 0 <` smoothed trace, ``nan``
        when both are :math:`\\le 0` or before the first update."""
        if self._t == 0:
            return math.nan
        g2, tr = self.grad_norm_sq, self.trace_cov
        if g2 > 0:
            return tr / g2
        return math.inf if tr > 0 else math.nan

    @property
    def last_estimate(self) -> tuple:
        """The unsmoothed ``(grad_norm_sq, trace_cov)`` of the latest update (``nan`` before
        the first)."""
        return self._last

    # ------------------------------------------------------------------ updates
    def estimate(self, sq_norm_small: float, sq_norm_big: float) -> tuple:
        """The unsmoothed, unbiased ``(grad_norm_sq, trace_cov)`` for one pair of squared
        norms at this estimator's batch sizes (:func:`two_batch_estimates`); changes no
        state."""
        s = check_scalar("sq_norm_small", sq_norm_small, low=0.0)
        b = check_scalar("sq_norm_big", sq_norm_big, low=0.0)
        bs, bb = float(self._b_small), float(self._b_big)
        g2 = (bb * b - bs * s) / (bb - bs)
        tr = (s - b) / (1.0 / bs - 1.0 / bb)
        if self._population is not None:
            g2 += tr / self._population
        return g2, tr

    def update(self, sq_norm_small: float, sq_norm_big: float) -> TwoBatchNoiseScale:
        """Add one measurement.

        Parameters
        ----------
        sq_norm_small : float
            :math:`|G_\\mathrm{small}|^2`, squared norm of the mean-loss gradient over
            ``b_small`` examples; finite, >= 0.
        sq_norm_big : float
            :math:`|G_\\mathrm{big}|^2`, over ``b_big`` examples, at the same parameters.

        Returns
        -------
        self : TwoBatchNoiseScale
        """
        g2, tr = self.estimate(sq_norm_small, sq_norm_big)
        beta = self._beta
        self._ema_g2 = beta * self._ema_g2 + (1.0 - beta) * g2
        self._ema_tr = beta * self._ema_tr + (1.0 - beta) * tr
        self._t += 1
        self._last = (g2, tr)
        return self

    def to_dict(self) -> dict:
        """``b_small``, ``b_big``, ``beta``, ``population`` (None or N), ``n_updates``,
        ``grad_norm_sq``, ``trace_cov``, ``noise_scale`` as a plain ``dict``."""
        return {
            "b_small": self._b_small,
            "b_big": self._b_big,
            "beta": self._beta,
            "population": self._population,
            "n_updates": self._t,
            "grad_norm_sq": self.grad_norm_sq,
            "trace_cov": self.trace_cov,
            "noise_scale": self.noise_scale,
        }

    def __repr__(self) -> str:
        pop = "" if self._population is None else f"population={self._population}, "
        return (
            f"TwoBatchNoiseScale(b_small={self._b_small}, b_big={self._b_big}, "
            f"beta={self._beta}, {pop}n_updates={self._t}, "
            f"noise_scale={self.noise_scale:.6g})"
        )


# ====================================================================== mini-batch variance
def minibatch_variance_prediction(
    trace_cov: Any, batch_size: Any, n: int | None = None, replacement: bool = False, *, ddof: int = 0
):
    """Predicted total variance :math:`E|\\bar g_B - G|^2` of a mini-batch mean gradient.

    .. math::
        \\text{with replacement (or } N = \\infty\\text{):}\\quad \\frac{\\mathrm{tr}(\\Sigma)}{B},
        \\qquad
        \\text{without replacement:}\\quad \\frac{\\mathrm{tr}(\\Sigma)}{B}\\,\\frac{N - B}{N - 1},

    where :math:`\\Sigma` is the covariance of one example drawn uniformly from the N
    examples, i.e. the **population** (``ddof=0``) covariance. Without replacement the
    variance is exactly 0 at :math:`B = N` (full-batch gradient descent has no gradient noise).

    Parameters
    ----------
    trace_cov : float or array_like
        :math:`\\mathrm{tr}(\\Sigma)`, >= 0, with the normalisation given by ``ddof``.
    batch_size : float or array_like
        B (examples), >= 1; ``<= n`` when sampling without replacement.
    n : int or None, default None
        N, the number of examples sampled from. ``None`` means an infinite population, where
        both schemes give :math:`\\mathrm{tr}(\\Sigma)/B`.
    replacement : bool, default False
        Whether the batch is drawn with replacement.
    ddof : {0, 1}, keyword-only, default 0
        The normalisation of ``trace_cov`` over the N examples. Pass ``ddof=1`` with
        ``trace_cov=m.trace_cov`` of :class:`GradMoments` ``m`` computed over the whole
        dataset (``n=m.n``); it is converted by the factor :math:`(N-1)/N`. Ignored when
        ``n`` is None.

    Returns
    -------
    float or ndarray
        Squared gradient units.
    """
    tr = check_array("trace_cov", trace_cov, low=0.0)
    B = check_array("batch_size", batch_size, low=1.0)
    replacement = check_param("replacement", replacement)
    ddof = check_param("ddof", ddof)
    if n is None:
        return as_result(tr / B)
    N = check_int("n", n, low=1)
    if ddof == 1:
        if N < 2:
            raise ValueError(f"n: expected n >= 2 for a ddof=1 trace_cov, got {N}")
        tr = tr * ((N - 1) / N)
    if replacement:
        return as_result(tr / B)
    if np.any(B > N):
        raise ValueError(
            f"batch_size: expected at most n={N} when sampling without replacement, got {float(np.max(B))!r}"
        )
    fpc = (N - B) / (N - 1) if N > 1 else np.zeros_like(B)
    return as_result(tr / B * fpc)
