"""The training loop of :func:`minigd.fit`: one stepping path for every backend.

``fit`` makes a :class:`Plan` (the checked arguments), a :class:`LoopState` (fresh, or
restored from a checkpoint) and runs :func:`run_loop`.  The loop hands the backend runs
of steps (``Backend.run_steps``), as long as nothing needs the host in between: each run
ends at the next evaluation, checkpoint, budget, tracked step, epoch end or per-step
callback, and at the backend's ``steps_per_call``.  A host backend runs them in its
default Python loop, a device backend on the device with one read-back per run.  After
each run the loop records every step (history, epoch sums), then does what is due at that
point: per-step callbacks, evaluation, the stopping rules, a checkpoint.

:class:`LoopState` is everything a resume needs -- counters, the position in the epoch,
the sampler, the generator, the optimizer state, the history cursor -- and is what a
checkpoint saves and restores whole (:mod:`minigd.resume`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from minigd._validation import _got
from minigd.data.samplers import Sampler, steps_per_epoch
from minigd.errors import DivergenceError
from minigd.history import History
from minigd.model import _ForwardOverflow
from minigd.optim.base import OptState

#: target metrics and whether larger is better
TARGET_METRICS = {"val_loss": False, "val_accuracy": True, "train_loss": False, "train_accuracy": True}
_INF = math.inf


@dataclass
class Plan:
    """The checked arguments of one ``fit`` call (what does not change while it runs)."""

    model: Any
    X: np.ndarray
    y: Any  # as given (evaluations take it)
    yi: np.ndarray
    yf: np.ndarray
    bs: Any  # BatchSizeSchedule
    sampler: str
    drop_last: bool
    epochs: int | None
    steps: int | None
    examples: int | None
    max_time: float | None
    target: dict | None
    validation: tuple | None
    eval_every: int | None
    eval_train: bool
    lr_fn: Callable | None  # a schedule (None: the constant lr_const)
    lr_const: float
    tracker: Any  # NoiseTracker or None
    track_noise: int | None
    track_gsnr: int | None
    callbacks: list
    ck_path: str | None
    ck_every: int
    fit_info: dict | None  # the run's record a checkpoint compares on resume
    progress: bool
    ctrl: Any = None  # adaptive batch size: a minigd.adaptive.Controller

    @property
    def n(self) -> int:
        return self.X.shape[0]


@dataclass
class LoopState:
    """Where a run stands after its last step: what a checkpoint saves and restores.

    ``step`` steps done, ``examples`` rows seen, ``train_time`` seconds of steps; the
    current ``epoch``, the index ``k`` of its last step (-1 before its first), the sum of
    the per-row losses ``ep_loss`` and rows ``ep_count`` of the epoch so far (the
    sampler's position in it); ``lr`` of the last step; ``t1`` the optimizer's update
    count of step 0 (step s is update ``s + t1``); the history cursor (evaluations and
    epoch records up to the last epoch close, and the target status then: what a resume
    keeps of the history); ``stop`` the stop reason once decided.
    """

    sampler: Sampler
    rng: np.random.Generator
    opt_state: OptState
    step: int = 0
    examples: int = 0
    train_time: float = 0.0
    epoch: int = 0
    k: int = -1
    ep_loss: float = 0.0
    ep_count: int = 0
    lr: float = 0.0
    t1: int = 1
    stop: str = ""
    resumed: bool = False
    mid_epoch: bool = False  # continuing an epoch (a resume) rather than opening one
    close: tuple = field(default=(0, (None, None, None, None)))

    def step_info(
        self, fit_info: dict, *, finished: bool, n_evals: int, n_epochs: int, reached: tuple, epoch: int
    ) -> dict:
        """The checkpoint's ``step_info`` (format of minigd's checkpoints)."""
        return {
            "step": self.step,
            "examples": self.examples,
            "train_time": self.train_time,
            "epoch": epoch,
            "k": self.k,
            "ep_loss": self.ep_loss,
            "ep_count": self.ep_count,
            "lr": self.lr,
            "n_evals": n_evals,
            "n_epochs": n_epochs,
            "reached": list(reached),
            "finished": finished,
            "stop_reason": self.stop if finished else "",
            "t1": self.t1,
            "fit": fit_info,
        }


def _reached(hist: History) -> tuple:
    return hist.reached, hist.steps_to_target, hist.examples_to_target, hist.time_to_target


def lr_at(lr_fn, step: int) -> float:
    """The learning rate of ``step`` from the schedule ``lr_fn``, checked at every step (a
    schedule may go wrong late: negative -- gradient ascent --, non-finite, or not a number
    at all): a ``float`` >= 0; else an error naming ``lr``."""
    try:
        v = lr_fn(step)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"lr: the learning-rate schedule raised at step {step}: {exc}") from exc
    if type(v) is not float:
        if isinstance(v, bool) or not (
            isinstance(v, numbers.Real) or (isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype.kind in "iuf")
        ):
            raise TypeError(
                f"lr: expected the learning rate (schedule) to give a real number, got {_got(v)} at step {step}"
            )
        v = float(v)
    if not 0.0 <= v < _INF:
        raise ValueError(
            f"lr: expected a finite, non-negative learning rate, got {v!r} at step {step}"
            f"{' (a negative rate is gradient ascent)' if v < 0 else ''}"
        )
    return v


def met(target: dict, ev: dict) -> bool:
    """Whether evaluation record ``ev`` meets every metric of ``target``."""
    for k, v in target.items():
        if k not in ev:
            return False
        if TARGET_METRICS[k] and not ev[k] >= v:
            return False
        if not TARGET_METRICS[k] and not ev[k] <= v:
            return False
    return True


def diverged(step, loss, params, hist, first: bool = False) -> DivergenceError:
    """The error for a rejected step (its update was not applied), with a copy of the last
    finite parameters; marks the history as stopped by divergence.  ``first``: the step is
    the first of a fresh run, so a non-finite loss comes from the data (or the starting
    parameters), not from the learning rate (``DivergenceError.cause``)."""
    hist.stop_reason = "diverged"
    data = first and not math.isfinite(loss)
    return DivergenceError(
        step,
        loss,
        params.copy(),
        hist,
        "non-finite loss of the first batch, before any update"
        if data
        else "non-finite loss"
        if not math.isfinite(loss)
        else "the update would make parameters non-finite",
        cause="data" if data else "learning_rate",
    )


class _ProgressBar:
    """``fit(progress=True)``: a tqdm bar over steps (a callback; nothing runs when off)."""

    def __init__(self, total, initial):
        try:
            from tqdm.auto import tqdm
        except ImportError as exc:
            raise ImportError("progress: progress=True needs tqdm, which is not installed: pip install tqdm") from exc
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)
        self.every = max(1, (total or 1000) // 200)

    def on_step(self, model, step, loss):
        self.bar.update(1)
        if step % self.every == 0:
            self.bar.set_postfix_str(f"loss={loss:.4g}", refresh=False)

    def on_eval(self, model, rec):
        shown = {k: v for k, v in rec.items() if k.startswith(("val_", "train_"))}
        if shown:
            self.bar.set_postfix_str(" ".join(f"{k}={v:.4g}" for k, v in shown.items()), refresh=False)

    def close(self):
        self.bar.close()


def _progress_total(p: Plan) -> int | None:
    totals = []
    if p.steps is not None:
        totals.append(p.steps)
    if p.epochs is not None and p.epochs <= 100_000:
        totals.append(sum(steps_per_epoch(p.n, p.bs.at_epoch(e), p.drop_last) for e in range(p.epochs)))
    if p.examples is not None and not p.bs.milestones:
        totals.append(-(-p.examples // p.bs.initial))
    return min(totals) if totals else None


class Loop:
    """One run of the training loop over a :class:`Plan` from a :class:`LoopState`."""

    def __init__(self, plan: Plan, state: LoopState, hist: History) -> None:
        self.p, self.s, self.hist = plan, state, hist
        self.impl = plan.model.backend_impl
        self.on_step = [c.on_step for c in plan.callbacks if hasattr(c, "on_step")]
        self.on_eval = [c.on_eval for c in plan.callbacks if hasattr(c, "on_eval")]
        self.bar = _ProgressBar(_progress_total(plan), state.step) if plan.progress else None
        if self.bar is not None:
            self.on_eval.append(self.bar.on_eval)
        norm = plan.model.norm
        self.bn, self.dropout = bool(norm.bn), norm.dropout > 0
        self.fresh_start = -1 if state.resumed else 0
        self.scratch = np.zeros_like(plan.model.params) if plan.ctrl is not None and self.bn else None
        #: noise tracking inside the backend's runs (host backends; not with batch norm's
        #: two-batch estimate or GSNR, which need a pass before the tracked step)
        self.in_run = (
            plan.tracker is not None and self.impl.tracks_within_run and not self.bn and plan.track_gsnr is None
        )
        if state.resumed:  # a budget already spent: close the epoch, evaluate, stop
            state.stop = self.budget_stop()

    # -- evaluation and stopping ------------------------------------------------------------
    def evaluate(self, ep: float) -> bool:
        """Evaluate, record, check the target; True when an ``on_eval`` callback stops."""
        p, s, hist, model = self.p, self.s, self.hist, self.p.model
        rec = {"step": s.step, "epoch": ep, "examples": s.examples, "time": s.train_time}
        try:
            if p.validation is not None:
                rec.update({f"val_{k}": v for k, v in model.evaluate(*p.validation).items()})
            if p.eval_train:
                rec.update({f"train_{k}": v for k, v in model.evaluate(p.X, p.y).items()})
        except _ForwardOverflow as exc:  # X was checked: the parameters grew too large
            hist.stop_reason = "diverged"
            raise DivergenceError(
                s.step,
                math.nan,
                model.params.copy(),
                hist,
                f"the parameters are finite but an evaluation overflowed ({exc})",
            ) from exc
        hist.evals.append(rec)
        if p.target is not None and hist.reached is not True and met(p.target, rec):
            hist.reached = True
            hist.steps_to_target, hist.examples_to_target, hist.time_to_target = s.step, s.examples, s.train_time
        return any(bool(f(model, rec)) for f in self.on_eval)

    def budget_stop(self) -> str:
        p, s = self.p, self.s
        if self.hist.reached:
            return "target"
        if p.steps is not None and s.step >= p.steps:
            return "steps"
        if p.examples is not None and s.examples >= p.examples:
            return "examples"
        if p.max_time is not None and s.train_time >= p.max_time:
            return "max_time"
        return ""

    def checkpoint(self, *, finished: bool) -> None:
        from minigd.checkpoint import save_checkpoint

        p, s, hist = self.p, self.s, self.hist
        if finished:  # right after the last step's hooks, with the full history: resuming it
            # redoes the epoch close-out and the final evaluation, or trains on under a larger budget
            info = s.step_info(
                p.fit_info,
                finished=True,
                n_evals=s.close[0],
                n_epochs=len(hist.epochs) - 1,
                reached=s.close[1],
                epoch=s.epoch - 1,
            )
        else:
            info = s.step_info(
                p.fit_info,
                finished=False,
                n_evals=len(hist.evals),
                n_epochs=len(hist.epochs),
                reached=_reached(hist),
                epoch=s.epoch,
            )
        if p.ctrl is not None:
            info["adaptive"] = p.ctrl.state()
        smp = {"order": s.sampler.order}
        if s.sampler.draws is not None:
            smp["draws"] = s.sampler.draws
        save_checkpoint(p.ck_path, p.model, s.opt_state, rng=s.rng, sampler=smp, history=hist, step_info=info)

    # -- one run of steps -------------------------------------------------------------------
    def _chunk(self, B: int, b: int, cross: bool) -> int:
        """How many steps of B rows to hand the backend at once (see the module doc)."""
        p, s, impl = self.p, self.s, self.impl
        if b != B or self.on_step:
            return 1
        if cross:  # full-batch epochs, one step each, none evaluated at its end
            m = impl.steps_per_call if p.epochs is None else min(impl.steps_per_call, p.epochs - s.epoch)
            m = next((j for j in range(1, m) if p.bs.at_epoch(s.epoch + j) != B), m)
        else:
            m = min(s.sampler.full_batches_left(B), impl.steps_per_call)
        if self.dropout:
            m = min(m, impl.max_run_steps(B))
        if p.ctrl is not None:  # up to the next decision
            m = min(m, p.ctrl.next_step - s.step)
        if p.tracker is not None and not self.in_run:  # a tracked step runs alone
            k, start = self._tracking()
            r = (s.step - start) % k
            m = 1 if r == 0 else min(m, k - r)
        if p.steps is not None:
            m = min(m, p.steps - s.step)
        if p.examples is not None:
            m = min(m, -(-(p.examples - s.examples) // B))
        if p.eval_every is not None:
            m = min(m, p.eval_every - s.step % p.eval_every)
        if p.ck_every:
            m = min(m, p.ck_every - s.step % p.ck_every)
        return max(m, 1)

    def _tracking(self) -> tuple:
        """(k, start): the noise is tracked at the steps start + i k (``track_noise`` from 0;
        adaptive: the controller's interval and start, :attr:`Controller.track_interval`)."""
        ctrl = self.p.ctrl
        if ctrl is None:
            return self.p.track_noise or 1, 0
        return ctrl.track_interval, ctrl.track_start

    def _lrs(self, m: int) -> list:
        """The learning rates of the next m steps; a schedule that raises at step s + j cuts
        the run to the j steps before it (the step that raises then raises on its own)."""
        p, s = self.p, self.s
        f = 1.0 if p.ctrl is None else p.ctrl.factor  # adaptive: the rule's multiple
        if p.lr_fn is None:
            return [p.lr_const * f] * m
        lrs = []
        for j in range(m):
            try:
                lrs.append(lr_at(p.lr_fn, s.step + j) * f)
            except Exception:
                if j == 0:
                    raise
                break
        return lrs

    def run_steps(self, B: int, full_epochs: bool) -> None:
        """One backend call of up to ``_chunk`` steps, then record them."""
        p, s, hist, impl, model = self.p, self.s, self.hist, self.impl, self.p.model
        b = s.sampler.next_size(B)
        cross = full_epochs and s.k == -1
        lrs = self._lrs(self._chunk(B, b, cross))
        m = len(lrs)
        k, start = self._tracking()
        first = (start - s.step) % k  # the run's first tracked step
        in_run = None  # host backends: tracked steps inside the run, (first, every)
        if self.in_run and first < m:
            in_run = (first, k)
        track = p.tracker is not None and not self.in_run and first == 0
        idx = s.sampler.take(b) if cross else s.sampler.take(m * b)
        if track and p.track_gsnr is not None and s.step % p.track_gsnr == 0 and b >= 2:
            from minigd.gradstats.tracking import gsnr_summary

            p.tracker.add_extra(s.step, gsnr_summary(model, p.X, p.yi, p.yf, idx))
        half = self._half_batch(b) if track and self.bn else 0
        if half:  # batch norm (adaptive): the two-batch estimator's small batch, same parameters
            small = self._grad_norm_sq(idx[:half], half)
            big = None if impl.reports_grad_norm_sq else self._grad_norm_sq(idx[:b], b)
        res = impl.run_steps(
            model.params,
            p.X,
            p.yi,
            p.yf,
            idx,
            b,
            m,
            s.opt_state,
            lrs,
            s.step + s.t1,
            want_sqn=track and not self.bn,
            grad=model._grad,
            dropout_rng=s.rng if self.dropout else None,
            update_running=self.bn,
            max_time=None if p.max_time is None else p.max_time - s.train_time,
            track=in_run,
        )
        t_start = s.train_time
        if not (cross or track or self.bar is not None or self.on_step) and res["loss"].size and res["applied"].all():
            self._record_run(res, lrs, b, t_start, in_run is not None)
            s.opt_state.t = s.step - 1 + s.t1
            if p.ctrl is not None and b == B and res["time"].size:  # the real step time of B
                p.ctrl.observe_run(B, float(res["time"][-1]), res["time"].size)
            return
        sqn = res["sqn_sum"].tolist() if in_run is not None else None
        for j, (loss, ok, t) in enumerate(zip(res["loss"].tolist(), res["applied"].tolist(), res["time"].tolist())):
            if cross and j:  # step j opens the next full-batch epoch: close the last one
                self.close_epoch(b, complete=True)
                s.k, s.ep_loss, s.ep_count = -1, 0.0, 0
            s.train_time = t_start + t
            if not ok:
                s.opt_state.t = s.step - 1 + s.t1
                raise diverged(s.step, loss, model.params, hist, s.step == self.fresh_start)
            if sqn is not None and sqn[j] == sqn[j]:  # tracked inside the run (NaN: untracked)
                p.tracker.update(s.step, b, sqn[j], float(res["grad_norm_sq"][j]))
            elif track:  # (a tracked step runs alone) before its hooks see it
                if not self.bn:
                    p.tracker.update(s.step, b, impl.last_sqnorm_sum(b), float(res["grad_norm_sq"][0]))
                elif half:
                    p.ctrl.observe_two_batch(
                        s.step, b, half, small, float(res["grad_norm_sq"][0]) if big is None else big
                    )
            s.lr = lrs[j]
            s.examples += b
            hist.record_step(s.step, s.epoch, loss, s.lr, b, s.examples, s.train_time)
            s.ep_loss += loss * b
            s.ep_count += b
            s.k += 1
            s.step += 1
            if self.bar is not None:
                self.bar.on_step(model, s.step, loss)
            if self.on_step and any(bool(f(model, s.step, loss)) for f in self.on_step):
                s.stop = "callback"
        s.opt_state.t = s.step - 1 + s.t1
        if p.ctrl is not None and b == B and res["time"].size:  # the real step time of B
            p.ctrl.observe_run(B, float(res["time"][-1]), res["time"].size)

    def _record_run(self, res: dict, lrs: list, b: int, t_start: float, tracked: bool) -> None:
        """Record a run of applied steps of b rows inside one epoch, with nothing to call
        between them (no progress bar, no per-step callback): what the per-step loop of
        :meth:`run_steps` does, in the same order and arithmetic (the epoch's loss sum is
        still added step by step), with the history written a column slice at a time."""
        p, s, hist = self.p, self.s, self.hist
        m = res["loss"].size
        if tracked:  # the noise measurements inside the run (NaN: an untracked step)
            sqn = res["sqn_sum"]
            for j in np.flatnonzero(sqn == sqn).tolist():
                p.tracker.update(s.step + j, b, float(sqn[j]), float(res["grad_norm_sq"][j]))
        times = res["time"] + t_start
        hist.record_steps(s.step, s.epoch, res["loss"], lrs[:m], b, s.examples, times)
        ep = s.ep_loss
        for loss in res["loss"].tolist():
            ep += loss * b
        s.ep_loss = ep
        s.ep_count += m * b
        s.examples += m * b
        s.train_time = float(times[-1])
        s.lr = lrs[m - 1]
        s.k += m
        s.step += m

    def _grad_norm_sq(self, idx, b: int) -> float:
        """|g|^2 of the mean loss of rows idx[:b] at the current parameters (training mode,
        the current dropout masks), in float64; the parameters are not touched."""
        p, impl = self.p, self.impl
        impl.loss_grad(p.model.params, self.scratch, p.X, p.yi, p.yf, idx, b)
        g = self.scratch.astype(np.float64, copy=False)
        return float(np.dot(g, g))

    def _half_batch(self, b: int) -> int:
        """Rows of the two-batch estimator's small batch for a step of b rows (0: none fits)."""
        h = b // 2
        return h if h >= 2 and not self.p.model.norm.has_one_row_ghost(h) else 0

    def batches_left(self, B: int) -> int:
        """Steps of B rows left in the epoch (adaptive with batch norm: a remainder that
        would hold a one-row ghost batch is dropped, as ``drop_last`` would)."""
        left = self.s.sampler.batches_left(B)
        if (
            left
            and self.bn
            and self.p.ctrl is not None
            and self.p.model.norm.has_one_row_ghost(self.s.sampler.next_size(B))
        ):
            return 0
        return left

    def decide(self) -> int:
        """An adaptive run's decision after this step: the batch size from now on."""
        ctrl, s = self.p.ctrl, self.s
        rec = ctrl.decide(s.step)
        if rec is not None:
            self.hist.adaptive = ctrl.decisions
        return ctrl.B

    def close_epoch(self, B: int, complete: bool) -> None:
        s = self.s
        self.hist.epochs.append(
            {
                "epoch": s.epoch,
                "loss": s.ep_loss / max(s.ep_count, 1),
                "batch_size": B,
                "steps": s.step,
                "examples": s.examples,
                "time": s.train_time,
                "lr": s.lr,
                "complete": complete,
            }
        )
        s.epoch += 1

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        p, s, hist = self.p, self.s, self.hist
        for c in p.callbacks:
            if hasattr(c, "on_fit_start"):
                c.on_fit_start(p.model, hist)
        ctrl = p.ctrl
        while True:
            B = p.bs.at_epoch(s.epoch) if ctrl is None else ctrl.B
            n_steps = steps_per_epoch(p.n, B, p.drop_last)
            if not s.mid_epoch:
                if s.stop:
                    break
                s.sampler.start_epoch(B)
                s.k, s.ep_loss, s.ep_count = -1, 0.0, 0
                if ctrl is not None:
                    ctrl.epoch_B = B
            s.mid_epoch = False
            full = (
                n_steps == 1
                and s.sampler.next_size(B) == p.n
                and p.eval_every is not None
                and p.sampler != "replacement"
                and self.impl.steps_per_call > 1
                and ctrl is None
            )
            while not s.stop and self.batches_left(B):
                self.run_steps(B, full)
                if ctrl is not None and s.step >= ctrl.next_step:
                    B = self.decide()
                if p.eval_every is not None and s.step % p.eval_every == 0:
                    ep = s.epoch + ((s.k + 1) / n_steps if ctrl is None else s.sampler.pos / s.sampler.src.shape[0])
                    if self.evaluate(ep):
                        s.stop = "callback"
                s.stop = self.budget_stop() or s.stop
                if not s.stop and p.ck_every and s.step % p.ck_every == 0:
                    self.checkpoint(finished=False)
            if p.ck_path is not None:
                s.close = (len(hist.evals), _reached(hist))
            self.close_epoch(
                B, complete=not s.stop or (s.k == n_steps - 1 if ctrl is None else not self.batches_left(B))
            )
            if not s.stop and p.epochs is not None and s.epoch >= p.epochs:
                s.stop = "epochs"
            if p.eval_every is None and not s.stop:
                if self.evaluate(s.epoch):
                    s.stop = "callback"
                if hist.reached:
                    s.stop = "target"
        if not hist.evals or hist.evals[-1]["step"] != s.step:
            self.evaluate(hist.epochs[-1]["epoch"] + 1 if hist.epochs else 0)
        hist.stop_reason = s.stop
        if p.ck_path is not None:
            self.checkpoint(finished=True)

    def finish(self) -> None:
        """Close the progress bar and call ``on_fit_end`` (also after an error)."""
        if self.bar is not None:
            self.bar.close()
        for c in self.p.callbacks:
            if hasattr(c, "on_fit_end"):
                c.on_fit_end(self.p.model, self.hist)
