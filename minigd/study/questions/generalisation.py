"""Do large batches generalise worse at the same number of epochs?  Does ghost batch norm
close the gap?

The experiment: batch sizes 8, 32, 128, ... (factors of 4, below the training-set size) and
the full batch, each trained for the same number of epochs (``stop_at_target=False``,
``min_steps=0``: the full batch gets one step an epoch, batch 8 gets N/8), with the
learning rate tuned per batch size over :data:`LR_FACTORS` x the main study's best rate at
that batch size (or the square-root rule from its nearest batch size), :data:`N_SEEDS`
seeds; three models: the study's plain MLP, the same with ghost batch norm (batch norm
before the activation, statistics over ghost batches of :data:`GHOST` rows inside the
larger batches; batches of at most :data:`GHOST` rows use the whole batch) and with dropout
:data:`DROPOUT`.  Per model and batch size: the final validation metric at the best rate
and the generalisation gap (train minus validation accuracy, or validation minus train
loss) at that rate, medians over seeds, with 90% intervals from the seed bootstrap of
:func:`~minigd.study.questions.width_one.tuned_bootstrap` (seeds resampled jointly across
every cell, the best rate re-selected in each resample).  The headline: the final
validation metric of the largest batch minus that of the smallest (plain model), paired
over the resampled seeds.

The literature: Keskar et al. 2017 (arXiv:1609.04836) find that large batches tend to sharp
minimisers that generalise worse; Masters & Luschi 2018 (arXiv:1804.07612) find the best
test results at batch sizes 2-32; Hoffer et al. 2017 (arXiv:1705.08741) trace the gap to
too few updates ("train longer") and close it with ghost batch norm; Shallue et al. 2018
(arXiv:1811.03600) find no evidence that large batches generalise worse once the learning
rate (and the budget) are tuned per batch size.
"""

from __future__ import annotations

import math

from .width_one import (
    N_BOOT,
    arm_seeds,
    center_lr,
    epochs,
    fmt_metric,
    interval,
    metric_of,
    tuned_bootstrap,
)

NAME = "generalisation"
QUESTION = "Do large batches generalise worse at the same number of epochs? Does ghost batch norm close the gap?"
#: multiples of the centre learning rate tried per batch size, per model: the centre (the main
#: study's best rate for steps to its target) is on the high side for the final metric of a
#: run without decay, and batch norm takes larger rates than the plain model
LR_FACTORS = {
    "plain": (0.125, 0.25, 0.5, 1.0, 2.0),
    "ghost BN": (0.25, 0.5, 1.0, 2.0, 4.0),
    "dropout": (0.125, 0.25, 0.5, 1.0, 2.0),
}
SMALLEST = 8  # the smallest batch size (Masters & Luschi's 2-32)
GROWTH = 4  # batch sizes SMALLEST * GROWTH**k below the training-set size, then full
GHOST = 16  # rows per ghost batch
DROPOUT = 0.1
N_SEEDS = 3
VARIANTS = ("plain", "ghost BN", "dropout")
LITERATURE = (
    "Keskar et al. 2017 (arXiv:1609.04836) tie large batches to sharp minima that generalise worse; "
    "Masters & Luschi 2018 (arXiv:1804.07612) find the best results at batch 2-32; Hoffer et al. 2017 "
    "(arXiv:1705.08741) trace the gap to too few updates and close it with ghost batch norm and "
    "longer training; Shallue et al. 2018 (arXiv:1811.03600) find no evidence of a gap once "
    "the learning rate and budget are tuned per batch size"
)


def batch_sizes(n: int) -> list:
    out, b = [], SMALLEST
    while b < n:
        out.append(b)
        b *= GROWTH
    return out + [n]


def _variant_kwargs(variant: str, B: int, n: int):
    """The TrialConfig changes of a model variant at batch size B, or None where batch norm
    cannot run (a ghost batch of 1 row)."""
    if variant == "plain":
        return {}
    if variant == "dropout":
        return {"dropout": DROPOUT}
    from minigd.backends.base import NormSpec

    g = GHOST if B > GHOST else None
    spec = NormSpec(bn=1, ghost=g)
    try:
        spec.check_batch(B)
    except ValueError:
        return None
    return {"batch_norm": True, "ghost_batch_size": g, "drop_last": spec.drops_last(n, B)}


def plan(ctx) -> list:
    n = ctx.n_train
    out = []
    for variant in VARIANTS:
        for B in batch_sizes(n):
            kw = _variant_kwargs(variant, B, n)
            if kw is None:
                continue
            lr0 = center_lr(ctx, B)
            for f in LR_FACTORS[variant]:
                for sd in arm_seeds(ctx):
                    out.append(
                        ctx.base_config(
                            batch_size=B,
                            full_batch=B == n,
                            lr=float(lr0 * f),
                            seed=int(sd),
                            max_epochs=epochs(ctx),
                            min_steps=0,
                            stop_at_target=False,
                            **kw,
                        )
                    )
    return out


def _variant_of(cfg) -> str:
    if cfg.batch_norm not in (False, None):
        return "ghost BN"
    return "dropout" if cfg.dropout else "plain"


def answer(ctx, rows) -> dict:
    from . import unanswered

    n = ctx.n_train
    metric, higher = metric_of(ctx)
    gap_field = f"gen_gap_{metric}"
    seeds = arm_seeds(ctx)
    ok = [(c, r) for c, r in rows if r.get("status") == "ok"]
    if not ok:
        return unanswered(NAME, "none of the equal-epoch trials succeeded")
    sel = tuned_bootstrap(
        ok,
        lambda c: (_variant_of(c), int(c.batch_size)),
        seeds,
        metric=metric,
        higher=higher,
        extras=(gap_field, "steps"),
        seed=ctx.seed,
        salt=NAME,
    )
    scale = 100.0 if metric == "accuracy" else -1.0
    gscale = 100.0 if metric == "accuracy" else 1.0
    table = {}
    for (v, B), e in sel.items():
        table.setdefault(v, {})[B] = e
    plain = {B: e for B, e in table.get("plain", {}).items() if math.isfinite(e["value"])}
    if len(plain) < 2:
        return unanswered(NAME, "fewer than two batch sizes of the plain model finished with a finite metric")
    b_small, b_large = min(plain), max(plain)

    def gap(v):
        """(largest - smallest) of variant v, oriented (< 0: the large batch is worse), its
        samples, and the interval in display units."""
        t = table.get(v, {})
        ok_b = [B for B in t if math.isfinite(t[B]["value"])]
        if len(ok_b) < 2:
            return None
        s, l = min(ok_b), max(ok_b)
        val, samp = t[l]["value"] - t[s]["value"], t[l]["samples"] - t[s]["samples"]
        return {"small": s, "large": l, "value": val, "samples": samp, "iv": interval(val, samp, abs(scale))}

    gaps = {v: gap(v) for v in VARIANTS}
    g0 = gaps["plain"]
    iv0 = g0["iv"]
    display = lambda iv: (
        iv
        if metric == "accuracy"
        else {  # a loss: large - small in loss, > 0 worse
            "value": None if iv["value"] is None else -iv["value"],
            "lo": None if iv["hi"] is None else -iv["hi"],
            "hi": None if iv["lo"] is None else -iv["lo"],
        }
    )
    head = display(iv0)
    worse = iv0["hi"] is not None and iv0["hi"] < 0
    better = iv0["lo"] is not None and iv0["lo"] > 0

    def signed(iv):
        d = display(iv)
        if metric == "accuracy":
            return f"{d['value']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}] percentage points"
        return f"{d['value']:+.3g} [{d['lo']:+.3g}, {d['hi']:+.3g}] in validation loss"

    ivs = {(v, B): interval(e["value"], e["samples"], scale) for (v, B), e in sel.items()}
    gap_ivs = {(v, B): interval(e[gap_field], e[gap_field + "_samples"], gscale) for (v, B), e in sel.items()}
    steps = {B: e["steps"] for B, e in plain.items()}
    lb = lambda B: f"{B} (full batch)" if B == n else str(B)
    gw = "train − validation accuracy" if metric == "accuracy" else "validation − train loss"
    what = "validation accuracy" if metric == "accuracy" else "validation loss"
    fmt_gap = lambda d: (
        "not measured"
        if d["value"] is None
        else (
            f"{d['value']:.1f} [{d['lo']:.1f}, {d['hi']:.1f}] points"
            if metric == "accuracy"
            else f"{d['value']:.3g} [{d['lo']:.3g}, {d['hi']:.3g}]"
        )
    )
    yes = (
        "Yes, here"
        if worse
        else "No, here the opposite"
        if better
        else "Not measurably here (the interval includes no difference)"
    )
    verdict = (
        f"{yes}: at {epochs(ctx)} epochs, with the learning rate tuned per batch size, batch {lb(b_large)} "
        f"ends at {fmt_metric(ivs[('plain', b_large)], metric)} {what} against "
        f"{fmt_metric(ivs[('plain', b_small)], metric)} at batch {b_small}, a difference of {signed(iv0)} "
        f"({steps.get(b_large, 0):,.0f} steps against {steps.get(b_small, 0):,.0f}); the generalisation "
        f"gap ({gw}) is {fmt_gap(gap_ivs[('plain', b_large)])} against "
        f"{fmt_gap(gap_ivs[('plain', b_small)])}"
    )

    def closes(v):
        """How variant v's own (largest - smallest) difference compares with the plain model's."""
        g = gaps.get(v)
        name = f"ghost batch norm ({GHOST} rows)" if v == "ghost BN" else f"dropout {DROPOUT:g}"
        if g is None:
            return None, f"{name}: not measured"
        change = interval(g["value"] - g0["value"], g["samples"] - g0["samples"], abs(scale))
        if not worse:
            word = "has no gap to close"
        elif g["iv"]["hi"] is not None and g["iv"]["hi"] >= 0:
            word = "closes the gap (its interval includes no difference)"
        elif change["lo"] is not None and change["lo"] > 0:
            word = "narrows the gap but does not close it"
        else:
            word = "does not close the gap"
        big = ivs.get((v, g["large"]), {})
        return (
            {
                "difference": display(g["iv"]),
                "largest": big,
                "smallest": ivs.get((v, g["small"])),
                "change_vs_plain": display(change),
                "verdict": word,
            },
            (
                f"{name} {word}: with it batch {lb(g['large'])} ends at {fmt_metric(big, metric)}, "
                f"{signed(g['iv'])} from its batch {g['small']}"
            ),
        )

    bn, bn_text = closes("ghost BN")
    do, do_text = closes("dropout")
    text = verdict + ". " + bn_text[0].upper() + bn_text[1:] + "; " + do_text + ". Compare: " + LITERATURE + "."
    if GHOST >= b_large:
        text += f" (Every batch here is at most {GHOST} rows, so ghost batch norm is plain batch norm.)"
    head_edges = [
        f"batch {B} ({table['plain'][B]['best_lr']:.3g}, the "
        f"{'smallest' if table['plain'][B]['lr_edge'] == 'low' else 'largest'} tried)"
        for B in (b_small, b_large)
        if table["plain"][B]["lr_edge"]
    ]
    if head_edges:
        text += (
            " Note: the plain model's best learning rate lies at the edge of the rates tried at "
            + " and ".join(head_edges)
            + ", so that batch size may do a little better outside them."
        )
    plot = _plot(ctx, table, ivs, gap_ivs, metric, gw)
    per_batch = []
    for v in VARIANTS:
        for B in sorted(table.get(v, {})):
            e = table[v][B]
            per_batch.append(
                {
                    "variant": v,
                    "batch_size": B,
                    "metric": ivs[(v, B)],
                    "gen_gap": gap_ivs[(v, B)],
                    "steps": e["steps"],
                    "best_lr": e["best_lr"],
                    "lrs_tried": e["lrs"],
                    "lr_edge": e["lr_edge"],
                }
            )
    budget = (
        f"batch sizes {', '.join(lb(B) for B in batch_sizes(n))}; {epochs(ctx)} epochs per trial (no "
        f"early stop); learning rate tuned per batch size and model over "
        f"{_factors('plain')} (ghost batch norm: {_factors('ghost BN')}) x the main study's best rate at that "
        f"batch size; "
        f"{len(seeds)} seeds; ghost batch norm: batch norm before the activation over ghost batches of "
        f"{GHOST}; dropout {DROPOUT:g}; final validation metric at the best rate (median over seeds), 90% "
        f"bootstrap intervals over seeds ({N_BOOT} resamples, best rate re-selected in each)"
    )
    edges = [
        f"{r['variant']} at batch {r['batch_size']}: best learning rate at the "
        f"{'smallest' if r['lr_edge'] == 'low' else 'largest'} tried"
        for r in per_batch
        if r["lr_edge"]
    ]
    return {
        "name": NAME,
        "question": QUESTION,
        "answer": text,
        **head,
        "unit": (
            "percentage points of validation accuracy (largest − smallest batch, plain model)"
            if metric == "accuracy"
            else "validation loss (largest − smallest batch, plain model)"
        ),
        "conditions": ctx.conditions(budget),
        "plot": plot,
        "details": {
            "metric": f"final_val_{metric}",
            "gen_gap": gap_field,
            "epochs": epochs(ctx),
            "batch_sizes": batch_sizes(n),
            "smallest": b_small,
            "largest": b_large,
            "large_batch_worse": bool(worse),
            "large_batch_better": bool(better),
            "ghost_batch_size": GHOST,
            "dropout": DROPOUT,
            "seeds": list(seeds),
            "lr_factors": {v: list(f) for v, f in LR_FACTORS.items()},
            "ghost_bn": bn,
            "dropout_model": do,
            "lr_at_grid_edge": edges,
            "literature": LITERATURE,
            "per_batch": per_batch,
        },
    }


def _factors(v) -> str:
    return ", ".join(f"{f:g}" for f in LR_FACTORS[v])


def _plot(ctx, table, ivs, gap_ivs, metric, gw):
    path = ctx.plot_path(NAME)
    if path is None:
        return None
    import os

    from minigd._plotting import pyplot as _pyplot
    from minigd._plotting import save_png as _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    colours = {"plain": "#1f77b4", "ghost BN": "#ff7f0e", "dropout": "#2ca02c"}
    labels = {"plain": "plain MLP", "ghost BN": f"ghost batch norm ({GHOST} rows)", "dropout": f"dropout {DROPOUT:g}"}
    shift = {"plain": 1.0, "ghost BN": 1.06, "dropout": 0.94}  # side by side, not on top of each other
    allB = sorted({B for t in table.values() for B in t})
    for ax, d, ylabel in (
        (axes[0], ivs, "final validation accuracy (%)" if metric == "accuracy" else "final validation loss"),
        (axes[1], gap_ivs, f"{gw}{' (points)' if metric == 'accuracy' else ''}"),
    ):
        for v in VARIANTS:
            Bs = [B for B in sorted(table.get(v, {})) if d[(v, B)]["value"] is not None]
            if not Bs:
                continue
            y = [d[(v, B)]["value"] for B in Bs]
            lo = [y_ - (d[(v, B)]["lo"] if d[(v, B)]["lo"] is not None else y_) for y_, B in zip(y, Bs)]
            hi = [(d[(v, B)]["hi"] if d[(v, B)]["hi"] is not None else y_) - y_ for y_, B in zip(y, Bs)]
            ax.errorbar(
                [B * shift[v] for B in Bs], y, yerr=[lo, hi], fmt="o-", capsize=3, color=colours[v], label=labels[v]
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(allB)
        ax.set_xticklabels([f"{B}\n(full)" if B == ctx.n_train else str(B) for B in allB])
        ax.set_xlabel("batch size (examples, log2 scale)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"Final validation {'accuracy' if metric == 'accuracy' else 'loss'} after {epochs(ctx)} epochs")
    axes[1].set_title("Generalisation gap at the same budget")
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle("Equal epochs, learning rate tuned per batch size (90% intervals over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _save(fig, path, "minigd question: generalisation")
    return os.path.basename(path)
