"""Adaptive batch size (``fit(batch_size="adaptive")``, issue 17) against every fixed batch
size with a tuned learning rate: wall time to a target validation metric.

Usage::

    python bench/adaptive.py                  # writes bench/results/adaptive.{md,json,png} (~10 min)
    python bench/adaptive.py --quick --out DIR   # digits only, 2 seeds, 3 sizes (smoke test, < 60 s)
    python bench/adaptive.py --problems digits,least_squares --seeds 3

**Problems** (float32, one thread, SGD with momentum 0.9, the data fixed, the seed varying
the initialisation and the data order):

* ``digits``: scikit-learn's digits as the study loads them (80/20 split, standardised with
  ``std_floor=1``), MLP 64-64-10 ReLU, target validation accuracy 0.95 (the study's);
* ``least_squares``: ``load_dataset("linear_regression")`` with a known noise std sigma;
  a linear model (``MLP([n_in, 1], loss="mse")``); the noise floor is the validation loss
  of the true map on the validation set (about sigma^2 / 2: minigd's mse is half the squared
  error); target 1.1x that floor;
* ``teacher_student``: ``load_dataset("teacher_student", task="regression")`` (a random
  tanh teacher with one hidden layer plus Gaussian noise), a wider tanh student; target a
  validation loss a little above the teacher's own (its noise floor).

**Fixed batch sizes** (powers of two from 16 up to the training set, and the full batch):
each tries the study's learning-rate grid (``SweepSpec``: factors 2^-3..2^3 of the square-
root rule ``base_lr * sqrt(B / 32)``; a best rate at an edge of the grid extends it by a
factor of 2 past that edge, up to twice), every rate on every seed; the rate kept for B is
the one with the smallest median time to target over the seeds.  A (B, rate) cell is
dropped once it cannot win any more (more than half its seeds missed the target, or more
than half are slower than the median of another complete cell at the same B): the median
over seeds of a dropped cell is certainly worse than the kept one, so the sweep's answer is
exactly the exhaustive one.

**Adaptive**: ``AdaptiveBatchSize(min=32, lr_rule=...)`` with ONE learning rate, the tuned
rate of the fixed batch size 32 (the issue's contract: "a user tunes one learning rate at a
small batch and lets the controller take it from there"), for each ``lr_rule`` (adascale,
the default; sqrt; linear) with the measured throughput table (the default), and adascale
with ``throughput="flops"`` (no probe: a cost model).  Its arms run interleaved with the
fixed cells, every seed round in a shuffled order ("side by side in one run"; only the
tuning of B = 32, whose rate the adaptive arms need, runs first).

**Time to target** is the history's training time (steps only: evaluation, the untimed
compile warm-up and, for adaptive, the throughput probe excluded, as
``hist.time_to_target``) at the first evaluation that meets the target.  Evaluations run
every step for the first 50 steps, then whenever the step count has grown by 2% (the study's
geometric schedule, the same for every arm), by an ``on_step`` callback.  The probe
(``Controller._probe_sizes``, run by a decision for the sizes it can reach first) is timed
directly, by wrapping it here (timing only), and reported
separately and as "adaptive + probe".  On a shared machine a preempted step inflates the raw
time, so every run also gets a *robust* time: each step counted at the median duration of
its class within the run (its batch size, and for adaptive whether it was a noise-tracked
step), summed up to the target (the study's convention).  Both are reported; the best rate
of a fixed batch size is chosen by the robust time (at one batch size it orders the rates by
steps to target, which preemption cannot disturb).

**Summary per problem**: best fixed B (its median over seeds), the median over the fixed
batch sizes of their (tuned) medians, each adaptive arm's median with a bootstrap 90%
interval over seeds, its ratio to the best fixed B with a paired bootstrap interval (seeds
resampled jointly), and in how many seeds it beat the best fixed B.  Goal: ratio <= 1.1 on
every problem and faster than the median fixed B; bar: ratio <= 1.25.

**Controller overhead**: ``fit`` with ``AdaptiveBatchSize(min=B, max=B, throughput={B: 1})``
(one candidate: the controller decides after 64 steps, then on a period that doubles up to
512 while B is kept, and tracks the noise 8 times a period; it never changes B, and nothing
is probed) against ``fit(batch_size=B)``, same steps, no
evaluation, in interleaved rounds; the median over rounds of the per-round ratio, of the
training time (the steps, tracked ones included) and of the whole ``fit`` call's wall time
(the decisions and bookkeeping included).  Target <= 1.05 at B >= 32.

One thread: ``NUMBA_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` are set to 1 before numpy is imported.  Each run also records the CPU
pressure stall (/proc/pressure/cpu) during it; the report gives the share of runs during
which other processes stalled this one for more than 5% of the time.
"""

from __future__ import annotations

import os

for _v in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import HERE, atomic_write, log, machine  # noqa: E402
from _timing import Machine  # noqa: E402

import minigd as mg  # noqa: E402
from minigd.adaptive import Controller  # noqa: E402
from minigd.backends.base import Backend  # noqa: E402
from minigd.gradstats.tracking import NoiseTracker  # noqa: E402

DATE = "2026-12-07"
RULES = ("adascale", "sqrt", "linear")
GRID = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # the study's lr_grid (SweepSpec)
BASE_B = 32  # the study's base_batch_size; adaptive min
MOMENTUM = 0.9
DENSE = 50  # evaluate every step up to here ...
REL = 0.02  # ... then every 2% more steps
GOAL, BAR = 1.10, 1.25
#: held-out seeds are the tuning seeds plus this (the rates and the best batch size are chosen on
#: the tuning seeds; measuring the chosen ones on the same seeds would favour them: the minimum of
#: many noisy medians is biased low, and the adaptive arm, which chooses nothing, would pay for it)
HELD_OUT = 1000
HELD_REPEATS = 3  # each held-out (arm, seed) run this many times; its median run counts
OVERHEAD_GOAL = 1.05
TRACK_EVERY = mg.AdaptiveBatchSize().track_every  # the defaults the adaptive arms run with
EVERY = mg.AdaptiveBatchSize().every
MAX_EVERY = mg.AdaptiveBatchSize().max_every
INF = math.inf
#: the adaptive run's time to target, as (the fixed runs' metric it is compared with, what is added)
METRICS = {
    "time": ("time", ()),  # the history's clock (hist.time_to_target)
    "robust": ("robust", ()),  # each step at its class's median duration
    "robust+ctrl": ("robust", ("ctrl_s",)),  # + decisions and noise bookkeeping (off the clock)
    "all-in": ("robust", ("ctrl_s", "probe_s")),
}  # + the throughput probe (at the decisions that first reach a size)
MAX_STEPS = 300_000  # (the history preallocates this many rows)
CAP_X = 8  # run cap: this many times the tuned B=32 median,
MIN_CAP = 0.05  # ... but at least this many seconds
MON = Machine()

# -- the controller's work outside the step clock, timed (the wrappers only read the clock) -------
# The history's clock times the steps only.  An adaptive run also spends, outside it, the
# throughput probe (Controller._probe_sizes: for each size when a decision first can reach it), the decisions (Controller.decide, its probing excluded) and
# the noise bookkeeping of the tracked steps (the per-example norms' sum, NoiseTracker.update).
_SPENT = {"probe": 0.0, "ctrl": 0.0}
#: (class, method name) of every wrapped method (what :func:`_untimed` puts back for a while)
_WRAPPED: list = []


def _timed(cls, name, key, exclude=None):
    """Wrap ``cls.name`` to add its time to ``_SPENT[key]``, less what ``_SPENT[exclude]``
    gained meanwhile (a nested timed call)."""
    fn = getattr(cls, name)

    def wrapper(self, *a, **k):
        t0, x0 = time.perf_counter(), _SPENT.get(exclude, 0.0)
        try:
            return fn(self, *a, **k)
        finally:
            _SPENT[key] += time.perf_counter() - t0 - (_SPENT.get(exclude, 0.0) - x0)

    wrapper.__wrapped__ = fn
    setattr(cls, name, wrapper)
    _WRAPPED.append((cls, name))


# the probe: of the sizes a decision can reach that have no step time yet
_timed(Controller, "_probe_sizes", "probe")
_probe_timed = Controller._probe_sizes


def _probe_kept(self, *a, **k):
    """The probe, timed; the controller's table of seconds per step after it is kept for the
    run's record (the last one of the run)."""
    try:
        return _probe_timed(self, *a, **k)
    finally:
        _SPENT["table"] = dict(self.seconds)


_probe_kept.__wrapped__ = _probe_timed  # type: ignore[attr-defined]
Controller._probe_sizes = _probe_kept
_timed(Controller, "decide", "ctrl", exclude="probe")
_timed(NoiseTracker, "update", "ctrl")
_timed(Backend, "last_sqnorm_sum", "ctrl")


# -- problems -----------------------------------------------------------------------------------
@dataclass
class Problem:
    name: str
    hidden: tuple
    activation: str
    base_lr: float  # the square-root rule's rate at B = 32 (grid centre)
    cap_s: float  # training-time budget of one run (max_time)
    wall_s: float  # wall-clock budget of one run (evaluations included)
    sizes: tuple = ()  # fixed batch sizes (filled from the data)
    data: dict = field(default_factory=dict)
    metric: str = "val_loss"
    target: float = 0.0
    floor: float | None = None
    describe: str = ""
    run_cap: float = 0.0  # the cap in force (cap_s, then 8x the tuned B=32 median)


def load_problem(name: str, quick: bool = False) -> Problem:
    from minigd.data import load_dataset

    if name == "digits":
        ds = load_dataset("digits", std_floor=1.0)
        p = Problem(
            name,
            (64,),
            "relu",
            0.02,
            cap_s=0.5,
            wall_s=4.0,
            metric="val_accuracy",
            target=0.95,
            describe="scikit-learn digits (1438 train / 359 val), MLP 64-64-10 ReLU, target val_accuracy >= 0.95",
        )
    elif name == "least_squares":
        sigma, n_in = 0.3, 1024
        ds = load_dataset("linear_regression", n=21000, val_fraction=1000 / 21000, n_in=n_in, noise=sigma)
        w, b = ds.info["w_star_effective"], ds.info["b_star_effective"]
        floor = 0.5 * float(np.mean((ds.X_val.astype(np.float64) @ w + b - ds.y_val) ** 2))
        p = Problem(
            name,
            (),
            "relu",
            0.0005,
            cap_s=1.0,
            wall_s=5.0,
            target=1.1 * floor,
            floor=floor,
            describe=f"linear_regression n_in={n_in}, noise sigma={sigma} (20000 train / 1000 val), "
            f"linear model, mse; noise floor (val loss of the true map) {floor:.4g} "
            f"(sigma^2/2 = {sigma**2 / 2:.4g}); target val_loss <= 1.1x floor",
        )
    elif name == "teacher_student":
        sigma = 0.1
        ds = load_dataset(
            "teacher_student",
            n=21000,
            val_fraction=1000 / 21000,
            n_in=32,
            teacher_width=64,
            task="regression",
            activation="tanh",
            noise=sigma,
        )
        from minigd.data import teacher_forward

        info = ds.info
        Xraw = ds.X_val.astype(np.float64) * info["scale"] + info["mean"]
        out = teacher_forward(Xraw, info["teacher_weights"], info["teacher_biases"], info["activation"])[:, 0]
        floor = 0.5 * float(np.mean((out - ds.y_val) ** 2))
        const = 0.5 * float(np.var(ds.y_val.astype(np.float64)))  # the best constant predictor's loss
        p = Problem(
            name,
            (128,),
            "relu",
            0.02,
            cap_s=1.0,
            wall_s=5.0,
            target=0.1 * const,
            floor=floor,
            describe=f"teacher_student regression: teacher 32-64-1 tanh + noise sigma={sigma} "
            f"(20000 train / 1000 val), student 32-128-1 ReLU, mse; target val_loss <= "
            f"{0.1 * const:.4g} (R^2 >= 0.9: a tenth of the best constant's loss; "
            f"{0.1 * const / floor:.2f}x the noise floor {floor:.4g}, the teacher's val loss)",
        )
    else:
        raise ValueError(f"problems: expected names from {list(PROBLEMS)}, got {name!r}")
    n = ds.n_train
    sizes, b = [], 16
    while b < n and b <= 8192:
        sizes.append(b)
        b *= 2
    if n <= 8192:
        sizes.append(n)
    if quick:
        sizes = [16, 32, 128]
        p.cap_s, p.wall_s = min(p.cap_s, 0.3), min(p.wall_s, 2.0)
    p.sizes = tuple(sizes)
    p.run_cap = p.cap_s
    p.data = {
        "Xtr": ds.X_train,
        "ytr": ds.y_train,
        "val": (ds.X_val, ds.y_val),
        "loss": ds.loss,
        "n_in": ds.n_in,
        "n_out": ds.n_out,
        "n_train": n,
    }
    return p


PROBLEMS = ("digits", "least_squares", "teacher_student")


# -- one run --------------------------------------------------------------------------------------
class _Eval:
    """The geometric evaluation schedule and the target, as an ``on_step`` callback; also
    stops a run past its wall-clock budget."""

    def __init__(self, p: Problem, wall_s: float):
        self.Xva, self.yva = p.data["val"]
        self.key = p.metric.removeprefix("val_")
        self.higher = p.metric == "val_accuracy"
        self.target, self.wall_s = p.target, wall_s
        self.next, self.reached, self.last, self.walled, self.overflow = 1, None, None, False, False

    def on_fit_start(self, model, hist):
        self.hist, self.t0 = hist, time.perf_counter()

    def on_step(self, model, step, loss):
        if step < self.next:
            if time.perf_counter() - self.t0 > self.wall_s:
                self.walled = True
                return True
            return False
        self.next = step + 1 if step < DENSE else step + max(1, int(step * REL))
        try:
            v = model.evaluate(self.Xva, self.yva)[self.key]
        except Exception:  # the parameters overflowed: diverged
            self.overflow = True
            return True
        self.last = float(v)
        if not math.isfinite(v):
            self.overflow = True
            return True
        if (v >= self.target) if self.higher else (v <= self.target):
            self.reached = step
            return True
        return False


def _robust(hist, k: int, tracked: bool) -> float:
    """The first k steps' time, each step at the median duration of its class in the run: its
    batch size, and with ``tracked`` whether the noise was measured on it (``hist.noise``)."""
    t = hist.column("time")
    dt = np.diff(t, prepend=0.0)
    B = hist.column("batch_size")
    on = np.zeros(len(B), dtype=np.int64)
    if tracked and hist.noise:
        steps = np.array([r["step"] for r in hist.noise], dtype=np.int64)
        on[steps[steps < len(B)]] = 1
    cls = B * 2 + on
    med = {c: float(np.median(dt[cls == c])) for c in np.unique(cls)}
    return float(sum(med[c] for c in cls[:k]))


def _prime(p: Problem, B: int) -> None:
    """A few untimed steps at batch size B on a scratch model, and one evaluation, right before a
    timed run: every run starts with the same warm caches (else the adaptive run, whose probe
    runs steps just before training, would start warm and the fixed runs cold -- at a few tens of
    steps to target, as on digits, that alone moved the per-step time by a third)."""
    d = p.data
    m = mg.MLP([d["n_in"], *p.hidden, d["n_out"]], activation=p.activation, loss=d["loss"], seed=12345)
    mg.fit(
        m,
        d["Xtr"],
        d["ytr"],
        batch_size=B,
        steps=max(2, min(20, 2048 // B)),
        optimizer=mg.SGD(lr=0.0, momentum=MOMENTUM),
        seed=12345,
    )
    m.evaluate(*d["val"])


def run_arm(p: Problem, arm: dict, seed: int) -> dict:
    """One training run; a record of it (time to target INF when not reached)."""
    d = p.data
    model = mg.MLP([d["n_in"], *p.hidden, d["n_out"]], activation=p.activation, loss=d["loss"], seed=seed)
    ev = _Eval(p, min(p.wall_s, 1.0 + 4 * p.run_cap))
    adaptive = arm["kind"] == "adaptive"
    if adaptive:
        bs = mg.AdaptiveBatchSize(min=BASE_B, lr_rule=arm["rule"], throughput=arm.get("throughput"))
    else:
        bs = arm["B"]
    _prime(p, BASE_B if adaptive else arm["B"])
    _SPENT["table"] = {}
    spent0 = dict(_SPENT)
    snap = MON._snap()
    t0 = time.perf_counter()
    diverged = False
    try:
        hist = mg.fit(
            model,
            d["Xtr"],
            d["ytr"],
            batch_size=bs,
            steps=MAX_STEPS,
            max_time=p.run_cap,
            optimizer=mg.SGD(lr=arm["lr"], momentum=MOMENTUM),
            seed=seed,
            callbacks=[ev],
        )
    except mg.DivergenceError as err:
        hist, diverged = err.history, True
    wall = time.perf_counter() - t0
    stall = MON.stalled(snap, MON._snap())
    probe, ctrl = (_SPENT[k] - spent0[k] for k in ("probe", "ctrl"))
    k = ev.reached
    rec = {
        "seed": seed,
        "reached": k is not None,
        "diverged": diverged or ev.overflow,
        "walled": ev.walled,
        "steps": k,
        "examples": int(hist.column("examples")[k - 1]) if k else None,
        "time": float(hist.column("time")[k - 1]) if k else INF,
        "robust": _robust(hist, k, adaptive) if k else INF,
        "probe_s": probe,
        "ctrl_s": ctrl,
        "wall_s": wall,
        "stall": round(stall, 3),
        "n_steps": hist.n_steps,
        "last_metric": ev.last,
    }
    if adaptive:
        rec["throughput_table"] = {int(b): float(t) for b, t in _SPENT.get("table", {}).items()}
        rec["decisions"] = [
            {
                "step": r["step"],
                "batch_size": r["batch_size"],
                "lr_factor": r["lr_factor"],
                "noise": r["controller_noise_scale"],
                "goodput": r["goodput"],
            }
            for r in (hist.adaptive or [])
        ]
        n = k or hist.n_steps
        sizes = hist.column("batch_size")[:n]
        rec["time_by_B"] = {
            int(b): float(np.sum(np.diff(hist.column("time"), prepend=0.0)[:n][sizes == b])) for b in np.unique(sizes)
        }
    return rec


# -- the sweep ------------------------------------------------------------------------------------
def _median(xs) -> float:
    return float(np.median(xs)) if len(xs) else INF


class Sweep:
    """The fixed-B cells of one problem: {(B, factor): [records]} and the pruning rule."""

    def __init__(self, p: Problem, seeds):
        self.p, self.seeds = p, list(seeds)
        self.cells: dict = {}
        self.dropped: set = set()
        self.need = len(self.seeds) // 2 + 1

    def lr(self, B: int, f: float) -> float:
        return self.p.base_lr * math.sqrt(B / BASE_B) * f

    def add(self, B: int, factors) -> None:
        for f in factors:
            self.cells.setdefault((B, f), [])

    def live(self, seed) -> list:
        return [c for c, recs in self.cells.items() if c not in self.dropped and all(r["seed"] != seed for r in recs)]

    def complete(self, c) -> bool:
        return len(self.cells[c]) == len(self.seeds)

    def prune(self) -> None:
        for B in {c[0] for c in self.cells}:
            mine = [c for c in self.cells if c[0] == B]
            done = [_median([r["robust"] for r in self.cells[c]]) for c in mine if self.complete(c)]
            best = min(done) if done else INF
            for c in mine:
                if c in self.dropped or self.complete(c):
                    continue
                v = [r["robust"] for r in self.cells[c]]
                if sum(x == INF for x in v) >= self.need or sum(x > best for x in v) >= self.need:
                    self.dropped.add(c)

    def best(self, B: int):
        """(factor, median robust, median raw) of the best complete cell at B (None if none)."""
        out = None
        for c, recs in self.cells.items():
            if c[0] != B or not self.complete(c):
                continue
            key = (_median([r["robust"] for r in recs]), _median([r["time"] for r in recs]))
            if out is None or key < out[1:]:
                out = (c[1],) + key
        return out

    def edge(self, B: int):
        """The factor to try next at B when its best rate sits at an edge of those tried."""
        fs = sorted(c[1] for c in self.cells if c[0] == B)
        b = self.best(B)
        if b is None or b[1] == INF:
            return None
        if b[0] == fs[0] and fs[0] > GRID[0] / 4 - 1e-12:
            return fs[0] / 2
        if b[0] == fs[-1] and fs[-1] < GRID[-1] * 4 + 1e-12:
            return fs[-1] * 2
        return None


def run_rounds(p: Problem, sweep: Sweep, adaptive: dict, seeds, rng, label: str) -> None:
    """Every seed: the live fixed cells and the adaptive arms, in a shuffled order."""
    for seed in seeds:
        jobs = [("fixed", c) for c in sweep.live(seed)] + [
            ("adaptive", name) for name, a in adaptive.items() if all(r["seed"] != seed for r in a["runs"])
        ]
        order = rng.permutation(len(jobs))
        t0 = time.perf_counter()
        for i in order:
            kind, key = jobs[i]
            if kind == "fixed":
                B, f = key
                sweep.cells[key].append(run_arm(p, {"kind": "fixed", "B": B, "lr": sweep.lr(B, f)}, seed))
            else:
                a = adaptive[key]
                a["runs"].append(run_arm(p, {"kind": "adaptive", **a["arm"]}, seed))
        sweep.prune()
        log(f"{p.name} {label} seed {seed}: {len(jobs)} runs in {time.perf_counter() - t0:.1f} s")


def run_problem(p: Problem, seeds, quick: bool, rng) -> dict:
    sweep = Sweep(p, seeds)
    grid = GRID if not quick else (0.5, 1.0, 2.0)
    # 1. the starting batch size's rate (the adaptive arms take it), grid extended at an edge
    sweep.add(BASE_B, grid)
    run_rounds(p, sweep, {}, seeds, rng, f"B={BASE_B} tuning")
    for _ in range(2):
        f = sweep.edge(BASE_B)
        if f is None:
            break
        sweep.add(BASE_B, [f])
        run_rounds(p, sweep, {}, seeds, rng, f"B={BASE_B} extension")
    b32 = sweep.best(BASE_B)
    if b32 is not None and b32[2] < INF:
        p.run_cap = min(p.cap_s, max(MIN_CAP, CAP_X * b32[2]))
        log(
            f"{p.name}: B={BASE_B} tuned (factor {b32[0]:g}, {1e3 * b32[2]:.1f} ms); run cap now "
            f"{1e3 * p.run_cap:.0f} ms of training"
        )
    lr0 = sweep.lr(BASE_B, b32[0]) if b32 is not None and b32[1] < INF else sweep.lr(BASE_B, 1.0)
    arms = {f"adaptive {r}": {"kind": "adaptive", "rule": r, "lr": lr0} for r in RULES}
    arms["adaptive adascale, flops model"] = {"kind": "adaptive", "rule": "adascale", "lr": lr0, "throughput": "flops"}
    arms["adaptive adascale, probe"] = {"kind": "adaptive", "rule": "adascale", "lr": lr0, "throughput": "probe"}
    if quick:
        arms = {k: v for k, v in arms.items() if k in ("adaptive adascale", "adaptive adascale, flops model")}
    adaptive = {k: {"arm": a, "runs": []} for k, a in arms.items()}
    # 2. every other batch size, side by side with the adaptive arms
    for B in p.sizes:
        if B != BASE_B:
            sweep.add(B, grid)
    run_rounds(p, sweep, adaptive, seeds, rng, "sweep + adaptive")
    # 3. rates at an edge of the grid: one more factor of 2 past it, up to twice
    for _ in range(0 if quick else 2):
        more = {B: sweep.edge(B) for B in p.sizes if B != BASE_B}
        more = {B: f for B, f in more.items() if f is not None}
        if not more:
            break
        for B, f in more.items():
            sweep.add(B, [f])
        run_rounds(p, sweep, {}, seeds, rng, f"extension {sorted(more)}")
    # 4. held-out seeds: each batch size at the rate the sweep chose for it, and the adaptive arms
    held = {"fixed": {}, "adaptive": {k: [] for k in adaptive}, "seeds": [s + HELD_OUT for s in seeds]}
    for B in p.sizes:
        b = sweep.best(B)
        if b is not None and b[1] < INF:
            held["fixed"][B] = {"factor": b[0], "runs": []}
    for seed in held["seeds"]:
        jobs = [("fixed", B) for B in held["fixed"]] + [("adaptive", k) for k in adaptive]
        reps: dict = {j: [] for j in jobs}
        t0 = time.perf_counter()
        for _ in range(HELD_REPEATS):  # every arm once per pass, the passes in fresh orders
            for i in rng.permutation(len(jobs)):
                kind, key = jobs[i]
                if kind == "fixed":
                    h = held["fixed"][key]
                    rec = run_arm(p, {"kind": "fixed", "B": key, "lr": sweep.lr(key, h["factor"])}, seed)
                else:
                    rec = run_arm(p, {"kind": "adaptive", **adaptive[key]["arm"]}, seed)
                reps[jobs[i]].append(rec)
        for (kind, key), recs in reps.items():
            rec = _median_repeat(recs)
            (held["fixed"][key]["runs"] if kind == "fixed" else held["adaptive"][key]).append(rec)
        log(f"{p.name} held-out seed {seed}: {len(jobs)} arms x {HELD_REPEATS} in {time.perf_counter() - t0:.1f} s")
    return {"sweep": sweep, "adaptive": adaptive, "lr0": lr0, "held": held}


def _median_repeat(recs: list) -> dict:
    """Of one arm's repeated runs on one seed, the run whose all-in time (robust + decisions and
    bookkeeping + probe; a fixed run's is its robust time) is the median (an odd number of
    repeats); the repeats' times are kept with it.  A fixed run takes the same steps every
    time, so its repeats differ only by the machine's timing noise; an adaptive run's
    measured step times steer its decisions, so its repeats can also differ in their path,
    and the median run is its typical one."""
    key = [r["robust"] + r["probe_s"] + r["ctrl_s"] for r in recs]
    i = sorted(range(len(recs)), key=key.__getitem__)[(len(recs) - 1) // 2]
    rec = dict(recs[i])
    rec["repeats"] = [
        {k: r[k] for k in ("time", "robust", "ctrl_s", "probe_s", "steps", "reached", "stall")} for r in recs
    ]
    return rec


# -- summary --------------------------------------------------------------------------------------
def _boot(vals_a, vals_b=None, n=2000, seed=0):
    """90% bootstrap interval of median(a) (or median(a)/median(b), seeds resampled jointly)."""
    a = np.asarray(vals_a, float)
    r = np.random.default_rng(seed)
    idx = r.integers(0, len(a), size=(n, len(a)))
    ma = np.median(a[idx], axis=1)
    if vals_b is not None:
        b = np.asarray(vals_b, float)
        with np.errstate(invalid="ignore", divide="ignore"):
            ma = ma / np.median(b[idx], axis=1)
    ma = np.where(np.isnan(ma), INF, ma)  # inf / inf: neither reached
    q = [float(np.quantile(ma, x, method="inverted_cdf")) for x in (0.05, 0.95)]
    return q[0], q[1]


def summarize(p: Problem, res: dict, seeds) -> dict:
    sweep, adaptive = res["sweep"], res["adaptive"]
    fixed = []
    for B in p.sizes:
        b = sweep.best(B)
        fs = sorted(c[1] for c in sweep.cells if c[0] == B)
        if b is None:
            fixed.append(
                {
                    "B": B,
                    "factor": None,
                    "lr": None,
                    "robust": INF,
                    "time": INF,
                    "reached": 0,
                    "factors_tried": fs,
                    "edge": False,
                }
            )
            continue
        recs = sweep.cells[(B, b[0])]
        by = {r["seed"]: r for r in recs}
        fixed.append(
            {
                "B": B,
                "factor": b[0],
                "lr": sweep.lr(B, b[0]),
                "robust": b[1],
                "time": b[2],
                "reached": sum(r["reached"] for r in recs),
                "factors_tried": fs,
                "edge": b[1] < INF and b[0] in (fs[0], fs[-1]),
                "steps": _median([by[s]["steps"] or INF for s in seeds]),
                "examples": _median([by[s]["examples"] or INF for s in seeds]),
                "per_seed_time": [by[s]["time"] for s in seeds],
                "per_seed_robust": [by[s]["robust"] for s in seeds],
                "us_per_step": 1e6 * _median([by[s]["robust"] / by[s]["steps"] for s in seeds if by[s]["reached"]]),
            }
        )
    out = {
        "problem": p.name,
        "describe": p.describe,
        "n_train": p.data["n_train"],
        "target": {p.metric: p.target},
        "floor": p.floor,
        "run_cap_s": p.run_cap,
        "cap_s": p.cap_s,
        "lr_B32": res["lr0"],
        "fixed": fixed,
        "adaptive": [],
    }
    for metric in ("time", "robust"):
        live = [f for f in fixed if f[metric] < INF]
        best = min(live, key=lambda f: f[metric]) if live else None
        out[f"best_{metric}"] = None if best is None else {"B": best["B"], "value": best[metric]}
        out[f"median_fixed_{metric}"] = _median([f[metric] for f in fixed])
    _held_fixed(out, res["held"])
    for name, a in adaptive.items():
        by = {r["seed"]: r for r in a["runs"]}
        row = {
            "arm": name,
            "rule": a["arm"]["rule"],
            "throughput": a["arm"].get("throughput") or "measured",
            "reached": sum(by[s]["reached"] for s in seeds),
            "probe_s": _median([by[s]["probe_s"] for s in seeds]),
            "steps": _median([by[s]["steps"] or INF for s in seeds]),
            "examples": _median([by[s]["examples"] or INF for s in seeds]),
        }
        row["ctrl_s"] = _median([by[s]["ctrl_s"] for s in seeds])
        for metric, (base, extra) in METRICS.items():
            v = [by[s][base] + sum(by[s][e] for e in extra) for s in seeds]
            row[metric] = _median(v)
            row[f"{metric}_ci"] = _boot(v)
            best = out[f"best_{base}"]
            if best is not None:
                ref = next(f for f in fixed if f["B"] == best["B"])[f"per_seed_{base}"]
                _compare(row, metric, v, ref, best["value"], out[f"median_fixed_{base}"])
        _held_row(row, res["held"], name, out)
        row["final_B"] = [int(by[s]["decisions"][-1]["batch_size"]) if by[s]["decisions"] else BASE_B for s in seeds]
        row["time_by_B"] = [by[s]["time_by_B"] for s in seeds]
        row["throughput_tables"] = [by[s]["throughput_table"] for s in seeds]
        out["adaptive"].append(row)
    return out


def _compare(row: dict, key: str, v: list, ref: list, best: float, median_fixed: float) -> None:
    """An adaptive arm's per-seed times ``v`` (median in ``row[key]``) against the best fixed
    B's per-seed times ``ref`` (median ``best``) on the same seeds: ratio with its paired
    bootstrap interval, wins, and the ratio to the median fixed B."""
    row[f"{key}_ratio"] = row[key] / best
    row[f"{key}_ratio_ci"] = _boot(v, ref)
    row[f"{key}_wins"] = sum(x < y for x, y in zip(v, ref))
    row[f"{key}_vs_median_fixed"] = row[key] / median_fixed


def _held_fixed(out: dict, held: dict) -> None:
    """The held-out medians of every fixed batch size, and of the one the sweep chose (the least
    robust median on the tuning seeds): an unbiased measure of the sweep's answer."""
    hs = held["seeds"]
    med = {}
    for B, h in held["fixed"].items():
        by = {r["seed"]: r for r in h["runs"]}
        med[B] = {m: _median([by[s][m] for s in hs]) for m in ("time", "robust")}
        med[B]["per_seed_robust"] = [by[s]["robust"] for s in hs]
        med[B]["per_seed_time"] = [by[s]["time"] for s in hs]
    out["held_fixed"] = {int(B): {"time": v["time"], "robust": v["robust"]} for B, v in med.items()}
    chosen = out["best_robust"]["B"] if out["best_robust"] else None
    out["held_best"] = None if chosen not in med else {"B": chosen, **med[chosen]}
    out["held_median_fixed"] = {m: _median([v[m] for v in med.values()]) for m in ("time", "robust")}
    out["held_seeds"] = hs


def _held_row(row: dict, held: dict, name: str, out: dict) -> None:
    """An adaptive arm on the held-out seeds against the sweep's chosen batch size there."""
    hs = held["seeds"]
    by = {r["seed"]: r for r in held["adaptive"][name]}
    hb = out["held_best"]
    for metric, (base, extra) in METRICS.items():
        v = [by[s][base] + sum(by[s][e] for e in extra) for s in hs]
        row[f"held_{metric}"] = _median(v)
        if hb is not None:
            _compare(row, f"held_{metric}", v, hb[f"per_seed_{base}"], hb[base], out["held_median_fixed"][base])
    row["held_final_B"] = [int(by[s]["decisions"][-1]["batch_size"]) if by[s]["decisions"] else BASE_B for s in hs]


# -- controller overhead -------------------------------------------------------------------------
@contextlib.contextmanager
def _untimed():
    """The controller's own methods for a while, not this script's timing wrappers (two clock
    reads and a dict update each, ~1 µs a call: measured in the overhead rows they would
    count this script's instrument as the controller's cost)."""
    saved = [(cls, name, getattr(cls, name)) for cls, name in _WRAPPED]
    try:
        for cls, name, fn in saved:
            orig = fn
            while hasattr(orig, "__wrapped__"):
                orig = orig.__wrapped__
            setattr(cls, name, orig)
        yield
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


def overhead(p: Problem, sizes, rounds: int, steps_of) -> list:
    """The controller's cost at a fixed B: adaptive with one candidate vs plain ``batch_size=B``,
    with noise tracking alone (``track_noise=TRACK_EVERY``: the tracked steps, but no decisions)
    in between, interleaved rounds, without this script's timing wrappers; one more adaptive
    run a round with them gives the bookkeeping column (the time in the decisions and the noise
    updates) and the number of decisions."""
    d = p.data
    rows = []
    for B in sizes:
        steps = steps_of(B)
        adaptive = dict(batch_size=mg.AdaptiveBatchSize(min=B, max=B, throughput={B: 1.0}))
        arms = {
            "fixed": dict(batch_size=B),
            "tracking": dict(batch_size=B, track_noise=TRACK_EVERY, noise_beta=0.9),
            "adaptive": adaptive,
            "adaptive, timed": adaptive,
        }
        lr = p.base_lr * math.sqrt(B / BASE_B) * 0.25
        samples = {k: [] for k in arms}
        names = list(arms)
        for r in range(rounds + 1):  # round 0 warms up (untimed)
            for name in names[r % 4 :] + names[: r % 4]:
                model = mg.MLP([d["n_in"], *p.hidden, d["n_out"]], activation=p.activation, loss=d["loss"], seed=r)
                ctrl0 = _SPENT["ctrl"]
                with contextlib.nullcontext() if name == "adaptive, timed" else _untimed():
                    c0, t0 = time.process_time(), time.perf_counter()
                    hist = mg.fit(
                        model,
                        d["Xtr"],
                        d["ytr"],
                        steps=steps,
                        optimizer=mg.SGD(lr=lr, momentum=MOMENTUM),
                        seed=r,
                        **arms[name],
                    )
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                if r:
                    samples[name].append(
                        {
                            "train": float(hist.column("time")[-1]),
                            "wall": wall,
                            "cpu": cpu,
                            "robust": _robust(hist, steps, True),
                            "ctrl": _SPENT["ctrl"] - ctrl0,
                            "decisions": len(hist.adaptive or ()),
                        }
                    )
        fx, ad, timed = samples["fixed"], samples["adaptive"], samples["adaptive, timed"]
        n_dec = _median([s["decisions"] for s in timed])
        row = {
            "problem": p.name,
            "B": B,
            "steps": steps,
            "rounds": rounds,
            "decisions": n_dec,
            "fixed_us_per_step": 1e6 * _median([s["robust"] for s in fx]) / steps,
            "adaptive_us_per_step": 1e6 * _median([s["robust"] for s in ad]) / steps,
            "ctrl_us_per_step": 1e6 * _median([s["ctrl"] for s in timed]) / steps,
            "ctrl_us_per_decision": 1e6 * _median([s["ctrl"] for s in timed]) / max(n_dec, 1),
        }
        for k in ("robust", "cpu", "train", "wall"):
            ratios = [a[k] / f[k] for a, f in zip(ad, fx)]
            row[f"{k}_ratio"], row[f"{k}_ratios"] = _median(ratios), ratios
            row[f"{k}_ratio_ci"] = _boot(ratios)
        row["cpu_us_per_step"] = {n: 1e6 * _median([s["cpu"] for s in v]) / steps for n, v in samples.items()}
        rows.append(row)
    return rows


# -- report -----------------------------------------------------------------------------------------
def _ms(x) -> str:
    return "not reached" if x == INF else f"{1e3 * x:.3g}"


def _ci(c) -> str:
    return f"[{_fmt(c[0])}, {_fmt(c[1])}]"


def _n(x) -> str:
    return "-" if x == INF else f"{x:.0f}"


def _fmt(x) -> str:
    return "∞" if x == INF else f"{x:.2f}"


def verdict(summ: list) -> dict:
    out = {}
    for metric in [f"held_{m}" for m in METRICS] + list(METRICS):
        rows = [next(a for a in s["adaptive"] if a["arm"] == "adaptive adascale") for s in summ]
        ratios = [r.get(f"{metric}_ratio", INF) for r in rows]
        vs_med = [r.get(f"{metric}_vs_median_fixed", INF) for r in rows]
        out[metric] = {
            "ratios": ratios,
            "vs_median_fixed": vs_med,
            "goal": all(x <= GOAL for x in ratios) and all(v < 1 for v in vs_med),
            "bar": all(x <= BAR for x in ratios),
        }
    return out


_METRIC_WORDS = {
    "time": "raw (the history's clock: `hist.time_to_target`)",
    "robust": "robust (each step at its class's median duration)",
    "robust+ctrl": "robust + the controller's decisions and noise bookkeeping (off the step clock)",
    "all-in": "robust + decisions and bookkeeping + the throughput probe",
}
_METRIC_WORDS.update({f"held_{k}": f"**held-out seeds**: {v}" for k, v in list(_METRIC_WORDS.items())})


def render_md(summ: list, ovh: list, meta: dict) -> str:
    mc = meta["machine"]
    L = [
        "# Adaptive batch size against every fixed batch size (issue 17)",
        "",
        f"Date {DATE}. `python bench/adaptive.py{' ' + meta['args'] if meta['args'] else ''}`, "
        f"{meta['wall_s']:.0f} s. Machine: {mc.get('cpu', '?')}, {mc.get('logical_cpus', '?')} logical CPUs, "
        f"one thread (NUMBA/OPENBLAS/OMP/MKL_NUM_THREADS=1), Python {mc.get('python')}, numpy "
        f"{mc.get('numpy')}, numba {mc.get('numba')}, minigd {mc.get('minigd_commit', '?')}. Seeds "
        f"{meta['seeds']}. Load average before / after: {meta['load_before']} / {meta['load_after']}; "
        f"{meta['stalled_share']:.0%} of the runs had some runnable task waiting for a CPU more than 5% of "
        f"their wall time (/proc/pressure/cpu): the machine was shared, and the raw times are disturbed.",
        "",
        "Times: ms of training to the first evaluation meeting the target (evaluations every step for 50 "
        "steps, then every 2% more steps, the same for every arm; evaluation and compilation excluded), "
        "median over seeds. *raw*: the history's clock (`hist.time_to_target`: the steps only); *robust*: "
        "each step at the median duration of its class in the run (its batch size, and for adaptive "
        "whether the noise was tracked on it), which removes preemption by other processes; *ctrl*: the "
        "adaptive run's decisions and noise bookkeeping, which run outside the step clock; *probe*: its "
        "throughput probe (of each size when a decision first can reach it: none before training), also "
        "outside. *all-in* = robust + ctrl + probe: the wall time a user waits for the training. "
        "Ratio = adaptive / best fixed B (raw to raw, the others to robust), with a paired bootstrap 90% "
        "interval over seeds; wins = seeds in which adaptive beat the best fixed B. "
        f"Goal: ratio <= {GOAL} on every problem and faster than the median fixed B; bar: <= {BAR}.",
        "",
        "**Held-out seeds** (the verdict's first rows): the sweep chooses each batch size's rate and the "
        f"best batch size on the tuning seeds; the chosen rates then run on {len(meta['seeds'])} fresh seeds "
        f"(tuning seed + {HELD_OUT}), beside the adaptive arms, and the ratio is adaptive / the batch size the "
        "sweep chose, both on those seeds. On the tuning seeds themselves (the rows after) the best of many "
        "noisy medians is biased low -- it was picked for being low -- and the adaptive arm, which picks "
        "nothing, pays for that bias. "
        f"Each held-out (arm, seed) runs {meta.get('held_repeats', 1)} times, in interleaved passes over all "
        "the arms of that seed, and its median run by all-in time (for a fixed batch size, its robust time) "
        "counts, with all its columns: a fixed batch size takes the same steps each time, so its repeats "
        "differ only by the machine's timing noise; an adaptive run's measured step times steer its "
        "decisions, so its repeats can also take different paths, and the median run is its typical one.",
        "",
    ]
    v = meta["verdict"]
    L += [
        '## Verdict (`lr_rule="adascale"`, the default, measured throughput)',
        "",
        "| time to target | ratio to the best fixed B ("
        + ", ".join(s["problem"] for s in summ)
        + ") | vs the median fixed B | goal | bar |",
        "|---|---|---|---|---|",
    ]
    for m, r in v.items():
        L.append(
            f"| {_METRIC_WORDS[m]} | {', '.join(_fmt(x) + 'x' for x in r['ratios'])} | "
            f"{', '.join(_fmt(x) + 'x' for x in r['vs_median_fixed'])} | "
            f"{'met' if r['goal'] else '**not met**'} | {'met' if r['bar'] else '**not met**'} |"
        )
    L.append("")
    n = len(meta["seeds"])
    for s in summ:
        bt, br = s["best_time"], s["best_robust"]
        L += [
            f"## {s['problem']}",
            "",
            s["describe"] + f". Adaptive: `AdaptiveBatchSize(min=32)` (candidates "
            f"32 ... {min(8192, s['n_train'])}), learning rate {s['lr_B32']:.4g} (the tuned rate of B=32). "
            f"Run cap {1e3 * s['run_cap_s']:.0f} ms of training.",
        ]
        hb = s.get("held_best")
        if hb is not None:
            L += [
                "",
                f"Held-out seeds {s['held_seeds']}: the sweep's choice B={hb['B']} ran {_ms(hb['robust'])} ms "
                f"robust ({_ms(hb['time'])} raw); the median fixed B {_ms(s['held_median_fixed']['robust'])} ms; "
                "every fixed B at its chosen rate (robust ms): "
                + ", ".join(f"{B}: {_ms(v['robust'])}" for B, v in sorted(s["held_fixed"].items()))
                + ".",
                "",
                "| arm (held-out seeds) | last B per seed | robust ms | robust ratio [90%] | all-in ms | "
                "all-in ratio [90%] | wins robust / all-in | vs median fixed robust / all-in |",
                "|---|---|---:|---|---:|---|---:|---:|",
            ]
            for a in s["adaptive"]:
                L.append(
                    f"| {a['arm']} | {a['held_final_B']} | {_ms(a['held_robust'])} | "
                    f"{_fmt(a.get('held_robust_ratio', INF))} {_ci(a.get('held_robust_ratio_ci', (INF, INF)))} | "
                    f"{_ms(a['held_all-in'])} | "
                    f"{_fmt(a.get('held_all-in_ratio', INF))} {_ci(a.get('held_all-in_ratio_ci', (INF, INF)))} | "
                    f"{a.get('held_robust_wins', 0)} / {a.get('held_all-in_wins', 0)} | "
                    f"{_fmt(a.get('held_robust_vs_median_fixed', INF))} / "
                    f"{_fmt(a.get('held_all-in_vs_median_fixed', INF))} |"
                )
        L += [
            "",
            "Tuning seeds:",
            "",
            "| arm | reached | steps / examples | last B per seed | raw ms [90%] | raw ratio [90%] | robust ms | "
            "robust ratio [90%] | ctrl ms | probe ms | robust+ctrl ratio | all-in ratio | wins raw / robust | "
            "vs median fixed raw / robust |",
            "|---|---:|---:|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|",
            f"| best fixed B (raw: B={bt['B'] if bt else '-'}, robust: B={br['B'] if br else '-'}) | | | | "
            f"{_ms(bt['value']) if bt else '-'} | 1 | {_ms(br['value']) if br else '-'} | 1 | | | | | | |",
            f"| median of the fixed B | | | | {_ms(s['median_fixed_time'])} | | "
            f"{_ms(s['median_fixed_robust'])} | | | | | | | |",
        ]
        for a in s["adaptive"]:
            L.append(
                f"| {a['arm']} | {a['reached']}/{n} | {_n(a['steps'])} / {_n(a['examples'])} | {a['final_B']} | "
                f"{_ms(a['time'])} {_ci([1e3 * x for x in a['time_ci']])} | "
                f"{_fmt(a.get('time_ratio', INF))} {_ci(a.get('time_ratio_ci', (INF, INF)))} | "
                f"{_ms(a['robust'])} | "
                f"{_fmt(a.get('robust_ratio', INF))} {_ci(a.get('robust_ratio_ci', (INF, INF)))} | "
                f"{1e3 * a['ctrl_s']:.3g} | {1e3 * a['probe_s']:.3g} | "
                f"{_fmt(a.get('robust+ctrl_ratio', INF))} | {_fmt(a.get('all-in_ratio', INF))} | "
                f"{a.get('time_wins', 0)} / {a.get('robust_wins', 0)} | "
                f"{_fmt(a.get('time_vs_median_fixed', INF))} / {_fmt(a.get('robust_vs_median_fixed', INF))} |"
            )
        L += [
            "",
            "Fixed batch sizes (rate = base x sqrt(B/32) x factor; † best rate at an edge of the factors tried):",
            "",
            "| B | factor | rate | reached | steps | examples | raw ms | robust ms |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for f in s["fixed"]:
            if f["factor"] is None:
                L.append(f"| {f['B']} | - | - | 0/{n} | - | - | not reached | not reached |")
                continue
            L.append(
                f"| {f['B']} | {f['factor']:g}{' †' if f['edge'] else ''} | {f['lr']:.3g} | {f['reached']}/{n} | "
                f"{_n(f['steps'])} | {_n(f['examples'])} | {_ms(f['time'])} | {_ms(f['robust'])} |"
            )
        a0 = next(a for a in s["adaptive"] if a["arm"] == "adaptive adascale")
        L += [
            "",
            "adascale's training time (ms, to the target or the cap) at each batch size, per seed: "
            + "; ".join(", ".join(f"{b}: {1e3 * t:.3g}" for b, t in sorted(tb.items())) for tb in a0["time_by_B"])
            + ".",
            "",
            "The throughput table adascale's probe measured (seed 0; µs per step, and in brackets µs per "
            "example): "
            + ", ".join(
                f"{b}: {1e6 * t:.3g} ({1e6 * t / b:.2g})" for b, t in sorted(a0["throughput_tables"][0].items())
            )
            + ". "
            "The steps of the fixed runs at their tuned rate (robust, median over seeds; µs per step, and "
            "per example): "
            + ", ".join(
                f"{f['B']}: {f['us_per_step']:.3g} ({f['us_per_step'] / f['B']:.2g})"
                for f in s["fixed"]
                if f.get("us_per_step", INF) < INF
            )
            + ".",
            "",
        ]
    L += [
        "## Controller overhead",
        "",
        "`AdaptiveBatchSize(min=B, max=B, throughput={B: 1})` (one candidate: the controller decides after "
        f"{EVERY} steps, then on its doubling period up to max_every = {MAX_EVERY} (every decision keeps B), and "
        f"tracks the noise every {TRACK_EVERY}th step of its first period, then {EVERY // TRACK_EVERY} times a "
        "period; it never changes B; nothing probed) vs `batch_size=B`, "
        f"and `batch_size=B, track_noise={TRACK_EVERY}` (the tracked steps without the decisions) between them; same "
        "steps, no evaluation, interleaved rounds, without this script's timing wrappers; median over rounds of the "
        "per-round ratio, with a bootstrap 90% interval of that median. "
        "*controller bookkeeping*: the time in `Controller.decide`, `NoiseTracker.update` and the "
        "per-example norms' sum, outside the step clock, per step and per decision (the number of decisions in "
        "brackets), from one more adaptive run a round with the timing wrappers on. "
        "*steps*: the steps' time, each at the median duration of its class (tracked or not) in the run "
        "(the per-example norms of the tracked steps; preemption removed); *fit CPU*: the process CPU "
        "time of the whole `fit` call (the steps, the decisions, the noise bookkeeping and the shorter "
        "runs of steps the loop hands the backend between tracked steps); *raw train* / *raw wall*: the "
        f"history's clock and the call's wall time (disturbed by other processes). Target <= {OVERHEAD_GOAL}.",
        "",
        "| problem | B | steps | fixed µs/step | adaptive µs/step | steps ratio | fit CPU ratio [90%] | "
        f"fit CPU µs/step: fixed / fixed, noise tracked every {TRACK_EVERY} steps / adaptive | "
        "controller bookkeeping µs/step (per decision; decisions) | "
        "raw train ratio | raw wall ratio | met (steps / fit CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---|",
    ]
    for r in ovh:
        ok = ["yes" if r[k] <= OVERHEAD_GOAL else "**no**" for k in ("robust_ratio", "cpu_ratio")]
        c = r["cpu_us_per_step"]
        L.append(
            f"| {r['problem']} | {r['B']} | {r['steps']} | {r['fixed_us_per_step']:.1f} | "
            f"{r['adaptive_us_per_step']:.1f} | {r['robust_ratio']:.3f} | {r['cpu_ratio']:.3f} "
            f"[{r['cpu_ratio_ci'][0]:.3f}, {r['cpu_ratio_ci'][1]:.3f}] | "
            f"{c['fixed']:.1f} / {c['tracking']:.1f} / {c['adaptive']:.1f} | "
            f"{r['ctrl_us_per_step']:.1f} ({r['ctrl_us_per_decision']:.0f}; {r.get('decisions', '?')}) | "
            f"{r['train_ratio']:.3f} | "
            f"{r['wall_ratio']:.3f} | {ok[0]} / {ok[1]} |"
        )
    L += [
        "",
        "Plot: `adaptive.png` (batch size, noise scale and learning-rate factor the controller chose, "
        "one seed per problem).",
    ]
    return "\n".join(L) + "\n"


def plot(summ: list, res: dict, path: str, seed) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    fig, axes = plt.subplots(2, len(summ), figsize=(5.2 * len(summ), 7), squeeze=False)
    colors = {
        "adaptive adascale": "C0",
        "adaptive sqrt": "C1",
        "adaptive linear": "C2",
        "adaptive adascale, flops model": "C3",
        "adaptive adascale, probe": "C4",
    }
    for j, s in enumerate(summ):
        ax, ax2 = axes[0, j], axes[1, j]
        for name, a in res[s["problem"]]["adaptive"].items():
            r = next((r for r in a["runs"] if r["seed"] == seed), None)
            if r is None:
                continue
            end = r["steps"] or r["n_steps"]
            steps = [0] + [d["step"] for d in r["decisions"]] + [end]
            Bs = [BASE_B] + [d["batch_size"] for d in r["decisions"]]
            fs = [1.0] + [d["lr_factor"] for d in r["decisions"]]
            ax.step(steps, Bs + Bs[-1:], where="post", color=colors.get(name), label=name.replace("adaptive ", ""))
            ax2.step(steps, fs + fs[-1:], where="post", color=colors.get(name))
            if name == "adaptive adascale" and r["decisions"]:
                ax.plot(
                    [d["step"] for d in r["decisions"]],
                    [d["noise"] for d in r["decisions"]],
                    ":",
                    marker=".",
                    ms=4,
                    color="C0",
                    alpha=0.6,
                    label="noise scale at each decision (adascale)",
                )
        bt = s["best_robust"]
        if bt:
            ax.axhline(bt["B"], color="k", ls="--", lw=0.8, label=f"best fixed B={bt['B']}")
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title(f"{s['problem']} (seed {seed}): batch size chosen")
        ax.set_ylabel("batch size")
        ax2.set_yscale("log", base=2)
        ax2.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax2.set_ylabel("learning-rate factor (x the rate tuned at B=32)")
        ax2.set_xlabel("step (to target)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return True


def _jsonable(x):
    """JSON-safe, floats to 6 significant digits (timings are not better than that)."""
    if isinstance(x, float):
        if not math.isfinite(x):
            return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return _jsonable(float(x))
    return x


def main(argv=None) -> int:
    global HELD_REPEATS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="digits, 2 seeds, sizes 16/32/128, 3 rates (smoke test)")
    ap.add_argument("--problems", default=None, help=f"comma-separated, from {','.join(PROBLEMS)}")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; --quick 2)")
    ap.add_argument("--overhead-rounds", type=int, default=None, help="rounds of the overhead timing (default 11)")
    ap.add_argument(
        "--held-repeats",
        type=int,
        default=None,
        help=f"runs of each held-out (arm, seed); the median one counts (default {HELD_REPEATS}; --quick 1)",
    )
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    names = args.problems.split(",") if args.problems else (["digits"] if args.quick else list(PROBLEMS))
    seeds = list(range(args.seeds if args.seeds else 2 if args.quick else 5))
    rounds = args.overhead_rounds or (2 if args.quick else 11)
    HELD_REPEATS = args.held_repeats or (1 if args.quick else HELD_REPEATS)
    if HELD_REPEATS % 2 == 0:
        ap.error(f"--held-repeats: expected an odd number (the median run counts), got {HELD_REPEATS}")
    load_before = os.getloadavg()
    from minigd.warmup import warmup

    warmup(("float32",))
    rng = np.random.default_rng(20261206)
    res, summ, ovh = {}, [], []
    for name in names:
        p = load_problem(name, args.quick)
        log(f"{name}: sizes {list(p.sizes)}, target {p.metric} {p.target:.4g}")
        res[name] = run_problem(p, seeds, args.quick, rng)
        summ.append(summarize(p, res[name], seeds))
        sizes = [32] if args.quick else [32, 128, 512]
        ovh += overhead(p, sizes, rounds, lambda B: 200 if args.quick else max(400, 200_000 // B))
        log(f"{name}: done")
    runs = [r for name in res for c in res[name]["sweep"].cells.values() for r in c] + [
        r for name in res for a in res[name]["adaptive"].values() for r in a["runs"]
    ]
    meta = {
        "date": DATE,
        "args": " ".join(argv if argv is not None else sys.argv[1:]),
        "seeds": seeds,
        "machine": machine(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "stalled_share": float(np.mean([r["stall"] > 0.05 for r in runs])) if runs else 0.0,
        "n_runs": len(runs),
        "held_repeats": HELD_REPEATS,
    }
    meta["verdict"] = verdict(summ)
    meta["wall_s"] = time.perf_counter() - t_start
    md = render_md(summ, ovh, meta)
    cells = {
        name: [
            {
                "B": c[0],
                "factor": c[1],
                "lr": res[name]["sweep"].lr(*c),
                "dropped": c in res[name]["sweep"].dropped,
                "runs": recs,
            }
            for c, recs in sorted(res[name]["sweep"].cells.items())
        ]
        for name in res
    }
    adaptive_runs = {name: {k: a for k, a in res[name]["adaptive"].items()} for name in res}
    held = {
        name: {
            "seeds": res[name]["held"]["seeds"],
            "fixed": {int(B): h for B, h in res[name]["held"]["fixed"].items()},
            "adaptive": res[name]["held"]["adaptive"],
        }
        for name in res
    }
    data = {
        "meta": meta,
        "summary": summ,
        "overhead": ovh,
        "cells": cells,
        "adaptive_runs": adaptive_runs,
        "held_out_runs": held,
    }
    os.makedirs(args.out, exist_ok=True)
    atomic_write(os.path.join(args.out, "adaptive.json"), json.dumps(_jsonable(data), separators=(",", ":")) + "\n")
    atomic_write(os.path.join(args.out, "adaptive.md"), md)
    plot(summ, res, os.path.join(args.out, "adaptive.png"), seeds[0])
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
