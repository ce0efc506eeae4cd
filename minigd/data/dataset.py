"""The two containers of :mod:`minigd.data`, and its seeded random streams.

:class:`Dataset` is what the pipeline (:mod:`minigd.data.pipeline`) returns: a frozen
train/validation split with its provenance.  :class:`RawData` is what a loader (a named
source of :mod:`minigd.data.sources`, a file reader of :mod:`minigd.data.files`) hands to
the pipeline.  :func:`_rng` gives every purpose (subsample, split, teacher, inputs, noise)
its own stream of one seed, so the streams are listed here, together, once.
"""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from minigd._validation import _got, check_choice

__all__ = ["Dataset", "RawData", "TASKS"]

#: the two kinds of supervised task a :class:`Dataset` can hold
TASKS = ("classification", "regression")

#: the loss that matches each task (names of :data:`minigd.nn.LOSSES`)
_TASK_LOSS = {"classification": "cross_entropy", "regression": "mse"}


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
            raise ValueError(f"X_val: expected {Xt.shape[1]} columns of dtype {Xt.dtype} (as X_train), got {_got(Xv)}")
        for nm, X, y in (("y_train", Xt, self.y_train), ("y_val", Xv, self.y_val)):
            if y.ndim not in (1, 2) or y.shape[0] != X.shape[0]:
                raise ValueError(f"{nm}: expected {X.shape[0]} rows (as X_{nm[2:]}), got {_got(y)}")
        if self.task == "classification":
            k = self.n_classes
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
                raise ValueError(f"n_classes: expected an integer >= 1 for task 'classification', got {_got(k)}")
            for nm, y in (("y_train", self.y_train), ("y_val", self.y_val)):
                if y.ndim != 1 or y.dtype != np.int64:
                    raise TypeError(f"{nm}: expected int64 class labels of shape (n,), got {_got(y)}")
                if y.size and (y.min() < 0 or y.max() >= k):
                    raise ValueError(f"{nm}: expected class labels in [0, {k}), got values in [{y.min()}, {y.max()}]")
        else:
            if self.n_classes is not None:
                raise ValueError(f"n_classes: expected None for task 'regression', got {_got(self.n_classes)}")
            yt, yv = self.y_train, self.y_val
            for nm, y in (("y_train", yt), ("y_val", yv)):
                if y.dtype != Xt.dtype:
                    raise TypeError(
                        f"{nm}: expected regression targets of dtype {Xt.dtype} (as X_train), got {_got(y)}"
                    )
            if yt.shape[1:] != yv.shape[1:]:
                raise ValueError(
                    f"y_val: expected targets with trailing shape {yt.shape[1:]} (as y_train), got {_got(yv)}"
                )

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
            assert self.n_classes is not None  # __post_init__: an integer >= 1 for classification
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
            "name": self.name,
            "task": self.task,
            "loss": self.loss,
            "n_classes": self.n_classes,
            "n_in": self.n_in,
            "n_out": self.n_out,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "dtype": str(self.dtype),
            "fingerprint": self.fingerprint(),
            "info": _jsonable(self.info),
        }

    def describe(self) -> str:
        """A few human-readable lines: what the data is, its sizes and how it was prepared."""
        i = self.info
        what = (
            f"classification, {self.n_classes} classes"
            if self.task == "classification"
            else f"regression, {self.n_out} target{'s' if self.n_out != 1 else ''}"
        )
        lines = [
            f"{self.name}: {what}, {self.n_in} features; "
            f"{self.n_train} train / {self.n_val} validation examples ({self.dtype})"
        ]
        src = i.get("source")
        if src:
            lines.append(f"  source: {src}" + (f" ({i['path']})" if "path" in i else ""))
        prep = (
            [f"split: {i['split']}" + (f", seed {i['seed']}" if i.get("split") != "provided" else "")]
            if "split" in i
            else []
        )
        if "standardized" in i:
            prep.append("standardized with training statistics" if i["standardized"] else "not standardized")
        if i.get("noise_std") is not None:
            prep.append(f"noise std {i['noise_std']:g}")
        if prep:
            lines.append("  " + "; ".join(prep))
        if self.task == "classification" and self.n_train:
            assert self.n_classes is not None  # __post_init__: an integer >= 1 for classification
            counts = np.bincount(self.y_train, minlength=self.n_classes)
            lines.append(f"  training examples per class: min {counts.min()}, max {counts.max()}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, task={self.task!r}, n_classes={self.n_classes}, "
            f"X_train={self.X_train.shape} {self.X_train.dtype}, X_val={self.X_val.shape}, "
            f"loss={self.loss!r})"
        )


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


def _check_seed(name: str, seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise TypeError(f"{name}: expected a non-negative int (recorded for provenance), got {_got(seed)}")
    return int(seed)
