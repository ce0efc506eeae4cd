"""Data sets for the batch-size study: named sources, file loaders, one split/scale pipeline.

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

import csv
import difflib
import hashlib
import inspect
import io
import math
import numbers
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from minigd._io import GzipError, GzipLimitError, gunzip_capped, read_npy_header, read_regular
from minigd._validation import _got, check_choice, check_dtype, check_float, check_int

__all__ = ["Dataset", "load_dataset", "from_arrays", "DATASETS", "TASKS", "RawData", "read_idx",
           "teacher_forward"]

#: the two kinds of supervised task a :class:`Dataset` can hold
TASKS = ("classification", "regression")

#: the loss that matches each task (names of :data:`minigd.nn.LOSSES`)
_TASK_LOSS = {"classification": "cross_entropy", "regression": "mse"}

#: standard deviations at or below this are treated as a constant feature (scale 1)
DEFAULT_STD_FLOOR = 1e-8


# ------------------------------------------------------------------------------------------
# the Dataset container
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/validation split ready for :func:`minigd.fit`.

    Build one with :func:`load_dataset` (or :func:`from_arrays`); constructing it
    directly is allowed and checks that the arrays fit together.

    Parameters
    ----------
    X_train, X_val : ndarray of shape (n_train, n_in) and (n_val, n_in)
        Features, float32 or float64, the same dtype for both.
    y_train, y_val : ndarray
        Classification: ``int64`` labels of shape (n,) in ``[0, n_classes)``.
        Regression: targets of ``X``'s dtype, shape (n,) or (n, n_out).
    task : {"classification", "regression"}
    n_classes : int or None
        The number of classes (classification), ``None`` for regression.
    name : str
        A short name: the registry name or the file name.
    info : dict
        Provenance: ``source``, ``n`` (examples used), ``n_features``, ``standardized``,
        ``seed``, ``split``, ``val_fraction``, ``dtype``, and per source e.g.
        ``noise_std``, ``w_star``, ``classes``, ``path``.  See :func:`load_dataset`.

    Attributes
    ----------
    loss : str
        ``"cross_entropy"`` for classification, ``"mse"`` for regression.
    n_in, n_out : int
        Input width and output width of a model for this data (``n_out`` is
        ``n_classes`` for classification).
    n_train, n_val : int
        Numbers of training and validation examples.
    validation : tuple
        ``(X_val, y_val)``, as :func:`minigd.fit` takes it.

    Examples
    --------
    >>> from minigd.data import load_dataset
    >>> ds = load_dataset("teacher_student", n=200, n_in=5, n_classes=3, seed=1)
    >>> ds.X_train.shape, ds.X_val.shape, ds.loss, ds.n_out
    ((160, 5), (40, 5), 'cross_entropy', 3)
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    task: str
    n_classes: int | None
    name: str
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        check_choice("task", self.task, TASKS)
        if not isinstance(self.name, str):
            raise TypeError(f"name: expected a str, got {_got(self.name)}")
        if not isinstance(self.info, dict):
            raise TypeError(f"info: expected a dict, got {_got(self.info)}")
        for nm in ("X_train", "y_train", "X_val", "y_val"):
            if not isinstance(getattr(self, nm), np.ndarray):
                raise TypeError(f"{nm}: expected a numpy.ndarray, got {_got(getattr(self, nm))}")
        Xt, Xv = self.X_train, self.X_val
        for nm, X in (("X_train", Xt), ("X_val", Xv)):
            if X.ndim != 2:
                raise ValueError(f"{nm}: expected a 2-D array (n_examples, n_features), got {_got(X)}")
            if X.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
                raise TypeError(f"{nm}: expected dtype float32 or float64, got {_got(X)}")
        if Xv.dtype != Xt.dtype or Xv.shape[1] != Xt.shape[1]:
            raise ValueError(f"X_val: expected {Xt.shape[1]} columns of dtype {Xt.dtype} (as X_train), "
                             f"got {_got(Xv)}")
        for nm, X, y in (("y_train", Xt, self.y_train), ("y_val", Xv, self.y_val)):
            if y.ndim not in (1, 2) or y.shape[0] != X.shape[0]:
                raise ValueError(f"{nm}: expected {X.shape[0]} rows (as X_{nm[2:]}), got {_got(y)}")
        if self.task == "classification":
            k = self.n_classes
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
                raise ValueError(f"n_classes: expected an integer >= 1 for task 'classification', "
                                 f"got {_got(k)}")
            for nm, y in (("y_train", self.y_train), ("y_val", self.y_val)):
                if y.ndim != 1 or y.dtype != np.int64:
                    raise TypeError(f"{nm}: expected int64 class labels of shape (n,), got {_got(y)}")
                if y.size and (y.min() < 0 or y.max() >= k):
                    raise ValueError(f"{nm}: expected class labels in [0, {k}), "
                                     f"got values in [{y.min()}, {y.max()}]")
        else:
            if self.n_classes is not None:
                raise ValueError(f"n_classes: expected None for task 'regression', got {_got(self.n_classes)}")
            yt, yv = self.y_train, self.y_val
            for nm, y in (("y_train", yt), ("y_val", yv)):
                if y.dtype != Xt.dtype:
                    raise TypeError(f"{nm}: expected regression targets of dtype {Xt.dtype} (as X_train), "
                                    f"got {_got(y)}")
            if yt.shape[1:] != yv.shape[1:]:
                raise ValueError(f"y_val: expected targets with trailing shape {yt.shape[1:]} (as y_train), "
                                 f"got {_got(yv)}")

    # -- derived sizes ----------------------------------------------------------------------
    @property
    def loss(self) -> str:
        """The matching loss name: ``"cross_entropy"`` or ``"mse"``."""
        return _TASK_LOSS[self.task]

    @property
    def n_in(self) -> int:
        """Number of input features (the model's input width)."""
        return int(self.X_train.shape[1])

    @property
    def n_out(self) -> int:
        """The model's output width: ``n_classes``, or the number of regression targets."""
        if self.task == "classification":
            return int(self.n_classes)
        return 1 if self.y_train.ndim == 1 else int(self.y_train.shape[1])

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return int(self.X_train.shape[0])

    @property
    def n_val(self) -> int:
        """Number of validation examples."""
        return int(self.X_val.shape[0])

    @property
    def dtype(self) -> np.dtype:
        """The feature dtype (float32 or float64)."""
        return self.X_train.dtype

    @property
    def validation(self) -> tuple[np.ndarray, np.ndarray]:
        """``(X_val, y_val)``, the form :func:`minigd.fit`'s ``validation=`` takes."""
        return self.X_val, self.y_val

    def sizes(self, hidden=()) -> list[int]:
        """Layer sizes ``[n_in, *hidden, n_out]`` for :class:`minigd.MLP` on this data.

        Parameters
        ----------
        hidden : sequence of int
            Hidden widths (empty for a linear model).
        """
        return [self.n_in, *(int(h) for h in hidden), self.n_out]

    # -- descriptions ---------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A SHA-256 hex digest of the four arrays (dtypes, shapes and bytes).

        Two data sets with the same fingerprint hold identical data in identical order.
        """
        h = hashlib.sha256()
        for a in (self.X_train, self.y_train, self.X_val, self.y_val):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.data)
        return h.hexdigest()

    def spec(self) -> dict:
        """A JSON-serialisable description: sizes, task, loss, provenance and fingerprint.

        Numpy arrays and scalars in ``info`` become lists and Python scalars, so the result
        can go straight into ``json.dumps`` (a study's record of what it trained on).

        Returns
        -------
        dict
            Keys ``name``, ``task``, ``loss``, ``n_classes``, ``n_in``, ``n_out``,
            ``n_train``, ``n_val``, ``dtype``, ``fingerprint`` and ``info``.
        """
        return {
            "name": self.name, "task": self.task, "loss": self.loss,
            "n_classes": self.n_classes, "n_in": self.n_in, "n_out": self.n_out,
            "n_train": self.n_train, "n_val": self.n_val, "dtype": str(self.dtype),
            "fingerprint": self.fingerprint(), "info": _jsonable(self.info),
        }

    def describe(self) -> str:
        """A few human-readable lines: what the data is, its sizes and how it was prepared."""
        i = self.info
        what = (f"classification, {self.n_classes} classes" if self.task == "classification"
                else f"regression, {self.n_out} target{'s' if self.n_out != 1 else ''}")
        lines = [f"{self.name}: {what}, {self.n_in} features; "
                 f"{self.n_train} train / {self.n_val} validation examples ({self.dtype})"]
        src = i.get("source")
        if src:
            lines.append(f"  source: {src}" + (f" ({i['path']})" if "path" in i else ""))
        prep = [f"split: {i['split']}" + (f", seed {i['seed']}" if i.get("split") != "provided" else "")
                ] if "split" in i else []
        if "standardized" in i:
            prep.append("standardized with training statistics" if i["standardized"] else "not standardized")
        if i.get("noise_std") is not None:
            prep.append(f"noise std {i['noise_std']:g}")
        if prep:
            lines.append("  " + "; ".join(prep))
        if self.task == "classification" and self.n_train:
            counts = np.bincount(self.y_train, minlength=self.n_classes)
            lines.append(f"  training examples per class: min {counts.min()}, max {counts.max()}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, task={self.task!r}, n_classes={self.n_classes}, "
                f"X_train={self.X_train.shape} {self.X_train.dtype}, X_val={self.X_val.shape}, "
                f"loss={self.loss!r})")


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (np.dtype, Path)):
        return str(v)
    return v


# ------------------------------------------------------------------------------------------
# what a loader hands to the pipeline
# ------------------------------------------------------------------------------------------

class RawData(NamedTuple):
    """What a loader returns: raw arrays before labels, split, scaling and cast.

    Attributes
    ----------
    X : ndarray (N, d)
        Numeric features (any real dtype).
    y : ndarray (N,) or (N, k)
    task : {"classification", "regression"}
    info : dict
        Source-specific provenance, merged into :attr:`Dataset.info`.
    n_classes : int or None
        For generated labels already in ``0..K-1`` (no remapping); ``None`` to remap the
        observed labels.
    X_val, y_val : ndarray or None
        A validation set that comes with the source (then no split is made).
    generated : bool
        True when the loader produced exactly ``n`` examples itself (no subsampling).
    """

    X: np.ndarray
    y: np.ndarray
    task: str
    info: dict
    n_classes: int | None = None
    X_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    generated: bool = False


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent stream per purpose: same ``seed``, different ``key`` -> unrelated draws."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


_STREAM_SUBSAMPLE, _STREAM_SPLIT, _STREAM_TEACHER, _STREAM_INPUTS, _STREAM_NOISE = range(5)


# ------------------------------------------------------------------------------------------
# named sources
# ------------------------------------------------------------------------------------------

def _load_digits(*, n: int | None, seed: int) -> RawData:
    """scikit-learn's bundled handwritten digits: 1797 images of 8x8 pixels (0..16), 10 classes.

    Needs scikit-learn (``pip install 'minigd[sklearn]'``); no download.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("name_or_path: the 'digits' data set needs scikit-learn (its bundled copy), "
                          "which is not installed: pip install 'minigd[sklearn]'") from exc
    d = load_digits()
    return RawData(np.asarray(d.data, np.float64), np.asarray(d.target, np.int64), "classification",
                   {"source": "scikit-learn load_digits (UCI optical handwritten digits, 8x8, values 0..16)"})


def _activation_fn(name: str) -> Callable[[np.ndarray], np.ndarray]:
    return {
        "identity": lambda z: z,
        "relu": lambda z: np.maximum(z, 0.0),
        "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
        "tanh": np.tanh,
        "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    }[name]


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


def _load_teacher_student(*, n: int | None, seed: int, n_in: int = 10, teacher_width=32,
                          n_classes: int = 2, task: str = "classification", n_out: int = 1,
                          activation: str = "tanh", noise: float = 0.0,
                          data_seed: int | None = None) -> RawData:
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
            raise ValueError(f"n_out: expected 1 (unused) for task 'classification' -- set n_classes "
                             f"instead, got {_got(n_out)}")
    else:
        k = check_int("n_out", n_out, low=1)
        if n_classes != 2:
            raise ValueError(f"n_classes: expected the default (unused) for task 'regression' -- set "
                             f"n_out instead, got {_got(n_classes)}")
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
    info = {"source": "synthetic teacher-student (random teacher MLP, Gaussian inputs)",
            "teacher_sizes": sizes, "activation": activation, "noise_std": noise,
            "data_seed": dseed, "teacher_weights": weights, "teacher_biases": biases}
    return RawData(X, y, task, info, n_classes=k if task == "classification" else None, generated=True)


def _load_linear_regression(*, n: int | None, seed: int, n_in: int = 10, noise: float = 0.1,
                            data_seed: int | None = None) -> RawData:
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
    info = {"source": "synthetic linear regression (Gaussian inputs, Gaussian noise)",
            "w_star": w, "b_star": b, "noise_std": noise, "data_seed": dseed}
    return RawData(X, y, "regression", info, generated=True)


#: name -> loader.  A loader is called as ``loader(n=..., seed=..., **params)`` and returns
#: a :class:`RawData`; its keyword-only parameters (and docstring) document ``params``.
DATASETS: dict[str, Callable[..., RawData]] = {
    "digits": _load_digits,
    "teacher_student": _load_teacher_student,
    "linear_regression": _load_linear_regression,
}


# ------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_NAME = re.compile(r"idx\d+-ubyte(\.gz)?$|\.idx\d*(\.gz)?$", re.IGNORECASE)


#: the largest data file read, in bytes, and the most a compressed one (a ``.gz`` file, a
#: deflated ``.npz`` entry) may decompress to; a module attribute, so it can be raised
MAX_DATA_BYTES = 1 << 31
#: a compressed file may decompress to at most this many times its own size (above
#: :data:`EXPANSION_FLOOR`): real data compresses far less (MNIST: ~5x), a bomb of zeros ~1000x
MAX_EXPANSION = 256
#: below this many decompressed bytes the expansion ratio is not checked
EXPANSION_FLOOR = 64 << 20


def _decompressed_limit(n_compressed: int) -> int:
    return min(MAX_DATA_BYTES, max(EXPANSION_FLOOR, MAX_EXPANSION * n_compressed))


def _read_bytes(path: Path, arg: str) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic.

    Only a regular file is opened (``/dev/zero``, a FIFO, a socket, a device or a
    directory is a ValueError at once, without blocking); at most :data:`MAX_DATA_BYTES`
    are read, and gzip data is decompressed with a cap (:func:`_decompressed_limit`):
    a decompression bomb is refused, not expanded."""
    try:
        data = read_regular(path, arg, MAX_DATA_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(f"{arg}: expected an existing file, got {str(path)!r} (no such file)") from None
    except OSError as exc:
        raise ValueError(f"{arg}: expected a readable file, got {str(path)!r} ({exc.strerror or exc})") from exc
    if data[:2] == b"\x1f\x8b":
        limit = _decompressed_limit(len(data))
        try:
            data = gunzip_capped(data, limit)
        except GzipLimitError as exc:
            raise ValueError(f"{arg}: expected a gzip file that decompresses to at most {limit} bytes "
                             f"({MAX_EXPANSION} times its {len(data)} bytes, at least {EXPANSION_FLOOR}, "
                             f"at most MAX_DATA_BYTES={MAX_DATA_BYTES}), got {str(path)!r}: {exc}") from None
        except GzipError as exc:
            raise ValueError(f"{arg}: expected a valid gzip file, got {str(path)!r} which could not be "
                             f"decompressed ({exc})") from None
    return data


def read_idx(path, *, arg: str = "path") -> np.ndarray:
    """Read one IDX file (the MNIST format), plain or gzip-compressed.

    Parameters
    ----------
    path : str or os.PathLike
    arg : str
        The argument name used in error messages.

    Returns
    -------
    ndarray
        Shape from the header, in the native-endian version of the stored dtype.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Bad magic (the first two bytes must be zero), an unknown type code, zero
        dimensions, or a data section shorter or longer than the header says.

    Notes
    -----
    Header: two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a
    big-endian uint32; the data follow, big-endian, row-major.
    """
    path = Path(path)
    data = _read_bytes(path, arg)
    where = f"{arg} ({str(path)!r})"
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{where}: expected an IDX file starting with magic 0x00 0x00 <type> <ndims>, "
                         f"got bytes {data[:4].hex(' ') or '(empty file)'}")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{where}: expected an IDX type code in "
                         f"{[hex(c) for c in _IDX_DTYPES]}, got {hex(code)} (bad magic)")
    if ndim == 0:
        raise ValueError(f"{where}: expected at least 1 dimension in the IDX header, got 0 (bad magic)")
    head = 4 + 4 * ndim
    if len(data) < head:
        raise ValueError(f"{where}: truncated IDX header: expected {head} bytes for {ndim} dimensions, "
                         f"got {len(data)}")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dt = _IDX_DTYPES[code]
    if 0 in dims:
        raise ValueError(f"{where}: expected an IDX file holding at least one value, got dimensions {dims}")
    need = math.prod(dims) * dt.itemsize
    have = len(data) - head
    if have < need:
        raise ValueError(f"{where}: truncated IDX data: expected {need} bytes for shape {dims} of "
                         f"{dt.newbyteorder('=')}, got {have}")
    if have > need:
        raise ValueError(f"{where}: expected exactly {need} bytes of IDX data for shape {dims}, "
                         f"got {have} ({have - need} trailing bytes)")
    return np.frombuffer(data, dt, count=math.prod(dims), offset=head).reshape(dims).astype(dt.newbyteorder("="))


def _idx_candidates(directory: Path, part: str, kind: str) -> list[Path]:
    stem = {"images": "idx3", "labels": "idx1"}[kind]
    names = [f"{part}-{kind}-{stem}-ubyte", f"{part}-{kind}.{stem}-ubyte"]
    return [directory / (nm + gz) for nm in names for gz in ("", ".gz")]


def _load_idx(*, n: int | None, seed: int, path: Path, labels=None, part: str = "train",
              task: str | None = None) -> RawData:
    """MNIST-style IDX files: an images file and a labels file.

    ``path`` is the images file (``labels=`` the labels file; when omitted, the sibling
    with the standard name, ``...-labels-idx1-ubyte[.gz]``, is used if it exists) or a
    directory holding ``{part}-images-idx3-ubyte[.gz]`` and ``{part}-labels-idx1-ubyte[.gz]``
    (``part``: ``"train"``, the default, or ``"t10k"``).  Images are flattened to
    ``(n, rows * cols)`` with pixel values as stored (0..255 for MNIST): scaling is the
    job of ``standardize``.  Integer labels mean classification unless ``task`` says
    otherwise.
    """
    if not isinstance(part, str) or not re.fullmatch(r"[A-Za-z0-9_.]+", part):
        raise ValueError(f"part: expected the prefix of the standard IDX names, e.g. 'train' or 't10k', "
                         f"got {_got(part)}")
    if path.is_dir():
        found = {}
        for kind in ("images", "labels"):
            cands = _idx_candidates(path, part, kind)
            hit = next((c for c in cands if c.is_file()), None)
            if hit is None:
                raise FileNotFoundError(f"name_or_path: expected a directory with the standard IDX {kind} file, "
                                        f"one of {[c.name for c in cands]}, got {str(path)!r} without any")
            found[kind] = hit
        if labels is not None:
            raise ValueError(f"labels: expected None when name_or_path is a directory "
                             f"(the labels file is {found['labels'].name}), got {_got(labels)}")
        images_path, labels_path = found["images"], found["labels"]
    else:
        images_path = path
        if labels is None:
            sib = re.sub(r"images([-.])idx3", r"labels\1idx1", path.name)
            cands = [] if sib == path.name else [path.with_name(sib), path.with_name(sib + ".gz"),
                                                 path.with_name(sib.removesuffix(".gz"))]
            labels_path = next((c for c in cands if c.is_file()), None)
            if labels_path is None:
                raise ValueError(f"labels: expected the path of the IDX labels file for images "
                                 f"{path.name!r} (no sibling with the standard name found), got None")
        elif isinstance(labels, (str, os.PathLike)):
            labels_path = Path(labels)
            if not labels_path.exists():     # (a FIFO or device: read_idx refuses it, naming what it is)
                raise FileNotFoundError(f"labels: expected an existing IDX labels file, got {str(labels)!r} "
                                        f"(no such file)")
        else:
            raise TypeError(f"labels: expected a path (str or os.PathLike) to an IDX labels file, "
                            f"got {_got(labels)}")
    X = read_idx(images_path, arg="name_or_path")
    y = read_idx(labels_path, arg="labels")
    if X.ndim < 2:
        raise ValueError(f"name_or_path: expected an IDX images file with >= 2 dimensions (n, ...), got "
                         f"shape {X.shape} in {images_path.name!r} -- is it the labels file?")
    if y.ndim != 1:
        raise ValueError(f"labels: expected a 1-dimensional IDX labels file, got shape {y.shape} "
                         f"in {labels_path.name!r}")
    info = {"source": "IDX files", "path": str(images_path.resolve()),
            "labels_path": str(labels_path.resolve()), "image_shape": list(X.shape[1:])}
    X2 = X.reshape(X.shape[0], math.prod(X.shape[1:]))
    return RawData(X2, y, _task_from_dtype(y, task), info)


def _task_from_dtype(y: np.ndarray, task) -> str:
    if task is not None:
        return check_choice("task", task, TASKS)
    if y.dtype.kind in "iub":
        return "classification"
    return "regression"


def _load_npz(*, n: int | None, seed: int, path: Path, task: str | None = None) -> RawData:
    """A ``.npz`` archive with arrays ``X`` (n, ...) and ``y``, optionally ``X_val`` and ``y_val``.

    ``X`` with more than two dimensions is flattened per example.  Integer (or bool)
    ``y`` means classification, floating ``y`` regression, unless ``task`` says
    otherwise.  When ``X_val``/``y_val`` are present they are the validation set and no
    split is made (``val_fraction`` is not used).
    """
    data = _read_bytes(path, "name_or_path")
    if data[:4] != b"PK\x03\x04" and data[:4] != b"PK\x05\x06":
        raise ValueError(f"name_or_path: expected a valid .npz archive (a zip file), got {str(path)!r} "
                         f"which starts with bytes {data[:4].hex(' ') or '(empty file)'}")
    arrays = _read_npz(data, path)
    missing = [k for k in ("X", "y") if k not in arrays]
    if missing:
        raise ValueError(f"name_or_path ({str(path)!r}): expected arrays 'X' and 'y' in the .npz, "
                         f"got {sorted(arrays)} (missing {missing})")
    if ("X_val" in arrays) != ("y_val" in arrays):
        raise ValueError(f"name_or_path ({str(path)!r}): expected both 'X_val' and 'y_val' or neither, "
                         f"got only {'X_val' if 'X_val' in arrays else 'y_val'}")
    X, y = arrays["X"], arrays["y"]
    task = _task_from_dtype(y, task)
    info = {"source": "npz file", "path": str(path.resolve())}
    if X.ndim > 2:
        info["example_shape"] = list(X.shape[1:])
        X = X.reshape(X.shape[0], math.prod(X.shape[1:]))
    Xv, yv = arrays.get("X_val"), arrays.get("y_val")
    if Xv is not None and Xv.ndim > 2:
        Xv = Xv.reshape(Xv.shape[0], math.prod(Xv.shape[1:]))
    return RawData(X, y, task, info, X_val=Xv, y_val=yv)


class _NpzEntryError(ValueError):
    pass


def _read_npz(data: bytes, path: Path) -> dict:
    """The ``.npy`` entries of a ``.npz`` archive held in ``data``, read without trusting
    it: the entries' declared sizes together may not exceed :func:`_decompressed_limit`
    (a deflated entry is never expanded past its declared size: zipfile stops there),
    every array header is checked against its entry's size before anything is allocated
    (a header claiming 10**12 elements is refused, not allocated), and object arrays
    (pickle) are refused.  Entries not named ``*.npy`` are ignored."""
    where = f"name_or_path ({str(path)!r})"
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except Exception as exc:  # zipfile.BadZipFile, OSError, EOFError...
        raise ValueError(f"name_or_path: expected a valid .npz archive, got {str(path)!r} "
                         f"which could not be read ({type(exc).__name__}: {exc})") from exc
    budget = _decompressed_limit(len(data))
    total = sum(i.file_size for i in infos)
    if total > budget:
        raise ValueError(f"{where}: expected a .npz whose entries hold at most {budget} bytes "
                         f"({MAX_EXPANSION} times the file's {len(data)} bytes, at least {EXPANSION_FLOOR}, "
                         f"at most MAX_DATA_BYTES={MAX_DATA_BYTES}), got entries of {total} bytes")
    arrays = {}
    with zf:
        for info in infos:
            name = info.filename
            if not name.endswith(".npy") or info.is_dir():
                continue
            try:
                with zf.open(info) as f:
                    version, shape, fortran, dt = read_npy_header(f, _NpzEntryError)
                    if dt.hasobject:
                        raise ValueError(f"{where}: expected a .npz of numeric arrays, got an entry that "
                                         f"needs pickle ({name!r}: an object array, dtype {dt})")
                    if dt.itemsize == 0:
                        raise _NpzEntryError(f"a dtype of zero size ({dt})")
                    nbytes = dt.itemsize * math.prod(shape)
                    if nbytes > info.file_size:
                        raise _NpzEntryError(f"a header claiming shape {shape} of {dt} ({nbytes} bytes), "
                                             f"more than the entry's {info.file_size} bytes")
                    buf = f.read(nbytes)
                    if len(buf) != nbytes:
                        raise _NpzEntryError(f"{len(buf)} bytes of data, its header needs {nbytes}")
                arr = np.frombuffer(buf, dtype=dt, count=math.prod(shape))
                if dt.kind == "b":       # a crafted byte other than 0/1 is True to some numpy calls only
                    arr = arr.view(np.uint8) != 0
                arrays[name[:-4]] = arr.reshape(shape, order="F" if fortran else "C").copy()
            except _NpzEntryError as exc:
                raise ValueError(f"{where}: expected a .npz of numeric arrays, got entry {name!r} with "
                                 f"{exc}") from None
            except ValueError as exc:
                if str(exc).startswith(where):
                    raise
                raise ValueError(f"name_or_path: expected a valid .npz archive, got {str(path)!r} whose "
                                 f"entry {name!r} could not be read ({exc})") from exc
            except Exception as exc:  # a damaged entry: CRC, deflate stream, header syntax, ...
                raise ValueError(f"name_or_path: expected a valid .npz archive, got {str(path)!r} whose "
                                 f"entry {name!r} could not be read ({type(exc).__name__}: {exc})") from exc
    return arrays


def _parse_float(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def _csv_fast(text: str, delimiter: str, skip: int, width: int | None) -> np.ndarray | None:
    """numpy's C parser for a well-formed file; ``None`` sends the caller to the exact slow path."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # "input contained no data" and the like
            values = np.loadtxt(io.StringIO(text), dtype=np.float64, delimiter=delimiter, comments="#",
                                skiprows=skip, ndmin=2)
    except (ValueError, Warning):
        return None
    if values.shape[0] == 0 or (width is not None and values.shape[1] != width):
        return None
    return values


def _load_csv(*, n: int | None, seed: int, path: Path, label_column=-1, header=None,
              delimiter: str | None = None, task: str | None = None) -> RawData:
    """A numeric ``.csv`` (or ``.tsv``; ``.gz`` compressed too): one example per row.

    ``header``: ``None`` (detect: the first row is a header when none of its fields is a
    number, data when all are; a mix is an error), ``True`` or ``False``.  ``label_column``: the target column, an index
    (negative counts from the end; default ``-1``, the last) or a header name.
    ``delimiter``: default ``","`` (``"\\t"`` for ``.tsv``).  Blank lines and lines
    starting with ``#`` are skipped.  Integer-valued labels mean classification,
    anything else regression, unless ``task`` says otherwise.
    """
    if header is not None and not isinstance(header, bool):
        raise TypeError(f"header: expected None (detect), True or False, got {_got(header)}")
    if delimiter is None:
        delimiter = "\t" if re.search(r"\.tsv(\.gz)?$", path.name, re.IGNORECASE) else ","
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise ValueError(f"delimiter: expected a single character, got {_got(delimiter)}")
    raw = _read_bytes(path, "name_or_path")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"name_or_path: expected a UTF-8 text .csv file, got {str(path)!r} "
                         f"which is not text ({exc.reason} at byte {exc.start})") from exc
    where = f"name_or_path ({path.name!r})"
    def records():   # (line number, stripped fields) of the rows that hold data or a header
        try:
            for lineno, fields in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), start=1):
                if not fields or all(not f.strip() for f in fields) or fields[0].lstrip().startswith("#"):
                    continue
                yield lineno, [f.strip() for f in fields]
        except csv.Error as exc:     # a field past csv's size limit, a stray quote, ...
            raise ValueError(f"{where}: expected a well-formed .csv, got a line the csv reader refuses "
                             f"({exc})") from None

    first = next(records(), None)
    if first is None:
        raise ValueError(f"{where}: expected at least one data row in the .csv, got none")
    first_line, first_fields = first
    if header is None:
        text_fields = [f for f in first_fields if _parse_float(f) is None]
        if text_fields and len(text_fields) < len(first_fields):
            raise ValueError(f"header: could not tell whether line {first_line} of {path.name!r} is a header "
                             f"(it mixes numbers and text such as {text_fields[0]!r}); expected "
                             f"header=True or header=False, got None (detect)")
        header = bool(text_fields)
    names = first_fields if header else None
    values = _csv_fast(text, delimiter, skip=first_line if header else 0,
                       width=len(names) if names is not None else None)
    if values is None:   # the slow path: exact line and column of whatever is wrong
        rows = list(records())[1 if header else 0:]
        if not rows:
            raise ValueError(f"{where}: expected data rows after the header, got only the header")
        width = len(names) if names is not None else len(rows[0][1])
        values = np.empty((len(rows), width), np.float64)
        for r, (lineno, fields) in enumerate(rows):
            if len(fields) != width:
                raise ValueError(f"{where}: ragged rows: expected {width} fields per row "
                                 f"({'as the header' if names is not None else 'as the first row'}), "
                                 f"got {len(fields)} on line {lineno}")
            for c, f in enumerate(fields):
                v = _parse_float(f)
                if v is None:
                    raise ValueError(f"{where}: expected numeric entries, got {f!r} on line {lineno}, "
                                     f"column {c + 1}")
                values[r, c] = v
    width = values.shape[1]
    if width < 2:
        raise ValueError(f"{where}: expected at least 2 columns (features and a label), got {width}")
    # the label column
    if isinstance(label_column, str):
        if names is None:
            raise ValueError(f"label_column: expected a column index (the .csv has no header), "
                             f"got the name {label_column!r}")
        if label_column not in names:
            raise ValueError(f"label_column: expected one of the header's names {names}, got {label_column!r}")
        j = names.index(label_column)
    elif isinstance(label_column, numbers.Integral) and not isinstance(label_column, bool):
        j = int(label_column)
        if not -width <= j < width:
            raise ValueError(f"label_column: expected an index in [{-width}, {width}) for {width} columns, "
                             f"got {j}")
        j %= width
    else:
        raise TypeError(f"label_column: expected an int index or a header name, got {_got(label_column)}")
    y = values[:, j]
    X = np.delete(values, j, axis=1)
    if task is None:
        fin = np.isfinite(y)
        task = "classification" if fin.all() and np.array_equal(y, np.round(y)) else "regression"
    else:
        task = check_choice("task", task, TASKS)
    info = {"source": "csv file", "path": str(path.resolve()), "header": bool(names is not None),
            "label_column": j if names is None else names[j]}
    if names is not None:
        info["feature_names"] = [nm for i, nm in enumerate(names) if i != j]
    return RawData(X, y, task, info)


_FILE_LOADERS = {"npz": _load_npz, "csv": _load_csv, "idx": _load_idx}


def _file_kind(path: Path) -> str | None:
    if path.is_dir():
        return "idx"
    nm = path.name.lower()
    if nm.endswith(".npz"):
        return "npz"
    if re.search(r"\.(csv|tsv)(\.gz)?$", nm):
        return "csv"
    if _IDX_NAME.search(nm):
        return "idx"
    return None


# ------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------

def _check_seed(name: str, seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise TypeError(f"{name}: expected a non-negative int (recorded for provenance), got {_got(seed)}")
    return int(seed)


def _check_params(loader: Callable, params: dict, what: str) -> None:
    allowed = [p.name for p in inspect.signature(loader).parameters.values()
               if p.kind == p.KEYWORD_ONLY and p.name not in ("n", "seed", "path")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TypeError(f"params: expected keyword arguments among {allowed} for {what}, "
                        f"got unknown {unknown}")


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
        raise ValueError(f"{name}: expected finite values, got {int(bad.sum())} NaN/inf entries "
                         f"(the first at row {r}, column {c}: {X[r, c]})")
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
        raise ValueError(f"{name}: expected finite values, got NaN/inf in {bad.size} rows "
                         f"(the first at row {bad[0]})")
    return y


def _labels(name: str, y: np.ndarray) -> None:
    if y.ndim != 1:
        raise ValueError(f"{name}: expected class labels of shape (n,) for task 'classification', got {_got(y)}")
    if y.dtype.kind == "f" and not np.array_equal(y, np.round(y)):
        bad = y[y != np.round(y)][0]
        raise ValueError(f"{name}: expected integer-valued class labels for task 'classification', "
                         f"got non-integer values such as {bad!r}; pass task='regression' for real targets")


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
    chosen, rest = [], []
    for c in range(len(classes)):
        members = np.flatnonzero(inv == c)
        members = members[rng.permutation(members.size)]
        chosen.append(members[:share[c]])
        rest.append(members[share[c]:])
    chosen, rest = np.concatenate(chosen), np.concatenate(rest)
    return chosen[rng.permutation(chosen.size)], rest[rng.permutation(rest.size)]


def _build(name: str, raw: RawData, *, val_fraction: float, standardize: bool, std_floor: float,
           seed: int, dtype: np.dtype, n: int | None, load_args: dict) -> Dataset:
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
        if n_classes is None:   # remap the observed labels to 0..K-1 in sorted order
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
            raise ValueError(f"n: expected at most the {n_avail} {'training ' if provided else ''}examples "
                             f"available in {name!r}, got {n}")
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
            raise ValueError(f"n: expected enough examples for a train/validation split with "
                             f"val_fraction={val_fraction} (at least one on each side), got {N} examples "
                             f"({n_val} would go to validation)")
        va, tr = _choose(strat, N, n_val, _rng(seed, _STREAM_SPLIT))
        Xt, yt, Xv, yv = X[tr], y[tr], X[va], y[va]
        info.update(split="stratified" if strat is not None else "random", val_fraction=val_fraction)
    info.update(n=int(Xt.shape[0] + Xv.shape[0]), n_available=int(n_avail), n_features=int(X.shape[1]),
                seed=seed, standardized=bool(standardize), dtype=str(dtype))
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
        if "w_star" in info:   # the true linear map in the returned coordinates
            info["w_star_effective"] = info["w_star"] * scale
            info["b_star_effective"] = float(info["b_star"] + mean @ info["w_star"])
    if task == "regression":
        yt, yv = _cast("y", yt, dtype, standardize), _cast("y", yv, dtype, standardize)
    info["load_args"] = load_args
    return Dataset(_cast("X", Xt, dtype, standardize), yt, _cast("X", Xv, dtype, standardize), yv, task,
                   n_classes, name, info)


def _standardized(A: np.ndarray, mean: np.ndarray, scale: np.ndarray, colmax: np.ndarray,
                  name: str) -> np.ndarray:
    """``(A - mean) / scale``, computed on ``A / colmax`` where the plain form overflows
    (entries near float64's limit); a ValueError naming ``name`` if even that does not fit."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        Z = (A - mean) / scale
        if not np.isfinite(Z).all():
            Z = (A / colmax - mean / colmax) * (colmax / scale)
    if not np.isfinite(Z).all():
        raise ValueError(f"{name}: expected values that can be standardized in float64, got entries up to "
                         f"{float(np.nanmax(np.abs(A))):.6g} whose standardized values overflow")
    return Z


def _cast(name: str, a: np.ndarray, dtype: np.dtype, standardized: bool) -> np.ndarray:
    """``a.astype(dtype)``, refusing values beyond the dtype's range (float32: 3.4e38),
    which the cast would turn into inf."""
    with np.errstate(over="ignore"):
        out = a.astype(dtype)
    if out.size and not np.isfinite(out).all():
        big = float(np.max(np.abs(a)))
        raise ValueError(f"{name}: expected values that fit {dtype} (magnitude at most "
                         f"{float(np.finfo(dtype).max):.3g}), got entries up to {big:.6g}; "
                         f"{'' if standardized or name == 'y' else 'standardize=True or '}dtype='float64' "
                         f"keeps them")
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


def load_dataset(name_or_path, *, val_fraction: float = 0.2, standardize: bool = True, seed: int = 0,
                 dtype="float32", n: int | None = None, std_floor: float = DEFAULT_STD_FLOOR,
                 **params) -> Dataset:
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
            looks_like_path = (not isinstance(name_or_path, str) or os.sep in name_or_path
                               or "/" in name_or_path or path.suffix != "")
            if looks_like_path:
                raise FileNotFoundError(f"name_or_path: expected a data set name {sorted(DATASETS)} or an "
                                        f"existing file, got {str(name_or_path)!r} (no such file)")
            close = difflib.get_close_matches(str(name_or_path), DATASETS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"name_or_path: expected a data set name, one of {sorted(DATASETS)}, or a path "
                             f"to a .npz/.csv/IDX file, got {str(name_or_path)!r}{hint}")
        if kind is None:
            raise ValueError(f"name_or_path: expected a file ending in .npz, .csv, .tsv (optionally .gz) or an "
                             f"IDX file (*-idx3-ubyte[.gz]) or a directory of IDX files, got {path.name!r}")
        loader = _FILE_LOADERS[kind]
        _check_params(loader, params, f"a {kind} file")
        raw = loader(n=n, seed=seed, path=path, **params)
        display = path.name
    else:
        raise TypeError(f"name_or_path: expected a data set name (str) or a path (str or os.PathLike), "
                        f"got {_got(name_or_path)}")
    load_args = {"name_or_path": str(name_or_path), "val_fraction": vf, "standardize": standardize,
                 "seed": seed, "dtype": str(dt), "n": n, "std_floor": floor,
                 "params": {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in params.items()}}
    return _build(display, raw, val_fraction=vf, standardize=standardize, std_floor=floor, seed=seed,
                  dtype=dt, n=n, load_args=load_args)


def from_arrays(X, y, *, task: str | None = None, X_val=None, y_val=None, name: str = "arrays",
                val_fraction: float = 0.2, standardize: bool = True, seed: int = 0, dtype="float32",
                n: int | None = None, std_floor: float = DEFAULT_STD_FLOOR) -> Dataset:
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
        raise ValueError(f"X_val, y_val: expected both or neither, got only "
                         f"{'X_val' if X_val is not None else 'y_val'}")
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {_got(name)}")
    _check_X("X", X)
    _check_y("y", y, X.shape[0], "X")
    raw = RawData(X, y, _task_from_dtype(y, task), {"source": "arrays"}, X_val=X_val, y_val=y_val)
    load_args = {"name_or_path": None, "val_fraction": vf, "standardize": standardize, "seed": seed,
                 "dtype": str(dt), "n": n, "std_floor": floor, "params": {}}
    return _build(name, raw, val_fraction=vf, standardize=standardize, std_floor=floor, seed=seed,
                  dtype=dt, n=n, load_args=load_args)

