"""The adaptive arm of the analysis: ``fit(batch_size="adaptive")`` next to the fixed batch sizes.

An adaptive trial (:meth:`minigd.study.SweepSpec.adaptive_trials`) starts at the arm's
smallest batch size and lets the controller of :mod:`minigd.adaptive` change it.  Its
numbers, per architecture:

* **steps and examples to target**: as for a fixed batch size (interpolated between the
  evaluations that bracket the target);
* **wall time to target** = the controller's one-time set-up + sum over the batch sizes B
  it ran at of (steps at B before the target) x (the step time of an adaptive run at B).
  Both times come from the throughput probe (:mod:`minigd.study.probe`: ``"step"`` entries,
  an adaptive run held at B with its noise tracking and decisions on; the ``"setup"``
  entry, the seconds ``fit`` spends up to its first decision beyond a held run's -- the
  warm-up of every candidate and that decision; with ``throughput="probe"`` also the probe
  of the sizes it reaches), so they are
  timed as the fixed batch sizes are: one thread, nothing else running.  Without probe
  entries, the trials' own timings (``timing: "in-trial"``).  A step that holds fewer rows
  (an epoch's last) is costed at the batch size in force: slightly pessimistic for the
  adaptive run;
* **best learning rate**: the rate with the least median wall time to target over seeds
  (not reaching it = infinitely long; ties: higher median validation accuracy, then the
  smaller rate).  A fixed batch size's rate is chosen on steps, which at one batch size
  orders rates exactly as wall time does; an adaptive run's steps are of different sizes,
  so its rate is chosen on what the comparison is about;
* **the comparison**: the ratio adaptive time / the time of the fixed batch size the study
  recommends (the fastest; its time read at its own best rate), with a bootstrap interval,
  and ``wins``: the fraction of resamples where the adaptive run was faster.  The resamples
  are the fixed arms' own (:mod:`minigd.study.analysis`): the study's seeds are drawn with
  replacement once per resample and both arms take the trials of the drawn seeds; the
  probe's rounds are resampled per batch size (and the set-up's rounds), after the fixed
  arms' draws, so adding the arm leaves every fixed number unchanged.  ``loop_ratio`` is
  the same ratio without the one-time set-up (the part that does not grow with the
  problem).

The adaptive run is not a batch size: it is left out of the trade-off fit, the regimes,
and every selection among batch sizes.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .analysis import _nanmed, _num  # (analysis imports this module only inside a function)

#: points of each learning curve kept in the analysis (for the report's figure)
CURVE_POINTS = 80
#: seeds whose decisions and learning curves the analysis keeps
TRAJECTORY_SEEDS = 5


def _record(res) -> dict:
    a = res.get("adaptive")
    return a if isinstance(a, dict) else {}


def _pairs(v) -> list:
    """``[[number, number], ...]`` of a stored record, the malformed items dropped."""
    out = []
    for p in v or ():
        if isinstance(p, (list, tuple)) and len(p) >= 2:
            a, b = _num(p[0]), _num(p[1])
            if math.isfinite(a) and math.isfinite(b):
                out.append((a, b))
    return out


def _thin(curve, cap=CURVE_POINTS) -> list:
    curve = [p for p in (curve or []) if isinstance(p, dict)]
    if len(curve) <= cap:
        return curve
    idx = np.unique(np.linspace(0, len(curve) - 1, cap).round().astype(int))
    return [curve[i] for i in idx]


class AdaptiveCells:
    """One architecture's adaptive trials as arrays over (learning rate, seed), the seeds
    aligned on the fixed arms' (``seeds``; an adaptive trial of another seed is left out)."""

    def __init__(self, items, seeds, probe_by_key):
        from .probe import adaptive_probe_key, pinned

        by_lr = defaultdict(list)
        for cfg, res in items:
            by_lr[float(cfg.lr)].append((cfg, res))
        self.items = items
        self.by_lr = by_lr
        self.lrs = sorted(by_lr)
        self.seeds = list(seeds)
        pos = {sd: i for i, sd in enumerate(self.seeds)}
        Bs = set()
        for _, res in items:
            Bs |= {int(b) for b, w in _pairs(_record(res).get("steps_by_batch")) if w > 0}
        self.Bs = sorted(Bs)
        col = {b: j for j, b in enumerate(self.Bs)}
        L, n, C = len(self.lrs), len(self.seeds), len(self.Bs)
        self.W = np.zeros((L, n, C))
        self.present = np.zeros((L, n), bool)
        self.reached = np.zeros((L, n), bool)
        self.steps = np.full((L, n), np.nan)
        self.examples = np.full((L, n), np.nan)
        self.acc = np.full((L, n), np.nan)
        self.setup_own = np.full((L, n), np.nan)
        self.trial = [[None] * n for _ in range(L)]
        from .analysis import _examples, _reached, _steps

        for l, lr in enumerate(self.lrs):
            for cfg, res in sorted(by_lr[lr], key=lambda cr: cr[0].key, reverse=True):
                i = pos.get(int(cfg.seed))
                if i is None:
                    continue
                rec = _record(res)
                sb = _pairs(rec.get("steps_by_batch"))
                ok = _reached(res) and bool(sb)
                self.present[l, i] = True
                self.trial[l][i] = (cfg, res)
                self.reached[l, i] = ok
                self.steps[l, i] = _steps(res) if ok else math.inf
                self.examples[l, i] = _examples(res, math.nan) if ok else math.inf
                self.acc[l, i] = _num(res.get("final_val_accuracy"))
                self.setup_own[l, i] = _num(rec.get("setup_s"))
                for b, w in sb:
                    if int(b) in col:
                        self.W[l, i, col[int(b)]] += w
        # step time per batch size and the one-time set-up: the probe's rounds, else the trials'
        rep = items[0][0] if items else None
        self.timing = "probe"
        self.t_samples = []
        for b in self.Bs:
            e = probe_by_key.get(adaptive_probe_key(pinned(rep, b), "step")) if rep is not None else None
            rounds = [float(x) for x in (e or {}).get("round_s") or [] if _num(x) > 0]
            if not rounds and e and _num(e.get("median_s")) > 0:
                rounds = [float(e["median_s"])]
            if not rounds:
                self.timing = "in-trial"
                own = [
                    s
                    for _, res in items
                    for bb, s in _pairs(_record(res).get("step_s_by_batch"))
                    if int(bb) == b and s > 0
                ]
                rounds = own or [math.nan]
            self.t_samples.append(np.asarray(rounds, np.float64))
        e = probe_by_key.get(adaptive_probe_key(rep, "setup")) if rep is not None else None
        rounds = [float(x) for x in (e or {}).get("round_s") or [] if _num(x) >= 0]
        if not rounds:
            self.timing = "in-trial"
            own = self.setup_own[self.present & np.isfinite(self.setup_own)]
            rounds = list(own) or [math.nan]
        self.setup_samples = np.asarray(rounds, np.float64)

    # -- medians over seeds -----------------------------------------------------------------
    def medians(self, idx, T, setup):
        """Per-rate medians over the seeds of ``idx`` ((R, n) seed positions, or None: all)
        with step times ``T`` (R, C) and set-up ``setup`` (R,): arrays (R, L) of time,
        loop time (no set-up), steps, examples, accuracy."""
        R = T.shape[0]
        L, n = self.steps.shape
        out = {k: np.full((R, max(L, 1)), np.nan) for k in ("time", "loop", "steps", "examples", "acc")}
        for l in range(L):
            with np.errstate(invalid="ignore", over="ignore"):
                loop = np.einsum("ic,rc->ri", self.W[l], T)  # (R, n) per seed
                loop = np.where(self.reached[l][None], loop, np.inf)
                loop = np.where(self.present[l][None], loop, np.nan)
                tot = loop + setup[:, None]
            for name, per_seed in (("loop", loop), ("time", tot)):
                sample = per_seed if idx is None else np.take_along_axis(per_seed, idx, axis=1)
                out[name][:, l] = _nanmed(sample, axis=1)
            for name, arr in (("steps", self.steps[l]), ("examples", self.examples[l]), ("acc", self.acc[l])):
                a = np.where(self.present[l], arr, np.nan)
                sample = np.broadcast_to(a, (R, n)) if idx is None else a[idx]
                out[name][:, l] = _nanmed(sample, axis=1)
        for name in ("time", "loop", "steps"):
            out[name] = np.where(np.isnan(out[name]), np.inf, out[name])  # no trial of the drawn seeds
        out["acc"] = np.where(np.isnan(out["acc"]), 0.0, out["acc"])
        return out

    def times(self, rng=None, R=1):
        """Step times (R, C) and set-up (R,): the medians of the rounds, or of ``R``
        resamples of them (``rng``)."""
        T = np.empty((R, len(self.Bs)))
        for c, s in enumerate(self.t_samples):
            k = s.shape[0]
            sample = np.broadcast_to(s, (R, k)) if rng is None else s[rng.integers(0, k, size=(R, k))]
            T[:, c] = _nanmed(sample, axis=1)
        s = self.setup_samples
        k = s.shape[0]
        sample = np.broadcast_to(s, (R, k)) if rng is None else s[rng.integers(0, k, size=(R, k))]
        return T, _nanmed(sample, axis=1)

    def select(self, med):
        """The best rate per resample: least median time, ties to the higher accuracy, then
        the smaller rate.  Returns (R,) indices."""
        t, a = med["time"], med["acc"]
        cand = t == t.min(axis=1, keepdims=True)
        acc = np.where(cand, a, -np.inf)
        cand &= acc == acc.max(axis=1, keepdims=True)
        return np.argmax(cand, axis=1)


def analyze_adaptive(items, cells, point, boot, rng, R, fixed_rows, probe_by_key) -> dict | None:
    """The adaptive row of one architecture (see the module doc), or None without adaptive
    trials.  ``cells``/``point``/``boot``: the fixed arms' (``boot`` None without a
    bootstrap; ``cells.boot_idx`` the seeds its resamples drew); ``rng``: the bootstrap's
    generator, after the fixed arms' draws; ``fixed_rows``: the fixed arms' per-batch rows;
    ``probe_by_key``: the adaptive probe entries by key."""
    from .analysis import DID_NOT_REACH, _interval, _median, _noise_at, _opt, _reached

    if not items:
        return None
    ac = AdaptiveCells(items, cells.seeds, probe_by_key)
    if not ac.lrs:
        return None
    T0, S0 = ac.times()
    pm = ac.medians(None, T0, S0)
    best = int(ac.select(pm)[0])
    lr = ac.lrs[best]
    reached = bool(np.isfinite(pm["steps"][0, best]))
    time = float(pm["time"][0, best]) if reached else None
    loop = float(pm["loop"][0, best]) if reached else None
    nlr = len(ac.lrs)
    edge = ("low" if best == 0 else "high" if best == nlr - 1 else None) if reached and nlr > 1 else None

    f = int(point["fastest"][0])
    fixed_B = cells.Bs[f] if f >= 0 else None
    fixed_t = float(point["time"][0, f]) if f >= 0 else None
    bm = None
    if R > 0 and boot is not None:
        T, S = ac.times(rng, R)
        bm = ac.medians(cells.boot_idx, T, S)
        bsel = ac.select(bm)

    def iv(name, value):
        d = _interval(value, None if bm is None else bm[name][:, best])
        d.pop("wins")
        return d

    ivals = {
        "steps_to_target": iv("steps", float(pm["steps"][0, best]) if reached else None),
        "examples_to_target": iv("examples", float(pm["examples"][0, best]) if reached else None),
        "time_to_target": iv("time", time),
        "loop_time_to_target": iv("loop", loop),
        "best_lr": _interval(lr, None if bm is None else np.asarray(ac.lrs)[bsel], selection=True),
    }

    def ratio(arr, value):
        if fixed_B is None or value is None or not fixed_t:
            return _interval(None, None)
        pv = value / fixed_t
        if bm is None:
            return _interval(pv, None)
        A, F = bm[arr][:, best], boot["time_at"][:, f]
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(np.isinf(A) & np.isinf(F), np.nan, A / F)
        d = _interval(pv, r)
        d["wins"] = float(np.mean(A < F))
        return d

    vs = ratio("time", time)
    vs_loop = ratio("loop", loop)
    trials = [ac.trial[best][i] for i in range(len(ac.seeds)) if ac.trial[best][i] is not None]
    res_at = [r for _, r in trials]
    all_res = [r for _, r in items]
    finals = [_num(_record(r).get("final_batch_size")) for r in res_at]
    maxes = [_num(_record(r).get("max_batch_size")) for r in res_at]
    t_b = T0[0]
    row = {
        "batch_size": "adaptive",
        "start_batch_size": min(
            (int(c) for r in all_res for c in (_record(r).get("candidates") or [])[:1]), default=None
        ),
        "candidates": next(
            (list(_record(r).get("candidates")) for r in all_res if isinstance(_record(r).get("candidates"), list)),
            None,
        ),
        "settings": {k: v for k, v in items[0][0].adaptive},
        "best_lr": lr,
        "lrs_tried": list(ac.lrs),
        "seeds": len(res_at),
        "reached": reached,
        "reached_fraction": sum(1 for r in res_at if _reached(r)) / len(res_at) if res_at else 0.0,
        "status": "reached the target" if reached else DID_NOT_REACH,
        "lr_edge": edge,
        "lr_tuned": False if edge else (True if nlr > 1 else None),
        "in_fit": False,
        "regime": None,
        "steps_to_target": ivals["steps_to_target"]["value"],
        "examples_to_target": ivals["examples_to_target"]["value"],
        "time_to_target": time if time is not None and math.isfinite(time) else None,
        "loop_time_to_target": loop if loop is not None and math.isfinite(loop) else None,
        "setup_s": _opt(S0[0]),
        "time_to_target_in_trial": _median([r.get("time_to_target") for r in res_at if _reached(r)])
        if reached
        else None,
        "timing": ac.timing,
        "step_time_by_batch": {str(b): _opt(t) for b, t in zip(ac.Bs, t_b)},
        "steps_by_batch": {
            str(b): _opt(float(np.median(ac.W[best][ac.present[best], j]))) if ac.present[best].any() else None
            for j, b in enumerate(ac.Bs)
        },
        "final_batch_size": _median(finals),
        "max_batch_size": _median(maxes),
        "final_val_accuracy": _median([r.get("final_val_accuracy") for r in res_at]),
        "final_val_loss": _median([r.get("final_val_loss") for r in res_at]),
        "final_train_loss": _median([r.get("final_train_loss") for r in res_at]),
        "gen_gap_accuracy": _median([r.get("gen_gap_accuracy") for r in res_at]),
        "gen_gap_loss": _median([r.get("gen_gap_loss") for r in res_at]),
        "memory_bytes": _median([r.get("memory_bytes") for r in all_res]),
        "workspace_bytes": _median([r.get("workspace_bytes") for r in all_res]),
        "noise_scale_start": _median([_noise_at(r, "start") for r in res_at]),
        "noise_scale_middle": _median([_noise_at(r, "mid") for r in res_at]),
        "noise_scale_target": _median([_noise_at(r, "target") for r in res_at]),
        "lr_results": {
            str(x): {
                "median_time_s": _opt(pm["time"][0, l]) if np.isfinite(pm["time"][0, l]) else None,
                "reached_fraction": float(np.mean(ac.reached[l][ac.present[l]])) if ac.present[l].any() else 0.0,
            }
            for l, x in enumerate(ac.lrs)
        },
        "p_reached": None if bm is None else float(np.mean(np.isfinite(bm["steps"][:, best]))),
        "intervals": ivals,
        "vs_fixed": dict(vs, batch_size=fixed_B, fixed_time_to_target=fixed_t),
        "vs_fixed_loop": dict(vs_loop, batch_size=fixed_B),
        "noise_curves": [r.get("noise") for r in res_at][:4],
        "trajectories": [
            {
                "seed": int(c.seed),
                "start": int((_record(r).get("candidates") or [0])[0]),
                "decisions": _record(r).get("decisions") or [],
                "steps": r.get("steps"),
                "reached_at": r.get("steps_to_target_interp"),
            }
            for c, r in trials[:TRAJECTORY_SEEDS]
        ],
        "curves": [{"seed": int(c.seed), "curve": _thin(r.get("curve"))} for c, r in trials[:TRAJECTORY_SEEDS]],
    }
    if fixed_B is not None:  # the learning curves of the recommended fixed batch size, for the figure
        fr = next((x for x in fixed_rows if x["batch_size"] == fixed_B), None)
        lrs_b = cells.by_b.get(fixed_B, {})
        fixed_trials = sorted(lrs_b.get(fr["best_lr"], []) if fr else [], key=lambda cr: cr[0].seed)
        row["fixed_curves"] = [
            {"seed": int(c.seed), "curve": _thin(r.get("curve"))} for c, r in fixed_trials[:TRAJECTORY_SEEDS]
        ]
    return row


def adaptive_text(row) -> str:
    """One sentence on the adaptive run against the recommended fixed batch size ("" when
    there is nothing to compare)."""
    from .analysis import _bs, _pct, fmt_duration, fmt_interval

    if not row:
        return ""
    vs = row.get("vs_fixed") or {}
    start = row.get("start_batch_size")
    head = f"The adaptive batch size (fit(batch_size='adaptive'), starting at {_bs(start)})"
    if not row.get("reached"):
        return f"{head} did not reach the target in most of its seeds at any learning rate tried."
    t = fmt_interval(row["intervals"]["time_to_target"], fmt_duration)
    if vs.get("value") is None:
        return f"{head} reached the target in {t}."
    r = fmt_interval(vs, lambda x: "not measured" if x is None else "unbounded" if math.isinf(x) else f"{x:.2f}×")
    s = f"{head} reached it in {t}, {r} the time of batch {_bs(vs.get('batch_size'))}" + (
        f", faster in {_pct(vs.get('wins'))} of resamples" if vs.get("wins") is not None else ""
    )
    setup = row.get("setup_s")
    loop = row.get("vs_fixed_loop") or {}
    if setup is not None and loop.get("value") is not None:
        s += (
            f" (of which {fmt_duration(setup)} is its one-time set-up, the warm-up and its first "
            f"decision; without it {loop['value']:.2f}×)"
        )
    return s + "."


def adaptive_best_lr(items) -> dict | None:
    """The adaptive arm's best learning rate from its trials alone (in-trial timings: what
    :func:`minigd.study.lr_extensions` decides on before the probe runs): ``{"best_lr",
    "lrs_tried", "at_edge": "low" | "high" | None, "reached"}``, or None without trials."""
    items = [(c, r) for c, r in items if c.is_adaptive and r.get("status", "ok") == "ok"]
    if not items:
        return None
    ac = AdaptiveCells(items, sorted({int(c.seed) for c, _ in items}), {})
    T, S = ac.times()
    med = ac.medians(None, T, S)
    best = int(ac.select(med)[0])
    reached = bool(np.isfinite(med["steps"][0, best]))
    n = len(ac.lrs)
    edge = ("low" if best == 0 else "high" if best == n - 1 else None) if reached and n > 1 else None
    return {"best_lr": ac.lrs[best], "lrs_tried": list(ac.lrs), "at_edge": edge, "reached": reached}
