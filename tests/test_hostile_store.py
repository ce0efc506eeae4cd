"""Issue 19, findings 3, 4, 7, 8, 9: a damaged, empty, foreign or crafted results store, the
report never reading a data path named inside a results file, problems found before the
work starts, a killed pool worker, and the GPU emulator's cached library."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest

from minigd.errors import ResultStoreError
from minigd.study import DataSpec, ResultStore, SweepSpec, TrialConfig, run_study

TINY_DATA = DataSpec(name="teacher_student", params=(("n", 300), ("n_classes", 3), ("n_in", 6)), seed=0)


def _spec(**kw):
    base = dict(
        data=TINY_DATA,
        batch_sizes=(32, "full"),
        lr_policy="sqrt",
        base_lr=0.05,
        base_batch_size=32,
        seeds=(0,),
        widths=(8,),
        depths=(1,),
        max_epochs=3,
        min_steps=10,
        target_metric="val_accuracy",
        target=0.6,
    )
    base.update(kw)
    return SweepSpec(**base)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A real (tiny) study directory; tests copy its results file before damaging it."""
    out = tmp_path_factory.mktemp("study")
    run_study(_spec(), out, workers=1, report=False)
    return out


def _copy(study, tmp_path) -> str:
    con = sqlite3.connect(os.path.join(study, "results.sqlite"))
    dst = str(tmp_path / "results.sqlite")
    con.execute(f"VACUUM INTO '{dst}'")  # one self-contained file (no WAL beside it)
    con.close()
    return dst


def _cfg(**kw):
    return TrialConfig(**{"data": TINY_DATA, "sizes": (6, 8, 3), **kw})


# ----------------------------------------------------------------------- finding 3: the store
def test_empty_file_is_refused_not_turned_into_a_fresh_store(tmp_path):
    p = tmp_path / "results.sqlite"
    p.write_bytes(b"")
    with pytest.raises(ResultStoreError, match=r"results\.sqlite.*empty \(0 bytes\)"):
        ResultStore(p)
    assert p.read_bytes() == b""  # nothing written into it


def test_a_path_that_does_not_exist_is_still_created(tmp_path):
    with ResultStore(tmp_path / "new.sqlite") as s:
        s.put(_cfg(), {"status": "ok", "steps": 3})
        assert len(s) == 1 and s.keys() == {_cfg().key}


@pytest.mark.parametrize(
    "content, why",
    [
        (b"hello, not a database\n" * 10, "not an SQLite database"),
        (b"SQLite format 3\x00" + b"\x00" * 20, "truncated"),
    ],
)
def test_non_sqlite_files_are_refused(tmp_path, content, why):
    p = tmp_path / "results.sqlite"
    p.write_bytes(content)
    with pytest.raises(ResultStoreError, match=why):
        ResultStore(p)
    assert p.read_bytes() == content


def test_a_fifo_is_refused_without_hanging(tmp_path):
    p = tmp_path / "results.sqlite"
    os.mkfifo(p)
    with pytest.raises(ResultStoreError, match="FIFO"):
        ResultStore(p)


def test_a_foreign_database_is_refused_and_left_untouched(tmp_path):
    p = str(tmp_path / "results.sqlite")
    con = sqlite3.connect(p)
    con.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
    con.commit()
    con.close()
    with pytest.raises(ResultStoreError, match="foreign database: no 'trials' table"):
        ResultStore(p)
    con = sqlite3.connect(p)
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master")] == ["customers"]
    con.close()
    # a 'trials' table of someone else's, without minigd's columns
    p2 = str(tmp_path / "other.sqlite")
    con = sqlite3.connect(p2)
    con.execute("CREATE TABLE trials (a INTEGER)")
    con.execute("CREATE TABLE meta (name TEXT, value TEXT)")
    con.commit()
    con.close()
    with pytest.raises(ResultStoreError, match="lacks the column"):
        ResultStore(p2)


def test_a_truncated_store_is_one_clear_error(study, tmp_path):
    p = _copy(study, tmp_path)
    size = os.path.getsize(p)
    assert size > 4096
    with open(p, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ResultStoreError, match=r"results\.sqlite"):
        with ResultStore(p) as s:
            s.rows()
            s.meta("spec")


def test_garbage_rows_are_skipped_with_a_warning_naming_their_key(study, tmp_path):
    p = _copy(study, tmp_path)
    with ResultStore(p) as s:
        good = s.rows()
    assert len(good) == 2
    con = sqlite3.connect(p)
    rows = [
        ("k-json", "{not json", "ok", "{}"),
        ("k-result", json.dumps(_cfg().to_dict()), "ok", "[1, 2"),
        ("k-notcfg", json.dumps({"frobnicate": 2, "data": {"name": "digits"}}), "ok", json.dumps({"status": "ok"})),
        ("k-types", json.dumps({**_cfg().to_dict(), "batch_size": "32"}), "ok", json.dumps({"status": "ok"})),
        ("k-sizes", json.dumps({**_cfg().to_dict(), "sizes": [6, -1, 3]}), "ok", json.dumps({"status": "ok"})),
        ("k-lr", json.dumps({**_cfg().to_dict(), "lr": "fast"}), "ok", json.dumps({"status": "ok"})),
        ("k-res", json.dumps(_cfg(seed=9).to_dict()), "ok", json.dumps({"status": "ok", "steps_to_target": "x"})),
        ("k-status", json.dumps(_cfg(seed=8).to_dict()), "ok", json.dumps({"status": "weird"})),
        ("k-array", json.dumps([1, 2]), "ok", json.dumps({"status": "ok"})),
    ]
    for key, cfg, status, res in rows:
        con.execute(
            "INSERT INTO trials (key, config, status, result, error, finished) VALUES (?,?,?,?,NULL,?)",
            (key, cfg, status, res, 1e12),
        )
    con.execute(
        "INSERT INTO trials (key, config, status, result, error, finished) VALUES (?,?,?,?,NULL,?)",
        ("k-blob", b"\x00\x01", "ok", b"\x02", 1e12),
    )
    con.commit()
    con.close()
    with ResultStore(p) as s:
        with pytest.warns(RuntimeWarning) as rec:
            rows_ = s.rows()
        assert [c.key for c, _ in rows_] == [c.key for c, _ in good]
        text = "\n".join(str(w.message) for w in rec)
        for key in [r[0] for r in rows] + ["k-blob"]:
            assert f"'{key}'" in text
        # the bad rows are not "stored" for a resumed sweep: it runs them again
        assert s.keys() == {c.key for c, _ in good}


def test_crafted_meta_entries_are_validated(study, tmp_path):
    p = _copy(study, tmp_path)
    con = sqlite3.connect(p)
    spec = json.loads(con.execute("SELECT value FROM meta WHERE name='spec'").fetchone()[0])
    cases = {
        "spec": [json.dumps({**spec, "max_epochs": -5}), json.dumps({**spec, "bogus": 1}), json.dumps([1]), "{garbage"],
        "study_keys": [json.dumps("abc"), json.dumps([1, 2])],
        "question_keys": [json.dumps(["x"]), json.dumps({"smallest_batch": [3]})],
        "throughput_probe": [json.dumps({"a": 1})],
    }
    con.close()
    for name, values in cases.items():
        for v in values:
            con = sqlite3.connect(p)
            con.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, v))
            con.commit()
            con.close()
            with ResultStore(p) as s, pytest.raises(ResultStoreError, match=f"results.sqlite.*{name}"):
                s.meta(name)
    # a probe entry with non-finite or negative times is dropped with a warning, the rest kept
    with ResultStore(p) as s:
        good = {"key": "k", "batch_size": 8, "median_s": 1e-4, "lo_s": 1e-4, "hi_s": 2e-4, "round_s": [1e-4]}
        s._sql(
            "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
            (
                "probe:powers_of_two",
                json.dumps(
                    [good, {**good, "median_s": -1.0}, {**good, "lo_s": 1e999}, {**good, "round_s": [None]}, "x"]
                ),
            ),
        )
        with pytest.warns(RuntimeWarning, match="ignoring throughput probe entry"):
            assert s.meta("probe:powers_of_two") == [good]


def test_report_on_damaged_or_empty_store_is_a_cli_error(study, tmp_path, capsys):
    from minigd.cli import main

    p = tmp_path / "results.sqlite"
    p.write_bytes(b"")
    assert main(["report", str(p)]) == 1
    err = capsys.readouterr().err
    assert "minigd report: error:" in err and "results.sqlite" in err and "empty" in err
    assert p.read_bytes() == b""  # no tables written into it
    q = _copy(study, tmp_path / "..")
    con = sqlite3.connect(q)
    con.execute("UPDATE meta SET value = '{garbage' WHERE name = 'spec'")
    con.commit()
    con.close()
    assert main(["report", q, "--out", str(tmp_path / "rep")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "'spec'" in err


def test_study_on_an_empty_results_file_does_not_restart(tmp_path, capsys):
    from minigd.cli import main

    (tmp_path / "results.sqlite").write_bytes(b"")
    with pytest.raises(SystemExit) as ei:  # a usage error, before any trial
        main(
            [
                "study",
                "--data",
                "teacher_student",
                "--batch-sizes",
                "32",
                "--seeds",
                "0",
                "--workers",
                "1",
                "--quiet",
                "--out",
                str(tmp_path),
            ]
        )
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "results.sqlite" in err and "empty" in err
    assert (tmp_path / "results.sqlite").read_bytes() == b""


# ----------------------------------------------------------------------- finding 4: no leak
def _no_data_loading(monkeypatch):
    import minigd.data
    import minigd.study.trial

    def refuse(*a, **k):
        raise AssertionError("minigd report must not load data")

    monkeypatch.setattr(minigd.study.trial, "load_data", refuse)
    monkeypatch.setattr(minigd.data, "load", refuse, raising=False)


def _set_meta(path, **entries):
    con = sqlite3.connect(path)
    for name, value in entries.items():
        if value is None:
            con.execute("DELETE FROM meta WHERE name = ?", (name,))
        else:
            con.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, json.dumps(value)))
    con.commit()
    con.close()


def test_report_needs_no_data_even_without_study_keys(study, tmp_path, monkeypatch, capsys):
    from minigd.cli import main

    p = _copy(study, tmp_path)
    _set_meta(p, study_keys=None, question_keys={"smallest_batch": []})
    _no_data_loading(monkeypatch)
    assert main(["report", p, "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "summary.md").exists()
    capsys.readouterr()


@pytest.mark.parametrize("secret_first_field", ["TOPSECRET-token-42", "root:x:0:0:root:/root:/bin/bash"])
def test_report_never_opens_a_data_path_named_in_the_results_file(
    study, tmp_path, monkeypatch, capsys, secret_first_field
):
    from minigd.cli import main

    secret = tmp_path / "secret.csv"
    secret.write_text(f"{secret_first_field},1,2\n3,4,5\n")
    p = _copy(study, tmp_path)
    con = sqlite3.connect(p)
    spec = json.loads(con.execute("SELECT value FROM meta WHERE name='spec'").fetchone()[0])
    con.close()
    _no_data_loading(monkeypatch)
    for name in (str(secret), "/etc/passwd"):
        spec["data"]["name"] = name
        _set_meta(p, spec=spec, study_keys=None, question_keys={"smallest_batch": [], "width_one": []})
        opened = []
        real_open = open

        def spy(file, *a, **k):
            if os.fspath(file) if isinstance(file, (str, os.PathLike)) else False:
                opened.append(os.fspath(file))
            return real_open(file, *a, **k)

        monkeypatch.setattr("builtins.open", spy)
        try:
            rc = main(["report", p, "--out", str(tmp_path / "rep")])
        except SystemExit as exc:  # no trial of that data is stored: nothing to report
            rc = exc.code
        finally:
            monkeypatch.setattr("builtins.open", real_open)
        out = capsys.readouterr()
        assert name not in opened
        assert "TOPSECRET" not in out.out + out.err and "root:x" not in out.out + out.err
        assert rc != 0  # no trial of that data is stored


# ----------------------------------------------------------------------- finding 7: found first
def _study_usage_error(argv, monkeypatch, capsys, ran=None):
    from minigd import study as study_mod
    from minigd.cli import main

    def must_not_run(*a, **k):
        raise AssertionError("the study started although a flag is bad")

    monkeypatch.setattr(study_mod, "run_study", must_not_run)
    with pytest.raises(SystemExit) as ei:
        main(
            [
                "study",
                "--data",
                "teacher_student",
                "--batch-sizes",
                "32",
                "--seeds",
                "0",
                "--workers",
                "1",
                "--quiet",
                *argv,
            ]
        )
    assert ei.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "out, why", [("", "expected an output directory, got ''"), ("/proc/minigd-study-out", "can be created and written")]
)
def test_out_is_checked_before_the_work_starts(out, why, monkeypatch, capsys):
    line = _study_usage_error(["--out", out], monkeypatch, capsys)
    assert "argument --out" in line and why in line


def test_out_under_a_file_or_read_only_is_a_usage_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "f").write_text("x")
    line = _study_usage_error(["--out", str(tmp_path / "f" / "sub")], monkeypatch, capsys)
    assert "argument --out" in line
    ro = tmp_path / "ro"
    ro.mkdir()
    import minigd._io

    def no_write(d, what, error=ValueError):
        raise error(f"{what}: expected a directory this process can write, got {d!r} (Read-only file system)")

    monkeypatch.setattr(minigd._io, "check_writable_dir", no_write)
    line = _study_usage_error(["--out", str(ro)], monkeypatch, capsys)
    assert "argument --out" in line and "Read-only file system" in line


def test_full_disk_is_a_usage_error(tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    line = _study_usage_error(["--out", str(tmp_path / "s")], monkeypatch, capsys)
    assert "argument --out" in line and "disk is full" in line


def test_a_disk_full_while_writing_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import errno

    from minigd import study as study_mod
    from minigd.cli import main

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(study_mod, "run_study", full)
    rc = main(
        [
            "study",
            "--data",
            "teacher_student",
            "--batch-sizes",
            "32",
            "--seeds",
            "0",
            "--workers",
            "1",
            "--quiet",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert rc == 1 and "the disk is full" in capsys.readouterr().err


def test_bad_scheduler_is_a_quick_usage_error(tmp_path, monkeypatch, capsys):
    import socket
    import time

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    t0 = time.perf_counter()
    line = _study_usage_error(
        ["--out", str(tmp_path / "s"), "--scheduler", f"tcp://127.0.0.1:{port}"], monkeypatch, capsys
    )
    assert time.perf_counter() - t0 < 20
    assert "argument --scheduler" in line and "no scheduler answers" in line
    line = _study_usage_error(["--out", str(tmp_path / "s"), "--scheduler", "http:/nonsense"], monkeypatch, capsys)
    assert "argument --scheduler" in line and "tcp://host:port" in line


@pytest.mark.parametrize(
    "argv, module, flag",
    [
        ([], "matplotlib", "--out"),
        (["--search", "bayes"], "optuna", "--search bayes"),
        (["--scheduler", "tcp://127.0.0.1:8786"], "distributed", "--scheduler"),
    ],
)
def test_missing_extras_are_named_before_the_work_starts(argv, module, flag, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    line = _study_usage_error(["--out", str(tmp_path / "s"), *argv], monkeypatch, capsys)
    assert f"argument {flag}" in line and "pip install 'minigd[study]'" in line


def test_a_damaged_results_file_in_out_is_a_usage_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "results.sqlite").write_bytes(b"garbage" * 100)
    line = _study_usage_error(["--out", str(tmp_path)], monkeypatch, capsys)
    assert "argument --out" in line and "not an SQLite database" in line


def test_fit_checks_the_checkpoint_directory_is_writable_before_training(tmp_path, monkeypatch):
    import numpy as np

    import minigd as mg
    import minigd._io
    import minigd.train

    X = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    steps = []
    orig = mg.MLP.train_step if hasattr(mg.MLP, "train_step") else None

    def no_write(d, what, error=ValueError):
        raise error(f"{what}: expected a directory this process can write, got {d!r} (Read-only file system)")

    monkeypatch.setattr(minigd._io, "check_writable_dir", no_write)
    model = mg.MLP([3, 4, 2], seed=0)
    before = model.params.copy()
    with pytest.raises(ValueError, match="checkpoint: expected a directory this process can write"):
        mg.fit(model, X, y, batch_size=8, epochs=1, optimizer=mg.SGD(lr=0.1), checkpoint=tmp_path / "ck.npz")
    assert np.array_equal(model.params, before)  # refused before any step
    del steps, orig
    # and for real, where the directory cannot be written (works as root too)
    with pytest.raises(ValueError, match="checkpoint"):
        mg.fit(
            mg.MLP([3, 4, 2], seed=0),
            X,
            y,
            batch_size=8,
            epochs=1,
            optimizer=mg.SGD(lr=0.1),
            checkpoint="/proc/minigd-ck.npz",
        )


# ----------------------------------------------------------------------- finding 8: bystanders
def _kills_its_worker_or_waits(x):
    import time

    if x == 0:
        time.sleep(0.3)  # the bystander (1) is running by now
        os._exit(1)
    if x == 1:
        time.sleep(1.0)  # still running when trial 0 kills its worker
    return {"status": "ok", "x": x}


def test_a_killed_worker_fails_only_its_own_trial_not_the_one_running_beside_it():
    from minigd.study import LocalExecutor

    got = dict(LocalExecutor(2).run(_kills_its_worker_or_waits, [0, 1, 2]))
    assert got[0]["status"] == "failed" and "died" in got[0]["error"]
    assert got[1] == {"status": "ok", "x": 1} and got[2] == {"status": "ok", "x": 2}


# ----------------------------------------------------------------------- finding 9: cached .so
def test_gpu_emulator_rebuilds_a_cached_library_others_could_have_written(tmp_path, monkeypatch):
    from minigd.testing import gpu_emu as E

    if E.reason() is not None:
        pytest.skip(f"no GPU emulator: {E.reason()}")
    monkeypatch.setenv("MINIGD_CACHE_DIR", str(tmp_path))
    code = 'extern "C" __global__ void mgd_trust_probe(int* x) { x[0] = 7; }'
    E.build(code)
    so = next((tmp_path / "gpu_emu").glob("*.so"))
    compiles = []
    real_run = E._run
    monkeypatch.setattr(E, "_run", lambda cmd, what: (compiles.append(what), real_run(cmd, what))[1])
    tampered = [lambda: os.chmod(so, 0o666)]
    if os.getuid() == 0:
        tampered.append(lambda: os.chown(so, 65534, -1))  # owned by another user
    for tamper in tampered:
        tamper()
        E._LIBS.clear()
        compiles.clear()
        E.build(code)
        assert "compiling" in compiles  # rebuilt, not loaded
        st = os.lstat(so)
        assert st.st_uid == os.getuid() and not st.st_mode & 0o022
    compiles.clear()
    E._LIBS.clear()
    E.build(code)
    assert compiles == []  # a trusted cache is re-used
