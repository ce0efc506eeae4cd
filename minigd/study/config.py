"""Trial configurations: what one training run of a sweep is, and its key.

A trial is fully described by a :class:`TrialConfig` (frozen, JSON-serialisable).  Its
``key`` is a digest of that JSON: the results store has one row per key, so a resumed
sweep recognises finished trials whatever order they are generated in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

#: bump when the meaning of a stored result changes; it is part of every trial key.
#: 2: steps to target evaluated on a geometric schedule and interpolated; the noise scale
#: measured on the whole training set (a biased fixed 512-row subset before)
SCHEMA_VERSION = 2


@dataclass(frozen=True)
class DataSpec:
    """Which dataset, and how it is split and preprocessed (see minigd.data)."""

    name: str = "digits"
    val_fraction: float = 0.2
    standardize: bool = True
    seed: int = 0
    params: tuple = (("std_floor", 1.0),)  # sorted (key, value) pairs passed to the loader;
    #   digits pixels are 0..16: features with std <= 1 are only centred (not blown up)

    def kwargs(self) -> dict:
        return dict(self.params)


@dataclass(frozen=True)
class TrialConfig:
    """One training run: model, data, batch size, optimizer, budget, target and seed.

    ``lr`` is the learning rate actually used at this batch size (whatever policy chose
    it); ``lr_policy`` records how ("tuned" over a grid, or a scaling rule from a base
    batch size) so the analysis can group trials.

    ``batch_size="adaptive"``: the trial trains with ``fit(batch_size=AdaptiveBatchSize(
    **dict(adaptive)))`` -- the controller picks the batch size as it goes (see
    :mod:`minigd.adaptive`); ``lr`` is then the rate at its smallest (starting) batch size,
    which the controller scales.  ``adaptive`` holds the controller's settings as sorted
    ``(name, value)`` pairs (:data:`ADAPTIVE_SETTINGS`); ``()`` for a fixed batch size.
    """

    data: DataSpec = field(default_factory=DataSpec)
    sizes: tuple = (64, 64, 10)
    activation: str = "relu"
    loss: str = "cross_entropy"
    dtype: str = "float32"
    init: str = "he_uniform"
    backend: str = "cpu"
    batch_size: int | str = 32  # a positive int (the full batch is stored as its size), or
    #   "adaptive" (fit's adaptive batch size, with the settings in ``adaptive``)
    full_batch: bool = False
    optimizer: str = "sgd"  # "sgd" | "adam"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    lr_policy: str = "tuned"  # "tuned" | "linear" | "sqrt" | "fixed"
    base_batch_size: int = 32
    base_lr: float = 0.05
    warmup_steps: int = 0
    bs_schedule: tuple = ()  # ((epoch, batch_size), ...) instead of LR decay; () = off
    sampler: str = "shuffle"
    seed: int = 0
    max_epochs: int = 50
    min_steps: int = 200  # large batches get at least this many steps of budget
    target_metric: str = "val_accuracy"
    target: float = 0.95
    eval_rel_step: float = 0.02  # resolution of steps to target: evaluate whenever the step
    #   count has grown by this fraction since the last evaluation (every step for the first 50)
    noise_full_limit: int = 200_000  # training sets up to this size: the noise scale is measured
    #   exactly on all of it; above, on a fresh random subset per measurement, bias-corrected
    noise_subset: int = 32_768  # rows of that subset (for larger training sets only)
    search_id: str = ""  # which search produced it ("" = grid sweep)
    batch_norm: object = False  # False | True (before the activation) | "after"
    ghost_batch_size: object = None  # int: ghost batch norm; None: the whole batch
    dropout: float = 0.0
    drop_last: bool = False  # batch-norm trials drop a last batch that would leave a ghost of 1
    lr_decay: tuple = ()  # ((epoch, factor), ...): step learning-rate decay, the rate
    #   multiplied by factor at each epoch given (the arm opposite bs_schedule); () = constant
    stop_at_target: bool = True  # False: train the whole budget (equal-budget comparisons),
    #   still recording when the target was first met
    adaptive: tuple = ()  # batch_size="adaptive": ((setting, value), ...) of AdaptiveBatchSize

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrialConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}  # fields of an older schema (their keys differ anyway)
        data = d.pop("data", {}) or {}
        data = dict(data)
        data["params"] = tuple(tuple(p) for p in data.get("params", ()))
        d["sizes"] = tuple(d["sizes"])
        d["bs_schedule"] = tuple(tuple(p) for p in d.get("bs_schedule", ()))
        d["lr_decay"] = tuple(tuple(p) for p in d.get("lr_decay", ()))
        d["adaptive"] = tuple(tuple(p) for p in d.get("adaptive", ()))
        return cls(data=DataSpec(**data), **d)

    @property
    def key(self) -> str:
        d = self.to_dict()
        for k, v in _LATER_DEFAULTS.items():  # fields added later: at their default they
            if d.get(k) == v:  # leave the key (and stored results) unchanged
                d.pop(k)
        blob = json.dumps({"v": SCHEMA_VERSION, **d}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    @property
    def is_adaptive(self) -> bool:
        """Whether the trial runs ``fit``'s adaptive batch size."""
        return isinstance(self.batch_size, str) and self.batch_size == "adaptive"

    def adaptive_spec(self):
        """The :class:`~minigd.AdaptiveBatchSize` of an adaptive trial (its own validation
        applies: a setting out of range raises TypeError/ValueError naming it)."""
        from minigd.adaptive import AdaptiveBatchSize

        if not self.is_adaptive:
            raise ValueError(f"batch_size: expected 'adaptive' for an adaptive trial, got {self.batch_size!r}")
        settings = dict(self.adaptive)
        unknown = sorted(set(settings) - set(ADAPTIVE_SETTINGS))
        if unknown:
            raise ValueError(f"adaptive: expected settings among {list(ADAPTIVE_SETTINGS)}, got {unknown}")
        return AdaptiveBatchSize(**settings)

    @property
    def norm_label(self) -> str:
        """``""`` for the plain MLP, else e.g. ``"BN ghost 8, dropout 0.1"``."""
        return norm_label(self.batch_norm, self.ghost_batch_size, self.dropout)

    @property
    def label(self) -> str:
        b = "full" if self.full_batch else str(self.batch_size)
        if self.is_adaptive:
            b = f"adaptive(min {dict(self.adaptive).get('min', '?')})"
        extra = f" {self.norm_label}" if self.norm_label else ""
        return f"B={b} lr={self.lr:.4g} seed={self.seed} sizes={'-'.join(map(str, self.sizes))}{extra}"


#: TrialConfig fields added after SCHEMA_VERSION 1 and their defaults
_LATER_DEFAULTS = {
    "batch_norm": False,
    "ghost_batch_size": None,
    "dropout": 0.0,
    "drop_last": False,
    "lr_decay": (),
    "stop_at_target": True,
    "adaptive": (),
}

#: the AdaptiveBatchSize settings an adaptive trial records (the candidates and the
#: throughput table are left to the controller: it measures them on the machine)
ADAPTIVE_SETTINGS = ("every", "lr_rule", "max", "max_every", "min", "min_gain", "noise_beta", "track_every")


def norm_label(batch_norm, ghost_batch_size, dropout) -> str:
    parts = []
    if batch_norm not in (False, None):
        bn = "BN" if batch_norm is True or batch_norm == "before" else "BN after act"
        parts.append(bn + (f" ghost {ghost_batch_size}" if ghost_batch_size else ""))
    if dropout:
        parts.append(f"dropout {dropout:g}")
    return ", ".join(parts)
