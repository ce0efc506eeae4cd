"""Batch norm (before / after, ghost batches) and dropout on the gpu backend, against the
NumPy reference -- on the CPU emulator everywhere, and on CUDA where there is a GPU (the
device and regime paths of tests/test_gpu_backend.py: ``emu:`` / ``cuda:`` x ``gpu-graph``
(the CUDA-graph-captured step), ``gpu-tiled`` (the same kernels one by one), ``gpu-cublas``).

What is checked:

* forward in evaluation mode (running statistics, no dropout) and in training mode (ghost
  statistics, the masks of the same generator state), the evaluation loss, loss_and_grad,
  and loss_grad with masks drawn explicitly by ``draw_dropout`` -- every case of
  tests/test_norm.py's parity table (placements, ghost sizes with an uneven last ghost
  batch, dropout with and without batch norm), both dtypes, every regime;
* the masks: ``draw_dropout`` gives bitwise numpy's masks on the host, and the device masks
  that ``mgd_dropout_forward`` makes from the uploaded uniforms are bitwise the same;
* short fits (SGD with momentum, a partial last batch, evaluations in between): losses,
  parameters and running statistics (``update_running`` once per step) as numpy's; the
  graph regime captures one graph per batch size and replays it;
* ``update_running`` uses the last *training* pass even after an evaluation;
* per-example statistics refused with batch norm (every public function and every backend
  entry point, with the same messages as the other backends) and exact with dropout alone
  (each row with its own mask row);
* the device loop: run_steps(dropout_rng=, update_running=True) and fit's chunked runs
  are bit for bit the per-step loop (draw_dropout + train_step + update_running); the
  dropout table is sized by the run, not the workspace;
* errors: a ghost batch of one row, run_steps of several steps without dropout_rng /
  update_running;
* the running statistics are the model's array (pickling, ``to()``).

Tolerances: tests/test_norm.py's (float64 1e-10; float32 1e-4 per evaluation, 2e-3 for a fit).
Kept small (widths <= 8, batches <= 18, <= 6 steps): the emulator runs every CUDA thread as
a fiber.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from strategies import assert_close
from test_gpu_backend import GPU_PATHS, on_gpu
from test_norm import EVAL_TOL, NORM_CASES, PER_EXAMPLE_CALLS, TRAIN_TOL, build, data

import minigd as mg
from minigd import nn
from minigd.testing import gpu_emu

DTYPES = ("float64", "float32")
SIZES = [5, 8, 6, 3]
ACTS = ["relu", "tanh"]
EMU_GRAPH = "emu:gpu-graph"


def pair(case_kw, path, dtype="float64", seed=1, sizes=SIZES, activation=ACTS, loss="cross_entropy"):
    """(numpy reference, gpu copy on ``path``) with non-trivial parameters and running
    statistics; both dropout generators in the same state."""
    ref = build(sizes, "numpy", dtype=dtype, activation=activation, loss=loss, seed=seed, **case_kw)
    if ref.norm.bn:
        rng = np.random.default_rng(3)
        ref.running[...] = np.abs(rng.normal(size=ref.running.size)) + 0.5
    return ref, on_gpu(ref, path)


def same_rng(dst, src):
    if src.rng is not None:
        dst.rng.bit_generator.state = src.rng.bit_generator.state


def explicit_loss_grad(m, X, y, mask_seed):
    """loss_grad of the backend with masks drawn by draw_dropout from a fresh generator."""
    X, yi, yf = m.check_Xy(X, y)
    B = X.shape[0]
    impl = m.backend_impl
    impl.reserve(B)
    impl.draw_dropout(np.random.default_rng(mask_seed), B)
    g = np.zeros(m.n_params, m.dtype)
    loss, _ = impl.loss_grad(m.params, g, X, yi, yf, np.arange(B, dtype=np.int64), B)
    return loss, g


@pytest.fixture(params=GPU_PATHS)
def path(request):
    return request.param


# ============================================================================ forward / gradient
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(NORM_CASES))
def test_forward_loss_and_gradient(case, dtype, path):
    """B = 14: ghosts of 4 leave a last ghost of 2 rows, ghosts of 5 one of 4."""
    ref, gpu = pair(NORM_CASES[case], path, dtype)
    X, y = data(14, 5, "cross_entropy", 3, seed=2, dtype=dtype)
    tol = EVAL_TOL[dtype]
    running = ref.running.copy()
    out = gpu.forward(X)
    assert out.dtype == np.dtype(dtype) and out.shape == (14, 3)
    assert_close(out, ref.forward(X), tol, "eval forward")
    assert_close(gpu.forward(X[3:4]), ref.forward(X[3:4]), tol, "eval forward, one row")
    assert gpu.loss(X, y) == pytest.approx(ref.loss(X, y), rel=tol, abs=tol)
    same_rng(gpu, ref)
    assert_close(gpu.forward(X, training=True), ref.forward(X, training=True), tol, "train forward")
    same_rng(gpu, ref)
    lg, gg = gpu.loss_and_grad(X, y)
    lr, gr = ref.loss_and_grad(X, y)
    assert gg.dtype == np.dtype(dtype)
    assert lg == pytest.approx(lr, rel=tol, abs=tol)
    assert_close(gg, gr, tol, "gradient")
    if ref.norm.bn:
        gam, bet = ref.layout.bn_views(gg)
        assert all(np.abs(v).max() > 0 for v in gam + bet), "BN parameters get a gradient"
    # explicit masks through the backend API, reused by a second call (bitwise the same)
    (l1, g1), (l2, g2) = (explicit_loss_grad(gpu, X, y, 5) for _ in range(2))
    assert l1 == l2 and np.array_equal(g1, g2)
    l_r, g_r = explicit_loss_grad(ref, X, y, 5)
    assert l1 == pytest.approx(l_r, rel=tol, abs=tol)
    assert_close(g1, g_r, tol, "gradient, explicit masks")
    # training passes leave the running statistics alone
    assert np.array_equal(gpu.running, running) and gpu.backend_impl.running is gpu.running


@pytest.mark.parametrize("bn", ["before", "after"])
def test_ghost_of_the_whole_batch_is_ordinary_batch_norm(bn):
    X, y = data(12, 5, "cross_entropy", 3, seed=5)
    _, whole = pair(dict(batch_norm=bn), EMU_GRAPH)
    out, (loss, g) = whole.forward(X, training=True), whole.loss_and_grad(X, y)
    for ghost in (12, 13):
        _, m = pair(dict(batch_norm=bn, ghost_batch_size=ghost), EMU_GRAPH)
        assert np.array_equal(m.forward(X, training=True), out)
        lg = m.loss_and_grad(X, y)
        assert lg[0] == loss and np.array_equal(lg[1], g)
    _, m = pair(dict(batch_norm=bn, ghost_batch_size=5), EMU_GRAPH)
    assert not np.allclose(m.forward(X, training=True), out)


# ============================================================================ masks
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bn", [False, "after"])
def test_masks_are_numpys_on_the_host_and_on_the_device(bn, dtype):
    ref, gpu = pair(dict(batch_norm=bn, dropout=0.35), EMU_GRAPH, dtype)
    B = 13
    for m in (ref, gpu):
        m.backend_impl.reserve(B)
        m.backend_impl.draw_dropout(np.random.default_rng(77), B)
    impl = gpu.backend_impl
    for a, b in zip(ref.backend_impl.masks, impl.masks):
        assert b.dtype == np.dtype(dtype) and np.array_equal(a[:B], b[:B])
    X, y = data(B, 5, "cross_entropy", 3, seed=1, dtype=dtype)
    Xc, yi, yf = gpu.check_Xy(X, y)
    impl.loss_grad(gpu.params, np.zeros(gpu.n_params, gpu.dtype), Xc, yi, yf, np.arange(B, dtype=np.int64), B)
    for l, host in enumerate(impl.masks):  # made on the device from the uploaded uniforms
        dev = impl._norm_views(l, B)["mask"].get()
        assert np.array_equal(dev, host[:B]), l
        assert (dev == 0).any() and (dev != 0).any()


def test_dropout_is_off_in_evaluation_mode():
    ref, gpu = pair(dict(dropout=0.5), EMU_GRAPH)
    plain = on_gpu(mg.MLP(SIZES, backend="numpy", activation=ACTS, dtype="float64", seed=0), EMU_GRAPH)
    plain.params[...] = gpu.params
    X, y = data(10, 5, "cross_entropy", 3, seed=3)
    out = gpu.forward(X)
    assert np.array_equal(out, plain.forward(X)) and np.array_equal(gpu.forward(X), out)
    assert gpu.loss(X, y) == plain.loss(X, y)
    assert not np.allclose(gpu.forward(X, training=True), out)


# ============================================================================ training
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(NORM_CASES))
@pytest.mark.parametrize("regime", ["gpu-graph", "gpu-tiled", "gpu-cublas"])
def test_short_fit(case, dtype, regime):
    """18 rows in batches of 7 (the last of 4; ghosts 4: 4 + 3 and 4, ghosts 5: 5 + 2 and
    4), 6 SGD steps with momentum, evaluations every 2 steps."""
    kw = NORM_CASES[case]
    ref = mg.MLP(SIZES, backend="numpy", dtype=dtype, activation=["tanh", "gelu"], seed=2, **kw)
    gpu = on_gpu(ref, f"emu:{regime}")
    X, y = data(18, 5, "cross_entropy", 3, seed=9, dtype=dtype)
    Xv, yv = data(6, 5, "cross_entropy", 3, seed=10, dtype=dtype)
    fit = dict(
        batch_size=7, steps=6, optimizer=mg.SGD(lr=0.05, momentum=0.9), seed=1, validation=(Xv, yv), eval_every=2
    )
    h_ref, h_gpu = mg.fit(ref, X, y, **fit), mg.fit(gpu, X, y, **fit)
    tol = TRAIN_TOL[dtype]
    assert h_gpu.n_steps == h_ref.n_steps == 6
    assert_close(h_gpu.column("loss"), h_ref.column("loss"), tol, "per-step loss")
    assert_close([e["val_loss"] for e in h_gpu.evals], [e["val_loss"] for e in h_ref.evals], tol, "val_loss")
    assert_close(gpu.params, ref.params, tol, "params")
    assert_close(gpu.running, ref.running, tol, "running statistics")
    if ref.norm.bn:
        assert not np.array_equal(gpu.running_var[0], np.ones_like(gpu.running_var[0]))
    if regime == "gpu-graph":  # one captured step per batch size (7 and 4), replayed
        assert len(gpu.backend_impl._graphs) == 2


@pytest.mark.parametrize("regime", ["gpu-graph", "gpu-cublas"])
def test_fit_running_statistics_closed_form_for_a_constant_batch(regime):
    """As tests/test_norm.py: full batch, lr = 0, k steps: running_mean = (1 - 0.9^k) mu,
    running_var = 0.9^k + (1 - 0.9^k) var_unbiased of the BN input (ghosts of 5 in 18)."""
    ref = build(
        [3, 5, 2], "numpy", activation="gelu", loss="mse", batch_norm="after", ghost_batch_size=5, dropout=0.3, seed=1
    )
    gpu = on_gpu(ref, f"emu:{regime}")
    X, y = data(18, 3, "mse", 2, seed=7)
    x = np.asarray(nn.activation(nn.ACTIVATIONS["gelu"], X @ ref.weights[0] + ref.biases[0]))
    k = 5
    mg.fit(gpu, X, y, batch_size="full", steps=k, optimizer=mg.SGD(lr=0.0))
    f = 1 - 0.9**k
    assert_close(gpu.running_mean[0], f * x.mean(axis=0), 1e-12)
    assert_close(gpu.running_var[0], (1 - f) + f * x.var(axis=0, ddof=1), 1e-12)


@pytest.mark.parametrize("bn", ["before", "after"])
def test_update_running_uses_the_last_training_pass_after_an_evaluation(bn):
    ref, gpu = pair(dict(batch_norm=bn, ghost_batch_size=4, dropout=0.2), EMU_GRAPH)
    X, y = data(10, 5, "cross_entropy", 3, seed=4)
    X2, _ = data(6, 5, "cross_entropy", 3, seed=8)
    for m in (ref, gpu):
        Xc, yi, yf = m.check_Xy(X, y)
        impl = m.backend_impl
        impl.reserve(10)
        impl.draw_dropout(np.random.default_rng(1), 10)
        impl.loss_grad(m.params, np.zeros(m.n_params, m.dtype), Xc, yi, yf, np.arange(10, dtype=np.int64), 10)
        m.forward(X2)  # evaluation in between: another batch through the same buffers
        impl.update_running(10)
    assert_close(gpu.running, ref.running, 1e-12, "running statistics")


@pytest.mark.parametrize("regime", [f"{d}:{r}" for d in ("emu", "cuda") for r in ("gpu-graph", "gpu-cublas")])
@pytest.mark.parametrize(
    "cfg",
    [dict(batch_norm=True, dropout=0.2), dict(batch_norm="after", ghost_batch_size=4), dict(dropout=0.3)],
    ids=["bn-dropout", "bn-after-ghost4", "dropout"],
)
def test_run_steps_with_norm_equals_the_per_step_loop(cfg, regime):
    """run_steps(n, dropout_rng=, update_running=True) -- masks drawn up front in the
    per-step order, running statistics updated on the device -- is bit for bit n times
    draw_dropout + train_step + update_running, as fit ran them before."""
    ref, a = pair(cfg, regime)
    b = on_gpu(ref, regime)
    X, y = data(24, 5, "cross_entropy", 3)
    X, yi, yf = a.check_Xy(X, y)
    opt = mg.SGD(lr=0.1, momentum=0.9)
    sa, sb = opt.init(a.params), opt.init(b.params)
    idx = np.random.default_rng(1).integers(0, 24, size=5 * 6).astype(np.int64)
    lrs = np.linspace(0.1, 0.05, 5)
    impl = a.backend_impl
    if impl.dropout:
        with pytest.raises(ValueError, match=r"^dropout_rng: 2 steps of a model with dropout"):
            impl.run_steps(a.params, X, yi, yf, idx, 6, 2, sa, lrs[:2], 1, update_running=True)
    if impl.norm.bn:
        with pytest.raises(ValueError, match=r"^update_running: 2 steps of a model with batch norm"):
            impl.run_steps(a.params, X, yi, yf, idx, 6, 2, sa, lrs[:2], 1, dropout_rng=np.random.default_rng(0))
    res = impl.run_steps(
        a.params, X, yi, yf, idx, 6, 5, sa, lrs, 1, dropout_rng=np.random.default_rng(7), update_running=True
    )
    rng = np.random.default_rng(7)
    losses = []
    for c in range(5):
        b.backend_impl.draw_dropout(rng, 6)
        loss, ok, _ = b.backend_impl.train_step(
            b.params, b._grad, X, yi, yf, idx[c * 6 : (c + 1) * 6], 6, sb, float(lrs[c]), c + 1
        )
        b.backend_impl.update_running(6)
        losses.append(loss)
    assert res["applied"].all()
    np.testing.assert_array_equal(res["loss"], losses)
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.running, b.running)
    if impl.dropout:  # the host masks are the last step's afterwards, as after the per-step loop
        for ma, mb in zip(impl.masks, b.backend_impl.masks):
            np.testing.assert_array_equal(ma[:6], mb[:6])
        # the step table holds this run's rows, not the workspace's capacity
        assert impl._unif_tab[0].size == 5 * 6 * impl.layout.hidden[0]


@pytest.mark.parametrize("regime", ["gpu-graph", "gpu-cublas"])
def test_a_warm_step_with_norm_allocates_no_device_memory(regime):
    """draw_dropout + train_step + update_running, as fit runs them: after the first step
    (which captures the graph) no device allocation; the graph regime replays one graph per
    step (its capture refuses host copies, so the masks went in before it)."""
    counts = getattr(gpu_emu, "counts", None)
    if counts is None:  # pragma: no cover - an emulator without operation counts
        pytest.skip("this emulator does not count device operations")
    _, gpu = pair(dict(batch_norm="after", ghost_batch_size=4, dropout=0.3), f"emu:{regime}")
    X, y = data(12, 5, "cross_entropy", 3)
    X, yi, yf = gpu.check_Xy(X, y)
    impl = gpu.backend_impl
    st = mg.SGD(lr=0.05, momentum=0.9).init(gpu.params)
    rng, grad = np.random.default_rng(0), np.zeros(gpu.n_params, gpu.dtype)
    impl.reserve(12)

    def step(t):
        impl.draw_dropout(rng, 6)
        _, ok, _ = impl.train_step(
            gpu.params, grad, X, yi, yf, np.arange(6, dtype=np.int64) + 6 * (t % 2), 6, st, 0.05, t
        )
        impl.update_running(6)
        assert ok

    step(1)
    counts.clear()
    for t in range(2, 5):
        step(t)
    c = dict(counts)
    assert c.get("alloc", 0) == 0, c
    if regime == "gpu-graph":
        assert c["graph_launch"] == 3 and c.get("matmul", 0) == 0, c


# ============================================================================ errors
def test_training_mode_refuses_a_ghost_of_one_row():
    _, gpu = pair(dict(batch_norm=True, ghost_batch_size=4), EMU_GRAPH)
    X, y = data(9, 5, "cross_entropy", 3)
    with pytest.raises(ValueError, match=r"^ghost_batch_size"):
        gpu.loss_and_grad(X, y)
    with pytest.raises(ValueError, match=r"batch of 1"):
        gpu.forward(X[:1], training=True)
    Xc, yi, yf = gpu.check_Xy(X, y)
    impl = gpu.backend_impl
    with pytest.raises(ValueError, match=r"^ghost_batch_size"):  # the backend checks too
        impl.loss_grad(gpu.params, np.zeros(gpu.n_params), Xc, yi, yf, np.arange(9, dtype=np.int64), 9)
    opt = mg.SGD(lr=0.1)
    with pytest.raises(ValueError, match=r"^ghost_batch_size"):
        impl.train_step(
            gpu.params,
            np.zeros(gpu.n_params),
            Xc,
            yi,
            yf,
            np.arange(9, dtype=np.int64),
            9,
            opt.init(gpu.params),
            0.1,
            1,
        )
    assert gpu.forward(X[:1]).shape == (1, 3)


@pytest.mark.parametrize("what", list(PER_EXAMPLE_CALLS))
def test_per_example_statistics_refuse_batch_norm(what):
    X, y = data(12, 5, "cross_entropy", 3)
    _, gpu = pair(dict(batch_norm=True, dropout=0.1), EMU_GRAPH)
    with pytest.raises(ValueError, match=rf"^{what}: per-example gradients are not defined .*batch_norm"):
        PER_EXAMPLE_CALLS[what](gpu, X, y)


@pytest.mark.parametrize("bn", ["before", "after"])
def test_backend_per_example_paths_refuse_batch_norm(bn):
    _, gpu = pair(dict(batch_norm=bn), EMU_GRAPH)
    X, y = data(6, 5, "cross_entropy", 3)
    X, yi, yf = gpu.check_Xy(X, y)
    idx = np.arange(6, dtype=np.int64)
    impl, P = gpu.backend_impl, gpu.n_params
    impl.reserve(6)
    msg = r"per-example gradients are not defined"
    with pytest.raises(ValueError, match=rf"^per-example gradient norms: {msg}"):
        impl.loss_grad(gpu.params, np.zeros(P), X, yi, yf, idx, 6, want_sqn=True)
    with pytest.raises(ValueError, match=rf"^per-example gradients: {msg}"):
        impl.per_example_grads(gpu.params, X, yi, yf, idx, 6, np.zeros((6, P)))
    with pytest.raises(ValueError, match=rf"^per-example gradients: {msg}"):
        impl.per_example_terms(gpu.params, X, yi, yf, idx, 6)
    with pytest.raises(ValueError, match=rf"^gradient moments: {msg}"):
        impl.moments_update(gpu.params, np.zeros(P), X, yi, yf, idx, 6, 0, np.zeros(P), np.zeros(P))
    opt = mg.SGD(lr=0.1)
    with pytest.raises(ValueError, match=rf"^per-example gradient norms: {msg}"):
        impl.train_step(gpu.params, np.zeros(P), X, yi, yf, idx, 6, opt.init(gpu.params), 0.1, 1, want_sqn=True)


# ============================================================================ dropout: per-example
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("regime", ["gpu-graph", "gpu-cublas"])
def test_per_example_statistics_with_dropout(regime, dtype):
    """Same generator state: per_example_grads, their norms and the moments as numpy's;
    row r's gradient is the gradient of the one-row batch [r] under row r's mask (its
    uniforms put in row 0)."""
    ref, gpu = pair(
        dict(dropout=0.4), f"emu:{regime}", dtype, seed=3, sizes=[4, 6, 5, 3], activation="tanh", loss="mse"
    )
    X, y = data(9, 4, "mse", 3, seed=4, dtype=dtype)
    tol = EVAL_TOL[dtype]
    for fn in ("per_example_grads", "per_example_grad_norms"):
        same_rng(gpu, ref)
        assert_close(getattr(mg, fn)(gpu, X, y), getattr(mg, fn)(ref, X, y), tol, fn)
    same_rng(gpu, ref)
    mo_g, mo_r = mg.grad_moments(gpu, X, y, chunk_size=4), mg.grad_moments(ref, X, y, chunk_size=4)
    assert_close(mo_g.mean, mo_r.mean, tol, "moments mean")
    assert_close(mo_g.var, mo_r.var, 10 * tol, "moments var")
    Xc, yi, yf = gpu.check_Xy(X, y)
    impl, B, P = gpu.backend_impl, 9, gpu.n_params
    impl.draw_dropout(np.random.default_rng(8), B)
    unif = [u[:B].copy() for u in impl._unif]
    G = np.zeros((B, P), gpu.dtype)
    impl.per_example_grads(gpu.params, Xc, yi, yf, np.arange(B, dtype=np.int64), B, G)
    g = np.zeros(P, gpu.dtype)
    _, sqn = impl.loss_grad(gpu.params, g, Xc, yi, yf, np.arange(B, dtype=np.int64), B, want_sqn=True)
    assert_close(G.astype(np.float64).mean(axis=0), g, tol, "mean of per-example gradients")
    assert_close(sqn, (G.astype(np.float64) ** 2).sum(axis=1), 10 * tol, "squared norms")
    for r in (0, 5):
        for l, u in enumerate(unif):
            impl._unif[l][0] = u[r]
        gr = np.zeros(P, gpu.dtype)
        impl.loss_grad(gpu.params, gr, Xc, yi, yf, np.array([r], np.int64), 1)
        assert_close(G[r], gr, tol, f"row {r}")


def test_noise_tracking_with_dropout_in_the_captured_step():
    """fit(track_noise=...) runs train_step(want_sqn=True) in the graph, masks included."""
    ref, gpu = pair(dict(dropout=0.3), EMU_GRAPH, seed=0)
    X, y = data(18, 5, "cross_entropy", 3, seed=6)
    kw = dict(batch_size=6, epochs=2, seed=3, track_noise=2)
    h_r, h_g = mg.fit(ref, X, y, **kw), mg.fit(gpu, X, y, **kw)
    assert_close(gpu.params, ref.params, 1e-10, "params")
    assert_close(h_g.noise_tracker.trace_cov, h_r.noise_tracker.trace_cov, 1e-8, "tr(Sigma)")


# ============================================================================ persistence
def test_running_statistics_are_the_models_array():
    ref, gpu = pair(dict(batch_norm="after", ghost_batch_size=4, dropout=0.2), EMU_GRAPH)
    X, y = data(16, 5, "cross_entropy", 3, seed=12)
    mg.fit(gpu, X, y, batch_size=8, steps=3, optimizer=mg.SGD(lr=0.05))
    assert gpu.backend_impl.running is gpu.running
    out = gpu.forward(X)
    with gpu_emu.emulated():
        clone = pickle.loads(pickle.dumps(gpu))
    for other in (clone, gpu.to("numpy")):
        assert np.array_equal(other.running, gpu.running) and np.array_equal(other.params, gpu.params)
        assert_close(other.forward(X), out, 1e-12)
    # host writes to the running statistics are seen by the next evaluation
    gpu.running_mean[0][...] += 1.0
    ref.params[...] = gpu.params
    ref.running[...] = gpu.running
    assert_close(gpu.forward(X), ref.forward(X), 1e-12)
    assert not np.allclose(gpu.forward(X), out)


class _EveryStep:
    """A no-op per-step callback: it makes fit step through train_step + draw_dropout +
    update_running one at a time (the host must see every step), the reference path."""

    def on_step(self, model, step, loss):
        return False


@pytest.mark.parametrize("dev", ["emu", "cuda"], ids=["emu:gpu-graph", "cuda:gpu-graph"])
@pytest.mark.parametrize(
    "cfg",
    [dict(batch_norm="before", ghost_batch_size=3, dropout=0.25), dict(batch_norm="after")],
    ids=["bn-ghost3-dropout", "bn-after"],
)
def test_fit_in_device_chunks_with_norm_equals_fit_step_by_step(cfg, dev):
    """fit hands batch-norm / dropout models to the device loop too: the same masks (drawn
    up front in the per-step order), the same running statistics, bit for bit; chunks of a
    dropout model are capped by the mask table's memory budget."""
    ref, _ = pair(cfg, f"{dev}:gpu-graph")
    X, y = data(26, 5, "cross_entropy", 3)
    kw = dict(
        batch_size=8, epochs=3, eval_every=5, validation=(X[:6], y[:6]), seed=4, optimizer=mg.SGD(lr=0.05, momentum=0.9)
    )
    runs = []
    for callbacks, budget in (([_EveryStep()], None), ([], None), ([], 8 * 8 * 14 * 2)):
        m = on_gpu(ref, f"{dev}:gpu-graph")
        calls = []
        real = m.backend_impl.run_steps
        m.backend_impl.run_steps = lambda *a, **k: calls.append(a[6]) or real(*a, **k)
        if budget is not None:
            m.backend_impl.dropout_table_bytes = budget  # room for 2 steps of 8 rows
        h = mg.fit(m, X, y, callbacks=callbacks, **kw)
        runs.append((h, m, calls))
    (h1, m1, c1), (h2, m2, c2), (h3, m3, c3) = runs
    assert set(c1) == {1} and max(c2) >= 3
    if m2.backend_impl.dropout:
        assert max(c3) == 2
    for h, m in ((h2, m2), (h3, m3)):
        np.testing.assert_array_equal(h.column("loss"), h1.column("loss"))
        np.testing.assert_array_equal(m.params, m1.params)
        np.testing.assert_array_equal(m.running, m1.running)
        assert [e["val_loss"] for e in h.evals] == [e["val_loss"] for e in h1.evals]
    # and against the cpu backend, which draws the same masks
    c = ref.to("cpu")
    hc = mg.fit(c, X, y, **kw)
    assert_close(h2.column("loss"), hc.column("loss"), TRAIN_TOL[str(c.dtype)], "losses vs cpu")
    assert_close(m2.running, c.running, TRAIN_TOL[str(c.dtype)], "running statistics vs cpu")
