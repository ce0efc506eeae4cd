"""Checkpoints: one atomic file, a clear error for anything unreadable, and resuming a fit
gives bitwise the run that was never interrupted."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest

import minigd as mg
from minigd.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint

COLUMNS = ("step", "epoch", "loss", "lr", "batch_size", "examples")  # "time" is wall time
SAMPLERS = ("shuffle", "replacement", "sequential")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(37, 5))
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1)
    return X, y


def _strip(recs):
    return [{k: v for k, v in r.items() if k != "time"} for r in recs]


def assert_same_run(a, b):
    (ma, ha), (mb, hb) = a, b
    assert np.array_equal(ma.params, mb.params)
    for c in COLUMNS:
        assert np.array_equal(ha.column(c), hb.column(c)), c
    assert _strip(ha.evals) == _strip(hb.evals)
    assert _strip(ha.epochs) == _strip(hb.epochs)
    assert ha.noise == hb.noise
    assert (ha.reached, ha.steps_to_target, ha.examples_to_target, ha.stop_reason) == (
        hb.reached,
        hb.steps_to_target,
        hb.examples_to_target,
        hb.stop_reason,
    )
    assert ha.opt_state.t == hb.opt_state.t
    assert np.array_equal(ha.opt_state.state, hb.opt_state.state)


class Crash(Exception):
    pass


class CrashAt:
    """Simulates a crash: raises out of fit after ``step`` steps."""

    def __init__(self, step):
        self.step = step

    def on_step(self, model, step, loss):
        if step == self.step:
            raise Crash


def run(
    data,
    *,
    dtype="float64",
    sampler="shuffle",
    optimizer=None,
    batch_size=6,
    epochs=4,
    backend="cpu",
    eval_every=4,
    **kw,
):
    X, y = data
    model = mg.MLP([5, 7, 3], activation="tanh", dtype=dtype, seed=0, backend=backend)
    hist = mg.fit(
        model,
        X.astype(dtype),
        y,
        batch_size=batch_size,
        epochs=epochs,
        sampler=sampler,
        optimizer=optimizer or mg.Adam(lr=0.01),
        validation=(X[:9].astype(dtype), y[:9]),
        eval_every=eval_every,
        seed=3,
        **kw,
    )
    return model, hist


# ============================================================================ resume == uninterrupted
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("every", [1, 5])
def test_resume_after_a_crash_is_bitwise_the_uninterrupted_run(data, tmp_path, sampler, every):
    """Crash at step 11 (checkpoints every `every` steps), resume: identical parameters,
    optimizer state, step columns, evaluations, epoch records and noise records."""
    kw = dict(sampler=sampler, track_noise=2, track_gsnr=4)
    ref = run(data, **kw)
    path = tmp_path / "ck.npz"
    with pytest.raises(Crash):
        run(data, checkpoint=path, checkpoint_every=every, callbacks=[CrashAt(11)], **kw)
    ck = load_checkpoint(path)
    assert ck.step_info["step"] == 10 and not ck.step_info["finished"]  # the crash hit step 11
    assert_same_run(ref, run(data, checkpoint=path, resume=True, **kw))
    # the final checkpoint resumed with the same budgets reproduces the same history
    ck = load_checkpoint(path)
    assert ck.step_info["finished"] and ck.step_info["stop_reason"] == "epochs"
    assert_same_run(ref, run(data, resume=path, **kw))


@pytest.mark.parametrize(
    "case", ["float32-sgd-momentum", "batch-schedule-drop-last", "full-batch", "replacement-b1", "target"]
)
def test_resume_other_configurations(data, tmp_path, case):
    kw = {}
    if case == "float32-sgd-momentum":
        kw = dict(dtype="float32", optimizer=mg.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3))
    elif case == "batch-schedule-drop-last":
        kw = dict(batch_size=mg.BatchSizeSchedule(4, {2: 8}), drop_last=True)
    elif case == "full-batch":
        kw = dict(batch_size="full", optimizer=mg.SGD(lr=mg.optim.cosine(0.5, 20)), epochs=20)
    elif case == "replacement-b1":
        kw = dict(batch_size=1, sampler="replacement", epochs=2)
    elif case == "target":
        kw = dict(target={"val_accuracy": 0.6}, epochs=30, eval_every=None)
    ref = run(data, **kw)
    if case == "target":
        assert ref[1].reached
    path = tmp_path / "ck.npz"
    with pytest.raises(Crash):
        run(data, checkpoint=path, checkpoint_every=3, callbacks=[CrashAt(7)], **kw)
    assert_same_run(ref, run(data, resume=path, checkpoint=path, **kw))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_finished_run_continues_under_a_larger_budget(data, tmp_path, sampler):
    """The final checkpoint holds the state after the last step: resumed with a larger
    budget it continues as if the first call had been given that budget."""
    ref = run(data, sampler=sampler, epochs=4, track_noise=3)
    for first in (dict(steps=9), dict(epochs=2), dict(examples=50)):
        path = tmp_path / f"ck-{sorted(first)[0]}.npz"
        run(data, sampler=sampler, checkpoint=path, track_noise=3, **{"epochs": None, **first})
        assert_same_run(ref, run(data, sampler=sampler, epochs=4, track_noise=3, resume=path))


def test_resume_true_without_a_file_starts_fresh_and_writes_one(data, tmp_path):
    path = tmp_path / "ck.npz"
    ref = run(data)
    assert_same_run(ref, run(data, checkpoint=path, resume=True))
    assert load_checkpoint(path).step_info["finished"]


def test_resume_from_a_loaded_checkpoint_object_and_on_another_backend(data, tmp_path):
    path = tmp_path / "ck.npz"
    with pytest.raises(Crash):
        run(data, backend="numpy", checkpoint=path, checkpoint_every=2, callbacks=[CrashAt(5)])
    assert_same_run(run(data, backend="numpy"), run(data, backend="numpy", resume=load_checkpoint(path)))
    ck = load_checkpoint(path, backend="numpy")
    assert ck.model.backend == "numpy"


def test_opt_state_continues_across_fit_calls(data):
    """Full-batch Adam in two calls (the second continuing hist.opt_state) is bitwise one
    call: the update count t continues, so Adam's bias correction does."""
    X, y = data
    one = mg.MLP([5, 7, 3], dtype="float64", seed=0)
    h1 = mg.fit(one, X, y, batch_size="full", steps=10, optimizer=mg.Adam(lr=0.01))
    two = mg.MLP([5, 7, 3], dtype="float64", seed=0)
    ha = mg.fit(two, X, y, batch_size="full", steps=4, optimizer=mg.Adam(lr=0.01))
    hb = mg.fit(two, X, y, batch_size="full", steps=6, optimizer=mg.Adam(lr=0.01), opt_state=ha.opt_state)
    assert hb.opt_state is ha.opt_state and hb.opt_state.t == 10
    assert np.array_equal(one.params, two.params)
    assert np.array_equal(h1.column("loss")[4:], hb.column("loss"))
    with pytest.raises(ValueError, match=r"^opt_state: was made for another optimizer chain"):
        mg.fit(two, X, y, steps=1, optimizer=mg.SGD(lr=0.1), opt_state=ha.opt_state)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(batch_size=5), r"batch_size=6 there, 5 here"),
        (dict(sampler="sequential"), r"sampler='shuffle' there, 'sequential' here"),
        (dict(optimizer=mg.Adam(lr=0.01, betas=(0.8, 0.999))), r"another optimizer chain"),
        (dict(track_noise=2), r"track_noise=None there, 2 here"),
        (dict(data="other"), r"the training data differ"),
        (dict(dtype="float32"), r"dtype='float64', this model has dtype='float32'"),
    ],
)
def test_resume_refuses_a_different_run(data, tmp_path, change, match):
    path = tmp_path / "ck.npz"
    run(data, steps=5, epochs=None, checkpoint=path)
    change = dict(change)
    if change.pop("data", None):
        X, y = data
        data = (X + 1.0, y)
    with pytest.raises(ValueError, match=r"^resume: .*" + match):
        run(data, resume=path, **change)


@pytest.mark.parametrize(
    "first, then, match",
    [
        (mg.SGD(lr=0.1, momentum=0.9), mg.SGD(lr=0.5, momentum=0.9), r"lr: saved 0\.1, given 0\.5"),
        (mg.Adam(lr=0.01), mg.Adam(lr=0.1), r"lr: saved 0\.01, given 0\.1"),
        (mg.SGD(lr=0.1), mg.SGD(lr=mg.optim.cosine(0.1, 10)), r"lr: saved 0\.1, given Cosine\(lr=0\.1, total_steps=10"),
        (
            mg.SGD(lr=mg.optim.cosine(0.1, 10)),
            mg.SGD(lr=mg.optim.cosine(0.1, 20)),
            r"lr: saved Cosine\(lr=0\.1, total_steps=10, .*given Cosine\(lr=0\.1, total_steps=20",
        ),
        (mg.SGD(lr=0.1, momentum=0.9), mg.SGD(lr=0.1, momentum=0.5), r"momentum: saved 0\.9, given 0\.5"),
        (
            mg.Adam(lr=0.01),
            mg.Adam(lr=0.01, betas=(0.8, 0.999)),
            r"betas: saved \[0\.9, 0\.999\], given \[0\.8, 0\.999\]",
        ),
        (
            mg.SGD(lr=0.1, weight_decay=1e-3),
            mg.SGD(lr=0.1, weight_decay=1e-2),
            r"weight_decay: saved 0\.001, given 0\.01",
        ),
        (mg.SGD(lr=0.1), mg.Adam(lr=0.1), r"optimizer: saved SGD, given Adam"),
        (
            mg.optim.chain(mg.optim.trace(0.9), mg.optim.scale_by_lr(), lr=0.1),
            mg.optim.chain(mg.optim.trace(0.8), mg.optim.scale_by_lr(), lr=0.1),
            r"trace momentum: saved 0\.9, given 0\.8",
        ),
    ],
    ids=[
        "sgd-lr",
        "adam-lr",
        "lr-to-schedule",
        "schedule",
        "momentum",
        "betas",
        "weight-decay",
        "sgd-to-adam",
        "chain",
    ],
)
def test_resume_refuses_other_hyper_parameters_and_names_them(data, tmp_path, first, then, match):
    """A resumed run must use the saved optimizer: a different constant learning rate (or
    minigd schedule, or any hyper-parameter) is a ValueError that names it, with the saved
    and the given value -- not a history that silently mixes two runs."""
    path = tmp_path / "ck.npz"
    run(data, steps=5, epochs=None, checkpoint=path, optimizer=first)
    with pytest.raises(ValueError, match=r"^resume: .*another optimizer chain or hyper-parameters: " + match):
        run(data, steps=10, epochs=None, resume=path, optimizer=then)
    run(data, steps=10, epochs=None, resume=path, optimizer=first)  # the same one resumes


def test_resume_takes_the_same_optimizer_under_another_name(data, tmp_path):
    """SGD(lr, momentum) is the chain trace(momentum) -> scale_by_lr: a checkpoint written
    with one resumes with the other (the chain is what runs); bitwise the same run."""
    path = tmp_path / "ck.npz"
    run(
        data,
        steps=5,
        epochs=None,
        checkpoint=path,
        optimizer=mg.optim.chain(mg.optim.trace(0.9), mg.optim.scale_by_lr(), lr=0.1),
    )
    m, h = run(data, steps=10, epochs=None, resume=path, optimizer=mg.SGD(lr=0.1, momentum=0.9))
    m_ref, h_ref = run(data, steps=10, epochs=None, optimizer=mg.SGD(lr=0.1, momentum=0.9))
    np.testing.assert_array_equal(h.column("loss"), h_ref.column("loss"))
    np.testing.assert_array_equal(m.params, m_ref.params)


def test_another_learning_rate_goes_on_from_a_checkpoint_as_the_error_says(data, tmp_path):
    """The lr error says how to go on deliberately with another learning rate: a new run
    from the checkpoint's model and optimizer state."""
    X, y = data
    path = tmp_path / "ck.npz"
    run(data, steps=5, epochs=None, checkpoint=path, optimizer=mg.SGD(lr=0.1, momentum=0.9))
    with pytest.raises(ValueError, match=r"opt_state=load_checkpoint\(path\)\.opt_state"):
        run(data, steps=10, epochs=None, resume=path, optimizer=mg.SGD(lr=0.05, momentum=0.9))
    ck = load_checkpoint(path)
    h = mg.fit(ck.model, X, y, steps=3, epochs=None, optimizer=mg.SGD(lr=0.05, momentum=0.9), opt_state=ck.opt_state)
    assert h.n_steps == 3 and np.all(np.isfinite(h.column("loss")))


def test_resume_takes_a_schedule_written_as_code_as_given(data, tmp_path):
    """A learning rate given as the user's own function cannot be compared: it is taken as
    given (documented); the rest of the optimizer is still checked."""
    path = tmp_path / "ck.npz"
    run(data, steps=5, epochs=None, checkpoint=path, optimizer=mg.SGD(lr=lambda s: 0.1, momentum=0.9))
    run(data, steps=10, epochs=None, resume=path, optimizer=mg.SGD(lr=lambda s: 0.1, momentum=0.9))
    with pytest.raises(ValueError, match=r"momentum: saved 0\.9, given 0\.5"):
        run(data, steps=10, epochs=None, resume=path, optimizer=mg.SGD(lr=lambda s: 0.1, momentum=0.5))


def test_resume_of_a_checkpoint_without_an_optimizer_record_checks_the_chain(data, tmp_path):
    """Checkpoints written before the optimizer record: the chain's hyper-parameters are
    still compared, by primitive."""
    path = tmp_path / "ck.npz"
    run(data, steps=5, epochs=None, checkpoint=path, optimizer=mg.SGD(lr=0.1, momentum=0.9))
    ck = load_checkpoint(path)
    del ck.step_info["fit"]["optimizer"]
    with pytest.raises(ValueError, match=r"trace momentum: saved 0\.9, given 0\.5"):
        run(data, steps=10, epochs=None, resume=ck, optimizer=mg.SGD(lr=0.1, momentum=0.5))


def test_checkpointing_arguments_are_checked(data, tmp_path):
    X, y = data
    m = mg.MLP([5, 3], dtype="float64")
    with pytest.raises(ValueError, match=r"^checkpoint_every: needs checkpoint"):
        mg.fit(m, X, y, checkpoint_every=3)
    with pytest.raises(ValueError, match=r"^resume: resume=True continues from checkpoint"):
        mg.fit(m, X, y, resume=True)
    with pytest.raises(FileNotFoundError, match=r"^resume: no checkpoint file"):
        mg.fit(m, X, y, resume=tmp_path / "nope.npz")
    with pytest.raises(TypeError, match=r"^resume: expected True, a checkpoint file path"):
        mg.fit(m, X, y, resume=3)
    with pytest.raises(ValueError, match=r"^checkpoint: the directory .* does not exist"):
        mg.fit(m, X, y, checkpoint=tmp_path / "no" / "ck.npz")
    with pytest.raises(ValueError, match=r"^checkpoint: .* is a directory"):
        mg.fit(m, X, y, checkpoint=tmp_path)
    with pytest.raises(TypeError, match=r"^checkpoint: expected a file path"):
        mg.fit(m, X, y, checkpoint=123)
    with pytest.raises(ValueError, match=r"^checkpoint_every: expected an integer >= 1"):
        mg.fit(m, X, y, checkpoint=tmp_path / "ck.npz", checkpoint_every=0)
    plain = tmp_path / "plain.npz"
    save_checkpoint(plain, m)
    with pytest.raises(ValueError, match=r"^resume: .* was not written by fit"):
        mg.fit(m, X, y, resume=plain)
    st = mg.SGD(lr=0.1).init(m.params)
    with pytest.raises(ValueError, match=r"^opt_state: resume restores the optimizer state"):
        mg.fit(m, X, y, resume=plain, opt_state=st)


# ============================================================================ the file
def _full_checkpoint(tmp_path, data):
    X, y = data
    model = mg.MLP([5, 7, 3], dtype="float64", seed=0)
    hist = mg.fit(
        model,
        X,
        y,
        batch_size=8,
        epochs=2,
        optimizer=mg.SGD(lr=0.1, momentum=0.9),
        validation=(X, y),
        track_noise=2,
        target={"val_loss": 0.01},
    )
    rng = np.random.default_rng(7)
    rng.random(3)
    path = tmp_path / "full.npz"
    info = {
        "step": np.int64(12),
        "lr": np.float32(0.5),
        "note": "hi",
        "arr": np.arange(3),
        "nested": {"a": [1, 2.5, None], "nan": float("nan")},
    }
    out = save_checkpoint(
        path, model, hist.opt_state, rng=rng, sampler={"order": np.arange(5)}, history=hist, step_info=info
    )
    return out, model, hist, rng


def test_round_trip_restores_everything(tmp_path, data):
    path, model, hist, rng = _full_checkpoint(tmp_path, data)
    assert path == os.path.abspath(tmp_path / "full.npz")
    ck = load_checkpoint(path)
    assert ck.format_version == FORMAT_VERSION and ck.path == path
    assert np.array_equal(ck.model.params, model.params) and ck.model.config() == model.config()
    assert all(np.shares_memory(w, ck.model.params) for w in ck.model.weights)
    o, p = ck.opt_state, hist.opt_state
    assert o.t == p.t and o.primitives == p.primitives
    for k in ("codes", "hp", "soff", "state", "plan"):
        assert np.array_equal(getattr(o, k), getattr(p, k)), k
    assert np.array_equal(ck.rng().random(5), rng.random(5))  # the stream continues
    assert np.array_equal(ck.sampler["order"], np.arange(5))
    h = ck.history
    for c in COLUMNS + ("time",):
        assert np.array_equal(h.column(c), hist.column(c))
    assert h.evals == hist.evals and h.epochs == hist.epochs and h.noise == hist.noise
    assert h.records == hist.records
    assert (h.target, h.reached, h.stop_reason, h.config) == (hist.target, hist.reached, hist.stop_reason, hist.config)
    assert h.noise_tracker.noise_scale == hist.noise_tracker.noise_scale
    info = ck.step_info
    assert info["step"] == 12 and info["lr"] == 0.5 and info["arr"].tolist() == [0, 1, 2]
    assert info["nested"]["a"] == [1, 2.5, None] and np.isnan(info["nested"]["nan"])
    # an ordinary npz reader opens it too, without pickle
    with np.load(path, allow_pickle=False) as z:
        assert np.array_equal(z["params"], model.params)
        assert json.loads(z["meta.json"])["format"] == "minigd.checkpoint"


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, data, monkeypatch):
    path, model, hist, rng = _full_checkpoint(tmp_path, data)
    before = open(path, "rb").read()
    real = np.lib.format.write_array
    calls = []

    def dying_write(f, a, **kw):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"\0" * 100)
            raise OSError("disk full")
        return real(f, a, **kw)

    monkeypatch.setattr(np.lib.format, "write_array", dying_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, hist.opt_state, history=hist)
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["full.npz"]  # no temp file left behind
    with pytest.raises(TypeError, match=r"^step_info/history: expected JSON-serialisable"):
        save_checkpoint(path, model, step_info={"x": object()})
    assert open(path, "rb").read() == before


def test_corrupt_truncated_and_foreign_files_are_clear_errors(tmp_path, data):
    path, *_ = _full_checkpoint(tmp_path, data)
    blob = open(path, "rb").read()
    bad = tmp_path / "bad.npz"
    name = os.path.basename(str(bad))
    # truncated anywhere
    for cut in sorted({0, 1, 10, 100, len(blob) // 3, len(blob) // 2, len(blob) - 30, len(blob) - 1}):
        bad.write_bytes(blob[:cut])
        with pytest.raises(ValueError, match=rf"^checkpoint '.*{name}': corrupt"):
            load_checkpoint(bad)
    # one flipped byte in each entry's data (caught by the CRC or by the header checks)
    with zipfile.ZipFile(path) as zf:
        offsets = [(i.header_offset, i.file_size) for i in zf.infolist()]
    for off, size in offsets:
        b = bytearray(blob)
        b[off + 30 + 40 + size // 2] ^= 0x5A  # inside the entry, past its local header
        bad.write_bytes(bytes(b))
        with pytest.raises(ValueError, match=rf"^checkpoint '.*{name}': corrupt"):
            load_checkpoint(bad)
    # not a checkpoint
    bad.write_bytes(b"hello world" * 10)
    with pytest.raises(ValueError, match=r"corrupt or truncated file"):
        load_checkpoint(bad)
    np.savez(bad, a=np.arange(3))
    with pytest.raises(ValueError, match=r"not a minigd checkpoint \(no meta.json entry\)"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match=r"^path: no checkpoint file"):
        load_checkpoint(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=r"^path: .* is a directory"):
        load_checkpoint(tmp_path)


def _rewrite_meta(src, dst, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "meta.json":
                meta = json.loads(data)
                edit(meta)
                data = json.dumps(meta).encode()
            zout.writestr(info.filename, data)


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda m: m.update(format_version=FORMAT_VERSION + 1),
            rf"written in checkpoint format version {FORMAT_VERSION + 1} .* this minigd reads versions <= "
            rf"{FORMAT_VERSION}: upgrade minigd",
        ),
        (lambda m: m.update(format="something.else"), r"does not describe a 'minigd.checkpoint' file"),
        (lambda m: m["arrays"].update(params=[[10**12], "<f8"]), r"too small for an array of shape"),
        (lambda m: m["arrays"].update(params=[[3], "|O"]), r"invalid shape/dtype"),
        (lambda m: m["model"].update(sizes=[5, 7, 4]), r"params has shape"),
        (lambda m: m["model"].update(loss="hinge"), r"the saved model configuration is invalid"),
        (lambda m: m.update(rng={"bit_generator": "os.system", "state": {}}), r"invalid random generator"),
        (lambda m: m["history"].update(n_steps=10**9), r"history column"),
    ],
)
def test_inconsistent_metadata_is_a_clear_error(tmp_path, data, edit, match):
    path, *_ = _full_checkpoint(tmp_path, data)
    bad = tmp_path / "edited.npz"
    _rewrite_meta(path, bad, edit)
    with pytest.raises(ValueError, match=rf"^checkpoint '.*edited.npz'.*{match}"):
        load_checkpoint(bad)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(path=3), TypeError, r"^path: expected a file path"),
        (dict(path=""), ValueError, r"^path: expected a non-empty file path"),
        (dict(model="m"), TypeError, r"^model: expected a minigd.MLP"),
        (dict(opt_state=3), TypeError, r"^opt_state: expected a minigd OptState"),
        (dict(rng=np.random.RandomState(0)), TypeError, r"^rng: expected a numpy.random.Generator"),
        (dict(sampler=[1]), TypeError, r"^sampler: expected a dict"),
        (dict(sampler={"o": np.zeros((2, 2), np.int64)}), TypeError, r"^sampler\['o'\]: expected a 1-D"),
        (dict(history={}), TypeError, r"^history: expected a minigd.History"),
        (dict(step_info=[1]), TypeError, r"^step_info: expected a dict with str keys"),
    ],
)
def test_bad_save_arguments(tmp_path, kwargs, exc, match):
    model = mg.MLP([3, 2], dtype="float64")
    kw = dict(path=tmp_path / "x.npz", model=model)
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        save_checkpoint(kw.pop("path"), kw.pop("model"), **kw)
    assert not (tmp_path / "x.npz").exists()


def test_opt_state_of_another_model_is_refused(tmp_path):
    a, b = mg.MLP([3, 2], dtype="float64"), mg.MLP([3, 4, 2], dtype="float64")
    st = mg.SGD(lr=0.1, momentum=0.9).init(a.params)
    with pytest.raises(ValueError, match=r"^opt_state: expected state buffers of shape"):
        save_checkpoint(tmp_path / "x.npz", b, st)
