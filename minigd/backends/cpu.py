"""The default ``"cpu"`` backend: Numba kernels, BLAS for large batches.

Per batch it picks one of two regimes (both follow the kernel contract in
``kernels/cpu.py``, and both are tested against the NumPy reference):

* **loops** (small batches): the whole step -- gather, forward, loss, backward, per-example
  norms and the optimizer update -- is one compiled call of hand-written loops.  At batch 1
  the cost of a step is mostly call overhead, and one call has the least.
* **BLAS** (large batches): the GEMMs run through numpy's BLAS (``np.matmul(out=...)`` on
  views of the preallocated workspace: no allocation), and compiled kernels do the
  epilogues (bias + activation, fused softmax cross-entropy, activation backward, bias
  gradient, per-example norms, optimizer).

The crossover is a batch size that depends on the widest layer; it was measured with
``bench/step.py`` (see bench/results) and can be overridden per backend instance
(``model.backend_impl.blas_min_batch = ...``).
"""
from __future__ import annotations

import numpy as np

from minigd.backends.base import Backend
from minigd.kernels import cpu as K


class CpuBackend(Backend):
    name = "cpu"
    #: smallest batch for which the BLAS path may be chosen, whatever the widths
    BLAS_MIN_BATCH_FLOOR = 16

    def __init__(self, layout, act_codes, loss_code, dtype):
        super().__init__(layout, act_codes, loss_code, dtype)
        self.blas_min_batch = self.default_blas_min_batch(layout.sizes)

    @classmethod
    def default_blas_min_batch(cls, sizes) -> int:
        """Measured crossover (bench/step.py): loops win below it, BLAS at and above it."""
        width = max(sizes)
        if width >= 512:
            return cls.BLAS_MIN_BATCH_FLOOR
        if width >= 192:
            return 32
        return 64

    def use_blas(self, B: int) -> bool:
        return B >= self.blas_min_batch

    # -- contract ------------------------------------------------------------------------
    def forward(self, params, X, idx, B):
        ws = self.reserve(B)
        if self.use_blas(B):
            self._forward_blas(params, X, idx, B, ws)
        else:
            K.forward_loops(X, idx, B, params, ws.buf, ws.lay)
        return ws.views(B)[1][-1]

    def losses(self, params, X, yi, yf, idx, B):
        ws = self.reserve(B)
        self.forward(params, X, idx, B)
        K.loss_rows(yi, yf, idx, B, ws.buf, ws.lay, self.loss_code, True)
        return ws.scratch(B)

    def loss_grad(self, params, grad, X, yi, yf, idx, B, want_sqn=False, want_row_loss=False):
        ws = self.reserve(B)
        if self.use_blas(B):
            loss = self._loss_grad_blas(params, grad, X, yi, yf, idx, B, ws, want_sqn, want_row_loss)
        else:
            loss = K.loss_grad_loops(X, yi, yf, idx, B, params, grad, ws.buf, ws.lay,
                                     self.loss_code, want_sqn, want_row_loss)
        rows = ws.scratch(B) if (want_sqn or want_row_loss) else None
        return loss, rows

    def opt_apply(self, params, grad, opt_state, lr, t):
        ok, gsq = K.opt_apply(params, grad, opt_state.codes, opt_state.hp, opt_state.soff,
                              opt_state.state, opt_state.plan, lr, t)
        return bool(ok), gsq

    def train_step(self, params, grad, X, yi, yf, idx, B, opt_state, lr, t, want_sqn=False):
        if self.use_blas(B):
            return super().train_step(params, grad, X, yi, yf, idx, B, opt_state, lr, t, want_sqn)
        ws = self.ws if (self.ws is not None and self.ws.capacity >= B) else self.reserve(B)
        loss, ok, gsq = K.train_step_loops(X, yi, yf, idx, B, params, grad, ws.buf, ws.lay,
                                           self.loss_code, want_sqn, opt_state.codes, opt_state.hp,
                                           opt_state.soff, opt_state.state, opt_state.plan, lr, t)
        return loss, bool(ok), gsq

    # -- BLAS path -----------------------------------------------------------------------
    def _forward_blas(self, params, X, idx, B, ws):
        x0, zs, as_, _, _ = ws.views(B)
        Ws = self._weight_views(params)
        K.gather_rows(X, idx, B, ws.buf, ws.lay)
        a = x0
        L = self.layout.n_layers
        for l in range(L):
            np.matmul(a, Ws[l], out=zs[l])
            K.bias_act_forward(B, params, ws.buf, ws.lay, l)
            a = as_[l]

    def _loss_grad_blas(self, params, grad, X, yi, yf, idx, B, ws, want_sqn, want_row_loss):
        self._forward_blas(params, X, idx, B, ws)
        x0, zs, as_, ds, _ = ws.views(B)
        loss = K.loss_rows(yi, yf, idx, B, ws.buf, ws.lay, self.loss_code,
                           want_row_loss and not want_sqn)
        Ws = self._weight_views(params)
        gWs = self._weight_views(grad)
        L = self.layout.n_layers
        scale = float(B) * float(B)
        for l in range(L - 1, -1, -1):
            a_prev = x0 if l == 0 else as_[l - 1]
            np.matmul(a_prev.T, ds[l], out=gWs[l])
            K.bias_grad(B, grad, ws.buf, ws.lay, l)
            if want_sqn:
                K.sqnorm_accumulate(B, ws.buf, ws.lay, l, scale, l == L - 1)
            if l > 0:
                np.matmul(ds[l], Ws[l].T, out=ds[l - 1])
                K.act_backward(B, ws.buf, ws.lay, l - 1)
        return loss

    def _weight_views(self, vec):
        # cached per buffer identity: params/grad are long-lived flat vectors
        key = (id(vec), vec.ctypes.data)
        cache = getattr(self, "_wv", None)
        if cache is None:
            cache = self._wv = {}
        v = cache.get(key)
        if v is None:
            if len(cache) > 8:
                cache.clear()
            v = cache[key] = (self.layout.views(vec)[0], vec)
        return v[0]
