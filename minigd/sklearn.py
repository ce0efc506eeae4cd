"""scikit-learn estimators: :class:`MLPClassifier` and :class:`MLPRegressor`.

They follow the scikit-learn estimator API (``fit`` / ``partial_fit`` / ``predict`` /
``predict_proba`` / ``score`` / ``get_params`` / ``set_params``; ``__init__`` only stores
the hyper-parameters, ``fit`` validates them; fitted state ends with ``_``), so they work in
:class:`~sklearn.pipeline.Pipeline`, :class:`~sklearn.model_selection.GridSearchCV` and
:func:`~sklearn.model_selection.cross_val_score`, and pass
:func:`sklearn.utils.estimator_checks.parametrize_with_checks`.

Input conversion is the estimator's job (the core :func:`minigd.fit` converts nothing):
``X`` goes through :func:`sklearn.utils.validation.validate_data` (lists, DataFrames, int
and float arrays; no sparse matrices, no NaN/inf).  The model's dtype follows the input, as
scikit-learn's own estimators do: float32 ``X`` trains a float32 model, float64 ``X`` a
float64 one, anything else (ints, bools, lists, DataFrames of ints) is converted to float64;
an explicit ``dtype=`` wins (``X`` and float targets are cast to it; values that overflow it
are an error).  ``predict`` / ``partial_fit`` cast later inputs to the fitted model's dtype.
Class labels of any type are encoded as ``0..n_classes-1`` through ``classes_``.

Hyper-parameters are checked in ``fit`` (``__init__`` only stores them) against
:data:`minigd._constraints.ESTIMATOR_PARAMS`, the estimators' entries of minigd's one
parameter table: a wrong type is a TypeError, a wrong value a ValueError, each naming the
parameter.

Examples
--------
>>> from sklearn.datasets import load_digits
>>> from sklearn.model_selection import cross_val_score
>>> from sklearn.pipeline import make_pipeline
>>> from sklearn.preprocessing import MinMaxScaler
>>> from minigd.sklearn import MLPClassifier
>>> X, y = load_digits(return_X_y=True)
>>> clf = make_pipeline(MinMaxScaler(), MLPClassifier((64,), epochs=5, random_state=0))
>>> scores = cross_val_score(clf, X, y, cv=3)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import _check_partial_fit_first_call, check_classification_targets
from sklearn.utils.validation import check_consistent_length, check_is_fitted, validate_data

from minigd._constraints import ESTIMATOR_PARAMS, _got, check_norm, validate_params
from minigd.adaptive import AdaptiveBatchSize
from minigd.history import History
from minigd.model import MLP
from minigd.optim.aliases import SGD, Adam
from minigd.optim.schedules import scale_lr
from minigd.train import fit as _mg_fit

__all__ = ["MLPClassifier", "MLPRegressor"]


def _named(name: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; a ValueError/TypeError it raises is re-raised (same type
    where possible) with ``"<name>: "`` in front of its message."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        msg = f"{name}: {exc}"
        try:
            new = type(exc)(msg)
        except Exception:
            new = (ValueError if isinstance(exc, ValueError) else TypeError)(msg)
        raise new from exc


OPTIMIZERS = ("sgd", "adam")
LR_POLICIES = {"constant": "none", "linear": "linear", "sqrt": "sqrt"}
#: batch_size="auto": min(AUTO_BATCH_SIZE, n_samples)
AUTO_BATCH_SIZE = 32


class _BaseMLP(BaseEstimator):
    """Shared machinery of :class:`MLPClassifier` and :class:`MLPRegressor`."""

    _loss = "mse"
    # fitted state (set by fit / partial_fit; annotations only, for type checkers)
    model_: MLP
    history_: History
    loss_curve_: list
    n_iter_: int
    t_: int
    batch_size_: int
    learning_rate_: float
    noise_scale_: float | None
    _opt_state: Any
    _rng: np.random.Generator

    def __init__(
        self,
        hidden_layer_sizes: int | Sequence[int] = (100,),
        activation: str = "relu",
        *,
        optimizer: str = "adam",
        learning_rate: float = 0.001,
        lr_policy: str = "constant",
        base_batch_size: int = 32,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        batch_size: int | str = "auto",
        epochs: int = 20,
        sampler: str = "shuffle",
        init: str = "he_uniform",
        backend: str = "cpu",
        dtype: str | None = None,
        random_state: Any = None,
        track_noise: int | bool | None = None,
        noise_beta: float = 0.99,
        batch_norm: bool | str = False,
        ghost_batch_size: int | None = None,
        dropout: float = 0.0,
        verbose: bool = False,
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.lr_policy = lr_policy
        self.base_batch_size = base_batch_size
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.epochs = epochs
        self.sampler = sampler
        self.init = init
        self.backend = backend
        self.dtype = dtype
        self.random_state = random_state
        self.track_noise = track_noise
        self.noise_beta = noise_beta
        self.batch_norm = batch_norm
        self.ghost_batch_size = ghost_batch_size
        self.dropout = dropout
        self.verbose = verbose

    # -- hyper-parameters (validated at fit time, as scikit-learn does) -------------------------
    #: what each constructor parameter may be: minigd's parameter table
    #: (:data:`minigd._constraints.ESTIMATOR_PARAMS`), as scikit-learn's
    #: ``_parameter_constraints``
    _parameter_table = ESTIMATOR_PARAMS

    def _check_hyper(self) -> dict:
        """Every hyper-parameter checked against the table (TypeError for a wrong type,
        ValueError for a wrong value, naming it), then the rules between them (batch norm,
        ghost batches and dropout: :func:`minigd._constraints.check_norm`).  Returns the
        normalised values (``hidden_layer_sizes`` a tuple, ``dtype`` None or a numpy.dtype)."""
        p = validate_params(self.get_params(deep=False), self._parameter_table)
        check_norm(p["batch_norm"], p["ghost_batch_size"], p["dropout"], n_hidden=len(p["hidden_layer_sizes"]))
        return p

    def _hidden(self) -> tuple:
        return self._parameter_table["hidden_layer_sizes"].check("hidden_layer_sizes", self.hidden_layer_sizes)

    def _fit_dtype(self, X: np.ndarray) -> np.dtype:
        """The dtype of a new model: ``dtype`` when given, else the validated input's
        (float32 stays float32, float64 stays float64; ``validate_data`` made every other
        input float64)."""
        dt = self._parameter_table["dtype"].check("dtype", self.dtype)
        return X.dtype if dt is None else dt

    def _track(self):
        t = self.track_noise
        return None if t is None or t is False else 1 if t is True else int(t)

    def _new_rngs(self):
        """(model seed, sampler Generator) from random_state."""
        rs = self.random_state
        if isinstance(rs, np.random.Generator):
            a, b = rs.integers(0, 2**63 - 1, size=2)
        else:
            a, b = check_random_state(rs).randint(0, 2**31 - 1, size=2)
        return np.random.default_rng(int(a)), np.random.default_rng(int(b))

    # -- data ---------------------------------------------------------------------------------
    def _cast(self, a: np.ndarray, name: str, dt: np.dtype) -> np.ndarray:
        """``a`` as a C-contiguous array of ``dt``; a value that overflows ``dt`` is an error."""
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(a, dtype=dt)
        if out.dtype != a.dtype and out.size and not np.isfinite(out).all():
            bad = int(np.count_nonzero(~np.isfinite(out)))
            raise ValueError(
                f"{name}: {bad} values overflow {dt} (largest {np.finfo(dt).max:.3g}); "
                f"scale the data or use dtype='float64'"
            )
        return out

    def _validate_X(self, X, reset: bool) -> np.ndarray:
        X = _named("X", validate_data, self, X, reset=reset, dtype=(np.float64, np.float32))
        return self._cast(X, "X", self.model_.dtype)

    def _validate_Xy(self, X: Any, y: Any, reset: bool, **y_params: Any) -> tuple[np.ndarray, np.ndarray]:
        """scikit-learn's checks (``check_X_y``'s, X and y one after the other), with every
        error prefixed by the argument it is about."""
        if y is None:
            raise ValueError(
                f"y: This {type(self).__name__} estimator requires y to be passed, but the target y is None."
            )
        X = _named("X", validate_data, self, X, reset=reset, dtype=(np.float64, np.float32))
        y = _named("y", validate_data, self, "no_validation", y, **y_params)
        _named("X, y", check_consistent_length, X, y)
        return X, y

    # -- training -------------------------------------------------------------------------------
    def _optimizer(self, n: int, quiet: bool):
        if self.batch_size == "adaptive":  # the rate is the one for the starting size
            B = max(2, min(AUTO_BATCH_SIZE, n))
        elif self.batch_size == "auto":
            B = min(AUTO_BATCH_SIZE, n)
        elif self.batch_size == "full":
            B = n
        else:
            B = int(self.batch_size)
        if B > n:
            if not quiet:
                warnings.warn(
                    f"batch_size={B} is larger than the number of samples ({n}); "
                    f"using {n} (full-batch gradient descent)",
                    UserWarning,
                    stacklevel=4,
                )
            B = n
        lr = scale_lr(float(self.learning_rate), B, int(self.base_batch_size), LR_POLICIES[self.lr_policy])
        if self.optimizer == "sgd":
            opt = SGD(lr=lr, momentum=float(self.momentum), weight_decay=float(self.weight_decay))
        else:
            opt = Adam(lr=lr, weight_decay=float(self.weight_decay))
        return B, lr, opt

    def _new_model(self, n_in: int, n_out: int, seed, dtype: np.dtype) -> MLP:
        return MLP(
            [n_in, *self._hidden(), n_out],
            activation=self.activation,
            loss=self._loss,
            dtype=dtype,
            init=self.init,
            seed=seed,
            backend=self.backend,
            batch_norm=self.batch_norm,
            ghost_batch_size=self.ghost_batch_size,
            dropout=self.dropout,
        )

    def _train(self, X, y, *, epochs: int, first: bool, quiet: bool = False) -> None:
        B, lr, opt = self._optimizer(X.shape[0], quiet)
        track = self._track()
        batch_size = B
        if self.batch_size == "adaptive":
            # the controller tracks the noise itself; its default decision period, but the
            # first decision within the first half of the run
            every = max(1, min(AdaptiveBatchSize().every, epochs * -(-X.shape[0] // B) // 2))
            batch_size = AdaptiveBatchSize(min=B, max=X.shape[0], every=every, track_every=min(8, every))
            track = None
        # batch norm needs >= 2 rows per ghost batch: drop a last partial batch that has fewer
        drop_last = self.model_.norm.drops_last(X.shape[0], B) and self.batch_size != "adaptive"
        hist = _mg_fit(
            self.model_,
            X,
            y,
            batch_size=batch_size,
            epochs=epochs,
            optimizer=opt,
            sampler=self.sampler,
            seed=self._rng,
            track_noise=track,
            drop_last=drop_last,
            noise_beta=self.noise_beta if track else 0.99,
            opt_state=None if first else self._opt_state,
            progress=bool(self.verbose),
        )
        self._opt_state = hist.opt_state
        self.history_ = hist
        self.batch_size_ = int(hist.adaptive[-1]["batch_size"]) if hist.adaptive else B
        self.learning_rate_ = lr
        curve = [float(e["loss"]) for e in hist.epochs]
        self.loss_curve_ = curve if first else self.loss_curve_ + curve
        self.n_iter_ = len(curve) if first else self.n_iter_ + len(curve)
        seen = int(hist.column("examples")[-1]) if hist.n_steps else 0
        self.t_ = seen if first else self.t_ + seen
        self.noise_scale_ = hist.noise_tracker.noise_scale if hist.noise_tracker is not None else None

    def _start(self, n_in: int, n_out: int, dtype: np.dtype) -> None:
        model_seed, self._rng = self._new_rngs()
        self.model_ = self._new_model(n_in, n_out, model_seed, dtype)

    def _forward(self, X) -> np.ndarray:
        check_is_fitted(self, "model_")
        X = self._validate_X(X, reset=False)
        return self.model_.forward(X).astype(np.float64)

    # -- pickling: an MLP's weight views must be rebuilt, not copied ----------------------------
    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        m = state.get("model_")
        if isinstance(m, MLP):
            state["model_"] = {"__minigd_mlp__": m.config(), "params": m.params.copy(), "running": m.running.copy()}
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        m = state.get("model_")
        if isinstance(m, dict) and "__minigd_mlp__" in m:
            model = MLP._from_config(m["__minigd_mlp__"])
            model.params[...] = m["params"]
            if "running" in m:
                model.running[...] = m["running"]
            state["model_"] = model
        if hasattr(super(), "__setstate__"):
            super().__setstate__(state)
        else:  # pragma: no cover
            self.__dict__.update(state)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.input_tags.sparse = False
        return tags


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """A minigd multilayer perceptron classifier (softmax cross-entropy), trained with
    mini-batch SGD or Adam by :func:`minigd.fit`.

    Parameters
    ----------
    hidden_layer_sizes : int or sequence of int, default (100,)
        Widths of the hidden layers; ``()`` is multinomial logistic regression.
    activation : str, default "relu"
        ``relu``, ``leaky_relu``, ``tanh``, ``sigmoid``, ``gelu`` or ``identity``.
    optimizer : {"sgd", "adam"}, default "adam"
    learning_rate : float > 0, default 0.001
        The learning rate at ``base_batch_size``.
    lr_policy : {"constant", "linear", "sqrt"}, default "constant"
        How the learning rate follows the batch size B: unchanged, ``learning_rate * B /
        base_batch_size`` (Goyal et al. 2017) or ``learning_rate * sqrt(B /
        base_batch_size)`` (Hoffer et al. 2017).  See :func:`minigd.scale_lr`.
    base_batch_size : int, default 32
    momentum : float in [0, 1), default 0.9
        Heavy-ball momentum (``optimizer="sgd"`` only; Adam uses its own betas).
    weight_decay : float >= 0, default 0.0
        L2 penalty coupled into the gradient (as sklearn's ``alpha``, but on the mean loss).
    batch_size : int, "auto", "full" or "adaptive", default "auto"
        Examples per step: ``"auto"`` is ``min(32, n_samples)``, ``"full"`` full-batch
        gradient descent; an int larger than the number of samples is clipped to it (with
        a warning in ``fit``; silently in ``partial_fit``, which usually sees small chunks).
        ``"adaptive"``: a controller picks it during training from the measured noise scale
        and throughput (:class:`minigd.AdaptiveBatchSize`, starting at ``min(32, n_samples)``
        with the learning rate for that size; ``batch_size_`` is the size it ended at).
    epochs : int, default 20
        Passes over the data in ``fit``; ``partial_fit`` runs one.
    sampler : {"shuffle", "replacement", "sequential"}, default "shuffle"
    init : str, default "he_uniform"
    backend : {"cpu", "numpy", "gpu"}, default "cpu"
    dtype : {None, "float32", "float64"}, default None
        The model's dtype.  None follows the training input, as scikit-learn's estimators
        do: float32 ``X`` gives a float32 model, float64 ``X`` a float64 one, any other
        input (ints, bools, lists) is converted to float64.  An explicit dtype wins: ``X``
        (and a regressor's targets) are cast to it.  Later ``predict`` / ``partial_fit``
        inputs are cast to the fitted model's dtype (``model_.dtype``).  float32 is
        faster; float64 makes predictions independent of how rows are batched (float32
        GEMM rounding depends on the batch's shape at ~1e-7 relative).
    random_state : None, int, numpy RandomState or Generator
        Seeds the initial weights and the sampler.
    track_noise : int, bool or None, default None
        Track the gradient noise scale every ``track_noise`` steps (``True`` = every step;
        needs batches of >= 2): ``noise_scale_`` and ``history_.noise``.
    noise_beta : float in [0, 1), default 0.99
        Smoothing of the tracked estimates.
    batch_norm : {False, True, "before", "after"}, default False
    ghost_batch_size : int or None, default None
    dropout : float in [0, 1), default 0.0
        Batch norm (ghost batch norm) and dropout of the hidden layers, as for
        :class:`minigd.MLP`.  With batch norm a last partial batch that would leave a
        ghost batch of 1 row is dropped each epoch.
    verbose : bool, default False
        Show a progress bar (needs tqdm).

    Attributes
    ----------
    classes_ : ndarray (n_classes,)
    n_features_in_ : int
    feature_names_in_ : ndarray of str (only when X had string column names)
    model_ : minigd.MLP
        The trained network (``model_.params`` is the flat parameter vector).
    history_ : minigd.History
        The history of the last ``fit`` / ``partial_fit`` call.
    loss_curve_ : list of float
        Mean training loss of every epoch (over all ``partial_fit`` calls).
    n_iter_ : int
        Epochs run.
    t_ : int
        Training examples processed.
    batch_size_, learning_rate_ : int, float
        The batch size and learning rate actually used.
    noise_scale_ : float or None
        The smoothed gradient noise scale B_simple at the end of training
        (``track_noise``), else None.

    Examples
    --------
    >>> import numpy as np
    >>> from minigd.sklearn import MLPClassifier
    >>> X = np.random.default_rng(0).normal(size=(100, 4))
    >>> y = np.where(X[:, 0] > 0, "pos", "neg")
    >>> clf = MLPClassifier((16,), learning_rate=0.01, epochs=30, random_state=0).fit(X, y)
    >>> clf.classes_.tolist()
    ['neg', 'pos']
    >>> clf.score(X, y) > 0.9
    True
    """

    _loss = "cross_entropy"

    def fit(self, X: ArrayLike, y: ArrayLike) -> MLPClassifier:
        """Train a new network on (X, y) for ``epochs`` epochs."""
        self._check_hyper()
        Xa, ya = self._validate_Xy(X, y, reset=True)
        _named("y", check_classification_targets, ya)
        classes, y_enc = np.unique(ya, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(
                f"y: expected at least 2 classes, got 1 class ({classes[0]!r}); "
                f"a classifier needs examples of two or more classes"
            )
        self.classes_ = classes
        dt = self._fit_dtype(Xa)
        Xa = self._cast(Xa, "X", dt)
        self._start(Xa.shape[1], len(classes), dt)
        self._train(Xa, y_enc.astype(np.int64).ravel(), epochs=int(self.epochs), first=True)
        return self

    def partial_fit(self, X: ArrayLike, y: ArrayLike, classes: ArrayLike | None = None) -> MLPClassifier:
        """One epoch over (X, y), continuing the network and optimizer state of earlier
        calls.  ``classes`` (every label that will ever occur) is required on the first call."""
        first = _check_partial_fit_first_call(self, classes)
        if first:
            self._check_hyper()
            if len(self.classes_) < 2:
                raise ValueError(f"classes: expected at least 2 classes, got {self.classes_!r}")
        Xa, ya = self._validate_Xy(X, y, reset=first)
        _named("y", check_classification_targets, ya)
        pos = np.searchsorted(self.classes_, ya)
        pos = np.clip(pos, 0, len(self.classes_) - 1)
        unknown = self.classes_[pos] != ya
        if np.any(unknown):
            raise ValueError(
                f"y: expected labels among classes_ {self.classes_.tolist()!r}, "
                f"got {np.unique(np.asarray(ya)[unknown]).tolist()[:10]!r}"
            )
        dt = self._fit_dtype(Xa) if first else self.model_.dtype
        Xa = self._cast(Xa, "X", dt)
        if first:
            self._start(Xa.shape[1], len(self.classes_), dt)
        self._train(Xa, pos.astype(np.int64), epochs=1, first=first, quiet=True)
        return self

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Class probabilities (n, n_classes), float64, columns in ``classes_`` order."""
        z = self._forward(X)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X: ArrayLike) -> np.ndarray:
        """log of :meth:`predict_proba` (computed stably from the logits)."""
        z = self._forward(X)
        z -= z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    def predict(self, X: ArrayLike) -> np.ndarray:
        """The most probable class of every row (labels from ``classes_``)."""
        z = self._forward(X)
        return self.classes_[np.argmax(z, axis=1)]


class MLPRegressor(RegressorMixin, _BaseMLP):
    """A minigd multilayer perceptron regressor (mean squared error, one or several
    outputs), trained with mini-batch SGD or Adam by :func:`minigd.fit`.

    Parameters are those of :class:`MLPClassifier`.  ``y`` may be (n,) or (n, n_outputs);
    the loss per example is ``0.5 * sum_k (f_k(x) - y_k)^2``.  Targets are not rescaled:
    standardise them (e.g. :class:`sklearn.compose.TransformedTargetRegressor`) when their
    scale is far from 1.

    Attributes
    ----------
    n_features_in_, model_, history_, loss_curve_, n_iter_, t_, batch_size_, learning_rate_,
    noise_scale_ : see :class:`MLPClassifier`
    n_outputs_ : int

    Examples
    --------
    >>> import numpy as np
    >>> from minigd.sklearn import MLPRegressor
    >>> X = np.random.default_rng(0).normal(size=(200, 3))
    >>> y = X @ [1.0, -2.0, 0.5]
    >>> reg = MLPRegressor((32,), epochs=50, random_state=0).fit(X, y)
    >>> reg.score(X, y) > 0.9
    True
    """

    _loss = "mse"

    def _targets(self, y: Any, dt: np.dtype) -> np.ndarray:
        y = np.asarray(y)
        if y.dtype.kind not in "biuf":
            raise ValueError(f"y: expected numeric regression targets, got {_got(y)}")
        Y = self._cast(y, "y", dt)
        return Y.reshape(Y.shape[0], -1)

    def fit(self, X: ArrayLike, y: ArrayLike) -> MLPRegressor:
        """Train a new network on (X, y) for ``epochs`` epochs."""
        self._check_hyper()
        Xa, ya = self._validate_Xy(X, y, reset=True, multi_output=True, y_numeric=True)
        if ya.ndim > 2:  # pragma: no cover - validate_data refuses these
            raise ValueError(f"y: expected (n,) or (n, n_outputs), got {_got(ya)}")
        dt = self._fit_dtype(Xa)
        Y = self._targets(ya, dt)
        self._y_1d = ya.ndim == 1
        self.n_outputs_ = Y.shape[1]
        Xa = self._cast(Xa, "X", dt)
        self._start(Xa.shape[1], self.n_outputs_, dt)
        self._train(Xa, Y, epochs=int(self.epochs), first=True)
        return self

    def partial_fit(self, X: ArrayLike, y: ArrayLike) -> MLPRegressor:
        """One epoch over (X, y), continuing the network and optimizer state of earlier calls."""
        first = not hasattr(self, "model_")
        if first:
            self._check_hyper()
        Xa, ya = self._validate_Xy(X, y, reset=first, multi_output=True, y_numeric=True)
        dt = self._fit_dtype(Xa) if first else self.model_.dtype
        Y = self._targets(ya, dt)
        if first:
            self._y_1d = ya.ndim == 1
            self.n_outputs_ = Y.shape[1]
        elif Y.shape[1] != self.n_outputs_:
            raise ValueError(
                f"y: expected {self.n_outputs_} output column(s) as in the first "
                f"partial_fit call, got {_got(np.asarray(ya))}"
            )
        Xa = self._cast(Xa, "X", dt)
        if first:
            self._start(Xa.shape[1], self.n_outputs_, dt)
        self._train(Xa, Y, epochs=1, first=first, quiet=True)
        return self

    def predict(self, X: ArrayLike) -> np.ndarray:
        """Predictions, float64: (n,) when fitted on 1-D y, else (n, n_outputs)."""
        out = self._forward(X)
        return out[:, 0] if self._y_1d else out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags
