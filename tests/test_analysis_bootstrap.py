"""The study's answer and how sure it is: bootstrap intervals and win rates on every headline
number, honest labels (not reached, LR not tuned, untuned B_crit), the throughput probe with
its in-trial fallback, the recommendation, and summary.json."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from minigd.gradstats import fit_tradeoff
from minigd.study.analysis import DID_NOT_REACH, _fit_many, analyze, best_lrs
from minigd.study.config import TrialConfig

S_MIN, B_CRIT = 100.0, 48.0
LR_FACTOR = {0.05: 1.4, 0.1: 1.0, 0.2: 1.3}  # 0.1 best, inside the rates tried
SIZES = (64, 64, 10)
ARCH = {"sizes": list(SIZES), "activation": "relu", "optimizer": "sgd", "norm": ""}


def step_time(B, a=1e-3, b=2e-5):
    return a + b * B


def trial(B, lr, seed, *, rng, sd=0.05, reached=True, factor=None, new=True, t=None):
    """A fake run_trial result near the trade-off curve, with per-seed noise."""
    S = S_MIN * (1 + B_CRIT / B) * (factor if factor is not None else LR_FACTOR[lr]) * math.exp(rng.normal(0, sd))
    t = step_time(B) if t is None else t
    res = {
        "status": "ok",
        "reached": reached,
        "steps_to_target": math.ceil(S) if reached else None,
        "examples_to_target": math.ceil(S) * B if reached else None,
        "time_to_target": math.ceil(S) * t if reached else None,
        "us_per_step": t * 1e6 * math.exp(rng.normal(0, 0.02)),
        "throughput": B / t,
        "final_val_accuracy": 0.95,
        "memory_bytes": 1000 + B,
    }
    if new:
        res["steps_to_target_interp"] = S if reached else None
        res["examples_to_target_interp"] = S * B if reached else None
        res["noise"] = [
            {"step": 0, "examples": 0, "noise_scale": 20.0, "where": "start"},
            {"step": S / 2, "examples": S / 2 * B, "noise_scale": 40.0, "where": "mid"},
            {"step": S, "examples": S * B, "noise_scale": 55.0 + rng.normal(0, 1), "where": "target"},
            {"step": 2 * S, "examples": 2 * S * B, "noise_scale": 90.0, "where": "end"},
        ]
    else:  # stored before tagged points: positional fallback (mid = nearest half the run)
        res["noise"] = [
            {"step": s, "examples": s * B, "noise_scale": ns} for s, ns in ((0, 20.0), (50, 40.0), (100, 90.0))
        ]
    return res


def study(Bs, *, seeds=5, lrs=(0.05, 0.1, 0.2), seed=0, sd=0.05, policy="tuned", override=None, new=True, sizes=SIZES):
    """(cfg, res) rows; ``override(B, lr) -> dict of trial() kwargs`` changes chosen cells."""
    rng = np.random.default_rng(seed)
    rows = []
    for B in Bs:
        for lr in lrs:
            for s in range(seeds):
                kw = dict(override(B, lr) or {}) if override else {}
                cfg = TrialConfig(sizes=sizes, batch_size=B, lr=lr, seed=s, target=0.95, lr_policy=policy)
                rows.append((cfg, trial(B, lr, s, rng=rng, sd=sd, new=new, **kw)))
    return rows


def probe_for(Bs, *, spread=0.01, seed=1, t=step_time, arch=ARCH):
    rng = np.random.default_rng(seed)
    out = []
    for B in Bs:
        rounds = [t(B) * math.exp(rng.normal(0, spread)) for _ in range(7)]
        out.append(
            {
                "arch": dict(arch),
                "batch_size": B,
                "full_batch": False,
                "round_s": rounds,
                "median_s": float(np.median(rounds)),
                "lo_s": min(rounds),
                "hi_s": max(rounds),
                "steps_per_round": 50,
                "blas_threads": 1,
                "numba_threads": 1,
            }
        )
    return out


def intervals(a):
    """Every {"value", "lo", "hi"} dict in an analysis."""
    out = []

    def walk(x):
        if isinstance(x, dict):
            if {"value", "lo", "hi"} <= set(x):
                out.append(x)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(a)
    return out


# --------------------------------------------------------------------------- clear and ambiguous


def test_a_clearly_fastest_batch_size_wins_nearly_every_resample():
    Bs = [8, 32, 128, 512]
    a = analyze(study(Bs), probe=probe_for(Bs), seed=0, n_boot=1000)
    arch = a["architectures"][0]
    fast = arch["headline"]["fastest_wall_time"]
    assert fast["value"] == 32
    assert fast["wins"] >= 0.95
    assert fast["lo"] == fast["hi"] == 32
    rec = a["recommendation"]
    assert rec["batch_size"] == 32 and rec["lo"] == rec["hi"] == 32 and rec["wins"] == fast["wins"]
    assert rec["resolvable"] is True
    assert rec["text"].startswith("Use batch size 32 ")
    # the recommended batch size's time: steps x the probe's median step time, with an interval
    row = next(r for r in arch["per_batch"] if r["batch_size"] == 32)
    t = rec["time_to_target"]
    assert t["value"] == pytest.approx(row["steps_to_target"] * row["step_time_s"])
    assert t["lo"] < t["value"] < t["hi"]
    assert row["p_fastest"] == pytest.approx(fast["wins"])


def test_two_batch_sizes_within_noise_share_the_wins_and_the_interval_spans_both():
    Bs = [8, 32, 64, 512]  # time(32) ~ 0.41 s, time(64) ~ 0.40 s: within the seeds' noise
    a = analyze(study(Bs, sd=0.15), probe=probe_for(Bs), seed=0, n_boot=1000)
    fast = a["architectures"][0]["headline"]["fastest_wall_time"]
    assert fast["value"] in (32, 64)
    assert 0.2 < fast["wins"] < 0.85
    assert fast["lo"] <= 32 and fast["hi"] >= 64
    p = {r["batch_size"]: r["p_fastest"] for r in a["architectures"][0]["per_batch"]}
    assert p[32] + p[64] > 0.95 and min(p[32], p[64]) > 0.1


def test_bootstrap_is_deterministic_for_a_seed_and_changes_with_it():
    Bs = [8, 32, 64, 512]
    rows, probe = study(Bs, sd=0.15), probe_for(Bs)
    a0 = analyze(rows, probe=probe, seed=0, n_boot=300)
    assert json.dumps(a0) == json.dumps(analyze(rows, probe=probe, seed=0, n_boot=300))
    a1 = analyze(rows, probe=probe, seed=1, n_boot=300)
    h0, h1 = a0["architectures"][0]["headline"], a1["architectures"][0]["headline"]
    assert h0["fastest_wall_time"]["value"] == h1["fastest_wall_time"]["value"]  # the point estimate
    assert h0 != h1  # the resamples
    assert h0["fastest_wall_time"]["wins"] != h1["fastest_wall_time"]["wins"]


def test_every_interval_contains_its_point_estimate():
    Bs = [1, 4, 16, 64, 256, 1024]
    a = analyze(study(Bs, sd=0.2), probe=probe_for(Bs, spread=0.05), seed=3, n_boot=500)
    ivs = [d for d in intervals(a) if d["value"] is not None and d["lo"] is not None]
    assert len(ivs) > 40
    for d in ivs:
        assert d["lo"] <= d["value"] <= d["hi"], d
        if d.get("wins") is not None:
            assert 0 <= d["wins"] <= 1
    h = a["architectures"][0]["headline"]
    assert h["critical_batch_size_fit"]["wins"] is None and h["time_to_target"]["wins"] is None
    assert h["critical_batch_size_fit"]["lo"] < h["critical_batch_size_fit"]["hi"]  # a real spread
    assert h["critical_batch_size_fit"]["lo"] < B_CRIT < h["critical_batch_size_fit"]["hi"]


def test_n_boot_zero_gives_point_estimates_only():
    Bs = [8, 32, 128, 512]
    a = analyze(study(Bs), probe=probe_for(Bs), n_boot=0)
    h = a["architectures"][0]["headline"]
    assert h["fastest_wall_time"] == {"value": 32, "lo": None, "hi": None, "wins": None}
    assert "bootstrap" not in a["recommendation"]["text"]
    with pytest.raises(ValueError, match="n_boot"):
        analyze(study(Bs), n_boot=-1)


# --------------------------------------------------------------------------- honest labels


def test_a_batch_size_that_did_not_reach_the_target_has_no_regime_and_is_out_of_the_fit():
    Bs = [1, 4, 16, 64, 256, 1024]
    # B = 1: only 2 of 5 seeds reach at any rate -> the median does not
    rows = study(Bs, override=lambda B, lr: {"reached": False} if B == 1 else None)
    rows = [
        (c, dict(r, reached=True, steps_to_target=r["steps_to_target"] or 9999, steps_to_target_interp=9999.0))
        if c.batch_size == 1 and c.seed < 2
        else (c, r)
        for c, r in rows
    ]
    a = analyze(rows, probe=probe_for(Bs), n_boot=200)
    arch = a["architectures"][0]
    r1 = arch["per_batch"][0]
    assert r1["batch_size"] == 1 and r1["reached"] is False and r1["status"] == DID_NOT_REACH
    assert r1["regime"] is None and r1["in_fit"] is False and r1["steps_to_target"] is None
    assert r1["time_to_target"] is None and r1["lr_edge"] is None
    assert all(r["regime"] not in (None, "unknown") for r in arch["per_batch"][1:])
    assert arch["answers"]["fewest_examples"] == 4  # not 1: it did not reach the target
    assert any(DID_NOT_REACH in w and "[1]" in w for w in arch["warnings"])
    ok = [r for r in arch["per_batch"] if r["in_fit"]]
    want = fit_tradeoff([r["steps_to_target"] for r in ok], [r["examples_to_target"] for r in ok])
    assert arch["tradeoff_fit"]["b_crit"] == pytest.approx(want.b_crit, rel=1e-9)


def test_a_best_lr_at_the_edge_is_flagged_and_left_out_of_the_fit():
    Bs = [1, 4, 16, 64, 256, 1024]
    # at B = 256 the largest rate tried is the best: its optimum may lie beyond
    faster = {0.05: 1.6, 0.1: 1.3, 0.2: 1.0}
    rows = study(Bs, override=lambda B, lr: {"factor": faster[lr] * 1.4} if B == 256 else None)
    a = analyze(rows, probe=probe_for(Bs), n_boot=200)
    arch = a["architectures"][0]
    by_b = {r["batch_size"]: r for r in arch["per_batch"]}
    edge = by_b[256]
    assert edge["best_lr"] == 0.2 and edge["lr_edge"] == "high" and edge["lr_tuned"] is False
    assert edge["in_fit"] is False and edge["reached"] is True
    assert edge["regime"] is not None  # it reached the target: it has a regime
    assert all(by_b[B]["lr_tuned"] is True and by_b[B]["in_fit"] for B in Bs if B != 256)
    ok = [by_b[B] for B in Bs if B != 256]
    want = fit_tradeoff([r["steps_to_target"] for r in ok], [r["examples_to_target"] for r in ok])
    assert arch["tradeoff_fit"]["b_crit"] == pytest.approx(want.b_crit, rel=1e-9)
    assert any("LR not tuned" in w and "256" in w for w in arch["warnings"])
    assert best_lrs(rows)[256] == {"best_lr": 0.2, "lrs_tried": [0.05, 0.1, 0.2], "at_edge": "high", "reached": True}


def test_best_lrs_helper():
    rows = study([8, 32], lrs=(0.05, 0.1, 0.2))
    # B = 8: the smallest rate is best -> low edge; B = 32: 0.1 inside
    rows = [
        (c, dict(r, steps_to_target_interp=1.0, steps_to_target=1)) if (c.batch_size, c.lr) == (8, 0.05) else (c, r)
        for c, r in rows
    ]
    failed = (dataclasses.replace(rows[0][0], lr=0.01), {"status": "failed", "error": "boom"})
    got = best_lrs(rows + [failed])  # a failed trial is not a rate tried
    assert got[8] == {"best_lr": 0.05, "lrs_tried": [0.05, 0.1, 0.2], "at_edge": "low", "reached": True}
    assert got[32] == {"best_lr": 0.1, "lrs_tried": [0.05, 0.1, 0.2], "at_edge": None, "reached": True}
    # not reaching at any rate: no edge (there is nothing to extend toward)
    nr = [(c, dict(r, reached=False)) for c, r in rows]
    assert best_lrs(nr)[32]["at_edge"] is None and best_lrs(nr)[32]["reached"] is False
    # one rate tried: no edge
    one = [(c, r) for c, r in rows if c.lr == 0.1]
    assert best_lrs(one)[32] == {"best_lr": 0.1, "lrs_tried": [0.1], "at_edge": None, "reached": True}
    # the analysis picks the same rates
    a = analyze(rows, n_boot=0)["architectures"][0]
    assert {r["batch_size"]: r["best_lr"] for r in a["per_batch"]} == {B: v["best_lr"] for B, v in got.items()}


@pytest.mark.parametrize(
    "policy, label", [("linear", "untuned (linear rule)"), ("sqrt", "untuned (sqrt rule)"), ("tuned", "tuned")]
)
def test_b_crit_of_a_scaling_rule_is_labelled_untuned(policy, label, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from minigd.cli import _print_answers
    from minigd.report import write_report

    Bs = [1, 4, 16, 64, 256]
    lrs = (0.1,) if policy != "tuned" else (0.05, 0.1, 0.2)
    a = analyze(study(Bs, lrs=lrs, policy=policy), probe=probe_for(Bs), n_boot=100)
    arch = a["architectures"][0]
    assert arch["b_crit_tuning"] == label
    assert arch["recommendation"]["critical_batch_size_tuning"] == label
    assert arch["tradeoff_fit"]["b_crit"] > 0
    write_report(a, tmp_path)
    md = (tmp_path / "summary.md").read_text(encoding="utf-8")
    html_ = (tmp_path / "summary.html").read_text(encoding="utf-8")
    js = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert js["architectures"][0]["b_crit_tuning"] == label
    _print_answers(a, None)
    out = capsys.readouterr().out
    if policy == "tuned":
        assert "untuned" not in md and "untuned" not in a["recommendation"]["text"] and "untuned" not in out
    else:
        assert label in md and label in html_ and label in a["recommendation"]["text"] and label in out
        from minigd.report.plots import b_crit_label

        assert b_crit_label(arch) == f"B_crit (fit, {label})"  # the plots' legend


# --------------------------------------------------------------------------- timing: probe and fallback


def test_probe_timing_and_in_trial_fallback():
    Bs = [8, 32, 128, 512]
    slow = lambda B: 3 * step_time(B)  # the probe sees a different machine than the trials
    probe = probe_for([8, 32, 128], t=slow)  # nothing for B = 512
    a = analyze(study(Bs), probe=probe, n_boot=100)
    arch = a["architectures"][0]
    by_b = {r["batch_size"]: r for r in arch["per_batch"]}
    for e in probe:
        r = by_b[e["batch_size"]]
        assert r["timing"] == "probe"
        assert r["step_time_s"] == pytest.approx(float(np.median(e["round_s"])))
        assert r["time_to_target"] == pytest.approx(r["steps_to_target"] * r["step_time_s"])
        assert r["throughput"] == pytest.approx(r["batch_size"] / r["step_time_s"])
    r = by_b[512]
    assert r["timing"] == "in-trial"
    assert r["step_time_s"] == pytest.approx(r["us_per_step_in_trial"] * 1e-6, rel=0.05)
    assert any("no throughput probe" in w and "[512]" in w for w in arch["warnings"])
    # without a probe every batch size falls back; a probe for another architecture does not match
    other = probe_for(Bs, arch=dict(ARCH, sizes=[64, 32, 10]))
    b = analyze(study(Bs), probe=other, n_boot=0)["architectures"][0]
    assert {r["timing"] for r in b["per_batch"]} == {"in-trial"}


def test_unresolvable_when_every_time_is_within_the_probes_spread():
    Bs = [32, 64]
    # the probe's rounds spread +-40%: the 3% difference between the two cannot be resolved
    probe = probe_for(Bs)
    for e in probe:
        e["lo_s"], e["hi_s"] = 0.6 * e["median_s"], 1.4 * e["median_s"]
    a = analyze(study(Bs, sd=0.01), probe=probe, n_boot=100)
    rec = a["recommendation"]
    assert rec["resolvable"] is False
    assert "both batch sizes that reached it lie within the timing's own spread" in rec["text"]
    assert "cannot resolve" in rec["text"]
    a = analyze(study(Bs, sd=0.01), probe=probe_for(Bs, spread=0.001), n_boot=100)
    assert a["recommendation"]["resolvable"] is True


def test_an_answer_at_the_edge_of_what_was_measured_says_so():
    Bs = [32, 128, 512]  # time falls toward 32: the fastest is the smallest swept
    a = analyze(study(Bs), probe=probe_for(Bs, t=lambda B: 1e-4 * B), n_boot=100)
    rec = a["recommendation"]
    assert rec["batch_size"] == 32
    assert "outside what was measured" in rec["text"]
    assert any("smallest batch size swept" in e for e in rec["edge"])


def test_failed_fits_in_resamples_count_toward_nothing_and_are_reported():
    Bs = [4, 16, 64, 256]
    # B = 4, 16, 64 reach in only 3 of 5 seeds: a resample loses each with probability ~0.32,
    # and two of them leave too few points to fit (~24% of resamples)
    rows = [
        (c, dict(r, reached=False)) if c.batch_size in (4, 16, 64) and c.seed >= 3 else (c, r) for c, r in study(Bs)
    ]
    a = analyze(rows, probe=probe_for(Bs), n_boot=400)
    arch = a["architectures"][0]
    frac = arch["bootstrap"]["fit_failed_fraction"]
    assert 0.12 < frac < 0.4
    assert a["bootstrap"]["fit_failed_fraction"] == frac
    # more failures than a 90% interval can leave out: the resamples that did fit are the
    # ones that reproduce the point, so B_crit (and S_min, E_min) get no interval
    for k in ("critical_batch_size_fit", "s_min", "e_min"):
        bc = arch["headline"][k]
        assert bc["value"] is not None and bc["lo"] is None and bc["hi"] is None and bc["unresolved"]
    assert any(
        f"fit failed in {100 * frac:.0f}% of bootstrap resamples" in w and "unresolved" in w for w in arch["warnings"]
    )
    # with every seed reaching, no resample fails and B_crit has its interval
    a = analyze(study(Bs), probe=probe_for(Bs), n_boot=400)
    arch = a["architectures"][0]
    assert arch["bootstrap"]["fit_failed_fraction"] == 0.0
    bc = arch["headline"]["critical_batch_size_fit"]
    assert bc["lo"] <= bc["value"] <= bc["hi"] and not bc.get("unresolved")


def test_cost_intervals_are_read_at_the_chosen_learning_rate():
    """Steps/examples/time to target of a batch size are read at the learning rate the point
    estimate chose: with three rates of equal noisy cost, re-selecting the minimum in every
    resample would put most resamples below the point (the point at the interval's top)."""
    Bs = [8, 32, 128, 512]
    rows = study(Bs, lrs=(0.05, 0.1, 0.2), sd=0.3, override=lambda B, lr: {"factor": 1.0})  # every rate equally good
    a = analyze(rows, probe=probe_for(Bs), seed=1, n_boot=1000)
    for r in a["architectures"][0]["per_batch"]:
        iv = r["intervals"]["steps_to_target"]
        assert iv["lo"] < iv["value"] < iv["hi"], (r["batch_size"], iv)


# --------------------------------------------------------------------------- new fields and old rows


def test_interpolated_steps_and_tagged_noise_points_are_used():
    Bs = [8, 32, 128, 512]
    a = analyze(study(Bs), n_boot=0)["architectures"][0]
    r = a["per_batch"][1]
    assert r["steps_to_target"] != int(r["steps_to_target"])  # the interpolated (float) count
    assert r["noise_scale_middle"] == 40.0  # the "mid" point, not the positional
    assert r["noise_scale_target"] == pytest.approx(55.0, abs=3)  # the "target" point, not the last (90)
    assert a["headline"]["noise_scale_target"]["value"] == pytest.approx(55.0, abs=2)
    assert a["answers"]["critical_batch_size_noise"] == 40.0


def test_old_rows_without_interp_where_or_probe_still_analyse(tmp_path):
    pytest.importorskip("matplotlib")
    from minigd.report import write_report

    Bs = [1, 4, 16, 64, 256, 1024]
    rows = study(Bs, new=False)
    for _, r in rows:
        assert "steps_to_target_interp" not in r and all("where" not in p for p in r["noise"])
    a = analyze(rows, n_boot=200)
    arch = a["architectures"][0]
    assert {r["timing"] for r in arch["per_batch"]} == {"in-trial"}
    r = arch["per_batch"][2]
    assert r["steps_to_target"] == int(r["steps_to_target"])  # the evaluation's step count
    assert r["noise_scale_middle"] == 40.0  # positional: nearest half of 100 steps
    assert r["noise_scale_target"] == 90.0  # no target point: the last one
    assert arch["tradeoff_fit"]["b_crit"] == pytest.approx(B_CRIT, rel=0.2)
    assert a["recommendation"]["batch_size"] == arch["answers"]["fastest_wall_time"] is not None
    write_report(a, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["recommendation"]["batch_size"] is not None


def test_several_architectures_one_recommendation_each_and_the_fastest_on_top():
    Bs = [8, 32, 128, 512]
    small = study(Bs, sizes=(64, 16, 10))
    big = [(c, dict(r, us_per_step=r["us_per_step"] * 4)) for c, r in study(Bs, sizes=(64, 256, 10))]
    a = analyze(small + big, n_boot=100)
    assert len(a["architectures"]) == 2
    for arch in a["architectures"]:
        assert arch["recommendation"]["batch_size"] is not None
        assert arch["recommendation"]["architecture"] in arch["recommendation"]["text"]
    assert a["recommendation"]["architecture"] == "64-16-10 relu sgd"
    assert a["recommendation"]["text"].startswith("Of the 2 architectures, 64-16-10 relu sgd")


def test_nothing_reached_gives_an_empty_recommendation():
    rows = [(c, dict(r, reached=False)) for c, r in study([8, 32])]
    a = analyze(rows, n_boot=50)
    rec = a["recommendation"]
    assert rec["batch_size"] is None and rec["time_to_target"]["value"] is None
    assert "No recommendation" in rec["text"]
    assert analyze([], n_boot=10)["recommendation"]["batch_size"] is None


# --------------------------------------------------------------------------- the vectorised fit


def test_the_resamples_fit_agrees_with_fit_tradeoff():
    rng = np.random.default_rng(7)
    B = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024.0])
    S, E, M = [], [], []
    for _ in range(120):
        bc, smin = math.exp(rng.uniform(-1, 8)), rng.uniform(10, 1000)
        s = smin * (1 + bc / B) * np.exp(rng.normal(0, rng.choice([0.0, 0.03, 0.3]), B.size))
        S.append(s)
        E.append(s * B)
        M.append(rng.random(B.size) < 0.7)
    S, E, M = map(np.array, (S, E, M))
    M[0] = False
    M[0, :2] = True  # 2 points: the fit fails
    M[1] = False
    M[1, [3, 3]] = True
    for E_ in (E, E * np.exp(rng.normal(0, 1e-3, E.shape))):  # same batch sizes everywhere, or not
        s_min, e_min, b_crit = _fit_many(S, E_, M)
        assert np.isnan(b_crit[:2]).all()
        limits = 0
        for i in range(2, len(S)):
            if M[i].sum() < 3:
                assert np.isnan(b_crit[i])
                continue
            f = fit_tradeoff(S[i][M[i]], E_[i][M[i]])
            if f.b_crit in (0.0, math.inf):
                limits += 1
                assert b_crit[i] == f.b_crit and s_min[i] == pytest.approx(f.s_min, rel=1e-9)
                continue
            assert b_crit[i] == pytest.approx(f.b_crit, rel=1e-6)
            assert s_min[i] == pytest.approx(f.s_min, rel=1e-6)
            assert e_min[i] == pytest.approx(f.e_min, rel=1e-6)


# --------------------------------------------------------------------------- summary.json and the report


def test_summary_json_is_written_with_the_documented_keys(tmp_path):
    pytest.importorskip("matplotlib")
    from minigd.report import write_report
    from minigd.report.summary import HEADLINE_KEYS

    Bs = [1, 4, 16, 64, 256, 1024]
    rows = study(Bs, override=lambda B, lr: {"reached": False} if B == 1 else None)
    a = analyze(rows, probe=probe_for(Bs[1:]), seed=5, n_boot=200)
    paths = write_report(a, tmp_path)
    assert str(tmp_path / "summary.json") in paths
    text = (tmp_path / "summary.json").read_text(encoding="utf-8")

    def no_constants(c):
        raise ValueError(f"not strict JSON: {c}")

    js = json.loads(text, parse_constant=no_constants)
    assert js["schema"] == 1
    rec = js["recommendation"]
    for k in (
        "batch_size",
        "lo",
        "hi",
        "wins",
        "time_to_target",
        "fewest_examples",
        "critical_batch_size",
        "smallest_reasonable",
        "resolvable",
        "text",
    ):
        assert k in rec, k
    assert rec["batch_size"] == a["recommendation"]["batch_size"] and rec["text"] == a["recommendation"]["text"]
    assert set(rec["time_to_target"]) == {"value", "lo", "hi"}
    for k in ("fewest_examples", "critical_batch_size", "smallest_reasonable"):
        assert set(rec[k]) >= {"value", "lo", "hi", "wins"}
    assert set(js["headline"]) == set(HEADLINE_KEYS)
    for k, d in js["headline"].items():
        assert set(d) >= {"value", "lo", "hi", "wins"}, k
    assert js["headline"]["fastest_wall_time"]["value"] == rec["batch_size"]
    assert js["bootstrap"]["resamples"] == 200 and js["bootstrap"]["seed"] == 5
    assert isinstance(js["questions"], dict)
    (arch,) = js["architectures"]
    row1 = arch["per_batch"][0]
    assert row1["batch_size"] == 1 and row1["reached"] is False and row1["regime"] is None
    assert row1["timing"] == "in-trial" and arch["per_batch"][1]["timing"] == "probe"
    assert set(row1["best_lr"]) >= {"value", "lo", "hi", "wins"}
    # the report begins with the recommendation; tables show intervals and win rates
    md = (tmp_path / "summary.md").read_text(encoding="utf-8")
    first = md.split("\n\n")[1]
    assert first == "**Recommendation:** " + a["recommendation"]["text"]
    page = (tmp_path / "summary.html").read_text(encoding="utf-8")
    assert page.index("Recommendation:") < page.index("<h2>")
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert "fastest in" in table[0] and "best lr wins" in table[0]
    assert any(" [" in ln and "%" in ln for ln in table[2:])
    assert next(ln for ln in table if ln.startswith("| 1 |")).rstrip(" |").endswith(DID_NOT_REACH)


def test_summary_json_of_an_unresolved_fit_is_strict_json(tmp_path):
    from minigd.report.summary import summary_json

    arch = {
        "sizes": [4, 2],
        "tradeoff_fit": {"s_min": 0.0, "e_min": 300.0, "b_crit": float("inf")},
        "answers": {"critical_batch_size_fit": float("inf")},
        "headline": {"critical_batch_size_fit": {"value": float("inf"), "lo": 40.0, "hi": float("inf"), "wins": None}},
        "per_batch": [{"batch_size": 4, "steps_to_target": float("nan")}],
    }
    js = summary_json({"architectures": [arch]})
    text = json.dumps(js, allow_nan=False)
    bc = json.loads(text)["architectures"][0]["headline"]["critical_batch_size_fit"]
    assert bc["value"] is None and bc["lo"] == 40.0 and bc["hi"] is None and bc["unbounded"] == ["value", "hi"]
    assert js["recommendation"]["batch_size"] is None and js["recommendation"]["text"]


def test_cli_prints_intervals_and_ends_with_the_recommendation(capsys):
    from minigd.cli import _print_answers

    Bs = [8, 32, 128, 512]
    a = analyze(study(Bs), probe=probe_for(Bs), n_boot=300)
    _print_answers(a, "/tmp/somewhere")
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "fastest batch size" in ln)
    assert "32" in line and "wins" in line and "% of resamples" in line and " s" in line
    assert "critical batch size (steps/examples fit)" in out and "[" in out
    assert out.rstrip().endswith(a["recommendation"]["text"])
    assert out.rstrip().splitlines()[-1].startswith("Recommendation: Use batch size 32")


def test_the_answer_does_not_depend_on_the_order_rows_were_stored():
    """The store returns trials in the order they finished, which differs between two runs of
    one study; the analysis (its bootstrap included) must not."""
    Bs = (8, 32, 128, 512)
    rows = study(Bs, sd=0.2)
    shuffled = [rows[i] for i in np.random.default_rng(3).permutation(len(rows))]
    a = analyze(rows, probe=probe_for(Bs), seed=4, n_boot=300)
    b = analyze(shuffled, probe=probe_for(Bs), seed=4, n_boot=300)
    assert json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def test_seeds_are_resampled_jointly_across_learning_rates():
    """The seeds are shared by every cell, and a resample draws them once: a second learning
    rate whose trials repeat the first's seed by seed adds no information, so it must not
    move the steps' interval (resampling each cell on its own would let the best-rate
    selection take the luckier of two independent draws and shift the interval low)."""
    Bs = (8, 32, 128, 512)
    one = study(Bs, lrs=(0.1,), sd=0.3)
    two = one + [(dataclasses.replace(c, lr=0.2), dict(r)) for c, r in one]
    a = analyze(one, probe=probe_for(Bs), seed=2, n_boot=500)
    b = analyze(two, probe=probe_for(Bs), seed=2, n_boot=500)
    for ra, rb in zip(a["architectures"][0]["per_batch"], b["architectures"][0]["per_batch"]):
        ia, ib = ra["intervals"]["steps_to_target"], rb["intervals"]["steps_to_target"]
        assert (ib["lo"], ib["value"], ib["hi"]) == pytest.approx((ia["lo"], ia["value"], ia["hi"]))
