"""GPU backend parity with the NumPy reference, on two devices:

* ``emu``: the CPU emulator (minigd/testing/gpu_emu.py), which runs the same CUDA kernel
  text and the same host code with every CUDA thread a fiber -- so these tests run on every
  machine with a C++ compiler, CI included;
* ``cuda``: a real GPU through CuPy (skips with the reason ``available_backends()`` gives
  where there is none).

Same case tables and tolerances as tests/test_backend_parity.py, on the three regimes of
the gpu backend, each pinned through its instance attributes:

* ``gpu-graph``: the small-batch path, captured once as a CUDA graph and replayed
  (tiled GEMMs with fused epilogues; ``graph_max_batch`` above every batch);
* ``gpu-tiled``: the same kernels launched one by one (``use_graphs = False``);
* ``gpu-cublas``: cupy.matmul (cuBLAS) + epilogue kernels (``graph_max_batch = 0``).

The ``cuda`` half has not run on hardware yet: no session that worked on this code had a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_backend_parity import _TRAIN_DEFAULTS, EVAL_TOL, MODEL_CASES, TRAIN_CASES, TRAIN_TOL, assert_close

import minigd as mg
from minigd.backends import available_backends
from minigd.testing import gpu_emu

with gpu_emu.emulated(False):
    _CUDA_REASON = available_backends()["gpu"]
_EMU_REASON = gpu_emu.reason()

REGIMES = ("gpu-graph", "gpu-tiled", "gpu-cublas")
GPU_PATHS = tuple(f"{dev}:{r}" for dev in ("emu", "cuda") for r in REGIMES)
DTYPES = ("float64", "float32")


def on_gpu(ref: mg.MLP, path: str) -> mg.MLP:
    """A gpu copy of the reference model on device ``emu`` or ``cuda``, pinned to one regime."""
    dev, path = path.split(":")
    if dev == "cuda" and _CUDA_REASON is not None:
        pytest.skip(f"no usable GPU: {_CUDA_REASON}")
    if dev == "emu" and _EMU_REASON is not None:
        pytest.skip(f"no GPU emulator: {_EMU_REASON}")
    with gpu_emu.emulated(dev == "emu"):
        m = ref.to("gpu")
    impl = m.backend_impl
    if path == "gpu-graph":
        impl.graph_max_batch, impl.use_graphs = 10**9, True
    elif path == "gpu-tiled":
        impl.graph_max_batch, impl.use_graphs = 10**9, False
    elif path == "gpu-cublas":
        impl.graph_max_batch = 0
    else:  # pragma: no cover
        raise ValueError(path)
    return m


@pytest.fixture(params=GPU_PATHS)
def path(request):
    return request.param


@pytest.fixture(params=DTYPES)
def dtype(request):
    return request.param


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c.id for c in MODEL_CASES])
def test_forward_loss_grad(case, path, dtype):
    ref, X, y = case.build("numpy", dtype)
    gpu = on_gpu(ref, path)
    tol = EVAL_TOL[dtype]
    out = gpu.forward(X)
    assert out.dtype == np.dtype(dtype) and out.shape == (case.n, case.sizes[-1])
    assert_close(out, ref.forward(X), tol, "forward")
    assert_close(gpu.loss(X, y), ref.loss(X, y), tol, "loss")
    loss, g = gpu.loss_and_grad(X, y)
    loss_r, g_r = ref.loss_and_grad(X, y)
    assert g.dtype == np.dtype(dtype)
    assert_close(loss, loss_r, tol, "loss_and_grad loss")
    assert_close(g, g_r, tol, "grad")
    loss2, g2 = gpu.loss_and_grad(X, y)
    assert loss2 == loss and np.array_equal(g2, g), "not deterministic / stale buffers"


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c.id for c in MODEL_CASES])
def test_per_example_statistics(case, path, dtype):
    if case.n < 2:
        pytest.skip("moments need two examples")
    ref, X, y = case.build("numpy", dtype)
    gpu = on_gpu(ref, path)
    tol = EVAL_TOL[dtype]
    G, G_r = mg.per_example_grads(gpu, X, y), mg.per_example_grads(ref, X, y)
    assert_close(G, G_r, tol, "per-example grads")
    assert_close(mg.per_example_grad_norms(gpu, X, y), mg.per_example_grad_norms(ref, X, y), tol, "norms")
    m, m_r = mg.grad_moments(gpu, X, y, chunk_size=4), mg.grad_moments(ref, X, y)
    assert m.n == m_r.n
    assert_close(m.mean, m_r.mean, tol, "moments mean")
    assert_close(m.var, m_r.var, 10 * tol, "moments var")


@pytest.mark.parametrize("dev", ["emu", "cuda"])
def test_float32_moments_at_high_snr_within_1e6(dev):
    """Per-example SNR ~1e8, on a linear MSE model whose every float32 operation is exact
    (dyadic inputs and weights, 4 outputs, 512 rows), so that any forward/backward order
    gives the same factors and the exact variance is known.  The kernel centres on the
    float32 batch gradient, whose rounding error e adds B e^2 to each M2 unless the
    deviations' own sum corrects it (the corrected two-pass form; without it 2e-5 off)."""
    rng = np.random.default_rng(0)
    B = 512
    X = (1 + rng.integers(-8, 9, (B, 6)) * 2.0**-16).astype(np.float32)
    y = np.zeros((B, 4), np.float32)
    ref = mg.MLP([6, 4], loss="mse", dtype="float32", seed=0)
    ref.params[:] = np.concatenate([rng.integers(-8, 9, 24) * 2.0**-3, np.zeros(4)]).astype(np.float32)
    gpu = on_gpu(ref, f"{dev}:gpu-tiled")
    got = mg.grad_moments(gpu, X, y, chunk_size=B)
    exact = mg.MLP([6, 4], loss="mse", dtype="float64", backend="numpy", seed=0)
    exact.params[:] = ref.params
    G = mg.per_example_grads(exact, X.astype(np.float64), y.astype(np.float64)).astype(np.longdouble)
    var = ((G - G.mean(0)) ** 2).sum(0) / (B - 1)
    nz = var > 0
    assert (G.mean(0)[nz] ** 2 / var[nz]).max() > 1e6  # the regime the correction is for
    assert float((np.abs(got.var - var)[nz] / var[nz]).max()) <= 1e-6
    assert (got.var[~nz] == 0).all()


@pytest.mark.parametrize("tc", TRAIN_CASES, ids=[t.id for t in TRAIN_CASES])
def test_training_run(tc, path, dtype):
    kw = {**_TRAIN_DEFAULTS, **tc.fit}
    ref, X, y = tc.model.build("numpy", dtype)
    gpu = on_gpu(ref, path)
    Xv, yv = X[:7], y[:7]
    h_ref = mg.fit(ref, X, y, validation=(Xv, yv), **kw)
    h_gpu = mg.fit(gpu, X, y, validation=(Xv, yv), **kw)
    tol = TRAIN_TOL[dtype]
    assert h_gpu.n_steps == h_ref.n_steps > 0
    assert_close(h_gpu.column("loss"), h_ref.column("loss"), tol, "per-step loss")
    assert_close(gpu.params, ref.params, tol, "final params")


def test_noise_tracking_in_fit(path):
    ref, X, y = MODEL_CASES[3].build("numpy", "float64")
    X = np.tile(X, (4, 1))
    y = np.tile(y, 4)
    gpu = on_gpu(ref, path)
    kw = dict(batch_size=6, epochs=2, seed=3, track_noise=2)
    h_r, h_g = mg.fit(ref, X, y, **kw), mg.fit(gpu, X, y, **kw)
    assert_close(gpu.params, ref.params, 1e-10, "params")
    assert_close(h_g.noise_tracker.trace_cov, h_r.noise_tracker.trace_cov, 1e-8, "tr(Sigma)")


@pytest.mark.parametrize("backend_path", GPU_PATHS)
def test_nan_gradient_is_never_applied(backend_path):
    for opt in (mg.SGD(lr=0.1), mg.SGD(lr=0.1, momentum=0.9), mg.Adam(lr=0.1), mg.AdamW(lr=0.1)):
        m = on_gpu(mg.MLP([3, 2], dtype="float32", backend="numpy"), backend_path)
        p0 = m.params.copy()
        st = opt.init(m.params)
        g = np.array([np.nan, 1, 1, 0, 0, 0, 0, 0], np.float32)
        applied, _ = m.backend_impl.opt_apply(m.params, g, st, 0.1, 1)
        assert not applied
        assert np.array_equal(m.params, p0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the numpy reference overflows loudly
@pytest.mark.parametrize("batch_size", [4, "full"])
def test_divergence_stops_fit_at_the_same_step_with_the_last_finite_params(path, dtype, batch_size):
    """As tests/test_validation.py's divergence test: an MSE regression that overflows."""
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(20, 3)).astype(dtype), rng.normal(size=20).astype(dtype)
    ref = mg.MLP([3, 4, 1], activation="tanh", loss="mse", dtype=dtype, seed=0, backend="numpy")
    gpu = on_gpu(ref, path)
    kw = dict(batch_size=batch_size, epochs=10_000, optimizer=mg.SGD(lr=50.0, momentum=0.9), seed=1)
    errs = []
    for m in (ref, gpu):
        with pytest.raises(mg.DivergenceError) as ei:
            mg.fit(m, X, y, **kw)
        errs.append(ei.value)
    assert errs[0].step == errs[1].step > 0
    assert np.isfinite(errs[1].params).all() and np.array_equal(gpu.params, errs[1].params)
    assert_close(errs[1].params, errs[0].params, 1e-3, "last finite params")


@pytest.mark.parametrize("dev", ["emu", "cuda"])
def test_run_steps_equals_repeated_train_steps(dtype, dev):
    ref, X, y = TRAIN_CASES[1].model.build("numpy", dtype)  # momentum
    a, b = on_gpu(ref, f"{dev}:gpu-graph"), on_gpu(ref, f"{dev}:gpu-graph")
    opt = mg.SGD(lr=0.05, momentum=0.9)
    X, yi, yf = a.check_Xy(X, y)
    rng = np.random.default_rng(0)
    B, n = 4, 12
    idx = rng.integers(0, X.shape[0], size=B * n).astype(np.int64)
    lrs = np.linspace(0.05, 0.01, n)
    sa, sb = opt.init(a.params), opt.init(b.params)
    res = a.backend_impl.run_steps(a.params, X, yi, yf, idx, B, n, sa, lrs, 1, read_every=5)
    losses = [
        b.backend_impl.train_step(b.params, b._grad, X, yi, yf, idx[s * B : (s + 1) * B], B, sb, float(lrs[s]), s + 1)[
            0
        ]
        for s in range(n)
    ]
    assert res["applied"].all() and len(res["loss"]) == n
    np.testing.assert_array_equal(res["loss"], losses)
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(sa.state, sb.state)


@pytest.mark.parametrize("dev", ["emu", "cuda"])
def test_run_steps_keeps_the_base_contract(dev):
    """What Backend.run_steps promises, on the device: ``steps_per_call`` (the gpu's
    ``read_every``), B rows of ``idx`` as the rows of every step (full batch), a ``time``
    per step (the call's time, spread evenly: the device does not time steps one by one),
    and ``max_time`` honoured at the first read-back after it."""
    ref, X, y = TRAIN_CASES[1].model.build("numpy", "float64")  # momentum
    a, b = on_gpu(ref, f"{dev}:gpu-graph"), on_gpu(ref, f"{dev}:gpu-graph")
    impl = a.backend_impl
    assert impl.steps_per_call == impl.read_every == 64
    impl.steps_per_call = 8
    assert impl.read_every == 8 and impl.steps_per_call == 8
    opt = mg.SGD(lr=0.05, momentum=0.9)
    X, yi, yf = a.check_Xy(X, y)
    B, n = X.shape[0], 5
    rows = np.arange(B, dtype=np.int64)[::-1].copy()
    sa, sb = opt.init(a.params), opt.init(b.params)
    res = impl.run_steps(a.params, X, yi, yf, rows, B, n, sa, np.full(n, 0.05), 1)
    tiled = b.backend_impl.run_steps(b.params, X, yi, yf, np.tile(rows, n), B, n, sb, np.full(n, 0.05), 1)
    assert res["applied"].all() and len(res["loss"]) == n
    np.testing.assert_array_equal(res["loss"], tiled["loss"])
    np.testing.assert_array_equal(a.params, b.params)
    t = res["time"]
    assert t.dtype == np.float64 and t.shape == (n,) and t[0] > 0 and np.all(np.diff(t) > 0)
    np.testing.assert_allclose(t, t[-1] * np.arange(1, n + 1) / n, rtol=1e-12)
    cut = impl.run_steps(a.params, X, yi, yf, rows, B, n, sa, np.full(n, 0.05), 1, read_every=2, max_time=0.0)
    assert len(cut["loss"]) == len(cut["time"]) == 2 and cut["applied"].all()


@pytest.mark.parametrize("dev", ["emu", "cuda"])
def test_host_param_writes_between_steps_are_seen(dev):
    """model.params stays the source of truth: writing it between fits is not lost."""
    ref, X, y = TRAIN_CASES[0].model.build("numpy", "float64")
    gpu = on_gpu(ref, f"{dev}:gpu-graph")
    mg.fit(gpu, X, y, batch_size=5, steps=3)
    gpu.params[...] = ref.params
    mg.fit(ref, X, y, batch_size=5, steps=3)
    mg.fit(gpu, X, y, batch_size=5, steps=3)
    assert_close(gpu.params, ref.params, 1e-10, "params")


# ============================================================================ fit's device-resident loop
_CHUNK_FITS = [
    dict(batch_size=4, epochs=3),  # 5 full steps an epoch
    dict(batch_size=6, epochs=2, eval_every=3),  # a partial last batch
    dict(batch_size=3, steps=11, optimizer=mg.SGD(lr=mg.optim.cosine(0.2, 11), momentum=0.9)),
    dict(batch_size=5, examples=37, sampler="replacement", optimizer=mg.Adam(lr=0.01)),
    dict(batch_size=mg.BatchSizeSchedule(2, {1: 7}), epochs=2, sampler="sequential"),
    dict(batch_size="full", epochs=9, optimizer=mg.SGD(lr=0.5, clip_norm=0.1)),
    dict(batch_size="full", epochs=11, eval_every=4, optimizer=mg.SGD(lr=0.5, momentum=0.9)),
    dict(batch_size="full", steps=10, eval_every=3, checkpoint_every=4, progress=True),
    dict(batch_size=mg.BatchSizeSchedule(13, {2: 26}), epochs=12, eval_every=5, drop_last=True),
]


@pytest.mark.parametrize("kw", _CHUNK_FITS, ids=range(len(_CHUNK_FITS)))
def test_fit_in_device_chunks_equals_fit_step_by_step(kw, tmp_path):
    """``fit`` hands runs of full batches to run_steps (read back once per chunk): the
    history, evaluations and parameters are bit for bit those of one train_step per step."""
    ref, X, y = TRAIN_CASES[0].model.build("numpy", "float64")
    X, y = np.concatenate([X, X[:3]]), np.concatenate([y, y[:3]])
    runs = []
    for read_every in (1, 4, 64):
        m = on_gpu(ref, "emu:gpu-graph")
        m.backend_impl.read_every = read_every
        calls = []
        real = m.backend_impl.run_steps
        m.backend_impl.run_steps = lambda *a, **k: calls.append(a[6]) or real(*a, **k)
        fkw = dict(kw)
        if "checkpoint_every" in fkw:
            fkw["checkpoint"] = tmp_path / f"ck{read_every}.npz"
        h = mg.fit(m, X, y, validation=(X[:5], y[:5]), seed=2, **fkw)
        runs.append((h, m.params.copy(), calls))
    (h1, p1, c1), (h4, p4, c4), (h64, p64, c64) = runs
    assert all(n == 1 for n in c1)  # read_every=1: one step per call
    if kw["batch_size"] == "full" and "eval_every" not in kw:  # evaluates at every epoch end
        assert set(c4) == set(c64) == {1}
    else:  # (train_step is run_steps of 1 step)
        assert 2 <= max(c4) <= 4 and max(c64) >= max(c4)
    for h, p in ((h4, p4), (h64, p64)):
        assert h.n_steps == h1.n_steps and h.stop_reason == h1.stop_reason
        for col in ("step", "epoch", "loss", "lr", "batch_size", "examples"):
            np.testing.assert_array_equal(h.column(col), h1.column(col), err_msg=col)
        for a, b in ((h.evals, h1.evals), (h.epochs, h1.epochs)):
            assert [{k: v for k, v in e.items() if k != "time"} for e in a] == [
                {k: v for k, v in e.items() if k != "time"} for e in b
            ]
        assert np.array_equal(p, p1)
        assert np.all(np.diff(h.column("time")) >= 0)


def test_fit_chunks_stop_at_evaluations_checkpoints_and_budgets(tmp_path):
    ref, X, y = TRAIN_CASES[0].model.build("numpy", "float64")
    m = on_gpu(ref, "emu:gpu-graph")
    calls = []
    real = m.backend_impl.run_steps
    m.backend_impl.run_steps = lambda *a, **k: calls.append((a[6], a[9])) or real(*a, **k)
    # eval every 3, checkpoint every 5, 20 steps (and epochs end with a partial batch)
    mg.fit(m, X, y, batch_size=2, steps=20, eval_every=3, checkpoint=tmp_path / "ck.npz", checkpoint_every=5)
    starts = [t - 1 for _, t in calls]  # t = step + 1 of the chunk's first step
    ends = [s + n for (n, _), s in zip(calls, starts)]
    assert max(n for n, _ in calls) >= 2
    for e in (3, 5, 6, 9, 10, 12, 15, 18, 20):  # no chunk runs across an eval/checkpoint/budget
        assert not any(s < e < end for s, end in zip(starts, ends)), e
    # and a resumed run continues identically
    again = on_gpu(ref, "emu:gpu-graph")
    h_full = mg.fit(again, X, y, batch_size=2, steps=20, eval_every=3)
    part = on_gpu(ref, "emu:gpu-graph")
    mg.fit(part, X, y, batch_size=2, steps=10, eval_every=3, checkpoint=tmp_path / "p.npz", checkpoint_every=5)
    h_res = mg.fit(
        part, X, y, batch_size=2, steps=20, eval_every=3, checkpoint=tmp_path / "p.npz", checkpoint_every=5, resume=True
    )
    np.testing.assert_array_equal(h_res.column("loss"), h_full.column("loss"))
    assert np.array_equal(part.params, again.params)


def test_fit_steps_one_at_a_time_when_the_host_must_see_every_step():
    ref, X, y = TRAIN_CASES[0].model.build("numpy", "float64")

    class Spy:
        def __init__(self):
            self.n = 0

        def on_step(self, model, step, loss):
            self.n += 1

    for extra in (dict(callbacks=[Spy()]), dict(track_noise=2)):
        m = on_gpu(ref, "emu:gpu-graph")
        calls = []
        real = m.backend_impl.run_steps
        m.backend_impl.run_steps = lambda *a, **k: calls.append(a[6]) or real(*a, **k)
        h = mg.fit(m, X, y, batch_size=4, epochs=2, **extra)
        assert set(calls) == {1} and len(calls) == h.n_steps


@pytest.mark.parametrize("regime", ["gpu-graph", "gpu-cublas"])
def test_device_loop_allocates_nothing_and_reads_back_every_k_steps(regime):
    """The issue's habits, counted on the emulated device: a warm run_steps allocates no
    device memory, and copies to the host once per ``read_every`` steps plus the final
    parameters / optimizer state -- independent of the number of steps."""
    ref, X, y = TRAIN_CASES[1].model.build("numpy", "float32")  # SGD + momentum
    m = on_gpu(ref, f"emu:{regime}")
    impl = m.backend_impl
    X, yi, yf = m.check_Xy(X, y)
    opt = mg.SGD(lr=0.05, momentum=0.9)
    st = opt.init(m.params)
    B = 4
    idx = np.random.default_rng(0).integers(0, X.shape[0], size=40 * B).astype(np.int64)
    impl.run_steps(m.params, X, yi, yf, idx, B, 40, st, np.full(40, 0.05), 1, read_every=10)  # warm-up
    counted = {}
    for n, k in ((40, 10), (40, 40), (20, 5)):
        gpu_emu.counts.clear()
        res = impl.run_steps(m.params, X, yi, yf, idx, B, n, st, np.full(n, 0.05), 1, read_every=k)
        c = dict(gpu_emu.counts)
        assert res["applied"].all() and len(res["loss"]) == n
        assert c.get("alloc", 0) == 0, c
        counted[(n, k)] = c
        if regime == "gpu-graph":
            assert c["graph_launch"] == n and c.get("matmul", 0) == 0
        else:
            assert c["matmul"] == n * 5 and c.get("graph_launch", 0) == 0  # 2 layers: 2 fwd + 3 bwd GEMMs
    fixed = counted[(40, 40)]["get"] - 1  # parameters, optimizer state, hp: once per call
    assert counted[(40, 10)]["get"] == fixed + 4 and counted[(20, 5)]["get"] == fixed + 4
    assert counted[(40, 10)]["set"] == counted[(40, 40)]["set"]  # uploads once per call


def test_a_schedule_that_raises_mid_chunk_stops_where_the_per_step_loop_stops():
    ref, X, y = TRAIN_CASES[0].model.build("numpy", "float64")

    def lr(step):
        if step == 7:
            raise ArithmeticError("schedule undefined at step 7")
        return 0.1

    models = []
    for m in (on_gpu(ref, "emu:gpu-graph"), ref.to("cpu")):
        with pytest.raises(ArithmeticError, match="step 7"):
            mg.fit(m, X, y, batch_size=2, epochs=3, optimizer=mg.SGD(lr=lr))
        models.append(m)
    done = ref.to("cpu")
    mg.fit(done, X, y, batch_size=2, steps=7, optimizer=mg.SGD(lr=0.1))
    assert_close(models[0].params, done.params, 1e-12, "gpu params after 7 steps")
    assert_close(models[1].params, done.params, 1e-12, "cpu params after 7 steps")
