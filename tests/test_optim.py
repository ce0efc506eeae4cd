"""Optimizer primitives: exact one-step tests worked by hand, the same updates through the
public ``fit``, convergence on a quadratic bowl and a Rosenbrock valley, and the codes the
compiled kernels share with the Python side.

The hand-worked cases use dyadic numbers (halves, quarters, ...): every intermediate is
exactly representable in float32 and float64, so both backends must reproduce them
*exactly*, in both dtypes.  Where a step is not dyadic (Adam's later steps) the expected
value is computed by an independent float64 formula and compared to 1e-14 (float64) or
1e-5 (float32: a few ulps per operation over three steps) relative.
"""

from __future__ import annotations

import numpy as np
import pytest
from strategies import BACKEND_PATHS, make_model

import minigd as mg
from minigd import nn
from minigd.kernels import cpu as K
from minigd.optim import base as optim_base

OPT_BACKENDS = ("numpy", "cpu")
DTYPES = ("float64", "float32")

P0 = [1.0, -2.0, 0.5]  # parameters before the first step
G1 = [1.0, -2.0, 4.0]  # gradient at step 1 (|G1|^2 = 1 + 4 + 16 = 21)
G2 = [2.0, 0.0, -4.0]  # gradient at step 2 (|G2|^2 = 4 + 0 + 16 = 20)


def apply_steps(backend, dtype, opt, grads, params=P0):
    """Run ``opt`` through the backend's opt_apply on the given gradients.

    Returns (params, |last raw gradient|^2, opt_state)."""
    impl = mg.MLP([2, 1], loss="mse", dtype=dtype, backend=backend).backend_impl  # P = 3, like P0
    p = np.array(params, dtype)
    st = opt.init(p)
    gsq = None
    for t, g in enumerate(grads, start=1):
        g = np.array(g, dtype)
        applied, gsq = impl.opt_apply(p, g, st, opt.lr_at(t - 1), t)
        assert applied
    return p, gsq, st


# ============================================================================ exact one-step tables
EXACT = [
    # plain SGD, lr = 0.5:  p - 0.5 * G1 = [1 - 0.5, -2 + 1, 0.5 - 2] = [0.5, -1, -1.5]
    pytest.param(mg.SGD(lr=0.5), [G1], [0.5, -1.0, -1.5], id="sgd"),
    # heavy ball, m = 0.5, lr = 0.5:
    #   step 1: v = G1 = [1, -2, 4];  p = P0 - 0.5 v = [0.5, -1, -1.5]
    #   step 2: v = 0.5 [1, -2, 4] + [2, 0, -4] = [2.5, -1, -2];  p = [0.5 - 1.25, -1 + 0.5, -1.5 + 1]
    pytest.param(mg.SGD(lr=0.5, momentum=0.5), [G1, G2], [-0.75, -0.5, -0.5], id="momentum"),
    # Nesterov (PyTorch form u = g + m v), m = 0.5, lr = 0.5:
    #   step 1: v = [1, -2, 4];  u = G1 + 0.5 v = [1.5, -3, 6];  p = [1 - 0.75, -2 + 1.5, 0.5 - 3] = [0.25, -0.5, -2.5]
    #   step 2: v = [2.5, -1, -2];  u = G2 + 0.5 v = [3.25, -0.5, -5];  p = [0.25 - 1.625, -0.5 + 0.25, -2.5 + 2.5]
    pytest.param(mg.SGD(lr=0.5, momentum=0.5, nesterov=True), [G1, G2], [-1.375, -0.25, 0.0], id="nesterov"),
    # L2 weight decay (coupled), wd = 0.5, lr = 0.5:
    #   g = G1 + 0.5 P0 = [1.5, -3, 4.25];  p = P0 - 0.5 g = [0.25, -0.5, -1.625]
    pytest.param(mg.SGD(lr=0.5, weight_decay=0.5), [G1], [0.25, -0.5, -1.625], id="sgd-l2"),
    # L2 decay before momentum, wd = m = lr = 0.5:
    #   step 1: g = [1.5, -3, 4.25] = v;  p1 = [0.25, -0.5, -1.625]
    #   step 2: g = G2 + 0.5 p1 = [2.125, -0.25, -4.8125];  v = 0.5 [1.5, -3, 4.25] + g = [2.875, -1.75, -2.6875]
    #           p = p1 - 0.5 v = [0.25 - 1.4375, -0.5 + 0.875, -1.625 + 1.34375]
    pytest.param(
        mg.SGD(lr=0.5, momentum=0.5, weight_decay=0.5), [G1, G2], [-1.1875, 0.375, -0.28125], id="momentum-l2"
    ),
    # decoupled decay after momentum (u = v + wd p), wd = m = lr = 0.5:
    #   step 1: v = G1;  u = [1, -2, 4] + 0.5 P0 = [1.5, -3, 4.25];  p1 = [0.25, -0.5, -1.625]
    #   step 2: v = [2.5, -1, -2];  u = v + 0.5 p1 = [2.625, -1.25, -2.8125]
    #           p = p1 - 0.5 u = [0.25 - 1.3125, -0.5 + 0.625, -1.625 + 1.40625]
    pytest.param(
        mg.SGD(lr=0.5, momentum=0.5, weight_decay=0.5, decoupled_weight_decay=True),
        [G1, G2],
        [-1.0625, 0.125, -0.21875],
        id="momentum-decoupled-decay",
    ),
    # global-norm clipping: |[3, 0, -4]| = 5 > 2.5, so g -> g * 2.5 / 5 = [1.5, 0, -2]
    #   p = P0 - 0.5 [1.5, 0, -2] = [0.25, -2, 1.5]
    pytest.param(mg.SGD(lr=0.5, clip_norm=2.5), [[3.0, 0.0, -4.0]], [0.25, -2.0, 1.5], id="clip-active"),
    # |g| = 5 <= 10: no clipping;  p = P0 - 0.5 [3, 0, -4] = [-0.5, -2, 2.5]
    pytest.param(mg.SGD(lr=0.5, clip_norm=10.0), [[3.0, 0.0, -4.0]], [-0.5, -2.0, 2.5], id="clip-inactive"),
    # Adam, b1 = 0.5, b2 = 0.75, eps = 0.25, lr = 0.5, g = [0.75, -1.75, 3.75]:
    #   m = 0.5 g = [0.375, -0.875, 1.875];  v = 0.25 g^2 = [0.140625, 0.765625, 3.515625]
    #   m_hat = m / (1 - 0.5) = g;  v_hat = v / (1 - 0.75) = g^2;  sqrt(v_hat) = |g| = [0.75, 1.75, 3.75]
    #   u = g / (|g| + 0.25) = [0.75 / 1, -1.75 / 2, 3.75 / 4] = [0.75, -0.875, 0.9375]
    #   p = P0 - 0.5 u = [1 - 0.375, -2 + 0.4375, 0.5 - 0.46875]
    pytest.param(
        mg.Adam(lr=0.5, betas=(0.5, 0.75), eps=0.25), [[0.75, -1.75, 3.75]], [0.625, -1.5625, 0.03125], id="adam"
    ),
    # AdamW, same Adam direction u = [0.75, -0.875, 0.9375], decoupled wd = 0.5:
    #   u + 0.5 P0 = [1.25, -1.875, 1.1875];  p = P0 - 0.5 (u + 0.5 P0) = [0.375, -1.0625, -0.09375]
    pytest.param(
        mg.AdamW(lr=0.5, betas=(0.5, 0.75), eps=0.25, weight_decay=0.5),
        [[0.75, -1.75, 3.75]],
        [0.375, -1.0625, -0.09375],
        id="adamw",
    ),
    # a generic (unfused) chain: scale(0.5), then momentum 0.5, then -lr = -0.5:
    #   step 1: u = 0.5 G1 = [0.5, -1, 2] = v;  p1 = P0 - 0.5 v = [0.75, -1.5, -0.5]
    #   step 2: u = 0.5 G2 = [1, 0, -2];  v = 0.5 [0.5, -1, 2] + u = [1.25, -0.5, -1]
    #           p = p1 - 0.5 v = [0.75 - 0.625, -1.5 + 0.25, -0.5 + 0.5]
    pytest.param(
        mg.optim.chain(mg.optim.scale(0.5), mg.optim.trace(0.5), mg.optim.scale_by_lr(), lr=0.5),
        [G1, G2],
        [0.125, -1.25, 0.0],
        id="generic-chain",
    ),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", OPT_BACKENDS)
@pytest.mark.parametrize("opt, grads, expected", EXACT)
def test_exact_steps_by_hand(backend, dtype, opt, grads, expected):
    p, gsq, _ = apply_steps(backend, dtype, opt, grads)
    assert p.dtype == np.dtype(dtype)
    assert np.array_equal(p, np.array(expected, dtype)), f"{p} != {expected}"
    # the second return value is the squared norm of the *raw* (unclipped, undecayed) gradient
    assert gsq == pytest.approx(float(np.sum(np.square(grads[-1]))), rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", OPT_BACKENDS)
def test_momentum_and_adam_state_by_hand(backend, dtype):
    _, _, st = apply_steps(backend, dtype, mg.SGD(lr=0.5, momentum=0.5), [G1, G2])
    # v = 0.5 [1, -2, 4] + [2, 0, -4]
    assert np.array_equal(st.state, np.array([2.5, -1.0, -2.0], dtype))
    _, _, st = apply_steps(backend, dtype, mg.Adam(lr=0.5, betas=(0.5, 0.75), eps=0.25), [[0.75, -1.75, 3.75]])
    # m = (1 - 0.5) g;  v = (1 - 0.75) g^2   (state slots: m then v)
    m_exp = [0.375, -0.875, 1.875]
    v_exp = [0.140625, 0.765625, 3.515625]
    assert np.array_equal(st.state, np.array(m_exp + v_exp, dtype))


def _adam_reference(p, grads_fn, steps, lr, b1, b2, eps, wd=0.0, decoupled=False):
    """Kingma & Ba with bias correction, in float64 (torch.optim.Adam / AdamW semantics);
    ``grads_fn(p, t)`` is the gradient at iterate p of step t (0-based)."""
    p = np.array(p, np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t in range(1, steps + 1):
        g = np.asarray(grads_fn(p, t - 1), np.float64) + (0.0 if decoupled else wd * p)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        p = p - lr * (u + (wd * p if decoupled else 0.0))
    return p


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", OPT_BACKENDS)
@pytest.mark.parametrize("wd, decoupled", [(0.0, False), (0.1, False), (0.1, True)], ids=["adam", "adam-l2", "adamw"])
def test_adam_three_steps_against_formula(backend, dtype, wd, decoupled):
    grads = [G1, G2, [-0.3, 0.7, 0.1]]
    kw = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    opt = mg.AdamW(**kw) if decoupled else mg.Adam(**kw)
    p, _, _ = apply_steps(backend, dtype, opt, grads)
    ref = _adam_reference(P0, lambda p, t: grads[t], 3, 0.1, 0.9, 0.999, 1e-8, wd, decoupled)
    np.testing.assert_allclose(p, ref, rtol=1e-14 if dtype == "float64" else 1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", OPT_BACKENDS)
def test_non_finite_update_is_not_applied(backend):
    impl = mg.MLP([2, 1], loss="mse", dtype="float64", backend=backend).backend_impl
    p = np.array([1e308, 0.0, 1.0])
    before = p.copy()
    opt = mg.SGD(lr=1.0)
    applied, _ = impl.opt_apply(p, np.array([-1e308, 1.0, 1.0]), opt.init(p), 1.0, 1)  # 1e308 + 1e308 = inf
    assert not applied
    assert np.array_equal(p, before)


# ============================================================================ via the public fit
def _lin_grad(p, x, y):
    """Gradient of 1/2 (x.w + b - y)^2 for a [2, 1] linear model, p = [w0, w1, b]."""
    d = x @ p[:2] + p[2] - y
    return np.array([x[0] * d, x[1] * d, d])


def _sgd_reference(p, grads_fn, steps, lr, momentum=0.0, nesterov=False, wd=0.0, decoupled=False, clip=None):
    """torch.optim.SGD semantics (dampening 0), in float64."""
    p = np.array(p, np.float64)
    v = np.zeros_like(p)
    for t in range(steps):
        g = grads_fn(p, t)
        if clip is not None and np.linalg.norm(g) > clip:
            g = g * (clip / np.linalg.norm(g))
        if wd and not decoupled:
            g = g + wd * p
        if momentum:
            v = momentum * v + g
            u = g + momentum * v if nesterov else v
        else:
            u = g
        if wd and decoupled:
            u = u + wd * p
        p = p - lr * u
    return p


def test_one_sgd_step_through_fit_by_hand():
    """w = [0.5, -0.25], b = 0.125, x = [1, 2], y = 1:
    z = 0.5 - 0.5 + 0.125 = 0.125;  dL/dz = z - y = -0.875;  loss = 0.5 * 0.875^2 = 0.3828125
    grad = [x0, x1, 1] * -0.875 = [-0.875, -1.75, -0.875]
    lr = 0.5:  w = [0.5 + 0.4375, -0.25 + 0.875] = [0.9375, 0.625];  b = 0.125 + 0.4375 = 0.5625"""
    for path in BACKEND_PATHS:
        for dtype in DTYPES:
            m = make_model([2, 1], path, loss="mse", dtype=dtype)
            m.params[...] = [0.5, -0.25, 0.125]
            X = np.array([[1.0, 2.0]], dtype)
            y = np.array([1.0], dtype)
            hist = mg.fit(m, X, y, batch_size=1, steps=1, optimizer=mg.SGD(lr=0.5))
            assert np.array_equal(m.params, np.array([0.9375, 0.625, 0.5625], dtype)), (path, dtype)
            assert hist.column("loss")[0] == 0.3828125


FIT_OPTIMIZERS = [
    pytest.param(mg.SGD(lr=0.1), dict(lr=0.1), id="sgd"),
    pytest.param(mg.SGD(lr=0.1, momentum=0.9), dict(lr=0.1, momentum=0.9), id="momentum"),
    pytest.param(mg.SGD(lr=0.1, momentum=0.9, nesterov=True), dict(lr=0.1, momentum=0.9, nesterov=True), id="nesterov"),
    pytest.param(mg.SGD(lr=0.1, momentum=0.5, weight_decay=0.1), dict(lr=0.1, momentum=0.5, wd=0.1), id="momentum-l2"),
    pytest.param(
        mg.SGD(lr=0.1, momentum=0.5, weight_decay=0.1, decoupled_weight_decay=True),
        dict(lr=0.1, momentum=0.5, wd=0.1, decoupled=True),
        id="momentum-decoupled-decay",
    ),
    pytest.param(mg.SGD(lr=0.1, clip_norm=0.5), dict(lr=0.1, clip=0.5), id="clip"),
    pytest.param(mg.Adam(lr=0.1), "adam", id="adam"),
    pytest.param(mg.Adam(lr=0.1, weight_decay=0.1), "adam-l2", id="adam-l2"),
    pytest.param(mg.AdamW(lr=0.1, weight_decay=0.1), "adamw", id="adamw"),
]


@pytest.mark.parametrize("path", BACKEND_PATHS)
@pytest.mark.parametrize("opt, ref", FIT_OPTIMIZERS)
def test_optimizers_through_fit_match_reference(path, opt, ref):
    """Four batch-1 steps of fit (sequential sampler) on a linear mse model equal the
    reference optimizer fed the analytic gradients of the same examples."""
    X = np.array([[1.0, 2.0], [-1.0, 0.5], [0.25, -3.0], [2.0, 1.0]])
    y = np.array([1.0, -2.0, 0.5, 3.0])
    p0 = np.array([0.5, -0.25, 0.125])
    m = make_model([2, 1], path, loss="mse", dtype="float64")
    m.params[...] = p0
    mg.fit(m, X, y, batch_size=1, steps=4, optimizer=opt, sampler="sequential")
    grads = lambda p, t: _lin_grad(p, X[t], y[t])  # noqa: E731
    if isinstance(ref, dict):
        expected = _sgd_reference(p0, grads, 4, **ref)
    else:
        wd = 0.0 if ref == "adam" else 0.1
        expected = _adam_reference(p0, grads, 4, 0.1, 0.9, 0.999, 1e-8, wd, decoupled=ref == "adamw")
    np.testing.assert_allclose(m.params, expected, rtol=1e-12, atol=1e-14)


# ============================================================================ convergence table
_H = np.array([1.0, 10.0])
_C = np.array([1.0, -2.0])


def _bowl(x, g):  # f = 1/2 sum h (x - c)^2, minimum at c
    g[:] = _H * (x - _C)


def _rosenbrock(x, g):  # f = (1 - a)^2 + 10 (b - a^2)^2, minimum at (1, 1); a curved valley
    a, b = x
    g[0] = -2 * (1 - a) - 40 * a * (b - a * a)
    g[1] = 20 * (b - a * a)


PROBLEMS = {
    # name: (gradient, start, minimiser, steps)
    "bowl": (_bowl, [0.0, 0.0], _C, 1000),
    "rosenbrock": (_rosenbrock, [-1.0, 1.0], [1.0, 1.0], 3000),
}

# (optimizer on the bowl, optimizer on the Rosenbrock valley); the valley's Hessian at the
# minimum has eigenvalues up to ~101, so plain SGD needs lr < 2/101
CONVERGENCE = [
    pytest.param(mg.SGD(lr=0.1), mg.SGD(lr=0.01), id="sgd"),
    pytest.param(mg.SGD(lr=0.02, momentum=0.9), mg.SGD(lr=0.003, momentum=0.9), id="momentum"),
    pytest.param(
        mg.SGD(lr=0.02, momentum=0.9, nesterov=True), mg.SGD(lr=0.003, momentum=0.9, nesterov=True), id="nesterov"
    ),
    pytest.param(mg.SGD(lr=0.1, weight_decay=1e-4), mg.SGD(lr=0.01, weight_decay=1e-4), id="sgd-l2"),
    pytest.param(
        mg.SGD(lr=0.02, momentum=0.9, weight_decay=1e-4, decoupled_weight_decay=True),
        mg.SGD(lr=0.003, momentum=0.9, weight_decay=1e-4, decoupled_weight_decay=True),
        id="momentum-decoupled-decay",
    ),
    pytest.param(mg.SGD(lr=0.1, clip_norm=1.0), mg.SGD(lr=0.01, clip_norm=1.0), id="sgd-clip"),
    pytest.param(mg.Adam(lr=0.05), mg.Adam(lr=0.02), id="adam"),
    pytest.param(mg.AdamW(lr=0.05, weight_decay=1e-4), mg.AdamW(lr=0.02, weight_decay=1e-4), id="adamw"),
    pytest.param(mg.Adam(lr=0.05, clip_norm=1.0), mg.Adam(lr=0.02, clip_norm=1.0), id="adam-clip"),
]


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("backend", OPT_BACKENDS)
@pytest.mark.parametrize("opt_bowl, opt_rosen", CONVERGENCE)
def test_optimizer_converges(opt_bowl, opt_rosen, backend, problem):
    """Within 1e-3 of the minimiser (weight decay moves it by <= 1e-4 * |x*| / h_min)."""
    grad_fn, x0, x_star, steps = PROBLEMS[problem]
    opt = opt_bowl if problem == "bowl" else opt_rosen
    impl = mg.MLP([1, 1], loss="mse", dtype="float64", backend=backend).backend_impl
    x = np.array(x0)
    g = np.zeros(2)
    st = opt.init(x)
    for t in range(1, steps + 1):
        grad_fn(x, g)
        assert impl.opt_apply(x, g, st, opt.lr_at(t - 1), t)[0]
    assert np.abs(x - np.asarray(x_star)).max() < 1e-3, x


# ============================================================================ shared codes
def test_kernel_codes_match_python_tables():
    assert (K.OP_CLIP, K.OP_DECAY, K.OP_TRACE, K.OP_ADAM, K.OP_SCALE_LR, K.OP_SCALE) == (
        optim_base.OP_CLIP,
        optim_base.OP_DECAY,
        optim_base.OP_TRACE,
        optim_base.OP_ADAM,
        optim_base.OP_SCALE_LR,
        optim_base.OP_SCALE,
    )
    for name, code in nn.ACTIVATIONS.items():
        assert getattr(K, name.upper()) == code, name
    for name, code in nn.LOSSES.items():
        assert getattr(K, name.upper()) == code, name
    assert K.LEAKY_SLOPE == nn.LEAKY_SLOPE
    # the primitives carry those codes
    assert mg.optim.clip_by_global_norm(1.0).code == K.OP_CLIP
    assert mg.optim.add_decayed_weights(0.1).code == K.OP_DECAY
    assert mg.optim.trace(0.9).code == K.OP_TRACE
    assert mg.optim.scale_by_adam().code == K.OP_ADAM
    assert mg.optim.scale_by_lr().code == K.OP_SCALE_LR
    assert mg.optim.scale(2.0).code == K.OP_SCALE


@pytest.mark.parametrize(
    "opt, fused",
    [
        (mg.SGD(lr=0.1), [1, -1, -1, -1, -1, 0]),
        (mg.SGD(lr=0.1, momentum=0.9, weight_decay=0.1, clip_norm=1.0), [1, 0, 1, 2, -1, 3]),
        (mg.SGD(lr=0.1, momentum=0.9, weight_decay=0.1, decoupled_weight_decay=True), [1, -1, -1, 0, 1, 2]),
        (mg.AdamW(lr=0.1, weight_decay=0.1), [1, -1, -1, 0, 1, 2]),
        (mg.optim.chain(mg.optim.scale(0.5), mg.optim.scale_by_lr(), lr=0.1), [0, -1, -1, -1, -1, -1]),
        (
            mg.optim.chain(mg.optim.trace(0.9), mg.optim.clip_by_global_norm(1.0), mg.optim.scale_by_lr(), lr=0.1),
            [0, -1, -1, -1, -1, -1],
        ),
    ],
    ids=["sgd", "clip-l2-momentum", "decoupled", "adamw", "scale-unfused", "clip-after-trace-unfused"],
)
def test_fusion_plan(opt, fused):
    """[fused?, i_clip, i_decay_before, i_trace_or_adam, i_decay_after, i_lr]."""
    st = opt.init(np.zeros(3))
    assert st.plan.tolist() == fused


# ============================================================================ custom chains
O = mg.optim


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: O.chain(lr=0.1), r"^chain: expected exactly one scale_by_lr\(\) .*got 0 in \[\]"),
        (
            lambda: O.chain(O.trace(0.9), lr=0.1),
            r"^chain: expected exactly one scale_by_lr\(\) \(it applies -lr: "
            r"without it .*gradient ascent with lr ignored.*got 0 in \['trace'\]",
        ),
        (lambda: O.chain(O.scale_by_lr(), O.trace(0.9), O.scale_by_lr(), lr=0.1), r"^chain: .*got 2 in"),
        (
            lambda: O.chain(O.scale_by_lr(), O.add_decayed_weights(0.1), lr=0.1),
            r"^chain: add_decayed_weights after scale_by_lr would add \+weight_decay \* params",
        ),
        (
            lambda: O.chain(O.scale_by_lr(), O.scale_by_adam(), lr=0.1),
            r"^chain: scale_by_adam after scale_by_lr .*lr would have no effect",
        ),
        (lambda: O.chain(O.scale_by_lr(), lr=-0.1), r"^lr: expected a number >= 0"),
    ],
    ids=["empty", "no-scale_by_lr", "two-scale_by_lr", "decay-after-lr", "adam-after-lr", "negative-lr"],
)
def test_chain_refuses_chains_that_would_not_descend(make, match):
    """A chain without scale_by_lr added the raw gradient (ascent) and ignored lr=;
    such chains are refused when built, with the reason."""
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("backend", OPT_BACKENDS)
@pytest.mark.parametrize(
    "opt",
    [
        O.chain(O.trace(0.9), O.scale_by_lr(), lr=0.05),
        O.chain(O.scale_by_lr(), O.trace(0.9), lr=0.05),  # momentum on steps (Sutskever)
        O.chain(O.scale(0.5), O.scale_by_lr(), O.clip_by_global_norm(0.1), lr=0.1),  # capped step length
        O.chain(O.scale_by_lr(), lr=mg.optim.cosine(0.1, 20)),
    ],
    ids=["trace-lr", "lr-trace", "lr-then-clip", "schedule"],
)
def test_valid_custom_chains_descend_and_use_lr(backend, opt):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    y = (X[:, 0] > 0).astype(np.int64)
    m = mg.MLP([3, 4, 2], dtype="float64", backend=backend, seed=0)
    loss0 = m.loss(X, y)
    h = mg.fit(m, X, y, batch_size="full", steps=20, optimizer=opt)
    assert h.column("loss")[-1] < loss0
    assert h.column("lr")[0] == opt.lr_at(0)
    assert "lr=" in repr(opt)


def test_a_chain_needs_its_learning_rate():
    """chain(..., scale_by_lr()) without lr= used to default to 0: a chain that trained
    nothing, silently.  lr is required."""
    with pytest.raises(TypeError, match="lr"):
        mg.optim.chain(mg.optim.trace(0.9), mg.optim.scale_by_lr())
