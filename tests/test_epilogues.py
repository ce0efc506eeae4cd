"""The step's epilogues (bias + activation forward; activation backward + bias gradient) are
dispatched once per block, not once per row (issue 20: 1.4-4x faster), so each case is its own
loop.  These tests pin each loop to the elementwise definition, bitwise, for every activation
and both dtypes, on blocks full of special values (NaN, +-inf, +-0, subnormals): the bias add
in the model dtype, then ``_act_forward``; ``_act_backward``, then the row sums in row order."""

from __future__ import annotations

import numba
import numpy as np
import pytest

import minigd as mg
from minigd import nn
from minigd.kernels import cpu as K
from minigd.kernels._jit import FASTMATH

ACTS = sorted(nn.ACTIVATIONS)
SIZES = (5, 37, 19, 3)  # row lengths with vector tails; a 3-wide output layer
B = 13


@numba.njit(cache=False, fastmath=set(FASTMATH))
def _act_forward(code, z, a):
    K._act_forward(code, z, a)


@numba.njit(cache=False, fastmath=set(FASTMATH))
def _act_backward(code, z, a, d):
    K._act_backward(code, z, a, d)


@numba.njit(cache=False, fastmath=set(FASTMATH))
def _fused_backward(B, grad, ws, lay, l):
    K._act_backward_bias_grad(B, grad, ws, lay, l)


def _special(rng, shape, dtype):
    """Normal values with NaN, +-inf, +-0, subnormals and huge values sprinkled in."""
    v = rng.normal(size=shape).astype(dtype)
    flat = v.reshape(-1)
    tiny = np.finfo(dtype).smallest_subnormal
    pool = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, tiny, -tiny, 3e38, -3e38], dtype)
    pick = rng.random(flat.size) < 0.3
    flat[pick] = rng.choice(pool, size=int(pick.sum()))
    return v


def _bits(a):
    """The bit patterns of a, with every NaN as one pattern (a NaN's sign and payload are
    not specified, and differ between NumPy's and LLVM's arithmetic)."""
    a = np.where(np.isnan(a), np.nan, a).astype(a.dtype)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


def _model(act, dtype):
    m = mg.MLP(list(SIZES), activation=act, dtype=dtype, backend="cpu", seed=1)
    ws = m.backend_impl.reserve(B)
    return m, ws.buf, ws.lay


def _block(buf, lay, row, l):
    n = SIZES[l + 1]
    o = lay[row, l]
    return buf[o : o + B * n].reshape(B, n)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("act", ACTS)
def test_bias_act_forward_is_the_bias_then_the_activation_bitwise(act, dtype):
    rng = np.random.default_rng(ACTS.index(act))
    m, buf, lay = _model(act, dtype)
    m.params[...] = _special(rng, m.params.shape, dtype)
    code = nn.ACTIVATIONS[act]
    for l in range(len(SIZES) - 1):
        Z, A = _block(buf, lay, K.R_Z, l), _block(buf, lay, K.R_A, l)
        hidden = l < len(SIZES) - 2
        if hidden:
            A[...] = 7  # stale values the kernel must overwrite (the output layer's A is Z)
        Z[...] = _special(rng, Z.shape, dtype)
        o = lay[K.R_BOFF, l]
        b = m.params[o : o + SIZES[l + 1]]
        with np.errstate(invalid="ignore", over="ignore"):
            z_want = Z + b  # the model dtype's rounding, as the kernel's add
        a_want = A.copy() if hidden else z_want
        if hidden:
            _act_forward(code, z_want.reshape(-1), a_want.reshape(-1))
        with np.errstate(invalid="ignore", over="ignore"):
            K.bias_act_forward(B, m.params, buf, lay, l)
        np.testing.assert_array_equal(_bits(Z), _bits(z_want), err_msg=f"z of layer {l}")
        np.testing.assert_array_equal(_bits(A), _bits(a_want), err_msg=f"a of layer {l}")
        if hidden and act == "relu":  # relu(-x) is +0, never -0; relu(NaN) is NaN
            neg = Z < 0
            assert neg.any() and not np.signbit(A[neg]).any()
            assert np.isnan(A[np.isnan(Z)]).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("act", ACTS)
def test_fused_activation_backward_and_bias_grad_are_the_separate_kernels_bitwise(act, dtype):
    rng = np.random.default_rng(100 + ACTS.index(act))
    m, buf, lay = _model(act, dtype)
    g_sep, g_fused = np.zeros_like(m.params), np.full_like(m.params, 5)  # stale: overwritten
    code = nn.ACTIVATIONS[act]
    for l in range(len(SIZES) - 2):  # hidden layers
        Z, A, D = (_block(buf, lay, r, l) for r in (K.R_Z, K.R_A, K.R_D))
        Z[...] = _special(rng, Z.shape, dtype)
        A[...] = 0
        with np.errstate(all="ignore"):
            _act_forward(code, Z.reshape(-1), A.reshape(-1))
        D0 = _special(rng, D.shape, dtype)
        D[...] = D0
        with np.errstate(all="ignore"):
            K.act_backward(B, buf, lay, l)
            K.bias_grad(B, g_sep, buf, lay, l)
        d_sep = D.copy()
        d_want = D0.copy()
        _act_backward(code, Z.reshape(-1), A.reshape(-1), d_want.reshape(-1))
        np.testing.assert_array_equal(_bits(d_sep), _bits(d_want))
        D[...] = D0
        with np.errstate(all="ignore"):
            _fused_backward(B, g_fused, buf, lay, l)
        np.testing.assert_array_equal(_bits(D), _bits(d_sep), err_msg=f"deltas of layer {l}")
        o = lay[K.R_BOFF, l]
        sl = slice(o, o + SIZES[l + 1])
        np.testing.assert_array_equal(_bits(g_fused[sl]), _bits(g_sep[sl]), err_msg=f"bias grad of layer {l}")
        want = np.zeros(SIZES[l + 1], dtype)
        with np.errstate(all="ignore"):
            for r in range(B):  # row order, in the model dtype
                want += d_want[r]
        np.testing.assert_array_equal(_bits(g_fused[sl]), _bits(want))
