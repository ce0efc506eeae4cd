"""``fit``'s side of checkpoints: checking where to write them, and restoring a run.

:func:`start_state` gives the :class:`~minigd.loop.LoopState` a run starts from: fresh,
or restored whole from a checkpoint written by ``fit(checkpoint=...)`` after checking that
the checkpoint continues this very run and that nothing in it is out of range (a
checkpoint may be damaged or crafted: nothing from the file reaches a kernel unchecked).
The writing side is :meth:`minigd.loop.Loop.checkpoint`.
"""

from __future__ import annotations

import math
import numbers
import os
import zlib

import numpy as np

from minigd._validation import _got, check_int
from minigd.data.samplers import Sampler, steps_per_epoch
from minigd.errors import CheckpointError
from minigd.history import History
from minigd.loop import LoopState, Plan
from minigd.model import MLP
from minigd.optim.base import OptState


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
            raise ValueError(
                f"checkpoint_every: needs checkpoint=<file path>, got checkpoint_every={every} and checkpoint=None"
            )
    src = None
    if resume is None or resume is False:
        pass
    elif resume is True:
        if path is None:
            raise ValueError("resume: resume=True continues from checkpoint=<file path>, but checkpoint is None")
        src = path if os.path.exists(path) else None  # nothing written yet: a fresh start
    elif isinstance(resume, Checkpoint):
        src = resume
    elif isinstance(resume, (str, os.PathLike)):
        src = _check_path(resume, "resume")
        if not os.path.exists(src):
            raise FileNotFoundError(f"resume: no checkpoint file at {src!r}")
        _refuse_special("resume", src)
    else:
        raise TypeError(f"resume: expected True, a checkpoint file path or a minigd Checkpoint, got {_got(resume)}")
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


def _ck_step(info: dict) -> int | None:
    """The checkpoint's step count where it is a plain integer in range, else None (which
    :func:`_check_loop_state` then refuses, naming ``step_info['step']``)."""
    from minigd.checkpoint import _MAX_COUNT

    v = info.get("step")
    return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 <= v <= _MAX_COUNT else None


def _fixed_period(saved: dict) -> dict:
    """The run record of a checkpoint of an adaptive run from a version whose decisions came
    every ``every`` steps (its settings have no ``max_every``): that schedule is
    ``max_every = every``, which this call must then ask for to resume it."""
    bs = saved.get("batch_size")
    cfg = bs.get("adaptive") if isinstance(bs, dict) else None
    if isinstance(cfg, dict) and "max_every" not in cfg and "every" in cfg:
        saved = {**saved, "batch_size": {**bs, "adaptive": {**cfg, "max_every": cfg["every"]}}}
    return saved


def _restore(ck, model, optimizer, fit_info, n, target, bs, ctrl=None):
    """Check that checkpoint ``ck`` continues this fit call; returns the restored pieces."""
    from minigd.checkpoint import load_checkpoint, optimizer_difference

    if isinstance(ck, str):
        # only the saved arrays are used: build the saved model on the reference backend,
        # which runs everywhere (a checkpoint from a GPU machine resumes on any backend)
        ck = load_checkpoint(ck, backend="numpy")
    name = f"resume: {ck.path or 'the checkpoint'}"
    info = ck.step_info
    if not isinstance(info, dict) or not isinstance(ck.sampler, dict) or not isinstance(ck.model, MLP):
        raise CheckpointError(
            f"{_ck_where(ck)}: cannot resume from it: step_info, sampler or model is of the wrong type", ck.path
        )
    if (
        not isinstance(info.get("fit"), dict)
        or ck.history is None
        or ck.opt_state is None
        or ck.rng_state is None
        or "order" not in ck.sampler
    ):
        raise ValueError(
            f"{name} was not written by fit (no training-loop state); load it with load_checkpoint and continue by hand"
        )
    mine = model.config()
    theirs = ck.model.config()
    for key in ("sizes", "activation", "loss", "dtype", "batch_norm", "ghost_batch_size", "dropout"):
        if mine.get(key) != theirs.get(key):
            raise ValueError(
                f"{name} holds a model with {key}={theirs.get(key)!r}, this model has {key}={mine.get(key)!r}"
            )
    saved = info["fit"]
    if not _plain_json(saved):  # (an array or a nested oddity would make == ambiguous)
        raise CheckpointError(
            f"{_ck_where(ck)}: cannot resume from it: its record of the run "
            f"(step_info['fit']) holds values that are not plain JSON",
            ck.path,
        )
    saved = _fixed_period(saved)
    for key, val in fit_info.items():
        if key != "optimizer" and saved.get(key) != val:
            what = (
                "the training data differ"
                if key in ("x_crc", "y_crc")
                else f"{key}={saved.get(key)!r} there, {val!r} here"
            )
            raise ValueError(f"{name} continues a different training run: {what}")
    # the chain and its hyper-parameters, and the learning rate where it can be compared
    # (a number or a minigd schedule object; checkpoints of older versions: the chain only)
    rec = saved.get("optimizer")
    if rec is not None and not (isinstance(rec, dict) and isinstance(rec.get("config", {}), dict)):
        raise CheckpointError(
            f"{_ck_where(ck)}: cannot resume from it: its optimizer record {str(rec)[:80]} is malformed", ck.path
        )
    if not isinstance(ck.opt_state, OptState):
        raise CheckpointError(
            f"{_ck_where(ck)}: cannot resume from it: its opt_state is "
            f"{type(ck.opt_state).__name__}, not a minigd OptState",
            ck.path,
        )
    diff = optimizer_difference(saved.get("optimizer"), optimizer, ck.opt_state.primitives)
    if diff:
        raise ValueError(
            f"{name} was written with another optimizer chain or hyper-parameters: "
            f"{'; '.join(diff)} (this call has {optimizer!r})"
        )
    if ctrl is not None:  # adaptive: the controller first (it says how the epoch was laid out)
        ctrl.restore(info.get("adaptive"), ck.history.noise_tracker, _ck_where(ck), _ck_step(info))
    _check_loop_state(
        ck, model, optimizer, n, bs, fit_info["sampler"], fit_info["drop_last"], None if ctrl is None else ctrl.epoch_B
    )
    hist = ck.history
    n_evals, n_epochs = int(info["n_evals"]), int(info["n_epochs"])
    del hist.evals[n_evals:]
    del hist.epochs[n_epochs:]
    if hist.target == target:
        hist.reached, hist.steps_to_target, hist.examples_to_target, hist.time_to_target = info["reached"]
    else:  # another target: judged from the resume point on
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


def _check_loop_state(ck, model, optimizer, n, bs, sampler, drop_last, epoch_B=None) -> None:
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
    info.setdefault("t1", 1)  # (older checkpoints: the run started from a fresh optimizer)
    need(isinstance(hist, History), f"its history is {type(hist).__name__}, not a minigd History")
    # the model's parameters and running statistics (shapes were compared by configuration)
    for vec, what in ((ck.model.params, "params"), (ck.model.running, "running")):
        need(
            isinstance(vec, np.ndarray) and vec.dtype == model.dtype and vec.shape == getattr(model, what).shape,
            f"{what} has {_got(vec)}, expected {getattr(model, what).shape} {model.dtype}",
        )
        need(np.isfinite(vec).all(), f"{what} holds NaN/inf entries")
    # the optimizer state: against this call's optimizer (its chain was compared already)
    need(isinstance(st, OptState), f"its opt_state is {type(st).__name__}, not a minigd OptState")
    ref = optimizer.init(model.params)
    T = len(ref.primitives)
    for k in ("codes", "hp", "soff", "state"):
        a, want = getattr(st, k), getattr(ref, k)
        need(
            isinstance(a, np.ndarray) and a.shape == want.shape and a.dtype == want.dtype,
            f"opt_state.{k} has {_got(a)}, the optimizer needs shape {want.shape} dtype {want.dtype}",
        )
    need(
        np.array_equal(st.codes, ref.codes)
        and np.array_equal(st.soff, ref.soff)
        and np.array_equal(st.hp[:T, :3], ref.hp[:T, :3])
        and np.array_equal(st.hp[T, 5:], ref.hp[T, 5:])
        and isinstance(st.plan, np.ndarray)
        and np.array_equal(st.plan, ref.plan),
        "opt_state's op codes, offsets or hyper-parameters do not match the optimizer",
    )
    need(np.isfinite(st.hp).all() and np.isfinite(st.state).all(), "opt_state holds NaN/inf entries")
    # the counters
    keys = ("step", "examples", "epoch", "k", "ep_count", "n_evals", "n_epochs", "t1")
    for key in keys:
        need(
            is_int(info.get(key), low=-1 if key == "k" else 1 if key == "t1" else 0),
            f"step_info[{key!r}] is {info.get(key)!r}, expected an integer in range",
        )
    step, seen, epoch, k = info["step"], info["examples"], info["epoch"], info["k"]
    for key in ("ep_loss", "lr", "train_time"):
        need(is_num(info.get(key)), f"step_info[{key!r}] is {info.get(key)!r}, expected a finite number")
    need(info["train_time"] >= 0 and info["lr"] >= 0, "a negative training time or learning rate")
    need(
        info.get("finished") in (True, False) and isinstance(info.get("stop_reason"), str),
        "step_info['finished'] / ['stop_reason'] are malformed",
    )
    r = info.get("reached")
    need(
        isinstance(r, list)
        and len(r) == 4
        and r[0] in (None, True, False)
        and all(v is None or is_int(v) for v in r[1:3])
        and (r[3] is None or is_num(r[3])),
        f"step_info['reached'] is {str(r)[:80]}, expected [reached, steps, examples, time]",
    )
    need(
        st.t == step + info["t1"] - 1 and is_int(st.t),
        f"the optimizer's update count t={st.t!r} does not follow from step={step} and t1={info['t1']}",
    )
    need(hist.n_steps == step, f"the history has {hist.n_steps} steps, step_info says {step}")
    need(
        info["n_evals"] <= len(hist.evals) and info["n_epochs"] <= len(hist.epochs),
        "step_info counts more evaluations or epochs than the history holds",
    )
    need(epoch <= step, f"epoch {epoch} after only {step} steps")
    B = bs.at_epoch(epoch) if epoch_B is None else epoch_B  # (adaptive: sizes change within an epoch)
    n_steps = steps_per_epoch(n, B, drop_last)
    if epoch_B is None:
        need(k < n_steps, f"position k={k} in an epoch of {n_steps} steps")
    else:
        need(
            info["ep_count"] <= (n_steps * B if sampler == "replacement" else n),
            f"{info['ep_count']} rows done in an epoch of {n_steps * B if sampler == 'replacement' else n}",
        )
    if step:
        ep_col = hist._cols["epoch"][:step]
        in_epoch = step - int(np.flatnonzero(ep_col != epoch)[-1]) - 1 if (ep_col != epoch).any() else step
        need(
            ep_col[-1] == epoch and hist._cols["examples"][step - 1] == seen,
            f"epoch {epoch} / examples {seen} disagree with the history's last step",
        )
        need(
            in_epoch == k + 1 and info["ep_count"] == int(hist._cols["batch_size"][step - in_epoch : step].sum()),
            f"position k={k} / ep_count={info['ep_count']} disagree with the history's steps in epoch {epoch}",
        )
    else:
        need(seen == 0 and k == -1 and info["ep_count"] == 0, "counters of a run without steps are not zero")
    # the sampler: what indexes the rows of X in every step
    order = ck.sampler["order"]
    need(
        isinstance(order, np.ndarray) and order.shape == (n,) and order.dtype == np.int64,
        f"the saved permutation is {_got(order)}, expected shape ({n},) int64",
    )
    need(
        n and order.min() >= 0 and order.max() < n and bool((np.bincount(order, minlength=n) == 1).all()),
        f"the saved order is not a permutation of range({n})",
    )
    if sampler == "replacement":
        draws = ck.sampler.get("draws")
        need(
            isinstance(draws, np.ndarray) and draws.ndim == 1 and draws.dtype == np.int64,
            f"the i.i.d. draws of the current epoch are missing or malformed ({_got(draws)})",
        )
        need(
            draws.shape == (n_steps * B,),
            f"the i.i.d. draws hold {draws.shape[0]} indices, an epoch of {n_steps} steps of {B} needs {n_steps * B}",
        )
        need(draws.min() >= 0 and draws.max() < n, f"the i.i.d. draws hold indices outside [0, {n})")
    tr = hist.noise_tracker
    if tr is not None:
        need(
            getattr(tr, "n", None) == n and getattr(tr, "replacement", None) == (sampler == "replacement"),
            "its noise tracker was made for other data or another sampler",
        )
    try:
        ck.rng()
    except Exception as exc:
        raise CheckpointError(
            f"{where}: cannot resume from it: invalid random generator state ({exc})", ck.path
        ) from None


def start_state(p: Plan, optimizer, opt_state: OptState | None, rng: np.random.Generator, resume_src) -> tuple:
    """The (LoopState, History) run ``p`` starts from: restored from ``resume_src`` (a path
    or a Checkpoint, checked against this run), else fresh (``opt_state`` continues an
    earlier optimizer state: its update count goes on)."""
    model, n = p.model, p.n
    sampler = Sampler(p.sampler, n, rng, p.drop_last)
    if resume_src is None:
        t1 = 1
        if opt_state is None:
            opt_state = optimizer.init(model.params)
        else:
            t1 = int(opt_state.t) + 1
        cap = p.steps or (p.epochs * steps_per_epoch(n, p.bs.at_epoch(0), p.drop_last) if p.epochs else 1024)
        hist = History(capacity=min(cap, 1 << 20))
        hist.target = p.target
        hist.noise_tracker = p.tracker
        if p.target is not None:
            hist.reached = False
        return LoopState(sampler=sampler, rng=rng, opt_state=opt_state, t1=t1), hist
    ck, hist = _restore(resume_src, model, optimizer, p.fit_info, n, p.target, p.bs, p.ctrl)
    info = ck.step_info
    model.params[...] = ck.model.params
    model.running[...] = ck.model.running  # batch norm's running statistics
    rng = ck.rng()
    sampler.rng = rng
    epoch, k = int(info["epoch"]), int(info["k"])
    sampler.restore(p.bs.at_epoch(epoch), int(info["ep_count"]), ck.sampler["order"], ck.sampler.get("draws"))
    if p.tracker is not None:
        p.tracker = hist.noise_tracker
    if p.ctrl is not None:
        hist.adaptive = p.ctrl.decisions or None
    state = LoopState(
        sampler=sampler,
        rng=rng,
        opt_state=ck.opt_state,
        step=int(info["step"]),
        examples=int(info["examples"]),
        train_time=float(info["train_time"]),
        epoch=epoch,
        k=k,
        ep_loss=float(info["ep_loss"]),
        ep_count=int(info["ep_count"]),
        lr=float(info["lr"]),
        t1=int(info.get("t1", 1)),
        resumed=True,
        mid_epoch=True,
    )
    return state, hist
