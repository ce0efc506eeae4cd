"""Batch norm (before / after the activation, ghost batches) and inverted dropout.

What is checked, against independent oracles wherever one exists:

* gradients: central finite differences (float64) of the *training-mode* mean loss --
  ghost-batch statistics, and dropout masks drawn once with ``draw_dropout`` and reused by
  every ``loss_grad`` call until drawn again -- on both backends, over hypothesis-drawn
  small architectures and a fixed grid of placements x ghost sizes (an uneven last ghost
  batch included) x dropout;
* ghost batches: a ghost size >= the batch is ordinary batch norm, bitwise; a batch in
  ghosts is exactly its chunks normalised (and differentiated) separately;
* evaluation mode: a hand-written float64 forward from ``running_mean`` / ``running_var`` /
  ``bn_scales`` / ``bn_shifts``; the running statistics start at (0, 1) and ``fit`` folds
  in the whole batch's mean and unbiased variance with momentum 0.1 once per step (a
  hand-rolled training loop and the closed form of a constant batch); ``loss_and_grad``
  and ``forward(training=True)`` leave them alone;
* PyTorch's ``BatchNorm1d(eps=1e-5, momentum=0.1)`` (only where torch is importable);
* dropout masks: inverted, drawn from the documented uniforms, the dropped fraction within
  5 standard deviations of p, off in evaluation mode, the same on both backends;
  determinism of fits under a seed;
* parity numpy vs cpu (forward in both modes, loss, gradient, short fits);
* every error of the issue's list, raised before the first step where fit is concerned;
* per-example statistics: refused with batch norm, exact (same masks) with dropout alone;
* checkpoints, pickling, ``to()`` and resume keep the running statistics.

Tolerances are stated where they are used.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import CPU_PATHS, LOSSES, assert_close, force_path, make_targets

import minigd as mg
from minigd import nn
from minigd.checkpoint import load_checkpoint, save_checkpoint

EPS = 1e-5
MOMENTUM = 0.1
SMOOTH = ("tanh", "sigmoid", "gelu", "identity")  # no kinks: finite differences stay valid

# finite differences: as tests/test_gradcheck.py (h = 1e-6, float64), with one more order of
# magnitude of rtol because batch norm's 1/sqrt(var + eps) raises the curvature (the data are
# kept away from tiny ghost-batch variances, see _well_conditioned)
H = 1e-6
FD_RTOL = 1e-5
FD_ATOL = 1e-8
MIN_GHOST_VAR = 1e-3


# ============================================================================ helpers
def build(sizes, backend="numpy", dtype="float64", seed=0, perturb=0.3, **kw):
    """A model with non-trivial parameters: random biases and BN scales / shifts."""
    m = mg.MLP(sizes, backend=backend, dtype=dtype, seed=seed, **kw)
    rng = np.random.default_rng(1000 + seed)
    m.params[...] += (perturb * rng.normal(size=m.n_params)).astype(dtype)
    return m


def data(n, n_in, loss, n_out, seed=0, dtype="float64"):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_in)).astype(dtype)
    return X, make_targets(loss, n, n_out, rng, dtype)


def _act(name, x):
    return nn.activation(nn.ACTIVATIONS[name], x)


def hand_forward(model, X, training=False, masks=None, ghost="model"):
    """Float64 forward written from the definitions (not from the backends).

    Returns (outputs, bn_inputs): bn_inputs[l] is the (B, n_l) input of layer l's batch
    norm (z_l before the activation, f(z_l) after it).  Training: each ghost batch (of
    ``model.norm.ghost`` rows unless ``ghost`` is given) with its own mean and biased
    variance; evaluation: the running statistics.  ``masks[l]`` multiplies the hidden
    output (after batch norm)."""
    bn = model.batch_norm
    g = model.norm.ghost if ghost == "model" else ghost
    a = np.asarray(X, np.float64)
    B = a.shape[0]
    L = len(model.weights)
    bn_inputs = []

    def norm(l, x):
        bn_inputs.append(x)
        gam = model.bn_scales[l].astype(np.float64)
        bet = model.bn_shifts[l].astype(np.float64)
        if not training:
            mu = model.running_mean[l].astype(np.float64)
            var = model.running_var[l].astype(np.float64)
            return gam * (x - mu) / np.sqrt(var + EPS) + bet
        out = np.empty_like(x)
        step = B if g is None else g
        for s in range(0, B, step):
            c = x[s : s + step]
            mu, var = c.mean(axis=0), c.var(axis=0)  # biased variance
            out[s : s + step] = gam * (c - mu) / np.sqrt(var + EPS) + bet
        return out

    for l, (W, b) in enumerate(zip(model.weights, model.biases)):
        z = a @ W.astype(np.float64) + b.astype(np.float64)
        if l == L - 1:
            return z, bn_inputs
        act = model.activations[l]
        if bn in (True, "before"):
            a = _act(act, norm(l, z))
        elif bn == "after":
            a = norm(l, _act(act, z))
        else:
            a = _act(act, z)
        if masks is not None:
            a = a * masks[l]
    raise AssertionError("unreachable")


def current_masks(model, B):
    return [m[:B].astype(np.float64) for m in model.backend_impl.masks]


class Batch:
    """A fixed training batch with its masks drawn once: loss / gradient of the training-mode
    mean loss through ``backend_impl.loss_grad`` (which reuses the masks)."""

    def __init__(self, model, X, y, mask_seed=0):
        self.model = model
        self.X, self.yi, self.yf = model.check_Xy(X, y)
        self.B = self.X.shape[0]
        self.idx = np.arange(self.B, dtype=np.int64)
        self.impl = model.backend_impl
        self.impl.reserve(self.B)
        self.impl.draw_dropout(np.random.default_rng(mask_seed), self.B)
        self.scratch = np.zeros(model.n_params, model.dtype)

    def loss(self):
        return self.impl.loss_grad(self.model.params, self.scratch, self.X, self.yi, self.yf, self.idx, self.B)[0]

    def loss_grad(self):
        g = np.zeros(self.model.n_params, self.model.dtype)
        loss, _ = self.impl.loss_grad(self.model.params, g, self.X, self.yi, self.yf, self.idx, self.B)
        return loss, g

    def fd_grad(self, h=H):
        p = self.model.params
        g = np.empty(p.shape[0])
        for i in range(p.shape[0]):
            old = p[i]
            p[i] = old + h
            lp = self.loss()
            p[i] = old - h
            lm = self.loss()
            p[i] = old
            g[i] = (lp - lm) / (2 * h)
        return g


def grads_agree(g, g_fd):
    return np.linalg.norm(g - g_fd) <= FD_RTOL * max(np.linalg.norm(g), np.linalg.norm(g_fd)) + FD_ATOL


def _well_conditioned(model, X):
    """Every ghost batch of every BN input has a variance >= MIN_GHOST_VAR per unit."""
    if not model.norm.bn:
        return True
    _, ins = hand_forward(model, X, training=True)
    B = X.shape[0]
    g = model.norm.ghost_size(B)
    return all(x[s : s + g].var(axis=0).min() >= MIN_GHOST_VAR for x in ins for s in range(0, B, g))


def assert_fd(model, X, y, mask_seed=0):
    b = Batch(model, X, y, mask_seed)
    loss, g = b.loss_grad()
    assert np.isfinite(loss)
    g_fd = b.fd_grad()
    err = np.linalg.norm(g - g_fd) / max(np.linalg.norm(g_fd), 1e-300)
    assert grads_agree(g, g_fd), f"relative error {err:.3g}\nanalytic {g}\nnumeric  {g_fd}"
    # the masks were reused by every call: the gradient is bitwise the same afterwards
    loss2, g2 = b.loss_grad()
    assert loss2 == loss and np.array_equal(g2, g)
    return g


# ============================================================================ finite differences
@st.composite
def norm_cases(draw):
    depth = draw(st.integers(1, 2))
    n_in = draw(st.integers(1, 4))
    hidden = [draw(st.sampled_from((1, 2, 3, 5))) for _ in range(depth)]
    n_out = draw(st.integers(1, 3))
    loss = draw(st.sampled_from(LOSSES))
    act = (
        draw(st.sampled_from(SMOOTH)) if draw(st.booleans()) else [draw(st.sampled_from(SMOOTH)) for _ in range(depth)]
    )
    bn = draw(st.sampled_from([False, True, "before", "after"]))
    dropout = draw(st.sampled_from([0.0, 0.2, 0.5]))
    if not bn and dropout == 0:
        dropout = 0.3
    B = draw(st.sampled_from([2, 4, 6, 9, 13, 37]))
    ghost = draw(st.sampled_from([None, 2, 3, 5, 8, 64])) if bn else None
    return dict(
        sizes=[n_in, *hidden, n_out], activation=act, loss=loss, batch_norm=bn, ghost_batch_size=ghost, dropout=dropout
    ), B


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@given(case=norm_cases(), seed=st.integers(0, 2**31 - 1))
def test_training_gradient_matches_finite_differences(backend, case, seed):
    kw, B = case
    g = min(kw["ghost_batch_size"] or B, B)
    assume(not kw["batch_norm"] or B % g != 1)
    model = build(backend=backend, seed=seed % 1000, **kw)
    X, y = data(B, model.n_in, kw["loss"], model.n_out, seed)
    assume(_well_conditioned(model, X))
    assert_fd(model, X, y, mask_seed=seed)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("ghost", [None, 5, 8, 37, 50])
@pytest.mark.parametrize("bn", ["before", "after"])
def test_bn_gradient_grid(backend, bn, ghost, dropout):
    """B = 37: ghosts of 5 (last 2 rows) and 8 (last 5 rows), one ghost of the whole batch,
    a ghost larger than the batch, and ghost=None; two hidden layers of different widths."""
    loss = "cross_entropy" if bn == "before" else "mse"
    model = build(
        [3, 6, 5, 2],
        backend,
        activation=["tanh", "gelu"],
        loss=loss,
        batch_norm=bn,
        ghost_batch_size=ghost,
        dropout=dropout,
        seed=4,
    )
    X, y = data(37, 3, loss, 2, seed=13)
    assert _well_conditioned(model, X), "fixed data must keep ghost variances away from 0"
    g = assert_fd(model, X, y)
    gam, bet = model.layout.bn_views(g)
    assert all(np.abs(v).max() > 1e-6 for v in gam + bet), "BN parameters get a gradient"


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("sizes", [[3, 6, 2], [4, 5, 3, 2]])
def test_dropout_gradient_fixed_mask(backend, sizes):
    model = build(sizes, backend, activation="tanh", loss="cross_entropy", dropout=0.4, seed=2)
    X, y = data(11, sizes[0], "cross_entropy", sizes[-1], seed=3)
    g1 = assert_fd(model, X, y, mask_seed=1)
    g2 = assert_fd(model, X, y, mask_seed=2)
    assert not np.allclose(g1, g2), "the masks must matter"


def test_fd_check_detects_a_missing_bn_term(monkeypatch):
    """The check can fail: dropping the mean(dy * xhat) term of BN's backward is caught."""
    from minigd.backends.numpy_ref import NumpyBackend

    model = build([3, 4, 2], "numpy", activation="tanh", loss="mse", batch_norm=True, seed=1)
    X, y = data(9, 3, "mse", 2, seed=1)
    b = Batch(model, X, y)
    assert grads_agree(b.loss_grad()[1], b.fd_grad())

    def wrong(self, dy, gamma, cache):
        xhat, inv, ghosts, _ = cache
        dy = dy.astype(np.float64)
        dx = np.empty_like(dy)
        for s in ghosts:
            dx[s] = gamma * inv[s] * (dy[s] - dy[s].mean(axis=0))
        return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)

    monkeypatch.setattr(NumpyBackend, "_bn_backward", wrong)
    assert not grads_agree(b.loss_grad()[1], b.fd_grad())


# ============================================================================ ghost batches
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("bn", ["before", "after"])
@pytest.mark.parametrize("B", [12, 37])
def test_ghost_of_the_whole_batch_is_ordinary_batch_norm(backend, bn, B):
    X, y = data(B, 4, "cross_entropy", 3, seed=5)
    kw = dict(activation="tanh", batch_norm=bn, dropout=0.2, seed=3)
    ref = build([4, 6, 3], backend, **kw)
    out_ref = ref.forward(X, training=True)
    lg_ref = ref.loss_and_grad(X, y)
    for ghost in (B, B + 1, 1000):
        m = build([4, 6, 3], backend, ghost_batch_size=ghost, **kw)
        assert np.array_equal(m.params, ref.params)
        assert np.array_equal(m.forward(X, training=True), out_ref), ghost
        loss, g = m.loss_and_grad(X, y)
        assert loss == lg_ref[0] and np.array_equal(g, lg_ref[1]), ghost
    # and a smaller ghost is not ignored
    m = build([4, 6, 3], backend, ghost_batch_size=5, **kw)
    assert not np.allclose(m.forward(X, training=True), out_ref)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("bn", ["before", "after"])
@pytest.mark.parametrize("ghost", [5, 8])
def test_ghost_batches_are_normalised_separately(backend, bn, ghost):
    """B = 37 in ghosts of 5 / 8: the batch's training output is the concatenation of each
    chunk's training output as a batch of its own, and the gradient of the mean loss is the
    row-weighted mean of the chunks' gradients.  Also against the hand-written forward."""
    B = 37
    X, y = data(B, 4, "cross_entropy", 3, seed=6)
    m = build([4, 6, 5, 3], backend, activation=["sigmoid", "tanh"], batch_norm=bn, ghost_batch_size=ghost, seed=8)
    out = m.forward(X, training=True)
    hand, _ = hand_forward(m, X, training=True)
    assert_close(out, hand, 1e-12, "hand-written ghost forward")
    loss, grad = m.loss_and_grad(X, y)
    parts, gsum, lsum = [], np.zeros(m.n_params), 0.0
    for s in range(0, B, ghost):
        Xc, yc = X[s : s + ghost], y[s : s + ghost]
        parts.append(m.forward(Xc, training=True))
        lc, gc = m.loss_and_grad(Xc, yc)
        gsum += gc * len(yc) / B
        lsum += lc * len(yc) / B
    assert_close(out, np.concatenate(parts), 1e-12, "concatenated ghosts")
    assert loss == pytest.approx(lsum, rel=1e-12)
    assert_close(grad, gsum, 1e-12, "chunk-weighted gradient")
    # and it is not what whole-batch statistics give
    whole, _ = hand_forward(m, X, training=True, ghost=None)
    assert not np.allclose(out, whole)


# ============================================================================ evaluation mode
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("bn", [True, "before", "after"])
def test_running_statistics_start_at_zero_mean_unit_variance(backend, bn):
    m = mg.MLP([3, 4, 5, 2], backend=backend, batch_norm=bn, seed=0)
    assert m.running.shape == (2 * (4 + 5),)
    assert [v.shape for v in m.running_mean] == [(4,), (5,)]
    for mu, var, gam, bet in zip(m.running_mean, m.running_var, m.bn_scales, m.bn_shifts):
        assert np.all(mu == 0) and np.all(var == 1) and np.all(gam == 1) and np.all(bet == 0)
    assert m.n_params == mg.MLP([3, 4, 5, 2], seed=0).n_params + 2 * (4 + 5)
    # the dense block keeps the plain model's offsets (and the same initial values)
    plain = mg.MLP([3, 4, 5, 2], backend=backend, seed=0)
    assert np.array_equal(m.params[: plain.n_params], plain.params)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("bn", ["before", "after"])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_evaluation_uses_the_running_statistics(backend, dtype, bn, dropout):
    m = build(
        [4, 6, 5, 3],
        backend,
        dtype=dtype,
        activation=["tanh", "relu"],
        batch_norm=bn,
        ghost_batch_size=4,
        dropout=dropout,
        seed=2,
    )
    rng = np.random.default_rng(9)
    for mu, var in zip(m.running_mean, m.running_var):
        mu[...] = rng.normal(size=mu.shape)
        var[...] = rng.uniform(0.2, 3.0, size=var.shape)
    X, y = data(10, 4, "cross_entropy", 3, seed=1, dtype=dtype)
    out = m.forward(X)
    hand, _ = hand_forward(m, X, training=False)
    assert_close(out, hand, 1e-12 if dtype == "float64" else 1e-5)
    # eval is deterministic and row-independent (a single row works, whatever the ghosts)
    assert np.array_equal(m.forward(X), out)
    assert_close(m.forward(X[3:4]), out[3:4], 1e-12 if dtype == "float64" else 1e-5)
    # the evaluation loss is that of these outputs
    ref = nn.per_example_loss(nn.LOSSES["cross_entropy"], hand, y, np.empty((0, 3))).mean()
    assert m.loss(X, y) == pytest.approx(ref, rel=1e-10 if dtype == "float64" else 1e-4)
    # training mode uses the batch statistics instead
    assert not np.allclose(m.forward(X, training=True), out, atol=1e-3)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_loss_and_grad_and_training_forward_leave_running_statistics_alone(backend, monkeypatch):
    m = build([4, 6, 3], backend, activation="tanh", batch_norm=True, ghost_batch_size=4, dropout=0.3, seed=0)
    X, y = data(16, 4, "cross_entropy", 3)
    before = m.running.copy()
    calls = []
    real = type(m.backend_impl).update_running
    monkeypatch.setattr(type(m.backend_impl), "update_running", lambda self, B: (calls.append(B), real(self, B))[1])
    m.loss_and_grad(X, y)
    m.forward(X, training=True)
    m.loss(X, y)
    m.evaluate(X, y)
    assert calls == [] and np.array_equal(m.running, before)
    # fit calls it once per step, with the step's batch size
    mg.fit(m, X, y, batch_size=6, epochs=2, optimizer=mg.SGD(lr=0.01), sampler="sequential")
    assert calls == [6, 6, 4] * 2
    assert not np.array_equal(m.running, before)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("bn, ghost", [("before", None), ("after", None), ("before", 4), ("after", 6)])
def test_fit_running_statistics_follow_the_momentum_recursion(backend, bn, ghost):
    """fit (sequential batches of 10 out of 30, plain SGD) against a hand-rolled loop:
    running <- 0.9 running + 0.1 (mean, unbiased variance) of the whole batch's BN inputs,
    computed from the parameters *before* the step; params -= lr * grad."""
    n, Bs, lr = 30, 10, 0.1
    X, y = data(n, 4, "cross_entropy", 3, seed=4)
    kw = dict(activation=["tanh", "sigmoid"], batch_norm=bn, ghost_batch_size=ghost, seed=5)
    m = build([4, 6, 5, 3], backend, **kw)
    ref = build([4, 6, 5, 3], "numpy", **kw)
    mg.fit(m, X, y, batch_size=Bs, epochs=2, sampler="sequential", optimizer=mg.SGD(lr=lr))
    run_mean = [np.zeros(k) for k in (6, 5)]
    run_var = [np.ones(k) for k in (6, 5)]
    for _ in range(2):
        for s in range(0, n, Bs):
            Xb, yb = X[s : s + Bs], y[s : s + Bs]
            _, ins = hand_forward(ref, Xb, training=True)
            for l, x in enumerate(ins):
                run_mean[l] = (1 - MOMENTUM) * run_mean[l] + MOMENTUM * x.mean(axis=0)
                run_var[l] = (1 - MOMENTUM) * run_var[l] + MOMENTUM * x.var(axis=0, ddof=1)
            ref.params -= lr * ref.loss_and_grad(Xb, yb)[1]
    assert_close(m.params, ref.params, 1e-10, "params")
    for l in range(2):
        assert_close(m.running_mean[l], run_mean[l], 1e-10, f"running_mean[{l}]")
        assert_close(m.running_var[l], run_var[l], 1e-10, f"running_var[{l}]")


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("ghost", [None, 4])
def test_running_statistics_closed_form_for_a_constant_batch(backend, ghost):
    """Full batch, lr = 0: the same statistics k times, so running_mean = (1 - 0.9^k) mu and
    running_var = 0.9^k + (1 - 0.9^k) var_unbiased -- whatever the ghost size."""
    X, y = data(22, 3, "mse", 2, seed=7)
    m = build(
        [3, 5, 2],
        backend,
        activation="gelu",
        loss="mse",
        batch_norm="after",
        ghost_batch_size=ghost,
        dropout=0.3,
        seed=1,
    )
    _, (x,) = hand_forward(m, X, training=True)
    k = 7
    mg.fit(m, X, y, batch_size="full", steps=k, optimizer=mg.SGD(lr=0.0))
    f = 1 - (1 - MOMENTUM) ** k
    assert_close(m.running_mean[0], f * x.mean(axis=0), 1e-12)
    assert_close(m.running_var[0], (1 - f) + f * x.var(axis=0, ddof=1), 1e-12)


# ============================================================================ PyTorch
@pytest.mark.parametrize("bn", ["before", "after"])
def test_matches_pytorch_batchnorm1d(bn):
    torch = pytest.importorskip("torch")
    X, y = data(13, 4, "cross_entropy", 3, seed=3)
    m = build([4, 6, 3], "numpy", activation="tanh", batch_norm=bn, seed=6)
    W0, W1 = m.weights
    b0, b1 = m.biases
    lin0, lin1 = torch.nn.Linear(4, 6).double(), torch.nn.Linear(6, 3).double()
    norm = torch.nn.BatchNorm1d(6, eps=1e-5, momentum=0.1).double()
    with torch.no_grad():
        lin0.weight.copy_(torch.from_numpy(W0.T.copy()))
        lin0.bias.copy_(torch.from_numpy(b0.copy()))
        lin1.weight.copy_(torch.from_numpy(W1.T.copy()))
        lin1.bias.copy_(torch.from_numpy(b1.copy()))
        norm.weight.copy_(torch.from_numpy(m.bn_scales[0].copy()))
        norm.bias.copy_(torch.from_numpy(m.bn_shifts[0].copy()))
    layers = [lin0, norm, torch.nn.Tanh(), lin1] if bn == "before" else [lin0, torch.nn.Tanh(), norm, lin1]
    net = torch.nn.Sequential(*layers).train()
    out_t = net(torch.from_numpy(X))
    loss_t = torch.nn.functional.cross_entropy(out_t, torch.from_numpy(y))
    loss_t.backward()
    g_t = np.concatenate(
        [
            lin0.weight.grad.numpy().T.ravel(),
            lin0.bias.grad.numpy(),
            lin1.weight.grad.numpy().T.ravel(),
            lin1.bias.grad.numpy(),
            norm.weight.grad.numpy(),
            norm.bias.grad.numpy(),
        ]
    )
    for backend in ("numpy", "cpu"):
        mb = m.to(backend)
        assert_close(mb.forward(X, training=True), out_t.detach().numpy(), 1e-12, backend)
        loss, g = mb.loss_and_grad(X, y)
        assert loss == pytest.approx(loss_t.item(), rel=1e-12)
        assert_close(g, g_t, 1e-12, backend)
        # one step of fit updates the running statistics as torch's forward did
        mg.fit(mb, X, y, batch_size="full", steps=1, optimizer=mg.SGD(lr=0.0))
        assert_close(mb.running_mean[0], norm.running_mean.numpy(), 1e-12, backend)
        assert_close(mb.running_var[0], norm.running_var.numpy(), 1e-12, backend)
        net.eval()
        assert_close(mb.forward(X), net(torch.from_numpy(X)).detach().numpy(), 1e-12, backend)
        net.train()


# ============================================================================ dropout
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_masks_are_inverted_and_drawn_from_the_documented_uniforms(backend, dtype, p):
    m = mg.MLP([3, 7, 4, 2], backend=backend, dtype=dtype, dropout=p, seed=0)
    B = 9
    m.backend_impl.draw_dropout(np.random.default_rng(42), B)
    rng = np.random.default_rng(42)
    scale = np.asarray(1.0 / (1.0 - p), dtype)
    for l, n in enumerate((7, 4)):
        keep = rng.random((B, n)) >= p
        mask = m.backend_impl.masks[l][:B]
        assert mask.dtype == np.dtype(dtype)
        assert np.array_equal(mask, np.where(keep, scale, np.asarray(0, dtype)))
        assert set(np.unique(mask).tolist()) <= {0.0, scale.item()}


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("bn", [False, "before", "after"])
def test_training_forward_applies_the_masks_after_batch_norm(backend, bn):
    m = build([4, 6, 5, 3], backend, activation=["tanh", "sigmoid"], batch_norm=bn, dropout=0.4, seed=3)
    X, _ = data(12, 4, "mse", 3, seed=2)
    out = m.forward(X, training=True)
    masks = current_masks(m, 12)
    assert any((mk == 0).any() for mk in masks)
    hand, _ = hand_forward(m, X, training=True, masks=masks)
    assert_close(out, hand, 1e-12)
    # fresh masks on the next call (from model.rng)
    assert not np.array_equal(m.forward(X, training=True), out)


def test_dropped_fraction_is_p():
    """B = 2000 rows x 50 units = 1e5 Bernoulli draws per layer: the dropped fraction has
    standard deviation sqrt(p (1 - p) / 1e5) = 0.00145 at p = 0.3, and the mask mean (1 in
    expectation, inverted dropout) sqrt(p / (1 - p) / 1e5) = 0.00207.  Tolerance: 5 sd, at a
    fixed seed."""
    p, B, n = 0.3, 2000, 50
    m = mg.MLP([2, n, n, 2], dropout=p, backend="cpu", dtype="float64", seed=0)
    m.backend_impl.draw_dropout(np.random.default_rng(123), B)
    N = B * n
    for mask in m.backend_impl.masks:
        mk = mask[:B]
        assert abs((mk == 0).mean() - p) < 5 * np.sqrt(p * (1 - p) / N)
        assert abs(mk.mean() - 1.0) < 5 * np.sqrt(p / (1 - p) / N)
    a, b = (mk[:B] for mk in m.backend_impl.masks)
    assert not np.array_equal(a == 0, b == 0), "layers get independent masks"


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("bn", [False, "after"])
def test_dropout_is_off_in_evaluation_mode(backend, bn):
    m = build([4, 6, 5, 3], backend, activation="tanh", batch_norm=bn, dropout=0.5, seed=1)
    plain = mg.MLP([4, 6, 5, 3], backend=backend, activation="tanh", batch_norm=bn, seed=7, dtype="float64")
    plain.params[...] = m.params
    plain.running[...] = m.running
    X, y = data(10, 4, "cross_entropy", 3, seed=3)
    out = m.forward(X)
    assert np.array_equal(m.forward(X), out)
    assert_close(out, plain.forward(X), 1e-13)
    assert m.loss(X, y) == pytest.approx(plain.loss(X, y), rel=1e-13)
    assert np.array_equal(m.predict(X), plain.predict(X))


@pytest.mark.parametrize("bn", [False, "before"])
def test_masks_are_identical_on_both_backends(bn):
    ms = [mg.MLP([3, 5, 4, 2], backend=b, batch_norm=bn, dropout=0.35, seed=0) for b in ("numpy", "cpu")]
    for m in ms:
        m.backend_impl.draw_dropout(np.random.default_rng(77), 21)
    for a, b in zip(*(m.backend_impl.masks for m in ms)):
        assert np.array_equal(a[:21], b[:21])
    # and a model's own generator is carried over by to(): same training forward
    X, _ = data(21, 3, "mse", 2)
    src = build([3, 5, 4, 2], "numpy", batch_norm=bn, dropout=0.35, seed=0, activation="tanh")
    dst = src.to("cpu")
    assert_close(dst.forward(X, training=True), src.forward(X, training=True), 1e-12)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("bn", [False, "before", "after"])
def test_fits_with_dropout_are_deterministic_under_a_seed(backend, bn):
    X, y = data(40, 4, "cross_entropy", 3, seed=8)

    def run(seed):
        m = mg.MLP(
            [4, 8, 3],
            backend=backend,
            activation="relu",
            batch_norm=bn,
            ghost_batch_size=4 if bn else None,
            dropout=0.3,
            dtype="float64",
            seed=0,
        )
        h = mg.fit(m, X, y, batch_size=8, epochs=3, optimizer=mg.Adam(lr=0.01), seed=seed)
        return m, h

    (a, ha), (b, hb), (c, _) = run(3), run(3), run(4)
    assert np.array_equal(a.params, b.params) and np.array_equal(a.running, b.running)
    assert np.array_equal(ha.column("loss"), hb.column("loss"))
    assert not np.array_equal(a.params, c.params)


# ============================================================================ parity numpy vs cpu
NORM_CASES = {
    "bn-before": dict(batch_norm=True),
    "bn-after": dict(batch_norm="after"),
    "bn-before-ghost4": dict(batch_norm="before", ghost_batch_size=4),
    "bn-after-ghost5": dict(batch_norm="after", ghost_batch_size=5),
    "dropout": dict(dropout=0.3),
    "bn-before-dropout": dict(batch_norm=True, dropout=0.2),
    "bn-after-ghost4-dropout": dict(batch_norm="after", ghost_batch_size=4, dropout=0.5),
}
# float64: summation order only (~1e-16 per op).  float32: the statistics are accumulated in
# float64 on both backends; a few float32 ulps (6e-8) amplified by 1/sqrt(var + eps) and two
# layers: 1e-4 for one evaluation, 2e-3 for a 20-step Adam run.
EVAL_TOL = {"float64": 1e-10, "float32": 1e-4}
TRAIN_TOL = {"float64": 1e-10, "float32": 2e-3}


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(NORM_CASES))
def test_parity_forward_loss_gradient(case, dtype, path):
    kw = NORM_CASES[case]
    ref = build([5, 8, 6, 3], "numpy", dtype=dtype, activation=["relu", "tanh"], seed=1, **kw)
    if ref.norm.bn:
        rng = np.random.default_rng(3)
        ref.running[...] = np.abs(rng.normal(size=ref.running.size)) + 0.5
    cpu = force_path(ref.to("cpu"), path)
    X, y = data(23, 5, "cross_entropy", 3, seed=2, dtype=dtype)
    tol = EVAL_TOL[dtype]
    assert_close(cpu.forward(X), ref.forward(X), tol, "eval forward")
    assert_close(cpu.forward(X, training=True), ref.forward(X, training=True), tol, "train forward")
    assert cpu.loss(X, y) == pytest.approx(ref.loss(X, y), rel=tol, abs=tol)
    lc, gc = cpu.loss_and_grad(X, y)
    lr, gr = ref.loss_and_grad(X, y)
    assert lc == pytest.approx(lr, rel=tol, abs=tol)
    assert_close(gc, gr, tol, "gradient")
    # the same masks through the backend API
    bc, br = Batch(cpu, X, y, 5), Batch(ref, X, y, 5)
    assert_close(bc.loss_grad()[1], br.loss_grad()[1], tol, "gradient, explicit masks")
    assert np.array_equal(cpu.running, ref.running)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(NORM_CASES))
def test_parity_short_fits(case, dtype):
    kw = NORM_CASES[case]
    X, y = data(37, 5, "cross_entropy", 3, seed=9, dtype=dtype)
    Xv, yv = data(11, 5, "cross_entropy", 3, seed=10, dtype=dtype)
    runs = []
    for backend in ("numpy", "cpu"):
        m = mg.MLP([5, 8, 6, 3], backend=backend, dtype=dtype, activation=["tanh", "gelu"], seed=2, **kw)
        # 37 = 3 batches of 10 + 7 (7 % 4 = 3, 7 % 5 = 2: no ghost of one row)
        # SGD, not Adam: with batch norm before the activation the bias of the normalised
        # layer has a gradient of exactly 0 in exact arithmetic (BN removes the mean), and
        # Adam's g / sqrt(v) would turn the two backends' different rounding noise there
        # into full-size, different steps
        h = mg.fit(
            m,
            X,
            y,
            batch_size=10,
            steps=20,
            optimizer=mg.SGD(lr=0.05, momentum=0.9),
            seed=1,
            validation=(Xv, yv),
            eval_every=5,
        )
        runs.append((m, h))
    (mn, hn), (mc, hc) = runs
    tol = TRAIN_TOL[dtype]
    assert_close(mc.params, mn.params, tol, "params")
    assert_close(mc.running, mn.running, tol, "running")
    assert_close(hc.column("loss"), hn.column("loss"), tol, "loss column")
    assert_close([e["val_loss"] for e in hc.evals], [e["val_loss"] for e in hn.evals], tol, "val_loss")


# ============================================================================ errors
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(batch_norm=True, ghost_batch_size=1), r"^ghost_batch_size: .*>= 2"),
        (dict(batch_norm=True, ghost_batch_size=0), r"^ghost_batch_size"),
        (dict(batch_norm=False, ghost_batch_size=4), r"^ghost_batch_size: needs batch_norm"),
        (dict(ghost_batch_size=8), r"^ghost_batch_size: needs batch_norm"),
        (dict(batch_norm="middle"), r"^batch_norm: expected False, True, 'before' or 'after'"),
        (dict(batch_norm=1), r"^batch_norm"),
        (dict(batch_norm=None), r"^batch_norm"),
        (dict(batch_norm="Before"), r"^batch_norm"),
        (dict(dropout=1.0), r"^dropout: expected a probability in \[0, 1\)"),
        (dict(dropout=-0.1), r"^dropout"),
        (dict(dropout=1.5), r"^dropout"),
        (dict(dropout=float("nan")), r"^dropout"),
        (dict(dropout=True), r"^dropout"),
        (dict(dropout="0.5"), r"^dropout"),
    ],
)
def test_constructor_errors(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mg.MLP([3, 4, 2], **kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(batch_norm=True), r"^batch_norm: .*depth 0"),
        (dict(batch_norm="after"), r"^batch_norm: .*depth 0"),
        (dict(dropout=0.5), r"^dropout: .*depth 0"),
    ],
)
def test_depth_0_has_no_hidden_layer_to_normalise(kw, match):
    with pytest.raises(ValueError, match=match):
        mg.MLP([3, 2], **kw)


def test_valid_settings_are_accepted():
    for bn in (False, True, "before", "after"):
        assert mg.MLP([3, 4, 2], batch_norm=bn).batch_norm == {"before": True}.get(bn, bn)
    assert mg.MLP([3, 4, 2], batch_norm=True, ghost_batch_size=2).norm.ghost == 2
    assert mg.MLP([3, 4, 2], dropout=0).norm.dropout == 0.0
    assert mg.MLP([3, 4, 2], dropout=0.999).norm.dropout == 0.999


class NoStep:
    def on_step(self, model, step, loss):  # pragma: no cover - must never run
        raise AssertionError("a step ran before the error")


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize(
    "n, fit_kw, model_kw, match",
    [
        (20, dict(batch_size=1), {}, r"^batch_size: batch norm .* at least 2 rows"),
        (37, dict(batch_size=6), {}, r"drop_last"),  # 37 = 6 * 6 + 1
        (37, dict(batch_size=mg.BatchSizeSchedule(4, {1: 6})), {}, r"drop_last"),
        (36, dict(batch_size=9), dict(ghost_batch_size=4), r"^ghost_batch_size: .*9 rows .*ghost batches of 4"),
        (36, dict(batch_size=mg.BatchSizeSchedule(4, {2: 9})), dict(ghost_batch_size=4), r"^ghost_batch_size"),
        # 42 = 3 * 12 + 6: the last batch's ghosts are 5 + 1 rows
        (42, dict(batch_size=12), dict(ghost_batch_size=5), r"^ghost_batch_size: (?s:.*)6 rows(?s:.*)drop_last"),
    ],
)
def test_fit_refuses_a_ghost_of_one_row_before_the_first_step(backend, n, fit_kw, model_kw, match):
    X, y = data(n, 3, "cross_entropy", 2)
    m = mg.MLP([3, 4, 2], backend=backend, batch_norm=True, dtype="float64", **model_kw)
    before = m.params.copy(), m.running.copy()
    with pytest.raises(ValueError, match=match):
        mg.fit(m, X, y, **fit_kw, epochs=3, callbacks=[NoStep()])
    assert np.array_equal(m.params, before[0]) and np.array_equal(m.running, before[1])


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_fit_with_drop_last_or_replacement_avoids_the_partial_batch(backend):
    X, y = data(37, 3, "cross_entropy", 2)
    m = mg.MLP([3, 4, 2], backend=backend, batch_norm=True, dtype="float64")
    h = mg.fit(m, X, y, batch_size=6, epochs=2, drop_last=True)
    assert set(h.column("batch_size")) == {6}
    h = mg.fit(m, X, y, batch_size=6, epochs=2, sampler="replacement")
    assert set(h.column("batch_size")) == {6}
    # the message for the partial batch names it and suggests drop_last
    with pytest.raises(ValueError, match=r"37 % 6 = 1 rows; drop_last=True drops it"):
        mg.fit(m, X, y, batch_size=6, epochs=2)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_training_mode_passes_refuse_a_ghost_of_one_row(backend):
    m = mg.MLP([3, 4, 2], backend=backend, batch_norm=True, ghost_batch_size=4, dtype="float64")
    X, y = data(9, 3, "cross_entropy", 2)
    with pytest.raises(ValueError, match=r"^ghost_batch_size"):
        m.loss_and_grad(X, y)
    with pytest.raises(ValueError, match=r"^ghost_batch_size"):
        m.forward(X, training=True)
    with pytest.raises(ValueError, match=r"batch of 1"):
        m.loss_and_grad(X[:1], y[:1])
    with pytest.raises(ValueError, match=r"batch of 1"):
        m.forward(X[:1], training=True)
    # evaluation mode has no such restriction
    assert m.forward(X[:1]).shape == (1, 2) and np.isfinite(m.loss(X, y))


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_track_noise_with_batch_norm_is_refused(backend):
    X, y = data(20, 3, "cross_entropy", 2)
    m = mg.MLP([3, 4, 2], backend=backend, batch_norm="after", dtype="float64")
    before = m.params.copy()
    with pytest.raises(ValueError, match=r"^track_noise: .*per-example gradients.*batch_norm"):
        mg.fit(m, X, y, batch_size=4, epochs=1, track_noise=2, callbacks=[NoStep()])
    assert np.array_equal(m.params, before)
    # dropout alone is fine
    md = mg.MLP([3, 4, 2], backend=backend, dropout=0.2, dtype="float64")
    h = mg.fit(md, X, y, batch_size=4, epochs=2, track_noise=2)
    assert len(h.noise) > 0


PER_EXAMPLE_CALLS = {
    "per_example_grads": lambda m, X, y: mg.per_example_grads(m, X, y),
    "per_example_grad_norms": lambda m, X, y: mg.per_example_grad_norms(m, X, y),
    "grad_moments": lambda m, X, y: mg.grad_moments(m, X, y),
    "variance_vs_batch_size": lambda m, X, y: mg.variance_vs_batch_size(m, X, y, [2, 4], n_samples=3),
}


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("what", list(PER_EXAMPLE_CALLS))
def test_per_example_statistics_refuse_batch_norm(backend, what):
    X, y = data(12, 3, "cross_entropy", 2)
    m = mg.MLP([3, 4, 2], backend=backend, batch_norm=True, dropout=0.1, dtype="float64")
    with pytest.raises(ValueError, match=rf"^{what}: per-example gradients are not defined .*batch_norm"):
        PER_EXAMPLE_CALLS[what](m, X, y)
    # with dropout alone they run and give finite numbers
    md = mg.MLP([3, 4, 2], backend=backend, dropout=0.3, dtype="float64")
    res = PER_EXAMPLE_CALLS[what](md, X, y)
    if isinstance(res, np.ndarray):
        assert np.all(np.isfinite(res)) and res.shape[0] == 12


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_backend_per_example_paths_refuse_batch_norm(backend):
    m = mg.MLP([3, 4, 2], backend=backend, batch_norm=True, dtype="float64")
    X, y = data(6, 3, "cross_entropy", 2)
    X, yi, yf = m.check_Xy(X, y)
    idx = np.arange(6, dtype=np.int64)
    impl = m.backend_impl
    impl.reserve(6)
    with pytest.raises(ValueError, match=r"per-example gradient norms: per-example gradients are not defined"):
        impl.loss_grad(m.params, np.zeros(m.n_params), X, yi, yf, idx, 6, want_sqn=True)
    with pytest.raises(ValueError, match=r"per-example gradients are not defined"):
        impl.per_example_grads(m.params, X, yi, yf, idx, 6, np.zeros((6, m.n_params)))
    with pytest.raises(ValueError, match=r"per-example gradients are not defined"):
        impl.per_example_terms(m.params, X, yi, yf, idx, 6)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("sizes", [[3, 5, 2], [4, 6, 5, 3]])
def test_per_example_gradients_with_dropout_use_each_rows_mask(backend, sizes):
    """Masks drawn once: the per-example gradients average to the batch gradient, their
    squared norms are those of loss_grad(want_sqn=True), and row r's gradient is the
    gradient of the one-row batch [r] under row r's mask."""
    m = build(sizes, backend, activation="tanh", loss="mse", dropout=0.4, seed=3)
    X, y = data(9, sizes[0], "mse", sizes[-1], seed=4)
    X, yi, yf = m.check_Xy(X, y)
    B, P, impl = 9, m.n_params, m.backend_impl
    idx = np.arange(B, dtype=np.int64)
    impl.reserve(B)
    impl.draw_dropout(np.random.default_rng(8), B)
    masks = [mk[:B].copy() for mk in impl.masks]
    G = np.zeros((B, P))
    impl.per_example_grads(m.params, X, yi, yf, idx, B, G)
    g = np.zeros(P)
    impl.loss_grad(m.params, g, X, yi, yf, idx, B)
    assert_close(G.mean(axis=0), g, 1e-12, "mean of per-example gradients")
    _, sqn = impl.loss_grad(m.params, np.zeros(P), X, yi, yf, idx, B, want_sqn=True)
    assert_close(sqn, (G**2).sum(axis=1), 1e-10, "squared norms")
    for r in (0, 4, 8):
        for l, mk in enumerate(masks):
            impl.masks[l][0] = mk[r]
        gr = np.zeros(P)
        impl.loss_grad(m.params, gr, X, yi, yf, np.array([r], np.int64), 1)
        assert_close(G[r], gr, 1e-12, f"row {r}")
    # the public function with the model's generator: same masks as loss_and_grad's
    state = m.rng.bit_generator.state
    Gp = mg.per_example_grads(m, X, y)
    m.rng.bit_generator.state = state
    assert_close(Gp.mean(axis=0), m.loss_and_grad(X, y)[1], 1e-12, "public per_example_grads")


# ============================================================================ persistence
def _trained(backend="cpu", **kw):
    X, y = data(40, 4, "cross_entropy", 3, seed=12)
    m = mg.MLP([4, 6, 5, 3], backend=backend, activation="tanh", dtype="float64", seed=0, **kw)
    mg.fit(m, X, y, batch_size=8, epochs=2, optimizer=mg.Adam(lr=0.01))
    return m, X, y


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_checkpoint_pickle_and_to_keep_running_statistics(backend, tmp_path):
    m, X, _ = _trained(backend, batch_norm="after", ghost_batch_size=4, dropout=0.2)
    assert not np.allclose(m.running_var[0], 1) and not np.allclose(m.running_mean[1], 0)
    out = m.forward(X)
    path = save_checkpoint(tmp_path / "m.npz", m)
    for other in (
        load_checkpoint(path).model,
        load_checkpoint(path, backend="numpy").model,
        pickle.loads(pickle.dumps(m)),
        m.to("numpy"),
        m.to("cpu"),
        m.copy(),
    ):
        assert other.config()["batch_norm"] == "after"
        assert other.norm == m.norm
        assert np.array_equal(other.params, m.params)
        assert np.array_equal(other.running, m.running)
        # the views still view the vectors
        other.running_mean[0][0] += 1
        assert other.running[0] == m.running[0] + 1
        other.running_mean[0][0] -= 1
        assert_close(other.forward(X), out, 1e-12)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("every", [1, 3])
def test_resume_with_bn_and_dropout_is_bitwise_the_uninterrupted_run(backend, tmp_path, every):
    X, y = data(40, 4, "cross_entropy", 3, seed=13)
    Xv, yv = data(9, 4, "cross_entropy", 3, seed=14)

    class Crash(Exception):
        pass

    class CrashAt:
        def on_step(self, model, step, loss):
            if step == 11:
                raise Crash

    def run(**kw):
        m = mg.MLP(
            [4, 6, 3],
            backend=backend,
            activation="tanh",
            dtype="float64",
            seed=0,
            batch_norm=True,
            ghost_batch_size=4,
            dropout=0.3,
        )
        # 40 = 6 * 6 + 4: batches of 6 (ghosts 4 + 2) and a last one of 4
        h = mg.fit(
            m, X, y, batch_size=6, epochs=4, optimizer=mg.Adam(lr=0.01), seed=3, validation=(Xv, yv), eval_every=4, **kw
        )
        return m, h

    ref, href = run()
    path = tmp_path / "ck.npz"
    with pytest.raises(Crash):
        run(checkpoint=path, checkpoint_every=every, callbacks=[CrashAt()])
    ck = load_checkpoint(path)
    assert ck.model.running.shape == ref.running.shape
    m, h = run(checkpoint=path, resume=True)
    assert np.array_equal(m.params, ref.params)
    assert np.array_equal(m.running, ref.running), "running statistics after resume"
    assert np.array_equal(h.column("loss"), href.column("loss"))
    strip = lambda recs: [{k: v for k, v in r.items() if k != "time"} for r in recs]  # noqa: E731
    assert strip(h.evals) == strip(href.evals)


def test_resume_refuses_another_norm_configuration(tmp_path):
    X, y = data(40, 4, "cross_entropy", 3, seed=13)
    path = tmp_path / "ck.npz"
    m = mg.MLP([4, 6, 3], batch_norm=True, dropout=0.3, seed=0, dtype="float64")
    mg.fit(m, X, y, batch_size=8, epochs=1, checkpoint=path)
    for kw, key in (
        (dict(batch_norm="after", dropout=0.3), "batch_norm"),
        (dict(batch_norm=True, dropout=0.2), "dropout"),
        (dict(batch_norm=True, ghost_batch_size=4, dropout=0.3), "ghost_batch_size"),
        (dict(dropout=0.3), "batch_norm"),
    ):
        other = mg.MLP([4, 6, 3], seed=0, dtype="float64", **kw)
        with pytest.raises(ValueError, match=rf"^resume: .*{key}="):
            mg.fit(other, X, y, batch_size=8, epochs=2, resume=path)
