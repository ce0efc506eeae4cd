"""Primitive transformations (compose them with :func:`minigd.optim.chain`)."""

from __future__ import annotations

from minigd._constraints import check_param

from .base import OP_ADAM, OP_CLIP, OP_DECAY, OP_SCALE, OP_SCALE_LR, OP_TRACE, Primitive


def clip_by_global_norm(max_norm: float) -> Primitive:
    """u <- u * min(1, max_norm / ||u||_2) over the whole flat vector."""
    return Primitive("clip_by_global_norm", OP_CLIP, (check_param("max_norm", max_norm),))


def add_decayed_weights(weight_decay: float) -> Primitive:
    """u <- u + wd * params.  Before momentum/Adam this is L2 regularisation (coupled);
    after Adam and before the learning rate it is decoupled weight decay (AdamW)."""
    return Primitive("add_decayed_weights", OP_DECAY, (check_param("weight_decay", weight_decay),))


def trace(momentum: float, nesterov: bool = False) -> Primitive:
    """Heavy-ball momentum v <- m v + u, u <- v; Nesterov: u <- u + m v (PyTorch's form)."""
    m = check_param("momentum", momentum)
    nesterov = check_param("nesterov", nesterov)
    return Primitive("trace", OP_TRACE, (m, 1.0 if nesterov else 0.0), slots=1)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Primitive:
    """Adam direction m_hat / (sqrt(v_hat) + eps) with bias-corrected moments
    (Kingma & Ba 2015, arXiv:1412.6980)."""
    return Primitive(
        "scale_by_adam",
        OP_ADAM,
        (check_param("b1", b1, "beta1"), check_param("b2", b2, "beta2"), check_param("eps", eps)),
        slots=2,
    )


def scale_by_lr() -> Primitive:
    """u <- -lr(t) * u, with lr read from the optimizer's schedule at every step."""
    return Primitive("scale_by_lr", OP_SCALE_LR, ())


def scale(factor: float) -> Primitive:
    """u <- factor * u."""
    return Primitive("scale", OP_SCALE, (check_param("factor", factor),))
