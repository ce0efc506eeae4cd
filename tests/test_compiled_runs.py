"""The cpu backend's compiled run of steps (``CpuBackend.run_steps`` -> ``kernels.cpu.run_steps_loops``
/ ``run_steps_blas``) against the Python loop of ``Backend.run_steps`` it replaces.

A single ``train_step`` is a run of one step through the same kernel, so the Python loop
of single steps must give bitwise what one compiled run gives: parameters, optimizer
state, losses, applied flags, |g|^2, the tracked steps' per-example norm sums, where a run
stops (a rejected step, a spent time budget), and through ``fit`` the whole history but
the clock.  With ``compiled_runs = False`` the backend calls the step kernels themselves
(``kernels.cpu.train_step_*``): the same arithmetic, compiled on its own, where LLVM may
contract a multiply-add differently (seen: a wide float64 layer in the loops regime), so
that comparison is to rounding.  The run's step times come from
``clock_gettime(CLOCK_MONOTONIC)`` inside the kernel: non-decreasing and inside the wall
time that ``time.perf_counter`` measures around the call.  What it does not handle (an
optimizer chain that does not fuse, dropout, batch norm, the Python-driven BLAS regime)
runs the Python loop.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minigd as mg
from minigd.backends import cpu as C
from minigd.backends.base import Backend
from minigd.kernels import cpu as K

pytestmark = pytest.mark.skipif(not C.COMPILED_RUNS, reason="the compiled run reads CLOCK_MONOTONIC (Linux)")

OPTIMIZERS = {
    "sgd": lambda lr: mg.SGD(lr=lr),
    "momentum": lambda lr: mg.SGD(lr=lr, momentum=0.9, weight_decay=1e-3),
    "adam": lambda lr: mg.Adam(lr=lr * 0.1),
    "clip": lambda lr: mg.optim.chain(mg.optim.clip_by_global_norm(0.5), mg.optim.scale_by_lr(), lr=lr),
}


def _problem(sizes, dtype, n=64, loss="cross_entropy", seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, sizes[0])).astype(dtype)
    if loss == "cross_entropy":
        yi, yf = rng.integers(0, sizes[-1], n).astype(np.int64), np.empty((0, sizes[-1]), dtype)
    else:
        yi, yf = np.zeros(0, np.int64), rng.standard_normal((n, sizes[-1])).astype(dtype)
    return X, yi, yf


def _copy(res):
    return {k: np.array(v) for k, v in res.items()}


def _both(sizes, dtype, B, n_steps, opt, lr=0.05, track=None, want_sqn=False, full=False, max_time=None, loss=None):
    """The same run through the compiled kernel (copy 0; the Python loop made to fail) and
    through the Python loop (copy 1); returns (results, params, optimizer states, backends)."""
    loss = loss or "cross_entropy"
    X, yi, yf = _problem(sizes, dtype, loss=loss)
    rng = np.random.default_rng(5)
    idx = np.arange(B, dtype=np.int64) if full else rng.integers(0, X.shape[0], n_steps * B).astype(np.int64)
    lrs = [lr * (1 + 0.1 * math.sin(s)) for s in range(n_steps)]
    out = []
    for how in ("compiled", "python loop", "step kernels"):
        m = mg.MLP(sizes, dtype=dtype, loss=loss, seed=1)
        impl = m.backend_impl
        impl.compiled_runs = how != "step kernels"
        state = OPTIMIZERS[opt](lr).init(m.params)
        impl.reserve(B)
        args = (m.params, X, yi, yf, idx, B, n_steps, state, lrs, 1)
        if how == "compiled":
            mp = pytest.MonkeyPatch()
            mp.setattr(Backend, "run_steps", lambda *a, **k: pytest.fail("the Python loop ran"))
            try:
                res = impl.run_steps(*args, want_sqn=want_sqn, max_time=max_time, track=track)
            finally:
                mp.undo()
        else:  # the Python loop of single train_step calls (runs of one step, or the step kernels)
            res = Backend.run_steps(impl, *args, want_sqn=want_sqn, max_time=max_time, track=track)
        sq = impl.last_sqnorms(B).copy() if want_sqn else None
        out.append((_copy(res), m.params.copy(), state, impl, sq))
    return out


def _assert_same(a, b, c=None):
    """a (the compiled run) is bitwise b (the Python loop of runs of one step), and to
    rounding c (the step kernels), when given."""
    (ra, pa, sa, _, qa), (rb, pb, sb, _, qb) = a, b
    for k in ("loss", "applied", "grad_norm_sq", "sqn_sum"):
        np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)
    np.testing.assert_array_equal(pa, pb)
    np.testing.assert_array_equal(sa.state, sb.state)
    np.testing.assert_array_equal(sa.hp, sb.hp)
    if qa is not None:
        np.testing.assert_array_equal(qa, qb)
    t = ra["time"]
    assert t.shape == ra["loss"].shape and np.all(t > 0) and np.all(np.diff(t) >= 0)
    if c is not None:
        rc, pc = c[0], c[1]
        assert np.array_equal(ra["applied"], rc["applied"])
        tol = dict(rtol=1e-4, atol=1e-5) if pa.dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(pa, pc, **tol)
        np.testing.assert_allclose(ra["loss"], rc["loss"], **tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize(("sizes", "B"), [([6, 20, 3], 1), ([6, 20, 3], 7), ([9, 520, 4], 3), ([6, 20, 3], 32)])
def test_compiled_run_is_the_python_loop(dtype, opt, sizes, B):
    a, b, c = _both(sizes, dtype, B, 23, opt, track=(2, 5))
    assert a[3]._regime(B) in ("loops", "blas")
    _assert_same(a, b, c)
    tracked = ~np.isnan(a[0]["sqn_sum"])
    assert np.flatnonzero(tracked).tolist() == [2, 7, 12, 17, 22]
    assert np.all(a[0]["sqn_sum"][tracked] > 0)


@pytest.mark.parametrize("B", [1, 8])
def test_want_sqn_full_batch_and_regression(B):
    """Every step tracked (``want_sqn``), the same rows each step (``idx`` of B rows), a
    regression loss: the last step's per-example norms are left where the contract says."""
    a, b, c = _both([4, 11, 2], "float32", B, 9, "momentum", want_sqn=True, full=True, loss="mse")
    _assert_same(a, b, c)
    assert a[4].shape == (B,) and np.all(a[4] > 0)


@pytest.mark.parametrize("B", [1, 16])
def test_a_rejected_step_ends_the_run(B):
    """A learning rate that overflows float32: the run stops at the first rejected step,
    and that step leaves the parameters as they were, on both paths."""
    a, b, c = _both([6, 20, 3], "float32", B, 30, "sgd", lr=1e36)
    _assert_same(a, b, c)
    ok = a[0]["applied"]
    assert not ok[-1] and len(ok) < 30


def test_a_spent_budget_stops_after_one_step():
    for budget in (0.0, -1.0):
        a, b, c = _both([6, 20, 3], "float32", 4, 10, "sgd", max_time=budget)
        _assert_same(a, b, c)
        assert len(a[0]["loss"]) == len(b[0]["loss"]) == 1
    a, b, c = _both([6, 20, 3], "float32", 4, 10, "sgd", max_time=1e9)  # far off: every step
    assert len(a[0]["loss"]) == 10


def test_the_step_clock_is_perf_counter():
    """The kernel's clock (CLOCK_MONOTONIC) against ``time.perf_counter`` around the call:
    the run's last step ends after its start and before the call returns."""
    m = mg.MLP([64, 64, 10], dtype="float32", seed=0)
    X, yi, yf = _problem([64, 64, 10], "float32", n=256)
    impl = m.backend_impl
    st_ = mg.SGD(lr=0.01).init(m.params)
    idx = np.arange(256, dtype=np.int64)
    impl.run_steps(m.params, X, yi, yf, idx, 32, 8, st_, [0.01] * 8, 1)  # warm
    t0 = time.perf_counter()
    res = impl.run_steps(m.params, X, yi, yf, idx, 32, 8, st_, [0.01] * 8, 9)
    wall = time.perf_counter() - t0
    t = np.array(res["time"])
    assert 0 < t[0] <= t[-1] <= wall
    assert t[-1] > 0.5 * wall or wall < 2e-4  # the steps are most of the call
    d = np.diff(np.concatenate([[0.0], t]))
    assert np.all(d > 0)


def test_what_it_does_not_handle_runs_the_python_loop(monkeypatch):
    X, yi, yf = _problem([6, 20, 3], "float32")
    idx = np.arange(16, dtype=np.int64)
    calls = []
    real = Backend.run_steps

    def spy(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(Backend, "run_steps", spy)
    for kernel in ("run_steps_loops", "run_steps_blas"):
        monkeypatch.setattr(K, kernel, lambda *a, **k: pytest.fail("the compiled run ran"))
    unfused = mg.optim.chain(mg.optim.scale_by_lr(), mg.optim.trace(0.9), lr=0.05)
    cases = [
        (mg.MLP([6, 20, 3], seed=0), unfused),  # a chain that does not fuse
        (mg.MLP([6, 20, 3], dropout=0.2, seed=0), mg.SGD(lr=0.05)),  # dropout masks drawn per step
    ]
    pyblas = mg.MLP([6, 20, 3], seed=0)
    pyblas.backend_impl.compiled_blas = False  # the Python-driven BLAS regime
    cases.append((pyblas, mg.SGD(lr=0.05)))
    off = mg.MLP([6, 20, 3], seed=0)
    off.backend_impl.compiled_runs = False
    cases.append((off, mg.SGD(lr=0.05)))
    cases.append((mg.MLP([6, 20, 3], batch_norm=True, seed=0), mg.SGD(lr=0.05)))  # batch norm
    for i, (m, opt) in enumerate(cases):
        st_ = opt.init(m.params)
        rng = np.random.default_rng(0) if i == 1 else None
        m.backend_impl.run_steps(m.params, X, yi, yf, idx, 8, 2, st_, [0.05, 0.05], 1, dropout_rng=rng)
    assert len(calls) == len(cases)


def _fit(python_loop, **kw):
    X, yi, _ = _problem([8, 16, 3], "float32", n=200, seed=3)
    m = mg.MLP([8, 16, 3], seed=2)
    with pytest.MonkeyPatch.context() as mp:
        if python_loop:  # runs of single train_step calls
            mp.setattr(C.CpuBackend, "run_steps", Backend.run_steps)
        h = mg.fit(m, X, yi, seed=4, **kw)
    return m, h


@pytest.mark.parametrize(
    "kw",
    [
        dict(batch_size=1, epochs=2, optimizer=mg.SGD(lr=0.05, momentum=0.9)),
        dict(batch_size=16, epochs=3, optimizer=mg.Adam(lr=0.01), track_noise=4),
        dict(batch_size=200, epochs=4, optimizer=mg.SGD(lr=0.3), eval_every=1),
        dict(batch_size=mg.AdaptiveBatchSize(min=8, every=8, track_every=2, throughput="flops"), steps=120,
             optimizer=mg.SGD(lr=0.05)),
    ],
)  # fmt: skip
def test_fit_is_bitwise_the_same(kw):
    """Through ``fit``: the parameters and every history column but the clock are the
    same, and so are the noise estimates and the adaptive controller's decisions (with the
    clock-free ``throughput="flops"``)."""
    (ma, ha), (mb, hb) = _fit(False, **kw), _fit(True, **kw)
    np.testing.assert_array_equal(ma.params, mb.params)
    for col in ("step", "epoch", "loss", "lr", "batch_size", "examples"):
        np.testing.assert_array_equal(ha.column(col), hb.column(col), err_msg=col)
    assert [{k: v for k, v in e.items() if k != "time"} for e in ha.evals] == [
        {k: v for k, v in e.items() if k != "time"} for e in hb.evals
    ]
    if "track_noise" in kw or isinstance(kw["batch_size"], mg.AdaptiveBatchSize):
        np.testing.assert_array_equal(ha.column("noise_scale"), hb.column("noise_scale"))
    if isinstance(kw["batch_size"], mg.AdaptiveBatchSize):
        strip = lambda ds: [{k: v for k, v in d.items() if "time" not in k} for d in ds]  # noqa: E731
        assert strip(ha.adaptive) == strip(hb.adaptive)
    t = ha.column("time")
    assert np.all(np.diff(t) >= 0) and t[0] > 0


@settings(max_examples=25, deadline=None)
@given(
    hidden=st.integers(1, 40),
    B=st.integers(1, 12),
    n_steps=st.integers(1, 9),
    first=st.integers(0, 10),
    every=st.integers(1, 4),
    dtype=st.sampled_from(["float32", "float64"]),
)
def test_property_any_shape_and_tracking(hidden, B, n_steps, first, every, dtype):
    a, b, c = _both([5, hidden, 4], dtype, B, n_steps, "momentum", track=(first, every))
    _assert_same(a, b, c)


@pytest.mark.parametrize("track", [None, 3])
def test_recording_a_run_at_once_is_recording_it_step_by_step(track, monkeypatch):
    """``Loop._record_run`` (a run recorded a column slice at a time) against the per-step
    recording that a per-step callback forces (each run one step): the same parameters,
    history, epoch summaries (their loss sums added in the same order) and noise estimates."""
    X, yi, _ = _problem([8, 16, 3], "float32", n=200, seed=3)
    out = []

    class EveryStep:
        def on_step(self, model, step, loss):
            return False

    from minigd.loop import Loop

    real, batched = Loop._record_run, []
    monkeypatch.setattr(
        Loop, "_record_run", lambda self, res, *a: (batched.append(res["loss"].size), real(self, res, *a))
    )
    for cbs in ([], [EveryStep()]):
        m = mg.MLP([8, 16, 3], seed=2)
        h = mg.fit(m, X, yi, batch_size=12, epochs=3, optimizer=mg.SGD(lr=0.05, momentum=0.9), seed=4,
                   track_noise=track, callbacks=cbs)  # fmt: skip
        out.append((m, h))
    (ma, ha), (mb, hb) = out
    assert sum(batched) == ha.n_steps and max(batched) > 1  # the first fit only, in runs of several steps
    np.testing.assert_array_equal(ma.params, mb.params)
    for col in ("step", "epoch", "loss", "lr", "batch_size", "examples"):
        np.testing.assert_array_equal(ha.column(col), hb.column(col), err_msg=col)
    drop = lambda es: [{k: v for k, v in e.items() if k != "time"} for e in es]  # noqa: E731
    assert drop(ha.epochs) == drop(hb.epochs) and drop(ha.evals) == drop(hb.evals)
    if track:
        np.testing.assert_array_equal(ha.column("noise_scale"), hb.column("noise_scale"))


def test_a_budget_that_runs_out_midway():
    """The run stops at the first step whose time reaches the budget: every earlier step
    ended before it."""
    m = mg.MLP([64, 64, 10], dtype="float32", seed=0)
    X, yi, yf = _problem([64, 64, 10], "float32", n=512)
    impl = m.backend_impl
    st_ = mg.SGD(lr=0.01).init(m.params)
    idx = np.tile(np.arange(32, dtype=np.int64), 400)
    full = np.array(impl.run_steps(m.params, X, yi, yf, idx, 32, 400, st_, [0.01] * 400, 1)["time"])
    budget = float(full[len(full) // 2])  # about half the run
    t = np.array(impl.run_steps(m.params, X, yi, yf, idx, 32, 400, st_, [0.01] * 400, 401, max_time=budget)["time"])
    assert np.all(t[:-1] < budget)
    assert t[-1] >= budget or len(t) == 400


def test_the_times_count_from_the_callers_clock(monkeypatch):
    """The run's clock starts in Python just before the call (``time.clock_gettime_ns(CLOCK_MONOTONIC)``,
    which ``time.perf_counter`` reads on Linux), so the call's own cost is in the first
    step's time; shifting that reading back by one second shows in every recorded time."""
    m = mg.MLP([6, 20, 3], seed=0)
    X, yi, yf = _problem([6, 20, 3], "float32")
    impl = m.backend_impl
    st_ = mg.SGD(lr=0.01).init(m.params)
    idx = np.arange(8, dtype=np.int64)
    impl.run_steps(m.params, X, yi, yf, idx, 8, 1, st_, [0.01], 1)  # warm
    real = time.clock_gettime_ns
    monkeypatch.setattr(C.time, "clock_gettime_ns", lambda clk: real(clk) - 1_000_000_000)
    t = np.array(impl.run_steps(m.params, X, yi, yf, np.tile(idx, 3), 8, 3, st_, [0.01] * 3, 2)["time"])
    assert np.all((t >= 1.0) & (t < 1.5)), t
    monkeypatch.undo()
    t0 = time.perf_counter()
    t = np.array(impl.run_steps(m.params, X, yi, yf, np.tile(idx, 3), 8, 3, st_, [0.01] * 3, 5)["time"])
    assert 0 < t[-1] <= time.perf_counter() - t0


def test_long_runs_other_int_types_and_the_views_of_a_run():
    """A run longer than the learning-rate buffer (256) grows it; B, t0 and the tracking
    period given as other integer types compile nothing new; a train_step between a run and
    reading its result leaves the run's records alone; too few learning rates are an error."""
    from minigd.kernels import _jit

    a, b, c = _both([6, 20, 3], "float32", 4, 300, "momentum", track=(0, 7))
    _assert_same(a, b, c)
    m = mg.MLP([6, 20, 3], seed=0)
    X, yi, yf = _problem([6, 20, 3], "float32")
    impl = m.backend_impl
    st_ = mg.SGD(lr=0.01).init(m.params)
    idx = np.arange(40, dtype=np.int64)
    impl.run_steps(m.params, X, yi, yf, idx, 4, 10, st_, [0.01] * 10, 1, track=(0, 3))  # warm
    n0 = _jit.compile_count()
    res = impl.run_steps(
        m.params,
        X,
        yi,
        yf,
        idx,
        np.int32(4),
        np.int16(10),
        st_,
        [0.01] * 10,
        np.int32(11),
        track=(np.int8(0), np.int64(3)),
    )
    assert _jit.compile_count() == n0
    before = {k: np.array(v) for k, v in res.items()}
    impl.train_step(m.params, m._grad, X, yi, yf, idx[:4], 4, st_, 0.01, 21, want_sqn=True)
    for k, v in before.items():
        np.testing.assert_array_equal(res[k], v, err_msg=k)
    with pytest.raises(ValueError, match="lrs: expected a learning rate for each of n_steps=10 steps, got 9"):
        impl.run_steps(m.params, X, yi, yf, idx, 4, 10, st_, [0.01] * 9, 1)
