"""The loops regime's fused backward + optimizer (kernels/cpu.py, ``_backward_update_b1``).

A batch-1 training step without clipping, Adam or per-example norms applies the optimizer
inside the backward pass (each weight read and written once); a step with per-example
norms (``want_sqn``) takes the separate passes (gradient, then optimizer, then update).
Both run in the same compiled kernel, so they must give bitwise the same parameters and
optimizer state, step after step, for every optimizer (Adam and batches > 1 take the
separate passes either way: checked too), and a rejected step (non-finite update) must
leave the parameters exactly as they were.
"""

from __future__ import annotations

import numpy as np
import pytest

import minigd as mg
from minigd.kernels import cpu as K

OPTIMIZERS = {
    "sgd": lambda: mg.SGD(lr=0.05),
    "momentum": lambda: mg.SGD(lr=0.05, momentum=0.9),
    "nesterov": lambda: mg.SGD(lr=0.05, momentum=0.9, nesterov=True),
    "decay": lambda: mg.SGD(lr=0.05, momentum=0.9, weight_decay=1e-2),
    "decay_only": lambda: mg.SGD(lr=0.05, weight_decay=1e-2),
    "decoupled": lambda: mg.SGD(lr=0.05, momentum=0.5, weight_decay=1e-2, decoupled_weight_decay=True),
    "adam": lambda: mg.Adam(lr=1e-2),
    "adam_decay": lambda: mg.Adam(lr=1e-2, weight_decay=1e-2),
    "adamw": lambda: mg.AdamW(lr=1e-2),
}

# (sizes, batch sizes that take the loops regime): the second has more parameters than one
# finiteness-check block; the third is wide, so the loops regime also runs batches of 3; the
# next two are tiny, with fewer parameters than one check block (its scratch must fit)
SHAPES = (
    ([5, 40, 33, 3], (1,)),
    ([30, 70, 40, 4], (1,)),
    ([9, 520, 4], (1, 3)),
    ([1, 1, 2], (1,)),
    ([3, 2, 12], (1,)),
    ([200, 400, 3], (1,)),  # more than STAGE_BYTES: the new values computed twice, not staged
)


def _pair(sizes, dtype, make_opt, act="relu", loss="cross_entropy"):
    rng = np.random.default_rng(3)
    m = mg.MLP(sizes, activation=act, loss=loss, dtype=dtype, seed=1)
    impl = m.backend_impl
    X = rng.standard_normal((40, sizes[0])).astype(dtype)
    if loss == "cross_entropy":
        yi, yf = rng.integers(0, sizes[-1], 40).astype(np.int64), np.empty((0, sizes[-1]), dtype)
    else:
        yi, yf = np.zeros(0, np.int64), rng.standard_normal((40, sizes[-1])).astype(dtype)
    states = [make_opt().init(m.params) for _ in range(2)]
    params = [m.params.copy(), m.params.copy()]
    grads = [np.zeros_like(m.params), np.zeros_like(m.params)]
    return impl, X, yi, yf, params, grads, states


def _steps(impl, X, yi, yf, params, grads, states, B, n_steps, lr=0.05):
    """The same steps through the fused path (copy 0) and the separate passes (copy 1)."""
    impl.reserve(B)
    assert impl._regime(B) == "loops"
    rng = np.random.default_rng(7)
    for t in range(1, n_steps + 1):
        idx = rng.permutation(X.shape[0])[:B].astype(np.int64)
        out = [
            impl.train_step(params[k], grads[k], X, yi, yf, idx, B, states[k], lr, t, want_sqn=bool(k))
            for k in range(2)
        ]
        assert out[0][0] == out[1][0] and out[0][1] == out[1][1], (t, out)
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_step_is_bitwise_the_separate_passes(name, dtype):
    for sizes, batches in SHAPES:
        for B in batches:
            for act, loss in (("relu", "cross_entropy"), ("tanh", "mse")):
                impl, X, yi, yf, params, grads, states = _pair(sizes, dtype, OPTIMIZERS[name], act, loss)
                init = params[0].copy()
                _steps(impl, X, yi, yf, params, grads, states, B, 12)
                assert np.array_equal(params[0], params[1]), (sizes, B, act)
                assert np.array_equal(states[0].state, states[1].state), (sizes, B, act)
                assert not np.array_equal(params[0], init), "no step was taken"


@pytest.mark.parametrize("sizes", [[5, 40, 33, 3], [200, 400, 3]], ids=["staged", "computed-twice"])
def test_the_fused_path_really_runs(sizes):
    """Without per-example norms the fused step leaves in ``grad`` either every new value
    (a model of at most ``STAGE_BYTES``: staged there, then copied over) or, for a bigger
    one, nothing outside its head (one check block of scratch: the new values computed
    again to commit them, never a params-sized record); with them, ``grad`` holds the
    update (the separate passes)."""
    impl, X, yi, yf, params, grads, states = _pair(sizes, "float32", OPTIMIZERS["momentum"])
    staged = params[0].nbytes <= K.STAGE_BYTES
    assert staged == (sizes[0] == 5)
    before = [p.copy() for p in params]
    for g in grads:
        g[...] = 7.0
    _steps(impl, X, yi, yf, params, grads, states, 1, 1)
    assert not np.array_equal(params[0], before[0])
    if staged:
        assert np.array_equal(grads[0], params[0])
    else:
        head = max(a * b for a, b in zip(sizes, sizes[1:]))  # the largest layer's weights
        head = min(head, K.FUSE_BLOCK + max(sizes))  # (a check block at most)
        assert (grads[0][head:] == 7.0).all()
    assert np.array_equal(params[1], before[1] + grads[1])


@pytest.mark.parametrize("sizes", [[30, 70, 40, 4], [200, 400, 3]], ids=["staged", "computed-twice"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_rejected_fused_step_leaves_params_bitwise_untouched(name, dtype, sizes):
    """A non-finite new parameter in the FIRST layer -- checked last, after every later
    layer was already updated in place -- is undone exactly: params as before (their
    infinities and signed zeros included), applied = 0, as the separate passes do.  (An
    infinite weight in a row whose input is 0: the forward skips that row, so the loss
    is finite and only the update is not.)"""
    impl, X, yi, yf, params, grads, states = _pair(sizes, dtype, OPTIMIZERS[name])
    X[:, 0] = 0
    for p in params:
        p[3] = np.inf  # W0[0, 3]
        p[5] = -0.0  # W0[0, 5]: its update is +-0, which may turn -0 into +0
    before = params[0].copy()
    impl.reserve(1)
    idx = np.array([2], np.int64)
    out = [impl.train_step(params[k], grads[k], X, yi, yf, idx, 1, states[k], 0.05, 1, bool(k)) for k in range(2)]
    assert np.isfinite(out[0][0]) and out[0][0] == out[1][0], out
    assert out[0][1] == out[1][1] == 0, out
    for p in params:
        assert p.tobytes() == before.tobytes()
    assert states[0].state.tobytes() == states[1].state.tobytes()  # (NaN momentum of the inf weight)
