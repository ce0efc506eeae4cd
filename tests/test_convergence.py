"""Training converges: to the least-squares solution, to a stated loss on a separable
problem at every batch-size regime, and to >= 95 % held-out accuracy on digits."""

from __future__ import annotations

import numpy as np
import pytest
from strategies import BACKEND_PATHS, make_model

import minigd as mg


# ============================================================================ least squares
@pytest.fixture(scope="module")
def regression():
    """y = X w + b + noise; 60 x 3, standardized columns (Hessian close to the identity)."""
    rng = np.random.default_rng(42)
    X = rng.normal(size=(60, 3))
    X = (X - X.mean(0)) / X.std(0)
    y = X @ np.array([1.5, -2.0, 0.25]) + 0.7 + 0.1 * rng.normal(size=60)
    return X, y


@pytest.mark.parametrize("path", BACKEND_PATHS)
def test_full_batch_gd_converges_to_lstsq(regression, path):
    X, y = regression
    # the oracle: least squares with the bias as a column of ones
    sol, *_ = np.linalg.lstsq(np.c_[X, np.ones(len(X))], y, rcond=None)
    model = make_model([3, 1], path, loss="mse", dtype="float64", seed=0)
    # mse is 1/2 * mean squared error: its Hessian is [X 1]^T [X 1] / n, eigenvalues in
    # about [0.7, 1.4] here, so lr = 0.5 contracts the error by <= 0.65 per step:
    # 300 steps take it from O(1) to far below 1e-12
    hist = mg.fit(model, X, y, batch_size="full", steps=300, optimizer=mg.SGD(lr=0.5))
    assert set(hist.column("batch_size")) == {60}
    np.testing.assert_allclose(model.weights[0][:, 0], sol[:3], rtol=0, atol=1e-9)
    np.testing.assert_allclose(model.biases[0], sol[3:], rtol=0, atol=1e-9)
    resid = np.c_[X, np.ones(len(X))] @ sol - y
    assert model.loss(X, y) == pytest.approx(0.5 * np.mean(resid**2), rel=1e-9)
    # full-batch GD on a convex quadratic with a stable step decreases the loss every step
    assert np.all(np.diff(hist.column("loss")) <= 1e-15)


# ============================================================================ separable problem
@pytest.mark.parametrize("path", ["numpy", "cpu"])
@pytest.mark.parametrize(
    "batch_size, lr, epochs",
    [
        pytest.param(1, 0.05, 40, id="sgd-batch1"),
        pytest.param(10, 0.5, 150, id="minibatch-10"),
        pytest.param("full", 2.0, 1500, id="full-batch"),
    ],
)
def test_every_batch_regime_reaches_target_on_separable_data(blobs, path, batch_size, lr, epochs):
    """Three well-separated Gaussian blobs: logistic regression can drive the mean
    cross-entropy to 0, so each regime must reach 0.05 (stated target) within budget."""
    X, y = blobs
    model = make_model([4, 3], path, loss="cross_entropy", dtype="float64", seed=0)
    hist = mg.fit(
        model, X, y, batch_size=batch_size, epochs=epochs, optimizer=mg.SGD(lr=lr), target={"train_loss": 0.05}, seed=0
    )
    assert hist.reached is True, hist
    assert hist.stop_reason == "target"
    assert model.loss(X, y) <= 0.05
    assert model.score(X, y) >= 0.95


# ============================================================================ digits
@pytest.mark.parametrize("path", ["numpy", "cpu"])
def test_digits_mlp_reaches_95_percent(digits_split, path):
    Xtr, Xte, ytr, yte = digits_split
    model = make_model([64, 64, 10], path, activation="relu", loss="cross_entropy", dtype="float32", seed=0)
    hist = mg.fit(
        model, Xtr, ytr, batch_size=32, epochs=12, optimizer=mg.SGD(lr=0.1, momentum=0.9), validation=(Xte, yte), seed=0
    )
    acc = float(np.mean(model.predict(Xte) == yte))
    assert acc >= 0.95, f"held-out accuracy {acc:.3f}"
    assert hist.final["val_accuracy"] == pytest.approx(acc)
    assert model.evaluate(Xte, yte)["accuracy"] == pytest.approx(acc)
