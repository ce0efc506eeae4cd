"""Batch-size sweeps: a specification, its trials, and running them resumably."""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from dataclasses import dataclass, field

from minigd._validation import check_choice, check_float, check_int
from minigd.backends.base import NormSpec

from .config import ADAPTIVE_SETTINGS, DataSpec, TrialConfig
from .executors import make_executor
from .store import ResultStore
from .trial import run_trial

LR_POLICIES = ("tuned", "linear", "sqrt", "fixed")


def default_batch_sizes(n: int) -> tuple:
    """Powers of two from 1 below n, then the full batch (n)."""
    out, b = [], 1
    while b < n:
        out.append(b)
        b *= 2
    return tuple(out) + (n,)


@dataclass(frozen=True)
class SweepSpec:
    """What to sweep.

    batch_sizes : ints, and/or "full"; default powers of two up to the full batch.
    lr_policy : "tuned" -- every batch size tries ``lr_grid`` multiples of the square-root
        rule's rate (base_lr * sqrt(B / base_batch_size)) and the analysis keeps the best
        (the protocol of Shallue et al. 2018); where the best is at an edge of the rates
        tried, :func:`minigd.study.run_study` tries the next factor of 2 past it, up to
        ``lr_extend`` times; "linear" / "sqrt" -- one rate per batch size
        from the scaling rule (Goyal et al. 2017 / Hoffer et al. 2017); "fixed" -- base_lr
        everywhere.
    seed, n_seeds, seeds : ``seed`` is the master seed of the study: unless ``seeds`` lists
        the trial seeds explicitly, ``n_seeds`` of them are derived from it
        (:meth:`trial_seeds`); each trial seed drives its model's initialisation and its
        data order, and the analysis's bootstrap is seeded with ``seed``.
    widths, depths : hidden layer width(s) and count(s) to sweep (a width of 1 is allowed).
    bs_growth : ((epoch, factor), ...) -- a batch-size schedule instead of learning-rate
        decay (Smith et al. 2018): every trial multiplies its batch size by ``factor`` from
        ``epoch`` on (capped at the full batch); the trial is keyed by its initial size.
    batch_norm, ghost_batch_sizes, dropout : the models' batch norm (False, True =
        before the activation, "after"), the ghost batch sizes to sweep next to the batch
        size (Hoffer et al. 2017; None or a size >= B means the whole batch, so each batch
        size runs each distinct ghost size once), and dropout.  Batch norm needs >= 2 rows
        per ghost batch: batch size 1 and pairs with B % ghost == 1 are left out (with a
        warning), and a trial whose last partial batch would leave a ghost batch of 1
        drops it (``drop_last``).
    adaptive, adaptive_min : the adaptive arm (:meth:`adaptive_trials`): next to the fixed
        batch sizes, ``fit(batch_size=AdaptiveBatchSize(min=adaptive_min))`` -- the
        controller of :mod:`minigd.adaptive` with its default settings, starting at
        ``adaptive_min`` (capped at the training set) -- for every seed and every learning
        rate the grid tries at ``adaptive_min``.  Off by default here; ``minigd study``
        turns it on (``--no-adaptive`` turns it off).
    """

    data: DataSpec = field(default_factory=DataSpec)
    batch_sizes: tuple = ()
    lr_policy: str = "tuned"
    base_lr: float = 0.02
    base_batch_size: int = 32
    lr_grid: tuple = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    seeds: tuple = ()  # () = n_seeds seeds derived from the master seed
    seed: int = 0  # the master seed: trial seeds (model init, data order), bootstrap
    n_seeds: int = 5
    lr_extend: int = 3  # "tuned": a best LR at the grid's edge extends the grid by factors
    #   of 2 past that edge, up to this many times (a best LR still at an edge: "LR not tuned")
    widths: tuple = (64,)
    depths: tuple = (1,)
    activation: str = "relu"
    optimizer: str = "sgd"
    momentum: float = 0.9
    warmup_steps: int = 0
    bs_growth: tuple = ()  # ((epoch, factor), ...): grow each trial's batch at these epochs
    max_epochs: int = 50
    min_steps: int = 200
    target_metric: str = "val_accuracy"
    target: float = 0.95
    dtype: str = "float32"
    backend: str = "cpu"
    batch_norm: object = False
    ghost_batch_sizes: tuple = ()
    dropout: float = 0.0
    adaptive: bool = False  # also run the adaptive arm (fit's batch_size="adaptive")
    adaptive_min: int = 32  # the adaptive arm's smallest (starting) batch size

    def __post_init__(self):
        if not isinstance(self.batch_norm, (bool, str)) or self.batch_norm not in (False, True, "before", "after"):
            raise ValueError(f"batch_norm: expected False, True, 'before' or 'after', got {self.batch_norm!r}")
        ghosts = tuple(
            None if g in (None, 0, "none", "None") else check_int("ghost_batch_sizes", g, low=2)
            for g in self.ghost_batch_sizes
        )
        if any(g is not None for g in ghosts) and self.batch_norm is False:
            raise ValueError(
                f"ghost_batch_sizes: needs batch_norm, got ghost_batch_sizes="
                f"{self.ghost_batch_sizes!r} with batch_norm=False"
            )
        object.__setattr__(self, "ghost_batch_sizes", ghosts)
        check_float("dropout", self.dropout, low=0)
        if not self.dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        check_choice("lr_policy", self.lr_policy, LR_POLICIES)
        check_float("base_lr", self.base_lr, low=0, low_open=True)
        check_int("base_batch_size", self.base_batch_size, low=1)
        for w in self.widths:
            check_int("widths", w, low=1)
        for d in self.depths:
            check_int("depths", d, low=0)
        for s in self.seeds:
            check_int("seeds", s, low=0)
        check_int("seed", self.seed, low=0)
        check_int("n_seeds", self.n_seeds, low=1)
        check_int("lr_extend", self.lr_extend, low=0)
        for b in self.batch_sizes:
            if b != "full":
                check_int("batch_sizes", b, low=1)
        check_choice("optimizer", self.optimizer, ("sgd", "adam"))
        if not isinstance(self.adaptive, bool):
            raise TypeError(f"adaptive: expected a bool, got {type(self.adaptive).__name__} {self.adaptive!r}")
        check_int("adaptive_min", self.adaptive_min, low=2)
        object.__setattr__(self, "adaptive_min", int(self.adaptive_min))
        check_int("max_epochs", self.max_epochs, low=1)
        for e, f in self.bs_growth:
            check_int("bs_growth epoch", e, low=1)
            check_float("bs_growth factor", f, low=1)
        for f in self.lr_grid:
            check_float("lr_grid", f, low=0, low_open=True)
        # validated: now plain ints/floats (numpy scalars would change keys and break JSON)
        norm = lambda xs, f: tuple(x if x == "full" else f(x) for x in xs)
        for name, f in (("batch_sizes", int), ("seeds", int), ("widths", int), ("depths", int), ("lr_grid", float)):
            object.__setattr__(self, name, norm(getattr(self, name), f))
        for name in ("seed", "n_seeds", "lr_extend"):
            object.__setattr__(self, name, int(getattr(self, name)))

    def trial_seeds(self) -> tuple:
        """The trial seeds: ``seeds`` when given, else ``n_seeds`` seeds derived from the
        master ``seed`` (numpy's SeedSequence: the same master seed always gives the same
        seeds, and different master seeds give unrelated ones)."""
        if self.seeds:
            return self.seeds
        import numpy as np

        state = np.random.SeedSequence(self.seed).generate_state(self.n_seeds, np.uint32)
        return tuple(int(x) >> 1 for x in state)  # < 2**31: any int API takes them
        object.__setattr__(self, "bs_growth", tuple((int(e), float(g)) for e, g in self.bs_growth))

    def lrs_for(self, B: int) -> list:
        if self.lr_policy == "fixed":
            return [self.base_lr]
        rule = "sqrt" if self.lr_policy in ("tuned", "sqrt") else "linear"
        from minigd.optim.schedules import scale_lr

        center = scale_lr(self.base_lr, B, self.base_batch_size, rule)
        if self.lr_policy != "tuned":
            return [center]
        return [center * f for f in self.lr_grid]

    def trials(self, n_train: int, n_in: int, n_out: int) -> list:
        """Every TrialConfig of the sweep for a dataset with n_train training examples."""
        sizes_b = self.batch_sizes or default_batch_sizes(n_train)
        out = []
        skipped = set()
        for depth in self.depths:
            for width in self.widths:
                sizes = (n_in,) + (width,) * depth + (n_out,)
                for b in sizes_b:
                    full = b == "full" or b == n_train
                    B = n_train if full else int(b)
                    if B > n_train:
                        raise ValueError(
                            f"batch_sizes: expected sizes <= the number of training examples ({n_train}), got {B}"
                        )
                    for ghost, drop_last in self._ghosts_for(B, n_train, skipped):
                        for lr in self.lrs_for(B):
                            for seed in self.trial_seeds():
                                out.append(
                                    TrialConfig(
                                        batch_norm=self.batch_norm,
                                        ghost_batch_size=ghost,
                                        dropout=self.dropout,
                                        drop_last=drop_last,
                                        data=self.data,
                                        sizes=sizes,
                                        activation=self.activation,
                                        dtype=self.dtype,
                                        backend=self.backend,
                                        batch_size=B,
                                        full_batch=full,
                                        optimizer=self.optimizer,
                                        lr=float(lr),
                                        momentum=self.momentum,
                                        lr_policy=self.lr_policy,
                                        base_batch_size=self.base_batch_size,
                                        base_lr=self.base_lr,
                                        warmup_steps=self.warmup_steps,
                                        bs_schedule=tuple(
                                            (int(e), min(n_train, int(round(B * f)))) for e, f in self.bs_growth
                                        ),
                                        seed=int(seed),
                                        max_epochs=self.max_epochs,
                                        min_steps=self.min_steps,
                                        target_metric=self.target_metric,
                                        target=self.target,
                                    )
                                )
        if skipped:
            warnings.warn(
                f"batch_norm: left out (batch size, ghost batch size) pairs whose ghost "
                f"batches would hold 1 row (zero variance): {sorted(skipped, key=str)}",
                stacklevel=2,
            )
        return out

    def adaptive_trials(self, n_train: int, n_in: int, n_out: int) -> list:
        """The adaptive arm's TrialConfigs (``[]`` unless ``adaptive``): per architecture
        (and ghost batch size), ``batch_size="adaptive"`` starting at ``adaptive_min``
        (capped at ``n_train``) for every trial seed and every learning rate
        :meth:`lrs_for` gives at that starting size.

        Why every learning rate, not only the best one of the fixed arm at the starting
        size: each fixed batch size gets the rate that is best *for it* out of this grid,
        and the adaptive run gets the same treatment -- the same rates, the same seeds, its
        best rate chosen by the same rule from its own results (the analysis,
        :func:`minigd.study.analysis.analyze`).  Borrowing the fixed arm's best rate would
        tune the adaptive run for a run it is not (a rate tuned to stay at one batch size),
        and would need the grid's results before the arm could start; here the arm runs
        beside the grid, with the same tuning budget as any one fixed batch size.

        Batch norm: one arm per ghost batch size of the grid; a ghost size that would leave
        a ghost batch of one row at some candidate batch size is left out (with a warning),
        as for the grid."""
        if not self.adaptive:
            return []
        from minigd.adaptive import AdaptiveBatchSize

        b0 = min(self.adaptive_min, n_train)
        if b0 < 2:
            warnings.warn(
                f"adaptive: the adaptive arm needs at least 2 training examples, got {n_train}; left out", stacklevel=2
            )
            return []
        spec = AdaptiveBatchSize(min=b0)
        candidates = spec.sizes(n_train)
        settings = tuple(sorted((k, v) for k, v in spec.config().items() if k in ADAPTIVE_SETTINGS))
        ghosts, skipped = [], []
        for g in (self.ghost_batch_sizes or (None,)) if self.batch_norm is not False else (None,):
            if g is not None and g >= candidates[-1]:
                g = None
            if self.batch_norm is not False:
                ns = NormSpec(bn=1, ghost=g)
                try:
                    for b in candidates:
                        ns.check_batch(b)
                except ValueError:
                    skipped.append(g)
                    continue
            if g not in ghosts:
                ghosts.append(g)
        if skipped:
            warnings.warn(
                f"adaptive: left out the adaptive arm with ghost batch sizes {skipped}: a candidate "
                f"batch size among {candidates} would leave a ghost batch of 1 row",
                stacklevel=2,
            )
        out = []
        for depth in self.depths:
            for width in self.widths:
                sizes = (n_in,) + (width,) * depth + (n_out,)
                for ghost in ghosts:
                    for lr in self.lrs_for(b0):
                        for seed in self.trial_seeds():
                            out.append(
                                TrialConfig(
                                    batch_norm=self.batch_norm,
                                    ghost_batch_size=ghost,
                                    dropout=self.dropout,
                                    data=self.data,
                                    sizes=sizes,
                                    activation=self.activation,
                                    dtype=self.dtype,
                                    backend=self.backend,
                                    batch_size="adaptive",
                                    adaptive=settings,
                                    optimizer=self.optimizer,
                                    lr=float(lr),
                                    momentum=self.momentum,
                                    lr_policy=self.lr_policy,
                                    base_batch_size=self.base_batch_size,
                                    base_lr=self.base_lr,
                                    warmup_steps=self.warmup_steps,
                                    seed=int(seed),
                                    max_epochs=self.max_epochs,
                                    min_steps=self.min_steps,
                                    target_metric=self.target_metric,
                                    target=self.target,
                                )
                            )
        return out

    def _ghosts_for(self, B: int, n_train: int, skipped: set) -> list:
        """[(ghost_batch_size, drop_last)] of the trials at batch size B."""
        if self.batch_norm is False:
            return [(None, False)]
        out = []
        for g in self.ghost_batch_sizes or (None,):
            g = None if (g is None or g >= B) else g  # a ghost >= B is the whole batch
            spec = NormSpec(bn=1, ghost=g)
            try:
                spec.check_batch(B)
            except ValueError:
                skipped.add((B, g))
                continue
            drop_last = spec.drops_last(n_train, B)
            if (g, drop_last) not in out:
                out.append((g, drop_last))
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SweepSpec:
        """Inverse of :meth:`to_dict` (JSON turns tuples into lists)."""
        d = dict(d)
        data = dict(d.pop("data"))
        data["params"] = tuple(tuple(p) for p in data.get("params", ()))
        tup = lambda v: tuple(tuple(x) if isinstance(x, list) else x for x in v)
        for k in ("batch_sizes", "lr_grid", "seeds", "widths", "depths", "bs_growth", "ghost_batch_sizes"):
            if k in d:
                d[k] = tup(d[k])
        return cls(data=DataSpec(**data), **d)


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:  # nothing to run (a resumed, finished study): no empty bar
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - the study extra brings tqdm
        return None
    # smoothing=0: the rate (and so the ETA) is the average over the trials finished so far,
    # not an extrapolation of the latest few
    return tqdm(total=total, unit="trial", dynamic_ncols=True, file=sys.stderr, smoothing=0)


def run_sweep(
    configs,
    results,
    *,
    executor=None,
    workers=None,
    scheduler=None,
    retry_failed: bool = False,
    progress: bool = False,
    log=None,
) -> dict:
    """Run every trial of ``configs`` not already in the store ``results``.

    Parameters
    ----------
    configs : list of TrialConfig
    results : ResultStore or path
        Finished trials are committed one by one as they arrive: interrupting the sweep
        (Ctrl-C, a killed worker or machine) loses only the trials still running, and
        running it again runs only the missing ones.
    executor : optional
        An executor (``minigd.study.executors``); else ``workers``/``scheduler`` pick one:
        a Dask cluster when ``scheduler`` (address or Client) is given, else a local
        process pool of ``workers`` processes (default: one per CPU; 1 = in-process).
    retry_failed : bool
        Also re-run trials whose stored status is "failed".

    Returns
    -------
    dict with counts: total, skipped (already stored), ran, failed.
    """
    store = results if isinstance(results, ResultStore) else ResultStore(results)
    done = store.keys() if not retry_failed else store.keys("ok")
    seen, todo = set(), []
    for c in configs:
        if c.key not in done and c.key not in seen:
            todo.append(c)
            seen.add(c.key)
    ex = executor or make_executor(workers, scheduler)
    bar = _progress(len(todo), progress)
    counts = {"total": len(configs), "skipped": len(configs) - len(todo), "ran": 0, "failed": 0, "executor": ex.name}
    t0 = time.time()
    try:
        for cfg, res in ex.run(run_trial, todo):
            store.put(cfg, res)
            counts["ran"] += 1
            counts["failed"] += res.get("status") != "ok"
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{cfg.label} {'ok' if res.get('status') == 'ok' else 'FAILED'}")
            if log is not None:
                log(cfg, res)
    finally:
        if bar is not None:
            bar.close()
        if store is not results:
            store.close()
    counts["seconds"] = time.time() - t0
    return counts
