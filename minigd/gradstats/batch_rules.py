"""Batch-size and learning-rate rules built on the gradient noise scale
:math:`B_\\mathrm{simple} = \\mathrm{tr}(\\Sigma)/|G|^2` (estimated by :mod:`.noise_scale`):
the norm test of Byrd et al. (2012), the AdaScale gain (Johnson et al. 2020), and Pollux's
statistical efficiency and goodput (Qiao et al. 2021).

Pure numpy, with :mod:`.noise_scale`'s conventions: numbers broadcast over arrays (a Python
``float`` when every input is a scalar), and a bad argument raises :class:`TypeError` or
:class:`ValueError` naming it.

References
----------
.. [Byr12] R. H. Byrd, G. M. Chin, J. Nocedal, Y. Wu, "Sample size selection in optimization
   methods for machine learning", Math. Programming 134, 2012.
.. [Joh20] T. B. Johnson, P. Agrawal, H. Gu, C. Guestrin, "AdaScale SGD: A User-Friendly
   Algorithm for Distributed Training", ICML 2020, arXiv:2007.05105.
.. [Qia21] A. Qiao, S. K. Choe, S. J. Subramanya et al., "Pollux: Co-adaptive Cluster
   Scheduling for Goodput-Optimized Deep Learning", OSDI 2021, arXiv:2008.12260.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._checks import as_result, check_array, safe_ratio

__all__ = ["norm_test", "adascale_gain", "statistical_efficiency", "goodput"]


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
