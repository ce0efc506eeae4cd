"""The NumPy reference backend: the readable oracle every other backend is tested against.

Written for clarity, not speed: each layer's forward sits next to its backward, in the
notation of the kernels (``a`` activations, ``z`` pre-activations, ``delta = dLoss/dz``),
with the loss being the *mean* of per-example losses.  It follows the same contract as the
compiled backends (results written into caller-owned buffers), and computes its
intermediates with ordinary numpy expressions.
"""
from __future__ import annotations

import numpy as np

from minigd import nn
from minigd.backends.base import Backend


class NumpyBackend(Backend):
    name = "numpy"

    def _layers(self, params):
        return list(zip(*self.layout.views(params)))

    def _forward_all(self, params, X, idx, B):
        """Return the input block and a list of (z_l, a_l) for every layer."""
        a = X[idx[:B]]
        inp = a
        cache = []
        L = self.layout.n_layers
        for l, (W, b) in enumerate(self._layers(params)):
            z = a @ W + b
            a = nn.activation(self.act_codes[l], z) if l < L - 1 else z
            cache.append((z, a))
        return inp, cache

    def forward(self, params, X, idx, B):
        return self._forward_all(params, X, idx, B)[1][-1][0]

    def losses(self, params, X, yi, yf, idx, B):
        rows = idx[:B]
        z_out = self.forward(params, X, idx, B)
        return nn.per_example_loss(self.loss_code, z_out, yi[rows] if yi.size else yi,
                                   yf[rows] if yf.size else yf)

    def loss_grad(self, params, grad, X, yi, yf, idx, B, want_sqn=False, want_row_loss=False):
        rows = idx[:B]
        inp, cache = self._forward_all(params, X, idx, B)
        z_out = cache[-1][0]
        y_int = yi[rows] if yi.size else yi
        y_float = yf[rows] if yf.size else yf
        losses = nn.per_example_loss(self.loss_code, z_out, y_int, y_float)
        # delta of each *per-example* loss; the mean loss's delta is delta / B
        delta = nn.loss_grad(self.loss_code, z_out, y_int, y_float)
        sqn = np.zeros(B, np.float64)
        Ws, bs = self.layout.views(grad)
        params_W = self.layout.views(params)[0]
        for l in range(self.layout.n_layers - 1, -1, -1):
            a_prev = inp if l == 0 else cache[l - 1][1]
            Ws[l][...] = a_prev.T @ delta / B          # dW_l = a_{l-1}^T delta_l (mean)
            bs[l][...] = delta.sum(axis=0) / B         # db_l
            if want_sqn:   # |a_r|^2 |delta_r|^2 + |delta_r|^2 (per-example outer product)
                sqn += ((a_prev.astype(np.float64) ** 2).sum(1) + 1) * (delta.astype(np.float64) ** 2).sum(1)
            if l > 0:
                z_prev, a_prev_act = cache[l - 1]
                delta = (delta @ params_W[l].T) * nn.activation_grad(self.act_codes[l - 1], z_prev, a_prev_act)
        loss = float(losses.mean())
        if want_sqn:
            return loss, sqn
        return loss, (losses if want_row_loss else None)

    def per_example_terms(self, params, X, yi, yf, idx, B, grad=None):
        """[(A_l, Dper_l)] per layer: the layer input and the deltas of each example's own
        loss; example r's gradient is outer(A_l[r], Dper_l[r]) for W_l, Dper_l[r] for b_l.
        With ``grad`` the mean-loss gradient (their mean over rows) is written there."""
        rows = idx[:B]
        inp, cache = self._forward_all(params, X, idx, B)
        z_out = cache[-1][0]
        delta = nn.loss_grad(self.loss_code, z_out, yi[rows] if yi.size else yi,
                             yf[rows] if yf.size else yf)
        params_W = self.layout.views(params)[0]
        terms = []
        for l in range(self.layout.n_layers - 1, -1, -1):
            a_prev = inp if l == 0 else cache[l - 1][1]
            terms.append((a_prev, delta))
            if l > 0:
                z_prev, a_prev_act = cache[l - 1]
                delta = (delta @ params_W[l].T) * nn.activation_grad(self.act_codes[l - 1], z_prev, a_prev_act)
        terms.reverse()
        if grad is not None:
            Ws, bs = self.layout.views(grad)
            for l, (A, D) in enumerate(terms):
                Ws[l][...] = A.T @ D / B
                bs[l][...] = D.sum(axis=0) / B
        return terms

    def opt_apply(self, params, grad, opt_state, lr, t):
        return opt_state.apply_numpy(params, grad, lr, t)
