"""Exceptions raised by minigd."""
from __future__ import annotations

from typing import Any

import numpy as np


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss, gradient update or parameter vector.

    Training stops *before* the offending update is applied, so ``params`` holds the
    last finite parameter vector.

    Attributes
    ----------
    step : int
        The (0-based) optimizer step at which divergence was detected; no update of that
        step was applied.
    loss : float
        The batch loss of that step (may itself be finite when only the update overflowed).
    params : ndarray
        A copy of the last finite flat parameter vector.
    history : minigd.History or None
        What was recorded before the divergence.
    """

    def __init__(self, step: int, loss: float, params: np.ndarray, history: Any = None,
                 reason: str = "") -> None:
        self.step = int(step)
        self.loss = float(loss)
        self.params = params
        self.history = history
        msg = (f"training diverged at step {self.step}: {reason or 'non-finite value'} "
               f"(batch loss {self.loss!r}); the update was not applied, "
               f"DivergenceError.params holds the last finite parameters. "
               f"Try a smaller learning rate or gradient clipping (clip_norm=...).")
        super().__init__(msg)


class BackendUnavailable(RuntimeError):
    """A backend was requested that cannot run here; ``reason`` says why."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"backend {name!r} is not available: {reason}")


class DegenerateModelWarning(UserWarning):
    """A model that is valid but cannot learn anything, e.g. ``cross_entropy`` with one
    output unit (its softmax is always 1, so the loss and the gradient are always 0)."""
