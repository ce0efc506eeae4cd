"""When I change the batch size, should the learning rate scale linearly or with the square root?

Answered by the fitted exponent alpha of *best learning rate ~ B^alpha* below the critical
batch size, next to the two rules people use: linear (alpha = 1, Goyal et al. 2017,
arXiv:1706.02677) and square root (alpha = 1/2, Hoffer, Hubara & Soudry 2017,
arXiv:1705.08741).  For two optimizers:

* the main study's (SGD with momentum by default): its tuned best learning rate per batch
  size (:func:`minigd.study.analysis.analyze`: fewest median steps to the target over the
  seeds) at the batch sizes that reached the target with the rate tuned (``lr_tuned``: the
  best rate not at an edge of those tried) and B < B_crit (the study's trade-off fit);
* the other one (Adam when the study runs SGD, and vice versa): a sub-sweep of its own at
  batch sizes :data:`OTHER_BATCH_SIZES` (below the training-set size), the learning rates
  :data:`LR_FACTORS` x a centre that follows the square-root rule from
  :data:`ADAM_LR` at batch 32 (for SGD: the study's ``base_lr`` at its ``base_batch_size``),
  3 seeds derived from the master seed, each trial stopping at the target; a batch size whose
  best rate is at an edge gets the next factor of 2 past it, up to :data:`EXTEND` times (as
  the study does).  Its B_crit comes from the same analysis of its own trials; where that
  fit fails the study's B_crit is used.

With fewer than 3 batch sizes below B_crit, every tuned batch size is used (said so).

alpha is the least-squares slope of ln(best LR) on ln(B).  Its 90% interval comes from the
bootstrap of the analysis: the seeds are resampled jointly across every (B, rate) cell,
the best rate is re-selected per B (a resample's B enters its fit when it reached the
target with a best rate not at an edge), and alpha is refitted; the set of batch sizes
(below the point estimate of B_crit) is held fixed.  The rates tried are factors of 2
apart, so a best rate is known only to a factor of 2: one grid step at either end of the
range moves alpha by ``resolution`` (reported).
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np

from ._common import arch0, fmt_num

NAME = "lr_scaling"
QUESTION = "When I change the batch size, should the learning rate scale linearly or with the square root?"
#: the sub-sweep's batch sizes (those below the training-set size)
OTHER_BATCH_SIZES = (4, 8, 16, 32, 64, 128, 256)
#: Adam's centre learning rate at batch 32 (scaled by sqrt(B/32) per batch size): a typical
#: rate for a small MLP; the grid's extension past an edge corrects a centre that is off
ADAM_LR = 1e-2
LR_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
#: extensions of the sub-sweep's grid past an edge (factors of 2)
EXTEND = 3
N_SEEDS = 3
N_BOOT = 2000
RULES = ((1.0, "linear", "Goyal et al. 2017"), (0.5, "square-root", "Hoffer et al. 2017"))


def _other(ctx) -> str:
    return "adam" if ctx.spec.optimizer == "sgd" else "sgd"


def _opt_words(ctx, opt) -> str:
    if opt == "adam":
        return "Adam"
    m = ctx.spec.momentum
    return f"SGD with momentum {m:g}" if m else "plain SGD"


def _grid_trials(ctx) -> list:
    from minigd.optim.schedules import scale_lr

    opt = _other(ctx)
    lr0, b0 = (ADAM_LR, 32) if opt == "adam" else (ctx.spec.base_lr, ctx.spec.base_batch_size)
    seeds = ctx.spec.trial_seeds()[:N_SEEDS]
    out = []
    for B in OTHER_BATCH_SIZES:
        if B >= ctx.n_train:
            continue
        centre = scale_lr(lr0, B, b0, "sqrt")
        for f in LR_FACTORS:
            for s in seeds:
                out.append(
                    ctx.base_config(
                        batch_size=B,
                        optimizer=opt,
                        lr=float(centre * f),
                        base_lr=float(lr0),
                        base_batch_size=int(b0),
                        seed=int(s),
                    )
                )
    return out


def _extensions(rows, grid) -> list:
    """The next factor of 2 past the edge for every batch size whose best rate is at one,
    within :data:`EXTEND` factors of 2 of the grid (deterministic in the stored rows)."""
    from minigd.study.analysis import best_lrs

    lo = {c.batch_size: min(g.lr for g in grid if g.batch_size == c.batch_size) for c in grid}
    hi = {c.batch_size: max(g.lr for g in grid if g.batch_size == c.batch_size) for c in grid}
    seeds = sorted({c.seed for c in grid})
    cap = 2.0**EXTEND * (1 + 1e-9)
    out = []
    for B, info in sorted(best_lrs(sorted(rows, key=lambda cr: cr[0].key)).items()):
        edge = info.get("at_edge")
        if edge not in ("low", "high"):
            continue
        lr = info["best_lr"] * (2.0 if edge == "high" else 0.5)
        if not (lo[B] / cap <= lr <= hi[B] * cap):
            continue
        tmpl = next(c for c in grid if c.batch_size == B)
        out += [dataclasses.replace(tmpl, lr=float(lr), seed=int(s)) for s in seeds]
    return out


def run(ctx) -> list:
    """The other optimizer's sub-sweep, extended past an edge like the study's grid."""
    grid = _grid_trials(ctx)
    rows = ctx.run_trials(grid)
    have = {c.key for c in grid}
    for _ in range(EXTEND):
        extra = [c for c in _extensions(rows, grid) if c.key not in have]
        if not extra:
            break
        have |= {c.key for c in extra}
        rows = rows + ctx.run_trials(extra)
    return rows


# --------------------------------------------------------------------------- the fit


def _slopes(x, Y, M):
    """Least-squares slopes of the rows of ``Y`` on ``x`` over the points where ``M``; NaN
    where fewer than 2 distinct x."""
    Mf = M.astype(float)
    n = Mf.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        xm = (Mf * x).sum(1) / n
        Yz = np.where(M, Y, 0.0)
        ym = Yz.sum(1) / n
        dx = np.where(M, x[None] - xm[:, None], 0.0)
        sxx = (dx * dx).sum(1)
        s = (dx * (Yz - ym[:, None])).sum(1) / sxx
    return np.where((n >= 2) & (sxx > 1e-12), s, np.nan)


def resolution(Bs) -> float:
    """How far one factor-of-2 step of the best rate at an end of ``Bs`` moves the fitted
    slope: ln 2 x max|x - mean x| / sum (x - mean x)^2, x = ln B."""
    x = np.log(np.asarray(Bs, float))
    xc = x - x.mean()
    return float(math.log(2) * np.abs(xc).max() / (xc @ xc)) if len(x) > 1 else math.nan


def fit_alpha(items, per_batch, b_crit, seed, label) -> dict:
    """alpha of best LR ~ B^alpha for one architecture's trials ``items`` (``(cfg, res)``,
    status ok) given its analysed ``per_batch`` rows and B_crit; see the module docstring.
    ``{"alpha": {"value", "lo", "hi"}, "log_lr0", "batch_sizes", "best_lrs", "scope",
    "b_crit", "resolution", "fit_failed_fraction"}`` or ``{"error": why}``."""
    from minigd.study.analysis import _Cells, _interval, _select

    tuned = sorted(r["batch_size"] for r in per_batch if r.get("reached") and r.get("lr_tuned") is True)
    finite = b_crit is not None and math.isfinite(b_crit) and b_crit > 0
    if b_crit is not None and math.isinf(b_crit):
        below = tuned
    else:
        below = [B for B in tuned if finite and B < b_crit]
    if len(below) >= 3:
        use = below
        scope = f"below B_crit ≈ {fmt_num(b_crit)}" if finite else "every tuned batch size (B_crit unbounded)"
    elif len(tuned) >= 2:
        use = tuned
        scope = (
            "every tuned batch size: no B_crit was fitted"
            if b_crit is None
            else f"every tuned batch size: fewer than 3 lie below B_crit ≈ {fmt_num(b_crit)}"
        )
    else:
        return {
            "error": f"{len(tuned)} batch size(s) reached the target with a tuned learning rate (2 needed)",
            "tuned_batch_sizes": tuned,
        }
    keep = set(use)
    sub = sorted([(c, r) for c, r in items if int(c.batch_size) in keep], key=lambda cr: cr[0].key)
    cells = _Cells(sub)
    x = np.log(cells.B_arr)
    pt = _select(cells, cells.medians())
    y_pt = np.log(pt["best_lr"][0])
    alpha_pt = float(_slopes(x, y_pt[None], np.ones((1, len(x)), bool))[0])
    log_lr0 = float(y_pt.mean() - alpha_pt * x.mean())
    rng = np.random.default_rng([int(seed), zlib.crc32(f"{NAME}:{label}".encode())])
    bt = _select(cells, cells.medians(rng, N_BOOT))
    mask = bt["reached"] & (bt["edge"] == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        a_bt = _slopes(x, np.log(bt["best_lr"]), mask)
    iv = _interval(alpha_pt, a_bt)
    return {
        "alpha": {k: iv[k] for k in ("value", "lo", "hi")},
        "log_lr0": log_lr0,
        "batch_sizes": [int(B) for B in cells.Bs],
        "best_lrs": [float(v) for v in pt["best_lr"][0]],
        "tuned_batch_sizes": tuned,
        "scope": scope,
        "b_crit": b_crit if finite or b_crit is None else None,
        "resolution": resolution(cells.Bs),
        "seeds": len(cells.seeds),
        "fit_failed_fraction": float(np.mean(np.isnan(a_bt))),
    }


def verdict(iv) -> str:
    eps = 1e-9  # a slope of exactly 1 comes out of the fit as 0.9999999999999999
    lo, hi = iv["lo"] - eps, iv["hi"] + eps
    lin, sq = lo <= 1.0 <= hi, lo <= 0.5 <= hi
    if lin and sq:
        return (
            "consistent with both the square-root rule (α = ½, Hoffer et al. 2017) and the linear rule "
            "(α = 1, Goyal et al. 2017): neither is excluded"
        )
    if lin:
        return (
            "consistent with the linear rule (α = 1, Goyal et al. 2017), and the square-root rule "
            "(α = ½, Hoffer et al. 2017) is excluded"
        )
    if sq:
        return (
            "consistent with the square-root rule (α = ½, Hoffer et al. 2017), and the linear rule "
            "(α = 1, Goyal et al. 2017) is excluded"
        )
    if lo > 1.0:
        return "steeper than the linear rule (α = 1): both rules are excluded"
    if hi < 0.5:
        return "flatter than the square-root rule (α = ½): both rules are excluded"
    return "between the square-root (α = ½) and the linear rule (α = 1), both excluded"


def _arch_items(rows, key):
    from minigd.study.analysis import _arch_key_of

    return [(c, r) for c, r in rows if r.get("status") == "ok" and _arch_key_of(c) == key]


def answer(ctx, rows) -> dict:
    from minigd.study.analysis import analyze

    from . import unanswered

    main_opt, other = ctx.spec.optimizer, _other(ctx)
    fits = {}
    a = arch0(ctx)
    if a is None:
        fits[main_opt] = {"error": "the batch-size study has no successful trials"}
    elif a.get("b_crit_tuning") != "tuned":
        fits[main_opt] = {
            "error": f"the study's learning rates were not tuned per batch size ({a.get('b_crit_tuning')})"
        }
    else:
        key = (tuple(a["sizes"]), a["activation"], a["optimizer"], a.get("norm") or "")
        bc = (a.get("headline") or {}).get("critical_batch_size_fit") or {}
        fits[main_opt] = fit_alpha(_arch_items(ctx.main_rows, key), a["per_batch"], bc.get("value"), ctx.seed, main_opt)
        fits[main_opt]["b_crit_interval"] = {k: bc.get(k) for k in ("value", "lo", "hi")}
        fits[main_opt]["per_batch"] = [
            {
                "batch_size": r["batch_size"],
                "best_lr": r["best_lr"],
                "best_lr_interval": (r.get("intervals") or {}).get("best_lr"),
                "reached": r["reached"],
                "lr_tuned": r["lr_tuned"],
            }
            for r in a["per_batch"]
        ]
    ok_rows = [(c, r) for c, r in rows if r.get("status") == "ok"]
    if not ok_rows:
        fits[other] = {"error": "the sub-sweep has no successful trials"}
    else:
        oa = analyze(ok_rows, seed=ctx.seed, n_boot=N_BOOT)["architectures"][0]
        obc = (oa.get("headline") or {}).get("critical_batch_size_fit") or {}
        own = obc.get("value")
        src = "its own trade-off fit"
        if own is None:
            own = (((a or {}).get("headline") or {}).get("critical_batch_size_fit") or {}).get("value")
            src = "the study's (its own trade-off fit failed)"
        key = (tuple(oa["sizes"]), oa["activation"], oa["optimizer"], oa.get("norm") or "")
        fits[other] = fit_alpha(_arch_items(ok_rows, key), oa["per_batch"], own, ctx.seed, other)
        fits[other]["b_crit_source"] = src
        fits[other]["b_crit_interval"] = (
            {k: obc.get(k) for k in ("value", "lo", "hi")} if obc.get("value") is not None else None
        )
        fits[other]["per_batch"] = [
            {
                "batch_size": r["batch_size"],
                "best_lr": r["best_lr"],
                "best_lr_interval": (r.get("intervals") or {}).get("best_lr"),
                "lrs_tried": r["lrs_tried"],
                "reached": r["reached"],
                "lr_tuned": r["lr_tuned"],
            }
            for r in oa["per_batch"]
        ]
    good = [o for o in (main_opt, other) if "alpha" in fits[o]]
    if not good:
        return unanswered(
            NAME,
            "; ".join(f"{_opt_words(ctx, o)}: {fits[o]['error']}" for o in (main_opt, other)),
            details={"fits": fits},
        )

    def sentence(o):
        f = fits[o]
        if "alpha" not in f:
            return f"For {_opt_words(ctx, o)} it was not measured ({f['error']})"
        iv = f["alpha"]
        Bs = f["batch_sizes"]
        edge = ""
        if f["fit_failed_fraction"] > 0.1:
            edge = f"; the fit failed in {100 * f['fit_failed_fraction']:.0f}% of the resamples"
        return (
            f"For {_opt_words(ctx, o)} the best learning rate grows as "
            f"B^{iv['value']:.2f} [{iv['lo']:.2f}, {iv['hi']:.2f}] over B = {Bs[0]}–{Bs[-1]} "
            f"({len(Bs)} batch sizes, {f['scope']}{'' if o == main_opt else ', ' + f.get('b_crit_source', '')}"
            f"{edge}): {verdict(iv)}"
        )

    order = [main_opt, other]
    res = " and ".join(f"{fits[o]['resolution']:.2f} for {_opt_words(ctx, o)}" for o in order if "alpha" in fits[o])
    text = (
        sentence(order[0])
        + ". "
        + sentence(order[1])
        + f". The learning rates tried are factors of 2 apart, so α's resolution is limited: one grid step at "
        f"an end of the range moves it by {res}; intervals are 90% bootstrap intervals over the seeds."
    )
    head_o = main_opt if "alpha" in fits[main_opt] else other
    h = fits[head_o]["alpha"]
    _plot(ctx, fits, order)
    other_desc = (
        f"{_opt_words(ctx, other)} sub-sweep: B in {[B for B in OTHER_BATCH_SIZES if B < ctx.n_train]}, "
        f"learning rates {', '.join(f'{f:g}' for f in LR_FACTORS)} x "
        + (f"{ADAM_LR:g}·sqrt(B/32)" if other == "adam" else f"{ctx.spec.base_lr:g}·sqrt(B/{ctx.spec.base_batch_size})")
        + f" (extended past an edge up to {EXTEND} factors of 2), {N_SEEDS} seeds, stopping at the target"
    )
    return {
        "name": NAME,
        "question": QUESTION,
        "answer": text,
        "value": h["value"],
        "lo": h["lo"],
        "hi": h["hi"],
        "unit": f"exponent α of best LR ∝ B^α ({_opt_words(ctx, head_o)})",
        "conditions": ctx.conditions(
            f"{_opt_words(ctx, main_opt)}: the study's tuned learning rates; "
            f"{other_desc}; {N_BOOT} bootstrap resamples of the seeds"
        ),
        "plot": f"q_{NAME}.png" if ctx.report_dir else None,
        "details": {"fits": fits, "rules": {"linear": 1.0, "square_root": 0.5}, "headline_optimizer": head_o},
    }


def _plot(ctx, fits, order):
    path = ctx.plot_path(NAME)
    if not path:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {order[0]: "tab:blue", order[1]: "tab:orange"}
    fig, ax = plt.subplots(figsize=(8.5, 6))
    ref_done = False
    for o in order:
        f = fits[o]
        rows = f.get("per_batch") or []
        if not rows:
            continue
        c = colors[o]
        used = set(f.get("batch_sizes") or [])
        B = np.array([r["batch_size"] for r in rows], float)
        lr = np.array([r["best_lr"] for r in rows], float)
        ivs = [r.get("best_lr_interval") or {} for r in rows]
        lo = np.array([iv.get("lo") if iv.get("lo") is not None else v for iv, v in zip(ivs, lr)], float)
        hi = np.array([iv.get("hi") if iv.get("hi") is not None else v for iv, v in zip(ivs, lr)], float)
        inn = np.array([b in used for b in B])
        err = np.array([np.clip(lr - lo, 0, None), np.clip(hi - lr, 0, None)])
        name = _opt_words(ctx, o)
        ax.errorbar(
            B[inn],
            lr[inn],
            yerr=err[:, inn],
            fmt="o",
            color=c,
            capsize=2,
            ms=6,
            label=f"{name}: best LR (in the fit; 90% interval)",
        )
        if (~inn).any():
            ax.errorbar(
                B[~inn],
                lr[~inn],
                yerr=err[:, ~inn],
                fmt="o",
                mfc="none",
                color=c,
                capsize=2,
                ms=6,
                label=f"{name}: not in the fit (B ≥ B_crit or LR not tuned)",
            )
        if "alpha" in f:
            Bs = np.array(f["batch_sizes"], float)
            xs = np.geomspace(Bs.min(), Bs.max(), 50)
            al = f["alpha"]
            ax.plot(
                xs,
                np.exp(f["log_lr0"]) * xs ** al["value"],
                "-",
                color=c,
                lw=2,
                label=f"{name}: fit α = {al['value']:.2f} [{al['lo']:.2f}, {al['hi']:.2f}]",
            )
            xm = float(np.exp(np.log(Bs).mean()))
            ym = float(np.exp(f["log_lr0"]) * xm ** al["value"])
            for slope, style, lab in ((1.0, "--", "linear rule (α = 1)"), (0.5, ":", "square-root rule (α = ½)")):
                ax.plot(
                    xs,
                    ym * (xs / xm) ** slope,
                    style,
                    color="0.35",
                    lw=1.1,
                    label=None if ref_done else f"{lab}, through each fit's centre",
                )
            ref_done = True
        bc = f.get("b_crit")
        if bc is not None and math.isfinite(bc) and bc > 0:
            ax.axvline(bc, color=c, lw=0.9, alpha=0.6, ls="-.")
            ax.annotate(
                f"{_opt_words(ctx, o)}: B_crit ≈ {fmt_num(bc)}",
                (bc, 0.02 if o == order[0] else 0.98),
                xycoords=("data", "axes fraction"),
                rotation=90,
                fontsize=7,
                color=c,
                ha="right",
                va="bottom" if o == order[0] else "top",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B (examples, log scale)")
    ax.set_ylabel("best learning rate (log scale)")
    ax.set_title("Best learning rate vs batch size: linear or square-root scaling?")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=7.5, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
