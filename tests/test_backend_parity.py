"""Backend parity: the compiled cpu backend against the NumPy reference (backpack style).

One declarative table of model cases and one of training cases, each with a readable id;
every case runs on both regimes of the cpu backend (``cpu-loops``: hand-written loops,
``cpu-blas``: numpy BLAS + compiled epilogues, forced through ``blas_min_batch``) and in
both dtypes, and is compared with ``backend="numpy"`` on the same parameters and data.

Tolerances (relative to the magnitude of the reference, see :func:`assert_close`):

* float64: 1e-10 for single evaluations and for short training runs (the two backends
  differ only in summation order, ~1e-16 per operation).
* float32: 2e-5 for single evaluations (a few ulps of float32's 6e-8, accumulated over
  fan-ins of at most ~10), 1e-3 for whole training runs of <= 40 steps (rounding
  differences compound through the updates; a real bug is off by O(1)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from strategies import CPU_PATHS, assert_close, make_model, make_targets

import minigd as mg

EVAL_TOL = {"float64": 1e-10, "float32": 2e-5}
TRAIN_TOL = {"float64": 1e-10, "float32": 1e-3}
DTYPES = ("float64", "float32")


# ============================================================================ the case tables
@dataclass(frozen=True)
class Case:
    """One model + data set."""

    id: str
    sizes: tuple
    activation: object = "relu"
    loss: str = "cross_entropy"
    n: int = 9

    def build(self, path, dtype, seed=0):
        m = make_model(list(self.sizes), path, activation=self.activation, loss=self.loss, dtype=dtype, seed=seed)
        rng = np.random.default_rng(100 + seed)
        m.params[...] += (0.1 * rng.normal(size=m.n_params)).astype(dtype)  # non-zero biases
        X = rng.normal(size=(self.n, self.sizes[0])).astype(dtype)
        y = make_targets(self.loss, self.n, self.sizes[-1], rng, dtype)
        return m, X, y


MODEL_CASES = [
    Case("logreg-ce", (4, 3)),
    Case("linreg-mse-1out", (3, 1), loss="mse"),
    Case("linear-bce", (3, 2), loss="binary_cross_entropy"),
    Case("relu-ce", (5, 8, 4)),
    Case("tanh-mse-2hidden", (4, 6, 6, 2), "tanh", "mse"),
    Case("gelu-bce", (3, 7, 3), "gelu", "binary_cross_entropy"),
    Case("sigmoid-ce", (4, 5, 3), "sigmoid"),
    Case("leaky-mse", (4, 5, 2), "leaky_relu", "mse"),
    Case("identity-ce", (3, 4, 3), "identity"),
    Case("mixed-acts-3hidden", (3, 5, 4, 3, 2), ("relu", "sigmoid", "leaky_relu")),
    Case("width1-bottleneck", (2, 1, 1, 3), ("tanh", "gelu")),
    Case("batch1", (4, 6, 3), n=1),
    Case("batch70-over-default-threshold", (6, 10, 4), "tanh", n=70),
]


@dataclass(frozen=True)
class TrainCase:
    """A model case plus the arguments of one short ``fit`` run."""

    id: str
    model: Case
    fit: dict = field(default_factory=dict)


_MLP_CE = Case("mlp", (4, 6, 3), "tanh", "cross_entropy", n=23)
_MLP_MSE = Case("mlp-mse", (3, 5, 2), "relu", "mse", n=23)
_MLP_BCE = Case("mlp-bce", (3, 5, 2), "gelu", "binary_cross_entropy", n=23)

TRAIN_CASES = [
    TrainCase("sgd", _MLP_CE, dict(optimizer=mg.SGD(lr=0.1))),
    TrainCase("sgd-momentum", _MLP_CE, dict(optimizer=mg.SGD(lr=0.05, momentum=0.9))),
    TrainCase("sgd-nesterov", _MLP_CE, dict(optimizer=mg.SGD(lr=0.05, momentum=0.9, nesterov=True))),
    TrainCase("sgd-l2-weight-decay", _MLP_CE, dict(optimizer=mg.SGD(lr=0.1, momentum=0.5, weight_decay=0.01))),
    TrainCase(
        "sgd-decoupled-weight-decay",
        _MLP_CE,
        dict(optimizer=mg.SGD(lr=0.1, momentum=0.5, weight_decay=0.01, decoupled_weight_decay=True)),
    ),
    TrainCase("sgd-clip-norm", _MLP_MSE, dict(optimizer=mg.SGD(lr=0.2, clip_norm=0.1))),
    TrainCase("adam", _MLP_CE, dict(optimizer=mg.Adam(lr=0.01))),
    TrainCase("adam-l2", _MLP_MSE, dict(optimizer=mg.Adam(lr=0.01, weight_decay=0.01))),
    TrainCase("adamw", _MLP_BCE, dict(optimizer=mg.AdamW(lr=0.01, weight_decay=0.1))),
    TrainCase("adam-clip-norm", _MLP_CE, dict(optimizer=mg.Adam(lr=0.01, clip_norm=0.05))),
    TrainCase(
        "generic-chain-unfused",
        _MLP_MSE,
        dict(
            optimizer=mg.optim.chain(
                mg.optim.scale(0.5),
                mg.optim.trace(0.9),
                mg.optim.clip_by_global_norm(0.5),
                mg.optim.scale_by_lr(),
                lr=0.1,
            )
        ),
    ),
    TrainCase(
        "lr-schedule-warmup-cosine",
        _MLP_CE,
        dict(optimizer=mg.SGD(lr=mg.optim.warmup(mg.optim.cosine(0.2, 30), 5), momentum=0.9)),
    ),
    TrainCase("sampler-replacement", _MLP_CE, dict(sampler="replacement")),
    TrainCase("sampler-sequential", _MLP_CE, dict(sampler="sequential")),
    TrainCase("drop-last", _MLP_CE, dict(drop_last=True)),
    TrainCase("batch1-sgd", _MLP_MSE, dict(batch_size=1, epochs=1, optimizer=mg.SGD(lr=0.05))),
    TrainCase("full-batch", _MLP_BCE, dict(batch_size="full", epochs=20, optimizer=mg.SGD(lr=0.5))),
    TrainCase("batch-size-schedule", _MLP_CE, dict(batch_size=mg.BatchSizeSchedule(3, {1: 8, 2: 23}))),
    TrainCase("validation-evals", _MLP_CE, dict(eval_every=2, eval_train=True)),
]

_TRAIN_DEFAULTS = dict(batch_size=5, epochs=3, seed=11)


# ============================================================================ evaluation parity
@pytest.fixture(params=MODEL_CASES, ids=[c.id for c in MODEL_CASES])
def case(request):
    return request.param


@pytest.fixture(params=DTYPES)
def dtype(request):
    return request.param


@pytest.fixture(params=CPU_PATHS)
def path(request):
    return request.param


def _pair(case, path, dtype):
    ref, X, y = case.build("numpy", dtype)
    fast, _, _ = case.build(path, dtype)
    assert np.array_equal(ref.params, fast.params)
    return ref, fast, X, y


def test_forward(case, path, dtype):
    ref, fast, X, _ = _pair(case, path, dtype)
    out = fast.forward(X)
    assert out.dtype == np.dtype(dtype) and out.shape == (case.n, case.sizes[-1])
    assert_close(out, ref.forward(X), EVAL_TOL[dtype], "forward")
    assert_close(fast.forward(X, training=True), ref.forward(X), EVAL_TOL[dtype], "forward(training)")


def test_loss(case, path, dtype):
    ref, fast, X, y = _pair(case, path, dtype)
    loss = fast.loss(X, y)
    assert isinstance(loss, float)
    assert_close(loss, ref.loss(X, y), EVAL_TOL[dtype], "loss")


def test_loss_and_grad(case, path, dtype):
    ref, fast, X, y = _pair(case, path, dtype)
    loss, g = fast.loss_and_grad(X, y)
    loss_r, g_r = ref.loss_and_grad(X, y)
    assert g.dtype == np.dtype(dtype) and g.shape == (fast.n_params,)
    assert_close(loss, loss_r, EVAL_TOL[dtype], "loss")
    assert_close(g, g_r, EVAL_TOL[dtype], "grad")
    # repeated calls on the same workspace give the same result (no stale buffers)
    loss2, g2 = fast.loss_and_grad(X, y)
    assert loss2 == loss and np.array_equal(g2, g)


def test_predict_and_predict_proba(case, path, dtype):
    ref, fast, X, _ = _pair(case, path, dtype)
    if fast.is_classifier:
        p, p_r = fast.predict_proba(X), ref.predict_proba(X)
        assert p.dtype == np.dtype(dtype)
        assert_close(p, p_r, EVAL_TOL[dtype], "predict_proba")
        if case.loss == "cross_entropy":
            np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    yhat, yhat_r = fast.predict(X), ref.predict(X)
    assert yhat.shape == yhat_r.shape
    if not fast.is_classifier:
        assert_close(yhat, yhat_r, EVAL_TOL[dtype], "predict")
        return
    # labels must agree wherever the decision is not a near-tie at the working precision
    z = ref.forward(X).astype(np.float64)
    if case.loss == "cross_entropy":
        top2 = np.sort(z, axis=1)[:, -2:] if z.shape[1] > 1 else np.c_[z - 1, z]
        clear = (top2[:, 1] - top2[:, 0]) > 1e-4
        assert np.array_equal(yhat[clear], yhat_r[clear])
    else:
        clear = np.abs(z) > 1e-4
        assert np.array_equal(yhat[clear], yhat_r[clear])


def test_model_to_copies_parameters(case, dtype):
    ref, X, _ = case.build("numpy", dtype)
    fast = ref.to("cpu")
    assert fast.backend == "cpu" and ref.backend == "numpy"
    assert np.array_equal(fast.params, ref.params) and fast.params is not ref.params
    assert_close(fast.forward(X), ref.forward(X), EVAL_TOL[dtype], "forward after to()")


# ============================================================================ training parity
@pytest.mark.parametrize("tc", TRAIN_CASES, ids=[t.id for t in TRAIN_CASES])
def test_training_run(tc, path, dtype):
    kw = {**_TRAIN_DEFAULTS, **tc.fit}
    ref, X, y = tc.model.build("numpy", dtype)
    fast, _, _ = tc.model.build(path, dtype)
    Xv, yv = X[:7], y[:7]
    h_ref = mg.fit(ref, X, y, validation=(Xv, yv), **kw)
    h_fast = mg.fit(fast, X, y, validation=(Xv, yv), **kw)
    tol = TRAIN_TOL[dtype]
    assert h_fast.n_steps == h_ref.n_steps > 0
    for col in ("step", "epoch", "batch_size", "examples"):
        assert np.array_equal(h_fast.column(col), h_ref.column(col)), col
    np.testing.assert_allclose(h_fast.column("lr"), h_ref.column("lr"), rtol=1e-15)
    assert_close(h_fast.column("loss"), h_ref.column("loss"), tol, "per-step loss")
    assert_close(fast.params, ref.params, tol, "final params")
    assert not np.array_equal(fast.params, tc.model.build(path, dtype)[0].params), "nothing trained"
    assert len(h_fast.evals) == len(h_ref.evals)
    for e_f, e_r in zip(h_fast.evals, h_ref.evals):
        assert e_f.keys() == e_r.keys()
        for k in e_f:
            if k.endswith("loss"):
                assert_close(e_f[k], e_r[k], tol, k)


@pytest.mark.parametrize("path", ("numpy",) + CPU_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_evaluation_in_chunks(path, dtype):
    """More rows than one evaluation chunk (minigd.model.EVAL_CHUNK = 2048): the results
    equal the example-weighted combination of the two pieces evaluated separately."""
    from minigd.model import EVAL_CHUNK

    n = EVAL_CHUNK + 53
    m = make_model([3, 5, 2], path, activation="tanh", dtype=dtype)
    rng = np.random.default_rng(8)
    X = rng.normal(size=(n, 3)).astype(dtype)
    y = rng.integers(0, 2, size=n).astype(np.int64)
    a, b = slice(0, EVAL_CHUNK), slice(EVAL_CHUNK, n)
    loss, g = m.loss_and_grad(X, y)
    (la, ga), (lb, gb) = m.loss_and_grad(X[a], y[a]), m.loss_and_grad(X[b], y[b])
    assert g.dtype == np.dtype(dtype)
    assert_close(loss, (EVAL_CHUNK * la + 53 * lb) / n, EVAL_TOL[dtype], "chunked loss_and_grad loss")
    assert_close(g, (EVAL_CHUNK * ga.astype(np.float64) + 53 * gb) / n, EVAL_TOL[dtype], "chunked grad")
    assert_close(m.loss(X, y), loss, EVAL_TOL[dtype], "chunked loss")
    assert np.array_equal(m.forward(X), np.vstack([m.forward(X[a]), m.forward(X[b])]))
    assert np.array_equal(m.predict(X), np.concatenate([m.predict(X[a]), m.predict(X[b])]))


# ----------------------------------------------------------------------------- edge values
import minigd as _mg  # noqa: E402


@pytest.mark.parametrize(
    "opt",
    [
        lambda: _mg.SGD(lr=0.1),
        lambda: _mg.SGD(lr=0.1, momentum=0.9),
        lambda: _mg.Adam(lr=0.1),
        lambda: _mg.AdamW(lr=0.1),
    ],
    ids=["sgd", "momentum", "adam", "adamw"],
)
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_nan_gradient_is_never_applied(backend, opt):
    """A NaN in the gradient must reject the step on every backend (the subnormal flush of
    the optimizer state must not turn NaN into 0)."""
    m = _mg.MLP([3, 2], dtype="float32", backend=backend)
    p0 = m.params.copy()
    st = opt().init(m.params)
    g = np.array([np.nan, 1, 1, 0, 0, 0, 0, 0], np.float32)
    applied, _ = m.backend_impl.opt_apply(m.params, g, st, 0.1, 1)
    assert not applied
    assert np.array_equal(m.params, p0)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_clip_by_global_norm_survives_float32_overflow_of_the_square(backend):
    m = _mg.MLP([3, 1], dtype="float32", backend=backend, loss="mse")
    m.params[...] = 0
    st = _mg.SGD(lr=1.0, clip_norm=1.0).init(m.params)
    g = np.array([1e20, 0, 0, 0], np.float32)  # |g|^2 = 1e40 overflows float32
    applied, _ = m.backend_impl.opt_apply(m.params, g, st, 1.0, 1)
    assert applied
    np.testing.assert_allclose(m.params, [-1, 0, 0, 0], rtol=1e-6)


def test_relu_of_minus_infinity_is_zero_on_every_path():
    X = np.array([[-np.inf, 1.0]], np.float64)
    outs = []
    for path in ("numpy", "loops", "blas"):
        m = _mg.MLP([2, 2, 1], loss="mse", dtype="float64", backend="numpy" if path == "numpy" else "cpu", seed=0)
        m.weights[0][...] = [[1.0, 0.0], [0.0, 1.0]]
        if path != "numpy":
            m.backend_impl.blas_min_batch = 10**9 if path == "loops" else 1
        outs.append(m.backend_impl.forward(m.params, X, np.arange(1), 1).copy())
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
