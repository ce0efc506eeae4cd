"""Gradient-noise tracking during training: what ``fit(..., track_noise=k)`` records.

At a tracked step the backend's fused backward pass also returns the per-example squared
gradient norms :math:`|g_i|^2` of the batch (Goodfellow 2015), and the optimizer pass the
squared norm :math:`|\\bar g|^2` of the batch gradient.  From these two numbers per step
(McCandlish et al. 2018, App. A.1, with :math:`B_\\mathrm{small} = 1`):

.. math::
    \\widehat{\\mathrm{tr}\\Sigma} = \\frac{\\sum_i |g_i|^2 - B|\\bar g|^2}{B - 1}, \\qquad
    \\widehat{|G|^2} = |\\bar g|^2 - c_B\\,\\widehat{\\mathrm{tr}\\Sigma},

with :math:`c_B = 1/B - 1/N` when the batch is drawn without replacement from the N
training examples (``sampler="shuffle"``/``"sequential"``), and with replacement
(``"replacement"``) :math:`\\widehat{\\mathrm{tr}\\Sigma}` scaled by :math:`N/(N-1)` and
:math:`c_B = (N-1)/(NB)`.  Both estimates are then unbiased for the quantities
:func:`minigd.grad_moments` computes over the training set at the current parameters:
:math:`|G|^2` of the full-data gradient and :math:`\\mathrm{tr}\\Sigma` with ``ddof=1``.
(Sampling without replacement: the batch's ``ddof=1`` variance is unbiased for the
population's ``ddof=1`` variance, and :math:`E|\\bar g|^2 = |G|^2 + (1/B - 1/N)\\,
\\mathrm{tr}\\Sigma`.)  At ``B = N`` they are exact.

Each estimate is noisy and either can be negative; the two are smoothed by **separate**
exponential moving averages with Adam-style bias correction (as
:class:`~minigd.gradstats.TwoBatchNoiseScale`), and the noise scale is the ratio of the
smoothed values.  The parameters move between tracked steps, so the averages describe a
recent window (about ``1 / (1 - beta)`` tracked steps), not one point.

The per-step cost is a few scalar operations plus one reduction over the B squared norms;
the norms themselves cost a few percent of the backward pass.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["NoiseTracker", "NOISE_FIELDS", "GSNR_FIELDS", "gsnr_summary"]

#: keys of every tracked record (see :class:`NoiseTracker`)
NOISE_FIELDS = (
    "step",
    "batch_size",
    "batch_grad_norm_sq",
    "grad_norm_sq_est",
    "trace_cov_est",
    "grad_norm_sq",
    "trace_cov",
    "noise_scale",
)
#: extra keys of the records at ``track_gsnr`` steps
GSNR_FIELDS = ("gsnr_mean", "gsnr_median", "batch_trace_cov")


class NoiseTracker:
    """Streaming per-step estimates of :math:`|G|^2`, :math:`\\mathrm{tr}(\\Sigma)` and the
    noise scale :math:`B_\\mathrm{simple}`, fed by a training loop (see the module doc).

    Parameters
    ----------
    n : int
        N, the number of training examples the batches are drawn from.
    replacement : bool
        Whether batches are drawn with replacement.
    beta : float
        EMA decay per tracked step, ``0 <= beta < 1`` (0: no smoothing).

    Notes
    -----
    Records (:meth:`records`; one per tracked step, float values, squared gradient units):

    ``step``
        0-based index of the training step; the gradient is the one at the parameters
        *before* that step's update.
    ``batch_size``
        B of that step.
    ``batch_grad_norm_sq``
        :math:`|\\bar g|^2`, squared norm of the batch gradient.
    ``grad_norm_sq_est``, ``trace_cov_est``
        This step's unbiased estimates of :math:`|G|^2` and :math:`\\mathrm{tr}\\Sigma`
        (NaN when B < 2).
    ``grad_norm_sq``, ``trace_cov``
        Their bias-corrected exponential moving averages.
    ``noise_scale``
        ``trace_cov / grad_norm_sq`` (examples): the smoothed :math:`B_\\mathrm{simple}`;
        ``inf`` while the smoothed :math:`|G|^2 \\le 0`.

    and at the ``track_gsnr`` steps of :func:`minigd.fit` also ``gsnr_mean``,
    ``gsnr_median`` (over parameters with non-zero variance, of the per-parameter
    GSNR :math:`\\bar g_j^2/\\hat\\sigma_j^2` of the batch's per-example gradients; a batch
    estimate, biased upward by about 1/B) and ``batch_trace_cov`` (the batch's exact
    ``ddof=1`` :math:`\\mathrm{tr}\\hat\\Sigma`, equal to ``trace_cov_est`` up to rounding
    and the replacement factor).
    """

    def __init__(self, n: int, replacement: bool = False, beta: float = 0.99):
        self.n = int(n)
        self.replacement = bool(replacement)
        self.beta = float(beta)
        self._raw: list = []  # (step, B, sum_i |g_i|^2, |g_B|^2) per tracked step
        self._extra: dict = {}
        self._t = 0
        self._ema_g2 = 0.0
        self._ema_tr = 0.0
        self._pow = 1.0  # beta ** t
        self._done = 0  # records folded into the moving averages

    def __setstate__(self, state: dict) -> None:
        """Unpickling: a tracker pickled before the lazy moving averages had every record
        folded in (``_done`` = all of them)."""
        self.__dict__.update(state)
        if "_done" not in state:
            self._done = len(self._raw)

    def _estimates(self, B: int, sum_sq_norms: float, batch_sq_norm: float):
        """This step's unbiased (|G|^2, tr Sigma) estimates (NaN for B < 2)."""
        if B < 2:
            return math.nan, math.nan
        N = self.n
        tr = (sum_sq_norms - B * batch_sq_norm) / (B - 1)
        if self.replacement:
            return batch_sq_norm - tr / B, (tr * N / (N - 1) if N > 1 else tr)
        return batch_sq_norm - tr * (1.0 / B - 1.0 / N), tr

    # -- hot path ------------------------------------------------------------------------------
    def update(self, step: int, B: int, sum_sq_norms: float, batch_sq_norm: float) -> None:
        """Add one step: the sum over the batch of :math:`|g_i|^2` and :math:`|\bar g|^2`.

        Only records them (it runs at every tracked step, often with cold caches); the
        moving averages fold the new records in when next read (:meth:`_sync`), in the
        same order and arithmetic, so the values are bitwise those of an eager update."""
        self._raw.append((step, B, sum_sq_norms, batch_sq_norm))

    def _sync(self) -> None:
        """Fold the records added since the last read into the moving averages."""
        raw, i = self._raw, self._done
        if i == len(raw):
            return
        beta = self.beta
        g2e, tre, t, pw = self._ema_g2, self._ema_tr, self._t, self._pow
        for _, B, s, g in raw[i:]:
            if B < 2:
                continue
            g2, tr = self._estimates(B, s, g)
            g2e = beta * g2e + (1.0 - beta) * g2
            tre = beta * tre + (1.0 - beta) * tr
            t += 1
            pw *= beta
        self._ema_g2, self._ema_tr, self._t, self._pow = g2e, tre, t, pw
        self._done = len(raw)

    def add_extra(self, step: int, values: dict) -> None:
        """Attach extra fields (e.g. the GSNR summary) to the record of ``step``."""
        self._extra[int(step)] = dict(values)

    # -- smoothed values ------------------------------------------------------------------------
    @property
    def n_updates(self) -> int:
        self._sync()
        return self._t

    def smoothed(self) -> tuple:
        """(:attr:`grad_norm_sq`, :attr:`trace_cov`) in one call (NaN, NaN before the first
        update): what the adaptive controller reads at each decision."""
        self._sync()
        if not self._t:
            return math.nan, math.nan
        c = 1.0 - self._pow
        return self._ema_g2 / c, self._ema_tr / c

    @property
    def grad_norm_sq(self) -> float:
        """Smoothed, bias-corrected :math:`|G|^2` (NaN before the first update)."""
        self._sync()
        return self._ema_g2 / (1.0 - self._pow) if self._t else math.nan

    @property
    def trace_cov(self) -> float:
        """Smoothed, bias-corrected :math:`\\mathrm{tr}\\Sigma` (NaN before the first update)."""
        self._sync()
        return self._ema_tr / (1.0 - self._pow) if self._t else math.nan

    @property
    def noise_scale(self) -> float:
        """``trace_cov / grad_norm_sq`` (``inf`` when the smoothed :math:`|G|^2 \\le 0 <`
        trace, NaN when both are :math:`\\le 0` or before the first update)."""
        self._sync()
        if not self._t:
            return math.nan
        g2, tr = self.grad_norm_sq, self.trace_cov
        if g2 > 0:
            return tr / g2
        return math.inf if tr > 0 else math.nan

    # -- reading --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._raw)

    def column(self, name: str) -> np.ndarray:
        """One field over all tracked steps as an array (int64 for step/batch_size)."""
        if name not in NOISE_FIELDS:
            raise KeyError(f"name: expected one of {list(NOISE_FIELDS)}, got {name!r}")
        dt = np.int64 if name in ("step", "batch_size") else np.float64
        return np.asarray([r[name] for r in self._replay()], dtype=dt)

    def _replay(self) -> list:
        """The records without extras, recomputed from the raw sums (the smoothed values
        are the same arithmetic as :meth:`update`'s, in the same order)."""
        replay = NoiseTracker(self.n, self.replacement, self.beta)
        out = []
        for step, B, s, g in self._raw:
            replay.update(step, B, s, g)
            g2, tr = self._estimates(B, s, g)
            out.append(
                {
                    "step": int(step),
                    "batch_size": int(B),
                    "batch_grad_norm_sq": float(g),
                    "grad_norm_sq_est": g2,
                    "trace_cov_est": tr,
                    "grad_norm_sq": replay.grad_norm_sq,
                    "trace_cov": replay.trace_cov,
                    "noise_scale": replay.noise_scale,
                }
            )
        return out

    def records(self) -> list:
        """One dict per tracked step (keys :data:`NOISE_FIELDS`, plus :data:`GSNR_FIELDS` at
        GSNR steps)."""
        out = self._replay()
        for rec in out:
            extra = self._extra.get(rec["step"])
            if extra:
                rec.update(extra)
        return out

    # -- checkpointing (minigd.checkpoint) -----------------------------------------------------
    def get_state(self) -> dict:
        """Everything needed to continue exactly where this tracker is (JSON-able scalars
        plus the raw per-step sums as a float64 (m, 4) array ``raw``)."""
        self._sync()
        raw = np.asarray(self._raw, dtype=np.float64).reshape(len(self._raw), 4)
        return {
            "n": self.n,
            "replacement": self.replacement,
            "beta": self.beta,
            "t": self._t,
            "ema_g2": self._ema_g2,
            "ema_tr": self._ema_tr,
            "pow": self._pow,
            "extra": [[s, dict(v)] for s, v in sorted(self._extra.items())],
            "raw": raw,
        }

    @classmethod
    def from_state(cls, state: dict) -> NoiseTracker:
        """The inverse of :meth:`get_state` (bitwise: the moving averages continue exactly)."""
        tr = cls(int(state["n"]), bool(state["replacement"]), float(state["beta"]))
        tr._raw = [
            (int(r[0]), int(r[1]), float(r[2]), float(r[3]))
            for r in np.asarray(state["raw"], dtype=np.float64).reshape(-1, 4)
        ]
        tr._extra = {int(s): dict(v) for s, v in state["extra"]}
        tr._t = int(state["t"])
        tr._ema_g2 = float(state["ema_g2"])
        tr._ema_tr = float(state["ema_tr"])
        tr._pow = float(state["pow"])
        tr._done = len(tr._raw)  # (saved synced)
        return tr

    def __repr__(self) -> str:
        return (
            f"NoiseTracker(n={self.n}, replacement={self.replacement}, beta={self.beta}, "
            f"records={len(self)}, noise_scale={self.noise_scale:.6g})"
        )


def gsnr_summary(model, X, yi, yf, idx) -> dict:
    """GSNR of one batch (rows ``idx`` of validated X, yi, yf) at the model's parameters:
    ``gsnr_mean`` / ``gsnr_median`` of :math:`\\bar g_j^2/\\hat\\sigma_j^2` over the
    parameters with non-zero variance, and ``batch_trace_cov`` (``ddof=1``)."""
    from .per_example import accumulate_moments

    m = accumulate_moments(model, X, yi, yf, idx, chunk_size=max(len(idx), 1)).finalize()
    v = m.var
    keep = v > 0
    r = m.mean[keep] ** 2 / v[keep]
    return {
        "gsnr_mean": float(r.mean()) if r.size else math.nan,
        "gsnr_median": float(np.median(r)) if r.size else math.nan,
        "batch_trace_cov": m.trace_cov,
    }
