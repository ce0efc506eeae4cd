"""Named data sets: scikit-learn's bundled digits and two seeded synthetic generators
(a random teacher MLP, a noisy linear map), each a loader in :data:`DATASETS`.

A loader is called as ``loader(n=..., seed=..., **params)`` and returns a
:class:`~minigd.data.dataset.RawData`; :func:`minigd.data.load_dataset` runs it through the
pipeline.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from minigd._validation import _got, check_choice, check_float, check_int

from .dataset import _STREAM_INPUTS, _STREAM_NOISE, _STREAM_TEACHER, TASKS, RawData, _check_seed, _rng

__all__ = ["DATASETS", "teacher_forward"]


def _load_digits(*, n: int | None, seed: int) -> RawData:
    """scikit-learn's bundled handwritten digits: 1797 images of 8x8 pixels (0..16), 10 classes.

    Needs scikit-learn (``pip install 'minigd[sklearn]'``); no download.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "name_or_path: the 'digits' data set needs scikit-learn (its bundled copy), "
            "which is not installed: pip install 'minigd[sklearn]'"
        ) from exc
    d = load_digits()
    return RawData(
        np.asarray(d.data, np.float64),
        np.asarray(d.target, np.int64),
        "classification",
        {"source": "scikit-learn load_digits (UCI optical handwritten digits, 8x8, values 0..16)"},
    )


def _activation_fn(name: str) -> Callable[[np.ndarray], np.ndarray]:
    fns: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "identity": lambda z: z,
        "relu": lambda z: np.maximum(z, 0.0),
        "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
        "tanh": np.tanh,
        "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    }
    return fns[name]


_TEACHER_ACTIVATIONS = ("tanh", "relu", "leaky_relu", "sigmoid", "identity")


def teacher_forward(X: np.ndarray, weights, biases, activation: str = "tanh") -> np.ndarray:
    """Outputs of a teacher MLP (as recorded in ``info`` by ``teacher_student``), float64.

    Parameters
    ----------
    X : ndarray (n, n_in)
        Inputs in the *generation* coordinates (undo standardization first:
        ``X * info["scale"] + info["mean"]``).
    weights, biases : list of ndarray
        ``info["teacher_weights"]`` (each (fan_in, fan_out)) and ``info["teacher_biases"]``.
    activation : str
        ``info["activation"]``; the output layer is linear.

    Returns
    -------
    ndarray (n, n_out)
        Logits (classification) or noise-free targets (regression).
    """
    act = _activation_fn(activation)
    a = np.asarray(X, np.float64)
    L = len(weights)
    for i, (W, b) in enumerate(zip(weights, biases)):
        a = a @ np.asarray(W, np.float64) + np.asarray(b, np.float64)
        if i < L - 1:
            a = act(a)
    return a


def _widths(name: str, value: Any) -> list[int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return [check_int(name, value, low=1)]
    if isinstance(value, (list, tuple)):
        return [check_int(f"{name}[{i}]", w, low=1) for i, w in enumerate(value)]
    raise TypeError(f"{name}: expected an int or a list of ints (hidden widths), got {_got(value)}")


def _load_teacher_student(
    *,
    n: int | None,
    seed: int,
    n_in: int = 10,
    teacher_width=32,
    n_classes: int = 2,
    task: str = "classification",
    n_out: int = 1,
    activation: str = "tanh",
    noise: float = 0.0,
    data_seed: int | None = None,
) -> RawData:
    """Synthetic: a random teacher MLP labels Gaussian inputs (default n = 1000).

    Inputs ``x ~ N(0, I_n_in)``.  The teacher has hidden widths ``teacher_width`` (an int
    or a list; ``[]`` for a linear teacher) with ``activation``, weights
    ``N(0, 1/fan_in)``, hidden biases ``N(0, 0.1**2)`` and a zero output bias.
    Classification (``n_classes`` outputs): label = argmax of the teacher's logits plus
    ``N(0, noise**2)`` noise.  Regression (``n_out`` outputs): target = teacher output
    plus ``N(0, noise**2)`` noise.  The teacher depends only on ``data_seed`` (default:
    ``seed``) and the sizes, not on ``n``; its parameters are kept in ``info``.
    """
    n = 1000 if n is None else n
    n_in = check_int("n_in", n_in, low=1)
    widths = _widths("teacher_width", teacher_width)
    task = check_choice("task", task, TASKS)
    activation = check_choice("activation", activation, _TEACHER_ACTIVATIONS)
    noise = check_float("noise", noise, low=0.0)
    if task == "classification":
        k = check_int("n_classes", n_classes, low=2)
        if n_out != 1:
            raise ValueError(
                f"n_out: expected 1 (unused) for task 'classification' -- set n_classes instead, got {_got(n_out)}"
            )
    else:
        k = check_int("n_out", n_out, low=1)
        if n_classes != 2:
            raise ValueError(
                f"n_classes: expected the default (unused) for task 'regression' -- set "
                f"n_out instead, got {_got(n_classes)}"
            )
    dseed = seed if data_seed is None else _check_seed("data_seed", data_seed)
    sizes = [n_in, *widths, k]
    rt = _rng(dseed, _STREAM_TEACHER)
    weights, biases = [], []
    for i, (fi, fo) in enumerate(zip(sizes[:-1], sizes[1:])):
        weights.append(rt.normal(0.0, 1.0 / math.sqrt(fi), size=(fi, fo)))
        last = i == len(sizes) - 2
        biases.append(np.zeros(fo) if last else rt.normal(0.0, 0.1, size=fo))
    X = _rng(dseed, _STREAM_INPUTS).normal(size=(n, n_in))
    out = teacher_forward(X, weights, biases, activation)
    if noise > 0:
        out = out + noise * _rng(dseed, _STREAM_NOISE).normal(size=out.shape)
    if task == "classification":
        y = np.argmax(out, axis=1).astype(np.int64)
    else:
        y = out[:, 0] if k == 1 else out
    info = {
        "source": "synthetic teacher-student (random teacher MLP, Gaussian inputs)",
        "teacher_sizes": sizes,
        "activation": activation,
        "noise_std": noise,
        "data_seed": dseed,
        "teacher_weights": weights,
        "teacher_biases": biases,
    }
    return RawData(X, y, task, info, n_classes=k if task == "classification" else None, generated=True)


def _load_linear_regression(
    *, n: int | None, seed: int, n_in: int = 10, noise: float = 0.1, data_seed: int | None = None
) -> RawData:
    """Synthetic: ``y = X w* + b* + noise`` with Gaussian ``X`` (default n = 1000).

    ``x ~ N(0, I_n_in)``, ``w* ~ N(0, 1/n_in)`` (so ``Var(x . w*) ~ 1``), ``b* ~ N(0, 1)``,
    noise ``N(0, noise**2)``.  ``info`` holds ``w_star``, ``b_star`` and ``noise_std``
    (generation coordinates) and, when standardized, ``w_star_effective`` and
    ``b_star_effective``: the same map in the returned (standardized) coordinates, so
    closed forms apply to the returned arrays directly.
    """
    n = 1000 if n is None else n
    n_in = check_int("n_in", n_in, low=1)
    noise = check_float("noise", noise, low=0.0)
    dseed = seed if data_seed is None else _check_seed("data_seed", data_seed)
    rt = _rng(dseed, _STREAM_TEACHER)
    w = rt.normal(0.0, 1.0 / math.sqrt(n_in), size=n_in)
    b = float(rt.normal())
    X = _rng(dseed, _STREAM_INPUTS).normal(size=(n, n_in))
    y = X @ w + b
    if noise > 0:
        y = y + noise * _rng(dseed, _STREAM_NOISE).normal(size=n)
    info = {
        "source": "synthetic linear regression (Gaussian inputs, Gaussian noise)",
        "w_star": w,
        "b_star": b,
        "noise_std": noise,
        "data_seed": dseed,
    }
    return RawData(X, y, "regression", info, generated=True)


#: name -> loader.  A loader is called as ``loader(n=..., seed=..., **params)`` and returns
#: a :class:`RawData`; its keyword-only parameters (and docstring) document ``params``.
DATASETS: dict[str, Callable[..., RawData]] = {
    "digits": _load_digits,
    "teacher_student": _load_teacher_student,
    "linear_regression": _load_linear_regression,
}
