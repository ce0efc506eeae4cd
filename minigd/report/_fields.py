"""Reading the output of :func:`minigd.study.analysis.analyze` for a report: the fields that
the figures (:mod:`minigd.report.plots`) and the summary (:mod:`minigd.report.summary`)
both take from it, each tolerant of missing data (``None``, ``NaN``, absent keys).

No matplotlib here (the figure toolkit is :mod:`minigd.report._figure`).
"""

from __future__ import annotations

import math


def _thresholds():
    """The regime thresholds of the analysis (B <= PERFECT_BELOW*B_crit, B >= NO_BENEFIT_ABOVE*B_crit)."""
    try:
        from minigd.study.analysis import NO_BENEFIT_ABOVE, PERFECT_BELOW, REASONABLE_TIME_FACTOR
    except ImportError:  # pragma: no cover - the study package ships with minigd
        return 1 / 3, 3.0, 2.0
    return PERFECT_BELOW, NO_BENEFIT_ABOVE, REASONABLE_TIME_FACTOR


def fnum(x):
    """``x`` as a finite float, or ``None`` (missing, NaN, infinite or not a number)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _pos(x):
    v = fnum(x)
    return v if v is not None and v > 0 else None


def architectures(analysis) -> list:
    """The per-architecture dicts of an analysis (an empty list if it has none)."""
    if not isinstance(analysis, dict):
        return []
    return [a for a in (analysis.get("architectures") or []) if isinstance(a, dict)]


def rows_of(arch) -> list:
    """An architecture's per-batch rows with a usable batch size, sorted by batch size."""
    rows = [r for r in (arch.get("per_batch") or []) if isinstance(r, dict) and _pos(r.get("batch_size"))]
    return sorted(rows, key=lambda r: float(r["batch_size"]))


def arch_label(arch) -> str:
    """A short name of an architecture: ``64-64-10 relu sgd``."""
    sizes = arch.get("sizes") or []
    parts = ["-".join(str(s) for s in sizes) if sizes else "?"]
    parts += [str(arch[k]) for k in ("activation", "optimizer") if arch.get(k)]
    if arch.get("norm"):
        parts.append(f"({arch['norm']})")
    return " ".join(parts)


def b_crit_of(arch):
    """The fitted critical batch size, if finite and positive, else ``None``."""
    fit = arch.get("tradeoff_fit")
    if not isinstance(fit, dict) or "error" in fit:
        return None
    return _pos(fit.get("b_crit"))


def b_crit_label(arch) -> str:
    """ "B_crit (fit)", or "B_crit (fit, untuned (sqrt rule))" where the learning rate was a rule."""
    t = arch.get("b_crit_tuning")
    return "B_crit (fit)" if not t or t == "tuned" else f"B_crit (fit, {t})"


def _not_reached(arch):
    """Batch sizes that did not reach the target (median over seeds at their best rate)."""
    return [float(r["batch_size"]) for r in rows_of(arch) if r.get("reached") is False]


def _err(arch, key, xs):
    """Asymmetric error bars (2, n) for the points ``xs`` from the rows' ``intervals[key]``,
    or None without intervals."""
    import numpy as np

    by_b = {float(r["batch_size"]): r for r in rows_of(arch)}
    lo, hi, any_iv = [], [], False
    for x in xs:
        r = by_b.get(x) or {}
        iv = (r.get("intervals") or {}).get(key) if isinstance(r.get("intervals"), dict) else None
        v = _pos(r.get(key))
        a = _pos(iv.get("lo")) if isinstance(iv, dict) else None
        b = _pos(iv.get("hi")) if isinstance(iv, dict) else None
        if v is None or a is None or b is None:
            lo.append(0.0)
            hi.append(0.0)
            continue
        any_iv = True
        lo.append(max(0.0, v - a))
        hi.append(max(0.0, b - v))
    return np.array([lo, hi]) if any_iv else None


def b_simple_of(arch):
    """The gradient noise scale B_simple measured mid-training, if positive, else ``None``."""
    ns = arch.get("noise_scale") or {}
    v = _pos(ns.get("middle")) if isinstance(ns, dict) else None
    if v is None:
        v = _pos((arch.get("answers") or {}).get("critical_batch_size_noise"))
    return v


def uses_accuracy(archs) -> bool:
    """Whether the generalisation metric is accuracy (classification) rather than loss."""
    have_acc = have_loss = False
    for a in archs:
        for r in rows_of(a):
            have_acc |= fnum(r.get("final_val_accuracy")) is not None
            have_loss |= fnum(r.get("final_val_loss")) is not None
    return have_acc or not have_loss


def _series(arch, key, value=None):
    """(batch sizes, values) of a row field, dropping missing values; positive values only
    (``value``, default :func:`_pos`, reads one value or says ``None``)."""
    value = _pos if value is None else value
    xs, ys = [], []
    for r in rows_of(arch):
        v = value(r.get(key))
        if v is not None:
            xs.append(float(r["batch_size"]))
            ys.append(v)
    return xs, ys


def _series_any(arch, key):
    """(batch sizes, values) of a row field, dropping missing values; any finite value."""
    return _series(arch, key, fnum)


def _batch_range(archs, extra=()):
    """x limits covering every batch size, and the markers in ``extra`` when near it."""
    bs = [float(r["batch_size"]) for a in archs for r in rows_of(a)]
    if not bs:
        return None, None
    lo, hi = min(bs) / 1.6, max(bs) * 1.6
    for v in extra:
        if v is not None and lo / 64 < v < hi * 64:
            lo, hi = min(lo, v / 1.6), max(hi, v * 1.6)
    return lo, hi


def target_words(arch) -> str:
    """The target in words: "95% validation accuracy", "validation loss ≤ 0.1"."""
    metric, t = arch.get("target_metric"), fnum(arch.get("target"))
    if metric is None or t is None:
        return "the target"
    m = str(metric)
    split = "validation" if m.startswith("val") else "training" if m.startswith("train") else ""
    if "accuracy" in m:
        return " ".join(w for w in (f"{100 * t:.4g}%", split, "accuracy") if w)
    if "loss" in m:
        return " ".join(w for w in (split, f"loss ≤ {t:.4g}") if w)
    return f"{m} = {t:.4g}"


def adaptive_of(arch):
    """The adaptive arm's row of an architecture (``batch_size == "adaptive"``), or None."""
    a = arch.get("adaptive") if isinstance(arch, dict) else None
    return a if isinstance(a, dict) else None


def adaptive_label(row) -> str:
    """ "adaptive (from B=32)"."""
    b = fnum((row or {}).get("start_batch_size"))
    return "adaptive" + (f" (from B={int(b)})" if b is not None else "")
