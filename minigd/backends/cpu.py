"""The default ``"cpu"`` backend: Numba kernels, BLAS for larger batches.

Per batch it picks one of two regimes (both follow the kernel contract in
``kernels/cpu.py``, and both are tested against the NumPy reference):

* **loops** (small batches): the whole step -- gather, forward, loss, backward, per-example
  norms and the optimizer update -- is one compiled call of hand-written loops.  At batch 1
  the cost of a step is mostly call overhead and passes over the parameter vector; one
  compiled call has the least of both.
* **BLAS** (larger batches): the GEMMs run in BLAS on views of the preallocated workspace
  (no allocation) and compiled kernels do the epilogues (bias + activation, fused softmax
  cross-entropy, activation backward, bias gradient, per-example norms, optimizer).  With
  SciPy installed the whole step is again ONE compiled call (numba lowers ``np.dot(...,
  out)`` to BLAS through SciPy's bindings); without it, Python drives ``np.matmul(out=...)``
  between compiled epilogues (about 20 calls per step: fine at large batches).

The crossover is a batch size that depends on the widest layer; it was measured with
``bench/crossover.py`` (see bench/results) and can be overridden per backend instance
(``model.backend_impl.blas_min_batch = ...``).
"""
from __future__ import annotations

import importlib.util

import numpy as np

from minigd.backends.base import Backend
from minigd.kernels import cpu as K
from minigd.kernels import cpu_stats as KS

#: numba's np.dot inside compiled code needs SciPy's BLAS bindings
HAVE_SCIPY = importlib.util.find_spec("scipy") is not None


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, layout, act_codes, loss_code, dtype):
        super().__init__(layout, act_codes, loss_code, dtype)
        self.compiled_blas = HAVE_SCIPY
        self.blas_min_batch = self.default_blas_min_batch(layout.sizes, self.compiled_blas)

    @staticmethod
    def default_blas_min_batch(sizes, compiled_blas: bool = HAVE_SCIPY) -> int:
        """Measured crossover (bench/crossover.py, 1 thread; bench/results/crossover.md):
        loops win below it, BLAS at and above.  Compiled BLAS wins from batch 2 at every
        width measured (32-512) and already at batch 1 from width 128 (by 2-9%; the loops
        win at batch 1 only for narrow layers); Python-driven BLAS pays ~25-40 µs of call
        overhead per step, which only wider layers or larger batches repay."""
        if compiled_blas:
            return 1 if max(sizes) >= 96 else 2
        width = max(sizes)
        return 2 if width >= 512 else 4 if width >= 256 else 8 if width >= 128 else 24 if width >= 64 else 48

    def use_blas(self, B: int) -> bool:
        return B >= self.blas_min_batch

    # -- contract ------------------------------------------------------------------------
    def forward(self, params, X, idx, B):
        ws = self.reserve(B)
        if not self.use_blas(B):
            K.forward_loops(X, idx, B, params, ws.buf, ws.lay)
        elif self.compiled_blas:
            K.forward_blas(X, idx, B, params, ws.buf, ws.lay)
        else:
            self._forward_py(params, X, idx, B, ws)
        return ws.views(B)[1][-1]

    def losses(self, params, X, yi, yf, idx, B):
        ws = self.reserve(B)
        self.forward(params, X, idx, B)
        K.loss_rows(yi, yf, idx, B, ws.buf, ws.lay, self.loss_code, True)
        return ws.scratch(B)

    def loss_grad(self, params, grad, X, yi, yf, idx, B, want_sqn=False, want_row_loss=False):
        ws = self.reserve(B)
        if not self.use_blas(B):
            loss = K.loss_grad_loops(X, yi, yf, idx, B, params, grad, ws.buf, ws.lay,
                                     self.loss_code, want_sqn, want_row_loss)
        elif self.compiled_blas:
            loss = K.loss_grad_blas(X, yi, yf, idx, B, params, grad, ws.buf, ws.lay,
                                    self.loss_code, want_sqn, want_row_loss)
        else:
            loss = self._loss_grad_py(params, grad, X, yi, yf, idx, B, ws, want_sqn, want_row_loss)
        rows = ws.scratch(B) if (want_sqn or want_row_loss) else None
        return loss, rows

    def opt_apply(self, params, grad, opt_state, lr, t):
        ok, gsq = K.opt_apply(params, grad, opt_state.codes, opt_state.hp, opt_state.soff,
                              opt_state.state, opt_state.plan, lr, t)
        return bool(ok), gsq

    def train_step(self, params, grad, X, yi, yf, idx, B, opt_state, lr, t, want_sqn=False):
        ws = self.ws if (self.ws is not None and self.ws.capacity >= B) else self.reserve(B)
        if not self.use_blas(B):
            step = K.train_step_loops
        elif self.compiled_blas:
            step = K.train_step_blas
        else:
            return super().train_step(params, grad, X, yi, yf, idx, B, opt_state, lr, t, want_sqn)
        loss, ok, gsq = step(X, yi, yf, idx, B, params, grad, ws.buf, ws.lay, self.loss_code,
                             want_sqn, opt_state.codes, opt_state.hp, opt_state.soff,
                             opt_state.state, opt_state.plan, lr, t)
        return loss, bool(ok), gsq

    # -- BLAS path driven from Python (no SciPy) ----------------------------------------------
    def _forward_py(self, params, X, idx, B, ws):
        x0, zs, as_, _, _ = ws.views(B)
        Ws = self._weight_views(params)
        K.gather_rows(X, idx, B, ws.buf, ws.lay)
        a = x0
        L = self.layout.n_layers
        for l in range(L):
            np.matmul(a, Ws[l], out=zs[l])
            K.bias_act_forward(B, params, ws.buf, ws.lay, l)
            a = as_[l]

    def _loss_grad_py(self, params, grad, X, yi, yf, idx, B, ws, want_sqn, want_row_loss):
        self._forward_py(params, X, idx, B, ws)
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

    # -- per-example gradient statistics (kernels/cpu_stats.py) ---------------------------------
    def _stats_scratch(self, B):
        """Scratch for the stats kernels: (grad-sized vector, two (max width * B) blocks,
        two buffers of the largest layer's weight count)."""
        s = getattr(self, "_st", None)
        sizes = self.layout.sizes
        if s is None or s[1].shape[0] < max(sizes) * B:
            big = max(a * b for a, b in zip(sizes[:-1], sizes[1:]))
            wb = max(sizes) * max(B, 1)
            s = self._st = (np.zeros(self.layout.n_params, self.dtype), np.zeros(wb, self.dtype),
                            np.zeros(wb, self.dtype), np.zeros(big, self.dtype),
                            np.zeros(big, self.dtype))
        return s

    def per_example_terms(self, params, X, yi, yf, idx, B, grad=None):
        """[(A_l, Dper_l)]: the layer inputs (workspace views) and per-example deltas
        (B times the workspace's mean-loss deltas, new arrays) of one loss_grad call."""
        g = self._stats_scratch(B)[0] if grad is None else grad
        self.loss_grad(params, g, X, yi, yf, idx, B)
        x0, _, as_, ds, _ = self.ws.views(B)
        return [(x0 if l == 0 else as_[l - 1], ds[l] * B) for l in range(self.layout.n_layers)]

    def per_example_grads(self, params, X, yi, yf, idx, B, out):
        g, _, _, tmp, _ = self._stats_scratch(B)
        self.loss_grad(params, g, X, yi, yf, idx, B)
        KS.per_example_fill(B, self.ws.buf, self.ws.lay, out, tmp)

    def moments_update(self, params, grad, X, yi, yf, idx, B, n_old, mean, m2):
        _, tr, dsc, mus, acc = self._stats_scratch(B)
        self.loss_grad(params, grad, X, yi, yf, idx, B)
        KS.moments_update(B, grad, self.ws.buf, self.ws.lay, n_old, mean, m2, tr, dsc, mus, acc)
