"""Figures of a batch-size study, drawn from the output of :func:`minigd.study.analysis.analyze`.

Every figure is one PNG file drawn with matplotlib's Agg backend (no display needed).  Every
plotting function tolerates missing data: where a figure's data are absent (``None``,
``NaN``, an empty sweep) it writes a small placeholder figure saying ``not enough data: ...``
instead, and a figure that fails for any other reason is replaced by a placeholder naming
the error, so a report is always complete.  Files are written atomically (a temporary file
in the same directory, then :func:`os.replace`), so a reader never sees half a PNG.

Conventions: batch size on a log2 axis; with several architectures in the analysis, one
series (one colour) per architecture.  Error bars are the analysis's 90% bootstrap
intervals.  A batch size that did not reach the target is drawn apart (a hollow triangle
along the top of the axes, its own legend entry); one whose best learning rate was at the
edge of those tried ("LR not tuned", left out of the trade-off fit) as a hollow square.

A study with the adaptive arm (``fit(batch_size="adaptive")``, :mod:`minigd.study._adaptive`)
shows it as one more line where it has a value: a horizontal line (and its 90% band) in
the time-to-target figure, its noise-scale curve in the noise figure, and its own figure,
:data:`ADAPTIVE_PLOT` (the batch size and learning-rate factor the controller chose over
the steps, and its learning curves beside the recommended batch size's).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from ._fields import (
    _batch_range,
    _err,
    _pos,
    _series,
    _series_any,
    _thresholds,
    adaptive_label,
    adaptive_of,
    arch_label,
    architectures,
    b_crit_label,
    b_crit_of,
    b_simple_of,
    fnum,
    rows_of,
    target_words,
    uses_accuracy,
)
from ._figure import (
    _arch_prefix,
    _colours,
    _fig_legend,
    _log2_batch_axis,
    _log_y,
    _mark_apart,
    _pyplot,
    _save,
    _shade_regimes,
    _side_legend,
    _subplots,
    _suptitle,
)

#: file names of the figures, in the order they are drawn
PLOT_FILES = (
    "steps_examples.png",
    "time_to_target.png",
    "generalization.png",
    "best_lr.png",
    "throughput_memory.png",
    "noise_scale.png",
)
#: the adaptive arm's figure, drawn (after :data:`PLOT_FILES`) when the analysis has one
ADAPTIVE_PLOT = "adaptive_batch_size.png"


class NotEnoughData(Exception):
    """A figure's data are missing: a placeholder is drawn with this message."""


@dataclass(frozen=True)
class PlotResult:
    """One figure written: its name, path, and why it is a placeholder (``None`` if it is not)."""

    name: str
    path: str
    placeholder: str | None = None


# --------------------------------------------------------------------------- figures


def _in_range(v, lo, hi):
    return v is not None and lo is not None and lo <= v <= hi


def _fmt_g(v):
    if v is None:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def plot_placeholder(path, message: str, title: str = "") -> None:
    """A small figure saying ``message`` (a plot whose data are missing)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=11)
    ax.text(
        0.5,
        0.5,
        "\n".join(_wrap(message, 70)),
        ha="center",
        va="center",
        fontsize=10,
        transform=ax.transAxes,
        bbox={"boxstyle": "round", "facecolor": "#f3f3f3", "edgecolor": "#999999"},
    )
    _save(fig, path, f"placeholder: {message}")


def _wrap(text, width):
    import textwrap

    out = []
    for line in str(text).splitlines() or [""]:
        out += textwrap.wrap(line, width) or [""]
    return out[:8]


def plot_steps_examples(analysis, path) -> None:
    """Steps and examples to target vs batch size (log-log), with the fitted trade-off
    S = S_min(1 + B_crit/B), E = E_min(1 + B/B_crit), B_crit (fit) and B_simple (noise
    scale mid-training) marked, and the regimes shaded."""
    archs = architectures(analysis)
    if not any(_series(a, "steps_to_target")[0] for a in archs):
        raise NotEnoughData("no batch size reached the target, so there are no steps or examples to plot")
    extra = [v for a in archs for v in (b_crit_of(a), b_simple_of(a))]
    lo, hi = _batch_range(archs, extra)
    fig, (ax_s, ax_e) = _subplots(1, 2, figsize=(12, 5.6))
    colours = _colours(len(archs))
    shaded = False
    import numpy as np

    grid = np.geomspace(lo, hi, 200)
    for colour, arch in zip(colours, archs):
        pre = _arch_prefix(archs, arch)
        bc, bs = b_crit_of(arch), b_simple_of(arch)
        if not shaded and bc is not None:
            for ax in (ax_s, ax_e):
                _shade_regimes(ax, bc, lo, hi, label=ax is ax_s, prefix=pre)
            shaded = True
        fit = arch.get("tradeoff_fit") if isinstance(arch.get("tradeoff_fit"), dict) else {}
        s_min, e_min = _pos(fit.get("s_min")), _pos(fit.get("e_min"))
        for ax, key, fmin, curve in (
            (ax_s, "steps_to_target", s_min, lambda b, m=s_min: m * (1 + bc / b) if m else None),
            (ax_e, "examples_to_target", e_min, lambda b, m=e_min: m * (1 + b / bc) if m else None),
        ):
            xs, ys = _series(arch, key)
            if xs:
                edge = {float(r["batch_size"]) for r in rows_of(arch) if r.get("lr_edge")}
                pts_in = [(x, y) for x, y in zip(xs, ys) if x not in edge]
                pts_out = [(x, y) for x, y in zip(xs, ys) if x in edge]
                if pts_in:
                    px, py = zip(*pts_in)
                    ax.errorbar(
                        px,
                        py,
                        yerr=_err(arch, key, px),
                        fmt="o",
                        color=colour,
                        ms=6,
                        capsize=2,
                        elinewidth=1,
                        label=f"{pre}measured (median over seeds, 90% interval)",
                    )
                if pts_out:
                    px, py = zip(*pts_out)
                    ax.errorbar(
                        px,
                        py,
                        yerr=_err(arch, key, px),
                        fmt="s",
                        color=colour,
                        mfc="none",
                        ms=7,
                        capsize=2,
                        elinewidth=1,
                        label=f"{pre}LR not tuned (best at the edge; out of the fit)",
                    )
                _mark_apart(ax, arch, colour, pre, ys)
                for r in rows_of(arch):
                    v = _pos(r.get(key))
                    if r.get("full_batch") and v is not None:
                        ax.annotate(
                            "full",
                            (float(r["batch_size"]), v),
                            textcoords="offset points",
                            xytext=(4, 4),
                            fontsize=7,
                            color=colour,
                        )
            if bc is not None and fmin is not None:
                name = "S_min(1 + B_crit/B)" if ax is ax_s else "E_min(1 + B/B_crit)"
                ax.plot(grid, curve(grid), "-", color=colour, lw=1.5, alpha=0.85, label=f"{pre}fit {name}")
                ax.axhline(fmin, color=colour, ls=(0, (1, 3)), lw=0.8, alpha=0.7)
            if _in_range(bc, lo, hi):
                ax.axvline(bc, color=colour, ls="--", lw=1.2, label=f"{pre}{b_crit_label(arch)} ≈ {_fmt_g(bc)}")
                iv = (arch.get("headline") or {}).get("critical_batch_size_fit") or {}
                a, b = _pos(iv.get("lo")), _pos(iv.get("hi"))
                if a is not None and b is not None and b > a:
                    ax.axvspan(
                        max(a, lo),
                        min(b, hi),
                        color=colour,
                        alpha=0.08,
                        lw=0,
                        label=f"{pre}B_crit 90% interval" if ax is ax_s else None,
                    )
            if _in_range(bs, lo, hi):
                ax.axvline(
                    bs, color=colour, ls=":", lw=1.6, label=f"{pre}B_simple (noise scale, mid-training) ≈ {_fmt_g(bs)}"
                )
    for ax, what in (
        (ax_s, "steps to target (optimizer steps, log scale)"),
        (ax_e, "examples to target (training examples, log scale)"),
    ):
        _log2_batch_axis(ax, lo, hi)
        _log_y(ax)
        ax.set_ylabel(what)
    ax_s.set_title("steps to target")
    ax_e.set_title("examples to target")
    _fig_legend(fig, (ax_s, ax_e))
    target = target_words(archs[0]) if archs else "target"
    _suptitle(fig, f"Steps and examples to {target} vs batch size (McCandlish et al. 2018 trade-off)", archs)
    _save(fig, path, "steps and examples to target vs batch size")


def plot_time_to_target(analysis, path) -> None:
    """Wall time to target vs batch size (log-log); the fastest and the smallest reasonable
    batch size marked, with the 'reasonable' threshold (a factor of the fastest time)."""
    archs = architectures(analysis)
    if not any(_series(a, "time_to_target")[0] for a in archs):
        raise NotEnoughData("no batch size reached the target, so there is no time to target to plot")
    _, _, factor = _thresholds()
    lo, hi = _batch_range(archs)
    fig, ax = _subplots(figsize=(8, 5.8))
    for colour, arch in zip(_colours(len(archs)), archs):
        pre = _arch_prefix(archs, arch)
        xs, ys = _series(arch, "time_to_target")
        if not xs:
            continue
        ax.errorbar(
            xs,
            ys,
            yerr=_err(arch, "time_to_target", xs),
            fmt="o-",
            color=colour,
            ms=5,
            lw=1.2,
            capsize=2,
            elinewidth=1,
            label=f"{pre}steps to target × step time (90% interval)",
        )
        in_trial = [
            (x, y)
            for x, y in zip(xs, ys)
            if next((r.get("timing") for r in rows_of(arch) if float(r["batch_size"]) == x), None) == "in-trial"
        ]
        if in_trial and len(in_trial) < len(xs):
            px, py = zip(*in_trial)
            ax.plot(
                px,
                py,
                "D",
                ms=8,
                mfc="none",
                mec=colour,
                mew=1.2,
                ls="none",
                label=f"{pre}step time from the trials (no probe)",
            )
        _mark_apart(ax, arch, colour, pre, ys)
        by_b = dict(zip(xs, ys))
        ans = arch.get("answers") or {}
        fb, rb = _pos(ans.get("fastest_wall_time")), _pos(ans.get("smallest_reasonable"))
        wins = ((arch.get("headline") or {}).get("fastest_wall_time") or {}).get("wins")
        if fb in by_b:
            ax.plot(
                [fb],
                [by_b[fb]],
                "*",
                color=colour,
                ms=18,
                mec="black",
                label=f"{pre}fastest: B = {_fmt_g(fb)} ({by_b[fb]:.3g} s"
                + (f"; wins {100 * wins:.0f}% of resamples)" if isinstance(wins, (int, float)) else ")"),
            )
            ax.axhline(
                factor * by_b[fb],
                color=colour,
                ls="--",
                lw=0.9,
                alpha=0.7,
                label=f"{pre}{factor:g} × fastest time (the 'reasonable' bound)",
            )
        if rb in by_b:
            ax.plot(
                [rb],
                [by_b[rb]],
                "o",
                ms=16,
                mfc="none",
                mec=colour,
                mew=2.2,
                label=f"{pre}smallest reasonable: B = {_fmt_g(rb)} ({by_b[rb]:.3g} s)",
            )
        _adaptive_band(ax, arch, colour if len(archs) > 1 else "black", pre)
    _log2_batch_axis(ax, lo, hi)
    _log_y(ax)
    ax.set_ylabel("wall-clock time to target (s, log scale)")
    _fig_legend(fig, (ax,), max_cols=2)
    target = target_words(archs[0]) if archs else "target"
    _suptitle(fig, f"Wall-clock time to {target} vs batch size", archs)
    _save(fig, path, "time to target vs batch size")


def _adaptive_band(ax, arch, colour, pre) -> None:
    """The adaptive run's time to target across the time-to-target figure: a dash-dot line
    with its 90% band, and a dotted line without its one-time set-up."""
    row = adaptive_of(arch)
    t = _pos((row or {}).get("time_to_target"))
    if t is None:
        return
    iv = (row.get("intervals") or {}).get("time_to_target") or {}
    a, b = _pos(iv.get("lo")), _pos(iv.get("hi"))
    vs = row.get("vs_fixed") or {}
    r = fnum(vs.get("value"))
    tail = f"; {r:.2f}× batch {_fmt_g(fnum(vs.get('batch_size')))}" if r is not None else ""
    ax.axhline(t, color=colour, ls="-.", lw=1.6, label=f"{pre}{adaptive_label(row)}: {t:.3g} s{tail}")
    if a is not None and b is not None and b > a:
        ax.axhspan(a, b, color=colour, alpha=0.10, lw=0, label=f"{pre}adaptive: 90% interval")
    loop = _pos(row.get("loop_time_to_target"))
    if loop is not None and abs(loop - t) > 1e-12 * t:
        ax.axhline(
            loop, color=colour, ls=(0, (1, 2)), lw=1.2, label=f"{pre}adaptive without its one-time set-up: {loop:.3g} s"
        )


def plot_generalization(analysis, path) -> None:
    """Final validation metric (accuracy, or loss for regression) and generalisation gap vs
    batch size."""
    archs = architectures(analysis)
    acc = uses_accuracy(archs)
    vkey, gkey = ("final_val_accuracy", "gen_gap_accuracy") if acc else ("final_val_loss", "gen_gap_loss")
    if not any(_series_any(a, vkey)[0] or _series_any(a, gkey)[0] for a in archs):
        raise NotEnoughData("no final validation metric or generalisation gap was measured")
    lo, hi = _batch_range(archs)
    fig, (ax_v, ax_g) = _subplots(1, 2, figsize=(12, 5.4))
    for colour, arch in zip(_colours(len(archs)), archs):
        pre = _arch_prefix(archs, arch)
        xs, ys = _series_any(arch, vkey)
        if xs:
            ax_v.plot(
                xs,
                [100 * y for y in ys] if acc else ys,
                "o-",
                color=colour,
                ms=5,
                label=f"{pre}final validation {'accuracy' if acc else 'loss'}",
            )
        t, metric = fnum(arch.get("target")), str(arch.get("target_metric") or "")
        if t is not None and (("accuracy" in metric) == acc) and "val" in metric:
            ax_v.axhline(
                100 * t if acc else t,
                color=colour,
                ls="--",
                lw=0.9,
                alpha=0.7,
                label=f"{pre}target ({target_words(arch)})",
            )
        xs, ys = _series_any(arch, gkey)
        if xs:
            ax_g.plot(
                xs,
                [100 * y for y in ys] if acc else ys,
                "s-",
                color=colour,
                ms=5,
                label=f"{pre}generalisation gap: {'train − validation accuracy' if acc else 'validation − train loss'}",
            )
    for ax in (ax_v, ax_g):
        _log2_batch_axis(ax, lo, hi)
    ax_g.axhline(0, color="black", lw=0.6)
    ax_v.set_ylabel("final validation accuracy (%)" if acc else "final validation loss (mean per example)")
    ax_g.set_ylabel("train − val accuracy (percentage points)" if acc else "val − train loss (mean per example)")
    ax_v.set_title("validation " + ("accuracy" if acc else "loss") + " at the stopping point (best LR per batch size)")
    ax_g.set_title("generalisation gap at the stopping point")
    _fig_legend(fig, (ax_v, ax_g))
    _suptitle(fig, "Generalisation vs batch size", archs)
    _save(fig, path, "generalisation vs batch size")


def plot_best_lr(analysis, path) -> None:
    """Best learning rate vs batch size (log-log), with the learning rates tried in grey and
    the linear (Goyal et al. 2017) and square-root (Hoffer et al. 2017) scaling rules drawn
    through the best learning rate at the smallest batch size."""
    archs = architectures(analysis)
    if not any(_series(a, "best_lr")[0] for a in archs):
        raise NotEnoughData("no best learning rate was recorded")
    import numpy as np

    lo, hi = _batch_range(archs)
    fig, ax = _subplots(figsize=(8, 5.8))
    grid = np.geomspace(lo, hi, 100)
    tried_label = True
    ys_all = []
    for colour, arch in zip(_colours(len(archs)), archs):
        pre = _arch_prefix(archs, arch)
        for r in rows_of(arch):
            tried = [v for v in (_pos(x) for x in (r.get("lrs_tried") or [])) if v is not None]
            if tried:
                ax.plot(
                    [float(r["batch_size"])] * len(tried),
                    tried,
                    "_",
                    color="0.6",
                    ms=10,
                    mew=1.2,
                    label="learning rates tried" if tried_label else None,
                )
                tried_label = False
                ys_all += tried
        xs, ys = _series(arch, "best_lr")
        if not xs:
            continue
        ys_all += ys
        ax.plot(xs, ys, "o-", color=colour, ms=6, lw=1.4, label=f"{pre}best learning rate (fewest steps)")
        edge = [(float(r["batch_size"]), _pos(r.get("best_lr"))) for r in rows_of(arch) if r.get("lr_edge")]
        edge = [(x, y) for x, y in edge if y is not None]
        if edge:
            ax.plot(
                *zip(*edge),
                "s",
                ms=11,
                mfc="none",
                mec="red",
                mew=1.5,
                ls="none",
                label=f"{pre}LR not tuned (best at the edge of those tried)",
            )
        b0, lr0 = xs[0], ys[0]
        ax.plot(grid, lr0 * grid / b0, "--", color=colour, lw=1, alpha=0.8, label=f"{pre}linear scaling ∝ B")
        ax.plot(grid, lr0 * np.sqrt(grid / b0), ":", color=colour, lw=1.4, alpha=0.9, label=f"{pre}sqrt scaling ∝ √B")
    _log2_batch_axis(ax, lo, hi)
    _log_y(ax)
    if ys_all:
        ax.set_ylim(min(ys_all) / 3, max(ys_all) * 3)
    ax.set_ylabel("learning rate (log scale)")
    _fig_legend(fig, (ax,), max_cols=2)
    _suptitle(fig, "Best learning rate vs batch size (reference lines through the smallest batch)", archs)
    _save(fig, path, "best learning rate vs batch size")


def plot_throughput_memory(analysis, path) -> None:
    """Throughput and goodput (samples/s) vs batch size, and memory (MiB) on a second panel."""
    archs = architectures(analysis)
    has_tp = any(_series(a, "throughput")[0] or _series(a, "goodput")[0] for a in archs)
    has_mem = any(_series(a, "memory_bytes")[0] or _series(a, "workspace_bytes")[0] for a in archs)
    if not (has_tp or has_mem):
        raise NotEnoughData("neither throughput nor memory was measured")
    lo, hi = _batch_range(archs)
    fig, (ax_t, ax_m) = _subplots(1, 2, figsize=(12, 5.6))
    for colour, arch in zip(_colours(len(archs)), archs):
        pre = _arch_prefix(archs, arch)
        xs, ys = _series(arch, "throughput")
        if xs:
            ax_t.plot(xs, ys, "o-", color=colour, ms=5, label=f"{pre}throughput")
        xs, ys = _series(arch, "goodput")
        if xs:
            ax_t.plot(
                xs,
                ys,
                "s--",
                color=colour,
                ms=5,
                alpha=0.85,
                label=f"{pre}goodput = throughput × statistical efficiency",
            )
            best = _pos((arch.get("answers") or {}).get("max_goodput"))
            by_b = dict(zip(xs, ys))
            if best in by_b:
                ax_t.plot(
                    [best],
                    [by_b[best]],
                    "*",
                    color=colour,
                    ms=16,
                    mec="black",
                    label=f"{pre}max goodput: B = {_fmt_g(best)}",
                )
        xs, ys = _series(arch, "memory_bytes")
        if xs:
            ax_m.plot(
                xs,
                [y / 2**20 for y in ys],
                "o-",
                color=colour,
                ms=5,
                label=f"{pre}memory: total (workspace + params, grads, optimizer state)",
            )
        xs, ys = _series(arch, "workspace_bytes")
        if xs:
            ax_m.plot(
                xs, [y / 2**20 for y in ys], "^:", color=colour, ms=5, alpha=0.85, label=f"{pre}memory: workspace"
            )
    log_y = {}
    for ax in (ax_t, ax_m):
        _log2_batch_axis(ax, lo, hi)
        log_y[ax] = bool(ax.lines)
        if log_y[ax]:
            _log_y(ax)
    if not has_tp:
        ax_t.text(
            0.5, 0.5, "not enough data: throughput not measured", ha="center", va="center", transform=ax_t.transAxes
        )
    if not has_mem:
        ax_m.text(0.5, 0.5, "not enough data: memory not measured", ha="center", va="center", transform=ax_m.transAxes)
    ax_t.set_ylabel("samples per second (training examples/s" + (", log scale)" if log_y[ax_t] else ")"))
    ax_m.set_ylabel("memory (MiB" + (", log scale)" if log_y[ax_m] else ")"))
    ax_t.set_title("throughput and goodput (Pollux)")
    ax_m.set_title("memory")
    _fig_legend(fig, (ax_t, ax_m))
    _suptitle(fig, "Hardware efficiency vs batch size", archs)
    _save(fig, path, "throughput, goodput and memory vs batch size")


def _curve_points(curve):
    xs, ys = [], []
    for p in curve or []:
        if not isinstance(p, dict):
            continue
        x, y = _pos(p.get("examples")), _pos(p.get("noise_scale"))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def _pick_spread(items, k):
    if len(items) <= k:
        return list(items)
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


def plot_noise_scale(analysis, path, max_curves: int = 6) -> None:
    """The gradient noise scale B_simple = tr(Sigma)/|G|^2 over training (x = examples seen,
    log), for up to ``max_curves`` batch sizes spread over the sweep (the first seed of each);
    one panel per architecture (at most four)."""
    archs = architectures(analysis)
    per_arch = []
    for arch in archs:
        have = []
        for r in rows_of(arch):
            curves = [c for c in (r.get("noise_curves") or []) if _curve_points(c)[0]]
            if curves:
                have.append((float(r["batch_size"]), curves[0]))
        if have:
            per_arch.append((arch, have))
    if not per_arch:
        raise NotEnoughData("no gradient-noise-scale measurements over training were stored")
    plt = _pyplot()
    per_arch = per_arch[:4]
    n = len(per_arch)
    fig, axes = _subplots(n, 1, figsize=(10, 4.6 * n), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (arch, have) in zip(axes[:, 0], per_arch):
        chosen = _pick_spread(have, max_curves)
        for i, (b, curve) in enumerate(chosen):
            xs, ys = _curve_points(curve)
            colour = cmap(i / max(1, len(chosen) - 1) * 0.9)
            ax.plot(xs, ys, "o-", color=colour, ms=3.5, lw=1.3, label=f"B = {_fmt_g(b)}")
        bc = b_crit_of(arch)
        if bc is not None:
            ax.axhline(
                bc,
                color="black",
                ls="--",
                lw=1,
                label=f"{b_crit_label(arch).replace('(fit', '(trade-off fit')} ≈ {_fmt_g(bc)}",
            )
        bs = b_simple_of(arch)
        if bs is not None:
            ax.axhline(bs, color="0.4", ls=":", lw=1.3, label=f"median B_simple mid-training ≈ {_fmt_g(bs)}")
        row = adaptive_of(arch)
        curves = [c for c in ((row or {}).get("noise_curves") or []) if _curve_points(c)[0]]
        if curves:
            ax.plot(*_curve_points(curves[0]), "s--", color="black", ms=3.5, lw=1.3, label=adaptive_label(row))
        ax.set_xscale("log")
        _log_y(ax)
        ax.set_xlabel("training examples seen (log scale)")
        ax.set_ylabel("B_simple = tr(Σ)/|G|² (examples, log scale)")
        ax.grid(True, which="major", alpha=0.3)
        if n > 1:
            ax.set_title(arch_label(arch), fontsize=10)
        _side_legend(ax, title="batch size")
    _suptitle(fig, "Gradient noise scale B_simple over training (McCandlish et al. 2018)", archs if n == 1 else [])
    _save(fig, path, "gradient noise scale over training")


def _trajectory(t):
    """(steps, batch sizes, learning-rate factors) of a stored trajectory as a step
    function from step 0 to the end of the run: the start size until the first decision."""
    start = _pos(t.get("start"))
    end = _pos(t.get("steps"))
    pts = [(0.0, start, 1.0)] if start is not None else []
    for d in t.get("decisions") or []:
        if isinstance(d, (list, tuple)) and len(d) >= 3:
            s, b, f = fnum(d[0]), _pos(d[1]), _pos(d[2])
            if s is not None and b is not None and f is not None:
                pts.append((s, b, f))
    if not pts:
        return [], [], []
    if end is not None and end > pts[-1][0]:
        pts.append((end, pts[-1][1], pts[-1][2]))
    return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]


def _metric_points(curve, key):
    xs, ys = [], []
    for p in curve or []:
        if isinstance(p, dict):
            x, y = _pos(p.get("examples")), fnum(p.get(key))
            if x is not None and y is not None:
                xs.append(x)
                ys.append(y)
    return xs, ys


def plot_adaptive(analysis, path) -> None:
    """The adaptive run, one row of panels per architecture (at most four): the batch size
    the controller chose over the steps and the learning-rate factor it applied (every seed
    at the arm's best learning rate; a ring where the run reached the target), and its
    learning curves (validation metric vs examples seen) beside those of the recommended
    fixed batch size."""
    import numpy as np

    archs = [
        a
        for a in architectures(analysis)
        if adaptive_of(a)
        and any(_trajectory(t)[0] for t in adaptive_of(a).get("trajectories") or [] if isinstance(t, dict))
    ]
    if not archs:
        raise NotEnoughData("no adaptive run stored its batch-size decisions")
    archs = archs[:4]
    acc = uses_accuracy(architectures(analysis))
    key = "val_accuracy" if acc else "val_loss"
    plt = _pyplot()
    n = len(archs)
    fig, axes = _subplots(n, 3, figsize=(15, 4.8 * n), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for (ax_b, ax_f, ax_c), arch in zip(axes, archs):
        row = adaptive_of(arch)
        trajs = [t for t in row.get("trajectories") or [] if isinstance(t, dict) and _trajectory(t)[0]]
        for i, t in enumerate(trajs):
            colour = cmap(i / max(1, len(trajs) - 1) * 0.9)
            xs, bs, fs = _trajectory(t)
            lab = f"seed {t.get('seed')}"
            ax_b.step(xs, bs, where="post", color=colour, lw=1.5, label=lab)
            ax_f.step(xs, fs, where="post", color=colour, lw=1.5, label=lab)
            at = fnum(t.get("reached_at"))
            if at is not None:
                k = max(0, int(np.searchsorted(xs, at, side="right")) - 1)
                ax_b.plot(
                    [at],
                    [bs[k]],
                    "o",
                    ms=9,
                    mfc="none",
                    mec=colour,
                    mew=1.5,
                    label="target reached" if i == 0 else None,
                )
        ax_b.set_yscale("log", base=2)
        from matplotlib.ticker import FuncFormatter

        ax_b.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
        cands = [c for c in (_pos(x) for x in row.get("candidates") or []) if c is not None]
        if cands:
            ax_b.set_ylim(min(cands) / 1.5, max(cands) * 1.5)
        ax_b.set_xlabel("optimizer step (steps)")
        ax_b.set_ylabel("batch size in force (examples, log2 scale)")
        ax_b.set_title("batch size chosen by the controller", fontsize=10)
        ax_f.set_xlabel("optimizer step (steps)")
        ax_f.set_ylabel("learning rate / starting rate (factor)")
        ax_f.set_title(f"learning-rate factor ({(row.get('settings') or {}).get('lr_rule', 'rule')})", fontsize=10)
        for ax in (ax_b, ax_f):
            ax.grid(True, alpha=0.3)
        vs = row.get("vs_fixed") or {}
        fb = fnum(vs.get("batch_size"))
        for curves, style, color, lw, label in (
            (
                row.get("curves"),
                "-",
                "black",
                1.3,
                f"{adaptive_label(row)}, best LR {_fmt_g(fnum(row.get('best_lr')))}",
            ),
            (row.get("fixed_curves"), "--", "tab:red", 1.2, f"recommended fixed batch size B = {_fmt_g(fb)}"),
        ):
            for i, c in enumerate(curves or []):
                xs, ys = _metric_points((c or {}).get("curve"), key)
                if xs:
                    ax_c.plot(
                        xs,
                        [100 * y for y in ys] if acc else ys,
                        style,
                        color=color,
                        lw=lw,
                        alpha=0.8,
                        label=label if i == 0 else None,
                    )
        t, metric = fnum(arch.get("target")), str(arch.get("target_metric") or "")
        if t is not None and (("accuracy" in metric) == acc) and "val" in metric:
            ax_c.axhline(100 * t if acc else t, color="0.4", ls=":", lw=1, label=f"target ({target_words(arch)})")
        if ax_c.lines:
            ax_c.set_xscale("log")
            if not acc:
                _log_y(ax_c)
        ax_c.set_xlabel("training examples seen (log scale)")
        ax_c.set_ylabel("validation accuracy (%)" if acc else "validation loss (mean per example, log scale)")
        ax_c.set_title("learning curves (every seed)", fontsize=10)
        ax_c.grid(True, alpha=0.3)
        if n > 1:
            ax_b.set_title(f"{arch_label(arch)}: batch size chosen", fontsize=10)
        _side_legend(ax_c)
    _fig_legend(fig, [axes[0][0]], max_cols=6)
    _suptitle(
        fig, "Adaptive batch size (fit(batch_size='adaptive')): what the controller chose", archs if n == 1 else []
    )
    _save(fig, path, "adaptive batch size over training")


_PLOTTERS = {
    "steps_examples.png": (plot_steps_examples, "Steps and examples to target vs batch size"),
    "time_to_target.png": (plot_time_to_target, "Wall-clock time to target vs batch size"),
    "generalization.png": (plot_generalization, "Generalisation vs batch size"),
    "best_lr.png": (plot_best_lr, "Best learning rate vs batch size"),
    "throughput_memory.png": (plot_throughput_memory, "Throughput, goodput and memory vs batch size"),
    "noise_scale.png": (plot_noise_scale, "Gradient noise scale over training"),
    ADAPTIVE_PLOT: (plot_adaptive, "Adaptive batch size over training"),
}


def has_adaptive(analysis) -> bool:
    """Whether the analysis holds an adaptive arm (then :data:`ADAPTIVE_PLOT` is drawn too)."""
    return any(adaptive_of(a) for a in architectures(analysis))


def plot_files(analysis) -> list:
    """The figures :func:`make_plots` draws for ``analysis``: :data:`PLOT_FILES`, and
    :data:`ADAPTIVE_PLOT` for a study with the adaptive arm."""
    return list(PLOT_FILES) + ([ADAPTIVE_PLOT] if has_adaptive(analysis) else [])


def make_plots(analysis: dict, out_dir) -> list[PlotResult]:
    """Draw every figure of :data:`PLOT_FILES` into ``out_dir`` (which must exist), and
    :data:`ADAPTIVE_PLOT` where the analysis has the adaptive arm (:func:`plot_files`).

    A figure without data becomes a placeholder ("not enough data: ..."); a figure that
    fails for any other reason too (with a :class:`RuntimeWarning`): this never raises
    except for a missing matplotlib (:class:`ImportError`) or an unwritable directory.
    """
    _pyplot()  # fail early and clearly without matplotlib
    out = []
    for name in plot_files(analysis):
        fn, title = _PLOTTERS[name]
        path = os.path.join(os.fspath(out_dir), name)
        reason = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # layout / log-axis chatter
                fn(analysis, path)
        except NotEnoughData as exc:
            reason = f"not enough data: {exc}"
        except (ImportError, OSError):
            raise
        except Exception as exc:  # a report is always complete; say what went wrong
            reason = f"not enough data: the figure could not be drawn ({type(exc).__name__}: {exc})"
            warnings.warn(f"minigd.report: {name}: {reason}", RuntimeWarning, stacklevel=2)
        if reason is not None:
            _pyplot().close("all")
            plot_placeholder(path, reason, title)
        out.append(PlotResult(name, path, reason))
    return out
