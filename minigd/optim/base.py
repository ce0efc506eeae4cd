"""Optimizers as chains of primitive transformations over the flat parameter vector.

An optimizer is a sequence of primitives, each mapping the incoming direction ``u``
(initially the gradient of the mean batch loss) to a new one, possibly with its own state
of P-sized slots (optax's design, with flat arrays instead of pytrees).  Exactly one
primitive, ``scale_by_lr``, scales by ``-lr`` (:func:`chain` refuses chains without it);
the result is added to the parameters.

Every primitive has a readable NumPy update (the reference, used by the ``numpy`` backend)
and an integer code that the compiled backends interpret in one fused call
(``kernels/cpu.py::_opt_apply``).  Both read the same ``OptState`` buffers, so the two
implementations are checked against each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

# the op codes and FLUSH (optimizer state below this magnitude is flushed to 0 by the
# compiled backends, to keep the arithmetic out of (100x slower) subnormal numbers) live in
# the one table of kernel codes
from minigd.kernels.codes import FLUSH, OP_ADAM, OP_CLIP, OP_DECAY, OP_SCALE, OP_SCALE_LR, OP_TRACE  # noqa: F401

#: the meaning of each primitive's hyper-parameters, by op code (for messages)
HP_NAMES = {
    OP_CLIP: ("max_norm",),
    OP_DECAY: ("weight_decay",),
    OP_TRACE: ("momentum", "nesterov"),
    OP_ADAM: ("b1", "b2", "eps"),
    OP_SCALE_LR: (),
    OP_SCALE: ("factor",),
}
_HP_COLS = 8  # columns 0..2 hyper-parameters, 3.. scratch for in-kernel dtype casts


@dataclass(frozen=True)
class Primitive:
    """One transformation of the update direction.

    Attributes
    ----------
    name : str
    code : int
        The kernel's op code.
    hp : tuple of float
        Up to three hyper-parameters (their meaning depends on ``code``).
    slots : int
        Number of P-sized state vectors (momentum: 1, Adam: 2).
    """

    name: str
    code: int
    hp: tuple = ()
    slots: int = 0

    def update_numpy(self, u, params, state, hp_row, lr, t):
        """Reference update: turns ``u`` into the new direction in place.

        ``state`` is a (slots * P,) view; ``hp_row`` is this primitive's row of the
        hyper-parameter table (model dtype), so arithmetic happens in the model dtype.
        """
        P = u.shape[0]
        if self.code == OP_CLIP:  # u *= min(1, max_norm / |u|)
            norm = np.sqrt(np.sum(u.astype(np.float64) ** 2))
            if norm > hp_row[0]:
                u *= u.dtype.type(hp_row[0] / norm)
        elif self.code == OP_DECAY:  # u += wd * params
            u += hp_row[0] * params
        elif self.code == OP_TRACE:  # v = m v + u ; u = v  (Nesterov: u + m v)
            m, v = hp_row[0], state[:P]
            v *= m
            v += u
            if hp_row[1] != 0:
                u += m * v
            else:
                u[...] = v
        elif self.code == OP_ADAM:  # Kingma & Ba 2015, bias-corrected moments
            b1, b2, eps = hp_row[0], hp_row[1], hp_row[2]
            m1, m2 = state[:P], state[P : 2 * P]
            ob1, ob2 = u.dtype.type(1 - b1), u.dtype.type(1 - b2)
            m1[...] = b1 * m1 + ob1 * u
            m2[...] = b2 * m2 + ob2 * u * u
            c1 = u.dtype.type(1.0 - float(b1) ** t)
            c2 = u.dtype.type(1.0 - float(b2) ** t)
            u[...] = (m1 / c1) / (np.sqrt(m2 / c2) + eps)
        elif self.code == OP_SCALE_LR:  # u *= -lr
            u *= u.dtype.type(-lr)
        elif self.code == OP_SCALE:
            u *= hp_row[0]
        else:  # pragma: no cover
            raise ValueError(f"unknown primitive code {self.code}")


@dataclass
class OptState:
    """The buffers an optimizer needs for one parameter vector.

    codes : (T,) int64 op codes; hp : (T + 1, 8) model-dtype hyper-parameters (+ scratch
    columns and a spare row);
    soff : (T,) int64 offsets into ``state``; state : (S,) model-dtype slots (momentum,
    Adam moments); plan : int64 (6,) the fused-pass plan for compiled backends (see
    :func:`fusion_plan`); t : number of updates applied so far.
    """

    primitives: tuple
    codes: np.ndarray
    hp: np.ndarray
    soff: np.ndarray
    state: np.ndarray
    plan: np.ndarray | None = None
    t: int = 0

    def apply_numpy(self, params, grad, lr, t):
        """Reference optimizer step (the ``numpy`` backend's opt_apply); returns
        (applied, |raw gradient|^2)."""
        gsq = float(np.sum(grad.astype(np.float64) ** 2))
        P = params.shape[0]
        for k, prim in enumerate(self.primitives):
            so = int(self.soff[k])
            prim.update_numpy(grad, params, self.state[so : so + prim.slots * P], self.hp[k], lr, t)
        new = params + grad
        if not np.isfinite(new.astype(np.float64).sum()):
            return False, gsq
        params[...] = new
        return True, gsq


@dataclass(frozen=True)
class Optimizer:
    """A chain of primitives plus the learning-rate schedule read by ``scale_by_lr``.

    Build one with :func:`minigd.SGD`, :func:`minigd.Adam`, :func:`minigd.AdamW` or
    :func:`chain`.  ``lr`` is a float or a callable ``step -> lr`` (see
    :mod:`minigd.optim.schedules`).
    """

    primitives: tuple
    lr: Callable[[int], float] | float = 0.0
    name: str = "chain"
    config: dict = field(default_factory=dict, compare=False)

    def lr_at(self, step: int) -> float:
        return float(self.lr(step)) if callable(self.lr) else float(self.lr)

    def init(self, params: np.ndarray) -> OptState:
        P = params.shape[0]
        dt = params.dtype
        T = len(self.primitives)
        codes = np.array([p.code for p in self.primitives], dtype=np.int64)
        hp = np.zeros((T + 1, _HP_COLS), dtype=dt)  # spare last row: typed constants
        hp[T, 5] = FLUSH  # (column 5: the subnormal flush threshold,
        hp[T, 6] = 1  #  column 6: one, column 7: zero)
        soff = np.zeros(T, dtype=np.int64)
        off = 0
        for k, p in enumerate(self.primitives):
            hp[k, : len(p.hp)] = p.hp
            soff[k] = off
            off += p.slots * P
        return OptState(
            tuple(self.primitives), codes, np.ascontiguousarray(hp), soff, np.zeros(off, dtype=dt), fusion_plan(codes)
        )

    def __repr__(self):
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"


def fusion_plan(codes) -> np.ndarray:
    """How a compiled backend may run the chain in one pass over the parameters.

    Returns int64 [fused, i_clip, i_decay_before, i_trace_or_adam, i_decay_after, i_lr]
    (row indices, -1 when absent).  ``fused`` is 1 when the chain has the shape
    [clip] [decay] [trace | adam] [decay] [scale_by_lr] (every named optimizer does),
    else 0 and the backend runs the primitives one pass each.
    """
    plan = [1, -1, -1, -1, -1, -1]
    k = 0
    codes = [int(c) for c in codes]
    n = len(codes)
    if k < n and codes[k] == OP_CLIP:
        plan[1] = k
        k += 1
    if k < n and codes[k] == OP_DECAY:
        plan[2] = k
        k += 1
    if k < n and codes[k] in (OP_TRACE, OP_ADAM):
        plan[3] = k
        k += 1
    if k < n and codes[k] == OP_DECAY:
        plan[4] = k
        k += 1
    if k < n and codes[k] == OP_SCALE_LR:
        plan[5] = k
        k += 1
    if k != n:
        plan = [0, -1, -1, -1, -1, -1]
    return np.array(plan, dtype=np.int64)


def chain(*primitives: Primitive, lr: float | Callable[[int], float]) -> Optimizer:
    """Compose primitives (applied left to right) into an optimizer.

    The chain maps the gradient to the update that is *added* to the parameters, so it
    must hold exactly one :func:`~minigd.optim.scale_by_lr` (``u <- -lr(t) u``): it
    supplies both the descent sign and the learning rate ``lr``.  A chain without one
    (the empty chain included) would add the raw gradient -- gradient ascent, with ``lr``
    ignored -- and two of them would multiply by ``lr**2`` with a positive sign, so both
    are a ``ValueError``.  After ``scale_by_lr`` the primitives act on the step itself:
    ``scale``, ``clip_by_global_norm`` (a cap on the step length) and ``trace``
    (momentum on steps, Sutskever's form) are allowed; ``add_decayed_weights`` (it
    would add ``+wd * params``: weight growth) and ``scale_by_adam`` (it would normalise
    ``lr`` away) are refused.

    Parameters
    ----------
    *primitives : Primitive
        Applied left to right.
    lr : float >= 0 or callable step -> float
        The learning rate (or schedule, :mod:`minigd.optim.schedules`) read by
        ``scale_by_lr``; required (a default of 0 would make a chain that silently
        trains nothing).

    Examples
    --------
    >>> import minigd as mg
    >>> opt = mg.optim.chain(mg.optim.clip_by_global_norm(1.0), mg.optim.trace(0.9),
    ...                      mg.optim.scale_by_lr(), lr=0.05)
    """
    from minigd._constraints import check_param

    for p in primitives:
        if not isinstance(p, Primitive):
            raise TypeError(f"chain: expected minigd.optim primitives, got {type(p).__name__}")
    names = [p.name for p in primitives]
    at = [k for k, p in enumerate(primitives) if p.code == OP_SCALE_LR]
    if len(at) != 1:
        raise ValueError(
            f"chain: expected exactly one scale_by_lr() (it applies -lr: without it the "
            f"gradient is added to the parameters, gradient ascent with lr ignored; "
            f"with two the step is +lr**2 times the gradient), got {len(at)} in {names}; "
            f"e.g. chain(..., mg.optim.scale_by_lr(), lr=0.1)"
        )
    for p in primitives[at[0] + 1 :]:
        if p.code in (OP_DECAY, OP_ADAM):
            why = (
                "would add +weight_decay * params to the step (weights grow)"
                if p.code == OP_DECAY
                else "would normalise the step, so lr would have no effect"
            )
            raise ValueError(f"chain: {p.name} after scale_by_lr {why}; put it before scale_by_lr, got {names}")
    lr = check_param("lr", lr, "lr_or_schedule")
    return Optimizer(tuple(primitives), lr, "chain", {"primitives": names, "lr": lr})


def chain_difference(saved: Sequence[Primitive], given: Sequence[Primitive]) -> list:
    """How chain ``given`` differs from chain ``saved``: a list of strings such as
    ``"trace momentum: saved 0.9, given 0.5"`` (empty when they are the same)."""
    saved, given = tuple(saved), tuple(given)
    if [p.name for p in saved] != [p.name for p in given]:
        return [f"primitives: saved {[p.name for p in saved]}, given {[p.name for p in given]}"]
    out = []
    for a, b in zip(saved, given):
        if a == b:
            continue
        names = HP_NAMES.get(a.code, ())
        for j in range(max(len(a.hp), len(b.hp))):
            va = a.hp[j] if j < len(a.hp) else None
            vb = b.hp[j] if j < len(b.hp) else None
            if va != vb:
                what = names[j] if j < len(names) else f"hp[{j}]"
                if what == "nesterov":
                    va, vb = bool(va), bool(vb)
                out.append(f"{a.name} {what}: saved {va!r}, given {vb!r}")
        if (a.code, a.slots) != (b.code, b.slots) and not out:
            out.append(f"{a.name}: saved {a!r}, given {b!r}")
    return out


def as_sequence(x) -> Sequence:
    return x if isinstance(x, (list, tuple)) else (x,)
