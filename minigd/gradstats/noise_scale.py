"""Gradient noise scale, its two-batch estimator, and the batch-size formulas built on it.

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
.. [Byr12] R. H. Byrd, G. M. Chin, J. Nocedal, Y. Wu, "Sample size selection in optimization
   methods for machine learning", Math. Programming 134, 2012.
.. [Joh20] T. B. Johnson, P. Agrawal, H. Gu, C. Guestrin, "AdaScale SGD: A User-Friendly
   Algorithm for Distributed Training", ICML 2020, arXiv:2007.05105.
.. [Qia21] A. Qiao, S. K. Choe, S. J. Subramanya et al., "Pollux: Co-adaptive Cluster
   Scheduling for Goodput-Optimized Deep Learning", OSDI 2021, arXiv:2008.12260.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._checks import (as_result, check_array, check_int, check_int_or_none, check_param, check_scalar, got,
                      safe_ratio)

__all__ = [
    "TwoBatchNoiseScale",
    "two_batch_estimates",
    "per_example_estimates",
    "norm_test",
    "adascale_gain",
    "statistical_efficiency",
    "goodput",
    "predicted_steps",
    "predicted_examples",
    "minibatch_variance_prediction",
    "TradeoffFit",
    "fit_tradeoff",
]


# ====================================================================== two-batch estimator
def two_batch_estimates(sq_norm_small: Any, sq_norm_big: Any, b_small: Any, b_big: Any, *,
                        population: Any = None):
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
        raise ValueError(f"b_big: expected a batch size > b_small, got b_small={b_small!r}, "
                         f"b_big={b_big!r}")
    if population is not None:
        N = check_array("population", population, low=0.0, low_open=True)
        if np.any(N < bb):
            raise ValueError(f"population: expected a number of examples >= b_big, got "
                             f"population={population!r}, b_big={b_big!r}")
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
        raise ValueError(f"sq_norms: expected a 1-D array of at least 2 per-example squared "
                         f"norms, got {got(sq_norms)}")
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

    def __init__(self, b_small: int, b_big: int, beta: float = 0.99, *,
                 population: int | None = None) -> None:
        self._b_small = check_int("b_small", b_small, low=1)
        self._b_big = check_int("b_big", b_big, low=1)
        if self._b_big <= self._b_small:
            raise ValueError(f"b_big: expected an integer > b_small={self._b_small}, "
                             f"got {self._b_big}")
        self._beta = check_scalar("beta", beta, low=0.0, high=1.0, high_open=True)
        self._population = check_int_or_none("population", population, low=self._b_big,
                                              expected=f"None or an integer >= b_big={self._b_big}")
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
    def reset(self) -> "TwoBatchNoiseScale":
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
        return -math.expm1(self._t * math.log(self._beta))      # 1 - beta**t, accurately

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

    def update(self, sq_norm_small: float, sq_norm_big: float) -> "TwoBatchNoiseScale":
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
        return {"b_small": self._b_small, "b_big": self._b_big, "beta": self._beta,
                "population": self._population,
                "n_updates": self._t, "grad_norm_sq": self.grad_norm_sq,
                "trace_cov": self.trace_cov, "noise_scale": self.noise_scale}

    def __repr__(self) -> str:
        pop = "" if self._population is None else f"population={self._population}, "
        return (f"TwoBatchNoiseScale(b_small={self._b_small}, b_big={self._b_big}, "
                f"beta={self._beta}, {pop}n_updates={self._t}, "
                f"noise_scale={self.noise_scale:.6g})")


# ====================================================================== derived quantities
def norm_test(trace_cov: Any, grad_norm_sq: Any, batch_size: Any):
    """The norm test statistic :math:`\\theta^2 = \\mathrm{tr}(\\Sigma) / (B\\,|G|^2)` of
    Byrd et al. (2012) — the noise-to-signal ratio of a batch-B gradient, equal to
    :math:`B_\\mathrm{simple}/B`.

    Byrd et al. grow the batch when :math:`\\theta^2` exceeds a threshold :math:`\\theta_0^2`
    (their test: :math:`\\mathrm{tr}(\\hat\\Sigma)/B \\le \\theta_0^2 |\\bar g|^2`).

    Parameters
    ----------
    trace_cov : float or array_like
        :math:`\\mathrm{tr}(\\Sigma)` of one per-example gradient, >= 0.
    grad_norm_sq : float or array_like
        :math:`|G|^2`, >= 0.
    batch_size : float or array_like
        B (examples), > 0.

    Returns
    -------
    float or ndarray
        Dimensionless; ``inf`` when :math:`|G|^2 = 0 <` trace, ``nan`` when both are 0.
    """
    tr = check_array("trace_cov", trace_cov, low=0.0)
    g2 = check_array("grad_norm_sq", grad_norm_sq, low=0.0)
    B = check_array("batch_size", batch_size, low=0.0, low_open=True)
    return as_result(safe_ratio(tr, B * g2))


def adascale_gain(var_base: Any, grad_norm_sq: Any, scale: Any):
    """AdaScale gain ratio :math:`r = (\\sigma^2 + \\mu^2)/(\\sigma^2/S + \\mu^2)`
    (Johnson et al. 2020).

    The expected progress of one step with an S-times larger batch, relative to one base
    step; AdaScale multiplies the base learning rate by :math:`r` and advances its schedule
    by :math:`r` per step. :math:`1 \\le r \\le S` for :math:`S \\ge 1`.

    Parameters
    ----------
    var_base : float or array_like
        :math:`\\sigma^2`, the trace of the covariance of the **base-batch** gradient
        (:math:`\\mathrm{tr}(\\Sigma)/B_0` for base batch :math:`B_0`), >= 0.
    grad_norm_sq : float or array_like
        :math:`\\mu^2 = |G|^2`, >= 0.
    scale : float or array_like
        S, the batch-size multiple of the base batch, > 0.

    Returns
    -------
    float or ndarray
        Dimensionless; ``nan`` where :math:`\\sigma^2 = \\mu^2 = 0`.

    Examples
    --------
    >>> from minigd.gradstats import adascale_gain
    >>> adascale_gain(3.0, 1.0, 3)
    2.0
    """
    s2 = check_array("var_base", var_base, low=0.0)
    m2 = check_array("grad_norm_sq", grad_norm_sq, low=0.0)
    S = check_array("scale", scale, low=0.0, low_open=True)
    return as_result(safe_ratio(s2 + m2, s2 / S + m2))


def statistical_efficiency(noise_scale: Any, batch_size: Any, base_batch_size: Any):
    """Pollux statistical efficiency :math:`E(M) = (\\varphi + M_0)/(\\varphi + M)`
    (Qiao et al. 2021).

    The progress per training example at batch size M relative to the base batch
    :math:`M_0`, with :math:`\\varphi = B_\\mathrm{simple}`: 1 at :math:`M = M_0`, close to 1
    for :math:`M \\ll \\varphi`, about :math:`\\varphi/M` for :math:`M \\gg \\varphi`. (Pollux
    uses the noise scale measured at the base batch and a learning rate scaled per AdaScale.)

    Parameters
    ----------
    noise_scale : float or array_like
        :math:`\\varphi`, the gradient noise scale (examples), >= 0; ``inf`` gives 1.
    batch_size : float or array_like
        M (examples), > 0. Vectorised: pass an array to evaluate many batch sizes.
    base_batch_size : float or array_like
        :math:`M_0` (examples), > 0.

    Returns
    -------
    float or ndarray
        Dimensionless efficiency, broadcast over the inputs.
    """
    phi = check_array("noise_scale", noise_scale, low=0.0, allow_inf=True)
    M = check_array("batch_size", batch_size, low=0.0, low_open=True)
    M0 = check_array("base_batch_size", base_batch_size, low=0.0, low_open=True)
    with np.errstate(invalid="ignore"):
        e = (phi + M0) / (phi + M)
    e = np.where(np.isinf(phi), 1.0, e)
    return as_result(e)


def goodput(throughput: Any, noise_scale: Any, batch_size: Any, base_batch_size: Any):
    """Pollux goodput: :math:`\\mathrm{throughput}(M) \\times E(M)` (Qiao et al. 2021).

    Training progress per second measured in base-batch-equivalent examples; the batch size
    maximising it balances hardware throughput against statistical efficiency
    (:func:`statistical_efficiency`).

    Parameters
    ----------
    throughput : float or array_like
        Examples processed per second at batch size M, >= 0 (broadcast with ``batch_size``).
    noise_scale, batch_size, base_batch_size
        As for :func:`statistical_efficiency`.

    Returns
    -------
    float or ndarray
        Examples per second.
    """
    tp = check_array("throughput", throughput, low=0.0)
    eff = np.asarray(statistical_efficiency(noise_scale, batch_size, base_batch_size))
    return as_result(tp * eff)


def predicted_steps(batch_size: Any, s_min: Any, b_noise: Any):
    """Steps to reach a target at batch size B in the model of McCandlish et al. (2018):
    :math:`S(B) = S_\\mathrm{min}(1 + B_\\mathrm{noise}/B)`.

    Parameters
    ----------
    batch_size : float or array_like
        B (examples), > 0.
    s_min : float or array_like
        :math:`S_\\mathrm{min}`, the steps needed with infinitely large batches, > 0.
    b_noise : float or array_like
        :math:`B_\\mathrm{noise}` (examples), >= 0 (``inf`` allowed: infinite steps).

    Returns
    -------
    float or ndarray
        Steps.
    """
    B = check_array("batch_size", batch_size, low=0.0, low_open=True)
    s = check_array("s_min", s_min, low=0.0, low_open=True)
    bn = check_array("b_noise", b_noise, low=0.0, allow_inf=True)
    return as_result(s * (1.0 + bn / B))


def predicted_examples(batch_size: Any, e_min: Any, b_noise: Any):
    """Training examples to reach a target at batch size B in the model of McCandlish et al.
    (2018): :math:`E(B) = E_\\mathrm{min}(1 + B/B_\\mathrm{noise})`.

    Parameters
    ----------
    batch_size : float or array_like
        B (examples), > 0.
    e_min : float or array_like
        :math:`E_\\mathrm{min}`, the examples needed with batch size → 0, > 0.
    b_noise : float or array_like
        :math:`B_\\mathrm{noise}` (examples), > 0 (``inf`` allowed: :math:`E = E_\\mathrm{min}`).

    Returns
    -------
    float or ndarray
        Examples.
    """
    B = check_array("batch_size", batch_size, low=0.0, low_open=True)
    e = check_array("e_min", e_min, low=0.0, low_open=True)
    bn = check_array("b_noise", b_noise, low=0.0, low_open=True, allow_inf=True)
    return as_result(e * (1.0 + B / bn))


def minibatch_variance_prediction(trace_cov: Any, batch_size: Any, n: int | None = None,
                                  replacement: bool = False, *, ddof: int = 0):
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
        raise ValueError(f"batch_size: expected at most n={N} when sampling without "
                         f"replacement, got {float(np.max(B))!r}")
    fpc = (N - B) / (N - 1) if N > 1 else np.zeros_like(B)
    return as_result(tr / B * fpc)


# ====================================================================== steps/examples tradeoff
@dataclass(frozen=True)
class TradeoffFit:
    """The steps/examples tradeoff :math:`(S/S_\\mathrm{min} - 1)(E/E_\\mathrm{min} - 1) = 1`
    fitted to measurements (McCandlish et al. 2018), from :func:`fit_tradeoff`.

    With :math:`E = SB` the curve is :math:`S(B) = S_\\mathrm{min} + E_\\mathrm{min}/B`,
    i.e. :math:`S = S_\\mathrm{min}(1 + B_\\mathrm{crit}/B)` and
    :math:`E = E_\\mathrm{min}(1 + B/B_\\mathrm{crit})`.
    """

    s_min: float
    """Minimum number of optimizer steps to the target (batch size → ∞), steps."""
    e_min: float
    """Minimum number of training examples to the target (batch size → 0), examples."""
    b_crit: float
    """Critical batch size :math:`E_\\mathrm{min}/S_\\mathrm{min}`, examples per step
    (McCandlish et al. predict :math:`B_\\mathrm{crit} \\approx B_\\mathrm{noise}`)."""
    residual: float
    """Root-mean-square of the natural-log residuals :math:`\\ln S_i - \\ln \\hat S(B_i)` over
    the points used (dimensionless; 0.05 ≈ 5 % typical misfit)."""

    def predict_steps(self, batch_size: Any):
        """Fitted steps to target at ``batch_size``: :math:`S_\\mathrm{min} + E_\\mathrm{min}/B`."""
        B = check_array("batch_size", batch_size, low=0.0, low_open=True)
        return as_result(self.s_min + self.e_min / B)

    def predict_examples(self, batch_size: Any):
        """Fitted examples to target at ``batch_size``:
        :math:`S_\\mathrm{min} B + E_\\mathrm{min}`."""
        B = check_array("batch_size", batch_size, low=0.0, low_open=True)
        return as_result(self.s_min * B + self.e_min)


def _log1p_ratio(v: float | np.ndarray, logB: np.ndarray) -> np.ndarray:
    """log(1 + exp(v) / B), stable."""
    return np.logaddexp(0.0, v - logB)


def _profile(v: float, logS: np.ndarray, logB: np.ndarray):
    """Best u = log S_min for fixed v = log b_crit, and the sum of squared residuals."""
    h = _log1p_ratio(v, logB)
    u = float(np.mean(logS - h))
    r = logS - u - h
    return u, float(r @ r)


def _residuals(x: np.ndarray, logS: np.ndarray, logB: np.ndarray) -> np.ndarray:
    return logS - x[0] - _log1p_ratio(x[1], logB)


def _jacobian(x: np.ndarray, logS: np.ndarray, logB: np.ndarray) -> np.ndarray:
    J = np.empty((logS.shape[0], 2))
    J[:, 0] = -1.0
    z = x[1] - logB                           # d/dv log(1 + e^z) = sigmoid(z)
    J[:, 1] = -np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))),
                        np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))
    return J


def _refine_numpy(x0: np.ndarray, logS: np.ndarray, logB: np.ndarray) -> np.ndarray:
    """Levenberg–Marquardt (damped Gauss–Newton) on the 2-parameter log-residuals."""
    x = np.array(x0, dtype=np.float64)
    r = _residuals(x, logS, logB)
    cost = float(r @ r)
    lam = 1e-3
    for _ in range(500):
        J = _jacobian(x, logS, logB)
        A = J.T @ J
        g = J.T @ r
        if np.max(np.abs(g)) <= 1e-15 * max(1.0, cost):
            break
        improved = False
        for _ in range(60):
            step = np.linalg.solve(A + lam * np.diag(np.diag(A) + 1e-300), -g)
            x_new = x + step
            r_new = _residuals(x_new, logS, logB)
            cost_new = float(r_new @ r_new)
            if cost_new <= cost:
                improved = True
                break
            lam *= 10.0
        if not improved:
            break
        done = np.max(np.abs(step)) <= 1e-14 * (1.0 + np.max(np.abs(x)))
        x, r, cost = x_new, r_new, cost_new
        lam = max(lam / 10.0, 1e-12)
        if done:
            break
    return x


def _refine_scipy(x0: np.ndarray, logS: np.ndarray, logB: np.ndarray) -> np.ndarray:
    from scipy.optimize import least_squares

    res = least_squares(_residuals, x0, jac=_jacobian, args=(logS, logB), method="lm",
                        xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=2000)
    return np.asarray(res.x, dtype=np.float64)


def _have_scipy() -> bool:
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        return False
    return True


_GRID_MARGIN = 15.0      # the grid of log b_crit extends e^15 beyond the measured batch sizes
_GRID_POINTS = 1501


def fit_tradeoff(steps: Any, examples: Any, *, method: str = "auto") -> TradeoffFit:
    """Fit :math:`(S/S_\\mathrm{min} - 1)(E/E_\\mathrm{min} - 1) = 1` to measured
    steps-to-target and examples-to-target, one point per batch size
    (McCandlish et al. 2018).

    Each point's batch size is :math:`B_i = E_i/S_i`. With :math:`E = SB` the tradeoff curve
    is :math:`S(B) = S_\\mathrm{min}(1 + B_\\mathrm{crit}/B)`, which is fitted by least squares
    on :math:`\\ln S`:

    .. math::
        \\min_{S_\\mathrm{min},\\,B_\\mathrm{crit} > 0}\\ \\sum_i
        \\bigl[\\ln S_i - \\ln S_\\mathrm{min} - \\ln(1 + B_\\mathrm{crit}/B_i)\\bigr]^2,
        \\qquad E_\\mathrm{min} = S_\\mathrm{min} B_\\mathrm{crit}.

    The search starts from the best point of a grid over :math:`\\ln B_\\mathrm{crit}`
    (spanning :math:`e^{15}` beyond the measured batch sizes, with :math:`\\ln S_\\mathrm{min}`
    profiled out in closed form), then refines both parameters by
    ``scipy.optimize.least_squares`` (Levenberg–Marquardt) or, without scipy, by the same
    damped Gauss–Newton iteration in numpy; the two reach the same optimum. If the grid's
    best point is at its lower (upper) edge, the data cannot resolve :math:`B_\\mathrm{crit}`
    and the limit is returned: ``b_crit = 0``, ``e_min = 0`` (steps do not fall with batch
    size) or ``b_crit = inf``, ``s_min = 0`` (perfect scaling at every measured size).

    Parameters
    ----------
    steps : array_like of shape (k,)
        Steps to reach the target at each batch size, > 0. Points whose steps or examples
        are ``inf`` or ``nan`` (target not reached) are dropped.
    examples : array_like of shape (k,)
        Training examples to reach the target, ``steps * batch_size``, > 0.
    method : {"auto", "scipy", "numpy"}, keyword-only, default "auto"
        The refinement: "auto" uses scipy when it can be imported.

    Returns
    -------
    TradeoffFit

    Raises
    ------
    ValueError
        Fewer than 3 points with finite steps and examples, fewer than 2 distinct batch
        sizes, non-positive values, mismatched shapes, or an unknown ``method``.
    TypeError
        ``steps`` / ``examples`` not real arrays, or ``method`` not a string.

    Examples
    --------
    >>> import numpy as np
    >>> from minigd.gradstats import fit_tradeoff
    >>> B = np.array([8, 32, 128, 512, 2048])
    >>> S = 1000 * (1 + 256 / B)                 # S_min = 1000, B_crit = 256
    >>> fit = fit_tradeoff(S, S * B)
    >>> round(fit.s_min), round(fit.b_crit), round(fit.e_min)
    (1000, 256, 256000)
    """
    method = check_param("method", method, "tradeoff_method")
    S = np.asarray(steps)
    E = np.asarray(examples)
    for name, a, orig in (("steps", S, steps), ("examples", E, examples)):
        if a.dtype == bool or not (np.issubdtype(a.dtype, np.floating)
                                   or np.issubdtype(a.dtype, np.integer)):
            raise TypeError(f"{name}: expected a 1-D real array, got {got(orig)}")
        if a.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D real array, got {got(orig)}")
    if S.shape != E.shape:
        raise ValueError(f"examples: expected shape {S.shape} (the shape of steps), "
                         f"got shape {E.shape}")
    S = S.astype(np.float64)
    E = E.astype(np.float64)
    ok = np.isfinite(S) & np.isfinite(E)
    for name, a in (("steps", S), ("examples", E)):
        if np.any(a[ok] <= 0):
            raise ValueError(f"{name}: expected positive values, got {float(a[ok][a[ok] <= 0][0])!r}")
    S, E = S[ok], E[ok]
    if S.shape[0] < 3:
        raise ValueError(f"steps: expected at least 3 points with finite steps and examples "
                         f"(target reached), got {S.shape[0]}")
    logS = np.log(S)
    logB = np.log(E) - logS
    if np.ptp(logB) <= 1e-12 * max(1.0, float(np.max(np.abs(logB)))):
        raise ValueError(f"examples: expected at least 2 distinct batch sizes examples/steps, "
                         f"got only {float(np.exp(logB[0]))!r}")
    use_scipy = (method == "scipy") or (method == "auto" and _have_scipy())
    if method == "scipy" and not _have_scipy():
        raise ValueError("method: expected 'numpy' or 'auto' (scipy is not importable), "
                         "got 'scipy'")

    # 1) grid over v = log b_crit, u = log s_min profiled out
    grid = np.linspace(logB.min() - _GRID_MARGIN, logB.max() + _GRID_MARGIN, _GRID_POINTS)
    costs = np.array([_profile(v, logS, logB)[1] for v in grid])
    i = int(np.argmin(costs))
    if i == 0:                                  # limit b_crit -> 0: S constant
        u = float(np.mean(logS))
        r = logS - u
        return TradeoffFit(s_min=math.exp(u), e_min=0.0, b_crit=0.0,
                           residual=math.sqrt(float(r @ r) / r.shape[0]))
    if i == grid.shape[0] - 1:                  # limit b_crit -> inf: S = E_min / B
        w = float(np.mean(logS + logB))
        r = logS + logB - w
        return TradeoffFit(s_min=0.0, e_min=math.exp(w), b_crit=math.inf,
                           residual=math.sqrt(float(r @ r) / r.shape[0]))
    x0 = np.array([_profile(grid[i], logS, logB)[0], grid[i]])

    # 2) refine (u, v) jointly
    x = _refine_scipy(x0, logS, logB) if use_scipy else _refine_numpy(x0, logS, logB)
    r = _residuals(x, logS, logB)
    s_min = math.exp(x[0])
    b_crit = math.exp(x[1])
    return TradeoffFit(s_min=s_min, e_min=s_min * b_crit, b_crit=b_crit,
                       residual=math.sqrt(float(r @ r) / r.shape[0]))
