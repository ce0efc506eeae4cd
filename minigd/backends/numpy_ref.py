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
from minigd.backends.base import BN_AFTER, BN_BEFORE, Backend, check_per_example


class NumpyBackend(Backend):
    name = "numpy"

    def _layers(self, params):
        return list(zip(*self.layout.views(params)))

    # -- batch norm and dropout, the readable definitions -------------------------------------
    def _ghosts(self, B, training):
        """Row slices normalised together: ghost batches in training, None in evaluation."""
        if not training:
            return None
        g = self.norm.ghost_size(B)
        return [slice(s, min(s + g, B)) for s in range(0, B, g)]

    def _bn_forward(self, l, x, gamma, beta, ghosts):
        """Batch norm of hidden layer l's (B, n) input x: returns (y, cache).

        Training: each ghost batch is normalised with its own mean and *biased* variance,
        xhat = (x - mu) / sqrt(var + eps); evaluation: with the running statistics.
        y = gamma * xhat + beta.  Statistics are computed in float64."""
        eps = self.norm.eps
        x64 = x.astype(np.float64)
        xhat = np.empty_like(x64)
        inv = np.empty_like(x64)  # 1/sqrt(var + eps), broadcast per row
        stats = []
        if ghosts is None:
            means, vars_ = self.layout.running_views(self.running)
            inv[...] = 1.0 / np.sqrt(vars_[l].astype(np.float64) + eps)
            xhat[...] = (x64 - means[l]) * inv
        else:
            for s in ghosts:
                mu = x64[s].mean(axis=0)
                var = ((x64[s] - mu) ** 2).mean(axis=0)
                inv[s] = 1.0 / np.sqrt(var + eps)
                xhat[s] = (x64[s] - mu) * inv[s]
                stats.append((s.stop - s.start, mu, var))
        y = (gamma * xhat + beta).astype(x.dtype)
        return y, (xhat, inv, ghosts, stats)

    def _bn_backward(self, dy, gamma, cache):
        """(dx, dgamma, dbeta) of batch norm in training mode, per ghost batch:
        dx = gamma * inv * (dy - mean(dy) - xhat * mean(dy * xhat))."""
        xhat, inv, ghosts, _ = cache
        dy64 = dy.astype(np.float64)
        dgamma = (dy64 * xhat).sum(axis=0)
        dbeta = dy64.sum(axis=0)
        dx = np.empty_like(dy64)
        for s in ghosts:
            d, xh = dy64[s], xhat[s]
            dx[s] = gamma * inv[s] * (d - d.mean(axis=0) - xh * (d * xh).mean(axis=0))
        return dx.astype(dy.dtype), dgamma, dbeta

    def _forward_all(self, params, X, idx, B, training=False):
        """Return the input block and a list of per-layer caches ``(z_l, a_l, extra)``:
        z_l the linear output, a_l what the next layer reads (after activation, batch
        norm and dropout), extra what the backward pass needs."""
        a = X[idx[:B]]
        inp = a
        cache = []
        L = self.layout.n_layers
        norm = self.norm
        gammas, betas = self.layout.bn_views(params)
        ghosts = self._ghosts(B, training) if norm is not None and norm.bn else None
        if norm is not None and norm.bn and training:
            norm.check_batch(B)
        for l, (W, b) in enumerate(self._layers(params)):
            z = a @ W + b
            if l == L - 1:
                cache.append((z, z, None))
                break
            act = self.act_codes[l]
            bn = None
            if norm is None or not norm.bn:
                pre, out = z, nn.activation(act, z)
                a = out
            elif norm.bn == BN_BEFORE:
                pre, bn = self._bn_forward(l, z, gammas[l], betas[l], ghosts)
                out = nn.activation(act, pre)
                a = out
            else:
                pre = z
                out = nn.activation(act, z)
                a, bn = self._bn_forward(l, out, gammas[l], betas[l], ghosts)
            mask = None
            if training and self.dropout > 0:
                mask = self.masks[l][:B]
                a = a * mask
            cache.append((z, a, (pre, out, bn, mask)))
        if training:  # the ghost statistics of each hidden layer, for update_running
            self._last_stats = [c[2][2][3] for c in cache[:-1] if c[2][2] is not None]
        return inp, cache

    def _hidden_backward(self, l, d, cache_l, params, grad):
        """Turn d = dLoss/da_l (what the next layer read) into dLoss/dz_l, writing the
        batch-norm scale/shift gradients of layer l into ``grad``."""
        z, _, (pre, out, bn, mask) = cache_l
        act = self.act_codes[l]
        norm = self.norm
        if mask is not None:
            d = d * mask
        gammas = self.layout.bn_views(params)[0]
        ggam, gbet = self.layout.bn_views(grad)
        if norm is not None and norm.bn == BN_AFTER:
            d, dg, db = self._bn_backward(d, gammas[l], bn)
            ggam[l][...], gbet[l][...] = dg, db
        d = d * nn.activation_grad(act, pre, out)
        if norm is not None and norm.bn == BN_BEFORE:
            d, dg, db = self._bn_backward(d, gammas[l], bn)
            ggam[l][...], gbet[l][...] = dg, db
        return d

    def update_running(self, B):
        """running <- (1 - m) running + m * (whole-batch mean, unbiased whole-batch
        variance) of the last training pass, combined from its ghost statistics."""
        if self.norm is None or not self.norm.bn:
            return
        m = self.norm.momentum
        means, vars_ = self.layout.running_views(self.running)
        for l, stats in enumerate(self._last_stats):
            n = np.array([c for c, _, _ in stats], np.float64)[:, None]
            mus = np.array([mu for _, mu, _ in stats])
            vs = np.array([v for _, _, v in stats])
            mu = (n * mus).sum(0) / B
            var = (n * (vs + (mus - mu) ** 2)).sum(0) / (B - 1)
            means[l][...] = (1 - m) * means[l] + m * mu
            vars_[l][...] = (1 - m) * vars_[l] + m * var

    # -- contract --------------------------------------------------------------------------
    def forward(self, params, X, idx, B, training=False):
        return self._forward_all(params, X, idx, B, training)[1][-1][0]

    def losses(self, params, X, yi, yf, idx, B):
        rows = idx[:B]
        z_out = self.forward(params, X, idx, B)
        return nn.per_example_loss(self.loss_code, z_out, yi[rows] if yi.size else yi, yf[rows] if yf.size else yf)

    def _backward(self, params, grad, X, yi, yf, idx, B, visit=None):
        """Forward (training mode) and backward of rows idx[:B]: writes the mean-loss
        gradient into ``grad`` and returns the per-example losses.  ``visit(l, a_prev,
        delta)`` sees each layer's input and per-example deltas (not scaled by 1/B)."""
        rows = idx[:B]
        inp, cache = self._forward_all(params, X, idx, B, training=True)
        z_out = cache[-1][0]
        y_int = yi[rows] if yi.size else yi
        y_float = yf[rows] if yf.size else yf
        losses = nn.per_example_loss(self.loss_code, z_out, y_int, y_float)
        # delta of each *per-example* loss; the mean loss's delta is delta / B
        delta = nn.loss_grad(self.loss_code, z_out, y_int, y_float)
        Ws, bs = self.layout.views(grad)
        params_W = self.layout.views(params)[0]
        for l in range(self.layout.n_layers - 1, -1, -1):
            a_prev = inp if l == 0 else cache[l - 1][1]
            Ws[l][...] = a_prev.T @ delta / B  # dW_l = a_{l-1}^T delta_l (mean)
            bs[l][...] = delta.sum(axis=0) / B  # db_l
            if visit is not None:
                visit(l, a_prev, delta)
            if l > 0:
                delta = self._hidden_backward(l - 1, delta @ params_W[l].T, cache[l - 1], params, grad)
        if self.norm is not None and self.norm.bn:  # dgamma, dbeta of the mean loss
            ggam, gbet = self.layout.bn_views(grad)
            for l in range(len(ggam)):
                ggam[l][...] /= B
                gbet[l][...] /= B
        return losses

    def loss_grad(self, params, grad, X, yi, yf, idx, B, want_sqn=False, want_row_loss=False):
        sqn = np.zeros(B, np.float64)

        def visit(l, a_prev, delta):  # |a_r|^2 |delta_r|^2 + |delta_r|^2 (outer product)
            sqn[...] += ((a_prev.astype(np.float64) ** 2).sum(1) + 1) * (delta.astype(np.float64) ** 2).sum(1)

        if want_sqn:
            check_per_example(self.norm, "per-example gradient norms")
        losses = self._backward(params, grad, X, yi, yf, idx, B, visit if want_sqn else None)
        loss = float(losses.mean())
        if want_sqn:
            return loss, sqn
        return loss, (losses if want_row_loss else None)

    def per_example_terms(self, params, X, yi, yf, idx, B, grad=None):
        """[(A_l, Dper_l)] per layer: the layer input and the deltas of each example's own
        loss; example r's gradient is outer(A_l[r], Dper_l[r]) for W_l, Dper_l[r] for b_l.
        With ``grad`` the mean-loss gradient (their mean over rows) is written there."""
        check_per_example(self.norm, "per-example gradients")
        terms = []
        g = np.zeros(self.layout.n_params, self.dtype) if grad is None else grad
        self._backward(params, g, X, yi, yf, idx, B, lambda l, a, d: terms.append((a, d)))
        terms.reverse()
        return terms

    def opt_apply(self, params, grad, opt_state, lr, t):
        return opt_state.apply_numpy(params, grad, lr, t)
