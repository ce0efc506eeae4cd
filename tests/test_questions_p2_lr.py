"""The powers_of_two and lr_scaling arms of `minigd study --questions` (issue 16): their
estimators on synthetic data with known answers, and their mechanics on a tiny study
(the probe measures every batch size it says it does; the sub-sweep is Adam's, tagged,
extended only past an edge; `minigd report` re-answers the same from the file)."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest

from minigd.report import write_report
from minigd.study import ResultStore, SweepSpec, run_study
from minigd.study.config import TrialConfig
from minigd.study.questions import lr_scaling as lrs
from minigd.study.questions import powers_of_two as p2

KEYS = {"name", "question", "answer", "value", "lo", "hi", "unit", "conditions", "plot", "details"}


# --------------------------------------------------------------------------- powers of two: the estimator


def test_examples_per_step_counts_partial_last_batches():
    assert p2.examples_per_step(8, 1438, 100) == 8  # part of one epoch: whole batches
    assert p2.examples_per_step(127, 1438, 24) == pytest.approx(1438 / 12)  # two whole epochs of 12 steps
    assert p2.examples_per_step(127, 1438, 13) == pytest.approx((1438 + 127) / 13)


@pytest.mark.parametrize("n", [100_000, 1438])  # rounds inside an epoch / whole epochs
def test_advantage_is_zero_on_a_linear_cost_and_finds_an_injected_speedup(n):
    powers = [8, 16, 32, 64, 128]
    bs = sorted({B for P in powers for B in range(P - 3, P + 4)})
    col = {B: i for i, B in enumerate(bs)}
    steps = {B: 240 for B in bs}
    E = np.array([p2.examples_per_step(B, n, steps[B]) for B in bs])
    t = 20e-6 + 0.5e-6 * E  # fixed cost per step + cost per example
    C = (t / E)[None]
    assert np.allclose(p2._advantages(C, E, col, powers), 0, atol=1e-12)
    t2 = t.copy()
    t2[col[32]] *= 0.9  # batch 32 is 10% faster than its trend
    adv = p2._advantages((t2 / E)[None], E, col, powers)[0]
    assert adv[powers.index(32)] == pytest.approx(0.1)
    assert np.allclose(np.delete(adv, powers.index(32)), 0, atol=1e-12)
    missing = {B: i for B, i in col.items() if B not in (29, 30, 31)}  # no left neighbours of 32
    assert math.isnan(p2._advantages(C, E, missing, powers)[0, powers.index(32)])


def test_prediction_band_measures_the_neighbours_scatter():
    bs = list(range(29, 36))
    col = {B: i for i, B in enumerate(bs)}
    E = np.array(bs, float)
    c = (20e-6 + 0.5e-6 * E) / E
    assert p2.prediction_band(c, E, col, 32) == pytest.approx((0, 0), abs=1e-12)
    noisy = c * (1 + 0.01 * np.array([1, -1, 1, 0, -1, 1, -1]))  # +-1% set-up effects
    scatter, band = p2.prediction_band(noisy, E, col, 32)
    assert 0.005 < scatter < 0.02 and band > 2 * scatter


def test_design_fits_the_budget_and_the_data():
    fast = types.SimpleNamespace(
        n_train=1438, main_probe=[{"batch_size": 1, "median_s": 1e-5}, {"batch_size": 1438, "median_s": 1e-3}]
    )
    powers, bs, rounds = p2.design(fast)
    assert powers == [8, 16, 32, 64, 128, 256, 512, 1024]
    assert bs == sorted({B for P in powers for B in range(P - 3, P + 4)})
    assert p2.MIN_ROUNDS <= rounds <= p2.MAX_ROUNDS
    slow = types.SimpleNamespace(
        n_train=1438, main_probe=[{"batch_size": 1, "median_s": 0.05}, {"batch_size": 1438, "median_s": 5.0}]
    )
    powers, bs, rounds = p2.design(slow)  # the largest Ps dropped to fit the budget
    assert powers[0] == 8 and powers[-1] < 1024 and p2.MIN_ROUNDS <= rounds <= p2.MAX_ROUNDS
    assert p2.design(types.SimpleNamespace(n_train=30, main_probe=[]))[0] == [8, 16]  # 19 <= 30 < 35
    assert p2.design(types.SimpleNamespace(n_train=10, main_probe=[]))[0] == []


# --------------------------------------------------------------------------- lr scaling: the estimator


def _synthetic_rows(alpha, c, Bs, seeds=(1, 2, 3)):
    """Trials whose fewest steps fall at the learning rate c * B^alpha (on the grid 2^k)."""
    rows = []
    for B in Bs:
        best = math.log2(c * B**alpha)
        for k in range(round(best) - 2, round(best) + 3):
            for s in seeds:
                steps = 100 * (1 + (k - best) ** 2) + s
                cfg = TrialConfig(batch_size=B, lr=2.0**k, seed=s)
                rows.append(
                    (
                        cfg,
                        {
                            "status": "ok",
                            "reached": True,
                            "steps_to_target": steps,
                            "examples_to_target": steps * B,
                            "final_val_accuracy": 0.96,
                        },
                    )
                )
    return rows


@pytest.mark.parametrize("alpha,Bs", [(1.0, (2, 4, 8, 16, 32, 64)), (0.5, (4, 16, 64, 256))])
def test_fit_alpha_recovers_the_exponent(alpha, Bs):
    rows = _synthetic_rows(alpha, 2.0**-8, Bs)
    per_batch = [{"batch_size": B, "reached": True, "lr_tuned": True} for B in Bs]
    f = lrs.fit_alpha(rows, per_batch, 1e9, seed=0, label="t")
    assert f["alpha"]["value"] == pytest.approx(alpha)
    assert f["alpha"]["lo"] <= alpha <= f["alpha"]["hi"]
    assert f["batch_sizes"] == list(Bs) and f["fit_failed_fraction"] == 0
    # B_crit cuts the range; with fewer than 3 below it, every tuned batch size is used
    g = lrs.fit_alpha(rows, per_batch, Bs[3] + 0.5, seed=0, label="t")
    assert g["batch_sizes"] == list(Bs[:4]) and "below B_crit" in g["scope"]
    h = lrs.fit_alpha(rows, per_batch, Bs[1] + 0.5, seed=0, label="t")
    assert h["batch_sizes"] == list(Bs) and "fewer than 3" in h["scope"]
    assert "error" in lrs.fit_alpha(rows, per_batch[:1], None, seed=0, label="t")
    # one grid step at an end of 6 batch sizes a factor 2 apart moves the slope by 6/(6*7)
    assert lrs.resolution([2, 4, 8, 16, 32, 64]) == pytest.approx(6 / 42)


def test_verdict_names_the_rules_the_interval_keeps():
    v = lambda lo, hi: lrs.verdict({"value": (lo + hi) / 2, "lo": lo, "hi": hi})
    assert "neither is excluded" in v(0.4, 1.1)
    assert v(0.8, 1.1).startswith("consistent with the linear rule")
    assert v(0.3, 0.7).startswith("consistent with the square-root rule")
    assert v(0.75, 1.0 - 1e-15).startswith("consistent with the linear rule")  # a fitted 1 in floats
    assert "steeper" in v(1.2, 1.5) and "flatter" in v(0.1, 0.3) and "both excluded" in v(0.6, 0.9)


# --------------------------------------------------------------------------- both arms on a tiny study


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(p2, "P_MAX", 16)  # P = 8, 16: 14 batch sizes
    mp.setattr(p2, "MIN_ROUNDS", 3)
    mp.setattr(p2, "MAX_ROUNDS", 3)
    mp.setattr(p2, "N_BOOT", 300)
    mp.setattr(lrs, "OTHER_BATCH_SIZES", (4, 16, 64))
    mp.setattr(lrs, "LR_FACTORS", (1.0, 2.0, 4.0, 8.0))
    mp.setattr(lrs, "N_SEEDS", 2)
    mp.setattr(lrs, "EXTEND", 2)
    mp.setattr(lrs, "N_BOOT", 300)
    out = tmp_path_factory.mktemp("qp2lr")
    spec = SweepSpec(
        batch_sizes=(8, 32, 128),
        lr_grid=(1.0, 2.0, 4.0, 8.0),
        n_seeds=2,
        widths=(16,),
        max_epochs=4,
        target=0.9,
        lr_extend=1,
    )
    res = run_study(spec, out, workers=1, questions=("powers_of_two", "lr_scaling"), report=write_report)
    yield out, spec, res
    mp.undo()


def test_probe_measures_every_batch_size_it_says_it_does(tiny):
    out, spec, res = tiny
    q = res["analysis"]["questions"]["powers_of_two"]
    assert KEYS <= set(q) and q["value"] is not None, q["answer"]
    d = q["details"]
    planned = sorted({B for P in (8, 16) for B in range(P - 3, P + 4)})
    assert d["planned_batch_sizes"] == planned and d["measured_batch_sizes"] == planned
    assert d["all_measured"] and d["missing_batch_sizes"] == [] and d["powers"] == [8, 16]
    with ResultStore(out / "results.sqlite") as store:
        entries = store.meta("probe:powers_of_two")
    assert sorted(e["batch_size"] for e in entries) == planned
    assert all(len(e["round_s"]) == 3 and e["median_s"] > 0 for e in entries)
    assert all(e["arch"]["sizes"] == [64, 16, 10] for e in entries)  # the study's model
    assert q["lo"] <= q["value"] <= q["hi"]
    for p in d["per_power"]:
        iv = p["advantage_pct"]
        assert iv["lo"] <= iv["value"] <= iv["hi"] and len(p["neighbours"]) == 6
    says_faster, says_none = q["answer"].startswith("Powers of two are"), q["answer"].startswith("No difference")
    assert says_none == (q["lo"] <= 0 <= q["hi"]) and says_faster == (not says_none)
    assert (out / "report" / "q_powers_of_two.png").stat().st_size > 0


def test_lr_scaling_runs_adam_and_fits_both(tiny):
    out, spec, res = tiny
    q = res["analysis"]["questions"]["lr_scaling"]
    assert KEYS <= set(q)
    fits = q["details"]["fits"]
    assert set(fits) == {"sgd", "adam"}
    assert "alpha" in fits["adam"], fits["adam"]
    if q["value"] is not None:
        assert q["lo"] <= q["value"] <= q["hi"]
    for f in fits.values():
        if "alpha" in f:
            assert f["alpha"]["lo"] <= f["alpha"]["value"] <= f["alpha"]["hi"]
    with ResultStore(out / "results.sqlite") as store:
        keys = set(store.meta("question_keys")["lr_scaling"])
        arm = [(c, r) for c, r in store.rows() if c.key in keys]
    assert all(c.search_id == "q:lr_scaling" and c.optimizer == "adam" for c, _ in arm)
    assert {c.batch_size for c, _ in arm} == {4, 16, 64} and {c.seed for c, _ in arm} == set(spec.trial_seeds()[:2])
    grid = {
        (B, round(lr, 12)) for B in (4, 16, 64) for lr in (0.01 * math.sqrt(B / 32) * f for f in (1.0, 2.0, 4.0, 8.0))
    }
    assert grid <= {(c.batch_size, round(c.lr, 12)) for c, _ in arm}
    from minigd.study.analysis import best_lrs

    first = best_lrs([(c, r) for c, r in arm if (c.batch_size, round(c.lr, 12)) in grid])
    for B in (4, 16, 64):  # extensions only past the edge where the grid's best rate was, a factor 2 at a time
        extra = sorted({c.lr for c, _ in arm if c.batch_size == B and (B, round(c.lr, 12)) not in grid})
        if not extra:
            continue
        edge = first[B]["at_edge"]
        assert edge in ("high", "low") and len(extra) <= 2
        step = 2.0 if edge == "high" else 0.5
        start = max(first[B]["lrs_tried"]) if edge == "high" else min(first[B]["lrs_tried"])
        assert sorted(extra, reverse=edge == "low") == pytest.approx(
            [start * step ** (i + 1) for i in range(len(extra))]
        )
        assert sum(1 for c, _ in arm if c.batch_size == B and c.lr == extra[0]) == 2  # every seed
    assert (out / "report" / "q_lr_scaling.png").stat().st_size > 0


def test_report_re_answers_both_from_the_file(tiny):
    out, spec, res = tiny
    from minigd.cli import main

    assert main(["report", str(out), "--out", str(out / "again")]) == 0
    with open(out / "again" / "summary.json") as f:
        again = json.load(f)["questions"]
    first = json.loads(json.dumps(res["analysis"]["questions"]))
    assert again["powers_of_two"] == first["powers_of_two"]
    assert again["lr_scaling"] == first["lr_scaling"]
