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

#: steps-to-target resolution: evaluate at least every this many steps
MAX_EVAL_INTERVAL = 32


@functools.lru_cache(maxsize=8)
def load_data(spec: DataSpec, dtype: str):
    """The dataset of a spec (cached per process: a worker loads it once)."""
    from minigd.data import load_dataset

    return load_dataset(spec.name, val_fraction=spec.val_fraction, standardize=spec.standardize,
                        seed=spec.seed, dtype=dtype, **spec.kwargs())


def _noise(model, Xs, ys) -> dict | None:
    """Exact gradient moments on a fixed subset: B_simple = tr(Sigma)/|G|^2; None when the
    gradients are not finite there (a run on its way to diverging)."""
    from minigd import grad_moments

    try:
        m = grad_moments(model, Xs, ys)
    except (ValueError, FloatingPointError):
        return None
    return {"noise_scale": float(m.noise_scale), "trace_cov": float(m.trace_cov),
            "grad_norm_sq": float(m.grad_norm_sq)}


def _noise_record(step, examples, model, Xs, ys) -> list:
    n = _noise(model, Xs, ys)
    return [] if n is None else [{"step": step, "examples": examples, **n}]


def _optimizer(cfg: TrialConfig):
    import minigd as mg

    lr = cfg.lr
    if cfg.warmup_steps:
        lr = mg.optim.warmup(lr, cfg.warmup_steps)
    if cfg.optimizer == "adam":
        return mg.Adam(lr=lr, weight_decay=cfg.weight_decay)
    return mg.SGD(lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                  weight_decay=cfg.weight_decay)


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
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=20), "wall_time": time.perf_counter() - t_wall}


_WARM: set = set()


def _warmup(dtype: str) -> None:
    """Compile (or load) the kernels once per worker process, so no trial's timings
    include JIT compilation."""
    if dtype not in _WARM:
        from minigd.kernels import warmup
        warmup((dtype,))
        _WARM.add(dtype)


def _run(cfg: TrialConfig, t_wall: float) -> dict:
    import minigd as mg

    _warmup(cfg.dtype)
    ds = load_data(cfg.data, cfg.dtype)
    Xtr, ytr, Xva, yva = ds.X_train, ds.y_train, ds.X_val, ds.y_val
    n = len(Xtr)
    B = n if cfg.full_batch else cfg.batch_size
    if B > n:
        raise ValueError(f"batch_size: expected at most the number of training examples ({n}), got {B}")
    sizes = (Xtr.shape[1],) + tuple(cfg.sizes[1:-1]) + (ds.n_out,)
    model = mg.MLP(list(sizes), activation=cfg.activation, loss=ds.loss, dtype=cfg.dtype,
                   init=cfg.init, seed=cfg.seed, backend=cfg.backend, batch_norm=cfg.batch_norm,
                   ghost_batch_size=cfg.ghost_batch_size, dropout=cfg.dropout)
    rng = np.random.default_rng(cfg.seed + 7919)
    sub = rng.choice(n, size=min(cfg.noise_subset, n), replace=False)
    Xs, ys = Xtr[sub], ytr[sub]

    if cfg.bs_schedule:
        bs = mg.BatchSizeSchedule(B, {int(e): int(b) for e, b in cfg.bs_schedule})
    else:
        bs = B
    spe = -(-n // B)
    eval_every = max(1, min(MAX_EVAL_INTERVAL, spe // max(1, cfg.evals_per_epoch)))
    epochs = max(cfg.max_epochs, math.ceil(cfg.min_steps / spe))
    target_metric = cfg.target_metric
    if ds.task != "classification" and "accuracy" in target_metric:
        raise ValueError(f"target_metric: expected 'val_loss' (with a loss target) for the regression "
                         f"dataset {cfg.data.name!r}, got {target_metric!r}")

    noise = _noise_record(0, 0, model, Xs, ys)
    next_noise = [1]

    class NoiseProbe:
        def on_eval(self, m, rec):
            if rec["step"] >= next_noise[0]:
                noise.extend(_noise_record(rec["step"], rec["examples"], m, Xs, ys))
                next_noise[0] = 2 * rec["step"]
            return False

    diverged = False
    try:
        hist = mg.fit(model, Xtr, ytr, batch_size=bs, epochs=epochs, optimizer=_optimizer(cfg),
                      sampler=cfg.sampler, drop_last=cfg.drop_last, validation=(Xva, yva), eval_every=eval_every,
                      eval_train=False, target={target_metric: cfg.target}, seed=cfg.seed,
                      callbacks=[NoiseProbe()])
    except mg.DivergenceError as err:
        diverged = True
        hist = err.history
        model.params[...] = err.params
    if not noise or noise[-1]["step"] != hist.n_steps:
        noise.extend(_noise_record(hist.n_steps, int(hist.column("examples")[-1]) if hist.n_steps else 0,
                                   model, Xs, ys))
    train = model.evaluate(Xtr, ytr)
    val = model.evaluate(Xva, yva)
    steps = hist.n_steps
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
    med_step = float(np.median(step_s[sizes_run == B])) if np.any(sizes_run == B) else (
        float(np.median(step_s)) if steps else None)
    reached_steps = hist.steps_to_target
    robust_total = float(robust.sum())
    curve = [{k: ev.get(k) for k in ("step", "examples", "time", "val_loss", "val_accuracy")}
             for ev in hist.evals]
    # memory a training step at this batch size needs: its workspace (activations, deltas)
    # + parameters + gradient + optimizer state (momentum / Adam moments)
    from minigd.kernels.workspace import Workspace
    ws_bytes = Workspace.nbytes_for(model.layout, B, model.dtype)
    state_bytes = 2 * model.params.nbytes + _optimizer(cfg).init(model.params).state.nbytes
    res = {
        "status": "ok",
        "reached": bool(hist.reached),
        "diverged": diverged,
        "steps_to_target": reached_steps,
        "examples_to_target": hist.examples_to_target,
        "time_to_target": float(robust[:reached_steps].sum()) if hist.reached else None,
        "time_to_target_measured": hist.time_to_target,
        "steps": steps, "examples": examples, "epochs": examples / n,
        "train_time": train_time,
        "us_per_step": med_step * 1e6 if steps else None,
        "us_per_step_mean": train_time / steps * 1e6 if steps else None,
        "throughput": examples / robust_total if robust_total > 0 else None,
        "workspace_bytes": ws_bytes,
        "memory_bytes": ws_bytes + state_bytes,
        "final_train_loss": train["loss"], "final_val_loss": val["loss"],
        "final_train_accuracy": train.get("accuracy"), "final_val_accuracy": val.get("accuracy"),
        "best_val_accuracy": max((ev["val_accuracy"] for ev in hist.evals if "val_accuracy" in ev), default=None),
        "target_metric": target_metric, "target": cfg.target,
        "gen_gap_loss": val["loss"] - train["loss"],
        "gen_gap_accuracy": (train["accuracy"] - val["accuracy"]) if "accuracy" in train else None,
        "batch_size": B, "n_train": n, "n_params": model.n_params,
        "noise": noise, "curve": curve[-400:],
        "host": platform.node(), "pid": os.getpid(),
        # the threads the timings were taken with (pool workers and --workers 1: 1 and 1)
        **thread_counts(),
        "wall_time": time.perf_counter() - t_wall,
    }
    for k, v in list(res.items()):
        if isinstance(v, float) and not math.isfinite(v):
            res[k] = None
    return res
