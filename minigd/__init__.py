"""minigd: a small, fast MLP trainer built to measure what batch size does.

Public API (see README.md and ../shared/API.md): :class:`MLP`, :func:`fit`, the optimizers
:func:`SGD`, :func:`Adam`, :func:`AdamW` and the :mod:`minigd.optim` primitives and
schedules, :class:`History`, :func:`available_backends`, :class:`AdaptiveBatchSize`
(``fit(batch_size="adaptive")``); gradient statistics
(:mod:`minigd.gradstats`): :func:`per_example_grads`, :func:`per_example_grad_norms`,
:func:`grad_moments`, :func:`variance_vs_batch_size`, :class:`TwoBatchNoiseScale`;
checkpoints: :func:`save_checkpoint`, :func:`load_checkpoint`.  Not imported here (they pull
in optional dependencies): :mod:`minigd.sklearn` (``MLPClassifier``, ``MLPRegressor``) and
:mod:`minigd.logging` (``TensorBoardLogger``).
"""

from . import gradstats, optim
from .adaptive import AdaptiveBatchSize
from .backends import available_backends
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .errors import BackendUnavailable, CheckpointError, DegenerateModelWarning, DivergenceError
from .gradstats import (
    BatchVarianceCurve,
    GradMoments,
    TwoBatchNoiseScale,
    grad_moments,
    per_example_grad_norms,
    per_example_grads,
    variance_vs_batch_size,
)
from .history import History
from .model import MLP
from .optim import SGD, Adam, AdamW, BatchSizeSchedule, scale_lr
from .train import fit

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "fit",
    "AdaptiveBatchSize",
    "SGD",
    "Adam",
    "AdamW",
    "BatchSizeSchedule",
    "scale_lr",
    "History",
    "DivergenceError",
    "CheckpointError",
    "DegenerateModelWarning",
    "BackendUnavailable",
    "available_backends",
    "optim",
    "per_example_grads",
    "per_example_grad_norms",
    "grad_moments",
    "GradMoments",
    "TwoBatchNoiseScale",
    "variance_vs_batch_size",
    "BatchVarianceCurve",
    "gradstats",
    "save_checkpoint",
    "load_checkpoint",
    "Checkpoint",
]
