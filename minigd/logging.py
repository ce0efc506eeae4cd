"""Training loggers (callbacks for :func:`minigd.fit`).

:class:`TensorBoardLogger` writes scalars to TensorBoard event files through a maintained
writer -- ``tensorboardX`` (``pip install tensorboardX``, or ``pip install
minigd[tensorboard]``) or, failing that, ``torch.utils.tensorboard`` (needs the
``tensorboard`` package) -- and never writes the event format itself.  Any object with an
``add_scalar(tag, value, global_step)`` method can be passed as ``writer=`` instead.

For tables, :class:`minigd.History` has ``records``, ``to_csv(path)`` and ``to_frame()``
(pandas).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

from minigd._validation import _got, check_int

__all__ = ["TensorBoardLogger", "make_summary_writer"]

#: the install hint in the ImportError
EXTRA_HINT = "pip install tensorboardX  (or: pip install 'minigd[tensorboard]')"


def make_summary_writer(logdir: str | os.PathLike) -> Any:
    """A TensorBoard ``SummaryWriter`` for ``logdir`` from tensorboardX, else from
    ``torch.utils.tensorboard``; :class:`ImportError` naming the extra when neither is
    importable."""
    errors = []
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter(logdir=os.fspath(logdir))
    except ImportError as exc:
        errors.append(f"tensorboardX: {exc}")
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=os.fspath(logdir))
    except ImportError as exc:
        errors.append(f"torch.utils.tensorboard: {exc}")
    raise ImportError(
        f"TensorBoardLogger needs a TensorBoard event writer and none is installed ({'; '.join(errors)}): {EXTRA_HINT}"
    )


class TensorBoardLogger:
    """Write training scalars to TensorBoard (a :func:`minigd.fit` callback).

    Tags, all against the 0-based step index of :attr:`minigd.History.records`:

    * ``train/loss``, ``train/lr``, ``train/batch_size``, ``train/examples`` every
      ``every`` steps;
    * ``noise/noise_scale``, ``noise/grad_norm_sq``, ``noise/trace_cov`` (the smoothed
      estimates) at the steps tracked by ``fit(track_noise=k)`` -- non-finite values
      (``noise_scale = inf`` while the smoothed |G|^2 <= 0) are left out;
    * ``eval/val_loss``, ``eval/val_accuracy``, ``eval/train_...`` at every evaluation
      (against the step whose update preceded it, as in ``History.records``).

    Parameters
    ----------
    logdir : str or os.PathLike
        The run's directory (created by the writer).
    every : int
        Write the per-step ``train/*`` scalars every this many steps.
    writer : object, optional
        Use this instead of creating a SummaryWriter: anything with
        ``add_scalar(tag, value, global_step)`` (and optionally ``flush()`` / ``close()``).

    Raises
    ------
    ImportError
        When no writer is given and neither tensorboardX nor torch.utils.tensorboard
        (with tensorboard) can be imported; the message names the extra to install.

    Examples
    --------
    >>> from minigd.logging import TensorBoardLogger          # doctest: +SKIP
    >>> with TensorBoardLogger("runs/b32") as tb:               # doctest: +SKIP
    ...     mg.fit(model, X, y, batch_size=32, track_noise=10, callbacks=[tb])
    """

    def __init__(self, logdir: str | os.PathLike | None = None, *, every: int = 1, writer: Any = None) -> None:
        self.every = check_int("every", every, low=1)
        if writer is None:
            if logdir is None or isinstance(logdir, bool) or not isinstance(logdir, (str, os.PathLike)):
                raise TypeError(f"logdir: expected a directory path, got {_got(logdir)}")
            writer = make_summary_writer(logdir)
        elif not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"writer: expected an object with add_scalar(tag, value, step), got {_got(writer)}")
        self.logdir = None if logdir is None else os.fspath(logdir)
        self.writer = writer
        self._hist = None
        self._n_noise = 0

    # -- fit callback hooks -------------------------------------------------------------------
    def on_fit_start(self, model: Any, history: Any) -> None:
        self._hist = history
        tr = history.noise_tracker
        self._n_noise = len(tr) if tr is not None else 0

    def on_step(self, model: Any, step: int, loss: float) -> None:
        h = self._hist
        if h is None:
            return None
        s = step - 1
        if step % self.every == 0:
            row = h.row(-1)
            w = self.writer
            w.add_scalar("train/loss", float(loss), s)
            w.add_scalar("train/lr", row["lr"], s)
            w.add_scalar("train/batch_size", row["batch_size"], s)
            w.add_scalar("train/examples", row["examples"], s)
        tr = h.noise_tracker
        if tr is not None and len(tr) != self._n_noise:
            self._n_noise = len(tr)
            for tag, v in (
                ("noise/noise_scale", tr.noise_scale),
                ("noise/grad_norm_sq", tr.grad_norm_sq),
                ("noise/trace_cov", tr.trace_cov),
            ):
                if math.isfinite(v):
                    self.writer.add_scalar(tag, float(v), s)
        return None

    def on_eval(self, model: Any, record: dict) -> None:
        s = max(int(record.get("step", 0)) - 1, 0)
        for k, v in record.items():
            if k.startswith(("val_", "train_")) and isinstance(v, numbers.Real) and not isinstance(v, bool):
                self.writer.add_scalar(f"eval/{k}", float(v), s)
        return None

    def on_fit_end(self, model: Any, history: Any) -> None:
        self.flush()
        self._hist = None

    # -- resources ----------------------------------------------------------------------------
    def flush(self) -> None:
        f = getattr(self.writer, "flush", None)
        if callable(f):
            f()

    def close(self) -> None:
        c = getattr(self.writer, "close", None)
        if callable(c):
            c()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorBoardLogger(logdir={self.logdir!r}, every={self.every})"
