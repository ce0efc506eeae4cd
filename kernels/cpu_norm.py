"""Numba kernels of batch norm (with ghost batches) and dropout for the hidden layers.

They follow the kernel contract of ``kernels/cpu.py`` (inputs, then caller-owned outputs,
then scalars; no allocation; integer codes, never names) and are the epilogues of the
cpu backend's BLAS path for a model with batch norm or dropout: Python runs each layer's
GEMM into the workspace (``z_l = h_{l-1} W_l``), then one of these kernels finishes the
layer.  The NumPy reference (``minigd/backends/numpy_ref.py``) holds the readable
definitions they are tested against.

Per hidden layer l (B rows, n units), with ``bn`` the placement code
(``minigd.kernels.codes``: BN_NONE = 0, BN_BEFORE = 1, BN_AFTER = 2):

* ``bn = 0`` (dropout only):  a = f(z);               h = a * mask
* ``bn = 1`` (before):        u = BN(z);  a = f(u);   h = a * mask
* ``bn = 2`` (after):         a = f(z);   v = BN(a);  h = v * mask

BN(x) = gamma * xhat + beta, xhat = (x - mu) / sqrt(var + eps), with mu and the *biased*
var of each ghost batch (consecutive chunks of ``g`` rows; the last may be smaller) in
training mode and the running statistics in evaluation mode.  Statistics are accumulated
in float64.  Buffers (batch-major (B, n) views unless stated):

``Z``    the linear output z (in: h W; the kernel adds the bias in place)
``PRE``  u (bn = 1) or v (bn = 2)
``ACT``  a = f(.)
``XH``   xhat
``H``    the layer output read by the next layer.  Without dropout the caller passes the
         buffer that holds the last value (ACT for bn = 1, PRE for bn = 2) as H, and the
         kernel skips the copy (``has_mask = 0``).
``stats`` (3, n_ghosts, n) float64: per ghost batch the mean, the biased variance and
         1/sqrt(var + eps) of the normalised input.
``acc``  (2, n) float64 scratch.

The backward kernel turns the deltas of h (the mean loss's, so already carrying 1/B)
into the deltas of z in place and writes dgamma, dbeta:
dx = gamma * inv * (dy - mean_g(dy) - xhat * mean_g(dy * xhat)) per ghost batch g.
"""

from __future__ import annotations

import math

from ._jit import jit
from .codes import BN_AFTER, BN_BEFORE
from .cpu import _act_backward, _act_forward


@jit(inline="always")
def _bn_stats(X, B, g, eps, stats, acc):
    """Per ghost batch: mean, biased variance and 1/sqrt(var + eps) of X's columns."""
    n = X.shape[1]
    mu, var, inv = stats[0], stats[1], stats[2]
    k = 0
    for s in range(0, B, g):
        e = min(s + g, B)
        m = e - s
        a = acc[0]
        for j in range(n):
            a[j] = 0.0
        for r in range(s, e):
            x = X[r]
            for j in range(n):
                a[j] += x[j]
        for j in range(n):
            mu[k, j] = a[j] / m
            a[j] = 0.0
        mk = mu[k]
        for r in range(s, e):
            x = X[r]
            for j in range(n):
                dv = x[j] - mk[j]
                a[j] += dv * dv
        for j in range(n):
            var[k, j] = a[j] / m
            inv[k, j] = 1.0 / math.sqrt(a[j] / m + eps)
        k += 1


@jit(inline="always")
def _bn_apply(X, gamma, beta, B, g, mu, inv, XH, Y):
    """XH = (X - mu) * inv (per ghost row block k), Y = gamma * XH + beta."""
    n = X.shape[1]
    k = 0
    for s in range(0, B, g):
        mk = mu[k]
        ik = inv[k]
        for r in range(s, min(s + g, B)):
            x = X[r]
            xh = XH[r]
            y = Y[r]
            for j in range(n):
                v = (x[j] - mk[j]) * ik[j]
                xh[j] = v
                y[j] = gamma[j] * v + beta[j]
        k += 1


@jit(inline="always")
def _bn(X, gamma, beta, rmean, rvar, stats, acc, XH, Y, B, g, training, eps):
    if training:
        _bn_stats(X, B, g, eps, stats, acc)
        _bn_apply(X, gamma, beta, B, g, stats[0], stats[2], XH, Y)
    else:  # one "ghost batch" of B rows with the running statistics (in acc: the
        mu, inv = acc[0:1], acc[1:2]  # training statistics stay for running_update)
        for j in range(X.shape[1]):
            mu[0, j] = rmean[j]
            inv[0, j] = 1.0 / math.sqrt(rvar[j] + eps)
        _bn_apply(X, gamma, beta, B, B, mu, inv, XH, Y)


@jit
def hidden_forward(
    b, gamma, beta, rmean, rvar, mask, Z, PRE, ACT, XH, H, stats, acc, B, g, act, bn, training, has_mask, eps
):
    """Finish hidden layer l after ``Z = h_{l-1} W_l``: bias, batch norm, activation,
    dropout (see the module docstring).  ``g``: rows per ghost batch (>= 2, <= B)."""
    n = Z.shape[1]
    for r in range(B):
        z = Z[r]
        for j in range(n):
            z[j] += b[j]
    if bn == BN_BEFORE:
        _bn(Z, gamma, beta, rmean, rvar, stats, acc, XH, PRE, B, g, training, eps)
        _act_forward(act, PRE.reshape(B * n), ACT.reshape(B * n))
        src = ACT
    else:
        _act_forward(act, Z.reshape(B * n), ACT.reshape(B * n))
        src = ACT
        if bn == BN_AFTER:
            _bn(ACT, gamma, beta, rmean, rvar, stats, acc, XH, PRE, B, g, training, eps)
            src = PRE
    if has_mask:
        for r in range(B):
            s = src[r]
            m = mask[r]
            h = H[r]
            for j in range(n):
                h[j] = s[j] * m[j]


@jit(inline="always")
def _bn_backward(D, XH, gamma, inv, dgamma, dbeta, acc, B, g):
    """D (the deltas of the BN output) -> the deltas of its input, in place; dgamma and
    dbeta (model dtype) receive the column sums over the batch."""
    n = D.shape[1]
    for j in range(n):
        dgamma[j] = 0
        dbeta[j] = 0
    k = 0
    s0, s1 = acc[0], acc[1]
    for s in range(0, B, g):
        e = min(s + g, B)
        m = e - s
        for j in range(n):
            s0[j] = 0.0
            s1[j] = 0.0
        for r in range(s, e):
            d = D[r]
            xh = XH[r]
            for j in range(n):
                s0[j] += d[j]
                s1[j] += d[j] * xh[j]
        ik = inv[k]
        for j in range(n):
            dbeta[j] += s0[j]
            dgamma[j] += s1[j]
            s0[j] /= m
            s1[j] /= m
        for r in range(s, e):
            d = D[r]
            xh = XH[r]
            for j in range(n):
                d[j] = gamma[j] * ik[j] * (d[j] - s0[j] - xh[j] * s1[j])
        k += 1


@jit
def hidden_backward(mask, Z, PRE, ACT, XH, gamma, stats, D, dgamma, dbeta, acc, B, g, act, bn, has_mask):
    """D: the deltas of hidden layer l's output h (in) -> the deltas of its linear
    output z (out), training mode; dgamma/dbeta: views into the gradient vector."""
    n = D.shape[1]
    if has_mask:
        for r in range(B):
            d = D[r]
            m = mask[r]
            for j in range(n):
                d[j] *= m[j]
    if bn == BN_AFTER:
        _bn_backward(D, XH, gamma, stats[2], dgamma, dbeta, acc, B, g)
        _act_backward(act, Z.reshape(B * n), ACT.reshape(B * n), D.reshape(B * n))
    elif bn == BN_BEFORE:
        _act_backward(act, PRE.reshape(B * n), ACT.reshape(B * n), D.reshape(B * n))
        _bn_backward(D, XH, gamma, stats[2], dgamma, dbeta, acc, B, g)
    else:
        _act_backward(act, Z.reshape(B * n), ACT.reshape(B * n), D.reshape(B * n))


@jit
def running_update(stats, B, g, momentum, rmean, rvar):
    """running <- (1 - momentum) running + momentum * (mean, unbiased variance) of the
    whole batch, combined from its ghost batches' (mean, biased variance) (Chan et al.)."""
    mu, var = stats[0], stats[1]
    n = rmean.shape[0]
    G = (B + g - 1) // g
    for j in range(n):
        m = 0.0
        for k in range(G):
            m += min(g, B - k * g) * mu[k, j]
        m /= B
        m2 = 0.0
        for k in range(G):
            dv = mu[k, j] - m
            m2 += min(g, B - k * g) * (var[k, j] + dv * dv)
        rmean[j] = (1 - momentum) * rmean[j] + momentum * m
        rvar[j] = (1 - momentum) * rvar[j] + momentum * (m2 / (B - 1))
