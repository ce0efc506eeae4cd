"""Should a search space allow a hidden layer of width 1?

The experiment: the study's depth of hidden layers (at least one) at widths 1, 2, 4, ... up
to the study's width, next to the model with no hidden layer at all (depth 0: the linear /
logistic-regression model), all at one batch size (the study's recommendation, else 32),
each trained for the same number of epochs (``stop_at_target=False``, ``min_steps=0``: an
equal budget, nothing stops early), with the learning rate tuned per model over
:data:`LR_FACTORS` x the main study's best rate at that batch size, :data:`N_SEEDS` seeds.

The measured number is the *final* validation metric at the end of that budget
(accuracy; the loss for regression), at each model's best learning rate (the rate with the
best median over seeds).  Its 90% interval comes from the bootstrap of
:func:`tuned_bootstrap`: the seeds are resampled jointly across every model and rate (a
seed fixes the initialisation and the data order everywhere, as in the main analysis) and
the best rate is re-selected in each resample.  Width 1 "wins" in a resample when it is at
least as good as every other model; it "ties" when the interval of its difference from the
best model contains 0.

A ReLU layer of width 1 is a one-unit bottleneck: every class score is an affine function
of one number that is 0 for about half the inputs, so on a multi-class problem it cannot
do better than ordering the classes along one direction.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from ._common import fmt_num

NAME = "width_one"
QUESTION = "Should a search space allow a hidden layer of width 1?"
#: multiples of the main study's best learning rate at the batch size, tried per model (that
#: rate is the fastest to the study's target; the best final metric of a run without decay
#: lies lower, and down to 1/4 of it on digits)
LR_FACTORS = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0)
#: the epoch budget of every trial (capped by the study's max_epochs)
EPOCHS = 20
N_SEEDS = 3
N_BOOT = 4000
LINEAR = 0  # the "width" of the model with no hidden layer


# --------------------------------------------------------------------------- shared with generalisation


def arm_seeds(ctx) -> tuple:
    """The arm's trial seeds: the first :data:`N_SEEDS` of the study's."""
    return tuple(ctx.spec.trial_seeds()[:N_SEEDS])


def epochs(ctx) -> int:
    return int(min(ctx.spec.max_epochs, EPOCHS))


def center_lr(ctx, B: int) -> float:
    """The main study's best learning rate at batch size ``B``; for a B it did not sweep,
    the square-root rule from its best rate at the nearest swept B (Hoffer et al. 2017);
    with no main analysis, the study's own rule (``spec.lrs_for``'s centre)."""
    archs = (ctx.main_analysis or {}).get("architectures") or []
    sizes = list(ctx.base_config().sizes)  # the study's first model, plain, if it has several
    arch = next(
        (a for a in archs if list(a.get("sizes") or []) == sizes and not a.get("norm")), archs[0] if archs else None
    )
    rows = [r for r in (arch or {}).get("per_batch", []) if r.get("best_lr")]
    if not rows:
        s = ctx.spec
        return float(s.base_lr * math.sqrt(B / s.base_batch_size))
    r = min(rows, key=lambda r: (abs(math.log(r["batch_size"] / B)), r["batch_size"]))
    return float(r["best_lr"] * math.sqrt(B / r["batch_size"]))


def metric_of(ctx):
    """(``"accuracy"`` or ``"loss"``, higher_is_better) of the study's target metric."""
    acc = "accuracy" in ctx.spec.target_metric and ctx.ds.task == "classification"
    return ("accuracy", True) if acc else ("loss", False)


def _score(res, metric: str, higher: bool) -> float:
    """The final validation metric oriented so that higher is better; -inf for a trial
    that failed, diverged or has no finite metric (a rate no one would pick)."""
    if res.get("status") != "ok" or res.get("diverged"):
        return -math.inf
    v = res.get(f"final_val_{metric}")
    if v is None or not math.isfinite(float(v)):
        return -math.inf
    return float(v) if higher else -float(v)


def _tiebreak(res) -> float:
    """Ties in the (quantised) accuracy go to the lower validation loss."""
    v = res.get("final_val_loss") if res.get("status") == "ok" and not res.get("diverged") else None
    return -float(v) if v is not None and math.isfinite(float(v)) else -math.inf


def tuned_bootstrap(
    rows, group_of, seeds, *, metric: str, higher: bool, extras=(), seed: int = 0, n_boot: int = N_BOOT, salt: str = ""
) -> dict:
    """The best-rate final validation metric of each group of trials, with bootstrap samples.

    Parameters
    ----------
    rows : list of (TrialConfig, dict)
    group_of : callable
        ``cfg -> hashable`` group (e.g. the hidden width); None leaves the trial out.
    seeds : sequence of int
        The trial seeds; a seed is resampled jointly in every group and rate.
    metric, higher : the validation metric (``"accuracy"``/``"loss"``) and its direction.
    extras : names of result fields (e.g. ``"gen_gap_accuracy"``) reported at the selected rate.
    seed, salt : seed the resamples (``numpy.random.default_rng([seed, crc32(salt)])``).

    Returns
    -------
    ``{group: {"value", "best_lr", "lrs", "lr_edge", "samples" (n_boot,), "best_lr_samples",
    "<extra>": value, "<extra>_samples"}}``: ``value`` is the median over seeds at the rate
    whose median is best (ties: lower median validation loss, then the smaller rate),
    oriented so higher is better (``-loss`` for a loss); the samples re-select the rate in
    every resample.  A value of -inf means every rate failed.
    """
    S = len(seeds)
    pos = {int(s): i for i, s in enumerate(seeds)}
    cells: dict = {}
    for cfg, res in sorted(rows, key=lambda cr: cr[0].key):
        g = group_of(cfg)
        if g is None or int(cfg.seed) not in pos:
            continue
        cell = cells.setdefault(g, {}).setdefault(
            float(cfg.lr),
            {"score": np.full(S, np.nan), "tie": np.full(S, np.nan), **{e: np.full(S, np.nan) for e in extras}},
        )
        i = pos[int(cfg.seed)]
        cell["score"][i] = _score(res, metric, higher)
        cell["tie"][i] = _tiebreak(res)
        for e in extras:
            v = res.get(e) if res.get("status") == "ok" else None
            cell[e][i] = np.nan if v is None else float(v)
    rng = np.random.default_rng([int(seed) % 2**63, zlib.crc32(salt.encode())])
    idx = rng.integers(0, S, size=(n_boot, S)) if n_boot > 0 and S > 0 else np.zeros((0, S), int)
    all_idx = np.vstack([np.arange(S)[None], idx])  # row 0: all the data
    out = {}
    for g, by_lr in cells.items():
        lrs = sorted(by_lr)
        arrs = {k: np.stack([by_lr[lr][k] for lr in lrs]) for k in ("score", "tie", *extras)}  # (L, S)
        med = {}
        for k, a in arrs.items():
            sample = a[:, all_idx]  # (L, 1 + R, S)
            with np.errstate(invalid="ignore"):
                m = _nanmedian(sample)  # (L, 1 + R)
            med[k] = m
        sc = np.where(np.isnan(med["score"]), -np.inf, med["score"])
        tb = np.where(np.isnan(med["tie"]), -np.inf, med["tie"])
        best_sc = sc.max(axis=0)
        cand = sc == best_sc
        tb_c = np.where(cand, tb, -np.inf)
        cand &= tb_c == tb_c.max(axis=0)
        best = np.argmax(cand, axis=0)  # first: the smallest rate
        lr_arr = np.array(lrs)
        e = {
            "value": float(best_sc[0]),
            "samples": best_sc[1:],
            "best_lr": float(lr_arr[best[0]]),
            "best_lr_samples": lr_arr[best[1:]],
            "lrs": lrs,
            "lr_edge": (
                None if len(lrs) < 2 else "low" if best[0] == 0 else "high" if best[0] == len(lrs) - 1 else None
            ),
        }
        for k in extras:
            v = med[k][best, np.arange(best.size)]
            e[k], e[k + "_samples"] = float(v[0]), v[1:]
        out[g] = e
    return out


def _nanmedian(a):
    """Median over the last axis ignoring NaN (-inf counts); NaN where all are NaN."""
    a = np.sort(a, axis=-1)  # NaN sort last
    c = (~np.isnan(a)).sum(axis=-1)
    lo = np.clip((c - 1) // 2, 0, None)[..., None]
    hi = np.clip(c // 2, 0, a.shape[-1] - 1)[..., None]
    x, y = np.take_along_axis(a, lo, -1)[..., 0], np.take_along_axis(a, hi, -1)[..., 0]
    with np.errstate(invalid="ignore"):
        m = np.where(x == y, x, 0.5 * (x + y))
    return np.where(c > 0, m, np.nan)


def interval(value, samples, scale: float = 1.0) -> dict:
    """``{"value", "lo", "hi"}`` (5th/95th percentiles, widened to hold the value), times
    ``scale`` (a negative scale turns an oriented score back into a loss); None where not
    finite."""
    from minigd.study.analysis import INTERVAL

    v = float(value) if value is not None else math.nan
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size:
        lo, hi = np.quantile(s, INTERVAL, method="inverted_cdf")
        lo, hi = (min(lo, v), max(hi, v)) if math.isfinite(v) else (lo, hi)
    else:
        lo = hi = math.nan
    # (12 significant digits: differences of equal accuracies are 0, not 1e-14)
    vals = [float(f"{x * scale:.12g}") if math.isfinite(x) else None for x in (v, float(lo), float(hi))]
    if scale < 0:
        vals[1], vals[2] = vals[2], vals[1]
    return {"value": vals[0], "lo": vals[1], "hi": vals[2]}


def fmt_metric(d, metric: str) -> str:
    """``"41% [38, 44]"`` for accuracy (in percent), ``"0.12 [0.1, 0.15]"`` for a loss."""
    if not d or d.get("value") is None:
        return "not measured"
    if metric == "accuracy":
        s = f"{d['value']:.1f}%"
        if d.get("lo") is not None:
            s += f" [{d['lo']:.1f}, {d['hi']:.1f}]"
        return s
    s = fmt_num(d["value"])
    if d.get("lo") is not None:
        s += f" [{fmt_num(d['lo'])}, {fmt_num(d['hi'])}]"
    return s


# --------------------------------------------------------------------------- the arm


def _setup(ctx):
    s = ctx.spec
    W = int(s.widths[0])
    depth = max(1, int(s.depths[0]))
    widths = []
    w = 1
    while w < W:
        widths.append(w)
        w *= 2
    widths.append(W)
    rec = ((ctx.main_analysis or {}).get("recommendation") or {}).get("batch_size")
    B = int(rec) if rec else 32
    B = min(B, ctx.n_train)
    return widths, depth, B


def plan(ctx) -> list:
    widths, depth, B = _setup(ctx)
    n_in, n_out = ctx.ds.X_train.shape[1], ctx.ds.n_out
    lr0 = center_lr(ctx, B)
    out = []
    for w in [LINEAR] + widths:
        sizes = (n_in, n_out) if w == LINEAR else (n_in,) + (w,) * depth + (n_out,)
        for f in LR_FACTORS:
            for sd in arm_seeds(ctx):
                out.append(
                    ctx.base_config(
                        sizes=sizes,
                        batch_size=B,
                        full_batch=B == ctx.n_train,
                        lr=float(lr0 * f),
                        seed=int(sd),
                        max_epochs=epochs(ctx),
                        min_steps=0,
                        stop_at_target=False,
                    )
                )
    return out


def _width(cfg):
    return LINEAR if len(cfg.sizes) == 2 else int(cfg.sizes[1])


def answer(ctx, rows) -> dict:
    from . import unanswered

    widths, depth, B = _setup(ctx)
    metric, higher = metric_of(ctx)
    seeds = arm_seeds(ctx)
    ok = [(c, r) for c, r in rows if r.get("status") == "ok"]
    if not ok:
        return unanswered(NAME, "none of the width sweep's trials succeeded")
    sel = tuned_bootstrap(ok, _width, seeds, metric=metric, higher=higher, seed=ctx.seed, salt=NAME)
    if 1 not in sel or not math.isfinite(sel[1]["value"]):
        return unanswered(NAME, "no trial of width 1 finished with a finite validation metric")
    others = [g for g in sel if g != 1 and math.isfinite(sel[g]["value"])]
    if not others:
        return unanswered(NAME, "no model other than width 1 finished with a finite validation metric")
    scale = 100.0 if metric == "accuracy" else -1.0  # accuracy in percent; a loss back from -loss
    ivs = {g: interval(sel[g]["value"], sel[g]["samples"], scale) for g in sel}
    best = max(others, key=lambda g: (sel[g]["value"], -g))
    # width 1 against the best of the others, paired over the resampled seeds
    best_other_samples = np.max(np.stack([sel[g]["samples"] for g in others]), axis=0)
    diff_samples = sel[1]["samples"] - best_other_samples
    diff_value = sel[1]["value"] - sel[best]["value"]
    diff = interval(diff_value, diff_samples, abs(scale))  # oriented: > 0 means width 1 is better
    wins = float(np.mean(diff_samples >= 0)) if diff_samples.size else None
    if diff_value >= 0:
        verdict = "wins here"
        advice = "a search space may include it"
    elif diff["hi"] is not None and diff["hi"] >= 0:
        verdict = "ties with the best model within the interval"
        advice = "a search space may include it, though it does not beat the best here"
    else:
        verdict = "never wins here" if not wins else f"wins in only {100 * wins:.0f}% of resamples"
        advice = "a search space should not include it (it only costs trials)"
    # the narrowest hidden width whose difference from the best has an interval reaching 0
    narrowest = None
    for w in widths:
        if w in sel and math.isfinite(sel[w]["value"]):
            d = interval(sel[w]["value"] - sel[best]["value"], sel[w]["samples"] - sel[best]["samples"], 1.0)
            if w == best or (d["hi"] is not None and d["hi"] >= 0):
                narrowest = w
                break
    name = lambda g: "the linear model with no hidden layer" if g == LINEAR else f"width {g}"
    what = "validation accuracy" if metric == "accuracy" else "validation loss"
    lin = (
        f" and {fmt_metric(ivs[LINEAR], metric)} for the linear model with no hidden layer"
        if LINEAR in ivs and best != LINEAR
        else ""
    )
    unit = "%" if metric == "accuracy" else ""
    dtext = (
        f"{diff['value']:+.1f} [{diff['lo']:+.1f}, {diff['hi']:+.1f}] percentage points"
        if metric == "accuracy"
        else f"{-diff['value']:+.3g} [{-diff['hi']:+.3g}, {-diff['lo']:+.3g}] in validation loss"
    )
    edges = []
    if best == widths[-1] and best != 1:
        edges.append(
            f"the best model is the widest swept ({best}): a wider one may do better still, outside what was measured"
        )
    if sel[1]["lr_edge"]:
        edges.append(
            f"width 1's best learning rate ({sel[1]['best_lr']:.3g}) is the "
            f"{'smallest' if sel[1]['lr_edge'] == 'low' else 'largest'} tried, so it may do a little "
            f"better at a rate outside the grid"
        )
    text = (
        f"Width 1 reaches {fmt_metric(ivs[1], metric)} {what} against {fmt_metric(ivs[best], metric)} for "
        f"{name(best)}{lin}, a difference of {dtext} from the best (at least as good in "
        f"{100 * (wins or 0):.0f}% of bootstrap resamples): it {verdict}, so {advice}."
        + (
            ""
            if narrowest is None
            else " No narrower hidden layer comes within the interval of the best."
            if narrowest == best
            else f" The narrowest hidden layer within the interval of the best is width {narrowest}."
        )
        + ("" if not edges else " Note: " + "; ".join(edges) + ".")
    )
    det_rows = []
    for g in [LINEAR] + widths:
        if g not in sel:
            continue
        e = sel[g]
        det_rows.append(
            {
                "width": g,
                "depth": 0 if g == LINEAR else depth,
                "metric": ivs[g],
                "best_lr": e["best_lr"],
                "lrs_tried": e["lrs"],
                "lr_edge": e["lr_edge"],
                "best_lr_wins": float(np.mean(e["best_lr_samples"] == e["best_lr"]))
                if e["best_lr_samples"].size
                else None,
            }
        )
    plot = _plot(ctx, widths, depth, B, ivs, metric, sel)
    budget = (
        f"hidden widths {', '.join(map(str, widths))} at depth {depth}, and depth 0; batch {B}; "
        f"{epochs(ctx)} epochs per trial (no early stop); learning rate tuned per width over "
        f"{', '.join(f'{f:g}' for f in LR_FACTORS)} x {center_lr(ctx, B):.3g}; {len(seeds)} seeds; final "
        f"{what} at the best rate (median over seeds), 90% bootstrap intervals over seeds "
        f"({N_BOOT} resamples, best rate re-selected in each)"
    )
    return {
        "name": NAME,
        "question": QUESTION,
        "answer": text,
        **{k: ivs[1][k] for k in ("value", "lo", "hi")},
        "wins": wins,
        "unit": "% validation accuracy (width 1)" if metric == "accuracy" else "validation loss (width 1)",
        "conditions": ctx.conditions(budget),
        "plot": plot,
        "details": {
            "metric": f"final_val_{metric}",
            "batch_size": B,
            "depth": depth,
            "epochs": epochs(ctx),
            "seeds": list(seeds),
            "lr_factors": list(LR_FACTORS),
            "center_lr": center_lr(ctx, B),
            "best": best,
            "width_one_minus_best": diff,
            "width_one_wins": wins,
            "narrowest_within_interval_of_best": narrowest,
            "edges": edges,
            "unit": unit or what,
            "per_width": det_rows,
        },
    }


def _plot(ctx, widths, depth, B, ivs, metric, sel):
    path = ctx.plot_path(NAME)
    if path is None:
        return None
    import os

    from minigd._plotting import pyplot as _pyplot
    from minigd._plotting import save_png as _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.3))
    xs = [w for w in widths if w in ivs and ivs[w]["value"] is not None]
    y = [ivs[w]["value"] for w in xs]
    lo = [ivs[w]["value"] - (ivs[w]["lo"] if ivs[w]["lo"] is not None else ivs[w]["value"]) for w in xs]
    hi = [(ivs[w]["hi"] if ivs[w]["hi"] is not None else ivs[w]["value"]) - ivs[w]["value"] for w in xs]
    ax.errorbar(
        xs,
        y,
        yerr=[lo, hi],
        fmt="o-",
        color="#1f77b4",
        capsize=3,
        label=f"{depth} hidden layer{'s' if depth > 1 else ''} of this width (90% interval)",
    )
    if 1 in ivs and ivs[1]["value"] is not None:
        ax.plot([1], [ivs[1]["value"]], "o", ms=11, mfc="none", color="#d62728", label="width 1")
    if LINEAR in ivs and ivs[LINEAR]["value"] is not None:
        L = ivs[LINEAR]
        ax.axhline(L["value"], color="#2ca02c", ls="--", label="no hidden layer (linear model)")
        if L["lo"] is not None:
            ax.axhspan(L["lo"], L["hi"], color="#2ca02c", alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(w) for w in xs])
    ax.set_xlabel("hidden layer width (units, log2 scale)")
    ax.set_ylabel("final validation accuracy (%)" if metric == "accuracy" else "final validation loss")
    ax.set_title(f"Width sweep at batch {B}, {epochs(ctx)} epochs, LR tuned per width")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save(fig, path, "minigd question: width_one")
    return os.path.basename(path)
