"""Checkpoints: a model, its optimizer state, the sampler's random state and position, and
the training history, in ONE file, written atomically.

Format (version :data:`FORMAT_VERSION`)
---------------------------------------
An uncompressed ``.npz``-compatible zip archive (``numpy.load`` opens it; nothing in it needs
pickle) holding

* ``meta.json``: UTF-8 JSON with ``format = "minigd.checkpoint"``, ``format_version``, the
  minigd version that wrote it, the model's configuration, the optimizer chain (primitive
  names, codes, hyper-parameters) and its update count ``t``, the numpy ``bit_generator``
  state, the history's records and scalars, the caller's ``step_info``, and a table of
  every array entry with its shape and dtype;
* one ``<name>.npy`` entry per array: ``params``, ``opt.state`` / ``opt.hp`` / ...,
  ``sampler.<name>`` (the current epoch's permutation, or its i.i.d. draws),
  ``history.<column>`` (the per-step columns) and ``noise.raw`` (the gradient-noise
  tracker's per-step sums).

Every entry carries the zip CRC-32, checked on reading; array headers are checked against
the table before any data is read, so a corrupt or truncated file is a :class:`ValueError`
naming the file and what is wrong, never a crash, a huge allocation or silently wrong
numbers.  A file of a newer ``format_version`` is refused the same way.

Atomicity: the archive is written to a temporary file in the target's directory
(``.<name>.<pid>.<random>.tmp``), flushed and ``fsync``-ed, then renamed over the target with
:func:`os.replace` (atomic on POSIX and Windows) and the directory is ``fsync``-ed.  A crash
or ``SIGKILL`` at any moment leaves either the previous checkpoint or the new one, whole;
at worst a stale ``.tmp`` file, which is safe to delete.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from minigd._io import atomic_path, open_regular, read_npy_header
from minigd._validation import _got
from minigd.errors import BackendUnavailable, CheckpointError
from minigd.history import STEP_COLUMNS, History
from minigd.kernels.workspace import ParamLayout
from minigd.model import MLP
from minigd.optim.base import OP_ADAM, Optimizer, OptState

__all__ = ["save_checkpoint", "load_checkpoint", "Checkpoint", "FORMAT", "FORMAT_VERSION"]

FORMAT = "minigd.checkpoint"
#: the version this minigd writes; it reads this one and older ones
FORMAT_VERSION = 1
#: numpy bit generators a checkpoint may name (their states are plain ints and arrays)
BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")
#: array dtypes a checkpoint may hold (no object arrays: nothing is ever unpickled)
_DTYPES = ("<f4", "<f8", "<i8")
_META = "meta.json"
#: the largest meta.json accepted (a corrupt directory entry must not make us read gigabytes)
_MAX_META_BYTES = 1 << 30


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read.

    Attributes
    ----------
    path : str or None
        The file it came from.
    model : MLP
        A new model with the saved configuration and parameters.
    opt_state : OptState or None
        The optimizer's state buffers (momentum, Adam moments) and update count ``t``;
        ``opt_state.primitives`` is the saved chain.
    rng_state : dict or None
        ``numpy.random.Generator.bit_generator.state`` at save time; :meth:`rng` rebuilds
        the generator.
    sampler : dict of str -> ndarray
        The sampler arrays that were saved (``fit`` saves ``order``, the current epoch's
        permutation, and, for ``sampler="replacement"``, ``draws``).
    history : History or None
        The training history as it was at save time (including its gradient-noise tracker).
    step_info : dict
        The caller's counters (``fit`` saves ``step``, ``examples``, ``epoch``, ``train_time``,
        the position within the epoch and its configuration under ``"fit"``).
    meta : dict
        The whole decoded ``meta.json``.
    """

    path: str | None
    model: MLP
    opt_state: OptState | None = None
    rng_state: dict | None = None
    sampler: dict = field(default_factory=dict)
    history: History | None = None
    step_info: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def format_version(self) -> int:
        return int(self.meta.get("format_version", FORMAT_VERSION))

    def rng(self) -> np.random.Generator | None:
        """A new Generator in the saved state (None if none was saved)."""
        return None if self.rng_state is None else _generator_from_state(self.rng_state)

    def __repr__(self) -> str:
        info = {k: self.step_info[k] for k in ("step", "examples", "epoch") if k in self.step_info}
        return (
            f"Checkpoint(path={self.path!r}, model={self.model!r}, "
            f"opt_state={'yes' if self.opt_state is not None else None}, "
            f"history={self.history!r}, {info})"
        )


# ============================================================================ JSON helpers
def _to_json(o: Any) -> Any:
    """``default=`` hook: numpy scalars and small arrays; anything else is an error."""
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return {"__ndarray__": o.tolist(), "dtype": str(o.dtype)}
    raise TypeError(
        f"expected JSON-serialisable values (numbers, strings, lists, dicts, numpy scalars or arrays), got {_got(o)}"
    )


def _from_json(d: dict) -> Any:
    if "__ndarray__" in d and "dtype" in d and len(d) == 2:
        dt = np.dtype(d["dtype"])
        if dt.kind not in "biuf":
            raise ValueError(f"unexpected array dtype {dt} in meta.json")
        return np.asarray(d["__ndarray__"], dtype=dt)
    return d


def _dumps(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, default=_to_json, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what}: {exc}") from None


# ============================================================================ optimizer records
def _lr_record(lr: Any) -> Any:
    """A JSON value that identifies a learning rate, or None when it cannot be compared:
    a float for a number (or ``constant(x)``), ``{"schedule": name, field: ...}`` for
    minigd's schedule objects (frozen dataclasses of numbers), None for any other callable
    (code: it is taken as given)."""
    import dataclasses
    import numbers

    from minigd.optim import schedules

    if isinstance(lr, numbers.Integral) and not isinstance(lr, bool):
        return int(lr)
    if isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        return float(lr)
    if isinstance(lr, schedules.Constant):
        return float(lr.lr)
    if dataclasses.is_dataclass(lr) and type(lr).__module__ == schedules.__name__:
        rec: dict[str, Any] = {"schedule": type(lr).__name__}
        for f in dataclasses.fields(lr):
            v = getattr(lr, f.name)
            if isinstance(v, tuple) and all(isinstance(x, numbers.Real) for x in v):
                rec[f.name] = [_lr_record(x) for x in v]
                continue
            v = _lr_record(v)
            if v is None:
                return None
            rec[f.name] = v
        return rec
    return None


def _lr_text(rec: Any) -> str:
    """A :func:`_lr_record` as the schedule's repr (``Cosine(lr=0.1, total_steps=10, ...)``)."""
    if isinstance(rec, dict):
        fields = ", ".join(f"{k}={_lr_text(v)}" for k, v in rec.items() if k != "schedule")
        return f"{rec.get('schedule')}({fields})"
    if isinstance(rec, list):
        return f"({', '.join(_lr_text(v) for v in rec)}{',' if len(rec) == 1 else ''})"
    return repr(rec)


def optimizer_record(optimizer: Optimizer) -> dict:
    """What ``fit`` writes into a checkpoint to check that a resume continues with the same
    optimizer: its name, its JSON-able settings (``SGD``'s momentum, ``Adam``'s betas, ...)
    and the learning rate (see :func:`_lr_record`); JSON-normalised (tuples become lists)."""
    config = {}
    for k, v in optimizer.config.items():
        if k == "lr":
            continue
        try:
            config[k] = json.loads(json.dumps(v))
        except (TypeError, ValueError):
            continue
    return json.loads(json.dumps({"name": optimizer.name, "config": config, "lr": _lr_record(optimizer.lr)}))


def optimizer_difference(saved: dict | None, given: Optimizer, saved_chain) -> list:
    """What differs between the optimizer a checkpoint was written with (its
    :func:`optimizer_record`, None for an older checkpoint, and its chain of primitives)
    and ``given``: strings ``"<name>: saved <value>, given <value>"``; empty when the same."""
    from minigd.optim.base import chain_difference

    out = []
    chain = chain_difference(saved_chain, given.primitives)
    if saved is not None:
        mine = optimizer_record(given)
        if saved.get("name") == mine["name"]:
            theirs = saved.get("config") or {}
            for k in sorted(set(theirs) | set(mine["config"])):
                if theirs.get(k) != mine["config"].get(k):
                    out.append(f"{k}: saved {theirs.get(k)!r}, given {mine['config'].get(k)!r}")
        elif chain:  # another name for the same chain (SGD(momentum=0.9) = chain(trace, scale_by_lr)) is the same
            out.append(f"optimizer: saved {saved.get('name')}, given {mine['name']}")
        a, b = saved.get("lr"), mine["lr"]
        if a is not None and b is not None and a != b:
            out.append(
                f"lr: saved {_lr_text(a)}, given {_lr_text(b)} (to go on with another learning rate, "
                f"start a new run from the checkpoint: fit(model, ..., opt_state=load_checkpoint(path)"
                f".opt_state) with the checkpoint's model)"
            )
    if not out:  # also what tells an older checkpoint's chain apart
        out = chain
    return out


# ============================================================================ RNG
def _generator_from_state(state: dict) -> np.random.Generator:
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if name not in BIT_GENERATORS:
        raise ValueError(f"rng state: expected a numpy bit generator among {list(BIT_GENERATORS)}, got {name!r}")
    bg = getattr(np.random, name)()
    bg.state = state
    return np.random.Generator(bg)


# ============================================================================ history
def _history_parts(hist: History, arrays: dict) -> dict:
    n = hist.n_steps
    for c in STEP_COLUMNS:
        arrays[f"history.{c}"] = hist._cols[c][:n]
    meta = {
        "n_steps": n,
        "capacity": len(hist._cols["step"]),
        "epochs": hist.epochs,
        "evals": hist.evals,
        "target": hist.target,
        "reached": hist.reached,
        "steps_to_target": hist.steps_to_target,
        "examples_to_target": hist.examples_to_target,
        "time_to_target": hist.time_to_target,
        "stop_reason": hist.stop_reason,
        "config": hist.config,
        "noise": None,
    }
    tr = hist.noise_tracker
    if tr is not None:
        st = tr.get_state()
        arrays["noise.raw"] = st.pop("raw")
        meta["noise"] = st
    return meta


def _history_from_parts(meta: dict, arrays: dict) -> History:
    """The saved History, every field checked before anything is allocated for it (a
    crafted ``capacity`` or ``n_steps`` must not make us allocate; the step columns were
    already read, so their length is bounded by the file's)."""
    _need(isinstance(meta, dict), "the history table is not a JSON object")
    n = _int_field(meta, "n_steps", "history")
    for c in STEP_COLUMNS:
        col = arrays.get(f"history.{c}")
        if col is None or col.shape != (n,) or col.dtype != np.float64:
            raise _Corrupt(
                f"history column {c!r} has shape {getattr(col, 'shape', None)} dtype "
                f"{getattr(col, 'dtype', None)}, expected ({n},) float64"
            )
        _need(np.isfinite(col).all(), f"history column {c!r} holds NaN/inf entries")
    cap = meta.get("capacity", n)
    _need(_is_int(cap) and cap >= 0, f"history capacity {cap!r} is not a non-negative integer")
    # the capacity only pre-sizes the columns (they grow by doubling): never more than the
    # saved steps or fit's own cap of 2**20, whatever the file says
    hist = History(capacity=max(n, min(int(cap), 1 << 20), 16))
    for c in STEP_COLUMNS:
        hist._cols[c][:n] = arrays[f"history.{c}"]
    hist.n_steps = n
    hist.epochs = _records(meta.get("epochs"), "history epochs", ("epoch",))
    hist.evals = _records(meta.get("evals"), "history evaluations", ("step",))
    for e in hist.evals:
        _need(
            _is_int(e["step"]) and 0 <= e["step"] <= _MAX_COUNT,
            f"history evaluation step {e['step']!r} is not a non-negative integer",
        )
    target = meta.get("target")
    _need(
        target is None
        or (isinstance(target, dict) and all(isinstance(k, str) and _is_num(v) for k, v in target.items())),
        f"history target {target!r} is not a dict of metric -> number",
    )
    hist.target = target
    _need(meta.get("reached") in (None, True, False), f"history 'reached' is {meta.get('reached')!r}")
    hist.reached = meta.get("reached")
    for k in ("steps_to_target", "examples_to_target"):
        v = meta.get(k)
        _need(v is None or (_is_int(v) and 0 <= v <= _MAX_COUNT), f"history {k!r} is {v!r}")
    v = meta.get("time_to_target")
    _need(v is None or (_is_num(v) and math.isfinite(v) and v >= 0), f"history 'time_to_target' is {v!r}")
    hist.steps_to_target = meta.get("steps_to_target")
    hist.examples_to_target = meta.get("examples_to_target")
    hist.time_to_target = meta.get("time_to_target")
    _need(isinstance(meta.get("stop_reason"), str), f"history stop_reason {meta.get('stop_reason')!r} is not a string")
    hist.stop_reason = meta["stop_reason"]
    _need(isinstance(meta.get("config"), dict), "history config is not a JSON object")
    hist.config = dict(meta["config"])
    if meta.get("noise") is not None:
        hist.noise_tracker = _tracker_from_parts(meta["noise"], arrays.get("noise.raw"))
    return hist


def _tracker_from_parts(st: Any, raw: Any):
    from minigd.gradstats.tracking import NoiseTracker

    _need(isinstance(st, dict), "the noise tracker's state is not a JSON object")
    n = _int_field(st, "n", "noise tracker", low=1)
    _int_field(st, "t", "noise tracker")
    _need(st.get("replacement") in (True, False), f"noise tracker 'replacement' is {st.get('replacement')!r}")
    beta = st.get("beta")
    _need(_is_num(beta) and 0 <= beta < 1, f"noise tracker beta {beta!r} is not in [0, 1)")
    for k in ("ema_g2", "ema_tr", "pow"):
        _need(_is_num(st.get(k)), f"noise tracker {k!r} is {st.get(k)!r}, expected a number")
    _need(
        isinstance(raw, np.ndarray) and raw.ndim == 2 and raw.shape[1] == 4 and raw.dtype == np.float64,
        f"noise.raw has shape {getattr(raw, 'shape', None)}, expected (m, 4) float64",
    )
    _need(
        bool(np.isfinite(raw[:, :2]).all())
        and bool((raw[:, :2] >= 0).all())
        and bool((raw[:, :2] == np.round(raw[:, :2])).all())
        and bool((raw[:, :2] <= _MAX_COUNT).all())
        and bool((raw[:, 1] <= n).all()),
        "noise.raw holds step numbers or batch sizes that are not non-negative integers",
    )
    extra = st.get("extra")
    _need(
        isinstance(extra, list)
        and all(
            isinstance(e, list)
            and len(e) == 2
            and _is_int(e[0])
            and e[0] >= 0
            and isinstance(e[1], dict)
            and all(isinstance(k, str) and (v is None or _is_num(v)) for k, v in e[1].items())
            for e in extra
        ),
        "the noise tracker's extra records are malformed",
    )
    st = dict(st)
    st["raw"] = raw
    return NoiseTracker.from_state(st)


# ============================================================================ checks of what was read
#: the largest step / example / epoch count a checkpoint may hold (float64 columns stay exact)
_MAX_COUNT = 1 << 53


def _need(cond: Any, msg: str) -> None:
    if not cond:
        raise _Corrupt(msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int_field(d: dict, key: str, where: str, low: int = 0, high: int = _MAX_COUNT) -> int:
    v: Any = d.get(key)  # a value read from the JSON table
    if not _is_int(v) or not low <= v <= high:
        raise _Corrupt(f"{where} {key!r} is {v!r}, expected an integer in [{low}, {high}]")
    return int(v)


def _records(lst: Any, what: str, keys: tuple) -> list:
    """A list of flat records (str keys; numbers, bools, None or strings as values) that
    all have ``keys``."""
    _need(isinstance(lst, list), f"{what} are not a list")
    out = []
    for r in lst:
        _need(
            isinstance(r, dict)
            and all(isinstance(k, str) for k in r)
            and all(k in r for k in keys)
            and all(v is None or isinstance(v, (numbers.Real, str)) for v in r.values()),
            f"{what} hold a malformed record ({str(r)[:80]})",
        )
        out.append(dict(r))
    return out


def _check_finite_array(a: np.ndarray, name: str) -> None:
    if a.size and not np.isfinite(a).all():
        raise _Corrupt(f"{name} holds {int(np.count_nonzero(~np.isfinite(a)))} NaN/inf entries")


# ============================================================================ save
def _check_path(path: Any, name: str = "path") -> str:
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a file path (str or os.PathLike), got {_got(path)}")
    p = os.fspath(path)
    if not isinstance(p, str) or not p or "\x00" in p:
        raise ValueError(f"{name}: expected a non-empty file path, got {p!r}")
    return os.path.abspath(p)


def save_checkpoint(
    path: str | os.PathLike,
    model: MLP,
    opt_state: OptState | None = None,
    *,
    rng: np.random.Generator | None = None,
    sampler: dict | None = None,
    history: History | None = None,
    step_info: dict | None = None,
) -> str:
    """Write a checkpoint to ``path`` atomically; returns the absolute path written.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write (any name; ``.npz`` is conventional).  Its directory must exist.
        An existing file is replaced only once the new one is complete and on disk.
    model : MLP
        Saved: its configuration (sizes, activations, loss, dtype, init, backend) and
        parameters.
    opt_state : OptState, optional
        Saved: the chain's primitives, its state buffers and the update count ``t``.
    rng : numpy.random.Generator, optional
        Saved: ``rng.bit_generator.state`` (PCG64, PCG64DXSM, MT19937, Philox or SFC64).
    sampler : dict of str -> 1-D int64 or float array, optional
        Sampler arrays, e.g. the current epoch's permutation.
    history : History, optional
        Saved: the step columns, epoch and evaluation records, target status, config and
        the gradient-noise tracker's state.
    step_info : dict, optional
        JSON-serialisable counters and settings (numbers, strings, lists, dicts; numpy
        scalars and small arrays are converted).

    Returns
    -------
    str

    Examples
    --------
    >>> import os, tempfile, numpy as np, minigd as mg
    >>> model = mg.MLP([4, 3], seed=0)
    >>> p = mg.save_checkpoint(os.path.join(tempfile.mkdtemp(), "ck.npz"), model,
    ...                        step_info={"step": 0})
    >>> bool(np.array_equal(mg.load_checkpoint(p).model.params, model.params))
    True
    """
    path = _check_path(path)
    d = os.path.dirname(path)
    if not os.path.isdir(d):
        raise ValueError(f"path: the directory {d!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"path: {path!r} is a directory, expected a file path")
    if not isinstance(model, MLP):
        raise TypeError(f"model: expected a minigd.MLP, got {_got(model)}")
    arrays: dict = {"params": model.params}
    if model.running.size:  # batch norm's running statistics
        arrays["running"] = model.running
    meta: dict = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_unix": time.time(),
        "model": model.config(),
    }
    try:
        from minigd import __version__

        meta["minigd_version"] = __version__
    except ImportError:  # pragma: no cover - during package import
        meta["minigd_version"] = None

    if opt_state is not None:
        if not isinstance(opt_state, OptState):
            raise TypeError(f"opt_state: expected a minigd OptState (optimizer.init(params)), got {_got(opt_state)}")
        need = sum(p.slots for p in opt_state.primitives) * model.n_params
        if opt_state.state.shape != (need,) or opt_state.state.dtype != model.dtype:
            raise ValueError(
                f"opt_state: expected state buffers of shape ({need},) and dtype "
                f"{model.dtype} for this model, got {_got(opt_state.state)}"
            )
        meta["opt"] = {
            "t": int(opt_state.t),
            "primitives": [
                {"name": p.name, "code": int(p.code), "hp": [float(h) for h in p.hp], "slots": int(p.slots)}
                for p in opt_state.primitives
            ],
        }
        for k in ("codes", "hp", "soff", "state"):
            arrays[f"opt.{k}"] = getattr(opt_state, k)
    else:
        meta["opt"] = None

    if rng is not None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng: expected a numpy.random.Generator, got {_got(rng)}")
        state = rng.bit_generator.state
        if state.get("bit_generator") not in BIT_GENERATORS:
            raise ValueError(
                f"rng: expected one of the bit generators {list(BIT_GENERATORS)}, got {state.get('bit_generator')!r}"
            )
        meta["rng"] = state
    else:
        meta["rng"] = None

    sampler = {} if sampler is None else sampler
    if not isinstance(sampler, dict):
        raise TypeError(f"sampler: expected a dict of name -> 1-D array, got {_got(sampler)}")
    for k, a in sampler.items():
        if not isinstance(k, str) or not k.isidentifier():
            raise ValueError(f"sampler: expected identifier keys, got {k!r}")
        if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.str not in _DTYPES:
            raise TypeError(f"sampler[{k!r}]: expected a 1-D int64/float32/float64 array, got {_got(a)}")
        arrays[f"sampler.{k}"] = a
    meta["sampler"] = sorted(sampler)

    if history is not None:
        if not isinstance(history, History):
            raise TypeError(f"history: expected a minigd.History, got {_got(history)}")
        meta["history"] = _history_parts(history, arrays)
    else:
        meta["history"] = None

    step_info = {} if step_info is None else step_info
    if not isinstance(step_info, dict) or not all(isinstance(k, str) for k in step_info):
        raise TypeError(f"step_info: expected a dict with str keys, got {_got(step_info)}")
    meta["step_info"] = step_info

    arrays = {k: np.ascontiguousarray(a) for k, a in arrays.items()}
    for k, a in arrays.items():
        if a.dtype.str not in _DTYPES:  # pragma: no cover - internal arrays are typed above
            raise TypeError(f"{k}: unsupported dtype {a.dtype}")
    meta["arrays"] = {k: [list(a.shape), a.dtype.str] for k, a in arrays.items()}
    blob = _dumps(meta, "step_info/history").encode("utf-8")

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.writestr(_META, blob)
            for k, a in arrays.items():
                with zf.open(f"{k}.npy", "w", force_zip64=True) as m:
                    np.lib.format.write_array(m, a, allow_pickle=False)

    _atomic_write(path, write)
    return path


def _atomic_write(path: str, write) -> None:
    """temp file in the same directory + fsync + os.replace (:func:`minigd._io.atomic_path`),
    then fsync the directory so that the rename itself is durable."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    if hasattr(os, "O_DIRECTORY"):  # POSIX
        try:
            dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # pragma: no cover - exotic file systems
            return
        try:
            os.fsync(dfd)
        except OSError:  # pragma: no cover
            pass
        finally:
            os.close(dfd)


# ============================================================================ load
class _UnsupportedNpy(Exception):
    """An entry in a .npy format version this reader does not read."""


class _Corrupt(Exception):
    pass


def _read_array(zf: zipfile.ZipFile, key: str, shape, dtype: str, file_len: int) -> np.ndarray:
    name = f"{key}.npy"
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise _Corrupt(f"the entry {name!r} is missing") from None
    if (
        dtype not in _DTYPES
        or not isinstance(shape, list)
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise _Corrupt(f"the table lists {key!r} with an invalid shape/dtype {shape!r} {dtype!r}")
    shape = tuple(shape)
    dt = np.dtype(dtype)
    nbytes = dt.itemsize * math.prod(shape)
    # never read (or allocate) more than the file can hold, whatever a corrupt table says
    if nbytes > min(info.file_size, file_len):
        raise _Corrupt(
            f"entry {name!r} is {info.file_size} bytes, too small for an array of shape {shape} and dtype {dt}"
        )
    with zf.open(info) as f:
        try:
            _, hshape, fortran, hdt = read_npy_header(f, _UnsupportedNpy)
        except _UnsupportedNpy as exc:
            raise _Corrupt(f"entry {name!r} has {exc}") from None
        if tuple(hshape) != shape or hdt != dt or fortran:
            raise _Corrupt(
                f"entry {name!r} holds shape {tuple(hshape)} dtype {hdt}, the table says shape {shape} dtype {dt}"
            )
        data = f.read(nbytes)
        if len(data) != nbytes or f.read(1):
            raise _Corrupt(f"entry {name!r} has {len(data)} data bytes, expected {nbytes}")
    return np.frombuffer(data, dtype=dt).reshape(shape).copy()


def _check_meta(meta: Any) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _Corrupt(f"meta.json does not describe a {FORMAT!r} file")
    v = meta.get("format_version")
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise _Corrupt(f"invalid format_version {v!r}")
    for k in ("model", "arrays"):
        if not isinstance(meta.get(k), dict):
            raise _Corrupt(f"meta.json has no {k!r} table")


def load_checkpoint(path: str | os.PathLike, *, backend: str | None = None) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (or by ``fit(checkpoint=...)``).

    Parameters
    ----------
    path : str or os.PathLike
    backend : str, optional
        Build the model on this backend instead of the saved one.

    Returns
    -------
    Checkpoint

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    CheckpointError
        (a :class:`ValueError`) The path is not a regular file (a directory, a FIFO,
        ``/dev/zero``, a socket or a device: refused before anything is read, without
        blocking), or the file is not a minigd checkpoint, is corrupt, truncated or
        crafted, or was written in a newer format version; the message names the file
        and what is wrong.  Everything read is checked before it is used: array headers
        and sizes against the table and the file's own length (no allocation larger than
        the file), the model configuration and parameters (finite), the optimizer chain
        (every primitive rebuilt from its name and checked against its saved code,
        hyper-parameters, slots and table rows; finite state; a non-negative update
        count), the random generator state, and every history field (types, ranges,
        column lengths; the saved capacity is capped).  What only a training run can
        check -- the sampler's permutation and draws against the data, the counters
        against each other -- ``fit(resume=...)`` checks before its first step.
    """
    path = _check_path(path)
    if os.path.isdir(path):
        raise CheckpointError(f"path: {path!r} is a directory, expected a checkpoint file", path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no checkpoint file at {path!r}")
    where = f"checkpoint {path!r}"
    # only a regular file, opened without blocking (a FIFO, /dev/zero, a socket: refused)
    fh, file_len = open_regular(path, "path", CheckpointError)  # (OSErrors: permissions, ...)
    with fh:
        try:
            return _parse(fh, path, file_len, where, backend)
        except CheckpointError:
            raise
        except ValueError as exc:
            if str(exc).startswith(where):
                raise CheckpointError(str(exc), path) from exc
            raise CheckpointError(f"{where}: corrupt or not a minigd checkpoint ({exc})", path) from exc
        except _Corrupt as exc:
            raise CheckpointError(f"{where}: corrupt or not a minigd checkpoint: {exc}", path) from None
        except (MemoryError, BackendUnavailable):
            raise
        except Exception as exc:  # anything a damaged archive can make zipfile/numpy/json raise
            raise CheckpointError(f"{where}: corrupt or truncated file ({type(exc).__name__}: {exc})", path) from exc


def _parse(fh, path: str, file_len: int, where: str, backend: str | None) -> Checkpoint:
    with zipfile.ZipFile(fh, "r") as zf:
        try:
            info = zf.getinfo(_META)
        except KeyError:
            raise _Corrupt(f"not a minigd checkpoint (no {_META} entry)") from None
        if info.file_size > min(_MAX_META_BYTES, file_len):
            raise _Corrupt(f"{_META} claims {info.file_size} bytes")
        meta = json.loads(zf.read(info).decode("utf-8"), object_hook=_from_json)
        _check_meta(meta)
        if meta["format_version"] > FORMAT_VERSION:
            raise ValueError(
                f"{where}: written in checkpoint format version "
                f"{meta['format_version']} (by minigd {meta.get('minigd_version')}); "
                f"this minigd reads versions <= {FORMAT_VERSION}: upgrade minigd"
            )
        arrays = {
            k: _read_array(zf, k, v[0], v[1], file_len) if isinstance(v, list) and len(v) == 2 else _bad_entry(k)
            for k, v in meta["arrays"].items()
        }
    return _assemble(path, meta, arrays, backend)


def _opt_state_from_parts(om: Any, arrays: dict, model: MLP) -> OptState:
    """The saved optimizer state, rebuilt: every primitive is made again by its own
    constructor from its saved hyper-parameters (which checks their ranges) and must match
    what was saved (code, hyper-parameters, slots); the op codes, offsets and
    hyper-parameter rows of the arrays must match that rebuilt chain, the state must be
    finite and the update count a non-negative integer.  The kernels read the rebuilt
    tables (the scratch columns of ``opt.hp`` are kept, finite: the kernels write them
    before reading them)."""
    from minigd.optim import transforms

    _need(isinstance(om, dict) and isinstance(om.get("primitives"), list), "the optimizer table is malformed")
    t = _int_field(om, "t", "optimizer update count")
    makers: dict[str, tuple[Callable[..., Any], int]] = {
        "clip_by_global_norm": (transforms.clip_by_global_norm, 1),
        "add_decayed_weights": (transforms.add_decayed_weights, 1),
        "trace": (lambda m, nest: transforms.trace(m, {0.0: False, 1.0: True}[nest]), 2),
        "scale_by_adam": (transforms.scale_by_adam, 3),
        "scale_by_lr": (transforms.scale_by_lr, 0),
        "scale": (transforms.scale, 1),
    }
    prims = []
    for i, p in enumerate(om["primitives"]):
        _need(
            isinstance(p, dict)
            and p.get("name") in makers
            and isinstance(p.get("hp"), list)
            and all(_is_num(h) for h in p["hp"])
            and _is_int(p.get("code"))
            and _is_int(p.get("slots")),
            f"optimizer primitive {i} ({str(p)[:80]}) is not one minigd knows",
        )
        make, n_hp = makers[p["name"]]
        _need(
            len(p["hp"]) == n_hp,
            f"optimizer primitive {i} ({p['name']}) has {len(p['hp'])} hyper-parameters, expected {n_hp}",
        )
        try:
            prim = make(*p["hp"])
        except (TypeError, ValueError, KeyError) as exc:
            raise _Corrupt(
                f"optimizer primitive {i} ({p['name']}) has invalid hyper-parameters {p['hp']}: {exc}"
            ) from None
        _need(
            prim.code == p["code"] and prim.slots == p["slots"] and prim.hp == tuple(float(h) for h in p["hp"]),
            f"optimizer primitive {i} ({p['name']}) has code {p['code']!r} / slots {p['slots']!r}, "
            f"expected {prim.code} / {prim.slots}",
        )
        prims.append(prim)
    ref = Optimizer(tuple(prims)).init(model.params)  # sized by the (checked) model: bounded
    for k in ("codes", "hp", "soff", "state"):
        a = arrays.get(f"opt.{k}")
        want = getattr(ref, k)
        if a is None or a.shape != want.shape or a.dtype != want.dtype:
            raise _Corrupt(
                f"opt.{k} has shape {getattr(a, 'shape', None)}, the optimizer chain needs {want.shape} {want.dtype}"
            )
    T = len(prims)
    if not np.array_equal(arrays["opt.codes"], ref.codes) or not np.array_equal(arrays["opt.soff"], ref.soff):
        raise _Corrupt("opt.codes/opt.soff do not match the saved primitives")
    # columns 0..2: the hyper-parameters; the spare last row: constants (3.. of the other
    # rows is scratch the kernels write before reading)
    hp = arrays["opt.hp"]
    if not np.array_equal(hp[:T, :3], ref.hp[:T, :3]) or not np.array_equal(hp[T, 5:], ref.hp[T, 5:]):
        raise _Corrupt("opt.hp does not match the saved primitives' hyper-parameters")
    _check_finite_array(hp, "opt.hp")
    _check_finite_array(arrays["opt.state"], "opt.state")
    for i, p in enumerate(prims):  # Adam's second moment is a sum of squares
        if p.code == OP_ADAM:
            P = model.n_params
            v = arrays["opt.state"][int(ref.soff[i]) + P : int(ref.soff[i]) + 2 * P]
            _need(bool((v >= 0).all()), "opt.state holds a negative Adam second moment")
    ref.hp[...] = hp  # (the scratch columns too: a round trip is exact)
    ref.state[...] = arrays["opt.state"]
    ref.t = t
    return ref


def _bad_entry(k):
    raise _Corrupt(f"the table entry for {k!r} is malformed")


def _assemble(path: str, meta: dict, arrays: dict, backend: str | None) -> Checkpoint:
    cfg = dict(meta["model"])
    if backend is not None:
        cfg["backend"] = backend
    params = arrays.get("params")
    sizes = cfg.get("sizes")
    if (
        params is None
        or not isinstance(sizes, list)
        or len(sizes) < 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes)
    ):
        raise _Corrupt(f"the saved model configuration is invalid (sizes={sizes!r})")
    n_params = ParamLayout(tuple(sizes), batch_norm=cfg.get("batch_norm", False) not in (False, None)).n_params
    if params.shape != (n_params,):  # checked before building: never allocate for a bad table
        raise _Corrupt(f"params has shape {params.shape}, the saved sizes {sizes} need ({n_params},)")
    try:
        model = MLP._from_config(cfg)
    except BackendUnavailable as exc:
        how = (
            "the checkpoint was saved from that backend; load it on another with load_checkpoint(path, backend='cpu')"
            if backend is None
            else "ask for another backend with load_checkpoint(path, backend=...)"
        )
        raise BackendUnavailable(
            exc.name, f"{exc.reason}; {how} (fit(..., resume=path) continues it on a model of any backend)"
        ) from None
    except (TypeError, ValueError) as exc:
        raise _Corrupt(f"the saved model configuration is invalid: {exc}") from None
    if params.shape != model.params.shape or params.dtype != model.dtype:
        raise _Corrupt(
            f"params has shape {getattr(params, 'shape', None)} dtype "
            f"{getattr(params, 'dtype', None)}, the model needs "
            f"({model.n_params},) {model.dtype}"
        )
    _check_finite_array(params, "params")
    model.params[...] = params
    running = arrays.get("running")
    if model.running.size:
        if running is None or running.shape != model.running.shape or running.dtype != model.dtype:
            raise _Corrupt(
                f"the batch-norm running statistics are missing or have the wrong shape "
                f"(got {getattr(running, 'shape', None)}, expected {model.running.shape} "
                f"{model.dtype})"
            )
        _check_finite_array(running, "running")
        _need(
            all(bool((v >= 0).all()) for v in model.layout.running_views(running)[1]),
            "running holds a negative running variance",
        )
        model.running[...] = running

    opt_state = None
    if meta.get("opt") is not None:
        opt_state = _opt_state_from_parts(meta["opt"], arrays, model)

    rng_state = meta.get("rng")
    if rng_state is not None:
        try:
            _generator_from_state(rng_state)
        except (TypeError, ValueError, KeyError) as exc:
            raise _Corrupt(f"invalid random generator state ({exc})") from None
    names = meta.get("sampler", [])
    _need(
        isinstance(names, list) and all(isinstance(k, str) and k.isidentifier() for k in names),
        f"the sampler table {str(names)[:80]} is not a list of names",
    )
    sampler = {}
    for k in names:
        a = arrays.get(f"sampler.{k}")
        _need(isinstance(a, np.ndarray) and a.ndim == 1, f"the sampler entry {k!r} is missing or not 1-D")
        sampler[k] = a
    _need(isinstance(meta.get("step_info", {}), dict), "step_info is not a JSON object")
    history = _history_from_parts(meta["history"], arrays) if meta.get("history") is not None else None
    return Checkpoint(
        path=path,
        model=model,
        opt_state=opt_state,
        rng_state=rng_state,
        sampler=sampler,
        history=history,
        step_info=dict(meta.get("step_info") or {}),
        meta=meta,
    )
