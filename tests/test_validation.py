"""Every bad input gets a clear error that names the argument; divergence is reported with
the last finite parameters."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from strategies import BACKEND_PATHS, make_model

import minigd as mg

RNG = np.random.default_rng(0)
X64 = RNG.normal(size=(10, 3))
Y_LAB = (X64[:, 0] > 0).astype(np.int64)
Y_REG = RNG.normal(size=(10, 2))


def ce_model(**kw):
    return mg.MLP([3, 4, 2], dtype="float64", backend="numpy", seed=0, **kw)


def mse_model(**kw):
    return mg.MLP([3, 4, 2], loss="mse", dtype="float64", backend="numpy", seed=0, **kw)


def bce_model(**kw):
    return mg.MLP([3, 4, 2], loss="binary_cross_entropy", dtype="float64", backend="numpy", seed=0, **kw)


def _cases(rows):
    """pytest.param rows with readable ids: 'epochs=0' from a kwargs dict (first field)."""
    return [pytest.param(*r, id=",".join(f"{k}={v!r}" for k, v in r[0].items())[:50]) for r in rows]


def _with(a, i, v):
    a = a.copy()
    a.flat[i] = v
    return a


# ============================================================================ the model
@pytest.mark.parametrize(
    "kwargs, exc, match",
    _cases(
        [
            (dict(sizes=[3]), ValueError, r"^sizes: expected a sequence of at least 2"),
            (dict(sizes=3), TypeError, r"^sizes: expected a sequence.* got int 3"),
            (dict(sizes="34"), TypeError, r"^sizes: expected a sequence.* got str '34'"),
            (dict(sizes=[3, 0]), ValueError, r"^sizes\[1\]: expected an integer >= 1, got 0"),
            (dict(sizes=[3, 2.0]), TypeError, r"^sizes\[1\]: expected an integer, got float"),
            (dict(sizes=[3, True]), TypeError, r"^sizes\[1\]: expected an integer, got bool"),
            (dict(activation="relu2"), ValueError, r"^activation: expected one of .*'relu'.*got str 'relu2'"),
            (dict(activation=["relu"]), ValueError, r"^activation: expected one name per hidden layer \(2\), got 1"),
            (dict(activation=["relu", "swish"]), ValueError, r"^activation: expected one of .*got str 'swish'"),
            (dict(activation=3), TypeError, r"^activation: expected a name or a list of names"),
            (
                dict(loss="hinge"),
                ValueError,
                r"^loss: expected one of \['cross_entropy', 'mse', 'binary_cross_entropy'\]",
            ),
            (dict(dtype="float16"), ValueError, r"^dtype: expected 'float32' or 'float64'"),
            (dict(dtype=np.int32), ValueError, r"^dtype: expected 'float32' or 'float64'"),
            (dict(init="xavier"), ValueError, r"^init: expected one of \['he_uniform'"),
            (dict(seed=-1), ValueError, r"^seed: expected a non-negative int.*, got -1"),
            (dict(seed=1.5), TypeError, r"^seed: expected a non-negative int.*, got float 1.5"),
            (dict(dtype=None), TypeError, r"^dtype: expected 'float32' or 'float64'.*got NoneType None"),
            (dict(dtype=3.5), TypeError, r"^dtype: expected 'float32' or 'float64'.*got float 3.5"),
            (dict(loss=1), TypeError, r"^loss: expected one of .*got int 1"),
            (dict(backend="tpu"), ValueError, r"^backend: expected one of \['cpu', 'numpy', 'gpu'\], got 'tpu'"),
            (dict(backend=None), TypeError, r"^backend: expected a backend name \(str\), got NoneType None"),
        ]
    ),
)
def test_bad_model_arguments(kwargs, exc, match):
    kw = dict(sizes=[3, 4, 5, 2])
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        mg.MLP(kw.pop("sizes"), **kw)


def test_numpy_dtypes_accepted_and_unavailable_backend_explains():
    assert mg.MLP([2, 2], dtype=np.float64, backend="numpy").dtype == np.float64
    assert mg.MLP([2, 2], dtype=np.dtype("float32"), backend="numpy").dtype == np.float32
    reason = mg.available_backends()["gpu"]
    assert reason
    with pytest.raises(mg.BackendUnavailable, match=r"backend 'gpu' is not available"):
        mg.MLP([2, 2], backend="gpu")
    with pytest.raises(ValueError, match=r"^backend: expected one of"):
        ce_model().to("tpu")


@pytest.mark.parametrize("path", ["numpy", "cpu"])
def test_params_assignment_copies_into_the_vector_and_keeps_the_views(path):
    """``model.params = a`` writes into the existing flat vector: weights/biases (views)
    and a reference held earlier see the new values, and training uses them."""
    m = make_model([3, 4, 2], path, dtype="float64", seed=0)
    held, w0 = m.params, m.weights[0]
    new = np.arange(m.n_params, dtype=np.float64) / 100
    m.params = new
    assert m.params is held and np.array_equal(held, new)
    assert np.array_equal(w0, new[:12].reshape(3, 4)) and np.array_equal(m.biases[1], new[-2:])
    new[0] = 99.0  # a copy, not an alias of the argument
    assert m.params[0] == 0.0
    m.params += 1.0  # in place, then the setter: a no-op
    assert m.params is held and m.weights[0][0, 1] == pytest.approx(1.01)
    ref = mg.MLP([3, 4, 2], dtype="float64", backend="numpy", seed=0)
    ref.params[...] = m.params
    assert np.allclose(m.forward(X64), ref.forward(X64))


@pytest.mark.parametrize(
    "value, exc, match",
    [
        (
            np.zeros(5),
            ValueError,
            r"^params: expected shape \(26,\) \(the model's n_params\), got array of shape \(5,\)",
        ),
        (np.zeros((26, 1)), ValueError, r"^params: expected shape \(26,\).*got array of shape \(26, 1\)"),
        (
            np.zeros(26, np.float32),
            TypeError,
            r"^params: expected dtype float64 \(the model's dtype\), got array of shape \(26,\) and dtype float32",
        ),
        ([0.0] * 26, TypeError, r"^params: expected a numpy.ndarray of shape \(26,\) and dtype float64, got list"),
        (_with(np.zeros(26), 3, np.nan), ValueError, r"^params: expected finite values, got 1 NaN/inf"),
        (np.ma.masked_array(np.zeros(26)), TypeError, r"^params: expected a numpy.ndarray"),
    ],
    ids=["length", "2-D", "float32", "list", "nan", "masked"],
)
def test_bad_params_assignment(value, exc, match):
    m = ce_model()
    before = m.params.copy()
    with pytest.raises(exc, match=match):
        m.params = value
    assert np.array_equal(m.params, before)


def test_cross_entropy_with_one_output_warns_that_it_cannot_learn():
    """One softmax output: the loss and gradient are identically 0 (a valid but degenerate
    model -- any width >= 1 is allowed); a DegenerateModelWarning says so and what to use."""
    with pytest.warns(
        mg.errors.DegenerateModelWarning,
        match=r"^loss: 'cross_entropy' with 1 output unit .*always 0.*"
        r"loss='binary_cross_entropy' with 1 output",
    ):
        m = mg.MLP([3, 4, 1], dtype="float64", backend="numpy")
    loss, g = m.loss_and_grad(X64, np.zeros(10, np.int64))
    assert loss == 0.0 and not g.any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mg.MLP([3, 4, 1], loss="binary_cross_entropy", backend="numpy")
        mg.MLP([3, 4, 1], loss="mse", backend="numpy")
        mg.MLP([3, 4, 2], backend="numpy")
        # said once, when the model is made: not again by copies, pickles or checkpoints
        import pickle

        m.copy(), m.to("cpu"), pickle.loads(pickle.dumps(m))
    assert mg.DegenerateModelWarning is mg.errors.DegenerateModelWarning


@pytest.mark.parametrize("path", ["numpy", "cpu"])
@pytest.mark.parametrize("where", ["params", "running"])
def test_non_finite_parameters_are_refused_by_evaluation_and_training(path, where):
    """NaN parameters used to pass: predict gave class 0 (argmax of NaN), evaluate a NaN
    loss with an accuracy, fit a DivergenceError at step 0 about 'last finite' parameters."""
    m = make_model([3, 4, 2], path, dtype="float64", seed=0, batch_norm=where == "running")
    getattr(m, where)[1] = np.nan
    match = (
        r"^params: expected finite parameters, got 1 NaN/inf entries in model.params"
        if where == "params"
        else r"^running: expected finite batch-norm running statistics, got 1 NaN/inf"
    )
    for call in (
        lambda: m.predict(X64),
        lambda: m.predict_proba(X64),
        lambda: m.forward(X64),
        lambda: m.evaluate(X64, Y_LAB),
        lambda: m.loss(X64, Y_LAB),
        lambda: m.score(X64, Y_LAB),
        lambda: m.loss_and_grad(X64, Y_LAB),
        lambda: mg.fit(m, X64, Y_LAB, batch_size=5, steps=1),
    ):
        with pytest.raises(ValueError, match=match):
            call()
    if where == "params":
        for call in (
            lambda: mg.grad_moments(m, X64, Y_LAB),
            lambda: mg.per_example_grads(m, X64, Y_LAB),
            lambda: mg.per_example_grad_norms(m, X64, Y_LAB),
        ):
            with pytest.raises(ValueError, match=match):
                call()


# ============================================================================ X and y
def _eval_calls(model):
    """Every public entry point that takes (X, y)."""
    return {
        "loss": lambda X, y: model.loss(X, y),
        "loss_and_grad": lambda X, y: model.loss_and_grad(X, y),
        "evaluate": lambda X, y: model.evaluate(X, y),
        "fit": lambda X, y: mg.fit(model, X, y, batch_size=2, steps=1),
    }


BAD_X = [
    ("list", X64.tolist(), TypeError, r"^X: expected a numpy.ndarray, got list"),
    ("1-D", X64[:, 0].copy(), ValueError, r"^X: expected a 2-D array \(n_examples, 3\), got array of shape \(10,\)"),
    ("3-D", X64[:, :, None], ValueError, r"^X: expected a 2-D array"),
    (
        "wrong-columns",
        X64[:, :2],
        ValueError,
        r"^X: expected 3 columns \(the model's input size\), got array of shape \(10, 2\)",
    ),
    (
        "float32-for-float64-model",
        X64.astype(np.float32),
        TypeError,
        r"^X: expected dtype float64 \(the model's dtype\), got .* float32",
    ),
    ("int", X64.astype(np.int64), TypeError, r"^X: expected dtype float64"),
    ("nan", _with(X64, 4, np.nan), ValueError, r"^X: expected finite values, got 1 NaN/inf entries"),
    ("inf", _with(X64, 7, -np.inf), ValueError, r"^X: expected finite values, got 1 NaN/inf entries"),
]


@pytest.mark.parametrize("call", ["loss", "loss_and_grad", "evaluate", "fit"])
@pytest.mark.parametrize("name, X, exc, match", BAD_X, ids=[b[0] for b in BAD_X])
def test_bad_X(call, name, X, exc, match):
    with pytest.raises(exc, match=match):
        _eval_calls(ce_model())[call](X, Y_LAB)


@pytest.mark.parametrize("name, X, exc, match", BAD_X, ids=[b[0] for b in BAD_X])
def test_bad_X_forward_predict(name, X, exc, match):
    m = ce_model()
    for f in (m.forward, m.predict, m.predict_proba):
        with pytest.raises(exc, match=match):
            f(X)


def test_empty_X():
    with pytest.raises(ValueError, match=r"^X: expected at least one example"):
        ce_model().forward(X64[:0])


def test_float32_model_rejects_float64_X_and_y():
    m = mg.MLP([3, 2], loss="mse", dtype="float32", backend="numpy")
    with pytest.raises(TypeError, match=r"^X: expected dtype float32 \(the model's dtype\), got .*float64; convert"):
        m.forward(X64)
    with pytest.raises(TypeError, match=r"^y: expected dtype float32 \(the model's dtype\), got .*float64"):
        m.loss(X64.astype(np.float32), Y_REG)


BAD_Y_CE = [
    (
        "too-short",
        Y_LAB[:5],
        ValueError,
        r"^y: expected integer class labels of shape \(10,\), got array of shape \(5,\)",
    ),
    ("too-long", np.r_[Y_LAB, 0], ValueError, r"^y: expected integer class labels of shape \(10,\)"),
    (
        "column-vector",
        Y_LAB[:, None],
        ValueError,
        r"^y: expected integer class labels of shape \(10,\), got array of shape \(10, 1\)",
    ),
    (
        "float-labels",
        Y_LAB.astype(np.float64),
        TypeError,
        r"^y: expected integer class labels for loss 'cross_entropy', got .*float64",
    ),
    ("bool-labels", Y_LAB.astype(bool), TypeError, r"^y: expected integer class labels"),
    ("negative", Y_LAB - 1, ValueError, r"^y: expected class labels in \[0, 2\), got values in \[-1, 0\]"),
    ("too-large", Y_LAB + 1, ValueError, r"^y: expected class labels in \[0, 2\), got values in \[1, 2\]"),
    ("list", Y_LAB.tolist(), TypeError, r"^y: expected a numpy.ndarray"),
]


@pytest.mark.parametrize("call", ["loss", "loss_and_grad", "evaluate", "fit"])
@pytest.mark.parametrize("name, y, exc, match", BAD_Y_CE, ids=[b[0] for b in BAD_Y_CE])
def test_bad_y_cross_entropy(call, name, y, exc, match):
    with pytest.raises(exc, match=match):
        _eval_calls(ce_model())[call](X64, y)


def test_other_integer_label_dtypes_are_accepted():
    m = ce_model()
    ref = m.loss(X64, Y_LAB)
    for dt in (np.int32, np.int8, np.uint8):
        assert m.loss(X64, Y_LAB.astype(dt)) == ref


BAD_Y_REG = [
    (
        "mse",
        "wrong-width",
        Y_REG[:, :1].repeat(3, 1),
        ValueError,
        r"^y: expected targets of shape \(10, 2\), got array of shape \(10, 3\)",
    ),
    (
        "mse",
        "1-D-for-2-outputs",
        Y_REG[:, 0].copy(),
        ValueError,
        r"^y: expected targets of shape \(10, 2\), got array of shape \(10,\)",
    ),
    ("mse", "wrong-length", Y_REG[:4], ValueError, r"^y: expected targets of shape \(10, 2\)"),
    ("mse", "nan", _with(Y_REG, 3, np.nan), ValueError, r"^y: expected finite values"),
    ("mse", "inf", _with(Y_REG, 3, np.inf), ValueError, r"^y: expected finite values"),
    ("mse", "int-targets", Y_REG.astype(np.int64), TypeError, r"^y: expected dtype float64"),
    (
        "binary_cross_entropy",
        "above-1",
        np.full((10, 2), 2.0),
        ValueError,
        r"^y: expected targets in \[0, 1\] for 'binary_cross_entropy'",
    ),
    ("binary_cross_entropy", "negative", np.full((10, 2), -0.5), ValueError, r"^y: expected targets in \[0, 1\]"),
    ("binary_cross_entropy", "int-labels", np.ones((10, 2), np.int64), TypeError, r"^y: expected dtype float64"),
]


@pytest.mark.parametrize("call", ["loss", "loss_and_grad", "evaluate", "fit"])
@pytest.mark.parametrize("loss, name, y, exc, match", BAD_Y_REG, ids=[f"{b[0]}-{b[1]}" for b in BAD_Y_REG])
def test_bad_y_regression_targets(call, loss, name, y, exc, match):
    m = mse_model() if loss == "mse" else bce_model()
    with pytest.raises(exc, match=match):
        _eval_calls(m)[call](X64, y)


def test_one_output_accepts_1d_targets():
    m = mg.MLP([3, 1], loss="mse", dtype="float64", backend="numpy")
    y = Y_REG[:, 0].copy()
    assert m.loss(X64, y) == m.loss(X64, y[:, None])


def test_predict_proba_needs_a_classifier():
    with pytest.raises(ValueError, match=r"^predict_proba: expected a classification loss, the model's loss is 'mse'"):
        mse_model().predict_proba(X64)


def test_validation_set_errors_name_it():
    m = ce_model()
    with pytest.raises(ValueError, match=r"^validation X: expected 3 columns"):
        mg.fit(m, X64, Y_LAB, batch_size=2, validation=(X64[:, :2], Y_LAB))
    with pytest.raises(ValueError, match=r"^validation y: expected class labels in \[0, 2\)"):
        mg.fit(m, X64, Y_LAB, batch_size=2, validation=(X64, Y_LAB + 5))
    with pytest.raises(TypeError, match=r"^validation: expected a pair \(X_val, y_val\)"):
        mg.fit(m, X64, Y_LAB, batch_size=2, validation=X64)


# ============================================================================ fit arguments
@pytest.mark.parametrize(
    "batch_size, exc, match",
    [
        (0, ValueError, r"^batch_size: expected a positive int, got 0"),
        (-3, ValueError, r"^batch_size: expected a positive int, got -3"),
        (
            2.0,
            TypeError,
            r"^batch_size: expected a positive int, 'full', 'adaptive', a BatchSizeSchedule or an AdaptiveBatchSize, got float",
        ),
        (2.5, TypeError, r"^batch_size: expected a positive int"),
        (
            True,
            TypeError,
            r"^batch_size: expected a positive int, 'full', 'adaptive', a BatchSizeSchedule or an AdaptiveBatchSize, got bool",
        ),
        (None, TypeError, r"^batch_size: expected a positive int"),
        ("auto", ValueError, r"^batch_size: expected a positive int, 'full', 'adaptive', .*, got (str )?'auto'"),
        (11, ValueError, r"^batch_size: expected at most the number of examples \(10\), got 11; use batch_size='full'"),
        (
            mg.BatchSizeSchedule(4, {1: 20}),
            ValueError,
            r"^batch_size: expected batch sizes <= the number of examples \(10\), got 20",
        ),
    ],
    ids=["zero", "negative", "float-int", "float", "bool", "none", "string", "larger-than-N", "schedule-larger-than-N"],
)
def test_bad_batch_size(batch_size, exc, match):
    with pytest.raises(exc, match=match):
        mg.fit(ce_model(), X64, Y_LAB, batch_size=batch_size, epochs=1)


def test_good_batch_sizes():
    for bs in (1, np.int64(3), 10, "full"):
        h = mg.fit(ce_model(), X64, Y_LAB, batch_size=bs, steps=1)
        assert h.column("batch_size")[0] == (10 if bs == "full" else int(bs))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    _cases(
        [
            (dict(epochs=0), ValueError, r"^epochs: expected an integer >= 1, got 0"),
            (dict(epochs=1.5), TypeError, r"^epochs: expected an integer, got float"),
            (dict(epochs=True), TypeError, r"^epochs: expected an integer, got bool"),
            (dict(steps=-1), ValueError, r"^steps: expected an integer >= 1, got -1"),
            (dict(steps=2.5), TypeError, r"^steps: expected an integer"),
            (dict(examples=0), ValueError, r"^examples: expected an integer >= 1"),
            (
                dict(sampler="random"),
                ValueError,
                r"^sampler: expected one of \['shuffle', 'replacement', 'sequential'\], got str 'random'",
            ),
            (dict(sampler=None), TypeError, r"^sampler: expected one of .*got NoneType None"),
            (dict(drop_last=1), TypeError, r"^drop_last: expected a bool, got int"),
            (dict(eval_every=0), ValueError, r"^eval_every: expected an integer >= 1"),
            (dict(max_time=0), ValueError, r"^max_time: expected a positive number of seconds"),
            (dict(seed=-1), ValueError, r"^seed: expected a non-negative int"),
            (dict(seed="0"), TypeError, r"^seed: expected a non-negative int"),
            (dict(optimizer="sgd"), TypeError, r"^optimizer: expected a minigd optimizer"),
            (dict(target=0.9), TypeError, r"^target: expected a dict like"),
            (dict(target={}), TypeError, r"^target: expected a dict like"),
            (dict(target={"accuracy": 0.9}), ValueError, r"^target metric: expected one of \['val_loss'"),
            (
                dict(target={"train_loss": float("nan")}),
                ValueError,
                r"^target\['train_loss'\]: expected a finite number",
            ),
            (
                dict(target={"train_accuracy": True}),
                ValueError,
                r"^target\['train_accuracy'\]: expected a finite number",
            ),
            (dict(target={"val_accuracy": 0.9}), ValueError, r"^target: \['val_accuracy'\] needs validation="),
        ]
    ),
)
def test_bad_fit_arguments(kwargs, exc, match):
    kw = dict(batch_size=2, epochs=1)
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        mg.fit(ce_model(), X64, Y_LAB, **kw)


def test_accuracy_target_needs_a_classifier():
    with pytest.raises(ValueError, match=r"^target: accuracy needs a classification loss"):
        mg.fit(mse_model(), X64, Y_REG, batch_size=2, target={"train_accuracy": 0.5})


def test_fit_validates_before_touching_the_model():
    m = ce_model()
    before = m.params.copy()
    with pytest.raises(ValueError):
        mg.fit(m, X64, Y_LAB, batch_size=2, epochs=1, sampler="bogus")
    assert np.array_equal(m.params, before)


# ============================================================================ optimizer arguments
@pytest.mark.parametrize(
    "make, exc, match",
    [
        pytest.param(lambda: mg.SGD(lr=-0.1), ValueError, r"^lr: expected a number >= 0, got -0.1", id="SGD(lr=-0.1)"),
        pytest.param(
            lambda: mg.SGD(lr=float("nan")), ValueError, r"^lr: expected a finite number", id="SGD(lr=float('nan'))"
        ),
        pytest.param(
            lambda: mg.SGD(lr="0.1"),
            TypeError,
            r"^lr: expected a real number.* or a schedule .*, got str",
            id="SGD(lr='0.1')",
        ),
        pytest.param(
            lambda: mg.SGD(momentum=1.0), ValueError, r"^momentum: expected a number < 1", id="SGD(momentum=1.0)"
        ),
        pytest.param(
            lambda: mg.SGD(momentum=-0.5), ValueError, r"^momentum: expected a number >= 0", id="SGD(momentum=-0.5)"
        ),
        pytest.param(
            lambda: mg.SGD(nesterov=True),
            ValueError,
            r"^nesterov: expected momentum > 0 with nesterov=True",
            id="SGD(nesterov=True)",
        ),
        pytest.param(
            lambda: mg.SGD(momentum=0.9, nesterov="yes"),
            TypeError,
            r"^nesterov: expected a bool",
            id="SGD(momentum=0.9, nesterov='yes')",
        ),
        pytest.param(
            lambda: mg.SGD(weight_decay=-1e-4),
            ValueError,
            r"^weight_decay: expected a number >= 0",
            id="SGD(weight_decay=-1e-4)",
        ),
        pytest.param(
            lambda: mg.SGD(weight_decay=0.1, decoupled_weight_decay="yes"),
            TypeError,
            r"^decoupled_weight_decay: expected a bool",
            id="SGD(weight_decay=0.1, decoupled_weight_decay='yes')",
        ),
        pytest.param(
            lambda: mg.SGD(clip_norm=0), ValueError, r"^clip_norm: expected a number > 0", id="SGD(clip_norm=0)"
        ),
        pytest.param(
            lambda: mg.SGD(clip_norm=-1.0), ValueError, r"^clip_norm: expected a number > 0", id="SGD(clip_norm=-1.0)"
        ),
        pytest.param(
            lambda: mg.Adam(clip_norm="1"), TypeError, r"^clip_norm: expected a real number", id="Adam(clip_norm='1')"
        ),
        pytest.param(lambda: mg.Adam(lr=-1e-3), ValueError, r"^lr: expected a number >= 0", id="Adam(lr=-1e-3)"),
        pytest.param(
            lambda: mg.Adam(betas=(1.0, 0.999)),
            ValueError,
            r"^betas\[0\]: expected a number < 1",
            id="Adam(betas=(1.0, 0.999))",
        ),
        pytest.param(
            lambda: mg.Adam(betas=(0.9, -0.1)),
            ValueError,
            r"^betas\[1\]: expected a number >= 0",
            id="Adam(betas=(0.9, -0.1))",
        ),
        pytest.param(lambda: mg.Adam(betas=0.9), TypeError, r"^betas: expected a pair", id="Adam(betas=0.9)"),
        pytest.param(lambda: mg.Adam(betas=(0.9,)), TypeError, r"^betas: expected a pair", id="Adam(betas=(0.9,))"),
        pytest.param(lambda: mg.Adam(eps=0.0), ValueError, r"^eps: expected a number > 0", id="Adam(eps=0.0)"),
        pytest.param(
            lambda: mg.Adam(weight_decay=-1.0),
            ValueError,
            r"^weight_decay: expected a number >= 0",
            id="Adam(weight_decay=-1.0)",
        ),
        pytest.param(
            lambda: mg.AdamW(betas=(0.9, 1.5)),
            ValueError,
            r"^betas\[1\]: expected a number < 1",
            id="AdamW(betas=(0.9, 1.5))",
        ),
        pytest.param(
            lambda: mg.AdamW(weight_decay=float("inf")),
            ValueError,
            r"^weight_decay: expected a finite number",
            id="AdamW(weight_decay=float('inf'))",
        ),
        pytest.param(
            lambda: mg.optim.chain("sgd", lr=0.1),
            TypeError,
            r"^chain: expected minigd.optim primitives",
            id="chain('sgd')",
        ),
        pytest.param(
            lambda: mg.optim.trace(0.9, nesterov=1),
            TypeError,
            r"^nesterov: expected a bool",
            id="trace(0.9, nesterov=1)",
        ),
        pytest.param(
            lambda: mg.optim.clip_by_global_norm(0.0),
            ValueError,
            r"^max_norm: expected a number > 0",
            id="clip_by_global_norm(0.0)",
        ),
        pytest.param(
            lambda: mg.optim.scale_by_adam(b1=1.0),
            ValueError,
            r"^b1: expected a number < 1",
            id="scale_by_adam(b1=1.0)",
        ),
        pytest.param(
            lambda: mg.optim.scale(float("nan")),
            ValueError,
            r"^factor: expected a finite number",
            id="scale(float('nan'))",
        ),
    ],
)
def test_bad_optimizer_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# ============================================================================ divergence
def _diverging_problem(dtype):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(20, 3)).astype(dtype)
    y = rng.normal(size=20).astype(dtype)
    return X, y


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the numpy reference overflows loudly
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("batch_size", [4, "full"])
@pytest.mark.parametrize("path", BACKEND_PATHS)
def test_divergence_raises_with_last_finite_params(path, batch_size, dtype):
    X, y = _diverging_problem(dtype)
    kw = dict(batch_size=batch_size, epochs=10_000, optimizer=mg.SGD(lr=50.0, momentum=0.9), seed=1)
    model = make_model([3, 4, 1], path, activation="tanh", loss="mse", dtype=dtype, seed=0)
    with pytest.raises(mg.DivergenceError, match=r"training diverged at step \d+") as info:
        mg.fit(model, X, y, **kw)
    err = info.value
    assert isinstance(err, FloatingPointError)
    assert err.step > 0  # a few steps of growth before the overflow
    assert err.params.dtype == np.dtype(dtype) and np.isfinite(err.params).all()
    assert err.params is not model.params
    # the failing update was not applied to the model either
    assert np.array_equal(model.params, err.params)
    assert err.history is not None and err.history.n_steps == err.step
    assert err.history.stop_reason == "diverged"
    # re-run to just before the failing step: the same parameters, bit for bit
    again = make_model([3, 4, 1], path, activation="tanh", loss="mse", dtype=dtype, seed=0)
    mg.fit(again, X, y, steps=err.step, **kw)
    assert np.array_equal(again.params, err.params)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("path", BACKEND_PATHS)
def test_divergence_at_the_first_step_keeps_initial_params(path):
    X, y = _diverging_problem("float64")
    model = make_model([3, 1], path, loss="mse", dtype="float64", seed=0)
    model.params[...] = 1e300  # the very first loss overflows
    init = model.params.copy()
    with pytest.raises(mg.DivergenceError) as info:
        mg.fit(model, X, y, batch_size=4, epochs=1)
    assert info.value.step == 0
    assert np.array_equal(info.value.params, init) and np.array_equal(model.params, init)
    assert not np.isfinite(info.value.loss)
