"""One table of parameter constraints, and the one error style every entry point uses.

Each hyper-parameter that minigd validates in more than one place (``fit``, the
scikit-learn estimators, the optimizers and schedules, :mod:`minigd.gradstats`, the CLI)
is described once, declaratively, in :data:`PARAMS` -- as scikit-learn's
``_parameter_constraints`` -- and checked by :func:`validate`:

* a value of the wrong **type** raises :class:`TypeError`,
* a value of the right type but outside the allowed set raises :class:`ValueError`,

both as ``"<name>: expected <what>, got <value>"``.  ``validate`` returns the value
normalised (a Python ``int`` / ``float`` / ``bool``, a ``numpy.dtype``, ...).

>>> from minigd._constraints import PARAMS, validate
>>> validate("momentum", 0.9, PARAMS["momentum"])
0.9
>>> validate("epochs", 0, PARAMS["epochs"])
Traceback (most recent call last):
...
ValueError: epochs: expected an integer >= 1, got 0
>>> validate("epochs", 2.5, PARAMS["epochs"])
Traceback (most recent call last):
...
TypeError: epochs: expected an integer, got float 2.5

Rules that relate several arguments (``track_gsnr`` a multiple of ``track_noise``, a batch
size at most the number of examples, ...) stay with the entry point, except the
batch-norm / dropout rules, which all live in :func:`check_norm`.

The command line reuses the same constraints through :func:`arg_type`, so ``minigd
study --momentum 1.5`` says ``argument --momentum: expected a number < 1, got 1.5``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Constraint",
    "Integer",
    "Real",
    "Options",
    "Bool",
    "Seed",
    "RandomState",
    "DType",
    "InstanceOf",
    "Callable_",
    "AnyOf",
    "NoneOr",
    "Sizes",
    "HiddenSizes",
    "RealArray",
    "PARAMS",
    "FIT_PARAMS",
    "ESTIMATOR_PARAMS",
    "validate",
    "validate_params",
    "check_param",
    "check_fit_args",
    "check_norm",
    "arg_type",
    "list_arg_type",
]


# ============================================================================ message pieces
def _got(value: Any, small_arrays: bool = False) -> str:
    """A short description of ``value`` for the ``got ...`` half of a message: its type and
    (a truncated) repr, or an array's shape and dtype (and its entries when it is tiny and
    ``small_arrays``)."""
    if isinstance(value, np.ndarray):
        if small_arrays and value.size <= 4:
            return f"array {value.tolist()!r} of shape {value.shape} and dtype {value.dtype}"
        return f"array of shape {value.shape} and dtype {value.dtype}"
    r = repr(value)
    if len(r) > 60:
        r = r[:57] + "..."
    return f"{type(value).__name__} {r}"


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _scalar(value: Any) -> Any:
    """A 0-d array's element (numbers arrive that way from numpy reductions)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value[()]
    return value


# ============================================================================ constraints
class Constraint:
    """What one argument may be.

    Subclasses define :meth:`type_ok` (False: a TypeError), :meth:`problem` (the expected
    phrase of the rule the value breaks, or None: a ValueError), :meth:`normalise` and
    :meth:`parse` (a command-line string to a value).  ``expected`` is the phrase the
    messages use; ``type_expected`` (defaults to it) is the one for type errors."""

    expected: str = "a valid value"
    type_expected: str | None = None
    #: appended to value errors (why the rule exists)
    why: str = ""

    def type_ok(self, value: Any) -> bool:
        return True

    def problem(self, value: Any) -> str | None:
        return None

    def normalise(self, value: Any) -> Any:
        return value

    def show(self, value: Any) -> str:
        """How a value of the right type appears in a ValueError."""
        return _got(value)

    def parse(self, text: str) -> Any:
        """A command-line string as a value of this constraint's type (ValueError if it
        cannot be read as one; by default nothing can)."""
        raise ValueError(text)

    def type_phrase(self) -> str:
        return self.type_expected or self.expected

    def check(self, name: str, value: Any) -> Any:
        if not self.type_ok(value):
            raise TypeError(f"{name}: expected {self.type_phrase()}, got {_got(value)}")
        p = self.problem(value)
        if p is not None:
            raise ValueError(f"{name}: expected {p}, got {self.show(value)}{self.why}")
        return self.normalise(value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.expected!r})"


class Integer(Constraint):
    """An integer (Python or numpy, not bool) with optional bounds (both inclusive)."""

    type_expected = "an integer"

    def __init__(
        self, low: int | None = None, high: int | None = None, *, expected: str | None = None, why: str = ""
    ) -> None:
        self.low, self.high, self._custom, self.why = low, high, expected, why
        if expected is not None:
            self.expected = self.type_expected = expected
        elif low is not None and high is not None:
            self.expected = f"an integer in [{low}, {high}]"
        elif low is not None:
            self.expected = f"an integer >= {low}"
        elif high is not None:
            self.expected = f"an integer <= {high}"
        else:
            self.expected = "an integer"

    def type_ok(self, value):
        value = _scalar(value)
        return not _is_bool(value) and isinstance(value, numbers.Integral)

    def problem(self, value):
        v = int(_scalar(value))
        if self.low is not None and v < self.low:
            return self._custom or f"an integer >= {self.low}"
        if self.high is not None and v > self.high:
            return self._custom or f"an integer <= {self.high}"
        return None

    def normalise(self, value):
        return int(_scalar(value))

    def show(self, value):
        return repr(int(_scalar(value)))

    def parse(self, text):
        return int(text.strip())


class Real(Constraint):
    """A real number (Python or numpy, or a 0-d array; not bool): not NaN (unless
    ``nan=True``), finite unless ``finite=False``, within ``[low, high]`` (``low_open`` / ``high_open`` exclude the
    bound).  Normalised to a Python float."""

    type_expected = "a real number"

    def __init__(
        self,
        low: float | None = None,
        high: float | None = None,
        *,
        low_open: bool = False,
        high_open: bool = False,
        finite: bool = True,
        nan: bool = False,
        expected: str | None = None,
        why: str = "",
    ) -> None:
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        self.finite, self.nan, self._custom, self.why = finite, nan, expected, why
        if expected is not None:
            self.expected = expected
            self.type_expected = expected
        elif low is not None and high is not None:
            self.expected = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            self.expected = f"a number {'>' if low_open else '>='} {low}"
        elif high is not None:
            self.expected = f"a number {'<' if high_open else '<='} {high}"
        else:
            self.expected = "a finite number" if finite else "a non-NaN number"

    def type_ok(self, value):
        value = _scalar(value)
        return not _is_bool(value) and isinstance(value, numbers.Real)

    def problem(self, value):
        v = float(_scalar(value))
        if math.isnan(v) and self.nan:
            return None
        if math.isnan(v) or (self.finite and math.isinf(v)):
            return self._custom or ("a finite number" if self.finite else "a non-NaN number")
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return self._custom or f"a number {'>' if self.low_open else '>='} {self.low}"
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            return self._custom or f"a number {'<' if self.high_open else '<='} {self.high}"
        return None

    def normalise(self, value):
        return float(_scalar(value))

    def show(self, value):
        return repr(float(_scalar(value)))

    def parse(self, text):
        return float(text.strip())


class Options(Constraint):
    """One of a fixed set of values of the given type(s) (strings by default)."""

    def __init__(self, values: Iterable, types: type | tuple = str, *, expected: str | None = None) -> None:
        self.values = tuple(values)
        self.types = types
        self.expected = expected or f"one of {list(self.values)}"

    def type_ok(self, value):
        return isinstance(value, self.types)

    def problem(self, value):
        v = bool(value) if _is_bool(value) else value
        # isinstance against each option's type: True is not taken for 1, nor 1 for True
        ok = any(isinstance(v, type(o)) and not (_is_bool(o) ^ _is_bool(v)) and v == o for o in self.values)
        return None if ok else self.expected

    def normalise(self, value):
        return bool(value) if _is_bool(value) else value

    def parse(self, text):
        t = text.strip()
        if (
            isinstance(self.types, type)
            and issubclass(self.types, str)
            or str in tuple(self.types if isinstance(self.types, tuple) else (self.types,))
        ):
            return t
        raise ValueError(text)


class Bool(Constraint):
    """``True`` or ``False`` (``numpy.bool_`` too; a truthy 1 or ``"no"`` is refused)."""

    expected = "a bool"

    def __init__(self, expected: str | None = None) -> None:
        if expected is not None:
            self.expected = expected

    def type_ok(self, value):
        return _is_bool(value)

    def normalise(self, value):
        return bool(value)

    def parse(self, text):
        t = text.strip().lower()
        if t in ("1", "true", "yes", "on"):
            return True
        if t in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)


class Seed(Constraint):
    """A seed: a non-negative int, None or a ``numpy.random.Generator`` (returned as
    given; :func:`minigd._validation.check_seed` makes the Generator)."""

    expected = "a non-negative int, None or numpy.random.Generator"

    def type_ok(self, value):
        return (
            value is None
            or isinstance(value, np.random.Generator)
            or (not _is_bool(value) and isinstance(value, numbers.Integral))
        )

    def problem(self, value):
        if isinstance(value, numbers.Integral) and value < 0:
            return self.expected
        return None

    def normalise(self, value):
        return int(value) if isinstance(value, numbers.Integral) else value

    def show(self, value):
        return repr(int(value))

    def parse(self, text):
        return int(text.strip())


class RandomState(Constraint):
    """scikit-learn's ``random_state``: None, an int in [0, 2**32), a
    ``numpy.random.RandomState`` or a ``numpy.random.Generator``."""

    expected = "None, an int in [0, 2**32), a numpy.random.RandomState or Generator"

    def type_ok(self, value):
        return (
            value is None
            or isinstance(value, (np.random.RandomState, np.random.Generator))
            or (not _is_bool(value) and isinstance(value, numbers.Integral))
        )

    def problem(self, value):
        if isinstance(value, numbers.Integral) and not 0 <= int(value) < 2**32:
            return self.expected
        return None

    def show(self, value):
        return repr(int(value))


class DType(Constraint):
    """A floating dtype minigd computes in: ``"float32"`` or ``"float64"`` (a name, a
    ``numpy.dtype`` or a type such as ``np.float32``).  Normalised to ``numpy.dtype``."""

    expected = "'float32' or 'float64'"
    type_expected = "'float32' or 'float64' (a dtype name, numpy.dtype or numpy type)"

    def type_ok(self, value):
        return isinstance(value, (str, np.dtype, type))

    def _dtype(self, value):
        try:
            return np.dtype(value)
        except (TypeError, ValueError):
            return None

    def problem(self, value):
        dt = self._dtype(value)
        # (``dt is not None`` first: numpy compares None equal to float64, np.dtype(None))
        return None if dt is not None and dt in (np.dtype(np.float32), np.dtype(np.float64)) else self.expected

    def normalise(self, value):
        return self._dtype(value)

    def parse(self, text):
        return text.strip()


class InstanceOf(Constraint):
    """An instance of a class; ``cls`` may be a zero-argument callable returning the class
    (resolved at check time, to keep this module free of upward imports)."""

    def __init__(self, cls: type | tuple | Callable[[], Any], expected: str) -> None:
        self._cls = cls
        self.expected = expected

    def _types(self):
        c = self._cls
        return c if isinstance(c, (type, tuple)) else c()

    def type_ok(self, value):
        return isinstance(value, self._types())


class Callable_(Constraint):
    """Any callable."""

    expected = "a callable"

    def type_ok(self, value):
        return callable(value)


class AnyOf(Constraint):
    """The first member whose type accepts the value decides (its rule, its normalisation).
    A type no member accepts is a TypeError with ``expected``; a value the deciding member
    refuses is a ValueError with that member's phrase (for a numeric member: "a positive
    int, got 0") or ``expected`` (an :class:`Options` member: "a positive int, 'auto' or
    'full', got str 'half'")."""

    def __init__(self, *members: Constraint, expected: str) -> None:
        self.members = members
        self.expected = expected

    def _member(self, value):
        for m in self.members:
            if m.type_ok(value):
                return m
        return None

    def type_ok(self, value):
        return self._member(value) is not None

    def problem(self, value):
        m = self._member(value)
        p = m.problem(value)
        if p is None:
            return None
        return self.expected if isinstance(m, Options) else p

    def normalise(self, value):
        return self._member(value).normalise(value)

    def show(self, value):
        return self._member(value).show(value)

    def parse(self, text):
        for m in self.members:
            if isinstance(m, Options) and text.strip() in m.values:
                return text.strip()
        for m in self.members:
            if not isinstance(m, Options):
                try:
                    return m.parse(text)
                except ValueError:
                    continue
        raise ValueError(text)

    @property
    def why(self):  # the deciding member's explanation travels with its rule
        return ""


class NoneOr(Constraint):
    """None (a default: "not given"), or a value ``inner`` accepts.  The messages are
    ``inner``'s."""

    def __init__(self, inner: Constraint) -> None:
        self.inner = inner
        self.expected = inner.expected
        self.type_expected = inner.type_phrase()
        self.why = inner.why

    def type_ok(self, value):
        return value is None or self.inner.type_ok(value)

    def problem(self, value):
        return None if value is None else self.inner.problem(value)

    def normalise(self, value):
        return None if value is None else self.inner.normalise(value)

    def show(self, value):
        return self.inner.show(value)

    def parse(self, text):
        return self.inner.parse(text)


class Sizes(Constraint):
    """``MLP``'s layer sizes: a sequence of at least ``min_len`` integers >= 1 (each one
    checked, and named, as ``sizes[i]``).  Normalised to a tuple of ints."""

    def __init__(
        self,
        min_len: int = 2,
        element: Constraint | None = None,
        expected: str = "a sequence of at least 2 layer sizes (input, ..., output)",
    ) -> None:
        self.min_len = min_len
        self.element = element or Integer(1)
        self.expected = expected

    def type_ok(self, value):
        if isinstance(value, np.ndarray):
            return value.ndim == 1
        return not isinstance(value, (str, bytes, Mapping)) and hasattr(value, "__len__") and hasattr(value, "__iter__")

    def problem(self, value):
        return self.expected if len(value) < self.min_len else None

    def check(self, name, value):
        value = super().check(name, value)
        return tuple(self.element.check(f"{name}[{i}]", s) for i, s in enumerate(value))


class HiddenSizes(Sizes):
    """The estimators' ``hidden_layer_sizes``: an int (one hidden layer) or a sequence of
    ints >= 1 (``()``: no hidden layer).  Normalised to a tuple of ints."""

    def __init__(self) -> None:
        super().__init__(0, Integer(1), "an int or a sequence of ints")

    def type_ok(self, value):
        return Integer().type_ok(value) or super().type_ok(value)

    def check(self, name, value):
        if Integer().type_ok(value):
            return (Integer(1).check(name, value),)
        return super().check(name, value)


class RealArray(Constraint):
    """A real array-like of any shape (a number, a list, an ndarray; not bool, not
    strings), non-NaN, finite unless ``finite=False``, ``>= low`` (``> low`` with
    ``low_open``).  Normalised to a float64 ndarray."""

    type_expected = "a real number or array"

    def __init__(self, low: float | None = None, *, low_open: bool = False, finite: bool = True) -> None:
        self.low, self.low_open, self.finite = low, low_open, finite
        what = "finite" if finite else "non-NaN"
        self.expected = f"{what} values" if low is None else f"{what} values {'>' if low_open else '>='} {low}"

    def _array(self, value):
        try:
            return np.asarray(value)
        except Exception:  # pragma: no cover - exotic inputs
            return None

    def type_ok(self, value):
        a = self._array(value)
        return (
            a is not None
            and a.dtype != bool
            and (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating))
        )

    def check(self, name, value):
        if not self.type_ok(value):
            raise TypeError(f"{name}: expected {self.type_phrase()}, got {_got(value, True)}")
        a = self._array(value).astype(np.float64, copy=False)
        bad = np.isnan(a) | (np.isinf(a) if self.finite else False)
        if np.any(bad):
            what = "finite" if self.finite else "non-NaN"
            raise ValueError(
                f"{name}: expected {what} values, got {int(np.count_nonzero(bad))} "
                f"NaN/inf entries in {_got(value, True)}"
            )
        if self.low is not None:
            bad = (a <= self.low) if self.low_open else (a < self.low)
            if bad.any():
                raise ValueError(
                    f"{name}: expected values {'>' if self.low_open else '>='} "
                    f"{self.low}, got {float(a[bad].ravel()[0])!r} (in {_got(value, True)})"
                )
        return a


# ============================================================================ the entry points
def validate(name: str, value: Any, constraint: Constraint) -> Any:
    """``value`` checked against ``constraint`` and normalised; TypeError for a wrong type,
    ValueError for a wrong value, each ``"<name>: expected <what>, got <value>"``."""
    return constraint.check(name, value)


def check_param(name: str, value: Any, entry: str | None = None) -> Any:
    """``value`` checked by the table's entry ``entry`` (default: ``name``), errors naming
    ``name`` (``check_param("betas[0]", b, "beta1")``)."""
    return PARAMS[name if entry is None else entry].check(name, value)


def validate_params(values: Mapping[str, Any], table: Mapping[str, Constraint] | None = None) -> dict:
    """Every ``name: value`` of ``values`` validated by ``table[name]`` (default
    :data:`PARAMS`), in order; the normalised values, as a new dict."""
    table = PARAMS if table is None else table
    out = {}
    for name, value in values.items():
        if name not in table:
            raise KeyError(f"{name}: no constraint for this parameter in the table")
        out[name] = table[name].check(name, value)
    return out


def _batch_size_schedule():
    from minigd.optim.schedules import BatchSizeSchedule

    return BatchSizeSchedule


def _adaptive_batch_size():
    from minigd.adaptive import AdaptiveBatchSize

    return AdaptiveBatchSize


PROBABILITY = "a probability in [0, 1)"

#: The table: every parameter validated in more than one place, once.  Entry points look
#: their arguments up here (``fit``: :data:`FIT_PARAMS`; the estimators:
#: :data:`ESTIMATOR_PARAMS`; the optimizers, schedules, gradstats and the CLI: by name).
PARAMS: dict[str, Constraint] = {
    # -- the model ----------------------------------------------------------------------------
    "sizes": Sizes(),
    "width": Integer(1),
    "depth": Integer(0),
    "activation": Options(()),  # filled from minigd.nn below
    "loss": Options(()),
    "init": Options(()),
    "dtype": DType(),
    "backend": InstanceOf(str, "a backend name (str)"),
    "batch_norm": Options(
        (False, True, "before", "after"), (bool, np.bool_, str), expected="False, True, 'before' or 'after'"
    ),
    "ghost_batch_size": NoneOr(
        Integer(2, why=" (a ghost batch of 1 row has zero variance, so batch norm would divide by sqrt(eps))")
    ),
    "dropout": Real(0, 1, high_open=True, expected=PROBABILITY),
    "seed": Seed(),
    # -- training (fit) -----------------------------------------------------------------------
    "batch_size": AnyOf(
        Integer(1, expected="a positive int"),
        Options(("full", "adaptive")),
        InstanceOf(_batch_size_schedule, "a BatchSizeSchedule"),
        InstanceOf(_adaptive_batch_size, "an AdaptiveBatchSize"),
        expected="a positive int, 'full', 'adaptive', a BatchSizeSchedule or an AdaptiveBatchSize",
    ),
    "epochs": NoneOr(Integer(1)),
    "steps": NoneOr(Integer(1)),
    "examples": NoneOr(Integer(1)),
    "eval_every": NoneOr(Integer(1)),
    "sampler": Options(("shuffle", "replacement", "sequential")),
    "drop_last": Bool(),
    "eval_train": Bool(),
    "progress": Bool(),
    "max_time": NoneOr(Real(0, low_open=True, expected="a positive number of seconds")),
    "track_noise": NoneOr(Integer(1)),
    "track_gsnr": NoneOr(Integer(1)),
    "noise_beta": Real(0, 1, high_open=True),
    "checkpoint_every": NoneOr(Integer(1)),
    # -- optimizers and schedules -------------------------------------------------------------
    "lr": Real(0),
    "lr_or_schedule": AnyOf(
        Callable_(), Real(0), expected="a real number >= 0 or a schedule (a callable step -> learning rate)"
    ),
    "momentum": Real(0, 1, high_open=True),
    "weight_decay": Real(0),
    "nesterov": Bool(),
    "decoupled_weight_decay": Bool(),
    "clip_norm": NoneOr(Real(0, low_open=True)),
    "max_norm": Real(0, low_open=True),
    "beta1": Real(0, 1, high_open=True),  # Adam's betas[0] / b1
    "beta2": Real(0, 1, high_open=True),  # Adam's betas[1] / b2
    "eps": Real(0, low_open=True),
    "factor": Real(),
    "decay_factor": Real(0),  # step_decay's factor
    "decay_rate": Real(0, low_open=True),
    "decay_steps": Integer(1),
    "total_steps": Integer(1),
    "final_lr": Real(0),
    "warmup_steps": Integer(0),
    "start_lr": Real(0),
    "base_lr": Real(0),
    "base_batch_size": Integer(1),
    "lr_rule": Options(("linear", "sqrt", "none")),
    "boundary": Integer(0),
    # -- gradient statistics ------------------------------------------------------------------
    "b_small": Integer(1),
    "b_big": Integer(1),
    "beta": Real(0.0, 1.0, high_open=True),
    "chunk_size": Integer(1),
    "n_samples": Integer(2),
    "replacement": Bool(),
    "squared": Bool(),
    "exact": NoneOr(Bool("None, True or False")),  # grad_moments' M2 form (None: by dtype)
    "ddof": Integer(0, 1, expected="0 or 1"),
    "P": Integer(1),
    "k": Integer(0),
    "standard_error": Real(0, finite=False, nan=True, expected="a number >= 0 (or nan/inf)"),
    "tradeoff_method": Options(("auto", "scipy", "numpy")),
    # -- the estimators (names of their own) --------------------------------------------------
    "hidden_layer_sizes": HiddenSizes(),
    "learning_rate": Real(0, low_open=True),
    "optimizer_name": Options(("sgd", "adam")),
    "lr_policy": Options(("constant", "linear", "sqrt")),
    "random_state": RandomState(),
    "verbose": Bool(),
    # -- the command line (names of its own) --------------------------------------------------
    "sweep_batch_size": AnyOf(
        Integer(1, expected="a positive int"), Options(("full",)), expected="a positive int or 'full'"
    ),
    "val_fraction": Real(0, 1, low_open=True, high_open=True, expected="a fraction in (0, 1)"),
    "n_seeds": Integer(1),
    "lr_extend": Integer(0),
    "lr_multiplier": Real(0, low_open=True, expected="learning-rate multipliers > 0"),
    "workers": Integer(1, expected="a number of worker processes >= 1"),
    "n_trials": Integer(1),
    "target_accuracy": Real(0, 1, low_open=True, expected="an accuracy in (0, 1]"),
}


def _fill_names() -> None:
    from minigd import nn

    PARAMS["activation"] = Options(tuple(nn.ACTIVATIONS))
    PARAMS["loss"] = Options(tuple(nn.LOSSES))
    PARAMS["init"] = Options(tuple(nn.INITS))


_fill_names()

#: ``fit``'s arguments, as :func:`check_fit_args` checks them.
FIT_PARAMS: dict[str, Constraint] = {
    k: PARAMS[k]
    for k in (
        "batch_size",
        "epochs",
        "steps",
        "examples",
        "eval_every",
        "sampler",
        "drop_last",
        "eval_train",
        "progress",
        "max_time",
        "seed",
        "track_noise",
        "track_gsnr",
        "noise_beta",
        "checkpoint_every",
    )
}

#: The estimators' constructor parameters (``_BaseMLP._parameter_constraints``).
ESTIMATOR_PARAMS: dict[str, Constraint] = {
    "hidden_layer_sizes": PARAMS["hidden_layer_sizes"],
    "activation": PARAMS["activation"],
    "optimizer": PARAMS["optimizer_name"],
    "learning_rate": PARAMS["learning_rate"],
    "lr_policy": PARAMS["lr_policy"],
    "base_batch_size": PARAMS["base_batch_size"],
    "momentum": PARAMS["momentum"],
    "weight_decay": PARAMS["weight_decay"],
    "batch_size": AnyOf(
        Integer(1), Options(("auto", "full", "adaptive")), expected="a positive int, 'auto', 'full' or 'adaptive'"
    ),
    "epochs": Integer(1),
    "sampler": PARAMS["sampler"],
    "init": PARAMS["init"],
    "backend": PARAMS["backend"],
    "dtype": NoneOr(PARAMS["dtype"]),
    "random_state": PARAMS["random_state"],
    "track_noise": AnyOf(Bool(), NoneOr(Integer(1)), expected="None, a bool or an integer >= 1"),
    "noise_beta": PARAMS["noise_beta"],
    "batch_norm": PARAMS["batch_norm"],
    "ghost_batch_size": PARAMS["ghost_batch_size"],
    "dropout": PARAMS["dropout"],
    "verbose": PARAMS["verbose"],
}


def check_fit_args(**kwargs: Any) -> dict:
    """``fit``'s scalar arguments checked against :data:`FIT_PARAMS` and normalised, plus
    the rules between them that need neither the model nor the data.

    Pass any of ``batch_size, epochs, steps, examples, eval_every, sampler, drop_last,
    eval_train, progress, max_time, seed, track_noise, track_gsnr, noise_beta,
    checkpoint_every`` (and ``n``, the number of examples, to check the batch sizes
    against it).  Returns them normalised: ints, floats, bools; ``batch_size`` as a
    :class:`~minigd.optim.schedules.BatchSizeSchedule` when ``n`` is given (``"full"`` is
    ``n``; ``"adaptive"`` / an AdaptiveBatchSize as given); ``seed`` as given (an int,
    None or a Generator).

    Rules checked here: ``track_gsnr`` needs ``track_noise`` and is a multiple of it
    (unless the batch size is adaptive: its controller sets the tracking); with ``n``,
    every batch size of a fixed or scheduled run is at most ``n``.  Left to ``fit``: what
    needs the model or the data (batch norm: :func:`check_norm`; tracking needs batches of
    >= 2; ``target``, ``validation``, ``optimizer``, ``callbacks``, ``opt_state``, the
    checkpoint paths, the adaptive controller's own rules).
    """
    n = kwargs.pop("n", None)
    out = validate_params(kwargs, FIT_PARAMS)
    if out.get("track_gsnr") is not None and not _is_adaptive(out.get("batch_size")):
        k = out.get("track_noise")
        if k is None:
            raise ValueError(
                f"track_gsnr: needs track_noise (the GSNR summary is added to the "
                f"tracked records), got track_gsnr={out['track_gsnr']!r} and track_noise=None"
            )
        if out["track_gsnr"] % k:
            raise ValueError(
                f"track_gsnr: expected a multiple of track_noise={k} (GSNR is "
                f"recorded on tracked steps), got {out['track_gsnr']}"
            )
    if n is not None and "batch_size" in out:
        out["batch_size"] = _batch_schedule(out["batch_size"], int(n))
    return out


def _is_adaptive(bs: Any) -> bool:
    return (isinstance(bs, str) and bs == "adaptive") or isinstance(bs, _adaptive_batch_size())


def _batch_schedule(bs: Any, n: int):
    """A validated ``batch_size`` as a BatchSizeSchedule whose sizes are all <= n (an
    adaptive batch size -- ``"adaptive"`` or an AdaptiveBatchSize -- is returned as given:
    its sizes are the controller's business)."""
    if _is_adaptive(bs):
        return bs
    BatchSizeSchedule = _batch_size_schedule()
    if isinstance(bs, BatchSizeSchedule):
        for B in [bs.initial] + [b for _, b in bs.milestones]:
            if B > n:
                raise ValueError(f"batch_size: expected batch sizes <= the number of examples ({n}), got {B} in {bs!r}")
        return bs
    if bs == "full":
        return BatchSizeSchedule(n)
    if bs > n:
        raise ValueError(
            f"batch_size: expected at most the number of examples ({n}), got {bs}; "
            f"use batch_size='full' for full-batch gradient descent"
        )
    return BatchSizeSchedule(bs)


# ============================================================================ batch norm / dropout
def check_norm(
    batch_norm: Any = False,
    ghost_batch_size: Any = None,
    dropout: Any = 0.0,
    *,
    n_hidden: int | None = None,
    batch_sizes: Sequence[int] = (),
    n: int | None = None,
    sampler: str = "shuffle",
    drop_last: bool = False,
    name: str = "batch_size",
    hint: str = "",
    track_noise: Any = None,
):
    """Every batch-norm and dropout rule, in one place; returns the
    :class:`~minigd.backends.base.NormSpec`.

    ``batch_norm`` is either the user's setting (then ``ghost_batch_size``, ``dropout``
    and, with ``n_hidden``, the depth are checked: a model of depth 0 has no hidden layer
    to normalise or drop) or an existing ``NormSpec`` (already checked; only the batch
    rules below run).

    Batch rules (batch norm only): every training batch of ``batch_sizes`` holds >= 2 rows
    and no ghost batch of 1 row.  With ``n`` (the number of examples) the partial last
    batch of an epoch (``n % B`` rows, unless ``drop_last`` or ``sampler="replacement"``)
    is checked too.  ``name`` / ``hint`` say where the batch comes from in the message.
    ``track_noise`` (fit's) is refused with batch norm: the tracked statistics need
    per-example gradients, which batch norm does not define.

    What ``MLP`` calls: ``check_norm(batch_norm, ghost_batch_size, dropout,
    n_hidden=len(sizes) - 2)``.  What ``fit`` calls before its first step:
    ``check_norm(model.norm, batch_sizes=schedule_sizes, n=n, sampler=sampler,
    drop_last=drop_last, track_noise=track_noise)``.  What a backend calls for a batch of
    B rows: ``norm.check_batch(B)`` (which is ``check_norm(norm, batch_sizes=[B])``).
    """
    NormSpec = _normspec()
    if isinstance(batch_norm, NormSpec):
        spec = batch_norm
        if not spec.bn:
            return spec
        if n is None and track_noise is None and type(batch_sizes) is tuple and len(batch_sizes) == 1:
            _check_norm_batch(spec, int(batch_sizes[0]), name, hint)
            return spec
    else:
        from minigd.kernels.codes import BATCH_NORM

        bn = BATCH_NORM[PARAMS["batch_norm"].check("batch_norm", batch_norm)]
        if bn and n_hidden == 0:
            raise ValueError(
                f"batch_norm: normalises hidden layers, and a model of depth 0 has none (batch_norm={batch_norm!r})"
            )
        ghost = None
        if ghost_batch_size is not None:
            if not bn:
                raise ValueError(
                    f"ghost_batch_size: needs batch_norm (ghost batches are batch-norm "
                    f"statistics), got ghost_batch_size={ghost_batch_size!r} with "
                    f"batch_norm={batch_norm!r}"
                )
            ghost = PARAMS["ghost_batch_size"].check("ghost_batch_size", ghost_batch_size)
        p = PARAMS["dropout"].check("dropout", dropout)
        if p > 0 and n_hidden == 0:
            raise ValueError(
                f"dropout: applies to hidden activations, and a model of depth 0 has none (dropout={dropout!r})"
            )
        spec = NormSpec(bn=bn, ghost=ghost, dropout=p)
    if not spec.bn:
        return spec
    if track_noise is not None:
        raise ValueError(
            f"track_noise: the tracked noise statistics need per-example gradients, "
            f"which are not defined for a model with batch_norm (got "
            f"track_noise={track_noise!r})"
        )
    for B in sorted(set(int(b) for b in batch_sizes)):
        sizes = {B}
        if n is not None and not drop_last and sampler != "replacement" and n % B:
            sizes.add(n % B)
        for b in sorted(sizes):
            extra = (
                "" if b == B else (f" (the last batch of an epoch holds {n} % {B} = {b} rows; drop_last=True drops it)")
            )
            _check_norm_batch(spec, b, name + extra, hint + extra)
    return spec


_NORMSPEC = None


def _normspec():
    """minigd.backends.base.NormSpec, imported once, on first use (this module sits below
    the backends)."""
    global _NORMSPEC
    if _NORMSPEC is None:
        from minigd.backends.base import NormSpec

        _NORMSPEC = NormSpec
    return _NORMSPEC


def _check_norm_batch(spec, B: int, name: str, hint: str) -> None:
    """Batch norm in training mode needs >= 2 rows in every ghost batch."""
    g = spec.ghost_size(B)
    if B == 1:
        raise ValueError(
            f"{name}: batch norm in training mode needs batches of at least 2 "
            f"rows (a batch of 1 has zero variance), got a batch of 1"
        )
    if B % g == 1:
        raise ValueError(
            f"ghost_batch_size: a batch of {B} rows in ghost batches of {g} leaves "
            f"a last ghost batch of 1 row, whose variance is zero in training "
            f"mode; choose batch and ghost sizes with B % ghost_batch_size != 1{hint}"
        )


# ============================================================================ the command line
def _flag_error(msg: str):
    import argparse

    return argparse.ArgumentTypeError(msg)


def arg_type(param: str | Constraint, table: Mapping[str, Constraint] | None = None) -> Callable[[str], Any]:
    """An argparse ``type=`` for one table entry: parses the flag's text and validates it
    with the same constraint, so ``--momentum 1.5`` fails with ``argument --momentum:
    expected a number < 1, got 1.5`` (argparse puts ``argument --flag:`` in front)."""
    c = param if isinstance(param, Constraint) else (PARAMS if table is None else table)[param]

    def parse(text: str) -> Any:
        try:
            value = c.parse(text)
        except (ValueError, TypeError):
            raise _flag_error(f"expected {c.type_phrase()}, got {text.strip()!r}") from None
        try:
            return c.check("", value)
        except (ValueError, TypeError) as exc:
            raise _flag_error(str(exc)[2:]) from None  # drop the empty "<name>: "

    parse.__name__ = getattr(param, "__name__", str(param))  # argparse's "invalid <name> value"
    return parse


def list_arg_type(
    param: str | Constraint, table: Mapping[str, Constraint] | None = None, *, what: str | None = None
) -> Callable[[str], tuple]:
    """An argparse ``type=`` for a comma-separated list of one table entry's values
    (``--widths 32,64``): each item parsed and validated by :func:`arg_type`; an empty list
    is an error."""
    one = arg_type(param, table)
    c = param if isinstance(param, Constraint) else (PARAMS if table is None else table)[param]
    what = what or f"a comma-separated list of {c.expected}"

    def parse(text: str) -> tuple:
        items = [t for t in (s.strip() for s in text.split(",")) if t]
        if not items:
            raise _flag_error(f"expected {what}, got an empty list")
        return tuple(one(t) for t in items)

    parse.__name__ = f"list of {param}" if isinstance(param, str) else "list"
    return parse
