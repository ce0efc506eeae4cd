"""The study's adaptive arm (issue 17): ``fit(batch_size="adaptive")`` as one more row of the
study -- created for every seed and learning rate, stored, resumed, timed by the probe,
analysed with the fixed arms' joint seed resampling (and out of the trade-off fit), reported
(a table row, summary.json's ``adaptive``, its own figure), and left out by --no-adaptive."""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3

import numpy as np
import pytest

from minigd.study import DataSpec, ResultStore, SweepSpec, TrialConfig, analyze, lr_extensions, run_trial
from minigd.study.config import ADAPTIVE_SETTINGS
from minigd.study.probe import adaptive_probe_jobs, adaptive_probe_key, pinned, probe_jobs
from minigd.study.trial import batch_in_force

TINY_DATA = DataSpec(name="teacher_student", params=(("n", 300), ("n_classes", 3), ("n_in", 6)), seed=0)
CLI = [
    "study",
    "--data",
    "teacher_student",
    "--data-param",
    "n=300",
    "--data-param",
    "n_classes=3",
    "--data-param",
    "n_in=6",
    "--batch-sizes",
    "16,64",
    "--seeds",
    "0,1",
    "--lr-grid",
    "1",
    "--lr-policy",
    "sqrt",
    "--base-lr",
    "0.05",
    "--widths",
    "8",
    "--max-epochs",
    "4",
    "--target",
    "0.6",
    "--workers",
    "1",
    "--quiet",
]


def tiny_spec(**kw):
    base = dict(
        data=TINY_DATA,
        batch_sizes=(16, 64),
        lr_policy="sqrt",
        base_lr=0.05,
        base_batch_size=32,
        seeds=(0, 1),
        widths=(8,),
        depths=(1,),
        max_epochs=4,
        min_steps=20,
        target=0.6,
        adaptive=True,
    )
    base.update(kw)
    return SweepSpec(**base)


# --------------------------------------------------------------------------- the arm's trials
def test_the_arm_has_a_trial_per_seed_and_rate_and_is_off_by_default_in_the_library():
    spec = tiny_spec(lr_policy="tuned", lr_grid=(0.5, 1.0, 2.0), seeds=(0, 1, 2))
    arm = spec.adaptive_trials(240, 6, 3)
    assert len(arm) == 3 * 3
    assert {c.seed for c in arm} == {0, 1, 2}
    assert sorted({c.lr for c in arm}) == pytest.approx(spec.lrs_for(32))  # the grid's rates at its start size
    assert all(c.is_adaptive and c.batch_size == "adaptive" and not c.drop_last for c in arm)
    assert {k for k, _ in arm[0].adaptive} == set(ADAPTIVE_SETTINGS)
    assert arm[0].adaptive_spec().min == 32 and "adaptive" in arm[0].label
    assert len({c.key for c in arm}) == len(arm)
    assert not {c.key for c in arm} & {c.key for c in spec.trials(240, 6, 3)}
    # the grid's trials (and their keys) are the same with or without the arm
    assert spec.trials(240, 6, 3) == dataclasses.replace(spec, adaptive=False).trials(240, 6, 3)
    assert dataclasses.replace(spec, adaptive=False).adaptive_trials(240, 6, 3) == []
    assert SweepSpec().adaptive is False
    assert tiny_spec(adaptive_min=500).adaptive_trials(240, 6, 3)[0].adaptive_spec().min == 240  # capped at n
    # a fixed trial's key does not change with the new field; the JSON round trip keeps an adaptive config
    assert TrialConfig().key == "74d8c24ab27f637a9ea84b62"
    assert TrialConfig.from_dict(json.loads(json.dumps(arm[0].to_dict()))) == arm[0]
    assert SweepSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="adaptive_min"):
        tiny_spec(adaptive_min=1)
    with pytest.raises(TypeError, match="adaptive"):
        tiny_spec(adaptive="yes")


def test_batch_in_force_follows_the_decisions():
    got = batch_in_force([{"step": 2, "batch_size": 64}, {"step": 5, "batch_size": 32}], 16, 7)
    assert got.tolist() == [16, 16, 64, 64, 64, 32, 32]
    assert batch_in_force([], 8, 3).tolist() == [8, 8, 8]


def test_an_adaptive_trial_records_its_controller():
    cfg = next(c for c in tiny_spec(seeds=(0,)).adaptive_trials(240, 6, 3))
    cfg = dataclasses.replace(
        cfg,
        adaptive=tuple(sorted({**dict(cfg.adaptive), "every": 5, "track_every": 1}.items())),
        max_epochs=8,
        target=0.9,
    )
    res = run_trial(cfg)
    assert res["status"] == "ok", res.get("traceback")
    rec = res["adaptive"]
    assert rec["candidates"] == [32, 64, 128, 240]
    assert res["batch_size"] == 32 and rec["setup_s"] > 0
    assert rec["decisions"] and all(len(d) == 3 and d[1] in rec["candidates"] and d[2] > 0 for d in rec["decisions"])
    assert [d[0] for d in rec["decisions"]] == sorted(d[0] for d in rec["decisions"])
    if res["reached"]:  # the steps to the target, split by the batch size in force
        assert sum(w for _, w in rec["steps_by_batch"]) == pytest.approx(res["steps_to_target_interp"])
        assert {b for b, _ in rec["steps_by_batch"]} <= set(rec["candidates"])
    else:
        assert rec["steps_by_batch"] is None
    assert rec["max_batch_size"] >= rec["final_batch_size"] >= 32
    assert res["workspace_bytes"] > 0


# --------------------------------------------------------------------------- synthetic rows
ARCH = {"sizes": [6, 8, 3], "activation": "relu", "optimizer": "sgd", "norm": ""}
T_STEP = 1e-3


def _fixed(B, lr, seed, steps):
    cfg = TrialConfig(data=TINY_DATA, sizes=(6, 8, 3), batch_size=B, lr=lr, seed=seed, target=0.6)
    return cfg, {
        "status": "ok",
        "reached": steps is not None,
        "steps_to_target": steps,
        "steps_to_target_interp": steps,
        "examples_to_target": None if steps is None else steps * B,
        "final_val_accuracy": 0.7,
        "us_per_step": T_STEP * 1e6,
        "memory_bytes": 1000 + B,
    }


def _adaptive(lr, seed, steps, *, setup=0.0, step_s=T_STEP):
    cfg = next(c for c in tiny_spec(seeds=(seed,)).adaptive_trials(240, 6, 3))
    cfg = dataclasses.replace(cfg, lr=lr)
    rec = {
        "candidates": [32, 64, 128, 240],
        "decisions": [[20, 64, 1.3]],
        "steps_by_batch": None if steps is None else [[32, min(steps, 20.0)], [64, max(0.0, steps - 20.0)]],
        "step_s_by_batch": [[32, step_s], [64, step_s]],
        "setup_s": setup,
        "final_batch_size": 64,
        "max_batch_size": 64,
    }
    return cfg, {
        "status": "ok",
        "reached": steps is not None,
        "steps_to_target": steps,
        "steps_to_target_interp": steps,
        "examples_to_target": None if steps is None else 32 * steps,
        "final_val_accuracy": 0.7,
        "memory_bytes": 2000,
        "batch_size": 32,
        "adaptive": rec,
        "time_to_target": None if steps is None else steps * step_s,
    }


def _probe(adaptive_rows, *, t=T_STEP, setup=0.0):
    """Probe entries with no spread: fixed B=32 and the adaptive steps at 32 and 64."""
    out = [
        {
            "arch": dict(ARCH),
            "batch_size": B,
            "full_batch": False,
            "round_s": [t] * 7,
            "median_s": t,
            "lo_s": t,
            "hi_s": t,
            "steps_per_round": 50,
        }
        for B in (32, 64)
    ]
    cfg = adaptive_rows[0][0]
    for B in (32, 64):
        out.append(
            {
                "key": adaptive_probe_key(pinned(cfg, B), "step"),
                "adaptive": "step",
                "arch": dict(ARCH),
                "batch_size": B,
                "round_s": [t] * 7,
                "median_s": t,
                "lo_s": t,
                "hi_s": t,
            }
        )
    out.append(
        {
            "key": adaptive_probe_key(cfg, "setup"),
            "adaptive": "setup",
            "arch": dict(ARCH),
            "batch_size": 32,
            "round_s": [setup] * 7,
            "median_s": setup,
            "lo_s": setup,
            "hi_s": setup,
        }
    )
    return out


SEED_STEPS = {0: 40.0, 1: 70.0, 2: 55.0, 3: 90.0, 4: 48.0}


@pytest.mark.parametrize("factor, wins", [(2.0, 0.0), (0.5, 1.0)])
def test_the_ratio_is_resampled_with_the_same_seeds_as_the_fixed_arms(factor, wins):
    """Each seed's adaptive run takes exactly ``factor`` times its fixed run's steps (same step
    time, no set-up): drawing the seeds once per resample for both arms makes the ratio
    ``factor`` in every resample -- resampling the arms apart would spread it."""
    fixed = [_fixed(32, 0.05, s, n) for s, n in SEED_STEPS.items()]
    adap = [_adaptive(0.05, s, factor * n) for s, n in SEED_STEPS.items()]
    a = analyze(fixed + adap, probe=_probe(adap), seed=3, n_boot=500)
    (arch,) = a["architectures"]
    row = arch["adaptive"]
    assert row["timing"] == "probe" and row["setup_s"] == 0.0
    assert row["vs_fixed"]["batch_size"] == 32
    for k in ("value", "lo", "hi"):
        assert row["vs_fixed"][k] == pytest.approx(factor, rel=1e-9), k
    assert row["vs_fixed"]["wins"] == wins
    assert a["adaptive"]["value"] == pytest.approx(factor) and a["adaptive"]["wins"] == wins
    assert arch["headline"]["adaptive_vs_fixed"]["value"] == pytest.approx(factor)
    # its own time to target has a real interval (the seeds differ) containing the point
    iv = row["intervals"]["time_to_target"]
    assert iv["lo"] < iv["hi"] and iv["lo"] <= iv["value"] <= iv["hi"]
    assert row["time_to_target"] == pytest.approx(factor * np.median(list(SEED_STEPS.values())) * T_STEP)


def test_the_arm_changes_no_fixed_number_and_stays_out_of_the_fit():
    rng = np.random.default_rng(0)
    fixed = [
        _fixed(B, lr, s, round(100 * (1 + 48 / B) * f * math.exp(rng.normal(0, 0.1))))
        for B in (8, 16, 32, 64, 128)
        for lr, f in ((0.02, 1.3), (0.05, 1.0), (0.1, 1.2))
        for s in range(4)
    ]
    adap = [_adaptive(lr, s, 60.0 * f + s) for lr, f in ((0.02, 1.3), (0.05, 1.0), (0.1, 1.2)) for s in range(4)]
    probe = [e for e in _probe(adap) if e.get("adaptive")] + [
        {
            "arch": dict(ARCH),
            "batch_size": B,
            "full_batch": False,
            "round_s": [T_STEP * (1 + B / 64)] * 3,
            "median_s": T_STEP * (1 + B / 64),
            "lo_s": T_STEP,
            "hi_s": T_STEP * 3,
        }
        for B in (8, 16, 32, 64, 128)
    ]
    without = analyze(fixed, probe=probe, seed=1, n_boot=300)
    with_arm = analyze(fixed + adap, probe=probe, seed=1, n_boot=300)
    a0, a1 = without["architectures"][0], with_arm["architectures"][0]
    assert a0["adaptive"] is None and without["adaptive"] is None
    assert a1["per_batch"] == a0["per_batch"]  # no row for it among the batch sizes
    assert a1["tradeoff_fit"] == a0["tradeoff_fit"]  # out of the fit
    assert {k: v for k, v in a1["headline"].items() if k != "adaptive_vs_fixed"} == a0["headline"]
    row = a1["adaptive"]
    assert row["in_fit"] is False and row["regime"] is None and row["batch_size"] == "adaptive"
    assert row["best_lr"] == 0.05 and row["lr_edge"] is None and row["lr_tuned"] is True
    assert row["intervals"]["best_lr"]["wins"] > 0.5
    for k in ("steps_to_target", "examples_to_target", "time_to_target"):
        iv = row["intervals"][k]
        assert iv["lo"] is not None and iv["lo"] <= iv["value"] <= iv["hi"], k
    json.dumps(with_arm)  # JSON-serialisable


def test_the_set_up_counts_and_the_loop_ratio_leaves_it_out():
    fixed = [_fixed(32, 0.05, s, n) for s, n in SEED_STEPS.items()]
    adap = [_adaptive(0.05, s, n) for s, n in SEED_STEPS.items()]
    setup = 0.5
    row = analyze(fixed + adap, probe=_probe(adap, setup=setup), n_boot=200)["architectures"][0]["adaptive"]
    med = np.median(list(SEED_STEPS.values())) * T_STEP
    assert row["setup_s"] == setup
    assert row["time_to_target"] == pytest.approx(med + setup)
    assert row["loop_time_to_target"] == pytest.approx(med)
    assert row["vs_fixed"]["value"] == pytest.approx((med + setup) / med)
    assert row["vs_fixed_loop"]["value"] == pytest.approx(1.0)


def test_without_probe_entries_the_trials_own_times_are_used_and_said():
    fixed = [_fixed(32, 0.05, s, n) for s, n in SEED_STEPS.items()]
    adap = [_adaptive(0.05, s, n, setup=0.01, step_s=2 * T_STEP) for s, n in SEED_STEPS.items()]
    arch = analyze(fixed + adap, n_boot=100)["architectures"][0]
    row = arch["adaptive"]
    assert row["timing"] == "in-trial" and row["setup_s"] == pytest.approx(0.01)
    assert row["time_to_target"] == pytest.approx(np.median(list(SEED_STEPS.values())) * 2 * T_STEP + 0.01)
    assert any("no throughput probe for the adaptive run" in w for w in arch["warnings"])


def test_an_adaptive_run_that_does_not_reach_the_target_is_said_so():
    fixed = [_fixed(32, 0.05, s, n) for s, n in SEED_STEPS.items()]
    adap = [_adaptive(0.05, s, None) for s in SEED_STEPS]
    a = analyze(fixed + adap, probe=_probe(adap), n_boot=100)
    row = a["architectures"][0]["adaptive"]
    assert row["reached"] is False and row["time_to_target"] is None and row["vs_fixed"]["value"] is None
    assert "did not reach the target" in a["recommendation"]["text"]


def test_lr_extensions_extend_the_adaptive_arm_past_its_edge():
    spec = tiny_spec(lr_policy="tuned", lr_grid=(0.5, 1.0, 2.0), seeds=(0, 1), lr_extend=1)
    lrs = sorted({c.lr for c in spec.adaptive_trials(240, 6, 3)})
    steps = dict(zip(lrs, (90.0, 60.0, 30.0)))  # the largest rate is the fastest
    rows = [_adaptive(lr, s, steps[lr]) for lr in lrs for s in (0, 1)]
    ext = lr_extensions(spec, rows)
    assert [c.lr for c in ext] == pytest.approx([2 * lrs[-1]] * 2) and {c.seed for c in ext} == {0, 1}
    assert all(c.is_adaptive for c in ext)
    # a fixed grid whose best rate is inside: only the adaptive arm is extended
    fixed = [_fixed(16, lr, s, {lrs[0]: 90, lrs[1]: 30, lrs[2]: 60}[lr]) for lr in lrs for s in (0, 1)]
    assert all(c.is_adaptive for c in lr_extensions(spec, rows + fixed))


def test_probe_jobs_for_the_batch_sizes_the_runs_used():
    adap = [_adaptive(0.05, 0, 30.0), _adaptive(0.05, 1, 10.0), _adaptive(0.1, 0, None)]
    jobs = adaptive_probe_jobs(adap + [_fixed(32, 0.05, 0, 10)])
    kinds = sorted((k, dict(c.adaptive)["min"]) for k, c in jobs)
    assert kinds == [("setup", 32), ("step", 32), ("step", 64)]  # 64: only the first run got there
    assert probe_jobs([c for c, _ in adap]) == []  # not a fixed batch size's job


def test_the_questions_do_not_see_the_adaptive_arm():
    from minigd.study.questions import QuestionContext

    fixed = [_fixed(32, 0.05, 0, 10)]
    adap = [_adaptive(0.05, 0, 10.0)]
    ctx = QuestionContext(
        spec=tiny_spec(), ds=None, main_rows=fixed + adap, main_analysis={}, main_probe=_probe(adap), store=None
    )
    assert ctx.main_rows == fixed
    assert all(e.get("adaptive") is None for e in ctx.main_probe) and len(ctx.main_probe) == 2


# --------------------------------------------------------------------------- the store
def test_crafted_adaptive_rows_are_skipped_with_a_warning(tmp_path):
    cfg, res = _adaptive(0.05, 0, 10.0)
    path = tmp_path / "r.sqlite"
    with ResultStore(path) as s:
        s.put(cfg, res)
        assert [c for c, _ in s.rows()] == [cfg]
    con = sqlite3.connect(path)
    good_cfg = json.dumps(cfg.to_dict())
    bad = {
        "k1": (good_cfg.replace('"batch_size": "adaptive"', '"batch_size": "huge"'), res),
        "k2": (json.dumps(dict(cfg.to_dict(), adaptive=[["min", 0]])), res),  # out of range
        "k3": (json.dumps(dict(cfg.to_dict(), adaptive=[["nonsense", 1]])), res),  # not a setting
        "k4": (json.dumps(dict(cfg.to_dict(), adaptive=[])), res),  # no settings
        "k5": (good_cfg, dict(res, adaptive={"steps_by_batch": [[32, "x"]]})),
        "k6": (good_cfg, dict(res, adaptive=[1, 2])),
        "k7": (json.dumps(dict(TrialConfig().to_dict(), adaptive=[["min", 8]])), res),  # settings on a fixed B
    }
    for k, (c, r) in bad.items():
        con.execute("INSERT INTO trials VALUES (?, ?, 'ok', ?, NULL, 0)", (k, c, json.dumps(r)))
    con.commit()
    con.close()
    with ResultStore(path) as s, pytest.warns(RuntimeWarning, match="skipping the damaged trial row") as w:
        rows = s.rows()
    assert [c for c, _ in rows] == [cfg]
    assert {k for k in bad if any(repr(k) in str(x.message) for x in w)} == set(bad)


# --------------------------------------------------------------------------- the CLI end to end
@pytest.fixture(scope="module")
def cli_study(tmp_path_factory):
    pytest.importorskip("matplotlib")
    from minigd.cli import main

    out = tmp_path_factory.mktemp("adaptive") / "study"
    assert main(CLI + ["--out", str(out)]) == 0
    return out


def test_the_cli_runs_stores_and_resumes_the_arm(cli_study, capsys):
    from minigd.cli import main

    with ResultStore(cli_study / "results.sqlite") as s:
        rows = s.rows()
        keys = set(s.meta("study_keys"))
        probe = s.meta("throughput_probe")
    arm = [(c, r) for c, r in rows if c.is_adaptive]
    assert len(arm) == 2 and {c.seed for c, _ in arm} == {0, 1} and {c.key for c, _ in arm} <= keys
    assert all(r["status"] == "ok" and isinstance(r["adaptive"], dict) for _, r in arm)
    kinds = [e.get("adaptive") for e in probe]
    assert kinds.count(None) == 2 and kinds.count("setup") == 1 and kinds.count("step") >= 1
    assert all(e["median_s"] >= 0 for e in probe)
    capsys.readouterr()
    assert main(CLI + ["--out", str(cli_study)]) == 0  # resumed: nothing runs, the probe is re-used
    assert "6 already stored, 0 ran" in capsys.readouterr().out  # 2 batch sizes x 2 seeds + the arm's 2
    with ResultStore(cli_study / "results.sqlite") as s:
        assert s.meta("throughput_probe") == probe


def test_the_report_shows_the_arm(cli_study):
    rep = cli_study / "report"
    md = (rep / "summary.md").read_text(encoding="utf-8")
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + 2 + 1  # header, 2 batch sizes, the adaptive run
    assert table[-1].startswith("| adaptive (from B=32) |") and "not a fixed batch size" in table[-1]
    assert "**Adaptive batch size**" in md and "](adaptive_batch_size.png)" in md
    page = (rep / "summary.html").read_text(encoding="utf-8")
    assert 'src="adaptive_batch_size.png"' in page and "adaptive (from B=32)" in page
    js = json.loads((rep / "summary.json").read_text(encoding="utf-8"))
    assert set(js["adaptive"]) == {"value", "lo", "hi", "wins"}
    arm = js["architectures"][0]["adaptive"]
    assert arm["batch_size"] == "adaptive" and arm["in_fit"] is False
    if arm["reached"]:
        assert js["adaptive"]["value"] > 0 and 0 <= js["adaptive"]["wins"] <= 1
        assert js["adaptive"]["lo"] <= js["adaptive"]["value"] <= js["adaptive"]["hi"]
    png = rep / "adaptive_batch_size.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    analysis = json.loads((rep / "analysis.json").read_text(encoding="utf-8"))
    assert analysis["architectures"][0]["adaptive"]["trajectories"]


def test_no_adaptive_leaves_the_arm_out(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from minigd.cli import main

    out = tmp_path / "study"
    assert main(CLI + ["--no-adaptive", "--out", str(out)]) == 0
    assert "4 trials:" in capsys.readouterr().out  # 2 batch sizes x 2 seeds, no arm
    with ResultStore(out / "results.sqlite") as s:
        assert not any(c.is_adaptive for c, _ in s.rows())
        assert not any(e.get("adaptive") for e in s.meta("throughput_probe"))
    js = json.loads((out / "report" / "summary.json").read_text(encoding="utf-8"))
    assert js["adaptive"] == {"value": None, "lo": None, "hi": None, "wins": None}
    assert js["architectures"][0]["adaptive"] is None
    assert not (out / "report" / "adaptive_batch_size.png").exists()
    md = (out / "report" / "summary.md").read_text(encoding="utf-8")
    assert "**Adaptive batch size**" not in md and "| adaptive" not in md and "adaptive_batch_size.png" not in md
