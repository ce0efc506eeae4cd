"""An outside reviewer's check of ``minigd study``'s answers (issue 15, "Done when").

For two problems this script runs ``minigd study`` (the CLI, in a subprocess) and then
measures the same quantities again WITHOUT ``minigd.study``: its own learning-rate sweep
with the validation metric evaluated at EVERY step, its own selection of the best rate per
batch size, its own least-squares fit of the McCandlish et al. (2018, arXiv:1812.06162)
trade-off (S/S_min - 1)(E/E_min - 1) = 1, its own full-training-set B_simple = tr(Sigma)/|G|^2
and its own timing of a training step.  Then it says whether each of the study's 90%
intervals holds the independent value.

1. **Least squares with known noise.**  ``linear_regression`` with noise std 2.0 (1000
   examples, 10 features, the study's split: val_fraction 0.2, standardised, seed 0); a
   linear model ``MLP([10, 1])`` with the mse loss (1/2 (z - y)^2).  ``minigd study
   --data linear_regression`` cannot set the noise (it always loads the default noise 0.1),
   so the study is run on a ``.npz`` of the same raw arrays, which goes through the same
   split/standardisation: the script checks the two data sets' fingerprints are identical.
   Targets: 1.1 x and 1.03 x the validation loss of the training set's least-squares
   solution (what a converged run reaches); at 1.1 x the batches from 128 up reach it in one
   step, so the tighter target is run too.  The sweep here is plain numpy -- momentum SGD,
   v = m v + g, w -= lr v (checked against ``minigd.fit``: the full-batch runs of the study's
   own seeds and rates take exactly the study's steps), 32 rates x 24 seeds trained at once --
   and B_simple uses the per-example gradients x_i r_i in closed form.  The seed-to-seed
   spread is large here (the initial loss varies from ~2.5 to ~3.8 by seed), so the script
   also splits its 24 seeds into four disjoint 5-seed "studies" and checks how often a
   5-seed bootstrap interval (seeds resampled per cell as the study does, or jointly over
   cells) holds the all-seed value.
2. **digits** with the study's default model (MLP 64-64-10 relu, cross entropy, target
   validation accuracy 0.95), trained with ``minigd.fit`` and a callback evaluating the
   validation accuracy (own numpy forward pass) after every step; B_simple with
   ``minigd.grad_moments`` on the whole training set.  The learning rates come from a
   1-seed pilot (rates 4x apart over 1e-4..6.6) and then 8 rates sqrt(2) apart around the
   pilot's best, extended past an edge when the best lands there.

The study's B_simple is also checked at identical points: at initialisation for the study's
own seeds, and along the study's own trials where this script's runs are the same
trajectories (full-batch linear runs; digits runs with the same fit seed).

Steps to target = the first step whose validation metric meets the target (primary; the
study instead interpolates linearly inside its evaluation bracket, so the interpolated
count is reported too).  Seeds here are not the study's.  Wall time to target = median
steps at the best rate x this script's own step time (the median of 7 interleaved rounds
of timed ``minigd.fit`` calls, one thread).

Usage: python bench/replicate.py [--work DIR] [--quick]   (about 4-6 minutes on 2 cores)
Writes bench/results/replicate.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_v] = "1"  # one thread: numpy's small matmuls are much slower with contention

import numpy as np
from scipy import optimize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import atomic_write, cpu_model

import minigd as mg
from minigd.data import DATASETS, load_dataset

ROOT = Path(__file__).resolve().parent.parent
MOMENTUM = 0.9  # the study's default (--momentum 0.9)
MAX_EPOCHS, MIN_STEPS = 50, 200  # the study's default budget: max(50 epochs, 200 steps)


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# =========================================================================== the study


def run_study(args: list, out: Path) -> dict:
    """Run ``minigd study ... --out out --quiet`` (resumes if out already holds trials)."""
    exe = Path(sys.executable).with_name("minigd")
    cmd = [str(exe), "study", *args, "--out", str(out), "--quiet"]
    log("running:", " ".join(cmd))
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"minigd study failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    summary = json.loads((out / "report" / "summary.json").read_text())
    analysis = json.loads((out / "report" / "analysis.json").read_text())
    arch = analysis["architectures"][0]
    per_b = [
        {
            k: r.get(k)
            for k in (
                "batch_size",
                "best_lr",
                "lr_edge",
                "in_fit",
                "reached",
                "steps_to_target",
                "examples_to_target",
                "noise_scale_start",
                "noise_scale_middle",
                "noise_scale_target",
                "step_time_s",
                "time_to_target",
            )
        }
        for r in arch["per_batch"]
    ]
    import sqlite3

    con = sqlite3.connect(out / "results.sqlite")
    trials = [
        (json.loads(c), json.loads(r)) for c, r in con.execute("select config, result from trials where status = 'ok'")
    ]
    con.close()
    seeds = sorted({c["seed"] for c, _ in trials})
    h = summary["headline"]
    keys = (
        "critical_batch_size_fit",
        "s_min",
        "e_min",
        "critical_batch_size_noise",
        "noise_scale_target",
        "fastest_wall_time",
        "time_to_target",
        "fewest_steps",
        "steps_to_target",
        "fewest_examples",
    )
    return {
        "command": "minigd " + " ".join(cmd[1:]),
        "seconds": round(dt, 1),
        "stdout_tail": p.stdout[-1500:],
        "headline": {k: h.get(k) for k in keys},
        "recommendation": summary["recommendation"]["batch_size"],
        "tradeoff_fit": arch.get("tradeoff_fit"),
        "noise_scale": arch.get("noise_scale"),
        "warnings": arch.get("warnings"),
        "per_batch": per_b,
        "seeds": seeds,
        "_trials": trials,
    }


# =========================================================================== my trade-off fit


def tradeoff_fit(B_eff, S):
    """Least squares in log space of ln S = ln S_min + ln(1 + B_crit / B) (equivalently of
    E = E_min (1 + B / B_crit) with E = S B: the two residuals are identical), over
    (ln S_min, ln B_crit), with scipy.optimize.least_squares from several starts.
    B_eff = E/S (examples per step, the batch size apart from partial last batches)."""
    B_eff, S = np.asarray(B_eff, float), np.asarray(S, float)
    ok = np.isfinite(S) & (S > 0) & np.isfinite(B_eff)
    B_eff, S = B_eff[ok], S[ok]
    if len(S) < 3:
        return None
    lnS = np.log(S)

    def resid(p):
        return lnS - p[0] - np.logaddexp(0.0, p[1] - np.log(B_eff))

    lo, hi = math.log(B_eff.min()) - 8, math.log(B_eff.max()) + 8
    best = None
    for lb0 in np.linspace(math.log(B_eff.min()), math.log(B_eff.max()), 5):
        r = optimize.least_squares(resid, x0=[lnS.min(), lb0], bounds=([-50, lo], [50, hi]))
        if best is None or r.cost < best.cost:
            best = r
    s_min, b_crit = math.exp(best.x[0]), math.exp(best.x[1])
    at_bound = bool(best.x[1] <= lo + 1e-6 or best.x[1] >= hi - 1e-6)
    return {
        "b_crit": b_crit,
        "s_min": s_min,
        "e_min": s_min * b_crit,
        "rms_log_residual": float(np.sqrt(np.mean(best.fun**2))),
        "n_points": len(S),
        "at_bound": at_bound,
    }


def select(cells, lrs, Bs, reducer=np.median):
    """Per B, the rate with the fewest median steps (ties: the smaller rate); cells[b][l] is
    a dict of arrays over seeds ("steps", "examples", ...).  Returns rows."""
    rows = []
    for b, B in enumerate(Bs):
        med = np.array([reducer(c["steps"]) for c in cells[b]])
        l = int(np.argmin(med))  # first minimum: the smallest such rate
        L = len(cells[b])
        rows.append(
            {
                "batch_size": B,
                "best_lr": float(lrs[b][l]),
                "best_index": l,
                "edge": ("low" if l == 0 else "high" if l == L - 1 else None) if np.isfinite(med[l]) else None,
                "reached": bool(np.isfinite(med[l])),
                "median_steps": float(med[l]),
                "median_examples": float(reducer(cells[b][l]["examples"])),
                "median_steps_interp": float(reducer(cells[b][l]["steps_interp"])),
                "median_examples_interp": float(reducer(cells[b][l]["examples_interp"])),
            }
        )
    return rows


def fit_rows(rows, interp=False):
    use = [r for r in rows if r["reached"] and r["edge"] is None]
    sk, ek = ("median_steps_interp", "median_examples_interp") if interp else ("median_steps", "median_examples")
    S = [r[sk] for r in use]
    Be = [r[ek] / r[sk] for r in use]
    f = tradeoff_fit(Be, S)
    if f is not None:
        f["batch_sizes"] = [r["batch_size"] for r in use]
    return f


def bootstrap_bcrit(cells, lrs, Bs, R, seed, interp=False, paired=False, point=None):
    """A 90% percentile interval of B_crit: resample the seeds, re-select the best rate per B,
    refit.  paired=False: the seeds of each (B, lr) cell independently (as the study does);
    paired=True: one draw of seed indices per resample for every cell (every cell holds the
    same seeds: the same initialisation and data order are shared across cells, and the
    independent draw loses that).  With ``point`` the interval is widened to include it."""
    rng = np.random.default_rng(seed)
    out = []
    k0 = len(cells[0][0]["steps"])
    for _ in range(R):
        rc = []
        i0 = rng.integers(0, k0, k0) if paired else None
        for row in cells:
            rr = []
            for c in row:
                k = len(c["steps"])
                i = i0 if paired else rng.integers(0, k, k)
                rr.append({f: c[f][i] for f in ("steps", "examples", "steps_interp", "examples_interp")})
            rc.append(rr)
        f = fit_rows(select(rc, lrs, Bs), interp)
        out.append(f["b_crit"] if f else np.nan)
    out = np.array(out)
    ok = out[np.isfinite(out)]
    if ok.size == 0:
        return None
    lo, hi = np.quantile(ok, [0.05, 0.95])
    if point is not None:
        lo, hi = min(lo, point), max(hi, point)
    return {
        "lo": float(lo),
        "hi": float(hi),
        "resamples": R,
        "failed": int(np.sum(~np.isfinite(out))),
        "point_percentile": None if point is None else float(np.mean(ok < point)),
    }


def coverage(cells, lrs, Bs, seeds, reference, R=200):
    """For each disjoint 5-seed subset (a study's worth of seeds): its B_crit, its
    cell-independent (study-style) and paired bootstrap intervals, and whether each holds
    ``reference`` (the all-seed estimate) and the other subsets' estimates."""
    subs = []
    for a in range(0, len(seeds) - 4, 5):
        sub = [[{f: c[f][a : a + 5] for f in c} for c in row] for row in cells]
        f = fit_rows(select(sub, lrs, Bs))
        v = f and f["b_crit"]
        subs.append(
            {
                "seeds": seeds[a : a + 5],
                "b_crit": v,
                "independent": bootstrap_bcrit(sub, lrs, Bs, R, 100 + a, point=v),
                "paired": bootstrap_bcrit(sub, lrs, Bs, R, 100 + a, paired=True, point=v),
            }
        )
    for i, s in enumerate(subs):
        others = [t["b_crit"] for j, t in enumerate(subs) if j != i and t["b_crit"] is not None]
        for kind in ("independent", "paired"):
            iv = s[kind]
            if iv:
                iv["holds_reference"] = inside(reference, iv)
                iv["holds_other_subsets"] = sum(bool(inside(o, iv)) for o in others)
                iv["other_subsets"] = len(others)
    return subs


# =========================================================================== timing


def time_steps(make_model, X, y, Bs, rounds=7, target_s=0.02):
    """Seconds per training step of minigd.fit at each B: the wall time fit reports for its
    steps (history "time") / steps, ~20 ms of steps per call, 7 rounds interleaved in a
    random order, the median round."""
    rng = np.random.default_rng(12345)
    k = {}
    for B in Bs:  # warm-up (compiles) and calibration
        m = make_model()
        h = mg.fit(m, X, y, batch_size=B, steps=20, optimizer=mg.SGD(lr=1e-4, momentum=MOMENTUM), seed=0)
        per = float(h.column("time")[-1]) / h.n_steps
        k[B] = int(min(20000, max(10, target_s / max(per, 1e-7))))
    res = {B: [] for B in Bs}
    for _ in range(rounds):
        for B in rng.permutation(Bs):
            B = int(B)
            m = make_model()
            h = mg.fit(m, X, y, batch_size=B, steps=k[B], optimizer=mg.SGD(lr=1e-4, momentum=MOMENTUM), seed=1)
            res[B].append(float(h.column("time")[-1]) / h.n_steps)
    return {
        B: {
            "median_s": float(np.median(v)),
            "min_s": float(np.min(v)),
            "max_s": float(np.max(v)),
            "steps_per_round": k[B],
        }
        for B, v in res.items()
    }


def fastest(rows, timing, key="median_steps"):
    best, tt = None, {}
    for r in rows:
        if not r["reached"]:
            continue
        t = r[key] * timing[r["batch_size"]]["median_s"]
        tt[r["batch_size"]] = t
        if best is None or t < tt[best]:
            best = r["batch_size"]
    return best, tt


# =========================================================================== problem 1: least squares


def linreg_data():
    """The noise-2.0 data set, as load_dataset makes it, and a .npz of its raw arrays for
    the study (whose split/standardisation then gives identical arrays)."""
    ds = load_dataset("linear_regression", noise=2.0)  # float32, val 0.2, standardised, seed 0
    raw = DATASETS["linear_regression"](n=None, seed=0, noise=2.0)
    return ds, raw


def linreg_sweep(ds, Bs, lrs, seeds, T, record_traj=False):
    """Plain numpy momentum SGD of the linear model on ds, every (lr, seed) at once, per B.
    Returns cells[b][l] = {"steps", "examples", "steps_interp", "examples_interp"} arrays over
    seeds (inf = not reached within the study's budget), and with record_traj the
    parameter trajectory (steps+1, S, L, d) per B (use with few runs)."""
    X = np.c_[ds.X_train.astype(np.float64), np.ones(ds.n_train)]
    y = ds.y_train.astype(np.float64)
    Xv = np.c_[ds.X_val.astype(np.float64), np.ones(ds.n_val)]
    yv = ds.y_val.astype(np.float64)
    A, bv, cv = Xv.T @ Xv / len(yv), Xv.T @ yv / len(yv), yv @ yv / len(yv)  # val loss quadratic form
    n = X.shape[0]
    S, L = len(seeds), len(lrs[0])
    W0 = np.stack(
        [
            np.r_[m.weights[0][:, 0], m.biases[0]].astype(np.float64)
            for m in (mg.MLP([ds.n_in, 1], loss="mse", seed=s) for s in seeds)
        ]
    )  # (S, d)

    def val_loss(W):
        return 0.5 * (((W @ A) * W).sum(-1) - 2 * W @ bv + cv)

    cells, trajs = [], []
    for b, B in enumerate(Bs):
        lr = np.asarray(lrs[b], float)[None, :, None]
        spe = -(-n // B)
        budget = max(MAX_EPOCHS, math.ceil(MIN_STEPS / spe)) * spe
        W = np.repeat(W0[:, None, :], L, axis=1)
        V = np.zeros_like(W)
        live = np.ones((S, L), bool)
        steps = np.full((S, L), np.inf)
        ex = np.full((S, L), np.inf)
        st_i = np.full((S, L), np.inf)
        ex_i = np.full((S, L), np.inf)
        prev = val_loss(W)
        rngs = [np.random.default_rng([int(s), 77]) for s in seeds]
        perms, pos, examples = None, n, 0
        traj = [W.copy()] if record_traj else None
        with np.errstate(all="ignore"):
            for t in range(1, budget + 1):
                if pos >= n:
                    perms = np.stack([r.permutation(n) for r in rngs])
                    pos = 0
                idx = perms[:, pos : pos + B]
                pos += B
                nb = idx.shape[1]
                Xb, yb = X[idx], y[idx]  # (S, nb, d), (S, nb)
                r = np.einsum("sbd,sld->slb", Xb, W) - yb[:, None, :]
                g = np.einsum("slb,sbd->sld", r, Xb) / nb
                V = MOMENTUM * V + g
                W = W - np.where(live[..., None], lr, 0.0) * V
                examples += nb
                vl = val_loss(W)
                if record_traj:
                    traj.append(W.copy())
                bad = live & (~np.isfinite(vl) | (vl > 1e8))
                hit = live & (vl <= T)
                if hit.any():
                    steps[hit], ex[hit] = t, examples
                    frac = np.clip((T - prev) / (vl - prev), 0.0, 1.0)
                    st_i[hit] = (t - 1 + frac)[hit]
                    ex_i[hit] = (examples - nb + frac * nb)[hit]
                live &= ~(hit | bad)
                if bad.any():
                    W[bad] = 0.0
                    V[bad] = 0.0
                prev = vl
                if not live.any():
                    break
        cells.append(
            [
                {"steps": steps[:, l], "examples": ex[:, l], "steps_interp": st_i[:, l], "examples_interp": ex_i[:, l]}
                for l in range(L)
            ]
        )
        if record_traj:
            trajs.append(np.stack(traj))
    return (cells, trajs) if record_traj else cells


def linreg_bsimple(X, y, w):
    """B_simple = tr(Sigma)/|G|^2 over the whole training set, per-example gradients
    g_i = x_i (x_i.w - y_i) of the loss 1/2 (x.w - y)^2 (x with a trailing 1), ddof = 1."""
    r = X @ w - y
    g = X * r[:, None]
    G = g.mean(0)
    tr = ((g - G) ** 2).sum() / (len(y) - 1)
    return float(tr / (G @ G))


def _study_noise(res, where):
    pts = [p for p in res.get("noise") or [] if p.get("where") == where]
    return pts[-1]["noise_scale"] if pts else None


def _rel(a, b):
    return abs(a / b - 1) if a is not None and b is not None and b != 0 else None


def same_points_linreg(ds, X, y, study, T):
    """Full batch: my numpy trajectory is the study's (every step uses every row), so every
    (lr, seed) of the study's full-batch cells is the same run: compare steps and B_simple at
    the target and mid-run (step k//2) with the values the study stored for that trial."""
    n = ds.n_train
    tr = [(c, r) for c, r in study["_trials"] if c["batch_size"] == n]
    lrs = sorted({c["lr"] for c, _ in tr})
    seeds = sorted({c["seed"] for c, _ in tr})
    cells, trajs = linreg_sweep(ds, [n], [lrs], seeds, T, record_traj=True)
    out = {"steps_equal": 0, "steps_compared": 0, "target": [], "mid": []}
    for c, r in tr:
        l, s = lrs.index(c["lr"]), seeds.index(c["seed"])
        k = cells[0][l]["steps"][s]
        if not r.get("reached") or not np.isfinite(k):
            continue
        out["steps_compared"] += 1
        out["steps_equal"] += int(k == r["steps_to_target"])
        k = int(k)
        out["target"].append(_rel(linreg_bsimple(X, y, trajs[0][k, s, l]), _study_noise(r, "target")))
        if k >= 2:
            out["mid"].append(_rel(linreg_bsimple(X, y, trajs[0][k // 2, s, l]), _study_noise(r, "mid")))
    return _summ(out, f"B = {n} (full batch), all {len(lrs)} rates x {len(seeds)} seeds of the study")


def _summ(out, what):
    res = {"what": what, "steps_equal": f"{out['steps_equal']} of {out['steps_compared']}"}
    for w in ("target", "mid"):
        v = [x for x in out[w] if x is not None]
        res[w] = {
            "n": len(v),
            "max_rel_diff": max(v) if v else None,
            "median_rel_diff": float(np.median(v)) if v else None,
        }
    return res


def problem_linreg(work: Path, quick: bool, factor: float) -> dict:
    log(f"== least squares, noise 2.0, target {factor} x the best validation loss ==")
    ds, raw = linreg_data()
    npz = work / "linear_regression_noise2.npz"
    np.savez(npz, X=raw.X, y=raw.y)
    same = load_dataset(npz).fingerprint() == ds.fingerprint()
    if not same:
        raise SystemExit("the .npz does not reproduce load_dataset('linear_regression', noise=2.0)'s split")
    X = np.c_[ds.X_train.astype(np.float64), np.ones(ds.n_train)]
    y = ds.y_train.astype(np.float64)
    Xv = np.c_[ds.X_val.astype(np.float64), np.ones(ds.n_val)]
    yv = ds.y_val.astype(np.float64)
    w_ols = np.linalg.lstsq(X, y, rcond=None)[0]
    best_val = float(0.5 * np.mean((Xv @ w_ols - yv) ** 2))
    w_star = np.r_[ds.info["w_star_effective"], ds.info["b_star_effective"]]
    T = round(factor * best_val, 4)
    log(f"val loss at the train least-squares solution {best_val:.4f} (noise floor 1/2 sigma^2 = 2.0); target {T}")

    study = run_study(["--data", str(npz), "--depths", "0", "--target", str(T)], work / f"study_linreg_{factor:g}")
    Bs = [r["batch_size"] for r in study["per_batch"]]
    log("study done:", study["headline"]["critical_batch_size_fit"])

    lr_grid = np.geomspace(1e-4, 4.0, 24 if quick else 32)
    seeds = list(range(1001, 1011 if quick else 1025))
    lrs = [lr_grid] * len(Bs)
    t0 = time.perf_counter()
    cells = linreg_sweep(ds, Bs, lrs, seeds, T)
    log(f"my sweep: {len(Bs)} B x {len(lr_grid)} lr x {len(seeds)} seeds in {time.perf_counter() - t0:.1f} s")
    rows = select(cells, lrs, Bs)
    # what another 5-seed study would see: B_crit from disjoint 5-seed subsets of my seeds
    ref = fit_rows(rows)
    subsets = coverage(cells, lrs, Bs, seeds, ref and ref["b_crit"])

    # B_simple along the best-lr runs: re-run them recording the trajectory (must reproduce the steps)
    best_lrs = [[r["best_lr"]] for r in rows]
    cells1, trajs = linreg_sweep(ds, Bs, best_lrs, seeds, T, record_traj=True)
    rerun_mismatch = 0
    for b, r in enumerate(rows):
        st = cells1[b][0]["steps"]
        ref = cells[b][r["best_index"]]["steps"]
        rerun_mismatch += int(np.sum(~((st == ref) | (np.isinf(st) & np.isinf(ref)))))
        init = [linreg_bsimple(X, y, trajs[b][0, s, 0]) for s in range(len(seeds))]
        mid, tgt = [], []
        for s in range(len(seeds)):
            if np.isfinite(st[s]):
                k = int(st[s])
                tgt.append(linreg_bsimple(X, y, trajs[b][k, s, 0]))
                mid.append(linreg_bsimple(X, y, trajs[b][k // 2, s, 0]))  # the study: nearest k/2, ties low
        r["bsimple_init"] = float(np.median(init))
        r["bsimple_mid"] = float(np.median(mid)) if mid else None
        r["bsimple_target"] = float(np.median(tgt)) if tgt else None
        r["reached_seeds"] = int(np.isfinite(st).sum())
    # the study's own seeds at initialisation: the same point, so the same B_simple up to float32 rounding
    init_study = float(
        np.median(
            [
                linreg_bsimple(X, y, np.r_[m.weights[0][:, 0], m.biases[0]].astype(np.float64))
                for m in (mg.MLP([ds.n_in, 1], loss="mse", seed=s) for s in study["seeds"])
            ]
        )
    )
    same_pts = same_points_linreg(ds, X, y, study, T)
    # cross-check of the closed form against minigd.grad_moments at one point
    m = mg.MLP([ds.n_in, 1], loss="mse", seed=seeds[0], dtype="float64")
    bm = len(Bs) // 2
    wpt = trajs[bm][min(len(trajs[bm]) - 1, int(min(rows[bm]["median_steps"], 1e9)) // 2), 0, 0]
    m.params[:] = np.r_[wpt[:-1], wpt[-1:]]
    gm = mg.grad_moments(m, X[:, :-1], y)
    check = {"numpy": linreg_bsimple(X, y, wpt), "grad_moments": float(gm.noise_scale)}
    # theory at the target: tr(Sigma) ~ sigma^2 E|x|^2 (x incl. the 1) and |G|^2 = |H (w - w_ols)|^2
    return finish(
        f"linear_regression (noise 2.0, 10 features, linear model, mse), target {factor:g} x best",
        "val_loss",
        T,
        study,
        rows,
        cells,
        lrs,
        Bs,
        seeds,
        lambda: mg.MLP([ds.n_in, 1], loss="mse", seed=0),
        ds.X_train,
        ds.y_train,
        extra={
            "best_val_loss_train_lstsq": best_val,
            "val_loss_at_w_star": float(0.5 * np.mean((Xv @ w_star - yv) ** 2)),
            "noise_floor": 2.0,
            "target_rule": f"{factor:g} x the validation loss of the training least-squares solution",
            "data_fingerprint_equal_to_study_input": same,
            "b_crit_5seed_subsets": subsets,
            "lr_grid": [float(x) for x in lr_grid],
            "bsimple_crosscheck": check,
            "bsimple_init_on_study_seeds": init_study,
            "same_points": same_pts,
            "rerun_step_mismatches": rerun_mismatch,
            "notes": [
                "`minigd study --data linear_regression` always loads noise std 0.1 (cli._data_spec passes "
                "no loader parameters), so the study ran on a .npz of the noise-2.0 raw arrays: same "
                "split and standardisation (fingerprints checked equal)."
            ],
        },
    )


# =========================================================================== problem 2: digits


class _UntilTarget:
    """fit callback: validation accuracy after every step (own numpy forward pass), stop at
    the target or at ``cap`` steps; keeps thinned parameter snapshots for B_simple mid-run."""

    def __init__(self, Xv, yv, target, cap, acc0):
        self.Xv, self.yv, self.target, self.cap = Xv, yv, target, cap
        self.prev = acc0
        self.hit = None
        self.interp = None
        self.snaps, self.stride = [], 1

    def on_step(self, model, step, loss):
        (W0, W1), (b0, b1) = model.weights, model.biases
        with np.errstate(all="ignore"):
            z = np.maximum(self.Xv @ W0 + b0, 0) @ W1 + b1
        acc = float(np.mean(z.argmax(1) == self.yv))
        if step % self.stride == 0:
            self.snaps.append((step, model.params.copy()))
            if len(self.snaps) > 256:
                self.snaps = self.snaps[1::2]
                self.stride *= 2
        if acc >= self.target:
            self.hit = step
            d = acc - self.prev
            self.interp = step - 1 + (min(1.0, max(0.0, (self.target - self.prev) / d)) if d > 0 else 1.0)
            return True
        self.prev = acc
        return step >= self.cap


def digits_run(ds, B, lr, seed, target, cap):
    n = ds.n_train
    m = mg.MLP([64, 64, 10], activation="relu", loss="cross_entropy", seed=seed)
    (W0, W1), (b0, b1) = m.weights, m.biases
    acc0 = float(np.mean((np.maximum(ds.X_val @ W0 + b0, 0) @ W1 + b1).argmax(1) == ds.y_val))
    p0 = m.params.copy()
    cb = _UntilTarget(ds.X_val, ds.y_val, target, cap, acc0)
    spe = -(-n // B)
    budget = max(MAX_EPOCHS, math.ceil(MIN_STEPS / spe)) * spe
    try:
        h = mg.fit(
            m,
            ds.X_train,
            ds.y_train,
            batch_size=B,
            steps=min(budget, cap),
            optimizer=mg.SGD(lr=lr, momentum=MOMENTUM),
            sampler="shuffle",
            seed=seed,
            callbacks=[cb],
        )
    except mg.DivergenceError:
        return {"steps": math.inf, "examples": math.inf, "steps_interp": math.inf, "examples_interp": math.inf}
    if cb.hit is None:
        return {"steps": math.inf, "examples": math.inf, "steps_interp": math.inf, "examples_interp": math.inf}
    k = cb.hit
    ex = int(h.row(k - 1)["examples"])
    ex_prev = int(h.row(k - 2)["examples"]) if k >= 2 else 0
    out = {
        "steps": float(k),
        "examples": float(ex),
        "steps_interp": cb.interp,
        "examples_interp": ex_prev + (cb.interp - (k - 1)) * (ex - ex_prev),
    }
    # B_simple on the whole training set: at the target, mid-run (snapshot nearest k/2), at init
    out["bs_target"] = float(mg.grad_moments(m, ds.X_train, ds.y_train).noise_scale)
    mid = min(cb.snaps, key=lambda s: abs(s[0] - 0.5 * k)) if cb.snaps else None
    if mid is not None and mid[0] < k:
        m.params[:] = mid[1]
    else:
        m.params[:] = p0
    out["bs_mid"] = float(mg.grad_moments(m, ds.X_train, ds.y_train).noise_scale)
    m.params[:] = p0
    out["bs_init"] = float(mg.grad_moments(m, ds.X_train, ds.y_train).noise_scale)
    return out


def problem_digits(work: Path, quick: bool) -> dict:
    log("== digits, MLP 64-64-10 relu, target val_accuracy 0.95 ==")
    target = 0.95
    study = run_study([], work / "study_digits")
    log("study done:", study["headline"]["critical_batch_size_fit"])
    ds = load_dataset("digits", std_floor=1.0)  # the study's DataSpec for digits
    n = ds.n_train
    Bs = [1, 4, 16, 64, 256, 1024, n]
    seeds = list(range(21, 31)) if not quick else [21, 22, 23]
    lrs, cells, runs = [], [], []
    t0 = time.perf_counter()
    for B in Bs:
        # pilot: one seed, rates 4x apart, from the largest down, capped at 4x the best so far
        pilot = {}
        cap = max(300, 5 * -(-n // B))
        for lr in sorted(1e-4 * 4.0 ** np.arange(9), reverse=True):
            r = digits_run(ds, B, lr, 99, target, cap)
            pilot[lr] = r["steps"]
            if math.isfinite(r["steps"]):
                cap = min(cap, max(60, int(4 * r["steps"])))
        centre = min(pilot, key=lambda k: (pilot[k], k))
        grid = list(centre * 2.0 ** ((np.arange(8) - 3.5) / 2))
        res = {}
        best_med = math.inf

        def do(lr, B=B, res=res, first_steps=pilot[centre]):
            nonlocal best_med
            first = first_steps if math.isfinite(first_steps) else MAX_EPOCHS * 10**6
            cap = max(60, int(4 * (best_med if math.isfinite(best_med) else first)))
            rr = [digits_run(ds, B, lr, s, target, cap) for s in seeds]
            res[lr] = rr
            med = float(np.median([x["steps"] for x in rr]))
            best_med = min(best_med, med)
            return med

        for i in np.argsort(np.abs(np.arange(8) - 3.5), kind="stable"):
            do(grid[int(i)])
        for _ in range(3):  # extend past an edge (sqrt(2) steps), as the study does (x2 steps)
            meds = [np.median([x["steps"] for x in res[lr]]) for lr in grid]
            j = int(np.argmin(meds))
            if not math.isfinite(meds[j]) or 0 < j < len(grid) - 1:
                break
            new = grid[0] / math.sqrt(2) if j == 0 else grid[-1] * math.sqrt(2)
            do(new)
            grid = sorted(grid + [new])
        lrs.append(grid)
        cells.append(
            [
                {f: np.array([x[f] for x in res[lr]]) for f in ("steps", "examples", "steps_interp", "examples_interp")}
                for lr in grid
            ]
        )
        runs.append(res)
        log(
            f"  B={B}: pilot best lr {centre:.3g}; {len(grid)} rates x {len(seeds)} seeds "
            f"({time.perf_counter() - t0:.0f} s so far)"
        )
    rows = select(cells, lrs, Bs)
    for b, r in enumerate(rows):
        rr = runs[b][r["best_lr"]]
        for k, key in (("bs_init", "bsimple_init"), ("bs_mid", "bsimple_mid"), ("bs_target", "bsimple_target")):
            v = [x[k] for x in rr if k in x]
            r[key] = float(np.median(v)) if v else None
        r["reached_seeds"] = sum(1 for x in rr if math.isfinite(x["steps"]))
        r["lrs_tried"] = [float(x) for x in lrs[b]]
    ref = fit_rows(rows)
    subsets = coverage(cells, lrs, Bs, seeds, ref and ref["b_crit"])
    # the study's own (B, best lr, seed) runs: minigd.fit with the same seed takes the same
    # batches, so these are the same trajectories: compare steps and B_simple point by point
    sp = {"steps_equal": 0, "steps_compared": 0, "target": [], "mid": []}
    best = {r["batch_size"]: r["best_lr"] for r in study["per_batch"]}
    for B in (64, 256, n):
        for c, r in study["_trials"]:
            if c["batch_size"] != B or c["lr"] != best[B] or not r.get("reached"):
                continue
            mine = digits_run(ds, B, c["lr"], c["seed"], target, 10**6)
            sp["steps_compared"] += 1
            sp["steps_equal"] += int(mine["steps"] == r["steps_to_target"])
            if "bs_target" in mine:
                sp["target"].append(_rel(mine["bs_target"], _study_noise(r, "target")))
                if mine["steps"] >= 2:
                    sp["mid"].append(_rel(mine["bs_mid"], _study_noise(r, "mid")))
    same = _summ(sp, f"B = 64, 256, {n} at the study's best rates, its seeds")
    init_study = float(
        np.median(
            [
                mg.grad_moments(
                    mg.MLP([64, 64, 10], activation="relu", loss="cross_entropy", seed=s), ds.X_train, ds.y_train
                ).noise_scale
                for s in study["seeds"]
            ]
        )
    )
    return finish(
        "digits (MLP 64-64-10 relu, cross entropy)",
        "val_accuracy",
        target,
        study,
        rows,
        cells,
        lrs,
        Bs,
        seeds,
        lambda: mg.MLP([64, 64, 10], activation="relu", loss="cross_entropy", seed=0),
        ds.X_train,
        ds.y_train,
        extra={
            "data": "load_dataset('digits', std_floor=1.0): the study's split",
            "b_crit_5seed_subsets": subsets,
            "same_points": same,
            "bsimple_init_on_study_seeds": init_study,
        },
    )


# =========================================================================== comparison


def inside(v, iv):
    return None if v is None or iv is None or iv.get("lo") is None else bool(iv["lo"] <= v <= iv["hi"])


def finish(name, metric, target, study, rows, cells, lrs, Bs, seeds, make_model, Xtr, ytr, extra):
    fit = fit_rows(rows)
    fit_i = fit_rows(rows, interp=True)
    log(f"my fit (first step): {fit}")
    log(f"my fit (interpolated): {fit_i}")
    boot = bootstrap_bcrit(cells, lrs, Bs, 300, 7, point=fit and fit["b_crit"])
    boot_paired = bootstrap_bcrit(cells, lrs, Bs, 300, 7, paired=True, point=fit and fit["b_crit"])
    timing = time_steps(make_model, Xtr, ytr, Bs)
    fast, tt = fastest(rows, timing)
    fast_i, _ = fastest(rows, timing, "median_steps_interp")
    for r in rows:
        r["step_time_s"] = timing[r["batch_size"]]["median_s"]
        r["time_to_target_s"] = tt.get(r["batch_size"])
    reached = [r for r in rows if r["reached"]]

    def med(key):
        v = [r[key] for r in reached if r.get(key) is not None]
        return float(np.median(v)) if v else None

    mine_bs = {"init": med("bsimple_init"), "mid": med("bsimple_mid"), "target": med("bsimple_target")}
    h = study["headline"]
    st_bs = {
        "init": study["noise_scale"].get("start"),
        "mid": h["critical_batch_size_noise"]["value"],
        "target": h["noise_scale_target"]["value"],
    }
    bc = h["critical_batch_size_fit"]
    fw = h["fastest_wall_time"]
    cmp = {
        "b_crit": {
            "study": bc,
            "mine_first_step": fit and fit["b_crit"],
            "mine_interp": fit_i and fit_i["b_crit"],
            "mine_bootstrap_90": boot,
            "mine_bootstrap_90_paired": boot_paired,
            "inside_first_step": inside(fit and fit["b_crit"], bc),
            "inside_interp": inside(fit_i and fit_i["b_crit"], bc),
        },
        "b_simple": {
            w: {
                "study": st_bs[w],
                "mine": mine_bs[w],
                "ratio_mine_over_study": (mine_bs[w] / st_bs[w]) if mine_bs[w] and st_bs[w] else None,
                "within_10pct": (abs(mine_bs[w] / st_bs[w] - 1) <= 0.10) if mine_bs[w] and st_bs[w] else None,
                "study_interval": h["critical_batch_size_noise"]
                if w == "mid"
                else h["noise_scale_target"]
                if w == "target"
                else None,
            }
            for w in ("init", "mid", "target")
        },
        "fastest": {
            "study": fw,
            "mine_first_step": fast,
            "mine_interp": fast_i,
            "inside": inside(fast, fw),
            "inside_interp": inside(fast_i, fw),
        },
    }
    if extra.get("bsimple_init_on_study_seeds") is not None and st_bs["init"]:
        v = extra["bsimple_init_on_study_seeds"]
        cmp["b_simple"]["init"].update(mine_on_study_seeds=v, ratio_on_study_seeds=v / st_bs["init"])
    subs = [x["b_crit"] for x in extra.get("b_crit_5seed_subsets", []) if x["b_crit"] is not None]
    cmp["b_crit"]["mine_5seed_subsets"] = subs
    cmp["b_crit"]["subsets_inside"] = sum(bool(inside(v, bc)) for v in subs)
    for kind in ("independent", "paired"):
        ivs = [x[kind] for x in extra.get("b_crit_5seed_subsets", []) if x.get(kind)]
        cmp["b_crit"][f"subset_{kind}_intervals"] = [[v["lo"], v["hi"]] for v in ivs]
        cmp["b_crit"][f"subset_{kind}_hold_all_seed_value"] = sum(bool(v.get("holds_reference")) for v in ivs)
        cmp["b_crit"][f"subset_{kind}_hold_other_subsets"] = [
            sum(v.get("holds_other_subsets", 0) for v in ivs),
            sum(v.get("other_subsets", 0) for v in ivs),
        ]
    # mid-run is only defined apart from the ends for runs of several steps: the median over
    # the batch sizes whose runs took >= 4 steps in both sweeps
    sp = {r["batch_size"]: r for r in study["per_batch"]}
    both = [
        r
        for r in reached
        if (sp.get(r["batch_size"]) or {}).get("steps_to_target") is not None
        and r["median_steps"] >= 4
        and sp[r["batch_size"]]["steps_to_target"] >= 4
    ]
    for w, km, ks in (("mid", "bsimple_mid", "noise_scale_middle"), ("target", "bsimple_target", "noise_scale_target")):
        vm = [r[km] for r in both if r.get(km) is not None]
        vs = [sp[r["batch_size"]][ks] for r in both if sp[r["batch_size"]].get(ks) is not None]
        if vm and vs:
            cmp["b_simple"][w]["steps_ge_4"] = {
                "batch_sizes": [r["batch_size"] for r in both],
                "study": float(np.median(vs)),
                "mine": float(np.median(vm)),
                "ratio": float(np.median(vm) / np.median(vs)),
            }
    for w in ("mid", "target"):
        cmp["b_simple"][w]["inside_study_interval"] = inside(mine_bs[w], cmp["b_simple"][w]["study_interval"])
    notes = list(extra.pop("notes", []))
    e_mine = [r["batch_size"] for r in rows if r["edge"]]
    e_study = [r["batch_size"] for r in study["per_batch"] if r.get("lr_edge")]
    if e_mine:
        notes.append(f"my best rate is at the edge of my grid for B = {e_mine} (left out of my fit)")
    if e_study:
        notes.append(f"the study's best rate is at the edge of its grid for B = {e_study} (left out of its fit)")
    for key in ("critical_batch_size_fit", "noise_scale_target", "critical_batch_size_noise"):
        iv = h.get(key) or {}
        if iv.get("value") is not None and iv.get("lo") is not None and iv["value"] in (iv["lo"], iv["hi"]):
            notes.append(
                f"study `{key}` = {fmt(iv['value'])} sits at an end of its own 90% interval "
                f"[{fmt(iv['lo'])}, {fmt(iv['hi'])}]: the point estimate lies outside the central 90% of "
                f"its bootstrap resamples and the interval was widened to include it"
            )
    eq = [
        r["batch_size"]
        for r in study["per_batch"]
        if r.get("noise_scale_middle") is not None and r.get("noise_scale_middle") == r.get("noise_scale_target")
    ]
    if eq:
        notes.append(
            f"study per-batch `noise_scale_middle` == `noise_scale_target` for B = {eq} (runs reaching the "
            f"target in 1 step: the study's mid-run point falls back to the target point), and these enter "
            f"its median-over-B `critical_batch_size_noise`"
        )
    not_reached = [r["batch_size"] for r in rows if not r["reached"]]
    if not_reached:
        notes.append(f"did not reach the target in my sweep (median over seeds): B = {not_reached}")
    study = {k: v for k, v in study.items() if k != "_trials"}
    return {
        "problem": name,
        "target_metric": metric,
        "target": target,
        "seeds": seeds,
        "study": study,
        "mine": {
            "per_batch": rows,
            "fit_first_step": fit,
            "fit_interp": fit_i,
            "bootstrap": boot,
            "timing": {str(k): v for k, v in timing.items()},
            "fastest": fast,
            "b_simple_median_over_B": mine_bs,
        },
        "comparison": cmp,
        "notes": notes,
        **extra,
    }


# =========================================================================== report


def fmt(v, nd=3):
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf"
    return f"{v:.{nd}g}" if isinstance(v, float) else str(v)


def yes(b):
    return "–" if b is None else ("yes" if b else "**no**")


def write_md(res, path: Path):
    m = res["machine"]
    L = [
        "# Independent check of `minigd study` (bench/replicate.py)",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['date']}; script wall time {res['seconds']:.0f} s. "
        "The study's numbers come from `minigd study`; mine from an independent sweep (validation metric "
        "every step, other seeds, own lr selection, own log-space least-squares fit, own full-data "
        "B_simple, own step timing). Steps = first step meeting the target (interpolated in brackets).",
        "",
    ]
    for p in res["problems"]:
        c = p["comparison"]
        bc = c["b_crit"]
        s = bc["study"]
        L += [
            f"## {p['problem']}: target {p['target_metric']} {'>=' if 'acc' in p['target_metric'] else '<='} "
            f"{p['target']}",
            "",
            "| quantity | study value [90% interval] | mine | inside / within 10%? |",
            "|---|---|---|---|",
            f"| B_crit (trade-off fit) | {fmt(s['value'])} [{fmt(s['lo'])}, {fmt(s['hi'])}] | "
            f"{fmt(bc['mine_first_step'])} ({fmt(bc['mine_interp'])}); my 90%: "
            f"[{fmt((bc['mine_bootstrap_90'] or {}).get('lo'))}, {fmt((bc['mine_bootstrap_90'] or {}).get('hi'))}]"
            f", paired [{fmt((bc['mine_bootstrap_90_paired'] or {}).get('lo'))}, "
            f"{fmt((bc['mine_bootstrap_90_paired'] or {}).get('hi'))}]"
            f" | {yes(bc['inside_first_step'])} ({yes(bc['inside_interp'])}) |",
        ]
        if bc.get("mine_5seed_subsets"):
            L.append(
                f"| B_crit of disjoint 5-seed subsets of my seeds | (as above) | "
                f"{', '.join(fmt(v) for v in bc['mine_5seed_subsets'])} | {bc['subsets_inside']} of "
                f"{len(bc['mine_5seed_subsets'])} inside |"
            )
            for kind, lab in (
                ("independent", "seeds resampled per cell, as the study"),
                ("paired", "seeds resampled jointly over cells"),
            ):
                ivs = bc.get(f"subset_{kind}_intervals") or []
                if ivs:
                    h2 = bc[f"subset_{kind}_hold_other_subsets"]
                    L.append(
                        f"| 5-seed subsets' 90% bootstrap intervals ({lab}) | – | "
                        f"{', '.join(f'[{fmt(a)}, {fmt(b)}]' for a, b in ivs)} | hold my all-seed value: "
                        f"{bc[f'subset_{kind}_hold_all_seed_value']} of {len(ivs)}; the other subsets' values: "
                        f"{h2[0]} of {h2[1]} |"
                    )
        for w, lab in (("init", "B_simple at init"), ("mid", "B_simple mid-run"), ("target", "B_simple at target")):
            b = c["b_simple"][w]
            iv = b["study_interval"]
            ivs = f" [{fmt(iv['lo'])}, {fmt(iv['hi'])}]" if iv else ""
            L.append(
                f"| {lab} (median over B) | {fmt(b['study'])}{ivs} | {fmt(b['mine'])} "
                f"(x{fmt(b['ratio_mine_over_study'], 3)}) | {yes(b['within_10pct'])} |"
            )
            if b.get("mine_on_study_seeds") is not None:
                L.append(
                    f"| {lab}, the study's own seeds (same points) | {fmt(b['study'])} | "
                    f"{fmt(b['mine_on_study_seeds'], 6)} (x{fmt(b['ratio_on_study_seeds'], 6)}) | "
                    f"{yes(abs(b['ratio_on_study_seeds'] - 1) <= 0.1)} |"
                )
            if b.get("steps_ge_4"):
                q = b["steps_ge_4"]
                L.append(
                    f"| {lab}, median over B with >= 4 steps in both ({q['batch_sizes']}) | {fmt(q['study'])} | "
                    f"{fmt(q['mine'])} (x{fmt(q['ratio'], 3)}) | {yes(abs(q['ratio'] - 1) <= 0.1)} |"
                )
        q = p.get("same_points")
        if q:
            L.append(
                f"| B_simple at the study's own trials ({q['what']}; steps equal: {q['steps_equal']}) | stored "
                f"per trial | max rel. diff at target {fmt(q['target']['max_rel_diff'], 2)} (n={q['target']['n']}), "
                f"mid-run {fmt(q['mid']['max_rel_diff'], 2)} (n={q['mid']['n']}) | "
                f"{yes((q['target']['max_rel_diff'] or 0) <= 0.1 and (q['mid']['max_rel_diff'] or 0) <= 0.1)} |"
            )
        f = c["fastest"]
        L.append(
            f"| fastest batch size (steps x step time) | {f['study']['value']} [{f['study']['lo']}, "
            f"{f['study']['hi']}] | {f['mine_first_step']} ({f['mine_interp']}) | {yes(f['inside'])} "
            f"({yes(f['inside_interp'])}) |"
        )
        L += [
            "",
            "| B | study best lr | study steps | my best lr | my steps (interp) | my B_simple init / mid / "
            "target | study B_simple mid / target | my step µs |",
            "|---|---|---|---|---|---|---|---|",
        ]
        sp = {r["batch_size"]: r for r in p["study"]["per_batch"]}
        for r in p["mine"]["per_batch"]:
            q = sp.get(r["batch_size"], {})
            edge = f" ({r['edge']} edge)" if r["edge"] else ""
            qe = f" ({q.get('lr_edge')} edge)" if q.get("lr_edge") else ""
            L.append(
                f"| {r['batch_size']} | {fmt(q.get('best_lr'))}{qe} | {fmt(q.get('steps_to_target'), 4)} | "
                f"{fmt(r['best_lr'])}{edge} | {fmt(r['median_steps'], 4)} ({fmt(r['median_steps_interp'], 4)}) | "
                f"{fmt(r.get('bsimple_init'))} / {fmt(r.get('bsimple_mid'))} / {fmt(r.get('bsimple_target'))} | "
                f"{fmt(q.get('noise_scale_middle'))} / {fmt(q.get('noise_scale_target'))} | "
                f"{fmt(r['step_time_s'] * 1e6)} |"
            )
        fi = p["mine"]["fit_first_step"] or {}
        L += [
            "",
            f"My fit: S_min {fmt(fi.get('s_min'))}, E_min {fmt(fi.get('e_min'))}, rms log residual "
            f"{fmt(fi.get('rms_log_residual'))}, batch sizes {fi.get('batch_sizes')}. "
            f"Study fit: {json.dumps({k: round(v, 4) for k, v in (p['study']['tradeoff_fit'] or {}).items() if isinstance(v, float)})}. "
            f"Study: `{p['study']['command']}` ({p['study']['seconds']} s).",
            "",
        ]
        if p.get("notes"):
            L += [f"- {x}" for x in p["notes"]] + [""]
    atomic_write(str(path), "\n".join(L) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", help="working directory for the studies (default: a fresh temporary one)")
    ap.add_argument("--quick", action="store_true", help="fewer seeds/rates (a smoke test)")
    ap.add_argument("--only", choices=("linreg", "digits"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="minigd-replicate-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    problems = []
    if a.only != "digits":
        for factor in (1.1, 1.03):
            problems.append(problem_linreg(work, a.quick, factor))
    if a.only != "linreg":
        problems.append(problem_digits(work, a.quick))
    res = {
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
        },
        "seconds": time.perf_counter() - t0,
        "quick": a.quick,
        "work": str(work),
        "problems": problems,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if not (a.quick or a.only) else "_partial"
    atomic_write(str(out / f"replicate{suffix}.json"), json.dumps(res, indent=1, default=float) + "\n")
    write_md(res, out / f"replicate{suffix}.md")
    log(f"done in {res['seconds']:.0f} s: {out / f'replicate{suffix}.md'}")
    print((out / f"replicate{suffix}.md").read_text())


if __name__ == "__main__":
    main()
