"""Gradient statistics: per-example gradients, their norms and streamed moments, the
gradient noise scale and the batch-size formulas built on it.

Model-independent (pure numpy): :mod:`.moments` and :mod:`.noise_scale` (the estimators),
:mod:`.batch_rules` (norm test, AdaScale gain, Pollux efficiency and goodput) and
:mod:`.tradeoff` (steps/examples to a target and the fit of that curve).  On a
model: :mod:`.per_example` (``per_example_grads``, ``per_example_grad_norms``,
``grad_moments``), :mod:`.variance_curve` (``variance_vs_batch_size``) and
:mod:`.tracking` (what ``fit(track_noise=k)`` records).

Conventions: the batch loss is the mean of per-example losses, so the batch gradient is the
mean of the per-example gradients :math:`g_i`; variances over examples use ``ddof=1``.
"""

from .batch_rules import adascale_gain, goodput, norm_test, statistical_efficiency
from .moments import GradMoments, MomentAccumulator
from .noise_scale import (
    TwoBatchNoiseScale,
    minibatch_variance_prediction,
    per_example_estimates,
    two_batch_estimates,
)
from .per_example import grad_moments, per_example_grad_norms, per_example_grads
from .tracking import NoiseTracker
from .tradeoff import TradeoffFit, fit_tradeoff, predicted_examples, predicted_steps
from .variance_curve import BatchVarianceCurve, variance_vs_batch_size

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
