"""Turn stored trials into answers: which batch size, and how sure we are of it.

Per architecture and batch size B the learning rate is the one that reached the target in
the fewest steps (median over seeds, a seed that did not reach it counting as infinitely
many; ties go to the higher median validation accuracy, then the smaller rate: the
protocol of Shallue et al. 2018, arXiv:1811.03600).  A batch size *reached the target*
when that median is finite (more than half its seeds at its best rate reached it).  From
those points:

* the steps/examples trade-off (S/S_min - 1)(E/E_min - 1) = 1 is fitted
  (:func:`minigd.gradstats.fit_tradeoff`), giving S_min, E_min and B_crit = E_min/S_min
  (McCandlish et al. 2018, arXiv:1812.06162).  Only batch sizes that reached the target
  with their learning rate *tuned* enter the fit: a best rate at the lowest or highest
  rate tried for that B (``lr_edge``) means the optimum may lie beyond, so that B is
  flagged ``lr_tuned: False`` and left out.  Where the trials' ``lr_policy`` is a scaling
  rule ("linear", "sqrt", "fixed") B_crit is labelled untuned (``b_crit_tuning``);
* B_simple = tr(Sigma)/|G|^2 at the target (the median over the best cell's seeds of the
  trial's ``"target"`` noise point, or its last point) and mid-run (the ``"mid"`` point,
  or for rows stored before points were tagged, the point nearest half the run); the
  arXiv:2505.23971 finding that B_simple can underestimate B_crit is why both are given;
* regimes (reached batch sizes only; ``None`` for one that did not reach the target):
  *perfect scaling* for B <= B_crit/3, *no benefit* for B >= 3 B_crit, *diminishing
  returns* between (on the fitted curve, doubling B cuts steps by 62-87% of a halving at
  those bounds);
* wall time to target = steps to target x the step time at that B.  The step time is the
  median of the throughput probe's rounds (``probe``: measured in one thread with nothing
  else running, the step as a user's fit pays it); where the probe has no entry for a B,
  the median of the trials' in-trial ``us_per_step`` (``timing: "in-trial"``, with a
  warning: those were timed with other trials running);
* throughput = B / step time; goodput = throughput x statistical efficiency
  (B_simple_mid + B0)/(B_simple_mid + B) (Pollux, Qiao et al. 2021, arXiv:2008.12260), B0
  the smallest batch size swept; the batch size maximising it;
* the batch sizes with the least wall time, the fewest examples and the fewest steps to
  target, and the *smallest reasonable* batch size: the smallest one that reaches the target
  within REASONABLE_TIME_FACTOR x the least time;
* the adaptive arm (``batch_size="adaptive"`` trials, :mod:`minigd.study._adaptive`): one
  more row, ``arch["adaptive"]``, out of the fit and of every selection among batch sizes,
  and its time to target against the recommended batch size's as a ratio with an interval
  and a win rate (``headline["adaptive_vs_fixed"]``; the recommended architecture's in the
  result's top-level ``"adaptive"``).

**Uncertainty.**  Every headline number is a selection over noisy trials, so each comes
with a bootstrap interval: ``n_boot`` resamples (numpy Generator seeded from ``seed`` and
the architecture; deterministic), each resampling with replacement the seeds' results
*within each (B, learning rate) cell* and the probe's rounds (or the in-trial step times)
per B, and re-running the whole selection above -- best rate per B, edge flags, the fit,
every answer.  A headline number is ``{"value": point estimate from all the data, "lo":
5th percentile, "hi": 95th percentile, "wins": fraction of resamples whose selection equals
the point estimate}`` (``wins`` is ``None`` for continuous quantities).  The percentiles
are order statistics (``numpy.quantile(method="inverted_cdf")``), so for a batch-size
selection ``lo``/``hi`` are batch sizes; should one miss the point estimate (a selection
the resamples rarely make) the interval is widened to include it.  A resample whose
trade-off fit fails (fewer than 3 points, or one batch size) counts toward no B_crit; the
fraction of such resamples is ``bootstrap.fit_failed_fraction``.  The resamples' fit is a
vectorised replica of :func:`~minigd.gradstats.fit_tradeoff` (the same profiled
least-squares objective, grid and limits; agreeing with it to ~1e-8), because calling it
per resample costs ~15 ms.

:func:`analyze` is pure (no I/O); its result is JSON-serialisable (``json.dumps``; an
unresolved B_crit may be ``inf``).
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict

import numpy as np

from minigd.gradstats import fit_tradeoff

REASONABLE_TIME_FACTOR = 2.0
PERFECT_BELOW = 1 / 3
NO_BENEFIT_ABOVE = 3.0
#: bootstrap resamples by default: ~0.45 s per architecture of a 500-trial, 12-batch-size,
#: 7-learning-rate, 5-seed study on one core (+ ~0.25 s importing scipy in a fresh process);
#: a win rate's Monte-Carlo standard error is then <= 0.8 percentage points
N_BOOT = 4000
#: the bootstrap interval's percentiles (a 90% interval)
INTERVAL = (0.05, 0.95)
DID_NOT_REACH = "did not reach the target"

_FIT_GRID_MARGIN = 15.0  # as minigd.gradstats.fit_tradeoff: the grid of log b_crit extends
_FIT_GRID_POINTS = 1501  # e^15 beyond the measured batch sizes, 1501 points
_FIT_CHUNK = 1000  # resamples fitted at once


# --------------------------------------------------------------------------- small helpers


def _median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.median(xs)) if xs else None


def _num(x) -> float:
    """``x`` as a float, NaN when missing or not a number."""
    if x is None or isinstance(x, bool):
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _opt(x):
    """A float for JSON: ``None`` for NaN (``inf`` is kept: "unbounded")."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _nanmed(a, axis=-1):
    """Median along ``axis`` ignoring NaN (``inf`` counts); NaN where a slice is all NaN.
    Much faster than ``numpy.nanmedian`` on many short rows."""
    a = np.sort(np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1), axis=-1)  # NaN sort last
    c = (~np.isnan(a)).sum(axis=-1)
    lo = np.clip((c - 1) // 2, 0, None)[..., None]
    hi = np.clip(c // 2, 0, a.shape[-1] - 1)[..., None]
    x, y = np.take_along_axis(a, lo, -1)[..., 0], np.take_along_axis(a, hi, -1)[..., 0]
    with np.errstate(invalid="ignore"):
        m = np.where(x == y, x, 0.5 * (x + y))  # inf + inf stays inf
    return np.where(c > 0, m, np.nan)


def regime(B, b_crit) -> str:
    """The regime of batch size ``B`` given B_crit: "perfect scaling" (B <= B_crit/3),
    "no benefit" (B >= 3 B_crit), "diminishing returns" between, "unknown" without a
    finite positive B_crit."""
    if b_crit is None or not math.isfinite(b_crit) or b_crit <= 0:
        return "unknown"
    if B <= PERFECT_BELOW * b_crit:
        return "perfect scaling"
    if B >= NO_BENEFIT_ABOVE * b_crit:
        return "no benefit"
    return "diminishing returns"


# --------------------------------------------------------------------------- one trial's numbers


def _reached(res) -> bool:
    return res.get("status", "ok") == "ok" and bool(res.get("reached"))


def _steps(res) -> float:
    """Steps to target (interpolated when the trial recorded it), ``inf`` if not reached."""
    if not _reached(res):
        return math.inf
    v = _num(res.get("steps_to_target_interp"))
    if math.isnan(v):
        v = _num(res.get("steps_to_target"))
    return math.inf if math.isnan(v) else v


def _examples(res, B) -> float:
    if not _reached(res):
        return math.inf
    v = _num(res.get("examples_to_target_interp"))
    if math.isnan(v):
        v = _num(res.get("examples_to_target"))
    if math.isnan(v):
        v = _steps(res) * B
    return v


def _noise_at(res, where):
    """B_simple at ``where`` ("start" | "mid" | "target" | "end") of a trial, or None.

    Points tagged with ``"where"`` are used as tagged; "target" falls back to the last point
    (a trial that did not reach the target); a tagged trial without "mid" (a run of one
    step has no middle) has none; rows stored before points were tagged use the
    first point ("start"), the last ("end", "target") and the one nearest half the run
    ("mid")."""
    pts = [p for p in (res.get("noise") or []) if isinstance(p, dict)]
    if not pts:
        return None
    where = "mid" if where == "middle" else where
    tagged = [p for p in pts if p.get("where") == where]
    if tagged:
        p = tagged[-1]
    elif where == "mid" and any("where" in q for q in pts):
        return None  # a run too short to have a middle (one step): not its target point
    elif where == "start":
        p = pts[0]
    elif where in ("end", "target"):
        p = pts[-1]
    else:
        half = _num(pts[-1].get("step")) / 2
        if math.isnan(half):
            p = pts[len(pts) // 2]
        else:
            p = min(
                pts, key=lambda q: abs(_num(q.get("step")) - half) if not math.isnan(_num(q.get("step"))) else math.inf
            )
    v = _num(p.get("noise_scale"))
    return None if math.isnan(v) else v


def _in_trial_step_s(B, res) -> float:
    """A trial's own step time (s): us_per_step, else B/throughput, else time/steps to target."""
    us = _num(res.get("us_per_step"))
    if us > 0 and math.isfinite(us):
        return us * 1e-6
    tp = _num(res.get("throughput"))
    if tp > 0 and math.isfinite(tp):
        return B / tp
    t, s = _num(res.get("time_to_target")), _num(res.get("steps_to_target"))
    if t > 0 and s > 0 and math.isfinite(t / s):
        return t / s
    return math.nan


# --------------------------------------------------------------------------- grouping


def _arch_key_of(cfg):
    return (tuple(cfg.sizes), cfg.activation, cfg.optimizer, cfg.norm_label)


def _probe_key(entry):
    arch = entry.get("arch") or {}
    return (
        (
            tuple(int(s) for s in arch.get("sizes") or ()),
            arch.get("activation"),
            arch.get("optimizer"),
            arch.get("norm") or "",
        ),
        int(entry["batch_size"]),
    )


class _Cells:
    """One architecture's trials as arrays: per batch size, per learning rate, per seed."""

    FIELDS = ("steps", "examples", "acc", "mid", "target")

    def __init__(self, items, probe_entries=None):
        by_b = defaultdict(lambda: defaultdict(list))
        for cfg, res in items:
            by_b[int(cfg.batch_size)][float(cfg.lr)].append((cfg, res))
        self.items = items
        self.Bs = sorted(by_b)
        self.by_b = by_b
        self.lrs = [sorted(by_b[B]) for B in self.Bs]
        # The seeds are shared by every cell (a seed fixes the initialisation and the data
        # order at every batch size and rate), so a resample draws seeds once and every cell
        # takes its trials of those seeds: resampling each cell on its own would let the
        # best-rate selection pick a lucky draw per cell and bias the selected steps low.
        # Arrays are aligned on the study's seeds (NaN where a cell lacks one); a cell
        # holding the same seed twice (a merged study) keeps the first in key order.
        self.seeds = sorted({int(cfg.seed) for cfg, _ in items})
        pos = {sd: i for i, sd in enumerate(self.seeds)}
        self.cells = []  # [b][l] -> dict of arrays over the study's seeds
        for B, lrs in zip(self.Bs, self.lrs):
            row = []
            for lr in lrs:
                cell = {f: np.full(len(self.seeds), np.nan) for f in self.FIELDS}
                for cfg, r in sorted(by_b[B][lr], key=lambda cr: cr[0].key, reverse=True):
                    i = pos[int(cfg.seed)]
                    cell["steps"][i] = _steps(r)
                    cell["examples"][i] = _examples(r, B)
                    cell["acc"][i] = _num(r.get("final_val_accuracy"))
                    cell["mid"][i] = _num(_noise_at(r, "mid"))
                    cell["target"][i] = _num(_noise_at(r, "target"))
                row.append(cell)
            self.cells.append(row)
        # step times per B: the probe's rounds, else the trials' own
        self.timing, self.t_samples, self.t_lo, self.t_hi = [], [], [], []
        probe_entries = probe_entries or {}
        for B in self.Bs:
            entries = probe_entries.get(B) or []
            rounds = [float(x) for e in entries for x in (e.get("round_s") or []) if _num(x) > 0]
            if not rounds:
                rounds = [float(e["median_s"]) for e in entries if _num(e.get("median_s")) > 0]
            if rounds:
                self.timing.append("probe")
                self.t_samples.append(np.array(rounds))
                los = [_num(e.get("lo_s")) for e in entries if _num(e.get("lo_s")) > 0]
                his = [_num(e.get("hi_s")) for e in entries if _num(e.get("hi_s")) > 0]
                self.t_lo.append(min(los) if los else min(rounds))
                self.t_hi.append(max(his) if his else max(rounds))
                continue
            own = [_in_trial_step_s(B, r) for lr in by_b[B] for _, r in by_b[B][lr]]
            own = [t for t in own if not math.isnan(t)]
            self.timing.append("in-trial" if own else None)
            self.t_samples.append(np.array(own if own else [math.nan]))
            self.t_lo.append(min(own) if own else math.nan)
            self.t_hi.append(max(own) if own else math.nan)
        self.nB = len(self.Bs)
        self.L = max((len(x) for x in self.lrs), default=1)
        self.lr_arr = np.full((self.nB, self.L), np.nan)
        for b, lrs in enumerate(self.lrs):
            self.lr_arr[b, : len(lrs)] = lrs
        self.nlr = np.array([len(x) for x in self.lrs])
        self.B_arr = np.array(self.Bs, dtype=np.float64)

    def medians(self, rng=None, R=1):
        """Per-cell medians, arrays of shape (R, nB, L) (padding: steps inf, acc -inf, NaN),
        and the step time per B, (R, nB): from all the data (``rng=None``) or from ``R``
        resamples, the study's seeds drawn with replacement once per resample and shared
        by every cell (see ``__init__``); a seed a cell lacks is left out of its median."""
        out = {
            "steps": np.full((R, self.nB, self.L), np.inf),
            "examples": np.full((R, self.nB, self.L), np.nan),
            "acc": np.full((R, self.nB, self.L), -np.inf),
            "mid": np.full((R, self.nB, self.L), np.nan),
            "target": np.full((R, self.nB, self.L), np.nan),
        }
        n = len(self.seeds)
        idx = None if rng is None else rng.integers(0, n, size=(R, n))
        self.boot_idx = idx  # the adaptive arm's resamples take the same seeds
        for b, row in enumerate(self.cells):
            for l, cell in enumerate(row):
                for f in self.FIELDS:
                    a = cell[f]
                    sample = np.broadcast_to(a, (R, n)) if idx is None else a[idx]
                    m = _nanmed(sample, axis=1)
                    if f == "acc":
                        m = np.where(np.isnan(m), 0.0, m)  # unmeasured accuracy: no tie-break preference
                    elif f == "steps":
                        m = np.where(np.isnan(m), np.inf, m)  # no trial of the drawn seeds: not reached
                    out[f][:, b, l] = m
        T = np.empty((R, self.nB))
        for b, s in enumerate(self.t_samples):
            k = s.shape[0]
            sample = np.broadcast_to(s, (R, k)) if rng is None else s[rng.integers(0, k, size=(R, k))]
            T[:, b] = _nanmed(sample, axis=1)
        out["step_s"] = T
        return out


# --------------------------------------------------------------------------- the selection


def _first_true(mask, axis=-1):
    """Index of the first True along ``axis``, -1 where there is none."""
    i = np.argmax(mask, axis=axis)
    return np.where(mask.any(axis=axis), i, -1)


def _select(cells: _Cells, med) -> dict:
    """The whole selection, vectorised over the leading (resample) axis of ``med``."""
    S, A = med["steps"], med["acc"]
    R = S.shape[0]
    valid = ~np.isnan(cells.lr_arr)[None]
    smin = S.min(axis=2, keepdims=True)
    cand = (S == smin) & valid
    acc = np.where(cand, A, -np.inf)
    cand &= acc == acc.max(axis=2, keepdims=True)
    best = np.argmax(cand, axis=2)  # (R, nB): first = smallest lr
    take = lambda X: np.take_along_axis(X, best[..., None], axis=2)[..., 0]
    steps, examples, mid, target = take(S), take(med["examples"]), take(med["mid"]), take(med["target"])
    best_lr = np.take_along_axis(np.broadcast_to(cells.lr_arr, (R,) + cells.lr_arr.shape), best[..., None], 2)[..., 0]
    reached = np.isfinite(steps)
    nlr = cells.nlr[None]
    edge = np.where(reached & (nlr > 1), np.where(best == 0, 1, np.where(best == nlr - 1, 2, 0)), 0)
    T = med["step_s"]
    with np.errstate(invalid="ignore", over="ignore"):
        time = np.where(reached, steps * T, np.inf)  # NaN: no step time known
    timed = reached & np.isfinite(time)
    big = lambda X, ok: np.where(ok, X, np.inf)
    fastest = np.where(timed.any(1), np.argmin(big(time, timed), axis=1), -1)
    ok_ex = reached & np.isfinite(examples)
    fewest_ex = np.where(ok_ex.any(1), np.argmin(big(examples, ok_ex), axis=1), -1)
    fewest_steps = np.where(reached.any(1), np.argmin(big(steps, reached), axis=1), -1)
    best_time = big(time, timed).min(axis=1)
    reasonable = _first_true(timed & (time <= REASONABLE_TIME_FACTOR * best_time[:, None]), axis=1)
    noise_mid = _nanmed(mid, axis=1)
    noise_tgt = _nanmed(np.where(reached, target, np.nan), axis=1)
    B = cells.B_arr[None]
    phi = noise_mid[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        eff = np.where(np.isinf(phi), 1.0, (phi + B[:, :1]) / (phi + B))
        eff = np.where(phi > 0, eff, np.nan)
        throughput = B / T
        goodput = throughput * eff
    has_gp = np.isfinite(goodput)
    max_gp = np.where(has_gp.any(1), np.argmax(np.where(has_gp, goodput, -np.inf), axis=1), -1)
    fit_mask = reached & (edge == 0) & (steps > 0) & np.isfinite(examples) & (examples > 0)
    return {
        "best": best,
        "best_lr": best_lr,
        "steps": steps,
        "examples": examples,
        "mid": mid,
        "target": target,
        "reached": reached,
        "edge": edge,
        "time": time,
        "step_s": T,
        "throughput": throughput,
        "efficiency": eff,
        "goodput": goodput,
        "fastest": fastest,
        "fewest_examples": fewest_ex,
        "fewest_steps": fewest_steps,
        "best_time": best_time,
        "smallest_reasonable": reasonable,
        "noise_mid": noise_mid,
        "noise_target": noise_tgt,
        "max_goodput": max_gp,
        "fit_mask": fit_mask,
    }


# --------------------------------------------------------------------------- the trade-off fit, vectorised


def _fit_many(S, E, mask):
    """:func:`minigd.gradstats.fit_tradeoff` on every row of ``S``/``E`` (the points where
    ``mask``): arrays (s_min, e_min, b_crit), NaN where the fit fails (fewer than 3 points,
    fewer than 2 batch sizes).  Same objective (least squares on ln S profiled over
    ln S_min), same grid of ln B_crit and the same limits (b_crit 0 or inf at the grid's
    edge); the grid's best point is refined by golden-section search on the profiled cost."""
    R, k = S.shape
    if R > _FIT_CHUNK:  # bounded memory: the grid costs are (rows, 1501)
        parts = [
            _fit_many(S[a : a + _FIT_CHUNK], E[a : a + _FIT_CHUNK], mask[a : a + _FIT_CHUNK])
            for a in range(0, R, _FIT_CHUNK)
        ]
        return tuple(np.concatenate(p) for p in zip(*parts))
    s_min, e_min, b_crit = (np.full(R, np.nan) for _ in range(3))
    with np.errstate(all="ignore"):
        logS = np.log(S)
        logB = np.log(E) - logS
    m = mask & np.isfinite(logS) & np.isfinite(logB)
    n = m.sum(axis=1)
    lb = np.where(m, logB, np.nan)
    with np.errstate(all="ignore"):
        bmin = np.where(n > 0, np.nanmin(np.where(m, logB, np.inf), axis=1), np.nan)
        bmax = np.where(n > 0, np.nanmax(np.where(m, logB, -np.inf), axis=1), np.nan)
    scale = np.maximum(1.0, np.maximum(np.abs(bmin), np.abs(bmax)))
    ok = (n >= 3) & ((bmax - bmin) > 1e-12 * scale)
    rows = np.flatnonzero(ok)
    if rows.size == 0:
        return s_min, e_min, b_crit
    logS, lb, m, n = logS[rows], lb[rows], m[rows], n[rows]
    lo_r, hi_r = bmin[rows] - _FIT_GRID_MARGIN, bmax[rows] + _FIT_GRID_MARGIN
    M = m.astype(np.float64)
    s = np.where(m, logS, 0.0)
    s = np.where(m, s - (s * M).sum(1, keepdims=True) / n[:, None], 0.0)  # centred (u absorbs it)
    col_ref = _nanmed(np.where(m, lb, np.nan), axis=0)
    constant = bool(np.all(np.abs(np.where(m, lb - col_ref[None], 0.0)) <= 1e-12 * scale[rows, None]))
    G = _FIT_GRID_POINTS
    if constant:
        # one grid for all rows (the points' batch sizes are the same in every resample):
        # the costs of every row at every grid point are three matrix products
        col = np.where(np.isnan(col_ref), 0.0, col_ref)
        grid = np.linspace(float(lo_r.min()), float(hi_r.max()), G)
        h = np.logaddexp(0.0, grid[:, None] - col[None, :])  # (G, k)
        h = h - h.mean(axis=1, keepdims=True)  # per-g shift: u absorbs it
        sd = (s * M).sum(1)[:, None] - M @ h.T  # sum_j m (s - h)
        cost = (s * s * M).sum(1)[:, None] - 2 * (s * M) @ h.T + M @ (h * h).T - sd**2 / n[:, None]
        tol = 1e-9 * (grid[1] - grid[0])
        inside = (grid[None] >= lo_r[:, None] - tol) & (grid[None] <= hi_r[:, None] + tol)
        cost = np.where(inside, cost, np.inf)
        i = np.argmin(cost, axis=1)
        first, last = _first_true(inside, 1), G - 1 - _first_true(inside[:, ::-1], 1)
        step = np.full(rows.size, grid[1] - grid[0])
        v_i = grid[i]
    else:
        i = np.empty(rows.size, dtype=np.int64)
        lbz = np.where(m, lb, 0.0)
        t = np.linspace(0.0, 1.0, G)
        chunk = max(1, int(2_000_000 // (G * k)))
        for a in range(0, rows.size, chunk):
            sl = slice(a, a + chunk)
            v = lo_r[sl, None] + (hi_r - lo_r)[sl, None] * t[None]  # (r, G)
            hh = np.logaddexp(0.0, v[:, :, None] - lbz[sl, None, :])  # (r, G, k)
            d = (s[sl, None, :] - hh) * M[sl, None, :]
            mu = d.sum(2, keepdims=True) / n[sl, None, None]
            r_ = (d - mu) * M[sl, None, :]
            i[sl] = np.argmin((r_ * r_).sum(2), axis=1)
        first, last = np.zeros(rows.size, dtype=np.int64), np.full(rows.size, G - 1)
        step = (hi_r - lo_r) / (G - 1)
        v_i = lo_r + (hi_r - lo_r) * t[i]
    lbz = np.where(m, lb, 0.0)
    raw = np.where(m, logS, 0.0)

    def profile(v):
        hv = np.logaddexp(0.0, v[:, None] - lbz)
        d = (raw - hv) * M
        u = d.sum(1) / n
        r_ = (d - u[:, None]) * M
        return (r_ * r_).sum(1), u

    at_lo, at_hi = i == first, i == last
    a_, b_ = v_i - step, v_i + step
    g = (math.sqrt(5) - 1) / 2
    for _ in range(64):
        c_, d_ = b_ - g * (b_ - a_), a_ + g * (b_ - a_)
        left = profile(c_)[0] < profile(d_)[0]
        b_ = np.where(left, d_, b_)
        a_ = np.where(left, a_, c_)
    v = 0.5 * (a_ + b_)
    _, u = profile(v)
    out_s = np.exp(u)
    out_b = np.exp(v)
    out_e = out_s * out_b
    mean_s = (raw * M).sum(1) / n
    out_s = np.where(at_lo, np.exp(mean_s), out_s)
    out_e = np.where(at_lo, 0.0, out_e)
    out_b = np.where(at_lo, 0.0, out_b)
    mean_sb = ((raw + lbz) * M).sum(1) / n
    out_s = np.where(at_hi, 0.0, out_s)
    out_e = np.where(at_hi, np.exp(mean_sb), out_e)
    out_b = np.where(at_hi, np.inf, out_b)
    s_min[rows], e_min[rows], b_crit[rows] = out_s, out_e, out_b
    return s_min, e_min, b_crit


def _fit_point(steps, examples, mask):
    """The trade-off fit of the point estimate (``fit_tradeoff`` itself)."""
    S = [float(x) for x, ok in zip(steps, mask) if ok]
    E = [float(x) for x, ok in zip(examples, mask) if ok]
    if len(S) < 3:
        return {
            "error": f"it needs at least 3 batch sizes that reached the target with a tuned learning rate "
            f"(best rate not at the edge of those tried); {len(S)} did"
        }
    try:
        f = fit_tradeoff(S, E)
    except ValueError as exc:
        return {"error": str(exc)}
    return {"s_min": f.s_min, "e_min": f.e_min, "b_crit": f.b_crit, "residual": f.residual}


# --------------------------------------------------------------------------- intervals


def _quantiles(x):
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return None, None
    lo, hi = np.quantile(x, INTERVAL, method="inverted_cdf")
    return float(lo), float(hi)


def _interval(value, samples, *, selection=False, as_int=False):
    """``{"value", "lo", "hi", "wins"}`` from the point estimate and the resamples' values
    (NaN: no value in that resample -- it counts as a loss for a selection, and toward no
    percentile)."""
    value = _opt(value)
    conv = lambda x: None if x is None else (int(round(x)) if as_int and math.isfinite(x) else x)
    if samples is None:
        return {"value": conv(value), "lo": None, "hi": None, "wins": None}
    samples = np.asarray(samples, dtype=np.float64)
    lo, hi = _quantiles(samples)
    if value is not None and lo is not None:
        lo, hi = min(lo, value), max(hi, value)
    wins = None
    if selection and samples.size:
        wins = float(np.mean(np.isnan(samples))) if value is None else float(np.mean(samples == value))
    return {"value": conv(value), "lo": conv(lo), "hi": conv(hi), "wins": wins}


# --------------------------------------------------------------------------- public API


def best_lrs(items) -> dict:
    """The best learning rate per batch size of one architecture's ``(cfg, res)`` pairs.

    Returns ``{B: {"best_lr", "lrs_tried" (sorted), "at_edge": "low" | "high" | None,
    "reached": bool}}``: the rate with the fewest median steps to target over seeds (not
    reaching = infinitely many; ties: higher median validation accuracy, then the smaller
    rate), exactly as :func:`analyze` selects it.  ``at_edge`` is "low"/"high" when that
    rate is the smallest/largest tried for B, more than one was tried, and it reached the
    target (the optimum may lie beyond: try past it).  Trials whose ``status`` is not "ok"
    are ignored."""
    items = [(c, r) for c, r in items if r.get("status", "ok") == "ok"]
    if not items:
        return {}
    cells = _Cells(items)
    sel = _select(cells, cells.medians())
    out = {}
    for b, B in enumerate(cells.Bs):
        e = int(sel["edge"][0, b])
        out[B] = {
            "best_lr": float(sel["best_lr"][0, b]),
            "lrs_tried": list(cells.lrs[b]),
            "at_edge": {0: None, 1: "low", 2: "high"}[e],
            "reached": bool(sel["reached"][0, b]),
        }
    return out


def analyze(rows, *, probe=None, seed=0, n_boot=N_BOOT) -> dict:
    """Analyse stored trials: ``rows`` is ``ResultStore.rows()`` (config, result) pairs.

    Parameters
    ----------
    rows : iterable of (TrialConfig, dict)
    probe : list of dict, optional, keyword-only
        Throughput probe entries ``{"arch": {"sizes", "activation", "optimizer", "norm"},
        "batch_size", "full_batch", "round_s": [seconds per step, one per round],
        "median_s", "lo_s", "hi_s", "steps_per_round", "blas_threads", "numba_threads"}``,
        matched to an architecture by (sizes, activation, optimizer, norm label) and to B.
        Batch sizes without an entry fall back to the trials' in-trial step times.  Entries
        with an ``"adaptive"`` kind ("step", "setup") time the adaptive arm, matched by key
        (:func:`minigd.study.probe.adaptive_probe_jobs`).
    seed : int, keyword-only
        Seeds the bootstrap (pass the study's master seed); the result is deterministic.
    n_boot : int, keyword-only
        Bootstrap resamples (default :data:`N_BOOT`); 0 gives point estimates with
        ``lo``/``hi``/``wins`` None.

    Notes
    -----
    Returns a JSON-serialisable dict: ``{"n_trials", "n_failed", "failures",
    "architectures": [...], "norm_comparisons", "recommendation", "adaptive", "bootstrap"}``, one
    architecture entry per (sizes, activation, optimizer, norm) with its per-batch-size
    rows, ``answers`` (point values), ``headline`` (every headline number as
    ``{"value", "lo", "hi", "wins"}``) and ``recommendation`` (see the module docstring
    and the README's "What the study answers: summary.json").
    """
    # in key order: the store returns rows in the order trials finished, which differs
    # between two runs of the same study, and the answer must not
    rows = sorted(rows, key=lambda cr: cr[0].key)
    n_boot = int(n_boot)
    if n_boot < 0:
        raise ValueError(f"n_boot: expected an integer >= 0, got {n_boot}")
    groups = defaultdict(list)
    adaptive = defaultdict(list)
    failures = []
    for cfg, res in rows:
        if res.get("status") != "ok":
            failures.append({"trial": cfg.label, "error": res.get("error")})
            continue
        (adaptive if cfg.is_adaptive else groups)[_arch_key_of(cfg)].append((cfg, res))
    by_probe = defaultdict(lambda: defaultdict(list))
    adaptive_probe = {}
    for e in probe or []:
        if isinstance(e, dict) and e.get("adaptive") is not None:
            if isinstance(e.get("key"), str):
                adaptive_probe[e["key"]] = e
            continue
        try:
            k, B = _probe_key(e)
        except (KeyError, TypeError, ValueError):
            continue
        by_probe[k][B].append(e)
    archs = [
        _analyze_arch(k, v, by_probe.get(k), seed, n_boot, adaptive.get(k, []), adaptive_probe)
        for k, v in sorted(groups.items(), key=lambda kv: kv[0])
    ]
    timed = [a for a in archs if a["recommendation"]["time_to_target"]["value"] is not None]
    top = (
        min(timed, key=lambda a: a["recommendation"]["time_to_target"]["value"])
        if timed
        else (archs[0] if archs else None)
    )
    if top is None:
        rec = _empty_recommendation("No successful trials: there is nothing to recommend.")
    else:
        rec = dict(top["recommendation"])
        if len(archs) > 1:
            rec["text"] = (
                f"Of the {len(archs)} architectures, {_arch_words(top)} reaches the target in the least "
                f"time. " + rec["text"]
            )
    failed_fit = [
        a["bootstrap"]["fit_failed_fraction"] for a in archs if a["bootstrap"]["fit_failed_fraction"] is not None
    ]
    adaptive = None  # the adaptive run vs the recommended batch size, of the recommended architecture
    if top is not None and top.get("adaptive"):
        vs = top["adaptive"]["vs_fixed"]
        adaptive = {
            **{k: vs.get(k) for k in ("value", "lo", "hi", "wins")},
            "batch_size": vs.get("batch_size"),
            "architecture": top["recommendation"].get("architecture") or _arch_words(top),
        }
    return {
        "n_trials": len(rows),
        "n_failed": len(failures),
        "failures": failures[:50],
        "architectures": archs,
        "norm_comparisons": norm_comparisons(archs),
        "recommendation": rec,
        "adaptive": adaptive,
        "bootstrap": {
            "resamples": n_boot,
            "seed": seed,
            "interval": list(INTERVAL),
            "fit_failed_fraction": max(failed_fit) if failed_fit else None,
        },
    }


def norm_comparisons(archs) -> list:
    """Models that differ only in batch norm / ghost batch size / dropout, side by side
    per batch size: ``[{"base": label, "variants": [norm labels], "rows": [{"batch_size",
    "<variant>": {"final_val_accuracy", "final_val_loss", "steps_to_target"}}]}]``."""
    by_base = defaultdict(list)
    for a in archs:
        by_base[(tuple(a["sizes"]), a["activation"], a["optimizer"])].append(a)
    out = []
    for (sizes, act, opt), group in sorted(by_base.items()):
        if len(group) < 2:
            continue
        variants = [a.get("norm") or "plain" for a in group]
        batches = sorted({r["batch_size"] for a in group for r in a["per_batch"]})
        rows = []
        for B in batches:
            row = {"batch_size": B}
            for name, a in zip(variants, group):
                r = next((r for r in a["per_batch"] if r["batch_size"] == B), None)
                row[name] = (
                    None
                    if r is None
                    else {k: r.get(k) for k in ("final_val_accuracy", "final_val_loss", "steps_to_target", "seeds")}
                )
            rows.append(row)
        out.append({"base": f"{'-'.join(map(str, sizes))} {act} {opt}", "variants": variants, "rows": rows})
    return out


def _thread_label(res) -> str:
    if "blas_threads" not in res and "numba_threads" not in res:
        return "not recorded"
    return f"BLAS {res.get('blas_threads') or '?'} / Numba {res.get('numba_threads') or '?'}"


def _thread_mix(items):
    """A warning when the trials' timings were taken with different thread counts (a study
    resumed under another executor, or one that predates the record), else None."""
    counts = defaultdict(int)
    for _, res in items:
        counts[_thread_label(res)] += 1
    if len(counts) < 2:
        return None
    parts = ", ".join(f"{n} with {label}" for label, n in sorted(counts.items()))
    return (
        f"timings were taken with different thread counts ({parts} threads): wall times and "
        f"throughputs are not comparable across them; re-run the study into a fresh --out"
    )


def _tuning_label(items, lrs_per_b) -> str:
    """ "tuned", or how B_crit's learning rates were set when they were not tuned."""
    policies = {getattr(c, "lr_policy", "tuned") or "tuned" for c, _ in items}
    if len(policies) > 1:
        return "untuned (mixed learning-rate policies: " + ", ".join(sorted(policies)) + ")"
    (p,) = policies
    if p in ("linear", "sqrt"):
        return f"untuned ({p} rule)"
    if p == "fixed":
        return "untuned (fixed learning rate)"
    if lrs_per_b and all(n <= 1 for n in lrs_per_b):
        return "untuned (one learning rate per batch size)"
    return "tuned"


# --------------------------------------------------------------------------- words


def _fmt(x, unit=""):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "not measured"
    if math.isinf(x):
        return "unbounded" if x > 0 else "-unbounded"
    if abs(x) >= 100:
        s = f"{x:,.0f}"
    elif abs(x) >= 10:
        s = f"{x:.1f}".rstrip("0").rstrip(".")
    else:
        s = f"{x:.3g}"
    return s + unit


def fmt_duration(v) -> str:
    """Seconds in words: "850 µs", "12.3 ms", "4.2 s", "3.1 min"; "not reached" for inf."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "not measured"
    if math.isinf(v):
        return "not reached"
    if v < 1e-3:
        return f"{v * 1e6:.3g} µs"
    if v < 0.1:
        return f"{v * 1e3:.3g} ms"
    if v < 120:
        return f"{v:.3g} s"
    if v < 7200:
        return f"{v / 60:.3g} min"
    return f"{v / 3600:.3g} h"


def fmt_interval(d, fmt=_fmt) -> str:
    """``{"value", "lo", "hi"}`` in words: "12 ms [10 ms, 15 ms]" (no brackets without an
    interval)."""
    if not isinstance(d, dict) or d.get("value") is None:
        return fmt(None)
    s = fmt(d["value"])
    if d.get("lo") is not None and d.get("hi") is not None and (d["lo"] != d["value"] or d["hi"] != d["value"]):
        s += f" [{fmt(d['lo'])}, {fmt(d['hi'])}]"
    return s


def _pct(w):
    return "not measured" if w is None else f"{100 * w:.0f}%"


def _bs(x):
    if x is None:
        return "none"
    return f"{int(x)}" if float(x).is_integer() else f"{x:g}"


def _arch_words(a) -> str:
    sizes = "-".join(str(s) for s in a.get("sizes") or [])
    norm = f" ({a['norm']})" if a.get("norm") else ""
    return f"{sizes} {a.get('activation')} {a.get('optimizer')}{norm}"


def _target_words(metric, t) -> str:
    if metric is None or t is None:
        return "the target"
    if "accuracy" in str(metric):
        return f"{metric} >= {t:g}"
    return f"{metric} <= {t:g}"


def _empty_recommendation(text) -> dict:
    none = {"value": None, "lo": None, "hi": None, "wins": None}
    return {
        "batch_size": None,
        "lo": None,
        "hi": None,
        "wins": None,
        "time_to_target": dict(none),
        "fewest_examples": dict(none),
        "examples_to_target": dict(none),
        "critical_batch_size": dict(none),
        "critical_batch_size_tuning": None,
        "noise_scale_target": dict(none),
        "smallest_reasonable": dict(none),
        "resolvable": False,
        "edge": [],
        "architecture": None,
        "text": text,
    }


def _recommend(arch, cells: _Cells, point, R) -> dict:
    """The one batch size to use on this machine for this model and data, and why."""
    h = arch["headline"]
    tw = _target_words(arch["target_metric"], arch["target"])
    aw = _arch_words(arch)
    fast = h["fastest_wall_time"]
    if fast["value"] is None:
        reached_any = any(r["reached"] for r in arch["per_batch"])
        why = (
            "no batch size had a measured step time"
            if reached_any
            else "no batch size reached the target in most of its seeds at any learning rate tried"
        )
        rec = _empty_recommendation(
            f"No recommendation for {aw}: {why} ({tw}). Lower the target, train longer "
            f"(--max-epochs) or widen the learning rates tried."
        )
        rec["architecture"] = aw
        return rec
    B = fast["value"]
    b = cells.Bs.index(B)
    reached = [i for i, r in enumerate(arch["per_batch"]) if r["reached"] and r["time_to_target"] is not None]
    # resolvable: do the batch sizes' time ranges (steps x the probe's lo..hi step time) overlap everywhere?
    st = point["steps"][0]
    lo_t = [st[i] * cells.t_lo[i] for i in reached]
    hi_t = [st[i] * cells.t_hi[i] for i in reached]
    resolvable = len(reached) < 2 or not (max(lo_t) <= min(hi_t))
    edges = []
    Bmin, Bmax = cells.Bs[0], cells.Bs[-1]
    parts = []
    boot = R > 0
    if not boot:
        why_wins = ""
    elif fast["lo"] == fast["hi"]:
        why_wins = (
            f"; fastest in {_pct(fast['wins'])} of {R:,} bootstrap resamples (the fastest is batch "
            f"{_bs(fast['lo'])} in at least 90% of them)"
        )
    else:
        why_wins = (
            f"; fastest in {_pct(fast['wins'])} of {R:,} bootstrap resamples (in 90% of them the fastest "
            f"lies between batch {_bs(fast['lo'])} and {_bs(fast['hi'])})"
        )
    parts.append(
        f"Use batch size {_bs(B)} for {aw} on this machine: it reaches {tw} fastest, in "
        f"{fmt_interval(h['time_to_target'], fmt_duration)}{why_wins}."
    )
    if len(cells.Bs) > 1 and B in (Bmin, Bmax):
        side = "smallest" if B == Bmin else "largest"
        edges.append(f"fastest_wall_time at the {side} batch size swept")
        parts.append(
            f"It is the {side} batch size swept, so the fastest may lie outside what was measured "
            f"(extend --batch-sizes {'down' if side == 'smallest' else 'up'})."
        )
    if len(reached) == 1:
        parts.append("It is the only batch size that reached the target.")
    elif not resolvable:
        which = "both batch sizes" if len(reached) == 2 else f"all {len(reached)} batch sizes"
        parts.append(
            f"But the wall times to the target of {which} that reached it lie within "
            f"the timing's own spread ({fmt_duration(max(lo_t))} to {fmt_duration(min(hi_t))} fits every "
            f"one of them): this machine cannot resolve which is fastest, so any of them will do as well."
        )
    fe, ex = h["fewest_examples"], h["examples_to_target"]
    if fe["value"] is not None:
        parts.append(
            f"Fewest examples to the target: batch {_bs(fe['value'])} ({fmt_interval(ex)} examples"
            + (f"; fewest in {_pct(fe['wins'])} of resamples" if boot else "")
            + ")."
        )
    bc, label = h["critical_batch_size_fit"], arch["b_crit_tuning"]
    bs_t = h["noise_scale_target"]
    tag = "" if label == "tuned" else f", {label}"
    if bc["value"] is not None:
        bc_s = f"Critical batch size B_crit ≈ {fmt_interval(bc)} from the steps/examples trade-off fit{tag}"
        failed = arch["bootstrap"].get("fit_failed_fraction")
        if bc.get("unresolved"):
            bc_s += (
                f" (no interval: the fit failed in {100 * failed:.0f}% of the resamples, too few batch sizes "
                f"reaching the target with a tuned learning rate)"
            )
        if bc["value"] == 0 or math.isinf(bc["value"]) or bc["value"] < Bmin or bc["value"] > Bmax:
            edges.append("critical_batch_size outside the batch sizes swept")
            bc_s += f" (outside what was measured: {_bs(Bmin)}–{_bs(Bmax)})"
    else:
        fit = arch.get("tradeoff_fit") or {}
        bc_s = f"Critical batch size B_crit: not measured ({fit.get('error', 'no fit')})"
    parts.append(
        bc_s + f"; the gradient noise scale B_simple at the target is ≈ {fmt_interval(bs_t)} "
        f"(McCandlish et al. 2018; B_simple can underestimate B_crit, arXiv:2505.23971, so both are given)."
    )
    sr = h["smallest_reasonable"]
    if sr["value"] is not None:
        s = (
            f"Smallest reasonable batch size (within {REASONABLE_TIME_FACTOR:g}× the least time): "
            f"{_bs(sr['value'])}"
            + (f" [{_bs(sr['lo'])}, {_bs(sr['hi'])}], in {_pct(sr['wins'])} of resamples" if boot else "")
        )
        if len(cells.Bs) > 1 and sr["value"] == Bmin:
            edges.append("smallest_reasonable at the smallest batch size swept")
            s += " — the smallest swept: a smaller one may be reasonable too, outside what was measured"
        parts.append(s + ".")
    if arch["per_batch"][b]["timing"] == "in-trial":
        parts.append(
            "Its step time comes from the trials themselves (no throughput probe for it), timed with "
            "other trials running."
        )
    if R > 0 and arch["seeds_per_cell"] is not None and arch["seeds_per_cell"] < 2:
        parts.append(
            "With one seed per learning rate the intervals show only the timing's spread, not the "
            "seeds': run more --seeds."
        )
    return {
        "batch_size": fast["value"],
        "lo": fast["lo"],
        "hi": fast["hi"],
        "wins": fast["wins"],
        "time_to_target": {k: h["time_to_target"][k] for k in ("value", "lo", "hi")},
        "fewest_examples": dict(fe),
        "examples_to_target": {k: ex[k] for k in ("value", "lo", "hi")},
        "critical_batch_size": dict(bc),
        "critical_batch_size_tuning": label,
        "noise_scale_target": dict(bs_t),
        "smallest_reasonable": dict(sr),
        "resolvable": bool(resolvable),
        "edge": edges,
        "architecture": aw,
        "text": " ".join(parts),
    }


# --------------------------------------------------------------------------- one architecture


def _analyze_arch(key, items, probe_entries, seed, n_boot, adaptive_items=(), adaptive_probe=None) -> dict:
    sizes, activation, optimizer, norm = key
    cells = _Cells(items, probe_entries)
    target = None
    for cfg, _ in items:
        target = (cfg.target_metric, cfg.target)
    point = _select(cells, cells.medians())
    pfit_mask = point["fit_mask"][0]
    fit = _fit_point(point["steps"][0], point["examples"][0], pfit_mask)
    b_crit = fit.get("b_crit") if fit else None

    boot = None
    fit_failed = None
    rng = None
    R = n_boot
    if R > 0:
        rng = np.random.default_rng([int(seed) % 2**63, zlib.crc32(repr(key).encode())])
        bmed = cells.medians(rng, R)
        boot = _select(cells, bmed)
        # What using a batch size costs (its steps, examples, time to target) is read at the
        # learning rate the point estimate chose for it: re-selecting the best rate in every
        # resample takes a minimum over noisy medians, which sits at or below the point, so
        # the point would be the interval's upper end (a winner's curse, not uncertainty).
        # The selections (which batch size, which rate, B_crit) are re-run in full.
        at_point = np.broadcast_to(point["best"][0], boot["best"].shape)[..., None]
        st = np.take_along_axis(bmed["steps"], at_point, 2)[..., 0]
        with np.errstate(invalid="ignore", over="ignore"):
            boot["steps_at"] = st
            boot["examples_at"] = np.take_along_axis(bmed["examples"], at_point, 2)[..., 0]
            boot["time_at"] = np.where(np.isfinite(st), st * bmed["step_s"], np.inf)
        bs_min, be_min, bb = _fit_many(boot["steps"], boot["examples"], boot["fit_mask"])
        boot["s_min"], boot["e_min"], boot["b_crit"] = bs_min, be_min, bb
        fit_failed = float(np.mean(np.isnan(bb)))

    Bv = cells.B_arr
    sel_B = lambda idx: np.where(idx >= 0, Bv[np.clip(idx, 0, None)], np.nan)
    rows_per_b = []
    for b, B in enumerate(cells.Bs):
        lrs = cells.by_b[B]
        best = int(point["best"][0, b])
        best_lr = cells.lrs[b][best]
        trials = [r for _, r in lrs[best_lr]]
        all_trials = [r for t in lrs.values() for _, r in t]
        reached = bool(point["reached"][0, b])
        edge = {0: None, 1: "low", 2: "high"}[int(point["edge"][0, b])]
        steps, ex = float(point["steps"][0, b]), float(point["examples"][0, b])
        t_s = float(point["step_s"][0, b])
        time = float(point["time"][0, b]) if reached else None
        ivals = {}
        for name, arr, pv in (
            ("steps_to_target", "steps_at", steps if reached else None),
            ("examples_to_target", "examples_at", ex if reached else None),
            ("time_to_target", "time_at", time),
            ("step_time_s", "step_s", t_s),
        ):
            ivals[name] = _interval(pv, None if boot is None else boot[arr][:, b])
            ivals[name].pop("wins")
        ivals["best_lr"] = _interval(best_lr, None if boot is None else boot["best_lr"][:, b], selection=True)
        lr_results = {}
        for l, lr in enumerate(cells.lrs[b]):
            mst = float(np.median(cells.cells[b][l]["steps"]))
            lr_results[str(lr)] = {
                "median_steps": mst if math.isfinite(mst) else None,
                "reached_fraction": float(np.mean(np.isfinite(cells.cells[b][l]["steps"]))),
            }
        row = {
            "batch_size": B,
            "full_batch": any(c.full_batch for c, _ in lrs[best_lr]),
            "best_lr": best_lr,
            "lrs_tried": list(cells.lrs[b]),
            "seeds": len(trials),
            "reached": reached,
            "reached_fraction": sum(1 for r in trials if _reached(r)) / len(trials),
            "status": "reached the target" if reached else DID_NOT_REACH,
            "lr_edge": edge,
            "lr_tuned": False if edge else (True if len(cells.lrs[b]) > 1 else None),
            "in_fit": bool(pfit_mask[b]),
            "steps_to_target": steps if reached else None,
            "examples_to_target": ex if reached else None,
            "time_to_target": time if time is not None and math.isfinite(time) else None,
            "time_to_target_in_trial": _median([r.get("time_to_target") for r in trials if _reached(r)])
            if reached
            else None,
            "timing": cells.timing[b],
            "step_time_s": _opt(t_s),
            "step_time_lo_s": _opt(cells.t_lo[b]),
            "step_time_hi_s": _opt(cells.t_hi[b]),
            "final_val_accuracy": _median([r.get("final_val_accuracy") for r in trials]),
            "final_val_loss": _median([r.get("final_val_loss") for r in trials]),
            "final_train_loss": _median([r.get("final_train_loss") for r in trials]),
            "gen_gap_accuracy": _median([r.get("gen_gap_accuracy") for r in trials]),
            "gen_gap_loss": _median([r.get("gen_gap_loss") for r in trials]),
            "throughput": _opt(point["throughput"][0, b]) if math.isfinite(point["throughput"][0, b]) else None,
            "us_per_step": _opt(t_s * 1e6) if math.isfinite(t_s) else None,
            "us_per_step_in_trial": _median([r.get("us_per_step") for r in all_trials]),
            "throughput_in_trial": _median([r.get("throughput") for r in all_trials]),
            "memory_bytes": _median([r.get("memory_bytes") for r in all_trials]),
            "workspace_bytes": _median([r.get("workspace_bytes") for r in all_trials]),
            "noise_scale_start": _median([_noise_at(r, "start") for r in trials]),
            "noise_scale_middle": _median([_noise_at(r, "mid") for r in trials]),
            "noise_scale_target": _median([_noise_at(r, "target") for r in trials]),
            "noise_scale_end": _median([_noise_at(r, "end") for r in trials]),
            "lr_results": lr_results,
            "best_lr_at_grid_edge": edge is not None,
            "p_fastest": None if boot is None else float(np.mean(boot["fastest"] == b)),
            "p_reached": None if boot is None else float(np.mean(boot["reached"][:, b])),
            "intervals": ivals,
            "noise_curves": [r.get("noise") for r in trials][:4],
        }
        rows_per_b.append(row)

    noise_mid = _opt(point["noise_mid"][0])
    noise_tgt = _opt(point["noise_target"][0])
    finite_bc = b_crit is not None and math.isfinite(b_crit) and b_crit > 0
    for b, r in enumerate(rows_per_b):
        r["regime"] = regime(r["batch_size"], b_crit) if r["reached"] else None
        eff, gp = float(point["efficiency"][0, b]), float(point["goodput"][0, b])
        r["statistical_efficiency"] = eff if math.isfinite(eff) else None
        r["goodput"] = gp if math.isfinite(gp) else None
        if fit and "s_min" in fit and finite_bc:
            r["fit_steps"] = fit["s_min"] * (1 + b_crit / r["batch_size"])
            r["fit_examples"] = fit["e_min"] * (1 + r["batch_size"] / b_crit)

    def pick(name):
        i = int(point[name][0])
        return None if i < 0 else cells.Bs[i]

    ok = [r for r in rows_per_b if r["reached"]]
    best_val = (
        max(
            rows_per_b,
            key=lambda r: (
                r["final_val_accuracy"] if r["final_val_accuracy"] is not None else -(r["final_val_loss"] or 0)
            ),
        )
        if rows_per_b
        else None
    )
    answers = {
        "fastest_wall_time": pick("fastest"),
        "fewest_examples": pick("fewest_examples"),
        "fewest_steps": pick("fewest_steps"),
        "max_goodput": pick("max_goodput"),
        "critical_batch_size_fit": b_crit,
        "critical_batch_size_noise": noise_mid,
        "critical_batch_size_noise_target": noise_tgt,
        "smallest_reasonable": pick("smallest_reasonable"),
        "smallest_reaching_target": min((r["batch_size"] for r in ok), default=None),
        "best_final_validation": None if best_val is None else best_val["batch_size"],
    }

    def sel(name):
        return _interval(
            answers[{"fastest": "fastest_wall_time"}.get(name, name)],
            None if boot is None else sel_B(boot[name]),
            selection=True,
            as_int=True,
        )

    def at(point_idx_name, arr):
        """``arr`` at the batch size the point estimate selected (e.g. the time to target of
        the fastest batch size), over the resamples: what using that batch size costs."""
        i = int(point[point_idx_name][0])
        if i < 0:
            return _interval(None, None)
        return _interval(float(point[arr][0, i]), None if boot is None else boot[arr + "_at"][:, i])

    def cont(pv, arr):
        return _interval(pv, None if boot is None else boot[arr])

    fit_ok = fit and "b_crit" in fit
    headline = {
        "fastest_wall_time": sel("fastest"),
        "time_to_target": at("fastest", "time"),
        "fewest_examples": sel("fewest_examples"),
        "examples_to_target": at("fewest_examples", "examples"),
        "fewest_steps": sel("fewest_steps"),
        "steps_to_target": at("fewest_steps", "steps"),
        "critical_batch_size_fit": cont(fit["b_crit"] if fit_ok else None, "b_crit"),
        "s_min": cont(fit["s_min"] if fit_ok else None, "s_min"),
        "e_min": cont(fit["e_min"] if fit_ok else None, "e_min"),
        "critical_batch_size_noise": cont(noise_mid, "noise_mid"),
        "noise_scale_target": cont(noise_tgt, "noise_target"),
        "max_goodput": sel("max_goodput"),
        "smallest_reasonable": sel("smallest_reasonable"),
    }
    for k in ("time_to_target", "examples_to_target", "steps_to_target"):
        headline[k]["wins"] = None

    warnings = []
    edge = [r["batch_size"] for r in rows_per_b if r["lr_edge"]]
    if edge:
        warnings.append(
            f"LR not tuned: the best learning rate is at the edge of the rates tried for batch sizes "
            f"{edge}: they are left out of the trade-off fit and their steps to target may be "
            f"overstated; widen --lr-grid"
        )
    missing = [r["batch_size"] for r in rows_per_b if r["reached"] and r["timing"] == "in-trial"]
    if missing:
        warnings.append(
            f"no throughput probe for batch sizes {missing}: their wall times use the trials' in-trial "
            f"step times (timing: in-trial), measured with other trials running"
        )
    not_reached = [r["batch_size"] for r in rows_per_b if not r["reached"]]
    if not_reached:
        warnings.append(f"batch sizes {not_reached} {DID_NOT_REACH} (median over seeds at their best learning rate)")
    threads = _thread_mix(items)
    if threads:
        warnings.append(threads)
    if fit_failed is not None and fit_failed > 1 - (INTERVAL[1] - INTERVAL[0]):
        # more resamples without a fit than a 90% interval can leave out: the resamples that
        # did fit are the ones that reproduce the point, so their spread would look certain
        warnings.append(
            f"the trade-off fit failed in {100 * fit_failed:.0f}% of bootstrap resamples (too few batch "
            f"sizes reached the target with a tuned learning rate): B_crit, S_min and E_min have no "
            f"interval (unresolved)"
        )
        for k in ("critical_batch_size_fit", "s_min", "e_min"):
            if headline[k]["value"] is not None:
                headline[k].update(lo=None, hi=None, unresolved=True)
    if norm and norm.startswith("BN"):
        warnings.append(
            "B_simple is not measured with batch norm: a per-example gradient is undefined when every "
            "example's output depends on the batch's statistics (goodput is not computed either)"
        )
    label = _tuning_label(items, [len(x) for x in cells.lrs])
    if label != "tuned" and fit_ok:
        warnings.append(f"B_crit is {label}: McCandlish et al. fit it with the learning rate tuned per batch size")
    # seeds a cell actually holds (its arrays are aligned on all the study's seeds, NaN where
    # a trial is missing: failed or not run)
    seeds_per_cell = min(
        (int(np.count_nonzero(~np.isnan(c["steps"]))) for row in cells.cells for c in row), default=None
    )

    arch = {
        "warnings": warnings,
        "sizes": list(sizes),
        "activation": activation,
        "optimizer": optimizer,
        "norm": norm,
        "target_metric": target[0] if target else None,
        "target": target[1] if target else None,
        "n_trials": len(items),
        "lr_policy": sorted({getattr(c, "lr_policy", "tuned") or "tuned" for c, _ in items}),
        "b_crit_tuning": label,
        "seeds_per_cell": seeds_per_cell,
        "per_batch": rows_per_b,
        "tradeoff_fit": fit,
        "noise_scale": {
            "start": _median([r["noise_scale_start"] for r in rows_per_b]),
            "middle": noise_mid,
            "target": noise_tgt,
            "end": _median([r["noise_scale_end"] for r in rows_per_b]),
        },
        "answers": answers,
        "headline": headline,
        "bootstrap": {"resamples": R, "seed": seed, "interval": list(INTERVAL), "fit_failed_fraction": fit_failed},
    }
    arch["recommendation"] = _recommend(arch, cells, point, R)
    arch["adaptive"] = None
    if adaptive_items:  # the adaptive arm: one more row, out of every fit and selection
        from ._adaptive import adaptive_text, analyze_adaptive

        row = analyze_adaptive(adaptive_items, cells, point, boot, rng, R, rows_per_b, adaptive_probe or {})
        arch["adaptive"] = row
        if row is not None:
            headline["adaptive_vs_fixed"] = {k: row["vs_fixed"].get(k) for k in ("value", "lo", "hi", "wins")}
            if row.get("lr_edge"):
                warnings.append(
                    f"LR not tuned (adaptive): its best learning rate is at the {row['lr_edge']} edge of "
                    f"the rates tried; its time to target may be overstated"
                )
            if row.get("timing") == "in-trial":
                warnings.append(
                    "no throughput probe for the adaptive run: its wall time uses the trials' in-trial "
                    "step and set-up times, measured with other trials running"
                )
            text = adaptive_text(row)
            if text and arch["recommendation"].get("text"):
                arch["recommendation"]["text"] += " " + text
    return arch
