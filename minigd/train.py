"""``fit``: one training entry for the whole batch-size spectrum.

``batch_size=1`` is stochastic gradient descent, ``1 < B < N`` mini-batch, ``B = N`` (or
``"full"``) full-batch gradient descent.  The outer loop (sampling, schedules, stopping,
history) is Python; each step is one backend call that writes into preallocated buffers.
"""
from __future__ import annotations

import math
import numbers
import time

import numpy as np

from minigd._validation import _got, check_choice, check_int, check_seed
from minigd.errors import DivergenceError
from minigd.gradstats.tracking import NoiseTracker, gsnr_summary
from minigd.history import History
from minigd.model import EVAL_CHUNK
from minigd.optim.aliases import SGD
from minigd.optim.base import Optimizer
from minigd.optim.schedules import BatchSizeSchedule

SAMPLERS = ("shuffle", "replacement", "sequential")
#: target metrics and whether larger is better
TARGET_METRICS = {"val_loss": False, "val_accuracy": True, "train_loss": False, "train_accuracy": True}


def _check_batch_size(batch_size, n):
    if isinstance(batch_size, BatchSizeSchedule):
        for B in [batch_size.initial] + [b for _, b in batch_size.milestones]:
            if B > n:
                raise ValueError(f"batch_size: expected batch sizes <= the number of examples ({n}), "
                                 f"got {B} in {batch_size!r}")
        return batch_size
    if isinstance(batch_size, str):
        if batch_size != "full":
            raise ValueError(f"batch_size: expected a positive int, 'full' or a BatchSizeSchedule, "
                             f"got {batch_size!r}")
        return BatchSizeSchedule(n)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"batch_size: expected a positive int, 'full' or a BatchSizeSchedule, "
                        f"got {_got(batch_size)}")
    B = int(batch_size)
    if B <= 0:
        raise ValueError(f"batch_size: expected a positive int, got {B}")
    if B > n:
        raise ValueError(f"batch_size: expected at most the number of examples ({n}), got {B}; "
                         f"use batch_size='full' for full-batch gradient descent")
    return BatchSizeSchedule(B)


def _check_target(target):
    if target is None:
        return None
    if not isinstance(target, dict) or not target:
        raise TypeError(f"target: expected a dict like {{'val_accuracy': 0.95}}, got {_got(target)}")
    for k, v in target.items():
        check_choice("target metric", k, TARGET_METRICS)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"target[{k!r}]: expected a finite number, got {v!r}")
    return {k: float(v) for k, v in target.items()}


def _met(target, ev):
    for k, v in target.items():
        if k not in ev:
            return False
        if TARGET_METRICS[k] and not ev[k] >= v:
            return False
        if not TARGET_METRICS[k] and not ev[k] <= v:
            return False
    return True


def _make_tracker(track_noise, noise_beta, track_gsnr, bs, n, sampler):
    """Validate the tracking options; a NoiseTracker, or None when tracking is off."""
    if track_noise is None:
        if track_gsnr is not None:
            raise ValueError(f"track_gsnr: needs track_noise (the GSNR summary is added to the "
                             f"tracked records), got track_gsnr={track_gsnr!r} and track_noise=None")
        return None
    k = check_int("track_noise", track_noise, low=1)
    if isinstance(noise_beta, bool) or not isinstance(noise_beta, numbers.Real) \
            or not 0.0 <= float(noise_beta) < 1.0:
        raise ValueError(f"noise_beta: expected a number in [0, 1), got {_got(noise_beta)}")
    if track_gsnr is not None:
        g = check_int("track_gsnr", track_gsnr, low=1)
        if g % k:
            raise ValueError(f"track_gsnr: expected a multiple of track_noise={k} (GSNR is "
                             f"recorded on tracked steps), got {g}")
    if bs.max_batch < 2:
        raise ValueError(f"track_noise: needs batches of at least 2 examples (the per-example "
                         f"estimators use the spread within a batch), got batch_size={bs.max_batch}")
    return NoiseTracker(n, replacement=(sampler == "replacement"), beta=float(noise_beta))


def steps_per_epoch(n: int, B: int, drop_last: bool) -> int:
    """Number of steps in one epoch of n examples at batch size B."""
    return n // B if drop_last else -(-n // B)


def fit(model, X, y, *, batch_size=32, epochs=None, steps=None, examples=None, target=None,
        optimizer: Optimizer | None = None, sampler: str = "shuffle", drop_last: bool = False,
        validation=None, eval_every=None, eval_train: bool = False, seed=0,
        max_time: float | None = None, callbacks=(), track_noise: int | None = None,
        noise_beta: float = 0.99, track_gsnr: int | None = None) -> History:
    """Train ``model`` in place on (X, y) with mini-batch gradient descent.

    Parameters
    ----------
    model : minigd.MLP
    X : ndarray (n, n_in) of the model's dtype
    y : ndarray
        Integer labels (n,) for cross_entropy; targets (n, n_out) of the model's dtype
        otherwise ((n,) allowed for one output).
    batch_size : int, "full" or BatchSizeSchedule
        1 = SGD, 1 < B < n mini-batch, n or "full" = full-batch gradient descent; a
        :class:`~minigd.optim.BatchSizeSchedule` grows it at given epochs.
    epochs, steps, examples : int, optional
        Budgets; training stops at the first one reached.  With none given, ``epochs=10``.
    target : dict, optional
        ``{"val_accuracy": 0.95}``, ``{"val_loss": 0.1}``, ``{"train_loss": ...}`` or
        ``{"train_accuracy": ...}`` (all keys must be met).  Checked at every evaluation;
        training stops when reached, and the history records steps, examples and
        training time to target.
    optimizer : minigd.optim.Optimizer
        Default ``SGD(lr=0.1)``.
    sampler : {"shuffle", "replacement", "sequential"}
        "shuffle": a fresh permutation every epoch (without replacement); "replacement":
        i.i.d. uniform draws; "sequential": rows in order.  With the full batch and
        "shuffle"/"sequential" every step uses all rows in order (shuffling a full batch
        changes nothing but the summation order).
    drop_last : bool
        Drop the last partial batch of each epoch.  Otherwise the last batch holds the
        remaining r < B examples and its loss is their mean (so its gradient has the same
        scale as every other step's).
    validation : (X_val, y_val), optional
    eval_every : int, optional
        Evaluate every this many steps (default: at each epoch end) and at the end.
    eval_train : bool
        Also evaluate on the whole training set at each evaluation (implied by a train_*
        target).
    seed : int or numpy.random.Generator
        Seeds the sampler.  Same seed, same backend, same thread count: bitwise-identical
        results.
    max_time : float, optional
        Stop after this many seconds of training.
    callbacks : sequence
        Objects with ``on_step(model, step, loss)`` (called after each step) and/or
        ``on_eval(model, record)``; a truthy return from either stops training.
    track_noise : int, optional
        Record gradient-noise statistics every ``track_noise`` steps (1 = every step) into
        :attr:`History.noise` (also merged into ``records``): the batch gradient's squared
        norm and unbiased estimates of |G|^2, tr(Sigma) and the noise scale B_simple
        = tr(Sigma) / |G|^2 (McCandlish et al. 2018) from the batch's per-example gradient norms,
        which the backward pass computes alongside the step for a few percent of its
        cost (formulas: :mod:`minigd.gradstats.tracking`).  The live estimator is
        ``hist.noise_tracker`` (callbacks can read ``.noise_scale``).  Needs batches of
        at least 2 examples.  Untracked steps run exactly as without tracking; the
        bookkeeping is not counted in ``time``.
    noise_beta : float
        Decay of the bias-corrected moving averages of the tracked estimates, per tracked
        step (0 = no smoothing; window about ``1 / (1 - noise_beta)`` tracked steps).
    track_gsnr : int, optional
        Every ``track_gsnr`` steps (a multiple of ``track_noise``) also record the
        gradient signal-to-noise ratio of the batch (``gsnr_mean``, ``gsnr_median``) and
        its exact ``ddof=1`` trace (``batch_trace_cov``): an extra forward/backward and a
        per-parameter variance pass over the batch (about 2-4 plain steps), so keep it
        rare; not counted in ``time``.

    Returns
    -------
    History

    Raises
    ------
    DivergenceError
        When a step's loss or updated parameters are non-finite; the update is not
        applied and the error carries the last finite parameters.
    """
    X, yi, yf = model.check_Xy(X, y)
    n = X.shape[0]
    bs = _check_batch_size(batch_size, n)
    if epochs is None and steps is None and examples is None:
        epochs = 10
    epochs = None if epochs is None else check_int("epochs", epochs, low=1)
    steps = None if steps is None else check_int("steps", steps, low=1)
    examples = None if examples is None else check_int("examples", examples, low=1)
    target = _check_target(target)
    optimizer = SGD(lr=0.1) if optimizer is None else optimizer
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer: expected a minigd optimizer (mg.SGD, mg.Adam, ...), got {_got(optimizer)}")
    sampler = check_choice("sampler", sampler, SAMPLERS)
    if not isinstance(drop_last, bool):
        raise TypeError(f"drop_last: expected a bool, got {_got(drop_last)}")
    if eval_every is not None:
        eval_every = check_int("eval_every", eval_every, low=1)
    if max_time is not None and not (isinstance(max_time, numbers.Real) and max_time > 0):
        raise ValueError(f"max_time: expected a positive number of seconds, got {max_time!r}")
    Xv = yvi = yvf = None
    if validation is not None:
        if not (isinstance(validation, (tuple, list)) and len(validation) == 2):
            raise TypeError(f"validation: expected a pair (X_val, y_val), got {_got(validation)}")
        Xv, yv = validation
        model.check_Xy(Xv, yv, "validation X", "validation y")
    if target and any(k.startswith("val_") for k in target) and validation is None:
        raise ValueError(f"target: {list(target)} needs validation=(X_val, y_val)")
    if target and any(k.endswith("accuracy") for k in target) and not model.is_classifier:
        raise ValueError(f"target: accuracy needs a classification loss, the model's loss is {model.loss_name!r}")
    eval_train = bool(eval_train) or bool(target and any(k.startswith("train_") for k in target))
    rng = check_seed("seed", seed)
    tracker = _make_tracker(track_noise, noise_beta, track_gsnr, bs, n, sampler)
    if tracker is not None:
        from minigd.kernels.cpu_stats import sum64   # numba: imported only when tracking

    impl = model.backend_impl
    # evaluations run forward passes of up to EVAL_CHUNK rows on the same workspace:
    # reserve for them too, so that nothing is re-allocated once training has started
    n_eval = max(len(Xv) if validation is not None else 0, n if eval_train else 0)
    impl.reserve(max(bs.max_batch, min(n_eval, EVAL_CHUNK)))
    params, grad = model.params, model._grad
    opt_state = optimizer.init(params)
    lr_fn = optimizer.lr if callable(optimizer.lr) else None
    lr_const = optimizer.lr_at(0)
    order = np.arange(n, dtype=np.int64)
    seq = np.arange(n, dtype=np.int64)

    first_B = bs.at_epoch(0)
    cap = steps or (epochs * steps_per_epoch(n, first_B, drop_last) if epochs else 1024)
    hist = History(capacity=min(cap, 1 << 20))
    hist.target = target
    hist.noise_tracker = tracker
    hist.config = dict(batch_size=batch_size if not isinstance(batch_size, BatchSizeSchedule) else repr(batch_size),
                       sampler=sampler, drop_last=drop_last, optimizer=repr(optimizer), n=n,
                       backend=model.backend)
    callbacks = list(callbacks)
    on_step = [c.on_step for c in callbacks if hasattr(c, "on_step")]
    on_eval = [c.on_eval for c in callbacks if hasattr(c, "on_eval")]

    step = 0
    seen = 0
    train_time = 0.0
    epoch = 0
    stop = ""

    def evaluate(ep):
        rec = {"step": step, "epoch": ep, "examples": seen, "time": train_time}
        if validation is not None:
            r = model.evaluate(Xv, validation[1])
            rec.update({f"val_{k}": v for k, v in r.items()})
        if eval_train:
            r = model.evaluate(X, y)
            rec.update({f"train_{k}": v for k, v in r.items()})
        hist.evals.append(rec)
        if target is not None and hist.reached is not True and _met(target, rec):
            hist.reached = True
            hist.steps_to_target, hist.examples_to_target, hist.time_to_target = step, seen, train_time
        return any(bool(f(model, rec)) for f in on_eval)

    if target is not None:
        hist.reached = False
    while not stop:
        B = bs.at_epoch(epoch)
        full = B == n and sampler != "replacement"
        if full or sampler == "sequential":
            src = seq
        elif sampler == "shuffle":
            rng.shuffle(order)
            src = order
        else:
            src = rng.integers(0, n, size=steps_per_epoch(n, B, drop_last) * B, dtype=np.int64)
        n_steps = steps_per_epoch(n, B, drop_last)
        ep_loss = 0.0
        ep_count = 0
        for k in range(n_steps):
            s0 = k * B
            b = min(B, len(src) - s0) if sampler != "replacement" else B
            idx = src[s0:s0 + b]
            # float(): a schedule may return an int or a numpy scalar; the kernels are
            # compiled for a float64 learning rate only
            lr = float(lr_fn(step)) if lr_fn is not None else lr_const
            t0 = time.perf_counter()
            if tracker is None:
                loss, ok, gsq = impl.train_step(params, grad, X, yi, yf, idx, b, opt_state, lr, step + 1)
                train_time += time.perf_counter() - t0
            else:
                track = step % track_noise == 0
                if track and track_gsnr is not None and step % track_gsnr == 0 and b >= 2:
                    tracker.add_extra(step, gsnr_summary(model, X, yi, yf, idx))
                    t0 = time.perf_counter()      # the GSNR pass is not training time
                loss, ok, gsq = impl.train_step(params, grad, X, yi, yf, idx, b, opt_state, lr, step + 1,
                                                track)
                train_time += time.perf_counter() - t0
                if track and ok:
                    tracker.update(step, b, sum64(impl.last_sqnorms(b)), gsq)
            if not ok:
                hist.stop_reason = "diverged"
                raise DivergenceError(step, loss, params.copy(), hist,
                                      "non-finite loss" if not math.isfinite(loss) else
                                      "the update would make parameters non-finite")
            opt_state.t = step + 1
            seen += b
            hist.record_step(step, epoch, loss, lr, b, seen, train_time)
            ep_loss += loss * b
            ep_count += b
            step += 1
            if on_step and any(bool(f(model, step, loss)) for f in on_step):
                stop = "callback"
            if eval_every is not None and step % eval_every == 0:
                if evaluate(epoch + (k + 1) / n_steps):
                    stop = "callback"
            if hist.reached:
                stop = "target"
            elif steps is not None and step >= steps:
                stop = "steps"
            elif examples is not None and seen >= examples:
                stop = "examples"
            elif max_time is not None and train_time >= max_time:
                stop = "max_time"
            if stop:
                break
        hist.epochs.append({"epoch": epoch, "loss": ep_loss / max(ep_count, 1), "batch_size": B,
                            "steps": step, "examples": seen, "time": train_time,
                            "lr": lr, "complete": not stop or k == n_steps - 1})
        epoch += 1
        if not stop and epochs is not None and epoch >= epochs:
            stop = "epochs"
        if eval_every is None and not stop:
            if evaluate(epoch):
                stop = "callback"
            if hist.reached:
                stop = "target"
    if not hist.evals or hist.evals[-1]["step"] != step:
        evaluate(hist.epochs[-1]["epoch"] + 1 if hist.epochs else 0)
    hist.stop_reason = stop
    return hist
