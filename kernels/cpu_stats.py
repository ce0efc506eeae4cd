"""Numba CPU kernels for per-example gradient statistics (see ``minigd.gradstats``).

They follow the kernel contract of :mod:`minigd.kernels.cpu` (procedures, caller-owned
buffers, C-contiguous arrays, the ``lay`` table, model dtype float32 or float64) and read
the workspace that a ``loss_grad`` call has just filled: for each layer l the input block
``A_l`` (the gathered x0 for l = 0, else a_{l-1}; (B, n_l)) and the deltas ``D_l`` of the
**mean** batch loss ((B, n_{l+1}); per-example deltas are ``B * D_l``).

Per-example gradients are never materialised.  For a dense layer the gradient of example
r's own loss is ``g_r = B * A[r]^T D[r]`` for the weights (an outer product) and
``B * D[r]`` for the bias, and the chunk mean of the ``g_r`` is the batch gradient.
"""
from __future__ import annotations

from ._jit import jit
from .cpu import R_BOFF, R_D, R_MISC, R_WOFF, _b, _blk, _input, _W


# ----------------------------------------------------------------------------- helpers
@jit(inline="always")
def _m2_weight_row(A, i, D, mus, acc, nz, B):
    """acc[j] = sum_r (A[r, i] * D[r, j] - mus[j])^2, exact two-pass form (no E[x^2]-E[x]^2).

    ``mus`` is the chunk mean divided by B (the scale of D), so the sum is B^-2 times the
    per-example M2.  Rows with A[r, i] == 0 (ReLU zeros, sparse inputs) contribute
    mus[j]^2 each and are counted instead of visited.  ``nz`` (>= B,) int64 scratch.
    """
    m = 0
    for r in range(B):
        if A[r, i] != 0:
            nz[m] = r
            m += 1
    fo = mus.shape[0]
    zeros = B - m
    for j in range(fo):
        acc[j] = zeros * (mus[j] * mus[j])
    q = 0
    while q + 4 <= m:   # four rows per sweep: one load/store of acc per four examples
        r0 = nz[q]
        r1 = nz[q + 1]
        r2 = nz[q + 2]
        r3 = nz[q + 3]
        a0 = A[r0, i]
        a1 = A[r1, i]
        a2 = A[r2, i]
        a3 = A[r3, i]
        d0 = D[r0]
        d1 = D[r1]
        d2 = D[r2]
        d3 = D[r3]
        for j in range(fo):
            mj = mus[j]
            t0 = a0 * d0[j] - mj
            t1 = a1 * d1[j] - mj
            t2 = a2 * d2[j] - mj
            t3 = a3 * d3[j] - mj
            acc[j] += (t0 * t0 + t1 * t1) + (t2 * t2 + t3 * t3)
        q += 4
    while q < m:
        r0 = nz[q]
        a0 = A[r0, i]
        d0 = D[r0]
        for j in range(fo):
            t0 = a0 * d0[j] - mus[j]
            acc[j] += t0 * t0
        q += 1


@jit(inline="always")
def _m2_bias(D, mus, acc, B):
    """acc[j] = sum_r (D[r, j] - mus[j])^2 (the bias: the weight case with A = 1)."""
    fo = mus.shape[0]
    for j in range(fo):
        acc[j] = 0
    q = 0
    while q + 4 <= B:
        d0 = D[q]
        d1 = D[q + 1]
        d2 = D[q + 2]
        d3 = D[q + 3]
        for j in range(fo):
            mj = mus[j]
            t0 = d0[j] - mj
            t1 = d1[j] - mj
            t2 = d2[j] - mj
            t3 = d3[j] - mj
            acc[j] += (t0 * t0 + t1 * t1) + (t2 * t2 + t3 * t3)
        q += 4
    while q < B:
        d0 = D[q]
        for j in range(fo):
            t0 = d0[j] - mus[j]
            acc[j] += t0 * t0
        q += 1


@jit(inline="always")
def _merge_row(mu, acc, s2scale, st_mean, st_m2, n_old, w, c):
    """Chan et al.'s parallel update of one row of the float64 running state with a chunk
    of k examples (mean ``mu``, M2 ``s2scale * acc``): delta = mu - mean;
    mean += delta * k/n'; M2 += M2_b + delta^2 * n k / n'  (w = k/n', c = n k / n')."""
    fo = mu.shape[0]
    if n_old == 0:
        for j in range(fo):
            st_mean[j] = mu[j]
            st_m2[j] = s2scale * acc[j]
    else:
        for j in range(fo):
            d = mu[j] - st_mean[j]
            st_mean[j] += d * w
            st_m2[j] += s2scale * acc[j] + d * d * c


# ----------------------------------------------------------------------------- entry points
@jit
def moments_update(B, grad, ws, lay, n_old, st_mean, st_m2, mus, acc, nz):
    """Fold the per-example gradients of the batch in the workspace into running moments.

    Parameters
    ----------
    B : int
        Rows in the batch (the chunk), >= 1.
    grad : (P,) model dtype, read
        The batch gradient of the mean loss, i.e. the chunk mean of the per-example
        gradients (as written by ``loss_grad`` for the same batch).
    ws, lay : read
        The workspace filled by that ``loss_grad`` call and its layout table.
    n_old : int
        Examples already in the running state.
    st_mean, st_m2 : (P,) float64, read and written
        Running mean and M2 = sum_i (g_i - mean)^2 of the per-example gradients, in the
        flat parameter order; ignored (overwritten) when ``n_old == 0``.
    mus, acc : (>= max layer width,) model dtype, scratch
    nz : (>= B,) int64, scratch

    Notes
    -----
    Per parameter the chunk's M2 is the exact two-pass sum of squared deviations from the
    chunk mean, sum_r (g_r - mean_b)^2, accumulated in the model dtype over the B rows;
    it is combined with the state in float64 by Chan et al.'s rule (Welford for B = 1).
    E[g^2] - E[g]^2 is never formed.  Cost: two fused multiply-adds per example and
    parameter (rows with a zero input are skipped), and one pass over the state.
    """
    L = lay[R_MISC, 3]
    n_new = n_old + B
    w = B / n_new
    c = n_old * (B / n_new)
    bb = float(B) * float(B)
    inv_b = 1.0 / B
    for l in range(L):
        A = _input(ws, lay, l, B)
        D = _blk(ws, lay, R_D, l, B)
        mu = _W(grad, lay, l)
        sm = _W(st_mean, lay, l)
        s2 = _W(st_m2, lay, l)
        fi, fo = mu.shape
        ms = mus[:fo]
        ac = acc[:fo]
        for i in range(fi):
            mrow = mu[i]
            for j in range(fo):
                ms[j] = mrow[j] * inv_b
            _m2_weight_row(A, i, D, ms, ac, nz, B)
            _merge_row(mrow, ac, bb, sm[i], s2[i], n_old, w, c)
        mb = _b(grad, lay, l)
        for j in range(fo):
            ms[j] = mb[j] * inv_b
        _m2_bias(D, ms, ac, B)
        _merge_row(mb, ac, bb, _b(st_mean, lay, l), _b(st_m2, lay, l), n_old, w, c)


@jit
def per_example_fill(B, ws, lay, out, tmp):
    """out[r, :] = the flat per-example gradient of batch row r (W0, b0, W1, b1, ...):
    outer(A_l[r], B * D_l[r]) for each weight block and B * D_l[r] for each bias.

    ``out`` is (>= B, P) of the model dtype, C-contiguous, written; ``tmp`` (>= max layer
    width,) model dtype scratch (keeps the inner loop in the model dtype).
    """
    L = lay[R_MISC, 3]
    for l in range(L):
        A = _input(ws, lay, l, B)
        D = _blk(ws, lay, R_D, l, B)
        fi = A.shape[1]
        fo = D.shape[1]
        wo = lay[R_WOFF, l]
        bo = lay[R_BOFF, l]
        ds = tmp[:fo]
        for r in range(B):
            o = out[r]
            d = D[r]
            for j in range(fo):
                ds[j] = d[j] * B
            for i in range(fi):
                a = A[r, i]
                base = wo + i * fo
                for j in range(fo):
                    o[base + j] = a * ds[j]
            for j in range(fo):
                o[bo + j] = ds[j]
