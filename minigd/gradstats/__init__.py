"""Gradient statistics: per-example gradients, their norms and streamed moments, the
gradient noise scale and the batch-size formulas built on it.

Model-independent estimators (pure numpy): :mod:`.moments`, :mod:`.noise_scale`.  On a
model: :mod:`.per_example` (``per_example_grads``, ``per_example_grad_norms``,
``grad_moments``), :mod:`.variance_curve` (``variance_vs_batch_size``) and
:mod:`.tracking` (what ``fit(track_noise=k)`` records).

Conventions: the batch loss is the mean of per-example losses, so the batch gradient is the
mean of the per-example gradients :math:`g_i`; variances over examples use ``ddof=1``.
"""
from .moments import GradMoments, MomentAccumulator
from .per_example import grad_moments, per_example_grad_norms, per_example_grads
from .tracking import NoiseTracker
from .variance_curve import BatchVarianceCurve, variance_vs_batch_size
from .noise_scale import (
    TradeoffFit,
    TwoBatchNoiseScale,
    adascale_gain,
    fit_tradeoff,
    goodput,
    minibatch_variance_prediction,
    norm_test,
    per_example_estimates,
    predicted_examples,
    predicted_steps,
    statistical_efficiency,
    two_batch_estimates,
)

__all__ = [
    "per_example_grads",
    "per_example_grad_norms",
    "grad_moments",
    "variance_vs_batch_size",
    "BatchVarianceCurve",
    "NoiseTracker",
    "GradMoments",
    "MomentAccumulator",
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
