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
    cause : {"learning_rate", "data"}
        ``"data"`` when the first step of the run already failed -- the loss of the first
        batch was non-finite with the (finite) starting parameters, before any update: the
        inputs or targets overflow the forward pass, no learning rate is to blame;
        ``"learning_rate"`` otherwise (the parameters grew step by step until something
        overflowed).
    """

    def __init__(
        self,
        step: int,
        loss: float,
        params: np.ndarray,
        history: Any = None,
        reason: str = "",
        cause: str = "learning_rate",
    ) -> None:
        self.step = int(step)
        self.loss = float(loss)
        self.params = params
        self.history = history
        self.cause = cause
        if cause == "data":
            advice = (
                "The data are the cause, not the learning rate: the first batch already overflows "
                "with the starting parameters; rescale X (e.g. standardize it), check y, or use "
                "float64."
            )
        else:
            advice = "Try a smaller learning rate or gradient clipping (clip_norm=...)."
        msg = (
            f"training diverged at step {self.step}: {reason or 'non-finite value'} "
            f"(batch loss {self.loss!r}); the update was not applied, "
            f"DivergenceError.params holds the last finite parameters. {advice}"
        )
        super().__init__(msg)


class CheckpointError(ValueError):
    """A checkpoint file (or a :class:`~minigd.checkpoint.Checkpoint` handed to
    ``fit(resume=...)``) that cannot be used: not a regular file, corrupt, truncated,
    crafted, inconsistent with itself or with the data it claims to continue.  The
    message names the file and what is wrong; nothing from such a file reaches a kernel.
    A subclass of :class:`ValueError` (what older versions raised).

    Attributes
    ----------
    path : str or None
        The file.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


class BackendUnavailable(RuntimeError):
    """A backend was requested that cannot run here; ``reason`` says why."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"backend {name!r} is not available: {reason}")


class DegenerateModelWarning(UserWarning):
    """A model that is valid but cannot learn anything, e.g. ``cross_entropy`` with one
    output unit (its softmax is always 1, so the loss and the gradient are always 0)."""


class ResultStoreError(ValueError):
    """A results file (``results.sqlite``) that cannot be used: not a regular file, empty,
    not an SQLite database, a foreign database (not minigd's tables), damaged or truncated
    (SQLite reports it malformed), or holding a meta entry that does not validate.  The
    message names the file and what is wrong.  A subclass of :class:`ValueError` (what
    older versions raised for a file that is not a database).

    Attributes
    ----------
    path : str
        The file.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)
