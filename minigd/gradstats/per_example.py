"""Per-example gradients of an :class:`~minigd.MLP`: explicit, as norms, and as streamed moments.

Conventions (as everywhere in minigd): the batch loss is the **mean** of per-example
losses; the per-example gradient :math:`g_i` is the gradient of example *i*'s own loss, so
the mean of the :math:`g_i` over a batch is that batch's gradient (what
``model.loss_and_grad`` returns).  Gradients are taken in training mode.  Variances use
``ddof=1``.

For a dense layer :math:`z = aW + b` the per-example gradient is an outer product,
:math:`\\partial\\ell_i/\\partial W = a_i^\\top\\delta_i` and :math:`\\partial\\ell_i/\\partial b
= \\delta_i` (:math:`\\delta_i = \\partial\\ell_i/\\partial z`), so what the backward pass keeps
per layer -- the inputs :math:`a_i` and the deltas :math:`\\delta_i` -- determines every
per-example statistic without forming the :math:`(n, P)` matrix (Goodfellow 2015).

References
----------
.. [Goo15] I. Goodfellow, "Efficient Per-Example Gradient Computations", arXiv:1510.01799, 2015.
.. [Cha79] T. F. Chan, G. H. Golub, R. J. LeVeque, "Updating Formulae and a Pairwise
   Algorithm for Computing Sample Variances", STAN-CS-79-773, 1979.
"""

from __future__ import annotations

import numpy as np

from minigd._constraints import _got, check_param
from minigd.backends.base import check_per_example
from minigd.model import EVAL_CHUNK, MLP

from .moments import GradMoments, MomentAccumulator, check_population, sample_moments

__all__ = ["per_example_grads", "per_example_grad_norms", "grad_moments", "accumulate_moments"]

#: the generic (materialising) moments path holds at most this many gradient entries at once
_GENERIC_BLOCK_ENTRIES = 1 << 22


def _check_model(model, what: str | None = None):
    if not (hasattr(model, "backend_impl") and hasattr(model, "check_Xy")):
        raise TypeError(f"model: expected a minigd.MLP, got {type(model).__name__}")
    if what is not None:
        check_per_example(model.norm, what)
    model.check_finite()


def _training_pass(model, B: int) -> None:
    """Gradients are taken in training mode: with dropout, each chunk gets fresh masks
    from ``model.rng`` (so the statistics include the dropout noise SGD sees)."""
    if model.rng is not None:
        model.backend_impl.draw_dropout(model.rng, B)


def _chunks(n: int, size: int):
    idx = np.arange(n, dtype=np.int64)
    for s in range(0, n, size):
        yield s, idx[s : s + size]


def per_example_grads(model: MLP, X: np.ndarray, y: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """Per-example gradients as an (n, P) array.

    Row *i* is the gradient of example *i*'s own loss with respect to the flat parameter
    vector (order W0 row-major, b0, W1, b1, ...), so ``per_example_grads(m, X, y).mean(0)``
    equals ``m.loss_and_grad(X, y)[1]`` up to rounding.  Needs n * P numbers of memory:
    for large models use :func:`per_example_grad_norms` or :func:`grad_moments`, which
    never form it.

    Parameters
    ----------
    model : minigd.MLP
    X : ndarray (n, n_in) of the model's dtype
    y : ndarray
        Labels / targets as for :func:`minigd.fit`.
    out : ndarray (n, P) of the model's dtype, C-contiguous, optional
        Written in place and returned (saves the allocation when called repeatedly).

    Returns
    -------
    ndarray (n, P), the model's dtype

    Examples
    --------
    >>> import numpy as np, minigd as mg
    >>> m = mg.MLP([3, 4, 2], dtype="float64", seed=0)
    >>> X = np.random.default_rng(0).normal(size=(5, 3)); y = np.array([0, 1, 1, 0, 1])
    >>> G = mg.per_example_grads(m, X, y)
    >>> G.shape
    (5, 26)
    >>> bool(np.allclose(G.mean(axis=0), m.loss_and_grad(X, y)[1]))
    True
    """
    _check_model(model, "per_example_grads")
    X, yi, yf = model.check_Xy(X, y)
    n, P = X.shape[0], model.n_params
    if out is None:
        out = np.empty((n, P), dtype=model.dtype)
    elif not (
        isinstance(out, np.ndarray)
        and out.shape == (n, P)
        and out.dtype == model.dtype
        and out.flags.c_contiguous
        and out.flags.writeable
    ):
        what = f"a writable C-contiguous array of shape ({n}, {P}) and dtype {model.dtype}"
        if not isinstance(out, np.ndarray) or out.dtype != model.dtype:  # a wrong type
            raise TypeError(f"out: expected {what}, got {_got(out)}")
        flags = (
            ""
            if out.flags.c_contiguous and out.flags.writeable
            else (f" ({'read-only' if not out.flags.writeable else 'not C-contiguous'})")
        )
        raise ValueError(f"out: expected {what}, got {_got(out)}{flags}")
    impl = model.backend_impl
    for s, idx in _chunks(n, EVAL_CHUNK):
        _training_pass(model, len(idx))
        impl.per_example_grads(model.params, X, yi, yf, idx, len(idx), out[s:])
    return out


def per_example_grad_norms(model: MLP, X: np.ndarray, y: np.ndarray, *, squared: bool = False) -> np.ndarray:
    """Euclidean norms of the per-example gradients, (n,), without forming them.

    Fused into the backward pass (Goodfellow 2015): per dense layer,
    :math:`|\\partial\\ell_i/\\partial W|^2 + |\\partial\\ell_i/\\partial b|^2
    = (|a_i|^2 + 1)\\,|\\delta_i|^2`, summed over layers; the cost is a few percent of a
    forward/backward pass, and memory is that of one batch.

    Parameters
    ----------
    model : minigd.MLP
    X, y : as for :func:`per_example_grads`
    squared : bool, default False
        Return the squared norms :math:`|g_i|^2` instead (what the noise-scale estimators
        take, e.g. :func:`minigd.gradstats.per_example_estimates`).

    Returns
    -------
    ndarray (n,), the model's dtype (gradient units; squared with ``squared=True``)

    Raises
    ------
    ValueError
        A per-example gradient (``squared=True``: its squared norm) that does not fit the
        model's dtype, or a backward pass that overflowed, naming ``X``.

    Notes
    -----
    The fused kernels square before they sum, so a squared norm beyond the dtype's range
    (float32: norms above about 1.8e19; float64: 1.3e154) overflows although the norm
    itself fits.  Such rows -- any non-finite result -- are computed again, only then,
    from the layer inputs and deltas in float64, each row scaled by its largest entry
    before squaring (:math:`|v| = m\\,|v/m|`, :math:`m = \\max_j |v_j|`), and the layers
    combined with ``hypot``: exact up to rounding wherever the true norm fits the
    dtype, at no cost to the normal path.
    """
    _check_model(model, "per_example_grad_norms")
    X, yi, yf = model.check_Xy(X, y)
    squared = check_param("squared", squared)
    n = X.shape[0]
    impl = model.backend_impl
    grad = np.empty(model.n_params, dtype=model.dtype)
    out = np.empty(n, dtype=model.dtype)
    redone: dict[int, float] = {}  # row -> its norm (float64), for the rows whose squares overflowed

    def row_norms(M):  # Euclidean norms of M's rows in float64, scaled before squaring
        M = np.abs(np.asarray(M, dtype=np.float64))
        m = M.max(axis=1) if M.shape[1] else np.zeros(M.shape[0])
        return m * np.sqrt(((M / np.where(m > 0, m, 1.0)[:, None]) ** 2).sum(axis=1))

    for s, idx in _chunks(n, EVAL_CHUNK):
        B = len(idx)
        _training_pass(model, B)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is handled below
            _, rows = impl.loss_grad(model.params, grad, X, yi, yf, idx, B, want_sqn=True)
            out[s : s + B] = rows
        bad = np.flatnonzero(~np.isfinite(out[s : s + B]))
        if bad.size:  # the same rows and dropout masks, as factors (B, n_l) per layer
            layers = []
            for A, D in impl.per_example_terms(model.params, X, yi, yf, idx, B):
                layers.append(np.hypot(row_norms(A), 1.0) * row_norms(D))
            norms = row_norms(np.stack(layers, axis=1))
            if not np.isfinite(norms[bad]).all():
                from minigd.model import _overflow_error

                raise _overflow_error("X", X, model.params, "per-example gradients")
            redone.update(zip((s + bad).tolist(), norms[bad].tolist()))
            out[s + bad] = 0
    np.maximum(out, 0, out=out)
    if not squared:
        np.sqrt(out, out=out)
    if redone:
        rows = np.fromiter(redone, np.int64, len(redone))
        vals = np.fromiter(redone.values(), np.float64, len(redone))
        if squared:
            with np.errstate(over="ignore"):
                vals = vals * vals
        big = vals > np.finfo(model.dtype).max
        if big.any():
            raise ValueError(
                f"X: the per-example gradient {'squared ' if squared else ''}norm of row "
                f"{int(rows[big][0])} is {float(vals[big][0]):.6g}, beyond {model.dtype}'s range"
                f"{'; squared=False gives the norms' if squared else ''}; rescale X"
                f"{' or use float64' if model.dtype == np.float32 else ''}"
            )
        out[rows] = vals
    return out


def grad_moments(
    model: MLP,
    X: np.ndarray,
    y: np.ndarray,
    *,
    population: int | None = None,
    chunk_size: int = EVAL_CHUNK,
    exact: bool | None = None,
) -> GradMoments:
    """Mean and variance (``ddof=1``) of the per-example gradients over a data set, streamed;
    optionally with the noise scale of a larger population estimated from these rows.

    The data are processed ``chunk_size`` rows at a time.  Each chunk is reduced exactly
    -- its mean is the chunk's batch gradient, its
    :math:`M_2 = \\sum_{i\\in b}(g_i - \\bar g_b)^2` is a two-pass sum of squared deviations
    -- and combined with the running float64 state by Chan et al.'s rule, never as an
    unguarded :math:`E[g^2] - E[g]^2`.  Memory is O(P) plus one chunk of activations.  On
    the ``cpu`` backend a compiled kernel computes :math:`M_2` from the layer inputs and
    deltas without materialising the chunk's per-example gradients (for float64 models by
    a guarded float64 shortcut, see ``exact``); other backends materialise them in blocks
    of at most 2^22 entries.

    Parameters
    ----------
    model : minigd.MLP
    X, y : as for :func:`per_example_grads`; at least 2 examples
    population : int or None, default None
        None: the *n* rows **are** the population (e.g. the whole training set) and every
        statistic is exact.  An integer ``N >= n``: the rows are a simple random sample,
        drawn uniformly without replacement, of *n* out of *N* examples (e.g. a random
        subset of a training set of *N*); then ``grad_norm_sq`` is corrected to be unbiased
        for the population's :math:`|G|^2`, ``noise_scale`` uses it, and standard errors
        are attached (see Notes).  ``N == n`` gives the ``None`` result with zero SEs.
        An integer below *n* raises ValueError, anything else (a float, a bool) TypeError.
    chunk_size : int, default ``minigd.model.EVAL_CHUNK`` (2048)
        Rows per backend call.  Only speed, memory and rounding depend on it.
    exact : bool or None, default None
        How the ``cpu`` backend computes each chunk's :math:`M_2`.  ``True``: the
        two-pass form for every weight, its sums in the model dtype.  ``False``: the
        guarded float64 shortcut for every model: :math:`\\sum_i g_i^2` of a dense layer's
        weights is one float64 GEMM of the squared layer inputs and squared deltas, and
        :math:`M_2 = \\sum g^2 - (\\sum g)^2/k` is kept only where cancellation cannot
        cost more than :math:`10^{-7}` relative; the other weights (a squared mean
        within a safety factor of the mean square: per-example signal-to-noise ratios
        above roughly :math:`10^5`) are recomputed by the two-pass form (see Notes).
        ``None``: the shortcut for float64 models; for float32 ones the blocked two-pass
        form (the two-pass sweep with its float32 sums formed in groups of rows and added
        into float64 every 32 rows, and the weights whose float32 centre could cost
        accuracy -- per-example signal-to-noise ratios above ~1e4 at chunks of 2048 rows --
        or whose squares could underflow -- per-example standard deviations below ~1e-15 --
        recomputed exactly: see Notes).  Other backends always use the two-pass form.

    Returns
    -------
    GradMoments
        ``n``, ``mean`` (the full-data gradient; (P,) float64), ``var`` ((P,) float64,
        ``ddof=1``), and the derived ``trace_cov``, ``grad_norm_sq``, ``noise_scale``
        (:math:`B_\\mathrm{simple}`), ``gsnr``, ``mean_gsnr``, ``diversity``.  Also
        ``population`` (N or None), ``mean_norm_sq`` (the raw :math:`|\\bar g|^2` of the
        rows) and the standard errors ``grad_norm_sq_se``, ``trace_cov_se``,
        ``noise_scale_se`` (0.0 when exact: ``population`` None or *n*).

    Notes
    -----
    Accuracy: with the two-pass form (``exact=True``) the result equals a float64
    two-pass mean / variance of :func:`per_example_grads` up to rounding in the model's
    dtype (the chunk's :math:`M_2` is accumulated in the model's dtype, chunks are combined
    in float64).  For a float32 model that rounding is measurable: relative errors of the
    variance of ~4e-7 at chunks of 64 rows, 1e-6 to 3e-6 at 512-2048 rows, and growing
    with the signal-to-noise ratio (the deviations from a float32 centre cancel: 7e-6 at
    :math:`10^6`, 8e-4 at :math:`10^8`, 2048 rows; bench/results/gradstats_issue20.md).
    The float32 default, the blocked form, is within :math:`6 \\times 10^{-7}` of the
    exact variance of the stored factors' per-example gradients at every chunk size and
    signal-to-noise ratio tested (1 to :math:`10^{12}`, tests/test_moments_blocked.py;
    its bound, :math:`8.9 \\times 10^{-7}`, holds for any data: sparse layers, repeated
    rows, tiny gradients whose squares would be subnormal floats --
    tests/test_moments_hostile.py), at
    1.0-1.1x the two-pass form's cost from chunks of 32 rows, and on CPUs with AVX-512 at
    0.7-0.9x of it from 128 rows: there its sweep runs in register-blocked tiles
    (``minigd.kernels._tiles``, the same arithmetic) at the GEMM's rate
    (bench/results/gradstats.md; ``minigd.kernels.cpu_stats.moments_update_blocked`` has
    the error analysis).
    With the shortcut every chunk's :math:`M_2` is within :math:`10^{-7}` (relative) of
    the exact value for the factors the backward pass produced, float32 models included
    (their sums are then formed in float64, so ``exact=False`` makes a float32 model's
    variance *more* accurate than the two-pass form, at about the cost of a second float64
    GEMM); the variance is held to :math:`10^{-6}` of the float64 two-pass form at
    signal-to-noise ratios up to :math:`10^8` (tests/test_moments_shortcut.py).  The
    guard, its safety factor :math:`\\delta(k) \\approx 6ku/\\tau` (:math:`u = 2^{-53}`,
    :math:`\\tau = 10^{-7}`) and the error analysis are in
    ``minigd.kernels.cpu_stats.moments_update_shortcut``; the backend counts the weights
    that fell back (``model.backend_impl.last_moments_fallbacks`` for the last chunk,
    ``moments_fallbacks`` in total).  Cost: on x86 a float64 multiply-add costs two
    float32 ones, so the shortcut's one float64 GEMM halves the two-pass work of a float64
    model and merely equals that of a float32 one (bench/results/gradstats.md).

    **A subset is not the population** (McCandlish et al. 2018, App. A.1).  For *n* rows
    drawn without replacement from *N*,
    :math:`E|\\bar g|^2 = |G|^2 + (1/n - 1/N)\\,\\mathrm{tr}(\\Sigma)` (``ddof=1`` over the
    population) while :math:`\\mathrm{tr}(\\hat\\Sigma)` is unbiased, so with
    ``population=N``

    .. math::
        \\widehat{|G|^2} = |\\bar g|^2 - \\Big(\\frac1n - \\frac1N\\Big)
        \\mathrm{tr}(\\hat\\Sigma), \\qquad
        \\hat B_\\mathrm{simple} = \\mathrm{tr}(\\hat\\Sigma) / \\widehat{|G|^2}.

    The uncorrected :math:`\\mathrm{tr}(\\hat\\Sigma)/|\\bar g|^2` is biased low and can never
    much exceed *n*.  :math:`\\widehat{|G|^2}` is unbiased but can be negative on a draw:
    the noise of the sample mean then swamps the signal (it is not resolved at this *n*),
    and ``noise_scale`` is ``inf`` (``nan`` if the trace is 0 too); use more rows.  The
    ratio is not itself unbiased; measure on the full data when that is affordable, and
    otherwise redraw the subset per measurement and carry the standard error.

    Standard errors: a delete-a-group jackknife over ``G = min(20, n // 2)`` groups, rows
    assigned to groups by a fixed-seed permutation (deterministic results), its variance
    multiplied by the finite-population factor :math:`1 - n/N`.  Each group is streamed
    separately and kept as its count, its mean gradient ((P,) float64) and the trace of
    its :math:`M_2`; leaving one group out follows exactly from Chan's combination rule
    (:func:`minigd.gradstats.moments.jackknife_se`).  Memory: ``G * P * 8`` bytes, with G
    lowered (not below 2) to keep that within 64 MiB, so models above about 4 million
    parameters use 2 groups and a proportionally larger buffer; with fewer than 4 rows
    the SEs are ``nan``.  Backend calls carry one group (about ``n / G`` rows) at a time.
    ``noise_scale_se`` is ``nan`` when ``noise_scale`` is not finite, ``inf`` when some
    leave-one-group-out :math:`|G|^2` estimate is :math:`\\le 0`.

    Examples
    --------
    >>> import numpy as np, minigd as mg
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(1000, 8)).astype(np.float32); y = rng.integers(0, 3, 1000)
    >>> m = mg.grad_moments(mg.MLP([8, 16, 3], seed=0), X, y)
    >>> m.n, m.mean.shape
    (1000, (195,))
    >>> bool(m.noise_scale > 0)
    True

    The same statistics of a training set of 10000 examples, estimated from these 1000:

    >>> s = mg.grad_moments(mg.MLP([8, 16, 3], seed=0), X, y, population=10_000)
    >>> s.grad_norm_sq < s.mean_norm_sq, s.grad_norm_sq_se > 0
    (True, True)
    """
    _check_model(model, "grad_moments")
    X, yi, yf = model.check_Xy(X, y)
    chunk_size = check_param("chunk_size", chunk_size)
    exact = check_param("exact", exact)
    n = X.shape[0]
    if n < 2:
        raise ValueError(f"X: expected at least 2 examples for the ddof=1 variance, got {n}")
    if population is None:
        return accumulate_moments(model, X, yi, yf, np.arange(n, dtype=np.int64), chunk_size, exact=exact).finalize()
    population = check_population(population, n)
    return sample_moments(
        n,
        MomentAccumulator(model.n_params),
        population,
        lambda idx, acc: accumulate_moments(model, X, yi, yf, idx, chunk_size, acc, exact=exact),
    )


def accumulate_moments(
    model,
    X,
    yi,
    yf,
    idx,
    chunk_size: int = EVAL_CHUNK,
    acc: MomentAccumulator | None = None,
    *,
    exact: bool | None = None,
) -> MomentAccumulator:
    """Fold the per-example gradients of rows ``idx`` of already validated ``(X, yi, yf)``
    (see ``model.check_Xy``) into a float64 :class:`MomentAccumulator` (a new one unless
    ``acc`` is given), ``chunk_size`` rows per backend call.  The engine of
    :func:`grad_moments` (``exact`` as there)."""
    impl = model.backend_impl
    P = model.n_params
    acc = MomentAccumulator(P) if acc is None else acc
    params = model.params
    n = len(idx)
    if hasattr(impl, "moments_update"):
        kw = {"exact": exact} if getattr(impl, "moments_shortcut", False) else {}
        grad = np.empty(P, dtype=model.dtype)
        impl.reserve(min(chunk_size, n))
        for s in range(0, n, chunk_size):
            rows = idx[s : s + chunk_size]
            B = len(rows)
            _training_pass(model, B)
            acc._fold(
                B,
                lambda n_old, mean, m2, rows=rows, B=B: impl.moments_update(
                    params, grad, X, yi, yf, rows, B, n_old, mean, m2, **kw
                ),
            )
    else:
        block = max(1, min(chunk_size, _GENERIC_BLOCK_ENTRIES // P, n))
        G = np.empty((block, P), dtype=model.dtype)
        for s in range(0, n, block):
            rows = idx[s : s + block]
            B = len(rows)
            _training_pass(model, B)
            impl.per_example_grads(params, X, yi, yf, rows, B, G)
            acc.update(G[:B])
    if exact is True and not np.isfinite(acc._m2).all() and np.isfinite(params).all():
        k = int(np.count_nonzero(~np.isfinite(acc._m2)))
        raise ValueError(
            f"exact: True sums each chunk's squared deviations in the model dtype ({model.dtype.name}), and for "
            f"{k} parameters they overflowed it (per-example gradients too large for its squares); "
            "use exact=None (the default) or exact=False, whose sums reach float64"
        )
    return acc
