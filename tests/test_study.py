"""The batch-size study: trials, the resumable store, executors (local pool, Dask), the CLI."""

from __future__ import annotations

import dataclasses
import os
import sqlite3

import numpy as np
import pytest

from minigd.study import (
    DataSpec,
    LocalExecutor,
    ResultStore,
    SerialExecutor,
    SweepSpec,
    TrialConfig,
    analyze,
    run_study,
    run_sweep,
    run_trial,
)

TINY_DATA = DataSpec(name="teacher_student", params=(("n", 300), ("n_classes", 3), ("n_in", 6)), seed=0)


def tiny_spec(**kw):
    base = dict(
        data=TINY_DATA,
        batch_sizes=(4, 32, "full"),
        lr_policy="sqrt",
        base_lr=0.05,
        base_batch_size=32,
        seeds=(0, 1),
        widths=(8,),
        depths=(1,),
        max_epochs=4,
        min_steps=20,
        target_metric="val_accuracy",
        target=0.6,
    )
    base.update(kw)
    return SweepSpec(**base)


def tiny_configs(**kw):
    return tiny_spec(**kw).trials(240, 6, 3)


DETERMINISTIC = (
    "reached",
    "steps_to_target",
    "examples_to_target",
    "steps",
    "examples",
    "final_train_loss",
    "final_val_loss",
    "final_val_accuracy",
)


def test_trial_result_fields_and_determinism():
    cfg = tiny_configs()[0]
    a, b = run_trial(cfg), run_trial(cfg)
    assert a["status"] == "ok", a.get("error")
    for k in DETERMINISTIC:
        assert a[k] == b[k], k
    assert a["throughput"] > 0 and a["us_per_step"] > 0
    assert a["memory_bytes"] > a["workspace_bytes"] > 0
    assert a["noise"][0]["step"] == 0 and a["noise"][-1]["step"] == a["steps"]
    assert all(np.isfinite(p["noise_scale"]) for p in a["noise"])


def test_failing_trial_is_recorded_not_raised():
    cfg = dataclasses.replace(tiny_configs()[0], backend="gpu")
    res = run_trial(cfg)
    assert res["status"] == "failed" and "gpu" in res["error"]


def test_batch_size_larger_than_data_is_a_clear_error():
    with pytest.raises(ValueError, match="batch_sizes"):
        tiny_spec(batch_sizes=(1000,)).trials(240, 6, 3)


def test_unknown_dataset_is_a_clear_error(tmp_path):
    spec = tiny_spec(data=DataSpec(name="no_such_data", params=()))
    with pytest.raises(ValueError, match="no_such_data"):
        run_study(spec, tmp_path, workers=1, report=False)


def test_malformed_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,five,6\n")
    spec = tiny_spec(data=DataSpec(name=str(bad), params=()))
    with pytest.raises(ValueError):
        run_study(spec, tmp_path / "out", workers=1, report=False)


def test_store_rejects_a_non_database(tmp_path):
    p = tmp_path / "x.sqlite"
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="results"):
        ResultStore(p)


class Interrupting:
    """Serial executor that raises KeyboardInterrupt after ``k`` results (Ctrl-C)."""

    name = "interrupting"
    n_workers = 1

    def __init__(self, k):
        self.k = k

    def run(self, fn, items):
        for i, item in enumerate(items):
            if i == self.k:
                raise KeyboardInterrupt
            yield item, fn(item)


def test_interrupted_sweep_resumes_and_runs_every_trial_once(tmp_path):
    configs = tiny_configs()
    path = tmp_path / "r.sqlite"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(configs, path, executor=Interrupting(2))
    with ResultStore(path) as s:
        assert len(s) == 2  # the finished trials were committed before the interrupt
        first = s.keys()
    ran = []
    counts = run_sweep(configs, path, executor=SerialExecutor(), log=lambda c, r: ran.append(c.key))
    assert counts["skipped"] == 2 and counts["ran"] == len(configs) - 2
    assert not set(ran) & first  # only the missing ones ran
    with ResultStore(path) as s:
        assert s.keys() == {c.key for c in configs}
    # one row per trial, even after a third run
    run_sweep(configs, path, executor=SerialExecutor())
    con = sqlite3.connect(path)
    assert con.execute("SELECT COUNT(*) FROM trials").fetchone()[0] == len(configs)


def _die_once(cfg):
    """Kill the worker process the first time a given trial runs (a marker file says)."""
    marker = os.environ["MINIGD_TEST_MARKER"] + cfg.key
    if cfg.batch_size == 4 and cfg.seed == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return run_trial(cfg)


def test_killed_worker_is_replaced_and_its_trial_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGD_TEST_MARKER", str(tmp_path / "killed-"))
    configs = tiny_configs(seeds=(0,))
    ex = LocalExecutor(2)
    results = dict((c.key, r) for c, r in ex.run(_die_once, configs))
    assert set(results) == {c.key for c in configs}
    assert all(r["status"] == "ok" for r in results.values())
    assert len(list(tmp_path.glob("killed-*"))) == 1


def test_local_pool_matches_serial(tmp_path):
    configs = tiny_configs(seeds=(0,))
    serial = {c.key: r for c, r in SerialExecutor().run(run_trial, configs)}
    pooled = {c.key: r for c, r in LocalExecutor(2).run(run_trial, configs)}
    for k in serial:
        for f in DETERMINISTIC:
            assert serial[k][f] == pooled[k][f], f


def test_dask_local_cluster_matches_local_executor():
    distributed = pytest.importorskip("dask.distributed")
    configs = tiny_configs(seeds=(0,))
    serial = {c.key: r for c, r in SerialExecutor().run(run_trial, configs)}
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        distributed.Client(cluster) as client,
    ):
        from minigd.study import DaskExecutor

        got = {c.key: r for c, r in DaskExecutor(client).run(run_trial, configs)}
    assert set(got) == set(serial)
    for k in serial:
        assert got[k]["status"] == "ok"
        for f in DETERMINISTIC:
            assert serial[k][f] == got[k][f], f


def test_unreachable_target_is_a_recorded_outcome(tmp_path):
    configs = tiny_configs(target=1.01, seeds=(0,), batch_sizes=(32,), max_epochs=2)
    run_sweep(configs, tmp_path / "r.sqlite", executor=SerialExecutor())
    with ResultStore(tmp_path / "r.sqlite") as s:
        rows = s.rows()
    assert len(rows) == 1 and rows[0][1]["status"] == "ok" and rows[0][1]["reached"] is False
    a = analyze(rows)["architectures"][0]
    assert a["per_batch"][0]["steps_to_target"] is None
    assert a["answers"]["fastest_wall_time"] is None


def test_analysis_picks_best_lr_and_fits_tradeoff():
    """Synthetic results generated by the trade-off formula: the analysis recovers B_crit."""
    s_min, b_crit = 40.0, 64.0
    rows = []
    for B in (1, 4, 16, 64, 256, 1024):
        for lr, slow in ((0.05, 1.3), (0.1, 1.0), (0.2, 1.5)):  # 0.1 best, inside the rates tried
            S = s_min * (1 + b_crit / B) * slow
            cfg = TrialConfig(data=TINY_DATA, batch_size=B, lr=lr, seed=0)
            rows.append(
                (
                    cfg,
                    {
                        "status": "ok",
                        "reached": True,
                        "steps_to_target": S,
                        "examples_to_target": S * B,
                        "time_to_target": S * (1e-4 + 1e-6 * B),
                        "final_val_accuracy": 0.9,
                        "throughput": B / (1e-4 + 1e-6 * B),
                        "noise": [{"step": 0, "noise_scale": 60.0}, {"step": 10, "noise_scale": 60.0}],
                    },
                )
            )
    a = analyze(rows)["architectures"][0]
    assert [r["best_lr"] for r in a["per_batch"]] == [0.1] * 6
    assert a["tradeoff_fit"]["b_crit"] == pytest.approx(b_crit, rel=1e-3)
    assert a["tradeoff_fit"]["s_min"] == pytest.approx(s_min, rel=1e-3)
    assert a["answers"]["fewest_examples"] == 1 and a["answers"]["fewest_steps"] == 1024
    assert [r["regime"] for r in a["per_batch"]] == ["perfect scaling"] * 3 + ["diminishing returns"] * 1 + [
        "no benefit"
    ] * 2


def test_cli_study_end_to_end_writes_the_report(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from minigd.cli import main

    out = tmp_path / "study"
    rc = main(
        [
            "study",
            "--data",
            "digits",
            "--batch-sizes",
            "16,256,full",
            "--seeds",
            "0",
            "--lr-grid",
            "1",
            "--max-epochs",
            "3",
            "--target",
            "0.8",
            "--workers",
            "1",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "Report:" in text and "fastest batch size" in text
    rep = out / "report"
    for name in (
        "summary.md",
        "summary.html",
        "steps_examples.png",
        "time_to_target.png",
        "generalization.png",
        "best_lr.png",
        "throughput_memory.png",
        "noise_scale.png",
    ):
        f = rep / name
        assert f.exists() and f.stat().st_size > 1000, name
        if name.endswith(".png"):
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resuming runs nothing new
    rc = main(
        [
            "study",
            "--data",
            "digits",
            "--batch-sizes",
            "16,256,full",
            "--seeds",
            "0",
            "--lr-grid",
            "1",
            "--max-epochs",
            "3",
            "--target",
            "0.8",
            "--workers",
            "1",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert "4 already stored, 0 ran" in capsys.readouterr().out  # 3 batch sizes + the adaptive arm
    # the report command rebuilds the report from the results file
    assert main(["report", str(out), "--out", str(tmp_path / "rep2")]) == 0
    assert (tmp_path / "rep2" / "summary.md").exists()


def test_cli_report_on_missing_results_is_a_clear_error(tmp_path):
    from minigd.cli import main

    with pytest.raises(SystemExit, match="RESULTS"):
        main(["report", str(tmp_path / "nothing")])


def test_random_and_bayes_search_store_every_trial(tmp_path):
    pytest.importorskip("optuna")
    from minigd.study import SearchSpace, search

    base = TrialConfig(data=TINY_DATA, sizes=(6, 8, 3), max_epochs=2, min_steps=10, target=0.5)
    space = SearchSpace(
        batch_min=4, batch_max=64, lr_min=0.01, lr_max=0.3, width_min=2, width_max=8, depth_min=0, depth_max=1
    )
    for method in ("random", "bayes"):
        path = tmp_path / f"{method}.sqlite"
        res = search(space, 4, path, method=method, base=base, workers=1, seed=1, objective="steps_to_target")
        assert len(res["trials"]) == 4
        with ResultStore(path) as s:
            assert 1 <= len(s) <= 4  # identical draws share one row
        if res["best"] is not None:
            cfg, r = res["best"]
            assert r["reached"] and r["steps_to_target"] == min(v for _, v in res["trials"] if v is not None)


def test_batch_size_growth_schedule_is_applied():
    """--bs-growth: each trial's batch grows at the given epochs (capped at the full batch)."""
    configs = tiny_configs(seeds=(0,), batch_sizes=(4, 128), bs_growth=((2, 4.0),), max_epochs=3, target=1.01)
    assert [c.bs_schedule for c in configs] == [((2, 16),), ((2, 240),)]
    res = run_trial(configs[0])
    assert res["status"] == "ok"
    assert res["examples"] == 240 * 3  # three full epochs, whatever the batch size
    assert res["steps"] == 60 + 60 + 15  # 240/4 twice, then 240/16


def _always_dies_on_first(x):
    if x == 0:
        os._exit(1)
    return {
        "status": "ok",
        "x": x,
        "threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "numba_threads": os.environ.get("NUMBA_NUM_THREADS"),
    }


def test_one_crashing_trial_does_not_fail_the_others():
    """A trial that always kills its worker is recorded as failed after its attempts; the
    trials queued behind it are not charged and all succeed."""
    got = dict(LocalExecutor(2).run(_always_dies_on_first, list(range(6))))
    assert got[0]["status"] == "failed" and "died" in got[0]["error"]
    assert all(got[i]["status"] == "ok" for i in range(1, 6))


def test_local_workers_are_pinned_to_one_thread():
    got = dict(LocalExecutor(2).run(_always_dies_on_first, [1, 2, 3]))
    assert {r["threads"] for r in got.values()} == {"1"}
    assert {r["numba_threads"] for r in got.values()} == {"1"}


def _thread_counts(_):
    from minigd.study.executors import thread_counts

    return {"status": "ok", **thread_counts()}


def test_in_process_trials_use_the_threads_of_the_pool_workers():
    """--workers 1 ran trials with the process's default BLAS/Numba threads while the pool's
    workers are pinned to one, so the two modes timed different things."""
    pytest.importorskip("threadpoolctl")
    import numba

    from minigd.study.executors import thread_counts

    before = thread_counts()
    serial = [r for _, r in SerialExecutor().run(_thread_counts, [0, 1])]
    pooled = [r for _, r in LocalExecutor(2).run(_thread_counts, [0, 1])]
    assert {(r["blas_threads"], r["numba_threads"]) for r in serial} == {(1, 1)}
    assert {(r["blas_threads"], r["numba_threads"]) for r in pooled} == {(1, 1)}
    assert thread_counts() == before and numba.get_num_threads() == before["numba_threads"]  # restored


def test_trials_record_their_thread_counts_and_mixed_counts_are_flagged():
    cfg = tiny_configs(seeds=(0,))[0]
    ((_, res),) = SerialExecutor().run(run_trial, [cfg])
    assert res["status"] == "ok", res.get("traceback")
    assert res["numba_threads"] == 1
    if res["blas_threads"] is not None:
        assert res["blas_threads"] == 1
    rows = [(c, dict(res, batch_size=c.batch_size)) for c in tiny_configs(seeds=(0,))]
    assert not any("thread" in w for w in analyze(rows)["architectures"][0]["warnings"])
    mixed = rows[:-1] + [(rows[-1][0], dict(rows[-1][1], blas_threads=2, numba_threads=2))]
    warn = [w for w in analyze(mixed)["architectures"][0]["warnings"] if "thread" in w]
    assert len(warn) == 1 and "BLAS 2 / Numba 2" in warn[0] and "BLAS 1 / Numba 1" in warn[0]


def test_regression_study_needs_a_loss_target(tmp_path):
    spec = tiny_spec(data=DataSpec(name="linear_regression", params=(("n", 200),)), batch_sizes=(8,))
    with pytest.raises(ValueError, match="target_metric"):
        run_study(spec, tmp_path, workers=1, report=False)
    spec = tiny_spec(
        data=DataSpec(name="linear_regression", params=(("n", 200),)),
        batch_sizes=(8,),
        seeds=(0,),
        target_metric="val_loss",
        target=0.05,
    )
    out = run_study(spec, tmp_path / "ok", workers=1, report=False)
    assert out["counts"]["failed"] == 0
    (arch,) = out["analysis"]["architectures"]
    assert arch["target_metric"] == "val_loss"


def test_report_uses_only_the_trials_of_the_recorded_study(tmp_path):
    from minigd.cli import main

    pytest.importorskip("matplotlib")
    common = [
        "study",
        "--data",
        "digits",
        "--seeds",
        "0",
        "--lr-grid",
        "1",
        "--max-epochs",
        "2",
        "--workers",
        "1",
        "--out",
        str(tmp_path),
        "--quiet",
    ]
    assert main(common + ["--batch-sizes", "64", "--target", "0.5"]) == 0
    assert main(common + ["--batch-sizes", "128", "--target", "0.6"]) == 0
    with ResultStore(tmp_path / "results.sqlite") as s:
        assert len(s) == 4  # each study: one batch size and the adaptive arm
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    import json

    a = json.loads((tmp_path / "report" / "analysis.json").read_text())
    assert [r["batch_size"] for r in a["architectures"][0]["per_batch"]] == [128]


def test_a_diverging_trial_is_an_outcome_not_a_failure():
    """Too large a learning rate: the run diverges (or its gradients overflow); the trial is
    still recorded as ok, not reached, with the noise measurements it could make."""
    cfg = dataclasses.replace(tiny_configs(seeds=(0,), batch_sizes=(4,))[0], lr=1e4, momentum=0.9)
    res = run_trial(cfg)
    assert res["status"] == "ok", res.get("error")
    assert res["reached"] is False
    assert all(np.isfinite(p["noise_scale"]) for p in res["noise"])


# --------------------------------------------------------------------------- ghost batch norm sweeps
def test_default_trial_keys_are_unchanged_by_the_batch_norm_fields():
    # the key of a plain trial is the digest of its schema-2 fields alone (the batch-norm
    # fields at their defaults leave it out), so stored results are recognised on resume.
    # (Schema 1's keys, "52a32ac9...", were retired on purpose: those trials measured the
    # noise scale on a biased fixed subset and steps to target at a coarse resolution.)
    assert TrialConfig().key == "74d8c24ab27f637a9ea84b62"
    assert dataclasses.replace(TrialConfig(), batch_norm=True).key != TrialConfig().key
    assert dataclasses.replace(TrialConfig(), dropout=0.1).key != TrialConfig().key


def test_ghost_sweep_trials_dedupe_skip_and_drop_last():
    # n = 241: B = 2 and B = 8 leave a last batch of 1 -> dropped; at B = 32 the last batch
    # (17 rows) is fine whole but leaves a ghost of 1 in ghosts of 4 or 16 -> dropped there;
    # ghost >= B is the whole batch (not repeated); B = 1 is left out with a warning, and so
    # is 'full' with ghost 4 or 16 (241 % 4 == 241 % 16 == 1)
    spec = tiny_spec(batch_norm=True, ghost_batch_sizes=(4, 16, None), batch_sizes=(1, 2, 8, 32, "full"), seeds=(0,))
    with pytest.warns(UserWarning, match=r"\(1, None\).*\(241, 16\).*\(241, 4\)"):
        cfgs = spec.trials(241, 6, 3)
    got = sorted((c.batch_size, c.ghost_batch_size or 0, c.drop_last) for c in cfgs)
    assert got == [
        (2, 0, True),
        (8, 0, True),
        (8, 4, True),
        (32, 0, False),
        (32, 4, True),
        (32, 16, True),
        (241, 0, False),
    ]
    assert all(c.batch_norm is True and c.norm_label.startswith("BN") for c in cfgs)
    with pytest.raises(ValueError, match="ghost_batch_sizes: needs batch_norm"):
        tiny_spec(ghost_batch_sizes=(4,))
    with pytest.raises(ValueError, match="ghost_batch_size"):
        tiny_spec(batch_norm=True, ghost_batch_sizes=(1,))
    with pytest.raises(ValueError, match="dropout"):
        tiny_spec(dropout=1.0)
    # the spec survives its JSON round trip (the store keeps it for `minigd report`)
    assert SweepSpec.from_dict(spec.to_dict()) == spec


def test_ghost_sweep_runs_and_the_analysis_compares_the_variants(tmp_path):
    spec = tiny_spec(batch_norm=True, ghost_batch_sizes=(4, None), batch_sizes=(8, 32), seeds=(0,), dropout=0.1)
    with ResultStore(str(tmp_path / "r.sqlite")) as store:
        run_sweep(spec.trials(240, 6, 3), store, executor=SerialExecutor(), progress=False)
        rows = store.rows()
    assert len(rows) == 4 and all(r["status"] == "ok" for _, r in rows), [r.get("error") for _, r in rows]
    # batch norm has no per-example gradients: the noise scale is honestly absent
    assert all(r["noise"] == [] for _, r in rows)
    a = analyze(rows)
    assert sorted(x["norm"] for x in a["architectures"]) == ["BN ghost 4, dropout 0.1", "BN, dropout 0.1"]
    (comp,) = a["norm_comparisons"]
    assert [r["batch_size"] for r in comp["rows"]] == [8, 32]
    for row in comp["rows"]:
        for v in comp["variants"]:
            assert 0 <= row[v]["final_val_accuracy"] <= 1
    from minigd.report.summary import build_blocks, render_markdown

    md = render_markdown(build_blocks(a))
    assert "Batch norm, ghost batch size and dropout" in md and "BN ghost 4, dropout 0.1" in md


def _alive(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc to see the workers")
def test_pool_workers_exit_when_the_study_process_is_killed(tmp_path):
    """SIGKILL of the parent used to leave its pool workers hung for good."""
    import signal
    import time

    import _hanging_pool

    proc, pids = _hanging_pool.start(tmp_path, "    run_pool()\n")
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in pids if _alive(p)]
        for p in left:  # never leave them behind, even when the test fails
            os.kill(p, signal.SIGKILL)
        assert not left, f"workers {left} outlived their killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_second_study_on_the_same_directory_is_refused(tmp_path, capsys):
    """Two studies on one --out each ran every trial; the second is now refused up front."""
    from minigd.cli import main
    from minigd.study import StudyLocked
    from minigd.study.store import study_lock

    spec = tiny_spec(batch_sizes=(32,), seeds=(0,))
    out = tmp_path / "s"
    out.mkdir()
    with study_lock(out):  # a study running (flock: another open file conflicts)
        with pytest.raises(StudyLocked, match=f"another study is already running in .*process {os.getpid()}"):
            run_study(spec, out, workers=1, report=False)
        assert not (out / "results.sqlite").exists()
        rc = main(
            [
                "study",
                "--data",
                "teacher_student",
                "--batch-sizes",
                "32",
                "--seeds",
                "0",
                "--lr-grid",
                "1",
                "--max-epochs",
                "1",
                "--target",
                "0.5",
                "--workers",
                "1",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        assert rc == 1
        err = capsys.readouterr().err
        assert err.startswith("minigd study: error: --out: another study is already running") and "Traceback" not in err
    assert run_study(spec, out, workers=1, report=False)["counts"]["ran"] == 1  # released


def test_a_directory_that_cannot_be_locked_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    """A file system without locks (some network mounts) must not stop a study: it runs,
    and a warning says it is unlocked."""
    import fcntl

    from minigd.study.store import study_lock

    def no_locks(fd, op):
        if op & fcntl.LOCK_EX:
            raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with pytest.warns(RuntimeWarning, match=r"cannot lock .*No locks available.*running without the lock"):
        with study_lock(tmp_path):
            ran.append(1)
    assert ran == [1]
