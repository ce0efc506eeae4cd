"""Fuzz suite (issue 19): crafted checkpoints and data files either load correctly or raise
the documented minigd error -- never another exception type, a crash, a hang, or a NaN.

Budget: ``MINIGD_FUZZ_EXAMPLES`` examples per test (default 30: the whole file runs in
well under 30 s on 2 cores, derandomized, in every ``pytest`` run); locally, e.g.::

    MINIGD_FUZZ_EXAMPLES=10000 python -m pytest -q tests/test_fuzz_files.py

which also draws fresh random examples (derandomized only at the default budget).  Every
example runs under a 60 s alarm, so a hang fails instead of blocking the suite.

What counts as the documented error:

* checkpoints: :class:`minigd.CheckpointError` whose message starts with
  ``checkpoint '<path>':`` (or ``path:``); resuming a file that loaded: CheckpointError,
  a ``ValueError`` starting with ``resume:`` (the file describes another run), or a
  :class:`minigd.DivergenceError` (crafted but finite parameters can diverge) -- and when
  it trains, every loss and parameter is finite;
* data files: ``ValueError`` (or ``TypeError`` for a non-numeric array in a ``.npz``)
  whose message starts with the name of what is wrong (``name_or_path``, ``labels``,
  ``X``, ``y``, ...); when it loads, every array is finite and labels lie in
  ``0..n_classes-1``.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import io
import json
import math
import os
import re
import signal
import tempfile
import zipfile

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import minigd as mg
from minigd.checkpoint import load_checkpoint
from minigd.data import load_dataset, read_idx

N_EXAMPLES = int(os.environ.get("MINIGD_FUZZ_EXAMPLES", "30"))
FUZZ = settings(
    max_examples=N_EXAMPLES,
    deadline=None,
    derandomize=N_EXAMPLES <= 30,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)


@contextlib.contextmanager
def time_limit(seconds=60):
    """A hang is a failure, not a blocked suite (SIGALRM; POSIX main thread)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def boom(*_):
        raise TimeoutError(f"a crafted file took more than {seconds} s (a hang?)")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


_TMP = tempfile.mkdtemp(prefix="minigd-fuzz-")

# ============================================================================ checkpoints
_RNG = np.random.default_rng(11)
_X = _RNG.normal(size=(23, 4))
_Y = (_X[:, 0] > 0).astype(np.int64) + (_X[:, 1] > 0.7)

#: the runs whose checkpoints are crafted: fit arguments (the resume repeats them)
RUNS = {
    "sgd": dict(
        model=dict(sizes=[4, 5, 3], dtype="float64"),
        fit=dict(
            batch_size=4,
            optimizer=lambda: mg.SGD(lr=0.1, momentum=0.9),
            sampler="shuffle",
            validation=True,
            target={"val_loss": 0.05},
        ),
    ),
    "adam": dict(
        model=dict(sizes=[4, 6, 3], dtype="float32"),
        fit=dict(batch_size=5, optimizer=lambda: mg.Adam(lr=0.01), sampler="replacement", track_noise=2),
    ),
    "bn": dict(
        model=dict(sizes=[4, 6, 3], dtype="float64", batch_norm=True),
        fit=dict(batch_size=6, optimizer=lambda: mg.AdamW(lr=0.01), sampler="sequential", drop_last=True),
    ),
}


def _fit_args(name, X, y):
    kw = dict(RUNS[name]["fit"])
    kw["optimizer"] = kw["optimizer"]()
    if kw.pop("validation", False):
        kw["validation"] = (X[:7], y[:7])
    return kw


def _data(name):
    dt = RUNS[name]["model"]["dtype"]
    return _X.astype(dt), _Y


_BASES: dict = {}


def _base(name) -> bytes:
    """The bytes of a checkpoint fit wrote after 5 of the run's steps (made once)."""
    if name not in _BASES:
        X, y = _data(name)
        p = os.path.join(_TMP, f"base-{name}.npz")
        mg.fit(
            mg.MLP(**RUNS[name]["model"], seed=0),
            X,
            y,
            steps=5,
            checkpoint=p,
            checkpoint_every=5,
            seed=2,
            **_fit_args(name, X, y),
        )
        with open(p, "rb") as f:
            _BASES[name] = f.read()
    return _BASES[name]


def _split(blob):
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        meta = json.loads(z.read("meta.json"))
        arrays = {
            i.filename[:-4]: np.lib.format.read_array(io.BytesIO(z.read(i)))
            for i in z.infolist()
            if i.filename.endswith(".npy")
        }
    return meta, arrays


def _join(meta, arrays, *, fix_table=True) -> bytes:
    out = io.BytesIO()
    if fix_table:
        meta["arrays"] = {k: [list(a.shape), a.dtype.str] for k, a in arrays.items()}
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("meta.json", json.dumps(meta))
        for k, a in arrays.items():
            b = io.BytesIO()
            np.lib.format.write_array(b, np.ascontiguousarray(a), allow_pickle=False)
            z.writestr(f"{k}.npy", b.getvalue())
    return out.getvalue()


HOSTILE = st.one_of(
    st.sampled_from(
        [
            0,
            1,
            -1,
            2,
            3,
            5,
            7,
            23,
            -23,
            2**31 - 1,
            2**31,
            2**53,
            2**63 - 1,
            2**63,
            -(2**63),
            10**12,
            10**30,
            0.5,
            -0.5,
            1e-300,
            1e308,
            -1e308,
            math.nan,
            math.inf,
            -math.inf,
            True,
            False,
            None,
            "",
            "x",
            "order",
            "NaN",
            [],
            {},
            [0, 0, 0, 0],
            [None] * 4,
            {"a": 1},
            [[1, 2], [3]],
            {"__ndarray__": [1, 2], "dtype": "O"},
            {"__ndarray__": [[1], [2, 3]], "dtype": "f8"},
            {"__ndarray__": 5, "dtype": "(1000000000,)f8"},
            {"__ndarray__": [1], "dtype": "V8"},
            {"__ndarray__": [1.5], "dtype": "<f8"},
            {"__ndarray__": [], "dtype": "i8"},
        ]
    ),
    st.integers(-(10**20), 10**20),
    st.floats(),
    st.text(max_size=6),
    st.lists(st.integers(-3, 40), max_size=6),
)


def _paths(tree, prefix=()):
    """Every (container path, key) in a JSON tree."""
    out = []
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return out
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(_paths(v, prefix + (k,)))
    return out


def _crafted_array(draw, a):
    """A hostile replacement for array ``a``: out-of-range or extreme values, another
    length, another dtype, or another rank."""
    how = draw(st.sampled_from(["values", "extreme", "shape", "dtype", "rank", "empty", "permute", "dup"]))
    n = max(a.size, 1)
    if how == "values":
        b = a.copy()
        if b.size:
            i = draw(st.integers(0, b.size - 1))
            b.flat[i] = draw(st.sampled_from([-1, -n, n, n + 1, 2**40, 0]))
        return b
    if how == "extreme":
        b = a.copy()
        if b.size:
            i = draw(st.integers(0, b.size - 1))
            v = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e300, -1e300, 3.4e38, 1e20, -1.0]))
            if b.dtype.kind == "f":
                with np.errstate(over="ignore", invalid="ignore"):
                    b.flat[i] = v
            else:
                b.flat[i] = draw(st.sampled_from([-1, 2**62, -(2**62), n]))
        return b
    if how == "shape":
        k = draw(st.integers(0, 2 * n + 2))
        return np.resize(a, k) if a.ndim == 1 else np.resize(a, (k,) + a.shape[1:])
    if how == "dtype":
        return a.astype(draw(st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.uint8])))
    if how == "rank":
        return a.reshape(-1, 1) if a.ndim == 1 else a.ravel()
    if how == "empty":
        return a[:0]
    if how == "permute":
        return np.random.default_rng(draw(st.integers(0, 2**32 - 1))).permutation(a.ravel()).reshape(a.shape)
    b = a.copy()  # dup: one value repeated
    if b.size > 1:
        b.flat[1] = b.flat[0]
    return b


@st.composite
def crafted_checkpoints(draw):
    name = draw(st.sampled_from(sorted(RUNS)))
    blob = _base(name)
    kind = draw(st.sampled_from(["bytes", "meta", "meta", "array", "array", "both"]))
    if kind == "bytes":
        b = bytearray(blob)
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "zero"]))
            i = draw(st.integers(0, max(len(b) - 1, 0)))
            if op == "flip" and b:
                b[i] ^= draw(st.integers(1, 255))
            elif op == "truncate":
                del b[i:]
            elif op == "insert":
                b[i:i] = draw(st.binary(min_size=1, max_size=16))
            elif op == "delete":
                del b[i : i + draw(st.integers(1, 64))]
            elif op == "zero":
                b[i : i + 8] = bytes(len(b[i : i + 8]))
        return name, bytes(b)
    meta, arrays = _split(blob)
    if kind in ("meta", "both"):
        for _ in range(draw(st.integers(1, 3))):
            paths = _paths(meta)
            path = draw(st.sampled_from(paths))
            parent = meta
            for k in path[:-1]:
                parent = parent[k]
            op = draw(st.sampled_from(["set", "set", "set", "delete"]))
            if op == "delete" and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = copy.deepcopy(draw(HOSTILE))
    if kind in ("array", "both"):
        k = draw(st.sampled_from(sorted(arrays)))
        arrays[k] = _crafted_array(draw, arrays[k])
    return name, _join(meta, arrays, fix_table=draw(st.booleans()) or kind != "array")


_CK_MSG = re.compile(r"^(checkpoint '[^']*'|checkpoint \(in memory\)|path): \S")


def _check_loaded(ck):
    assert np.isfinite(ck.model.params).all() and np.isfinite(ck.model.running).all()
    if ck.opt_state is not None:
        assert np.isfinite(ck.opt_state.state).all() and ck.opt_state.t >= 0


@FUZZ
@given(crafted_checkpoints())
def test_crafted_checkpoints_load_or_raise_checkpoint_error(case):
    name, blob = case
    p = os.path.join(_TMP, "ck.npz")
    with open(p, "wb") as f:
        f.write(blob)
    with time_limit():
        try:
            ck = load_checkpoint(p)
        except mg.CheckpointError as exc:
            assert _CK_MSG.match(str(exc)), str(exc)
            event("load: CheckpointError")
            return
        _check_loaded(ck)
        X, y = _data(name)
        model = mg.MLP(**RUNS[name]["model"], seed=5)
        try:
            hist = mg.fit(model, X, y, steps=9, resume=ck, **_fit_args(name, X, y))
        except mg.CheckpointError as exc:
            assert _CK_MSG.match(str(exc)), str(exc)
            event("loaded; resume: CheckpointError")
            return
        except mg.DivergenceError as exc:
            assert np.isfinite(exc.params).all()
            event("loaded; resume: DivergenceError")
            return
        except ValueError as exc:
            assert str(exc).startswith("resume: "), f"{type(exc).__name__}: {exc}"
            event("loaded; resume: another run (ValueError 'resume: ...')")
            return
        assert np.isfinite(model.params).all()
        assert np.isfinite(hist.column("loss")).all() and hist.n_steps >= 5
        event("loaded; resumed and trained")


@FUZZ
@given(st.sampled_from(sorted(RUNS)), st.integers(0, 2**32 - 1))
def test_crafted_checkpoints_that_differ_only_in_the_loop_state(name, seed):
    """Targeted: only the arrays and counters a resume indexes with (sampler order/draws,
    k, epoch, step, examples, ep_count, t1, the optimizer's t)."""
    rng = np.random.default_rng(seed)
    meta, arrays = _split(_base(name))
    info = meta["step_info"]
    for _ in range(rng.integers(1, 3)):
        what = rng.choice(["order", "draws", "k", "epoch", "step", "examples", "ep_count", "t1", "t", "n_steps"])
        n = len(arrays["sampler.order"])
        v = int(rng.choice([-2, -1, 0, 1, 2, 5, n - 1, n, n + 1, 2**31, 2**62]))
        if what == "order":
            arrays["sampler.order"] = arrays["sampler.order"].copy()
            arrays["sampler.order"][rng.integers(n)] = v
        elif what == "draws" and "sampler.draws" in arrays:
            d = arrays["sampler.draws"].copy()
            d[rng.integers(d.size)] = v
            arrays["sampler.draws"] = d if rng.random() < 0.7 else d[: rng.integers(d.size)]
        elif what == "t":
            meta["opt"]["t"] = v
        elif what == "n_steps":
            meta["history"]["n_steps"] = v
        elif what in info:
            info[what] = v
    p = os.path.join(_TMP, "loop.npz")
    with open(p, "wb") as f:
        f.write(_join(meta, arrays))
    X, y = _data(name)
    model = mg.MLP(**RUNS[name]["model"], seed=5)
    with time_limit():
        try:
            hist = mg.fit(model, X, y, steps=9, resume=p, **_fit_args(name, X, y))
        except mg.CheckpointError as exc:
            assert _CK_MSG.match(str(exc)), str(exc)
            event("CheckpointError")
            return
    assert np.isfinite(model.params).all() and np.isfinite(hist.column("loss")).all()
    event("resumed and trained")


# ============================================================================ data files
_DATA_MSG = re.compile(
    r"^(name_or_path|labels|header|label_column|delimiter|task|part|n|X|y|X_val|y_val|path)"
    r"(\[[^\]]*\])?( \([^)]*\))?: \S"
)

TOKENS = [
    "0",
    "1",
    "-1",
    "2",
    "3.5",
    "1e308",
    "-1.7e308",
    "1e400",
    "-1e400",
    "nan",
    "inf",
    "-inf",
    "abc",
    "",
    " ",
    '"',
    '"1,5"',
    "#",
    "\x00",
    "0x10",
    "1_000",
    "\u0661",
    "1e-320",
    "9" * 400,
    "label",
    "\ufeff1",
]


EXTREME = [0.0, 1.0, -1.0, 0.5, 3.0, 1e308, -1.7e308, 1e-320, 3.5e38, -3.5e38, 1e20, 2.0**63, 1e154]


@st.composite
def clean_csv_texts(draw):
    """Well-formed files (so the loading, splitting and standardizing runs), with extreme
    but finite numbers among the features and the labels."""
    rows = draw(st.integers(3, 12))
    width = draw(st.integers(2, 5))
    num = st.one_of(st.sampled_from(EXTREME), st.floats(-1e6, 1e6), st.floats(allow_nan=False, allow_infinity=False))
    lines = [",".join(f"c{j}" for j in range(width))] if draw(st.booleans()) else []
    classification = draw(st.booleans())
    for _ in range(rows):
        feats = [repr(draw(num)) for _ in range(width - 1)]
        lab = str(draw(st.integers(0, 3))) if classification else repr(draw(num))
        lines.append(",".join(feats + [lab]))
    return "\n".join(lines) + "\n"


@st.composite
def csv_texts(draw):
    if draw(st.booleans()):
        return draw(clean_csv_texts())
    rows = draw(st.integers(0, 10))
    width = draw(st.integers(1, 5))
    lines = []
    if draw(st.booleans()):
        lines.append(",".join(draw(st.sampled_from(["a", "b", "label", "1", ""])) for _ in range(width)))
    for _ in range(rows):
        w = width if draw(st.integers(0, 9)) else draw(st.integers(0, 7))
        fields = [
            draw(st.one_of(st.sampled_from(TOKENS), st.floats().map(repr), st.integers(-(10**30), 10**30).map(str)))
            for _ in range(w)
        ]
        lines.append(",".join(fields))
    eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return eol.join(lines) + (eol if draw(st.booleans()) else "")


_DTYPES = [
    np.float32,
    np.float64,
    np.int8,
    np.int64,
    np.uint64,
    np.bool_,
    np.complex64,
    "S3",
    "U2",
    np.float16,
    [("a", "f8"), ("b", "i4")],
]


@st.composite
def clean_npz_dicts(draw):
    n = draw(st.integers(3, 10))
    k = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    X = rng.choice(EXTREME + [2.0, -3.0, 7.0], size=(n, k))
    X = X.astype(draw(st.sampled_from([np.float64, np.float32, np.int64, np.uint8]))) if draw(st.booleans()) else X
    y = rng.integers(0, 3, n) if draw(st.booleans()) else rng.choice(EXTREME, size=n)
    out = {"X": X, "y": y}
    if draw(st.booleans()):
        out.update(X_val=X[:2].copy(), y_val=y[:2].copy())
    return out


@st.composite
def npz_dicts(draw):
    if draw(st.booleans()):
        with np.errstate(over="ignore", invalid="ignore"):
            return draw(clean_npz_dicts())
    n = draw(st.integers(0, 8))
    out = {}
    for key in draw(st.lists(st.sampled_from(["X", "y", "X_val", "y_val", "junk"]), max_size=5, unique=True)):
        dt = np.dtype(draw(st.sampled_from(_DTYPES)))
        rank = draw(st.integers(0, 3))
        shape = (
            tuple(
                [n if draw(st.integers(0, 4)) else draw(st.integers(0, 9))]
                + [draw(st.integers(0, 4)) for _ in range(rank - 1)]
            )
            if rank
            else ()
        )
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8).tobytes()
        with np.errstate(over="ignore"):
            a = (
                np.frombuffer(raw, dtype=dt).reshape(shape).copy()
                if dt.kind not in "fc"
                else rng.choice([0.0, 1.0, -2.0, 3.0, np.nan, np.inf, 1e300, -1e38, 7e37], size=shape).astype(dt)
            )
        out[key] = a
    return out


@st.composite
def idx_files(draw):
    code = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0x07, 0xFF]))
    ndim = draw(st.integers(0, 4))
    dims = [draw(st.one_of(st.integers(0, 6), st.sampled_from([2**31, 2**32 - 1, 10**9]))) for _ in range(ndim)]
    head = bytes([0, 0, code, ndim]) + b"".join(int(d).to_bytes(4, "big") for d in dims)
    if draw(st.integers(0, 9)) == 0:
        head = draw(st.binary(max_size=4)) + head[4:]
    itemsize = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}.get(code, 1)
    need = math.prod(dims) * itemsize if dims else 0
    size = need if need <= 4096 and draw(st.integers(0, 3)) else draw(st.integers(0, 64))
    body = draw(st.binary(min_size=min(size, 64), max_size=min(size, 64)))
    body = (body * (size // max(len(body), 1) + 1))[:size] if body else bytes(size)
    return head + body


@st.composite
def data_files(draw):
    kind = draw(st.sampled_from(["csv", "csv.gz", "npz", "npz", "idx", "idx.gz", "junk"]))
    if kind.startswith("csv"):
        blob = draw(csv_texts()).encode("utf-8", "surrogatepass")
        name = "d.csv"
    elif kind == "npz":
        b = io.BytesIO()
        (np.savez_compressed if draw(st.booleans()) else np.savez)(b, **draw(npz_dicts()))
        blob = b.getvalue()
        name = "d.npz"
    elif kind.startswith("idx"):
        blob = draw(idx_files())
        name = "train-images-idx3-ubyte"
    else:
        blob = draw(st.binary(max_size=300))
        name = draw(st.sampled_from(["d.csv", "d.npz", "train-images-idx3-ubyte"]))
    if kind.endswith(".gz"):
        blob = gzip.compress(blob)
        name += ".gz"
    if draw(st.integers(0, 4)) == 0 and blob:  # then damage it
        b = bytearray(blob)
        i = draw(st.integers(0, len(b) - 1))
        op = draw(st.sampled_from(["flip", "truncate"]))
        if op == "flip":
            b[i] ^= draw(st.integers(1, 255))
        else:
            del b[i:]
        blob = bytes(b)
    labels = draw(idx_files()) if name.startswith("train-images") else None
    if kind.startswith("idx") and draw(st.booleans()):  # a consistent pair (then maybe damaged above)
        n, r, c = draw(st.integers(2, 9)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
        body = draw(st.binary(min_size=n * r * c, max_size=n * r * c))
        blob = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, r, c)) + body
        if kind.endswith(".gz"):
            blob = gzip.compress(blob)
        labels = bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(draw(st.integers(0, 3)) for _ in range(n))
    return name, blob, labels


def _check_dataset(ds):
    for a in (ds.X_train, ds.X_val):
        assert a.dtype == np.float32 and a.ndim == 2 and np.isfinite(a).all()
    for y in (ds.y_train, ds.y_val):
        if ds.task == "classification":
            assert y.dtype == np.int64 and y.min() >= 0 and y.max() < ds.n_classes
        else:
            assert np.isfinite(y).all()


@FUZZ
@given(data_files(), st.booleans())
def test_crafted_data_files_load_or_raise_a_clear_error(case, standardize):
    name, blob, labels = case
    d = tempfile.mkdtemp(dir=_TMP)
    p = os.path.join(d, name)
    with open(p, "wb") as f:
        f.write(blob)
    if labels is not None:
        with open(os.path.join(d, "train-labels-idx1-ubyte"), "wb") as f:
            f.write(labels)
    with time_limit():
        try:
            ds = load_dataset(p, val_fraction=0.3, standardize=standardize)
        except (ValueError, TypeError) as exc:
            assert _DATA_MSG.match(str(exc)), f"{type(exc).__name__}: {exc}"
            event(f"{name.split('.', 1)[-1] if '.' in name else 'idx'}: {type(exc).__name__}")
            return
    _check_dataset(ds)
    event(f"{name.split('.', 1)[-1] if '.' in name else 'idx'}: loaded")


@FUZZ
@given(idx_files(), st.booleans())
def test_crafted_idx_files_read_or_raise_a_clear_error(blob, gz):
    p = os.path.join(_TMP, "x-idx1-ubyte" + (".gz" if gz else ""))
    with open(p, "wb") as f:
        f.write(gzip.compress(blob) if gz else blob)
    with time_limit():
        try:
            a = read_idx(p)
        except ValueError as exc:
            assert _DATA_MSG.match(str(exc)), str(exc)
            event("ValueError")
            return
    assert a.ndim >= 1 and a.dtype.isnative
    event("read")
