"""Adaptive batch size inside :func:`minigd.fit`: ``batch_size="adaptive"``.

The controller (:class:`AdaptiveBatchSize`) picks the batch size during training from two
measurements, as Pollux does (Qiao et al. 2021), in one process:

* **the gradient noise scale** B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018),
  tracked during training: every ``track_every`` steps (more sparsely as the decision
  period grows, the same number of measurements per period) the step's per-example squared
  gradient norms (computed by the backward pass alongside the step) give unbiased
  estimates of |G|^2 and tr(Sigma) (:class:`~minigd.gradstats.tracking.NoiseTracker`,
  finite-population corrected), smoothed by bias-corrected moving averages.  With batch
  norm, where no example has a gradient of its own, the tracked step instead compares the
  squared norm of its gradient with that of its first half (the two-batch estimator,
  McCandlish et al. Appendix A.1), at the cost of one extra half-batch gradient;
* **the step time per batch size** on this machine, from the real steps (the median of
  each size's last five decision periods' samples: a period's mean step time, or the
  median of its runs of steps when one was more than twice as slow per step as another).  A size not trained at yet
  is predicted from the nearest size that was, conservatively -- a larger size no faster
  per example, a smaller one saving only the cost model's share of the step (step time ~
  64 rows + B) -- and tried for real when it would win with a time ``1 + explore`` times
  shorter: its real steps then replace the prediction, and at the next decision the size
  the trial left is the incumbent: the tried size stays only if it wins by ``min_gain``.  A size whose one real sample is slower than even that
  conservative prediction from the size trained at (a period disturbed by another process,
  or its first, cold steps) is tried once more the same way, that sample dropped.  Nothing is timed outside training, so the controller costs
  no probe steps (on digits the probe cost a third of the training time to target:
  bench/results/adaptive.md).  Or ``throughput="probe"``: a size not trained at is timed
  when a decision first can reach it -- one warm-up and the best of three steps on scratch
  copies of the parameters and optimizer state (training is not touched), on random rows
  as training gathers them, offset by the difference between real and probed times at the
  size trained at.  Or given (``throughput=``: a table, or the "flops" cost model).

At each decision -- the first after ``every`` steps; the period doubles after each
decision that keeps the batch size, up to ``max_every``, and falls back to ``every`` when
the size changes -- it moves to the candidate batch size with the largest goodput
(examples per second times statistical efficiency, :func:`~minigd.gradstats.goodput`),
with a little hysteresis (``min_gain``) -- or, when it would keep its size, tries once a
size in reach known from the probe only whose goodput is within the probe's error
(``explore``) -- and scales the learning rate by ``lr_rule`` from the rate the optimizer
gives for the starting (smallest) batch size:

``"adascale"``
    the AdaScale gain r = (tr(Sigma)/B0 + |G|^2) / (tr(Sigma)/B + |G|^2)
    (Johnson et al. 2020; :func:`~minigd.gradstats.adascale_gain`), at the noise measured
    at the change;
``"sqrt"``
    sqrt(B / B0);
``"linear"``
    B / B0 (Goyal et al. 2017).

Training starts at ``min``.  The sampler continues its epoch at the new batch size, so no
example is repeated or skipped within an epoch (the last batch of an epoch holds what is
left).  The history records every step's batch size and learning rate (columns), the
tracked noise records (``hist.noise``), and every decision with its noise scale, gain,
goodput and reason (``hist.adaptive``; ``hist.column("gain")`` / ``"goodput"`` /
``"lr_factor"`` give the value in force at every step).  A checkpoint holds the controller
whole; a resumed run continues bitwise.

Determinism: for a seed and a throughput table, a run is bitwise reproducible.  The
default measures the table, so two runs on a busy machine can differ where two candidates'
goodputs are within the timing noise; pass ``throughput=`` (a table, or ``"flops"`` for a
deterministic cost model) when runs must repeat exactly.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from typing import Any

import numpy as np

from minigd._validation import _got
from minigd.history import ADAPTIVE_FIELDS  # noqa: F401  (re-exported: the per-step fields of a run)

#: the learning-rate rules of :class:`AdaptiveBatchSize`
LR_RULES = ("adascale", "sqrt", "linear")


def _pos_int(name: str, v: Any, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= {low}, got {_got(v)}")
    if v < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {v!r}")
    return int(v)


class AdaptiveBatchSize:
    """Settings of ``fit(batch_size=AdaptiveBatchSize(...))`` (``"adaptive"`` = the defaults).

    Parameters
    ----------
    min : int
        Smallest batch size, and the one training starts at (the optimizer's learning rate
        is the rate for this size).  Default 32.
    max : int, optional
        Largest batch size (default: the number of training examples, at most 8192).
    every : int
        Steps between decisions while the batch size moves (default 64: the noise estimate
        it acts on averages over ~80-160 steps anyway).  A decision costs ~10 us of Python
        hot and ends the backend's run of steps; with the caches cold after a run of steps
        that streamed the data, ~100-200 us in all, 4-8% of 64 steps of 20 us
        (bench/results/adaptive.md), hence ``max_every``.
    max_every : int, optional
        The longest period between decisions (default ``8 * every``).  A decision that
        keeps the batch size doubles the period, up to ``max_every``; one that changes it,
        starts or ends a trial, or finds no noise measured yet, sets it back to ``every``.
        So the controller decides often while it moves and rarely while one size keeps
        winning, and a stable run pays for a decision every 512 steps, not 64.  Set it to
        ``every`` for a fixed period.
    lr_rule : {"adascale", "sqrt", "linear"}
        How the learning rate follows the batch size (module doc).
    candidates : sequence of int, optional
        The batch sizes considered (default: ``min``, the powers of two between, ``max``).
    track_every : int
        Steps between noise measurements while the period is ``every`` (default 8: a
        tracked step costs 5-25% more than a plain one -- its per-example norms and their
        bookkeeping, the most at small batches -- so an eighth of the steps keeps it near
        1-3%; bench/results/adaptive.md).  The interval grows with the decision period in
        proportion, ``track_every * period // every`` steps from the period's first step:
        each period gets about ``every / track_every`` measurements (8 by default), and a
        stable run measures every 64 steps, not 8 (its smoothed noise then spans ~10
        measurements, ~640 steps; the learning-rate factor follows it at each decision).
        With ``max_every == every`` (a fixed period) the noise is measured at the multiples
        of ``track_every``, as before the period could grow.
    noise_beta : float
        Decay of the noise moving averages per measurement, in [0, 1) (default 0.9).
    min_gain : float
        A change must raise the predicted goodput by this fraction (default 0.05).
    max_step : float or None
        The largest factor one decision may change the batch size by (default 2: one power
        of two).  A single noisy estimate (early in training |G|^2 is often estimated <= 0,
        an infinite noise scale) then moves the batch size one step, not to ``max``; a
        sustained one keeps moving it.  None: straight to the goodput maximum.
    explore : float
        A size in reach never trained at (its step time predicted, or probed) is tried for
        one decision period when it would win with that time ``1 + explore`` times shorter
        (default 0.3: one probe on a busy machine was measured up to ~30% off, and a
        neighbour timed too slow would otherwise never be corrected).  Each size is tried
        so at most once; 0: never.  Only with measured (None) or probed throughput.  At
        the decision after a trial the size it left is the incumbent: the tried size stays
        only when its goodput beats that size's by ``min_gain``.
    throughput : None, "probe", "flops" or dict
        None: the real steps' times, the sizes not trained at predicted (module doc).
        "probe": the same, the sizes not trained at timed by a probe when first in reach.
        "flops": a deterministic cost model, step time proportional to ``overhead + B``,
        with the overhead equal to one row's FLOPs times 64 (no clock read).  A dict
        ``{B: seconds per step}`` for every candidate: used as given.
    """

    def __init__(
        self,
        min: int = 32,
        max: int | None = None,
        every: int = 64,
        lr_rule: str = "adascale",
        candidates: Any = None,
        track_every: int = 8,
        noise_beta: float = 0.9,
        min_gain: float = 0.05,
        max_step: float | None = 2.0,
        throughput: Any = None,
        explore: float = 0.3,
        max_every: int | None = None,
    ) -> None:
        self.min = _pos_int("min", min, 1)
        self.max = None if max is None else _pos_int("max", max, 1)
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max: expected max >= min = {self.min}, got max={self.max}")
        self.every = _pos_int("every", every, 1)
        self.max_every = 8 * self.every if max_every is None else _pos_int("max_every", max_every, 1)
        if self.max_every < self.every:
            raise ValueError(f"max_every: expected max_every >= every = {self.every}, got max_every={self.max_every}")
        if not isinstance(lr_rule, str):
            raise TypeError(f"lr_rule: expected one of {list(LR_RULES)}, got {_got(lr_rule)}")
        if lr_rule not in LR_RULES:
            raise ValueError(f"lr_rule: expected one of {list(LR_RULES)}, got {lr_rule!r}")
        self.lr_rule = lr_rule
        if candidates is not None:
            if isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__iter__"):
                raise TypeError(f"candidates: expected a sequence of ints, got {_got(candidates)}")
            candidates = sorted({_pos_int("candidates[i]", c, 1) for c in candidates})
            if not candidates:
                raise ValueError("candidates: expected at least one batch size, got none")
        self.candidates = candidates
        self.track_every = _pos_int("track_every", track_every, 1)
        if self.track_every > self.every:
            raise ValueError(
                f"track_every: expected at most every={self.every} (each decision needs a "
                f"measurement of the noise), got {self.track_every}"
            )
        for name, v, lo, hi in (
            ("noise_beta", noise_beta, 0.0, 1.0),
            ("min_gain", min_gain, 0.0, math.inf),
            ("explore", explore, 0.0, math.inf),
        ):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name}: expected a number in [{lo}, {hi}), got {_got(v)}")
            if not lo <= float(v) < hi:
                raise ValueError(f"{name}: expected a number in [{lo}, {hi}), got {v!r}")
        self.noise_beta, self.min_gain, self.explore = float(noise_beta), float(min_gain), float(explore)
        if max_step is not None:
            if isinstance(max_step, bool) or not isinstance(max_step, numbers.Real):
                raise TypeError(f"max_step: expected None or a number > 1, got {_got(max_step)}")
            if not 1.0 < float(max_step) < math.inf:
                raise ValueError(f"max_step: expected None or a finite number > 1, got {max_step!r}")
            max_step = float(max_step)
        self.max_step = max_step
        if isinstance(throughput, str):
            if throughput not in ("flops", "probe"):
                raise ValueError(
                    f"throughput: expected None, 'flops', 'probe' or a dict {{batch size: seconds per step}}, "
                    f"got {throughput!r}"
                )
        elif throughput is not None and not isinstance(throughput, dict):
            raise TypeError(
                f"throughput: expected None, 'flops', 'probe' or a dict {{batch size: seconds per step}}, "
                f"got {_got(throughput)}"
            )
        if isinstance(throughput, dict):
            for k, v in throughput.items():
                _pos_int("throughput key", k, 1)
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < float(v) < math.inf:
                    raise ValueError(f"throughput[{k!r}]: expected a positive, finite number of seconds, got {v!r}")
            throughput = {int(k): float(v) for k, v in throughput.items()}
        self.throughput = throughput

    def __repr__(self) -> str:
        return (
            f"AdaptiveBatchSize(min={self.min}, max={self.max}, every={self.every}, max_every={self.max_every}, "
            f"lr_rule={self.lr_rule!r}, "
            f"track_every={self.track_every}, noise_beta={self.noise_beta}, min_gain={self.min_gain}, "
            f"explore={self.explore})"
        )

    def config(self) -> dict:
        """The settings as plain JSON (a checkpoint compares them on resume)."""
        tp = self.throughput
        return {
            "min": self.min,
            "max": self.max,
            "every": self.every,
            "max_every": self.max_every,
            "lr_rule": self.lr_rule,
            "candidates": self.candidates,
            "track_every": self.track_every,
            "noise_beta": self.noise_beta,
            "min_gain": self.min_gain,
            "max_step": self.max_step,
            "explore": self.explore,
            "throughput": {str(k): v for k, v in sorted(tp.items())} if isinstance(tp, dict) else tp,
        }

    def sizes(self, n: int) -> list:
        """The candidate batch sizes for a training set of n rows (checked against n)."""
        if self.min > n:
            raise ValueError(
                f"batch_size: AdaptiveBatchSize(min={self.min}) needs at least {self.min} training examples, got {n}"
            )
        hi = min(n, 8192) if self.max is None else self.max
        if hi > n:
            raise ValueError(f"batch_size: AdaptiveBatchSize(max={hi}) is more than the {n} training examples")
        if self.candidates is not None:
            bad = [c for c in self.candidates if not self.min <= c <= hi]
            if bad:
                raise ValueError(f"candidates: expected batch sizes in [min, max] = [{self.min}, {hi}], got {bad}")
            return sorted(set(self.candidates) | {self.min})
        out, b = [self.min], 1
        while b < hi:
            b *= 2
            if self.min < b < hi:
                out.append(b)
        if hi > self.min:
            out.append(hi)
        if isinstance(self.throughput, dict):
            missing = [c for c in out if c not in self.throughput]
            if missing:
                raise ValueError(
                    f"throughput: expected a step time for every candidate batch size {out}, missing {missing}"
                )
        return out


#: decision periods whose median gives a measured size's step time
RECENT = 5
#: the cost model's fixed part of a step, in rows: step time ~ (FLOPS_OVERHEAD_ROWS + B)
#: (``throughput="flops"``, and the shape that predicts a size not trained at yet from one
#: that was, with measured throughput)
FLOPS_OVERHEAD_ROWS = 64


def _median(xs: list) -> float:
    v = sorted(xs)
    h = len(v) // 2
    return v[h] if len(v) % 2 else 0.5 * (v[h - 1] + v[h])


def _finite(x) -> bool:
    """A finite number (not a bool) that a float holds (a crafted file's int can be too
    large to convert)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _positive(x) -> bool:
    """A positive, finite number (not a bool)."""
    return _finite(x) and x > 0


def _weighted_median(ts: list, ks: list, n: int) -> float:
    """The step-weighted median of runs' per-step times ``ts`` (``ks`` steps each, ``n`` in
    all): the per-step time of the run holding the middle step (the lower of two).  ``ts`` is
    sorted in place when every run is one step (a per-step callback: the common case of many
    runs, at C speed)."""
    if n == len(ts):
        ts.sort()
        return ts[(n - 1) // 2]
    half, seen = n / 2.0, 0
    for t, k in sorted(zip(ts, ks)):
        seen += k
        if seen >= half:
            return t
    return max(ts)


class Controller:
    """The running controller of one adaptive ``fit`` (its state is checkpointed)."""

    def __init__(self, spec: AdaptiveBatchSize, sizes: list, n: int, replacement: bool) -> None:
        from minigd.gradstats.tracking import NoiseTracker

        self.spec, self.sizes = spec, list(sizes)
        self.B0 = self.sizes[0]
        self.B = self.B0
        self.factor = 1.0  # learning-rate multiple of the optimizer's rate
        self.gain = 1.0
        self.goodput = math.nan
        self.noise = math.nan
        self.seconds: dict = {}  # {B: seconds per step}
        self._observed: dict = {}  # {B: samples folded into seconds[B]}
        self._recent: dict = {}  # {B: its mean step times in its last RECENT decision periods}
        # the real steps since the last fold: [B, seconds, steps, the least and the largest
        # per-step time of a run], and the runs themselves [(seconds per step, steps), ...]
        self._pend: list = [0, 0.0, 0, math.inf, 0.0]
        self._run_t: list = []  # per-step time of each run since the last fold
        self._run_k: list = []  # and its steps
        self._explore_order: dict = {}  # {B: the candidates nearest to B first, for exploring}
        self._probe: dict | None = None  # what measuring a size needs (measured throughput)
        self._probed: dict = {}  # {B: the probe's seconds per step}
        self._calib = 0.0  # real - probed step time (seconds) at the size trained at last
        self.tracker = NoiseTracker(n, replacement=replacement, beta=spec.noise_beta)
        self.decisions: list = []
        self.epoch_B = self.B0  # the batch size the current epoch was laid out for
        self._near: dict = {}  # {B: the candidates one decision can reach from B}
        self._order: dict = {}  # {B: the candidates nearest to B first (log scale; the smaller of a tie)}
        self.explored: list = []  # the sizes tried because of the explore rule
        self.retried: list = []  # the sizes tried again because their one sample was suspect
        self.trial_from = 0  # the size a trial (explore, retry) left, until the decision after it; 0: none
        self.period = spec.every  # steps from the last decision to the next (every ... max_every)
        self.next_step = spec.every  # the step count after which the next decision runs

    # -- throughput --------------------------------------------------------------------------
    def measure(self, model, X, yi, yf, opt_state) -> None:
        """The step times (see the module doc): a given table or the "flops" model whole.
        Measured (None), nothing: the real steps give them.  Probed, nothing is timed here
        either: this sets up the probe, which a decision runs for the sizes it can reach
        that have no time yet (with ``max_step``, the neighbours; every candidate without
        it) -- so a run that ends before its first decision pays for no probe, and the
        starting size's time comes from its real steps."""
        spec = self.spec
        if isinstance(spec.throughput, dict):
            self.seconds = {b: spec.throughput[b] for b in self.sizes}
            return
        if spec.throughput == "flops":
            per_row = sum(a * b for a, b in zip(model.sizes[:-1], model.sizes[1:]))
            self.seconds = {b: (FLOPS_OVERHEAD_ROWS + b) * per_row * 6e-10 for b in self.sizes}
            return
        if spec.throughput is None:  # real steps only: the sizes not trained at are predicted
            return
        rng = np.random.default_rng(12345)  # the probe's own: training draws nothing here
        self._probe = {
            "impl": model.backend_impl,
            "data": (X, yi, yf),
            "params": model.params.copy(),  # scratch copies: training is not touched
            "opt": dataclasses.replace(opt_state, hp=opt_state.hp.copy(), state=opt_state.state.copy()),
            "grad": np.zeros_like(model.params),
            # random rows, as training gathers them (contiguous rows would be cache-hot)
            "idx": rng.permutation(X.shape[0]).astype(np.int64),
            "dropout": rng if model.norm.dropout > 0 else None,
        }

    def _reachable(self, B: int) -> list:
        """The candidates one decision can move to from B (B included; cached per B)."""
        near = self._near.get(B)
        if near is None:
            f = self.spec.max_step
            near = [b for b in self.sizes if f is None or B / f / (1 + 1e-12) <= b <= B * f * (1 + 1e-12)]
            self._near[B] = near
        return near

    def _by_distance(self, B: int) -> list:
        """The candidates nearest to B first, in log scale, the smaller of two equally near
        first (B itself first when it is one; cached per B)."""
        order = self._order.get(B)
        if order is None:
            order = self._order[B] = sorted(self.sizes, key=lambda m: (abs(math.log(B / m)), m))
        return order

    def _predict(self, sizes) -> None:
        """The step time of each of ``sizes`` not trained at yet, predicted from the trained
        size m nearest to it (in log scale; the smaller of two equally near): m's real step
        time times ``max(b / m, (FLOPS_OVERHEAD_ROWS + b) / (FLOPS_OVERHEAD_ROWS + m))`` --
        the slower of two shapes, so that a prediction never promises a throughput gain
        that was not measured: a larger size no faster per example than m, a smaller one
        saving only the cost model's share of m's step.  ``explore`` then tries a size that
        would win if it were faster than that, and its real steps replace the prediction
        (:meth:`observe_time`)."""
        obs, secs = self._observed, self.seconds
        if not obs:
            return
        for b in sizes:  # (plain loops: this runs at every decision, often with cold caches)
            if b in obs:
                continue
            for m in self._by_distance(b):
                if m in obs:
                    secs[b] = self._conservative(b, m)
                    break

    def _conservative(self, b: int, m: int) -> float:
        """The step time of b predicted from m's: ``max(b / m, (FLOPS_OVERHEAD_ROWS + b) /
        (FLOPS_OVERHEAD_ROWS + m))`` times it (see :meth:`_predict`)."""
        return self.seconds[m] * max(b / m, (FLOPS_OVERHEAD_ROWS + b) / (FLOPS_OVERHEAD_ROWS + m))

    def _probe_sizes(self, sizes) -> None:
        """Time one step of each of ``sizes`` not measured yet (and of the size trained at,
        once, for the offset between the probe's times and real ones): one warm-up step,
        then the best of three timed ones, interleaved across the sizes."""
        if self._probe is None:
            return
        todo = [b for b in sizes if b not in self._probed and b not in self.seconds]
        if not todo:
            return
        if self.B not in self._probed and self.B in self.seconds:
            todo.append(self.B)
        self._probed.update(self._time_sizes(todo))
        self._calibrate(self.B)

    def _time_sizes(self, todo: list) -> dict:
        """{b: seconds} of one probe step of each size in ``todo`` on the scratch copies:
        one warm-up round, then the best of three, the sizes interleaved."""
        pr = self._probe
        if pr is None:  # a given table or "flops": nothing to time
            return {}
        X, yi, yf = pr["data"]
        best = {b: math.inf for b in todo}
        n = pr["idx"].shape[0]
        for r in range(4):  # round 0 warms each size (its first step runs up to 2x slow: buffers, pages);
            # the best of rounds 1-3 counts (robust to a busy machine: a neighbour timed too slow would
            # never be tried, so never corrected by real steps)
            for b in todo if r % 2 == 0 else todo[::-1]:
                o = (r * b) % (n - b + 1)  # other rows each round: a step's rows are not cache-hot
                t0 = time.perf_counter()
                pr["impl"].run_steps(
                    pr["params"],
                    X,
                    yi,
                    yf,
                    pr["idx"][o : o + b],
                    b,
                    1,
                    pr["opt"],
                    [0.0],
                    1,
                    grad=pr["grad"],
                    dropout_rng=pr["dropout"],
                )
                if r >= 1:
                    best[b] = min(best[b], time.perf_counter() - t0)
        return best

    def _calibrate(self, B: int) -> None:
        """The sizes only probed, corrected by the offset between real and probed step times
        at B, a size trained at (additive: what a real step adds to the probe's -- the loop's
        per-step work, the noise tracking -- does not grow with the batch)."""
        if B in self._probed and self._observed.get(B):
            self._calib = self.seconds[B] - self._probed[B]
        for b, t in self._probed.items():
            if not self._observed.get(b):
                self.seconds[b] = max(t + self._calib, 0.5 * t)

    def observe_run(self, B: int, seconds: float, steps: int) -> None:
        """A run of ``steps`` real steps of B rows took ``seconds``: added up (a few additions
        and comparisons: this runs after every run of steps, at every step with a per-step
        callback) and folded into B's step time by :meth:`_fold` at the next decision, or
        when the batch size changes."""
        pend = self._pend
        if pend[0] != B:
            self._fold()
            pend[0] = B
        t = seconds / steps
        pend[1] += seconds
        pend[2] += steps
        if t < pend[3]:
            pend[3] = t
        if t > pend[4]:
            pend[4] = t
        self._run_t.append(t)
        self._run_k.append(steps)

    def _fold(self) -> None:
        """The real steps added up since the last fold: one sample of their size's step time
        -- their mean, or, when one run was more than twice as slow per step as another (a
        run slowed by another process, or a size's first, cold steps) and there are three
        runs or more, the step-weighted median of the runs' per-step times, so that one
        disturbed run moves nothing."""
        B, secs, n, lo, hi = self._pend
        ts, ks = self._run_t, self._run_k
        self._pend[:] = [0, 0.0, 0, math.inf, 0.0]
        self._run_t, self._run_k = [], []
        if n:
            self.observe_time(B, _weighted_median(ts, ks, n) if hi > 2.0 * lo and len(ts) >= 3 else secs / n)

    def observe_time(self, B: int, seconds_per_step: float) -> None:
        """Refine the measured step time of B from the real steps: the median of its last
        :data:`RECENT` samples, each the mean step time of B over one decision period (the
        first real sample replaces the probe's value; a median, so one period slowed by
        another process moves nothing).  Not with a given table or "flops"."""
        if self.spec.throughput not in (None, "probe") or not seconds_per_step > 0:
            return
        recent = self._recent.get(B)
        if recent is None:
            recent = self._recent[B] = []
        recent.append(float(seconds_per_step))
        if len(recent) > RECENT:
            del recent[0]
        self.seconds[B] = _median(recent)
        self._observed[B] = self._observed.get(B, 0) + 1
        if B in self._probed:
            self._calibrate(B)

    # -- noise ------------------------------------------------------------------------------------
    def observe_two_batch(self, step: int, B: int, b: int, small_sq_norm: float, batch_sq_norm: float) -> None:
        """Batch norm: |g_b|^2 of the first b rows and |g_B|^2 of the whole batch at the same
        parameters give tr(Sigma) ~ (|g_b|^2 - |g_B|^2) / (1/b - 1/B); fed to the tracker as
        the per-example sum that gives the same estimate."""
        tr = (small_sq_norm - batch_sq_norm) / (1.0 / b - 1.0 / B)
        self.tracker.update(step, B, tr * (B - 1) + B * batch_sq_norm, batch_sq_norm)

    # -- decisions -------------------------------------------------------------------------------
    def _goodputs(self, phi: float, sizes: list | None = None) -> dict:
        """{b: goodput} of ``sizes`` (default: every candidate): examples per second times the
        statistical efficiency (phi + B0) / (phi + b) (:func:`minigd.gradstats.goodput`,
        without its argument checks, in plain floats: this runs at every decision).  An
        unmeasured size has goodput 0."""
        B0, secs, inf = self.B0, self.seconds, math.isinf(phi)
        return {
            b: b / secs.get(b, math.inf) * (1.0 if inf else (phi + B0) / (phi + b))
            for b in (self.sizes if sizes is None else sizes)
        }

    def _factor(self, B: int, g2: float, tr: float) -> tuple:
        """(learning-rate factor, AdaScale gain) for batch size B at the smoothed noise
        (|G|^2 = g2, tr(Sigma) = tr)."""
        gain = 1.0
        if math.isfinite(tr) and math.isfinite(g2) and tr >= 0 and g2 > 0:
            # AdaScale's r = (sigma^2 + mu^2) / (sigma^2 / S + mu^2), sigma^2 = tr / B0, S = B / B0
            # (minigd.gradstats.adascale_gain, without its argument checks)
            gain = (tr / self.B0 + g2) / (tr / B + g2)
        elif math.isfinite(tr) and tr > 0:  # no signal left: the gain is the scale
            gain = B / self.B0
        rule = self.spec.lr_rule
        f = gain if rule == "adascale" else math.sqrt(B / self.B0) if rule == "sqrt" else B / self.B0
        return f, gain

    @property
    def track_interval(self) -> int:
        """Steps between noise measurements in the current period: ``track_every`` scaled
        by ``period / every``."""
        return max(1, self.spec.track_every * self.period // self.spec.every)

    @property
    def track_start(self) -> int:
        """The step the measurements of the current period count from: its first step
        (``next_step - period``); 0 with a fixed period (``max_every == every``: every
        multiple of ``track_every``, the schedule of the version before the period grew)."""
        spec = self.spec
        return 0 if spec.max_every == spec.every else self.next_step - self.period

    def decide(self, step: int) -> dict | None:
        """The decision after ``step`` steps: a record, with the new batch size (or the old);
        None when no noise is measured yet.  Sets the next decision's step: ``period`` steps
        on, the period doubled (up to ``max_every``) when this decision kept the size and
        was no trial's start or end, else back to ``every``."""
        trial = self.trial_from
        cur = self.B
        rec = self._decide(step)
        spec = self.spec
        if rec is None or self.B != cur or trial or self.trial_from:
            self.period = spec.every
        else:
            self.period = min(2 * self.period, spec.max_every)
        self.next_step = int(step) + self.period
        return rec

    def _decide(self, step: int) -> dict | None:
        """:meth:`decide` but for the schedule.

        Written to run little Python: it runs at every decision, often right after an
        evaluation has evicted the interpreter from the caches (~60 us then for the previous
        version, a tenth of 40 digits steps; bench/results/adaptive.md)."""
        if self._pend[2]:
            self._fold()
        g2, tr = self.tracker.smoothed()
        # the tracker's noise_scale: NaN before the first update or when both are <= 0
        phi = tr / g2 if g2 > 0 else math.inf if tr > 0 else math.nan
        if not phi >= 0:  # nothing measured, NaN, or a negative estimate
            return None
        cur = self.B
        near = self._reachable(cur)
        spec = self.spec
        if self._probe is not None:  # probed throughput: sizes now in reach for the first time
            self._probe_sizes(near)
        elif spec.throughput is None:  # real steps: the sizes in reach not trained at, predicted
            self._predict(near)
        # the goodputs of the sizes in reach only (one decision moves by at most max_step):
        # examples per second times the statistical efficiency (phi + B0) / (phi + b)
        # (minigd.gradstats.goodput, without its argument checks); the first of equal maxima
        gp = self._goodputs(phi, near)
        best, top = cur, -1.0
        for b in near:
            if gp[b] > top:
                best, top = b, gp[b]
        new = cur
        reason = "keep: the current batch size has the largest goodput"
        inc, self.trial_from = self.trial_from, 0
        if inc and inc != cur and inc in gp:
            # the decision after a trial: the size it left is the incumbent, so the tried size
            # stays only when it wins by min_gain (the hysteresis would otherwise favour the trial)
            new = best if best != inc and top > gp[inc] * (1.0 + spec.min_gain) else inc
            if new == cur:
                reason = f"keep: the trial of B={cur} won: goodput {gp[cur]:.4g} vs {gp[inc]:.4g} at B={inc}"
            else:
                reason = (
                    f"{'grow' if new > cur else 'shrink'}: the trial of B={cur} ends: goodput {gp[new]:.4g} at "
                    f"B={new} vs {gp[cur]:.4g} at B={cur}, {gp[inc]:.4g} at B={inc} (noise scale {phi:.4g})"
                )
        elif best != cur:
            if top > gp[cur] * (1.0 + spec.min_gain):
                new = best
                reason = (
                    f"{'grow' if new > cur else 'shrink'}: goodput {top:.4g} at B={new} vs "
                    f"{gp[cur]:.4g} at B={cur} (noise scale {phi:.4g})"
                )
            else:
                reason = f"keep: B={best} is better by less than min_gain={spec.min_gain:g}"
        if new == cur and spec.explore > 0 and spec.throughput in (None, "probe"):
            new, why = self._explore(near, gp, cur, phi)
            reason = why or reason
            if new != cur:
                self.trial_from = cur
        self.B = new
        self.factor, self.gain = self._factor(new, g2, tr)
        self.goodput, self.noise = float(gp[new]), float(phi)
        rec = {
            "step": int(step),
            "batch_size": int(new),
            "lr_factor": self.factor,
            "gain": self.gain,
            "goodput": self.goodput,
            "controller_noise_scale": self.noise,
            "reason": reason,
        }
        self.decisions.append(rec)
        return rec

    def _explore(self, near: list, gp: dict, cur: int, phi: float) -> tuple:
        """(size, reason) of a size in reach known from the probe only that would win with its
        probed step time ``1 + explore`` times shorter (the nearest such; once per size), else
        (cur, None)."""
        f, bar = 1.0 + self.spec.explore, gp[cur] * (1.0 + self.spec.min_gain)
        order = self._explore_order.get(cur)
        if order is None:  # (this key, not _by_distance's: a geometric tie of sizes that are not
            # powers of two rounds the other way under it)
            order = self._explore_order[cur] = sorted(self.sizes, key=lambda b: (abs(math.log(b / cur)), b))
        for b in order:
            if b in gp and b != cur and b not in self._observed and b not in self.explored and gp[b] * f > bar:
                self.explored.append(b)
                how = "timed by the probe" if self._probe is not None else "predicted"
                return b, (
                    f"explore: B={b} is not trained at yet (its step time is {how}); its goodput {gp[b]:.4g} vs "
                    f"{gp[cur]:.4g} at B={cur} is within that time's error (explore={self.spec.explore:g}; "
                    f"noise scale {phi:.4g})"
                )
        obs = self._observed
        if self._probe is not None or cur not in obs:
            return cur, None
        for b in order:  # a size whose one real sample is slower than even the conservative
            # prediction from B=cur: a period disturbed by another process, or its first, cold
            # steps -- one sample would otherwise keep it out for good.  Tried once more (once per
            # size), the suspect sample dropped, when it would win at the predicted time.
            if b in gp and b != cur and obs.get(b) == 1 and b not in self.retried:
                pred = self._conservative(b, cur)
                if self.seconds[b] > pred and gp[b] * self.seconds[b] / pred * f > bar:
                    self.retried.append(b)
                    was = self.seconds[b]
                    del obs[b], self._recent[b]
                    self.seconds[b] = pred
                    return b, (
                        f"retry: B={b}'s only step-time sample ({was:.3g} s) is slower than the conservative "
                        f"prediction from B={cur} ({pred:.3g} s); tried once more, that sample dropped "
                        f"(noise scale {phi:.4g})"
                    )
        return cur, None

    # -- checkpointing ---------------------------------------------------------------------------------
    def state(self) -> dict:
        """JSON state (the noise tracker is the history's, checkpointed with it)."""
        return {
            "B": self.B,
            "factor": self.factor,
            "gain": self.gain,
            "goodput": self.goodput,
            "noise": self.noise,
            "epoch_B": self.epoch_B,
            "seconds": [[b, self.seconds[b]] for b in self.sizes if b in self.seconds],  # (measured so far)
            "observed": [[b, self._observed[b]] for b in self.sizes if self._observed.get(b)],
            "recent": [[b, list(self._recent[b])] for b in self.sizes if self._recent.get(b)],
            "probed": [[b, self._probed[b]] for b in self.sizes if b in self._probed],
            "calib": self._calib,
            "pending": list(self._pend[:3]),
            "pending_runs": [[t, k] for t, k in zip(self._run_t, self._run_k)],
            "explored": list(self.explored),
            "retried": list(self.retried),
            "trial_from": self.trial_from,
            "period": self.period,
            "next_step": self.next_step,
            "decisions": self.decisions,
        }

    def _decision_ok(self, d: Any) -> bool:
        """A decision record as :meth:`decide` writes them (what ``History.column`` reads)."""
        num = ("lr_factor", "gain", "goodput", "controller_noise_scale")
        return (
            isinstance(d, dict)
            and isinstance(d.get("step"), int)
            and not isinstance(d.get("step"), bool)
            and 0 <= d["step"] < 1 << 53
            and d.get("batch_size") in self.sizes
            and all(d.get(k) is None or isinstance(d.get(k), float) or _finite(d.get(k)) for k in num)
            and isinstance(d.get("reason"), str)
        )

    def restore(self, st: Any, tracker: Any, where: str, step: int | None = 0) -> None:
        """The controller of a checkpoint's ``step_info['adaptive']`` written after ``step``
        steps (checked: a crafted file must not set a batch size outside the candidates, a
        non-finite factor or a decision in the past; ``step`` None: the checkpoint's step
        count is malformed, which the caller reports, so the next decision is only checked
        to be a step count)."""
        from minigd.errors import CheckpointError

        def need(cond, what):
            if not cond:
                raise CheckpointError(f"{where}: cannot resume from it: its adaptive batch-size state {what}")

        need(isinstance(st, dict), "is not a JSON object")
        need(
            st.get("B") in self.sizes and st.get("epoch_B") in self.sizes,
            f"has a batch size outside the candidates {self.sizes}",
        )
        for k in ("factor", "gain"):
            v = st.get(k)
            need(_positive(v), f"has {k}={v!r}")
        secs, obs, probed = st.get("seconds"), st.get("observed", []), st.get("probed", [])

        def table(v, ok):
            return isinstance(v, list) and all(
                isinstance(e, list) and len(e) == 2 and e[0] in self.sizes and ok(e[1]) for e in v
            )

        recent = st.get("recent")
        if recent is None and table(secs, _positive) and table(obs, lambda x: True):
            # a checkpoint of a version without "recent": an observed size's value is its history
            recent = [[b, [t]] for b, t in secs if b in {e[0] for e in obs}]
        need(
            table(secs, _positive)
            and table(probed, _positive)
            and _finite(st.get("calib", 0.0))
            and table(obs, lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0)
            and table(recent, lambda x: isinstance(x, list) and 0 < len(x) <= RECENT and all(map(_positive, x))),
            "has a malformed throughput table",
        )
        pend = st.get("pending", [0, 0.0, 0])
        runs = st.get("pending_runs", [])
        need(
            isinstance(pend, list)
            and len(pend) == 3
            and isinstance(pend[0], int)
            and not isinstance(pend[0], bool)
            and (pend[0] in self.sizes or pend[0] == 0)
            and _finite(pend[1])
            and pend[1] >= 0
            and isinstance(pend[2], int)
            and not isinstance(pend[2], bool)
            and 0 <= pend[2] < 1 << 53
            and (pend[0] == 0) == (pend[2] == 0)
            and (pend[2] > 0 or pend[1] == 0)
            and isinstance(runs, list)
            and all(
                isinstance(r, list)
                and len(r) == 2
                and _positive(r[0])
                and isinstance(r[1], int)
                and not isinstance(r[1], bool)
                and 0 < r[1] < 1 << 53
                for r in runs
            )
            and (pend[2] > 0 or not runs),
            f"has a malformed pending step time {pend!r} (runs {str(runs)[:80]})",
        )
        explored, retried = st.get("explored", []), st.get("retried", [])
        need(
            isinstance(explored, list)
            and all(b in self.sizes for b in explored)
            and isinstance(retried, list)
            and all(b in self.sizes for b in retried),
            "has explored sizes (or retried ones) outside the candidates",
        )
        trial = st.get("trial_from", 0)  # (a checkpoint of a version without trials: none)
        need(
            isinstance(trial, int) and not isinstance(trial, bool) and (trial == 0 or trial in self.sizes),
            f"has a trial's size {trial!r} outside the candidates",
        )
        need(
            isinstance(st.get("decisions"), list) and all(self._decision_ok(d) for d in st["decisions"]),
            "has malformed decision records",
        )
        ev, mx = self.spec.every, self.spec.max_every
        at = 0 if step is None else step
        if "period" in st or "next_step" in st:
            period, nxt = st.get("period"), st.get("next_step")
        else:  # a checkpoint of a version with a fixed period: its next multiple of every
            period, nxt = ev, (at // ev + 1) * ev
        need(
            isinstance(period, int)
            and not isinstance(period, bool)
            and ev <= period <= mx
            and isinstance(nxt, int)
            and not isinstance(nxt, bool)
            and (at < nxt <= at + period if step is not None else 0 < nxt < 1 << 53),
            f"has a decision period {period!r} / next decision at step {nxt!r} outside every={ev} ... "
            f"max_every={mx} after step {step}",
        )
        need(
            tracker is not None and tracker.n == self.tracker.n and tracker.replacement == self.tracker.replacement,
            "has no noise records for this data",
        )
        for k in ("goodput", "noise"):
            v = st.get(k)  # (NaN or inf are legitimate here; an int too large for a float is not)
            need(_finite(v) or (isinstance(v, float) and not math.isfinite(v)), f"has {k}={v!r}")
        self.tracker = tracker
        self.B, self.epoch_B = int(st["B"]), int(st["epoch_B"])
        self.factor, self.gain = float(st["factor"]), float(st["gain"])
        self.goodput, self.noise = float(st["goodput"]), float(st["noise"])
        self.seconds = {int(b): float(s) for b, s in secs}
        self._observed = {int(b): int(k) for b, k in obs if k}  # (a size is observed once counted)
        self._recent = {int(b): [float(x) for x in v] for b, v in recent}
        self._probed = {int(b): float(t) for b, t in probed}
        self._calib = float(st.get("calib", 0.0))
        self._run_t = [float(t) for t, _ in runs]
        self._run_k = [int(k) for _, k in runs]
        ts = self._run_t
        self._pend = [int(pend[0]), float(pend[1]), int(pend[2]), min(ts, default=math.inf), max(ts, default=0.0)]
        self.decisions = [dict(d) for d in st["decisions"]]
        self.explored = [int(b) for b in explored]
        self.retried = [int(b) for b in retried]
        self.trial_from = int(trial)
        self.period, self.next_step = int(period), int(nxt)
