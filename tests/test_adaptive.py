"""fit(batch_size="adaptive"): the controller, the sampler across size changes, the history,
checkpoints, and every error naming its argument (issue 17)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minigd as mg
from minigd.adaptive import RECENT, AdaptiveBatchSize, Controller
from minigd.data.samplers import Sampler
from minigd.gradstats import adascale_gain

N = 240


def _data(n=N, seed=0, classes=3, d=6):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = (X[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.int64) + (X[:, 1] > 1)
    return X, y % classes


def _table(sizes, per_row=1e-6, overhead=2e-4):
    return {b: overhead + per_row * b for b in sizes}


def _spec(**kw):
    kw.setdefault("min", 8)
    kw.setdefault("max", 64)
    kw.setdefault("every", 10)
    kw.setdefault("track_every", 2)
    kw.setdefault("throughput", _table([8, 16, 32, 64]))
    return AdaptiveBatchSize(**kw)


def _fit(spec=None, backend="cpu", dtype="float64", model_kw=None, **kw):
    X, y = _data()
    m = mg.MLP([6, 16, 3], seed=0, dtype=dtype, backend=backend, **(model_kw or {}))
    kw.setdefault("steps", 60)
    kw.setdefault("optimizer", mg.SGD(lr=0.05, momentum=0.9))
    h = mg.fit(m, X.astype(dtype), y, batch_size=_spec() if spec is None else spec, seed=3, **kw)
    return m, h


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kw, exc, name",
    [
        (dict(min=64, max=32), ValueError, "max"),
        (dict(lr_rule="cubic"), ValueError, "lr_rule"),
        (dict(lr_rule=2), TypeError, "lr_rule"),
        (dict(min=0), ValueError, "min"),
        (dict(min=2.5), TypeError, "min"),
        (dict(every=0), ValueError, "every"),
        (dict(track_every=30, every=20), ValueError, "track_every"),
        (dict(every=20, max_every=10), ValueError, "max_every"),
        (dict(max_every=0), ValueError, "max_every"),
        (dict(max_every=64.5), TypeError, "max_every"),
        (dict(noise_beta=1.0), ValueError, "noise_beta"),
        (dict(min_gain=-0.1), ValueError, "min_gain"),
        (dict(throughput="fast"), ValueError, "throughput"),
        (dict(throughput=3), TypeError, "throughput"),
        (dict(throughput={8: -1.0}), ValueError, "throughput"),
        (dict(candidates="8,16"), TypeError, "candidates"),
        (dict(max_step=1.0), ValueError, "max_step"),
        (dict(max_step="2"), TypeError, "max_step"),
        (dict(explore=-0.1), ValueError, "explore"),
        (dict(explore=True), TypeError, "explore"),
        (dict(explore=float("inf")), ValueError, "explore"),
    ],
)
def test_bad_settings_name_the_argument(kw, exc, name):
    with pytest.raises(exc, match=rf"^{name}"):
        AdaptiveBatchSize(**kw)


@pytest.mark.parametrize(
    "spec, fit_kw, exc, name",
    [
        (AdaptiveBatchSize(min=512), {}, ValueError, "batch_size"),  # more than the data
        (AdaptiveBatchSize(min=8, max=4096), {}, ValueError, "batch_size"),
        (AdaptiveBatchSize(min=1, max=8), {}, ValueError, "min"),  # no spread within one example
        (AdaptiveBatchSize(min=8, candidates=[8, 1000]), {}, ValueError, "candidates"),
        (AdaptiveBatchSize(min=8, max=16, throughput={8: 1e-3}), {}, ValueError, "throughput"),
        (AdaptiveBatchSize(min=8, every=50), dict(steps=20), ValueError, "steps"),  # no decision in budget
        (AdaptiveBatchSize(min=8, every=50), dict(steps=None, examples=100), ValueError, "examples"),
        (AdaptiveBatchSize(min=8), dict(track_noise=1), ValueError, "track_noise"),
        (AdaptiveBatchSize(min=8), dict(drop_last=True), ValueError, "drop_last"),
    ],
)
def test_bad_runs_name_the_argument(spec, fit_kw, exc, name):
    X, y = _data()
    m = mg.MLP([6, 8, 3], seed=0, dtype="float64")
    kw = dict(steps=60)
    kw.update(fit_kw)
    kw = {k: v for k, v in kw.items() if v is not None}
    with pytest.raises(exc, match=rf"^{name}"):
        mg.fit(m, X, y, batch_size=spec, **kw)


def test_batch_size_string_that_is_not_a_mode_is_refused():
    X, y = _data()
    with pytest.raises(ValueError, match="^batch_size.*'adaptive'"):
        mg.fit(mg.MLP([6, 8, 3], dtype="float64"), X, y, batch_size="adaptiv", steps=5)


def test_batch_norm_candidates_are_checked_up_front():
    X, y = _data()
    m = mg.MLP([6, 8, 3], batch_norm=True, ghost_batch_size=4, seed=0, dtype="float64")
    spec = AdaptiveBatchSize(min=8, candidates=[8, 9], throughput={8: 1e-4, 9: 1e-4}, every=10)
    with pytest.raises(ValueError, match="ghost_batch_size"):  # 9 % 4 == 1: a one-row ghost batch
        mg.fit(m, X, y, batch_size=spec, steps=30)


# ---------------------------------------------------------------------------------- candidates
def test_default_candidates_are_min_powers_of_two_and_max():
    assert AdaptiveBatchSize(min=24, max=300).sizes(1000) == [24, 32, 64, 128, 256, 300]
    assert AdaptiveBatchSize(min=32).sizes(1437) == [32, 64, 128, 256, 512, 1024, 1437]
    assert AdaptiveBatchSize(min=32).sizes(100_000)[-1] == 8192
    assert AdaptiveBatchSize(min=16, max=16).sizes(100) == [16]


# ---------------------------------------------------------------------------------- the decisions
def test_goodput_argmax_follows_the_throughput_model():
    """Step time the same at every size: throughput grows with B and statistical efficiency
    falls slower than 1/B, so goodput is largest at the largest candidate; step time
    proportional to B (constant throughput): efficiency alone, largest at the smallest."""
    sizes = [8, 16, 32, 64]
    flat = _spec(throughput={b: 1e-3 for b in sizes}, max_step=None)
    _, h = _fit(flat)
    assert h.adaptive and h.adaptive[0]["batch_size"] == 64
    _, h = _fit(_spec(throughput={b: 1e-3 for b in sizes}))  # max_step=2: one power of two a decision
    assert [d["batch_size"] for d in h.adaptive[:3]] == [16, 32, 64]
    linear = _spec(throughput={b: 1e-5 * b for b in sizes})
    _, h = _fit(linear)
    assert all(d["batch_size"] == 8 for d in h.adaptive)


def test_decision_records_and_per_step_columns():
    m, h = _fit(eval_every=10, validation=_data(seed=1))
    assert h.adaptive, "no decision recorded"
    for d in h.adaptive:
        assert set(d) >= {"step", "batch_size", "lr_factor", "gain", "goodput", "controller_noise_scale", "reason"}
        assert d["step"] % 10 == 0 and d["reason"].split(":")[0] in ("keep", "grow", "shrink")
    B = h.column("batch_size")
    lr = h.column("lr")
    f = h.column("lr_factor")
    np.testing.assert_allclose(lr, 0.05 * f, rtol=1e-15)
    for d, nxt in zip(h.adaptive, h.adaptive[1:] + [None]):
        s, e = d["step"], (nxt["step"] if nxt else h.n_steps)
        seg = B[s:e]
        # every step takes the decided size, except the rest of an epoch (fewer rows)
        assert np.all((seg == d["batch_size"]) | (seg < d["batch_size"]))
        assert np.all(f[s:e] == d["lr_factor"])
    assert np.all(f[: h.adaptive[0]["step"]] == 1.0)  # the starting size runs the optimizer's rate
    recs = h.records
    last = [d for d in h.adaptive if d["step"] < h.n_steps][-1]  # (one after the last step governs none)
    assert recs[-1]["lr_factor"] == last["lr_factor"]
    assert h.noise and all(r["step"] % 2 == 0 for r in h.noise)  # tracked every track_every steps


@pytest.mark.parametrize("rule", ["adascale", "sqrt", "linear"])
def test_learning_rate_rules(rule):
    sizes = [8, 16, 32, 64]
    _, h = _fit(_spec(lr_rule=rule, throughput={b: 1e-3 for b in sizes}, max_step=None))  # goes to 64
    d = h.adaptive[0]
    S = d["batch_size"] / 8
    if rule == "linear":
        assert d["lr_factor"] == S
    elif rule == "sqrt":
        assert d["lr_factor"] == pytest.approx(math.sqrt(S), rel=1e-15)
    else:  # the AdaScale gain at the noise the tracker held at the decision
        assert 1.0 <= d["lr_factor"] <= S
        assert d["lr_factor"] == d["gain"]
    assert d["gain"] >= 1.0


def test_adascale_gain_matches_the_closed_form():
    spec = _spec()
    c = Controller(spec, [8, 16, 32, 64], N, replacement=False)
    for s, (ssq, gsq) in enumerate([(30.0, 1.0), (28.0, 0.9), (35.0, 1.2)]):
        c.tracker.update(s, 8, ssq, gsq)
    c.seconds = {b: 1e-3 for b in c.sizes}
    rec = c.decide(10)
    tr, g2 = c.tracker.trace_cov, c.tracker.grad_norm_sq
    assert rec["gain"] == pytest.approx(float(adascale_gain(tr / 8, g2, rec["batch_size"] / 8)), rel=1e-12)
    phi = tr / g2
    assert rec["controller_noise_scale"] == pytest.approx(phi, rel=1e-12)
    # with the gain r, one step at B counts as r steps at B0: r = (phi/B0 + 1) / (phi/B + 1)
    B = rec["batch_size"]
    assert rec["gain"] == pytest.approx((phi / 8 + 1) / (phi / B + 1), rel=1e-9)


def test_two_batch_observation_recovers_the_noise_of_a_known_distribution():
    """Batch norm path: |g_b|^2 and |g_B|^2 of the same step give tr(Sigma) exactly when
    they equal their expectations |G|^2 + tr/b and |G|^2 + tr/B."""
    c = Controller(_spec(), [8, 16], 10**9, replacement=True)
    G2, tr = 2.0, 50.0
    for s in range(40):
        c.observe_two_batch(s, 16, 8, G2 + tr / 8, G2 + tr / 16)
    assert c.tracker.trace_cov == pytest.approx(tr, rel=1e-9)
    assert c.tracker.grad_norm_sq == pytest.approx(G2, rel=1e-6)


# ---------------------------------------------------------------------------------- the sampler
@pytest.mark.parametrize("kind", ["shuffle", "sequential"])
def test_sampler_hands_out_each_row_once_per_epoch_whatever_the_sizes(kind):
    rng = np.random.default_rng(0)
    s = Sampler(kind, 50, rng)
    sizes = iter([8, 8, 3, 16, 5, 4, 30, 1, 7, 2, 9, 11] * 20)
    for _ in range(4):
        s.start_epoch(8)
        seen = []
        while s.batches_left(B := next(sizes)):
            b = s.next_size(B)
            seen.extend(s.take(b).tolist())
        assert sorted(seen) == list(range(50))


def test_adaptive_epochs_take_every_row_once(monkeypatch):
    taken = []
    real = Sampler.take

    def spy(self, rows):
        out = real(self, rows)
        taken.append((self.pos - rows, out.copy()))
        return out

    monkeypatch.setattr(Sampler, "take", spy)
    sizes = [8, 16, 32, 64]
    _, h = _fit(_spec(throughput={b: 1e-3 for b in sizes}), steps=None, epochs=4)
    rows = np.concatenate([t for _, t in taken])
    per_epoch = np.split(rows, np.cumsum([N] * 3))
    for ep in per_epoch:
        assert sorted(ep.tolist()) == list(range(N))
    assert len(set(h.column("batch_size").tolist())) > 1, "the batch size never changed"
    assert [e["examples"] for e in h.epochs] == [N * (i + 1) for i in range(4)]


# ---------------------------------------------------------------------------------- determinism, resume
def test_same_seed_same_run_bitwise():
    m1, h1 = _fit()
    m2, h2 = _fit()
    np.testing.assert_array_equal(m1.params, m2.params)
    np.testing.assert_array_equal(h1.column("batch_size"), h2.column("batch_size"))
    np.testing.assert_array_equal(h1.column("loss"), h2.column("loss"))
    assert h1.adaptive == h2.adaptive


@pytest.mark.parametrize(
    "model_kw",
    [{}, {"dropout": 0.2}, {"batch_norm": True}, {"batch_norm": "after", "ghost_batch_size": 4}],
    ids=["plain", "dropout", "bn", "ghost-bn"],
)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_resume_is_bitwise_exact(tmp_path, model_kw, opt):
    optimizer = mg.SGD(lr=0.05, momentum=0.9) if opt == "sgd" else mg.Adam(lr=1e-3)
    m_full, h_full = _fit(model_kw=model_kw, steps=70, optimizer=optimizer)
    ck = str(tmp_path / "ck.npz")
    _fit(model_kw=model_kw, steps=35, optimizer=optimizer, checkpoint=ck)
    m_res, h_res = _fit(model_kw=model_kw, steps=70, optimizer=optimizer, checkpoint=ck, resume=True)
    np.testing.assert_array_equal(m_res.params, m_full.params)
    np.testing.assert_array_equal(m_res.running, m_full.running)
    for c in ("batch_size", "loss", "lr", "examples"):
        np.testing.assert_array_equal(h_res.column(c), h_full.column(c))
    assert h_res.adaptive == h_full.adaptive
    assert [r["noise_scale"] for r in h_res.noise] == [r["noise_scale"] for r in h_full.noise]


def test_resume_refuses_a_crafted_controller_state(tmp_path):
    ck = str(tmp_path / "ck.npz")
    _fit(steps=30, checkpoint=ck)
    c = mg.load_checkpoint(ck)
    c.step_info["adaptive"]["B"] = 7  # not a candidate
    with pytest.raises(mg.CheckpointError, match="adaptive batch-size state"):
        _fit(steps=60, resume=c)


def test_resume_refuses_a_crafted_decision_record(tmp_path):
    ck = str(tmp_path / "ck.npz")
    _fit(steps=30, checkpoint=ck)
    c = mg.load_checkpoint(ck)
    assert c.step_info["adaptive"]["decisions"], "no decision to craft"
    c.step_info["adaptive"]["decisions"][0]["step"] = "ten"
    with pytest.raises(mg.CheckpointError, match="malformed decision records"):
        _fit(steps=60, resume=c)


def test_resume_refuses_other_adaptive_settings(tmp_path):
    ck = str(tmp_path / "ck.npz")
    _fit(steps=30, checkpoint=ck)
    with pytest.raises(ValueError, match="different training run"):
        _fit(_spec(every=5), steps=60, checkpoint=ck, resume=True)


# ---------------------------------------------------------------------------------- the decision period
def test_the_period_doubles_while_the_size_is_kept_and_resets_on_a_change():
    """A decision that keeps the size doubles the period up to max_every; a change, the
    start or end of a trial, or a decision with no noise measured resets it to every."""
    one = Controller(AdaptiveBatchSize(min=8, max=8, every=10, max_every=40), [8], N, False)
    assert one.next_step == 10
    assert one.decide(10) is None and (one.period, one.next_step) == (10, 20)  # nothing measured yet
    one.tracker.update(0, 8, 8 * 2.0, 1.0)
    steps = []
    while one.next_step <= 200:
        steps.append(one.next_step)
        one.decide(one.next_step)
    assert steps == [20, 40, 80, 120, 160, 200] and one.period == 40
    # a change: back to every (a table where the largest size always wins)
    c = Controller(AdaptiveBatchSize(min=8, max=64, every=10, throughput={8: 1e-3, 16: 1e-3, 32: 1e-3, 64: 1e-3}),
                   [8, 16, 32, 64], N, False)  # fmt: skip
    c.measure(None, None, None, None, None)
    c.tracker.update(0, 8, 8 * 100.0, 1.0)  # a large noise scale: 16 is about as efficient per example
    c.period = 80
    assert c.decide(10)["batch_size"] == 16 and (c.period, c.next_step) == (10, 20)
    # and a trial: its start and the decision after it keep the base period
    p = _probed_controller()
    p.period = 80
    assert p.decide(40)["batch_size"] == 16 and p.trial_from == 8 and p.period == 64
    p.observe_time(16, 2e-4)
    assert p.decide(104)["batch_size"] == 8 and p.period == 64  # the trial ended
    assert p.decide(168)["batch_size"] == 8 and p.period == 128  # a plain keep: doubled


def test_fit_decides_on_the_doubling_schedule_and_resumes_on_it(tmp_path):
    """Through fit, with one candidate (every decision keeps it): decisions at 10, 30, 70,
    110, ...; a checkpoint between two decisions of a long period resumes bitwise, on the
    same schedule; max_every=every is the fixed period."""
    X, y = _data()
    spec = AdaptiveBatchSize(min=8, max=8, every=10, max_every=40, track_every=2, throughput={8: 1e-3})

    def run(steps, **kw):
        m = mg.MLP([6, 16, 3], seed=0, dtype="float64")
        h = mg.fit(m, X, y, batch_size=spec, steps=steps, optimizer=mg.SGD(lr=0.05, momentum=0.9), seed=3, **kw)
        return m, h

    m_full, h_full = run(200)
    assert [d["step"] for d in h_full.adaptive] == [10, 30, 70, 110, 150, 190]
    # the noise: every track_every = 2 steps in the first period, then every 2 * period / 10
    # steps from each period's first step (five measurements a period)
    want = [0, 2, 4, 6, 8, 10, 14, 18, 22, 26] + list(range(30, 200, 8))
    assert [r["step"] for r in h_full.noise] == want
    ck = str(tmp_path / "ck.npz")
    run(90, checkpoint=ck)  # between the decisions at 70 and 110 (period 40)
    st = mg.load_checkpoint(ck).step_info["adaptive"]
    assert (st["period"], st["next_step"]) == (40, 110)
    m_res, h_res = run(200, checkpoint=ck, resume=True)
    np.testing.assert_array_equal(m_res.params, m_full.params)
    assert h_res.adaptive == h_full.adaptive
    assert [r["step"] for r in h_res.noise] == want
    for bad in ({"next_step": 90}, {"next_step": 131}, {"period": 80}, {"period": 5}, {"next_step": "110"},
                {"period": True}):  # fmt: skip
        c = mg.load_checkpoint(ck)
        c.step_info["adaptive"].update(bad)
        with pytest.raises(mg.CheckpointError, match="decision period"):
            run(200, resume=c)
    c = mg.load_checkpoint(ck)  # a state without a schedule (a fixed-period version): the next multiple
    del c.step_info["adaptive"]["period"], c.step_info["adaptive"]["next_step"]
    ctrl = Controller(_spec(min=8, max=8, every=10, max_every=10, throughput={8: 1e-3}), [8], N, False)
    ctrl.restore(c.step_info["adaptive"], c.history.noise_tracker, "test", step=90)
    assert (ctrl.period, ctrl.next_step) == (10, 100)
    fixed = AdaptiveBatchSize(min=8, max=8, every=10, max_every=10, track_every=2, throughput={8: 1e-3})
    m = mg.MLP([6, 16, 3], seed=0, dtype="float64")
    h = mg.fit(m, X, y, batch_size=fixed, steps=60, optimizer=mg.SGD(lr=0.05), seed=3)
    assert [d["step"] for d in h.adaptive] == [10, 20, 30, 40, 50, 60]
    assert [r["step"] for r in h.noise] == list(range(0, 60, 2))


def test_a_checkpoint_of_the_fixed_period_version_resumes_under_max_every_equal_every(tmp_path):
    """A checkpoint written before the doubling period (no max_every in its settings, no
    period / next_step in its state) was on the fixed period: it resumes, bitwise, under
    max_every=every, and is refused as another run under the default."""
    X, y = _data()
    fixed = _spec(every=10, max_every=10)

    ck = str(tmp_path / "ck.npz")

    def run(spec, steps, **kw):
        m = mg.MLP([6, 16, 3], seed=0, dtype="float64")
        h = mg.fit(m, X, y, batch_size=spec, steps=steps, optimizer=mg.SGD(lr=0.05, momentum=0.9), seed=3, **kw)
        return m, h

    def old_checkpoint(spec, steps):
        """A checkpoint as the fixed-period version wrote it: no max_every, no schedule."""
        run(spec, steps, checkpoint=ck)
        old = mg.load_checkpoint(ck)
        del old.step_info["fit"]["batch_size"]["adaptive"]["max_every"]
        del old.step_info["adaptive"]["period"], old.step_info["adaptive"]["next_step"]
        return old

    # track_every dividing every (2 and 10) or not (3): the fixed period measures at the
    # multiples of track_every, as that version did (not from each period's first step)
    for spec, at in ((fixed, 35), (_spec(every=10, max_every=10, track_every=3), 37)):
        m_full, h_full = run(spec, 70)
        assert [r["step"] for r in h_full.noise] == list(range(0, 70, spec.track_every))
        old = old_checkpoint(spec, at)
        m_res, h_res = run(spec, 70, resume=old)
        np.testing.assert_array_equal(m_res.params, m_full.params)
        assert h_res.adaptive == h_full.adaptive and h_res.noise == h_full.noise
    with pytest.raises(ValueError, match="different training run"):
        run(_spec(every=10), 70, resume=old_checkpoint(fixed, 35))


def test_a_malformed_checkpoint_step_is_named_as_such(tmp_path):
    """The controller's schedule is checked against the checkpoint's step count; a crafted
    step count is reported as itself, not as a bad decision period."""
    ck = str(tmp_path / "ck.npz")
    _fit(steps=35, checkpoint=ck)
    for bad in (-1, "35", 2**60, 35.0):
        c = mg.load_checkpoint(ck)
        c.step_info["step"] = bad
        with pytest.raises(mg.CheckpointError, match=r"step_info\['step'\]"):
            _fit(steps=70, resume=c)


def test_batch_norm_tracks_on_the_same_schedule():
    """With batch norm a tracked step runs alone (the two-batch estimate needs a pass before
    it): the same steps as inside runs."""
    X, y = _data()
    spec = AdaptiveBatchSize(min=8, max=8, every=10, max_every=40, track_every=2, throughput={8: 1e-3})
    m = mg.MLP([6, 16, 3], seed=0, dtype="float64", batch_norm=True)
    h = mg.fit(m, X, y, batch_size=spec, steps=120, optimizer=mg.SGD(lr=0.05), seed=3)
    assert [d["step"] for d in h.adaptive] == [10, 30, 70, 110]
    assert [r["step"] for r in h.noise] == [0, 2, 4, 6, 8, 10, 14, 18, 22, 26] + list(range(30, 120, 8))


# ---------------------------------------------------------------------------------- every backend, optimizer
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize(
    "opt",
    [mg.SGD(lr=0.05), mg.SGD(lr=0.05, momentum=0.9), mg.Adam(lr=1e-3), mg.AdamW(lr=1e-3, weight_decay=1e-2)],
    ids=["sgd", "momentum", "adam", "adamw"],
)
def test_every_backend_and_optimizer(backend, opt):
    m, h = _fit(backend=backend, optimizer=opt)
    assert h.n_steps == 60 and np.isfinite(m.params).all() and h.adaptive


def test_backends_agree():
    m_np, h_np = _fit(backend="numpy")
    m_cpu, h_cpu = _fit(backend="cpu")
    np.testing.assert_array_equal(h_np.column("batch_size"), h_cpu.column("batch_size"))
    np.testing.assert_allclose(m_np.params, m_cpu.params, rtol=1e-9, atol=1e-12)


def test_measured_throughput_probe_leaves_training_untouched():
    """The default measures each candidate's step time on scratch copies: the run's
    parameters, optimizer state and generator are those of a run with a given table, as
    long as the decisions agree (a single candidate: they must)."""
    spec_m = AdaptiveBatchSize(min=16, max=16, every=10, track_every=2)
    spec_t = AdaptiveBatchSize(min=16, max=16, every=10, track_every=2, throughput={16: 1e-3})
    m1, h1 = _fit(spec_m)
    m2, h2 = _fit(spec_t)
    np.testing.assert_array_equal(m1.params, m2.params)


def test_flops_throughput_is_deterministic_and_grows_past_the_noise():
    spec = AdaptiveBatchSize(min=8, max=128, every=10, track_every=2, throughput="flops")
    m1, h1 = _fit(spec)
    m2, h2 = _fit(spec)
    np.testing.assert_array_equal(m1.params, m2.params)
    assert h1.adaptive == h2.adaptive


def test_sklearn_estimators_accept_adaptive():
    sk = pytest.importorskip("minigd.sklearn")
    X, y = _data()
    clf = sk.MLPClassifier(hidden_layer_sizes=(8,), batch_size="adaptive", epochs=3, random_state=0)
    clf.fit(X[:, :6], y)
    assert clf.predict(X).shape == (N,)


def test_gpu_backend_matches_cpu_under_the_emulator():
    """The gpu backend (CUDA kernels run on the CPU by the emulator) makes the same
    decisions: with batch norm it reads |g_B|^2 with an extra pass (its run_steps reports
    the gradient norm only with per-example norms)."""
    E = pytest.importorskip("minigd.testing.gpu_emu")
    if E.reason() is not None:
        pytest.skip(f"no GPU emulator: {E.reason()}")
    with E.emulated():
        for kw in ({}, {"batch_norm": True}):
            m_c, h_c = _fit(backend="cpu", dtype="float32", model_kw=kw)
            m_g, h_g = _fit(backend="gpu", dtype="float32", model_kw=kw)
            np.testing.assert_array_equal(h_c.column("batch_size"), h_g.column("batch_size"))
            np.testing.assert_allclose(h_c.column("lr"), h_g.column("lr"), rtol=1e-5)
            np.testing.assert_allclose(m_c.params, m_g.params, rtol=1e-3, atol=1e-4)


def test_private_goodput_and_gain_match_the_public_functions():
    from minigd.gradstats import goodput

    c = Controller(_spec(), [8, 16, 32, 64], N, replacement=False)
    c.seconds = {8: 1e-4, 16: 1.5e-4, 32: 2.2e-4, 64: 4e-4}
    B = np.asarray(c.sizes, np.float64)
    for phi in (0.0, 3.0, 50.0, 1e6, math.inf):
        want = np.asarray(goodput(B / np.asarray([c.seconds[b] for b in c.sizes]), phi, B, 8.0))
        np.testing.assert_allclose(list(c._goodputs(phi).values()), want, rtol=1e-12)


def test_measured_step_times_are_refined_from_the_real_steps():
    X, y = _data()
    m = mg.MLP([6, 16, 3], seed=0, dtype="float64")
    spec = AdaptiveBatchSize(min=8, max=64, every=10, track_every=2)
    seen = {}
    real = Controller.observe_time

    def spy(self, B, sec):
        seen.setdefault(B, []).append(sec)
        return real(self, B, sec)

    Controller.observe_time = spy
    try:
        mg.fit(m, X, y, batch_size=spec, steps=40, seed=3)
    finally:
        Controller.observe_time = real
    assert 8 in seen and all(v > 0 for v in seen[8])


def test_tracked_steps_inside_runs_match_tracked_steps_alone():
    """Host backends track inside the backend's runs: the noise records are bitwise those
    of a run that ends at every tracked step (forced with a per-step callback)."""
    X, y = _data()

    class Every:
        def on_step(self, model, step, loss):
            return False

    out = []
    for cb in ([], [Every()]):
        m = mg.MLP([6, 16, 3], seed=0, dtype="float64")
        h = mg.fit(m, X, y, batch_size=16, steps=50, track_noise=3, seed=1, callbacks=cb)
        out.append((m.params.copy(), h.noise))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    assert out[0][1] == out[1][1]


def test_probed_throughput_probes_only_the_sizes_in_reach(monkeypatch):
    """throughput="probe", max_step=2: nothing is timed before training; the first decision times the
    starting size's neighbour (and the starting size once, for the probe's offset to its
    real steps), and a further size only when a decision first can reach it; the largest
    candidates of a short run are never timed, and a run that ends before its first
    decision times nothing."""
    probed = []
    real = Controller._time_sizes

    def spy(self, todo):
        probed.append(sorted(todo))
        return real(self, todo)

    monkeypatch.setattr(Controller, "_time_sizes", spy)
    X, y = _data()
    m = mg.MLP([6, 16, 3], seed=0, dtype="float64")
    bs = AdaptiveBatchSize(min=8, max=128, every=10, track_every=2, throughput="probe")
    h = mg.fit(m, X, y, batch_size=bs, steps=20, seed=3)
    assert probed[0] == [8, 16]
    assert 128 not in {b for p in probed for b in p}
    assert h.adaptive[0]["step"] == 10  # the first probe ran at the first decision
    probed.clear()

    class StopAt5:  # a target met (here: a callback) before the first decision
        def on_step(self, model, step, loss):
            return step >= 5

    h = mg.fit(m, X, y, batch_size=bs, steps=20, seed=3, callbacks=[StopAt5()])
    assert h.n_steps == 5 and probed == [] and not h.adaptive


def test_measured_throughput_times_only_real_steps_and_predicts_the_rest(monkeypatch):
    """The default (throughput=None) times nothing but the real steps: a size in reach that was
    not trained at is predicted from the nearest trained size (no faster per example when
    larger; saving only the cost model's share when smaller), and its real steps replace the
    prediction once it is trained at."""
    from minigd.adaptive import FLOPS_OVERHEAD_ROWS as K

    monkeypatch.setattr(Controller, "_time_sizes", lambda self, todo: pytest.fail("the default must not probe"))
    X, y = _data()
    m = mg.MLP([6, 16, 3], seed=0, dtype="float64")
    h = mg.fit(m, X, y, batch_size=AdaptiveBatchSize(min=8, max=128, every=10, track_every=2), steps=60, seed=3)
    chosen = [d["batch_size"] for d in h.adaptive]
    assert set(chosen) <= {8, 16, 32, 64, 128} and max(chosen) > 8  # it moved, on predicted and real times
    c = Controller(AdaptiveBatchSize(min=8, max=64), [8, 16, 32, 64], N, replacement=False)
    c.observe_time(8, 1e-4)
    for step in range(4):
        c.tracker.update(step, 8, 8 * 1.0 + 8 * 1.0, 1.0)  # a small noise scale: 8 stays best
    c.decide(10)
    assert c.seconds[16] == pytest.approx(2e-4) and 32 not in c.seconds  # in reach only; no faster per example
    assert not c._observed.get(16) and c._probed == {}
    c.observe_time(16, 5e-4)  # trained at: its real time, whatever the prediction said
    c.B = 16
    c.decide(20)
    assert c.seconds[16] == 5e-4 and c.seconds[32] == pytest.approx(1e-3)
    assert c.seconds[8] == 1e-4  # (8 keeps its own real time)
    c2 = Controller(AdaptiveBatchSize(min=8, max=64), [8, 16, 32, 64], N, replacement=False)
    c2.B = 32
    c2.observe_time(32, 1e-3)
    c2.tracker = c.tracker
    c2.decide(30)  # a smaller size saves only the cost model's share of the step
    assert c2.seconds[16] == pytest.approx(1e-3 * (K + 16) / (K + 32)) and c2.seconds[64] == pytest.approx(2e-3)


def test_real_step_times_calibrate_the_sizes_only_probed():
    c = Controller(AdaptiveBatchSize(min=8, max=64), [8, 16, 32, 64], N, replacement=False)
    c._probed = {8: 1e-4, 16: 1.5e-4, 32: 2e-4}
    c.seconds = dict(c._probed)
    c.observe_time(8, 2e-4)  # a real step at 8 takes 100 us more than the probe's
    assert c.seconds[8] == 2e-4 and c.seconds[16] == pytest.approx(2.5e-4) and c.seconds[32] == pytest.approx(3e-4)
    c.observe_time(16, 2.0e-4)  # 16 now has real steps of its own: kept; the offset moves to 50 us
    assert c.seconds[16] == 2.0e-4 and c.seconds[8] == 2e-4 and c.seconds[32] == pytest.approx(2.5e-4)
    st = c.state()
    c2 = Controller(AdaptiveBatchSize(min=8, max=64), [8, 16, 32, 64], N, replacement=False)
    c2.restore(st, c.tracker, "test")
    assert c2.seconds == c.seconds and c2._calib == c._calib and c2._observed == c._observed


def test_real_step_times_are_the_median_of_the_recent_runs():
    """One run of steps slowed by another process (here 10x) moves nothing; a lasting change does."""
    c = Controller(AdaptiveBatchSize(min=8, max=64), [8, 16, 32, 64], N, replacement=False)
    for t in (1e-4, 1.1e-4, 1e-3, 0.9e-4):  # the third run was preempted
        c.observe_time(8, t)
    assert c.seconds[8] == pytest.approx(1.05e-4)
    for _ in range(RECENT):  # the machine got slower for good: only the last RECENT runs count
        c.observe_time(8, 3e-4)
    assert c.seconds[8] == 3e-4 and len(c._recent[8]) == RECENT


def test_runs_of_steps_are_added_up_into_one_sample_per_decision_period():
    """observe_run only adds (it runs after every run of steps: every step with a per-step
    callback); a decision, or a change of batch size, folds the period's steps into one
    sample, their mean step time; the sum in progress is part of the checkpointed state."""
    c = Controller(AdaptiveBatchSize(min=8, max=64), [8, 16, 32, 64], N, replacement=False)
    for _ in range(9):
        c.observe_run(8, 1e-4, 1)
    c.observe_run(8, 2.1e-3, 21)  # a longer run: weighted by its steps
    assert 8 not in c.seconds and c._recent == {}
    st = json.loads(json.dumps(c.state()))
    assert st["pending"] == [8, pytest.approx(3e-3), 30] and len(st["pending_runs"]) == 10
    c.observe_run(16, 4e-4, 2)  # the size changed: 8's period is one sample
    assert c._recent == {8: [pytest.approx(1e-4)]} and c.seconds[8] == pytest.approx(1e-4)
    c.tracker.update(0, 16, 16 * 2.0, 1.0)
    c.decide(40)  # a decision folds the period in progress
    assert c.seconds[16] == pytest.approx(2e-4) and c._pend[:3] == [0, 0.0, 0] and c._run_t == []
    c2 = Controller(AdaptiveBatchSize(min=8, max=64), [8, 16, 32, 64], N, replacement=False)
    c2.restore(st, c.tracker, "test")  # resumed mid-period: it goes on with the same sum
    c2.observe_run(8, 1e-3, 10)
    c2._fold()
    assert c2.seconds[8] == pytest.approx(1e-4)


def test_one_disturbed_run_does_not_set_a_sizes_step_time():
    """A run slowed by another process (here one step of 5 ms among 64 of 15 us, each its own
    run as with a per-step callback) moves nothing: with a run more than twice as slow per step
    as another, the period's sample is the step-weighted median of its runs, not their mean."""
    c = Controller(AdaptiveBatchSize(min=8, max=64), [8, 16, 32, 64], N, replacement=False)
    for i in range(64):
        c.observe_run(16, 5e-3 if i == 30 else 15e-6, 1)
    c._fold()
    assert c.seconds[16] == pytest.approx(15e-6)
    for i in range(4):  # a run's first, cold steps twice as slow: the median of the runs again
        c.observe_run(16, 16 * (40e-6 if i == 0 else 15e-6), 16)
    c._fold()
    assert c._recent[16] == [pytest.approx(15e-6)] * 2


@pytest.mark.parametrize(
    "bad",
    [
        [8, -1.0, 3],
        [8, 1.0, 2.5],
        [7, 1.0, 3],
        [8, float("inf"), 3],
        [8, 10**400, 3],  # an int no float holds
        [0, 1.0, 5],  # steps without a size
        [8, 1.0, 0],  # a size without steps
        [True, 1.0, 3],
        "x",
        [8, 1.0],
    ],
)
def test_a_crafted_pending_step_time_is_refused(bad):
    c = Controller(AdaptiveBatchSize(min=8, max=64), [8, 16, 32, 64], N, replacement=False)
    st = c.state()
    with pytest.raises(mg.CheckpointError, match="pending"):
        Controller(AdaptiveBatchSize(min=8, max=64), [8, 16, 32, 64], N, replacement=False).restore(
            {**st, "pending": bad}, c.tracker, "test"
        )
    with pytest.raises(mg.CheckpointError, match="pending"):  # and the runs of the sum
        Controller(AdaptiveBatchSize(min=8, max=64), [8, 16, 32, 64], N, replacement=False).restore(
            {**st, "pending": [8, 1.0, 3], "pending_runs": [[10**400, 3]]}, c.tracker, "test"
        )


def test_numbers_too_large_for_a_float_in_a_checkpoint_are_refused_not_crashed_on():
    c = Controller(AdaptiveBatchSize(min=8, max=64), [8, 16, 32, 64], N, replacement=False)
    st = c.state()
    for k in ("factor", "gain", "goodput", "noise", "calib"):
        with pytest.raises(mg.CheckpointError):
            Controller(AdaptiveBatchSize(min=8, max=64), [8, 16, 32, 64], N, replacement=False).restore(
                {**st, k: 10**400}, c.tracker, "test"
            )


def _observed_controller():
    c = Controller(AdaptiveBatchSize(min=8, max=64), [8, 16, 32, 64], N, replacement=False)
    c._probed = {8: 1e-4, 16: 1.5e-4}
    c.seconds = dict(c._probed)
    for t in (2e-4, 2.2e-4, 1.9e-4):
        c.observe_time(8, t)
    return c


def test_the_recent_step_times_round_trip_a_checkpoint_and_older_checkpoints_still_load():
    c = _observed_controller()
    c2 = Controller(AdaptiveBatchSize(min=8, max=64), [8, 16, 32, 64], N, replacement=False)
    c2.restore(json.loads(json.dumps(c.state())), c.tracker, "test")
    assert c2._recent == c._recent and c2.seconds == c.seconds
    c2.observe_time(8, 5e-4)  # continues the same window
    c.observe_time(8, 5e-4)
    assert c2.seconds == c.seconds
    old = c.state()
    del old["recent"]  # written before the window existed: an observed size's value is its history
    c3 = Controller(AdaptiveBatchSize(min=8, max=64), [8, 16, 32, 64], N, replacement=False)
    c3.restore(old, c.tracker, "test")
    assert c3._recent == {8: [c.seconds[8]]} and c3.seconds == c.seconds


@pytest.mark.parametrize(
    "recent",
    [[[8, []]], [[8, [1e-4] * (RECENT + 1)]], [[8, [-1.0]]], [[8, [float("nan")]]], [[7, [1e-4]]], [[8, "x"]], "x"],
)
def test_resume_refuses_a_crafted_step_time_window(recent):
    c = _observed_controller()
    st = c.state()
    st["recent"] = recent
    c2 = Controller(AdaptiveBatchSize(min=8, max=64), [8, 16, 32, 64], N, replacement=False)
    with pytest.raises(mg.CheckpointError, match="malformed throughput table"):
        c2.restore(st, c.tracker, "test")


def _probed_controller(explore=0.3):
    """At B=8 with real step times; 16 known from the probe only, 20% slower per example than
    8 -- a probe on a busy machine (the true 16 is faster)."""
    c = Controller(
        AdaptiveBatchSize(min=8, max=32, explore=explore, throughput="probe"), [8, 16, 32], N, replacement=False
    )
    c._probe = {}  # (probed throughput; every size in reach is already timed below)
    c._probed = {8: 1e-4, 16: 2.4e-4, 32: 9e-4}
    c.seconds = dict(c._probed)
    c.observe_time(8, 1e-4)
    for step in range(4):  # a large noise scale: efficiency ~1 at 16
        c.tracker.update(step, 8, 8 * 1000.0 + 8 * 1.0, 1.0)
    return c


def test_a_size_known_from_the_probe_only_is_tried_once_when_within_its_error():
    c = _probed_controller()
    rec = c.decide(40)
    assert rec["batch_size"] == 16 and rec["reason"].startswith("explore") and c.explored == [16]
    c.observe_time(16, 1.6e-4)  # its real steps: faster per example than 8 after all
    rec = c.decide(80)
    assert rec["reason"].startswith("keep") and c.B == 16  # now chosen on real times
    c.observe_time(16, 3e-4)  # ... or not: back to 8, and 16 is not explored again
    rec = c.decide(120)
    assert rec["batch_size"] == 8 and rec["reason"].startswith("shrink")
    assert c.decide(160)["batch_size"] == 8 and c.explored == [16]


def test_a_trial_keeps_its_size_only_when_it_wins_by_min_gain():
    """After a trial (explore) the size it left is the incumbent: a tried size that turns out
    no better than it (here the same time per example: within min_gain) is left at the next
    decision, where before the hysteresis kept it; the trial state round-trips a checkpoint."""
    c = _probed_controller()
    assert c.decide(40)["batch_size"] == 16 and c.trial_from == 8
    st = json.loads(json.dumps(c.state()))
    assert st["trial_from"] == 8
    c2 = Controller(AdaptiveBatchSize(min=8, max=32, explore=0.3, throughput="probe"), [8, 16, 32], N, False)
    c2.restore(st, c.tracker, "test", step=40)
    assert c2.trial_from == 8 and (c2.period, c2.next_step) == (64, 104)  # a trial: the base period
    for ctrl in (c, c2):
        ctrl.observe_time(16, 2e-4)  # exactly 8's time per example: no gain
        rec = ctrl.decide(80)
        assert rec["batch_size"] == 8 and "the trial of B=16 ends" in rec["reason"], rec
        assert ctrl.trial_from == 0
    for bad in (12, True, "8", -1):
        st["trial_from"] = bad
        with pytest.raises(mg.CheckpointError, match="trial"):
            c2.restore(st, c.tracker, "test", step=40)
    del st["trial_from"]  # a checkpoint of an earlier version: no trial under way
    c2.restore(st, c.tracker, "test", step=40)
    assert c2.trial_from == 0


def test_explore_zero_and_given_tables_never_explore():
    c = _probed_controller(explore=0.0)
    assert c.decide(40)["batch_size"] == 8 and c.explored == []
    c = _probed_controller()
    c.spec = AdaptiveBatchSize(min=8, max=32, throughput=dict(c.seconds) | {32: 9e-4})
    c._probe = None  # a given table: the times are the user's, nothing to correct
    assert c.decide(40)["batch_size"] == 8 and c.explored == []


def test_explored_sizes_round_trip_a_checkpoint_and_crafted_ones_are_refused():
    c = _probed_controller()
    c.decide(40)
    st = json.loads(json.dumps(c.state()))
    c2 = Controller(AdaptiveBatchSize(min=8, max=32), [8, 16, 32], N, replacement=False)
    c2.restore(st, c.tracker, "test", step=40)
    assert c2.explored == [16]
    st["explored"] = [12]
    with pytest.raises(mg.CheckpointError, match="explored sizes"):
        c2.restore(st, c.tracker, "test", step=40)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 64),
            st.floats(0.0, 1e3, allow_nan=False),
            st.floats(0.0, 10.0, allow_nan=False),
            st.booleans(),
        ),
        min_size=1,
        max_size=30,
    ),
    st.booleans(),
)
def test_noise_tracker_folds_its_records_lazily_and_bitwise_as_eagerly(steps, replacement):
    """NoiseTracker.update only records (it runs at every tracked step); the moving averages
    catch up when read.  Read after every update or once at the end, and through a
    checkpoint of the state half way, the values are bitwise the same."""
    from minigd.gradstats.tracking import NoiseTracker

    eager, lazy = NoiseTracker(500, replacement, 0.9), NoiseTracker(500, replacement, 0.9)
    for i, (B, s, g, read) in enumerate(steps):
        eager.update(i, B, s, g)
        eager.smoothed()
        lazy.update(i, B, s, g)
        if read and i == len(steps) // 2:  # a checkpoint taken with records not yet folded in
            lazy = NoiseTracker.from_state(lazy.get_state())
    for t in (eager, lazy):
        assert t.n_updates == sum(B >= 2 for B, *_ in steps)
    same = [eager.smoothed(), lazy.smoothed(), (eager.noise_scale,), (lazy.noise_scale,)]
    np.testing.assert_array_equal(np.array(same[0]), np.array(same[1]))
    np.testing.assert_array_equal(np.array(same[2]), np.array(same[3]))
    assert eager.records() == lazy.records() or all(
        np.array_equal(np.array(list(a.values()), float), np.array(list(b.values()), float), equal_nan=True)
        for a, b in zip(eager.records(), lazy.records())
    )


def test_exploring_takes_the_nearest_size_first_and_the_smaller_of_a_tie():
    """Candidates 32 < 48 < 72 are a geometric tie around 48 (32 * 72 = 48^2); of two sizes
    equally near, in the key (|log(b / cur)|, b), the one whose rounding is nearer comes first
    -- the order this controller has always used, kept when the orders got cached."""
    spec = AdaptiveBatchSize(min=32, candidates=[32, 48, 72], explore=10.0)
    c = Controller(spec, spec.sizes(1000), 1000, False)
    c.B = 48
    for s in range(10):
        tr = (1 - 1e-4) / (1 / 48 - 1 / 1000)
        c.tracker.update(s, 48, 48 + 47 * tr, 1.0)
    c.observe_time(48, 1e-3)
    want = sorted([32, 72], key=lambda b: (abs(math.log(b / 48)), b))[0]
    assert c.decide(64)["batch_size"] == want


def test_a_noise_tracker_pickled_before_the_lazy_averages_still_reads():
    import pickle

    from minigd.gradstats.tracking import NoiseTracker

    t = NoiseTracker(100, False, 0.9)
    for s in range(5):
        t.update(s, 8, 20.0 + s, 1.0)
    want = t.noise_scale
    st = dict(t.__dict__)
    del st["_done"]  # what an older version pickled: every record already in the averages
    old = NoiseTracker.__new__(NoiseTracker)
    old.__setstate__(st)
    assert old.noise_scale == want and pickle.loads(pickle.dumps(old)).noise_scale == want


def test_a_size_whose_one_sample_is_suspect_is_tried_once_more():
    """B=16's only sample (a disturbed period: 3x its real time) is slower than even the
    conservative prediction from B=8 (2x B=8's time): the controller tries it once more, with
    that sample dropped, when it would win at the predicted time -- and only once; a size with
    two samples, or one no slower than the prediction, is left alone."""
    spec = AdaptiveBatchSize(min=8, max=32, explore=0.3)
    c = Controller(spec, [8, 16, 32], N, replacement=False)
    for s in range(10):  # a large noise scale: every size about as efficient per example
        tr = 1e4
        c.tracker.update(s, 8, 8 * 1.0 + 7 * tr, 1.0)
    c.observe_time(8, 1e-4)
    c.observe_time(16, 6e-4)  # one disturbed sample: 3x the real 2e-4
    c.explored = [16, 32]  # (exploring untried sizes is not what this tests)
    rec = c.decide(64)
    assert rec["batch_size"] == 16 and rec["reason"].startswith("retry: B=16")
    assert c.retried == [16] and 16 not in c._observed and 16 not in c._recent
    c2 = Controller(spec, [8, 16, 32], N, replacement=False)
    c2.restore(json.loads(json.dumps(c.state())), c.tracker, "test", step=64)
    assert c2.retried == [16] and c2.seconds == c.seconds
    c.observe_time(16, 6e-4)  # disturbed again: no third try
    c.B = 8
    assert c.decide(128)["batch_size"] == 8
    d = Controller(spec, [8, 16, 32], N, replacement=False)
    d.tracker = c.tracker
    d.observe_time(8, 1e-4)
    d.observe_time(16, 1.9e-4)  # one sample, no slower than the prediction: trusted
    d.explored = [16, 32]
    assert not d.decide(64)["reason"].startswith("retry") and d.retried == []
