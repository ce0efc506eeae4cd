"""Gradient statistics: streamed per-example gradient moments, the gradient noise scale and
the batch-size formulas built on it (model-independent, pure numpy).

Conventions: the batch loss is the mean of per-example losses, so the batch gradient is the
mean of the per-example gradients :math:`g_i`; variances over examples use ``ddof=1``.
"""
from .moments import GradMoments, MomentAccumulator
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
