"""``minigd study`` on the command line: every flag is checked before any trial runs (a usage
error naming the flag, what it expects and what it got), and Ctrl-C ends with one line and
exit status 130."""

from __future__ import annotations

import os
import signal
import subprocess

import _hanging_pool
import pytest

from minigd.cli import main

pytest.importorskip("sklearn")  # the default data set is scikit-learn's digits

# flag(s) -> what the message must hold (the flag, and the value that was given)
BAD_FLAGS = [
    (["--activation", "softplus"], "--activation", "softplus"),
    (["--momentum", "1.2"], "--momentum", "1.2"),
    (["--backend", "tpu"], "--backend", "tpu"),
    (["--warmup-steps", "-3"], "--warmup-steps", "-3"),
    (["--target", "1.5"], "--target", "1.5"),
    (["--target", "nan"], "--target", "nan"),
    (["--target-metric", "val_loss", "--target", "-1"], "--target", "-1"),
    (["--batch-sizes", "0,8"], "--batch-sizes", "0"),
    (["--batch-sizes", "100000"], "--batch-sizes", "100000"),
    (["--seeds", "-1"], "--seeds", "-1"),
    (["--seeds", ","], "--seeds", "empty"),
    (["--lr-grid", "0"], "--lr-grid", "0"),
    (["--widths", "0"], "--widths", "0"),
    (["--depths", "-1"], "--depths", "-1"),
    (["--max-epochs", "0"], "--max-epochs", "0"),
    (["--workers", "0"], "--workers", "0"),
    (["--val-fraction", "1.0"], "--val-fraction", "1.0"),
    (["--dropout", "1.0"], "--dropout", "1.0"),
    (["--bs-growth", "10:0"], "--bs-growth", "10:0"),
    (["--ghost-batch-sizes", "4"], "--ghost-batch-sizes", "without --batch-norm"),
    (["--batch-norm", "before", "--ghost-batch-sizes", "1"], "--ghost-batch-sizes", "1"),
    (["--base-lr", "0"], "--base-lr", "0"),
    (["--data", "nosuch.npz"], "--data", "nosuch.npz"),
    (["--data", "linear_regression", "--target-metric", "val_accuracy"], "--target-metric", "val_accuracy"),
    (["--data", "linear_regression"], "--target", "loss target"),
]


@pytest.mark.parametrize("flags, flag, got", BAD_FLAGS, ids=[" ".join(f[0]) for f in BAD_FLAGS])
def test_bad_study_flags_are_usage_errors_before_any_trial(flags, flag, got, tmp_path, capsys):
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as exc:
        main(["study", "--workers", "1", "--quiet", "--out", str(out), *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith("minigd study: error: argument " + flag + ": expected"), err
    assert got in line and "Traceback" not in err
    assert not out.exists()  # nothing ran, nothing was stored


def test_unavailable_backend_says_why(tmp_path, capsys, monkeypatch):
    import minigd as mg

    monkeypatch.setattr(mg, "available_backends", lambda: {"cpu": None, "numpy": None, "gpu": "no GPU here"})
    with pytest.raises(SystemExit):
        main(["study", "--backend", "gpu", "--out", str(tmp_path / "s")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --backend" in line and "'gpu', which is not available: no GPU here" in line


def test_a_cluster_study_may_ask_for_a_backend_this_machine_lacks(tmp_path, monkeypatch):
    """With --scheduler the trials run on the workers: `--backend gpu` from a machine
    without one is not refused here (the workers say whether they have it)."""
    import minigd as mg
    from minigd import study

    monkeypatch.setattr(mg, "available_backends", lambda: {"cpu": None, "numpy": None, "gpu": "no GPU here"})
    seen = {}

    def fake_run_study(spec, out, **kw):
        seen.update(backend=spec.backend, scheduler=kw.get("scheduler"))
        raise KeyboardInterrupt  # stop before anything runs (exit 130)

    monkeypatch.setattr(study, "run_study", fake_run_study)
    monkeypatch.setattr("minigd.cli._check_scheduler", lambda address: None)  # no cluster here
    rc = main(
        [
            "study",
            "--backend",
            "gpu",
            "--scheduler",
            "tcp://127.0.0.1:1",
            "--batch-sizes",
            "8",
            "--seeds",
            "0",
            "--out",
            str(tmp_path / "s"),
            "--quiet",
        ]
    )
    assert rc == 130 and seen == {"backend": "gpu", "scheduler": "tcp://127.0.0.1:1"}


def test_regression_data_picks_the_loss_metric(tmp_path, capsys):
    """The README's `--data linear_regression` failed on the default accuracy metric."""
    out = tmp_path / "s"
    rc = main(
        [
            "study",
            "--data",
            "linear_regression",
            "--target",
            "0.05",
            "--batch-sizes",
            "32,full",
            "--seeds",
            "0",
            "--lr-grid",
            "1",
            "--max-epochs",
            "2",
            "--workers",
            "1",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "3 ran (0 failed)" in text and "target val_loss <= 0.05" in text  # 2 batch sizes + the adaptive arm


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, capsys, monkeypatch):
    import minigd.study as study

    def interrupted(spec, out_dir, **kw):
        os.makedirs(out_dir, exist_ok=True)
        with study.ResultStore(os.path.join(out_dir, "results.sqlite")) as s:
            s.put(study.TrialConfig(), {"status": "ok"})
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "run_study", interrupted)
    out = tmp_path / "s"
    rc = main(["study", "--batch-sizes", "8", "--seeds", "0", "--out", str(out), "--quiet"])
    assert rc == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "interrupted; 1 finished trial(s) kept in" in err and "re-run the same command to resume" in err


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX process groups")
def test_ctrl_c_ends_the_pool_workers_quietly(tmp_path):
    """Ctrl-C (SIGINT to the whole process group): the study process ends its workers at
    once instead of waiting for their trials, and the workers print no tracebacks."""
    proc, _ = _hanging_pool.start(
        tmp_path,
        "    try:\n        run_pool()\n    except KeyboardInterrupt:\n"
        "        print('interrupted', flush=True)\n        sys.exit(130)\n",
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=20)  # the trials sleep 120 s: not waited for
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and out.strip() == "interrupted"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_ctrl_c_while_the_flags_are_checked_is_one_line_too(tmp_path, capsys, monkeypatch):
    """The up-front check loads the data (seconds for a large file): Ctrl-C there gave a
    traceback."""
    from minigd.study import trial

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trial, "load_data", interrupted)
    rc = main(["study", "--batch-sizes", "8", "--seeds", "0", "--out", str(tmp_path / "s"), "--quiet"])
    assert rc == 130
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.startswith("minigd study: interrupted")
