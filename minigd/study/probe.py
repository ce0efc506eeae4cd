"""The throughput probe: the cost of one training step per batch size, measured apart from
the convergence trials.

A trial races the other workers of the pool for the machine, and ``fit``'s clock adds up
only its step calls, so the in-trial timings are neither comparable across batch sizes nor
what a user's run pays.  The probe measures instead, after the sweep, with nothing else
running:

* one thread (BLAS and Numba), warm kernels (a pilot ``fit`` first);
* the whole step as ``fit`` pays it: the wall time from ``fit``'s first step to its last
  (sampling, the loop, the history, epoch ends, the optimizer), over ``m`` steps chosen so
  that one round lasts about :data:`ROUND_S`, divided by ``m``; ``fit``'s set-up (input
  checks, the untimed warm-up step) is left out, as it is paid once per run;
* ``rounds`` rounds, interleaved across the batch sizes in a fresh random order each round
  (drift on a shared machine then hits every batch size alike), and per batch size the
  median round with the spread of the rounds (``lo_s``, ``hi_s``: the smallest and largest).

Wall time to target = steps to target x the median step time (evaluation excluded); the
analysis carries the rounds' spread into its interval by resampling them.

The adaptive arm (``batch_size="adaptive"`` trials) gets two more kinds of entry
(:func:`adaptive_probe_jobs`), told apart by their ``"adaptive"`` field:

* ``"step"``: the step of an adaptive run at one batch size B, as ``fit`` pays it with the
  controller on (its decisions after ``every`` steps, then on its period that doubles
  while the size is kept, and its noise tracking ``every / track_every`` times a period):
  ``fit(batch_size=AdaptiveBatchSize(min=B, max=B, ...))`` with the trial's settings,
  timed as above -- one entry per batch size the adaptive trials ran at;
* ``"setup"``: the adaptive run's one-time cost: the wall time of ``fit`` with the trial's
  settings up to and including its first decision (the warm-up of every candidate batch
  size, and the decision itself; with ``throughput="probe"`` also the probe of the sizes
  that decision can reach), minus the same for a run held at the starting size (the
  ``"step"`` settings), per round.  By default the controller times nothing outside
  training (a size it has not trained at is predicted, then tried for real), so nothing
  later is left out; with ``throughput="probe"`` the probes of sizes a later decision
  first reaches (one warm-up and three steps each) are, and a run that grows far pays a
  little more.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .config import TrialConfig

#: seconds one round of one batch size should last
ROUND_S = 0.02
#: rounds per batch size
ROUNDS = 7


def arch_of(cfg: TrialConfig) -> dict:
    """The architecture key the analysis groups trials by (and matches probe entries with)."""
    return {"sizes": list(cfg.sizes), "activation": cfg.activation, "optimizer": cfg.optimizer, "norm": cfg.norm_label}


def probe_key(cfg: TrialConfig) -> str:
    """What makes two trials' step costs the same: everything but the learning rate and seed."""
    import dataclasses
    import json

    d = dataclasses.replace(
        cfg,
        lr=0.0,
        base_lr=0.0,
        seed=0,
        search_id="",
        lr_policy="",
        warmup_steps=0,
        max_epochs=0,
        min_steps=0,
        target=0.0,
    ).to_dict()
    return json.dumps(d, sort_keys=True, default=str)


def probe_jobs(configs) -> list:
    """One representative config per distinct step cost (architecture, batch size, data,
    backend, optimizer, batch norm...), in a stable order.  Adaptive trials are left out:
    their jobs are :func:`adaptive_probe_jobs`'."""
    seen = {}
    for c in configs:
        if not c.is_adaptive:
            seen.setdefault(probe_key(c), c)
    return [seen[k] for k in sorted(seen)]


def pinned(cfg: TrialConfig, B: int) -> TrialConfig:
    """The adaptive config ``cfg`` held at batch size B (the controller on, one candidate)."""
    import dataclasses

    settings = dict(cfg.adaptive)
    settings.update(min=int(B), max=int(B))
    return dataclasses.replace(cfg, adaptive=tuple(sorted(settings.items())))


def adaptive_probe_key(cfg: TrialConfig, kind: str) -> str:
    """The key of an adaptive entry: its kind and the step cost's key."""
    return f"adaptive-{kind}:" + probe_key(cfg)


def adaptive_probe_jobs(rows) -> list:
    """``[(kind, config)]`` for the adaptive trials among ``rows`` (``(config, result)``
    pairs): a ``"setup"`` job per distinct adaptive config (learning rate and seed aside)
    and a ``"step"`` job (:func:`pinned`) per batch size its trials spent steps at before
    the target (a trial that did not reach it has no time to target to cost), in a stable
    order."""
    jobs = {}
    for cfg, res in rows:
        if not cfg.is_adaptive or res.get("status") != "ok":
            continue
        jobs.setdefault(adaptive_probe_key(cfg, "setup"), ("setup", cfg))
        rec = res.get("adaptive") if isinstance(res.get("adaptive"), dict) else {}
        for b in sorted({int(b) for b, w in (rec.get("steps_by_batch") or []) if w > 0}):
            p = pinned(cfg, b)
            jobs.setdefault(adaptive_probe_key(p, "step"), ("step", p))
    return [jobs[k] for k in sorted(jobs)]


class _Clock:
    """fit callback: the wall time from the first step to the end of the loop."""

    def on_fit_start(self, model, hist):
        self.t0 = time.perf_counter()

    def on_fit_end(self, model, hist):
        self.t1 = time.perf_counter()
        self.steps = hist.n_steps


def probe(configs, *, rounds: int = ROUNDS, round_s: float = ROUND_S, seed: int = 0, adaptive=()) -> list:
    """Measure the step time of each config of ``configs`` (see :func:`probe_jobs`) in this
    process, pinned to one thread.  Returns one JSON-serialisable entry per config:
    ``{"key", "arch", "batch_size", "full_batch", "round_s": [seconds per step, one per
    round], "median_s", "lo_s", "hi_s", "steps_per_round", "blas_threads", "numba_threads",
    "host"}``.

    ``adaptive``: ``(kind, config)`` jobs of :func:`adaptive_probe_jobs`, measured in the
    same interleaved rounds; their entries follow, with ``"adaptive": kind`` (and for
    "setup", ``round_s`` the set-up seconds of each round and ``batch_size`` the starting
    size)."""
    import dataclasses
    import platform

    import minigd as mg

    from .executors import one_thread, thread_counts
    from .trial import _optimizer, _warmup, load_data

    configs = list(configs)
    jobs = [(None, c) for c in configs] + [(k, c) for k, c in adaptive]
    if not jobs:
        return []
    rng = np.random.default_rng(seed)
    with one_thread():
        _warmup(jobs[0][1].dtype)
        setups = []
        for kind, c in jobs:
            ds = load_data(c.data, c.dtype)
            n = len(ds.X_train)
            spec = c.adaptive_spec() if kind is not None else None
            B = spec.sizes(n)[0] if spec is not None else n if c.full_batch else c.batch_size
            # the controller on, held at B: its tracking and decisions, no measuring
            held = mg.AdaptiveBatchSize(**{**dict(pinned(c, B).adaptive), "throughput": {B: 1.0}}) if spec else None
            if kind == "step":
                spec = held
            sizes = (ds.X_train.shape[1],) + tuple(c.sizes[1:-1]) + (ds.n_out,)
            model = mg.MLP(
                list(sizes),
                activation=c.activation,
                loss=ds.loss,
                dtype=c.dtype,
                init=c.init,
                seed=0,
                backend=c.backend,
                batch_norm=c.batch_norm,
                ghost_batch_size=c.ghost_batch_size,
                dropout=c.dropout,
            )
            # the step's work does not depend on the learning rate; a small one keeps the
            # probe's repeated runs from diverging
            opt = _optimizer(dataclasses.replace(c, lr=1e-4, warmup_steps=0))
            setups.append(
                {
                    "cfg": c,
                    "kind": kind,
                    "spec": spec,
                    "held": held,
                    "model": model,
                    "ds": ds,
                    "B": B,
                    "opt": opt,
                    "spe": -(-n // B),
                    "m": 1,
                    "least": spec.every if spec is not None else 1,
                    "times": [],
                }
            )

        def fit(s, batch_size, m, callbacks):
            c = s["cfg"]
            return mg.fit(
                s["model"],
                s["ds"].X_train,
                s["ds"].y_train,
                batch_size=batch_size,
                steps=m,
                optimizer=s["opt"],
                sampler=c.sampler,
                drop_last=c.drop_last and s["kind"] is None,
                seed=int(rng.integers(2**31)),
                callbacks=callbacks,
            )

        def run(s, m):
            if s["kind"] == "setup":  # up to the first decision, beyond a run held at the starting size
                every = s["spec"].every
                t = time.perf_counter()
                fit(s, s["spec"], every, [])
                t2 = time.perf_counter()
                fit(s, s["held"], every, [])
                return max(0.0, (t2 - t) - (time.perf_counter() - t2))
            clock = _Clock()
            fit(s, s["spec"] if s["kind"] == "step" else s["B"], max(m, s["least"]), [clock])
            return (clock.t1 - clock.t0) / max(1, clock.steps)

        for s in setups:  # pilot: warm every regime and size the rounds
            run(s, 2)
            if s["kind"] == "setup":
                continue
            # the least of three short runs: one disturbed pilot (another process on a shared
            # machine) would make this batch size's rounds far shorter than its neighbours'
            per = min(run(s, 4) for _ in range(3))
            m = max(s["least"], math.ceil(round_s / max(per, 1e-7)))
            if m > s["spe"]:  # whole epochs, so an epoch's end costs what it costs a user
                m = s["spe"] * math.ceil(m / s["spe"])
            s["m"] = m
        for _ in range(rounds):
            for i in rng.permutation(len(setups)):
                s = setups[i]
                s["times"].append(run(s, s["m"]))
        threads = thread_counts()
    out = []
    for s in setups:
        t = np.asarray(s["times"])
        e = {
            "key": probe_key(s["cfg"]) if s["kind"] is None else adaptive_probe_key(s["cfg"], s["kind"]),
            "arch": arch_of(s["cfg"]),
            "batch_size": int(s["B"]),
            "full_batch": bool(s["cfg"].full_batch),
            "round_s": [float(x) for x in t],
            "median_s": float(np.median(t)),
            "lo_s": float(t.min()),
            "hi_s": float(t.max()),
            "steps_per_round": s["m"] if s["kind"] != "setup" else 0,
            "host": platform.node(),
            **threads,
        }
        if s["kind"] is not None:
            e["adaptive"] = s["kind"]
        out.append(e)
    return out
