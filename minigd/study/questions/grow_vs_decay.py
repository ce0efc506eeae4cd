"""Is it better to increase the batch size than to decay the learning rate?

Smith, Kindermans, Ying & Le 2018 ("Don't Decay the Learning Rate, Increase the Batch
Size", arXiv:1711.00489): SGD's noise scale is g ~ eps N / B, so multiplying B by k at a
milestone lowers the noise as dividing the learning rate eps by k does -- and the same
epochs then take fewer parameter updates.  Three arms from the same start, at the same
example budget:

constant
    batch ``B0`` and its best learning rate from the main study throughout;
decay
    the learning rate divided by :data:`FACTOR` at each of two milestones
    (``TrialConfig.lr_decay``);
growth
    the batch size multiplied by :data:`FACTOR` at the same milestones instead, the rate
    kept (``TrialConfig.bs_schedule``; capped at the training-set size).

``B0`` is 32 when the study swept it, else the largest swept batch size below 32 (else the
smallest swept).  The budget is :data:`BUDGET_X` times the epochs ``B0`` needed to reach
the target in the main study, rounded up to a multiple of 4 (at least
:data:`MIN_EPOCHS`, at most the study's ``max_epochs`` unless that is below
:data:`MIN_EPOCHS`); the milestones are at 1/2 and 3/4 of it, so both fall inside the
budget and after the early progress, where the noise level sets the final loss.  Every
arm trains the whole budget (``stop_at_target=False``, ``min_steps=0``): equal examples,
and the growth arm's steps are fewer by construction (checked on the trials).

Measured per arm, over :data:`N_SEEDS` seeds derived from the master seed (the same seeds
in every arm: a seed fixes the initialisation and the data order): the final validation
metric (mean over seeds), steps / examples / wall time to the target (median over seeds; a
seed that never reached counts as infinitely many) and for the whole budget.  Wall time =
steps x the throughput probe's median step time at the batch size of each phase (the
probe times each batch size alone, one thread; the trials' own in-trial times, which
race the other workers, are kept in ``details``).  90% intervals: 5th/95th percentiles
of :data:`N_BOOT` bootstrap resamples of the seeds (jointly across the arms, so the
difference is paired) and of the probe's rounds, seeded from the master seed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib

import numpy as np

from ._common import arch0, fmt_num

NAME = "grow_vs_decay"
QUESTION = (
    "Is it better to increase the batch size than to decay the learning rate (Smith et al. 2018, arXiv:1711.00489)?"
)
FACTOR = 5  # k: the learning rate / 5, or the batch x 5, at each milestone (Smith et al.)
PREFERRED_B = 32
BUDGET_X = 8  # the budget: this many times the epochs B0 needed to reach the target
MIN_EPOCHS = 4  # two milestones inside the budget need at least 4 epochs
N_SEEDS = 5
N_BOOT = 4000
ARMS = ("constant", "decay", "growth")
INTERVAL = (5.0, 95.0)


# --------------------------------------------------------------------------- the plan


def _start(ctx):
    """(B0, its best LR, the main study's row for B0 or None)."""
    a = arch0(ctx)
    rows = {r["batch_size"]: r for r in (a or {}).get("per_batch", [])}
    swept = sorted(rows) or sorted(int(b) for b in ctx.spec.batch_sizes if b != "full" and int(b) < ctx.n_train)
    if PREFERRED_B in swept or not swept:
        B0 = PREFERRED_B
    else:
        below = [b for b in swept if b < PREFERRED_B]
        B0 = max(below) if below else min(swept)
    B0 = min(B0, ctx.n_train)
    row = rows.get(B0)
    if row is not None:
        return B0, float(row["best_lr"]), row
    lrs = ctx.spec.lrs_for(B0)  # not in the study: the centre of its grid at B0
    return B0, float(lrs[len(lrs) // 2]), None


def _budget(ctx, B0, row) -> int:
    cap = max(MIN_EPOCHS, int(ctx.spec.max_epochs))
    ex = (row or {}).get("examples_to_target")
    if ex is None or not math.isfinite(ex):
        return cap
    eps = ex / ctx.n_train
    return int(min(cap, max(2 * MIN_EPOCHS, 4 * math.ceil(BUDGET_X * eps / 4))))


def milestones(epochs: int) -> tuple:
    """The two milestone epochs, at 1/2 and 3/4 of the budget (1 <= e1 < e2 < epochs)."""
    e1 = max(1, int(math.floor(epochs / 2 + 0.5)))
    e2 = min(epochs - 1, max(e1 + 1, int(math.floor(3 * epochs / 4 + 0.5))))
    return e1, e2


def design(ctx) -> dict:
    """Everything the arm runs, deterministic in ``ctx`` (a resumed study and ``minigd
    report`` find the same trials)."""
    B0, lr, row = _start(ctx)
    E = _budget(ctx, B0, row)
    e1, e2 = milestones(E)
    n = ctx.n_train
    sizes = [B0, min(n, B0 * FACTOR), min(n, B0 * FACTOR * FACTOR)]
    seeds = tuple(ctx.spec.trial_seeds()[:N_SEEDS])
    if len(seeds) < N_SEEDS:  # the study ran fewer seeds: derive the rest from the master seed
        extra = np.random.SeedSequence([ctx.seed, zlib.crc32(NAME.encode())]).generate_state(N_SEEDS, np.uint32)
        seeds = seeds + tuple(int(x) >> 1 for x in extra if int(x) >> 1 not in seeds)[: N_SEEDS - len(seeds)]
    base = ctx.base_config(
        batch_size=B0, full_batch=B0 == n, lr=lr, max_epochs=E, min_steps=0, stop_at_target=False, search_id=f"q:{NAME}"
    )
    arms = {
        "constant": base,
        "decay": dataclasses.replace(base, lr_decay=((e1, 1.0 / FACTOR), (e2, 1.0 / FACTOR))),
        "growth": dataclasses.replace(base, bs_schedule=((e1, sizes[1]), (e2, sizes[2]))),
    }
    return {
        "B0": B0,
        "lr": lr,
        "row": row,
        "epochs": E,
        "milestones": (e1, e2),
        "sizes": sizes,
        "seeds": seeds,
        "arms": arms,
    }


def plan(ctx) -> list:
    d = design(ctx)
    return [dataclasses.replace(d["arms"][a], seed=int(s)) for a in ARMS for s in d["seeds"]]


def phase_steps(n: int, sizes, epochs: int, ms) -> list:
    """Steps at each batch size of a growth schedule: ``[(B, steps)]`` (an epoch of batch B
    takes ceil(n / B) steps, the last batch partial)."""
    bounds = [0, ms[0], ms[1], epochs]
    return [(B, (bounds[i + 1] - bounds[i]) * -(-n // B)) for i, B in enumerate(sizes)]


# --------------------------------------------------------------------------- the answer


def _time_at(step: float, phases, step_s) -> float:
    """Wall time of the first ``step`` steps of a run whose phases are ``[(B, steps)]``."""
    t, left = 0.0, step
    for B, k in phases:
        m = min(left, k)
        t += m * step_s[B]
        left -= m
        if left <= 0:
            break
    return t


def _num(x) -> float:
    return math.nan if x is None else float(x)


def _iv(value, samples) -> dict:
    """``{"value", "lo", "hi"}``: the point estimate and the 5th/95th percentiles of the
    resamples' finite values (widened to contain the value)."""
    value = None if value is None or not math.isfinite(value) else float(value)
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    if value is None or s.size == 0:
        return {"value": value, "lo": None, "hi": None}
    lo, hi = np.percentile(s, INTERVAL)
    return {"value": value, "lo": float(min(lo, value)), "hi": float(max(hi, value))}


def answer(ctx, rows) -> dict:
    from . import unanswered

    d = design(ctx)
    n, (e1, e2), E, B0, k = ctx.n_train, d["milestones"], d["epochs"], d["B0"], FACTOR
    metric = ctx.spec.target_metric
    acc = "accuracy" in metric
    mkey = "final_val_accuracy" if acc else "final_val_loss"
    by_key = {c.key: r for c, r in rows}
    seeds = [
        s
        for s in d["seeds"]
        if all(
            (by_key.get(dataclasses.replace(d["arms"][a], seed=int(s)).key) or {}).get("status") == "ok"
            and (by_key.get(dataclasses.replace(d["arms"][a], seed=int(s)).key) or {}).get(mkey) is not None
            for a in ARMS
        )
    ]
    if len(seeds) < 2:
        return unanswered(
            NAME, f"fewer than 2 seeds have all three arms finished (have {len(seeds)} of {len(d['seeds'])})"
        )
    res = {a: [by_key[dataclasses.replace(d["arms"][a], seed=int(s)).key] for s in seeds] for a in ARMS}
    S = len(seeds)

    phases = {
        "constant": [(B0, E * -(-n // B0))],
        "decay": [(B0, E * -(-n // B0))],
        "growth": phase_steps(n, d["sizes"], E, (e1, e2)),
    }
    steps_total = {a: sum(k_ for _, k_ in phases[a]) for a in ARMS}
    measured_steps = {a: sorted({int(r["steps"]) for r in res[a]}) for a in ARMS}
    examples_total = {a: sorted({int(r["examples"]) for r in res[a]}) for a in ARMS}
    growth_happened = (
        measured_steps["growth"] == [steps_total["growth"]] and steps_total["growth"] < steps_total["constant"]
    )
    equal_examples = len({x for a in ARMS for x in examples_total[a]}) == 1
    if not growth_happened:
        return unanswered(
            NAME,
            f"the batch did not grow: the growth arm took {measured_steps['growth']} steps, "
            f"the schedule says {steps_total['growth']} (constant: {steps_total['constant']})",
        )

    # step times per batch size from the throughput probe (in-trial medians where it has none)
    probe_cfgs = [
        dataclasses.replace(d["arms"]["constant"], batch_size=B, full_batch=B == n) for B in sorted(set(d["sizes"]))
    ]
    entries = ctx.probe(probe_cfgs)
    rounds = {int(e["batch_size"]): np.asarray(e["round_s"], float) for e in entries if e.get("round_s")}
    timing = "throughput probe"
    for B in set(d["sizes"]):
        if B not in rounds:
            us = [r.get("us_per_step") for r in res["constant"] if B == B0 and r.get("us_per_step")]
            rounds[B] = np.asarray([np.median(us) * 1e-6]) if us else np.asarray([math.nan])
            timing = "throughput probe where measured, else the trials' own step times"
    step_s = {B: float(np.median(v)) for B, v in rounds.items()}

    final = {a: np.asarray([float(r[mkey]) for r in res[a]]) for a in ARMS}
    loss = {a: np.asarray([_num(r.get("final_val_loss")) for r in res[a]]) for a in ARMS}
    from minigd.study.analysis import _examples, _steps  # read a trial as the study does

    s_t = {a: np.asarray([_steps(r) for r in res[a]]) for a in ARMS}
    e_t = {a: np.asarray([_examples(r, math.nan) for r in res[a]]) for a in ARMS}
    scale = 100.0 if acc else 1.0

    def stats(idx, st):
        out = {}
        for a in ARMS:
            out[(a, "final")] = scale * float(np.mean(final[a][idx]))
            out[(a, "loss")] = float(np.mean(loss[a][idx]))
            ms = float(np.median(s_t[a][idx]))
            out[(a, "steps_to_target")] = ms
            out[(a, "examples_to_target")] = float(np.median(e_t[a][idx]))
            out[(a, "time_to_target")] = _time_at(ms, phases[a], st) if math.isfinite(ms) else math.inf
            out[(a, "time_total")] = _time_at(steps_total[a], phases[a], st)
        out["diff"] = out[("growth", "final")] - out[("decay", "final")]
        out["diff_const"] = out[("growth", "final")] - out[("constant", "final")]
        out["diff_loss"] = out[("growth", "loss")] - out[("decay", "loss")]
        out["time_saving"] = 1 - out[("growth", "time_total")] / out[("decay", "time_total")]
        return out

    point = stats(np.arange(S), step_s)
    rng = np.random.default_rng([ctx.seed % 2**63, zlib.crc32(NAME.encode())])
    boot = {k_: np.empty(N_BOOT) for k_ in point}
    for i in range(N_BOOT):
        idx = rng.integers(0, S, S)
        st = {B: float(np.median(v[rng.integers(0, len(v), len(v))])) for B, v in rounds.items()}
        for k_, v in stats(idx, st).items():
            boot[k_][i] = v
    iv = {k_: _iv(point[k_], boot[k_]) for k_ in point}

    per_arm = {}
    for a in ARMS:
        per_arm[a] = {
            "final_" + metric: iv[(a, "final")],
            "final_val_loss": iv[(a, "loss")],
            "steps_to_target": iv[(a, "steps_to_target")],
            "examples_to_target": iv[(a, "examples_to_target")],
            "time_to_target_s": iv[(a, "time_to_target")],
            "reached_fraction": float(np.mean(np.isfinite(s_t[a]))),
            "steps": steps_total[a],
            "steps_measured": measured_steps[a],
            "examples": examples_total[a],
            "time_total_s": iv[(a, "time_total")],
            "in_trial_train_time_s": float(np.median([_num(r.get("train_time")) for r in res[a]])),
            "phases": [{"batch_size": B, "steps": s} for B, s in phases[a]],
            "per_seed_final": [float(x) for x in final[a]],
            "per_seed_steps_to_target": [None if not math.isfinite(x) else float(x) for x in s_t[a]],
        }

    saved = steps_total["decay"] - steps_total["growth"]
    pct = 100.0 * saved / steps_total["decay"]
    fm = (lambda x: f"{x:.1f}%") if acc else (lambda x: f"{x:.3g}")
    fd = (lambda x: f"{x:+.2f} pp") if acc else (lambda x: f"{x:+.3g}")

    def m(d_, f=fm):
        v, lo, hi = d_["value"], d_["lo"], d_["hi"]
        return f"{f(v)} [{f(lo)}, {f(hi)}]" if lo is not None else f(v)

    what = "validation accuracy" if acc else "validation loss"
    sched = " -> ".join(str(B) for B in d["sizes"])
    capped = B0 * k * k > n
    diff = iv["diff"]
    same = diff["lo"] is not None and diff["lo"] <= 0 <= diff["hi"]
    better = (diff["value"] > 0) == acc
    verdict = "the same within its interval" if same else ("better" if better else "worse")
    text = (
        f"Growing the batch {k}x at epochs {e1} and {e2} ({sched}) instead of dividing the learning rate "
        f"by {k} there reached a final {what} of {m(iv[('growth', 'final')])} vs {m(iv[('decay', 'final')])} "
        f"(difference {m(diff, fd)}: {verdict}"
    )
    if acc:
        f3 = lambda x: f"{x:+.2g}"
        text += (
            f"; validation loss {iv[('growth', 'loss')]['value']:.3f} vs {iv[('decay', 'loss')]['value']:.3f}, "
            f"difference {m(iv['diff_loss'], f3)}"
        )
    text += (
        f") in {saved:,} fewer steps ({-pct:.0f}%: {steps_total['growth']:,} vs {steps_total['decay']:,}, "
        f"set by the schedule) at the same {E * n:,} examples ({E} epochs from batch {B0}, LR {d['lr']:.3g})"
    )
    t_g, t_d, ts = iv[("growth", "time_total")], iv[("decay", "time_total")], iv["time_saving"]
    if t_g["value"] is not None and t_d["value"] is not None:
        pc = lambda x: f"{100 * x:.0f}%"
        text += f" and {m(ts, pc)} less step time ({fmt_num(t_g['value'], 's')} vs {fmt_num(t_d['value'], 's')})"
    text += f"; a constant learning rate ended at {m(iv[('constant', 'final')])}."
    st_g, st_d = iv[("growth", "steps_to_target")], iv[("decay", "steps_to_target")]
    tgt = f"{metric} {'>=' if acc else '<='} {ctx.spec.target:g}"
    first_ms_step = e1 * -(-n // B0)
    if st_g["value"] is not None and st_d["value"] is not None:
        if max(st_g["value"], st_d["value"]) <= first_ms_step:
            text += (
                f" Every arm reached {tgt} before the first milestone (median step {fmt_num(st_d['value'])} "
                f"[{fmt_num(st_d['lo'])}, {fmt_num(st_d['hi'])}]): the schedules change only what comes after."
            )
        else:
            text += (
                f" To {tgt}: growth {fmt_num(st_g['value'])} [{fmt_num(st_g['lo'])}, {fmt_num(st_g['hi'])}] "
                f"steps, decay {fmt_num(st_d['value'])} [{fmt_num(st_d['lo'])}, {fmt_num(st_d['hi'])}]."
            )
    else:
        text += f" Growth or decay did not reach {tgt} in most seeds."
    notes = []
    if capped:
        notes.append(
            f"the second growth step is capped at the training-set size ({n}), so the batch grows "
            f"{d['sizes'][-1] / B0:.3g}x in all, not {k * k}x"
        )
    if d["row"] is None:
        notes.append(
            f"batch {B0} was not in the study, so its learning rate is the centre of the study's grid, not a tuned one"
        )
    elif d["row"].get("lr_edge"):
        notes.append(
            f"batch {B0}'s best learning rate lies at the {d['row']['lr_edge']} edge of the rates the study tried"
        )
    if notes:
        text += " Note: " + "; ".join(notes) + "."

    plot = _plot(ctx, d, res, metric, acc, steps_total)
    budget = (
        f"{E} epochs ({E * n:,} examples) from batch {B0} at LR {d['lr']:.3g} (its best in the study), "
        f"milestones at epochs {e1} and {e2}, factor {k}; {S} seeds; final metric = mean over seeds, "
        f"to-target = median; wall time = steps x the probe's step time per batch size"
    )
    return {
        "name": NAME,
        "question": QUESTION,
        "answer": text,
        "value": diff["value"],
        "lo": diff["lo"],
        "hi": diff["hi"],
        "unit": (
            "percentage points of final validation accuracy (growth - decay)"
            if acc
            else "final validation loss (growth - decay)"
        ),
        "conditions": ctx.conditions(budget),
        "plot": plot,
        "details": {
            "start_batch_size": B0,
            "lr": d["lr"],
            "factor": k,
            "epochs": E,
            "milestones": [e1, e2],
            "batch_sizes": d["sizes"],
            "capped": capped,
            "seeds": [int(s) for s in seeds],
            "metric": metric,
            "timing": timing,
            "step_time_s": {str(B): v for B, v in sorted(step_s.items())},
            "growth_happened": growth_happened,
            "equal_examples": equal_examples,
            "steps_saved": saved,
            "steps_saved_pct": pct,
            "difference_growth_minus_decay": diff,
            "difference_growth_minus_constant": iv["diff_const"],
            "val_loss_difference_growth_minus_decay": iv["diff_loss"],
            "time_saving_fraction": iv["time_saving"],
            "arms": per_arm,
        },
    }


# --------------------------------------------------------------------------- the figure


def _mean_curve(results, key):
    """The mean over seeds of the validation curves (same evaluation steps in every seed
    of an arm: the schedule is step-based and every arm trains its whole budget)."""
    by_step = {}
    for r in results:
        for p in r.get("curve") or []:
            if p.get(key) is not None:
                by_step.setdefault(p["step"], []).append((p["examples"], p[key]))
    steps = sorted(s for s, v in by_step.items() if len(v) == len(results))
    ex = np.array([by_step[s][0][0] for s in steps], float)
    y = np.array([np.mean([v for _, v in by_step[s]]) for s in steps], float)
    return np.array(steps, float), ex, y


def _plot(ctx, d, res, metric, acc, steps_total):
    path = ctx.plot_path(NAME)
    if path is None:
        return None
    from minigd._plotting import pyplot as _pyplot
    from minigd._plotting import save_png as _save

    plt = _pyplot()
    key = "val_accuracy" if acc else "val_loss"
    n = ctx.n_train
    e1, e2 = d["milestones"]
    colors = {"constant": "#7f7f7f", "decay": "#1f77b4", "growth": "#d62728"}
    labels = {
        "constant": f"constant (B={d['B0']}, LR {d['lr']:.3g})",
        "decay": f"LR / {FACTOR} at epochs {e1}, {e2}",
        "growth": f"batch x {FACTOR} at epochs {e1}, {e2} ({' -> '.join(map(str, d['sizes']))})",
    }
    # decay and growth often lie on top of each other: decay wide and pale under growth
    styles = {"constant": (1.2, "-", 0.9), "decay": (3.2, "-", 0.45), "growth": (1.3, "-", 1.0)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for a in ARMS:
        steps, ex, y = _mean_curve(res[a], key)
        if not len(steps):
            continue
        if steps[-1] < steps_total[a]:  # the last evaluation is a little before the end: add the end
            steps = np.append(steps, steps_total[a])
            ex = np.append(ex, d["epochs"] * n)
            y = np.append(y, np.mean([r["final_" + key] for r in res[a]]))
        y = 100 * y if acc else y
        style = dict(color=colors[a], lw=styles[a][0], ls=styles[a][1], alpha=styles[a][2])
        axes[0].plot(ex / n, y, label=labels[a], **style)
        axes[1].plot(steps, y, **style)
        axes[1].plot(steps[-1:], y[-1:], "o", color=colors[a])
    for e in (e1, e2):
        axes[0].axvline(e, color="k", ls=":", lw=0.8)
    ylab = "validation accuracy (%, mean over seeds)" if acc else "validation loss (mean over seeds)"
    axes[0].set_xlabel("epochs (examples / training-set size)")
    axes[0].set_title("Same examples: the curves by epoch (dotted: milestones)")
    axes[1].set_xlabel("steps (parameter updates)")
    axes[1].set_title("Fewer updates: the curves by step (dot: end of budget)")
    for ax in axes:
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
        _zoom(ax, acc)
    fig.suptitle(f"Grow the batch or decay the learning rate? ({d['epochs']} epochs, {len(res['growth'])} seeds)")
    fig.legend(loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _save(fig, path, f"minigd question: {NAME}")
    return os.path.basename(path)


def _zoom(ax, acc):
    """Show the late part of training, where the arms differ (the first evaluations are
    far below and would squash it)."""
    ys = np.concatenate([ln.get_ydata() for ln in ax.get_lines() if len(ln.get_ydata()) > 1] or [np.zeros(1)])
    ys = ys[np.isfinite(ys)]
    if ys.size < 4:
        return
    if acc:
        lo = np.percentile(ys, 20)
        ax.set_ylim(max(0.0, lo - 0.1 * (ys.max() - lo) - 0.5), min(100.0, ys.max() + 0.15 * (ys.max() - lo) + 0.2))
    else:
        hi = np.percentile(ys, 80)
        ax.set_ylim(max(0.0, ys.min() - 0.15 * (hi - ys.min())), hi + 0.1 * (hi - ys.min()))
