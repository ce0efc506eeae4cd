"""Misuse never crashes: fuzzing every public entry point with malformed input, killing a
training process in the middle of writing a checkpoint, and a long run that must not grow.

* Property-based fuzzing (hypothesis): wrong shapes, dtypes, NaN/inf, empty arrays, masked
  arrays, huge/zero/negative batch sizes and budgets, wrong label types, wrong argument
  types, for MLP(...), forward / predict / predict_proba / loss / loss_and_grad / evaluate /
  score, fit, per_example_grads, per_example_grad_norms, grad_moments, the scikit-learn
  estimators and save/load_checkpoint.  Every case must raise ValueError or TypeError whose
  message names the argument ("X: ...", "batch_size: ...") -- not a crash in a kernel, not
  another exception type, not a silent NaN.  A hang would trip the per-test alarm (300 s).
* SIGKILL at random moments while a subprocess checkpoints every step; the last checkpoint
  must load, and resuming from it must give bitwise the uninterrupted run.
* A long run of tiny steps holds its memory flat (tracemalloc windows spread over the run,
  and the resident set size).
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minigd as mg
from minigd.checkpoint import load_checkpoint, save_checkpoint

ERRORS = (ValueError, TypeError)
#: MINIGD_FUZZ_SCALE=20 runs twenty times more examples per fuzz test (with
#: HYPOTHESIS_PROFILE=dev: new random ones on every run)
FUZZ_SCALE = float(os.environ.get("MINIGD_FUZZ_SCALE", "1"))


def fuzz(n: int) -> int:
    return max(1, int(n * FUZZ_SCALE))


N, N_IN, N_OUT = 8, 3, 2


@pytest.fixture(autouse=True)
def no_hang():
    """Fail (rather than hang) a test that runs for more than 300 s."""
    if not hasattr(signal, "SIGALRM"):  # pragma: no cover - Windows
        yield
        return

    def alarm(signum, frame):
        raise TimeoutError("test_reliability: a call did not return within 300 s (a hang?)")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(300)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def expect_error(fn, name):
    """fn() must raise ValueError/TypeError whose message starts with (or, for
    scikit-learn's own wording, contains) the argument ``name``."""
    try:
        fn()
    except ERRORS as exc:
        msg = str(exc)
        assert msg.startswith(f"{name}:") or f"{name}:" in msg.split("\n")[0], (
            f"error does not name {name!r}: {type(exc).__name__}: {msg[:300]}"
        )
        return exc
    raise AssertionError(f"no error for a malformed {name!r}")


# ============================================================================ models and data
MODELS = {}


def model(kind: str) -> mg.MLP:
    """A few models, built once (the cpu kernels for float32 and float64 are shared with
    the rest of the suite; no new signatures)."""
    if kind not in MODELS:
        loss, dtype, backend = kind.split("-")
        MODELS[kind] = mg.MLP([N_IN, 4, N_OUT], loss=loss, dtype=dtype, backend=backend, seed=0)
    return MODELS[kind]


MODEL_KINDS = [
    "cross_entropy-float32-cpu",
    "mse-float64-cpu",
    "binary_cross_entropy-float32-cpu",
    "cross_entropy-float64-numpy",
]


def good_X(m, n=N):
    return np.random.default_rng(0).normal(size=(n, N_IN)).astype(m.dtype)


def good_y(m, n=N):
    rng = np.random.default_rng(1)
    if m.loss_name == "cross_entropy":
        return rng.integers(0, N_OUT, size=n).astype(np.int64)
    if m.loss_name == "mse":
        return rng.normal(size=(n, N_OUT)).astype(m.dtype)
    return rng.integers(0, 2, size=(n, N_OUT)).astype(m.dtype)


@st.composite
def bad_X(draw, m):
    """Something that is not a finite (n >= 1, N_IN) array of the model's dtype."""
    kind = draw(
        st.sampled_from(["not-array", "ndim", "columns", "dtype", "nonfinite", "empty", "no-columns", "masked"])
    )
    n = draw(st.integers(1, 12))
    if kind == "not-array":
        return draw(st.sampled_from([None, 3, 2.5, "X", b"x", [[0.0] * N_IN] * 2, {"a": 1}, (1, 2, 3), object()]))
    if kind == "ndim":
        shape = draw(st.sampled_from([(), (n,), (n, N_IN, 1), (1, n, N_IN)]))
        return np.zeros(shape, dtype=m.dtype)
    if kind == "columns":
        cols = draw(st.integers(0, 8).filter(lambda c: c != N_IN))
        return np.zeros((n, cols), dtype=m.dtype)
    if kind == "dtype":
        other = [
            d
            for d in (
                "float16",
                "float32",
                "float64",
                "int32",
                "int64",
                "uint8",
                "bool",
                "complex64",
                "complex128",
                "object",
                "U3",
                "datetime64[s]",
            )
            if np.dtype(d) != m.dtype
        ]
        return np.zeros((n, N_IN), dtype=draw(st.sampled_from(other)))
    if kind == "nonfinite":
        X = np.zeros((n, N_IN), dtype=m.dtype)
        X.flat[draw(st.integers(0, X.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return X
    if kind == "empty":
        return np.zeros((0, N_IN), dtype=m.dtype)
    if kind == "no-columns":
        return np.zeros((n, 0), dtype=m.dtype)
    X = np.ma.masked_invalid(np.full((n, N_IN), np.nan, dtype=m.dtype))
    return X


@st.composite
def bad_y(draw, m, n=N):
    """Targets that do not fit the model's loss (for n examples)."""
    kind = draw(st.sampled_from(["not-array", "length", "dtype", "nonfinite", "range", "ndim", "masked"]))
    ce = m.loss_name == "cross_entropy"
    if kind == "not-array":
        return draw(st.sampled_from([None, 1, "y", [0] * n, (0,) * n]))
    if kind == "length":
        k = draw(st.integers(0, 20).filter(lambda k: k != n))
        return np.zeros(k if ce else (k, N_OUT), dtype=np.int64 if ce else m.dtype)
    if kind == "ndim":
        return np.zeros((n, N_OUT, 2) if not ce else (n, 2), dtype=np.int64 if ce else m.dtype)
    if kind == "dtype":
        if ce:
            return np.zeros(n, dtype=draw(st.sampled_from(["float32", "float64", "bool", "U1", "object", "complex64"])))
        other = [d for d in ("float16", "float32", "float64", "int64", "bool", "object") if np.dtype(d) != m.dtype]
        return np.zeros((n, N_OUT), dtype=draw(st.sampled_from(other)))
    if kind == "nonfinite":
        if ce:  # NaN is not an integer label: a float array
            return np.full(n, np.nan)
        y = good_y(m, n)
        y.flat[draw(st.integers(0, y.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return y
    if kind == "range":
        if ce:
            y = np.zeros(n, np.int64)
            y[draw(st.integers(0, n - 1))] = draw(st.sampled_from([-1, N_OUT, 10**9, -(2**62)]))
            return y
        if m.loss_name == "binary_cross_entropy":
            y = good_y(m, n)
            y.flat[draw(st.integers(0, y.size - 1))] = draw(st.sampled_from([-0.5, 1.5, 7.0]))
            return y
        return np.zeros((n, N_OUT + 1), dtype=m.dtype)  # mse: wrong number of outputs
    return np.ma.masked_invalid(np.full(n if ce else (n, N_OUT), np.nan))


X_CALLS = {
    "forward": lambda m, X: m.forward(X),
    "forward(training)": lambda m, X: m.forward(X, training=True),
    "predict": lambda m, X: m.predict(X),
    "predict_proba": lambda m, X: m.predict_proba(X) if m.is_classifier else m.forward(X),
}
XY_CALLS = {
    "loss": lambda m, X, y: m.loss(X, y),
    "loss_and_grad": lambda m, X, y: m.loss_and_grad(X, y),
    "evaluate": lambda m, X, y: m.evaluate(X, y),
    "score": lambda m, X, y: m.score(X, y),
    "per_example_grads": lambda m, X, y: mg.per_example_grads(m, X, y),
    "per_example_grad_norms": lambda m, X, y: mg.per_example_grad_norms(m, X, y),
    "grad_moments": lambda m, X, y: mg.grad_moments(m, X, y),
    "fit": lambda m, X, y: mg.fit(m.copy(), X, y, batch_size=2, steps=2),
    "fit(validation)": lambda m, X, y: mg.fit(m.copy(), good_X(m), good_y(m), batch_size=2, steps=2, validation=(X, y)),
}


# ============================================================================ fuzzing the core
@settings(max_examples=fuzz(60), suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kind=st.sampled_from(MODEL_KINDS), call=st.sampled_from(sorted(X_CALLS) + sorted(XY_CALLS)))
def test_malformed_X_is_a_clear_error(data, kind, call):
    m = model(kind)
    X = data.draw(bad_X(m), label="X")
    if call in X_CALLS:
        expect_error(lambda: X_CALLS[call](m, X), "X")
    else:
        y = good_y(m, len(X) if isinstance(X, np.ndarray) and X.ndim >= 1 else N)
        expect_error(lambda: XY_CALLS[call](m, X, y), "validation X" if call == "fit(validation)" else "X")


@settings(max_examples=fuzz(60), suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kind=st.sampled_from(MODEL_KINDS), call=st.sampled_from(sorted(XY_CALLS)))
def test_malformed_y_is_a_clear_error(data, kind, call):
    m = model(kind)
    y = data.draw(bad_y(m), label="y")
    expect_error(lambda: XY_CALLS[call](m, good_X(m), y), "validation y" if call == "fit(validation)" else "y")


class _NoHooks:
    pass


def _bad_fit_arguments():
    big = st.integers(N + 1, 2**70)
    return st.one_of(
        st.tuples(
            st.just("batch_size"),
            st.one_of(
                st.integers(-(2**63), 0),
                big,
                big.filter(lambda v: v < 2**63).map(np.int64),
                st.sampled_from(
                    [
                        1.5,
                        2.0,
                        True,
                        False,
                        "half",
                        "",
                        None,
                        [2],
                        np.float64(2.0),
                        np.int64(0),
                        np.int64(N + 1),
                        mg.BatchSizeSchedule(2, {1: 10**9}),
                    ]
                ),
            ),
        ),
        st.tuples(
            st.sampled_from(["epochs", "steps", "examples", "eval_every", "track_noise", "checkpoint_every"]),
            st.one_of(st.integers(-(2**40), 0), st.sampled_from([1.5, True, "3", [1], np.float32(2)])),
        ),
        st.tuples(st.just("sampler"), st.sampled_from(["random", "", None, 1, "SHUFFLE"])),
        st.tuples(st.just("optimizer"), st.sampled_from(["sgd", 0.1, object(), mg.optim.trace(0.9)])),
        st.tuples(st.just("max_time"), st.sampled_from([0, -1.0, float("nan"), "1", True])),
        st.tuples(st.just("seed"), st.sampled_from([-1, 1.5, "seed", [1], np.random.RandomState(0)])),
        st.tuples(st.just("noise_beta"), st.sampled_from([1.0, -0.1, float("nan"), "0.9", None])),
        st.tuples(st.just("callbacks"), st.sampled_from([None, 3, "cb", [_NoHooks()], [None]])),
        st.tuples(
            st.just("target"),
            st.sampled_from([{"val_acc": 0.9}, {"train_loss": float("nan")}, {}, "0.9", {"train_loss": "low"}]),
        ),
        st.tuples(st.just("validation"), st.sampled_from([1, (1,), [None, None, None], "X"])),
        st.tuples(st.just("drop_last"), st.sampled_from([1, "yes", None])),
        st.tuples(st.just("progress"), st.sampled_from([1, "yes", None])),
        st.tuples(st.just("opt_state"), st.sampled_from([1, "state", {}])),
        st.tuples(st.just("resume"), st.sampled_from([1, 2.5, [], True])),
        st.tuples(st.just("checkpoint"), st.sampled_from([1, b"ck", "", "/nonexistent-dir/ck.npz"])),
    )


@settings(max_examples=fuzz(80))
@given(arg=_bad_fit_arguments(), kind=st.sampled_from(MODEL_KINDS[:2]))
def test_malformed_fit_arguments_are_clear_errors(arg, kind):
    name, value = arg
    m = model(kind)
    kw = dict(batch_size=2, steps=2)
    kw[name] = value
    if name in ("epochs", "examples"):
        del kw["steps"]
    if name == "track_noise":
        kw["batch_size"] = 4
    if name == "checkpoint_every":
        kw["checkpoint"] = os.path.join(os.path.dirname(__file__), "never-written.npz")
    expect = name
    if name == "target" and isinstance(value, dict) and "train_loss" in value:
        expect = "target['train_loss']"
    elif name == "target" and isinstance(value, dict) and "val_acc" in value:
        expect = "target metric"
    elif name == "callbacks" and isinstance(value, list):
        expect = "callbacks[0]"
    expect_error(lambda: mg.fit(m.copy(), good_X(m), good_y(m), **kw), expect)


@settings(max_examples=fuzz(50))
@given(data=st.data())
def test_malformed_model_arguments_are_clear_errors(data):
    name = data.draw(st.sampled_from(["sizes", "activation", "loss", "dtype", "init", "seed", "backend"]))
    if name == "sizes":
        good = data.draw(st.lists(st.integers(1, 6), min_size=2, max_size=5))
        kind = data.draw(st.sampled_from(["element", "short", "type"]))
        if kind == "element":
            i = data.draw(st.integers(0, len(good) - 1))
            good[i] = data.draw(st.sampled_from([0, -1, -(2**40), 1.5, 2.0, True, "3", None, np.float64(3)]))
            expect = f"sizes[{i}]"
            value = good
        else:
            value = data.draw(st.sampled_from([[3], [], 3, "34", None, {3: 4}] if kind == "short" else [object(), 2.5]))
            expect = "sizes"
        expect_error(lambda: mg.MLP(value), expect)
        return
    value = data.draw(
        {
            "activation": st.sampled_from(["relu2", "", 3, None, ["relu", "swish"], ["relu"] * 3]),
            "loss": st.sampled_from(["hinge", "", None, 1, "CrossEntropy"]),
            "dtype": st.sampled_from(["float16", "int32", np.int64, "complex64", None, "x", 3, "float128"]),
            "init": st.sampled_from(["xavier", None, 0, ""]),
            "seed": st.sampled_from([-1, 1.5, "0", [0], np.random.RandomState(0)]),
            "backend": st.sampled_from(["tpu", "", None, 3, "CPU"]),
        }[name]
    )
    expect_error(lambda: mg.MLP([N_IN, 4, 4, N_OUT], **{name: value}), name)


@settings(max_examples=fuzz(40))
@given(data=st.data(), kind=st.sampled_from(MODEL_KINDS))
def test_malformed_gradstats_arguments_are_clear_errors(data, kind):
    m = model(kind)
    X, y = good_X(m), good_y(m)
    P = m.n_params
    case = data.draw(st.sampled_from(["model", "out", "squared", "chunk_size"]))
    if case == "model":
        fn = data.draw(st.sampled_from([mg.per_example_grads, mg.per_example_grad_norms, mg.grad_moments, mg.fit]))
        bad = data.draw(st.sampled_from([None, "mlp", 3, np.zeros(3), object()]))
        expect_error(lambda: fn(bad, X, y), "model")
    elif case == "out":
        out = data.draw(
            st.sampled_from(
                [
                    np.zeros((N, P + 1), m.dtype),
                    np.zeros((N - 1, P), m.dtype),
                    np.zeros((N, P), np.float16),
                    np.zeros((N, P), m.dtype)[:, ::-1],
                    np.zeros(N * P, m.dtype),
                    "out",
                    3,
                ]
            )
        )
        ro = np.zeros((N, P), m.dtype)
        ro.setflags(write=False)
        out = data.draw(st.sampled_from([out, ro]))
        expect_error(lambda: mg.per_example_grads(m, X, y, out=out), "out")
    elif case == "squared":
        bad = data.draw(st.sampled_from([1, "yes", None, 0.0]))
        expect_error(lambda: mg.per_example_grad_norms(m, X, y, squared=bad), "squared")
    else:
        bad = data.draw(st.one_of(st.integers(-(2**63), 0), st.sampled_from([1.5, True, "8", None])))
        expect_error(lambda: mg.grad_moments(m, X, y, chunk_size=bad), "chunk_size")


def test_masked_nan_is_refused_not_silently_read():
    """Regression: np.isfinite on a masked array skips masked entries, which the kernels
    would read -- a NaN in, a silent NaN out."""
    m = model("cross_entropy-float32-cpu")
    X = np.ma.masked_invalid(np.where(np.eye(N, N_IN) > 0, np.nan, 1.0).astype(np.float32))
    with pytest.raises(TypeError, match=r"^X: expected a plain numpy.ndarray, got a masked array"):
        m.forward(X)


def test_extreme_but_valid_batch_sizes_work():
    """batch_size 1 and N (and 'full'), huge budgets stopped by max_time: no error, finite
    parameters."""
    m = model("cross_entropy-float64-numpy")
    for bs in (1, N, "full", np.int64(N), mg.BatchSizeSchedule(1, {1: N})):
        h = mg.fit(m.copy(), good_X(m), good_y(m), batch_size=bs, epochs=2)
        assert h.n_steps >= 2 and np.isfinite(h.column("loss")).all()
    h = mg.fit(m.copy(), good_X(m), good_y(m), batch_size=1, epochs=10**12, max_time=0.05)
    assert h.stop_reason == "max_time"


# ============================================================================ fuzzing the estimators
@st.composite
def bad_Xy_for_estimators(draw):
    """(X, y, the argument the error must name) with one of them malformed."""
    rng = np.random.default_rng(draw(st.integers(0, 10)))
    n = draw(st.integers(2, 12))
    X = rng.normal(size=(n, 3))
    y = np.arange(n) % 2
    which = draw(st.sampled_from(["X", "y"]))
    if which == "X":
        kind = draw(
            st.sampled_from(
                ["nan", "inf", "str", "1d", "3d", "empty", "complex", "sparse", "none", "ragged", "overflow32"]
            )
        )
        if kind in ("nan", "inf"):
            X[draw(st.integers(0, n - 1)), draw(st.integers(0, 2))] = np.nan if kind == "nan" else -np.inf
        elif kind == "str":
            X = X.astype(str)
            X[0, 0] = "abc"
        elif kind == "1d":
            X = X[:, 0]
        elif kind == "3d":
            X = X[:, :, None]
        elif kind == "empty":
            X, y = X[:0], y[:0]
        elif kind == "complex":
            X = X + 1j
        elif kind == "sparse":
            import scipy.sparse as sp

            X = sp.csr_matrix(X)
        elif kind == "none":
            X = None
        elif kind == "ragged":
            X = [[1.0, 2.0, 3.0]] * (n - 1) + [[1.0]]
        else:
            X[0, 0] = 1e300
        return X, y, "X"
    kind = draw(st.sampled_from(["nan", "none", "length", "3d", "inf"]))
    if kind == "nan":
        y = y.astype(float)
        y[0] = np.nan
    elif kind == "inf":
        y = y.astype(float)
        y[-1] = np.inf
    elif kind == "none":
        y = None
    elif kind == "length":
        return X, y[:-1], "X, y"  # inconsistent numbers of samples
    else:
        y = y[:, None, None]
    return X, y, "y"


@settings(max_examples=fuzz(50), deadline=None)
@given(
    case=bad_Xy_for_estimators(),
    cls=st.sampled_from(["MLPClassifier", "MLPRegressor"]),
    method=st.sampled_from(["fit", "partial_fit"]),
)
def test_estimators_refuse_malformed_data_naming_the_argument(case, cls, method):
    pytest.importorskip("sklearn")
    import minigd.sklearn as msk

    X, y, name = case
    est = getattr(msk, cls)(hidden_layer_sizes=(3,), epochs=1)
    if method == "partial_fit" and cls == "MLPClassifier":
        fn = lambda: est.partial_fit(X, y, classes=np.array([0, 1]))  # noqa: E731
    else:
        fn = lambda: getattr(est, method)(X, y)  # noqa: E731
    expect_error(fn, name)


def test_estimator_predict_misuse():
    pytest.importorskip("sklearn")
    from sklearn.exceptions import NotFittedError

    from minigd.sklearn import MLPClassifier, MLPRegressor

    X = np.random.default_rng(0).normal(size=(20, 3))
    y = np.arange(20) % 3
    for est in (MLPClassifier((3,), epochs=1), MLPRegressor((3,), epochs=1)):
        with pytest.raises(NotFittedError):
            est.predict(X)
        est.fit(X, y)
        expect_error(lambda: est.predict(X[:, :2]), "X")
        expect_error(lambda: est.predict(np.full((2, 3), np.nan)), "X")
        expect_error(lambda: est.predict([]), "X")
    clf = MLPClassifier((3,), epochs=1)
    expect_error(lambda: clf.fit(X, np.linspace(0, 1, 20)), "y")  # continuous labels
    expect_error(lambda: clf.fit(X, np.zeros(20)), "y")  # one class
    expect_error(lambda: MLPRegressor((3,), epochs=1).fit(X, np.array(["a"] * 20)), "y")


# ============================================================================ fuzzing checkpoints
@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    m = mg.MLP([N_IN, 4, N_OUT], dtype="float64", seed=0)
    path = str(tmp_path_factory.mktemp("ck") / "good.npz")
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20, N_IN)), rng.integers(0, N_OUT, 20)
    mg.fit(
        m, X, y, batch_size=4, epochs=2, optimizer=mg.Adam(lr=0.01), track_noise=1, checkpoint=path, validation=(X, y)
    )
    blob = open(path, "rb").read()
    return path, blob, load_checkpoint(path)


@settings(max_examples=fuzz(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_checkpoints_load_exactly_or_raise_value_error(saved_checkpoint, tmp_path, data):
    """Truncations, flipped bytes, overwritten runs and junk anywhere in the file: loading
    either returns exactly the saved content (the damage hit bytes nothing depends on, e.g. a
    timestamp) or raises ValueError naming the file -- nothing else, and no silently wrong
    numbers."""
    _, blob, ref = saved_checkpoint
    b = bytearray(blob)
    op = data.draw(st.sampled_from(["truncate", "flip", "overwrite", "insert"]))
    pos = data.draw(st.integers(0, len(b) - 1))
    if op == "truncate":
        del b[pos:]
    elif op == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            b[data.draw(st.integers(0, len(b) - 1))] ^= data.draw(st.integers(1, 255))
    elif op == "overwrite":
        k = data.draw(st.integers(1, 64))
        b[pos : pos + k] = data.draw(st.binary(min_size=k, max_size=k))
    else:
        b[pos:pos] = data.draw(st.binary(min_size=1, max_size=32))
    path = tmp_path / "damaged.npz"
    path.write_bytes(bytes(b))
    try:
        ck = load_checkpoint(path)
    except ValueError as exc:
        assert str(exc).startswith(f"checkpoint '{path}'"), str(exc)
        return
    assert np.array_equal(ck.model.params, ref.model.params)
    assert np.array_equal(ck.opt_state.state, ref.opt_state.state) and ck.opt_state.t == ref.opt_state.t
    # repr: NaN-safe and bit-exact for floats
    assert repr(ck.history.records) == repr(ref.history.records)
    assert repr(ck.step_info) == repr(ref.step_info) and ck.rng_state == ref.rng_state
    assert all(np.array_equal(ck.sampler[k], ref.sampler[k]) for k in ref.sampler)


@settings(max_examples=fuzz(30))
@given(data=st.data())
def test_malformed_checkpoint_arguments_are_clear_errors(data):
    m = model("cross_entropy-float64-numpy")
    name = data.draw(st.sampled_from(["path", "model", "opt_state", "rng", "sampler", "history", "step_info"]))
    bad = data.draw(
        {
            "path": st.sampled_from([None, 3, b"x.npz", "", ["x"], 1.5]),
            "model": st.sampled_from([None, "m", 3, mg.SGD(lr=0.1)]),
            "opt_state": st.sampled_from(["s", 3, mg.SGD(lr=0.1)]),
            "rng": st.sampled_from([0, "rng", np.random.RandomState(0)]),
            "sampler": st.sampled_from(
                [
                    3,
                    [np.arange(3)],
                    {"order": [1, 2]},
                    {"o": np.zeros((2, 2))},
                    {1: np.arange(3)},
                    {"order": np.zeros(3, np.int8)},
                ]
            ),
            "history": st.sampled_from([{}, 3, "h"]),
            "step_info": st.sampled_from([3, [1], {1: 2}, {"x": object()}, {"x": {1, 2}}]),
        }[name]
    )
    kw = dict(path="/tmp/never-written-minigd.npz", model=m)
    kw[name] = bad
    expect = name
    if name == "sampler" and isinstance(bad, dict) and all(isinstance(k, str) for k in bad):
        expect = f"sampler[{next(iter(bad))!r}]"
    if name == "step_info" and isinstance(bad, dict) and all(isinstance(k, str) for k in bad):
        expect = "step_info/history"
    expect_error(lambda: save_checkpoint(kw.pop("path"), kw.pop("model"), **kw), expect)
    assert not os.path.exists("/tmp/never-written-minigd.npz")
    if name == "path":
        expect_error(lambda: load_checkpoint(bad), "path")


# ============================================================================ SIGKILL mid-write
CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import minigd as mg
    path, steps = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    X = rng.normal(size=(48, 4)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    model = mg.MLP([4, 8, 2], seed=0)
    print("started", flush=True)
    mg.fit(model, X, y, batch_size=5, steps=steps, optimizer=mg.SGD(lr=0.05, momentum=0.9),
           sampler="shuffle", track_noise=3, validation=(X[:10], y[:10]), eval_every=7, seed=1,
           checkpoint=path, checkpoint_every=1, resume=True)
    print("finished", flush=True)
""")


def _child_fit(steps, **kw):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(48, 4)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    model = mg.MLP([4, 8, 2], seed=0)
    hist = mg.fit(
        model,
        X,
        y,
        batch_size=5,
        steps=steps,
        optimizer=mg.SGD(lr=0.05, momentum=0.9),
        sampler="shuffle",
        track_noise=3,
        validation=(X[:10], y[:10]),
        eval_every=7,
        seed=1,
        **kw,
    )
    return model, hist


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_while_checkpointing_leaves_a_loadable_checkpoint_that_resumes(tmp_path):
    """A real process checkpoints after every step (so it spends most of its time inside
    save_checkpoint) and is SIGKILLed at a random moment, three times in a row, each run
    resuming from what the previous one left.  Every time the checkpoint loads; in the end,
    resuming in this process gives bitwise the run that was never interrupted."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    path = tmp_path / "ck.npz"
    rng = np.random.default_rng(2024)
    env = dict(os.environ, PYTHONHASHSEED="0")
    last_step, leftovers = -1, 0
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path), "10000000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            deadline = time.monotonic() + 180  # a cold numba cache compiles first
            while not path.exists() or (round_ and load_checkpoint(path).step_info["step"] <= last_step):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the child never wrote a checkpoint"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        leftovers += len([f for f in os.listdir(tmp_path) if f.endswith(".tmp")])
        ck = load_checkpoint(path)  # never corrupt, whenever the kill came
        info = ck.step_info
        assert not info["finished"] and info["step"] > last_step
        assert ck.history.n_steps == info["step"] == ck.opt_state.t
        last_step = info["step"]
    # resume here and train 25 more steps: bitwise what one uninterrupted run gives
    total = last_step + 25
    ref_model, ref_hist = _child_fit(total)
    model, hist = _child_fit(total, resume=path)
    assert np.array_equal(model.params, ref_model.params)
    for c in ("step", "epoch", "loss", "lr", "batch_size", "examples"):
        assert np.array_equal(hist.column(c), ref_hist.column(c)), c
    strip = lambda recs: [{k: v for k, v in r.items() if k != "time"} for r in recs]  # noqa: E731
    assert strip(hist.evals) == strip(ref_hist.evals) and strip(hist.epochs) == strip(ref_hist.epochs)
    assert hist.noise == ref_hist.noise
    print(f"killed at steps {last_step} (last round); temp files left by killed writes: {leftovers}")


# ============================================================================ a long run stays flat
LONG_STEPS = int(os.environ.get("MINIGD_LONG_RUN_STEPS", "300000"))


def _rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):  # pragma: no cover - not Linux
        return None


def test_long_run_of_tiny_steps_does_not_grow_memory():
    """LONG_STEPS steps of batch 1 on a 2-2-2 network (MINIGD_LONG_RUN_STEPS=1000000 for the
    full million).  tracemalloc slows a step ~20x, so it traces 8 windows of 500 steps spread
    over the run: whatever a window allocates must be freed by its end (a per-step leak
    would be retained there).  The resident set size is checked over the whole run, less
    the per-step history columns it is asked to keep.  The data set is larger than the run,
    so no epoch closes (an epoch record is history, not a leak)."""
    rng = np.random.default_rng(0)
    n = LONG_STEPS + 1000
    X = rng.normal(size=(n, 2)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    mg.fit(mg.MLP([2, 2, 2], seed=0), X[:64], y[:64], batch_size=1, steps=200)  # warm up
    window, n_windows = 500, 8
    period = LONG_STEPS // n_windows
    retained, rss = [], {}

    class Windows:
        start = None

        def on_step(self, model, step, loss):
            if step % period == period // 2:
                gc.collect()
                tracemalloc.start()
                self.start = step
            elif self.start is not None and step == self.start + window:
                gc.collect()
                retained.append(tracemalloc.get_traced_memory()[0])
                tracemalloc.stop()
                self.start = None
            if step in (period // 4, LONG_STEPS - 1):
                rss[step] = _rss_bytes()

    t0 = time.perf_counter()
    hist = mg.fit(
        mg.MLP([2, 2, 2], seed=0),
        X,
        y,
        batch_size=1,
        steps=LONG_STEPS,
        sampler="sequential",
        optimizer=mg.SGD(lr=0.01, momentum=0.9),
        eval_every=10**9,
        callbacks=[Windows()],
    )
    elapsed = time.perf_counter() - t0
    assert hist.n_steps == LONG_STEPS and np.isfinite(hist.column("loss")).all()
    assert len(retained) == n_windows
    # a window's leftovers: a few hundred bytes of interpreter state, not 500 steps' worth
    assert max(retained) < 4096, retained
    if None not in rss.values():
        # fit preallocates the per-step history (7 float64 columns, 56 bytes a step) and its
        # pages become resident as they are first written: that much growth is the record
        # itself; anything beyond it would be a leak
        grown = rss[LONG_STEPS - 1] - rss[period // 4]
        history = 56 * (LONG_STEPS - 1 - period // 4)
        assert grown < history + 4 * 2**20, (
            f"resident memory grew by {grown} bytes over the run, {history} of them history"
        )
    print(f"{LONG_STEPS} steps in {elapsed:.1f} s; bytes retained per traced window: {retained}")
