"""Random and Bayesian (Optuna) search over batch size, learning rate, momentum, width
and depth, through the same trials, store and executors as the grid sweep.

The objective is minimised: ``time_to_target`` (default), ``steps_to_target``,
``examples_to_target`` or ``val_loss``; a trial that does not reach the target scores
``inf`` for the *_to_target objectives (Optuna is told it failed).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from minigd._validation import check_choice, check_int

from .config import DataSpec, TrialConfig
from .executors import make_executor
from .store import ResultStore
from .trial import run_trial

OBJECTIVES = ("time_to_target", "steps_to_target", "examples_to_target", "val_loss")


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Ranges to search.  Batch sizes are powers of two in [batch_min, batch_max]; lr is
    log-uniform; momentum uniform; width log-uniform over powers of two in
    [width_min, width_max] (a width of 1 is allowed); depth uniform in [depth_min, depth_max]."""

    batch_min: int = 1
    batch_max: int = 1024
    lr_min: float = 1e-3
    lr_max: float = 1.0
    momentum_min: float = 0.0
    momentum_max: float = 0.95
    width_min: int = 64
    width_max: int = 64
    depth_min: int = 1
    depth_max: int = 1


def _objective(res: dict, objective: str) -> float:
    if res.get("status") != "ok":
        return math.inf
    if objective == "val_loss":
        v = res.get("final_val_loss")
        return math.inf if v is None else float(v)
    if not res.get("reached"):
        return math.inf
    return float(res[objective])


def _config(
    base: TrialConfig,
    n_train: int,
    n_in: int,
    n_out: int,
    B: int,
    lr: float,
    mom: float,
    width: int,
    depth: int,
    search_id: str,
) -> TrialConfig:
    B = min(B, n_train)
    return dataclasses.replace(
        base,
        sizes=(n_in,) + (width,) * depth + (n_out,),
        batch_size=B,
        full_batch=B == n_train,
        lr=float(lr),
        momentum=float(mom),
        lr_policy="fixed",
        base_lr=float(lr),
        search_id=search_id,
    )


def search(
    space: SearchSpace,
    n_trials: int,
    results,
    *,
    method: str = "random",
    objective: str = "time_to_target",
    base: TrialConfig | None = None,
    seed: int = 0,
    workers=None,
    scheduler=None,
    executor=None,
    progress=None,
) -> dict:
    """Search ``n_trials`` configurations; every trial is stored in ``results`` (resumable:
    re-running the same search with the same seed re-uses stored trials).

    Returns {"best": (config dict, result), "trials": [(config dict, objective)]}.
    """
    method = check_choice("method", method, ("random", "bayes"))
    objective = check_choice("objective", objective, OBJECTIVES)
    n_trials = check_int("n_trials", n_trials, low=1)
    base = base or TrialConfig(data=DataSpec())
    from .trial import load_data

    ds = load_data(base.data, base.dtype)
    n_train, n_in, n_out = len(ds.X_train), ds.X_train.shape[1], ds.n_out
    store = results if isinstance(results, ResultStore) else ResultStore(results)
    ex = executor or make_executor(workers, scheduler)
    sid = f"{method}-{seed}"
    log2b = (int(math.log2(space.batch_min)), int(math.log2(space.batch_max)))
    log2w = (int(math.log2(space.width_min)), int(math.log2(space.width_max)))
    done = {}
    for cfg, res in store.rows():
        done[cfg.key] = res
    scored = []

    def run_batch(cfgs):
        todo = [c for c in cfgs if c.key not in done]
        for c, res in ex.run(run_trial, todo):
            store.put(c, res)
            done[c.key] = res
            if progress:
                progress(c, res)
        return [(c, done[c.key]) for c in cfgs]

    if method == "random":
        rng = np.random.default_rng(seed)
        cfgs = []
        for _ in range(n_trials):
            B = 2 ** int(rng.integers(log2b[0], log2b[1] + 1))
            lr = math.exp(rng.uniform(math.log(space.lr_min), math.log(space.lr_max)))
            mom = rng.uniform(space.momentum_min, space.momentum_max)
            w = 2 ** int(rng.integers(log2w[0], log2w[1] + 1))
            d = int(rng.integers(space.depth_min, space.depth_max + 1))
            cfgs.append(_config(base, n_train, n_in, n_out, B, lr, mom, w, d, sid))
        for c, res in run_batch(cfgs):
            scored.append((c, res, _objective(res, objective)))
    else:
        try:
            import optuna
        except ImportError as exc:
            raise ImportError("Bayesian search needs Optuna: pip install 'minigd[study]'") from exc
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
        per_round = max(1, getattr(ex, "n_workers", 1))
        left = n_trials
        while left > 0:
            k = min(per_round, left)
            trials = [study.ask() for _ in range(k)]
            cfgs = []
            for t in trials:
                B = 2 ** t.suggest_int("log2_batch", *log2b)
                lr = t.suggest_float("lr", space.lr_min, space.lr_max, log=True)
                mom = t.suggest_float("momentum", space.momentum_min, space.momentum_max)
                w = 2 ** t.suggest_int("log2_width", *log2w)
                d = t.suggest_int("depth", space.depth_min, space.depth_max)
                cfgs.append(_config(base, n_train, n_in, n_out, B, lr, mom, w, d, sid))
            for t, (c, res) in zip(trials, run_batch(cfgs)):
                v = _objective(res, objective)
                if math.isfinite(v):
                    study.tell(t, v)
                else:
                    study.tell(t, state=optuna.trial.TrialState.FAIL)
                scored.append((c, res, v))
            left -= k
    if store is not results:
        store.close()
    best = min(scored, key=lambda x: x[2])
    return {
        "best": (best[0].to_dict(), best[1]) if math.isfinite(best[2]) else None,
        "objective": objective,
        "trials": [(c.to_dict(), v if math.isfinite(v) else None) for c, _, v in scored],
    }
