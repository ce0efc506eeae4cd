"""Shared test configuration: hypothesis profiles, backend fixtures, data sets.

Hypothesis profiles (select with the environment variable ``HYPOTHESIS_PROFILE``):

* ``ci`` (default): few examples, derandomized (the same examples on every run), no
  deadline (the first example of a test may pay for a Numba JIT compile).
* ``dev``: many more examples, random, no deadline -- run it when you touch the kernels:
  ``HYPOTHESIS_PROFILE=dev pytest tests``.

Tests marked ``@pytest.mark.run_last`` are moved to the end of the run (the kernel
signature-count contract inspects what the rest of the suite compiled).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from strategies import BACKEND_PATHS

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "dev", max_examples=300, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The suite picks the GPU emulator explicitly where it wants it (gpu_emu.emulated(), or the
# variable in a subprocess's environment); an exported MINIGD_GPU_EMULATE=1 must not turn
# every "no GPU here" expectation around.
os.environ.pop("MINIGD_GPU_EMULATE", None)


def pytest_configure(config):
    config.addinivalue_line("markers", "run_last: run after every other test (contract checks)")


def pytest_collection_modifyitems(session, config, items):
    last = [it for it in items if it.get_closest_marker("run_last") is not None]
    if last:
        first = [it for it in items if it.get_closest_marker("run_last") is None]
        items[:] = first + last


@pytest.fixture(params=BACKEND_PATHS)
def backend_path(request):
    return request.param


@pytest.fixture(params=["numpy", "cpu"])
def backend(request):
    return request.param


@pytest.fixture(scope="session")
def digits_split():
    """scikit-learn's bundled digits (1797 x 64), pixels scaled to [0, 1] by /16, split
    75/25 stratified and shuffled with a fixed seed.  Returns float32 arrays and int64
    labels: (X_train, X_test, y_train, y_test)."""
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    return tuple(train_test_split(X, y, test_size=0.25, stratify=y, shuffle=True, random_state=0))


@pytest.fixture(scope="session")
def blobs():
    """A small, linearly separable 3-class problem (float64): (X, y), 90 x 4."""
    rng = np.random.default_rng(1234)
    centers = np.array([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    y = np.repeat(np.arange(3), 30).astype(np.int64)
    X = centers[y] + 0.5 * rng.normal(size=(90, 4))
    return X, y
