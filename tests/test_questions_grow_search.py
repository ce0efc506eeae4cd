"""The grow_vs_decay and search_strategies arms of `minigd study --questions` on tiny budgets."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from minigd.report import write_report
from minigd.study import ResultStore, SweepSpec, run_study
from minigd.study.questions import grow_vs_decay as gvd
from minigd.study.questions import search_strategies as ss

N_TRAIN = 1438  # digits, 20% held out
NAMES = ("grow_vs_decay", "search_strategies")


def tiny_spec():
    return SweepSpec(
        batch_sizes=(8, 64), lr_grid=(0.5, 1.0, 2.0), n_seeds=2, widths=(16,), max_epochs=4, target=0.9, lr_extend=0
    )


def _small_search(mp):
    """search_strategies at 4 trials (a 2 x 2 lattice) x 2 repeats."""
    mp.setattr(ss, "N_TRIALS", 4)
    mp.setattr(ss, "N_REPEATS", 2)
    mp.setattr(ss, "LATTICE", (2, 2, 1))
    mp.setattr(ss, "LATTICE_ONE_WIDTH", (2, 2))
    mp.setattr(ss, "N_BOOT", 500)
    mp.setattr(gvd, "N_BOOT", 500)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("gs")
    with pytest.MonkeyPatch.context() as mp:
        _small_search(mp)
        res = run_study(tiny_spec(), out, workers=1, questions=NAMES, report=write_report)
        q = res["analysis"]["questions"]
        # the read-only re-answer from the file (with the same small constants)
        from minigd.cli import main

        assert main(["report", str(out), "--out", str(out / "again")]) == 0
    return out, q


def _trials(out, prefix):
    with ResultStore(out / "results.sqlite") as store:
        return [(c, r) for c, r in store.rows() if c.search_id.startswith(prefix)]


def test_answers_have_the_documented_keys_and_report_reproduces_them(study):
    out, q = study
    for name in NAMES:
        a = q[name]
        assert "error" not in a, a.get("error")
        assert {"name", "question", "answer", "value", "lo", "hi", "unit", "conditions", "plot", "details"} <= set(a)
        assert a["value"] is not None and a["lo"] <= a["value"] <= a["hi"], (name, a)
        assert a["plot"] == f"q_{name}.png" and (out / "report" / a["plot"]).is_file()
        assert a["conditions"] and "digits" in a["conditions"]
    with open(out / "again" / "summary.json") as f:
        again = json.load(f)["questions"]
    assert again == json.loads(json.dumps(q))
    with ResultStore(out / "results.sqlite") as store:
        keys = store.meta("question_keys")
    assert len(keys["grow_vs_decay"]) == 3 * gvd.N_SEEDS
    assert len(keys["search_strategies"]) == 3 * 2 * 4  # 3 strategies x 2 repeats x 4 trials


def test_growth_grows_the_batch_at_the_milestones_and_keeps_the_example_budget(study):
    out, q = study
    d = q["grow_vs_decay"]["details"]
    # B0: the largest swept batch below 32; 4 epochs -> milestones at 2 and 3
    assert d["start_batch_size"] == 8 and d["epochs"] == 4 and d["milestones"] == [2, 3]
    assert d["batch_sizes"] == [8, 40, 200] and d["growth_happened"] and d["equal_examples"]
    rows = _trials(out, "q:grow_vs_decay")
    arms = {"constant": [], "decay": [], "growth": []}
    for c, r in rows:
        assert r["status"] == "ok" and not c.stop_at_target and c.min_steps == 0
        arms["decay" if c.lr_decay else "growth" if c.bs_schedule else "constant"].append((c, r))
    assert all(len(v) == gvd.N_SEEDS for v in arms.values())
    steps = {a: {r["steps"] for _, r in v} for a, v in arms.items()}
    # the whole budget in every arm: 4 epochs of 1438 examples
    assert {r["examples"] for v in arms.values() for _, r in v} == {4 * N_TRAIN}
    assert steps["constant"] == steps["decay"] == {4 * 180}
    assert steps["growth"] == {2 * 180 + 36 + 8}  # ceil(1438/8), /40, /200 per epoch
    assert d["arms"]["growth"]["steps"] == 404 and d["steps_saved"] == 720 - 404
    # the batch really is 40 between the milestones: 40 examples a step from step 360 on
    for _, r in arms["growth"]:
        pts = [(p["step"], p["examples"]) for p in r["curve"] if 360 < p["step"] < 396]
        assert pts and all(e == 2 * N_TRAIN + 40 * (s - 360) for s, e in pts)
        pts = [(p["step"], p["examples"]) for p in r["curve"] if 396 < p["step"] < 404]
        assert all(e == 3 * N_TRAIN + 200 * (s - 396) for s, e in pts)
    # the decay arm follows the constant arm exactly until the first milestone, then departs
    by_seed = {c.seed: r for c, r in arms["constant"]}
    for c, r in arms["decay"]:
        const = {p["step"]: p["val_loss"] for p in by_seed[c.seed]["curve"]}
        before = [p for p in r["curve"] if p["step"] <= 360]
        after = [p for p in r["curve"] if p["step"] > 362]
        assert before and all(p["val_loss"] == const[p["step"]] for p in before)
        assert any(p["val_loss"] != const[p["step"]] for p in after)
    a = q["grow_vs_decay"]
    assert f"{720 - 404:,} fewer steps" in a["answer"]
    assert a["unit"].startswith("percentage points")


def test_phase_steps_and_milestones():
    assert gvd.milestones(12) == (6, 9) and gvd.milestones(4) == (2, 3) and gvd.milestones(8) == (4, 6)
    for E in range(4, 60):
        e1, e2 = gvd.milestones(E)
        assert 1 <= e1 < e2 < E
    assert gvd.phase_steps(1438, [32, 160, 800], 12, (6, 9)) == [(32, 270), (160, 27), (800, 6)]
    assert gvd._time_at(280, [(32, 270), (160, 27)], {32: 1.0, 160: 3.0}) == 270 + 30


def test_search_strategies_curves_and_grid(study):
    out, q = study
    a = q["search_strategies"]
    d = a["details"]
    assert set(d["strategies"]) == {"grid", "random", "bayes"}
    assert d["winner"] in d["strategies"] and 0 <= a["wins"] <= 1
    assert abs(sum(d["win_rates"].values()) - 1) < 1e-9
    for s, v in d["strategies"].items():
        med = [c["value"] for c in v["best_so_far_median"]]
        assert len(med) == 4 and all(b <= a_ + 1e-12 for a_, b in zip(med, med[1:])), (s, med)
        assert all(1 <= t <= 5 for t in v["per_repeat_trials_to_tolerance"])
    assert d["best_val_loss"] <= min(min(v["per_repeat_best"]) for v in d["strategies"].values()) + 1e-12
    with ResultStore(out / "results.sqlite") as store:
        plan = store.meta(ss.META)
        rows = {c.key: c for c, _ in store.rows()}
    assert len(plan["repeats"]) == 2
    lattices = []
    for rep in plan["repeats"]:
        grid = [rows[k] for k in rep["grid"]]
        assert all(c.search_id == "q:search_strategies:grid" and c.seed == rep["trial_seed"] for c in grid)
        lattices.append({(c.batch_size, c.lr, c.sizes) for c in grid})
        for m in ("random", "bayes"):
            cs = [rows[k] for k in rep[m]]
            assert len(cs) == 4 and {c.search_id for c in cs} == {f"{m}-{rep['search_seed']}"}
            assert all(c.seed == rep["trial_seed"] and not c.stop_at_target and c.max_epochs == 4 for c in cs)
    assert lattices[0] == lattices[1] and len(lattices[0]) == 4
    sp = plan["space"]
    for B, lr, _w in lattices[0]:
        assert sp["batch_min"] <= B <= sp["batch_max"] and sp["lr_min"] <= lr <= sp["lr_max"]


def test_search_without_optuna_answers_grid_vs_random(study, tmp_path, monkeypatch):
    out, _ = study
    dst = tmp_path / "s"
    dst.mkdir()
    shutil.copy(out / "results.sqlite", dst / "results.sqlite")
    _small_search(monkeypatch)
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    res = run_study(tiny_spec(), dst, workers=1, questions=("search_strategies",), report=False)
    a = res["analysis"]["questions"]["search_strategies"]
    assert a["value"] is not None, a["answer"]
    assert set(a["details"]["strategies"]) == {"grid", "random"}
    assert "Bayesian search was not run" in a["answer"]


def test_lattice_has_the_budget_and_adapts_to_a_narrow_space():
    from minigd.study.search import SearchSpace

    sp = SearchSpace(batch_min=8, batch_max=512, lr_min=1e-3, lr_max=1.0, width_min=4, width_max=128)
    pts = ss.lattice(sp)
    assert len(pts) == ss.N_TRIALS == 24 and len(set(pts)) == 24
    assert sorted({B for B, _, _ in pts}) == [16, 64, 256] and sorted({w for _, _, w in pts}) == [8, 64]
    lrs = sorted({lr for _, lr, _ in pts})
    assert np.allclose(np.diff(np.log(lrs)), np.log(1000) / 4) and 1e-3 < lrs[0] < lrs[-1] < 1.0
    narrow = SearchSpace(batch_min=8, batch_max=16, lr_min=1e-3, lr_max=1.0, width_min=16, width_max=16)
    pts = ss.lattice(narrow)
    assert len(pts) >= 24 and {B for B, _, _ in pts} == {8, 16}
