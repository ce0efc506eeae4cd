"""Learning-rate schedules (pure functions of the step), batch-size schedules and LR
scaling rules.

A learning-rate schedule is any callable ``step -> lr`` (step counts from 0); the classes
here are small frozen dataclasses so that they print, compare and pickle (sweeps key their
trials by configuration).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from minigd._constraints import _got, check_param


@dataclass(frozen=True)
class Constant:
    lr: float

    def __call__(self, step: int) -> float:
        return self.lr


@dataclass(frozen=True)
class StepDecay:
    """lr * factor ** (number of boundaries <= step)."""

    lr: float
    boundaries: tuple
    factor: float = 0.1

    def __call__(self, step: int) -> float:
        return self.lr * self.factor ** bisect.bisect_right(self.boundaries, step)


@dataclass(frozen=True)
class Exponential:
    """lr * decay_rate ** (step / decay_steps)."""

    lr: float
    decay_rate: float
    decay_steps: int = 1

    def __call__(self, step: int) -> float:
        return self.lr * self.decay_rate ** (step / self.decay_steps)


@dataclass(frozen=True)
class Cosine:
    """final_lr + (lr - final_lr) * (1 + cos(pi * min(step, total) / total)) / 2."""

    lr: float
    total_steps: int
    final_lr: float = 0.0

    def __call__(self, step: int) -> float:
        s = min(step, self.total_steps) / self.total_steps
        return self.final_lr + (self.lr - self.final_lr) * 0.5 * (1 + math.cos(math.pi * s))


@dataclass(frozen=True)
class Warmup:
    """Linear warm-up from ``start_lr`` to ``schedule(step)`` over ``warmup_steps`` steps
    (Goyal et al. 2017, arXiv:1706.02677), then ``schedule`` itself."""

    schedule: Callable[[int], float] | float
    warmup_steps: int
    start_lr: float = 0.0

    def __call__(self, step: int) -> float:
        target = self.schedule(step) if callable(self.schedule) else float(self.schedule)
        if step >= self.warmup_steps:
            return target
        frac = (step + 1) / (self.warmup_steps + 1)
        return self.start_lr + (target - self.start_lr) * frac


def constant(lr):
    return Constant(check_param("lr", lr))


def step_decay(lr, boundaries, factor=0.1):
    if isinstance(boundaries, (str, bytes, dict)) or not hasattr(boundaries, "__iter__"):
        raise TypeError(f"boundaries: expected a sequence of step numbers (e.g. [100, 200]), got {_got(boundaries)}")
    b = tuple(check_param("boundaries", x, "boundary") for x in boundaries)
    if list(b) != sorted(b):
        raise ValueError(f"boundaries: expected increasing steps, got {b}")
    return StepDecay(check_param("lr", lr), b, check_param("factor", factor, "decay_factor"))


def exponential(lr, decay_rate, decay_steps=1):
    return Exponential(
        check_param("lr", lr), check_param("decay_rate", decay_rate), check_param("decay_steps", decay_steps)
    )


def cosine(lr, total_steps, final_lr=0.0):
    return Cosine(check_param("lr", lr), check_param("total_steps", total_steps), check_param("final_lr", final_lr))


def warmup(schedule, warmup_steps, start_lr=0.0):
    if not callable(schedule):
        schedule = constant(schedule)
    return Warmup(schedule, check_param("warmup_steps", warmup_steps), check_param("start_lr", start_lr))


def scale_lr(base_lr: float, batch_size: int, base_batch_size: int, rule: str = "linear") -> float:
    """Learning rate for ``batch_size`` from one tuned at ``base_batch_size``.

    ``"linear"``: base_lr * B / B0 (Goyal et al. 2017); ``"sqrt"``: base_lr * sqrt(B / B0)
    (Hoffer et al. 2017); ``"none"``: base_lr.
    """
    base_lr = check_param("base_lr", base_lr)
    B = check_param("batch_size", batch_size, "base_batch_size")
    B0 = check_param("base_batch_size", base_batch_size)
    rule = check_param("rule", rule, "lr_rule")
    k = B / B0
    return base_lr * (k if rule == "linear" else math.sqrt(k) if rule == "sqrt" else 1.0)


@dataclass(frozen=True)
class BatchSizeSchedule:
    """Grow the batch at given epochs instead of decaying the learning rate
    (Smith, Kindermans, Ying & Le 2018, arXiv:1711.00489).

    ``BatchSizeSchedule(32, {10: 128, 20: 512})`` trains with batch 32 for epochs 0-9,
    128 for epochs 10-19 and 512 from epoch 20 on.  Pass it as ``fit(batch_size=...)``.
    """

    initial: int
    milestones: tuple = ()  # ((epoch, batch_size), ...) sorted by epoch

    def __init__(self, initial: int, milestones: dict | Sequence | None = None) -> None:
        object.__setattr__(self, "initial", check_param("initial", initial, "base_batch_size"))
        expect = "a dict {epoch: batch_size} or a sequence of (epoch, batch_size) pairs"
        if milestones is None:
            milestones = {}
        if isinstance(milestones, dict):
            items = list(milestones.items())
        elif isinstance(milestones, (str, bytes)) or not hasattr(milestones, "__iter__"):
            raise TypeError(f"milestones: expected {expect}, got {_got(milestones)}")
        else:
            items = list(milestones)
            for i, it in enumerate(items):
                if isinstance(it, (str, bytes)) or not hasattr(it, "__len__") or len(it) != 2:
                    raise TypeError(f"milestones[{i}]: expected an (epoch, batch_size) pair, got {_got(it)}")
            items = [tuple(it) for it in items]
        for e, b in items:
            check_param("milestones epoch", e, "boundary")
            check_param("milestones batch size", b, "base_batch_size")
        items = sorted(items)
        object.__setattr__(self, "milestones", tuple((int(e), int(b)) for e, b in items))

    def at_epoch(self, epoch: int) -> int:
        B = self.initial
        for e, b in self.milestones:
            if epoch >= e:
                B = b
        return B

    @property
    def max_batch(self) -> int:
        return max([self.initial] + [b for _, b in self.milestones])
