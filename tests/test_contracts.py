"""Contract tests of the compute core (STYLE.md, "The kernel contract").

* every Numba kernel is compiled for exactly the two model dtypes: after the whole suite
  (this module runs last, see conftest.py) and after exercising every entry point in both
  dtypes itself (batch norm and dropout included), no dispatcher has more than two
  signatures;
* a training step allocates no data: over 1,000 fit steps the traced memory does not grow
  and never peaks above its level at the start by more than a small slack (also for a
  model with batch norm in ghost batches and dropout);
* fit reserves the workspace once, before the first step, and never re-allocates it.
"""

from __future__ import annotations

import gc
import re
import tracemalloc

import numpy as np
import pytest
from strategies import CPU_PATHS, force_path, make_targets

import minigd as mg
import minigd.backends.base as backend_base
from minigd.kernels import cpu as K

pytestmark = pytest.mark.run_last


def _kernel_modules():
    mods = [K]
    try:
        from minigd.kernels import cpu_stats

        mods.append(cpu_stats)
    except ImportError:  # pragma: no cover - optional module
        pass
    try:
        from minigd.kernels import cpu_norm

        mods.append(cpu_norm)
    except ImportError:  # pragma: no cover - optional module
        pass
    return mods


def _dispatchers():
    from numba.core.registry import CPUDispatcher

    out = {}
    for mod in _kernel_modules():
        for name, obj in vars(mod).items():
            if isinstance(obj, CPUDispatcher):
                out[f"{mod.__name__}.{name}"] = obj
    return out


def _exercise_everything(dtype):
    """Every public path into the cpu kernels, in one dtype: each regime, each loss, every
    optimizer chain, schedules returning ints, read-only and Fortran-ordered inputs."""
    rng = np.random.default_rng(0)
    optimizers = [
        mg.SGD(lr=0.01),
        mg.SGD(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3),
        mg.SGD(lr=lambda step: 1 if step < 2 else 0.01),  # an int learning rate
        mg.Adam(lr=1e-3, clip_norm=1.0),
        mg.AdamW(lr=1e-3),
        mg.optim.chain(mg.optim.scale(0.5), mg.optim.trace(0.5), mg.optim.scale_by_lr(), lr=0.01),
    ]
    for loss in ("cross_entropy", "mse", "binary_cross_entropy"):
        X = rng.normal(size=(12, 3)).astype(dtype)
        y = make_targets(loss, 12, 2, rng, dtype)
        X_ro = X.copy()
        X_ro.setflags(write=False)
        y_ro = y.copy()
        y_ro.setflags(write=False)
        X_f = np.asfortranarray(X)
        for path in CPU_PATHS:
            m = force_path(mg.MLP([3, 4, 2], activation="gelu", loss=loss, dtype=dtype, backend="cpu"), path)
            for XX, yy in ((X, y), (X_ro, y_ro), (X_f, y)):
                m.forward(XX)
                m.loss(XX, yy)
                m.loss_and_grad(XX, yy)
                if m.is_classifier:
                    m.predict_proba(XX)
                m.predict(XX)
            for opt in optimizers:
                mg.fit(m, X_ro, y_ro, batch_size=4, steps=4, optimizer=opt, validation=(X_ro, y_ro))
                mg.fit(m, X, y, batch_size=1, steps=2, optimizer=opt, sampler="replacement")
            st = mg.SGD(lr=0.1).init(m.params)
            g = np.ones_like(m.params)
            m.backend_impl.opt_apply(m.params, g, st, 0.1, 1)
    # batch norm (both placements, ghost batches) and dropout: the kernels of cpu_norm.py
    X = rng.normal(size=(12, 3)).astype(dtype)
    y = rng.integers(0, 2, size=12).astype(np.int64)
    X_ro = X.copy()
    X_ro.setflags(write=False)
    for kw in (
        dict(batch_norm=True),
        dict(batch_norm="after", ghost_batch_size=3, dropout=0.2),
        dict(dropout=0.3),
        dict(batch_norm=True, ghost_batch_size=4, dropout=0.1),
    ):
        for path in CPU_PATHS:
            m = force_path(mg.MLP([3, 4, 5, 2], activation="tanh", dtype=dtype, backend="cpu", **kw), path)
            for XX in (X, X_ro, np.asfortranarray(X)):
                m.forward(XX)
                m.forward(XX, training=True)
                m.loss(XX, y)
                m.loss_and_grad(XX, y)
            mg.fit(m, X_ro, y, batch_size=6, steps=3, optimizer=mg.Adam(lr=1e-3), validation=(X_ro, y))


def _modulo_literals(dispatcher):
    """The dispatcher's signatures with literal types folded into their base type.

    A compiled caller that passes a constant (``f(..., False)``) makes numba compile the
    callee for ``Literal[bool]`` -- but only when the caller is compiled in this process,
    not when it is loaded from the on-disk cache; so the counts below fold literals (the
    cache state must not decide the outcome) and literal duplicates get their own test."""
    sigs = set()
    for s in dispatcher.signatures:
        s = re.sub(r"Literal\[bool\]\([^)]*\)", "bool", str(s))
        sigs.add(re.sub(r"Literal\[int\]\([^)]*\)", "int64", s))
    return sigs


@pytest.fixture(scope="module")
def exercised():
    _exercise_everything("float32")
    _exercise_everything("float64")
    disp = _dispatchers()
    assert disp, "no numba dispatchers found in minigd.kernels"
    return disp


def test_every_kernel_has_at_most_one_signature_per_dtype(exercised):
    """Array types (dtype, layout, read-only flag) and scalar types (a float lr, an int
    step) never vary: at most one signature per model dtype for every kernel."""
    too_many = {name: sorted(_modulo_literals(d)) for name, d in exercised.items() if len(_modulo_literals(d)) > 2}
    assert not too_many, f"kernels compiled more than once per dtype (silent recompiles): {too_many}"
    # the entry points exercised above were compiled for both dtypes, once each
    for name in (
        "train_step_loops",
        "train_step_blas",
        "opt_apply",
        "forward_loops",
        "forward_blas",
        "loss_grad_loops",
        "loss_grad_blas",
        "loss_rows",
        "bias_act_forward",
        "act_backward",
        "bias_grad",
        "gather_rows",
    ):
        full = f"{K.__name__}.{name}"
        if full in exercised:
            assert len(_modulo_literals(exercised[full])) == 2, (name, exercised[full].signatures)


def test_no_kernel_is_compiled_for_literal_arguments():
    """Compile the compiled callers afresh (from a warm cache numba would load them without
    typing their callees) and check that no kernel got a literal-typed signature."""
    import numba

    m = mg.MLP([3, 4, 2], dtype="float64", backend="cpu")
    ws = m.backend_impl.reserve(4)
    st = mg.SGD(lr=0.1, momentum=0.9).init(m.params)
    X = np.zeros((4, 3))
    yi, yf, idx = np.zeros(4, np.int64), np.empty((0, 2)), np.arange(4, dtype=np.int64)
    numba.njit(K.train_step_blas.py_func)(
        X,
        yi,
        yf,
        idx,
        4,
        m.params,
        m._grad,
        ws.buf,
        ws.lay,
        0,
        False,
        st.codes,
        st.hp,
        st.soff,
        st.state,
        st.plan,
        0.1,
        1,
    )
    numba.njit(K.opt_apply.py_func)(m.params, m._grad, st.codes, st.hp, st.soff, st.state, st.plan, 0.1, 1)
    literal = {name: [str(s) for s in d.signatures if "Literal[" in str(s)] for name, d in _dispatchers().items()}
    literal = {k: v for k, v in literal.items() if v}
    assert not literal, f"kernels compiled for literal arguments: {sorted(literal)}"


# ============================================================================ no allocation
def _fill_tuple_free_lists():
    """Fill CPython's per-size tuple free lists (2000 tuples of each small size).

    A call with ~20 arguments into a numba dispatcher (the cpu_norm kernels) leaves one
    freed 20-tuple on its free list per call until the list holds 2000 (400 kB): memory
    tracemalloc counts, bounded, and given back by a full collection.  Whether the list is
    full at the start mark would depend on when the last full collection ran; collecting
    and then filling it makes the measurement independent of that."""
    gc.collect()
    junk = [tuple(range(i, i + size)) for size in range(1, 21) for i in range(2000)]
    del junk


def _alloc_run(path, dtype, B, steps=1200, warm=200, **model_kw):
    """Traced memory around steps [warm, steps) of one fit: (growth, peak above start)."""
    rng = np.random.default_rng(1)
    n = 4096
    X = rng.normal(size=(n, 32)).astype(dtype)
    y = rng.integers(0, 10, size=n).astype(np.int64)
    m = force_path(mg.MLP([32, 128, 10], activation="tanh", dtype=dtype, backend="cpu", **model_kw), path)
    marks = {}

    class Probe:
        def on_step(self, model, step, loss):
            if step == warm:
                _fill_tuple_free_lists()
                tracemalloc.reset_peak()
                marks["start"] = tracemalloc.get_traced_memory()[0]
            elif step == steps:
                marks["end"], marks["peak"] = tracemalloc.get_traced_memory()

    opt = mg.SGD(lr=0.01, momentum=0.9, weight_decay=1e-4)
    mg.fit(m, X, y, batch_size=B, steps=steps, optimizer=opt, callbacks=[Probe()], eval_every=10**9)
    return marks["end"] - marks["start"], marks["peak"] - marks["start"], m.n_params * np.dtype(dtype).itemsize


@pytest.mark.parametrize("path, B", [("cpu-loops", 1), ("cpu-loops", 8), ("cpu-blas", 32), ("cpu-pyblas", 32)])
def test_no_data_allocation_across_1000_steps(path, B):
    """Slack: 16 kB for retained growth (an epoch summary dict per epoch, < 10 epochs) and
    24 kB above the starting level for the peak.  One stray parameter-sized temporary per
    step (P = 5514 float64 = 44 kB) or a (32, 128) batch temporary (32 kB) exceeds it."""
    tracemalloc.start()
    try:
        growth, peak, p_bytes = _alloc_run(path, "float64", B)
    finally:
        tracemalloc.stop()
    assert p_bytes > 24_000, "model too small to detect a parameter-sized temporary"
    assert growth < 16_000, f"traced memory grew by {growth} bytes over 1000 steps"
    assert peak < 24_000, f"traced memory peaked {peak} bytes above its level at step 200"


@pytest.mark.parametrize(
    "model_kw",
    [dict(batch_norm=True, ghost_batch_size=8, dropout=0.1), dict(batch_norm="after", dropout=0.2), dict(dropout=0.5)],
    ids=["bn-before-ghost8-dropout", "bn-after-dropout", "dropout"],
)
def test_no_data_allocation_with_batch_norm_and_dropout(model_kw):
    """The same slack as above, for the Python-driven norm path: masks drawn into the
    preallocated buffers, the cpu_norm epilogues, the running-statistics update; a (32, 128)
    mask or statistics temporary per step (32 kB) exceeds it."""
    tracemalloc.start()
    try:
        growth, peak, p_bytes = _alloc_run("cpu", "float64", 32, **model_kw)
    finally:
        tracemalloc.stop()
    assert p_bytes > 24_000
    assert growth < 16_000, f"traced memory grew by {growth} bytes over 1000 steps"
    assert peak < 24_000, f"traced memory peaked {peak} bytes above its level at step 200"


def test_allocation_probe_detects_a_per_step_temporary(monkeypatch):
    """The probe itself can fail: a backend step that allocates one (P,) temporary is seen."""
    from minigd.backends.cpu import CpuBackend

    real = CpuBackend.run_steps

    def leaky(self, params, *a, **k):  # (each run is one step here: the probe is a per-step callback)
        _ = params * 2.0  # a parameter-sized temporary, freed at once
        return real(self, params, *a, **k)

    monkeypatch.setattr(CpuBackend, "run_steps", leaky)
    tracemalloc.start()
    try:
        _, peak, p_bytes = _alloc_run("cpu-loops", "float64", 8, steps=260, warm=250)
    finally:
        tracemalloc.stop()
    # (a few hundred bytes of the loop's own per-run objects may be live at the start mark)
    assert peak >= 0.9 * p_bytes > 24_000


# ============================================================================ workspace reserve
class _CountingWorkspace(backend_base.Workspace):
    made = []

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        _CountingWorkspace.made.append(self.capacity)


@pytest.mark.parametrize("norm", [{}, dict(batch_norm="after", dropout=0.2)], ids=["plain", "bn-dropout"])
@pytest.mark.parametrize("path", CPU_PATHS + ("numpy",))
def test_workspace_reserved_once_per_fit(monkeypatch, path, norm):
    monkeypatch.setattr(backend_base, "Workspace", _CountingWorkspace)
    _CountingWorkspace.made = []
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 3))
    y = rng.integers(0, 2, size=40).astype(np.int64)
    Xv = rng.normal(size=(30, 3))  # more rows than any training batch
    yv = rng.integers(0, 2, size=30).astype(np.int64)
    backend = "numpy" if path == "numpy" else "cpu"
    m = mg.MLP([3, 5, 2], dtype="float64", backend=backend, seed=0, **norm)
    if path != "numpy":
        force_path(m, path)
    seen = set()

    class Watch:
        def on_step(self, model, step, loss):
            seen.add(id(model.backend_impl.ws))

        def on_eval(self, model, rec):
            seen.add(id(model.backend_impl.ws))

    sched = mg.BatchSizeSchedule(2, {1: 4, 2: 8})  # grows at epochs 1 and 2
    mg.fit(m, X, y, batch_size=sched, epochs=3, validation=(Xv, yv), eval_every=3, eval_train=True, callbacks=[Watch()])
    assert len(_CountingWorkspace.made) == 1, f"workspaces allocated during fit: {_CountingWorkspace.made}"
    assert len(seen) == 1
    # a second fit that needs no more rows re-uses it
    mg.fit(m, X, y, batch_size=4, epochs=1, validation=(Xv, yv))
    assert len(_CountingWorkspace.made) == 1
