"""Must batch sizes be powers of two?

Answered with the throughput probe (:func:`minigd.study.probe.probe`: the whole training
step as ``fit`` pays it, one thread, rounds interleaved across batch sizes in a fresh random
order each round) at every batch size B from P - 3 to P + 3 around each power of two
P = 8, 16, 32, ..., :data:`P_MAX` with P + 3 <= the training-set size (the largest Ps are
dropped, and the rounds chosen, to fit :data:`PROBE_BUDGET_S`).  Its entries are stored in
the meta entry ``probe:powers_of_two`` (re-used on a resumed study on the same host, and by
``minigd report``).

**Short rounds, fastest tenth.**  The probe runs here with rounds of :data:`ROUND_S`
(~2 ms, not the study's 20 ms), many of them, and the step time of a batch size is the
:data:`QUANTILE` quantile of its rounds (the fastest tenth), not their median.  Other
processes only ever add time to a round, and on a loaded machine they interrupt nearly
every round longer than a scheduler time slice.  The probe sizes each round from a short
pilot, so a disturbed pilot gives one batch size rounds ten times shorter than its
neighbours', which escape the interruptions: with 20 ms rounds under a load of ~8 on 2
cores, batch 256 (12 steps a round) timed 94 µs a step against 210-240 µs for its
neighbours (130-160 steps a round), a spurious 55% "advantage".  Rounds of ~2 ms mostly
fit in a time slice whatever their pilot, and their fastest tenth is the undisturbed step.

**Cost per example.**  c(B) = t(B) / e(B), e(B) the examples per step of the timed rounds:
B while a round is a part of an epoch; n/ceil(n/B) once the probe times whole epochs
(its rounds are whole epochs when they are longer than one), whose last batch is partial.

**Advantage.**  Around each P the per-example cost of the six neighbours P +- 1..3 is fitted
by the usual step-cost model, c = alpha + beta/e (a fixed cost per step plus a cost per
example: a straight line in B for the step time), and the power of two's advantage is

    advantage(P) = 1 - c(P) / c_hat(P),

the share of its time per example a power of two saves against the trend of its neighbours
(positive: the power of two is faster).  With whole batches this is 1 - t(P)/t_hat(P), t_hat
the straight line through the neighbours' step times at P (their mean: the design is
symmetric); fitting in 1/e keeps the fixed per-step cost's curvature out of the comparison
(averaging c(P - k) and c(P + k) would overstate c(P) by ~k^2/P^2 of that cost).

The headline is the median advantage over the Ps, in percent, with a 90% bootstrap
interval at two levels: each resample draws the probe's rounds with replacement (jointly
for every batch size: one round visits every batch size once, in the same window of time),
recomputes every step time, trend and advantage, and then draws the Ps with replacement.
The second level is needed because each batch size's model and buffers are set up once per
probe, which makes it a percent or two faster or slower for the whole session: two runs'
per-P advantages differed by more than their round intervals (batch 16: +1.9% [1.6, 2.3]
in one, -0.6% [-1.8, -0.3] in the next).  Per P, an advantage *stands out* when it exceeds
the 90% prediction band of its neighbours' own scatter about their trend
(:func:`prediction_band`) and its round interval excludes 0.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

NAME = "powers_of_two"
QUESTION = "Must batch sizes be powers of two?"
#: the neighbours on each side of a power of two
HALF_WIDTH = 3
#: the smallest and the largest power of two probed (the largest also bounded by the data)
P_MIN, P_MAX = 8, 1024
#: seconds the probe may take (on top of its pilot runs); rounds are chosen to fill it
PROBE_BUDGET_S = 30.0
#: rounds per batch size: at least / at most
MIN_ROUNDS, MAX_ROUNDS = 15, 100
#: seconds one round of one batch size should last (see the module docstring)
ROUND_S = 0.002
#: seconds a round costs beyond its steps (``fit``'s set-up and untimed warm-up step)
FIT_OVERHEAD_S = 0.002
N_BOOT = 2000
#: the quantile of the probe's rounds taken as the step time (see the module docstring)
QUANTILE = 0.1


def _step_estimate(ctx):
    """B -> a rough step time (s) from the main study's probe (linear in B between its
    batch sizes), for budgeting only; None without a probe."""
    pts = sorted(
        (int(e["batch_size"]), float(e["median_s"]))
        for e in (ctx.main_probe or [])
        if isinstance(e, dict) and e.get("median_s")
    )
    if not pts:
        return None
    xs, ys = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
    return lambda B: float(np.interp(B, xs, ys))


def design(ctx):
    """``(powers, batch_sizes, rounds)``: the powers of two P probed, every batch size
    P - 3 .. P + 3 around them (sorted), and the rounds -- deterministic in the study
    (its training-set size and its stored probe)."""
    n = ctx.n_train
    est = _step_estimate(ctx)
    step = lambda B: est(B) if est else 0.0
    cost = lambda B: FIT_OVERHEAD_S + step(B) + max(ROUND_S, step(B))  # set-up, untimed step, round
    powers = []
    P = P_MIN
    while P <= P_MAX and P + HALF_WIDTH <= n:
        per_round = sum(cost(B) for Q in powers + [P] for B in range(Q - HALF_WIDTH, Q + HALF_WIDTH + 1))
        if powers and per_round * MIN_ROUNDS > PROBE_BUDGET_S:
            break  # the largest Ps are dropped to fit the budget
        powers.append(P)
        P *= 2
    bs = sorted({B for Q in powers for B in range(Q - HALF_WIDTH, Q + HALF_WIDTH + 1)})
    per_round = sum(cost(B) for B in bs)
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, PROBE_BUDGET_S // max(per_round, 1e-9))))
    return powers, bs, rounds


def _configs(ctx, bs):
    return [ctx.base_config(batch_size=int(B)) for B in bs]


def probe_entries(ctx, configs, rounds) -> list:
    """The probe's entries for ``configs`` (as :meth:`QuestionContext.probe`, with rounds of
    :data:`ROUND_S`): stored ones when every batch size has one, taken with this round
    length (and on this host, unless read-only); else measured now and stored."""
    import platform

    from minigd.study.probe import probe, probe_jobs, probe_key

    jobs = probe_jobs(configs)
    meta = f"probe:{NAME}"
    old = ctx.store.meta(meta) or []
    have = {e.get("key"): e for e in old if isinstance(e, dict) and e.get("round_target_s") == ROUND_S}
    need = [probe_key(c) for c in jobs]
    if all(k in have for k in need) and (ctx.readonly or all(have[k].get("host") == platform.node() for k in need)):
        return [have[k] for k in need]
    if ctx.readonly:
        return [have[k] for k in need if k in have]
    ctx.log(
        f"  {NAME}: timing {len(jobs)} batch sizes, {rounds} rounds of ~{ROUND_S * 1e3:g} ms each (throughput probe)"
    )
    entries = [dict(e, round_target_s=ROUND_S) for e in probe(jobs, rounds=rounds, round_s=ROUND_S, seed=ctx.seed)]
    ctx.store.set_meta(meta, entries)
    return entries


def run(ctx) -> list:
    """Time every batch size of :func:`design`; no trials."""
    powers, bs, rounds = design(ctx)
    if powers:
        probe_entries(ctx, _configs(ctx, bs), rounds)
    return []


def _low_quantile(a, axis=-1):
    """The :data:`QUANTILE` quantile along ``axis`` (an order statistic: inverted CDF)."""
    a = np.sort(a, axis=axis)
    k = a.shape[axis]
    return np.take(a, max(0, math.ceil(QUANTILE * k) - 1), axis=axis)


def examples_per_step(B: int, n: int, steps: int) -> float:
    """Examples per step of ``steps`` steps of ``fit`` from the start of an epoch at batch
    size ``B`` on ``n`` examples (the last batch of an epoch holds the rest)."""
    spe = -(-n // B)
    full, rest = divmod(max(1, int(steps)), spe)
    return (full * n + rest * B) / max(1, int(steps))


def _advantages(C, E, col, powers):
    """Per power of two, ``1 - c(P)/c_hat(P)`` over the rows of ``C`` (costs per example,
    (R, nB)); ``E`` the examples per step (nB,).  ``c_hat`` is the least-squares fit
    ``c = alpha + beta/e`` over the neighbours, at ``e(P)``.  NaN where P or a side's
    neighbours were not measured."""
    out = np.full((C.shape[0], len(powers)), np.nan)
    for j, P in enumerate(powers):
        nb = [B for B in range(P - HALF_WIDTH, P + HALF_WIDTH + 1) if B != P and B in col]
        if P not in col or not any(B < P for B in nb) or not any(B > P for B in nb):
            continue
        x = 1.0 / E[[col[B] for B in nb]]
        y = C[:, [col[B] for B in nb]]  # (R, k)
        xc = x - x.mean()
        if xc @ xc <= 1e-12 * (x @ x):  # whole epochs of the same step count: the same work
            slope = np.zeros(C.shape[0])
        else:
            slope = (y - y.mean(1, keepdims=True)) @ xc / (xc @ xc)
        c_hat = y.mean(1) + slope * (1.0 / E[col[P]] - x.mean())
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, j] = 1.0 - C[:, col[P]] / c_hat
    return out


#: Student's t, 95th percentile, by degrees of freedom (a 90% two-sided band)
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812}


def prediction_band(c, E, col, P) -> tuple:
    """``(scatter, band)`` as fractions of the neighbours' trend at P: the residual standard
    deviation of the neighbours' costs per example ``c`` (nB,) around their fit, and the
    half-width of the fit's 90% prediction band at P -- how far a batch size with nothing
    special about it strays from its neighbours' trend (each batch size's model and buffers
    are set up once per probe, so it is a little faster or slower for the whole session, by
    more than the rounds' own noise shows)."""
    nb = [B for B in range(P - HALF_WIDTH, P + HALF_WIDTH + 1) if B != P and B in col]
    x = 1.0 / E[[col[B] for B in nb]]
    y = c[[col[B] for B in nb]]
    k = len(nb)
    xc = x - x.mean()
    sxx = float(xc @ xc)
    flat = sxx <= 1e-12 * float(x @ x)
    slope = 0.0 if flat else float((y - y.mean()) @ xc / sxx)
    resid = y - y.mean() - slope * xc
    dof = k - (1 if flat else 2)
    if dof < 1:
        return math.nan, math.nan
    s = math.sqrt(float(resid @ resid) / dof)
    x0 = 1.0 / E[col[P]] - x.mean()
    se = s * math.sqrt(1 + 1 / k + (0.0 if flat else x0 * x0 / sxx))
    trend = y.mean() + slope * x0
    return s / trend, _T95.get(dof, 1.7 if dof <= 30 else 1.645) * se / trend


def answer(ctx, rows) -> dict:
    from minigd.study.analysis import _interval

    from . import unanswered

    powers, bs, rounds = design(ctx)
    if not powers:
        return unanswered(
            NAME, f"the training set ({ctx.n_train} examples) is too small for a batch size {P_MIN} + {HALF_WIDTH}"
        )
    n = ctx.n_train
    entries = probe_entries(ctx, _configs(ctx, bs), rounds)
    by_b, steps = {}, {}
    for e in entries:
        if isinstance(e, dict) and e.get("round_s") and not e.get("full_batch"):
            by_b[int(e["batch_size"])] = np.asarray([float(x) for x in e["round_s"]], float)
            steps[int(e["batch_size"])] = int(e.get("steps_per_round") or 1)
    measured = sorted(by_b)
    missing = [B for B in bs if B not in by_b]
    if len(measured) < 3:
        return unanswered(
            NAME,
            "the throughput probe has no stored timings for these batch sizes "
            "(run the study with --questions powers_of_two)",
            details={"planned_batch_sizes": bs, "measured_batch_sizes": measured},
        )
    col = {B: i for i, B in enumerate(measured)}
    E = np.array([examples_per_step(B, n, steps[B]) for B in measured])
    ks = {len(v) for v in by_b.values()}
    point_T = np.array([[float(_low_quantile(by_b[B])) for B in measured]])
    rng = np.random.default_rng([ctx.seed, zlib.crc32(NAME.encode())])
    R = N_BOOT
    boot_T = np.empty((R, len(measured)))
    joint = len(ks) == 1
    if joint:  # one probe call: resample whole rounds jointly
        k = ks.pop()
        idx = rng.integers(0, k, size=(R, k))
        for B, i in col.items():
            boot_T[:, i] = _low_quantile(by_b[B][idx], axis=1)
    else:  # entries of different calls: per batch size
        for B, i in col.items():
            v = by_b[B]
            boot_T[:, i] = _low_quantile(v[rng.integers(0, len(v), size=(R, len(v)))], axis=1)
    point_C, boot_C = point_T / E[None], boot_T / E[None]
    adv_pt = _advantages(point_C, E, col, powers)[0]
    adv_bt = _advantages(boot_C, E, col, powers)
    ok = [j for j in range(len(powers)) if math.isfinite(adv_pt[j])]
    if not ok:
        return unanswered(
            NAME,
            "no power of two was measured with neighbours on both sides",
            details={"planned_batch_sizes": bs, "measured_batch_sizes": measured},
        )
    ps = [powers[j] for j in ok]
    head_pt = 100 * float(np.median(adv_pt[ok]))
    # two levels: the rounds (jointly, above) and the powers of two themselves, whose own
    # set-up effects the rounds cannot show (a run's per-P advantages differ from another's
    # by more than their round intervals; resampling the Ps carries that spread)
    A = adv_bt[:, ok]
    pick = rng.integers(0, len(ok), size=(R, len(ok)))
    with np.errstate(invalid="ignore"):
        head_bt = 100 * np.nanmedian(np.take_along_axis(A, pick, axis=1), axis=1)
    head = _interval(head_pt, head_bt)
    per_p = []
    for j in ok:
        P = powers[j]
        iv = _interval(100 * float(adv_pt[j]), 100 * adv_bt[:, j])
        nb = [B for B in range(P - HALF_WIDTH, P + HALF_WIDTH + 1) if B != P and B in col]
        c = float(point_C[0, col[P]])
        scatter, band = prediction_band(point_C[0], E, col, P)
        a = float(adv_pt[j])
        per_p.append(
            {
                "power": P,
                "neighbours": nb,
                "step_time_s": float(point_T[0, col[P]]),
                "per_example_s": c,
                "neighbour_trend_per_example_s": c / (1 - a),
                "advantage_pct": {k: iv[k] for k in ("value", "lo", "hi")},
                "neighbour_scatter_pct": 100 * scatter,
                "prediction_band_pct": 100 * band,
                "stands_out": bool(abs(a) > band and (iv["lo"] > 0 or iv["hi"] < 0)),
            }
        )
    v, lo, hi = head["value"], head["lo"], head["hi"]
    if lo > 0:
        verdict = f"Powers of two are {v:.2g}% faster per example [{lo:.2g}%, {hi:.2g}%] on this machine"
    elif hi < 0:
        verdict = (
            f"Powers of two are {-v:.2g}% slower per example [{-hi:.2g}%, {-lo:.2g}%] on this machine "
            f"(an advantage of {v:.2g}% [{lo:.2g}%, {hi:.2g}%])"
        )
    else:
        verdict = f"No difference: {v:.2g}% [{lo:.2g}%, {hi:.2g}%], an interval that includes 0"
    out = [p for p in per_p if p["stands_out"]]
    extreme = max(per_p, key=lambda p: abs(p["advantage_pct"]["value"]))
    ex_iv = extreme["advantage_pct"]
    text = (
        f"{verdict}: the median over P = {', '.join(map(str, ps))} of how much less time per example "
        f"batch size P takes than the trend of its neighbours P±1..{HALF_WIDTH} (throughput probe, "
        f"{rounds} rounds per batch size; 90% bootstrap interval over the rounds and the powers of two). "
        f"The largest single effect is at P = {extreme['power']}: {ex_iv['value']:+.2g}% "
        f"[{ex_iv['lo']:+.2g}%, {ex_iv['hi']:+.2g}%] against a ±{extreme['prediction_band_pct']:.2g}% band "
        f"within which its neighbours scatter about their trend; "
        + (
            f"{len(out)} of {len(per_p)} powers of two ({', '.join(str(p['power']) for p in out)}) "
            f"stand{'s' if len(out) == 1 else ''} out of that band"
            if out
            else f"none of the {len(per_p)} powers of two stands out of that band"
        )
        + (f". Batch sizes {missing} were not measured." if missing else ".")
    )
    _plot(ctx, measured, point_C[0], boot_C, E, col, per_p)
    budget = (
        f"throughput probe at B = P−{HALF_WIDTH}..P+{HALF_WIDTH} for P = {', '.join(map(str, ps))} "
        f"({len(measured)} batch sizes; P from {P_MIN} up to {P_MAX} within the training set, the largest "
        f"dropped to fit ~{PROBE_BUDGET_S:g} s), {rounds} rounds of ~{ROUND_S * 1e3:g} ms each, interleaved "
        f"in random order, step time = the fastest {QUANTILE:.0%} of the rounds; {N_BOOT} bootstrap resamples "
        f"of the rounds (jointly) and of the powers of two"
    )
    return {
        "name": NAME,
        "question": QUESTION,
        "answer": text,
        "value": v,
        "lo": lo,
        "hi": hi,
        "unit": "% less time per example than the neighbours' trend (median over powers of two)",
        "conditions": ctx.conditions(budget),
        "plot": f"q_{NAME}.png" if ctx.report_dir else None,
        "details": {
            "powers": ps,
            "planned_batch_sizes": bs,
            "measured_batch_sizes": measured,
            "missing_batch_sizes": missing,
            "all_measured": not missing,
            "rounds": rounds,
            "rounds_resampled_jointly": joint,
            "step_time_quantile": QUANTILE,
            "definition": "advantage = 1 - c(P)/c_hat(P), c = step time / examples per step, c_hat "
            "the least-squares fit c = alpha + beta/e through P±1..3 at e(P)",
            "per_power": per_p,
            "per_batch": [
                {
                    "batch_size": B,
                    "step_time_s": float(point_T[0, col[B]]),
                    "examples_per_step": float(E[col[B]]),
                    "per_example_s": float(point_C[0, col[B]]),
                    "steps_per_round": steps[B],
                    "rounds_s": [float(x) for x in by_b[B]],
                }
                for B in measured
            ],
        },
    }


def _plot(ctx, measured, C, boot_C, E, col, per_p):
    path = ctx.plot_path(NAME)
    if not path:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minigd.study.analysis import INTERVAL

    B = np.array(measured, float)
    us = C * 1e6
    lo, hi = np.quantile(boot_C * 1e6, INTERVAL, axis=0)
    err = np.array([np.clip(us - lo, 0, None), np.clip(hi - us, 0, None)])
    pw = np.array([b in {p["power"] for p in per_p} for b in measured])
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax.errorbar(
        B[~pw],
        us[~pw],
        yerr=err[:, ~pw],
        fmt="o",
        ms=3.5,
        color="0.45",
        ecolor="0.7",
        capsize=1.5,
        label="other batch sizes (90% interval)",
    )
    ax.errorbar(
        B[pw],
        us[pw],
        yerr=err[:, pw],
        fmt="*",
        ms=10,
        color="tab:red",
        ecolor="tab:red",
        capsize=2,
        label="powers of two",
        zorder=3,
    )
    for i, p in enumerate(per_p):
        nb = p["neighbours"]
        x = 1.0 / E[[col[b] for b in nb]]
        yv = C[[col[b] for b in nb]]
        beta, alpha = np.polyfit(x, yv, 1) if np.ptp(x) > 1e-9 * x.max() else (0.0, float(np.mean(yv)))
        xs = np.linspace(min(nb), max(nb), 20)
        ax.plot(
            xs,
            (alpha + beta / xs) * 1e6,
            "-",
            color="tab:blue",
            lw=1.2,
            alpha=0.8,
            label="trend of the neighbours P±1..3" if i == 0 else None,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylabel("step time per example (µs, log scale)")
    ax.set_title("Powers of two vs their neighbours: training-step time per example")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="best", fontsize=8)
    P = np.array([p["power"] for p in per_p], float)
    a = np.array([p["advantage_pct"]["value"] for p in per_p])
    alo = np.array([p["advantage_pct"]["lo"] for p in per_p])
    ahi = np.array([p["advantage_pct"]["hi"] for p in per_p])
    ax2.axhline(0, color="0.3", lw=0.8)
    band = np.array([p["prediction_band_pct"] for p in per_p], float)
    ax2.bar(
        P,
        2 * band,
        bottom=-band,
        width=P * 0.25,
        color="0.85",
        zorder=0,
        label="neighbours' scatter about their trend (90% prediction band)",
    )
    ax2.errorbar(
        P,
        a,
        yerr=[np.clip(a - alo, 0, None), np.clip(ahi - a, 0, None)],
        fmt="*",
        ms=9,
        color="tab:red",
        capsize=3,
        label="advantage of P (90% interval)",
    )
    ax2.set_xlabel("batch size B (examples, log scale)")
    ax2.set_ylabel("advantage of P (% less time\nper example than the trend)")
    ax2.grid(True, which="both", alpha=0.25)
    top = float(np.nanmax(np.concatenate([band, ahi, [0.5]])))
    bottom = float(np.nanmin(np.concatenate([-band, alo, [-0.5]])))
    pad = 0.08 * (top - bottom)
    ax2.set_ylim(bottom - pad, top + pad)
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
