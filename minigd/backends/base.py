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
    gradient norms of the batch are left in ``self.ws.scratch(B)`` (read them with
    ``last_sqnorms(B)``).

Per-example gradient statistics (:mod:`minigd.gradstats`):

``per_example_terms(params, X, yi, yf, idx, B, grad=None)``
    the factors of the per-example gradients of rows ``idx[:B]`` (training mode): a list,
    one ``(A_l, Dper_l)`` pair per layer, where ``A_l`` (B, n_l) is the layer's input (the
    batch itself for l = 0, else a_{l-1}) and ``Dper_l`` (B, n_{l+1}) the deltas of each
    example's **own** loss (not scaled by 1/B).  Example r's gradient is
    ``outer(A_l[r], Dper_l[r])`` for W_l and ``Dper_l[r]`` for b_l.  With ``grad`` the
    batch gradient of the mean loss is written there too.  May be workspace views (valid
    until the next call).
``per_example_grads(params, X, yi, yf, idx, B, out)``
    writes the flat per-example gradients of rows ``idx[:B]`` into ``out[:B]`` ((>= B, P),
    model dtype); built on ``per_example_terms`` unless a backend has a faster way.
``moments_update(params, grad, X, yi, yf, idx, B, n_old, mean, m2)`` (optional)
    folds the per-example gradients of the batch into float64 running moments
    (Chan et al.'s rule; ``mean``/``m2`` (P,) float64, in place) without materialising
    them; ``grad`` is a (P,) scratch that receives the batch gradient.  Backends without
    it get the generic path of :func:`minigd.grad_moments`.
``last_sqnorms(B)``
    the (B,) per-example squared gradient norms left by the last
    ``train_step(..., want_sqn=True)`` (a workspace view).

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

    def per_example_terms(self, params, X, yi, yf, idx, B, grad=None):
        raise NotImplementedError  # pragma: no cover - abstract

    def per_example_grads(self, params, X, yi, yf, idx, B, out):
        """Flat per-example gradients of rows idx[:B] into out[:B] (see the module doc)."""
        terms = self.per_example_terms(params, X, yi, yf, idx, B)
        wo, bo = self.layout._offsets()
        for l, (A, D) in enumerate(terms):
            fi, fo = A.shape[1], D.shape[1]
            blk = out[:B, wo[l]:wo[l] + fi * fo]
            blk.shape = (B, fi, fo)            # a view (raises rather than copy)
            np.multiply(A[:, :, None], D[:, None, :], out=blk)
            out[:B, bo[l]:bo[l] + fo] = D

    def last_sqnorms(self, B):
        """(B,) per-example squared gradient norms of the last ``train_step(want_sqn=True)``."""
        return self.ws.scratch(B)

    def train_step(self, params, grad, X, yi, yf, idx, B, opt_state, lr, t, want_sqn=False):
        loss, rows = self.loss_grad(params, grad, X, yi, yf, idx, B, want_sqn=want_sqn)
        if want_sqn:   # leave them where the contract says (compiled backends already do)
            scr = self.reserve(B).scratch(B)
            if rows is not None and rows.base is not self.ws.buf:
                scr[...] = rows
        if not np.isfinite(loss):
            return loss, False, float("nan")
        ok, gsq = self.opt_apply(params, grad, opt_state, lr, t)
        return loss, ok, gsq
