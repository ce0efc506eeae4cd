"""Helpers the arms share: reading the main analysis, formatting numbers with intervals."""

from __future__ import annotations

import math


def arch0(ctx) -> dict | None:
    """The main study's (first) architecture entry, or None."""
    archs = (ctx.main_analysis or {}).get("architectures") or []
    return archs[0] if archs else None


def fmt_num(v, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "not measured"
    if unit == "s":
        if v < 1e-3:
            return f"{v * 1e6:.3g} µs"
        if v < 1:
            return f"{v * 1e3:.3g} ms"
        return f"{v:.3g} s"
    if isinstance(v, int) or (isinstance(v, float) and (v.is_integer() or abs(v) >= 100)):
        return f"{round(v):,}{(' ' + unit) if unit else ''}"
    return f"{v:.3g}{(' ' + unit) if unit else ''}"


def fmt_iv(d: dict | None, unit: str = "") -> str:
    """``"12 ms [10 ms, 15 ms]"`` from ``{"value", "lo", "hi"}``."""
    if not d or d.get("value") is None:
        return "not measured"
    s = fmt_num(d["value"], unit)
    if d.get("lo") is not None and d.get("hi") is not None:
        s += f" [{fmt_num(d['lo'], unit)}, {fmt_num(d['hi'], unit)}]"
    return s


def label_b(B, n_train) -> str:
    return f"{B} (full batch)" if B == n_train else str(B)
