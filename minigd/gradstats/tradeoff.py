"""The steps/examples tradeoff of McCandlish et al. (2018): the steps and examples needed to
reach a target at batch size B, :math:`S(B) = S_\\mathrm{min}(1 + B_\\mathrm{noise}/B)` and
:math:`E(B) = E_\\mathrm{min}(1 + B/B_\\mathrm{noise})`, and the fit of
:math:`(S/S_\\mathrm{min} - 1)(E/E_\\mathrm{min} - 1) = 1` to measured points
(:func:`fit_tradeoff`, giving :math:`S_\\mathrm{min}`, :math:`E_\\mathrm{min}` and the critical
batch size :math:`B_\\mathrm{crit}`).

Pure numpy, with :mod:`.noise_scale`'s conventions: numbers broadcast over arrays (a Python
``float`` when every input is a scalar), and a bad argument raises :class:`TypeError` or
:class:`ValueError` naming it.

References
----------
.. [McC18] S. McCandlish, J. Kaplan, D. Amodei and the OpenAI Dota team, "An Empirical Model
   of Large-Batch Training", arXiv:1812.06162, 2018.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._checks import as_result, check_array, check_param, got

__all__ = ["predicted_steps", "predicted_examples", "TradeoffFit", "fit_tradeoff"]


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


# ====================================================================== fit of the tradeoff curve
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
    z = x[1] - logB  # d/dv log(1 + e^z) = sigmoid(z)
    J[:, 1] = -np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))
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

    res = least_squares(
        _residuals, x0, jac=_jacobian, args=(logS, logB), method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=2000
    )
    return np.asarray(res.x, dtype=np.float64)


def _have_scipy() -> bool:
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        return False
    return True


_GRID_MARGIN = 15.0  # the grid of log b_crit extends e^15 beyond the measured batch sizes
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
        if a.dtype == bool or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise TypeError(f"{name}: expected a 1-D real array, got {got(orig)}")
        if a.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D real array, got {got(orig)}")
    if S.shape != E.shape:
        raise ValueError(f"examples: expected shape {S.shape} (the shape of steps), got shape {E.shape}")
    S = S.astype(np.float64)
    E = E.astype(np.float64)
    ok = np.isfinite(S) & np.isfinite(E)
    for name, a in (("steps", S), ("examples", E)):
        if np.any(a[ok] <= 0):
            raise ValueError(f"{name}: expected positive values, got {float(a[ok][a[ok] <= 0][0])!r}")
    S, E = S[ok], E[ok]
    if S.shape[0] < 3:
        raise ValueError(
            f"steps: expected at least 3 points with finite steps and examples (target reached), got {S.shape[0]}"
        )
    logS = np.log(S)
    logB = np.log(E) - logS
    if np.ptp(logB) <= 1e-12 * max(1.0, float(np.max(np.abs(logB)))):
        raise ValueError(
            f"examples: expected at least 2 distinct batch sizes examples/steps, got only {float(np.exp(logB[0]))!r}"
        )
    use_scipy = (method == "scipy") or (method == "auto" and _have_scipy())
    if method == "scipy" and not _have_scipy():
        raise ValueError("method: expected 'numpy' or 'auto' (scipy is not importable), got 'scipy'")

    # 1) grid over v = log b_crit, u = log s_min profiled out
    grid = np.linspace(logB.min() - _GRID_MARGIN, logB.max() + _GRID_MARGIN, _GRID_POINTS)
    costs = np.array([_profile(v, logS, logB)[1] for v in grid])
    i = int(np.argmin(costs))
    if i == 0:  # limit b_crit -> 0: S constant
        u = float(np.mean(logS))
        r = logS - u
        return TradeoffFit(s_min=math.exp(u), e_min=0.0, b_crit=0.0, residual=math.sqrt(float(r @ r) / r.shape[0]))
    if i == grid.shape[0] - 1:  # limit b_crit -> inf: S = E_min / B
        w = float(np.mean(logS + logB))
        r = logS + logB - w
        return TradeoffFit(s_min=0.0, e_min=math.exp(w), b_crit=math.inf, residual=math.sqrt(float(r @ r) / r.shape[0]))
    x0 = np.array([_profile(grid[i], logS, logB)[0], grid[i]])

    # 2) refine (u, v) jointly
    x = _refine_scipy(x0, logS, logB) if use_scipy else _refine_numpy(x0, logS, logB)
    r = _residuals(x, logS, logB)
    s_min = math.exp(x[0])
    b_crit = math.exp(x[1])
    return TradeoffFit(s_min=s_min, e_min=s_min * b_crit, b_crit=b_crit, residual=math.sqrt(float(r @ r) / r.shape[0]))
