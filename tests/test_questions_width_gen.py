"""The width_one and generalisation arms of `minigd study --questions` on tiny budgets."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from minigd.report import write_report
from minigd.study import DataSpec, SweepSpec, run_study
from minigd.study.config import TrialConfig
from minigd.study.questions import generalisation, width_one
from minigd.study.questions.width_one import tuned_bootstrap

KEYS = {"name", "question", "answer", "value", "lo", "hi", "unit", "conditions", "plot", "details"}


@pytest.fixture(scope="module")
def clf_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("wg")
    spec = SweepSpec(
        data=DataSpec(params=(("n", 300), ("std_floor", 1.0))),
        batch_sizes=(8, 64),
        lr_grid=(0.5, 1.0, 2.0),
        n_seeds=2,
        widths=(8,),
        max_epochs=3,
        target=0.9,
        lr_extend=0,
    )
    res = run_study(spec, out, workers=1, questions=("width_one", "generalisation"), report=write_report)
    from minigd.study import ResultStore

    with ResultStore(out / "results.sqlite") as store:
        qkeys = store.meta("question_keys")
        rows = {name: [(c, r) for c, r in store.rows() if c.key in set(qkeys[name])] for name in qkeys}
    return SimpleNamespace(out=out, spec=spec, res=res, rows=rows)


def _best_median(rows, metric="final_val_accuracy"):
    """Best-over-rates median over seeds, by hand."""
    by_lr = {}
    for c, r in rows:
        by_lr.setdefault(c.lr, []).append(r[metric])
    return max(float(np.median(v)) for v in by_lr.values())


def test_width_one_trains_every_width_for_the_same_budget(clf_study):
    rows = clf_study.rows
    wr = rows["width_one"]
    n = 240
    widths = {0 if len(c.sizes) == 2 else c.sizes[1] for c, _ in wr}
    assert widths == {0, 1, 2, 4, 8}
    assert all(len(c.sizes) in (2, 3) for c, _ in wr)  # depth 0 and the study's depth 1
    assert len({c.batch_size for c, _ in wr}) == 1
    assert len(wr) == 5 * len(width_one.LR_FACTORS) * 2
    for c, r in wr:
        assert not c.stop_at_target and c.min_steps == 0 and c.search_id == "q:width_one"
        assert r["status"] == "ok"
        # equal budget: every trial ran all its epochs, also the ones that met the target early
        assert r["steps"] == 3 * math.ceil(n / c.batch_size) and r["examples"] == 3 * n


def test_width_one_answer(clf_study):
    out, res, rows = clf_study.out, clf_study.res, clf_study.rows
    a = res["analysis"]["questions"]["width_one"]
    assert KEYS <= set(a) and a["value"] is not None, a["answer"]
    assert a["lo"] <= a["value"] <= a["hi"]
    one = [(c, r) for c, r in rows["width_one"] if len(c.sizes) == 3 and c.sizes[1] == 1]
    assert a["value"] == pytest.approx(100 * _best_median(one))
    assert a["answer"].startswith("Width 1 reaches") and "linear model" in a["answer"]
    assert a["unit"].startswith("%") and a["plot"] == "q_width_one.png"
    assert (out / "report" / "q_width_one.png").stat().st_size > 1000
    d = a["details"]
    assert [r["width"] for r in d["per_width"]] == [0, 1, 2, 4, 8]
    for r in d["per_width"]:
        assert r["metric"]["lo"] <= r["metric"]["value"] <= r["metric"]["hi"]
    iv = d["width_one_minus_best"]
    assert iv["lo"] <= iv["value"] <= iv["hi"]
    assert 0 <= d["width_one_wins"] <= 1
    assert "batch" in a["conditions"] and "3 epochs" in a["conditions"]


def test_generalisation_sweeps_batch_sizes_at_equal_epochs(clf_study):
    rows = clf_study.rows
    gr = rows["generalisation"]
    n = 240
    assert generalisation.batch_sizes(n) == [8, 32, 128, 240]
    variants = {}
    for c, r in gr:
        assert r["status"] == "ok", r.get("error")
        assert not c.stop_at_target and c.min_steps == 0 and c.max_epochs == 3
        v = generalisation._variant_of(c)
        variants.setdefault(v, set()).add(c.batch_size)
        if v == "ghost BN":
            assert c.batch_norm is True
            assert c.ghost_batch_size == (16 if c.batch_size > 16 else None)
        per_epoch = n // c.batch_size if c.drop_last else math.ceil(n / c.batch_size)
        assert r["steps"] == 3 * per_epoch  # the whole epoch budget
    assert variants == {v: {8, 32, 128, 240} for v in generalisation.VARIANTS}
    full = [c for c, _ in gr if c.batch_size == n]
    assert full and all(c.full_batch for c in full)


def test_generalisation_answer(clf_study):
    out, res, rows = clf_study.out, clf_study.res, clf_study.rows
    a = res["analysis"]["questions"]["generalisation"]
    assert KEYS <= set(a) and a["value"] is not None, a["answer"]
    assert a["lo"] <= a["value"] <= a["hi"]
    plain = [(c, r) for c, r in rows["generalisation"] if generalisation._variant_of(c) == "plain"]
    big = _best_median([(c, r) for c, r in plain if c.batch_size == 240])
    small = _best_median([(c, r) for c, r in plain if c.batch_size == 8])
    assert a["value"] == pytest.approx(100 * (big - small))
    for ref in ("1609.04836", "1804.07612", "1705.08741", "1811.03600"):
        assert ref in a["answer"]
    assert "Ghost batch norm" in a["answer"] and "dropout 0.1" in a["answer"]
    assert a["answer"].split(":")[0] in (
        "Yes, here",
        "No, here the opposite",
        "Not measurably here (the interval includes no difference)",
    )
    d = a["details"]
    assert d["large_batch_worse"] == (a["hi"] < 0) and d["large_batch_better"] == (a["lo"] > 0)
    for r in d["per_batch"]:
        for k in ("metric", "gen_gap"):
            assert r[k]["lo"] <= r[k]["value"] <= r[k]["hi"]
    for v in ("ghost_bn", "dropout_model"):
        assert d[v]["verdict"] and d[v]["difference"]["lo"] <= d[v]["difference"]["value"] <= d[v]["difference"]["hi"]
    assert (out / "report" / "q_generalisation.png").stat().st_size > 1000


def test_report_reanswers_both_from_the_file(clf_study):
    out, res = clf_study.out, clf_study.res
    from minigd.cli import main

    assert main(["report", str(out), "--out", str(out / "again")]) == 0
    with open(out / "again" / "summary.json") as f:
        again = json.load(f)["questions"]
    first = json.loads(json.dumps(res["analysis"]["questions"]))
    assert again["width_one"] == first["width_one"]
    assert again["generalisation"] == first["generalisation"]


def test_both_arms_answer_a_regression_study(tmp_path):
    spec = SweepSpec(
        data=DataSpec(name="linear_regression", params=(("n", 200),)),
        batch_sizes=(8, 32),
        lr_grid=(1.0,),
        n_seeds=2,
        widths=(2,),
        max_epochs=2,
        target_metric="val_loss",
        target=0.5,
        base_lr=0.01,
        lr_extend=0,
    )
    res = run_study(spec, tmp_path, workers=1, questions=("width_one", "generalisation"), report=False)
    q = res["analysis"]["questions"]
    w, g = q["width_one"], q["generalisation"]
    assert w["value"] is not None and w["lo"] <= w["value"] <= w["hi"], w["answer"]
    assert "validation loss" in w["answer"] and w["unit"].startswith("validation loss")
    assert g["value"] is not None and g["lo"] <= g["value"] <= g["hi"], g["answer"]
    assert "validation loss" in g["unit"] and g["details"]["gen_gap"] == "gen_gap_loss"


def _cfg(group, lr, seed):
    return TrialConfig(sizes=(4, group, 2), lr=lr, seed=seed)


def test_tuned_bootstrap_reselects_the_rate_and_resamples_seeds_jointly():
    # group 1: rate 0.1 best on seeds 0 and 1, rate 0.2 best on seed 2 -> median picks 0.1
    acc = {(1, 0.1): [0.9, 0.8, 0.1], (1, 0.2): [0.5, 0.5, 0.95], (2, 0.1): [0.7, 0.7, 0.7]}
    rows = [
        (_cfg(g, lr, s), {"status": "ok", "final_val_accuracy": v, "final_val_loss": 1 - v})
        for (g, lr), vs in acc.items()
        for s, v in enumerate(vs)
    ]
    rows.append(
        (_cfg(2, 0.2, 0), {"status": "ok", "diverged": True, "final_val_accuracy": 0.99, "final_val_loss": 0.0})
    )  # a diverged trial is never picked
    sel = tuned_bootstrap(rows, lambda c: c.sizes[1], (0, 1, 2), metric="accuracy", higher=True, seed=3, n_boot=500)
    assert sel[1]["value"] == pytest.approx(0.8) and sel[1]["best_lr"] == 0.1
    assert sel[2]["value"] == pytest.approx(0.7) and sel[2]["best_lr"] == 0.1
    # a resample of seed 2 only: rate 0.2 is re-selected and gives 0.95
    assert sel[1]["samples"].max() == pytest.approx(0.95)
    assert set(np.round(sel[1]["best_lr_samples"], 6)) == {0.1, 0.2}
    # group 2 is constant: every resample gives 0.7 (rate 0.2's only trial diverged)
    assert np.all(sel[2]["samples"] == pytest.approx(0.7))
    again = tuned_bootstrap(rows, lambda c: c.sizes[1], (0, 1, 2), metric="accuracy", higher=True, seed=3, n_boot=500)
    assert np.array_equal(again[1]["samples"], sel[1]["samples"])  # deterministic in the seed
    # a loss: lower is better, reported as -loss internally
    lo = tuned_bootstrap(rows, lambda c: c.sizes[1], (0, 1, 2), metric="loss", higher=False, seed=3, n_boot=10)
    assert lo[1]["value"] == pytest.approx(-0.2)
