"""Evaluation and per-example gradient statistics on the device.

No graph here: each call gathers its batch on the host (:meth:`DeviceMemory._stage_batch`),
runs the passes of :mod:`._passes` and reads the result back.
"""

from __future__ import annotations

import numpy as np

from minigd.backends.base import check_per_example


class Statistics:
    """forward, losses, loss_grad, last_sqnorms and the per-example statistics."""

    def forward(self, params, X, idx, B, training=False):
        training = bool(training) and self.norm is not None
        self._stage_batch(params, X, np.empty(0, np.int64), np.empty(0, self.dtype), idx, B)
        self._stage_norm(B, training)
        self._enqueue_forward(B, self._gemm_kind(B), training)
        out = self.ws.views(B)[1][-1].get(stream=self.stream)
        return out

    def losses(self, params, X, yi, yf, idx, B):
        dyi, dyf, ar = self._stage_batch(params, X, yi, yf, idx, B)
        self._stage_norm(B, False)
        self._enqueue_forward(B, self._gemm_kind(B))
        self._enqueue_loss(B, dyi, dyf, ar, np.uint64(0), self._res, 0, 0)
        return self._rowloss[:B].get(stream=self.stream)

    def _device_loss_grad(self, params, X, yi, yf, idx, B, want_sqn):
        dyi, dyf, ar = self._stage_batch(params, X, yi, yf, idx, B)
        self._stage_norm(B, True)
        gemm = self._gemm_kind(B)
        self._enqueue_forward(B, gemm, training=True)
        self._enqueue_loss(B, dyi, dyf, ar, np.uint64(0), self._res, 0, 0)
        self._enqueue_backward(B, gemm, want_sqn)

    def loss_grad(self, params, grad, X, yi, yf, idx, B, want_sqn=False, want_row_loss=False):
        if want_sqn:
            check_per_example(self.norm, "per-example gradient norms")
        self._device_loss_grad(params, X, yi, yf, idx, B, want_sqn)
        s = self.stream
        self.d_grad.get(stream=s, out=grad)
        loss = float(self._res[:1].get(stream=s)[0])
        rows = None
        if want_sqn:
            rows = self._sqn[:B].get(stream=s)
        elif want_row_loss:
            rows = self._rowloss[:B].get(stream=s)
        return loss, rows

    def last_sqnorms(self, B):
        """(B,) float64 per-example squared gradient norms of the last
        ``train_step(want_sqn=True)`` (a host copy)."""
        return self._sqn[:B].get(stream=self.stream)

    # -- per-example gradient statistics ----------------------------------------------------------
    def per_example_terms(self, params, X, yi, yf, idx, B, grad=None):
        check_per_example(self.norm, "per-example gradients")
        self._device_loss_grad(params, X, yi, yf, idx, B, False)
        s = self.stream
        if grad is not None:
            self.d_grad.get(stream=s, out=grad)
        x0, _, as_, ds = self._layer_views(B)
        terms = []
        for l in range(self.layout.n_layers):
            A = (x0 if l == 0 else as_[l - 1]).get(stream=s)
            D = ds[l].get(stream=s) * self.dtype.type(B)
            terms.append((A, D))
        return terms

    def per_example_grads(self, params, X, yi, yf, idx, B, out):
        check_per_example(self.norm, "per-example gradients")
        self._device_loss_grad(params, X, yi, yf, idx, B, False)
        P = self.layout.n_params
        if self._G is None or self._G.shape[0] < B:
            with self.stream:  # zeros is a memset: on our stream, ordered before the fill kernel
                self._G = self.cp.zeros((B, P), self.dtype)
        G = self._G[:B]
        self._enqueue_layers(
            self.k.per_example_fill,
            B,
            lambda A, D, fi, fo, wo, bo: (
                A,
                D,
                np.int32(B),
                np.int32(fi),
                np.int32(fo),
                np.int64(wo),
                np.int64(bo),
                np.int64(P),
                G,
            ),
            total=lambda fi, fo: B * (fi * fo + fo),
        )
        G.get(stream=self.stream, out=out[:B])

    def moments_update(self, params, grad, X, yi, yf, idx, B, n_old, mean, m2):
        check_per_example(self.norm, "gradient moments")
        cp = self.cp
        self._device_loss_grad(params, X, yi, yf, idx, B, False)
        s = self.stream
        with s:
            dmean = cp.asarray(mean)
            dm2 = cp.asarray(m2)
        n_new = n_old + B
        w, c = B / n_new, n_old * B / n_new
        self._enqueue_layers(
            self.k.moments_update,
            B,
            lambda A, D, fi, fo, wo, bo: (
                A,
                D,
                self.d_grad,
                np.int32(B),
                np.int32(fi),
                np.int32(fo),
                np.int64(wo),
                np.int64(bo),
                np.int64(n_old),
                np.float64(w),
                np.float64(c),
                dmean,
                dm2,
            ),
            total=lambda fi, fo: fi * fo + fo,
        )
        dmean.get(stream=s, out=mean)
        dm2.get(stream=s, out=m2)
        self.d_grad.get(stream=s, out=grad)
        s.synchronize()
