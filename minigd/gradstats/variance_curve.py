"""Mini-batch gradient variance against batch size: the 1/B law, measured on a model.

For a batch of B examples drawn from the N examples of a data set, the batch gradient
:math:`g_B` (the mean of B per-example gradients) scatters around the full-data gradient
:math:`G` with total variance

.. math::
    E|g_B - G|^2 = \\frac{\\mathrm{tr}\\,\\Sigma}{B} \\cdot
    \\begin{cases} (N - B)/(N - 1) & \\text{without replacement,} \\\\
                   1 & \\text{with replacement,} \\end{cases}

where :math:`\\Sigma` is the covariance of one per-example gradient drawn uniformly from the
data (population form, ``ddof=0``; :func:`~minigd.gradstats.minibatch_variance_prediction`).
:func:`variance_vs_batch_size` measures the left side by sampling batches and puts the
prediction beside it.  The formula is exact for any model and data (it is a statement
about sampling), so a measured ratio far from 1 means a bug or too few samples -- the
standard error says which.  What *does* depend on the model is how large
:math:`\\mathrm{tr}\\,\\Sigma` is next to :math:`|G|^2`: their ratio, the noise scale
:math:`B_\\mathrm{simple}`, is where the cosine between :math:`g_B` and :math:`G` turns from
noise-dominated to signal-dominated.

References
----------
.. [McC18] S. McCandlish, J. Kaplan, D. Amodei et al., "An Empirical Model of Large-Batch
   Training", arXiv:1812.06162, 2018.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from minigd._constraints import _got, check_param
from minigd._validation import check_seed
from minigd.model import EVAL_CHUNK, MLP

from .noise_scale import minibatch_variance_prediction
from .per_example import _check_model, _training_pass, accumulate_moments

__all__ = ["BatchVarianceCurve", "variance_vs_batch_size"]


@dataclass(frozen=True, eq=False)
class BatchVarianceCurve:
    """Measured and predicted mini-batch gradient variance per batch size
    (from :func:`variance_vs_batch_size`).  Arrays are aligned with :attr:`batch_sizes`;
    variances are in squared gradient units.
    """

    batch_sizes: np.ndarray
    """(k,) int64, the batch sizes B measured (examples)."""
    variance: np.ndarray
    """(k,) measured :math:`E|g_B - G|^2`: the mean over ``n_samples`` batches."""
    variance_se: np.ndarray
    """(k,) standard error of :attr:`variance` (sample std / sqrt(n_samples))."""
    cosine: np.ndarray
    """(k,) mean cosine similarity between :math:`g_B` and :math:`G` (dimensionless)."""
    cosine_se: np.ndarray
    """(k,) standard error of :attr:`cosine`."""
    predicted: np.ndarray
    """(k,) prediction for the sampling scheme used (:attr:`replacement`)."""
    predicted_with_replacement: np.ndarray
    """(k,) :math:`\\mathrm{tr}\\Sigma / B` (population :math:`\\Sigma`, ``ddof=0``)."""
    predicted_without_replacement: np.ndarray
    """(k,) :math:`\\mathrm{tr}\\Sigma / B \\cdot (N - B)/(N - 1)`."""
    n: int
    """N, the number of examples batches were drawn from."""
    n_samples: int
    """Batches drawn per batch size."""
    replacement: bool
    """Whether each batch was drawn with replacement."""
    grad_norm_sq: float
    """:math:`|G|^2`, squared norm of the full-data gradient."""
    trace_cov: float
    """:math:`\\mathrm{tr}\\hat\\Sigma` of the per-example gradients over the N examples,
    ``ddof=1`` (as :attr:`GradMoments.trace_cov`)."""

    @property
    def noise_scale(self) -> float:
        """:math:`B_\\mathrm{simple} = \\mathrm{tr}\\hat\\Sigma / |G|^2` (examples)."""
        return self.trace_cov / self.grad_norm_sq if self.grad_norm_sq > 0 else float("inf")

    @property
    def ratio(self) -> np.ndarray:
        """(k,) measured / predicted variance (1 where the law holds; NaN where the
        prediction is 0, i.e. B = N without replacement)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.predicted > 0, self.variance / self.predicted, np.nan)

    @property
    def z(self) -> np.ndarray:
        """(k,) (measured - predicted) / standard error: |z| <~ 3 is agreement."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return (self.variance - self.predicted) / self.variance_se

    def to_records(self) -> list:
        """One dict per batch size (for ``pandas.DataFrame`` or a CSV)."""
        keys = (
            "variance",
            "variance_se",
            "cosine",
            "cosine_se",
            "predicted",
            "predicted_with_replacement",
            "predicted_without_replacement",
        )
        out = []
        ratio = self.ratio
        for k, B in enumerate(self.batch_sizes):
            rec: dict[str, int | float] = {"batch_size": int(B)}
            rec.update({f: float(getattr(self, f)[k]) for f in keys})
            rec["ratio"] = float(ratio[k])
            out.append(rec)
        return out

    def __str__(self) -> str:
        head = f"{'B':>7} {'E|g_B-G|^2':>12} {'+-se':>10} {'predicted':>12} {'ratio':>7} {'cos(g_B,G)':>10}"
        lines = [
            f"mini-batch gradient variance, N={self.n}, "
            f"{'with' if self.replacement else 'without'} replacement, "
            f"{self.n_samples} batches per size; |G|^2={self.grad_norm_sq:.4g}, "
            f"tr(Sigma)={self.trace_cov:.4g}, B_simple={self.noise_scale:.4g}",
            head,
        ]
        for r in self.to_records():
            lines.append(
                f"{r['batch_size']:>7} {r['variance']:>12.4g} {r['variance_se']:>10.2g} "
                f"{r['predicted']:>12.4g} {r['ratio']:>7.3f} {r['cosine']:>10.3f}"
            )
        return "\n".join(lines)


def _batch_sizes(batch_sizes, n, replacement):
    if isinstance(batch_sizes, numbers.Integral) and not isinstance(batch_sizes, bool):
        batch_sizes = [batch_sizes]
    try:
        arr = np.asarray(batch_sizes)
    except Exception:  # pragma: no cover - exotic inputs
        arr = np.asarray([], dtype=object)
    if arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"batch_sizes: expected a non-empty sequence of integers, got {_got(batch_sizes)}")
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"batch_sizes: expected a non-empty sequence of integers, got {_got(batch_sizes)}")
    if arr.min() < 1:
        raise ValueError(f"batch_sizes: expected integers >= 1, got {int(arr.min())}")
    if not replacement and arr.max() > n:
        raise ValueError(
            f"batch_sizes: expected at most the number of examples ({n}) when "
            f"sampling without replacement, got {int(arr.max())}"
        )
    return arr.astype(np.int64)


def _batch_grad(model, params, X, yi, yf, idx, grad, out64):
    """out64 = gradient of the mean loss over rows idx (float64), chunked by EVAL_CHUNK
    (training mode: fresh dropout masks per chunk)."""
    impl = model.backend_impl
    B = len(idx)
    if B <= EVAL_CHUNK:
        _training_pass(model, B)
        impl.loss_grad(params, grad, X, yi, yf, idx, B)
        out64[...] = grad
        return out64
    out64[...] = 0
    for s in range(0, B, EVAL_CHUNK):
        rows = idx[s : s + EVAL_CHUNK]
        _training_pass(model, len(rows))
        impl.loss_grad(params, grad, X, yi, yf, rows, len(rows))
        out64 += grad.astype(np.float64) * (len(rows) / B)
    return out64


def variance_vs_batch_size(
    model: MLP,
    X: np.ndarray,
    y: np.ndarray,
    batch_sizes: Sequence[int],
    *,
    n_samples: int = 100,
    replacement: bool = False,
    seed: int | np.random.Generator | None = 0,
    chunk_size: int = EVAL_CHUNK,
) -> BatchVarianceCurve:
    """Measure :math:`E|g_B - G|^2` and :math:`\\cos(g_B, G)` for several batch sizes and
    compare with the sampling prediction (see the module doc).

    :math:`G` and :math:`\\mathrm{tr}\\Sigma` are computed exactly over (X, y) with
    :func:`~minigd.grad_moments`; then, per batch size B, ``n_samples`` batches are drawn
    (rows without replacement within a batch, or with replacement) and each batch
    gradient :math:`g_B` (the gradient of its mean loss, training mode) is compared with
    :math:`G` at the model's current parameters.

    Parameters
    ----------
    model : minigd.MLP
    X, y : the data set (as for :func:`minigd.fit`), at least 2 examples
    batch_sizes : int or sequence of int
        Batch sizes B >= 1 (<= N without replacement).
    n_samples : int, default 100
        Batches per batch size, >= 2.  The relative standard error of the measured
        variance is roughly :math:`\\sqrt{2/(n_\\mathrm{samples}\\,d_\\mathrm{eff})}` with
        :math:`d_\\mathrm{eff} \\ge 1` the effective number of independent gradient
        directions; :attr:`BatchVarianceCurve.variance_se` reports it as measured.
    replacement : bool, default False
        Draw each batch with replacement (i.i.d. rows) instead of without.
    seed : int or numpy.random.Generator
    chunk_size : int
        Rows per backend call for the exact moments.

    Returns
    -------
    BatchVarianceCurve

    Examples
    --------
    >>> import numpy as np, minigd as mg
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(512, 6)).astype(np.float32); y = rng.integers(0, 3, 512)
    >>> curve = mg.variance_vs_batch_size(mg.MLP([6, 16, 3], seed=0), X, y, [4, 64, 512])
    >>> bool(curve.variance[-1] < 1e-9 * curve.grad_norm_sq)   # B = N: no noise
    True
    >>> bool(abs(curve.ratio[0] - 1) < 0.3)            # 1/B law at B = 4
    True
    """
    _check_model(model, "variance_vs_batch_size")
    X, yi, yf = model.check_Xy(X, y)
    N = X.shape[0]
    if N < 2:
        raise ValueError(f"X: expected at least 2 examples, got {N}")
    replacement = check_param("replacement", replacement)
    sizes = _batch_sizes(batch_sizes, N, replacement)
    n_samples = check_param("n_samples", n_samples)
    chunk_size = check_param("chunk_size", chunk_size)
    rng = check_seed("seed", seed)

    mom = accumulate_moments(model, X, yi, yf, np.arange(N, dtype=np.int64), chunk_size).finalize()
    G = mom.mean.astype(np.float64)
    g_norm = float(np.sqrt(G @ G))
    impl = model.backend_impl
    params = model.params
    grad = np.empty(model.n_params, dtype=model.dtype)
    gB = np.empty(model.n_params, dtype=np.float64)
    diff = np.empty_like(gB)
    k = len(sizes)
    var = np.empty(k)
    var_se = np.empty(k)
    cos = np.empty(k)
    cos_se = np.empty(k)
    e = np.empty(n_samples)
    c = np.empty(n_samples)
    for j, B in enumerate(sizes):
        B = int(B)
        impl.reserve(min(B, EVAL_CHUNK))
        for s in range(n_samples):
            idx = rng.choice(N, size=B, replace=replacement).astype(np.int64, copy=False)
            _batch_grad(model, params, X, yi, yf, idx, grad, gB)
            np.subtract(gB, G, out=diff)
            e[s] = diff @ diff
            nb = float(np.sqrt(gB @ gB))
            c[s] = (gB @ G) / (nb * g_norm) if nb > 0 and g_norm > 0 else np.nan
        var[j] = e.mean()
        var_se[j] = e.std(ddof=1) / np.sqrt(n_samples)
        cos[j] = c.mean()
        cos_se[j] = c.std(ddof=1) / np.sqrt(n_samples)
    pw = np.atleast_1d(minibatch_variance_prediction(mom.trace_cov, sizes, n=N, replacement=True, ddof=1)).astype(
        np.float64
    )
    if sizes.max() <= N:
        pwo = np.atleast_1d(minibatch_variance_prediction(mom.trace_cov, sizes, n=N, replacement=False, ddof=1)).astype(
            np.float64
        )
    else:  # with replacement, B may exceed N: no without-replacement prediction there
        ok = sizes <= N
        pwo = np.full(k, np.nan)
        if ok.any():
            pwo[ok] = minibatch_variance_prediction(mom.trace_cov, sizes[ok], n=N, replacement=False, ddof=1)
    return BatchVarianceCurve(
        batch_sizes=sizes,
        variance=var,
        variance_se=var_se,
        cosine=cos,
        cosine_se=cos_se,
        predicted=pw if replacement else pwo,
        predicted_with_replacement=pw,
        predicted_without_replacement=pwo,
        n=N,
        n_samples=n_samples,
        replacement=replacement,
        grad_norm_sq=mom.grad_norm_sq,
        trace_cov=mom.trace_cov,
    )
