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
    return {"sizes": list(cfg.sizes), "activation": cfg.activation, "optimizer": cfg.optimizer,
            "norm": cfg.norm_label}


def probe_key(cfg: TrialConfig) -> str:
    """What makes two trials' step costs the same: everything but the learning rate and seed."""
    import dataclasses
    import json

    d = dataclasses.replace(cfg, lr=0.0, base_lr=0.0, seed=0, search_id="", lr_policy="",
                            warmup_steps=0, max_epochs=0, min_steps=0, target=0.0).to_dict()
    return json.dumps(d, sort_keys=True, default=str)


def probe_jobs(configs) -> list:
    """One representative config per distinct step cost (architecture, batch size, data,
    backend, optimizer, batch norm...), in a stable order."""
    seen = {}
    for c in configs:
        seen.setdefault(probe_key(c), c)
    return [seen[k] for k in sorted(seen)]


class _Clock:
    """fit callback: the wall time from the first step to the end of the loop."""

    def on_fit_start(self, model, hist):
        self.t0 = time.perf_counter()

    def on_fit_end(self, model, hist):
        self.t1 = time.perf_counter()
        self.steps = hist.n_steps


def probe(configs, *, rounds: int = ROUNDS, round_s: float = ROUND_S, seed: int = 0) -> list:
    """Measure the step time of each config of ``configs`` (see :func:`probe_jobs`) in this
    process, pinned to one thread.  Returns one JSON-serialisable entry per config:
    ``{"key", "arch", "batch_size", "full_batch", "round_s": [seconds per step, one per
    round], "median_s", "lo_s", "hi_s", "steps_per_round", "blas_threads", "numba_threads",
    "host"}``."""
    import dataclasses
    import platform

    import minigd as mg

    from .executors import one_thread, thread_counts
    from .trial import _optimizer, _warmup, load_data

    configs = list(configs)
    if not configs:
        return []
    rng = np.random.default_rng(seed)
    with one_thread():
        _warmup(configs[0].dtype)
        setups = []
        for c in configs:
            ds = load_data(c.data, c.dtype)
            n = len(ds.X_train)
            B = n if c.full_batch else c.batch_size
            sizes = (ds.X_train.shape[1],) + tuple(c.sizes[1:-1]) + (ds.n_out,)
            model = mg.MLP(list(sizes), activation=c.activation, loss=ds.loss, dtype=c.dtype, init=c.init,
                           seed=0, backend=c.backend, batch_norm=c.batch_norm,
                           ghost_batch_size=c.ghost_batch_size, dropout=c.dropout)
            # the step's work does not depend on the learning rate; a small one keeps the
            # probe's repeated runs from diverging
            opt = _optimizer(dataclasses.replace(c, lr=1e-4, warmup_steps=0))
            setups.append({"cfg": c, "model": model, "ds": ds, "B": B, "opt": opt,
                            "spe": -(-n // B), "m": 1, "times": []})

        def run(s, m):
            clock = _Clock()
            mg.fit(s["model"], s["ds"].X_train, s["ds"].y_train, batch_size=s["B"], steps=m, optimizer=s["opt"],
                   sampler=s["cfg"].sampler, drop_last=s["cfg"].drop_last,
                   seed=int(rng.integers(2**31)), callbacks=[clock])
            return (clock.t1 - clock.t0) / max(1, clock.steps)

        for s in setups:    # pilot: warm every regime and size the rounds
            run(s, 2)
            # the least of three short runs: one disturbed pilot (another process on a shared
            # machine) would make this batch size's rounds far shorter than its neighbours'
            per = min(run(s, 4) for _ in range(3))
            m = max(1, math.ceil(round_s / max(per, 1e-7)))
            if m > s["spe"]:     # whole epochs, so an epoch's end costs what it costs a user
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
        out.append({"key": probe_key(s["cfg"]), "arch": arch_of(s["cfg"]), "batch_size": s["B"],
                    "full_batch": bool(s["cfg"].full_batch), "round_s": [float(x) for x in t],
                    "median_s": float(np.median(t)), "lo_s": float(t.min()), "hi_s": float(t.max()),
                    "steps_per_round": s["m"], "host": platform.node(), **threads})
    return out
