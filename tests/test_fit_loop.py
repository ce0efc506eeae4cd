"""The training loop: learning-rate schedules and scaling rules, batch-size schedules,
drop_last and the partial last batch, budgets, target stopping, and the History it returns."""

from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest
from strategies import BACKEND_PATHS, make_model

import minigd as mg
from minigd.history import STEP_COLUMNS
from minigd.optim import constant, cosine, exponential, step_decay, warmup


@pytest.fixture(scope="module")
def tiny():
    """10 examples, 3 features, 2 classes (float64)."""
    rng = np.random.default_rng(11)
    X = rng.normal(size=(10, 3))
    y = (X[:, 0] > 0).astype(np.int64)
    return X, y


def ce(path="cpu", dtype="float64", seed=0):
    return make_model([3, 4, 2], path, activation="tanh", dtype=dtype, seed=seed)


# ============================================================================ LR schedules
@pytest.mark.parametrize(
    "sched, expected",
    [
        (constant(0.1), {0: 0.1, 1: 0.1, 1000: 0.1}),
        # lr * factor ** (number of boundaries <= step)
        (step_decay(1.0, [2, 5], factor=0.5), {0: 1.0, 1: 1.0, 2: 0.5, 4: 0.5, 5: 0.25, 100: 0.25}),
        # lr * rate ** (step / decay_steps)
        (exponential(1.0, 0.5, decay_steps=2), {0: 1.0, 1: math.sqrt(0.5), 2: 0.5, 4: 0.25}),
        # final + (lr - final) (1 + cos(pi min(step, T) / T)) / 2
        (cosine(1.0, 4), {0: 1.0, 1: (1 + math.cos(math.pi / 4)) / 2, 2: 0.5, 4: 0.0, 9: 0.0}),
        (cosine(1.0, 4, final_lr=0.2), {0: 1.0, 2: 0.6, 4: 0.2, 50: 0.2}),
        # linear from start_lr over warmup_steps: start + (target - start) (step + 1) / (W + 1)
        (warmup(constant(1.0), 3), {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 10: 1.0}),
        (warmup(0.4, 1, start_lr=0.2), {0: 0.3, 1: 0.4, 2: 0.4}),
        (warmup(step_decay(1.0, [4]), 2), {0: 1 / 3, 1: 2 / 3, 2: 1.0, 4: 0.1}),
    ],
    ids=["constant", "step_decay", "exponential", "cosine", "cosine-final", "warmup", "warmup-float", "warmup-step"],
)
def test_schedule_values(sched, expected):
    for step, lr in expected.items():
        assert sched(step) == pytest.approx(lr, rel=1e-15, abs=1e-15), step


def test_schedules_are_comparable_values():
    """Frozen dataclasses: they print, compare and hash (sweeps key trials on them)."""
    assert cosine(0.1, 100) == cosine(0.1, 100) and cosine(0.1, 100) != cosine(0.1, 50)
    assert hash(step_decay(0.1, [3])) == hash(step_decay(0.1, [3]))
    assert "Cosine" in repr(cosine(0.1, 100))


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: constant(-1.0), ValueError, r"^lr: expected a number >= 0"),
        (lambda: step_decay(0.1, [5, 2]), ValueError, r"^boundaries: expected increasing steps"),
        (lambda: step_decay(0.1, [-1]), ValueError, r"^boundaries: expected an integer >= 0"),
        (lambda: exponential(0.1, 0.0), ValueError, r"^decay_rate: expected a number > 0"),
        (lambda: exponential(0.1, 0.5, decay_steps=0), ValueError, r"^decay_steps: expected an integer >= 1"),
        (lambda: cosine(0.1, 0), ValueError, r"^total_steps: expected an integer >= 1"),
        (lambda: warmup(0.1, -1), ValueError, r"^warmup_steps: expected an integer >= 0"),
        (lambda: mg.scale_lr(0.1, 0, 32), ValueError, r"^batch_size: expected an integer >= 1"),
        (
            lambda: mg.scale_lr(0.1, 64, 32, rule="cubic"),
            ValueError,
            r"^rule: expected one of \['linear', 'sqrt', 'none'\]",
        ),
        (lambda: mg.BatchSizeSchedule(0), ValueError, r"^initial: expected an integer >= 1"),
        (lambda: mg.BatchSizeSchedule(4, {2: 0}), ValueError, r"^milestones batch size: expected an integer >= 1"),
    ],
    ids=[
        "constant",
        "step-order",
        "step-negative",
        "exp-rate",
        "exp-steps",
        "cosine",
        "warmup",
        "scale-B",
        "scale-rule",
        "bss-initial",
        "bss-milestone",
    ],
)
def test_bad_schedule_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_scale_lr_rules():
    assert mg.scale_lr(0.1, 256, 32) == pytest.approx(0.8)  # linear: 0.1 * 256 / 32
    assert mg.scale_lr(0.1, 8, 32, "linear") == pytest.approx(0.025)  # and down: 0.1 * 8 / 32
    assert mg.scale_lr(0.1, 128, 32, "sqrt") == pytest.approx(0.2)  # sqrt: 0.1 * sqrt(4)
    assert mg.scale_lr(0.1, 128, 32, "none") == 0.1
    assert mg.scale_lr(0.1, 32, 32, "sqrt") == 0.1


@pytest.mark.parametrize("path", BACKEND_PATHS)
def test_fit_reads_the_schedule_at_every_step(tiny, path):
    X, y = tiny
    sched = warmup(step_decay(0.2, [5, 8], factor=0.5), 2)
    m = ce(path)
    hist = mg.fit(m, X, y, batch_size=3, epochs=3, optimizer=mg.SGD(lr=sched, momentum=0.5))
    np.testing.assert_array_equal(hist.column("lr"), [sched(k) for k in range(hist.n_steps)])
    # and uses it: the same run with a constant lr ends elsewhere
    m2 = ce(path)
    mg.fit(m2, X, y, batch_size=3, epochs=3, optimizer=mg.SGD(lr=0.2, momentum=0.5))
    assert not np.allclose(m.params, m2.params)


# ============================================================================ batch-size schedules
def test_batch_size_schedule_object():
    s = mg.BatchSizeSchedule(4, {4: 16, 2: 8})  # milestones sorted by epoch
    assert s.milestones == ((2, 8), (4, 16))
    assert [s.at_epoch(e) for e in range(6)] == [4, 4, 8, 8, 16, 16]
    assert s.max_batch == 16
    assert mg.BatchSizeSchedule(4, [(2, 8)]) == mg.BatchSizeSchedule(4, {2: 8})


@pytest.mark.parametrize("path", BACKEND_PATHS)
def test_batch_size_schedule_in_fit(path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(32, 3))
    y = rng.integers(0, 2, size=32).astype(np.int64)
    sched = mg.BatchSizeSchedule(4, {2: 8, 4: 16})
    hist = mg.fit(ce(path), X, y, batch_size=sched, epochs=6)
    assert [e["batch_size"] for e in hist.epochs] == [4, 4, 8, 8, 16, 16]
    # steps per epoch: 32/4 = 8, 8, 32/8 = 4, 4, 32/16 = 2, 2
    assert hist.column("batch_size").tolist() == [4] * 16 + [8] * 8 + [16] * 4
    assert hist.column("epoch").tolist() == [0] * 8 + [1] * 8 + [2] * 4 + [3] * 4 + [4] * 2 + [5] * 2
    assert [e["steps"] for e in hist.epochs] == [8, 16, 20, 24, 26, 28]
    assert hist.column("examples")[-1] == 6 * 32


# ============================================================================ drop_last, partial batch
@pytest.mark.parametrize("sampler", ["shuffle", "sequential", "replacement"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_drop_last_batch_sizes(tiny, sampler, drop_last):
    X, y = tiny
    hist = mg.fit(ce(), X, y, batch_size=4, epochs=2, sampler=sampler, drop_last=drop_last)
    if sampler == "replacement":  # i.i.d. draws: always full batches; steps/epoch as without
        per_epoch = [4, 4] if drop_last else [4, 4, 4]
    else:
        per_epoch = [4, 4] if drop_last else [4, 4, 2]
    assert hist.column("batch_size").tolist() == per_epoch * 2
    assert hist.column("examples").tolist() == np.cumsum(per_epoch * 2).tolist()


@pytest.mark.parametrize("path", BACKEND_PATHS)
def test_partial_last_batch_is_the_mean_over_its_own_examples(path):
    """One epoch of SGD (lr = 0.1, sequential, B = 4, N = 10) on a linear mse model, by
    hand: batches [0:4], [4:8] and the partial [8:10]; each step subtracts lr times the
    mean gradient over *its own* rows, and records the mean loss over them."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(10, 3))
    y = rng.normal(size=10)
    m = make_model([3, 1], path, loss="mse", dtype="float64", seed=0)
    m.params[...] = [0.3, -0.2, 0.1, 0.05]
    p = m.params.copy()
    losses = []
    for rows in (slice(0, 4), slice(4, 8), slice(8, 10)):
        d = X[rows] @ p[:3] + p[3] - y[rows]  # residuals of this batch
        losses.append(np.mean(0.5 * d**2))  # mean over its examples
        g = np.r_[X[rows].T @ d / len(d), d.mean()]  # mean gradient over its examples
        p = p - 0.1 * g
    hist = mg.fit(m, X, y, batch_size=4, epochs=1, sampler="sequential", optimizer=mg.SGD(lr=0.1))
    assert hist.column("batch_size").tolist() == [4, 4, 2]
    np.testing.assert_allclose(hist.column("loss"), losses, rtol=1e-13)
    np.testing.assert_allclose(m.params, p, rtol=1e-13, atol=1e-15)
    # the epoch summary is the example-weighted mean of the step losses
    assert hist.epochs[0]["loss"] == pytest.approx((4 * losses[0] + 4 * losses[1] + 2 * losses[2]) / 10)


# ============================================================================ budgets and stopping
@pytest.mark.parametrize(
    "kw, n_steps, reason",
    [
        (dict(steps=7), 7, "steps"),
        (dict(epochs=2), 6, "epochs"),  # ceil(10 / 4) = 3 steps per epoch
        (dict(examples=25), 8, "examples"),  # 4, 8, 10, 14, 18, 20, 24, 28 >= 25
        (dict(epochs=5, steps=4), 4, "steps"),  # the first budget reached wins
        (dict(epochs=1, examples=1000), 3, "epochs"),
        (dict(), 30, "epochs"),  # no budget: 10 epochs
    ],
    ids=["steps", "epochs", "examples", "steps-first", "epochs-first", "default-10-epochs"],
)
def test_budgets(tiny, kw, n_steps, reason):
    X, y = tiny
    hist = mg.fit(ce(), X, y, batch_size=4, **kw)
    assert hist.n_steps == len(hist) == n_steps
    assert hist.stop_reason == reason
    assert hist.reached is None
    assert hist.column("step").tolist() == list(range(n_steps))


def test_max_time_stops(tiny):
    X, y = tiny
    hist = mg.fit(ce(), X, y, batch_size=2, epochs=100, max_time=1e-12)
    assert hist.n_steps == 1 and hist.stop_reason == "max_time"


def test_callback_can_stop(tiny):
    X, y = tiny

    class StopAt5:
        def on_step(self, model, step, loss):
            return step == 5

    hist = mg.fit(ce(), X, y, batch_size=2, epochs=100, callbacks=[StopAt5()])
    assert hist.n_steps == 5 and hist.stop_reason == "callback"


@pytest.mark.parametrize("path", ["numpy", "cpu"])
def test_target_stopping(blobs, path):
    X, y = blobs
    m = make_model([4, 3], path, dtype="float64", seed=0)
    hist = mg.fit(m, X, y, batch_size=10, epochs=50, optimizer=mg.SGD(lr=0.1), target={"train_loss": 0.3}, eval_every=1)
    assert hist.reached is True and hist.stop_reason == "target"
    losses = [e["train_loss"] for e in hist.evals]
    first = next(i for i, v in enumerate(losses) if v <= 0.3)
    assert all(v > 0.3 for v in losses[:first])
    assert hist.steps_to_target == hist.evals[first]["step"] == hist.n_steps
    assert hist.examples_to_target == hist.column("examples")[hist.steps_to_target - 1]
    assert 0 < hist.time_to_target <= hist.column("time")[-1]
    assert m.loss(X, y) == pytest.approx(losses[first])


def test_validation_accuracy_target_and_unreachable_target(blobs):
    X, y = blobs
    hist = mg.fit(
        ce_blobs := make_model([4, 3], "cpu", dtype="float64"),
        X,
        y,
        batch_size=10,
        epochs=30,
        validation=(X, y),
        target={"val_accuracy": 0.9},
    )
    assert hist.reached is True and hist.evals[-1]["val_accuracy"] >= 0.9
    assert ce_blobs.score(X, y) >= 0.9
    # a target not reached within the budget (a loss of exactly 0; a negative one is refused up front)
    hist = mg.fit(make_model([4, 3], "cpu", dtype="float64"), X, y, batch_size=10, epochs=3, target={"train_loss": 0.0})
    assert hist.reached is False and hist.stop_reason == "epochs"
    assert hist.steps_to_target is None and hist.examples_to_target is None


# ============================================================================ History
def test_history_records_and_csv(tiny, tmp_path):
    X, y = tiny
    hist = mg.fit(ce(), X, y, batch_size=4, epochs=2, validation=(X, y), eval_every=2)
    recs = hist.records
    assert len(recs) == hist.n_steps == 6
    for i, r in enumerate(recs):
        assert list(r)[: len(STEP_COLUMNS)] == list(STEP_COLUMNS)
        assert r["step"] == i and isinstance(r["step"], int) and isinstance(r["batch_size"], int)
        assert isinstance(r["loss"], float) and isinstance(r["lr"], float)
    # evaluations (after steps 2, 4, 6) are merged into the record of the step they follow
    evals = {e["step"]: e for e in hist.evals}
    assert sorted(evals) == [2, 4, 6]
    for i, r in enumerate(recs):
        assert ("val_loss" in r) == (i + 1 in evals)
        if i + 1 in evals:
            assert r["val_loss"] == evals[i + 1]["val_loss"]
            assert r["val_accuracy"] == evals[i + 1]["val_accuracy"]
    assert hist.final == hist.evals[-1]

    path = tmp_path / "hist.csv"
    path.write_text("old contents\n")
    hist.to_csv(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(recs)
    assert list(rows[0])[: len(STEP_COLUMNS)] == list(STEP_COLUMNS) and "val_loss" in rows[0]
    for row, r in zip(rows, recs):
        assert int(row["step"]) == r["step"] and int(row["batch_size"]) == r["batch_size"]
        assert float(row["loss"]) == r["loss"]  # repr round-trips floats exactly
        assert (row["val_loss"] == "") == ("val_loss" not in r)
    assert [p.name for p in tmp_path.iterdir()] == ["hist.csv"]  # no temporary left behind


def test_to_csv_is_atomic(tiny, tmp_path, monkeypatch):
    X, y = tiny
    hist = mg.fit(ce(), X, y, batch_size=4, epochs=1)
    path = tmp_path / "hist.csv"
    path.write_text("old contents\n")
    calls = []
    real = csv.DictWriter.writerow

    def failing(self, row):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(self, row)

    monkeypatch.setattr(csv.DictWriter, "writerow", failing)
    with pytest.raises(OSError, match="disk full"):
        hist.to_csv(path)
    assert path.read_text() == "old contents\n"
    assert sorted(os.listdir(tmp_path)) == ["hist.csv"]


def test_history_columns(tiny):
    X, y = tiny
    hist = mg.fit(ce(), X, y, batch_size=4, epochs=1)
    assert hist.column("step").dtype == np.int64 and hist.column("loss").dtype == np.float64
    assert np.all(np.diff(hist.column("time")) >= 0)
    with pytest.raises(KeyError, match="name: expected one of"):
        hist.column("accuracy")
    assert "History(steps=3" in repr(hist)


# ============================================================================ JIT warm-up
_NO_COMPILE_IN_TIMED_STEPS = r"""
import sys, time, types
import numpy as np
import minigd as mg
import minigd.backends.base as base
from minigd.kernels import cpu, cpu_norm, cpu_stats

def compiled():
    # every numba dispatcher's compiled (or cache-loaded) specialisations
    return sum(len(f.overloads) for mod in (cpu, cpu_norm, cpu_stats) for f in vars(mod).values()
               if hasattr(f, "overloads"))

reads = []
clock = types.SimpleNamespace(perf_counter=lambda: reads[-1].append(compiled()) or time.perf_counter())
base.time = clock           # the steps' only clock: read at the start of a run and after each step
run_steps = base.Backend.run_steps

def marked(self, *a, **k):  # each run of steps is one timed stretch
    reads.append([])
    return run_steps(self, *a, **k)

base.Backend.run_steps = marked

# the cpu backend's compiled runs read their clock inside the kernel: a kernel compiled by
# the call would be compiled before that clock starts, but it must not be compiled there
# either (fit's warm-up compiles it): the count before and after each compiled run
import minigd.backends.cpu as cpu_backend
real_run, real_warm = cpu_backend.CpuBackend._run, cpu_backend.CpuBackend._warm_up
warming = []

def run_marked(self, *a, **k):
    if warming:
        return real_run(self, *a, **k)
    reads.append([compiled()])
    try:
        return real_run(self, *a, **k)
    finally:
        reads[-1].append(compiled())

def warm_marked(self, *a, **k):
    warming.append(1)
    try:
        return real_warm(self, *a, **k)
    finally:
        warming.pop()

cpu_backend.CpuBackend._run, cpu_backend.CpuBackend._warm_up = run_marked, warm_marked
rng = np.random.default_rng(0)
for dtype, kw, fit_kw in [
        ("float32", {}, dict(batch_size=1)),                                  # loops
        ("float32", {}, dict(batch_size=16)),                                 # BLAS, partial batch
        ("float64", {"dropout": 0.2}, dict(batch_size=8, track_noise=2)),     # Python-driven path
        ("float32", {"batch_norm": True}, dict(batch_size=16, optimizer=mg.Adam())),
]:
    X = rng.normal(size=(50, 4)).astype(dtype)
    y = np.arange(50) % 3
    m = mg.MLP([4, 8, 3], dtype=dtype, seed=0, **kw)
    del reads[:]
    mg.fit(m, X, y, epochs=2, validation=(X, y), **fit_kw)
    assert reads and all(len(r) >= 2 for r in reads), reads
    inside = [r for r in reads if len(set(r)) > 1]
    assert not inside, (dtype, kw, fit_kw, "kernels compiled inside timed steps", inside[:3])
print("ok")
"""


def test_first_fit_does_not_time_jit_compilation():
    """In a fresh process no numba kernel is compiled (or loaded from the cache) between the
    two clock reads around a step: fit compiles the run's kernels before its clock starts."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _NO_COMPILE_IN_TIMED_STEPS], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout + p.stderr


def test_warm_up_covers_every_batch_size_of_the_run(monkeypatch):
    from minigd.backends.cpu import CpuBackend

    seen = []
    real = CpuBackend.warm_up

    def spy(self, params, grad, X, yi, yf, batch_sizes, opt_state, want_sqn=False):
        seen.append((list(batch_sizes), want_sqn))
        return real(self, params, grad, X, yi, yf, batch_sizes, opt_state, want_sqn)

    monkeypatch.setattr(CpuBackend, "warm_up", spy)
    X = np.random.default_rng(0).normal(size=(50, 3))
    y = np.arange(50) % 2
    sched = mg.optim.BatchSizeSchedule(8, {2: 20})
    mg.fit(ce(), X, y, batch_size=sched, epochs=3)
    mg.fit(ce(), X, y, batch_size=8, epochs=1, drop_last=True, track_noise=1)
    mg.fit(ce(), X, y, batch_size=8, epochs=1, sampler="replacement")
    # 50 % 8 = 2 and 50 % 20 = 10 rows in the partial last batches
    assert seen == [([2, 8, 10, 20], False), ([8], True), ([8], False)]


@pytest.mark.parametrize(
    "kw, fit_kw",
    [
        ({}, dict(batch_size=1, optimizer=mg.SGD(lr=0.1, momentum=0.9))),
        ({}, dict(batch_size=7, optimizer=mg.Adam(lr=0.01), track_noise=2)),
        ({"batch_norm": True, "dropout": 0.3}, dict(batch_size=8, optimizer=mg.AdamW(lr=0.01))),
    ],
    ids=["loops-momentum", "blas-adam-noise", "bn-dropout-adamw"],
)
def test_warm_up_changes_nothing(monkeypatch, kw, fit_kw):
    """The untimed warm-up leaves the parameters, optimizer state, running statistics and
    random streams alone: the run is bitwise the one without it."""
    from minigd.backends.cpu import CpuBackend

    X = np.random.default_rng(3).normal(size=(30, 3))
    y = np.arange(30) % 2

    def run():
        m = mg.MLP([3, 6, 2], dtype="float64", seed=1, **kw)
        h = mg.fit(m, X, y, epochs=3, seed=5, **fit_kw)
        return m, h

    m1, h1 = run()
    monkeypatch.setattr(CpuBackend, "warm_up", lambda self, *a, **k: None)
    m2, h2 = run()
    assert np.array_equal(m1.params, m2.params) and np.array_equal(m1.running, m2.running)
    assert np.array_equal(h1.column("loss"), h2.column("loss"))
    assert np.array_equal(h1.opt_state.state, h2.opt_state.state) and h1.opt_state.t == h2.opt_state.t
