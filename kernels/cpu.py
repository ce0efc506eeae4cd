"""Numba CPU kernels: the per-batch forward/backward core and the optimizer update.

The kernel contract (shared with the NumPy reference and the GPU backend)
---------------------------------------------------------------------------
* Kernels are procedures: inputs first, then outputs (``out_*`` or the caller-owned flat
  buffers ``grad``/``ws``/``state``), then scalars.  They write into caller-owned buffers,
  never allocate, never validate, never branch on names (activation and loss arrive as the
  integer codes of :mod:`minigd.nn`).
* Every array is C-contiguous.  ``params``/``grad`` are flat (P,) vectors in the order
  W0 (row-major, shape (fan_in, fan_out)), b0, W1, b1, ...  The workspace ``ws`` is one flat
  buffer; activations are batch-major (B, width) blocks inside it.
* ``lay`` is an int64 (8, max(L+1, 5)) table built by :mod:`minigd.kernels.workspace`:
  row 0 the layer sizes n_0..n_L; rows 1/2 the offsets of W_l / b_l in ``params``;
  row 3 the activation code of layer l (identity for the output layer); rows 4/5/6 the
  offsets in ``ws`` of the pre-activations z_l, the activations a_l and the deltas
  d_l = dLoss/dz_l, each a (capacity, n_{l+1}) block; row 7 holds
  [offset of the gathered-input block x0, offset of a (capacity,) scratch, capacity, L,
  the BLAS of the compiled GEMMs (0: SciPy's through numba's np.dot, 1: NumPy's; see
  :func:`_mm_nn`)].
* The batch is rows ``idx[:B]`` of ``X`` (labels ``yi`` for cross-entropy, else targets
  ``yf``); the unused one of ``yi``/``yf`` is an empty array so that each kernel has exactly
  one signature per dtype (float32, float64).
* Scaling: the batch loss is the **mean** of per-example losses, so deltas carry a 1/B
  factor; per-example quantities multiply it back out.
* Loss values are accumulated in float64 whatever the model dtype.
* Determinism: every loop runs serially in a fixed order, so results are bitwise
  reproducible for the same inputs.

Two regimes, chosen per batch by the backend (see ``minigd.backends.cpu``):
``step_loops`` runs a whole step (gather, forward, loss, backward, optional per-example
squared norms) as hand-written loops in one call: for small batches the cost is call
overhead, and one compiled call has the least.  For large batches the GEMMs go to BLAS
through numpy (``matmul(out=...)``), and only the epilogues below are compiled.

All kernels live in this one file on purpose: numba's on-disk cache only notices changes
to the file of the cached function, so keeping callees beside their callers keeps the
cache honest.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.core.extending import intrinsic

from . import _blas
from ._jit import jit

# activation, loss and optimizer-primitive codes and the shared constants: the one table.
# FLUSH: loss gradients and optimizer state (momentum, Adam moments) smaller in magnitude
# than it are flushed to 0.  A confident softmax produces probabilities far below float32's
# smallest normal number, and the momentum of a dead unit decays geometrically into
# subnormals; arithmetic on subnormals is ~100x slower on x86 (it made full-batch steps 50x
# and momentum steps 4x slower).
from .codes import (  # noqa: F401
    BINARY_CROSS_ENTROPY,
    CROSS_ENTROPY,
    FLUSH,
    GELU,
    IDENTITY,
    LEAKY_RELU,
    LEAKY_SLOPE,
    MSE,
    OP_ADAM,
    OP_CLIP,
    OP_DECAY,
    OP_SCALE,
    OP_SCALE_LR,
    OP_TRACE,
    RELU,
    SIGMOID,
    TANH,
)

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# rows of the `lay` table
R_SIZE, R_WOFF, R_BOFF, R_ACT, R_Z, R_A, R_D, R_MISC = range(8)

# A compiled kernel that passes the constant False/True to another one makes numba compile
# the callee again for Literal[bool]; reading the flag from this array types it plain bool.
_FALSE = np.zeros(1, dtype=np.bool_)


# ----------------------------------------------------------------------------- views
# Kernels index 2-D views of the flat buffers, never ``buf[offset + j]``: with a plain
# range index numba can drop its negative-index wraparound check and LLVM vectorises the
# inner loops (about 6x faster than offset arithmetic, measured).
@jit(inline="always")
def _W(params, lay, l):
    fi = lay[R_SIZE, l]
    fo = lay[R_SIZE, l + 1]
    o = lay[R_WOFF, l]
    return params[o : o + fi * fo].reshape(fi, fo)


@jit(inline="always")
def _b(params, lay, l):
    o = lay[R_BOFF, l]
    return params[o : o + lay[R_SIZE, l + 1]]


@jit(inline="always")
def _blk(ws, lay, row, l, B):
    """(B, n_{l+1}) view of block ``row`` (R_Z, R_A or R_D) of layer l."""
    n = lay[R_SIZE, l + 1]
    o = lay[row, l]
    return ws[o : o + B * n].reshape(B, n)


@jit(inline="always")
def _flat(ws, lay, row, l, B):
    n = lay[R_SIZE, l + 1]
    o = lay[row, l]
    return ws[o : o + B * n]


@jit(inline="always")
def _input(ws, lay, l, B):
    """Input of layer l: the gathered x0 block for l == 0, else a_{l-1}; (B, n_l)."""
    if l == 0:
        n = lay[R_SIZE, 0]
        o = lay[R_MISC, 0]
        return ws[o : o + B * n].reshape(B, n)
    return _blk(ws, lay, R_A, l - 1, B)


@jit(inline="always")
def _scratch(ws, lay, B):
    o = lay[R_MISC, 1]
    return ws[o : o + B]


# ----------------------------------------------------------------------------- elementary functions
@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (``llvm.fma``): the multiply-add that ``c += a * b`` compiles
    to under ``contract``, written out so that no fast-math rewrite (``reassoc``) can
    regroup a chain of them: a chain rounds as the same updates made one at a time."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None
    sig = a(a, b, c)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return sig, codegen


@intrinsic
def _pow2(typingctx, k):
    """2.0 ** k as a float64, for an int64 k in [-1022, 1023], from its exponent bits
    (vectorises, unlike ``math.ldexp``)."""
    if not isinstance(k, types.Integer):
        return None
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        bits = builder.shl(builder.add(args[0], ir.Constant(i64, 1023)), ir.Constant(i64, 52))
        return builder.bitcast(bits, ir.DoubleType())

    return sig, codegen


_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 in two parts (fdlibm's): n * _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
# 1/k!, k = 13 .. 0: the Taylor polynomial of e^r; its remainder on |r| <= ln(2)/2 is below
# 5e-18, so the result is within 1 ulp of e^x (0.86 ulp measured over 3e6 points)
_EXP_C = tuple(1.0 / math.factorial(k) for k in range(13, -1, -1))


@jit(fastmath=False)
def _exp64(x):
    """e^x of a float64, in float64 arithmetic that LLVM vectorises (``math.exp`` is a libm
    call per element: the softmax of a 512 x 10 batch spent 43 us in it, a sigmoid layer
    of 512 x 128 units ~170 us).  Used by the softmax cross-entropy and the sigmoid.

    Range reduction x = n ln 2 + r (two-part ln 2, one rounding each), e^r by the Taylor
    polynomial to degree 13 in ``llvm.fma`` Horner steps, then times 2^n in two factors
    so that a subnormal result rounds once.  Within 1 ulp of e^x (measured 0.86); rounded
    to float32 it is e^x correctly rounded at every point measured.  NaN gives NaN, -inf
    and x < -746 give 0, +inf and x > 710 give inf.  No fast-math flags: the
    reduction's roundings must stay as written (``reassoc`` would fold the two parts of
    ln 2 into one), and ``_fma`` keeps each multiply-add rounded once; LLVM inlines it
    into the vector loops of its callers."""
    xc = x if x >= -746.0 else -746.0  # (NaN -> -746 here; restored below)
    xc = xc if xc <= 710.0 else 710.0
    k = math.floor(xc * _LOG2E + 0.5)
    n = np.float64(k)
    r = _fma(-n, _LN2_HI, xc)
    r = _fma(-n, _LN2_LO, r)
    p = _EXP_C[0]
    for i in range(1, 14):  # Horner (a constant trip count: LLVM unrolls it)
        p = _fma(p, r, _EXP_C[i])
    k1 = k >> 1
    y = p * _pow2(k1) * _pow2(k - k1)
    return y if x == x else x


# ----------------------------------------------------------------------------- activations
@jit(inline="always")
def _act_forward(code, z, a):
    """a = f(z), elementwise over equal-length 1-D views."""
    n = z.shape[0]
    if code == RELU:  # max(z, 0) as np.maximum: relu(-inf) = 0, relu(NaN) = NaN
        for k in range(n):
            v = z[k]
            if v > 0 or v != v:
                a[k] = v
            else:
                a[k] = 0
    elif code == IDENTITY:
        for k in range(n):
            a[k] = z[k]
    elif code == LEAKY_RELU:
        for k in range(n):
            v = z[k]
            a[k] = v if v > 0 else v * LEAKY_SLOPE
    elif code == TANH:
        for k in range(n):
            a[k] = math.tanh(z[k])
    elif code == SIGMOID:  # in float64 through the vectorised e^x, rounded once to the model dtype
        for k in range(n):
            a[k] = 1.0 / (1.0 + _exp64(-np.float64(z[k])))
    else:  # GELU (exact, erf form): z * Phi(z)
        for k in range(n):
            v = z[k]
            a[k] = 0.5 * v * (1 + math.erf(v * _SQRT_HALF))


@jit(inline="always")
def _act_backward(code, z, a, d):
    """d *= f'(z) (f' from z for relu/leaky/gelu, from a = f(z) for tanh/sigmoid)."""
    n = z.shape[0]
    if code == RELU:
        for k in range(n):
            if not z[k] > 0:
                d[k] = 0
    elif code == IDENTITY:
        pass
    elif code == LEAKY_RELU:
        for k in range(n):
            if not z[k] > 0:
                d[k] *= LEAKY_SLOPE
    elif code == TANH:
        for k in range(n):
            d[k] *= 1 - a[k] * a[k]
    elif code == SIGMOID:
        for k in range(n):
            d[k] *= a[k] * (1 - a[k])
    else:  # GELU: Phi(z) + z phi(z)
        for k in range(n):
            v = z[k]
            d[k] *= 0.5 * (1 + math.erf(v * _SQRT_HALF)) + v * math.exp(-0.5 * v * v) * _INV_SQRT_2PI


# ----------------------------------------------------------------------------- losses
@jit(inline="always")
def _loss_rows(code, Z, D, yi, yf, idx, B, scale, row_loss, tmp):
    """Per-example losses of the logit rows Z[:B] and their gradients.

    Writes D[r] = scale * dloss_r/dz_r (entries below FLUSH flushed to 0); returns the float64 sum of the per-example losses,
    and writes each one to ``row_loss[r]`` when that view is non-empty.  ``tmp`` (B,) of
    the model dtype is overwritten (softmax cross-entropy keeps each row's maximum there;
    ``row_loss`` may be a view of it: row r's loss is written after its maximum is read).
    """
    n = Z.shape[1]
    total = 0.0
    keep = row_loss.shape[0] > 0
    if code == CROSS_ENTROPY:
        # three passes: the shifted logits z - max, then e^(z - max) over the whole block in
        # one vector loop (_exp64; a row of 10 logits is too short to vectorise), then the
        # row sums, losses and gradients: the formula of e = exp(z - m) row by row, with
        # e^x from _exp64 and the row's max kept in tmp.
        for r in range(B):
            z = Z[r]
            d = D[r]
            m = z[0]
            for k in range(1, n):
                if z[k] > m:
                    m = z[k]
            tmp[r] = m
            for k in range(n):
                d[k] = z[k] - m
        flat = D.reshape(B * n)
        for i in range(B * n):
            flat[i] = _exp64(np.float64(flat[i]))
        for r in range(B):
            z = Z[r]
            d = D[r]
            m = tmp[r]
            s = 0.0
            for k in range(n):
                s += d[k]
            lab = yi[idx[r]]
            lr = math.log(s) + m - z[lab]
            inv = scale / s
            for k in range(n):
                v = d[k] * inv
                d[k] = v if v > FLUSH else v * 0
            d[lab] -= scale
            if keep:
                row_loss[r] = lr
            total += lr
        return total
    for r in range(B):
        z = Z[r]
        d = D[r]
        row = idx[r]
        lr = 0.0
        if code == MSE:
            for k in range(n):
                diff = z[k] - yf[row, k]
                lr += 0.5 * diff * diff
                d[k] = diff * scale
        else:  # binary cross-entropy with logits
            for k in range(n):
                v = z[k]
                t = yf[row, k]
                lr += max(v, 0.0) + math.log1p(math.exp(-abs(v))) - t * v
                g = (1 / (1 + math.exp(-v)) - t) * scale
                d[k] = g if abs(g) > FLUSH else g * 0
        if keep:
            row_loss[r] = lr
        total += lr
    return total


# ----------------------------------------------------------------------------- loop path
@jit(inline="always")
def _gather(X, idx, B, ws, lay):
    x0 = _input(ws, lay, 0, B)
    n0 = x0.shape[1]
    for r in range(B):
        row = idx[r]
        for i in range(n0):
            x0[r, i] = X[row, i]


@jit
def _forward_rows_b1(A, W, Z):
    """Z[0, :] += a_i W[i, :] for every i with a_i != 0 (a = A[0]), in order, four rows
    per pass over Z: the output row is loaded and stored once per four weight rows, not
    once per row (each pass was bound by the store of Z), and each Z[0, j] gets the
    same multiply-adds in the same order as one row at a time (bitwise the same)."""
    fi, fo = W.shape
    n = 0
    i0 = i1 = i2 = 0
    for i in range(fi):
        if A[0, i] != 0:  # (NaN != 0: a NaN input row is applied, as one row at a time)
            if n == 0:
                i0 = i
            elif n == 1:
                i1 = i
            elif n == 2:
                i2 = i
            else:
                v0, v1, v2, v3 = A[0, i0], A[0, i1], A[0, i2], A[0, i]
                for j in range(fo):
                    z = _fma(v0, W[i0, j], Z[0, j])
                    z = _fma(v1, W[i1, j], z)
                    z = _fma(v2, W[i2, j], z)
                    Z[0, j] = _fma(v3, W[i, j], z)
                n = -1
            n += 1
    for k in range(n):  # the last one to three rows
        i = i0 if k == 0 else (i1 if k == 1 else i2)
        v = A[0, i]
        for j in range(fo):
            Z[0, j] = _fma(v, W[i, j], Z[0, j])


@jit(inline="always")
def _forward_loops(B, params, ws, lay, L):
    """Forward pass of the gathered batch through all layers (hand-written loops).

    Loop order i (fan-in) outermost: row i of W is read once and applied to every batch
    row, while the (B, fan_out) output block stays in L1.
    """
    for l in range(L):
        A = _input(ws, lay, l, B)
        W = _W(params, lay, l)
        b = _b(params, lay, l)
        Z = _blk(ws, lay, R_Z, l, B)
        fi, fo = W.shape
        for r in range(B):
            for j in range(fo):
                Z[r, j] = b[j]
        if B == 1:
            _forward_rows_b1(A, W, Z)
        else:
            for i in range(fi):
                for r in range(B):
                    v = A[r, i]
                    if v != 0:
                        for j in range(fo):
                            Z[r, j] = _fma(v, W[i, j], Z[r, j])
        if l < L - 1:
            _act_forward(lay[R_ACT, l], _flat(ws, lay, R_Z, l, B), _flat(ws, lay, R_A, l, B))


@jit(inline="always")
def _grad_rows(A, D, gW, i0, i1, B):
    """dW[i, :] = sum_r a[r, i] d[r, :] for rows i0 <= i < i1 (the first row assigns: no
    zeroing pass)."""
    fo = gW.shape[1]
    for i in range(i0, i1):
        v = A[0, i]
        for j in range(fo):
            gW[i, j] = v * D[0, j]
        for r in range(1, B):
            v = A[r, i]
            if v != 0:
                for j in range(fo):
                    gW[i, j] += v * D[r, j]


@jit(inline="always")
def _dprev_rows(D, W, Dp, i0, i1, B):
    """d_prev[r, i] = sum_j d[r, j] W[i, j] for rows i0 <= i < i1 of W (before f'(z))."""
    fo = W.shape[1]
    for i in range(i0, i1):
        for r in range(B):
            acc = D[r, 0] * np.float32(0)  # model dtype (a bare 0 promotes)
            for j in range(fo):
                acc += D[r, j] * W[i, j]
            Dp[r, i] = acc


@jit(inline="always")
def _bias_rows(D, gb, B):
    """db = sum_r d[r, :]."""
    fo = gb.shape[0]
    for j in range(fo):
        gb[j] = D[0, j]
    for r in range(1, B):
        for j in range(fo):
            gb[j] += D[r, j]


@jit(inline="always")
def _act_backward_prev(ws, lay, l, B):
    """d_{l-1} *= f'(z_{l-1})."""
    _act_backward(
        lay[R_ACT, l - 1],
        _flat(ws, lay, R_Z, l - 1, B),
        _flat(ws, lay, R_A, l - 1, B),
        _flat(ws, lay, R_D, l - 1, B),
    )


@jit(inline="always")
def _backward_loops(B, params, grad, ws, lay, L, sqn, sqn_scale):
    """Backward pass from the output deltas; writes the gradient of the mean loss.

    With a non-empty ``sqn`` (B,) view (zeroed by the caller) it also accumulates each
    example's squared gradient norm: a dense layer's per-example weight gradient is the
    outer product a_r^T d_r, so its squared norm is |a_r|^2 |d_r|^2, plus |d_r|^2 for the
    bias (Goodfellow 2015).  ``sqn_scale`` (= B^2) turns deltas of the mean loss back into
    deltas of the per-example loss.  (A batch-1 training step may run
    :func:`_backward_update_b1` instead, which applies the optimizer as it goes.)
    """
    want_sqn = sqn.shape[0] > 0
    for l in range(L - 1, -1, -1):
        A = _input(ws, lay, l, B)
        D = _blk(ws, lay, R_D, l, B)
        W = _W(params, lay, l)
        fi = W.shape[0]
        if want_sqn:
            _sqnorm_rows(A, D, B, sqn, sqn_scale)
        _grad_rows(A, D, _W(grad, lay, l), 0, fi, B)
        _bias_rows(D, _b(grad, lay, l), B)
        if l > 0:
            _dprev_rows(D, W, _blk(ws, lay, R_D, l - 1, B), 0, fi, B)
            _act_backward_prev(ws, lay, l, B)


#: parameters per finiteness check of the fused batch-1 step (:func:`_fused_layer_b1`):
#: the new values are checked while still in cache, one reduction per block (a reduction
#: per row of 128 cost as much as the row's update)
FUSE_BLOCK = 2048
#: a batch-1 fused step whose parameters take at most this many bytes stages every new value
#: in ``grad`` and copies them over once all are checked; a bigger one computes them twice
#: instead (check, then commit), so that the weights alone stay in the L2 cache: with a
#: params-sized second array in play, 784-256-256-10 (1.08 MB of float32 weights) ran 1.25x
#: slower on a 2 MB L2, and at 105 KB (64-128-128-10) computing twice ran 1.1x slower than
#: staging (:func:`_backward_update_b1`, bench/results/b1_floor.md)
STAGE_BYTES = 1 << 18


@jit(fastmath=False)
def _exact_mul(a, b):
    """a * b rounded on its own.  Compiled without fast-math flags: LLVM inlines it but
    never contracts it into a multiply-add with its neighbours (an instruction needs the
    ``contract`` flag for that), so a fused loop rounds as the separate passes did."""
    return a * b


@jit(fastmath=False)
def _exact_add(a, b):
    """a + b rounded on its own (see :func:`_exact_mul`)."""
    return a + b


@jit
def _fused_rows(
    A, D, W, Dp, Out, flat, S1, i0, i1, rows, bias, dprev, mid, nest, m, wd1, wd2, nlr, fl, zero, one, commit, stage
):
    """Batch 1, a chain without Adam: for weight rows i0 <= i < i1, in blocks of ``rows``
    rows, the gradient a_i * d (d for the bias rows, ``bias``), the optimizer and the new
    parameter value in one loop over the row, in registers.

    Called once or twice per step and layer (:func:`_backward_update_b1`).  First with ``commit``
    False: per block, with ``dprev`` (never with ``commit``) first d_prev from the block's
    rows of W (left in L1 for their update) into ``Dp``; then the new value of W[i, j]
    into Out[i - b0, j] (b0 the block's first row; Out a block of scratch, ``flat`` the
    same memory, 1-D) or, with ``stage``, into Out[i, j] (Out the layer's slots in
    ``grad``, ``flat`` the same, 1-D), and the momentum slots ``S1`` updated; then the
    block's new values checked (sum(v * 0): 0, or NaN when one is not finite); returns
    the sum of the checks.  Then, once every new value of the step is known to be finite,
    the caller copies the staged values into W, or calls again with ``commit`` True: the
    new values into W itself (Out, flat, Dp unused), the momentum read back from ``S1``;
    returns 0.  The two calls round alike (the same expressions, and the momentum stored
    in between), so W gets exactly the values that were checked.

    ``W``: 2-D view of the layer's parameters; ``S1``: its momentum slots (without a trace
    any array of W's type, unused); the inputs in row 0 of ``A``, the deltas in row 0 of
    ``D``; ``zero``/``one`` 0 and 1 in the model dtype (a literal 1 would promote float32
    to float64).  The block and row loops are in here, and the rows are indexed in the
    2-D views: numba counts references (atomic increments) of every view it makes, of
    every array handed to an inlined function and of every array argument of a call, and
    once per block of 2048 weights (98 blocks per step for 784-256-256-10) those cost as
    much as ~15% of the step (measured).  Each case is its own loop (a branch in the inner
    loop keeps LLVM from vectorising it).

    The arithmetic is :func:`_grad_rows`' then :func:`_opt_fused_slice`'s then
    ``params += update``, rounding for rounding: the product and the final sum go through
    :func:`_exact_mul` / :func:`_exact_add`, which stored values used to keep out of
    multiply-add contractions, and every other operation has a single contraction
    candidate.  (Adam's moment updates have two, which LLVM picks differently in vector
    and remainder code: Adam takes the blocked path.)  No reduction in the row loops (the
    check is one flat reduction per block: a reduction's epilogue per row of 128 cost as
    much as the row's update)."""
    n = W.shape[1]
    check = zero
    for b0 in range(i0, i1, rows):
        b1 = min(i1, b0 + rows)
        ob = i0 - i0 if stage else b0  # Out's row of W's row b0
        if dprev:  # :func:`_dprev_rows` at B = 1, written out (an inlined call counts references)
            for i in range(b0, b1):
                acc = zero
                for j in range(n):
                    acc += D[0, j] * W[i, j]
                Dp[0, i] = acc
        if mid == OP_TRACE and not commit:  # the momentum updated (as the separate passes
            for i in range(b0, b1):  # do, whether or not the step is then applied)
                v = one if bias else A[0, i]
                for j in range(n):
                    w = W[i, j]
                    g = _exact_mul(v, D[0, j]) + wd1 * w
                    vp = m * S1[i, j] + g
                    vp = vp if abs(vp) > fl else vp * zero
                    S1[i, j] = vp
                    step = (g + m * vp) if nest else vp  # (nest: loop-invariant; a select)
                    Out[i - ob, j] = _exact_add(w, nlr * (step + wd2 * w))
        elif mid == OP_TRACE:  # commit: the momentum as the first call left it; W in place (a
            for i in range(b0, b1):  # loop writing through a second view of W was not
                v = one if bias else A[0, i]  # vectorised: LLVM's run-time overlap check failed)
                for j in range(n):
                    w = W[i, j]
                    g = _exact_mul(v, D[0, j]) + wd1 * w
                    vp = S1[i, j]
                    step = (g + m * vp) if nest else vp
                    W[i, j] = _exact_add(w, nlr * (step + wd2 * w))
        elif commit:
            for i in range(b0, b1):
                v = one if bias else A[0, i]
                for j in range(n):
                    w = W[i, j]
                    W[i, j] = _exact_add(w, nlr * ((_exact_mul(v, D[0, j]) + wd1 * w) + wd2 * w))
        else:
            for i in range(b0, b1):
                v = one if bias else A[0, i]
                for j in range(n):
                    w = W[i, j]
                    Out[i - ob, j] = _exact_add(w, nlr * ((_exact_mul(v, D[0, j]) + wd1 * w) + wd2 * w))
        if not commit:  # (on a view: flat[base + p] compiled to gathers, for the negative-index wrap)
            fv = flat[(b0 - ob) * n : (b1 - ob) * n]
            for p in range(fv.shape[0]):
                check += fv[p] * zero
    return check


@jit
def _fused_layer_b1(params, grad, s1, D, A, Dp, lay, l, hp, codes, plan, commit, stage):
    """Layer l of a batch-1 step for a chain without Adam (see :func:`_backward_update_b1`):
    :func:`_fused_rows` over the weights, then the bias.  ``commit`` False: d_prev (for
    l > 0) and the new values computed, in blocks of about FUSE_BLOCK weights, into a
    scratch block at the head of ``grad`` (or, with ``stage``, into the layer's own slots
    of ``grad``) and checked there; returns the layer's finiteness check, nothing in
    ``params`` changed.  ``commit`` True (never with ``stage``): the new values written
    into ``params``; returns 0.  (Flags and bounds are computed, not literals: numba would
    compile :func:`_fused_rows` once per literal value.)"""
    last = hp.shape[0] - 1
    zero = hp[last, 7]
    fl = hp[last, 5]
    i_wd1, i_mid, i_wd2, i_lr = plan[2], plan[3], plan[4], plan[5]
    wd1 = hp[i_wd1, 0] if i_wd1 >= 0 else zero
    wd2 = hp[i_wd2, 0] if i_wd2 >= 0 else zero
    nlr = hp[i_lr, 3] if i_lr >= 0 else hp[last, 6]
    mid = codes[i_mid] if i_mid >= 0 else -1
    m = hp[i_mid, 0] if i_mid >= 0 else zero
    nest = i_mid >= 0 and hp[i_mid, 1] != 0
    one = hp[last, 6]
    src = s1 if mid == OP_TRACE else params  # (any params-sized vector without a trace)
    W = _W(params, lay, l)
    S1 = _W(src, lay, l)
    fi, fo = W.shape
    bo = lay[R_BOFF, l]
    Bv = params[bo : bo + fo].reshape(1, fo)
    Bs = src[bo : bo + fo].reshape(1, fo)
    z0 = fo - fo
    rows = fi if commit else min(fi, max(1, FUSE_BLOCK // fo))  # (rows * fo <= fi * fo <= len(grad))
    if stage:
        wo = lay[R_WOFF, l]
        flat = grad[wo : wo + fi * fo]
        blk = flat.reshape(fi, fo)
        bflat = grad[bo : bo + fo]
        bblk = bflat.reshape(1, fo)
    else:
        flat = grad[: rows * fo]
        blk = flat.reshape(rows, fo)
        bflat, bblk = flat, blk
    check = _fused_rows(
        A, D, W, Dp, blk, flat, S1, z0, fi, rows, l < 0, l > 0 and not commit, mid, nest, m, wd1, wd2, nlr, fl, zero,
        one, commit, stage,
    )  # fmt: skip
    bias = _fused_rows(
        A, D, Bv, Dp, bblk, bflat, Bs, z0, z0 + 1, z0 + 1, l >= 0, l < 0, mid, nest, m, wd1, wd2, nlr, fl, zero, one,
        commit, stage,
    )  # fmt: skip
    return check + bias


@jit
def _backward_update_b1(B, params, grad, ws, lay, L, hp, codes, plan, s1):
    """The backward pass of a batch-1 step with the optimizer applied (a chain that fuses,
    without clipping or Adam; hp's step scalars cast by :func:`_opt_consts`), in two
    sweeps.  The first, last layer to first, is :func:`_fused_layer_b1` per layer, then f'
    into the previous deltas: each weight row is read once for d_prev, its gradient and
    the optimizer, the momentum is updated, and every new parameter value is computed and
    checked, but not yet stored in ``params``: it goes to its own slot of ``grad`` (a
    model of at most :data:`STAGE_BYTES`) or to a block of scratch (in L1) at the head of
    ``grad``.  Only if all are finite does the second sweep write them: a copy of the
    staged values, or (``commit``) the same values computed again.  At batch 1 a step is
    memory traffic over the weights (bench/results/b1_floor.md), and a params-sized second
    array (as the undo record of the old values was, before) made the working set of
    784-256-256-10 overflow a 2 MB L2: computing twice reads W twice and writes it once,
    1.25x faster there than a single pass with the record.

    ``B`` is 1 (an argument, not a literal: numba would compile :func:`act_backward` for
    ``Literal[int](1)``); ``s1`` is the momentum vector (params-sized; may be empty
    without one).  Returns the finiteness check of the new parameters (0: applied; NaN:
    nothing in ``params`` changed, the momentum updated as the separate passes update it).
    ``grad`` is scratch: the staged values, or its head (about FUSE_BLOCK numbers), the
    rest left as it was.  Per element the arithmetic is that of :func:`_backward_loops` +
    :func:`_opt_update` + :func:`_apply_if_finite`, so the results are bitwise theirs
    (tests/test_fused_update.py)."""
    check = hp[hp.shape[0] - 1, 7]  # 0 in the model dtype
    commit = L < 0  # (False, and below True, as values: a literal would compile twice)
    P = params.shape[0]
    stage = P * params.itemsize <= STAGE_BYTES
    for l in range(L - 1, -1, -1):
        D = _blk(ws, lay, R_D, l, B)
        Dp = _blk(ws, lay, R_D, l - 1 if l > 0 else l, B)
        check += _fused_layer_b1(params, grad, s1, D, _input(ws, lay, l, B), Dp, lay, l, hp, codes, plan, commit, stage)
        if l > 0:
            act_backward(B, ws, lay, l - 1)
    if check == check:  # (0, or NaN: some new value is not finite)
        if stage:
            for p in range(P):
                params[p] = grad[p]
        else:
            commit = not commit
            for l in range(L):
                D = _blk(ws, lay, R_D, l, B)
                _fused_layer_b1(params, grad, s1, D, _input(ws, lay, l, B), D, lay, l, hp, codes, plan, commit, stage)
    return check


@jit(inline="always")
def _sqnorm_rows(A, D, B, sqn, scale):
    """sqn[r] += scale * (|A[r]|^2 + 1) * |D[r]|^2.

    Row sums accumulate in the model dtype (vectorised partial sums; converting each
    float32 to float64 first cost as much as the backward's GEMV at batch 32), the
    product in float64.  Rows whose float32 sums overflow (rare) are redone in float64
    in a second pass: a float64 fallback inside the first loop kept LLVM from
    vectorising the row sums (3x slower, measured).
    """
    if _sqnorm_rows_model_dtype(A, D, B, sqn, scale):
        for r in range(B):
            if not math.isfinite(_row_sqnorm(A[r], D[r], scale)):
                sqn[r] += (1.0 + _sumsq64(A[r])) * _sumsq64(D[r]) * scale


@jit(inline="always")
def _row_sqnorm(a, d, scale):
    """scale * (|a|^2 + 1) * |d|^2 with the sums in the model dtype."""
    asq = a[0] * np.float32(0)  # the model dtype: a bare 0 would promote to float64
    for i in range(a.shape[0]):
        asq += a[i] * a[i]
    dsq = d[0] * np.float32(0)
    for j in range(d.shape[0]):
        dsq += d[j] * d[j]
    return (1.0 + np.float64(asq)) * np.float64(dsq) * scale


@jit
def _sqnorm_rows_model_dtype(A, D, B, sqn, scale):
    """The fast pass of :func:`_sqnorm_rows`: adds every row whose sum is finite;
    returns whether some row was not (those are left for the float64 pass)."""
    bad = False
    for r in range(B):
        c = _row_sqnorm(A[r], D[r], scale)
        if math.isfinite(c):
            sqn[r] += c
        else:
            bad = True
    return bad


@jit(inline="always")
def _sumsq64(v):
    s = 0.0
    for i in range(v.shape[0]):
        x = np.float64(v[i])
        s += x * x
    return s


@jit
def forward_loops(X, idx, B, params, ws, lay):
    """Evaluation-mode forward of rows idx[:B] of X; the logits land in the z block of
    the last layer ((B, n_L))."""
    _gather(X, idx, B, ws, lay)
    _forward_loops(B, params, ws, lay, lay[R_MISC, 3])


@jit(inline="always")
def _output_loss(yi, yf, idx, B, ws, lay, loss_code, want_sqn, want_row_loss):
    """Loss and output deltas of the forward pass just run; returns the mean loss.

    The scratch block receives the per-example losses when ``want_row_loss`` (and not
    ``want_sqn``), and is zeroed for the backward's per-example norms when ``want_sqn``.
    """
    L = lay[R_MISC, 3]
    rows = _scratch(ws, lay, B)
    total = _loss_rows(
        loss_code,
        _blk(ws, lay, R_Z, L - 1, B),
        _blk(ws, lay, R_D, L - 1, B),
        yi,
        yf,
        idx,
        B,
        1.0 / B,
        rows[: B if (want_row_loss and not want_sqn) else 0],
        rows,
    )
    if want_sqn:
        for r in range(B):
            rows[r] = 0
    return total / B


@jit
def _loss_grad_loops(X, yi, yf, idx, B, params, grad, ws, lay, loss_code, want_sqn, want_row_loss):
    L = lay[R_MISC, 3]
    _gather(X, idx, B, ws, lay)
    _forward_loops(B, params, ws, lay, L)
    loss = _output_loss(yi, yf, idx, B, ws, lay, loss_code, want_sqn, want_row_loss)
    _backward_loops(
        B, params, grad, ws, lay, L, _scratch(ws, lay, B)[: B if want_sqn else 0], np.float64(B) * np.float64(B)
    )
    return loss


@jit
def loss_grad_loops(X, yi, yf, idx, B, params, grad, ws, lay, loss_code, want_sqn, want_row_loss):
    """Mean loss of rows idx[:B] and its gradient (written to ``grad``), by loops.

    Returns the mean loss (float64).  With ``want_sqn`` the per-example squared gradient
    norms land in the scratch block; with ``want_row_loss`` (and not want_sqn) the
    per-example losses do.
    """
    return _loss_grad_loops(X, yi, yf, idx, B, params, grad, ws, lay, loss_code, want_sqn, want_row_loss)


# ----------------------------------------------------------------------------- BLAS path
# Python drives np.matmul(out=...) on views of the workspace; these are the epilogues.
@jit
def gather_rows(X, idx, B, ws, lay):
    """x0[r, :] = X[idx[r], :] for r < B (the input block)."""
    _gather(X, idx, B, ws, lay)


@jit
def bias_act_forward(B, params, ws, lay, l):
    """z_l += b_l (row-broadcast), then a_l = f(z_l) for hidden layers."""
    _bias_act(B, params, ws, lay, l)


@jit(inline="always")
def _bias_act(B, params, ws, lay, l):
    # The case is chosen once, outside the row loops: with the activation's dispatch (and
    # its tanh/erf/exp branches) inside the row loop, LLVM compiled every case 1.4-4.5x
    # slower, the output layer's bias add included (issue 20).  ReLU, the default, is
    # applied to each row as the bias leaves it (one pass over z_l, not two); the same
    # arithmetic as the bias pass, then _act_forward, in every case.
    Z = _blk(ws, lay, R_Z, l, B)
    A = _blk(ws, lay, R_A, l, B)
    b = _b(params, lay, l)
    n = b.shape[0]
    code = lay[R_ACT, l]
    hidden = l < lay[R_MISC, 3] - 1
    if hidden and code == RELU:  # _act_forward's ReLU on the biased row, in the same pass
        for r in range(B):
            z = Z[r]
            a = A[r]
            for j in range(n):
                v = z[j] + b[j]
                z[j] = v
                if v > 0 or v != v:
                    a[j] = v
                else:
                    a[j] = 0
    else:  # the bias, then for a hidden layer the activation over the whole block
        for r in range(B):
            z = Z[r]
            for j in range(n):
                z[j] += b[j]
        if hidden:
            _act_forward(code, _flat(ws, lay, R_Z, l, B), _flat(ws, lay, R_A, l, B))


@jit
def loss_rows(yi, yf, idx, B, ws, lay, loss_code, want_row_loss):
    """Output-layer loss and deltas; returns the mean loss (per-example losses to the
    scratch block when ``want_row_loss``)."""
    return _output_loss(yi, yf, idx, B, ws, lay, loss_code, _FALSE[0], want_row_loss)


@jit
def bias_grad(B, grad, ws, lay, l):
    """db_l = sum_r d_l[r, :]."""
    _bias_grad(B, grad, ws, lay, l)


@jit(inline="always")
def _bias_grad(B, grad, ws, lay, l):
    D = _blk(ws, lay, R_D, l, B)
    gb = _b(grad, lay, l)
    for j in range(gb.shape[0]):
        gb[j] = 0
    for r in range(B):
        for j in range(gb.shape[0]):
            gb[j] += D[r, j]


@jit
def act_backward(B, ws, lay, l):
    """d_l *= f'(z_l) for hidden layer l (after d_l = d_{l+1} W_{l+1}^T)."""
    _act_backward(lay[R_ACT, l], _flat(ws, lay, R_Z, l, B), _flat(ws, lay, R_A, l, B), _flat(ws, lay, R_D, l, B))


@jit
def sqnorm_accumulate(B, ws, lay, l, scale, first):
    """scratch[r] (+)= scale * (|a_{l-1,r}|^2 + 1) * |d_{l,r}|^2: the per-example squared
    gradient norm of layer l's weights and bias (a_{-1} is the gathered input x0)."""
    rows = _scratch(ws, lay, B)
    if first:
        for r in range(B):
            rows[r] = 0
    _sqnorm_rows(_input(ws, lay, l, B), _blk(ws, lay, R_D, l, B), B, rows, scale)


# ----------------------------------------------------------------------------- compiled BLAS path
# The same BLAS path as one compiled call: numba lowers np.dot(..., out) on the workspace
# views to BLAS gemm through SciPy's BLAS bindings, so these need SciPy at compile time
# (the backend checks; without SciPy it drives the GEMMs from Python instead).
@jit(inline="always")
def _forward_blas(B, params, ws, lay, L):
    for l in range(L):
        _mm_nn(_input(ws, lay, l, B), _W(params, lay, l), _blk(ws, lay, R_Z, l, B), lay[R_MISC, 4])
        _bias_act(B, params, ws, lay, l)


@jit
def forward_blas(X, idx, B, params, ws, lay):
    """Evaluation-mode forward through BLAS (see forward_loops)."""
    _gather(X, idx, B, ws, lay)
    _forward_blas(B, params, ws, lay, lay[R_MISC, 3])


@jit
def loss_grad_blas(X, yi, yf, idx, B, params, grad, ws, lay, loss_code, want_sqn, want_row_loss):
    """:func:`loss_grad_loops` with the GEMMs in BLAS: same contract, same outputs."""
    return _loss_grad_blas(X, yi, yf, idx, B, params, grad, ws, lay, loss_code, want_sqn, want_row_loss, True)


@jit
def loss_deltas_blas(X, yi, yf, idx, B, params, grad, ws, lay, loss_code):
    """:func:`loss_grad_blas` without the weight-gradient GEMMs: the workspace's activations
    and deltas, the loss and the bias gradients in ``grad``; its weight entries are left as
    they were (for kernels that need the layers' factors, not their products: the one-pass
    gradient moments)."""
    return _loss_grad_blas(X, yi, yf, idx, B, params, grad, ws, lay, loss_code, _FALSE[0], _FALSE[0], False)


@jit(inline="always")
def _loss_grad_blas(X, yi, yf, idx, B, params, grad, ws, lay, loss_code, want_sqn, want_row_loss, wgrad):
    """The body of :func:`loss_grad_blas` (``wgrad``: with the weight-gradient GEMMs)."""
    L = lay[R_MISC, 3]
    _gather(X, idx, B, ws, lay)
    _forward_blas(B, params, ws, lay, L)
    loss = _output_loss(yi, yf, idx, B, ws, lay, loss_code, want_sqn, want_row_loss)
    rows = _scratch(ws, lay, B)
    scale = np.float64(B) * np.float64(B)
    for l in range(L - 1, -1, -1):
        A = _input(ws, lay, l, B)
        D = _blk(ws, lay, R_D, l, B)
        if wgrad:
            _mm_tn(A, D, _W(grad, lay, l), lay[R_MISC, 4])
        if l == L - 1:  # hidden layers' bias gradients: with their activation backward below
            _bias_grad(B, grad, ws, lay, l)
        if want_sqn:
            _sqnorm_rows(A, D, B, rows, scale)
        if l > 0:
            _mm_nt(D, _W(params, lay, l), _blk(ws, lay, R_D, l - 1, B), lay[R_MISC, 4])
            _act_backward_bias_grad(B, grad, ws, lay, l - 1)
    return loss


@jit
def train_step_blas(X, yi, yf, idx, B, params, grad, ws, lay, loss_code, want_sqn, codes, hp, soff, state, plan, lr, t):
    """:func:`train_step_loops` with the GEMMs in BLAS, as one compiled call (``plan[0]`` nonzero,
    else :func:`train_step_blas_generic`)."""
    loss = loss_grad_blas(X, yi, yf, idx, B, params, grad, ws, lay, loss_code, want_sqn, _FALSE[0])
    if not math.isfinite(loss):
        return loss, 0, math.nan
    check, gsq = _opt_update(params, grad, codes, hp, soff, state, plan, lr, t, want_sqn)
    return loss, _apply_if_finite(params, grad, check), gsq


@jit
def train_step_blas_generic(
    X, yi, yf, idx, B, params, grad, ws, lay, loss_code, want_sqn, codes, hp, soff, state, plan, lr, t
):
    """:func:`train_step_blas` for an optimizer chain that does not fuse (``plan[0] == 0``)."""
    loss = loss_grad_blas(X, yi, yf, idx, B, params, grad, ws, lay, loss_code, want_sqn, _FALSE[0])
    if not math.isfinite(loss):
        return loss, 0, math.nan
    check, gsq = _opt_update_generic(params, grad, codes, hp, soff, state, plan, lr, t, want_sqn)
    return loss, _apply_if_finite(params, grad, check), gsq


# ----------------------------------------------------------------------------- runs of steps
@jit(fastmath=False)
def sum64(rows):
    """Sum of a 1-D array accumulated in float64, in row order (no fast-math: the same
    additions wherever LLVM compiles it, alone or inlined into a run of steps; the
    per-example squared norms of a tracked step, a few thousand numbers at most)."""
    s = 0.0
    for r in range(rows.shape[0]):
        s += rows[r]
    return s


@intrinsic
def _monotonic_ns(typingctx):
    """``clock_gettime(CLOCK_MONOTONIC)`` in integer nanoseconds: the clock of Python's
    ``time.perf_counter`` on Linux (the only platform that calls :func:`run_steps`; its
    CLOCK_MONOTONIC is 1), through the vDSO (~20 ns).  The symbol is resolved by name when
    the code is loaded, so a cached kernel holds no address."""
    sig = types.int64()

    def codegen(context, builder, signature, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        ts_t = ir.LiteralStructType([i64, i64])
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i32, [i32, ts_t.as_pointer()]), "clock_gettime"
        )
        ts = cgutils.alloca_once(builder, ts_t)
        builder.store(ir.Constant(ts_t, [0, 0]), ts)
        builder.call(fn, [ir.Constant(i32, 1), ts])
        sec = builder.load(cgutils.gep_inbounds(builder, ts, 0, 0))
        ns = builder.load(cgutils.gep_inbounds(builder, ts, 0, 1))
        return builder.add(builder.mul(sec, ir.Constant(i64, 1_000_000_000)), ns)

    return sig, codegen


@jit(inline="always")
def _run_record(rec, s, loss, ok, gsq, start, tracked, ws, lay, B, max_ns):
    """Row s of a run's records (see :func:`run_steps_loops`); True when the run stops here."""
    now = _monotonic_ns() - start
    rec[s, 0] = loss
    rec[s, 1] = 1.0 if ok else 0.0
    rec[s, 2] = gsq
    rec[s, 3] = now * 1e-9
    rec[s, 4] = sum64(_scratch(ws, lay, B)) if tracked and ok else math.nan
    return not ok or (max_ns >= 0 and now >= max_ns)


@jit
def run_steps_loops(
    X, yi, yf, idx, B, n_steps, params, grad, ws, lay, loss_code, want_sqn, codes, hp, soff, state, plan,
    lrs, t0, first, every, max_ns, start, rec,
):  # fmt: skip
    """``n_steps`` calls of :func:`train_step_loops` in one call: what ``Backend.run_steps``
    does in Python, step for step, without a Python call per step (at batch 1 the Python
    loop around the step cost ~1.4 us of a ~5 us step).  ``plan[0]`` must be nonzero (a
    chain that fuses: every named optimizer).

    Step s takes rows ``idx[s * B:(s + 1) * B]`` (all of ``idx`` when it holds B rows),
    learning rate ``lrs[s]`` and update count ``t0 + s``: the same kernel, arguments and
    order as one call per step, so the parameters and optimizer state are bitwise those of
    the Python loop.  Steps ``first, first + every, ...`` (and every step with
    ``want_sqn``) compute their per-example squared norms.  Row s of ``rec`` (n_steps, 5)
    gets the loss, applied (1/0), |g|^2, the seconds from the call's start to the step's
    end, and at the tracked applied steps the float64 row-order sum of the per-example
    squared norms (:func:`sum64`; NaN elsewhere).  ``start``: the CLOCK_MONOTONIC reading in
    ns that the times count from (the caller's, taken just before the call, so that the
    call's own cost is in the first step's time as it was in the Python loop); < 0: read
    here.  The run stops after the first rejected step and, with ``max_ns >= 0``, after the
    first step that ends ``max_ns`` ns or more after the start.  Returns the number of steps
    done."""
    if start < 0:
        start = _monotonic_ns()
    full = idx.shape[0] == B
    for s in range(n_steps):
        rows = idx if full else idx[s * B : (s + 1) * B]
        tracked = s >= first and (s - first) % every == 0
        loss, ok, gsq = train_step_loops(
            X, yi, yf, rows, B, params, grad, ws, lay, loss_code, want_sqn or tracked, codes, hp, soff, state, plan,
            lrs[s], t0 + s,
        )  # fmt: skip
        if _run_record(rec, s, loss, ok, gsq, start, tracked, ws, lay, B, max_ns):
            return s + 1
    return n_steps


@jit
def run_steps_blas(
    X, yi, yf, idx, B, n_steps, params, grad, ws, lay, loss_code, want_sqn, codes, hp, soff, state, plan,
    lrs, t0, first, every, max_ns, start, rec,
):  # fmt: skip
    """:func:`run_steps_loops` with :func:`train_step_blas` (the compiled BLAS regime)."""
    if start < 0:
        start = _monotonic_ns()
    full = idx.shape[0] == B
    for s in range(n_steps):
        rows = idx if full else idx[s * B : (s + 1) * B]
        tracked = s >= first and (s - first) % every == 0
        loss, ok, gsq = train_step_blas(
            X, yi, yf, rows, B, params, grad, ws, lay, loss_code, want_sqn or tracked, codes, hp, soff, state, plan,
            lrs[s], t0 + s,
        )  # fmt: skip
        if _run_record(rec, s, loss, ok, gsq, start, tracked, ws, lay, B, max_ns):
            return s + 1
    return n_steps


# ----------------------------------------------------------------------------- optimizer
@jit
def _opt_chain_generic(params, grad, codes, hp, soff, state, lr, t):
    """Run each primitive of the chain as its own pass over ``grad`` (any chain)."""
    P = params.shape[0]
    fl = hp[hp.shape[0] - 1, 5]
    zero = hp[hp.shape[0] - 1, 7]  # 0 in the model dtype (see _opt_fused_slice)
    for k in range(codes.shape[0]):
        c = codes[k]
        so = soff[k]
        if c == OP_CLIP:
            _clip_factor(grad, hp, k)
            f = hp[k, 3]
            for p in range(P):
                grad[p] *= f
        elif c == OP_DECAY:
            wd = hp[k, 0]
            for p in range(P):
                grad[p] += wd * params[p]
        elif c == OP_TRACE:
            m = hp[k, 0]
            v = state[so : so + P]
            if hp[k, 1] != 0:  # Nesterov
                for p in range(P):
                    vp = m * v[p] + grad[p]
                    vp = vp if abs(vp) > fl else vp * zero
                    v[p] = vp
                    grad[p] = grad[p] + m * vp
            else:
                for p in range(P):
                    vp = m * v[p] + grad[p]
                    vp = vp if abs(vp) > fl else vp * zero
                    v[p] = vp
                    grad[p] = vp
        elif c == OP_ADAM:
            _adam_scalars(hp, k, t)
            b1, b2, eps = hp[k, 0], hp[k, 1], hp[k, 2]
            c1, c2, ob1, ob2 = hp[k, 3], hp[k, 4], hp[k, 5], hp[k, 6]
            m1 = state[so : so + P]
            m2 = state[so + P : so + 2 * P]
            for p in range(P):
                g = grad[p]
                a = b1 * m1[p] + ob1 * g
                s = b2 * m2[p] + ob2 * g * g
                a = a if abs(a) > fl else a * zero
                s = s if s > fl else s * zero
                m1[p] = a
                m2[p] = s
                grad[p] = (a / c1) / (np.sqrt(s / c2) + eps)
        elif c == OP_SCALE_LR:
            hp[k, 3] = -lr
            f = hp[k, 3]
            for p in range(P):
                grad[p] *= f
        else:  # OP_SCALE
            f = hp[k, 0]
            for p in range(P):
                grad[p] *= f


@jit(inline="always")
def _clip_factor(grad, hp, k):
    """hp[k, 3] = min(1, max_norm / |grad|) in the model dtype; returns |grad|^2."""
    sq = 0.0
    for p in range(grad.shape[0]):
        g = np.float64(grad[p])  # float64 (numba's float() keeps float32): g*g overflows from |g| ~ 2e19
        sq += g * g
    nrm = math.sqrt(sq)
    hp[k, 3] = hp[k, 0] / nrm if nrm > hp[k, 0] else 1.0
    return sq


@jit(inline="always")
def _adam_scalars(hp, k, t):
    """Bias corrections and 1 - beta, cast to the model dtype, into hp[k, 3:7]."""
    hp[k, 3] = 1.0 - np.float64(hp[k, 0]) ** t
    hp[k, 4] = 1.0 - np.float64(hp[k, 1]) ** t
    hp[k, 5] = 1 - hp[k, 0]
    hp[k, 6] = 1 - hp[k, 1]


@jit(inline="always")
def _opt_consts(hp, codes, plan, lr, t):
    """Cast this step's scalars (-lr, Adam's bias corrections) into hp's scratch columns."""
    if plan[5] >= 0:
        hp[plan[5], 3] = -lr
    if plan[3] >= 0 and codes[plan[3]] == OP_ADAM:
        _adam_scalars(hp, plan[3], t)


@jit
def _opt_fused_slice(pp, gg, s1, s2, hp, codes, plan):
    """The usual chains -- [decay] [trace | adam] [decay] [scale_by_lr] -- in ONE pass
    over a slice: ``gg`` (raw gradient in, update out), ``pp`` the matching parameters,
    ``s1``/``s2`` the matching state slots (momentum / Adam moments; unused ones may be
    anything).  Per-element arithmetic is the generic chain's, in the same order.

    ``plan`` (int64, from minigd.optim.fusion_plan) = [fused?, i_clip, i_decay_before,
    i_trace_or_adam, i_decay_after, i_lr]: row indices into codes/hp (-1 absent); the
    step's scalars were cast by :func:`_opt_consts`.  Returns the sum of (params + update) * 0
    in the model dtype: 0 if every new parameter is finite, else NaN (x * 0 is NaN for
    inf and NaN; fastmath leaves out nnan/ninf, so it is not folded away), and it cannot
    overflow.  Every value in these loops stays in the model dtype: a float64 accumulator
    or a ``* 0`` (an int64 literal, which promotes float32 to float64) mixes vector widths
    and LLVM then leaves the loop scalar -- 3.3x slower for SGD + momentum in float32,
    measured.  (No other reduction or run-time branch in these loops: either one stops
    LLVM from vectorising them.)
    """
    n = gg.shape[0]
    zero = hp[hp.shape[0] - 1, 7]  # spare row: 0 in column 7
    i_wd1, i_mid, i_wd2, i_lr = plan[2], plan[3], plan[4], plan[5]
    wd1 = hp[i_wd1, 0] if i_wd1 >= 0 else zero
    wd2 = hp[i_wd2, 0] if i_wd2 >= 0 else zero
    nlr = hp[i_lr, 3] if i_lr >= 0 else hp[hp.shape[0] - 1, 6]  # spare row: 1 in column 6
    mid = codes[i_mid] if i_mid >= 0 else -1
    fl = hp[hp.shape[0] - 1, 5]  # FLUSH in the model dtype (a float64 compare costs 40%)
    check = zero
    if mid == OP_TRACE:
        m = hp[i_mid, 0]
        if hp[i_mid, 1] != 0:
            for p in range(n):
                g0 = gg[p]
                g = g0 + wd1 * pp[p]
                vp = m * s1[p] + g
                vp = vp if abs(vp) > fl else vp * zero  # (NaN stays NaN)
                s1[p] = vp
                u = nlr * ((g + m * vp) + wd2 * pp[p])
                gg[p] = u
                check += (pp[p] + u) * zero
        else:
            for p in range(n):
                g0 = gg[p]
                g = g0 + wd1 * pp[p]
                vp = m * s1[p] + g
                vp = vp if abs(vp) > fl else vp * zero  # (NaN stays NaN)
                s1[p] = vp
                u = nlr * (vp + wd2 * pp[p])
                gg[p] = u
                check += (pp[p] + u) * zero
    elif mid == OP_ADAM:
        k = i_mid
        b1, b2, eps = hp[k, 0], hp[k, 1], hp[k, 2]
        c1, c2, ob1, ob2 = hp[k, 3], hp[k, 4], hp[k, 5], hp[k, 6]
        for p in range(n):
            g0 = gg[p]
            g = g0 + wd1 * pp[p]
            a = b1 * s1[p] + ob1 * g
            sv = b2 * s2[p] + ob2 * g * g
            a = a if abs(a) > fl else a * zero
            sv = sv if sv > fl else sv * zero
            s1[p] = a
            s2[p] = sv
            u = nlr * ((a / c1) / (np.sqrt(sv / c2) + eps) + wd2 * pp[p])
            gg[p] = u
            check += (pp[p] + u) * zero
    else:
        for p in range(n):
            g0 = gg[p]
            u = nlr * ((g0 + wd1 * pp[p]) + wd2 * pp[p])
            gg[p] = u
            check += (pp[p] + u) * zero
    return check


@jit
def _opt_update(params, grad, codes, hp, soff, state, plan, lr, t, want_gsq):
    """Turn ``grad`` into the update in place for a chain that fuses (``plan[0] != 0``:
    every named optimizer); returns (check, |raw gradient|^2 or 0).  Any other chain
    returns check = NaN (nothing applied): those run :func:`_opt_update_generic` (the
    ``*_generic`` entry points), so that the first run of the usual optimizers never
    compiles the generic chain (bench/results/cold_start.md)."""
    P = params.shape[0]
    gsq = grad_sqnorm(grad) if want_gsq else 0.0
    if plan[0] != 0:
        if plan[1] >= 0:  # clip: needs the global norm first
            _clip_factor(grad, hp, plan[1])
            f = hp[plan[1], 3]
            if f != 1:
                for p in range(P):
                    grad[p] *= f
        _opt_consts(hp, codes, plan, lr, t)
        so = soff[plan[3]] if plan[3] >= 0 else 0
        check = _opt_fused_slice(params, grad, state[so : so + P], state[so + P : so + 2 * P], hp, codes, plan)
        return check, gsq
    return math.nan, gsq


@jit
def _opt_update_generic(params, grad, codes, hp, soff, state, plan, lr, t, want_gsq):
    """:func:`_opt_update` for any chain: each primitive one pass (``plan`` unused)."""
    P = params.shape[0]
    gsq = grad_sqnorm(grad) if want_gsq else 0.0
    _opt_chain_generic(params, grad, codes, hp, soff, state, lr, t)
    zero = hp[hp.shape[0] - 1, 7]
    check = zero
    for p in range(P):
        check += (params[p] + grad[p]) * zero  # 0, or NaN if a new parameter is not finite
    return check, gsq


@jit(inline="always")
def _apply_if_finite(params, grad, check):
    """params += grad unless ``check`` (0, or NaN when some params + grad is not finite)
    is non-finite; returns 1/0."""
    if not math.isfinite(check):
        return 0
    for p in range(params.shape[0]):
        params[p] += grad[p]
    return 1


@jit(inline="always")
def _opt_apply(params, grad, codes, hp, soff, state, plan, lr, t):
    """Run the optimizer chain on ``grad`` (turned in place into the update), then
    params += update if every new parameter is finite.

    ``codes[k]``/``hp[k, :]``/``soff[k]`` describe primitive k (see minigd.optim); ``hp``
    has the model dtype, and its columns 3.. are scratch used to cast step-dependent
    scalars to that dtype.  ``t`` is the 1-based step count.  Returns (applied, |g|^2):
    applied is 0 if the update would have produced a non-finite parameter (params are
    untouched then); |g|^2 is the squared norm of the raw gradient.  ``plan[0]`` must be
    nonzero (see :func:`_opt_update`).
    """
    check, gsq = _opt_update(params, grad, codes, hp, soff, state, plan, lr, t, not _FALSE[0])
    return _apply_if_finite(params, grad, check), gsq


@jit
def opt_apply(params, grad, codes, hp, soff, state, plan, lr, t):
    """Compiled entry for :func:`_opt_apply` (the Python-driven path and the public API);
    a chain that fuses (``plan[0] != 0``), else :func:`opt_apply_generic`."""
    return _opt_apply(params, grad, codes, hp, soff, state, plan, lr, t)


@jit
def opt_apply_generic(params, grad, codes, hp, soff, state, plan, lr, t):
    """:func:`opt_apply` for any chain (compiled only when a run uses one)."""
    check, gsq = _opt_update_generic(params, grad, codes, hp, soff, state, plan, lr, t, not _FALSE[0])
    return _apply_if_finite(params, grad, check), gsq


@jit
def train_step_loops(
    X, yi, yf, idx, B, params, grad, ws, lay, loss_code, want_sqn, codes, hp, soff, state, plan, lr, t
):
    """One whole training step by loops: gather, forward, loss, backward, optimizer update.

    Returns (mean batch loss, applied, |g|^2): applied is 0 when the loss or the new
    parameters were non-finite (params are then left untouched).  With ``want_sqn`` the
    per-example squared gradient norms are left in the scratch block and |g|^2 is the
    squared norm of the batch gradient (else 0; NaN when the loss was non-finite).
    ``plan[0]`` must be nonzero (a chain that fuses), else :func:`train_step_loops_generic`.

    At batch 1, without clipping, Adam or ``want_sqn``, the optimizer runs inside the
    backward pass (:func:`_backward_update_b1`: each weight written once, after every new
    value is known to be finite) and the contents of ``grad`` are unspecified (it is
    scratch).  Other steps take separate
    passes (and ``grad`` holds the update, as after :func:`opt_apply`): clipping needs the
    gradient's global norm before any update, |g|^2 the whole gradient; Adam's moment
    updates round differently in vector and remainder code (two multiply-add candidates),
    so a row-by-row loop would not be bitwise the whole-vector pass; and at batch > 1 the
    gradient is a sum over rows.  Both give bitwise the same parameters and optimizer
    state (tests/test_fused_update.py).
    """
    L = lay[R_MISC, 3]
    _gather(X, idx, B, ws, lay)
    _forward_loops(B, params, ws, lay, L)
    loss = _output_loss(yi, yf, idx, B, ws, lay, loss_code, want_sqn, _FALSE[0])
    if not math.isfinite(loss):
        return loss, 0, math.nan
    if B == 1 and plan[1] < 0 and not want_sqn and not (plan[3] >= 0 and codes[plan[3]] == OP_ADAM):
        _opt_consts(hp, codes, plan, lr, t)
        so = soff[plan[3]] if plan[3] >= 0 else 0
        check = _backward_update_b1(B, params, grad, ws, lay, L, hp, codes, plan, state[so : so + params.shape[0]])
        return loss, (1 if math.isfinite(check) else 0), 0.0
    _backward_loops(
        B, params, grad, ws, lay, L, _scratch(ws, lay, B)[: B if want_sqn else 0], np.float64(B) * np.float64(B)
    )
    check, gsq = _opt_update(params, grad, codes, hp, soff, state, plan, lr, t, want_sqn)
    return loss, _apply_if_finite(params, grad, check), gsq


@jit
def train_step_loops_generic(
    X, yi, yf, idx, B, params, grad, ws, lay, loss_code, want_sqn, codes, hp, soff, state, plan, lr, t
):
    """:func:`train_step_loops` for an optimizer chain that does not fuse (``plan[0] == 0``)."""
    L = lay[R_MISC, 3]
    _gather(X, idx, B, ws, lay)
    _forward_loops(B, params, ws, lay, L)
    loss = _output_loss(yi, yf, idx, B, ws, lay, loss_code, want_sqn, _FALSE[0])
    if not math.isfinite(loss):
        return loss, 0, math.nan
    _backward_loops(
        B, params, grad, ws, lay, L, _scratch(ws, lay, B)[: B if want_sqn else 0], np.float64(B) * np.float64(B)
    )
    check, gsq = _opt_update_generic(params, grad, codes, hp, soff, state, plan, lr, t, want_sqn)
    return loss, _apply_if_finite(params, grad, check), gsq


@jit
def grad_sqnorm(grad):
    """|grad|^2 as a float: accumulated in the model dtype (vectorised partial sums), and
    again in float64 in the rare case that overflows."""
    s = grad[0] * np.float32(0)  # the model dtype (a bare 0 would promote to float64)
    for p in range(grad.shape[0]):
        s += grad[p] * grad[p]
    if math.isfinite(s) or not np.isfinite(grad).all():
        return np.float64(s)
    s64 = 0.0
    for p in range(grad.shape[0]):
        g = np.float64(grad[p])
        s64 += g * g
    return s64


# ----------------------------------------------------------------------------- BLAS calls, fused epilogues
# The compiled BLAS path's GEMMs: ``lib`` (lay[R_MISC, 4], set by the backend) picks NumPy's
# own OpenBLAS through its CBLAS symbol (1; see kernels/_blas.py) or numba's np.dot, which
# calls SciPy's BLAS (0).  Operands are C-contiguous (B, n) workspace blocks and (fan_in,
# fan_out) weight views.
@jit(inline="always")
def _cblas(ta, tb, m, n, k, A, Bm, C):
    """C (m, n) = op(A) @ op(Bm) by NumPy's CBLAS gemm, row-major, in C's dtype."""
    if C.itemsize == 4:
        _blas.sgemm(
            _blas.ROW_MAJOR, ta, tb, m, n, k, np.float32(1), A.ctypes, A.shape[1], Bm.ctypes, Bm.shape[1],
            np.float32(0), C.ctypes, C.shape[1],
        )  # fmt: skip
    else:
        _blas.dgemm(
            _blas.ROW_MAJOR, ta, tb, m, n, k, 1.0, A.ctypes, A.shape[1], Bm.ctypes, Bm.shape[1], 0.0, C.ctypes,
            C.shape[1],
        )  # fmt: skip


@jit(inline="always")
def _mm_nn(A, W, Z, lib):
    """Z = A @ W (forward)."""
    if lib == 1:
        _cblas(_blas.NO_TRANS, _blas.NO_TRANS, Z.shape[0], Z.shape[1], A.shape[1], A, W, Z)
    else:
        np.dot(A, W, Z)


@jit(inline="always")
def _mm_tn(A, D, G, lib):
    """G = A.T @ D (weight gradient)."""
    if lib == 1:
        _cblas(_blas.TRANS, _blas.NO_TRANS, G.shape[0], G.shape[1], A.shape[0], A, D, G)
    else:
        np.dot(A.T, D, G)


@jit(inline="always")
def _mm_nt(D, W, P, lib):
    """P = D @ W.T (input gradient)."""
    if lib == 1:
        _cblas(_blas.NO_TRANS, _blas.TRANS, P.shape[0], P.shape[1], D.shape[1], D, W, P)
    else:
        np.dot(D, W.T, P)


@jit(inline="always")
def _act_backward_bias_grad(B, grad, ws, lay, l):
    """d_l *= f'(z_l), then db_l = sum_r d_l[r, :] (the arithmetic of :func:`act_backward`
    then :func:`bias_grad`, in the same order); for ReLU row by row, in one pass over d_l."""
    code = lay[R_ACT, l]
    Z = _blk(ws, lay, R_Z, l, B)
    D = _blk(ws, lay, R_D, l, B)
    gb = _b(grad, lay, l)
    n = gb.shape[0]
    for j in range(n):
        gb[j] = 0
    if code == RELU:  # _act_backward's ReLU, dispatched once (see _bias_act)
        for r in range(B):
            z = Z[r]
            d = D[r]
            for j in range(n):  # two loops over the row, not one: one was 3x slower (a
                if not z[j] > 0:  # conditional store and a sum in one loop: not vectorised)
                    d[j] = 0
            for j in range(n):
                gb[j] += d[j]
    else:  # the activation over the whole block (one dispatch), then the sums
        _act_backward(code, _flat(ws, lay, R_Z, l, B), _flat(ws, lay, R_A, l, B), _flat(ws, lay, R_D, l, B))
        for r in range(B):
            d = D[r]
            for j in range(n):
                gb[j] += d[j]
