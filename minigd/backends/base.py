"""The backend protocol: what a model asks of its compute core.

A backend is bound to one model shape (layer sizes, activation codes, loss code, dtype).
It owns the workspace (sized for the largest batch it has been asked to run; growing it is
the only allocation, and it never happens inside a training step once ``reserve`` was
called) and offers batch-level operations that write into caller-owned buffers:

``forward(params, X, idx, B)``
    evaluation-mode logits of rows ``idx[:B]`` of X; returns a (B, n_out) array that may be
    a view into the workspace (valid until the next call).
``losses(params, X, yi, yf, idx, B)``
    per-example losses (B,) of the batch, evaluation mode, float64 or model dtype.
``loss_grad(params, grad, X, yi, yf, idx, B, want_sqn=False, want_row_loss=False)``
    mean loss of the batch (float); writes the gradient of that mean loss into ``grad``.
    Returns ``(loss, rows)`` where ``rows`` is the (B,) per-example squared gradient norms
    (``want_sqn``) or per-example losses (``want_row_loss``), else None; a workspace view.
``opt_apply(params, grad, opt_state, lr, t)``
    runs the optimizer chain on ``grad`` (in place, turning it into the update) and adds
    it to ``params`` unless that would make a parameter non-finite; returns
    ``(applied, |g|^2)`` with the squared norm of the raw gradient.
``train_step(params, grad, X, yi, yf, idx, B, opt_state, lr, t, want_sqn=False)``
    loss_grad followed by opt_apply, as one call where the backend can fuse them;
    returns ``(loss, applied, |g|^2)``.  With ``want_sqn`` the per-example squared
    gradient norms of the batch are left in ``self.ws.scratch(B)``.

All arrays are C-contiguous, of the model dtype (labels int64); ``idx`` is int64.
"""
from __future__ import annotations

import numpy as np

from minigd.kernels.workspace import ParamLayout, Workspace


class Backend:
    name = "?"

    def __init__(self, layout: ParamLayout, act_codes, loss_code: int, dtype):
        self.layout = layout
        self.act_codes = tuple(int(a) for a in act_codes)
        self.loss_code = int(loss_code)
        self.dtype = np.dtype(dtype)
        self.ws: Workspace | None = None

    # -- workspace -------------------------------------------------------------------------
    def reserve(self, capacity: int) -> Workspace:
        """Make sure the workspace holds at least ``capacity`` rows."""
        if self.ws is None or self.ws.capacity < capacity:
            self.ws = Workspace(self.layout, self.act_codes, int(capacity), self.dtype)
        return self.ws

    @property
    def workspace_bytes(self) -> int:
        return 0 if self.ws is None else self.ws.nbytes

    # -- contract --------------------------------------------------------------------------
    def forward(self, params, X, idx, B):  # pragma: no cover - abstract
        raise NotImplementedError

    def losses(self, params, X, yi, yf, idx, B):
        """Per-example losses (B,) of rows idx[:B], evaluation mode (a workspace view)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def loss_grad(self, params, grad, X, yi, yf, idx, B, want_sqn=False, want_row_loss=False):
        raise NotImplementedError  # pragma: no cover - abstract

    def opt_apply(self, params, grad, opt_state, lr, t):
        raise NotImplementedError  # pragma: no cover - abstract

    def train_step(self, params, grad, X, yi, yf, idx, B, opt_state, lr, t, want_sqn=False):
        loss, _ = self.loss_grad(params, grad, X, yi, yf, idx, B, want_sqn=want_sqn)
        if not np.isfinite(loss):
            return loss, False, float("nan")
        ok, gsq = self.opt_apply(params, grad, opt_state, lr, t)
        return loss, ok, gsq
