"""Data sets for the batch-size study: one load / label / split / scale / cast pipeline.

Every data set, whatever its source, goes through the same steps in
:func:`load_dataset`:

1. **load** the raw arrays (a named source from :data:`DATASETS`, or a ``.npz``,
   ``.csv`` or MNIST-style IDX file) and check them: ``X`` numeric and finite, ``y`` as
   long as ``X``, no NaN/inf anywhere;
2. **labels**: for classification, integer-valued labels are remapped to ``0..K-1``
   (``int64``) in sorted order, the original labels kept in ``info["classes"]``;
3. **subsample** (optional, ``n=``): a seeded, stratified subset of ``n`` examples;
4. **split** into train and validation, shuffled with the seed and stratified by class
   for classification (each class's validation count is within one example of its
   proportional share);
5. **standardize** (optional, the default) every feature with the *training* mean and
   standard deviation only;
6. **cast** ``X`` (and regression targets) to the requested ``dtype``.  The model never
   converts its inputs (see :mod:`minigd._validation`): the cast happens here, once,
   explicitly, and is recorded in ``info["dtype"]``.

The result is a frozen :class:`Dataset` whose ``info`` dict records the provenance
(source, sizes, seeds, noise level, standardization statistics, label mapping), so a run
can say exactly what it was trained on.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from minigd._validation import _got, check_dtype, check_float, check_int

from .dataset import _STREAM_SPLIT, _STREAM_SUBSAMPLE, Dataset, RawData, _check_seed, _rng
from .files import _FILE_LOADERS, _file_kind, _task_from_dtype
from .sources import DATASETS

__all__ = ["load_dataset", "from_arrays", "DEFAULT_STD_FLOOR"]

#: standard deviations at or below this are treated as a constant feature (scale 1)
DEFAULT_STD_FLOOR = 1e-8


# ------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------


def _check_params(loader: Callable, params: dict, what: str) -> None:
    allowed = [
        p.name
        for p in inspect.signature(loader).parameters.values()
        if p.kind == p.KEYWORD_ONLY and p.name not in ("n", "seed", "path")
    ]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TypeError(f"params: expected keyword arguments among {allowed} for {what}, got unknown {unknown}")


def _check_X(name: str, X: Any) -> np.ndarray:
    if not isinstance(X, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {_got(X)}")
    if X.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected a real numeric array, got {_got(X)}")
    if X.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (n_examples, n_features), got {_got(X)}")
    if X.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one feature (column), got {_got(X)}")
    bad = ~np.isfinite(X) if X.dtype.kind == "f" else None
    if bad is not None and bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(
            f"{name}: expected finite values, got {int(bad.sum())} NaN/inf entries "
            f"(the first at row {r}, column {c}: {X[r, c]})"
        )
    return X


def _check_y(name: str, y: Any, n: int, Xname: str) -> np.ndarray:
    if not isinstance(y, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {_got(y)}")
    if y.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected real numeric labels/targets, got {_got(y)}")
    if y.ndim not in (1, 2) or y.shape[0] != n:
        raise ValueError(f"{name}: expected {n} rows (as {Xname}), shape ({n},) or ({n}, k), got {_got(y)}")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        bad = np.flatnonzero(~np.isfinite(y.reshape(n, -1)).all(axis=1))
        raise ValueError(f"{name}: expected finite values, got NaN/inf in {bad.size} rows (the first at row {bad[0]})")
    return y


def _labels(name: str, y: np.ndarray) -> None:
    if y.ndim != 1:
        raise ValueError(f"{name}: expected class labels of shape (n,) for task 'classification', got {_got(y)}")
    if y.dtype.kind == "f" and not np.array_equal(y, np.round(y)):
        bad = y[y != np.round(y)][0]
        raise ValueError(
            f"{name}: expected integer-valued class labels for task 'classification', "
            f"got non-integer values such as {bad!r}; pass task='regression' for real targets"
        )


def _allocate(counts: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` over groups in proportion to ``counts`` (largest remainder).

    Each share is the floor or the ceiling of ``counts * total / counts.sum()``; ties
    between equal remainders are broken at random.
    """
    ideal = counts * (total / counts.sum())
    take = np.floor(ideal).astype(np.int64)
    rest = total - int(take.sum())
    if rest:
        order = rng.permutation(len(counts))
        rem = (ideal - take)[order]
        pick = order[np.argsort(-rem, kind="stable")[:rest]]
        take[pick] += 1
    return take


def _choose(y: np.ndarray | None, n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(chosen, rest)``: ``k`` of ``n`` examples at random, stratified by ``y`` when given.

    Both index arrays are in random order.
    """
    if y is None:
        perm = rng.permutation(n)
        return perm[:k], perm[k:]
    classes, inv = np.unique(y, return_inverse=True)
    counts = np.bincount(inv, minlength=len(classes))
    share = _allocate(counts, k, rng)
    chosen_parts: list[np.ndarray] = []
    rest_parts: list[np.ndarray] = []
    for c in range(len(classes)):
        members = np.flatnonzero(inv == c)
        members = members[rng.permutation(members.size)]
        chosen_parts.append(members[: share[c]])
        rest_parts.append(members[share[c] :])
    chosen, rest = np.concatenate(chosen_parts), np.concatenate(rest_parts)
    return chosen[rng.permutation(chosen.size)], rest[rng.permutation(rest.size)]


def _build(
    name: str,
    raw: RawData,
    *,
    val_fraction: float,
    standardize: bool,
    std_floor: float,
    seed: int,
    dtype: np.dtype,
    n: int | None,
    load_args: dict,
) -> Dataset:
    X = _check_X("X", raw.X)
    y = _check_y("y", raw.y, X.shape[0], "X")
    provided = raw.X_val is not None
    if provided:
        Xv = _check_X("X_val", raw.X_val)
        if Xv.shape[1] != X.shape[1]:
            raise ValueError(f"X_val: expected {X.shape[1]} features (as X), got {_got(Xv)}")
        yv = _check_y("y_val", raw.y_val, Xv.shape[0], "X_val")
        if yv.shape[1:] != y.shape[1:]:
            raise ValueError(f"y_val: expected the shape of y's rows {y.shape[1:]}, got {_got(yv)}")
    info = dict(raw.info)
    task, n_classes = raw.task, raw.n_classes
    strat = None
    if task == "classification":
        _labels("y", y)
        if provided:
            _labels("y_val", yv)
        if n_classes is None:  # remap the observed labels to 0..K-1 in sorted order
            classes = np.unique(np.concatenate([y, yv]) if provided else y)
            y = np.searchsorted(classes, y).astype(np.int64)
            if provided:
                yv = np.searchsorted(classes, yv).astype(np.int64)
            n_classes = int(classes.size)
            info["classes"] = [int(c) for c in classes]
        else:
            y = y.astype(np.int64)
            info["classes"] = list(range(n_classes))
        strat = y
    n_avail = X.shape[0]
    if n is not None and not raw.generated:
        if n > n_avail:
            raise ValueError(
                f"n: expected at most the {n_avail} {'training ' if provided else ''}examples "
                f"available in {name!r}, got {n}"
            )
        if n < n_avail:
            idx, _ = _choose(strat, n_avail, n, _rng(seed, _STREAM_SUBSAMPLE))
            X, y = X[idx], y[idx]
            strat = y if strat is not None else None
    N = X.shape[0]
    if provided:
        Xt, yt = X, y
        info.update(split="provided", val_fraction=None)
    else:
        n_val = int(math.floor(N * val_fraction + 0.5))
        if n_val < 1 or N - n_val < 1:
            raise ValueError(
                f"n: expected enough examples for a train/validation split with "
                f"val_fraction={val_fraction} (at least one on each side), got {N} examples "
                f"({n_val} would go to validation)"
            )
        va, tr = _choose(strat, N, n_val, _rng(seed, _STREAM_SPLIT))
        Xt, yt, Xv, yv = X[tr], y[tr], X[va], y[va]
        info.update(split="stratified" if strat is not None else "random", val_fraction=val_fraction)
    info.update(
        n=int(Xt.shape[0] + Xv.shape[0]),
        n_available=int(n_avail),
        n_features=int(X.shape[1]),
        seed=seed,
        standardized=bool(standardize),
        dtype=str(dtype),
    )
    Xt = Xt.astype(np.float64)
    Xv = Xv.astype(np.float64)
    if standardize:
        with np.errstate(over="ignore", invalid="ignore"):
            mean = Xt.mean(axis=0)
            sd = Xt.std(axis=0)
        colmax = np.abs(Xt).max(axis=0)
        colmax = np.where(colmax > 0, colmax, 1.0)
        if not (np.isfinite(mean).all() and np.isfinite(sd).all()):
            # entries near float64's limit: the sums overflow; the same statistics, scaled
            mean = (Xt / colmax).mean(axis=0) * colmax
            sd = (Xt / colmax).std(axis=0) * colmax
        const = sd <= std_floor
        scale = np.where(const, 1.0, sd)
        Xt = _standardized(Xt, mean, scale, colmax, "X")
        Xv = _standardized(Xv, mean, scale, colmax, "X_val" if provided else "X")
        info.update(mean=mean, scale=scale, std_floor=std_floor, n_constant_features=int(const.sum()))
        if "w_star" in info:  # the true linear map in the returned coordinates
            info["w_star_effective"] = info["w_star"] * scale
            info["b_star_effective"] = float(info["b_star"] + mean @ info["w_star"])
    if task == "regression":
        yt, yv = _cast("y", yt, dtype, standardize), _cast("y", yv, dtype, standardize)
    info["load_args"] = load_args
    return Dataset(
        _cast("X", Xt, dtype, standardize), yt, _cast("X", Xv, dtype, standardize), yv, task, n_classes, name, info
    )


def _standardized(A: np.ndarray, mean: np.ndarray, scale: np.ndarray, colmax: np.ndarray, name: str) -> np.ndarray:
    """``(A - mean) / scale``, computed on ``A / colmax`` where the plain form overflows
    (entries near float64's limit); a ValueError naming ``name`` if even that does not fit."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        Z = (A - mean) / scale
        if not np.isfinite(Z).all():
            Z = (A / colmax - mean / colmax) * (colmax / scale)
    if not np.isfinite(Z).all():
        raise ValueError(
            f"{name}: expected values that can be standardized in float64, got entries up to "
            f"{float(np.nanmax(np.abs(A))):.6g} whose standardized values overflow"
        )
    return Z


def _cast(name: str, a: np.ndarray, dtype: np.dtype, standardized: bool) -> np.ndarray:
    """``a.astype(dtype)``, refusing values beyond the dtype's range (float32: 3.4e38),
    which the cast would turn into inf."""
    with np.errstate(over="ignore"):
        out = a.astype(dtype)
    if out.size and not np.isfinite(out).all():
        big = float(np.max(np.abs(a)))
        raise ValueError(
            f"{name}: expected values that fit {dtype} (magnitude at most "
            f"{float(np.finfo(dtype).max):.3g}), got entries up to {big:.6g}; "
            f"{'' if standardized or name == 'y' else 'standardize=True or '}dtype='float64' "
            f"keeps them"
        )
    return out


def _common_args(val_fraction, standardize, std_floor, seed, dtype, n):
    vf = check_float("val_fraction", val_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    if not isinstance(standardize, (bool, np.bool_)):
        raise TypeError(f"standardize: expected True or False, got {_got(standardize)}")
    floor = check_float("std_floor", std_floor, low=0.0)
    seed = _check_seed("seed", seed)
    dt = check_dtype("dtype", dtype)
    if n is not None:
        n = check_int("n", n, low=1)
    return vf, bool(standardize), floor, seed, dt, n


def load_dataset(
    name_or_path,
    *,
    val_fraction: float = 0.2,
    standardize: bool = True,
    seed: int = 0,
    dtype="float32",
    n: int | None = None,
    std_floor: float = DEFAULT_STD_FLOOR,
    **params,
) -> Dataset:
    """Load a named data set or a data file, split it, standardize it, cast it.

    Parameters
    ----------
    name_or_path : str or os.PathLike
        A name from :data:`DATASETS` (``"digits"``, ``"teacher_student"``,
        ``"linear_regression"``), or a path: a ``.npz`` (arrays ``X``, ``y``, optionally
        ``X_val``, ``y_val``), a ``.csv``/``.tsv`` (optionally ``.gz``), an IDX images
        file (``*-idx3-ubyte``, optionally ``.gz``), or a directory holding the standard
        MNIST IDX names.  A string that is a registry name means the named data set;
        pass a :class:`pathlib.Path` to read a file of the same name.
    val_fraction : float in (0, 1)
        Share of the examples held out for validation: ``round(n * val_fraction)``
        examples, at least one, and at least one left for training.  Not used when the
        source provides its own validation set (a ``.npz`` with ``X_val``).
    standardize : bool
        Scale each feature to zero mean and unit variance with the **training** split's
        mean and (population) standard deviation; a feature whose training standard
        deviation is at most ``std_floor`` is only centred (scale 1), so constant
        columns never divide by zero.  The statistics are kept in ``info["mean"]`` and
        ``info["scale"]`` (raw = standardized * scale + mean).  Targets are never scaled.
    seed : int >= 0
        Seeds the subsample, the split and its shuffle, and (unless ``data_seed`` is
        given) the synthetic generators.  Same arguments, same seed: identical arrays.
    dtype : "float32" or "float64"
        The dtype of ``X`` (and regression targets) in the result: the explicit cast the
        model itself never does.  Class labels are always ``int64``.
    n : int, optional
        Synthetic data: the number of examples generated (train + validation; default
        1000).  Real data: keep a seeded random subset of ``n`` examples (stratified for
        classification) before splitting; with a provided validation set, ``n`` applies
        to the training set.
    std_floor : float >= 0
        See ``standardize`` (default ``1e-8``).
    **params
        Source-specific options:

        * ``teacher_student``: ``n_in=10``, ``teacher_width=32`` (int or list of
          hidden widths), ``n_classes=2``, ``task="classification"`` (or
          ``"regression"`` with ``n_out=1``), ``activation="tanh"`` (``relu``,
          ``leaky_relu``, ``sigmoid``, ``identity``), ``noise=0.0`` (std of Gaussian
          noise on the teacher's outputs: on the logits before the argmax, or on the
          targets), ``data_seed`` (default ``seed``: fixes the data while ``seed``
          varies the split).
        * ``linear_regression``: ``n_in=10``, ``noise=0.1`` (noise std), ``data_seed``.
        * ``.npz`` and IDX files: ``task`` (default from ``y``'s dtype: integer ->
          classification, floating -> regression).
        * IDX files: ``labels`` (the labels file; default the sibling with the standard
          name), ``part="train"`` (which pair of files a directory supplies: ``"train"``
          or ``"t10k"``).
        * ``.csv``: ``label_column=-1`` (index or header name), ``header=None``
          (detect), ``delimiter=","``, ``task`` (default: integer-valued labels ->
          classification, otherwise regression).

    Returns
    -------
    Dataset
        Classification labels are ``int64`` in ``0..K-1``: the sorted distinct labels
        are renumbered, the originals kept in ``info["classes"]``.  The split is
        stratified: each class's validation count is within one example of its
        proportional share.  ``info`` records ``source``, ``n``, ``n_available``,
        ``n_features``, ``seed``, ``split``, ``val_fraction``, ``standardized``,
        ``dtype``, ``load_args`` and per source ``path``, ``noise_std``, ``w_star``,
        ``b_star``, ``teacher_weights``, ...

    Raises
    ------
    ValueError
        Unknown name (the known ones are listed), unsupported file type, malformed file
        (bad IDX magic, truncated IDX data, non-numeric or ragged CSV, ``.npz`` without
        ``X`` or ``y``), ``X``/``y`` length mismatch, NaN or inf, too few examples for
        the split, ``val_fraction`` outside (0, 1), an out-of-range option.
    FileNotFoundError
        A path that does not exist (or a directory without the IDX files).
    TypeError
        An argument of the wrong type, or an option the source does not take.
    ImportError
        ``"digits"`` without scikit-learn.

    Examples
    --------
    >>> from minigd.data import load_dataset
    >>> ds = load_dataset("linear_regression", n=500, n_in=3, noise=0.1, seed=0)
    >>> ds.task, ds.loss, ds.X_train.shape, ds.X_train.dtype
    ('regression', 'mse', (400, 3), dtype('float32'))
    >>> ds.info["noise_std"]
    0.1
    """
    vf, standardize, floor, seed, dt, n = _common_args(val_fraction, standardize, std_floor, seed, dtype, n)
    if isinstance(name_or_path, str) and name_or_path in DATASETS:
        name = name_or_path
        loader = DATASETS[name]
        _check_params(loader, params, f"data set {name!r}")
        raw = loader(n=n, seed=seed, **params)
        display = name
    elif isinstance(name_or_path, (str, os.PathLike)):
        path = Path(name_or_path)
        kind = _file_kind(path) if path.exists() else None
        if not path.exists():
            looks_like_path = (
                not isinstance(name_or_path, str) or os.sep in name_or_path or "/" in name_or_path or path.suffix != ""
            )
            if looks_like_path:
                raise FileNotFoundError(
                    f"name_or_path: expected a data set name {sorted(DATASETS)} or an "
                    f"existing file, got {str(name_or_path)!r} (no such file)"
                )
            close = difflib.get_close_matches(str(name_or_path), DATASETS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"name_or_path: expected a data set name, one of {sorted(DATASETS)}, or a path "
                f"to a .npz/.csv/IDX file, got {str(name_or_path)!r}{hint}"
            )
        if kind is None:
            raise ValueError(
                f"name_or_path: expected a file ending in .npz, .csv, .tsv (optionally .gz) or an "
                f"IDX file (*-idx3-ubyte[.gz]) or a directory of IDX files, got {path.name!r}"
            )
        loader = _FILE_LOADERS[kind]
        _check_params(loader, params, f"a {kind} file")
        raw = loader(n=n, seed=seed, path=path, **params)
        display = path.name
    else:
        raise TypeError(
            f"name_or_path: expected a data set name (str) or a path (str or os.PathLike), got {_got(name_or_path)}"
        )
    load_args = {
        "name_or_path": str(name_or_path),
        "val_fraction": vf,
        "standardize": standardize,
        "seed": seed,
        "dtype": str(dt),
        "n": n,
        "std_floor": floor,
        "params": {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in params.items()},
    }
    return _build(
        display,
        raw,
        val_fraction=vf,
        standardize=standardize,
        std_floor=floor,
        seed=seed,
        dtype=dt,
        n=n,
        load_args=load_args,
    )


def from_arrays(
    X,
    y,
    *,
    task: str | None = None,
    X_val=None,
    y_val=None,
    name: str = "arrays",
    val_fraction: float = 0.2,
    standardize: bool = True,
    seed: int = 0,
    dtype="float32",
    n: int | None = None,
    std_floor: float = DEFAULT_STD_FLOOR,
) -> Dataset:
    """Run in-memory arrays through the same label / split / standardize / cast pipeline.

    Parameters
    ----------
    X : ndarray (n, d)
    y : ndarray (n,) or (n, k)
    task : {"classification", "regression"}, optional
        Default from ``y``'s dtype: integer or bool -> classification, floating ->
        regression.
    X_val, y_val : ndarray, optional
        A validation set to use as is (then no split is made).
    name : str
    val_fraction, standardize, seed, dtype, n, std_floor
        As in :func:`load_dataset`.

    Returns
    -------
    Dataset

    Examples
    --------
    >>> import numpy as np
    >>> from minigd.data import from_arrays
    >>> X = np.arange(20.0).reshape(10, 2); y = np.array([0, 1] * 5)
    >>> ds = from_arrays(X, y, val_fraction=0.2, seed=0)
    >>> ds.n_train, ds.n_val, ds.n_classes
    (8, 2, 2)
    """
    vf, standardize, floor, seed, dt, n = _common_args(val_fraction, standardize, std_floor, seed, dtype, n)
    if (X_val is None) != (y_val is None):
        raise ValueError(
            f"X_val, y_val: expected both or neither, got only {'X_val' if X_val is not None else 'y_val'}"
        )
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {_got(name)}")
    _check_X("X", X)
    _check_y("y", y, X.shape[0], "X")
    raw = RawData(X, y, _task_from_dtype(y, task), {"source": "arrays"}, X_val=X_val, y_val=y_val)
    load_args = {
        "name_or_path": None,
        "val_fraction": vf,
        "standardize": standardize,
        "seed": seed,
        "dtype": str(dt),
        "n": n,
        "std_floor": floor,
        "params": {},
    }
    return _build(
        name,
        raw,
        val_fraction=vf,
        standardize=standardize,
        std_floor=floor,
        seed=seed,
        dtype=dt,
        n=n,
        load_args=load_args,
    )
