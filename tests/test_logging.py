"""Logging and progress: History.to_frame / row, the TensorBoard logger (with a stand-in
writer always, with a real event writer when one is installed), fit's progress bar and the
on_fit_start / on_fit_end callback hooks."""

from __future__ import annotations

import importlib.util
import os
import struct
import sys

import numpy as np
import pytest

import minigd as mg
from minigd.logging import TensorBoardLogger, make_summary_writer


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 4))
    y = (X[:, 0] > 0).astype(np.int64)
    return X, y


def train(data, **kw):
    X, y = data
    model = mg.MLP([4, 6, 2], dtype="float64", seed=0)
    kw = {"batch_size": 8, "epochs": 2, "validation": (X, y), **kw}
    return model, mg.fit(model, X, y, **kw)


class FakeWriter:
    def __init__(self):
        self.scalars = []
        self.flushed = self.closed = 0

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushed += 1

    def close(self):
        self.closed += 1


def test_tensorboard_logger_writes_loss_lr_batch_size_noise_and_evals(data):
    w = FakeWriter()
    with TensorBoardLogger(writer=w, every=2) as tb:
        _, hist = train(data, track_noise=3, eval_every=4, callbacks=[tb])
    assert w.flushed == 1 and w.closed == 1
    by_tag = {}
    for tag, v, s in w.scalars:
        by_tag.setdefault(tag, []).append((s, v))
    loss = hist.column("loss")
    assert by_tag["train/loss"] == [(s, loss[s]) for s in range(1, hist.n_steps, 2)]
    assert by_tag["train/lr"] == [(s, 0.1) for s in range(1, hist.n_steps, 2)]
    assert by_tag["train/batch_size"] == [(s, 8) for s in range(1, hist.n_steps, 2)]
    # the smoothed values as tracked (non-finite ones -- B_simple = inf while the smoothed
    # |G|^2 <= 0 -- are left out: TensorBoard cannot plot them)
    for field in ("noise_scale", "grad_norm_sq", "trace_cov"):
        want = [(r["step"], r[field]) for r in hist.noise if np.isfinite(r[field])]
        assert by_tag.get(f"noise/{field}", []) == want, field
    assert by_tag["noise/trace_cov"]
    assert [(s + 1, v) for s, v in by_tag["eval/val_loss"]] == [(e["step"], e["val_loss"]) for e in hist.evals]
    assert "eval/val_accuracy" in by_tag


def test_tensorboard_logger_without_a_writer_is_a_clear_import_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"needs a TensorBoard event writer .*pip install tensorboardX"):
        TensorBoardLogger(tmp_path)
    with pytest.raises(TypeError, match=r"^logdir: expected a directory path"):
        TensorBoardLogger(None)
    with pytest.raises(TypeError, match=r"^writer: expected an object with add_scalar"):
        TensorBoardLogger(writer=object())
    with pytest.raises(ValueError, match=r"^every: expected an integer >= 1"):
        TensorBoardLogger(writer=FakeWriter(), every=0)


def _have_writer():
    if importlib.util.find_spec("tensorboardX") is not None:
        return True
    try:
        import torch.utils.tensorboard  # noqa: F401

        return True
    except Exception:
        return False


def _read_events(path):
    """(tag, value, step) of every scalar in a TensorBoard event file: TFRecord framing
    (length, crc, data, crc) around serialized Event protobufs, decoded with the writer's
    own protobuf classes."""
    try:
        from tensorboardX.proto.event_pb2 import Event
    except ImportError:
        from tensorboard.compat.proto.event_pb2 import Event
    out = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (n,) = struct.unpack("<Q", header[:8])
            ev = Event.FromString(f.read(n))
            f.read(4)
            for v in ev.summary.value:
                val = v.simple_value if v.HasField("simple_value") else v.tensor.float_val[0]
                out.append((v.tag, val, ev.step))
    return out


@pytest.mark.skipif(not _have_writer(), reason="no TensorBoard writer installed (pip install tensorboardX)")
def test_tensorboard_logger_writes_real_event_files(data, tmp_path):
    with TensorBoardLogger(tmp_path / "run") as tb:
        _, hist = train(data, track_noise=2, callbacks=[tb])
    files = [f for f in os.listdir(tmp_path / "run") if "tfevents" in f]
    assert len(files) == 1
    ev = _read_events(tmp_path / "run" / files[0])
    losses = [(s, v) for t, v, s in ev if t == "train/loss"]
    assert [s for s, _ in losses] == list(range(hist.n_steps))
    np.testing.assert_allclose([v for _, v in losses], hist.column("loss"), rtol=1e-6)
    tags = {t for t, _, _ in ev}
    assert {"train/lr", "train/batch_size", "noise/noise_scale", "eval/val_loss"} <= tags


def test_make_summary_writer_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"minigd\[tensorboard\]"):
        make_summary_writer(tmp_path)


def test_history_to_frame(data, monkeypatch):
    _, hist = train(data, track_noise=2, eval_every=3)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"History.to_frame\(\) needs pandas.*pip install pandas"):
        hist.to_frame()
    monkeypatch.undo()
    pd = pytest.importorskip("pandas")
    df = hist.to_frame()
    assert isinstance(df, pd.DataFrame) and len(df) == hist.n_steps
    assert list(df.columns[:7]) == ["step", "epoch", "loss", "lr", "batch_size", "examples", "time"]
    assert np.array_equal(df["loss"].to_numpy(), hist.column("loss"))
    assert df["noise_scale"].notna().sum() == len(hist.noise)
    assert df["val_loss"].notna().sum() == len(hist.evals)


def test_history_row(data):
    _, hist = train(data)
    assert hist.row(-1) == {c: hist.column(c)[-1].item() for c in mg.history.STEP_COLUMNS}
    assert hist.row(0)["step"] == 0
    with pytest.raises(IndexError, match=r"^i: expected a step index"):
        hist.row(hist.n_steps)


def test_progress_bar_is_off_by_default_and_changes_nothing(data, capsys):
    pytest.importorskip("tqdm")
    m1, h1 = train(data)
    assert capsys.readouterr().err == ""
    m2, h2 = train(data, progress=True)
    err = capsys.readouterr().err
    assert "10/10" in err and "step" in err
    assert np.array_equal(m1.params, m2.params)
    assert np.array_equal(h1.column("loss"), h2.column("loss"))
    with pytest.raises(TypeError, match=r"^progress: expected a bool"):
        train(data, progress="yes")


def test_progress_without_tqdm_is_a_clear_import_error(data, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match=r"^progress: progress=True needs tqdm"):
        train(data, progress=True)


def test_fit_start_and_end_hooks_run_even_when_fit_raises(data):
    calls = []

    class Hooks:
        def on_fit_start(self, model, history):
            calls.append(("start", history.n_steps))

        def on_fit_end(self, model, history):
            calls.append(("end", history.n_steps))

        def on_step(self, model, step, loss):
            if step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(data, callbacks=[Hooks()])
    assert calls == [("start", 0), ("end", 3)]


def test_history_column_returns_merged_fields(data):
    """column() raised KeyError for the fields records merge in (val_loss, noise_scale)."""
    _, hist = train(data, eval_every=2, track_noise=1)
    recs = hist.records
    for name in ("val_loss", "val_accuracy", "noise_scale"):
        col = hist.column(name)
        assert col.dtype == np.float64 and len(col) == hist.n_steps
        want = [r.get(name, np.nan) for r in recs]
        assert np.array_equal(col, np.asarray(want, dtype=float), equal_nan=True), name
    # an evaluation with "step": k (steps done) is merged into records[k - 1] (0-based)
    for ev in hist.evals:
        assert hist.column("val_loss")[ev["step"] - 1] == ev["val_loss"]
        assert recs[ev["step"] - 1]["step"] == ev["step"] - 1
    with pytest.raises(KeyError, match=r"^\"name: expected one of \['step'.*'val_loss'.*got 'nosuch'"):
        hist.column("nosuch")


def test_history_to_csv_into_a_missing_folder_names_the_path(data, tmp_path):
    _, hist = train(data)
    target = tmp_path / "missing" / "h.csv"
    with pytest.raises(FileNotFoundError, match="h.csv") as exc:
        hist.to_csv(target)
    assert str(target) in str(exc.value) and ".tmp" not in str(exc.value)
    assert not (tmp_path / "missing").exists()
