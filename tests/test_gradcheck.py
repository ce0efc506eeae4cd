"""Finite-difference gradient checks (float64) on every backend.

The analytic gradient of the mean batch loss (``model.loss_and_grad``) is compared with
central differences of ``model.loss`` on the flat parameter vector, over hypothesis-drawn
architectures: depth 0 (linear / logistic regression) to 3 hidden layers, widths
including 1, every activation, every loss, odd batch sizes.

Tolerance: with h = 1e-6 in float64 the central difference is off by about
h^2 |f'''| (~1e-12) plus the rounding of the two loss values divided by h: ~1e-16 times
the magnitude of the intermediates (logits of ~10, not the loss itself: a confident softmax
computes a loss of 1e-4 as a difference of O(10) numbers) / 1e-6 ~ 1e-9.  So the check is
|g - g_fd| <= 1e-6 |g| + 1e-8 (Euclidean norms): orders of margin, while any real mistake
(a wrong derivative, a missing 1/B, a transposed weight) is off by O(|g|).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import BACKEND_PATHS, architectures, hidden_preacts, make_model, make_targets

H = 1e-6
RTOL = 1e-6
ATOL = 1e-8
#: |z| of relu / leaky_relu pre-activations must exceed this (kinks): a perturbation of
#: H moves any z by at most ~H * |a| * prod|W| << KINK_EPS
KINK_EPS = 1e-3


def fd_grad(model, X, y, h=H):
    """Central differences of the mean loss on each entry of the flat parameter vector."""
    p = model.params
    g = np.empty(p.shape[0], np.float64)
    for i in range(p.shape[0]):
        old = p[i]
        p[i] = old + h
        lp = model.loss(X, y)
        p[i] = old - h
        lm = model.loss(X, y)
        p[i] = old
        g[i] = (lp - lm) / (2 * h)
    return g


def rel_err(a, b):
    """|a - b| / max(|a|, |b|)."""
    return np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300)


def grads_agree(g, g_fd):
    """|g - g_fd| <= RTOL |g_fd| + ATOL (see the module docstring)."""
    return np.linalg.norm(g - g_fd) <= RTOL * max(np.linalg.norm(g), np.linalg.norm(g_fd)) + ATOL


def assert_gradcheck(model, X, y):
    loss, g = model.loss_and_grad(X, y)
    assert g.shape == (model.n_params,) and g.dtype == np.float64
    assert loss == pytest.approx(model.loss(X, y), rel=1e-12, abs=1e-14)
    g_fd = fd_grad(model, X, y)
    assert grads_agree(g, g_fd), (
        f"relative error {rel_err(g, g_fd):.3g} (absolute {np.linalg.norm(g - g_fd):.3g}) between "
        f"analytic and finite-difference gradients\nanalytic {g}\nnumeric  {g_fd}"
    )


def _kink_free(model, X):
    for act, z in zip(model.activations, hidden_preacts(model, X)):
        if act in ("relu", "leaky_relu") and np.abs(z).min() <= KINK_EPS:
            return False
    return True


@pytest.mark.parametrize("path", BACKEND_PATHS)
@given(arch=architectures(), n=st.sampled_from([1, 3, 5, 7, 11]), seed=st.integers(0, 2**31 - 1))
def test_gradient_matches_finite_differences(path, arch, n, seed):
    rng = np.random.default_rng(seed)
    model = make_model(
        arch["sizes"], path, activation=arch["activation"], loss=arch["loss"], dtype="float64", seed=seed
    )
    # random biases too (init sets them to 0), so that no unit sits exactly at a kink
    model.params[...] += 0.3 * rng.normal(size=model.n_params)
    X = rng.normal(size=(n, model.n_in))
    y = make_targets(arch["loss"], n, model.n_out, rng)
    assume(_kink_free(model, X))
    assert_gradcheck(model, X, y)


@pytest.mark.parametrize("path", BACKEND_PATHS)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "binary_cross_entropy"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "sigmoid", "gelu", "identity"])
def test_gradient_every_activation_and_loss(path, activation, loss):
    """The full activation x loss grid on one fixed 2-hidden-layer net (odd batch 5), so
    that every combination is checked on every run whatever hypothesis draws."""
    rng = np.random.default_rng(7)
    model = make_model([3, 4, 3, 2], path, activation=activation, loss=loss, dtype="float64", seed=3)
    model.params[...] += 0.3 * rng.normal(size=model.n_params)
    X = rng.normal(size=(5, 3))
    y = make_targets(loss, 5, 2, rng)
    assert _kink_free(model, X), "fixed data must stay away from relu kinks; pick another seed"
    assert_gradcheck(model, X, y)


def test_gradcheck_detects_a_wrong_gradient():
    """The check itself can fail: one entry off by a factor 1 + 1e-3 is caught."""
    rng = np.random.default_rng(0)
    model = make_model([3, 2, 2], "numpy", activation="tanh", loss="mse", dtype="float64", seed=0)
    X = rng.normal(size=(5, 3))
    y = rng.normal(size=(5, 2))
    _, g = model.loss_and_grad(X, y)
    g_fd = fd_grad(model, X, y)
    assert grads_agree(g, g_fd)
    k = int(np.argmax(np.abs(g)))
    g_bad = g.copy()
    g_bad[k] *= 1 + 1e-3
    assert not grads_agree(g_bad, g_fd)
    assert not grads_agree(g / 5, g_fd)  # e.g. a mean over 5 examples taken twice
