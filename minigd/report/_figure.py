"""The figure toolkit of the report's plots: matplotlib on the Agg backend and atomic PNG
writes (from :mod:`minigd._plotting`), log2 batch-size and log y axes, legends
outside the data area, the scaling regimes shaded, titles that name the architecture.
"""

from __future__ import annotations

import math

# the two figure primitives live below both the study and the report (the study's question
# figures use them too); _pyplot and _save keep their names here
from minigd._plotting import pyplot as _pyplot
from minigd._plotting import save_png as _save  # noqa: F401

from ._fields import _not_reached, _thresholds, arch_label

_REGIME_COLOURS = {"perfect scaling": "#2ca02c", "diminishing returns": "#ffbf00", "no benefit": "#d62728"}


def _colours(n):
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(max(n, 1))]


def _mark_apart(ax, arch, colour, pre, ys_all):
    """Batch sizes that did not reach the target, as hollow triangles along the top."""
    nr = _not_reached(arch)
    if not nr or not ys_all:
        return
    top = max(ys_all) * 1.6
    ax.plot(
        nr,
        [top] * len(nr),
        "^",
        ms=8,
        mfc="none",
        mec=colour,
        mew=1.5,
        ls="none",
        label=f"{pre}did not reach the target",
    )


def _log2_batch_axis(ax, lo=None, hi=None):
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log", base=2)
    if lo is not None and hi is not None and hi > lo > 0:
        ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(LogLocator(base=2, numticks=14))
    ax.xaxis.set_minor_formatter(NullFormatter())

    def fmt(x, _pos):
        if x >= 1 and abs(x - round(x)) < 1e-6 * x:
            return f"{int(round(x))}"
        return f"{x:.3g}"

    ax.xaxis.set_major_formatter(FuncFormatter(fmt))
    ax.set_xlabel("batch size B (examples, log2 scale)")
    ax.grid(True, which="major", alpha=0.3)


def _log_y(ax):
    """A log y axis with plain-text tick labels (mathtext labels are slow to lay out)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))

    def minor(v, _p):
        # label 2 and 5 (and 3 on short axes) x 10^k only when the axis spans few decades
        lo, hi = ax.get_ylim()
        if not (lo > 0 and hi > 0):
            return ""
        decades = abs(math.log10(hi / lo))
        mant = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6)
        keep = {2.0, 5.0} if decades < 1.6 else set()
        if decades < 1.2:
            keep.add(3.0)
        if decades < 0.8:
            keep |= {3.0, 4.0, 6.0, 8.0}
        return f"{v:g}" if mant in keep else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _subplots(nrows=1, ncols=1, **kw):
    """``plt.subplots`` with the constrained layout, which makes room for the legends that
    :func:`_fig_legend` and :func:`_side_legend` put outside the axes."""
    return _pyplot().subplots(nrows, ncols, layout="constrained", **kw)


def _fig_legend(fig, axes, max_cols=3):
    """One legend for the figure, below every axes (outside them: it never covers the data),
    with each label once (panels that draw the same series share an entry)."""
    handles, labels, seen = [], [], set()
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in seen:
                seen.add(lab)
                handles.append(h)
                labels.append(lab)
    if not handles:
        return None
    # as many columns as fit the figure's width (about 6 px per character at font size 8)
    width_px = fig.get_figwidth() * fig.dpi
    per_col = 6 * max(len(lab) for lab in labels) + 60
    ncol = max(1, min(max_cols, len(labels), int(width_px // per_col)))
    return fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)


def _side_legend(ax, **kw):
    """The axes' legend to the right of it, outside the data area."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, **kw)


def _shade_regimes(ax, b_crit, lo, hi, label=True, prefix=""):
    perfect, no_benefit, _ = _thresholds()
    if b_crit is None or lo is None:
        return
    bands = [
        ("perfect scaling", lo, perfect * b_crit),
        ("diminishing returns", perfect * b_crit, no_benefit * b_crit),
        ("no benefit", no_benefit * b_crit, hi),
    ]
    for name, a, b in bands:
        a, b = max(a, lo), min(b, hi)
        if b > a:
            ax.axvspan(
                a, b, color=_REGIME_COLOURS[name], alpha=0.12, lw=0, label=f"{prefix}regime: {name}" if label else None
            )


def _arch_prefix(archs, arch):
    return f"{arch_label(arch)}: " if len(archs) > 1 else ""


def _suptitle(fig, text, archs):
    if len(archs) == 1:
        text = f"{text}\n{arch_label(archs[0])}"
    fig.suptitle(text, fontsize=11)
