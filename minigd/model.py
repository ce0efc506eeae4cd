"""The MLP model: layer sizes, activations, a loss, and one flat parameter vector."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from minigd import nn
from minigd._constraints import PARAMS, check_norm
from minigd._validation import _got, check_seed, check_X, check_y, memory_bytes
from minigd.backends import get_backend_class
from minigd.errors import DegenerateModelWarning
from minigd.kernels.codes import BATCH_NORM_ARG
from minigd.kernels.workspace import ParamLayout, Workspace

#: rows per chunk when evaluating on more examples than one batch
EVAL_CHUNK = 2048


class MLP:
    """A multilayer perceptron with its parameters in one flat, contiguous vector.

    Parameters
    ----------
    sizes : sequence of int
        Layer sizes ``[n_in, hidden..., n_out]``; any depth (``[n_in, n_out]`` is linear /
        logistic regression) and any width >= 1.
    activation : str or list of str
        Hidden activation, one of ``relu``, ``leaky_relu`` (slope 0.01), ``tanh``,
        ``sigmoid``, ``gelu`` (exact, erf form), ``identity``; or one per hidden layer.
        The output layer is always linear: the loss holds the link.
    loss : str
        ``cross_entropy`` (integer labels; with 1 output the loss is identically 0, which
        :class:`~minigd.errors.DegenerateModelWarning` says), ``mse`` or
        ``binary_cross_entropy`` (logits; one output is binary classification).
        The batch loss is the **mean** of per-example losses (see :mod:`minigd.nn`).
    dtype : "float32" or "float64"
    init : str
        ``he_uniform``, ``he_normal``, ``glorot_uniform`` or ``glorot_normal`` for the
        weights; biases start at 0.  Drawn in float64, then cast, so float32 and float64
        models with the same seed start from the same point.
    seed : int or numpy.random.Generator
    backend : str
        ``cpu`` (Numba, default), ``numpy`` (the reference) or ``gpu``.
    batch_norm : bool or str
        ``True`` (or ``"before"``): batch norm after each hidden linear layer, before its
        activation; ``"after"``: after the activation.  Learnable scale (``bn_scales``,
        init 1) and shift (``bn_shifts``, init 0) as PyTorch's BatchNorm1d: eps 1e-5,
        normalised with the biased batch variance; running statistics (``running_mean``,
        ``running_var``) for evaluation mode, updated by ``fit`` once per step with
        momentum 0.1 from the whole batch's mean and unbiased variance.
    ghost_batch_size : int, optional
        Ghost batch norm (Hoffer et al. 2017): in training mode each batch is normalised
        in consecutive chunks of this many rows (the last may be smaller); None: the
        whole batch.  A ghost batch of 1 row has zero variance and is an error.
    dropout : float
        Inverted dropout on the hidden activations (after batch norm) in training mode:
        each unit is zeroed with this probability and kept units are scaled by
        1 / (1 - dropout).  Masks come from the seeded generator (``fit``'s seed in
        training; the model's own seed for ``loss_and_grad`` / ``forward(training=True)``).

    Attributes
    ----------
    params : ndarray (P,)
        The flat parameter vector, order W0 (row-major, (fan_in, fan_out)), b0, W1, b1, ...
        Writable; ``weights[i]`` and ``biases[i]`` are views into it.  Assigning
        ``model.params = a`` copies ``a`` into it (the views stay valid) after checking that
        ``a`` is a finite array of shape (P,) and the model's dtype.

    Examples
    --------
    >>> import numpy as np, minigd as mg
    >>> model = mg.MLP([4, 8, 3], activation="tanh", seed=0)
    >>> model.n_params
    67
    >>> model.predict(np.zeros((2, 4), np.float32)).shape
    (2,)
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str | Sequence[str] = "relu",
        loss: str = "cross_entropy",
        dtype: DTypeLike = "float32",
        init: str = "he_uniform",
        seed: int | np.random.Generator | None = 0,
        backend: str = "cpu",
        batch_norm: bool | str = False,
        ghost_batch_size: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        sizes = PARAMS["sizes"].check("sizes", sizes)
        n_hidden = len(sizes) - 2
        if isinstance(activation, str):
            acts = [activation] * n_hidden
        elif not isinstance(activation, (list, tuple)):
            raise TypeError(
                f"activation: expected a name or a list of names (one per hidden layer), "
                f"got {type(activation).__name__} {activation!r}"
            )
        else:
            acts = list(activation)
            if len(acts) != n_hidden:
                raise ValueError(
                    f"activation: expected one name per hidden layer ({n_hidden}), got {len(acts)}: {acts!r}"
                )
        for a in acts or [activation if isinstance(activation, str) else "relu"]:
            PARAMS["activation"].check("activation", a)
        self.activations = tuple(acts)
        self.loss_name = PARAMS["loss"].check("loss", loss)
        if self.loss_name == "cross_entropy" and sizes[-1] < 2:
            # a valid (if degenerate) model -- "any width >= 1" -- so a warning, not an error
            warnings.warn(
                "loss: 'cross_entropy' with 1 output unit (sizes[-1]=1): the softmax of one "
                "logit is always 1, so the loss and its gradient are always 0 and training "
                "does nothing; for two classes use 2 outputs, or loss='binary_cross_entropy' "
                "with 1 output (a sigmoid on the logit, labels in {0, 1})",
                DegenerateModelWarning,
                stacklevel=2,
            )
        self.dtype = PARAMS["dtype"].check("dtype", dtype)
        self.init = PARAMS["init"].check("init", init)
        self.norm = check_norm(batch_norm, ghost_batch_size, dropout, n_hidden=n_hidden)
        self.layout = ParamLayout(sizes, batch_norm=bool(self.norm.bn))
        _check_model_memory(sizes, self.layout.n_params, self.dtype)
        cls = get_backend_class(PARAMS["backend"].check("backend", backend))
        self._backend_name = backend
        self._params = np.zeros(self.layout.n_params, dtype=self.dtype)
        self.weights, self.biases = self.layout.views(self._params)
        self.bn_scales, self.bn_shifts = self.layout.bn_views(self._params)
        #: running mean and variance of every batch-normalised layer, (mean_0, var_0, ...)
        self.running = np.zeros(self.layout.n_running, dtype=self.dtype)
        self.running_mean, self.running_var = self.layout.running_views(self.running)
        rng = check_seed("seed", seed)
        self._init_params(rng)
        #: the generator of the dropout masks of loss_and_grad / forward(training=True)
        self.rng = np.random.default_rng(rng.integers(2**63)) if self.norm.dropout > 0 else None
        self.backend_impl = cls(
            self.layout, [nn.ACTIVATIONS[a] for a in self.activations], nn.LOSSES[self.loss_name], self.dtype, self.norm
        )
        self.backend_impl.running = self.running
        self._grad = np.zeros_like(self._params)

    # -- structure -------------------------------------------------------------------------
    @property
    def params(self) -> np.ndarray:
        """The flat parameter vector (P,): W0 (row-major), b0, W1, b1, ... (writable in
        place; ``weights``, ``biases``, ``bn_scales`` and ``bn_shifts`` are views into it)."""
        return self._params

    @params.setter
    def params(self, value: np.ndarray) -> None:
        """``model.params = a`` copies ``a`` into the existing vector (so the views and
        anything holding ``model.params`` stay valid).  ``a`` must be a finite ndarray of
        shape (P,) and the model's dtype: nothing is coerced."""
        if value is self._params:  # model.params += ... (already written in place)
            return
        P = self.n_params
        if not isinstance(value, np.ndarray) or isinstance(value, np.ma.MaskedArray):
            raise TypeError(
                f"params: expected a numpy.ndarray of shape ({P},) and dtype {self.dtype}, got {_got(value)}"
            )
        if value.shape != (P,):
            raise ValueError(f"params: expected shape ({P},) (the model's n_params), got {_got(value)}")
        if value.dtype != self.dtype:
            raise TypeError(
                f"params: expected dtype {self.dtype} (the model's dtype), got {_got(value)}; "
                f"convert explicitly, e.g. value.astype(np.{self.dtype})"
            )
        if not np.isfinite(value).all():
            bad = int(np.count_nonzero(~np.isfinite(value)))
            raise ValueError(f"params: expected finite values, got {bad} NaN/inf entries")
        self._params[...] = value

    @property
    def sizes(self) -> tuple:
        return self.layout.sizes

    @property
    def n_params(self) -> int:
        return self.layout.n_params

    @property
    def backend(self) -> str:
        return self._backend_name

    @property
    def loss_code(self) -> int:
        return nn.LOSSES[self.loss_name]

    @property
    def n_in(self) -> int:
        return self.sizes[0]

    @property
    def n_out(self) -> int:
        return self.sizes[-1]

    @property
    def is_classifier(self) -> bool:
        return self.loss_name in ("cross_entropy", "binary_cross_entropy")

    def _init_params(self, rng: np.random.Generator) -> None:
        for W, b in zip(self.weights, self.biases):
            fi, fo = W.shape
            if self.init.startswith("he"):
                var = 2.0 / fi
            else:
                var = 2.0 / (fi + fo)
            if self.init.endswith("uniform"):
                lim = np.sqrt(3.0 * var)
                W[...] = rng.uniform(-lim, lim, size=W.shape)
            else:
                W[...] = rng.normal(0.0, np.sqrt(var), size=W.shape)
            b[...] = 0
        for g in self.bn_scales:
            g[...] = 1
        for v in self.running_var:
            v[...] = 1

    @property
    def batch_norm(self):
        return BATCH_NORM_ARG[self.norm.bn]

    def config(self) -> dict:
        """The constructor arguments (without seed): enough to rebuild the architecture."""
        cfg = dict(
            sizes=list(self.sizes),
            activation=list(self.activations),
            loss=self.loss_name,
            dtype=str(self.dtype),
            init=self.init,
            backend=self.backend,
        )
        if self.norm.bn or self.norm.dropout > 0:  # plain models keep their old configuration
            cfg.update(batch_norm=self.batch_norm, ghost_batch_size=self.norm.ghost, dropout=self.norm.dropout)
        return cfg

    @classmethod
    def _from_config(cls, cfg: dict) -> MLP:
        """The model of a saved ``config()`` (copies, pickles, checkpoints): built without
        repeating the construction-time DegenerateModelWarning the original already gave."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateModelWarning)
            return cls(**cfg, seed=0)

    def to(self, backend: str) -> MLP:
        """A copy of this model (same parameters and running statistics) on another backend."""
        cfg = self.config()
        cfg["backend"] = backend
        m = MLP._from_config(cfg)
        m.params[...] = self.params
        m.running[...] = self.running
        if self.rng is not None:
            assert m.rng is not None  # same configuration, same dropout: it has a generator too
            m.rng.bit_generator.state = self.rng.bit_generator.state
        return m

    def __getstate__(self) -> dict:
        # weights/biases are views into params: rebuild them on unpickling instead of
        # letting pickle copy them into independent arrays
        return {"config": self.config(), "params": self.params.copy(), "running": self.running.copy()}

    def __setstate__(self, state: dict) -> None:
        with warnings.catch_warnings():  # as _from_config
            warnings.simplefilter("ignore", DegenerateModelWarning)
            self.__init__(**state["config"], seed=0)  # type: ignore[misc]  # unpickling: rebuild in place
        self.params[...] = state["params"]
        if "running" in state:
            self.running[...] = state["running"]

    def copy(self) -> MLP:
        return self.to(self.backend)

    def __repr__(self):
        extra = ""
        if self.norm.bn:
            extra += f", batch_norm={self.batch_norm!r}, ghost_batch_size={self.norm.ghost!r}"
        if self.norm.dropout > 0:
            extra += f", dropout={self.norm.dropout!r}"
        return (
            f"MLP({list(self.sizes)}, activation={list(self.activations)}, loss={self.loss_name!r}, "
            f"dtype={str(self.dtype)!r}, backend={self.backend!r}{extra}, n_params={self.n_params})"
        )

    # -- validation ------------------------------------------------------------------------
    def check_X(self, X: Any, name: str = "X") -> np.ndarray:
        return check_X(X, self.n_in, self.dtype, name)

    def check_Xy(self, X: Any, y: Any, xname: str = "X", yname: str = "y") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        X = self.check_X(X, xname)
        yi, yf = check_y(y, X.shape[0], self.loss_code, self.n_out, self.dtype, yname)
        return X, yi, yf

    def check_finite(self) -> None:
        """Raise ``ValueError`` (naming ``params``) when the parameters -- or batch norm's
        running statistics -- hold NaN or inf: outputs, losses and gradients computed from
        them would be NaN, and ``argmax`` would turn that into a plausible-looking label.
        Called by every evaluation and gradient entry point and by ``fit``; O(P), no
        P-sized temporary unless something is wrong."""
        for vec, name in ((self._params, "params"), (self.running, "running")):
            if vec.size and not np.isfinite(vec.sum()) and not np.isfinite(vec).all():
                bad = int(np.count_nonzero(~np.isfinite(vec)))
                what = "parameters" if name == "params" else "batch-norm running statistics"
                raise ValueError(
                    f"{name}: expected finite {what}, got {bad} NaN/inf entries in "
                    f"model.{name} (a diverged or overwritten model); its outputs "
                    f"would be NaN: re-initialise or load finite values first"
                )

    # -- evaluation ------------------------------------------------------------------------
    def _chunks(self, n):
        idx = np.arange(n, dtype=np.int64)
        for s in range(0, n, EVAL_CHUNK):
            yield s, idx[s : s + EVAL_CHUNK]

    def forward(self, X: np.ndarray, training: bool = False) -> np.ndarray:
        """Outputs before the loss's link, (n, n_out): logits for the classification losses.

        Evaluation mode by default (running statistics, no dropout).  ``training=True``
        normalises X as one batch (in ghost batches) and draws dropout masks from
        ``model.rng``; it does not update the running statistics.  For a model without
        batch norm and dropout both modes compute the same function.
        """
        if not isinstance(training, bool):
            raise TypeError(f"training: expected a bool, got {type(training).__name__} {training!r}")
        X = self.check_X(X)
        self.check_finite()
        n = X.shape[0]
        out = np.empty((n, self.n_out), dtype=self.dtype)
        if training and (self.norm.bn or self.norm.dropout > 0):
            idx = np.arange(n, dtype=np.int64)
            self._prepare_training(n, "X")
            out[...] = self.backend_impl.forward(self.params, X, idx, n, training=True)
        else:
            for s, idx in self._chunks(n):
                out[s : s + len(idx)] = self.backend_impl.forward(self.params, X, idx, len(idx))
        # finite X and parameters can still overflow (huge inputs times large weights): never
        # hand back NaN/inf outputs (predict would argmax them into plausible labels)
        if not np.isfinite(out.sum(dtype=np.float64)) and not np.isfinite(out).all():
            raise _overflow_error("X", X, self.params, "the outputs")
        return out

    def _prepare_training(self, B: int, name: str) -> None:
        """Before a training-mode pass over B rows: check the ghost batches, draw masks."""
        self.norm.check_batch(B, name)
        self.backend_impl.reserve(B)
        if self.rng is not None:
            self.backend_impl.draw_dropout(self.rng, B)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities: softmax (cross_entropy; (n, n_out)) or sigmoid
        (binary_cross_entropy; (n, n_out))."""
        if not self.is_classifier:
            raise ValueError(f"predict_proba: expected a classification loss, the model's loss is {self.loss_name!r}")
        z = self.forward(X).astype(np.float64)
        if self.loss_name == "cross_entropy":
            z -= z.max(axis=1, keepdims=True)
            e = np.exp(z)
            p = e / e.sum(axis=1, keepdims=True)
        else:
            p = 1.0 / (1.0 + np.exp(-z))
        return p.astype(self.dtype)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Labels (cross_entropy: argmax, (n,); binary_cross_entropy: z > 0, (n, n_out) int)
        or outputs (mse: (n, n_out), or (n,) for one output)."""
        z = self.forward(X)
        if self.loss_name == "cross_entropy":
            return z.argmax(axis=1)
        if self.loss_name == "binary_cross_entropy":
            return (z > 0).astype(np.int64)
        return z[:, 0] if self.n_out == 1 else z

    def _loss_grad_chunked(self, X, yi, yf, want_grad: bool):
        self.check_finite()
        n = X.shape[0]
        total = 0.0
        grad = np.zeros(self.n_params, np.float64) if want_grad else None
        # batch norm normalises the whole batch together: no chunks in training mode
        chunks = [(0, np.arange(n, dtype=np.int64))] if (want_grad and self.norm.bn) else self._chunks(n)
        for _s, idx in chunks:
            B = len(idx)
            if want_grad:
                self._prepare_training(B, "X")
                loss, _ = self.backend_impl.loss_grad(self.params, self._grad, X, yi, yf, idx, B)
                if not (math.isfinite(loss) and np.isfinite(self._grad.sum(dtype=np.float64))):
                    raise _overflow_error("X", X, self.params, "the loss or its gradient")
                if n <= EVAL_CHUNK:
                    return loss, self._grad.copy()
                grad += self._grad * (B / n)
            else:
                rows = self.backend_impl.losses(self.params, X, yi, yf, idx, B)
                loss = float(np.sum(rows, dtype=np.float64)) / B
            if not math.isfinite(loss):
                raise _overflow_error("X", X, self.params, "the losses")
            total += loss * B
        return total / n, (grad.astype(self.dtype) if grad is not None else None)  # (None iff not want_grad)

    def loss(self, X: np.ndarray, y: np.ndarray) -> float:
        """Mean per-example loss over (X, y) (evaluation mode)."""
        X, yi, yf = self.check_Xy(X, y)
        return self._loss_grad_chunked(X, yi, yf, want_grad=False)[0]

    def loss_and_grad(self, X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """(mean loss, gradient of the mean loss as a flat (P,) array), training mode:
        X is one batch (normalised in ghost batches with batch norm; fresh dropout masks
        from ``model.rng``).  Running statistics are not updated."""
        X, yi, yf = self.check_Xy(X, y)
        return self._loss_grad_chunked(X, yi, yf, want_grad=True)

    def evaluate(self, X: np.ndarray, y: np.ndarray) -> dict:
        """{'loss': mean loss, 'accuracy': ...} (accuracy for classification losses only)."""
        X, yi, yf = self.check_Xy(X, y)
        out = {"loss": self._loss_grad_chunked(X, yi, yf, want_grad=False)[0]}
        if self.loss_name == "cross_entropy":
            out["accuracy"] = float(np.mean(self.predict(X) == yi))
        elif self.loss_name == "binary_cross_entropy":
            out["accuracy"] = float(np.mean(self.predict(X) == (yf > 0.5)))
        return out

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """Accuracy (classification) or negative mean loss (regression)."""
        r = self.evaluate(X, y)
        return r.get("accuracy", -r["loss"])

    def workspace_bytes(self, batch_size: int) -> int:
        """Bytes of the per-batch buffers (activations, deltas, per-example scratch) that a
        training step of ``batch_size`` rows uses, computed without allocating them; the
        parameters, the gradient and the optimizer state come on top."""
        from minigd._validation import check_int

        B = check_int("batch_size", batch_size, low=1)
        return Workspace.nbytes_for(self.layout, B, self.dtype)


def _check_model_memory(sizes, P: int, dtype: np.dtype) -> None:
    """Refuse, before allocating anything, a model whose parameters and gradient alone
    (``2 * P * itemsize`` bytes) exceed this machine's physical memory: an absurd width
    (``MLP([10, 10**9, 10])``) is a ValueError naming ``sizes``, not a MemoryError."""
    need = 2 * P * dtype.itemsize
    have = memory_bytes()
    if need > have:
        raise ValueError(
            f"sizes: {list(sizes)} make a model of {P:,} parameters, which need "
            f"{need / 2**30:,.1f} GiB for the parameters and their gradient in {dtype}, "
            f"more than this machine's {have / 2**30:,.1f} GiB of memory; expected "
            f"smaller layer sizes"
        )


class _ForwardOverflow(ValueError):
    """A forward pass that overflowed with finite inputs and parameters (a ValueError
    naming X; ``fit`` turns one in its evaluations into a DivergenceError)."""


def _overflow_error(name: str, X: np.ndarray, params: np.ndarray, what: str) -> ValueError:
    """The error for a forward pass that overflowed although X and the parameters are
    finite (and X within :func:`~minigd._validation.max_input`): the product of the input
    magnitudes and the weights exceeds the dtype's range."""
    xmax = float(np.max(np.abs(X))) if X.size else 0.0
    wmax = float(np.max(np.abs(params))) if params.size else 0.0
    return _ForwardOverflow(
        f"{name}: the forward pass overflowed {X.dtype} ({what} are inf/NaN) although {name} "
        f"and the parameters are finite: inputs up to {xmax:.3g} times weights up to "
        f"{wmax:.3g} exceed the dtype's range; rescale {name} (standardize it)"
        f"{' or use float64' if X.dtype == np.float32 else ''}, or check the parameters"
    )
