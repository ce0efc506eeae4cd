"""The written report of a batch-size study: ``summary.md``, ``summary.html`` and
``summary.json`` plus figures.

:func:`write_report` turns the output of :func:`minigd.study.analysis.analyze` into plain
answers with the numbers behind them: it begins with the recommendation (the batch size to
use, and why), then the answers (fastest batch size, fewest examples, critical batch size,
smallest reasonable batch size, regimes, generalisation) with their bootstrap intervals
("12 ms [10 ms, 15 ms]": the 90% interval) and win rates, a per-batch-size table, the
section "Your questions, answered" where the study ran question arms (``--questions``;
:func:`question_blocks`), the figures of :mod:`minigd.report.plots` and an appendix
(failed trials, the study spec).
``summary.json`` (:func:`summary_json`) holds the same answers for programs.
Missing values are reported as "not reached" (a target no batch size met) or "not
measured"; nothing in the analysis is required to be present.

The Markdown and HTML files carry the same content, built from one list of blocks; the HTML
is self-contained (inline CSS), refers to the figures by relative path, escapes every text
and never scrolls sideways (``tests/test_report_browser.py`` checks it in Chromium).
"""

from __future__ import annotations

import html
import json
import math
import os
import re

from minigd._io import atomic_write_text

from ._fields import (
    _thresholds,
    adaptive_label,
    adaptive_of,
    arch_label,
    architectures,
    b_crit_of,
    b_simple_of,
    fnum,
    rows_of,
    target_words,
    uses_accuracy,
)
from .plots import ADAPTIVE_PLOT, make_plots, plot_files

__all__ = ["write_report", "build_blocks", "render_markdown", "render_html", "summary_json", "HEADLINE_KEYS"]

NOT_REACHED = "not reached"
NOT_MEASURED = "not measured"
SMALL_BATCH = 32

_PLOT_CAPTIONS = {
    "steps_examples.png": "Steps and examples to target vs batch size: measured points, the fitted "
    "trade-off S = S_min(1 + B_crit/B), E = E_min(1 + B/B_crit), B_crit (fit, dashed) "
    "and B_simple (noise scale mid-training, dotted); regimes shaded.",
    "time_to_target.png": "Wall-clock time to target vs batch size; the fastest (star) and the smallest "
    "reasonable batch size (ring) marked.",
    "generalization.png": "Validation metric and generalisation gap at each trial's stopping point (the "
    "target, or the budget) vs batch size (best learning rate per batch size); "
    "trials stop at the target, so these compare stopping points, not equal budgets.",
    "best_lr.png": "Best learning rate vs batch size, with linear and square-root scaling lines through "
    "the smallest batch size; grey ticks are the learning rates tried.",
    "throughput_memory.png": "Throughput and goodput (throughput × statistical efficiency) vs batch size; "
    "memory in MiB.",
    "noise_scale.png": "The gradient noise scale B_simple over training, for several batch sizes "
    "(and the adaptive run, dashed black, where the study ran it).",
    ADAPTIVE_PLOT: "The adaptive run (fit(batch_size='adaptive')): the batch size the controller chose over the "
    "steps and the learning-rate factor it applied (every seed at the arm's best learning rate; "
    "a ring where the target was reached), and the learning curves beside those of the "
    "recommended fixed batch size.",
}


_PLOT_ALT = {
    "steps_examples.png": "steps and examples to target vs batch size",
    "time_to_target.png": "time to target vs batch size",
    "generalization.png": "generalisation vs batch size",
    "best_lr.png": "best learning rate vs batch size",
    "throughput_memory.png": "throughput, goodput and memory vs batch size",
    "noise_scale.png": "gradient noise scale over training",
    ADAPTIVE_PLOT: "adaptive batch size and learning-rate factor over training, and learning curves",
}


# --------------------------------------------------------------------------- formatting


def _g(x, missing=NOT_MEASURED) -> str:
    """A number in a few significant figures (``missing`` when absent)."""
    v = fnum(x)
    if v is None:
        return missing
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def _count(x, missing=NOT_REACHED) -> str:
    v = fnum(x)
    if v is None:
        return missing
    return f"{int(round(v)):,}" if abs(v - round(v)) < 1e-9 else f"{v:,.1f}"


def _dur(x, missing=NOT_REACHED) -> str:
    from minigd.study.analysis import fmt_duration  # one formatter for the analysis' text and the report's

    v = fnum(x)
    return missing if v is None else fmt_duration(v)


def _lr(x) -> str:
    v = fnum(x)
    return NOT_MEASURED if v is None else f"{v:.3g}"


def _pct(x, missing=NOT_MEASURED) -> str:
    v = fnum(x)
    return missing if v is None else f"{100 * v:.1f}%"


def _mib(x) -> str:
    v = fnum(x)
    return NOT_MEASURED if v is None else f"{v / 2**20:.3g} MiB"


def _rate(x) -> str:
    v = fnum(x)
    if v is None:
        return NOT_MEASURED
    return f"{v:,.0f} samples/s" if v >= 100 else f"{v:.3g} samples/s"


def _batch(b, row=None) -> str:
    v = fnum(b)
    if v is None:
        return "none"
    s = f"{int(round(v))}" if abs(v - round(v)) < 1e-9 else f"{v:g}"
    if row is not None and row.get("full_batch"):
        return f"{s} (full batch)"
    return s


def _row(arch, b):
    v = fnum(b)
    if v is None:
        return None
    for r in rows_of(arch):
        if abs(float(r["batch_size"]) - v) < 1e-9:
            return r
    return None


def _average_ranks(values):
    """Ranks 1..n of ``values``, ties sharing the mean of the ranks they span (the ranks
    Spearman's coefficient is defined on; ``scipy.stats.rankdata(method="average")``)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v), dtype=float)
    sv = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _spearman(xs, ys):
    """Spearman's rank correlation with average ranks for ties, or None where it is
    undefined: fewer than 3 points, or either series constant (e.g. the same validation
    accuracy at every batch size -- no trend to report)."""
    import numpy as np

    if len(xs) < 3:
        return None
    rx, ry = _average_ranks(xs), _average_ranks(ys)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


# --------------------------------------------------------------------------- intervals


def _hl(arch, key):
    """The headline number ``key`` of an architecture: ``{"value", "lo", "hi", "wins"}``, or None."""
    d = (arch.get("headline") or {}).get(key) if isinstance(arch.get("headline"), dict) else None
    return d if isinstance(d, dict) else None


def _gi(x, missing=NOT_MEASURED) -> str:
    """Like :func:`_g`, with an infinite value as "∞" (an interval unbounded above)."""
    try:
        if x is not None and math.isinf(float(x)):
            return "∞" if float(x) > 0 else "-∞"
    except (TypeError, ValueError):
        pass
    return _g(x, missing)


def _iv(d, fmt=_gi) -> str:
    """ " [lo, hi]" of an interval dict (the bootstrap's 90% interval); "" without one or
    when it has no spread."""
    if not isinstance(d, dict) or d.get("lo") is None or d.get("hi") is None:
        return ""
    if d["lo"] == d["hi"] == d.get("value") or (fnum(d["lo"]) is None and fnum(d["hi"]) is None):
        return ""
    return f" [{fmt(d['lo'])}, {fmt(d['hi'])}]"


def _with_iv(d, fmt=_gi, missing=NOT_MEASURED) -> str:
    """ "value [lo, hi]" of an interval dict."""
    if not isinstance(d, dict) or d.get("value") is None:
        return missing
    return fmt(d["value"]) + _iv(d, fmt)


def _resamples(arch):
    b = arch.get("bootstrap") if isinstance(arch.get("bootstrap"), dict) else {}
    n = b.get("resamples")
    return n if isinstance(n, int) and n > 0 else None


def _wins(arch, d, what) -> str:
    """ "; fastest in 87% of 4,000 bootstrap resamples (90% interval: batch 32–64)" or ""."""
    n = _resamples(arch)
    if not isinstance(d, dict) or d.get("wins") is None or n is None:
        return ""
    s = f"; {what} in {100 * d['wins']:.0f}% of {n:,} bootstrap resamples"
    if d.get("lo") is not None and d.get("hi") is not None and d["lo"] != d["hi"]:
        s += f" (90% interval: batch {_batch(d['lo'])}–{_batch(d['hi'])})"
    return s


def _rec_text(rec) -> str:
    if isinstance(rec, dict) and rec.get("text"):
        return "**Recommendation:** " + str(rec["text"])
    return (
        "**Recommendation:** none — this analysis carries no recommendation (it needs at least one batch size "
        "that reached the target with a measured step time)."
    )


# --------------------------------------------------------------------------- answers


def _ans(arch, key):
    return (arch.get("answers") or {}).get(key)


def _steps_ex_time(r) -> str:
    return (
        f"{_count(r.get('steps_to_target'))} steps, {_count(r.get('examples_to_target'))} examples, "
        f"learning rate {_lr(r.get('best_lr'))}"
    )


def answer_fastest(arch) -> str:
    tw = target_words(arch)
    head = f"**Fastest to {tw} in wall-clock time:** "
    b = _ans(arch, "fastest_wall_time")
    r = _row(arch, b)
    if r is None or fnum(r.get("time_to_target")) is None:
        return head + f"{NOT_REACHED} — no batch size reached the target in most of its seeds with a measured time."
    timed = sorted(
        (x for x in rows_of(arch) if fnum(x.get("time_to_target")) is not None),
        key=lambda x: float(x["time_to_target"]),
    )
    rest = [x for x in timed if x is not r]
    tail = ""
    if rest:
        x = rest[0]
        ratio = float(x["time_to_target"]) / float(r["time_to_target"]) if float(r["time_to_target"]) > 0 else None
        tail = (
            f"; runner-up batch {_batch(x['batch_size'], x)} ({_dur(x['time_to_target'])}"
            + (f", {ratio:.2f}× slower" if ratio is not None else "")
            + ")"
        )
    t_iv = _iv(_hl(arch, "time_to_target"), _dur)
    wins = _wins(arch, _hl(arch, "fastest_wall_time"), "fastest")
    timing = "" if r.get("timing") != "in-trial" else "; step time from the trials themselves (no probe)"
    return head + (
        f"batch {_batch(b, r)} ({_dur(r['time_to_target'])}{t_iv}{wins}; {_steps_ex_time(r)}{timing}{tail})."
    )


def answer_fewest_examples(arch) -> str:
    head = "**Fewest examples to target:** "
    b = _ans(arch, "fewest_examples")
    r = _row(arch, b)
    if r is None or fnum(r.get("examples_to_target")) is None:
        return head + f"{NOT_REACHED} — no batch size reached the target."
    fit = arch.get("tradeoff_fit") or {}
    e_min = fnum(fit.get("e_min")) if isinstance(fit, dict) else None
    tail = f"; the fitted minimum is E_min ≈ {_g(e_min)} examples as B → 0" if e_min else ""
    e_iv = _iv(_hl(arch, "examples_to_target"), _count)
    wins = _wins(arch, _hl(arch, "fewest_examples"), "fewest")
    return head + (
        f"batch {_batch(b, r)} ({_count(r['examples_to_target'])} examples{e_iv}{wins}, "
        f"{_count(r.get('steps_to_target'))} steps, {_dur(r.get('time_to_target'))}{tail})."
    )


def answer_fewest_steps(arch) -> str:
    head = "**Fewest steps to target:** "
    b = _ans(arch, "fewest_steps")
    r = _row(arch, b)
    if r is None or fnum(r.get("steps_to_target")) is None:
        return head + f"{NOT_REACHED} — no batch size reached the target."
    fit = arch.get("tradeoff_fit") or {}
    s_min = fnum(fit.get("s_min")) if isinstance(fit, dict) else None
    tail = f"; the fitted minimum is S_min ≈ {_g(s_min)} steps as B → ∞" if s_min else ""
    s_iv = _iv(_hl(arch, "steps_to_target"), _count)
    wins = _wins(arch, _hl(arch, "fewest_steps"), "fewest")
    return head + (
        f"batch {_batch(b, r)} ({_count(r['steps_to_target'])} steps{s_iv}{wins}, "
        f"{_count(r.get('examples_to_target'))} examples, {_dur(r.get('time_to_target'))}{tail})."
    )


def answer_critical(arch) -> str:
    head = "**Critical batch size:** "
    fit = arch.get("tradeoff_fit")
    rows = rows_of(arch)
    bmin = min((float(r["batch_size"]) for r in rows), default=None)
    bmax = max((float(r["batch_size"]) for r in rows), default=None)
    bc_raw = fnum(fit.get("b_crit")) if isinstance(fit, dict) else None
    bc_val = fit.get("b_crit") if isinstance(fit, dict) else None
    if not isinstance(fit, dict):
        n_ok = sum(1 for r in rows if fnum(r.get("steps_to_target")) is not None)
        fit_s = (
            f"{NOT_MEASURED} by the steps/examples trade-off fit (it needs at least 3 batch sizes that "
            f"reach the target; {n_ok} did)"
        )
    elif "error" in fit:
        fit_s = f"{NOT_MEASURED} — the steps/examples trade-off fit failed ({fit['error']})"
    elif bc_raw is not None and bc_raw > 0:
        bc_iv = _iv(_hl(arch, "critical_batch_size_fit"))
        fit_s = (
            f"≈ {_g(bc_raw)} from the fitted steps/examples trade-off "
            f"({'90% bootstrap interval' + bc_iv + '; ' if bc_iv else ''}"
            f"S_min = {_g(fit.get('s_min'))} steps, E_min = {_g(fit.get('e_min'))} examples, "
            f"B_crit = E_min/S_min; log-residual {_g(fit.get('residual'))})"
        )
    elif isinstance(bc_val, (int, float)) and math.isinf(bc_val) and bc_val > 0:
        fit_s = (
            f"above the largest batch size swept ({_batch(bmax)}): steps kept halving with every doubling, "
            f"so the trade-off fit cannot resolve it"
        )
    elif bc_raw == 0:
        fit_s = (
            f"below the smallest batch size swept ({_batch(bmin)}): steps to target did not fall with "
            f"batch size, so the trade-off fit cannot resolve it"
        )
    else:
        fit_s = f"{NOT_MEASURED} (the fit returned no usable value)"
    tuning = arch.get("b_crit_tuning")
    if isinstance(fit, dict) and "error" not in fit and tuning and tuning != "tuned":
        fit_s += (
            f" — **{tuning}**: the learning rate was not tuned per batch size, as the trade-off "
            f"assumes, so this B_crit is that of the rule, not of the model"
        )
    out_of_fit = [_batch(r["batch_size"]) for r in rows if r.get("lr_edge") and r.get("reached", True)]
    if out_of_fit:
        fit_s += (
            f"; batch{'es' if len(out_of_fit) > 1 else ''} {', '.join(out_of_fit)} left out of the fit "
            f"(LR not tuned: best learning rate at the edge of those tried)"
        )
    ns = arch.get("noise_scale") or {}
    mid = b_simple_of(arch)
    if mid is not None:
        extra = [f"{w} ≈ {_g(ns.get(w))}" for w in ("start", "end") if fnum(ns.get(w)) is not None]
        mid_iv = _iv(_hl(arch, "critical_batch_size_noise"))
        noise_s = f"the gradient noise scale B_simple measured mid-training is ≈ {_g(mid)}{mid_iv}" + (
            f" ({', '.join(extra)})" if extra else ""
        )
        tgt = _hl(arch, "noise_scale_target")
        if tgt is not None and tgt.get("value") is not None:
            noise_s += f", at the target ≈ {_with_iv(tgt)}"
    else:
        noise_s = f"the gradient noise scale B_simple was {NOT_MEASURED}"
    bc = b_crit_of(arch)
    cmp_s = ""
    if bc is not None and mid is not None:
        cmp_s = f"; B_simple/B_crit = {mid / bc:.2g}"
    return (
        head + fit_s + "; " + noise_s + cmp_s + " (McCandlish et al. 2018, arXiv:1812.06162; note "
        "arXiv:2505.23971 finds B_simple can underestimate the critical batch size, so both are reported)."
    )


def answer_goodput(arch) -> str:
    head = "**Highest goodput** (throughput × statistical efficiency, Pollux — Qiao et al. 2021): "
    b = _ans(arch, "max_goodput")
    r = _row(arch, b)
    if r is None or fnum(r.get("goodput")) is None:
        return head + f"{NOT_MEASURED} (it needs the throughput and the gradient noise scale)."
    wins = _wins(arch, _hl(arch, "max_goodput"), "highest")
    src = {
        "probe": "; throughput from the throughput probe",
        "in-trial": "; throughput from the trials' own step times (no probe)",
    }.get(r.get("timing"), "")
    return head + (
        f"batch {_batch(b, r)} ({_rate(r.get('throughput'))} × efficiency "
        f"{_g(r.get('statistical_efficiency'))} = {_rate(r.get('goodput'))}{wins}{src})."
    )


def answer_reasonable(arch) -> str:
    _, _, factor = _thresholds()
    head = "**Smallest reasonable batch size:** "
    definition = (
        f"(definition: the smallest batch size that reaches the target within {factor:g}× "
        f"the best measured wall-clock time to target)"
    )
    b = _ans(arch, "smallest_reasonable")
    r = _row(arch, b)
    fast = _row(arch, _ans(arch, "fastest_wall_time"))
    if r is None or fnum(r.get("time_to_target")) is None:
        return head + f"{NOT_MEASURED} — no batch size reached the target with a measured time {definition}."
    best = fnum(fast.get("time_to_target")) if fast else None
    ratio = float(r["time_to_target"]) / best if best else None
    ctx = f"; the fastest, batch {_batch(fast['batch_size'], fast)}, took {_dur(best)}" if best is not None else ""
    wins = _wins(arch, _hl(arch, "smallest_reasonable"), "the smallest reasonable")
    t_iv = _iv((r.get("intervals") or {}).get("time_to_target") if isinstance(r.get("intervals"), dict) else None, _dur)
    return head + (
        f"batch {_batch(b, r)} ({_dur(r['time_to_target'])}{t_iv}"
        + (f", {ratio:.2f}× the fastest" if ratio is not None else "")
        + f"{ctx}{wins}) {definition}."
    )


def answer_regimes(arch) -> str:
    perfect, no_benefit, _ = _thresholds()
    head = "**Regimes:** "
    bc = b_crit_of(arch)
    rows = rows_of(arch)
    if bc is None:
        return head + (
            "not determined — they need a finite critical batch size from the trade-off fit "
            f"(perfect scaling up to B_crit/{1 / perfect:g}, no benefit from {no_benefit:g}·B_crit)."
        )
    groups = {}
    for r in rows:
        name = "did not reach the target" if r.get("reached") is False else (r.get("regime") or "unknown")
        groups.setdefault(name, []).append(_batch(r["batch_size"]))

    def measured(name):
        bs = groups.get(name)
        if not bs:
            return "no batch size swept"
        return "batch " + bs[0] if len(bs) == 1 else f"batches {bs[0]}–{bs[-1]}"

    lo, hi = perfect * bc, no_benefit * bc
    return head + (
        f"perfect scaling up to B ≈ {_g(lo)} (= B_crit/{1 / perfect:g}; measured: {measured('perfect scaling')}), "
        f"diminishing returns between ≈ {_g(lo)} and ≈ {_g(hi)} ({measured('diminishing returns')}), "
        f"no benefit from B ≈ {_g(hi)} (= {no_benefit:g}·B_crit; {measured('no benefit')}) — "
        f"the three regimes of Shallue et al. 2018 (arXiv:1811.03600), placed by the fitted B_crit ≈ {_g(bc)}"
        + (
            f"; {'batches' if len(groups['did not reach the target']) > 1 else 'batch'} "
            f"{', '.join(groups['did not reach the target'])} did not reach the target and "
            f"{'have' if len(groups['did not reach the target']) > 1 else 'has'} no regime"
            if groups.get("did not reach the target")
            else ""
        )
        + "."
    )


def answer_small_batch(arch, small=SMALL_BATCH) -> str:
    _, _, factor = _thresholds()
    head = f"**Is a batch size below {small} ever reasonable here?** "
    rows = rows_of(arch)
    below = [r for r in rows if float(r["batch_size"]) < small]
    if not rows:
        return head + f"Cannot tell: {NOT_MEASURED} (no batch sizes in the analysis)."
    if not below:
        return head + f"Not tested: the smallest batch size swept is {_batch(rows[0]['batch_size'])}."
    fast = _row(arch, _ans(arch, "fastest_wall_time"))
    best = fnum(fast.get("time_to_target")) if fast else None
    if best is None:
        return head + f"Cannot tell: no batch size reached the target with a measured time ({NOT_REACHED})."

    def describe(r):
        t = fnum(r.get("time_to_target"))
        if t is None:
            return f"batch {_batch(r['batch_size'], r)}: {NOT_REACHED}"
        return (
            f"batch {_batch(r['batch_size'], r)}: {_dur(t)} ({t / best:.2f}× the fastest)"
            if best > 0
            else f"batch {_batch(r['batch_size'], r)}: {_dur(t)}"
        )

    sr = fnum(_ans(arch, "smallest_reasonable"))
    details = "; ".join(describe(r) for r in below)
    fast_s = f"the fastest is batch {_batch(fast['batch_size'], fast)} at {_dur(best)}"
    if sr is not None and sr < small:
        ok = [
            r
            for r in below
            if fnum(r.get("time_to_target")) is not None and float(r["time_to_target"]) <= factor * best
        ]
        return head + (
            f"Yes: batch {_batch(sr)} reaches the target within {factor:g}× the fastest time "
            f"({fast_s}); {len(ok)} of the {len(below)} batch sizes below {small} {'does' if len(ok) == 1 else 'do'} "
            f"({details})."
        )
    return head + (
        f"No: none of the {len(below)} batch sizes below {small} reaches the target within "
        f"{factor:g}× the fastest time ({fast_s}; {details})."
    )


def _ratio(x) -> str:
    v = fnum(x)
    if v is None:
        return "∞" if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isinf(x) else NOT_MEASURED
    return f"{v:.2f}×"


def answer_adaptive(arch) -> str:
    """The adaptive run against the recommended fixed batch size ("" without the arm)."""
    row = adaptive_of(arch)
    if row is None:
        return ""
    head = (
        f"**Adaptive batch size** (`fit(batch_size='adaptive')`, starting at batch "
        f"{_batch(row.get('start_batch_size'))}, the learning rate scaled by "
        f"{(row.get('settings') or {}).get('lr_rule', 'its rule')}): "
    )
    iv = row.get("intervals") if isinstance(row.get("intervals"), dict) else {}
    if fnum(row.get("time_to_target")) is None:
        return head + (
            f"{NOT_REACHED} — it did not reach the target in most of its seeds at any learning rate "
            f"tried ({', '.join(_lr(x) for x in row.get('lrs_tried') or [])})."
        )
    vs = row.get("vs_fixed") if isinstance(row.get("vs_fixed"), dict) else {}
    s = (
        f"{_dur(row['time_to_target'])}{_iv(iv.get('time_to_target'), _dur)} to the target "
        f"({_count(row.get('steps_to_target'))} steps, {_count(row.get('examples_to_target'))} examples, "
        f"learning rate {_lr(row.get('best_lr'))} at the start)"
    )
    if vs.get("value") is not None:
        s += (
            f"; that is {_ratio(vs['value'])}{_iv(vs, _ratio)} the time of the recommended batch "
            f"{_batch(vs.get('batch_size'))}"
        )
        if vs.get("wins") is not None and _resamples(arch):
            s += f", faster in {100 * vs['wins']:.0f}% of {_resamples(arch):,} bootstrap resamples"
    setup, loop = (
        fnum(row.get("setup_s")),
        row.get("vs_fixed_loop") if isinstance(row.get("vs_fixed_loop"), dict) else {},
    )
    if setup is not None:
        s += (
            f". Of its time, {_dur(setup)} is the one-time set-up (warming every candidate batch size, and "
            f"what its first decision costs) that a fixed batch size does not pay"
        )
        if loop.get("value") is not None:
            s += f"; without it, {_ratio(loop['value'])}{_iv(loop, _ratio)}"
    fb, mb = fnum(row.get("final_batch_size")), fnum(row.get("max_batch_size"))
    if fb is not None:
        s += (
            f". The controller ended at batch {_batch(fb)} (median over seeds; largest used {_batch(mb)})"
            if mb is not None and mb != fb
            else f". The controller ended at batch {_batch(fb)} (median over seeds)"
        )
    timing = "" if row.get("timing") != "in-trial" else "; step and set-up times from the trials themselves (no probe)"
    edge = (
        f"; LR not tuned: its best learning rate is at the {row['lr_edge']} edge of those tried"
        if row.get("lr_edge")
        else ""
    )
    return head + s + timing + edge + ". It is not a batch size: it is left out of the trade-off fit and the regimes."


def answer_generalisation(arch, acc) -> str:
    head = "**Generalisation:** "
    vkey, gkey = ("final_val_accuracy", "gen_gap_accuracy") if acc else ("final_val_loss", "gen_gap_loss")
    fmt = _pct if acc else (lambda v: _g(v))
    rows = rows_of(arch)
    pts = [(float(r["batch_size"]), fnum(r.get(vkey)), r) for r in rows if fnum(r.get(vkey)) is not None]
    if not pts:
        return head + f"final validation {'accuracy' if acc else 'loss'} {NOT_MEASURED}."
    best = (max if acc else min)(pts, key=lambda p: p[1])
    worst = (min if acc else max)(pts, key=lambda p: p[1])
    metric = "accuracy" if acc else "loss"
    if best[1] == worst[1]:
        parts = [f"final validation {metric} {fmt(best[1])} at every batch size: no trend with batch size"]
    else:
        parts = [
            f"best final validation {metric} {fmt(best[1])} at batch {_batch(best[0], best[2])}; "
            f"worst {fmt(worst[1])} at batch {_batch(worst[0], worst[2])}"
        ]
        rho = _spearman([p[0] for p in pts], [p[1] for p in pts])
        if rho is None:
            parts.append("too few batch sizes to speak of a trend")
        else:
            better = rho > 0 if acc else rho < 0
            trend = (
                "no clear trend with batch size"
                if abs(rho) < 0.3
                else f"it tends to get {'better' if better else 'worse'} as the batch grows"
            )
            parts.append(f"{trend} (Spearman rank correlation with batch size {rho:+.2f})")
    gaps = [(float(r["batch_size"]), fnum(r.get(gkey))) for r in rows if fnum(r.get(gkey)) is not None]
    if gaps:
        gap_name = "train − validation accuracy" if acc else "validation − train loss"
        gfmt = (lambda v: f"{100 * v:.1f} points") if acc else (lambda v: _g(v))
        lo, hi = min(gaps, key=lambda p: p[1]), max(gaps, key=lambda p: p[1])
        if lo[1] == hi[1]:
            s = f"generalisation gap ({gap_name}) {gfmt(lo[1])} at every batch size"
        else:
            s = (
                f"generalisation gap ({gap_name}) from {gfmt(lo[1])} (batch {_batch(lo[0])}) "
                f"to {gfmt(hi[1])} (batch {_batch(hi[0])})"
            )
            rho_g = _spearman([p[0] for p in gaps], [p[1] for p in gaps])
            if rho_g is not None:
                s += (
                    ", with no clear trend in batch size"
                    if abs(rho_g) < 0.3
                    else f", {'growing' if rho_g > 0 else 'shrinking'} with batch size (rank correlation {rho_g:+.2f})"
                )
        parts.append(s)
    caveat = (
        f" What this measures: a trial stops as soon as it reaches the target, so these are the "
        f"validation {metric} and the gap at each trial's stopping point (median over seeds, best "
        f"learning rate), which for trials that reached the target sit near the target by "
        f"construction. They compare stopping points, not how well each batch size generalises "
        f"after the same training budget; this study does not measure that."
    )
    return (
        head
        + "; ".join(parts)
        + "."
        + caveat
        + (
            " For context: with the learning rate tuned per batch size, Shallue "
            "et al. 2018 (arXiv:1811.03600) found no evidence that large batches "
            "generalise worse; Keskar et al. 2017 (arXiv:1609.04836) link large "
            "batches to sharp minimisers, and Masters & Luschi 2018 "
            "(arXiv:1804.07612) found the best test performance at batch sizes 2–32."
        )
    )


def batch_table(arch, acc):
    """One row per batch size: intervals in brackets (the bootstrap's 90% interval), win
    rates as percentages of the resamples ("best lr wins": how often the same learning rate
    was best; "fastest in": how often this batch size was the fastest)."""
    headers = [
        "batch",
        "best lr",
        "best lr wins",
        "reached",
        "steps",
        "examples",
        "time to target",
        "fastest in",
        "timing",
        "final val " + ("acc" if acc else "loss"),
        "gen gap",
        "throughput",
        "memory",
        "regime",
    ]
    body = []
    for r in rows_of(arch):
        iv = r.get("intervals") if isinstance(r.get("intervals"), dict) else {}
        lr_iv = iv.get("best_lr") if isinstance(iv.get("best_lr"), dict) else {}
        lr_wins = NOT_MEASURED if lr_iv.get("wins") is None else f"{100 * lr_iv['wins']:.0f}%"
        best_lr = _lr(r.get("best_lr"))
        if r.get("lr_edge"):
            best_lr += f" (LR not tuned: {r['lr_edge']} edge)"
        fastest = NOT_MEASURED if fnum(r.get("p_fastest")) is None else f"{100 * r['p_fastest']:.0f}%"
        regime_s = "did not reach the target" if r.get("reached") is False else r.get("regime") or "unknown"
        frac = fnum(r.get("reached_fraction"))
        seeds = r.get("seeds")
        reached = (
            NOT_MEASURED
            if frac is None
            else (f"{round(frac * seeds)}/{seeds}" if isinstance(seeds, int) and seeds > 0 else f"{100 * frac:.0f}%")
        )
        if acc:
            val, gap = _pct(r.get("final_val_accuracy")), r.get("gen_gap_accuracy")
            gap = NOT_MEASURED if fnum(gap) is None else f"{100 * float(gap):+.1f} pts"
        else:
            val, gap = _g(r.get("final_val_loss")), r.get("gen_gap_loss")
            gap = NOT_MEASURED if fnum(gap) is None else f"{float(gap):+.3g}"
        body.append(
            [
                _batch(r["batch_size"], r),
                best_lr,
                lr_wins,
                reached,
                _count(r.get("steps_to_target")) + _iv(iv.get("steps_to_target"), _count),
                _count(r.get("examples_to_target")) + _iv(iv.get("examples_to_target"), _count),
                _dur(r.get("time_to_target")) + _iv(iv.get("time_to_target"), _dur),
                fastest,
                r.get("timing") or NOT_MEASURED,
                val,
                gap,
                _rate(r.get("throughput")),
                _mib(r.get("memory_bytes")),
                regime_s,
            ]
        )
    row = adaptive_of(arch)
    if row is not None:  # one more row: the adaptive run (no batch size of its own)
        body.append(_adaptive_table_row(row, acc))
    return headers, body


def _adaptive_table_row(r, acc) -> list:
    """The adaptive run in the per-batch-size table: its "fastest in" cell is how often it
    beat the recommended batch size; its regime cell says it has none."""
    iv = r.get("intervals") if isinstance(r.get("intervals"), dict) else {}
    lr_iv = iv.get("best_lr") if isinstance(iv.get("best_lr"), dict) else {}
    best_lr = _lr(r.get("best_lr")) + (f" (LR not tuned: {r['lr_edge']} edge)" if r.get("lr_edge") else "")
    frac, seeds = fnum(r.get("reached_fraction")), r.get("seeds")
    reached = (
        NOT_MEASURED
        if frac is None
        else (f"{round(frac * seeds)}/{seeds}" if isinstance(seeds, int) and seeds > 0 else f"{100 * frac:.0f}%")
    )
    vs = r.get("vs_fixed") if isinstance(r.get("vs_fixed"), dict) else {}
    wins = (
        NOT_MEASURED
        if fnum(vs.get("wins")) is None
        else f"{100 * vs['wins']:.0f}% vs batch {_batch(vs.get('batch_size'))}"
    )
    if acc:
        val, gap = _pct(r.get("final_val_accuracy")), r.get("gen_gap_accuracy")
        gap = NOT_MEASURED if fnum(gap) is None else f"{100 * float(gap):+.1f} pts"
    else:
        val, gap = _g(r.get("final_val_loss")), r.get("gen_gap_loss")
        gap = NOT_MEASURED if fnum(gap) is None else f"{float(gap):+.3g}"
    return [
        adaptive_label(r),
        best_lr,
        NOT_MEASURED if lr_iv.get("wins") is None else f"{100 * lr_iv['wins']:.0f}%",
        reached,
        _count(r.get("steps_to_target")) + _iv(iv.get("steps_to_target"), _count),
        _count(r.get("examples_to_target")) + _iv(iv.get("examples_to_target"), _count),
        _dur(r.get("time_to_target")) + _iv(iv.get("time_to_target"), _dur),
        wins,
        r.get("timing") or NOT_MEASURED,
        val,
        gap,
        "varies",
        _mib(r.get("memory_bytes")),
        "not a fixed batch size (out of the fit)",
    ]


def norm_comparison_blocks(comp, acc) -> list:
    """Batch norm / ghost batch size / dropout variants of one model, side by side."""
    if not isinstance(comp, dict) or not comp.get("rows"):
        return []
    variants = list(comp.get("variants") or [])
    what = "final validation accuracy" if acc else "final validation loss"
    head = [
        ("h2", f"Batch norm, ghost batch size and dropout ({comp.get('base', '?')})"),
        (
            "p",
            f"The {what} (median over seeds, at each variant's best learning rate) and the steps "
            f"to target, per batch size; a ghost batch size at or above the batch size is "
            f"ordinary batch norm, so such cells are not repeated. Whatever it shows is "
            f"reported as measured.",
        ),
    ]
    body = []
    for row in comp["rows"]:
        cells = [_batch(row.get("batch_size"))]
        for v in variants:
            r = row.get(v)
            if not isinstance(r, dict):
                cells.append("—")
                continue
            val = _pct(r.get("final_val_accuracy")) if acc else _g(r.get("final_val_loss"))
            cells.append(f"{val} ({_count(r.get('steps_to_target'))} steps)")
        body.append(cells)
    return head + [("table", ["batch"] + variants, body)]


# --------------------------------------------------------------------------- your questions

QUESTIONS_TITLE = "Your questions, answered"
QUESTIONS_ID = "your-questions"


def _q_number(x) -> str:
    v = fnum(x)
    if v is None:
        return _gi(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)
    return _g(v)


def question_headline(q) -> str:
    """ "value [lo, hi] unit; won in 87% of bootstrap resamples" of a question's answer
    (its headline number with the 90% interval), or "" where it has no value."""
    if not isinstance(q, dict) or q.get("value") is None:
        return ""
    s = _q_number(q["value"])
    if q.get("lo") is not None and q.get("hi") is not None:
        s += f" [{_q_number(q['lo'])}, {_q_number(q['hi'])}]"
    if q.get("unit"):
        s += f" {q['unit']}"
    w = fnum(q.get("wins"))
    if w is not None:
        s += f"; won in {100 * w:.0f}% of bootstrap resamples"
    return s


def _q_plot(q, report_dir):
    """The answer's figure as a file name in ``report_dir``, or None where it names no file
    there (only a plain file name counts: nothing outside the report directory is shown)."""
    plot = q.get("plot")
    if not report_dir or not isinstance(plot, str) or not plot or os.path.basename(plot) != plot or plot in (".", ".."):
        return None
    return plot if os.path.isfile(os.path.join(os.fspath(report_dir), plot)) else None


def question_blocks(questions, report_dir=None) -> list:
    """The section "Your questions, answered": for each answer of ``questions`` (``{name:
    answer}`` of :func:`minigd.study.questions.answer_questions`), in the order of
    :data:`minigd.study.questions.QUESTIONS` (unknown names after, as given), the question
    as a heading, the answer, the headline number with its 90% interval (and win rate),
    the conditions in a smaller line and the figure -- where its ``plot`` names a file that
    exists in ``report_dir``.  An unanswered question shows its "Not answered: ..." sentence.
    ``[]`` when there are no answers."""
    if not isinstance(questions, dict):
        return []
    try:
        from minigd.study.questions import QUESTIONS
    except ImportError:  # pragma: no cover - the study package ships with minigd
        QUESTIONS = ()
    names = [n for n in QUESTIONS if n in questions] + [n for n in questions if n not in QUESTIONS]
    inner = []
    for name in names:
        q = questions[name]
        if not isinstance(q, dict):
            continue
        inner.append(("h3", str(q.get("question") or name)))
        text = str(q.get("answer") or "").strip()
        if q.get("value") is None and not text:
            text = "Not answered: no answer was recorded."
        inner.append(("p", text))
        head = question_headline(q)
        if head:
            inner.append(("p", f"**Headline number** (90% interval in brackets): {head}."))
        if q.get("conditions"):
            inner.append(("small", f"Conditions: {q['conditions']}"))
        plot = _q_plot(q, report_dir)
        if plot:
            cap = _PLOT_CAPTIONS.get(plot, f"The figure behind this answer ({plot}).")
            inner.append(("img", plot, cap, f"figure for the question: {q.get('question') or name}"))
    if not inner:
        return []
    return [("section", QUESTIONS_ID, [("h2", QUESTIONS_TITLE)] + inner)]


# --------------------------------------------------------------------------- blocks


def build_blocks(
    analysis: dict, *, title: str = "minigd batch-size study", spec: dict | None = None, plots=None, report_dir=None
) -> list:
    """The report as a list of blocks ``(kind, ...)``: ``("h1"|"h2"|"h3"|"p"|"small", text)``,
    ``("ul", [items])``, ``("table", headers, rows)``, ``("img", src, caption, alt)``,
    ``("pre", text)``, ``("section", id, [blocks])``.  Text may hold ``**bold**``.
    ``report_dir`` is where the figures are: an answer of ``analysis["questions"]`` shows
    its figure only where the file exists there."""
    analysis = analysis if isinstance(analysis, dict) else {}
    archs = architectures(analysis)
    acc = uses_accuracy(archs)
    n_trials, n_failed = analysis.get("n_trials"), analysis.get("n_failed")
    blocks = [("h1", title)]
    top = analysis.get("recommendation")
    if archs or top:
        blocks.append(("p", _rec_text(top)))
    intro = (
        f"{_count(n_trials, NOT_MEASURED)} trials, {_count(n_failed, NOT_MEASURED)} failed; "
        f"{len(archs)} architecture{'s' if len(archs) != 1 else ''}."
    )
    if archs:
        intro += (
            " For each batch size the learning rate is the one that reached the target in the fewest "
            "steps (median over seeds); a batch size counts as reaching the target when most of its "
            'seeds did. "Not reached" means it did not; "not measured" means the value was not recorded.'
        )
    blocks.append(("p", intro))
    if not archs:
        blocks.append(("p", "**No successful trials: there is nothing to analyse.** See the failures in the appendix."))
    for arch in archs:
        if len(archs) > 1:
            blocks.append(("h2", f"Architecture {arch_label(arch)}"))
        else:
            blocks.append(("h2", f"Answers ({arch_label(arch)}, target {target_words(arch)})"))
        if len(archs) > 1:
            blocks.append(("p", _rec_text(arch.get("recommendation"))))
        n = _resamples(arch)
        if n:
            blocks.append(
                (
                    "p",
                    f"Numbers in brackets are 90% bootstrap intervals ({n:,} resamples of the seeds "
                    f"within each batch size and learning rate, and of the timing rounds, re-running "
                    f"the whole selection); percentages are how often a choice won across them.",
                )
            )
        for w in arch.get("warnings") or []:
            blocks.append(("p", f"Note: {w}."))
        blocks.append(
            (
                "ul",
                [
                    x
                    for x in (
                        answer_fastest(arch),
                        answer_fewest_examples(arch),
                        answer_fewest_steps(arch),
                        answer_critical(arch),
                        answer_reasonable(arch),
                        answer_regimes(arch),
                        answer_small_batch(arch),
                        answer_goodput(arch),
                        answer_adaptive(arch),
                        answer_generalisation(arch, acc),
                    )
                    if x
                ],
            )
        )
        blocks.append(("h3", "Per batch size" + (" (and the adaptive run)" if adaptive_of(arch) else "")))
        h, b = batch_table(arch, acc)
        if b:
            blocks.append(("table", h, b))
        else:
            blocks.append(("p", f"No batch sizes: {NOT_MEASURED}."))
    blocks += question_blocks(analysis.get("questions"), report_dir)
    for comp in analysis.get("norm_comparisons") or []:
        blocks += norm_comparison_blocks(comp, acc)
    blocks.append(("h2", "Figures"))
    plots = plots if plots is not None else [(name, None) for name in plot_files(analysis)]
    for name, placeholder in plots:
        cap = _PLOT_CAPTIONS.get(name, name)
        if placeholder:
            cap += f" ({placeholder})"
        blocks.append(("img", name, cap, _PLOT_ALT.get(name, name)))
    blocks.append(("h2", "Appendix"))
    blocks.append(("h3", "Failures"))
    failures = [f for f in (analysis.get("failures") or []) if isinstance(f, dict)]
    if not n_failed and not failures:
        blocks.append(("p", "No trial failed."))
    else:
        blocks.append(
            (
                "p",
                f"{_count(n_failed if n_failed is not None else len(failures), NOT_MEASURED)} of "
                f"{_count(n_trials, NOT_MEASURED)} trials failed; the first "
                f"{min(5, len(failures))} errors:",
            )
        )
        if failures:
            blocks.append(
                ("ul", [f"`{f.get('trial', '?')}`: {f.get('error') or 'no error recorded'}" for f in failures[:5]])
            )
    blocks.append(("h3", "Study specification"))
    if spec is None:
        blocks.append(("p", "Not given."))
    else:
        try:
            text = json.dumps(spec, indent=2, sort_keys=True, default=str)
        except (TypeError, ValueError):
            text = repr(spec)
        blocks.append(("pre", text))
    return blocks


# --------------------------------------------------------------------------- renderers


def _md_cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_small(text) -> str:
    """A smaller line in Markdown: ``<sub>`` (rendered smaller where Markdown allows HTML),
    its text escaped for HTML (``&`` and ``<``: enough in element content, and ``>=`` stays
    readable in the raw file)."""
    return "<sub>" + str(text).replace("&", "&amp;").replace("<", "&lt;").replace("\n", " ") + "</sub>"


def render_markdown(blocks) -> str:
    """The blocks as Markdown (a ``section`` is its blocks in order)."""
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind == "section":
            out.append(render_markdown(blk[2]).rstrip("\n"))
        elif kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + blk[1])
        elif kind == "p":
            out.append(blk[1])
        elif kind == "small":
            out.append(_md_small(blk[1]))
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in blk[1]))
        elif kind == "table":
            headers, rows = blk[1], blk[2]
            lines = [
                "| " + " | ".join(_md_cell(h) for h in headers) + " |",
                "|" + "|".join("---" for _ in headers) + "|",
            ]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            alt = re.sub(r"([\[\]\\])", r"\\\1", str(blk[3] if len(blk) > 3 else blk[1]))
            out.append(f"![{alt}]({blk[1]})\n\n*{blk[2]}*")
        elif kind == "pre":
            out.append("```json\n" + blk[1] + "\n```")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.5; }
h1, h2, h3, p, li, figcaption, small { overflow-wrap: anywhere; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .2em; margin-top: 2em; }
li { margin-bottom: .5em; }
.table-wrap { max-width: 100%; overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child, td:last-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.5em 0; }
img { max-width: 100%; height: auto; }
figure img { border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
section#your-questions h3 { margin-top: 1.6em; }
p.small { font-size: 0.85em; color: #555; margin-top: -.4em; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 0.85em; }
code { background: #f6f8fa; padding: 0 .2em; }
"""


def _inline_html(text) -> str:
    s = html.escape(str(text), quote=False)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return s


def _html_block(blk) -> str:
    kind = blk[0]
    if kind == "section":
        return (
            f'<section id="{html.escape(str(blk[1]))}">\n' + "\n".join(_html_block(b) for b in blk[2]) + "\n</section>"
        )
    if kind in ("h1", "h2", "h3"):
        return f"<{kind}>{_inline_html(blk[1])}</{kind}>"
    if kind == "p":
        return f"<p>{_inline_html(blk[1])}</p>"
    if kind == "small":
        return f'<p class="small"><small>{_inline_html(blk[1])}</small></p>'
    if kind == "ul":
        return "<ul>\n" + "\n".join(f"<li>{_inline_html(i)}</li>" for i in blk[1]) + "\n</ul>"
    if kind == "table":
        # in a box that scrolls by itself: a wide table never makes the page scroll sideways
        headers, rows = blk[1], blk[2]
        t = [
            '<div class="table-wrap">',
            "<table>",
            "<thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in headers) + "</tr></thead>",
            "<tbody>",
        ]
        t += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows]
        t += ["</tbody>", "</table>", "</div>"]
        return "\n".join(t)
    if kind == "img":
        src, cap = html.escape(blk[1]), _inline_html(blk[2])
        alt = html.escape(blk[3] if len(blk) > 3 else blk[1])
        return (
            f'<figure><img src="{src}" alt="{alt}" style="max-width:100%;height:auto">'
            f"<figcaption>{cap}</figcaption></figure>"
        )
    if kind == "pre":
        return f"<pre>{html.escape(blk[1])}</pre>"
    return ""


def render_html(blocks, title: str = "minigd batch-size study") -> str:
    """The blocks as a self-contained HTML page (inline CSS, figures by relative path).  Every
    text is escaped; nothing is wider than the window (figures scale down, wide tables
    scroll in their own box, long words wrap)."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
    ]
    out += [h for h in (_html_block(b) for b in blocks) if h]
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- summary.json

#: the headline numbers of every architecture in summary.json, each {"value", "lo", "hi", "wins"}
HEADLINE_KEYS = (
    "fastest_wall_time",
    "time_to_target",
    "fewest_examples",
    "examples_to_target",
    "fewest_steps",
    "steps_to_target",
    "critical_batch_size_fit",
    "s_min",
    "e_min",
    "critical_batch_size_noise",
    "noise_scale_target",
    "max_goodput",
    "smallest_reasonable",
)
_RECOMMENDATION_KEYS = (
    "batch_size",
    "lo",
    "hi",
    "wins",
    "time_to_target",
    "fewest_examples",
    "examples_to_target",
    "critical_batch_size",
    "critical_batch_size_tuning",
    "noise_scale_target",
    "smallest_reasonable",
    "resolvable",
    "edge",
    "architecture",
    "text",
)
SUMMARY_SCHEMA = 1


def _plain(x):
    """``x`` with numpy scalars as Python numbers and every non-finite float as None; a dict
    that held an infinite value lists those keys under ``"unbounded"``."""
    import numpy as np

    if isinstance(x, dict):
        out, unbounded = {}, []
        for k, v in x.items():
            if isinstance(v, (float, np.floating)) and math.isinf(float(v)):
                unbounded.append(str(k))
            out[str(k)] = _plain(v)
        if unbounded:
            out["unbounded"] = unbounded
        return out
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if x is None or isinstance(x, str):
        return x
    return str(x)


def _interval_of(d, fallback=None):
    if isinstance(d, dict):
        return {k: d.get(k) for k in ("value", "lo", "hi", "wins")}
    return {"value": fallback, "lo": None, "hi": None, "wins": None}


def _headline_of(arch) -> dict:
    h = arch.get("headline") if isinstance(arch.get("headline"), dict) else {}
    ans = arch.get("answers") if isinstance(arch.get("answers"), dict) else {}
    return {k: _interval_of(h.get(k), ans.get(k)) for k in HEADLINE_KEYS}


def _recommendation_of(rec) -> dict:
    rec = rec if isinstance(rec, dict) else {}
    out = {}
    for k in _RECOMMENDATION_KEYS:
        v = rec.get(k)
        if k in ("time_to_target", "examples_to_target"):
            v = {kk: (v or {}).get(kk) for kk in ("value", "lo", "hi")}
        elif k in ("fewest_examples", "critical_batch_size", "noise_scale_target", "smallest_reasonable"):
            v = _interval_of(v)
        elif k == "resolvable":
            v = bool(v)
        elif k == "edge":
            v = list(v or [])
        elif k == "text" and not v:
            v = _rec_text(None).replace("**Recommendation:** ", "")
        out[k] = v
    return out


def summary_json(analysis: dict) -> dict:
    """The machine-readable answer of a study (what ``summary.json`` holds; see docs/guide/study.md,
    "What the study answers: summary.json"): the recommendation, every architecture's
    headline numbers as ``{"value", "lo", "hi", "wins"}``, and per batch size its best
    learning rate, steps/examples/time to target with intervals and flags.  Non-finite
    numbers become ``null`` (a dict that held an infinite one lists its keys under
    ``"unbounded"``), so the file is strict JSON."""
    analysis = analysis if isinstance(analysis, dict) else {}
    archs = architectures(analysis)
    entries = []
    for a in archs:
        per_b = []
        for r in rows_of(a):
            iv = r.get("intervals") if isinstance(r.get("intervals"), dict) else {}
            per_b.append(
                {
                    "batch_size": r.get("batch_size"),
                    "full_batch": bool(r.get("full_batch")),
                    "reached": r.get("reached"),
                    "status": r.get("status"),
                    "lr_tuned": r.get("lr_tuned"),
                    "lr_edge": r.get("lr_edge"),
                    "lrs_tried": r.get("lrs_tried"),
                    "in_fit": r.get("in_fit"),
                    "timing": r.get("timing"),
                    "regime": r.get("regime"),
                    "best_lr": _interval_of(iv.get("best_lr"), r.get("best_lr")),
                    **{
                        k: _interval_of(iv.get(k), r.get(k))
                        for k in ("steps_to_target", "examples_to_target", "time_to_target", "step_time_s")
                    },
                    "fastest_wins": r.get("p_fastest"),
                    "reached_wins": r.get("p_reached"),
                    "throughput": r.get("throughput"),
                    "goodput": r.get("goodput"),
                    "memory_bytes": r.get("memory_bytes"),
                }
            )
        fit = a.get("tradeoff_fit") if isinstance(a.get("tradeoff_fit"), dict) else None
        ad = adaptive_of(a)
        if ad is not None:
            iv = ad.get("intervals") if isinstance(ad.get("intervals"), dict) else {}
            ad = {
                "batch_size": "adaptive",
                "start_batch_size": ad.get("start_batch_size"),
                "settings": ad.get("settings"),
                "reached": ad.get("reached"),
                "status": ad.get("status"),
                "lr_tuned": ad.get("lr_tuned"),
                "lr_edge": ad.get("lr_edge"),
                "lrs_tried": ad.get("lrs_tried"),
                "in_fit": False,
                "timing": ad.get("timing"),
                "best_lr": _interval_of(iv.get("best_lr"), ad.get("best_lr")),
                **{
                    k: _interval_of(iv.get(k), ad.get(k))
                    for k in ("steps_to_target", "examples_to_target", "time_to_target", "loop_time_to_target")
                },
                "setup_s": ad.get("setup_s"),
                "vs_fixed": _interval_of(ad.get("vs_fixed")),
                "vs_fixed_loop": _interval_of(ad.get("vs_fixed_loop")),
                "vs_batch_size": (ad.get("vs_fixed") or {}).get("batch_size"),
                "final_batch_size": ad.get("final_batch_size"),
                "max_batch_size": ad.get("max_batch_size"),
                "memory_bytes": ad.get("memory_bytes"),
            }
        entries.append(
            {
                "architecture": arch_label(a),
                "sizes": a.get("sizes"),
                "activation": a.get("activation"),
                "optimizer": a.get("optimizer"),
                "norm": a.get("norm"),
                "target_metric": a.get("target_metric"),
                "target": a.get("target"),
                "b_crit_tuning": a.get("b_crit_tuning"),
                "headline": _headline_of(a),
                "recommendation": _recommendation_of(a.get("recommendation")),
                "tradeoff_fit": fit,
                "per_batch": per_b,
                "adaptive": ad,
                "warnings": list(a.get("warnings") or []),
            }
        )
    rec = _recommendation_of(analysis.get("recommendation"))
    top = next(
        (
            e
            for e in entries
            if rec.get("architecture") and e["recommendation"].get("architecture") == rec.get("architecture")
        ),
        entries[0] if entries else None,
    )
    out = {
        "schema": SUMMARY_SCHEMA,
        "recommendation": rec,
        "headline": top["headline"] if top else {k: _interval_of(None) for k in HEADLINE_KEYS},
        # the adaptive run's wall time to target / the recommended batch size's (the study's
        # adaptive arm; all None without it): {"value", "lo", "hi", "wins"}, wins = the
        # fraction of bootstrap resamples in which the adaptive run was faster
        "adaptive": _interval_of(analysis.get("adaptive")),
        "architectures": entries,
        "questions": analysis.get("questions") if isinstance(analysis.get("questions"), dict) else {},
        "bootstrap": analysis.get("bootstrap") if isinstance(analysis.get("bootstrap"), dict) else None,
        "n_trials": analysis.get("n_trials"),
        "n_failed": analysis.get("n_failed"),
    }
    return _plain(out)


def write_report(
    analysis: dict, out_dir, *, title: str = "minigd batch-size study", spec: dict | None = None
) -> list[str]:
    """Write the figures, ``summary.md``, ``summary.html`` and ``summary.json`` of a study
    into ``out_dir``.

    Parameters
    ----------
    analysis : dict
        The output of :func:`minigd.study.analysis.analyze`. Any value may be missing or
        ``None``; figures without data become placeholders ("not enough data: ...").
    out_dir : str or os.PathLike
        The directory to write into (created if missing).
    title : str, keyword-only
        The report's title.
    spec : dict, optional, keyword-only
        The study specification, shown in the appendix as JSON.

    Returns
    -------
    list of str
        The paths written: the six PNG figures (seven with the adaptive arm's,
        :data:`~minigd.report.plots.ADAPTIVE_PLOT`), then ``summary.md``, ``summary.html`` and
        ``summary.json`` (:func:`summary_json`; written first, so it exists even when the
        figures cannot be drawn).  Every file is written atomically (temporary file, then
        :func:`os.replace`).

    Raises
    ------
    ImportError
        matplotlib is not installed (``pip install 'minigd[study]'``).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    js = atomic_write_text(
        os.path.join(out_dir, "summary.json"), json.dumps(summary_json(analysis), indent=1, allow_nan=False) + "\n"
    )
    plots = make_plots(analysis if isinstance(analysis, dict) else {}, out_dir)
    blocks = build_blocks(
        analysis, title=title, spec=spec, plots=[(p.name, p.placeholder) for p in plots], report_dir=out_dir
    )
    md = atomic_write_text(os.path.join(out_dir, "summary.md"), render_markdown(blocks))
    page = atomic_write_text(os.path.join(out_dir, "summary.html"), render_html(blocks, title))
    return [p.path for p in plots] + [md, page, js]
