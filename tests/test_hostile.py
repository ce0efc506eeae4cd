"""Hostile files and hostile values (issue 19): crafted checkpoints, special files, gzip
bombs, extreme finite inputs and nonsense arguments each get one clear minigd error --
never memory corruption, a hang, a MemoryError or a silent NaN."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import threading
import time
import zipfile

import numpy as np
import pytest

import minigd as mg
from minigd.checkpoint import load_checkpoint
from minigd.data import load_dataset, read_idx


# ============================================================================ crafted checkpoints
@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(29, 4))
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0.5)
    return X, y


def _model():
    return mg.MLP([4, 6, 3], dtype="float64", seed=0)


def _fit(data, path, sampler="shuffle", **kw):
    X, y = data
    kw.setdefault("steps", 7)
    return mg.fit(
        _model(),
        X,
        y,
        batch_size=4,
        sampler=sampler,
        optimizer=mg.SGD(lr=0.1, momentum=0.9),
        checkpoint=path,
        checkpoint_every=3,
        seed=1,
        **kw,
    )


def _rewrite(src, dst, *, meta=None, arrays=None):
    """Copy checkpoint ``src`` to ``dst``, editing meta.json with ``meta(dict)`` and
    replacing array entries (the table is updated so the file stays self-consistent:
    only the content is hostile)."""
    arrays = arrays or {}
    with zipfile.ZipFile(src) as zin:
        m = json.loads(zin.read("meta.json"))
        blobs = {i.filename: zin.read(i) for i in zin.infolist() if i.filename != "meta.json"}
    for k, a in arrays.items():
        a = np.ascontiguousarray(a)
        m["arrays"][k] = [list(a.shape), a.dtype.str]
        buf = io.BytesIO()
        np.lib.format.write_array(buf, a, allow_pickle=False)
        blobs[f"{k}.npy"] = buf.getvalue()
    if meta is not None:
        meta(m)
    with zipfile.ZipFile(dst, "w") as zout:
        zout.writestr("meta.json", json.dumps(m))
        for k, b in blobs.items():
            zout.writestr(k, b)
    return dst


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    out = {}
    for sampler in ("shuffle", "replacement"):
        p = d / f"{sampler}.npz"
        _fit(data, p, sampler=sampler)
        out[sampler] = str(p)
    return out


def _order(n, how):
    o = np.arange(n, dtype=np.int64)
    if how == "minus_one":
        o[5] = -1
    elif how == "zeros":
        o[:] = 0
    elif how == "too_big":
        o[3] = n + 10**9
    elif how == "short":
        o = o[:-1]
    elif how == "float":
        o = o.astype(np.float64)
    return o


@pytest.mark.parametrize(
    "how, match",
    [
        ("minus_one", r"not a permutation of range\(29\)"),
        ("zeros", r"not a permutation of range\(29\)"),
        ("too_big", r"not a permutation of range\(29\)"),
        ("short", r"saved permutation is array of shape \(28,\)"),
        ("float", r"saved permutation is array of shape \(29,\) and dtype float64"),
    ],
)
def test_a_crafted_sampler_order_is_refused_before_any_step(data, saved, tmp_path, how, match):
    bad = _rewrite(saved["shuffle"], tmp_path / "bad.npz", arrays={"sampler.order": _order(29, how)})
    X, y = data
    model = _model()
    before = model.params.copy()
    with pytest.raises(mg.CheckpointError, match=rf"^checkpoint '.*bad\.npz': cannot resume from it: .*{match}"):
        mg.fit(model, X, y, batch_size=4, steps=14, optimizer=mg.SGD(lr=0.1, momentum=0.9), resume=bad)
    assert np.array_equal(model.params, before)  # nothing ran


@pytest.mark.parametrize(
    "draws, match",
    [
        (lambda d: np.where(np.arange(d.size) == 2, -1, d), r"draws hold indices outside \[0, 29\)"),
        (lambda d: np.where(np.arange(d.size) == 2, 29, d), r"draws hold indices outside \[0, 29\)"),
        (lambda d: d[:-3], r"draws hold \d+ indices, an epoch of 8 steps of 4 needs 32"),
        (lambda d: d.astype(np.float64), r"draws of the current epoch are missing or malformed"),
    ],
)
def test_crafted_replacement_draws_are_refused(data, saved, tmp_path, draws, match):
    with np.load(saved["replacement"]) as z:
        d = z["sampler.draws"]
    bad = _rewrite(saved["replacement"], tmp_path / "bad.npz", arrays={"sampler.draws": draws(d)})
    X, y = data
    with pytest.raises(mg.CheckpointError, match=match):
        mg.fit(
            _model(),
            X,
            y,
            batch_size=4,
            steps=14,
            sampler="replacement",
            optimizer=mg.SGD(lr=0.1, momentum=0.9),
            resume=bad,
        )


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("k", -5, r"step_info\['k'\] is -5"),
        ("k", 9, r"position k=9 in an epoch of 8 steps"),
        ("step", -1, r"step_info\['step'\] is -1"),
        ("step", 10**30, r"step_info\['step'\]"),
        ("epoch", 5, r"epoch 5 / examples .* disagree|epoch 5 after only"),
        ("examples", 3, r"examples 3 disagree"),
        ("ep_count", -4, r"step_info\['ep_count'\] is -4"),
        ("t1", 0, r"step_info\['t1'\] is 0"),
        ("n_evals", 10**6, r"counts more evaluations"),
        ("lr", float("nan"), r"step_info\['lr'\] is nan"),
        ("ep_loss", "x", r"step_info\['ep_loss'\] is 'x'"),
        ("reached", [1, 2], r"step_info\['reached'\]"),
    ],
)
def test_crafted_counters_are_refused(data, saved, tmp_path, key, value, match):
    bad = _rewrite(saved["shuffle"], tmp_path / "bad.npz", meta=lambda m: m["step_info"].update({key: value}))
    X, y = data
    with pytest.raises(mg.CheckpointError, match=rf"^checkpoint '.*bad\.npz': cannot resume from it: .*{match}"):
        mg.fit(_model(), X, y, batch_size=4, steps=14, optimizer=mg.SGD(lr=0.1, momentum=0.9), resume=bad)


@pytest.mark.parametrize(
    "edit, arrays, match",
    [
        # sizes that would allocate before any check
        (lambda m: m["history"].update(capacity=10**12), None, None),  # capped: loads
        (lambda m: m["history"].update(capacity=2 * 10**9), None, None),
        (lambda m: m["history"].update(capacity=-1), None, r"history capacity -1"),
        (lambda m: m["history"].update(n_steps=10**12), None, r"history column 'step' has shape \(7,\)"),
        (lambda m: m["opt"]["primitives"][0].update(slots=10**9), None, r"primitive 0 \(trace\) has code"),
        (lambda m: m["opt"]["primitives"][0].update(hp=[5.0, 0.0]), None, r"invalid hyper-parameters"),
        (lambda m: m["opt"]["primitives"][0].update(name="os.system"), None, r"is not one minigd knows"),
        (lambda m: m["opt"].update(t=-3), None, r"optimizer update count 't' is -3"),
        (None, {"params": np.full(51, np.nan)}, r"params holds 51 NaN/inf entries"),
        (None, {"opt.state": np.full(51, np.inf)}, r"opt.state holds 51 NaN/inf"),
        (None, {"opt.hp": np.zeros((3, 8))}, r"opt.hp does not match"),
        (None, {"opt.soff": np.array([7, 0])}, r"opt.codes/opt.soff do not match"),
        (None, {"history.loss": np.full(7, np.nan)}, r"history column 'loss' holds NaN"),
        (lambda m: m["history"]["evals"].append({"step": "x"}), None, r"evaluation step 'x'"),
        (lambda m: m["history"]["epochs"].append([1, 2]), None, r"history epochs hold a malformed record"),
        (lambda m: m["history"].update(config=[]), None, r"history config is not a JSON object"),
        (lambda m: m.update(sampler="order"), None, r"sampler table"),
    ],
)
def test_crafted_tables_are_refused_without_allocating(saved, tmp_path, edit, arrays, match):
    bad = _rewrite(saved["shuffle"], tmp_path / "bad.npz", meta=edit, arrays=arrays)
    if match is None:
        ck = load_checkpoint(bad)
        assert ck.history.n_steps == 7 and len(ck.history._cols["step"]) <= 1 << 20
        return
    with pytest.raises(mg.CheckpointError, match=rf"^checkpoint '.*bad\.npz': corrupt.*{match}") as info:
        load_checkpoint(bad)
    assert isinstance(info.value, ValueError) and info.value.path.endswith("bad.npz")


def test_an_edited_checkpoint_object_is_checked_too(data, saved):
    X, y = data
    ck = load_checkpoint(saved["shuffle"])
    ck.sampler["order"] = ck.sampler["order"].copy()
    ck.sampler["order"][0] = -1
    with pytest.raises(mg.CheckpointError, match=r"not a permutation"):
        mg.fit(_model(), X, y, batch_size=4, steps=14, optimizer=mg.SGD(lr=0.1, momentum=0.9), resume=ck)
    ck = load_checkpoint(saved["shuffle"])
    ck.opt_state.state[:] = np.nan
    with pytest.raises(mg.CheckpointError, match=r"opt_state holds NaN/inf"):
        mg.fit(_model(), X, y, batch_size=4, steps=14, optimizer=mg.SGD(lr=0.1, momentum=0.9), resume=ck)


def test_an_untouched_checkpoint_still_resumes_bitwise(data, saved, tmp_path):
    X, y = data
    whole = _fit(data, tmp_path / "whole.npz", steps=14)
    copy = _rewrite(saved["shuffle"], tmp_path / "copy.npz")  # rewritten, not changed
    m = _model()
    part = mg.fit(m, X, y, batch_size=4, steps=14, optimizer=mg.SGD(lr=0.1, momentum=0.9), resume=copy)
    assert np.array_equal(part.column("loss"), whole.column("loss"))


# ============================================================================ special files
def _unblock_later(fifo, after=5.0):
    """If the code under test blocks on the FIFO, open its other end after ``after``
    seconds (so the test fails instead of hanging)."""

    def run():
        t_end = time.monotonic() + after + 20
        time.sleep(after)
        while time.monotonic() < t_end:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.05)
                continue
            os.close(fd)
            return

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_at_once_never_read(data, tmp_path):
    X, y = data
    ck = tmp_path / "ck.npz"
    os.mkfifo(ck)
    csv_fifo = tmp_path / "d.csv"
    os.mkfifo(csv_fifo)
    idx_fifo = tmp_path / "train-images-idx3-ubyte"
    os.mkfifo(idx_fifo)
    lab_images = tmp_path / "imgs-idx3-ubyte"
    lab_images.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 1, 5, 6]))
    calls = [
        (
            lambda: load_checkpoint(ck),
            mg.CheckpointError,
            r"^path: expected a regular file, got '.*ck\.npz' "
            r"which is a FIFO",
        ),
        (
            lambda: mg.fit(_model(), X, y, steps=1, batch_size=4, resume=ck),
            mg.CheckpointError,
            r"^resume: expected a regular file, .* FIFO",
        ),
        (
            lambda: mg.fit(_model(), X, y, steps=1, batch_size=4, checkpoint=ck, resume=True),
            mg.CheckpointError,
            r"^checkpoint: expected a regular file, .* FIFO",
        ),
        (lambda: load_dataset(csv_fifo), ValueError, r"^name_or_path: expected a regular file, .* FIFO"),
        (lambda: read_idx(idx_fifo), ValueError, r"^path: expected a regular file, .* FIFO"),
        (lambda: load_dataset(lab_images, labels=ck), ValueError, r"^labels: expected a regular file, .* FIFO"),
    ]
    for fifo in (ck, csv_fifo, idx_fifo):
        _unblock_later(str(fifo))
    for call, exc, match in calls:
        t0 = time.monotonic()
        with pytest.raises(exc, match=match):
            call()
        assert time.monotonic() - t0 < 4.0


def test_dev_zero_and_directories_are_refused(tmp_path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero here")
    with pytest.raises(
        mg.CheckpointError,
        match=r"^path: expected a regular file, got '/dev/zero' which is a "
        r"character device",
    ):
        load_checkpoint("/dev/zero")
    link = tmp_path / "zeros.csv"
    os.symlink("/dev/zero", link)
    with pytest.raises(ValueError, match=r"^name_or_path: expected a regular file, .* character device"):
        load_dataset(link)
    with pytest.raises(ValueError, match=r"^path: expected a regular file, .* character device"):
        read_idx("/dev/zero")
    ck_link = tmp_path / "ck.npz"
    os.symlink("/dev/zero", ck_link)
    with pytest.raises(mg.CheckpointError, match=r"^checkpoint: expected a regular file"):
        mg.fit(_model(), np.zeros((4, 4)), np.zeros(4, np.int64), steps=1, batch_size=2, checkpoint=ck_link)


def _gzip_bomb(mib):
    """``mib`` MiB of zeros as concatenated gzip members of 1 MiB each (about 1 KiB each)."""
    return gzip.compress(b"\0" * (1 << 20), compresslevel=9) * mib


def test_a_gzip_bomb_is_refused_without_expanding_it(tmp_path, monkeypatch):
    from minigd.data import files

    bomb = _gzip_bomb(100)  # ~100 KiB -> 100 MiB: > 256 x its size and > 64 MiB
    assert len(bomb) < 200_000
    for name in ("x.csv.gz", "train-images-idx3-ubyte.gz"):
        p = tmp_path / name
        p.write_bytes(bomb)
        with pytest.raises(
            ValueError,
            match=r"expected a gzip file that decompresses to at most \d+ bytes .* "
            r"decompression bomb",
        ):
            load_dataset(p) if name.endswith("csv.gz") else read_idx(p)
    # the absolute cap holds whatever the ratio
    monkeypatch.setattr(files, "MAX_DATA_BYTES", 1 << 20)
    p = tmp_path / "y.csv.gz"
    p.write_bytes(gzip.compress(os.urandom(2 << 20)))
    with pytest.raises(ValueError, match=r"at most 1048576 bytes"):
        load_dataset(p)


def test_a_deflated_npz_bomb_is_refused(tmp_path):
    p = tmp_path / "bomb.npz"
    np.savez_compressed(p, X=np.zeros((100 << 20) // 8), y=np.zeros(3))
    assert p.stat().st_size < 1 << 20
    with pytest.raises(
        ValueError,
        match=r"^name_or_path \('.*bomb\.npz'\): expected a \.npz whose entries hold "
        r"at most",
    ):
        load_dataset(p)
    # and a header claiming far more elements than its entry holds is refused, not allocated
    q = tmp_path / "liar.npz"
    np.savez(q, X=np.zeros((4, 2)), y=np.zeros(4))
    with zipfile.ZipFile(q) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    entries["X.npy"] = entries["X.npy"].replace(b"(4, 2)", b"(10000000000000, 2)")
    with zipfile.ZipFile(q, "w") as z:
        for k, v in entries.items():
            z.writestr(k, v)
    with pytest.raises(ValueError, match=r"header claiming shape \(10000000000000, 2\)"):
        load_dataset(q)


def test_crafted_bool_labels_in_an_npz_are_read_as_bools(tmp_path):
    """A bool entry whose bytes are 1 and 2 (both True) was one class to np.unique but two
    to np.searchsorted: labels out of range (found by the fuzz suite)."""
    p = tmp_path / "b.npz"
    np.savez(p, X=np.zeros((4, 2)), y=np.array([1, 2, 1, 2], np.uint8).view(np.bool_))
    ds = load_dataset(p, val_fraction=0.5)
    assert ds.n_classes == 1 and (ds.y_train == 0).all() and (ds.y_val == 0).all()


def test_huge_values_in_a_data_file_never_become_inf_or_nan(tmp_path):
    p = tmp_path / "big.csv"
    p.write_text("a,b,label\n1.7e308,1,0\n-1.7e308,2,1\n1e308,3,0\n-1e308,4,1\n5,5,0\n")
    ds = load_dataset(p, val_fraction=0.4, dtype="float32")  # standardized: fits float32
    assert np.isfinite(ds.X_train).all() and np.isfinite(ds.X_val).all()
    with pytest.raises(
        ValueError,
        match=r"^X: expected values that fit float32 .* standardize=True or "
        r"dtype='float64'",
    ):
        load_dataset(p, val_fraction=0.4, standardize=False, dtype="float32")


# ============================================================================ extreme finite inputs
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NumPy reference's own overflow warnings
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("dtype, big", [("float32", 3.4e38), ("float64", 1.7e308)])
def test_extreme_finite_inputs_are_refused_not_nan(backend, dtype, big):
    m = mg.MLP([4, 8, 3], dtype=dtype, backend=backend, seed=0)
    X = np.full((6, 4), big, dtype)
    X[::2] *= -1
    y = np.array([0, 1, 2, 0, 1, 2])
    # evaluation: the overflow is detected (values that do not overflow are evaluated as usual)
    for call in (
        lambda: m.forward(X),
        lambda: m.predict(X),
        lambda: m.predict_proba(X),
        lambda: m.loss(X, y),
        lambda: m.evaluate(X, y),
        lambda: m.loss_and_grad(X, y),
    ):
        with pytest.raises(ValueError, match=rf"^X: the forward pass overflowed {dtype} .* inputs up to "):
            call()
    # training: refused up front, against the dtype's bound
    with pytest.raises(ValueError, match=r"^X: expected entries of magnitude at most .*square root of "):
        mg.fit(m, X, y, batch_size=3, steps=2)
    Xv = np.zeros((2, 4), dtype)
    Xv[0, 0] = -big
    with pytest.raises(ValueError, match=r"^validation X: expected entries of magnitude"):
        mg.fit(m, np.zeros((6, 4), dtype), y, batch_size=3, steps=2, validation=(Xv, y[:2]))
    mse = mg.MLP([4, 2], loss="mse", dtype=dtype, backend=backend)
    with pytest.raises(ValueError, match=r"^y: expected entries of magnitude"):
        mg.fit(mse, np.zeros((6, 4), dtype), np.full((6, 2), big, dtype), batch_size=3, steps=2)
    try:  # the NumPy reference sums float32 losses in float64, where this one fits
        assert np.isfinite(mse.loss(np.zeros((6, 4), dtype), np.full((6, 2), big, dtype)))
    except ValueError as exc:
        assert re.match(r"^X: the forward pass overflowed .* \(the losses are inf/NaN\)", str(exc)), exc


def test_large_inputs_that_do_not_overflow_are_still_evaluated():
    m = mg.MLP([4, 8, 3], dtype="float64", seed=0)
    X = np.random.default_rng(0).normal(size=(5, 4)) * 1e300  # outputs ~1e300: they fit float64
    assert m.predict(X).shape == (5,) and np.isfinite(m.forward(X)).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NumPy reference's own overflow warnings
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_an_overflowing_forward_pass_is_an_error_naming_X(backend):
    m = mg.MLP([4, 8, 3], activation="relu", dtype="float32", backend=backend, seed=0)
    m.params[...] = np.abs(m.params) * 1e18  # finite, but X (1e10) times these overflow float32
    X = np.full((5, 4), 1e10, np.float32)
    y = np.zeros(5, np.int64)
    for call in (
        lambda: m.forward(X),
        lambda: m.predict(X),
        lambda: m.predict_proba(X),
        lambda: m.loss(X, y),
        lambda: m.evaluate(X, y),
        lambda: m.loss_and_grad(X, y),
    ):
        with pytest.raises(ValueError, match=r"^X: the forward pass overflowed float32 .* inputs up to 1e\+10"):
            call()
    with pytest.raises(
        mg.DivergenceError,
        match=r"first batch, before any update.* The data are the cause, "
        r"not the learning rate",
    ) as info:
        mg.fit(m, X, y, batch_size=5, steps=3)
    assert info.value.cause == "data" and info.value.step == 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_an_evaluation_that_overflows_in_fit_is_a_divergence_error(data, saved, tmp_path):
    """Finite but huge parameters (here from a checkpoint) overflow the validation pass:
    fit says so as a DivergenceError, not as a ValueError blaming X."""
    with np.load(saved["shuffle"]) as z:
        params = z["params"] * 1e300
    bad = _rewrite(saved["shuffle"], tmp_path / "huge.npz", arrays={"params": params})
    X, y = data
    with pytest.raises(mg.DivergenceError, match=r"an evaluation overflowed") as info:
        mg.fit(
            _model(), X, y, batch_size=4, steps=7, optimizer=mg.SGD(lr=0.1, momentum=0.9), resume=bad, validation=(X, y)
        )
    assert info.value.cause == "learning_rate" and np.isfinite(info.value.params).all()


def test_a_late_divergence_blames_the_learning_rate():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 4)).astype(np.float32)
    y = rng.normal(size=(40, 1)).astype(np.float32)
    with pytest.raises(mg.DivergenceError, match=r"smaller learning rate") as info:
        mg.fit(mg.MLP([4, 16, 1], loss="mse", seed=0), X, y, batch_size=8, epochs=50, optimizer=mg.SGD(lr=50.0))
    assert info.value.cause == "learning_rate" and info.value.step > 0


def _true_norms(model, X, y):
    """Reference per-example gradient norms: the explicit gradients on the NumPy reference,
    normed in float64 with scaling (no overflow)."""
    G = np.abs(mg.per_example_grads(model.to("numpy"), X, y).astype(np.float64))
    s = G.max(axis=1)
    return s * np.sqrt(((G / np.where(s > 0, s, 1)[:, None]) ** 2).sum(axis=1))


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize(
    "dtype, big, sizes, act, rtol",
    [
        ("float32", 1e10, [10, 64, 3], "relu", 1e-4),
        ("float32", 1e10, [10, 64, 3], "mse", 1e-4),  # deltas ~ outputs ~ 1e10: norms ~1e20, squares 1e40
        ("float32", 1e10, [10, 3], "mse", 1e-4),
        ("float32", 1e18, [10, 64, 64, 3], "tanh", 1e-4),
        ("float32", 1e18, [10, 64, 64, 3], "relu", 1e-4),
        ("float64", 1e154, [10, 8, 3], "relu", 1e-12),
        ("float64", 1.3e154, [30, 50, 50, 3], "tanh", 1e-12),
    ],
)
def test_per_example_grad_norms_do_not_overflow_where_the_norms_fit(backend, dtype, big, sizes, act, rtol):
    if act == "mse":
        m = mg.MLP(sizes, loss="mse", dtype=dtype, backend=backend, seed=0)
    else:
        m = mg.MLP(sizes, activation=act, dtype=dtype, backend=backend, seed=0)
    rng = np.random.default_rng(1)
    X = (np.sign(rng.normal(size=(9, sizes[0]))) * big).astype(dtype)
    y = rng.integers(0, 3, 9) if act != "mse" else rng.normal(size=(9, 3)).astype(dtype)
    got = mg.per_example_grad_norms(m, X, y)
    want = _true_norms(m, X, y)
    assert np.isfinite(got).all() and got.dtype == np.dtype(dtype)
    big_rows = want > 1e-3 * want.max()  # (the rest is float32 rounding noise of a saturated softmax)
    np.testing.assert_allclose(got[big_rows], want[big_rows], rtol=rtol)
    if want.max() > np.sqrt(np.finfo(dtype).max):  # squares that do not fit: an error naming X, not inf
        with pytest.raises(ValueError, match=rf"^X: the per-example gradient squared norm .* beyond {dtype}"):
            mg.per_example_grad_norms(m, X, y, squared=True)
    else:
        sq = mg.per_example_grad_norms(m, X, y, squared=True)
        np.testing.assert_allclose(sq[big_rows], want[big_rows] ** 2, rtol=3 * rtol)


def test_per_example_grad_norms_backends_agree_on_extreme_inputs():
    X = np.sign(np.random.default_rng(2).normal(size=(6, 5))) * 1e154
    y = np.array([0, 1, 2, 0, 1, 2])
    a, b = (
        mg.per_example_grad_norms(mg.MLP([5, 7, 3], dtype="float64", backend=be, seed=0), X, y)
        for be in ("numpy", "cpu")
    )
    assert np.isfinite(a).all() and np.isfinite(b).all()
    np.testing.assert_allclose(a, b, rtol=1e-12)


# ============================================================================ accepted nonsense
def _xy():
    rng = np.random.default_rng(0)
    return rng.normal(size=(20, 4)).astype(np.float32), rng.integers(0, 3, 20)


@pytest.mark.parametrize(
    "lr, exc, match",
    [
        (
            lambda s: 0.1 - 0.05 * s,
            ValueError,
            r"^lr: expected a finite, non-negative learning rate, got -0\.05.* at "
            r"step 3 \(a negative rate is gradient ascent\)",
        ),
        (
            lambda s: 0.1 if s < 2 else float("nan"),
            ValueError,
            r"^lr: expected a finite, non-negative .* got nan at step 2",
        ),
        (lambda s: 0.1 if s < 2 else float("inf"), ValueError, r"^lr: .* got inf at step 2"),
        (
            lambda s: "0.1",
            TypeError,
            r"^lr: expected the learning rate \(schedule\) to give a real number, got str "
            r"'0\.1' at step 0",
        ),
        (lambda s: 0.1 if s < 1 else None, TypeError, r"^lr: .* got NoneType None at step 1"),
        (lambda s: True, TypeError, r"^lr: .* got bool True"),
        (lambda s: 1 / 0 if s == 2 else 0.1, ZeroDivisionError, r"division by zero"),  # the schedule's own error
    ],
)
def test_a_bad_learning_rate_schedule_is_refused_naming_lr(lr, exc, match):
    X, y = _xy()
    with pytest.raises(exc, match=match):
        mg.fit(mg.MLP([4, 3]), X, y, batch_size=4, steps=5, optimizer=mg.SGD(lr=lr))


def test_a_negative_learning_rate_is_refused():
    with pytest.raises(ValueError, match=r"^lr: expected a number >= 0, got -0\.1"):
        mg.SGD(lr=-0.1)
    X, y = _xy()
    from minigd.optim.base import Optimizer

    bad = Optimizer(mg.SGD(lr=0.1).primitives, lr=-1.0)  # built around the checks
    with pytest.raises(ValueError, match=r"^lr: expected a finite, non-negative learning rate, got -1\.0 at step 0"):
        mg.fit(mg.MLP([4, 3]), X, y, batch_size=4, steps=2, optimizer=bad)


@pytest.mark.parametrize("value", ["yes", "no", 1, 0, None, [True]])
def test_eval_train_must_be_a_bool(value):
    X, y = _xy()
    with pytest.raises(TypeError, match=rf"^eval_train: expected a bool, got {type(value).__name__}"):
        mg.fit(mg.MLP([4, 3]), X, y, batch_size=4, steps=2, eval_train=value)


@pytest.mark.parametrize(
    "target, match",
    [
        ({"val_accuracy": 2.0}, r"^target\['val_accuracy'\]: expected an accuracy in \[0, 1\].* got 2\.0"),
        ({"train_accuracy": -0.1}, r"^target\['train_accuracy'\]: expected an accuracy in \[0, 1\]"),
        ({"val_loss": -1.0}, r"^target\['val_loss'\]: expected a loss >= 0"),
        ({"train_loss": -1e-9}, r"^target\['train_loss'\]: expected a loss >= 0"),
    ],
)
def test_an_unreachable_target_is_refused(target, match):
    X, y = _xy()
    with pytest.raises(ValueError, match=match):
        mg.fit(mg.MLP([4, 3]), X, y, batch_size=4, steps=2, validation=(X, y), target=target)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: mg.BatchSizeSchedule(2, 5),
            r"^milestones: expected a dict \{epoch: batch_size\} or a sequence of "
            r"\(epoch, batch_size\) pairs, got int 5",
        ),
        (lambda: mg.BatchSizeSchedule(2, "10:64"), r"^milestones: expected a dict .* got str '10:64'"),
        (
            lambda: mg.BatchSizeSchedule(2, [(1, 2, 3)]),
            r"^milestones\[0\]: expected an \(epoch, batch_size\) pair, "
            r"got tuple \(1, 2, 3\)",
        ),
        (
            lambda: mg.optim.schedules.step_decay(0.1, 5),
            r"^boundaries: expected a sequence of step numbers .* got int 5",
        ),
        (lambda: mg.optim.schedules.step_decay(0.1, "100"), r"^boundaries: expected a sequence .* got str '100'"),
    ],
)
def test_schedules_name_the_argument_of_the_wrong_type(call, match):
    with pytest.raises(TypeError, match=match):
        call()


@pytest.mark.parametrize("sizes", [[10, 10**12, 10], [10**7, 10**7, 10**7]])
def test_absurd_widths_are_a_value_error_naming_sizes(sizes):
    t0 = time.monotonic()
    with pytest.raises(
        ValueError,
        match=r"^sizes: \[.*\] make a model of [\d,]+ parameters, which need [\d,.]+ GiB "
        r".* more than this machine's",
    ):
        mg.MLP(sizes)
    assert time.monotonic() - t0 < 2.0


def test_a_batch_too_large_for_memory_is_a_value_error_naming_sizes():
    m = mg.MLP([4, 10**7, 2])  # 60 M parameters: fine; 2048 rows of it: not
    with pytest.raises(ValueError, match=r"^sizes: a batch of 2048 rows through layers \[4, 10000000, 2\] needs"):
        m.forward(np.zeros((5000, 4), np.float32))
