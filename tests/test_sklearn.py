"""The scikit-learn estimators: the estimator checks (every one of them passes), the dtype
convention (the model follows the input's dtype unless ``dtype=`` says otherwise), the
ecosystem (Pipeline, GridSearchCV, cross_val_score, pickle) and minigd's own options (batch
size, LR scaling, noise tracking, partial_fit)."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import MinMaxScaler, StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import check_estimator, parametrize_with_checks  # noqa: E402

import minigd as mg  # noqa: E402
from minigd.sklearn import MLPClassifier, MLPRegressor  # noqa: E402


# No expected failures: the default estimators follow the input's dtype, so the checks'
# float64 data train float64 models, whose predictions do not depend on how the rows are
# batched (a float32 model's do, at ~1e-7 relative: BLAS rounds a row's dot products by
# the GEMM's shape, above check_methods_subset_invariance's rtol=1e-7 -- the one check
# MLPRegressor failed when the default dtype was float32).
@parametrize_with_checks(
    [
        MLPClassifier(),
        MLPClassifier(optimizer="sgd", learning_rate=0.01),
        MLPRegressor(),
        MLPRegressor(activation="tanh"),
    ]
)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # batch_size clipped on tiny data sets
        check(estimator)


def test_check_estimator_passes_every_check():
    """``check_estimator`` on both default estimators: not one failure (issue 20: 108 of
    108 checks with scikit-learn 1.9, of which a few are skipped by scikit-learn itself when
    an optional package -- pandas, array-api-compat -- is missing)."""
    total, failed = 0, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for est in (MLPClassifier(), MLPRegressor()):
            results = check_estimator(est, on_fail=None)
            total += len(results)
            failed += [
                (type(est).__name__, r["check_name"], repr(r["exception"])[:300])
                for r in results
                if r["status"] == "failed"
            ]
            assert all(r["status"] in ("passed", "skipped") for r in results)
    assert not failed, failed
    assert total >= 100, total  # both estimators' full lists ran (108 with sklearn 1.9)


def test_dtype_follows_the_input_unless_given():
    """dtype=None: float32 in -> float32 model, float64 in -> float64, anything else (ints,
    lists, bools) -> float64, as scikit-learn's estimators do; an explicit dtype wins; later
    inputs (predict, partial_fit) are cast to the fitted model's dtype."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    y = (X[:, 0] > 0).astype(int)
    kw = dict(hidden_layer_sizes=(4,), epochs=1, random_state=0)
    for Xin, expect in [
        (X, np.float64),
        (X.astype(np.float32), np.float32),
        ((X * 10).astype(np.int64), np.float64),
        ((X * 10).astype(np.int32), np.float64),
        (X.tolist(), np.float64),
        (X > 0, np.float64),
        (X.astype(np.float16), np.float64),
    ]:
        for Est, t in ((MLPClassifier, y), (MLPRegressor, X[:, 1])):
            est = Est(**kw).fit(Xin, t)
            assert est.model_.dtype == expect, (Est.__name__, np.asarray(Xin).dtype)
            # predictions come out in float64 whatever the model computes in
            assert est.predict(X).shape == (40,)
    for dt in ("float32", "float64", np.float32, np.dtype("float64")):
        for Xin in (X, X.astype(np.float32), (X * 10).astype(np.int64)):
            assert MLPRegressor(dtype=dt, **kw).fit(Xin, X[:, 1]).model_.dtype == np.dtype(dt)
    # the float64 model is the float32 one's computation in float64: same start, same data
    a = MLPRegressor(**kw).fit(X.astype(np.float32), X[:, 1])
    b = MLPRegressor(**kw).fit(X.astype(np.float32).astype(np.float64), X[:, 1])
    assert a.model_.dtype == np.float32 and b.model_.dtype == np.float64
    np.testing.assert_allclose(a.predict(X), b.predict(X), rtol=1e-4, atol=1e-5)
    # partial_fit: the first call decides, later calls (of any dtype) are cast to it
    reg = MLPRegressor(**kw).partial_fit(X.astype(np.float32), X[:, 1])
    reg.partial_fit(X, X[:, 1])
    reg.partial_fit((X * 10).astype(np.int64), X[:, 1])
    assert reg.model_.dtype == np.float32 and reg.n_iter_ == 3
    # predict on float32 input with a float64 model: cast up, same numbers as float64 input
    m64 = MLPClassifier(**kw).fit(X, y)
    np.testing.assert_array_equal(
        m64.predict_proba(X.astype(np.float32)), m64.predict_proba(X.astype(np.float32).astype(np.float64))
    )
    with pytest.raises(TypeError, match=r"^dtype: expected 'float32' or 'float64'.*got int 32"):
        MLPClassifier(dtype=32, **kw).fit(X, y)
    with pytest.raises(ValueError, match=r"^dtype: expected 'float32' or 'float64', got str 'float16'"):
        MLPClassifier(dtype="float16", **kw).fit(X, y)


@pytest.mark.parametrize("hidden", [(), (5,)])
def test_small_regressors_pass_the_training_check_with_a_larger_budget(hidden):
    """README: with the default budget (20 epochs of Adam at 1e-3) a linear or 5-unit
    regressor underfits check_regressors_train's data (R^2 <= 0.5, as scikit-learn's own
    MLPRegressor((5,)) does); a 10x learning rate is enough (the check seeds random_state=0)."""
    from sklearn.utils.estimator_checks import check_regressors_train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(AssertionError):
            check_regressors_train("MLPRegressor", MLPRegressor(hidden_layer_sizes=hidden))
        check_regressors_train("MLPRegressor", MLPRegressor(hidden_layer_sizes=hidden, learning_rate=0.01))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return X[:600], y[:600]


def test_pipeline_cross_val_score_and_grid_search(digits):
    X, y = digits
    pipe = make_pipeline(MinMaxScaler(), MLPClassifier((32,), epochs=8, learning_rate=0.01, random_state=0))
    scores = cross_val_score(pipe, X, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.8
    grid = GridSearchCV(
        pipe, {"mlpclassifier__batch_size": [16, "full"], "mlpclassifier__lr_policy": ["constant", "sqrt"]}, cv=2
    )
    grid.fit(X, y)
    assert set(grid.best_params_) == {"mlpclassifier__batch_size", "mlpclassifier__lr_policy"}
    assert grid.best_estimator_.score(X, y) > 0.8
    assert grid.cv_results_["mean_test_score"].shape == (4,)


def test_classifier_labels_probabilities_and_fitted_state(digits):
    X, y = digits
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    clf = MLPClassifier((32,), epochs=10, learning_rate=0.01, random_state=0)
    clf.fit(X / 16.0, names[y])
    assert clf.classes_.tolist() == sorted(names.tolist())
    P = clf.predict_proba(X / 16.0)
    assert P.dtype == np.float64 and P.shape == (len(X), 10)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=1e-12)
    assert np.array_equal(clf.predict(X / 16.0), clf.classes_[P.argmax(axis=1)])
    np.testing.assert_allclose(clf.predict_log_proba(X / 16.0), np.log(P), atol=1e-10)
    assert clf.score(X / 16.0, names[y]) > 0.9
    assert clf.n_features_in_ == 64 and clf.n_iter_ == 10 and len(clf.loss_curve_) == 10
    assert clf.t_ == 10 * len(X) and clf.batch_size_ == 32 and clf.noise_scale_ is None
    assert isinstance(clf.model_, mg.MLP) and clf.model_.sizes == (64, 32, 10)
    assert isinstance(clf.history_, mg.History) and clf.history_.n_steps == 10 * 19
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]


def test_input_conversion_is_explicit(digits):
    X, y = digits
    clf = MLPClassifier((8,), epochs=2, random_state=0)
    clf.fit(X.tolist(), y.tolist())  # lists, int pixels
    assert clf.model_.dtype == np.float64  # other inputs -> float64
    p1 = clf.predict_proba(X.astype(np.int32))
    p2 = clf.predict_proba(X.astype(np.float64))
    assert np.array_equal(p1, p2)
    clf32 = MLPClassifier((8,), epochs=2, random_state=0, dtype="float32").fit(X.tolist(), y)
    assert clf32.model_.dtype == np.float32
    with pytest.raises(ValueError, match=r"^X: 1 values overflow float32"):
        clf32.predict(np.where(np.arange(X.size).reshape(X.shape) == 7, 1e300, X))
    assert clf.predict(X[:3] * 1e300).shape == (3,)
    with pytest.raises(ValueError, match=r"X has 3 features, but MLPClassifier is expecting 64"):
        clf.predict(X[:, :3])


def test_regressor_single_and_multi_output():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4))
    Y = np.stack([X @ [1.0, -1.0, 0.5, 0.0], np.sin(X[:, 0])], axis=1)
    reg = MLPRegressor((32,), epochs=40, random_state=0).fit(X, Y[:, 0])
    assert reg.predict(X).shape == (300,) and reg.predict(X).dtype == np.float64
    assert reg.score(X, Y[:, 0]) > 0.9 and reg.n_outputs_ == 1
    reg2 = make_pipeline(StandardScaler(), MLPRegressor((32,), epochs=40, random_state=0)).fit(X, Y)
    assert reg2.predict(X).shape == (300, 2) and reg2.score(X, Y) > 0.8


def test_batch_size_and_learning_rate_scaling(digits):
    X, y = digits
    X = X / 16.0
    for policy, expect in (("constant", 0.01), ("linear", 0.01 * 128 / 32), ("sqrt", 0.01 * 2.0)):
        clf = MLPClassifier(
            (8,),
            optimizer="sgd",
            learning_rate=0.01,
            lr_policy=policy,
            base_batch_size=32,
            batch_size=128,
            epochs=1,
            random_state=0,
        ).fit(X, y)
        assert clf.batch_size_ == 128 and clf.learning_rate_ == pytest.approx(expect)
        assert np.all(clf.history_.column("lr") == clf.learning_rate_)
    clf = MLPClassifier((8,), batch_size="full", epochs=3, random_state=0).fit(X, y)
    assert clf.batch_size_ == len(X) and clf.history_.n_steps == 3
    with pytest.warns(UserWarning, match=r"batch_size=5000 is larger than the number of samples \(600\)"):
        clf = MLPClassifier((8,), batch_size=5000, epochs=1, random_state=0).fit(X, y)
    assert clf.batch_size_ == 600


def test_noise_tracking(digits):
    X, y = digits
    clf = MLPClassifier((16,), batch_size=64, epochs=3, track_noise=1, random_state=0).fit(X / 16.0, y)
    assert np.isfinite(clf.noise_scale_) and clf.noise_scale_ > 0
    assert clf.noise_scale_ == clf.history_.noise_tracker.noise_scale
    assert len(clf.history_.noise) == clf.history_.n_steps
    with pytest.raises(ValueError, match=r"^track_noise: needs batches of at least 2"):
        MLPClassifier((4,), batch_size=1, epochs=1, track_noise=True).fit(X[:20] / 16.0, y[:20])


def test_partial_fit_continues_model_and_optimizer(digits):
    X, y = digits
    X = X / 16.0
    clf = MLPClassifier((32,), random_state=0)
    with pytest.raises(ValueError, match=r"classes must be passed on the first call"):
        clf.partial_fit(X[:100], y[:100])
    losses = []
    for _epoch in range(4):
        for s in range(0, len(X), 150):
            clf.partial_fit(X[s : s + 150], y[s : s + 150], classes=np.arange(10))
        losses.append(clf.model_.loss(X.astype(clf.model_.dtype), y))
    assert losses[-1] < losses[0]
    assert clf.n_iter_ == 16 and len(clf.loss_curve_) == 16 and clf.t_ == 4 * len(X)
    assert clf.history_.opt_state.t == 4 * 4 * 5  # 150 rows / 32 -> 5 steps per call
    with pytest.raises(ValueError, match=r"^y: expected labels among classes_"):
        clf.partial_fit(X[:10], np.full(10, 11))
    reg = MLPRegressor((8,), random_state=0)
    for _ in range(3):
        reg.partial_fit(X[:200], y[:200].astype(float))
    assert reg.n_iter_ == 3
    with pytest.raises(ValueError, match=r"^y: expected 1 output column"):
        reg.partial_fit(X[:10], np.zeros((10, 2)))


def test_pickle_clone_and_params(digits):
    X, y = digits
    clf = MLPClassifier((8,), epochs=2, random_state=0, track_noise=5).fit(X, y)
    back = pickle.loads(pickle.dumps(clf))
    assert np.array_equal(back.predict_proba(X), clf.predict_proba(X))
    assert all(np.shares_memory(w, back.model_.params) for w in back.model_.weights)
    back.partial_fit(X, y)  # training goes on after unpickling
    assert back.n_iter_ == 3
    c = clone(clf)
    assert c.get_params() == clf.get_params() and not hasattr(c, "model_")
    c.set_params(hidden_layer_sizes=(4, 4), activation="tanh")
    assert c.fit(X, y).model_.sizes == (64, 4, 4, 10)
    assert sorted(clf.get_params()) == sorted(
        [
            "hidden_layer_sizes",
            "activation",
            "optimizer",
            "learning_rate",
            "lr_policy",
            "base_batch_size",
            "momentum",
            "weight_decay",
            "batch_size",
            "epochs",
            "sampler",
            "init",
            "backend",
            "dtype",
            "random_state",
            "track_noise",
            "noise_beta",
            "batch_norm",
            "ghost_batch_size",
            "dropout",
            "verbose",
        ]
    )


def test_random_state_makes_fits_reproducible(digits):
    X, y = digits
    a = MLPClassifier((8,), epochs=2, random_state=3).fit(X, y)
    b = MLPClassifier((8,), epochs=2, random_state=3).fit(X, y)
    c = MLPClassifier((8,), epochs=2, random_state=4).fit(X, y)
    assert np.array_equal(a.model_.params, b.model_.params)
    assert not np.array_equal(a.model_.params, c.model_.params)


@pytest.mark.parametrize(
    "params, exc, match",
    [
        (dict(hidden_layer_sizes=(8, 0)), ValueError, r"^hidden_layer_sizes\[1\]: expected an integer >= 1"),
        (dict(hidden_layer_sizes=0), ValueError, r"^hidden_layer_sizes: expected an integer >= 1, got 0"),
        (dict(hidden_layer_sizes=(8, 2.5)), TypeError, r"^hidden_layer_sizes\[1\]: expected an integer, got float"),
        (dict(hidden_layer_sizes="8"), TypeError, r"^hidden_layer_sizes: expected an int or a sequence"),
        (dict(activation=3), TypeError, r"^activation: expected one of .*got int 3"),
        (dict(optimizer=None), TypeError, r"^optimizer: expected one of \['sgd', 'adam'\], got NoneType"),
        (dict(momentum="0.9"), TypeError, r"^momentum: expected a real number, got str"),
        (dict(weight_decay=-1.0), ValueError, r"^weight_decay: expected a number >= 0, got -1.0"),
        (dict(base_batch_size=0), ValueError, r"^base_batch_size: expected an integer >= 1, got 0"),
        (dict(noise_beta=1.0), ValueError, r"^noise_beta: expected a number < 1, got 1.0"),
        (dict(noise_beta="x"), TypeError, r"^noise_beta: expected a real number, got str"),
        (dict(track_noise=2.5), TypeError, r"^track_noise: expected None, a bool or an integer >= 1, got float"),
        (dict(random_state=1.5), TypeError, r"^random_state: expected None, an int"),
        (dict(sampler=3), TypeError, r"^sampler: expected one of"),
        (dict(backend=None), TypeError, r"^backend: expected a backend name"),
        (dict(dropout="0.1"), TypeError, r"^dropout: expected a probability in \[0, 1\), got str"),
        (dict(batch_norm=1), TypeError, r"^batch_norm: expected False, True, 'before' or 'after', got int 1"),
        (dict(activation="swish"), ValueError, r"^activation: expected one of"),
        (dict(optimizer="lbfgs"), ValueError, r"^optimizer: expected one of \['sgd', 'adam'\]"),
        (dict(learning_rate=0.0), ValueError, r"^learning_rate: expected a number > 0"),
        (dict(learning_rate="fast"), TypeError, r"^learning_rate: expected a real number"),
        (dict(lr_policy="cubic"), ValueError, r"^lr_policy: expected one of"),
        (dict(momentum=1.0), ValueError, r"^momentum: expected a number < 1"),
        (dict(batch_size=0), ValueError, r"^batch_size: expected an integer >= 1"),
        (dict(batch_size="half"), ValueError, r"^batch_size: expected a positive int, 'auto', 'full' or 'adaptive'"),
        (
            dict(batch_size=2.5),
            TypeError,
            r"^batch_size: expected a positive int, 'auto', 'full' or 'adaptive', got float 2.5",
        ),
        (dict(epochs=0), ValueError, r"^epochs: expected an integer >= 1"),
        (dict(dtype="float16"), ValueError, r"^dtype: expected 'float32' or 'float64'"),
        (dict(backend="tpu"), ValueError, r"^backend: expected one of"),
        (dict(sampler="random"), ValueError, r"^sampler: expected one of"),
        (dict(track_noise=0), ValueError, r"^track_noise: expected an integer >= 1"),
        (dict(random_state=-1), ValueError, r"^random_state: expected None, an int"),
        (dict(verbose="yes"), TypeError, r"^verbose: expected a bool"),
        (dict(batch_norm="sometimes"), ValueError, r"^batch_norm: expected False, True, 'before' or 'after'"),
        (dict(ghost_batch_size=4), ValueError, r"^ghost_batch_size: needs batch_norm"),
        (dict(batch_norm=True, ghost_batch_size=1), ValueError, r"^ghost_batch_size: expected an integer >= 2, got 1"),
        (dict(hidden_layer_sizes=(), batch_norm=True), ValueError, r"^batch_norm: normalises hidden layers"),
        (dict(dropout=1.0), ValueError, r"^dropout: expected a probability in \[0, 1\)"),
    ],
)
@pytest.mark.parametrize("Est", [MLPClassifier, MLPRegressor])
def test_bad_hyper_parameters_fail_in_fit_naming_the_parameter(Est, params, exc, match):
    X = np.random.default_rng(0).normal(size=(20, 3))
    y = np.arange(20) % 2
    est = Est(**params)  # __init__ never validates
    with pytest.raises(exc, match=match):
        est.fit(X, y)


def test_batch_norm_and_dropout_estimators(digits):
    X, y = digits
    X = X[:401]
    y = y[:401]
    kw = dict(optimizer="sgd", learning_rate=0.1, epochs=3, random_state=0)
    # 401 = 4 * 100 + 1: the last batch of 1 row has no variance -> dropped every epoch
    bn = MLPClassifier((32,), batch_norm=True, batch_size=100, **kw).fit(X, y)
    assert bn.history_.n_steps == 3 * 4 and bn.model_.batch_norm is True
    assert not np.array_equal(bn.model_.running_var[0], np.ones(32, np.float32))  # updated by fit
    # ghost batches of 8 with batch 100 (last ghost of 4 rows) and dropout: all 5 batches kept
    gh = MLPClassifier((32,), batch_norm=True, ghost_batch_size=8, dropout=0.2, batch_size=100, **kw)
    gh.fit(X, y)
    assert gh.history_.n_steps == 3 * 4  # the 1-row last batch is still dropped
    assert gh.model_.norm.ghost == 8 and gh.model_.norm.dropout == 0.2
    p = gh.predict_proba(X)
    assert np.allclose(p.sum(1), 1, atol=1e-5)
    # evaluation is deterministic (running statistics, no dropout) and survives pickling
    g2 = pickle.loads(pickle.dumps(gh))
    assert np.array_equal(g2.model_.running, gh.model_.running)
    assert np.array_equal(g2.predict_proba(X), p) and np.array_equal(gh.predict_proba(X), p)
    assert clone(gh).get_params()["ghost_batch_size"] == 8
