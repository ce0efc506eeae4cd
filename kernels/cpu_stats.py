"""Numba CPU kernels for per-example gradient statistics (see ``minigd.gradstats``).

They follow the kernel contract of :mod:`minigd.kernels.cpu` (procedures, caller-owned
buffers, C-contiguous arrays, the ``lay`` table, model dtype float32 or float64) and read
the workspace that a ``loss_grad`` call has just filled: for each layer l the input block
``A_l`` (the gathered x0 for l = 0, else a_{l-1}; (B, n_l)) and the deltas ``D_l`` of the
**mean** batch loss ((B, n_{l+1}); per-example deltas are ``B * D_l``).

Per-example gradients are never materialised.  For a dense layer the gradient of example
r's own loss is ``g_r = B * A[r]^T D[r]`` for the weights (an outer product) and
``B * D[r]`` for the bias, and the chunk mean of the ``g_r`` is the batch gradient.

Moments: :func:`moments_update` reduces each chunk by the exact two-pass form in the
model dtype; :func:`moments_update_blocked` (the float32 default) by the same sweep with its
sums added into float64 every :data:`BLOCK_ROWS` rows and a guard against the float32
centre's rounding; :func:`moments_update_shortcut` by one float64 GEMM of squared factors
per layer, guarded against cancellation (the derivations are in their docstrings).
"""

from __future__ import annotations

import math

import numpy as np

from . import _tiles
from ._jit import FASTMATH_ORDERED, jit
from .cpu import (
    _W,
    R_BOFF,
    R_D,
    R_MISC,
    R_SIZE,
    R_WOFF,
    _b,
    _blk,
    _input,
    sum64,  # noqa: F401  (re-exported: it lived here; the compiled run of steps calls it)
)

#: a layer with fewer outputs than this (and more inputs) is swept transposed, so that the
#: vectorised inner loop runs over its inputs rather than over a handful of outputs
SWAP_BELOW = 32


# ----------------------------------------------------------------------------- helpers
@jit(inline="always")
def _flush_rows(out, S, o0, o1, nj):
    """S[o, j] += out[o, j] in float64, then out[o, j] = 0, for rows o0 <= o < o1."""
    for o in range(o0, o1):
        for j in range(nj):
            S[o, j] += np.float64(out[o, j])
            out[o, j] = 0


@jit(fastmath=FASTMATH_ORDERED)
def _sq_dev(Pt, Q, M, out, S, every):
    """out[o, j] = sum_r (Pt[o, r] * Q[r, j] - M[o, j])^2 for all o, j (exact two-pass
    form: each deviation is formed before it is squared; never E[x^2] - E[x]^2).

    Pt (n_o, B) is the transposed view (``.T``, F-ordered) of a C-contiguous (B, n_o)
    block -- the layer input or the per-example deltas, read in place rather than copied
    transposed (its entries are loaded once per 4 x 4 block, outside the vector loop);
    Q (B, n_j), M and out (n_o, n_j) are C-contiguous; all of the model dtype.  Four rows o
    and four examples r per sweep of the vectorised j loop (one load/store of ``out``
    per 16 products): at two fused multiply-adds per term this runs near the FMA
    throughput of AVX2.  (Not inlined: compiled once, called for every layer.)  Rows are
    indexed in the 2-D arrays, not through row views: numba counts references (atomic
    increments) of every view it makes, ~600 per call for 64-128-128-10 at B = 8.

    The four rows r of a sweep are summed first (from the first one), then added to ``out``:
    groups of 4 rows, as the tiles of :mod:`._tiles` group 8 (why: their module docstring).
    Compiled without ``reassoc`` (:data:`._jit.FASTMATH_ORDERED`), which would let LLVM undo
    the grouping; the j loop has no reduction and vectorises without it.

    ``every`` > 0: ``out`` holds partial sums only, added into the float64 ``S`` (n_o, n_j)
    every ``every`` rows (a multiple of 4) and at the end, so that no sum is more than
    ``every`` rows deep in the model dtype (S = the sums; ``out`` is left undefined);
    ``every`` = 0: ``out`` holds the whole sums and ``S`` is not touched (may be empty).
    """
    no, B = Pt.shape
    nj = Q.shape[1]
    o = 0
    while o + 4 <= no:
        o1, o2, o3 = o + 1, o + 2, o + 3
        for k in range(4):
            for j in range(nj):
                out[o + k, j] = 0
        if every > 0:
            for k in range(4):
                for j in range(nj):
                    S[o + k, j] = 0.0
        r = 0
        while r + 4 <= B:
            if every > 0 and r > 0 and r % every == 0:
                _flush_rows(out, S, o, o + 4, nj)
            r1, r2, r3 = r + 1, r + 2, r + 3
            a00, a01, a02, a03 = Pt[o, r], Pt[o, r1], Pt[o, r2], Pt[o, r3]
            a10, a11, a12, a13 = Pt[o1, r], Pt[o1, r1], Pt[o1, r2], Pt[o1, r3]
            a20, a21, a22, a23 = Pt[o2, r], Pt[o2, r1], Pt[o2, r2], Pt[o2, r3]
            a30, a31, a32, a33 = Pt[o3, r], Pt[o3, r1], Pt[o3, r2], Pt[o3, r3]
            for j in range(nj):
                x0 = Q[r, j]
                x1 = Q[r1, j]
                x2 = Q[r2, j]
                x3 = Q[r3, j]
                u = M[o, j]
                t0, t1, t2, t3 = a00 * x0 - u, a01 * x1 - u, a02 * x2 - u, a03 * x3 - u
                out[o, j] = out[o, j] + (t0 * t0 + t1 * t1 + t2 * t2 + t3 * t3)
                u = M[o1, j]
                t0, t1, t2, t3 = a10 * x0 - u, a11 * x1 - u, a12 * x2 - u, a13 * x3 - u
                out[o1, j] = out[o1, j] + (t0 * t0 + t1 * t1 + t2 * t2 + t3 * t3)
                u = M[o2, j]
                t0, t1, t2, t3 = a20 * x0 - u, a21 * x1 - u, a22 * x2 - u, a23 * x3 - u
                out[o2, j] = out[o2, j] + (t0 * t0 + t1 * t1 + t2 * t2 + t3 * t3)
                u = M[o3, j]
                t0, t1, t2, t3 = a30 * x0 - u, a31 * x1 - u, a32 * x2 - u, a33 * x3 - u
                out[o3, j] = out[o3, j] + (t0 * t0 + t1 * t1 + t2 * t2 + t3 * t3)
            r += 4
        while r < B:
            a00, a10, a20, a30 = Pt[o, r], Pt[o1, r], Pt[o2, r], Pt[o3, r]
            for j in range(nj):
                x0 = Q[r, j]
                t0 = a00 * x0 - M[o, j]
                t1 = a10 * x0 - M[o1, j]
                t2 = a20 * x0 - M[o2, j]
                t3 = a30 * x0 - M[o3, j]
                out[o, j] += t0 * t0
                out[o1, j] += t1 * t1
                out[o2, j] += t2 * t2
                out[o3, j] += t3 * t3
            r += 1
        if every > 0:
            _flush_rows(out, S, o, o + 4, nj)
        o += 4
    while o < no:
        for j in range(nj):
            out[o, j] = 0
        if every > 0:
            for j in range(nj):
                S[o, j] = 0.0
        r = 0
        while r + 4 <= B:
            if every > 0 and r > 0 and r % every == 0:
                _flush_rows(out, S, o, o + 1, nj)
            r1, r2, r3 = r + 1, r + 2, r + 3
            a00, a01, a02, a03 = Pt[o, r], Pt[o, r1], Pt[o, r2], Pt[o, r3]
            for j in range(nj):
                u = M[o, j]
                t0, t1, t2, t3 = a00 * Q[r, j] - u, a01 * Q[r1, j] - u, a02 * Q[r2, j] - u, a03 * Q[r3, j] - u
                out[o, j] = out[o, j] + (t0 * t0 + t1 * t1 + t2 * t2 + t3 * t3)
            r += 4
        while r < B:
            a00 = Pt[o, r]
            for j in range(nj):
                t0 = a00 * Q[r, j] - M[o, j]
                out[o, j] += t0 * t0
            r += 1
        if every > 0:
            _flush_rows(out, S, o, o + 1, nj)
        o += 1


_TILE = _tiles.TILE
#: rows per pass of :func:`_sq_dev_tiled` over a layer (a multiple of every ``every`` used):
#: one 48-column block of Q over these rows (24 KB) and the lines of P it meets stay in the
#: L1 cache while every tile row of the layer passes over them (measured on the Xeon, 784 x
#: 256 and 256 x 256 at B = 512 and 2048: 32-37 G terms/s at 128 rows, 31-37 at 64, 30-36 at
#: 256, 28-34 at 512; column blocks outermost instead: 26-37)
TILE_PASS_ROWS = 128
#: chunks of fewer rows are swept by ``_sq_dev`` even where the tiles are used: a tile's
#: fixed cost (its centres loaded, its float64 sums zeroed and added) is then not repaid
#: (784-256-256-10 at B = 8: 3.3x a plain step with the tiles, 3.0x without)
TILE_MIN_ROWS = 16
#: :func:`_sq_dev_tiled` copies Q's column blocks into a panel when the layer has at least
#: this many rows o to sweep over them
PACK_ROWS = 32


@jit(inline="always")
def _tile(I, J, p, ldp, q, ldq, m, ldm, s, lds, nr, every, init):
    """Run the ``I`` x ``J``-vector tile of :mod:`._tiles` (pointers as integers)."""
    _TILE(I, J, p, ldp, q, ldq, m, ldm, s, lds, nr, every, init)


@jit(inline="always")
def _tile_rows(no, J, p, ldp, q, ldq, m, ldm, s, lds, nr, every, init):
    """The tiles over all ``no`` rows o of one column block (4 rows at a time, then the rest)."""
    o = 0
    while o < no:
        I = min(4, no - o)
        _tile(I, J, p + 4 * o, ldp, q, ldq, m + 4 * o * ldm, ldm, s + 8 * o * lds, lds, nr, every, init)
        o += I


@jit
def _sq_dev_tiled(P, Q, M, S, every, qt, mt, st):
    """S[o, j] = sum_r (P[r, o] * Q[r, j] - M[o, j])^2 in float64 for all o, j: the sweep of
    :func:`_sq_dev` (``every`` > 0) by the register-blocked tiles of :mod:`._tiles`, whose
    arithmetic it is (each deviation one float32 fma, squared and summed by fmas in float32,
    the sums added into S every ``every`` rows).

    P (B, n_o), Q (B, n_j) and M (n_o, n_j) float32 and S (n_o, n_j) float64, all
    C-contiguous (P is the block itself, not its transposed view as for ``_sq_dev``);
    ``every`` divides :data:`TILE_PASS_ROWS`.  Rows in passes of :data:`TILE_PASS_ROWS`;
    columns in blocks of up to 3 vectors of 16 (2 + 2 where 3 + 1 would leave a one-vector
    block, whose 4 broadcasts per 8 fmas make it load-bound), each block's rows of the pass
    first copied into the float32 panel ``qt`` (>= 48 min(B, :data:`TILE_PASS_ROWS`)): with a
    row stride of 192 bytes, not Q's (1 KB for 256 columns, which maps the block's rows onto
    a few L1 sets: 784 x 256 ran at 28 G terms/s in place, 240 columns at 31, 256 x 256 at 34
    against 38).  The last n_j mod 16 columns are zero-padded to one vector, with their
    centres in the float32 scratch ``mt`` (>= 16 n_o) and sums in the float64 ``st``
    (>= 16 n_o).  Below :data:`PACK_ROWS` rows o the panel is not worth its copy (a 10 x 256
    sweep: 16 G terms/s with it, 30-39 without), and Q is read in place.
    :func:`._tiles.ensure` must have run.
    """
    B, no = P.shape
    nj = Q.shape[1]
    if every < 1 or TILE_PASS_ROWS % every != 0:
        raise ValueError("_sq_dev_tiled: every must divide TILE_PASS_ROWS")
    if not (P.flags.c_contiguous and Q.flags.c_contiguous and M.flags.c_contiguous and S.flags.c_contiguous):
        raise ValueError("_sq_dev_tiled: P, Q, M and S must be C-contiguous")
    if Q.shape[0] != B or M.shape != (no, nj) or S.shape != (no, nj):
        raise ValueError("_sq_dev_tiled: shapes must be P (B, n_o), Q (B, n_j), M and S (n_o, n_j)")
    W = _tiles.LANES
    if qt.shape[0] < 3 * W * min(B, TILE_PASS_ROWS) or mt.shape[0] < W * no or st.shape[0] < W * no:
        raise ValueError("_sq_dev_tiled: scratch too small")
    nv = nj // W
    rem = nj - nv * W
    pp, mp, sp, qtp = P.ctypes.data, M.ctypes.data, S.ctypes.data, qt.ctypes.data
    if rem > 0:
        m2 = mt[: no * W].reshape(no, W)
        for o in range(no):
            for j in range(W):
                m2[o, j] = M[o, nv * W + j] if j < rem else 0
    for r0 in range(0, B, TILE_PASS_ROWS):
        nr = min(TILE_PASS_ROWS, B - r0)
        init = 1 if r0 == 0 else 0
        j0 = 0
        while j0 < nj:
            left = (nj - j0) // W  # whole vectors left
            J = 2 if left == 4 or left == 2 else min(3, left)
            if J == 0:  # the last rem columns, zero-padded
                J = 1
            w = min(J * W, nj - j0)
            p0 = pp + 4 * r0 * no
            if w == J * W and no < PACK_ROWS:  # Q in place
                q0, ld = Q.ctypes.data + 4 * (r0 * nj + j0), nj
            else:
                ld = J * W
                panel = qt[: nr * ld].reshape(nr, ld)
                for r in range(nr):
                    for j in range(w):
                        panel[r, j] = Q[r0 + r, j0 + j]
                    for j in range(w, ld):
                        panel[r, j] = 0
                q0 = qtp
            if w == J * W:
                _tile_rows(no, J, p0, no, q0, ld, mp + 4 * j0, nj, sp + 8 * j0, nj, nr, every, init)
            else:
                _tile_rows(no, J, p0, no, q0, ld, mt.ctypes.data, W, st.ctypes.data, W, nr, every, init)
            j0 += w
    if rem > 0:
        s2 = st[: no * W].reshape(no, W)
        for o in range(no):
            for j in range(rem):
                S[o, nv * W + j] = s2[o, j]


@jit(inline="always")
def _factors(ws, lay, l, B):
    """(A, D): layer l's input block (B, fan_in) and its deltas of the mean loss (B, fan_out),
    views of the workspace a ``loss_grad`` call filled."""
    return _input(ws, lay, l, B), _blk(ws, lay, R_D, l, B)


@jit(inline="always")
def _chan_weights(n_old, B):
    """(w, c) of :func:`_merge` for a chunk of B examples joining n_old: k/n' and n k/n'."""
    n_new = n_old + B
    return B / n_new, n_old * (B / n_new)


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
    tr, dsc : (>= max width * B,) model dtype, scratch (per-example deltas, for the
        transposed and the plain sweep)
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
    w, c = _chan_weights(n_old, B)
    no_s = np.empty((0, 0), np.float64)  # (_sq_dev's float64 target: none here)
    for l in range(L):
        A, D = _factors(ws, lay, l, B)
        gW = _W(grad, lay, l)
        fi, fo = gW.shape
        npar = fi * fo
        out = acc[:npar]
        if fo < SWAP_BELOW and fi > fo:  # sweep (j, i): the inner loop runs over inputs
            Xp = tr[: B * fo].reshape(B, fo)
            for r in range(B):  # B D: the per-example deltas
                for j in range(fo):
                    Xp[r, j] = D[r, j] * B
            M = mus[:npar].reshape(fo, fi)
            for i in range(fi):
                for j in range(fo):
                    M[j, i] = gW[i, j]
            _sq_dev(Xp.T, A, M, out.reshape(fo, fi), no_s, _EVERY[0])
            flat = mus[:npar]  # back to the parameter order (i, j)
            for j in range(fo):
                for i in range(fi):
                    flat[i * fo + j] = out[j * fi + i]
        else:
            Dp = dsc[: B * fo].reshape(B, fo)
            for r in range(B):
                for j in range(fo):
                    Dp[r, j] = D[r, j] * B
            _sq_dev(A.T, Dp, gW, out.reshape(fi, fo), no_s, _EVERY[0])
            flat = out
        o = lay[R_WOFF, l]
        _merge(grad[o : o + npar], flat, st_mean[o : o + npar], st_m2[o : o + npar], n_old, w, c)
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
        _merge(gb, outb, st_mean[o : o + fo], st_m2[o : o + fo], n_old, w, c)


# ----------------------------------------------------------------------------- blocked two-pass (float32 default)
#: rows per float32 partial sum of the blocked two-pass form (then added into float64); each
#: is summed in groups of ``_tiles.GROUP_ROWS`` = 8 rows (the tiles) or 4 (``_sq_dev``)
BLOCK_ROWS = 32
#: the blocked form's float32 sums are within this many u = 2^-24 (relative, first order) of
#: the exact sums of squared deviations, for any data whose squares are normal floats (see
#: :data:`BLOCKED_FLOOR_TAU` for the others): the deviation's rounding (2 u on its square),
#: g roundings in a group of g rows (its first square's own, then g - 1 additions),
#: BLOCK_ROWS / g - 1 additions of the groups' sums (g = 8 or 4: 13 either way).  64-row
#: blocks summed row after row allowed 65 u -- reached on sparse ReLU layers, whose zero
#: products each add the same (-mean)^2 after one large row and round alike (3.0-3.5e-6 on
#: the digits: bench/results/gradstats_issue20.md)
BLOCKED_ULPS = 13
#: relative error the centre's rounding may add to a chunk's M2 where the blocked form keeps
#: it (the guard of :func:`moments_update_blocked`)
BLOCKED_TAU = 1e-7
#: relative error the underflow of the float32 sums may add to a chunk's M2 where the blocked
#: form keeps it.  A float32 result below 2^-126 (a subnormal) is off by up to 2^-150
#: absolute, whatever its size, so the relative bound above fails for tiny deviations (a
#: saturated softmax's deltas of 1e-20 lost 5e-3 of M2).  Per row that is at most 2^-149
#: (the square's fma and its group's sum; the deviation's own absolute error adds 2^-150
#: |2 t|, negligible where t is subnormal), so M2 = B^2 S (S: the sums, in the stored deltas'
#: units) is off by at most B^3 2^-149; the guard refuses a weight where that exceeds this
#: share of M2 (per-example standard deviations below ~1e-15 at 512 rows) and it is
#: recomputed exactly in float64.  S = 0 with a zero mean is kept as 0: every product then
#: rounded to 0 in float32, so the exact M2 is below B^3 2^-300.
BLOCKED_FLOOR_TAU = 1e-8
#: rows per float32 partial sum of the one-pass form (then added into float64 inside the
#: tile; 32 rows cost its tiles 6-25% more time, measured on the Xeon)
ONEPASS_ROWS = 64
#: the sweeps' ``every`` as array items, not literals: a constant argument would compile a
#: specialisation of its own (Literal[int]) for each value (0: no float64 flush; BLOCK_ROWS;
#: ONEPASS_ROWS)
_EVERY = np.array([0, BLOCK_ROWS, ONEPASS_ROWS], dtype=np.int64)


@jit
def blocked_snr_max(B, tau):
    """The largest per-example signal-to-noise ratio B mean^2 / M2 at which the blocked form
    keeps a weight's M2 (chunks of B rows): tau / (B u^2), u = 2^-24 (float32)."""
    return tau / (B * 2.0**-48)


@jit(inline="always")
def _chan1(mean_p, m2_p, m, m2, n_old, w, c):
    """:func:`_merge` of one entry, as scalars: the state (mean_p, m2_p) joined by a chunk
    whose mean is m and M2 m2 -> the new state (scalars in and out: the merge loops write
    the state themselves, with selects where they vectorise)."""
    if n_old == 0:
        return m, m2
    d = m - mean_p
    return mean_p + d * w, m2_p + (m2 + d * d * c)


@jit(inline="always")
def _refused(m, m2, Bf, snr_max):
    """Whether the blocked form's guard refuses a weight whose chunk mean is m and M2 m2:
    its estimated signal-to-noise ratio B m^2 / m2 exceeds ``snr_max`` (m2 = 0 with m != 0
    included), or m2 > 0 is so small that the sums' underflow could cost more than
    :data:`BLOCKED_FLOOR_TAU` of it, or m2 is +inf (float32 squares that overflowed: the
    float64 recompute is finite up to gradients of ~1e150) -- False for NaN, which then
    propagates."""
    tiny = (m2 > 0.0) & (m2 * BLOCKED_FLOOR_TAU < Bf * Bf * Bf * 2.0**-149)
    return (Bf * m * m > snr_max * m2) | tiny | (m2 == np.inf)


@jit(inline="always")
def _m2_about(col, xr, mu, B):
    """sum_r (col[r] xr[r] - mu)^2, corrected by the deviations' own sum (the two-pass form
    around a float64 centre ``mu``), in float64; at least 0."""
    s = 0.0
    ss = 0.0
    for r in range(B):
        t = col[r] * xr[r] - mu
        s += t
        ss += t * t
    return max(ss - s * s / np.float64(B), 0.0)


@jit(inline="always")
def _exact_entry(B, A, D, i, j, col, xt, have_col):
    """(mean, M2) of the per-example gradients A[r, i] * (B D[r, j]) of one weight, in
    float64 (the corrected two-pass form around the float64 mean); ``col`` holds A[:, i] in
    float64 when ``have_col``, ``xt`` the per-example deltas transposed, in float64."""
    Bf = np.float64(B)
    if not have_col:
        for r in range(B):
            col[r] = np.float64(A[r, i])
    xr = xt[j]
    s = 0.0
    for r in range(B):
        s += col[r] * xr[r]
    mu = s / Bf
    return mu, _m2_about(col, xr, mu, B)


def moments_update_blocked(
    B, grad, ws, lay, n_old, st_mean, st_m2, mus, acc, s64, sw64, mu64, xT, col, qt, mt, st, snr_max, tiles
):
    """:func:`moments_update` for float32 models, accurate to float64 standards: the same
    two-pass kernel, its float32 sums added into float64 every :data:`BLOCK_ROWS` rows, and
    a guard against the centre's rounding.  Returns the number of weights
    recomputed exactly.

    Parameters
    ----------
    B, grad, ws, lay, n_old, st_mean, st_m2, mus, acc
        As for :func:`moments_update` (B >= 2).
    s64, sw64 : (>= largest fan_in * fan_out, and >= 2 * largest fan_out) float64, scratch
    mu64 : (>= largest fan_out,) float64, scratch (the biases' means)
    xT : (>= B * largest fan_out,) float64, scratch
    col : (>= B,) float64, scratch
    qt, mt, st : (>= 48 min(B, :data:`TILE_PASS_ROWS`),), (>= 16 x the largest layer
        width,) float32 and (the same) float64, scratch of :func:`_sq_dev_tiled`
    snr_max : float
        :func:`blocked_snr_max` (B, :data:`BLOCKED_TAU`).
    tiles : bool
        Sweep with the register-blocked tiles (:func:`_sq_dev_tiled`) rather than
        :func:`_sq_dev`: the same arithmetic, but for the grouping of the rows inside a block
        (8 rows, against the loops' 4: the same bound, :data:`BLOCKED_ULPS`, not bitwise the
        same sums).  :data:`._tiles.FAST` says which is faster here; this function runs
        :func:`._tiles.ensure` first whatever ``tiles`` is (the kernel names them).

    Notes
    -----
    Two things cost the plain float32 two-pass its accuracy (bench/results/gradstats_issue20.md):
    the squared deviations summed in float32 over all B rows (an error growing with B:
    2.3e-6 at B = 2048), and the centre -- the float32 batch gradient m', off the true chunk
    mean m by e -- which adds B e^2 to M2 = sum_r (g_r - m)^2.  Here each block's sum is at
    most :data:`BLOCK_ROWS` = 32 rows deep, summed in groups of 8 (4 by the loops), before it
    is added in float64: within :data:`BLOCKED_ULPS` = 13 u (7.7e-7) of the exact sum of
    squared deviations for any data, sparse layers included (where 64 rows summed one after
    another lost up to 3.5e-6); and the centre error, typically
    sqrt(B) u |m| (u = 2^-24) for a BLAS sum of B rows, adds a relative B u^2 SNR with SNR =
    m^2 / (M2 / B): so a weight whose estimated SNR, B m'^2 / S, exceeds ``snr_max`` (at
    which that share is ``BLOCKED_TAU`` = 1e-7; SNR 1.4e4 at B = 2048, 8.9e5 at B = 32) --
    or whose S is 0 while m' is not -- has its mean and M2 recomputed exactly in float64 from
    the stored factors.  Per-example gradients that noisy-free are rare in training; a crafted
    high-SNR chunk is exact, at O(B) per such weight.  The bias (fo numbers per layer) takes
    the float64 two-pass form.  The float64 additions run inside the sweep, on rows of the
    output block that are in the L1 cache: the sweep costs 0.96-1.08x the one without them
    (measured on 64x128 to 784x256 layers, B = 512 and 2048, with 64-row blocks; 32-row
    blocks in groups cost the tiles' sweep 6-13% more).  Where the squares are subnormal
    floats that relative bound fails (each is off by up to 2^-150 absolute), so the guard
    also refuses a weight whose M2 is small enough for that to cost more than
    :data:`BLOCKED_FLOOR_TAU` of it (per-example gradients' standard deviations below ~1e-15,
    e.g. the output weights of a class a saturated softmax all but rules out).  So a kept
    weight's M2 is within 13 u + ``BLOCKED_TAU`` + ``BLOCKED_FLOOR_TAU`` (8.9e-7, first
    order) of the exact value.
    """
    _tiles.ensure()  # (the kernel names the tiles whether it calls them or not)
    return _moments_update_blocked(
        B, grad, ws, lay, n_old, st_mean, st_m2, mus, acc, s64, sw64, mu64, xT, col, qt, mt, st, snr_max, tiles
    )


@jit
def _moments_update_blocked(
    B, grad, ws, lay, n_old, st_mean, st_m2, mus, acc, s64, sw64, mu64, xT, col, qt, mt, st, snr_max, tiles
):
    """The compiled body of :func:`moments_update_blocked` (:func:`._tiles.ensure` run first)."""
    L = lay[R_MISC, 3]
    w, c = _chan_weights(n_old, B)
    nbad = 0
    for l in range(L):
        nbad += _blocked_weights(
            B, l, grad, ws, lay, n_old, st_mean, st_m2, mus, acc, s64, sw64, xT, col, qt, mt, st, snr_max, tiles, w, c
        )
        _bias_moments(B, l, ws, lay, n_old, st_mean, st_m2, s64, mu64, w, c)
    return nbad


@jit
def _blocked_weights(
    B, l, grad, ws, lay, n_old, st_mean, st_m2, mus, acc, s64, sw64, xT, col, qt, mt, st, snr_max, tiles, w, c
):
    """The weights of layer ``l`` by the blocked two-pass form (:func:`moments_update_blocked`,
    whose arguments these are; ``w, c``: :func:`_chan_weights`), centred on the layer's
    batch gradient in ``grad``.  Returns the number of weights recomputed exactly."""
    Bf = np.float64(B)
    B2 = Bf * Bf
    flush = _blocked_sums(B, l, grad, ws, lay, mus, acc, s64, sw64, qt, mt, st, tiles)
    A, D = _factors(ws, lay, l, B)
    fi, fo = A.shape[1], D.shape[1]
    npar = fi * fo
    out = acc[:npar]
    S = s64[:npar]
    # one pass: M2 = B^2 S, the guard, and Chan's merge of the weights it keeps (the rule
    # of _merge); the refused ones (the same test again) merged after their exact recompute
    o = lay[R_WOFF, l]
    gflat = grad[o : o + npar]
    mean = st_mean[o : o + npar]
    M2 = st_m2[o : o + npar]
    bad = 0
    for p in range(npar):
        m2 = (S[p] if flush else np.float64(out[p])) * B2
        m = np.float64(gflat[p])
        if _refused(m, m2, Bf, snr_max):
            bad += 1
        else:
            mean[p], M2[p] = _chan1(mean[p], M2[p], m, m2, n_old, w, c)
    if bad:
        xt = _deltas_t(B, D, xT)
        for i in range(fi):
            have = False
            for j in range(fo):
                p = i * fo + j
                if _refused(np.float64(gflat[p]), (S[p] if flush else np.float64(out[p])) * B2, Bf, snr_max):
                    m, m2 = _exact_entry(B, A, D, i, j, col, xt, have)
                    have = True
                    mean[p], M2[p] = _chan1(mean[p], M2[p], m, m2, n_old, w, c)
    return bad


@jit
def _blocked_sums(B, l, grad, ws, lay, mus, acc, s64, sw64, qt, mt, st, tiles):
    """The sweep of :func:`_blocked_weights`: each weight's sum of squared deviations from
    the centre grad / B (the per-example gradients / B), in ``s64`` in parameter order in
    float64 -- or in ``acc`` in the model dtype where it returns False (B <=
    :data:`BLOCK_ROWS` without the tiles)."""
    no_s = np.empty((0, 0), np.float64)  # (_sq_dev's float64 target when it needs none)
    A, D = _factors(ws, lay, l, B)
    gW = _W(grad, lay, l)
    fi, fo = gW.shape
    npar = fi * fo
    out = acc[:npar]
    S = s64[:npar]
    swap = fo < SWAP_BELOW and fi > fo
    # deviations of A[r, i] D[r, j] (the stored deltas of the mean loss, not B D: B D
    # rounds in float32 unless B is a power of two, a per-example error that reaches M2
    # at first order) from the chunk mean / B; their sums times B^2 in float64
    if swap:  # sweep (j, i): the inner loop runs over inputs
        M = mus[:npar].reshape(fo, fi)
        for i in range(fi):
            for j in range(fo):
                M[j, i] = gW[i, j] / B
    else:
        M = mus[:npar].reshape(fi, fo)
        for i in range(fi):
            for j in range(fo):
                M[i, j] = gW[i, j] / B
    flush = B > BLOCK_ROWS  # (else the model-dtype sums are at most B rows deep already)
    # (the tiles always leave float64 sums: for B <= 64 those of the one float32 block)
    if swap:
        Ssw = sw64[:npar].reshape(fo, fi)
        if tiles:
            _sq_dev_tiled(D, A, M, Ssw, _EVERY[1], qt, mt, st)
        elif flush:
            _sq_dev(D.T, A, M, out.reshape(fo, fi), Ssw, _EVERY[1])
        else:
            _sq_dev(D.T, A, M, out.reshape(fo, fi), no_s, _EVERY[0])
        in64 = tiles or flush  # (the sums are in Ssw, else in out)
        for j in range(fo):
            for i in range(fi):
                S[i * fo + j] = Ssw[j, i] if in64 else np.float64(out[j * fi + i])
        flush = True
    elif tiles:
        _sq_dev_tiled(A, D, M, S.reshape(fi, fo), _EVERY[1], qt, mt, st)
        flush = True
    elif flush:
        _sq_dev(A.T, D, M, out.reshape(fi, fo), S.reshape(fi, fo), _EVERY[1])
    else:
        _sq_dev(A.T, D, M, out.reshape(fi, fo), no_s, _EVERY[0])
    return flush


@jit(inline="always")
def _deltas_t(B, D, xT):
    """The per-example deltas B D transposed, (fan_out, B) float64, in ``xT``."""
    fo = D.shape[1]
    Bf = np.float64(B)
    xt = xT[: fo * B].reshape(fo, B)
    for r in range(B):
        for j in range(fo):
            xt[j, r] = np.float64(D[r, j]) * Bf
    return xt


@jit
def _bias_moments(B, l, ws, lay, n_old, st_mean, st_m2, s64, mu64, w, c):
    """Layer ``l``'s bias: the per-example deltas themselves, float64 two-pass around the
    float64 mean, merged into the state (``s64``, ``mu64``: float64 scratch)."""
    Bf = np.float64(B)
    D = _blk(ws, lay, R_D, l, B)
    fo = D.shape[1]
    mub = mu64[:fo]
    sb = s64[:fo]
    for j in range(fo):
        mub[j] = 0.0
        sb[j] = 0.0
    for r in range(B):
        for j in range(fo):
            mub[j] += np.float64(D[r, j]) * Bf
    for j in range(fo):
        mub[j] /= Bf
    tb = s64[fo : 2 * fo]
    for j in range(fo):
        tb[j] = 0.0
    for r in range(B):
        for j in range(fo):
            t = np.float64(D[r, j]) * Bf - mub[j]
            sb[j] += t * t
            tb[j] += t
    for j in range(fo):
        sb[j] = max(sb[j] - tb[j] * tb[j] / Bf, 0.0)
    o = lay[R_BOFF, l]
    _merge(mub, sb, st_mean[o : o + fo], st_m2[o : o + fo], n_old, w, c)


# ----------------------------------------------------------------------------- one-pass sums (float32, opt-in)
#: where ``moments_onepass`` opts in, the cpu backend takes the one-pass form for chunks of at
#: least this many rows (at 512 it costs 4-10% less than the blocked two-pass form since that
#: form's sums go in groups of rows, and 4-9% less from 768; at 256 it costs more, and its
#: guard refuses more weights: bench/results/gradstats_issue20.md)
ONEPASS_MIN_ROWS = 512
#: rows per pass of :func:`_sums_tiled` over a layer (a multiple of :data:`ONEPASS_ROWS`)
ONEPASS_PASS_ROWS = 128
#: the one-pass form keeps a weight's M2 where its estimated relative error is at most this
ONEPASS_TAU = 1e-6
#: standard deviations of a float32 partial sum's rounding error that the estimate allows for
ONEPASS_Z = 6.0
#: a layer with more than 1 / this of its weights refused takes the blocked two-pass form
#: whole (its tiles cost ~1/16 of the exact per-weight recompute: an estimate from the
#: two loops' rates, not measured as a threshold)
ONEPASS_LAYER_SHARE = 16
_SUMS = _tiles.SUMS
_U32 = 2.0**-24
#: an absolute bound on what the squares' and products' underflow can cost per row, in the
#: scaled units of :func:`_col_scales` (|x| < 1): each square off by at most half the
#: smallest subnormal, 2^-150, times a factor below 1, twice (p^2 and q^2), and the same for
#: the partial sum it joins
_FLOOR = 2.0**-147


@jit
def onepass_err(B, every):
    """The relative rounding error (a bound with :data:`ONEPASS_Z` standard deviations of
    margin) of the one-pass form's float64 sums S1 = sum_r p q (relative to sum_r |p q|) and
    S2 = sum_r p^2 q^2 of B rows, their float32 partial sums ``every`` rows deep: each
    square off by at most u = 2^-24 (2u for p^2 q^2, not averaged: one row may dominate),
    plus the additions: a partial sum of k rows of like magnitude is off by ~u k^(1/2) / 3
    (k round-offs, each uniform within u of a partial sum that grows linearly), and the
    ceil(B / every) partial sums' errors average in float64."""
    k = min(B, every)
    nb = (B + every - 1) // every
    return _U32 * (2.0 + ONEPASS_Z * np.sqrt(np.float64(k)) / 3.0 / np.sqrt(np.float64(nb)))


@jit(inline="always")
def _onepass_one(s1, s2, u, p, Bf, e, tau, gflat, mean, M2, flag, n_old, w, c):
    """Weight p of the one-pass form's merge (sums s1, s2 unscaled by u): the batch gradient
    into ``gflat``, and Chan's merge where :func:`_onepass_keep` keeps it (else the state
    is left as it is); ``flag[p]`` and the result: 1 where refused, else 0 (the one record
    of that decision: evaluated again, in other code, the guard's arithmetic could round
    differently).  Selects, not branches."""
    keep = _onepass_keep(s1, s2, Bf, e, Bf * _FLOOR * u * u, tau)
    flag[p] = 0 if keep else 1
    gflat[p] = s1
    nm, nm2 = _chan1(mean[p], M2[p], s1, (s2 - s1 * s1 / Bf) * (Bf * Bf), n_old, w, c)
    mean[p] = nm if keep else mean[p]
    M2[p] = nm2 if keep else M2[p]
    return 0 if keep else 1


@jit(inline="always")
def _onepass_keep(s1, s2, Bf, e, floor, tau):
    """Whether the one-pass form keeps a weight whose unscaled sums are s1 = sum_r A D (the
    chunk mean of its per-example gradients) and s2 = sum_r A^2 D^2, of relative error ``e``
    (:func:`onepass_err`) and absolute error ``floor`` (s2's underflow): M2 = B^2 s2 - B s1^2
    with kappa = B^2 s2 / M2 = t / (t - x), t = B s2, x = s1^2, has the estimated relative
    error kappa e (1 + 2 (x / t)^(1/2)) (S2's; then S1's through s1^2 / B, with sum_r |A D|
    <= (B s2)^(1/2)) plus 3 kappa B floor / t, and it is kept where that is at most ``tau``
    -- multiplied out, [e (t + 2 (x t)^(1/2)) - tau (t - x)] (t - x) + 3 B floor t <= 0,
    with t > x; or where s1 = s2 = 0 (every product rounded to 0: s2 = 0 alone, with s1 != 0,
    means the squares underflowed, and M2 = -B s1^2 < 0 would be kept).  No branch and no
    division (the loops over the weights vectorise); False where a sum is NaN or inf."""
    t = Bf * s2
    x = s1 * s1
    gap = t - x
    est = (e * (t + 2.0 * np.sqrt(x * t)) - tau * gap) * gap + 3.0 * Bf * floor * t
    return ((s2 == 0.0) & (s1 == 0.0)) | ((gap > 0.0) & (est <= 0.0) & (t < np.inf))


@jit
def _col_scales(X, sc, inv):
    """Per column c of X (B, n): ``sc[c]`` = 2^-e and ``inv[c]`` = 2^e, where the column's
    largest magnitude is f 2^e with 0.5 <= f < 1 (so that |X sc| < 1, exactly scaled); 1 and
    1 where that magnitude is 0, inf or NaN."""
    B, n = X.shape
    for c in range(n):
        sc[c] = 0.0
    for r in range(B):  # (a select, not a branch: the loop vectorises; NaN sticks)
        for c in range(n):
            v = abs(np.float64(X[r, c]))
            m = sc[c]
            sc[c] = v if (v > m or v != v) else m
    for c in range(n):
        m = sc[c]
        if m > 0.0 and m < np.inf:
            e = math.frexp(m)[1]
            sc[c] = math.ldexp(1.0, -e)
            inv[c] = math.ldexp(1.0, e)
        else:
            sc[c] = 1.0
            inv[c] = 1.0


@jit
def _sums_tiled(P, Q, S, scp, scq, every, pp, qt, st):
    """S[o, 2 j] = sum_r p[r, o] q[r, j] and S[o, 2 j + 1] = sum_r p[r, o]^2 q[r, j]^2 in
    float64, where p = P scp and q = Q scq column by column (powers of two: exact but for
    underflow; |p|, |q| < 1), by the one-pass sums' tiles of :mod:`._tiles` (float32 fmas,
    float32 partial sums ``every`` rows deep, added into float64).

    P (B, n_o), Q (B, n_j) float32, all C-contiguous; S (n_o, >= 2 n_j) float64 with unit
    column stride (its rows may be padded: a row stride of 4 KB would put a tile's rows on
    the same few L1 sets).  Rows go in passes of :data:`ONEPASS_PASS_ROWS`: per pass, p and
    its squares go into ``pp`` (>= 2 min(B, :data:`ONEPASS_PASS_ROWS`) n_o float32) as
    (rows, n_o, (p, p^2)), where they stay in the L2 cache; then for each block of up to 32
    columns of q (4 vectors of 8 (q, q^2) pairs) the pass's rows of q with their squares go
    into the panel ``qt`` (>= 64 :data:`ONEPASS_PASS_ROWS` float32), zero-padded to whole
    vectors, and the tiles of 6 rows o sweep it.  The sums of the last
    n_j mod 32 columns go through ``st`` (>= 64 n_o float64).  :func:`._tiles.ensure` must
    have run."""
    B, no = P.shape
    nj = Q.shape[1]
    R = ONEPASS_PASS_ROWS
    H, V = _tiles.SUMS_ROWS, _tiles.SUMS_VECS  # tile rows o, vectors of 8 columns j
    if every < 1:
        raise ValueError("_sums_tiled: every must be positive")
    if not (P.flags.c_contiguous and Q.flags.c_contiguous and S.strides[1] == 8):
        raise ValueError("_sums_tiled: P and Q must be C-contiguous, S's rows contiguous")
    if Q.shape[0] != B or S.shape[0] != no or S.shape[1] < 2 * nj:
        raise ValueError("_sums_tiled: shapes must be P (B, n_o), Q (B, n_j) and S (n_o, >= 2 n_j)")
    if pp.shape[0] < 2 * min(B, R) * no or qt.shape[0] < 16 * V * R or st.shape[0] < 16 * V * no:
        raise ValueError("_sums_tiled: scratch too small")
    lds = S.strides[0] // 8
    ppp, qtp, sp, stp = pp.ctypes.data, qt.ctypes.data, S.ctypes.data, st.ctypes.data
    nvb = (nj + 8 * V - 1) // (8 * V)  # column blocks
    for r0 in range(0, B, R):  # passes of R rows: their p, p^2 (R x n_o pairs) stay in the L2 cache
        nr = min(R, B - r0)
        init = 1 if r0 == 0 else 0
        P2 = pp[: 2 * nr * no].reshape(nr, 2 * no)
        for r in range(nr):
            for o in range(no):
                v = np.float32(np.float64(P[r0 + r, o]) * scp[o])
                P2[r, 2 * o] = v
                P2[r, 2 * o + 1] = v * v
        for vb in range(nvb):
            j0 = vb * 8 * V
            w = min(8 * V, nj - j0)
            J = (w + 7) // 8
            ld = 16 * J
            panel = qt[: nr * ld].reshape(nr, ld)
            for r in range(nr):
                for j in range(w):
                    v = np.float32(np.float64(Q[r0 + r, j0 + j]) * scq[j0 + j])
                    panel[r, 2 * j] = v
                    panel[r, 2 * j + 1] = v * v
                for j in range(2 * w, ld):
                    panel[r, j] = 0
            for o in range(0, no, H):
                I = min(H, no - o)
                p0 = ppp + 4 * 2 * o
                if w == 8 * J:
                    _SUMS(I, J, p0, 2 * no, qtp, ld, sp + 8 * (o * lds + 2 * j0), lds, nr, every, init)
                else:
                    _SUMS(I, J, p0, 2 * no, qtp, ld, stp + 8 * o * ld, ld, nr, every, init)
    if nj % 8:  # the last block's sums went through st (a partial vector)
        j0 = (nvb - 1) * 8 * V
        w = nj - j0
        ld = 16 * ((w + 7) // 8)
        st2 = st[: no * ld].reshape(no, ld)
        for o in range(no):
            for j in range(2 * w):
                S[o, 2 * j0 + j] = st2[o, j]


def moments_update_onepass(*args):
    """:func:`moments_update` for float32 models from the layers' inputs and deltas alone:
    one sweep of register-blocked tiles sums, per weight, S1 = sum_r A D and S2 = sum_r A^2
    D^2 (float32 partial sums :data:`ONEPASS_ROWS` rows deep, added into float64), and M2 =
    B^2 S2 - B S1^2 where a guard finds that form accurate; the chunk's weight gradients are
    never formed by a GEMM (``grad``'s weights receive S1, the batch gradient, rounded once).
    Returns the number of weights that took another form.

    The arguments are positional, in the order below.

    Parameters
    ----------
    B, grad, ws, lay, n_old, st_mean, st_m2, mus, acc, s64, sw64, mu64, xT, col, qt, mt, st, snr_max
        As for :func:`moments_update_blocked` (``grad``: its bias entries as ``loss_grad``
        writes them; its weight entries are written here), B >= 2, the tiles used.
    pk : (>= 2 min(B, :data:`ONEPASS_PASS_ROWS`) x the largest width,) float32, scratch
        (:func:`_sums_tiled`'s ``pp``)
    sc : (>= 2 (largest fan_in + largest fan_out),) float64, scratch (the column scales)
    s12 : (>= 2 x the largest layer's weights + 8 x its width,) float64, scratch (the sums)
    sts : (>= 64 x the largest layer width,) float64, scratch (:func:`_sums_tiled`)
    ref : (>= the largest layer's weights,) uint8, scratch (which weights were refused)
    tau : float
        The guard's bound on a kept weight's estimated relative error (:data:`ONEPASS_TAU`).

    ``qt`` must hold >= 64 :data:`ONEPASS_PASS_ROWS` float32 here.

    Notes
    -----
    Cost: one float32 fma lane pair per example and weight, with the weight-gradient GEMM
    of the backward pass left out (the two-pass form's two fmas come on top of it): the
    tiles hold (p q, p^2 q^2) pairs in adjacent lanes, so one fma updates both sums.  On the
    Xeon, at 2048 rows, 1.54x / 1.73x a plain step for 64-128-128-10 / 784-256-256-10
    against the blocked form's 1.65x / 1.91x; at 512 rows, the same as the blocked form.  Accuracy: with
    kappa = B^2 S2 / M2 (1 + the per-example signal-to-noise ratio B mean^2 / M2), the
    relative error of M2 is about kappa (e + 2 e (1 - 1/kappa)^(1/2)), e = :func:`onepass_err`
    (S1^2 / B cancels against S2), so the form is kept where that estimate, plus the
    underflow floor of the squares (columns are scaled by powers of two to magnitudes below
    1 first, so that no square overflows and few underflow), is at most
    :data:`ONEPASS_TAU`: kappa up to ~1.15 at B = 512 and ~1.5 at B = 2048 (measured errors
    are 2-4x below the estimate).  That estimate is statistical -- it takes the roundings
    of a partial sum as independent -- not a bound: where the same addend repeats after a
    large one (duplicated rows), each rounds alike and S2 is off by up to ~u per row of a
    block (50 u measured, a chunk's M2 3e-6 off with the guard keeping it).  A rigorous
    bound (rows in groups, as the blocked form sums them: 13 u at 32-row blocks) would
    refuse 5-45% of the weights of the models tried, and the refused ones cost more than
    the blocked form; so the backend takes this form only where ``moments_onepass`` opts
    in.  Per-example gradients of real models rarely come near: on
    the digits MLP 0.03% of the weights have kappa > 1.5 at B = 512 at the initial weights,
    none after training.  A refused weight is recomputed exactly in float64 from the stored
    factors, as the blocked form does above its guard; where more than 1 /
    :data:`ONEPASS_LAYER_SHARE` of a layer's weights are refused, the layer takes the blocked
    two-pass form (:func:`moments_update_blocked`, centred on S1) whole.  A NaN or inf sum is
    refused too, so non-finite values come out as the exact forms make them.  The bias takes
    the float64 two-pass form.
    """
    _tiles.ensure()
    return _moments_update_onepass(*args)


@jit
def _moments_update_onepass(
    B,
    grad,
    ws,
    lay,
    n_old,
    st_mean,
    st_m2,
    mus,
    acc,
    s64,
    sw64,
    mu64,
    xT,
    col,
    qt,
    mt,
    st,
    snr_max,
    pk,
    sc,
    s12,
    sts,
    ref,
    tau,
):
    """The compiled body of :func:`moments_update_onepass` (:func:`._tiles.ensure` run first)."""
    L = lay[R_MISC, 3]
    w, c = _chan_weights(n_old, B)
    Bf = np.float64(B)
    every = _EVERY[2]
    e = onepass_err(B, every)
    nbad = 0
    for l in range(L):
        A, D = _factors(ws, lay, l, B)
        gW = _W(grad, lay, l)
        fi, fo = gW.shape
        npar = fi * fo
        swap = fo < SWAP_BELOW and fi > fo
        no, nj = (fo, fi) if swap else (fi, fo)
        S = s12[: no * (2 * nj + 8)].reshape(no, 2 * nj + 8)  # (rows padded by 64 bytes)
        sca, inva = sc[:fi], sc[fi : 2 * fi]
        scd, invd = sc[2 * fi : 2 * fi + fo], sc[2 * fi + fo : 2 * fi + 2 * fo]
        _col_scales(A, sca, inva)
        _col_scales(D, scd, invd)
        if swap:
            _sums_tiled(D, A, S, scd, sca, every, pk, qt, sts)
        else:
            _sums_tiled(A, D, S, sca, scd, every, pk, qt, sts)
        # one pass in S's order (a, k) = (i, j), or (j, i) where swept transposed: the
        # guard, the batch gradient into grad and Chan's merge of the weights kept; the
        # refused ones listed, then recomputed exactly -- or, where more than 1 /
        # ONEPASS_LAYER_SHARE of the layer's, swept by the blocked two-pass form first
        o = lay[R_WOFF, l]
        gflat = grad[o : o + npar]
        mean = st_mean[o : o + npar]
        M2 = st_m2[o : o + npar]
        flag = ref[:npar]
        B2 = Bf * Bf
        bad = 0
        if swap:
            for a in range(no):
                for k in range(nj):
                    u = inva[k] * invd[a]
                    bad += _onepass_one(
                        S[a, 2 * k] * u,
                        S[a, 2 * k + 1] * (u * u),
                        u,
                        k * fo + a,
                        Bf,
                        e,
                        tau,
                        gflat,
                        mean,
                        M2,
                        flag,
                        n_old,
                        w,
                        c,
                    )
        else:  # (the same as above in the plain order, kept apart: one loop for both, with the
            # order chosen inside, measured 5-10% slower chunks -- this one vectorises)
            for a in range(no):
                ua = inva[a]
                for k in range(nj):
                    u = ua * invd[k]
                    bad += _onepass_one(
                        S[a, 2 * k] * u,
                        S[a, 2 * k + 1] * (u * u),
                        u,
                        a * fo + k,
                        Bf,
                        e,
                        tau,
                        gflat,
                        mean,
                        M2,
                        flag,
                        n_old,
                        w,
                        c,
                    )
        if bad:
            xt = _deltas_t(B, D, xT)
            swept = bad * ONEPASS_LAYER_SHARE > npar
            if swept:  # (tiles: True, not as a literal, which would compile a specialisation of its own)
                _blocked_sums(B, l, grad, ws, lay, mus, acc, s64, sw64, qt, mt, st, swept)
            for p in range(npar):
                if flag[p] == 0:
                    continue
                i, j = p // fo, p % fo
                m = np.float64(gflat[p])
                m2 = s64[p] * B2 if swept else 0.0
                if not swept or _refused(m, m2, Bf, snr_max):
                    m, m2 = _exact_entry(B, A, D, i, j, col, xt, False)
                mean[p], M2[p] = _chan1(mean[p], M2[p], m, m2, n_old, w, c)
        nbad += bad
        _bias_moments(B, l, ws, lay, n_old, st_mean, st_m2, s64, mu64, w, c)
    return nbad


# ----------------------------------------------------------------------------- guarded float64 shortcut
#: bound on the relative error of a chunk's M2 for every weight the shortcut keeps (the
#: guard recomputes the others exactly); the final variance inherits it (module Notes of
#: :func:`moments_update_shortcut`)
SHORTCUT_TAU = 1e-7
#: a weight whose chunk sum of squares S2 is positive but below this is recomputed exactly:
#: the error analysis assumes the squared factors and their products stay normal numbers
SHORTCUT_TINY = 2.0**-800


@jit(inline="always")
def _gamma(n):
    """Higham's rounding-error constant gamma_n = n u / (1 - n u), u = 2^-53."""
    nu = n * 2.0**-53
    return nu / (1.0 - nu)


@jit
def shortcut_delta(B, tau):
    """The guard's safety factor delta(B) for chunks of B rows (B, tau: float64): the
    shortcut keeps a weight's M2 = S2 - S1^2/B only where M2 >= delta * S2.  See
    :func:`moments_update_shortcut` for the derivation."""
    g1 = _gamma(B + 1.0)
    g2 = _gamma(B + 5.0)
    return 2.0 * (g2 + g1 * (2.0 + g1) + 2.0 * 2.0**-53) / tau


@jit(inline="always")
def _shortcut_prep(B, ws, lay, l, a2, x2, a64, x64, need_s1):
    """The float64 factors of layer l: a2 = A*A (B, fi) and x2 = X*X (B, fo), X = B * D the
    per-example deltas; with ``need_s1`` also A and X themselves (a64, x64)."""
    A, D = _factors(ws, lay, l, B)
    fi = A.shape[1]
    fo = D.shape[1]
    Bf = np.float64(B)
    a2v = a2[: B * fi].reshape(B, fi)
    x2v = x2[: B * fo].reshape(B, fo)
    if need_s1:
        a6 = a64[: B * fi].reshape(B, fi)
        x6 = x64[: B * fo].reshape(B, fo)
        for r in range(B):
            for i in range(fi):
                v = np.float64(A[r, i])
                a6[r, i] = v
                a2v[r, i] = v * v
            for j in range(fo):
                v = np.float64(D[r, j]) * Bf
                x6[r, j] = v
                x2v[r, j] = v * v
    else:
        for r in range(B):
            for i in range(fi):
                v = np.float64(A[r, i])
                a2v[r, i] = v * v
            for j in range(fo):
                v = np.float64(D[r, j]) * Bf
                x2v[r, j] = v * v


@jit(inline="always")
def _guard_ok(S2, S1, Bf, delta):
    """(M2 = S2 - S1^2/B, whether the guard keeps it)."""
    m2 = S2 - S1 * S1 / Bf
    ok = (m2 >= delta * S2) & (S2 < np.inf) & ((S2 == 0.0) | (S2 >= SHORTCUT_TINY))
    return m2, ok


@jit(inline="always")
def _shortcut_finish(B, grad, ws, lay, l, n_old, st_mean, st_m2, s2, s1, xT, ac, need_s1, tau):
    """Layer l after its GEMMs (S2 in s2, and S1 in s1 with ``need_s1``): guarded M2 merged
    into the state, exact fallback, bias; returns the number of fallbacks."""
    A, D = _factors(ws, lay, l, B)
    fi = A.shape[1]
    fo = D.shape[1]
    npar = fi * fo
    Bf = np.float64(B)
    w, c = _chan_weights(n_old, B)
    delta = shortcut_delta(Bf, tau)
    wo = lay[R_WOFF, l]
    gW = grad[wo : wo + npar]
    s2f = s2[:npar]
    s1f = s1[:npar]
    mean = st_mean[wo : wo + npar]
    M2 = st_m2[wo : wo + npar]
    # 1. one branch-free pass: M2_b = S2 - S1^2/B where the guard keeps it (0 where it
    #    refuses: those entries get their exact M2_b added in step 2), Chan-merged into the
    #    float64 state (the rule of _merge)
    nbad = 0
    if n_old == 0:
        for p in range(npar):
            S1 = s1f[p] if need_s1 else np.float64(gW[p]) * Bf
            m2, ok = _guard_ok(s2f[p], S1, Bf, delta)
            mean[p] = S1 / Bf if need_s1 else gW[p]
            M2[p] = m2 if ok else 0.0
            nbad += not ok
    else:
        for p in range(npar):
            S1 = s1f[p] if need_s1 else np.float64(gW[p]) * Bf
            m2, ok = _guard_ok(s2f[p], S1, Bf, delta)
            d = (S1 / Bf if need_s1 else gW[p]) - mean[p]
            mean[p] += d * w
            M2[p] += (m2 if ok else 0.0) + d * d * c
            nbad += not ok
    # 2. the refused entries (the same test, recomputed): the corrected two-pass form in
    #    float64, row by row (one gathered input column per row, the per-example deltas
    #    transposed once), added to the state's M2
    if nbad:
        xt = xT[: fo * B].reshape(fo, B)
        for r in range(B):
            for j in range(fo):
                xt[j, r] = np.float64(D[r, j]) * Bf
        col = ac[:B]
        for i in range(fi):
            have = False
            for j in range(fo):
                p = i * fo + j
                S1 = s1f[p] if need_s1 else np.float64(gW[p]) * Bf
                _, ok = _guard_ok(s2f[p], S1, Bf, delta)
                if ok:
                    continue
                if not have:
                    for r in range(B):
                        col[r] = np.float64(A[r, i])
                    have = True
                M2[p] += _m2_about(col, xt[j], S1 / Bf if need_s1 else np.float64(gW[p]), B)
    # 3. bias (the same with A = 1): fo numbers, always the two-pass form, in float64
    bo = lay[R_BOFF, l]
    gb = _b(grad, lay, l)
    outb = s2[:fo]
    mub = s1[:fo]
    if need_s1:
        for j in range(fo):
            mub[j] = 0.0
        for r in range(B):
            for j in range(fo):
                mub[j] += np.float64(D[r, j]) * Bf
        for j in range(fo):
            mub[j] /= Bf
    for j in range(fo):
        outb[j] = 0.0
    for r in range(B):
        d = D[r]
        if need_s1:
            for j in range(fo):
                t = np.float64(d[j]) * Bf - mub[j]
                outb[j] += t * t
        else:
            for j in range(fo):
                t = d[j] * B - gb[j]
                outb[j] += t * t
    if need_s1:
        _merge(mub, outb, st_mean[bo : bo + fo], st_m2[bo : bo + fo], n_old, w, c)
    else:
        _merge(gb, outb, st_mean[bo : bo + fo], st_m2[bo : bo + fo], n_old, w, c)
    return nbad


@jit
def moments_update_shortcut(B, grad, ws, lay, n_old, st_mean, st_m2, a2, x2, a64, x64, s2, s1, xT, ac, need_s1, tau):
    """:func:`moments_update` by the guarded float64 shortcut: each weight's chunk M2 from
    one GEMM of squared factors where that is accurate, the exact two-pass form elsewhere.
    Returns the number of weights that fell back to the two-pass form.

    Parameters
    ----------
    B, grad, ws, lay, n_old, st_mean, st_m2
        As for :func:`moments_update` (``grad`` is read; B >= 2).
    a2, a64 : (>= B * largest fan_in,) float64, scratch (``a64`` may be empty unless
        ``need_s1``)
    x2, x64, xT : (>= B * largest fan_out,) float64, scratch (likewise ``x64``)
    s2, s1 : (>= largest fan_in * fan_out,) float64, scratch
    ac : (>= B,) float64, scratch
    need_s1 : bool
        False: S1 is ``B * grad`` (a float64 model: ``grad`` is accurate to float64).
        True: S1 is computed by a second float64 GEMM and the chunk mean is S1 / B in
        float64 (a float32 model, whose ``grad`` carries float32 rounding).
    tau : float
        The accuracy the guard enforces per chunk (``SHORTCUT_TAU``).

    Notes
    -----
    Per weight and chunk, with :math:`x_r = B d_r` the per-example deltas and
    :math:`g_r = a_r x_r`,

    .. math::
        S_2 = \\sum_r g_r^2 = (A\\circ A)^\\top (X\\circ X), \\qquad
        S_1 = \\sum_r g_r = A^\\top X, \\qquad
        M_2 = S_2 - S_1^2 / B = (1 - \\rho) S_2, \\quad
        \\rho = S_1^2 / (B S_2) \\in [0, 1].

    :math:`S_2` is one float64 GEMM (BLAS) of the squared factors instead of the two-pass
    form's two fused multiply-adds per example and weight.

    *Error.*  With :math:`u = 2^{-53}` and :math:`\\gamma_n = nu/(1 - nu)`: each product
    :math:`a^2 x^2` carries at most 5 roundings (``a*a``, ``d*B``, ``x*x`` and the product;
    the float32-to-float64 conversion is exact, and for a float32 model only ``x*x`` and
    the product round) and a sum of B non-negative terms in any
    order at most :math:`\\gamma_{B-1}`, so :math:`|\\hat S_2 - S_2| \\le \\gamma_{B+5} S_2`.
    :math:`S_1` is a sum of B signed terms (``grad`` of a float64 model, in whatever order
    BLAS or the loops used, then times B; or the second GEMM, whose products of float32
    values are exact): :math:`|\\hat S_1 - S_1| \\le \\gamma_{B+1} \\sum_r |g_r| \\le
    \\gamma_{B+1} \\sqrt{B S_2}` (Cauchy-Schwarz).  Hence
    :math:`|\\hat S_1^2 - S_1^2|/B \\le \\gamma_{B+1}(2\\sqrt\\rho + \\gamma_{B+1}) S_2`, and
    with two roundings in :math:`\\hat S_1^2/B`,

    .. math::
        |\\hat M_2 - M_2| \\le E\\,S_2, \\qquad
        E = \\gamma_{B+5} + \\gamma_{B+1}(2 + \\gamma_{B+1}) + 2u \\approx 3Bu

    (the final subtraction adds one rounding relative to :math:`M_2` itself).  The
    relative error :math:`E S_2 / M_2 = E/(1-\\rho)` is the cancellation: it grows as the
    squared mean approaches the mean square.  *Guard:* keep :math:`\\hat M_2` only where

    .. math:: \\hat M_2 \\ge \\delta\\,\\hat S_2, \\qquad \\delta = 2E/\\tau,

    i.e. recompute where :math:`\\hat S_1^2/B > (1-\\delta)\\hat S_2`.  A kept entry has
    :math:`M_2 \\ge \\hat M_2 - E S_2 \\ge (\\delta(1 - \\gamma_{B+5}) - E) S_2 \\ge E S_2/\\tau`,
    so its relative error is at most :math:`\\tau` (plus a rounding or two); the factor 2
    covers :math:`(1-\\gamma)^{-1}` and the rounding of the test itself.  With
    :math:`\\tau = 10^{-7}`: :math:`\\delta \\approx 4.3\\cdot 10^{-7}` at B = 64 and
    :math:`1.4\\cdot 10^{-5}` at B = 2048, so entries whose per-example signal-to-noise
    ratio :math:`\\bar g^2/\\sigma^2 = \\rho/(1-\\rho)` (roughly) exceeds about
    :math:`2\\cdot 10^{6}` (B = 64) or :math:`7\\cdot 10^{4}` (B = 2048) fall back.  Entries
    with :math:`0 < \\hat S_2 <` ``SHORTCUT_TINY`` (squares near underflow) or a non-finite
    :math:`\\hat S_2` fall back too.

    *Fallback:* the corrected two-pass form in float64,
    :math:`M_2 = \\sum_r t_r^2 - (\\sum_r t_r)^2/B`, :math:`t_r = a_r x_r - \\mu` with
    :math:`\\mu` the chunk mean, whose error is a few units of :math:`u` relative to the
    deviations.  The bias of each layer always takes the two-pass form (B * fan_out
    terms).

    *Merge:* the chunk's (mean, M2) -- mean ``grad`` (float64 model; bitwise the mean of
    :func:`moments_update`) or :math:`\\hat S_1/B` (float32 model, float64-accurate) -- is
    combined with the running float64 state by Chan et al.'s rule, in the same pass as the
    guard (one read-modify-write of the state per chunk); a refused entry is merged with
    :math:`M_2 = 0` and its exact :math:`M_2` is added once the fallback has computed it
    (the same sum, in another order).  The merged M2 is a sum of non-negative chunk M2s
    (each within :math:`\\tau`) and Chan terms that both paths compute alike, so the
    variance stays within about :math:`\\tau` of the two-pass form's; the tests hold it to
    :math:`10^{-6}` at signal-to-noise ratios up to :math:`10^8`.
    """
    L = lay[R_MISC, 3]
    nbad = 0
    for l in range(L):
        fi = lay[R_SIZE, l]
        fo = lay[R_SIZE, l + 1]
        _shortcut_prep(B, ws, lay, l, a2, x2, a64, x64, need_s1)
        np.dot(a2[: B * fi].reshape(B, fi).T, x2[: B * fo].reshape(B, fo), s2[: fi * fo].reshape(fi, fo))
        if need_s1:
            np.dot(a64[: B * fi].reshape(B, fi).T, x64[: B * fo].reshape(B, fo), s1[: fi * fo].reshape(fi, fo))
        nbad += _shortcut_finish(B, grad, ws, lay, l, n_old, st_mean, st_m2, s2, s1, xT, ac, need_s1, tau)
    return nbad


@jit
def shortcut_prep(B, ws, lay, l, a2, x2, a64, x64, need_s1):
    """Step 1 of :func:`moments_update_shortcut` for layer l alone (the caller runs the
    GEMMs: the path without SciPy's BLAS bindings)."""
    _shortcut_prep(B, ws, lay, l, a2, x2, a64, x64, need_s1)


@jit
def shortcut_finish(B, grad, ws, lay, l, n_old, st_mean, st_m2, s2, s1, xT, ac, need_s1, tau):
    """The rest of :func:`moments_update_shortcut` for layer l, after the caller's GEMMs;
    returns the number of fallbacks."""
    return _shortcut_finish(B, grad, ws, lay, l, n_old, st_mean, st_m2, s2, s1, xT, ac, need_s1, tau)


@jit
def per_example_fill(B, ws, lay, out, tmp):
    """out[r, :] = the flat per-example gradient of batch row r (W0, b0, W1, b1, ...):
    outer(A_l[r], B * D_l[r]) for each weight block and B * D_l[r] for each bias.

    ``out`` is (>= B, P) of the model dtype, C-contiguous, written; ``tmp`` (>= max layer
    width,) model dtype scratch (keeps the inner loop in the model dtype).
    """
    L = lay[R_MISC, 3]
    for l in range(L):
        A, D = _factors(ws, lay, l, B)
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
