"""Turn stored trials into answers: which batch size, and why.

Per architecture and batch size the learning rate is the one that reached the target in
the fewest steps (median over seeds; the protocol of Shallue et al. 2018,
arXiv:1811.03600).  From those points:

* the steps/examples trade-off (S/S_min - 1)(E/E_min - 1) = 1 is fitted, giving S_min,
  E_min and B_crit = E_min/S_min (McCandlish et al. 2018, arXiv:1812.06162), compared with
  the measured gradient noise scale B_simple = tr(Sigma)/|G|^2;
* regimes: *perfect scaling* where doubling the batch still roughly halves the steps
  (B <= B_crit/3), *no benefit* where steps have stopped falling (B >= 3 B_crit),
  *diminishing returns* in between (on the fitted curve, doubling B cuts steps by 62-87%
  of a halving at those bounds);
* goodput(B) = measured throughput(B) x statistical efficiency E(B) =
  (B_simple + B0)/(B_simple + B) (Pollux, Qiao et al. 2021, arXiv:2008.12260), B0 the
  smallest batch size swept; the batch size maximising it;
* the batch sizes with the least wall time and the fewest examples to target (a trial's
  time to target is its steps to target times its median step time: every step at one
  batch size does the same work, and the median drops interference from other processes;
  the raw measured sum is stored as ``time_to_target_measured``);
* the *smallest reasonable* batch size: the smallest one that reaches the target within
  twice the best measured time to target;
* generalisation: final validation metric and train/validation gap per batch size.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from minigd.gradstats import fit_tradeoff, statistical_efficiency

REASONABLE_TIME_FACTOR = 2.0
PERFECT_BELOW = 1 / 3
NO_BENEFIT_ABOVE = 3.0


def _median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.median(xs)) if xs else None


def _steps_or_inf(r):
    return r["steps_to_target"] if r.get("status") == "ok" and r.get("reached") else math.inf


def regime(B, b_crit) -> str:
    if b_crit is None or not math.isfinite(b_crit) or b_crit <= 0:
        return "unknown"
    if B <= PERFECT_BELOW * b_crit:
        return "perfect scaling"
    if B >= NO_BENEFIT_ABOVE * b_crit:
        return "no benefit"
    return "diminishing returns"


def _noise_at(res, where):
    pts = res.get("noise") or []
    if not pts:
        return None
    if where == "start":
        return pts[0]["noise_scale"]
    if where == "end":
        return pts[-1]["noise_scale"]
    half = pts[-1]["step"] / 2
    return min(pts, key=lambda p: abs(p["step"] - half))["noise_scale"]


def analyze(rows) -> dict:
    """Analyse stored trials: ``rows`` is ``ResultStore.rows()`` (config, result) pairs.

    Returns a JSON-serialisable dict: ``{"architectures": [...], "n_trials", "n_failed",
    "failures": [...]}``, one entry per (sizes, activation) with per-batch-size rows and
    the answers (see the module docstring).
    """
    groups = defaultdict(list)
    failures = []
    for cfg, res in rows:
        if res.get("status") != "ok":
            failures.append({"trial": cfg.label, "error": res.get("error")})
            continue
        groups[(tuple(cfg.sizes), cfg.activation, cfg.optimizer, cfg.norm_label)].append((cfg, res))
    archs = [_analyze_arch(k, v) for k, v in sorted(groups.items(), key=lambda kv: kv[0])]
    return {"n_trials": len(rows), "n_failed": len(failures), "failures": failures[:50],
            "architectures": archs, "norm_comparisons": norm_comparisons(archs)}


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
                row[name] = None if r is None else {k: r.get(k) for k in (
                    "final_val_accuracy", "final_val_loss", "steps_to_target", "seeds")}
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
    return (f"timings were taken with different thread counts ({parts} threads): wall times and "
            f"throughputs are not comparable across them; re-run the study into a fresh --out")


def _analyze_arch(key, items) -> dict:
    sizes, activation, optimizer, norm = key
    by_b = defaultdict(lambda: defaultdict(list))
    target = None
    for cfg, res in items:
        by_b[cfg.batch_size][cfg.lr].append((cfg, res))
        target = (cfg.target_metric, cfg.target)
    per_b = []
    for B in sorted(by_b):
        lrs = by_b[B]
        scored = []
        for lr, trials in lrs.items():
            steps = [_steps_or_inf(r) for _, r in trials]
            med = float(np.median(steps))
            scored.append((med, -(_median([r.get("final_val_accuracy") for _, r in trials]) or 0), lr))
        scored.sort()
        best_lr = scored[0][2]
        trials = [r for _, r in lrs[best_lr]]
        all_trials = [r for t in lrs.values() for _, r in t]
        reached = [r for r in trials if r.get("reached")]
        row = {
            "batch_size": B,
            "full_batch": any(c.full_batch for c, _ in lrs[best_lr]),
            "best_lr": best_lr,
            "lrs_tried": sorted(lrs),
            "seeds": len(trials),
            "reached_fraction": len(reached) / len(trials),
            "steps_to_target": _median([r["steps_to_target"] for r in reached]) if len(reached) * 2 > len(trials) else None,
            "examples_to_target": _median([r["examples_to_target"] for r in reached]) if len(reached) * 2 > len(trials) else None,
            "time_to_target": _median([r["time_to_target"] for r in reached]) if len(reached) * 2 > len(trials) else None,
            "final_val_accuracy": _median([r.get("final_val_accuracy") for r in trials]),
            "final_val_loss": _median([r.get("final_val_loss") for r in trials]),
            "final_train_loss": _median([r.get("final_train_loss") for r in trials]),
            "gen_gap_accuracy": _median([r.get("gen_gap_accuracy") for r in trials]),
            "gen_gap_loss": _median([r.get("gen_gap_loss") for r in trials]),
            "throughput": _median([r.get("throughput") for r in all_trials]),
            "us_per_step": _median([r.get("us_per_step") for r in all_trials]),
            "memory_bytes": _median([r.get("memory_bytes") for r in all_trials]),
            "workspace_bytes": _median([r.get("workspace_bytes") for r in all_trials]),
            "noise_scale_start": _median([_noise_at(r, "start") for r in trials]),
            "noise_scale_middle": _median([_noise_at(r, "middle") for r in trials]),
            "noise_scale_end": _median([_noise_at(r, "end") for r in trials]),
            "lr_results": {str(lr): {"median_steps": (m if math.isfinite(m) else None)} for m, _, lr in scored},
            "best_lr_at_grid_edge": len(lrs) > 1 and best_lr in (min(lrs), max(lrs)),
            "noise_curves": [r.get("noise") for r in trials][:4],
        }
        per_b.append(row)
    ok = [r for r in per_b if r["steps_to_target"] is not None]
    fit = None
    if len(ok) >= 3 and len({r["batch_size"] for r in ok}) >= 2:
        try:
            f = fit_tradeoff([r["steps_to_target"] for r in ok], [r["examples_to_target"] for r in ok])
            fit = {"s_min": f.s_min, "e_min": f.e_min, "b_crit": f.b_crit, "residual": f.residual}
        except ValueError as exc:
            fit = {"error": str(exc)}
    b_crit = fit.get("b_crit") if fit else None
    noise_mid = _median([r["noise_scale_middle"] for r in per_b])
    noise_start = _median([r["noise_scale_start"] for r in per_b])
    b0 = per_b[0]["batch_size"] if per_b else 1
    for r in per_b:
        r["regime"] = regime(r["batch_size"], b_crit)
        if noise_mid is not None and r["throughput"] is not None and noise_mid > 0:
            eff = float(statistical_efficiency(noise_mid, r["batch_size"], b0))
            r["statistical_efficiency"] = eff
            r["goodput"] = r["throughput"] * eff
        else:
            r["statistical_efficiency"] = r["goodput"] = None
        if fit and "s_min" in fit and b_crit not in (None, 0) and math.isfinite(b_crit):
            r["fit_steps"] = fit["s_min"] * (1 + b_crit / r["batch_size"])
            r["fit_examples"] = fit["e_min"] * (1 + r["batch_size"] / b_crit)
    timed = [r for r in ok if r["time_to_target"] is not None]
    fastest = min(timed, key=lambda r: r["time_to_target"]) if timed else None
    fewest = min(ok, key=lambda r: r["examples_to_target"]) if ok else None
    fewest_steps = min(ok, key=lambda r: r["steps_to_target"]) if ok else None
    goodput = [r for r in per_b if r.get("goodput")]
    best_goodput = max(goodput, key=lambda r: r["goodput"]) if goodput else None
    reasonable = None
    if fastest:
        ok_time = [r for r in timed if r["time_to_target"] <= REASONABLE_TIME_FACTOR * fastest["time_to_target"]]
        reasonable = min(ok_time, key=lambda r: r["batch_size"])
    smallest_reaching = min(ok, key=lambda r: r["batch_size"]) if ok else None
    best_val = max(per_b, key=lambda r: r["final_val_accuracy"] if r["final_val_accuracy"] is not None
                   else -(r["final_val_loss"] or 0)) if per_b else None
    pick = lambda r: None if r is None else r["batch_size"]
    warnings = []
    edge = [r["batch_size"] for r in per_b if r["best_lr_at_grid_edge"] and r["steps_to_target"] is not None]
    if edge:
        warnings.append(f"the best learning rate is at the edge of the grid tried for batch sizes {edge}: "
                        f"their steps to target may be overstated; widen --lr-grid")
    threads = _thread_mix(items)
    if threads:
        warnings.append(threads)
    return {
        "warnings": warnings,
        "sizes": list(sizes), "activation": activation, "optimizer": optimizer, "norm": norm,
        "target_metric": target[0] if target else None, "target": target[1] if target else None,
        "n_trials": len(items),
        "per_batch": per_b,
        "tradeoff_fit": fit,
        "noise_scale": {"start": noise_start, "middle": noise_mid,
                        "end": _median([r["noise_scale_end"] for r in per_b])},
        "answers": {
            "fastest_wall_time": pick(fastest),
            "fewest_examples": pick(fewest),
            "fewest_steps": pick(fewest_steps),
            "max_goodput": pick(best_goodput),
            "critical_batch_size_fit": b_crit,
            "critical_batch_size_noise": noise_mid,
            "smallest_reasonable": pick(reasonable),
            "smallest_reaching_target": pick(smallest_reaching),
            "best_final_validation": pick(best_val),
        },
    }
