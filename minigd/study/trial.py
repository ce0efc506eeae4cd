"""Run one trial of a sweep: train, measure, return a JSON-serialisable result.

``run_trial`` is a pure function of its :class:`~minigd.study.config.TrialConfig` (and the
machine it runs on, for the timings): executors ship configs to workers and results back.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import time
import traceback

import numpy as np

from .config import DataSpec, TrialConfig
from .executors import thread_counts

#: evaluations stop being every step after this many steps (see TrialConfig.eval_rel_step)
DENSE_EVAL_STEPS = 50
#: memory for the parameter snapshots a trial keeps to measure the noise scale mid-run
SNAPSHOT_BYTES = 64 << 20


@functools.lru_cache(maxsize=8)
def load_data(spec: DataSpec, dtype: str):
    """The dataset of a spec (cached per process: a worker loads it once)."""
    from minigd.data import load_dataset

    return load_dataset(
        spec.name,
        val_fraction=spec.val_fraction,
        standardize=spec.standardize,
        seed=spec.seed,
        dtype=dtype,
        **spec.kwargs(),
    )


def next_eval_step(step: int, rel: float) -> int:
    """The step count of the evaluation after the one at ``step`` steps: every step for the
    first :data:`DENSE_EVAL_STEPS`, then whenever the count has grown by ``rel`` (so the step
    at which a target is first met is bracketed to within ``rel`` of itself)."""
    if step < DENSE_EVAL_STEPS:
        return step + 1
    return step + max(1, int(step * rel))


def measure_noise(model, X, y, rng, cfg: TrialConfig) -> dict | None:
    """B_simple = tr(Sigma)/|G|^2 at the model's parameters, over the training set ``X, y``.

    Up to ``cfg.noise_full_limit`` rows: exact, over every training example (nothing to
    correct; standard errors 0).  Above: on a fresh random subset of ``cfg.noise_subset``
    rows drawn without replacement, with the finite-population correction
    |G|^2 ~ |g_bar|^2 - (1/n - 1/N) tr(Sigma_hat) and its standard errors
    (``grad_moments(..., population=N)``).  None when the gradients are not finite (a run on
    its way to diverging)."""
    from minigd import grad_moments

    N = len(X)
    try:
        if N <= cfg.noise_full_limit:
            m = grad_moments(model, X, y)
        else:
            idx = np.sort(rng.choice(N, size=min(cfg.noise_subset, N), replace=False))
            m = grad_moments(model, X[idx], y[idx], population=N)
    except (ValueError, FloatingPointError):
        return None
    out = {
        "noise_scale": float(m.noise_scale),
        "trace_cov": float(m.trace_cov),
        "grad_norm_sq": float(m.grad_norm_sq),
        "n_rows": int(m.n),
        "population": N,
    }
    for k in ("noise_scale_se", "grad_norm_sq_se", "trace_cov_se"):
        out[k] = float(getattr(m, k, 0.0))
    return out


def _evaluate(model, X, y) -> dict | None:
    """``model.evaluate``, or None when its forward pass overflows (parameters grown past
    the dtype's range: a run that has diverged without a non-finite step)."""
    try:
        return model.evaluate(X, y)
    except (ValueError, FloatingPointError):
        return None


class _Evaluator:
    """fit callback of a trial: evaluates the validation metric on the geometric schedule of
    :func:`next_eval_step`, stops at the target, and keeps parameter snapshots at the
    evaluations for the noise-scale measurements after training."""

    def __init__(self, Xva, yva, metric: str, target: float, rel: float, snap_cap: int, stop: bool = True):
        self.Xva, self.yva = Xva, yva
        self.key = metric.removeprefix("val_")
        self.higher = "accuracy" in metric
        self.target, self.rel, self.stop = target, rel, stop
        self.next = 1
        self.curve: list = []  # {"step", "examples", "time", "val_loss", "val_accuracy"}
        self.snaps: list = []  # (step, examples, params copy), thinned to snap_cap
        self.snap_cap = snap_cap
        self.reached_at = None  # index into curve
        self.overflowed = False
        self.hist = None

    def on_fit_start(self, model, hist):
        self.hist = hist
        self.t_start = time.perf_counter()  # fit's set-up ends here (the first step is next)

    def met(self, v) -> bool:
        return v >= self.target if self.higher else v <= self.target

    def on_step(self, model, step, loss):
        if step < self.next:
            return False
        self.next = next_eval_step(step, self.rel)
        row = self.hist.row(step - 1)
        ev = _evaluate(model, self.Xva, self.yva)
        if ev is None:
            self.overflowed = True
            return True
        rec = {"step": step, "examples": int(row["examples"]), "time": float(row["time"])}
        rec.update({f"val_{k}": float(v) for k, v in ev.items()})
        self.curve.append(rec)
        self.snaps.append((step, rec["examples"], model.params.copy()))
        if len(self.snaps) > self.snap_cap:  # halve the resolution, keep the span
            self.snaps = self.snaps[::2]
        if self.reached_at is None and self.met(ev[self.key]):
            self.reached_at = len(self.curve) - 1
            return self.stop
        return False

    def interpolated(self):
        """(steps, examples) to target interpolated linearly in the metric between the last
        evaluation that missed the target and the first that met it, and the bracket's
        width relative to its end; (None, None, None) when never met."""
        if self.reached_at is None:
            return None, None, None
        k = self.reached_at
        hi = self.curve[k]
        if k == 0:
            lo = {"step": 0, "examples": 0, f"val_{self.key}": None}
        else:
            lo = self.curve[k - 1]
        m1, m0 = hi[f"val_{self.key}"], lo[f"val_{self.key}"]
        frac = 1.0
        if m0 is not None and m1 != m0:
            frac = min(1.0, max(0.0, (self.target - m0) / (m1 - m0)))
        steps = lo["step"] + frac * (hi["step"] - lo["step"])
        examples = lo["examples"] + frac * (hi["examples"] - lo["examples"])
        return steps, examples, (hi["step"] - lo["step"]) / hi["step"]

    def snapshot_near(self, step: float):
        return min(self.snaps, key=lambda s: abs(s[0] - step)) if self.snaps else None


def _optimizer(cfg: TrialConfig, steps_per_epoch: int = 1):
    """The trial's optimizer; ``lr_decay`` epochs become step boundaries at
    ``steps_per_epoch`` steps an epoch (the batch size is constant in a decay arm)."""
    import minigd as mg

    lr = cfg.lr
    if cfg.lr_decay:
        factors = {float(f) for _, f in cfg.lr_decay}
        if len(factors) != 1:
            raise ValueError(f"lr_decay: expected one factor at every epoch, got {cfg.lr_decay!r}")
        lr = mg.optim.step_decay(lr, [int(e) * steps_per_epoch for e, _ in cfg.lr_decay], factor=factors.pop())
    if cfg.warmup_steps:
        lr = mg.optim.warmup(lr, cfg.warmup_steps)
    if cfg.optimizer == "adam":
        return mg.Adam(lr=lr, weight_decay=cfg.weight_decay)
    return mg.SGD(
        lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay
    )


def run_trial(cfg: TrialConfig) -> dict:
    """Train one model as ``cfg`` says and measure it.

    Returns a dict with ``status`` "ok" and the measurements (see the keys below), or
    ``status`` "failed" with the error and its traceback -- a failing trial never raises
    into the sweep.
    """
    t_wall = time.perf_counter()
    try:
        return _run(cfg, t_wall)
    except Exception as exc:  # recorded, the sweep goes on
        return {
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=20),
            "wall_time": time.perf_counter() - t_wall,
        }


_WARM: set = set()


def _warmup(dtype: str) -> None:
    """Compile (or load) the kernels once per worker process, so no trial's timings
    include JIT compilation."""
    if dtype not in _WARM:
        from minigd.warmup import warmup

        warmup((dtype,))
        _WARM.add(dtype)


def _run(cfg: TrialConfig, t_wall: float) -> dict:
    import minigd as mg

    _warmup(cfg.dtype)
    ds = load_data(cfg.data, cfg.dtype)
    Xtr, ytr, Xva, yva = ds.X_train, ds.y_train, ds.X_val, ds.y_val
    n = len(Xtr)
    adaptive = cfg.adaptive_spec() if cfg.is_adaptive else None
    candidates = adaptive.sizes(n) if adaptive is not None else None  # checked against n
    B = candidates[0] if adaptive is not None else n if cfg.full_batch else cfg.batch_size
    if B > n:
        raise ValueError(f"batch_size: expected at most the number of training examples ({n}), got {B}")
    sizes = (Xtr.shape[1],) + tuple(cfg.sizes[1:-1]) + (ds.n_out,)
    model = mg.MLP(
        list(sizes),
        activation=cfg.activation,
        loss=ds.loss,
        dtype=cfg.dtype,
        init=cfg.init,
        seed=cfg.seed,
        backend=cfg.backend,
        batch_norm=cfg.batch_norm,
        ghost_batch_size=cfg.ghost_batch_size,
        dropout=cfg.dropout,
    )
    rng = np.random.default_rng(cfg.seed + 7919)  # the noise subsets (large training sets only)

    if adaptive is not None:
        bs = adaptive
    elif cfg.bs_schedule:
        bs = mg.BatchSizeSchedule(B, {int(e): int(b) for e, b in cfg.bs_schedule})
    else:
        bs = B
    spe = -(-n // B)
    # an adaptive run's budget is that of its starting size, and at least one decision
    epochs = max(cfg.max_epochs, math.ceil(max(cfg.min_steps, adaptive.every if adaptive else 0) / spe))
    target_metric = cfg.target_metric
    if ds.task != "classification" and "accuracy" in target_metric:
        raise ValueError(
            f"target_metric: expected 'val_loss' (with a loss target) for the regression "
            f"dataset {cfg.data.name!r}, got {target_metric!r}"
        )

    noise = []

    def noise_at(where, step, examples):
        r = measure_noise(model, Xtr, ytr, rng, cfg)
        if r is not None:
            noise.append({"step": step, "examples": examples, "where": where, **r})

    noise_at("start", 0, 0)
    snap_cap = max(32, SNAPSHOT_BYTES // max(1, model.params.nbytes))
    ev = _Evaluator(Xva, yva, target_metric, cfg.target, cfg.eval_rel_step, snap_cap, cfg.stop_at_target)
    diverged = False
    t_call = time.perf_counter()
    try:
        hist = mg.fit(
            model,
            Xtr,
            ytr,
            batch_size=bs,
            epochs=epochs,
            optimizer=_optimizer(cfg, spe),
            sampler=cfg.sampler,
            drop_last=cfg.drop_last,
            seed=cfg.seed,
            callbacks=[ev],
        )
    except mg.DivergenceError as err:
        diverged = True
        hist = err.history
        model.params[...] = err.params
    diverged = diverged or ev.overflowed
    steps = hist.n_steps
    reached = ev.reached_at is not None
    final_step = ev.curve[ev.reached_at]["step"] if reached else steps
    final_examples = int(hist.row(final_step - 1)["examples"]) if final_step else 0
    # the noise scale along the run, at the parameters of the evaluation nearest each point:
    # the middle of training (half the steps to the target, or of the whole run) and a few
    # more for the curve; then at the target (the current parameters), or the end
    end_params = model.params.copy()
    for where, frac in (("mid", 0.5), ("curve", 0.125), ("curve", 0.25), ("curve", 0.75)):
        snap = ev.snapshot_near(frac * final_step)
        if snap is None or snap[0] >= final_step or any(p["step"] == snap[0] for p in noise):
            continue
        model.params[...] = snap[2]
        noise_at(where, snap[0], snap[1])
    if reached and steps > final_step:  # stop_at_target=False: trained on past the target
        snap = ev.snapshot_near(final_step)
        if snap is not None and snap[0] == final_step:
            model.params[...] = snap[2]
            noise_at("target", final_step, final_examples)
        model.params[...] = end_params
        noise_at("end", steps, int(hist.row(steps - 1)["examples"]))
    else:
        model.params[...] = end_params
        noise_at("target" if reached else "end", final_step, final_examples)
    # (a run of one step has no parameters between its ends: no "mid" point -- the analysis
    # leaves it out of the mid-run median rather than take the target's value for it)
    noise.sort(key=lambda p: (p["step"], p["where"] != "start"))
    s_interp, e_interp, bracket = ev.interpolated()
    nan = {"loss": math.nan, **({"accuracy": math.nan} if ds.task == "classification" else {})}
    train = _evaluate(model, Xtr, ytr) or nan
    val = _evaluate(model, Xva, yva) or nan
    train_time = float(hist.column("time")[-1]) if steps else 0.0
    examples = int(hist.column("examples")[-1]) if steps else 0
    # Per-step durations.  Every step at one batch size does the same work, so the median
    # step is the machine's cost of a step without interference (a context switch or another
    # process on a shared machine); time to target and throughput are derived from it, and
    # the raw measured sums are kept next to them.
    # Steps of different sizes (the last partial batch of an epoch, a batch-size schedule)
    # get the median of their own size.
    step_s = np.diff(hist.column("time"), prepend=0.0) if steps else np.zeros(0)
    sizes_run = hist.column("batch_size") if steps else np.zeros(0, np.int64)
    robust = np.zeros(len(step_s))
    for b in np.unique(sizes_run):
        sel = sizes_run == b
        robust[sel] = np.median(step_s[sel])
    med_step = (
        float(np.median(step_s[sizes_run == B]))
        if np.any(sizes_run == B)
        else (float(np.median(step_s)) if steps else None)
    )
    reached_steps = final_step if reached else None
    robust_total = float(robust.sum())
    curve = ev.curve
    # memory a training step at this batch size needs: its workspace (activations, deltas)
    # + parameters + gradient + optimizer state (momentum / Adam moments)
    ws_bytes = model.workspace_bytes(B if adaptive is None else max(int(sizes_run.max()) if steps else B, B))
    state_bytes = 2 * model.params.nbytes + _optimizer(cfg).init(model.params).state.nbytes
    res = {
        "status": "ok",
        "reached": reached,
        "diverged": diverged,
        # the first evaluation that met the target (evaluations every step for the first 50,
        # then whenever the step count grew by eval_rel_step) ...
        "steps_to_target": reached_steps,
        "examples_to_target": final_examples if reached else None,
        # ... and interpolated in the metric between it and the evaluation before it
        "steps_to_target_interp": s_interp,
        "examples_to_target_interp": e_interp,
        "eval_bracket": bracket,
        "n_evals": len(ev.curve),
        # in-trial timings (the study's wall time to target comes from its throughput probe)
        "time_to_target": float(robust[:reached_steps].sum()) if reached else None,
        "time_to_target_measured": float(hist.row(reached_steps - 1)["time"]) if reached else None,
        "steps": steps,
        "examples": examples,
        "epochs": examples / n,
        "train_time": train_time,
        "us_per_step": med_step * 1e6 if steps else None,
        "us_per_step_mean": train_time / steps * 1e6 if steps else None,
        "throughput": examples / robust_total if robust_total > 0 else None,
        "workspace_bytes": ws_bytes,
        "memory_bytes": ws_bytes + state_bytes,
        "final_train_loss": train["loss"],
        "final_val_loss": val["loss"],
        "final_train_accuracy": train.get("accuracy"),
        "final_val_accuracy": val.get("accuracy"),
        "best_val_accuracy": max((e["val_accuracy"] for e in ev.curve if "val_accuracy" in e), default=None),
        "target_metric": target_metric,
        "target": cfg.target,
        "gen_gap_loss": val["loss"] - train["loss"],
        "gen_gap_accuracy": (train["accuracy"] - val["accuracy"]) if "accuracy" in train else None,
        "batch_size": B,
        "n_train": n,
        "n_params": model.n_params,
        "noise": noise,
        "curve": _thin(curve, 400),
        "host": platform.node(),
        "pid": os.getpid(),
        # the threads the timings were taken with (pool workers and --workers 1: 1 and 1)
        **thread_counts(),
        "wall_time": time.perf_counter() - t_wall,
    }
    res["epochs_budget"] = epochs
    if adaptive is not None:
        res["adaptive"] = adaptive_record(
            hist, candidates, s_interp if reached else None, step_s, getattr(ev, "t_start", t_call) - t_call
        )
    for k, v in list(res.items()):
        if isinstance(v, float) and not math.isfinite(v):
            res[k] = None
    return res


def batch_in_force(decisions, first: int, n_steps: int) -> np.ndarray:
    """The controller's batch size at each of ``n_steps`` steps: ``first`` until the first
    decision, then each decision's from the step it was taken after (a step that holds
    fewer rows -- an epoch's last -- counts at the size in force)."""
    out = np.full(n_steps, int(first), np.int64)
    for d in decisions or ():
        s = int(d["step"])
        if 0 <= s < n_steps:
            out[s:] = int(d["batch_size"])
    return out


def adaptive_record(hist, candidates, steps_to_target, step_s, setup_s) -> dict:
    """What an adaptive trial keeps of its controller (JSON; ``result["adaptive"]``):

    ``candidates``; ``decisions``: ``[step, batch size, learning-rate factor]`` of every
    decision (thinned evenly to :data:`DECISIONS_CAP`, the last kept); ``steps_by_batch``:
    ``[[B, steps], ...]`` the steps to the target spent at each batch size in force, the
    last (interpolated) step counted by its fraction -- so the wall time to target is
    ``sum(steps * step time at B)``, what the analysis computes from the throughput probe
    (None when the target was not reached); ``step_s_by_batch``: the median in-trial step
    time at each batch size run (the analysis's fallback without a probe); ``setup_s``: the
    in-trial seconds from calling ``fit`` to its first step (input checks, the warm-up of
    every candidate's kernels, and the controller's throughput measurement);
    ``final_batch_size`` and ``max_batch_size``."""
    decisions = list(hist.adaptive or [])
    n = hist.n_steps
    force = batch_in_force(decisions, candidates[0], n)
    by_b = None
    if steps_to_target is not None and n:
        k = min(n, math.ceil(steps_to_target))
        w = np.ones(k)
        if k > steps_to_target:
            w[-1] = steps_to_target - (k - 1)
        by_b = [[int(b), float(w[force[:k] == b].sum())] for b in np.unique(force[:k])]
    sizes_run = hist.column("batch_size") if n else np.zeros(0, np.int64)
    step_s_by = (
        [[int(b), float(np.median(step_s[sizes_run == b]))] for b in np.unique(sizes_run) if np.any(sizes_run == b)]
        if n
        else []
    )
    rec = [[int(d["step"]), int(d["batch_size"]), float(d["lr_factor"])] for d in decisions]
    if len(rec) > DECISIONS_CAP:
        idx = np.unique(np.linspace(0, len(rec) - 1, DECISIONS_CAP).round().astype(int))
        rec = [rec[i] for i in idx]
    return {
        "candidates": [int(c) for c in candidates],
        "decisions": rec,
        "steps_by_batch": by_b,
        "step_s_by_batch": step_s_by,
        "setup_s": float(setup_s),
        "final_batch_size": int(force[-1]) if n else int(candidates[0]),
        "max_batch_size": int(force.max()) if n else int(candidates[0]),
    }


#: decisions an adaptive trial keeps (evenly thinned beyond)
DECISIONS_CAP = 400


def _thin(curve: list, cap: int) -> list:
    """At most ``cap`` points of an evaluation curve, evenly by index, the last one kept."""
    if len(curve) <= cap:
        return curve
    idx = np.unique(np.linspace(0, len(curve) - 1, cap).round().astype(int))
    return [curve[i] for i in idx]
