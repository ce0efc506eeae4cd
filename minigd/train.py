"""``fit``: one training entry for the whole batch-size spectrum.

``batch_size=1`` is stochastic gradient descent, ``1 < B < N`` mini-batch, ``B = N`` (or
``"full"``) full-batch gradient descent.  The outer loop (sampling, schedules, stopping,
history) is Python; each step is one backend call that writes into preallocated buffers.
"""
from __future__ import annotations

import math
import numbers
import os
import time
import zlib
from typing import Any, Iterable

import numpy as np

from minigd._validation import _got, check_choice, check_int, check_magnitude, check_seed
from minigd.errors import CheckpointError, DivergenceError
from minigd.gradstats.tracking import NoiseTracker, gsnr_summary
from minigd.history import History
from minigd.model import EVAL_CHUNK, MLP, _ForwardOverflow
from minigd.optim.aliases import SGD
from minigd.optim.base import Optimizer, OptState, chain_difference
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


def _check_norm_batches(model, bs, n, sampler, drop_last, track_noise):
    """Batch norm in training mode needs >= 2 rows in every ghost batch: check every batch
    this run will take before the first step, not when a partial last batch comes."""
    if not model.norm.bn:
        return
    if track_noise is not None:
        raise ValueError(f"track_noise: the tracked noise statistics need per-example gradients, "
                         f"which are not defined for a model with batch_norm (got "
                         f"track_noise={track_noise!r})")
    for B in sorted({bs.initial} | {b for _, b in bs.milestones}):
        sizes = {B}
        if not drop_last and sampler != "replacement" and n % B:
            sizes.add(n % B)
        for b in sorted(sizes):
            hint = "" if b == B else f" (the last batch of an epoch holds {n} % {B} = {b} rows; drop_last=True drops it)"
            model.norm.check_batch(b, "batch_size" + hint, hint)


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
            raise ValueError(f"target[{k!r}]: expected a loss >= 0 (every minigd loss is non-negative, "
                             f"so a negative target is unreachable), got {v!r}")
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
    if isinstance(noise_beta, bool) or not isinstance(noise_beta, numbers.Real) \
            or not 0.0 <= float(noise_beta) < 1.0:
        raise ValueError(f"noise_beta: expected a number in [0, 1), got {_got(noise_beta)}")
    if track_noise is None:
        if track_gsnr is not None:
            raise ValueError(f"track_gsnr: needs track_noise (the GSNR summary is added to the "
                             f"tracked records), got track_gsnr={track_gsnr!r} and track_noise=None")
        return None
    k = check_int("track_noise", track_noise, low=1)
    if track_gsnr is not None:
        g = check_int("track_gsnr", track_gsnr, low=1)
        if g % k:
            raise ValueError(f"track_gsnr: expected a multiple of track_noise={k} (GSNR is "
                             f"recorded on tracked steps), got {g}")
    if bs.max_batch < 2:
        raise ValueError(f"track_noise: needs batches of at least 2 examples (the per-example "
                         f"estimators use the spread within a batch), got batch_size={bs.max_batch}")
    return NoiseTracker(n, replacement=(sampler == "replacement"), beta=float(noise_beta))


# ============================================================================ checkpointing
def _check_checkpointing(checkpoint, checkpoint_every, resume):
    """(path or None, every (0 = only at the end), resume source: None, a path or a Checkpoint)."""
    from minigd.checkpoint import Checkpoint, _check_path

    path = None
    if checkpoint is not None:
        path = _check_path(checkpoint, "checkpoint")
        if not os.path.isdir(os.path.dirname(path)):
            raise ValueError(f"checkpoint: the directory {os.path.dirname(path)!r} does not exist")
        if os.path.isdir(path):
            raise ValueError(f"checkpoint: {path!r} is a directory, expected a file path")
        _refuse_special("checkpoint", path)
        # checkpoints are written atomically through a temporary file next to ``path``:
        # a directory that cannot be written is found now, not after training
        from minigd._io import check_writable_dir
        check_writable_dir(os.path.dirname(path), "checkpoint")
    every = 0
    if checkpoint_every is not None:
        every = check_int("checkpoint_every", checkpoint_every, low=1)
        if path is None:
            raise ValueError(f"checkpoint_every: needs checkpoint=<file path>, got "
                             f"checkpoint_every={every} and checkpoint=None")
    src = None
    if resume is None or resume is False:
        pass
    elif resume is True:
        if path is None:
            raise ValueError("resume: resume=True continues from checkpoint=<file path>, "
                             "but checkpoint is None")
        src = path if os.path.exists(path) else None     # nothing written yet: a fresh start
    elif isinstance(resume, Checkpoint):
        src = resume
    elif isinstance(resume, (str, os.PathLike)):
        src = _check_path(resume, "resume")
        if not os.path.exists(src):
            raise FileNotFoundError(f"resume: no checkpoint file at {src!r}")
        _refuse_special("resume", src)
    else:
        raise TypeError(f"resume: expected True, a checkpoint file path or a minigd Checkpoint, "
                        f"got {_got(resume)}")
    return path, every, src


def _refuse_special(name: str, path: str) -> None:
    """An existing ``path`` that is not a regular file (a FIFO, ``/dev/zero``, a directory,
    a socket, a device) is refused before training starts: reading it would block or never
    end, and writing a checkpoint over it would fail only at the end."""
    import stat

    from minigd._io import _file_kind

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{name}: expected a regular file, got {path!r} which is {_file_kind(mode)}", path)


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).data.cast("B")) if a.size else 0


def _write_checkpoint(path, model, opt_state, rng, order, draws, hist, fit_info, *, step, seen, t1,
                      train_time, epoch, k, ep_loss, ep_count, lr, n_evals, n_epochs, reached,
                      finished, stop_reason):
    """The loop state right after step ``step - 1`` (k-th of epoch ``epoch``) and its hooks."""
    from minigd.checkpoint import save_checkpoint

    sampler = {"order": order}
    if draws is not None:
        sampler["draws"] = draws
    info = {"step": step, "examples": seen, "train_time": train_time, "epoch": epoch, "k": k,
            "ep_loss": ep_loss, "ep_count": ep_count, "lr": lr, "n_evals": n_evals,
            "n_epochs": n_epochs, "reached": list(reached), "finished": finished,
            "stop_reason": stop_reason, "t1": t1, "fit": fit_info}
    save_checkpoint(path, model, opt_state, rng=rng, sampler=sampler, history=hist, step_info=info)


def _restore(ck, model, optimizer, fit_info, n, target, bs):
    """Check that checkpoint ``ck`` continues this fit call; returns the restored pieces."""
    from minigd.checkpoint import load_checkpoint, optimizer_difference

    if isinstance(ck, str):
        # only the saved arrays are used: build the saved model on the reference backend,
        # which runs everywhere (a checkpoint from a GPU machine resumes on any backend)
        ck = load_checkpoint(ck, backend="numpy")
    name = f"resume: {ck.path or 'the checkpoint'}"
    info = ck.step_info
    if not isinstance(info, dict) or not isinstance(ck.sampler, dict) or not isinstance(ck.model, MLP):
        raise CheckpointError(f"{_ck_where(ck)}: cannot resume from it: step_info, sampler or model "
                              f"is of the wrong type", ck.path)
    if not isinstance(info.get("fit"), dict) or ck.history is None or ck.opt_state is None \
            or ck.rng_state is None or "order" not in ck.sampler:
        raise ValueError(f"{name} was not written by fit (no training-loop state); "
                         f"load it with load_checkpoint and continue by hand")
    mine = model.config()
    theirs = ck.model.config()
    for key in ("sizes", "activation", "loss", "dtype", "batch_norm", "ghost_batch_size", "dropout"):
        if mine.get(key) != theirs.get(key):
            raise ValueError(f"{name} holds a model with {key}={theirs.get(key)!r}, this model has "
                             f"{key}={mine.get(key)!r}")
    saved = info["fit"]
    if not _plain_json(saved):      # (an array or a nested oddity would make == ambiguous)
        raise CheckpointError(f"{_ck_where(ck)}: cannot resume from it: its record of the run "
                              f"(step_info['fit']) holds values that are not plain JSON", ck.path)
    for key, val in fit_info.items():
        if key != "optimizer" and saved.get(key) != val:
            what = "the training data differ" if key in ("x_crc", "y_crc") else \
                f"{key}={saved.get(key)!r} there, {val!r} here"
            raise ValueError(f"{name} continues a different training run: {what}")
    # the chain and its hyper-parameters, and the learning rate where it can be compared
    # (a number or a minigd schedule object; checkpoints of older versions: the chain only)
    rec = saved.get("optimizer")
    if rec is not None and not (isinstance(rec, dict) and isinstance(rec.get("config", {}), dict)):
        raise CheckpointError(f"{_ck_where(ck)}: cannot resume from it: its optimizer record "
                              f"{str(rec)[:80]} is malformed", ck.path)
    if not isinstance(ck.opt_state, OptState):
        raise CheckpointError(f"{_ck_where(ck)}: cannot resume from it: its opt_state is "
                              f"{type(ck.opt_state).__name__}, not a minigd OptState", ck.path)
    diff = optimizer_difference(saved.get("optimizer"), optimizer, ck.opt_state.primitives)
    if diff:
        raise ValueError(f"{name} was written with another optimizer chain or hyper-parameters: "
                         f"{'; '.join(diff)} (this call has {optimizer!r})")
    _check_loop_state(ck, model, optimizer, n, bs, fit_info["sampler"], fit_info["drop_last"])
    hist = ck.history
    n_evals, n_epochs = int(info["n_evals"]), int(info["n_epochs"])
    del hist.evals[n_evals:]
    del hist.epochs[n_epochs:]
    if hist.target == target:
        hist.reached, hist.steps_to_target, hist.examples_to_target, hist.time_to_target = info["reached"]
    else:    # another target: judged from the resume point on
        hist.reached = None if target is None else False
        hist.steps_to_target = hist.examples_to_target = hist.time_to_target = None
    hist.target = target
    hist.stop_reason = ""
    return ck, hist


def _plain_json(v, depth: int = 0) -> bool:
    """Only JSON's own types (str keys), not too deep: what ``fit`` writes as its run record."""
    if depth > 20:
        return False
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, list):
        return all(_plain_json(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain_json(x, depth + 1) for k, x in v.items())
    return False


def _ck_where(ck) -> str:
    return f"checkpoint {ck.path!r}" if isinstance(getattr(ck, "path", None), str) else "checkpoint (in memory)"


def _check_loop_state(ck, model, optimizer, n, bs, sampler, drop_last) -> None:
    """Everything ``fit(resume=...)`` takes from checkpoint ``ck`` beyond what
    :func:`~minigd.checkpoint.load_checkpoint` checks on its own (and again that, for a
    Checkpoint object built or edited by hand), against this run: the sampler's
    permutation is one of ``range(n)`` and its i.i.d. draws lie in ``[0, n)`` with one
    epoch's length, the counters are integers in range and agree with each other and with
    the history, the parameters and optimizer state are finite and fit this model and
    optimizer.  A :class:`~minigd.errors.CheckpointError` names what is wrong: nothing
    from the file reaches a kernel unchecked (an index out of range would read outside X)."""
    from minigd.checkpoint import _MAX_COUNT

    where = _ck_where(ck)

    def need(cond, what):
        if not cond:
            raise CheckpointError(f"{where}: cannot resume from it: {what}", ck.path)

    def is_int(v, low=0, high=_MAX_COUNT):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and low <= v <= high

    def is_num(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    info, hist, st = dict(ck.step_info), ck.history, ck.opt_state
    info.setdefault("t1", 1)      # (older checkpoints: the run started from a fresh optimizer)
    need(isinstance(hist, History), f"its history is {type(hist).__name__}, not a minigd History")
    # the model's parameters and running statistics (shapes were compared by configuration)
    for vec, what in ((ck.model.params, "params"), (ck.model.running, "running")):
        need(isinstance(vec, np.ndarray) and vec.dtype == model.dtype and vec.shape == getattr(model, what).shape,
             f"{what} has {_got(vec)}, expected {getattr(model, what).shape} {model.dtype}")
        need(np.isfinite(vec).all(), f"{what} holds NaN/inf entries")
    # the optimizer state: against this call's optimizer (its chain was compared already)
    need(isinstance(st, OptState), f"its opt_state is {type(st).__name__}, not a minigd OptState")
    ref = optimizer.init(model.params)
    T = len(ref.primitives)
    for k in ("codes", "hp", "soff", "state"):
        a, want = getattr(st, k), getattr(ref, k)
        need(isinstance(a, np.ndarray) and a.shape == want.shape and a.dtype == want.dtype,
             f"opt_state.{k} has {_got(a)}, the optimizer needs shape {want.shape} dtype {want.dtype}")
    need(np.array_equal(st.codes, ref.codes) and np.array_equal(st.soff, ref.soff)
         and np.array_equal(st.hp[:T, :3], ref.hp[:T, :3]) and np.array_equal(st.hp[T, 5:], ref.hp[T, 5:])
         and isinstance(st.plan, np.ndarray) and np.array_equal(st.plan, ref.plan),
         "opt_state's op codes, offsets or hyper-parameters do not match the optimizer")
    need(np.isfinite(st.hp).all() and np.isfinite(st.state).all(), "opt_state holds NaN/inf entries")
    # the counters
    keys = ("step", "examples", "epoch", "k", "ep_count", "n_evals", "n_epochs", "t1")
    for key in keys:
        need(is_int(info.get(key), low=-1 if key == "k" else 1 if key == "t1" else 0),
             f"step_info[{key!r}] is {info.get(key)!r}, expected an integer in range")
    step, seen, epoch, k = info["step"], info["examples"], info["epoch"], info["k"]
    for key in ("ep_loss", "lr", "train_time"):
        need(is_num(info.get(key)), f"step_info[{key!r}] is {info.get(key)!r}, expected a finite number")
    need(info["train_time"] >= 0 and info["lr"] >= 0, "a negative training time or learning rate")
    need(info.get("finished") in (True, False) and isinstance(info.get("stop_reason"), str),
         "step_info['finished'] / ['stop_reason'] are malformed")
    r = info.get("reached")
    need(isinstance(r, list) and len(r) == 4 and r[0] in (None, True, False)
         and all(v is None or is_int(v) for v in r[1:3]) and (r[3] is None or is_num(r[3])),
         f"step_info['reached'] is {str(r)[:80]}, expected [reached, steps, examples, time]")
    need(st.t == step + info["t1"] - 1 and is_int(st.t),
         f"the optimizer's update count t={st.t!r} does not follow from step={step} and t1={info['t1']}")
    need(hist.n_steps == step, f"the history has {hist.n_steps} steps, step_info says {step}")
    need(info["n_evals"] <= len(hist.evals) and info["n_epochs"] <= len(hist.epochs),
         "step_info counts more evaluations or epochs than the history holds")
    need(epoch <= step, f"epoch {epoch} after only {step} steps")
    B = bs.at_epoch(epoch)
    n_steps = steps_per_epoch(n, B, drop_last)
    need(k < n_steps, f"position k={k} in an epoch of {n_steps} steps")
    if step:
        ep_col = hist._cols["epoch"][:step]
        in_epoch = step - int(np.flatnonzero(ep_col != epoch)[-1]) - 1 if (ep_col != epoch).any() else step
        need(ep_col[-1] == epoch and hist._cols["examples"][step - 1] == seen,
             f"epoch {epoch} / examples {seen} disagree with the history's last step")
        need(in_epoch == k + 1 and info["ep_count"] == int(hist._cols["batch_size"][step - in_epoch:step].sum()),
             f"position k={k} / ep_count={info['ep_count']} disagree with the history's steps in epoch {epoch}")
    else:
        need(seen == 0 and k == -1 and info["ep_count"] == 0, "counters of a run without steps are not zero")
    # the sampler: what indexes the rows of X in every step
    order = ck.sampler["order"]
    need(isinstance(order, np.ndarray) and order.shape == (n,) and order.dtype == np.int64,
         f"the saved permutation is {_got(order)}, expected shape ({n},) int64")
    need(n and order.min() >= 0 and order.max() < n and bool((np.bincount(order, minlength=n) == 1).all()),
         f"the saved order is not a permutation of range({n})")
    if sampler == "replacement":
        draws = ck.sampler.get("draws")
        need(isinstance(draws, np.ndarray) and draws.ndim == 1 and draws.dtype == np.int64,
             f"the i.i.d. draws of the current epoch are missing or malformed ({_got(draws)})")
        need(draws.shape == (n_steps * B,), f"the i.i.d. draws hold {draws.shape[0]} indices, an epoch of "
                                            f"{n_steps} steps of {B} needs {n_steps * B}")
        need(draws.min() >= 0 and draws.max() < n, f"the i.i.d. draws hold indices outside [0, {n})")
    tr = hist.noise_tracker
    if tr is not None:
        need(getattr(tr, "n", None) == n and getattr(tr, "replacement", None) == (sampler == "replacement"),
             "its noise tracker was made for other data or another sampler")
    try:
        ck.rng()
    except Exception as exc:
        raise CheckpointError(f"{where}: cannot resume from it: invalid random generator state ({exc})",
                              ck.path) from None


def _budget_stop(hist, step, seen, train_time, steps, examples, max_time):
    if hist.reached:
        return "target"
    if steps is not None and step >= steps:
        return "steps"
    if examples is not None and seen >= examples:
        return "examples"
    if max_time is not None and train_time >= max_time:
        return "max_time"
    return ""


class _ProgressBar:
    """``fit(progress=True)``: a tqdm bar over steps (a callback; nothing runs when off)."""

    def __init__(self, total, initial):
        try:
            from tqdm.auto import tqdm
        except ImportError as exc:
            raise ImportError("progress: progress=True needs tqdm, which is not installed: "
                              "pip install tqdm") from exc
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


def _progress_total(steps, epochs, examples, bs, n, drop_last):
    totals = []
    if steps is not None:
        totals.append(steps)
    if epochs is not None and epochs <= 100_000:
        totals.append(sum(steps_per_epoch(n, bs.at_epoch(e), drop_last) for e in range(epochs)))
    if examples is not None and not bs.milestones:
        totals.append(-(-examples // bs.initial))
    return min(totals) if totals else None


def _check_callbacks(callbacks):
    if callbacks is None or isinstance(callbacks, (str, bytes)) or not hasattr(callbacks, "__iter__"):
        raise TypeError(f"callbacks: expected a sequence of callback objects, got {_got(callbacks)}")
    callbacks = list(callbacks)
    hooks = ("on_step", "on_eval", "on_fit_start", "on_fit_end")
    for i, c in enumerate(callbacks):
        if not any(callable(getattr(c, h, None)) for h in hooks):
            raise TypeError(f"callbacks[{i}]: expected an object with one of the methods "
                            f"{list(hooks)}, got {_got(c)}")
    return callbacks


_INF = math.inf


def _lr_at(lr_fn, step: int) -> float:
    """The learning rate of ``step`` from the schedule ``lr_fn``, checked at every step (a
    schedule may go wrong late: negative -- gradient ascent --, non-finite, or not a number
    at all): a ``float`` >= 0; else an error naming ``lr``.  A plain float costs two
    comparisons (this runs once per step)."""
    try:
        v = lr_fn(step)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"lr: the learning-rate schedule raised at step {step}: {exc}") from exc
    if type(v) is not float:
        if isinstance(v, bool) or not (isinstance(v, numbers.Real) or (
                isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype.kind in "iuf")):
            raise TypeError(f"lr: expected the learning rate (schedule) to give a real number, got "
                            f"{_got(v)} at step {step}")
        v = float(v)
    if not 0.0 <= v < _INF:
        raise ValueError(f"lr: expected a finite, non-negative learning rate, got {v!r} at step {step}"
                         f"{' (a negative rate is gradient ascent)' if v < 0 else ''}")
    return v


def _diverged(step, loss, params, hist, first: bool = False) -> DivergenceError:
    """The error for a rejected step (its update was not applied), with a copy of the last
    finite parameters; marks the history as stopped by divergence.  ``first``: the step is
    the first of a fresh run, so a non-finite loss comes from the data (or the starting
    parameters), not from the learning rate (``DivergenceError.cause``)."""
    hist.stop_reason = "diverged"
    data = first and not math.isfinite(loss)
    return DivergenceError(step, loss, params.copy(), hist,
                           "non-finite loss of the first batch, before any update" if data else
                           "non-finite loss" if not math.isfinite(loss) else
                           "the update would make parameters non-finite",
                           cause="data" if data else "learning_rate")


def _chunk_steps(read_every, B, b, full_left, step, seen, steps, examples, eval_every, ck_every) -> int:
    """How many steps ``fit`` hands to the backend's device-resident loop (``run_steps``)
    at once: 1 unless the backend has such a loop (``read_every`` > 0, the gpu backend)
    and this step is a full batch; else as many full batches as remain in
    the epoch, up to ``read_every`` and never past the next step at which ``fit`` must look
    at the model on the host: an evaluation, a checkpoint, or the steps / examples budget.
    So histories, evaluations, targets and checkpoints are those of the per-step loop; only
    ``max_time`` is checked once per chunk (it may overrun by up to a chunk).  Chunks end
    with the epoch, except in full-batch training (one step an epoch) with ``eval_every``
    set, where ``fit`` calls this with the epochs left as ``full_left``: without
    ``eval_every`` it evaluates at every epoch end, so steps one at a time.  ``fit`` also
    caps a dropout model's chunks by the backend's ``max_run_steps`` (device memory for the
    masks).  A chunk of a dropout model draws all its masks up front: if it stops early
    (divergence), a generator passed as ``seed`` has advanced past the whole chunk's masks,
    not just the failing step's (see ``fit``'s ``seed``)."""
    if read_every <= 1 or b != B or full_left < 2:
        return 1
    m = min(full_left, read_every)
    if steps is not None:
        m = min(m, steps - step)
    if examples is not None:
        m = min(m, -(-(examples - seen) // B))
    if eval_every is not None:
        m = min(m, eval_every - step % eval_every)
    if ck_every:
        m = min(m, ck_every - step % ck_every)
    return max(m, 1)


def steps_per_epoch(n: int, B: int, drop_last: bool) -> int:
    """Number of steps in one epoch of n examples at batch size B."""
    return n // B if drop_last else -(-n // B)


def fit(model: MLP, X: np.ndarray, y: np.ndarray, *,
        batch_size: int | str | BatchSizeSchedule = 32, epochs: int | None = None,
        steps: int | None = None, examples: int | None = None, target: dict | None = None,
        optimizer: Optimizer | None = None, sampler: str = "shuffle", drop_last: bool = False,
        validation: tuple | None = None, eval_every: int | None = None, eval_train: bool = False,
        seed: int | np.random.Generator | None = 0, max_time: float | None = None,
        callbacks: Iterable[Any] = (), track_noise: int | None = None, noise_beta: float = 0.99,
        track_gsnr: int | None = None, opt_state: OptState | None = None,
        checkpoint: str | os.PathLike | None = None, checkpoint_every: int | None = None,
        resume: Any = None, progress: bool = False) -> History:
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
        The training ``time`` of the history (and ``time_to_target``, ``max_time``,
        a checkpoint's ``train_time``) counts the steps only: evaluation, noise-tracking
        bookkeeping and the compilation of the kernels are left out (on the cpu backend
        ``fit`` compiles, or loads from numba's cache, the kernels its batch sizes need in
        an untimed warm-up that leaves the model, optimizer state and generators as they
        were; the gpu backend compiles when the model is made and, before the clock starts,
        uploads the data and captures the CUDA graph of a step of each small batch size).
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
        Seeds the sampler (and dropout's masks).  Same seed, same backend, same thread
        count: bitwise-identical results.  A Generator passed here is advanced in place; on
        the gpu backend a dropout model draws the masks of a device-resident run of steps
        up front, so after a ``DivergenceError`` it may stand further on than on the other
        backends (the run's results are the same).
    max_time : float, optional
        Stop after this many seconds of training (checked after every step; on a backend
        that runs steps in device-resident chunks -- gpu -- after every chunk, so it may
        overrun by up to ``read_every`` steps, and the per-step times inside a chunk in
        the history are interpolated).
    callbacks : sequence
        Objects with ``on_step(model, step, loss)`` (called after each step; ``step`` is
        the number of steps done) and/or ``on_eval(model, record)``; a truthy return from
        either stops training.  Optional ``on_fit_start(model, history)`` is called once
        before the first step with the History being filled, ``on_fit_end(model,
        history)`` once when fit returns or raises (e.g. :class:`minigd.logging.TensorBoardLogger`).
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

    opt_state : OptState, optional
        Continue from this optimizer state (``hist.opt_state`` of an earlier call, or
        ``load_checkpoint(...).opt_state``) instead of a fresh one: its momentum / Adam
        moments are updated in place and its update count ``t`` continues (Adam's bias
        correction sees the total number of updates).  Must come from the same chain.
        Step numbers, budgets and learning-rate schedules count this call's steps.
    checkpoint : str or os.PathLike, optional
        Write the training state to this file (:func:`minigd.save_checkpoint`, atomic):
        every ``checkpoint_every`` steps and once more when training ends (not after a
        :class:`DivergenceError`: the last periodic checkpoint stays).
    checkpoint_every : int, optional
        Steps between checkpoints (default: only the final one).
    resume : True, str, os.PathLike or Checkpoint, optional
        Continue a run from a checkpoint written by ``fit(checkpoint=...)``: ``True``
        resumes from ``checkpoint`` if that file exists (else starts afresh), a path or a
        loaded :class:`~minigd.checkpoint.Checkpoint` resumes from it.  Restored: the
        parameters (into ``model``), the optimizer state and update count, the sampler's
        random generator, the current epoch's permutation (or i.i.d. draws) and the
        position in it, the step / example / epoch counters, the training time, the
        History (columns, evaluations, epoch records, target status, noise tracker).  The
        call must describe the same run (same model architecture, data, batch size,
        sampler, ``drop_last``, optimizer chain, hyper-parameters and learning rate, and
        noise tracking; ``ValueError`` otherwise, naming what differs with its saved and
        given values -- a learning rate is compared when it is a number or a minigd
        schedule object, one written as a function is taken as given); budgets,
        ``target``, ``validation``, ``eval_every``, ``max_time`` and callbacks are this call's (``seed`` is ignored).  Budgets count from the start of
        the original run, so the result -- parameters and history, except the
        wall-clock ``time`` fields -- is bitwise that of the uninterrupted run (same
        backend and thread count).  Not restored: callbacks' own state (a callback that
        stopped the original run does not stop the resumed one), and a learning-rate
        schedule is the one passed to this call.
    progress : bool
        Show a tqdm progress bar (needs tqdm); off by default.

    Returns
    -------
    History

    Raises
    ------
    DivergenceError
        When a step's loss or updated parameters are non-finite; the update is not
        applied and the error carries the last finite parameters.  Its ``cause`` is
        ``"data"`` when the first step of a fresh run already fails (the inputs overflow
        with the starting parameters), else ``"learning_rate"``.
    CheckpointError
        (a ValueError) ``checkpoint`` or ``resume`` names something that is not a regular
        file (a FIFO, ``/dev/zero``, a socket, a device: refused at once), or the
        checkpoint to resume is damaged, crafted or inconsistent: everything it holds is
        checked before the first step (the sampler's permutation of ``range(n)`` and its
        draws in ``[0, n)``, the position and counters against each other and the history,
        finite parameters and optimizer state of this model's and optimizer's shapes).
    ValueError, TypeError
        Arguments out of range or of the wrong type, naming the argument: e.g. ``lr``
        when the learning rate (schedule) gives a negative, non-finite or non-numeric
        value at any step (checked every step, before the step runs), ``eval_train``
        not a bool, a ``target`` that cannot be reached (an accuracy outside [0, 1], a
        negative loss), inputs or float targets beyond
        :func:`minigd._validation.max_input` (``sqrt(finfo(dtype).max)``).
    """
    if not isinstance(model, MLP):
        raise TypeError(f"model: expected a minigd.MLP, got {_got(model)}")
    X, yi, yf = model.check_Xy(X, y)
    check_magnitude("X", X)
    if yf.size:
        check_magnitude("y", yf)
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
    if max_time is not None and (isinstance(max_time, bool) or not isinstance(max_time, numbers.Real)
                                 or not max_time > 0):
        raise ValueError(f"max_time: expected a positive number of seconds, got {max_time!r}")
    if validation is not None:
        if not (isinstance(validation, (tuple, list)) and len(validation) == 2):
            raise TypeError(f"validation: expected a pair (X_val, y_val), got {_got(validation)}")
        Xv, yv = validation
        _, _, yvf = model.check_Xy(Xv, yv, "validation X", "validation y")
        check_magnitude("validation X", Xv)
        if yvf.size:
            check_magnitude("validation y", yvf)
    if target and any(k.startswith("val_") for k in target) and validation is None:
        raise ValueError(f"target: {list(target)} needs validation=(X_val, y_val)")
    if target and any(k.endswith("accuracy") for k in target) and not model.is_classifier:
        raise ValueError(f"target: accuracy needs a classification loss, the model's loss is {model.loss_name!r}")
    if not isinstance(eval_train, (bool, np.bool_)):      # 'no' would be truthy
        raise TypeError(f"eval_train: expected a bool, got {_got(eval_train)}")
    eval_train = bool(eval_train) or bool(target and any(k.startswith("train_") for k in target))
    rng = check_seed("seed", seed)
    _check_norm_batches(model, bs, n, sampler, drop_last, track_noise)
    tracker = _make_tracker(track_noise, noise_beta, track_gsnr, bs, n, sampler)
    if tracker is not None:
        from minigd.kernels.cpu_stats import sum64   # numba: imported only when tracking
    callbacks = _check_callbacks(callbacks)
    if not isinstance(progress, bool):
        raise TypeError(f"progress: expected a bool, got {_got(progress)}")
    ck_path, ck_every, resume_src = _check_checkpointing(checkpoint, checkpoint_every, resume)
    if resume_src is None:      # (resuming overwrites them)
        model.check_finite()
    if opt_state is not None:
        if resume_src is not None:
            raise ValueError("opt_state: resume restores the optimizer state from the checkpoint; "
                             "pass opt_state or resume, not both")
        if not isinstance(opt_state, OptState):
            raise TypeError(f"opt_state: expected a minigd OptState (hist.opt_state, "
                            f"optimizer.init(params)), got {_got(opt_state)}")
        if tuple(opt_state.primitives) != tuple(optimizer.primitives):
            raise ValueError(f"opt_state: was made for another optimizer chain "
                             f"({'; '.join(chain_difference(opt_state.primitives, optimizer.primitives))}), "
                             f"expected one for {optimizer!r}")
        need = sum(p.slots for p in optimizer.primitives) * model.n_params
        if opt_state.state.shape != (need,) or opt_state.state.dtype != model.dtype:
            raise ValueError(f"opt_state: expected state buffers of shape ({need},) and dtype "
                             f"{model.dtype} for this model, got {_got(opt_state.state)}")
        if isinstance(opt_state.t, bool) or not isinstance(opt_state.t, numbers.Integral) or opt_state.t < 0:
            raise ValueError(f"opt_state: expected a non-negative update count t, got {opt_state.t!r}")
    lr_fn = optimizer.lr if callable(optimizer.lr) else None
    lr_const = _lr_at(lr_fn if lr_fn is not None else (lambda step: optimizer.lr), 0)

    impl = model.backend_impl
    # evaluations run forward passes of up to EVAL_CHUNK rows on the same workspace:
    # reserve for them too, so that nothing is re-allocated once training has started
    n_eval = max(len(Xv) if validation is not None else 0, n if eval_train else 0)
    impl.reserve(max(bs.max_batch, min(n_eval, EVAL_CHUNK)))
    params, grad = model.params, model._grad
    bn, dropout = bool(model.norm.bn), model.norm.dropout > 0
    order = np.arange(n, dtype=np.int64)
    seq = np.arange(n, dtype=np.int64)
    config = dict(batch_size=batch_size if not isinstance(batch_size, BatchSizeSchedule) else repr(batch_size),
                  sampler=sampler, drop_last=drop_last, optimizer=repr(optimizer), n=n,
                  backend=model.backend)
    fit_info = None
    if ck_path is not None or resume_src is not None:
        from minigd.checkpoint import optimizer_record
        fit_info = {"n": n, "x_crc": _crc(X), "y_crc": _crc(yi) ^ _crc(yf),
                    "batch_size": config["batch_size"] if isinstance(config["batch_size"], str)
                    else int(config["batch_size"]), "sampler": sampler, "drop_last": drop_last,
                    "track_noise": track_noise if tracker is None else int(track_noise),
                    "noise_beta": None if tracker is None else float(noise_beta),
                    "track_gsnr": None if track_gsnr is None else int(track_gsnr),
                    "optimizer": optimizer_record(optimizer)}

    step = 0
    seen = 0
    train_time = 0.0
    epoch = 0
    stop = ""
    pending = None       # the position within an epoch to resume at
    draws = None         # sampler="replacement": this epoch's i.i.d. draws
    t1 = 1               # the optimizer update count of step 0 (train_step's t = step + t1)
    close = (0, (None, None, None, None))   # (evals, target status) when the last epoch closed
    if resume_src is not None:
        ck, hist = _restore(resume_src, model, optimizer, fit_info, n, target, bs)
        info = ck.step_info
        params[...] = ck.model.params
        model.running[...] = ck.model.running     # batch norm's running statistics
        opt_state = ck.opt_state
        t1 = int(info.get("t1", 1))
        rng = ck.rng()
        order[...] = ck.sampler["order"]
        step, seen, train_time = int(info["step"]), int(info["examples"]), float(info["train_time"])
        epoch, k = int(info["epoch"]), int(info["k"])
        draws = ck.sampler.get("draws")
        src = draws if sampler == "replacement" else order
        pending = (src, k + 1, float(info["ep_loss"]), int(info["ep_count"]), k, float(info["lr"]))
        stop = _budget_stop(hist, step, seen, train_time, steps, examples, max_time)
        if tracker is not None:
            tracker = hist.noise_tracker
        del ck
    else:
        if opt_state is None:
            opt_state = optimizer.init(params)
        else:
            t1 = int(opt_state.t) + 1
        first_B = bs.at_epoch(0)
        cap = steps or (epochs * steps_per_epoch(n, first_B, drop_last) if epochs else 1024)
        hist = History(capacity=min(cap, 1 << 20))
        hist.target = target
        hist.noise_tracker = tracker
        if target is not None:
            hist.reached = False
    hist.config = config
    hist.opt_state = opt_state
    fresh_start = 0 if resume_src is None else -1     # a step whose failure is the data's (DivergenceError.cause)
    on_step = [c.on_step for c in callbacks if hasattr(c, "on_step")]
    on_eval = [c.on_eval for c in callbacks if hasattr(c, "on_eval")]
    # steps in device-resident chunks (gpu backend; single steps too, through the same
    # run_steps): not when the host must act at every step -- per-step callbacks, noise
    # tracking.  Dropout masks are drawn for the whole chunk from the same generator in the
    # per-step order, and batch norm's running statistics are updated on the device.
    device_loop = int(getattr(impl, "read_every", 0) or 0)
    if on_step or tracker is not None:
        device_loop = 0
    bar = None
    if progress:
        bar = _ProgressBar(_progress_total(steps, epochs, examples, bs, n, drop_last), step)
        on_step.append(bar.on_step)
        on_eval.append(bar.on_eval)

    def evaluate(ep):
        rec = {"step": step, "epoch": ep, "examples": seen, "time": train_time}
        try:
            if validation is not None:
                r = model.evaluate(Xv, validation[1])
                rec.update({f"val_{k}": v for k, v in r.items()})
            if eval_train:
                r = model.evaluate(X, y)
                rec.update({f"train_{k}": v for k, v in r.items()})
        except _ForwardOverflow as exc:   # X was checked: the parameters grew too large
            hist.stop_reason = "diverged"
            raise DivergenceError(step, math.nan, params.copy(), hist,
                                  f"the parameters are finite but an evaluation overflowed ({exc})") from exc
        hist.evals.append(rec)
        if target is not None and hist.reached is not True and _met(target, rec):
            hist.reached = True
            hist.steps_to_target, hist.examples_to_target, hist.time_to_target = step, seen, train_time
        return any(bool(f(model, rec)) for f in on_eval)

    # compile (or load from numba's cache) the kernels the steps will run, before the clock
    # starts: else the first step of the first fit in a process (per dtype and regime) would
    # charge up to seconds of compilation to the training time (time, time_to_target)
    impl.warm_up(params, grad, X, yi, yf, _run_batch_sizes(bs, n, sampler, drop_last), opt_state,
                 want_sqn=tracker is not None)
    try:
        for c in callbacks:
            if hasattr(c, "on_fit_start"):
                c.on_fit_start(model, hist)
        while True:
            B = bs.at_epoch(epoch)
            full = B == n and sampler != "replacement"
            n_steps = steps_per_epoch(n, B, drop_last)
            if pending is None:
                if stop:
                    break
                if full or sampler == "sequential":
                    src = seq
                elif sampler == "shuffle":
                    rng.shuffle(order)
                    src = order
                else:
                    src = draws = rng.integers(0, n, size=n_steps * B, dtype=np.int64)
                k0 = 0
                ep_loss = 0.0
                ep_count = 0
            else:
                src, k0, ep_loss, ep_count, k, lr = pending
                pending = None
                if full or sampler == "sequential":
                    src = seq
                if stop:
                    k0 = n_steps
            kk = k0
            while kk < n_steps:
                k = kk
                s0 = k * B
                b = min(B, len(src) - s0) if sampler != "replacement" else B
                m = _chunk_steps(device_loop, B, b, min(n_steps - k, (len(src) - s0) // B), step, seen, steps,
                                 examples, eval_every, ck_every)
                # full-batch gradient descent: one step an epoch, so a chunk spans epochs (as long
                # as nothing happens at their ends: evaluations every eval_every steps, not every
                # epoch, and the batch size schedule stays at the full batch)
                cross = m == 1 and full and n_steps == 1 and eval_every is not None and device_loop > 1
                if cross:
                    m = _chunk_steps(device_loop, B, b, device_loop if epochs is None else epochs - epoch, step,
                                     seen, steps, examples, eval_every, ck_every)
                    m = next((j for j in range(1, m) if bs.at_epoch(epoch + j) != B), m)
                if m > 1:
                    limit = getattr(impl, "max_run_steps", None)   # device memory of dropout masks
                    m = min(m, limit(b)) if limit is not None else m
                if device_loop:
                    # m steps on the device, read back once (see _chunk_steps); b == B when m > 1
                    if lr_fn is None:
                        lrs = [lr_const] * m
                    else:   # a schedule that raises at step s + j: run the j steps before it first
                        lrs = []
                        for j in range(m):
                            try:
                                lrs.append(_lr_at(lr_fn, step + j))
                            except Exception:
                                if j == 0:
                                    raise
                                break
                        m = len(lrs)
                    t0 = time.perf_counter()
                    chunk_idx = np.tile(src[:b], m) if cross else src[s0:s0 + m * b]
                    res = impl.run_steps(params, X, yi, yf, chunk_idx, b, m, opt_state, lrs, step + t1,
                                         dropout_rng=rng if dropout else None, update_running=bn)
                    dt = time.perf_counter() - t0
                    t_start = train_time
                    done = len(res["loss"])
                    for j in range(done):
                        loss, lr = float(res["loss"][j]), lrs[j]
                        if cross and j > 0:     # step j opens the next epoch: close the last one
                            hist.epochs.append({"epoch": epoch, "loss": ep_loss / ep_count, "batch_size": b,
                                                "steps": step, "examples": seen, "time": train_time,
                                                "lr": lrs[j - 1], "complete": True})
                            epoch += 1
                            ep_loss, ep_count = 0.0, 0
                        if not res["applied"][j]:
                            train_time = t_start + dt
                            opt_state.t = step - 1 + t1
                            raise _diverged(step, loss, params, hist, step == fresh_start)
                        seen += b
                        # per-step times inside a chunk are interpolated (one clock read per chunk)
                        train_time = t_start + dt * (j + 1) / m
                        hist.record_step(step, epoch, loss, lr, b, seen, train_time)
                        ep_loss += loss * b
                        ep_count += b
                        step += 1
                        if bar is not None:
                            bar.on_step(model, step, loss)
                    opt_state.t = step - 1 + t1
                    k = 0 if cross else kk + done - 1
                    kk = 1 if cross else kk + done
                else:
                    kk += 1
                    idx = src[s0:s0 + b]
                    # float(): a schedule may return an int or a numpy scalar; the kernels are
                    # compiled for a float64 learning rate only
                    lr = _lr_at(lr_fn, step) if lr_fn is not None else lr_const
                    t0 = time.perf_counter()
                    if tracker is None:
                        if dropout:     # the step's masks, from the sampler's generator
                            impl.draw_dropout(rng, b)
                        loss, ok, gsq = impl.train_step(params, grad, X, yi, yf, idx, b, opt_state, lr, step + t1)
                        if bn and ok:   # once per step, from this batch's statistics
                            impl.update_running(b)
                        train_time += time.perf_counter() - t0
                    else:
                        track = step % track_noise == 0
                        if track and track_gsnr is not None and step % track_gsnr == 0 and b >= 2:
                            tracker.add_extra(step, gsnr_summary(model, X, yi, yf, idx))
                            t0 = time.perf_counter()      # the GSNR pass is not training time
                        if dropout:
                            impl.draw_dropout(rng, b)
                        loss, ok, gsq = impl.train_step(params, grad, X, yi, yf, idx, b, opt_state, lr, step + t1,
                                                        track)
                        train_time += time.perf_counter() - t0
                        if track and ok:
                            tracker.update(step, b, sum64(impl.last_sqnorms(b)), gsq)
                    if not ok:
                        raise _diverged(step, loss, params, hist, step == fresh_start)
                    opt_state.t = step + t1
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
                if ck_every and step % ck_every == 0:
                    _write_checkpoint(ck_path, model, opt_state, rng, order, draws, hist,
                                      fit_info, step=step, seen=seen, train_time=train_time,
                                      epoch=epoch, k=k, ep_loss=ep_loss, ep_count=ep_count, lr=lr,
                                      n_evals=len(hist.evals), n_epochs=len(hist.epochs),
                                      reached=(hist.reached, hist.steps_to_target,
                                               hist.examples_to_target, hist.time_to_target),
                                      finished=False, stop_reason="", t1=t1)
            if ck_path is not None:
                close = (len(hist.evals), (hist.reached, hist.steps_to_target,
                                           hist.examples_to_target, hist.time_to_target))
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
        if ck_path is not None:
            # the state right after the last step's hooks (what a periodic checkpoint there
            # would hold), with the full history: resuming it redoes the epoch close-out and
            # the final evaluation, or goes on training under a larger budget
            _write_checkpoint(ck_path, model, opt_state, rng, order, draws, hist, fit_info,
                              step=step, seen=seen, train_time=train_time, epoch=epoch - 1, k=k,
                              ep_loss=ep_loss, ep_count=ep_count, lr=lr, n_evals=close[0],
                              n_epochs=len(hist.epochs) - 1, reached=close[1], finished=True,
                              stop_reason=stop, t1=t1)
    finally:
        if bar is not None:
            bar.close()
        for c in callbacks:
            if hasattr(c, "on_fit_end"):
                c.on_fit_end(model, hist)
    return hist
