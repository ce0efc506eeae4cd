"""Training history: per-step columns, per-epoch and per-evaluation records."""

from __future__ import annotations

import csv
import math
import os
from typing import Any

import numpy as np

from minigd._io import atomic_path

#: per-step fields of ``fit(batch_size="adaptive")`` (the controller's values in force)
ADAPTIVE_FIELDS = ("lr_factor", "gain", "goodput", "controller_noise_scale")
STEP_COLUMNS = ("step", "epoch", "loss", "lr", "batch_size", "examples", "time")


def _columns(recs) -> list:
    """STEP_COLUMNS, then every other key of the records in order of appearance."""
    keys = list(STEP_COLUMNS)
    seen = set(keys)
    for r in recs:
        for k in r:
            if k not in seen:
                seen.add(k)
                keys.append(k)
    return keys


class History:
    """What :func:`minigd.fit` recorded.

    Step numbering: ``records[i]["step"] == i`` is the 0-based *index* of a step, while
    ``evals[j]["step"]`` (and ``steps_to_target``) is the *number of steps done* when the
    evaluation was taken, so an evaluation with ``"step": k`` is merged into ``records[k - 1]``
    (the step it follows).  ``examples`` counts examples seen after the step in both.

    Per step (columns, numpy arrays via :meth:`column`): ``step`` (0-based), ``epoch``,
    ``loss`` (mean loss of the step's batch, before the update), ``lr``, ``batch_size``,
    ``examples`` (examples seen after the step), ``time`` (seconds of training after the
    step, evaluation time excluded).  Evaluations (every ``eval_every`` steps and at the end)
    are in :attr:`evals`; epoch summaries in :attr:`epochs`.  With ``fit(track_noise=k)``
    the gradient-noise records (noise scale, |G|^2, tr(Sigma), ...) are in :attr:`noise`
    and merged into :attr:`records`.

    Attributes
    ----------
    records : list of dict
        One dict per step, with the evaluation metrics merged into the step at which
        they were measured (tidy: ``pandas.DataFrame(hist.records)`` works).
    reached : bool or None
        Whether the target was reached (None without a target).
    steps_to_target, examples_to_target, time_to_target : int, int, float or None
        When the target was first met (at an evaluation point).
    stop_reason : str
    opt_state : minigd.optim.OptState or None
        The optimizer state at the end of :func:`minigd.fit` (momentum, Adam moments and
        the update count ``t``); pass it to ``fit(..., opt_state=...)`` to continue training
        with the same optimizer state.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self._cols = {c: np.zeros(max(capacity, 16), np.float64) for c in STEP_COLUMNS}
        self.n_steps = 0
        self.epochs: list[dict] = []
        self.evals: list[dict] = []
        self.target: dict | None = None
        self.reached: bool | None = None
        self.steps_to_target = None
        self.examples_to_target = None
        self.time_to_target = None
        self.stop_reason = ""
        self.config: dict = {}
        #: the gradient-noise tracker of ``fit(track_noise=k)`` (None when tracking was off)
        self.noise_tracker: Any = None
        #: the optimizer state at the end of fit (None before)
        self.opt_state: Any = None
        #: ``fit(batch_size="adaptive")``: the controller's decisions, one dict per decision
        #: (step, batch_size, lr_factor, gain, goodput, controller_noise_scale, reason); None otherwise
        self.adaptive: list | None = None

    # -- recording (hot path: keep it cheap) -------------------------------------------------
    def _grow(self):
        for c, a in self._cols.items():
            b = np.zeros(2 * len(a), np.float64)
            b[: len(a)] = a
            self._cols[c] = b

    def record_step(
        self, step: int, epoch: int, loss: float, lr: float, batch_size: int, examples: int, t: float
    ) -> None:
        i = self.n_steps
        if i == len(self._cols["step"]):
            self._grow()
        c = self._cols
        c["step"][i] = step
        c["epoch"][i] = epoch
        c["loss"][i] = loss
        c["lr"][i] = lr
        c["batch_size"][i] = batch_size
        c["examples"][i] = examples
        c["time"][i] = t
        self.n_steps = i + 1

    def record_steps(self, step: int, epoch: int, loss, lr, batch_size: int, examples: int, t) -> None:
        """:meth:`record_step` for the m steps ``step .. step + m - 1`` of one epoch at once
        (``loss``, ``lr``, ``t``: length-m sequences; ``examples``: the count before the
        first of them): the same values, one slice per column instead of a call per step."""
        m = len(loss)
        i = self.n_steps
        while i + m > len(self._cols["step"]):
            self._grow()
        c = self._cols
        c["step"][i : i + m] = np.arange(step, step + m)
        c["epoch"][i : i + m] = epoch
        c["loss"][i : i + m] = loss
        c["lr"][i : i + m] = lr
        c["batch_size"][i : i + m] = batch_size
        c["examples"][i : i + m] = np.arange(1, m + 1) * batch_size + examples
        c["time"][i : i + m] = t
        self.n_steps = i + m

    # -- reading --------------------------------------------------------------------------
    def column(self, name: str) -> np.ndarray:
        """One column of :attr:`records` (a copy), one entry per step: int64 for
        step/epoch/batch_size/examples, float64 for the other step columns.  A field merged
        into the records (an evaluation metric such as ``val_loss``, a noise statistic such
        as ``noise_scale``) is float64 with NaN at the steps that do not have it."""
        if name in self._cols:
            a = self._cols[name][: self.n_steps].copy()
            return a if name in ("loss", "lr", "time") else a.astype(np.int64)
        if name in ADAPTIVE_FIELDS and self.adaptive is not None:
            return self._adaptive_column(name)
        out = np.full(self.n_steps, np.nan)
        found = False
        for i, v in self._merged(name):
            found = True
            out[i] = np.nan if v is None else float(v)
        if not found:
            known = _columns(self.records)
            raise KeyError(f"name: expected one of {known}, got {name!r}")
        return out

    def _adaptive_column(self, name: str) -> np.ndarray:
        """An adaptive run's controller field in force at every step: a decision after
        ``step`` steps holds from step index ``step`` on (before the first: factor and gain
        1, goodput and noise scale NaN)."""
        out = np.full(self.n_steps, 1.0 if name in ("lr_factor", "gain") else np.nan)
        for d in self.adaptive or ():
            s = int(d["step"])
            if 0 <= s < self.n_steps:
                v = d.get(name)
                out[s:] = np.nan if v is None else float(v)
        return out

    def _merged(self, name: str):
        """(record index, value) of a merged field, as :attr:`records` merges them."""
        for nr in self.noise:
            s = nr["step"]
            if name in nr and 0 <= s < self.n_steps:
                yield s, nr[name]
        for ev in self.evals:
            s = ev["step"] - 1
            if name in ev and 0 <= s < self.n_steps:
                yield s, ev[name]

    def row(self, i: int) -> dict:
        """Step ``i``'s :data:`STEP_COLUMNS` as a dict (``i = -1``: the last step), without
        copying the columns (cheap enough for a per-step callback).  Only the step columns:
        ``records[i]`` also has the evaluation and noise fields merged into that step."""
        n = self.n_steps
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -n <= i < n:
            raise IndexError(f"i: expected a step index in [{-n}, {n}), got {i!r}")
        i = int(i) % n
        c = self._cols
        return {k: (c[k][i].item() if k in ("loss", "lr", "time") else int(c[k][i])) for k in STEP_COLUMNS}

    @property
    def noise(self) -> list:
        """Gradient-noise records of ``fit(track_noise=k)``, one dict per tracked step
        (see :class:`minigd.gradstats.tracking.NoiseTracker`); ``[]`` when tracking was off.
        Also merged into :attr:`records` at their steps."""
        return [] if self.noise_tracker is None else self.noise_tracker.records()

    @property
    def records(self) -> list:
        cols = {c: self.column(c) for c in STEP_COLUMNS}
        recs = [{c: cols[c][i].item() for c in STEP_COLUMNS} for i in range(self.n_steps)]
        for nr in self.noise:
            s = nr["step"]
            if 0 <= s < len(recs):
                recs[s].update({k: v for k, v in nr.items() if k not in recs[s]})
        for ev in self.evals:
            s = ev["step"]
            if 0 <= s - 1 < len(recs):
                recs[s - 1].update({k: v for k, v in ev.items() if k not in recs[s - 1]})
        if self.adaptive is not None:
            for name in ADAPTIVE_FIELDS:
                for r, v in zip(recs, self._adaptive_column(name).tolist()):
                    r[name] = v
        return recs

    @property
    def final(self) -> dict:
        """The last evaluation record (or the last step if nothing was evaluated)."""
        if self.evals:
            return dict(self.evals[-1])
        return self.records[-1] if self.n_steps else {}

    def to_frame(self) -> Any:
        """:attr:`records` as a :class:`pandas.DataFrame`, one row per step (columns
        :data:`STEP_COLUMNS`, then the noise and evaluation fields, NaN where a step has
        none).  Needs pandas (``pip install pandas``)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError(
                "History.to_frame() needs pandas, which is not installed: "
                "pip install pandas (or use History.records / History.to_csv)"
            ) from exc
        recs = self.records
        return pd.DataFrame.from_records(recs, columns=_columns(recs))

    def __len__(self) -> int:
        return self.n_steps

    def __repr__(self) -> str:
        return (
            f"History(steps={self.n_steps}, epochs={len(self.epochs)}, evals={len(self.evals)}, "
            f"reached={self.reached}, stop_reason={self.stop_reason!r})"
        )

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write :attr:`records` as CSV, atomically (temp file + rename)."""
        recs = self.records
        keys = _columns(recs)
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys, restval="")
                w.writeheader()
                for r in recs:
                    w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
                f.flush()
                os.fsync(f.fileno())
