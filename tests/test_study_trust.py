"""The study's measurements: evaluation resolution, the noise scale on the whole training set,
the throughput probe, the master seed, the learning-rate grid's extension, the lock.

Each test compares with an independent computation (a deterministic re-run of fit, an
explicit grad_moments) rather than with stored numbers."""

from __future__ import annotations

import os

import pytest

import minigd as mg
from minigd.study import DataSpec, ResultStore, SweepSpec, TrialConfig, lr_extensions, run_study
from minigd.study.probe import probe, probe_jobs, probe_key
from minigd.study.trial import DENSE_EVAL_STEPS, load_data, next_eval_step, run_trial

DIGITS = DataSpec()


def _cfg(**kw) -> TrialConfig:
    base = dict(data=DIGITS, sizes=(64, 32, 10), batch_size=32, lr=0.05, seed=3, max_epochs=20)
    base.update(kw)
    return TrialConfig(**base)


@pytest.mark.parametrize("rel", [0.01, 0.02, 0.05])
def test_eval_schedule_brackets_every_step_within_rel(rel):
    s, prev = 0, 0
    while s < 200_000:
        prev, s = s, next_eval_step(s, rel)
        assert s > prev
        if prev >= DENSE_EVAL_STEPS:
            # a target met at step s is bracketed to rel of it (or to one step)
            assert s - prev <= max(1.0, rel * s)
        else:
            assert s == prev + 1


@pytest.fixture(scope="module")
def trial():
    cfg = _cfg()
    res = run_trial(cfg)
    assert res["status"] == "ok", res.get("traceback")
    return cfg, res


def test_trial_steps_to_target_resolved_and_interpolated(trial):
    cfg, res = trial
    assert res["reached"]
    s, si = res["steps_to_target"], res["steps_to_target_interp"]
    assert si <= s
    assert res["eval_bracket"] <= max(cfg.eval_rel_step, 1 / s) + 1e-12
    assert (s - si) / s <= res["eval_bracket"] + 1e-12
    assert 0 < res["examples_to_target_interp"] <= res["examples_to_target"]
    # the evaluation before the one that met the target missed it
    curve = res["curve"]
    k = next(i for i, e in enumerate(curve) if e["step"] == s)
    assert curve[k]["val_accuracy"] >= cfg.target
    assert all(e["val_accuracy"] < cfg.target for e in curve[:k])


def _params_after(cfg: TrialConfig, steps: int):
    """An independent re-run: the same model and fit as the trial, stopped after ``steps``."""
    ds = load_data(cfg.data, cfg.dtype)
    model = mg.MLP([64, 32, 10], seed=cfg.seed, dtype=cfg.dtype)
    if steps:
        mg.fit(
            model,
            ds.X_train,
            ds.y_train,
            batch_size=cfg.batch_size,
            steps=steps,
            optimizer=mg.SGD(lr=cfg.lr, momentum=cfg.momentum),
            seed=cfg.seed,
        )
    return ds, model


def test_trial_noise_scale_is_the_full_data_one(trial):
    """Every stored B_simple is tr(Sigma)/|G|^2 over the whole training set at the parameters
    of its step: recomputed here from a fresh deterministic re-run."""
    cfg, res = trial
    where = {p["where"] for p in res["noise"]}
    assert {"start", "mid", "target"} <= where
    ds = load_data(cfg.data, cfg.dtype)
    for p in res["noise"]:
        if p["where"] not in ("start", "mid", "target"):
            continue
        _, model = _params_after(cfg, p["step"])
        m = mg.grad_moments(model, ds.X_train, ds.y_train)
        assert p["n_rows"] == len(ds.X_train) == p["population"]
        assert p["noise_scale"] == pytest.approx(m.noise_scale, rel=1e-6)
        assert p["grad_norm_sq"] == pytest.approx(m.grad_norm_sq, rel=1e-6)


def test_trial_mid_point_is_the_middle_of_training(trial):
    cfg, res = trial
    mid = next(p for p in res["noise"] if p["where"] == "mid")
    half = res["steps_to_target"] / 2
    # the nearest evaluation: every step for the first 50, then within eval_rel_step
    assert abs(mid["step"] - half) <= max(1, cfg.eval_rel_step * half) + 1


def test_large_training_set_uses_a_fresh_corrected_subset_per_measurement():
    cfg = _cfg(noise_full_limit=500, noise_subset=400, max_epochs=3)
    res = run_trial(cfg)
    assert res["status"] == "ok", res.get("traceback")
    n = len(load_data(cfg.data, cfg.dtype).X_train)
    pts = res["noise"]
    assert all(p["n_rows"] == 400 and p["population"] == n for p in pts)
    assert all(p["noise_scale_se"] > 0 for p in pts)


def test_probe_entries(tmp_path):
    cfgs = [_cfg(batch_size=B, seed=s) for B in (4, 64) for s in (0, 1)]
    jobs = probe_jobs(cfgs)
    assert len(jobs) == 2  # the seed and the learning rate do not change a step's cost
    out = probe(jobs, rounds=3, round_s=0.003, seed=1)
    assert [e["batch_size"] for e in out] == sorted(e["batch_size"] for e in out) or len(out) == 2
    for e in out:
        assert len(e["round_s"]) == 3
        assert e["lo_s"] <= e["median_s"] <= e["hi_s"]
        assert e["numba_threads"] == 1 and e["blas_threads"] in (1, None)
        assert e["key"] in {probe_key(c) for c in cfgs}
        assert e["arch"] == {"sizes": [64, 32, 10], "activation": "relu", "optimizer": "sgd", "norm": ""}


def test_master_seed_derives_the_trial_seeds():
    a, b = SweepSpec(seed=0), SweepSpec(seed=1)
    assert a.trial_seeds() == SweepSpec(seed=0).trial_seeds()
    assert len(a.trial_seeds()) == 5 and len(set(a.trial_seeds())) == 5
    assert not set(a.trial_seeds()) & set(b.trial_seeds())
    assert SweepSpec(seeds=(4, 2)).trial_seeds() == (4, 2)
    assert SweepSpec(n_seeds=2, seed=7).trial_seeds() == SweepSpec(seed=7).trial_seeds()[:2]
    cfgs = SweepSpec(seed=3, n_seeds=2, batch_sizes=(8,), lr_grid=(1.0,)).trials(100, 4, 3)
    assert {c.seed for c in cfgs} == set(SweepSpec(seed=3, n_seeds=2).trial_seeds())
    with pytest.raises(ValueError, match="n_seeds"):
        SweepSpec(n_seeds=0)
    with pytest.raises(ValueError, match="seed"):
        SweepSpec(seed=-1)


def _fake(cfg, steps):
    return cfg, {
        "status": "ok",
        "reached": steps is not None,
        "steps_to_target": steps,
        "examples_to_target": None if steps is None else steps * cfg.batch_size,
        "final_val_accuracy": 0.9,
    }


def test_lr_extensions_past_the_high_edge_and_the_cap():
    spec = SweepSpec(lr_grid=(0.5, 1.0, 2.0), n_seeds=2, batch_sizes=(8,), lr_extend=1)
    cfgs = spec.trials(100, 4, 3)
    lrs = sorted({c.lr for c in cfgs})
    steps = {lrs[0]: 90, lrs[1]: 60, lrs[2]: 30}  # the largest rate is the best
    ext = lr_extensions(spec, [_fake(c, steps[c.lr]) for c in cfgs])
    assert {c.lr for c in ext} == {2 * lrs[2]}
    assert {c.seed for c in ext} == set(spec.trial_seeds())
    assert all(c.batch_size == 8 for c in ext)
    # once it is the best too: one more factor of 2 would pass lr_extend = 1
    rows = [_fake(c, steps[c.lr]) for c in cfgs] + [_fake(c, 20) for c in ext]
    assert lr_extensions(spec, rows) == []
    # best inside the grid, or never reaching the target: nothing to extend
    inside = {lrs[0]: 90, lrs[1]: 30, lrs[2]: 60}
    assert lr_extensions(spec, [_fake(c, inside[c.lr]) for c in cfgs]) == []
    assert lr_extensions(spec, [_fake(c, None) for c in cfgs]) == []


def test_lr_extensions_past_the_low_edge():
    spec = SweepSpec(lr_grid=(0.5, 1.0, 2.0), n_seeds=1, batch_sizes=(8,))
    cfgs = spec.trials(100, 4, 3)
    lrs = sorted({c.lr for c in cfgs})
    steps = {lrs[0]: 30, lrs[1]: 60, lrs[2]: None}
    ext = lr_extensions(spec, [_fake(c, steps[c.lr]) for c in cfgs])
    assert [c.lr for c in ext] == [pytest.approx(lrs[0] / 2)]


def test_run_study_extends_probes_and_resumes(tmp_path):
    """A tiny study whose grid puts the best rate at its top edge: the grid is extended,
    the probe is stored, and a resumed study re-uses both (nothing re-runs or re-times)."""
    spec = SweepSpec(
        batch_sizes=(64, 256),
        lr_grid=(0.0625, 0.125),
        n_seeds=2,
        seed=5,
        widths=(16,),
        max_epochs=6,
        target=0.9,
        lr_extend=1,
    )
    out = run_study(spec, tmp_path, workers=1, report=False)
    with ResultStore(tmp_path / "results.sqlite") as store:
        keys = store.meta("study_keys")
        entries = store.meta("throughput_probe")
        rows = store.rows()
    grid = {c.key for c in spec.trials(1438, 64, 10)}
    assert grid < set(keys)  # extension trials were added
    assert {r[0].seed for r in rows} == set(spec.trial_seeds())
    assert sorted(e["batch_size"] for e in entries) == [64, 256]
    assert out["counts"]["ran"] == len(keys)
    again = run_study(spec, tmp_path, workers=1, report=False)
    assert again["counts"]["ran"] == 0
    assert again["probe"] == entries


def test_study_lock_is_held_until_the_report_is_written(tmp_path, monkeypatch):
    from minigd import report as report_mod
    from minigd.study import StudyLocked, study_lock

    seen = []

    def write_report(analysis, out, spec=None):
        with pytest.raises(StudyLocked):
            with study_lock(tmp_path):
                pass
        seen.append(out)
        os.makedirs(out, exist_ok=True)
        return []

    monkeypatch.setattr(report_mod, "write_report", write_report)
    spec = SweepSpec(batch_sizes=(256,), lr_grid=(1.0,), n_seeds=1, widths=(8,), max_epochs=2, lr_extend=0)
    run_study(spec, tmp_path, workers=1, report=report_mod.write_report)
    assert seen


@pytest.mark.parametrize(
    "argv, flag",
    [(["--n-seeds", "0"], "--n-seeds"), (["--lr-extend", "-1"], "--lr-extend"), (["--seed", "-2"], "--seed")],
)
def test_cli_refuses_bad_seed_and_extension_flags(argv, flag, capsys, tmp_path):
    from minigd.cli import main

    with pytest.raises(SystemExit) as e:
        main(["study", "--out", str(tmp_path / "s"), *argv])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_cli_search_prints_progress_and_the_best_configuration_by_name(capsys, tmp_path):
    from minigd.cli import main

    rc = main(
        [
            "study",
            "--search",
            "random",
            "--n-trials",
            "2",
            "--workers",
            "1",
            "--max-epochs",
            "3",
            "--target",
            "0.8",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    out = capsys.readouterr()
    assert rc in (0, 1)
    assert "compiling kernels" in out.out
    if rc == 0:
        assert "batch size" in out.out and "learning rate" in out.out and "hidden layers" in out.out
    assert "2/2" in out.err  # the bar: trials done / total


def test_a_one_step_run_has_no_mid_point():
    """Reached at the first evaluation: there are no parameters between the ends, so no
    "mid" point (the analysis leaves the trial out of the mid-run median rather than take its
    target value for it)."""
    res = run_trial(_cfg(target=0.01))
    assert res["status"] == "ok" and res["steps_to_target"] == 1
    assert [p["where"] for p in res["noise"]] == ["start", "target"]
    from minigd.study.analysis import _noise_at

    assert _noise_at(res, "mid") is None and _noise_at(res, "target") is not None


def test_cli_data_param_reaches_the_loader(capsys, tmp_path):
    from minigd.cli import _data_spec, build_parser, main

    args = build_parser().parse_args(
        ["study", "--data", "linear_regression", "--data-param", "noise=2.0", "--data-param", "n_in=4"]
    )
    spec = _data_spec(args)
    assert spec.kwargs() == {"noise": 2.0, "n_in": 4}
    assert load_data(spec, "float32").X_train.shape[1] == 4
    with pytest.raises(SystemExit) as e:
        main(
            [
                "study",
                "--data",
                "linear_regression",
                "--data-param",
                "bogus=1",
                "--target",
                "1",
                "--out",
                str(tmp_path / "s"),
            ]
        )
    assert e.value.code == 2 and "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["study", "--data-param", "novalue"])


def test_a_run_past_the_target_measures_the_target_point_at_the_target():
    """stop_at_target=False: the "target" point holds the parameters of the step that met the
    target (as an independent re-run stopped there), the "end" point those of the last step."""
    cfg = _cfg(stop_at_target=False, max_epochs=4, min_steps=0)
    res = run_trial(cfg)
    assert res["status"] == "ok" and res["reached"] and res["steps"] > res["steps_to_target"]
    pts = {p["where"]: p for p in res["noise"]}
    assert pts["target"]["step"] == res["steps_to_target"] and pts["end"]["step"] == res["steps"]
    ds = load_data(cfg.data, cfg.dtype)
    for where in ("target", "end"):
        _, model = _params_after(cfg, pts[where]["step"])
        assert pts[where]["noise_scale"] == pytest.approx(
            mg.grad_moments(model, ds.X_train, ds.y_train).noise_scale, rel=1e-6
        )


def test_report_on_a_store_of_other_trials_says_why(tmp_path, capsys):
    """A results file whose trials are not this study's (e.g. stored by an older minigd, whose
    trial keys differ) gets a reason, not "holds no trials yet"."""
    from minigd.cli import main

    spec = SweepSpec(batch_sizes=(64,), lr_grid=(1.0,), n_seeds=1, widths=(8,), max_epochs=1, lr_extend=0)
    with ResultStore(tmp_path / "results.sqlite") as store:
        store.set_meta("spec", spec.to_dict())
        store.set_meta("study_keys", ["0" * 24])
        other = _cfg(batch_size=64, max_epochs=1)
        store.put(other, run_trial(other))
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])
    assert "holds 1 trial(s), none of them of this study" in str(e.value.code)


def test_smallest_batch_does_not_judge_batch_sizes_it_did_not_sweep(tmp_path):
    spec = SweepSpec(
        batch_sizes=(64, 256), lr_grid=(0.5, 1.0, 2.0), n_seeds=2, widths=(16,), max_epochs=6, target=0.9, lr_extend=0
    )
    q = run_study(spec, tmp_path, workers=1, report=False, questions=("smallest_batch",))["analysis"]["questions"]
    a = q["smallest_batch"]
    assert "was not measured here" in a["answer"] and a["details"]["below_32_reasonable"] is None
