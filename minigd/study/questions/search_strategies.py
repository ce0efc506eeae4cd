"""Grid, random or Bayesian search: which finds a good batch size / learning rate with
fewer trials?

Three strategies search the same space at the same budget of :data:`N_TRIALS` trials:

grid
    a fixed lattice of :data:`N_TRIALS` points at the centres of equal cells of each axis
    (log scale): 4 learning rates x 3 batch sizes x 2 widths (6 x 4 when the width is
    fixed), run in a random order per repeat (a grid has no natural order; its best-so-far
    curve is only complete at the last trial);
random
    :func:`minigd.study.search.search` with ``method="random"``;
bayes
    the same with ``method="bayes"`` (Optuna's TPE sampler; asked one trial at a time).

The space: batch sizes powers of two in [8, 512] (capped at the training set), the
learning rate log-uniform over the range the main study tried, the hidden width a power of
two in [4, 128] (fixed when the model has no hidden layer); depth and momentum as the
study's.  The objective, minimised by all three: the final validation loss after
:data:`EPOCHS` epochs (``stop_at_target=False``, ``min_steps=0``: every trial sees the
same examples, so a batch that is too large pays with too few steps) -- the same for
classification and regression, and continuous, as a Bayesian sampler needs it.

Each strategy runs :data:`N_REPEATS` times; repeat ``r`` has its own search seed and its
own trial seed (initialisation and data order), both derived from the master seed and
shared by the three strategies (so the comparison is paired).  Measured: the best
objective found after each trial (best-so-far), and the trials a strategy needs before
its best is within :data:`TOLERANCE` of the best loss any strategy found (a repeat that
never gets there counts as ``N_TRIALS + 1``).  90% intervals: 5th/95th percentiles over
:data:`N_BOOT` bootstrap resamples of the repeats (jointly across strategies), seeded
from the master seed.

The grid's trials are tagged ``q:search_strategies:grid``; the searches' are tagged by
:func:`~minigd.study.search.search` itself (``random-<seed>``, ``bayes-<seed>``).  The
order of every repeat's trials is kept in the study store's meta entry
:data:`META` so ``minigd report`` rebuilds the curves from the file alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib

import numpy as np

NAME = "search_strategies"
QUESTION = "Grid, random or Bayesian search: which finds a good batch size / learning rate with fewer trials?"
STRATEGIES = ("grid", "random", "bayes")
LATTICE = (4, 3, 2)  # the grid: learning rates x batch sizes x widths ...
LATTICE_ONE_WIDTH = (6, 4)  # ... or learning rates x batch sizes when the width is fixed
N_TRIALS = 24  # every strategy's budget: the grid's size
N_REPEATS = 5
EPOCHS = 5
TOLERANCE = 0.25  # "a good configuration": final validation loss within 25% of the best found
TOLERANCES = (0.1, 0.25, 0.5)
EVAL_REL_STEP = 0.25  # only the final loss counts: evaluate sparsely along the way (cheaper trials)
BATCH_RANGE = (8, 512)
WIDTH_RANGE = (4, 128)
N_BOOT = 4000
META = f"q:{NAME}"
LABELS = {"grid": "grid", "random": "random search", "bayes": "Bayesian search (Optuna TPE)"}


# --------------------------------------------------------------------------- the design


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def space(ctx):
    """The :class:`~minigd.study.search.SearchSpace` all three strategies search."""
    from minigd.study.search import SearchSpace

    s = ctx.spec
    bmax = _pow2_floor(min(BATCH_RANGE[1], ctx.n_train))
    bmin = min(BATCH_RANGE[0], bmax)
    lrs = [float(c.lr) for c, r in ctx.main_rows if r.get("status") == "ok"]
    lr_lo, lr_hi = (min(lrs), max(lrs)) if lrs else (1e-3, 1.0)
    if not lr_hi > lr_lo:
        lr_lo, lr_hi = lr_lo / 8, lr_hi * 8
    depth = int(s.depths[0])
    wmin, wmax = WIDTH_RANGE if depth > 0 else (_pow2_floor(s.widths[0]),) * 2
    return SearchSpace(
        batch_min=bmin,
        batch_max=bmax,
        lr_min=lr_lo,
        lr_max=lr_hi,
        momentum_min=s.momentum,
        momentum_max=s.momentum,
        width_min=wmin,
        width_max=wmax,
        depth_min=depth,
        depth_max=depth,
    )


def base(ctx):
    """The trial every strategy varies: the study's model and data, :data:`EPOCHS` epochs."""
    return ctx.base_config(
        max_epochs=min(EPOCHS, max(1, int(ctx.spec.max_epochs))),
        min_steps=0,
        stop_at_target=False,
        eval_rel_step=EVAL_REL_STEP,
    )


def repeats(ctx) -> list:
    """``[(search_seed, trial_seed)]`` of each repeat, derived from the master seed."""
    out = []
    for r in range(N_REPEATS):
        a, b = np.random.SeedSequence([ctx.seed, zlib.crc32(NAME.encode()), r]).generate_state(2, np.uint32)
        out.append((int(a) >> 1, int(b) >> 1))
    return out


def _levels(lo: float, hi: float, k: int) -> list:
    """``k`` points at the centres of ``k`` equal cells of [lo, hi] on a log scale."""
    return [math.exp(math.log(lo) + (i + 0.5) / k * (math.log(hi) - math.log(lo))) for i in range(k)]


def _pow2_levels(lo: int, hi: int, k: int) -> list:
    a, b = math.log2(lo), math.log2(hi)
    return sorted({2 ** int(math.floor(a + (i + 0.5) / k * (b - a) + 0.5)) for i in range(k)})


def lattice(sp) -> list:
    """The grid's points ``(B, lr, width)``: :data:`LATTICE` levels of the learning rate,
    batch size and width (:data:`LATTICE_ONE_WIDTH` when the width is fixed), each at the
    centres of equal cells on a log scale.  A batch range too narrow for its levels (a tiny
    training set) gets more learning rates instead, and the lattice may then exceed
    :data:`N_TRIALS` points (:func:`grid_configs` runs :data:`N_TRIALS` of them)."""
    fixed_w = sp.width_min == sp.width_max
    n_lr, n_b, n_w = LATTICE_ONE_WIDTH + (1,) if fixed_w else LATTICE
    Bs = _pow2_levels(sp.batch_min, sp.batch_max, n_b)
    ws = [sp.width_min] if fixed_w else _pow2_levels(sp.width_min, sp.width_max, n_w)
    if len(Bs) * len(ws) * n_lr < N_TRIALS:
        n_lr = -(-N_TRIALS // (len(Bs) * len(ws)))
    return [(B, lr, w) for lr in _levels(sp.lr_min, sp.lr_max, n_lr) for B in Bs for w in ws]


def grid_configs(ctx, sp, b, search_seed: int, trial_seed: int) -> list:
    """One repeat's grid trials, in that repeat's random order."""
    from minigd.study.search import _config

    n, n_in, n_out = ctx.n_train, ctx.ds.X_train.shape[1], ctx.ds.n_out
    b = dataclasses.replace(b, seed=int(trial_seed))
    cfgs = [
        _config(b, n, n_in, n_out, B, lr, sp.momentum_min, w, sp.depth_min, f"q:{NAME}:grid")
        for B, lr, w in lattice(sp)
    ]
    order = np.random.default_rng(search_seed).permutation(len(cfgs))
    return [cfgs[i] for i in order[:N_TRIALS]]


# --------------------------------------------------------------------------- running


def run(ctx) -> list:
    """Run (or find) every strategy's repeats; returns their (config, result) pairs."""
    if ctx.readonly:
        plan_ = ctx.store.meta(META)
        keys = _all_keys(plan_)
        ctx.keys.extend(keys)
        stored = {c.key: (c, r) for c, r in ctx.store.rows()}
        return [stored[k] for k in keys if k in stored]

    from minigd.study.executors import SerialExecutor

    sp, b, reps = space(ctx), base(ctx), repeats(ctx)
    # The searches run their (cheap, seconds-long) trials in this process: a fresh local pool
    # per call costs more than its trials, and Bayesian rounds of one trial keep TPE's
    # sequence independent of the machine's worker count.  A Dask cluster is used as is.
    ex = ctx.executor if getattr(ctx.executor, "name", "") == "dask" else SerialExecutor()
    grids = [grid_configs(ctx, sp, b, s, t) for s, t in reps]
    ctx.log(f"  {NAME}: grid, {len(reps)} repeats of {N_TRIALS} trials")
    ctx.run_trials([c for g in grids for c in g])
    bayes_note = None
    try:
        import optuna  # noqa: F401
    except ImportError:
        bayes_note = "Optuna is not installed (pip install 'minigd[study]'): Bayesian search was not run"
    out = {
        "objective": "val_loss",
        "epochs": b.max_epochs,
        "n_trials": N_TRIALS,
        "tolerance": TOLERANCE,
        "space": dataclasses.asdict(sp),
        "bayes_note": bayes_note,
        "repeats": [],
    }
    stored = {}
    for c, r in ctx.store.rows():
        stored.setdefault(c.search_id, []).append((c, r))
    for r, ((s, t), grid) in enumerate(zip(reps, grids)):
        rep = {"search_seed": s, "trial_seed": t, "grid": [c.key for c in grid]}
        for method in ("random", "bayes"):
            if method == "bayes" and bayes_note:
                rep[method] = None
                continue
            if r == 0:
                ctx.log(f"  {NAME}: {LABELS[method]}, {len(reps)} repeats of {N_TRIALS} trials")
            rep[method] = _search(ctx, sp, b, method, s, t, ex, stored)
        out["repeats"].append(rep)
    ctx.store.set_meta(META, out)
    keys = _all_keys(out)
    ctx.keys.extend(keys)
    stored = {c.key: (c, r) for c, r in ctx.store.rows()}
    return [stored[k] for k in keys if k in stored]


def _search(ctx, sp, b, method, search_seed, trial_seed, ex, stored) -> list:
    """One :func:`~minigd.study.search.search` of ``N_TRIALS`` trials; returns their keys in
    the order searched.  It searches into a store in memory holding only its own earlier
    trials (``search`` reads its whole store on every call, and the study's holds every
    trial of the study), then its new trials are copied into the study's store."""
    from minigd.study.config import TrialConfig
    from minigd.study.search import search
    from minigd.study.store import ResultStore

    sid = f"{method}-{search_seed}"  # how search() tags its trials
    with ResultStore(":memory:") as mem:
        for c, r in stored.get(sid, ()):
            mem.put(c, r)
        res = search(
            sp,
            N_TRIALS,
            mem,
            method=method,
            objective="val_loss",
            base=dataclasses.replace(b, seed=int(trial_seed)),
            seed=search_seed,
            executor=ex,
        )
        have = {c.key for c, _ in stored.get(sid, ())}
        for c, r in mem.rows():
            if c.key not in have:
                ctx.store.put(c, r)
    return [TrialConfig.from_dict(d).key for d, _ in res["trials"]]


def _all_keys(plan_) -> list:
    keys = []
    for rep in (plan_ or {}).get("repeats") or []:
        for s in STRATEGIES:
            keys.extend(rep.get(s) or [])
    return list(dict.fromkeys(keys))


# --------------------------------------------------------------------------- the answer


def _objective(res) -> float:
    if res is None or res.get("status") != "ok" or res.get("final_val_loss") is None:
        return math.inf
    v = float(res["final_val_loss"])
    return v if math.isfinite(v) else math.inf


def _iv(value, samples) -> dict:
    value = None if value is None or not math.isfinite(value) else float(value)
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    if value is None or s.size == 0:
        return {"value": value, "lo": None, "hi": None}
    lo, hi = np.percentile(s, (5.0, 95.0))
    return {"value": value, "lo": float(min(lo, value)), "hi": float(max(hi, value))}


def _trials_to(bsf: np.ndarray, thr: float) -> np.ndarray:
    """Trials (1-based) until the best-so-far is <= thr, per repeat; N + 1 when never."""
    hit = bsf <= thr
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, bsf.shape[1] + 1).astype(float)


def answer(ctx, rows) -> dict:
    from . import unanswered

    plan_ = ctx.store.meta(META)
    if not isinstance(plan_, dict) or not plan_.get("repeats"):
        return unanswered(NAME, "no search trials are recorded in this study's file")
    by_key = {c.key: (c, r) for c, r in rows}
    strategies = [s for s in STRATEGIES if all(rep.get(s) for rep in plan_["repeats"])]
    reps = [
        rep
        for rep in plan_["repeats"]
        if all(len(rep[s]) == plan_["n_trials"] and all(k in by_key for k in rep[s]) for s in strategies)
    ]
    if len(reps) < 2 or len(strategies) < 2:
        return unanswered(
            NAME,
            f"fewer than 2 complete repeats of 2 strategies are stored "
            f"({len(reps)} repeats of {', '.join(strategies) or 'none'})",
        )
    N, R = int(plan_["n_trials"]), len(reps)
    vals = {s: np.array([[_objective(by_key[k][1]) for k in rep[s]] for rep in reps]) for s in strategies}
    bsf = {s: np.minimum.accumulate(v, axis=1) for s, v in vals.items()}
    best = min(float(v.min()) for v in vals.values())
    if not math.isfinite(best) or best <= 0:
        return unanswered(NAME, "no search trial finished with a finite positive validation loss")
    thr = {tol: best * (1 + tol) for tol in TOLERANCES}
    to = {tol: {s: _trials_to(bsf[s], thr[tol]) for s in strategies} for tol in TOLERANCES}

    def stats(idx):
        """The statistics of the repeats ``idx`` (shape (R,) or (n_boot, R)), vectorised."""
        out = {}
        for s in strategies:
            for tol in TOLERANCES:
                out[(s, "trials", tol)] = np.mean(to[tol][s][idx], axis=-1)
            curve = np.median(bsf[s][idx], axis=-2)  # (..., N)
            out[(s, "best_at_N")] = curve[..., -1]
            for t in range(N):
                out[(s, "curve", t)] = curve[..., t]
        # the winner: fewest mean trials to the tolerance, ties broken by the best loss at N
        key = np.stack(
            [out[(s, "trials", TOLERANCE)] * 1e9 + np.minimum(out[(s, "best_at_N")], 1e5) for s in strategies], axis=-1
        )
        out["winner"] = np.asarray([STRATEGIES.index(s) for s in strategies])[np.argmin(key, axis=-1)]
        return out

    point = {k: float(v) for k, v in stats(np.arange(R)).items()}
    rng = np.random.default_rng([ctx.seed % 2**63, zlib.crc32(NAME.encode())])
    boot = stats(rng.integers(0, R, (N_BOOT, R)))
    iv = {k: _iv(point[k], boot[k]) for k in point if k != "winner"}
    winner = STRATEGIES[int(point["winner"])]
    wins = float(np.mean(boot["winner"] == point["winner"]))
    win_rates = {s: float(np.mean(boot["winner"] == STRATEGIES.index(s))) for s in strategies}

    def tr(s, tol=TOLERANCE):
        d = iv[(s, "trials", tol)]
        return f"{d['value']:.1f} [{d['lo']:.1f}, {d['hi']:.1f}]"

    def m3(d):
        if d["value"] is None:
            return "none finished"
        return f"{d['value']:.3g} [{d['lo']:.3g}, {d['hi']:.3g}]" if d["lo"] is not None else f"{d['value']:.3g}"

    reached = {s: float(np.mean(to[TOLERANCE][s] <= N)) for s in strategies}
    never = [s for s in strategies if reached[s] == 0]
    others = sorted((s for s in strategies if s != winner), key=lambda s: point[(s, "trials", TOLERANCE)])
    cmp_ = " and ".join(f"{LABELS[s]} {tr(s)}" + (f" (never within {N})" if s in never else "") for s in others)
    best_c, best_r = min(
        ((by_key[k][0], by_key[k][1]) for rep in reps for s in strategies for k in rep[s]),
        key=lambda cr: _objective(cr[1]),
    )
    acc = best_r.get("final_val_accuracy")
    width = best_c.sizes[1] if len(best_c.sizes) > 2 else None
    best_txt = (
        f"batch {best_c.batch_size}, LR {best_c.lr:.3g}"
        + (f", width {width}" if width is not None else "")
        + f": validation loss {best:.3g}"
        + (f", accuracy {100 * acc:.1f}%" if acc is not None else "")
    )
    early = max(1, N // 3)

    def at(t):
        return ", ".join(f"{s} {m3(iv[(s, 'curve', t - 1)])}" for s in strategies)

    text = (
        f"{LABELS[winner][0].upper() + LABELS[winner][1:]} finds a good configuration (final validation loss "
        f"within {100 * TOLERANCE:.0f}% of the best any search found: <= {thr[TOLERANCE]:.3g}) in the fewest "
        f"trials: {tr(winner)} on average over {R} repeats (fewest in {100 * wins:.0f}% of bootstrap resamples), "
        f"vs {cmp_}. Median best loss after {early} trial{'s' if early > 1 else ''}: {at(early)}; after {N}: "
        f"{at(N)}. "
        f"Best overall: {best_txt}."
    )
    notes = []
    if plan_.get("bayes_note"):
        notes.append(plan_["bayes_note"])
    else:
        notes.append("Optuna's TPE draws its first 10 trials at random, so it can only pull ahead after them")
    if any(reached[s] < 1 for s in strategies):
        notes.append(
            f"a repeat that never got within the tolerance counts as {N + 1} trials (averages near "
            f"{N + 1} are lower bounds)"
        )
    if "grid" in strategies:
        notes.append(f"the grid runs in a random order per repeat and is complete only at {N} trials")
    sp_ = plan_.get("space") or {}
    edge = _edges(best_c, sp_)
    if edge:
        notes.append(
            f"the best configuration lies at the edge of the space searched ({edge}): a better one may lie beyond"
        )
    text += (" Note: " + "; ".join(notes) + ".") if notes else ""

    sp = plan_.get("space") or {}
    plot = _plot(ctx, strategies, iv, N, thr[TOLERANCE], plan_, R)
    budget = (
        f"{N} trials per strategy, {R} repeats (search and trial seeds derived from the master seed); "
        f"objective: final validation loss after {plan_.get('epochs')} epochs; space: batch "
        f"{sp.get('batch_min')}-{sp.get('batch_max')} (powers of two), LR {sp.get('lr_min', 0):.3g}-"
        f"{sp.get('lr_max', 0):.3g} (log), width {sp.get('width_min')}-{sp.get('width_max')} (powers of two)"
    )
    w = iv[(winner, "trials", TOLERANCE)]
    return {
        "name": NAME,
        "question": QUESTION,
        "answer": text,
        "value": w["value"],
        "lo": w["lo"],
        "hi": w["hi"],
        "wins": wins,
        "unit": f"trials ({LABELS[winner]}, mean over repeats, to within {100 * TOLERANCE:.0f}% of the best "
        f"validation loss)",
        "conditions": ctx.conditions(budget),
        "plot": plot,
        "details": {
            "winner": winner,
            "win_rates": win_rates,
            "best_val_loss": best,
            "best_config": {
                "batch_size": best_c.batch_size,
                "lr": best_c.lr,
                "sizes": list(best_c.sizes),
                "val_accuracy": acc,
            },
            "threshold": {str(t): v for t, v in thr.items()},
            "tolerance": TOLERANCE,
            "n_trials": N,
            "repeats": R,
            "epochs": plan_.get("epochs"),
            "space": sp,
            "bayes_note": plan_.get("bayes_note"),
            "strategies": {
                s: {
                    "trials_to_tolerance": {str(t): iv[(s, "trials", t)] for t in TOLERANCES},
                    "reached_fraction": reached[s],
                    "best_after_all_trials": iv[(s, "best_at_N")],
                    "best_so_far_median": [iv[(s, "curve", t)] for t in range(N)],
                    "per_repeat_trials_to_tolerance": [float(x) for x in to[TOLERANCE][s]],
                    "per_repeat_best": [float(x) for x in bsf[s][:, -1]],
                }
                for s in strategies
            },
        },
    }


def _edges(cfg, sp) -> str:
    """Which axes of the space ``sp`` (a SearchSpace as a dict) ``cfg`` lies at the edge of."""
    out = []
    if not sp:
        return ""
    if sp["batch_min"] < sp["batch_max"] and cfg.batch_size in (sp["batch_min"], sp["batch_max"]):
        out.append(f"batch {cfg.batch_size}")
    if cfg.lr <= sp["lr_min"] * 1.5 or cfg.lr >= sp["lr_max"] / 1.5:
        out.append(f"LR {cfg.lr:.3g}")
    if len(cfg.sizes) > 2 and sp["width_min"] < sp["width_max"] and cfg.sizes[1] in (sp["width_min"], sp["width_max"]):
        out.append(f"width {cfg.sizes[1]}")
    return ", ".join(out)


# --------------------------------------------------------------------------- the figure


def _plot(ctx, strategies, iv, N, thr, plan_, R):
    path = ctx.plot_path(NAME)
    if path is None:
        return None
    from minigd._plotting import pyplot as _pyplot
    from minigd._plotting import save_png as _save

    plt = _pyplot()
    colors = {"grid": "#7f7f7f", "random": "#1f77b4", "bayes": "#d62728"}
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    x = np.arange(1, N + 1)
    for k, s in enumerate(strategies):
        c = [iv[(s, "curve", t)] for t in range(N)]
        y = np.array([np.nan if d["value"] is None else d["value"] for d in c])
        lo = np.array([np.nan if d["lo"] is None else d["lo"] for d in c])
        hi = np.array([np.nan if d["hi"] is None else d["hi"] for d in c])
        off = (k - (len(strategies) - 1) / 2) * 0.08  # keep overlapping curves apart
        ax.plot(x + off, y, "o-", color=colors[s], ms=3.5, lw=1.6, label=LABELS[s])
        ax.fill_between(x + off, lo, hi, color=colors[s], alpha=0.13, lw=0)
    ax.axhline(thr, color="k", ls="--", lw=0.9, label=f"within {100 * TOLERANCE:.0f}% of the best found")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xlabel("trials used (per strategy)")
    ax.set_ylabel("best final validation loss so far (log scale)")
    ax.set_title(
        f"Search strategies: median over {R} repeats (bands: 90% intervals), {plan_.get('epochs')} epochs per trial",
        fontsize=10,
    )
    ax.grid(alpha=0.3, which="both")
    vals = [d["value"] for s in strategies for t in range(N) for d in [iv[(s, "curve", t)]] if d["value"] is not None]
    los = [d["lo"] for s in strategies for t in range(N) for d in [iv[(s, "curve", t)]] if d["lo"] is not None]
    if vals:  # diverged first trials make the early bands huge: scale to the medians
        ax.set_ylim(min([thr] + los) / 1.15, max(max(vals), thr) * 1.6)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    _save(fig, path, f"minigd question: {NAME}")
    return os.path.basename(path)
