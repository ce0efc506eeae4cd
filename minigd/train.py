"""``fit``: one training entry for the whole batch-size spectrum.

``batch_size=1`` is stochastic gradient descent, ``1 < B < N`` mini-batch, ``B = N`` (or
``"full"``) full-batch gradient descent.  ``fit`` checks its arguments into a
:class:`~minigd.loop.Plan`, starts (or restores) a :class:`~minigd.loop.LoopState` and runs
the one training loop of :mod:`minigd.loop`, which hands the backend runs of steps
(``Backend.run_steps``) that write into preallocated buffers.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from minigd._constraints import check_fit_args, check_norm
from minigd._validation import _got, check_choice, check_magnitude, check_seed
from minigd.adaptive import AdaptiveBatchSize, Controller
from minigd.data.samplers import SAMPLERS, steps_per_epoch
from minigd.gradstats.tracking import NoiseTracker
from minigd.history import History
from minigd.loop import TARGET_METRICS, Loop, Plan, lr_at
from minigd.model import EVAL_CHUNK, MLP
from minigd.optim.aliases import SGD
from minigd.optim.base import Optimizer, OptState, chain_difference
from minigd.optim.schedules import BatchSizeSchedule

__all__ = ["fit", "steps_per_epoch", "SAMPLERS", "TARGET_METRICS"]


def _check_norm_batches(model, bs, n, sampler, drop_last, track_noise):
    """Every batch this run will take, the partial last one included, against the
    batch-norm rules (one place: :func:`minigd._constraints.check_norm`), before the first step."""
    check_norm(
        model.norm,
        batch_sizes=[bs.initial] + [b for _, b in bs.milestones],
        n=n,
        sampler=sampler,
        drop_last=drop_last,
        track_noise=track_noise,
    )


def _run_batch_sizes(bs, n, sampler, drop_last) -> list:
    """Every batch size a run can step with: the schedule's sizes and, unless dropped,
    the partial last batch of an epoch (``n % B`` rows)."""
    sizes = set()
    for B in {bs.initial} | {b for _, b in bs.milestones}:
        sizes.add(B)
        if not drop_last and sampler != "replacement" and n % B:
            sizes.add(n % B)
    return sorted(sizes)


def _check_target(target):
    if target is None:
        return None
    if not isinstance(target, dict) or not target:
        raise TypeError(f"target: expected a dict like {{'val_accuracy': 0.95}}, got {_got(target)}")
    for k, v in target.items():
        check_choice("target metric", k, TARGET_METRICS)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"target[{k!r}]: expected a finite number, got {v!r}")
        # an unreachable target would train to the end of the budget and report "not reached"
        if k.endswith("accuracy") and not 0.0 <= v <= 1.0:
            raise ValueError(f"target[{k!r}]: expected an accuracy in [0, 1] (a reachable target), got {v!r}")
        if k.endswith("loss") and v < 0:
            raise ValueError(
                f"target[{k!r}]: expected a loss >= 0 (every minigd loss is non-negative, "
                f"so a negative target is unreachable), got {v!r}"
            )
    return {k: float(v) for k, v in target.items()}


def _make_tracker(track_noise, noise_beta, bs, n, sampler):
    """A NoiseTracker, or None when tracking is off (the arguments were checked against the
    table; what needs the batch sizes is checked here)."""
    if track_noise is None:
        return None
    if bs.max_batch < 2:
        raise ValueError(
            f"track_noise: needs batches of at least 2 examples (the per-example "
            f"estimators use the spread within a batch), got batch_size={bs.max_batch}"
        )
    return NoiseTracker(n, replacement=(sampler == "replacement"), beta=noise_beta)


def _check_callbacks(callbacks):
    if callbacks is None or isinstance(callbacks, (str, bytes)) or not hasattr(callbacks, "__iter__"):
        raise TypeError(f"callbacks: expected a sequence of callback objects, got {_got(callbacks)}")
    callbacks = list(callbacks)
    hooks = ("on_step", "on_eval", "on_fit_start", "on_fit_end")
    for i, c in enumerate(callbacks):
        if not any(callable(getattr(c, h, None)) for h in hooks):
            raise TypeError(f"callbacks[{i}]: expected an object with one of the methods {list(hooks)}, got {_got(c)}")
    return callbacks


def _check_opt_state(opt_state, optimizer, model, resuming: bool):
    if opt_state is None:
        return None
    if resuming:
        raise ValueError(
            "opt_state: resume restores the optimizer state from the checkpoint; pass opt_state or resume, not both"
        )
    if not isinstance(opt_state, OptState):
        raise TypeError(
            f"opt_state: expected a minigd OptState (hist.opt_state, optimizer.init(params)), got {_got(opt_state)}"
        )
    if tuple(opt_state.primitives) != tuple(optimizer.primitives):
        raise ValueError(
            f"opt_state: was made for another optimizer chain "
            f"({'; '.join(chain_difference(opt_state.primitives, optimizer.primitives))}), "
            f"expected one for {optimizer!r}"
        )
    need = sum(p.slots for p in optimizer.primitives) * model.n_params
    if opt_state.state.shape != (need,) or opt_state.state.dtype != model.dtype:
        raise ValueError(
            f"opt_state: expected state buffers of shape ({need},) and dtype "
            f"{model.dtype} for this model, got {_got(opt_state.state)}"
        )
    if isinstance(opt_state.t, bool) or not isinstance(opt_state.t, numbers.Integral) or opt_state.t < 0:
        raise ValueError(f"opt_state: expected a non-negative update count t, got {opt_state.t!r}")
    return opt_state


def _check_validation(model, validation):
    if validation is None:
        return None
    if not (isinstance(validation, (tuple, list)) and len(validation) == 2):
        raise TypeError(f"validation: expected a pair (X_val, y_val), got {_got(validation)}")
    Xv, yv = validation
    _, _, yvf = model.check_Xy(Xv, yv, "validation X", "validation y")
    check_magnitude("validation X", Xv)
    if yvf.size:
        check_magnitude("validation y", yvf)
    return Xv, yv


def _plan(
    model,
    X,
    y,
    *,
    batch_size,
    epochs,
    steps,
    examples,
    target,
    optimizer,
    sampler,
    drop_last,
    validation,
    eval_every,
    eval_train,
    max_time,
    callbacks,
    track_noise,
    noise_beta,
    track_gsnr,
    progress,
) -> Plan:
    """Check ``fit``'s arguments (each error names its argument) into a :class:`Plan`."""
    X, yi, yf = model.check_Xy(X, y)
    check_magnitude("X", X)
    if yf.size:
        check_magnitude("y", yf)
    n = X.shape[0]
    if epochs is None and steps is None and examples is None:
        epochs = 10
    # the scalar arguments, against the one table of parameter constraints (minigd._constraints)
    a = check_fit_args(
        n=n,
        batch_size=batch_size,
        epochs=epochs,
        steps=steps,
        examples=examples,
        eval_every=eval_every,
        sampler=sampler,
        drop_last=drop_last,
        eval_train=eval_train,
        progress=progress,
        max_time=max_time,
        track_noise=track_noise,
        track_gsnr=track_gsnr,
        noise_beta=noise_beta,
    )
    epochs, steps, examples, eval_every = a["epochs"], a["steps"], a["examples"], a["eval_every"]
    sampler, drop_last, max_time, progress = a["sampler"], a["drop_last"], a["max_time"], a["progress"]
    ctrl = _check_adaptive(model, a["batch_size"], n, sampler, drop_last, track_noise, epochs, steps, examples)
    bs = a["batch_size"] if ctrl is None else BatchSizeSchedule(ctrl.B0)  # (adaptive: its starting size)
    target = _check_target(target)
    validation = _check_validation(model, validation)
    if target and any(k.startswith("val_") for k in target) and validation is None:
        raise ValueError(f"target: {list(target)} needs validation=(X_val, y_val)")
    if target and any(k.endswith("accuracy") for k in target) and not model.is_classifier:
        raise ValueError(f"target: accuracy needs a classification loss, the model's loss is {model.loss_name!r}")
    eval_train = a["eval_train"] or bool(target and any(k.startswith("train_") for k in target))
    if ctrl is None:
        _check_norm_batches(model, bs, n, sampler, drop_last, track_noise)
    tracker = _make_tracker(a["track_noise"], a["noise_beta"], bs, n, sampler) if ctrl is None else ctrl.tracker
    callbacks = _check_callbacks(callbacks)
    lr_fn = optimizer.lr if callable(optimizer.lr) else None
    lr_const = lr_at(lr_fn if lr_fn is not None else (lambda step: optimizer.lr), 0)
    return Plan(
        model=model,
        X=X,
        y=y,
        yi=yi,
        yf=yf,
        bs=bs,
        sampler=sampler,
        drop_last=drop_last,
        epochs=epochs,
        steps=steps,
        examples=examples,
        max_time=max_time,
        target=target,
        validation=validation,
        eval_every=eval_every,
        eval_train=eval_train,
        lr_fn=lr_fn,
        lr_const=lr_const,
        tracker=tracker,
        track_noise=None if tracker is None else ctrl.spec.track_every if ctrl else int(track_noise),
        track_gsnr=None if track_gsnr is None else int(track_gsnr),
        callbacks=callbacks,
        ck_path=None,
        ck_every=0,
        fit_info=None,
        progress=progress,
        ctrl=ctrl,
    )


def _check_adaptive(model, batch_size, n, sampler, drop_last, track_noise, epochs, steps, examples):
    """``batch_size="adaptive"`` or an AdaptiveBatchSize: the controller (None otherwise)."""
    if isinstance(batch_size, str) and batch_size == "adaptive":
        batch_size = AdaptiveBatchSize()
    if not isinstance(batch_size, AdaptiveBatchSize):
        return None
    if track_noise is not None:
        raise ValueError(
            f"track_noise: the adaptive batch size tracks the noise itself (every "
            f"{batch_size.track_every} steps while it decides every {batch_size.every}, "
            f"AdaptiveBatchSize(track_every=...); its records are in hist.noise), got track_noise={track_noise!r}"
        )
    if drop_last:
        raise ValueError(
            "drop_last: with an adaptive batch size the last batch of an epoch holds what is left "
            "(whatever the sizes before it), so drop_last=True is not supported"
        )
    sizes = batch_size.sizes(n)
    if sizes[0] < 2:
        raise ValueError(
            f"min: the adaptive batch size measures the noise from the spread within a batch, "
            f"which needs at least 2 examples, got AdaptiveBatchSize(min={sizes[0]})"
        )
    for b in sizes:
        model.norm.check_batch(b, f"batch_size (the adaptive candidate {b})")
    # a budget that ends before the first decision measures nothing and decides nothing
    every = batch_size.every
    for name, v, most in (
        ("steps", steps, steps),
        ("epochs", epochs, None if epochs is None else epochs * -(-n // sizes[0])),
        ("examples", examples, None if examples is None else -(-examples // sizes[0])),
    ):
        if v is not None and most < every:
            raise ValueError(
                f"{name}: {name}={v} ends an adaptive run after at most {most} steps, before its first "
                f"decision at step {every} (AdaptiveBatchSize(every={every})); expected a budget of at "
                f"least {every} steps, or a smaller every"
            )
    return Controller(batch_size, sizes, n, replacement=sampler == "replacement")


def _fit_info(p: Plan, batch_size, optimizer, noise_beta) -> dict:
    """The run's record a checkpoint keeps and a resume compares (data checksums and
    everything that must be the same for the resumed run to be the same run)."""
    from minigd.checkpoint import optimizer_record
    from minigd.resume import _crc

    return {
        "n": p.n,
        "x_crc": _crc(p.X),
        "y_crc": _crc(p.yi) ^ _crc(p.yf),
        "batch_size": {"adaptive": p.ctrl.spec.config()}
        if p.ctrl is not None
        else batch_size
        if isinstance(batch_size, str)
        else repr(batch_size)
        if isinstance(batch_size, BatchSizeSchedule)
        else int(batch_size),
        "sampler": p.sampler,
        "drop_last": p.drop_last,
        "track_noise": None if p.tracker is None else p.track_noise,
        "noise_beta": None if p.tracker is None else float(noise_beta),
        "track_gsnr": p.track_gsnr,
        "optimizer": optimizer_record(optimizer),
    }


#: fit's arguments that :func:`_plan` checks (besides the model, the data and the optimizer)
_PLAN_ARGS = (
    "batch_size",
    "epochs",
    "steps",
    "examples",
    "target",
    "sampler",
    "drop_last",
    "validation",
    "eval_every",
    "eval_train",
    "max_time",
    "callbacks",
    "track_noise",
    "noise_beta",
    "track_gsnr",
    "progress",
)


def _prepare(p: Plan, state, hist: History, batch_size, optimizer) -> None:
    """What happens between the plan and the first step: the history's record of the run,
    the workspace reserved for the largest batch and for evaluations (nothing re-allocated
    once training has started), the kernels compiled (or loaded from numba's cache) before
    the clock starts, and an adaptive run's step times."""
    model = p.model
    hist.config = dict(
        batch_size=repr(batch_size) if isinstance(batch_size, (BatchSizeSchedule, AdaptiveBatchSize)) else batch_size,
        sampler=p.sampler,
        drop_last=p.drop_last,
        optimizer=repr(optimizer),
        n=p.n,
        backend=model.backend,
    )
    hist.opt_state = state.opt_state
    impl = model.backend_impl
    n_eval = max(len(p.validation[0]) if p.validation is not None else 0, p.n if p.eval_train else 0)
    impl.reserve(max(p.bs.max_batch if p.ctrl is None else p.ctrl.sizes[-1], min(n_eval, EVAL_CHUNK)))
    # adaptive: any remainder can end an epoch, so the smallest regime too
    sizes = _run_batch_sizes(p.bs, p.n, p.sampler, p.drop_last) if p.ctrl is None else p.ctrl.sizes + [2]
    want_sqn = p.tracker is not None and not model.norm.bn
    # the evaluations' chunks (EVAL_CHUNK rows, and the rest) compile before the clock too
    n_val = len(p.validation[0]) if p.validation is not None else 0
    evals = {s for m in (n_val, p.n if p.eval_train else 0) for s in (min(m, EVAL_CHUNK), m % EVAL_CHUNK)} - {0}
    ev = {"eval_sizes": evals} if evals else {}  # (only then: a backend's older warm_up takes no eval_sizes)
    impl.warm_up(model.params, model._grad, p.X, p.yi, p.yf, sizes, state.opt_state, want_sqn=want_sqn, **ev)
    if p.ctrl is not None:  # the step times: a table, or the probe's set-up (it runs at decisions)
        p.ctrl.measure(model, p.X, p.yi, p.yf, state.opt_state)


def fit(
    model: MLP,
    X: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int | str | BatchSizeSchedule = 32,
    epochs: int | None = None,
    steps: int | None = None,
    examples: int | None = None,
    target: dict | None = None,
    optimizer: Optimizer | None = None,
    sampler: str = "shuffle",
    drop_last: bool = False,
    validation: tuple | None = None,
    eval_every: int | None = None,
    eval_train: bool = False,
    seed: int | np.random.Generator | None = 0,
    max_time: float | None = None,
    callbacks: Iterable[Any] = (),
    track_noise: int | None = None,
    noise_beta: float = 0.99,
    track_gsnr: int | None = None,
    opt_state: OptState | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: Any = None,
    progress: bool = False,
) -> History:
    """Train ``model`` in place on (X, y) with mini-batch gradient descent.

    Plan, loop, finish: every argument is checked first (an error names the argument, what
    was expected and what was got), then :mod:`minigd.loop` runs the steps, then the history
    is returned.  The user guide (docs/guide/training.md) has the long form of each option.

    Parameters
    ----------
    model : minigd.MLP
    X : ndarray (n, n_in) of the model's dtype
    y : ndarray
        Integer labels (n,) for cross_entropy; targets (n, n_out) of the model's dtype
        otherwise ((n,) allowed for one output).
    batch_size : int, "full", "adaptive", BatchSizeSchedule or AdaptiveBatchSize
        1 = SGD, 1 < B < n mini-batch, n or "full" = full-batch gradient descent; a
        :class:`~minigd.optim.BatchSizeSchedule` changes it at given epochs; "adaptive" (or
        an :class:`~minigd.AdaptiveBatchSize` with its settings) lets a controller pick it
        during training from the measured noise scale and throughput (:mod:`minigd.adaptive`).
    epochs, steps, examples : int, optional
        Budgets; training stops at the first one reached (none given: ``epochs=10``).
        The history's ``time`` counts the steps only (not evaluation, noise-tracking
        bookkeeping or kernel compilation, which happens in an untimed warm-up).
    target : dict, optional
        ``{"val_accuracy": 0.95}``, ``{"val_loss": ...}``, ``{"train_loss": ...}`` or
        ``{"train_accuracy": ...}`` (all must be met), checked at every evaluation; training
        stops when reached and the history records steps, examples and time to target.
    optimizer : minigd.optim.Optimizer
        Default ``SGD(lr=0.1)``.  Its ``lr`` may be a schedule (checked at every step).
    sampler : {"shuffle", "replacement", "sequential"}
        A fresh permutation every epoch, i.i.d. draws, or rows in order
        (:mod:`minigd.data.samplers`); a full batch takes the rows in order.
    drop_last : bool
        Drop each epoch's partial last batch (else it holds the remaining rows and its loss
        is their mean).
    validation : (X_val, y_val), optional
    eval_every : int, optional
        Evaluate every this many steps (default: at each epoch end) and at the end.
    eval_train : bool
        Also evaluate on the whole training set (implied by a ``train_*`` target).
    seed : int or numpy.random.Generator
        Seeds the sampler and dropout's masks.  Same seed, backend and thread count:
        bitwise-identical results.  A Generator is advanced in place.
    max_time : float, optional
        Stop after this many seconds of training (checked after every step on host
        backends, after every device run of steps on the gpu backend).
    callbacks : sequence
        Objects with ``on_step(model, step, loss)`` and/or ``on_eval(model, record)`` (a
        truthy return stops training), optional ``on_fit_start(model, history)`` and
        ``on_fit_end(model, history)`` (also called when fit raises).
    track_noise : int, optional
        Record the gradient-noise statistics (unbiased |G|^2, tr(Sigma), B_simple;
        :mod:`minigd.gradstats.tracking`) every ``track_noise`` steps into ``hist.noise``,
        from the per-example norms the backward pass computes alongside (batches >= 2).
    noise_beta : float
        Decay per tracked step of the tracked estimates' moving averages, in [0, 1).
    track_gsnr : int, optional
        Every ``track_gsnr`` steps (a multiple of ``track_noise``) also record the
        batch's gradient signal-to-noise ratio (an extra pass; not counted in ``time``).
        With the adaptive batch size, at the tracked steps that are multiples of
        ``track_gsnr`` (its tracked steps move with its decision period, so these are
        not evenly spaced).
    opt_state : OptState, optional
        Continue from this optimizer state (``hist.opt_state`` of an earlier call): its
        moments are updated in place and its update count ``t`` goes on.
    checkpoint : str or os.PathLike, optional
        Write the loop state (:class:`~minigd.loop.LoopState`: parameters, optimizer
        state, sampler, generator, counters, history) to this file, atomically, every
        ``checkpoint_every`` steps and when training ends.
    checkpoint_every : int, optional
        Steps between checkpoints (default: only the final one).
    resume : True, str, os.PathLike or Checkpoint, optional
        Continue from a checkpoint of ``fit(checkpoint=...)`` (``True``: from
        ``checkpoint`` if it exists).  The call must describe the same run (model, data,
        batch size, sampler, optimizer and its hyper-parameters, noise tracking; else a
        ValueError naming what differs); budgets, target, validation, evaluation and
        callbacks are this call's.  The result is bitwise that of the uninterrupted run
        (same backend and thread count; wall-clock ``time`` fields aside).
    progress : bool
        Show a tqdm progress bar (needs tqdm).

    Returns
    -------
    History

    Raises
    ------
    DivergenceError
        A step's loss or update is non-finite: the update is not applied, the error
        carries the last finite parameters; ``cause`` is ``"data"`` when the first step of
        a fresh run fails, else ``"learning_rate"``.
    CheckpointError
        ``checkpoint``/``resume`` is not a regular file, or the checkpoint to resume is
        damaged, crafted or inconsistent (everything in it is checked before the first step).
    ValueError, TypeError
        An argument out of range or of the wrong type, naming the argument.
    """
    from minigd.resume import _check_checkpointing, start_state

    args = dict(locals())  # (the arguments, before anything else is bound)
    if not isinstance(model, MLP):
        raise TypeError(f"model: expected a minigd.MLP, got {_got(model)}")
    optimizer = SGD(lr=0.1) if optimizer is None else optimizer
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer: expected a minigd optimizer (mg.SGD, mg.Adam, ...), got {_got(optimizer)}")
    # -- plan: every argument checked before anything runs
    p = _plan(model, X, y, optimizer=optimizer, **{k: args[k] for k in _PLAN_ARGS})
    rng = check_seed("seed", seed)
    p.ck_path, p.ck_every, resume_src = _check_checkpointing(checkpoint, checkpoint_every, resume)
    if resume_src is None:  # (resuming overwrites them)
        model.check_finite()
    opt_state = _check_opt_state(opt_state, optimizer, model, resume_src is not None)
    if p.ck_path is not None or resume_src is not None:
        p.fit_info = _fit_info(p, batch_size, optimizer, noise_beta)
    state, hist = start_state(p, optimizer, opt_state, rng, resume_src)
    _prepare(p, state, hist, batch_size, optimizer)
    # -- loop, then finish (the progress bar and on_fit_end, also after an error)
    loop = Loop(p, state, hist)
    try:
        loop.run()
    finally:
        loop.finish()
    return hist
