"""The named optimizers, built as chains of primitives."""

from __future__ import annotations

from collections.abc import Callable

from minigd._constraints import check_param

from .base import Optimizer
from .transforms import add_decayed_weights, clip_by_global_norm, scale_by_adam, scale_by_lr, trace


def _check_lr(lr):
    return check_param("lr", lr, "lr_or_schedule")


def _clip(clip_norm):
    if clip_norm is None:
        return []
    return [clip_by_global_norm(check_param("clip_norm", clip_norm))]


def _check_betas(betas):
    """(b1, b2), each in [0, 1); errors name ``betas``."""
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise TypeError(f"betas: expected a pair (beta1, beta2) of numbers in [0, 1), got {betas!r}")
    return tuple(check_param(f"betas[{i}]", b, f"beta{i + 1}") for i, b in enumerate(betas))


def SGD(
    lr: float | Callable[[int], float] = 0.1,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    clip_norm: float | None = None,
) -> Optimizer:
    r"""Stochastic gradient descent, optionally with momentum and weight decay.

    .. math::
        g \leftarrow g + \lambda\theta;\quad v \leftarrow m v + g;\quad
        \theta \leftarrow \theta - \eta\,(v \text{ or } g + m v \text{ (Nesterov)})

    This is PyTorch's ``torch.optim.SGD`` (dampening 0).  With
    ``decoupled_weight_decay=True`` the decay is added after momentum instead
    (``theta -= lr * (v + wd * theta)``).  ``clip_norm`` clips the gradient's global norm
    first.

    Parameters
    ----------
    lr : float or callable step -> float
        Learning rate or schedule (:mod:`minigd.optim.schedules`).
    momentum : float in [0, 1)
    nesterov : bool
    weight_decay : float >= 0
    decoupled_weight_decay : bool
    clip_norm : float > 0 or None

    Examples
    --------
    >>> import minigd as mg
    >>> opt = mg.SGD(lr=0.1, momentum=0.9, nesterov=True)
    """
    lr = _check_lr(lr)
    momentum = check_param("momentum", momentum)
    nesterov = check_param("nesterov", nesterov)
    decoupled_weight_decay = check_param("decoupled_weight_decay", decoupled_weight_decay)
    weight_decay = check_param("weight_decay", weight_decay)
    prims = _clip(clip_norm)
    if weight_decay and not decoupled_weight_decay:
        prims.append(add_decayed_weights(weight_decay))
    if momentum or nesterov:
        if nesterov and not momentum:
            raise ValueError("nesterov: expected momentum > 0 with nesterov=True, got momentum=0")
        prims.append(trace(momentum, nesterov))
    if weight_decay and decoupled_weight_decay:
        prims.append(add_decayed_weights(weight_decay))
    prims.append(scale_by_lr())
    return Optimizer(
        tuple(prims),
        lr,
        "SGD",
        dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            clip_norm=clip_norm,
        ),
    )


def Adam(
    lr: float | Callable[[int], float] = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
) -> Optimizer:
    r"""Adam (Kingma & Ba 2015) with L2-coupled weight decay (as ``torch.optim.Adam``).

    .. math::
        g \leftarrow g + \lambda\theta;\; m \leftarrow \beta_1 m + (1-\beta_1) g;\;
        v \leftarrow \beta_2 v + (1-\beta_2) g^2;\;
        \theta \leftarrow \theta - \eta\,\hat m / (\sqrt{\hat v} + \epsilon)
    """
    lr = _check_lr(lr)
    prims = _clip(clip_norm)
    wd = check_param("weight_decay", weight_decay)
    if wd:
        prims.append(add_decayed_weights(wd))
    betas = _check_betas(betas)
    prims += [scale_by_adam(betas[0], betas[1], eps), scale_by_lr()]
    return Optimizer(
        tuple(prims), lr, "Adam", dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=wd, clip_norm=clip_norm)
    )


def AdamW(
    lr: float | Callable[[int], float] = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    clip_norm: float | None = None,
) -> Optimizer:
    r"""AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101): decoupled weight decay,
    :math:`\theta \leftarrow \theta - \eta\,(\hat m/(\sqrt{\hat v}+\epsilon) + \lambda\theta)`,
    as ``torch.optim.AdamW``."""
    lr = _check_lr(lr)
    wd = check_param("weight_decay", weight_decay)
    betas = _check_betas(betas)
    prims = _clip(clip_norm) + [scale_by_adam(betas[0], betas[1], eps)]
    if wd:
        prims.append(add_decayed_weights(wd))
    prims.append(scale_by_lr())
    return Optimizer(
        tuple(prims), lr, "AdamW", dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=wd, clip_norm=clip_norm)
    )
