"""The backend protocol: what a model asks of its compute core.

A backend is bound to one model shape (layer sizes, activation codes, loss code, dtype).
It owns the workspace (sized for the largest batch it has been asked to run; growing it is
the only allocation, and it never happens inside a training step once ``reserve`` was
called) and offers batch-level operations that write into caller-owned buffers:

``forward(params, X, idx, B)``
    evaluation-mode logits of rows ``idx[:B]`` of X; returns a (B, n_out) array that may be
    a view into the workspace (valid until the next call).
``losses(params, X, yi, yf, idx, B)``
    per-example losses (B,) of the batch, evaluation mode, float64 or model dtype.
``loss_grad(params, grad, X, yi, yf, idx, B, want_sqn=False, want_row_loss=False)``
    mean loss of the batch (float); writes the gradient of that mean loss into ``grad``.
    Returns ``(loss, rows)`` where ``rows`` is the (B,) per-example squared gradient norms
    (``want_sqn``) or per-example losses (``want_row_loss``), else None; a workspace view.
``opt_apply(params, grad, opt_state, lr, t)``
    runs the optimizer chain on ``grad`` (in place, turning it into the update) and adds
    it to ``params`` unless that would make a parameter non-finite; returns
    ``(applied, |g|^2)`` with the squared norm of the raw gradient.
``train_step(params, grad, X, yi, yf, idx, B, opt_state, lr, t, want_sqn=False)``
    loss_grad followed by opt_apply, as one call where the backend can fuse them;
    returns ``(loss, applied, |g|^2)``.  With ``want_sqn`` the per-example squared
    gradient norms of the batch are left in ``self.ws.scratch(B)`` (read them with
    ``last_sqnorms(B)``).  ``grad`` is scratch: what it holds afterwards depends on the
    path taken (the update after separate passes; staged values, or nothing past a block
    of scratch, after the cpu backend's fused batch-1 step).

Per-example gradient statistics (:mod:`minigd.gradstats`):

``per_example_terms(params, X, yi, yf, idx, B, grad=None)``
    the factors of the per-example gradients of rows ``idx[:B]`` (training mode): a list,
    one ``(A_l, Dper_l)`` pair per layer, where ``A_l`` (B, n_l) is the layer's input (the
    batch itself for l = 0, else a_{l-1}) and ``Dper_l`` (B, n_{l+1}) the deltas of each
    example's **own** loss (not scaled by 1/B).  Example r's gradient is
    ``outer(A_l[r], Dper_l[r])`` for W_l and ``Dper_l[r]`` for b_l.  With ``grad`` the
    batch gradient of the mean loss is written there too.  May be workspace views (valid
    until the next call).
``per_example_grads(params, X, yi, yf, idx, B, out)``
    writes the flat per-example gradients of rows ``idx[:B]`` into ``out[:B]`` ((>= B, P),
    model dtype); built on ``per_example_terms`` unless a backend has a faster way.
``moments_update(params, grad, X, yi, yf, idx, B, n_old, mean, m2)`` (optional)
    folds the per-example gradients of the batch into float64 running moments
    (Chan et al.'s rule; ``mean``/``m2`` (P,) float64, in place) without materialising
    them; ``grad`` is a (P,) scratch that receives the batch gradient.  Backends without
    it get the generic path of :func:`minigd.grad_moments`.
``last_sqnorms(B)``
    the (B,) per-example squared gradient norms left by the last
    ``train_step(..., want_sqn=True)`` (a workspace view).

Batch norm and dropout (``norm``, a :class:`NormSpec`; None for the plain MLP):

``forward(params, X, idx, B, training=False)``
    ``training=True`` normalises with the batch's (ghost) statistics and applies the
    current dropout masks; evaluation mode uses ``self.running`` and no dropout.
``loss_grad`` / ``train_step`` / ``per_example_*``
    are always training mode.  The dropout masks of a batch are drawn explicitly, by
    ``draw_dropout(rng, B)``, before the call: the same masks then serve any number of
    calls (a finite-difference check, a statistic and the step itself).
``update_running(B)``
    folds the (whole-batch) statistics of the last training-mode pass into ``running``
    with the momentum (once per optimizer step, by ``fit``; the gpu backend's
    ``run_steps(update_running=True)`` does it inside each step instead).

Per-example quantities are not defined with batch norm (it couples the examples of a
ghost batch): the backends raise :class:`ValueError` for them (see
:func:`check_per_example`).  With dropout alone they are: example r's gradient is taken
with its own mask row.

All arrays are C-contiguous, of the model dtype (labels int64); ``idx`` is int64.
"""

from __future__ import annotations

import time

import numpy as np

from minigd.kernels.codes import BN_AFTER, BN_BEFORE, BN_NONE  # noqa: F401  (placement codes; re-exported)
from minigd.kernels.workspace import ParamLayout, Workspace
from minigd.norm import NormSpec  # noqa: F401  (the model's spec; re-exported for importers of this module)


def _check_workspace_memory(layout: ParamLayout, capacity: int, dtype) -> None:
    """A ValueError naming the layer sizes, not a MemoryError, when the per-batch buffers
    for ``capacity`` rows would exceed this machine's physical memory (checked before
    allocating; only when the workspace grows)."""
    from minigd._validation import memory_bytes

    need = Workspace.nbytes_for(layout, capacity, dtype)
    have = memory_bytes()
    if need > have:
        raise ValueError(
            f"sizes: a batch of {capacity} rows through layers {list(layout.sizes)} needs "
            f"{need / 2**30:,.1f} GiB of activations and deltas, more than this machine's "
            f"{have / 2**30:,.1f} GiB of memory; expected a smaller batch or narrower layers"
        )


def check_per_example(norm: NormSpec | None, what: str) -> None:
    """Per-example gradients are not defined through batch norm: say so, never return a
    number that means something else."""
    if norm is not None and norm.bn:
        raise ValueError(
            f"{what}: per-example gradients are not defined for a model with "
            f"batch_norm (batch norm couples the examples of a (ghost) batch, so "
            f"no example has a gradient of its own); use a model without "
            f"batch_norm, or mini-batch gradients (model.loss_and_grad)"
        )


class Backend:
    name = "?"

    def __init__(self, layout: ParamLayout, act_codes, loss_code: int, dtype, norm: NormSpec | None = None):
        self.layout = layout
        self.act_codes = tuple(int(a) for a in act_codes)
        self.loss_code = int(loss_code)
        self.dtype = np.dtype(dtype)
        self.ws: Workspace | None = None
        self.norm = norm if (norm is not None and (norm.bn or norm.dropout > 0)) else None
        #: running mean/variance (mean_0, var_0, mean_1, ...), owned by the model
        self.running = np.zeros(layout.n_running, self.dtype)
        self.masks: list = []  # per hidden layer: (capacity, n_l) inverted-dropout masks
        self._unif: list = []  # per hidden layer: (capacity, n_l) float64 uniforms
        self._keep: list = []  # per hidden layer: (capacity, n_l) bool
        self._rec: np.ndarray | None = None  # run_steps' step records (default loop)
        self._gscratch: np.ndarray | None = None  # run_steps' gradient buffer when none is given
        self._sqn_acc: np.ndarray | None = None  # last_sqnorm_sum's accumulator

    @property
    def dropout(self) -> float:
        return 0.0 if self.norm is None else self.norm.dropout

    # -- workspace -------------------------------------------------------------------------
    def reserve(self, capacity: int) -> Workspace:
        """Make sure the workspace holds at least ``capacity`` rows."""
        if self.ws is None or self.ws.capacity < capacity:
            _check_workspace_memory(self.layout, int(capacity), self.dtype)
            self.ws = Workspace(self.layout, self.act_codes, int(capacity), self.dtype)
            self._reserve_norm(int(capacity))
        return self.ws

    def _grow(self, capacity: int) -> None:
        """Room for ``capacity`` rows before drawing masks into it (``reserve``; a backend
        whose ``reserve`` does more than that overrides this)."""
        self.reserve(capacity)

    def _reserve_norm(self, capacity: int) -> None:
        """Per-row buffers of batch norm / dropout (backends add their own)."""
        if self.dropout > 0:
            hid = self.layout.hidden
            self.masks = [np.ones((capacity, n), self.dtype) for n in hid]
            self._unif = [np.zeros((capacity, n), np.float64) for n in hid]
            self._keep = [np.zeros((capacity, n), np.bool_) for n in hid]

    def draw_dropout(self, rng: np.random.Generator, B: int) -> None:
        """Draw the inverted-dropout masks of the next B rows from ``rng``: per hidden
        layer in order, B * n_l uniforms (float64, row-major); a unit is kept when its
        uniform is >= p, and kept units are scaled by 1 / (1 - p).  No allocation; the
        same generator state gives the same masks on every backend."""
        p = self.dropout
        if p <= 0:
            return
        self._grow(B)
        for u in self._unif:
            rng.random(out=u[:B])
        self._masks_from_uniforms(B)

    def _masks_from_uniforms(self, B: int) -> None:
        """``masks[l][:B]`` from the uniforms ``_unif[l][:B]``: kept (scaled by 1 / (1 - p))
        where the uniform is >= p.  No allocation."""
        p = self.dropout
        scale = 1.0 / (1.0 - p)
        for m, u, k in zip(self.masks, self._unif, self._keep):
            np.greater_equal(u[:B], p, out=k[:B])
            # cast, then scale in place: a mixed bool x float ufunc call would allocate
            # a casting buffer (up to 64 kB) on every draw
            np.copyto(m[:B], k[:B])
            np.multiply(m[:B], scale, out=m[:B])

    def update_running(self, B: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def workspace_bytes(self) -> int:
        return 0 if self.ws is None else self.ws.nbytes

    # -- contract --------------------------------------------------------------------------
    def forward(self, params, X, idx, B):  # pragma: no cover - abstract
        raise NotImplementedError

    def losses(self, params, X, yi, yf, idx, B):
        """Per-example losses (B,) of rows idx[:B], evaluation mode (a workspace view)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def loss_grad(self, params, grad, X, yi, yf, idx, B, want_sqn=False, want_row_loss=False):
        raise NotImplementedError  # pragma: no cover - abstract

    def opt_apply(self, params, grad, opt_state, lr, t):
        raise NotImplementedError  # pragma: no cover - abstract

    def per_example_terms(self, params, X, yi, yf, idx, B, grad=None):
        raise NotImplementedError  # pragma: no cover - abstract

    def per_example_grads(self, params, X, yi, yf, idx, B, out):
        """Flat per-example gradients of rows idx[:B] into out[:B] (see the module doc)."""
        terms = self.per_example_terms(params, X, yi, yf, idx, B)
        wo, bo = self.layout._offsets()
        for l, (A, D) in enumerate(terms):
            fi, fo = A.shape[1], D.shape[1]
            blk = out[:B, wo[l] : wo[l] + fi * fo]
            blk.shape = (B, fi, fo)  # a view (raises rather than copy)
            np.multiply(A[:, :, None], D[:, None, :], out=blk)
            out[:B, bo[l] : bo[l] + fo] = D

    def last_sqnorms(self, B):
        """(B,) per-example squared gradient norms of the last ``train_step(want_sqn=True)``."""
        return self.ws.scratch(B)

    def warm_up(self, params, grad, X, yi, yf, batch_sizes, opt_state, want_sqn=False, eval_sizes=()) -> None:
        """Make the first timed ``train_step`` of a run as fast as the others: compile (or
        load from a compile cache) whatever the steps of batch sizes ``batch_sizes`` on these
        arrays will run, and the evaluations of ``eval_sizes`` rows (``losses``, ``forward``;
        ``fit`` passes it only when the run evaluates).  Leaves ``params``, ``opt_state`` and
        ``running`` as they were (``grad`` and the workspace are scratch); draws no random
        numbers.  Nothing to do for a backend without compiled code (the NumPy reference);
        ``fit`` calls it before its clock starts."""

    # -- the multi-step loop ----------------------------------------------------------------
    #: how many steps ``fit`` may hand to one :meth:`run_steps` call (an upper bound; fit
    #: also ends a call wherever it must look at the model: an evaluation, a checkpoint, a
    #: budget, a tracked step, a per-step callback).  Host backends run the default loop
    #: below; a device backend reads its step records back once per call.
    steps_per_call: int = 256
    #: whether :meth:`run_steps` reports ``grad_norm_sq`` for every step, also without
    #: ``want_sqn`` (the host backends compute it in the optimizer pass anyway)
    reports_grad_norm_sq: bool = True
    #: whether :meth:`run_steps` takes ``track=(first, every)``: per-example norms on some
    #: steps of a run (else the loop ends a run at each tracked step)
    tracks_within_run: bool = True

    def max_run_steps(self, B: int) -> int:
        """The most steps of B rows one :meth:`run_steps` call can take (device memory for a
        dropout model's masks on the gpu backend); no limit beyond ``steps_per_call`` here."""
        return 1 << 30

    def _step_records(self, n_steps: int) -> np.ndarray:
        """(n_steps, 5) float64 rows ``loss, applied, |g|^2, time, sqn_sum`` reused across calls
        (grown, never shrunk: no allocation once a run's largest call was made)."""
        rec = self._rec
        if rec is None or rec.shape[0] < n_steps:
            rec = self._rec = np.zeros((max(int(n_steps), 16), 5), np.float64)
        return rec

    def run_steps(
        self,
        params,
        X,
        yi,
        yf,
        idx,
        B,
        n_steps,
        opt_state,
        lrs,
        t0,
        want_sqn=False,
        read_every=None,
        grad=None,
        dropout_rng=None,
        update_running=False,
        max_time=None,
        track=None,
    ):
        """``n_steps`` training steps of B rows: step s takes rows ``idx[s * B:(s + 1) * B]``
        (or all of ``idx`` when it holds just B rows: full-batch steps), learning rate
        ``lrs[s]`` and update count ``t0 + s``; it stops after the first rejected step
        (non-finite loss or update, not applied) and, with ``max_time``, after the first
        step that ends ``max_time`` seconds or more after the call started.

        Per step, in this order: the dropout masks from ``dropout_rng`` (when given),
        :meth:`train_step`, and with ``update_running`` batch norm's running statistics
        (applied steps).  ``grad`` is the gradient buffer the steps write (a backend
        scratch when None).  ``read_every`` is for device backends (how often the records
        are read back); host backends have nothing to read back.

        Returns a dict of (n_done,) arrays (views of reused buffers, valid until the next
        call): ``loss``, ``applied`` (bool), ``grad_norm_sq`` (the raw gradient's squared
        norm; 0 unless ``want_sqn`` on a backend whose ``reports_grad_norm_sq`` is False) and
        ``time`` (seconds from the call's start to the end of each step).  With ``want_sqn``
        the last step's per-example squared norms are left for :meth:`last_sqnorms`.

        ``track=(first, every)`` (backends whose ``tracks_within_run`` is True): steps
        ``first, first + every, ...`` of the run compute their per-example squared norms,
        and the result has ``sqn_sum``, their float64 row-order sum (:meth:`last_sqnorm_sum`;
        NaN at the untracked steps) -- noise tracking without ending the run at each tracked
        step.
        """
        rec = self._step_records(n_steps)
        if grad is None:
            grad = self._grad_scratch(params)
        full = idx.shape[0] == B
        running = update_running and self.norm is not None and bool(self.norm.bn)
        step = self.train_step
        clock = time.perf_counter
        first, every = (n_steps, 1) if track is None else track
        start = clock()
        done = 0
        for s in range(n_steps):
            if dropout_rng is not None:
                self.draw_dropout(dropout_rng, B)
            rows = idx if full else idx[s * B : (s + 1) * B]
            tracked = s >= first and (s - first) % every == 0
            loss, ok, gsq = step(params, grad, X, yi, yf, rows, B, opt_state, lrs[s], t0 + s, want_sqn or tracked)
            if ok and running:
                self.update_running(B)
            now = clock() - start
            r = rec[s]
            r[0], r[1], r[2], r[3] = loss, ok, gsq, now
            r[4] = self.last_sqnorm_sum(B) if tracked and ok else np.nan
            done = s + 1
            if not ok or (max_time is not None and now >= max_time):
                break
        return self._run_result(rec, done)

    @staticmethod
    def _run_result(rec: np.ndarray, done: int) -> dict:
        """:meth:`run_steps`' result: views of the first ``done`` rows of the records."""
        return {
            "loss": rec[:done, 0],
            "applied": rec[:done, 1] != 0,
            "grad_norm_sq": rec[:done, 2],
            "time": rec[:done, 3],
            "sqn_sum": rec[:done, 4],
        }

    def _grad_scratch(self, params) -> np.ndarray:
        g = self._gscratch
        if g is None or g.shape != params.shape:
            g = self._gscratch = np.zeros_like(params)
        return g

    def last_sqnorm_sum(self, B: int) -> float:
        """The float64 sum, accumulated in row order, of :meth:`last_sqnorms` ``(B)`` (what
        noise tracking needs of a tracked step; a reused buffer, no allocation)."""
        if B < 1:
            return 0.0
        acc = self._sqn_acc
        if acc is None or acc.shape[0] < B:
            acc = self._sqn_acc = np.zeros(max(B, 16), np.float64)
        # (np.add.accumulate: np.cumsum's own arithmetic without its wrapper, 3x cheaper at
        # B = 32; it runs at every tracked step)
        np.add.accumulate(self.last_sqnorms(B), dtype=np.float64, out=acc[:B])
        return float(acc[B - 1])

    def train_step(self, params, grad, X, yi, yf, idx, B, opt_state, lr, t, want_sqn=False):
        loss, rows = self.loss_grad(params, grad, X, yi, yf, idx, B, want_sqn=want_sqn)
        if want_sqn:  # leave them where the contract says (compiled backends already do)
            scr = self.reserve(B).scratch(B)
            if rows is not None and rows.base is not self.ws.buf:
                scr[...] = rows
        if not np.isfinite(loss):
            return loss, False, float("nan")
        ok, gsq = self.opt_apply(params, grad, opt_state, lr, t)
        return loss, ok, gsq
