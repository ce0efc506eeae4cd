"""Primitive transformations (compose them with :func:`minigd.optim.chain`)."""
from __future__ import annotations

from minigd._validation import check_float

from .base import OP_ADAM, OP_CLIP, OP_DECAY, OP_SCALE, OP_SCALE_LR, OP_TRACE, Primitive


def clip_by_global_norm(max_norm: float) -> Primitive:
    """u <- u * min(1, max_norm / ||u||_2) over the whole flat vector."""
    return Primitive("clip_by_global_norm", OP_CLIP,
                     (check_float("max_norm", max_norm, low=0, low_open=True),))


def add_decayed_weights(weight_decay: float) -> Primitive:
    """u <- u + wd * params.  Before momentum/Adam this is L2 regularisation (coupled);
    after Adam and before the learning rate it is decoupled weight decay (AdamW)."""
    return Primitive("add_decayed_weights", OP_DECAY,
                     (check_float("weight_decay", weight_decay, low=0),))


def trace(momentum: float, nesterov: bool = False) -> Primitive:
    """Heavy-ball momentum v <- m v + u, u <- v; Nesterov: u <- u + m v (PyTorch's form)."""
    m = check_float("momentum", momentum, low=0, high=1, high_open=True)
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov: expected a bool, got {type(nesterov).__name__}")
    return Primitive("trace", OP_TRACE, (m, 1.0 if nesterov else 0.0), slots=1)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Primitive:
    """Adam direction m_hat / (sqrt(v_hat) + eps) with bias-corrected moments
    (Kingma & Ba 2015, arXiv:1412.6980)."""
    return Primitive("scale_by_adam", OP_ADAM,
                     (check_float("b1", b1, low=0, high=1, high_open=True),
                      check_float("b2", b2, low=0, high=1, high_open=True),
                      check_float("eps", eps, low=0, low_open=True)), slots=2)


def scale_by_lr() -> Primitive:
    """u <- -lr(t) * u, with lr read from the optimizer's schedule at every step."""
    return Primitive("scale_by_lr", OP_SCALE_LR, ())


def scale(factor: float) -> Primitive:
    """u <- factor * u."""
    return Primitive("scale", OP_SCALE, (check_float("factor", factor),))
