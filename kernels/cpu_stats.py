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


#: a layer with fewer outputs than this (and more inputs) is swept transposed, so that the
#: vectorised inner loop runs over its inputs rather than over a handful of outputs
SWAP_BELOW = 32


# ----------------------------------------------------------------------------- helpers
@jit
def _sq_dev(Pt, Q, M, out):
    """out[o, j] = sum_r (Pt[o, r] * Q[r, j] - M[o, j])^2 for all o, j (exact two-pass
    form: each deviation is formed before it is squared; never E[x^2] - E[x]^2).

    Pt (n_o, B), Q (B, n_j), M and out (n_o, n_j), all of the model dtype.  Four rows o
    and four examples r per sweep of the vectorised j loop (one load/store of ``out``
    per 16 products): at two fused multiply-adds per term this runs near the FMA
    throughput of AVX2.  (Not inlined: compiled once, called for every layer.)
    """
    no, B = Pt.shape
    nj = Q.shape[1]
    o = 0
    while o + 4 <= no:
        c0 = out[o]
        c1 = out[o + 1]
        c2 = out[o + 2]
        c3 = out[o + 3]
        m0 = M[o]
        m1 = M[o + 1]
        m2 = M[o + 2]
        m3 = M[o + 3]
        p0 = Pt[o]
        p1 = Pt[o + 1]
        p2 = Pt[o + 2]
        p3 = Pt[o + 3]
        for j in range(nj):
            c0[j] = 0
            c1[j] = 0
            c2[j] = 0
            c3[j] = 0
        r = 0
        while r + 4 <= B:
            d0 = Q[r]
            d1 = Q[r + 1]
            d2 = Q[r + 2]
            d3 = Q[r + 3]
            a00, a01, a02, a03 = p0[r], p0[r + 1], p0[r + 2], p0[r + 3]
            a10, a11, a12, a13 = p1[r], p1[r + 1], p1[r + 2], p1[r + 3]
            a20, a21, a22, a23 = p2[r], p2[r + 1], p2[r + 2], p2[r + 3]
            a30, a31, a32, a33 = p3[r], p3[r + 1], p3[r + 2], p3[r + 3]
            for j in range(nj):
                x0 = d0[j]
                x1 = d1[j]
                x2 = d2[j]
                x3 = d3[j]
                u = m0[j]
                t0, t1, t2, t3 = a00 * x0 - u, a01 * x1 - u, a02 * x2 - u, a03 * x3 - u
                c0[j] = c0[j] + t0 * t0 + t1 * t1 + t2 * t2 + t3 * t3
                u = m1[j]
                t0, t1, t2, t3 = a10 * x0 - u, a11 * x1 - u, a12 * x2 - u, a13 * x3 - u
                c1[j] = c1[j] + t0 * t0 + t1 * t1 + t2 * t2 + t3 * t3
                u = m2[j]
                t0, t1, t2, t3 = a20 * x0 - u, a21 * x1 - u, a22 * x2 - u, a23 * x3 - u
                c2[j] = c2[j] + t0 * t0 + t1 * t1 + t2 * t2 + t3 * t3
                u = m3[j]
                t0, t1, t2, t3 = a30 * x0 - u, a31 * x1 - u, a32 * x2 - u, a33 * x3 - u
                c3[j] = c3[j] + t0 * t0 + t1 * t1 + t2 * t2 + t3 * t3
            r += 4
        while r < B:
            d0 = Q[r]
            a00, a10, a20, a30 = p0[r], p1[r], p2[r], p3[r]
            for j in range(nj):
                x0 = d0[j]
                t0 = a00 * x0 - m0[j]
                t1 = a10 * x0 - m1[j]
                t2 = a20 * x0 - m2[j]
                t3 = a30 * x0 - m3[j]
                c0[j] += t0 * t0
                c1[j] += t1 * t1
                c2[j] += t2 * t2
                c3[j] += t3 * t3
            r += 1
        o += 4
    while o < no:
        c0 = out[o]
        m0 = M[o]
        p0 = Pt[o]
        for j in range(nj):
            c0[j] = 0
        r = 0
        while r + 4 <= B:
            d0 = Q[r]
            d1 = Q[r + 1]
            d2 = Q[r + 2]
            d3 = Q[r + 3]
            a00, a01, a02, a03 = p0[r], p0[r + 1], p0[r + 2], p0[r + 3]
            for j in range(nj):
                u = m0[j]
                t0, t1, t2, t3 = a00 * d0[j] - u, a01 * d1[j] - u, a02 * d2[j] - u, a03 * d3[j] - u
                c0[j] = c0[j] + t0 * t0 + t1 * t1 + t2 * t2 + t3 * t3
            r += 4
        while r < B:
            d0 = Q[r]
            a00 = p0[r]
            for j in range(nj):
                t0 = a00 * d0[j] - m0[j]
                c0[j] += t0 * t0
            r += 1
        o += 1


@jit(inline="always")
def _transpose(X, out):
    """out[j, r] = X[r, j]; X (B, n), out (n, B); in 32 x 32 tiles (cache friendly)."""
    B, n = X.shape
    T = 32
    for r0 in range(0, B, T):
        r1 = min(r0 + T, B)
        for j0 in range(0, n, T):
            j1 = min(j0 + T, n)
            for j in range(j0, j1):
                o = out[j]
                for r in range(r0, r1):
                    o[r] = X[r, j]


@jit(inline="always")
def _merge(mu, m2b, st_mean, st_m2, n_old, w, c):
    """Chan et al.'s parallel update of the float64 running state (flat views) with a
    chunk of k examples whose mean is ``mu`` and M2 ``m2b``:  delta = mu - mean;
    mean += delta * k/n';  M2 += M2_b + delta^2 * n k / n'   (w = k/n', c = n k/n')."""
    if n_old == 0:
        for p in range(mu.shape[0]):
            st_mean[p] = mu[p]
            st_m2[p] = m2b[p]
    else:
        for p in range(mu.shape[0]):
            d = mu[p] - st_mean[p]
            st_mean[p] += d * w
            st_m2[p] += m2b[p] + d * d * c


# ----------------------------------------------------------------------------- entry points
@jit
def moments_update(B, grad, ws, lay, n_old, st_mean, st_m2, tr, dsc, mus, acc):
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
        flat parameter order; overwritten when ``n_old == 0``.
    tr, dsc : (>= max width * B,) model dtype, scratch (a transposed block; per-example
        deltas)
    mus, acc : (>= largest fan_in * fan_out,) model dtype, scratch

    Notes
    -----
    Per parameter the chunk's M2 is the exact two-pass sum of squared deviations from the
    chunk mean, computed from the layer inputs A and the per-example deltas B * D:
    M2_b[i, j] = sum_r (A[r, i] (B D[r, j]) - mean_b[i, j])^2 for the weights (the bias is
    the same with A = 1), accumulated in the model dtype over the B rows, then combined
    with the float64 state by Chan et al.'s rule (Welford for B = 1).  E[g^2] - E[g]^2 is
    never formed.  Cost: about two fused multiply-adds per example and parameter, plus
    one pass over the float64 state.
    """
    L = lay[R_MISC, 3]
    n_new = n_old + B
    w = B / n_new
    c = n_old * (B / n_new)
    for l in range(L):
        A = _input(ws, lay, l, B)
        D = _blk(ws, lay, R_D, l, B)
        gW = _W(grad, lay, l)
        fi, fo = gW.shape
        npar = fi * fo
        out = acc[:npar]
        if fo < SWAP_BELOW and fi > fo:     # sweep (j, i): the inner loop runs over inputs
            Pt = tr[:fo * B].reshape(fo, B)
            for r in range(B):              # Pt = (B D)^T: per-example deltas, transposed
                for j in range(fo):
                    Pt[j, r] = D[r, j] * B
            M = mus[:npar].reshape(fo, fi)
            for i in range(fi):
                for j in range(fo):
                    M[j, i] = gW[i, j]
            _sq_dev(Pt, A, M, out.reshape(fo, fi))
            flat = mus[:npar]               # back to the parameter order (i, j)
            for j in range(fo):
                for i in range(fi):
                    flat[i * fo + j] = out[j * fi + i]
        else:
            Pt = tr[:fi * B].reshape(fi, B)
            _transpose(A, Pt)
            Dp = dsc[:B * fo].reshape(B, fo)
            for r in range(B):
                for j in range(fo):
                    Dp[r, j] = D[r, j] * B
            _sq_dev(Pt, Dp, gW, out.reshape(fi, fo))
            flat = out
        o = lay[R_WOFF, l]
        _merge(grad[o:o + npar], flat, st_mean[o:o + npar], st_m2[o:o + npar], n_old, w, c)
        # bias: the same with A = 1
        gb = _b(grad, lay, l)
        outb = acc[:fo]
        for j in range(fo):
            outb[j] = 0
        for r in range(B):
            d = D[r]
            for j in range(fo):
                t = d[j] * B - gb[j]
                outb[j] += t * t
        o = lay[R_BOFF, l]
        _merge(gb, outb, st_mean[o:o + fo], st_m2[o:o + fo], n_old, w, c)


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


@jit
def sum64(rows):
    """Sum of a 1-D array accumulated in float64 (the per-example squared norms of a
    tracked step: one compiled call costs less than numpy's reduction at these sizes)."""
    s = 0.0
    for r in range(rows.shape[0]):
        s += rows[r]
    return s
