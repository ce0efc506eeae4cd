"""The default ``"cpu"`` backend: Numba kernels, BLAS for larger batches.

Per batch it picks one of two regimes (both follow the kernel contract in
``kernels/cpu.py``, and both are tested against the NumPy reference):

* **loops** (small batches): the whole step -- gather, forward, loss, backward, per-example
  norms and the optimizer update -- is one compiled call of hand-written loops.  At batch 1
  the cost of a step is mostly call overhead and passes over the parameter vector; one
  compiled call has the least of both.
* **BLAS** (larger batches): the GEMMs run in BLAS on views of the preallocated workspace
  (no allocation) and compiled kernels do the epilogues (bias + activation, fused softmax
  cross-entropy, activation backward, bias gradient, per-example norms, optimizer).  With
  SciPy installed the whole step is again ONE compiled call, whose GEMMs call NumPy's own
  OpenBLAS through its CBLAS symbol (``blas="numpy"``, the default where NumPy bundles it)
  or SciPy's through numba's ``np.dot`` (``blas="scipy"``); without SciPy, Python drives
  ``np.matmul(out=...)`` between compiled epilogues (about 20 calls per step: fine at large
  batches).  Which BLAS is a fixed rule measured in bench/results/gemm_peak.md (see
  ``CpuBackend.blas``), never a timing taken at run time.

A run of steps (``run_steps``: what ``fit`` hands the backend) is one compiled call too
(``kernels.cpu.run_steps_loops`` / ``run_steps_blas``) wherever a step is one compiled call
and the optimizer chain fuses; a single ``train_step`` is a run of one step through the same
kernel, so that a run is bitwise its steps one at a time.

A model with batch norm or dropout always takes the Python-driven BLAS path in training
mode, with the compiled epilogues of ``kernels/cpu_norm.py`` finishing each hidden layer
(bias, ghost-batch statistics, normalisation, activation, dropout); evaluation of a
dropout-only model takes the fast paths above (dropout is off there).

The crossover is a batch size that depends on the widest layer; it was measured with
``bench/crossover.py`` (see bench/results) and can be overridden per backend instance
(``model.backend_impl.blas_min_batch = ...``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import threading
import time

import numpy as np

from minigd.backends.base import BN_AFTER, BN_BEFORE, Backend, check_per_example
from minigd.kernels import _blas, _tiles
from minigd.kernels import cpu as K
from minigd.kernels import cpu_norm as KN
from minigd.kernels import cpu_stats as KS
from minigd.kernels._jit import cache_status, compile_count

#: numba's np.dot inside compiled code needs SciPy's BLAS bindings
HAVE_SCIPY = importlib.util.find_spec("scipy") is not None

#: the BLAS of the compiled GEMMs (``CpuBackend.blas``) and its code in ``lay[R_MISC, 4]``
_BLAS_CODE = {"scipy": 0, "numpy": 1}
DEFAULT_BLAS = "numpy" if _blas.AVAILABLE else "scipy"

#: the compiled training step by (loops regime?, optimizer chain fuses?): a chain that does
#: not fuse (``fusion_plan``) runs the ``*_generic`` kernels, so that the first run of a named
#: optimizer never compiles the generic chain (bench/results/cold_start.md)
_STEP = {
    (True, True): K.train_step_loops,
    (True, False): K.train_step_loops_generic,
    (False, True): K.train_step_blas,
    (False, False): K.train_step_blas_generic,
}

#: a warm-up still running after this many seconds is compiling (the first run on a machine,
#: or after the kernels changed): it says so on stderr
NOTICE_AFTER_S = 1.0


class _CompileNotice:
    """``with _CompileNotice():`` prints "compiling kernels (first run only)" to stderr if the
    body is still running after :data:`NOTICE_AFTER_S` seconds, and then how long the whole
    took.  Silent when the kernels load from numba's cache, however long that takes (no
    numba compilation started: ``kernels._jit.compile_count``): it looks again every 0.2 s.
    Nested ones are silent: the outermost speaks (``minigd.warmup.warmup`` runs many fits
    under one notice).

    One watcher thread per process (numba's compiler lets it run), started by the first
    notice and then woken by each (a condition variable): a ``fit`` opens one, and starting
    a thread per ``fit`` cost ~0.1 ms, a tenth of a 40-step fit on digits."""

    _depth = 0
    _cv = threading.Condition()
    _armed: tuple | None = None  # (compile_count at the start, deadline) of the open notice
    _shown = False
    _thread: threading.Thread | None = None

    def __enter__(self):
        cls = _CompileNotice
        cls._depth += 1
        self._outer = cls._depth == 1
        if not self._outer:
            return self
        self._t0 = time.perf_counter()
        with cls._cv:
            cls._armed = (compile_count(), self._t0 + NOTICE_AFTER_S)
            cls._shown = False
            if cls._thread is None or not cls._thread.is_alive():
                cls._thread = threading.Thread(target=cls._watch, name="minigd-compile-notice", daemon=True)
                cls._thread.start()
            cls._cv.notify()
        return self

    @classmethod
    def _watch(cls) -> None:
        cv = cls._cv
        with cv:
            while True:
                armed = cls._armed
                if armed is None or cls._shown:
                    cv.wait()
                    continue
                n0, deadline = armed
                left = deadline - time.perf_counter()
                if left > 0:
                    cv.wait(left)
                    continue
                if compile_count() == n0:  # only loading from numba's cache so far: look again
                    cls._armed = (n0, time.perf_counter() + 0.2)
                    continue
                cls._shown = True
                print("minigd: compiling kernels (first run only) ...", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        cls = _CompileNotice
        cls._depth -= 1
        if not self._outer:
            return False
        with cls._cv:
            shown, cls._shown, cls._armed = cls._shown, False, None
            cls._cv.notify()
        if shown:
            dt = time.perf_counter() - self._t0
            status = cache_status()
            kept = "cached for later runs" if status == "enabled" else f"not cached: numba's compile cache is {status}"
            print(f"minigd: kernels ready in {dt:.1f} s ({kept})", file=sys.stderr, flush=True)
        return False


def _notice_after_fork() -> None:
    """A forked child has no watcher thread, and the condition may have been held: new ones."""
    _CompileNotice._cv = threading.Condition()
    _CompileNotice._thread, _CompileNotice._armed, _CompileNotice._shown = None, None, False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_notice_after_fork)


#: whether the compiled run of steps (``CpuBackend.run_steps``) can read the step clock: its
#: kernel calls ``clock_gettime(CLOCK_MONOTONIC)``, Python's ``perf_counter`` clock on Linux
#: (a 64-bit Linux: the kernel reads a 64-bit ``struct timespec``)
COMPILED_RUNS = sys.platform.startswith("linux") and sys.maxsize > 2**32 and hasattr(time, "clock_gettime_ns")


class CpuBackend(Backend):
    name = "cpu"
    #: run steps in one compiled call where possible (False: the Python loop of
    #: :meth:`Backend.run_steps`, bitwise the same results; for comparisons and tests)
    compiled_runs: bool = True

    def __init__(self, layout, act_codes, loss_code, dtype, norm=None):
        super().__init__(layout, act_codes, loss_code, dtype, norm)
        self.compiled_blas = HAVE_SCIPY
        self.blas_min_batch = self.default_blas_min_batch(layout.sizes, self.compiled_blas)
        self.blas = DEFAULT_BLAS
        self._lr_buf = np.zeros(256, np.float64)  # the learning rates of a compiled run
        self._rec1 = np.zeros((1, 5), np.float64)  # the record of a single train_step

    @property
    def blas(self) -> str:
        """Which BLAS the compiled BLAS regime's GEMMs call: ``"numpy"``, NumPy's own OpenBLAS
        through its CBLAS symbol (``kernels/_blas.py``; the default where it is found), or
        ``"scipy"``, SciPy's through numba's ``np.dot``.  A fixed rule, not a timing taken at
        run time: a run's choice is the same in every process on the machine, which bitwise
        checkpoint/resume needs (two BLAS builds may round differently).  Measured in
        ``bench/results/gemm_peak.md``: NumPy's runs the step's GEMM chain 5-15% faster here.
        The Python-driven regime (no SciPy) always calls NumPy's through np.matmul."""
        return self._blas

    @blas.setter
    def blas(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"blas: expected 'numpy' or 'scipy', got {type(value).__name__} {value!r}")
        if value not in _BLAS_CODE:
            raise ValueError(f"blas: expected 'numpy' or 'scipy', got {value!r}")
        if value == "numpy" and not _blas.AVAILABLE:
            raise ValueError(f"blas: 'numpy' is not available here ({_blas.SOURCE}); got {value!r}")
        self._blas = value
        if self.ws is not None:
            self.ws.lay[K.R_MISC, 4] = _BLAS_CODE[value]

    def reserve(self, capacity: int):
        if self.ws is not None and self.ws.capacity >= capacity:
            return self.ws
        ws = super().reserve(capacity)
        ws.lay[K.R_MISC, 4] = _BLAS_CODE[self._blas]
        return ws

    @staticmethod
    def default_blas_min_batch(sizes, compiled_blas: bool = HAVE_SCIPY) -> int:
        """Measured crossover (bench/crossover.py, 1 thread; bench/results/crossover.md):
        loops win below it, BLAS at and above.  The loops win at batch 1 at every shape
        measured (by 2-15%); compiled BLAS wins from batch 2 while the hidden layers are
        narrower than 512, but OpenBLAS's GEMMs with a few rows and a wide (>= 512) layer
        are slow (64-512-512-10: 490 µs at batch 4 against 321 µs of loops; 784-1024-10:
        1500 against 1256), so there the loops keep batches below 8 (at 8 the two tie).  Python-driven BLAS pays ~25-40 µs of call overhead
        per step, which only wider layers or larger batches repay."""
        width = max(sizes[1:-1], default=max(sizes))
        if compiled_blas:
            return 8 if width >= 512 else 2
        width = max(sizes)
        return 2 if width >= 512 else 4 if width >= 256 else 8 if width >= 128 else 24 if width >= 64 else 48

    def use_blas(self, B: int) -> bool:
        return B >= self.blas_min_batch

    # -- contract ------------------------------------------------------------------------
    def forward(self, params, X, idx, B, training=False):
        ws = self.reserve(B)
        if self.norm is not None and (training or self.norm.bn):
            self._forward_py(params, X, idx, B, ws, training)
        elif not self.use_blas(B):
            K.forward_loops(X, idx, B, params, ws.buf, ws.lay)
        elif self.compiled_blas:
            K.forward_blas(X, idx, B, params, ws.buf, ws.lay)
        else:
            self._forward_py(params, X, idx, B, ws)
        return ws.views(B)[1][-1]

    def losses(self, params, X, yi, yf, idx, B):
        ws = self.reserve(B)
        self.forward(params, X, idx, B)
        K.loss_rows(yi, yf, idx, B, ws.buf, ws.lay, self.loss_code, True)
        return ws.scratch(B)

    def loss_grad(self, params, grad, X, yi, yf, idx, B, want_sqn=False, want_row_loss=False):
        ws = self.reserve(B)
        if self.norm is not None:
            if want_sqn:
                check_per_example(self.norm, "per-example gradient norms")
            loss = self._loss_grad_py(params, grad, X, yi, yf, idx, B, ws, want_sqn, want_row_loss)
        elif not self.use_blas(B):
            loss = K.loss_grad_loops(
                X, yi, yf, idx, B, params, grad, ws.buf, ws.lay, self.loss_code, want_sqn, want_row_loss
            )
        elif self.compiled_blas:
            loss = K.loss_grad_blas(
                X, yi, yf, idx, B, params, grad, ws.buf, ws.lay, self.loss_code, want_sqn, want_row_loss
            )
        else:
            loss = self._loss_grad_py(params, grad, X, yi, yf, idx, B, ws, want_sqn, want_row_loss)
        rows = ws.scratch(B) if (want_sqn or want_row_loss) else None
        return loss, rows

    def opt_apply(self, params, grad, opt_state, lr, t):
        apply = K.opt_apply if opt_state.plan[0] else K.opt_apply_generic
        ok, gsq = apply(
            params, grad, opt_state.codes, opt_state.hp, opt_state.soff, opt_state.state, opt_state.plan, lr, t
        )
        return bool(ok), gsq

    def train_step(self, params, grad, X, yi, yf, idx, B, opt_state, lr, t, want_sqn=False):
        ws = self.ws if (self.ws is not None and self.ws.capacity >= B) else self.reserve(B)
        regime = self._regime(B)
        if regime == "python":
            return super().train_step(params, grad, X, yi, yf, idx, B, opt_state, lr, t, want_sqn)
        run = self._compiled_run(B, opt_state)
        if run is not None:
            # a run of one step: the same machine code as each step of a longer run
            rec, lrs = self._rec1, self._lr_buf
            lrs[0] = lr
            self._run(run, params, grad, X, yi, yf, idx, B, 1, opt_state, lrs, t, want_sqn, 1, 1, -1, rec)
            loss, ok, gsq = rec[0, :3].tolist()
            return loss, ok != 0.0, gsq
        loss, ok, gsq = _STEP[regime == "loops", bool(opt_state.plan[0])](
            X, yi, yf, idx, B, params, grad, ws.buf, ws.lay, self.loss_code, want_sqn, opt_state.codes,
            opt_state.hp, opt_state.soff, opt_state.state, opt_state.plan, lr, t,
        )  # fmt: skip
        return loss, bool(ok), gsq

    def _compiled_run(self, B: int, opt_state):
        """The compiled run kernel for steps of B rows (None: steps are taken otherwise):
        the loops and compiled-BLAS regimes with an optimizer chain that fuses (every named
        optimizer; ``kernels.cpu.run_steps_loops`` / ``run_steps_blas``), where the kernel
        can read the clock (:data:`COMPILED_RUNS`) and ``compiled_runs`` is on."""
        if not (self.compiled_runs and COMPILED_RUNS) or not opt_state.plan[0]:
            return None
        regime = self._regime(B)
        return K.run_steps_loops if regime == "loops" else K.run_steps_blas if regime == "blas" else None

    def _run(
        self, run, params, grad, X, yi, yf, idx, B, n_steps, opt_state, lrs, t0, want_sqn, first, every, max_ns, rec
    ):
        ws = self.ws if (self.ws is not None and self.ws.capacity >= B) else self.reserve(B)
        start = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # the clock the kernel reads
        return run(
            X, yi, yf, idx, int(B), int(n_steps), params, grad, ws.buf, ws.lay, self.loss_code, bool(want_sqn),
            opt_state.codes, opt_state.hp, opt_state.soff, opt_state.state, opt_state.plan, lrs, int(t0), int(first),
            int(every), max_ns, start, rec,
        )  # fmt: skip

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
        """:meth:`Backend.run_steps` as one compiled call where a step is one compiled call
        anyway (:meth:`_compiled_run`: no dropout masks to draw, no batch norm to update):
        the Python loop cost ~1-1.5 us a step, a fifth of a step at batch 1.  A single
        :meth:`train_step` is a run of one step through the same kernel, so a run of n steps
        is bitwise n calls of it (tests/test_compiled_runs.py).  The step times come from
        the kernel's clock, ``clock_gettime(CLOCK_MONOTONIC)``, which is Python's
        ``time.perf_counter`` on Linux.  Anything else runs the Python loop."""
        run = None if dropout_rng is not None else self._compiled_run(B, opt_state)
        if run is None:
            return super().run_steps(
                params, X, yi, yf, idx, B, n_steps, opt_state, lrs, t0, want_sqn, read_every, grad,
                dropout_rng, update_running, max_time, track,
            )  # fmt: skip
        rec = self._step_records(n_steps)
        if len(lrs) < n_steps:  # (the Python loop would fail at lrs[len(lrs)])
            raise ValueError(f"lrs: expected a learning rate for each of n_steps={n_steps} steps, got {len(lrs)}")
        lr = self._lr_buf
        if lr.shape[0] < n_steps:
            lr = self._lr_buf = np.zeros(max(int(n_steps), 256), np.float64)
        lr[:n_steps] = lrs[:n_steps]
        first, every = (n_steps, 1) if track is None else track
        # the budget in ns (>= 0: a budget already spent stops after one step, as in Python)
        max_ns = -1 if max_time is None else math.ceil(min(max(float(max_time), 0.0), 9e9) * 1e9)
        grad = self._grad_scratch(params) if grad is None else grad
        done = self._run(
            run, params, grad, X, yi, yf, idx, B, n_steps, opt_state, lr, t0, want_sqn, first, every, max_ns, rec
        )
        return self._run_result(rec, done)

    def _regime(self, B: int) -> str:
        """Which compiled code a training step of B rows runs (see the module doc)."""
        if self.norm is not None:
            return "python"
        if not self.use_blas(B):
            return "loops"
        return "blas" if self.compiled_blas else "python"

    def warm_up(self, params, grad, X, yi, yf, batch_sizes, opt_state, want_sqn=False, eval_sizes=()):
        """One untimed step per regime (loops / compiled BLAS / Python-driven) among
        ``batch_sizes``, on rows 0..b-1 of X and the run's own arrays (so numba compiles,
        or loads from its cache, exactly the specialisations the run will call), through
        the kernels themselves (not ``train_step`` / ``update_running``, whose calls stay
        one per step of the run); then ``params`` and the optimizer buffers are put back
        bitwise.  ``running`` is not touched (its kernel runs on copies); the dropout masks
        are not redrawn (``fit`` draws each step's before the step).  A warm-up that takes
        over :data:`NOTICE_AFTER_S` (numba compiling: the first run on a machine) says so on
        stderr (:class:`_CompileNotice`).  ``eval_sizes``: the rows of the run's evaluation
        chunks; one untimed evaluation (:meth:`losses`) per regime among them, so that the
        first evaluation does not compile mid-run either."""
        with _CompileNotice():
            self._warm_up(params, grad, X, yi, yf, batch_sizes, opt_state, want_sqn)
            evals = {}
            for b in sorted({int(b) for b in eval_sizes}):
                evals.setdefault(self.use_blas(b), b)
            for b in evals.values():  # row 0 repeated: any size the workspace holds; reads params only
                self.losses(params, X, yi, yf, np.zeros(b, np.int64), b)

    def last_sqnorm_sum(self, B: int) -> float:
        """:meth:`Backend.last_sqnorm_sum` in one compiled call (the same float64 row-order
        sum; ~0.3 µs instead of ~2: it runs at every noise-tracked step)."""
        return KS.sum64(self.ws.scratch(B)) if B >= 1 else 0.0

    def _warm_up(self, params, grad, X, yi, yf, batch_sizes, opt_state, want_sqn):
        reps = {}
        for b in sorted({int(b) for b in batch_sizes}):
            reps.setdefault(self._regime(b), b)
        if not reps:
            return
        idx = np.arange(max(reps.values()), dtype=np.int64)
        ws = self.reserve(len(idx))
        t = int(opt_state.t) + 1
        opt = (opt_state.codes, opt_state.hp, opt_state.soff, opt_state.state, opt_state.plan)
        saved = (params.copy(), opt_state.state.copy(), opt_state.hp.copy())
        fused = bool(opt_state.plan[0])
        if want_sqn:
            KS.sum64(ws.scratch(1))
        try:
            for regime, b in reps.items():
                if regime != "python":
                    run = self._compiled_run(b, opt_state)
                    if run is not None:  # compiles (or loads) the run kernel, and its step kernel with it
                        self._lr_buf[0] = 0.0
                        self._run(run, params, grad, X, yi, yf, idx[:b], b, 1, opt_state, self._lr_buf, t, want_sqn,
                                  1, 1, -1, self._rec1)  # fmt: skip
                        continue
                    step = _STEP[regime == "loops", fused]
                    step(X, yi, yf, idx[:b], b, params, grad, ws.buf, ws.lay, self.loss_code, want_sqn, *opt, 0.0, t)
                    continue
                self._loss_grad_py(params, grad, X, yi, yf, idx[:b], b, ws, want_sqn, False)
                (K.opt_apply if fused else K.opt_apply_generic)(params, grad, *opt, 0.0, t)
                if self.norm is not None and self.norm.bn:
                    rm, rv = self.layout.running_views(self.running)
                    KN.running_update(
                        self._nbuf[0]["stats"],
                        b,
                        self.norm.ghost_size(b),
                        self.norm.momentum,
                        rm[0].copy(),
                        rv[0].copy(),
                    )
        finally:
            params[...] = saved[0]
            opt_state.state[...] = saved[1]
            opt_state.hp[...] = saved[2]

    # -- BLAS path driven from Python (no SciPy; batch norm and dropout) ------------------------
    def _forward_py(self, params, X, idx, B, ws, training=False):
        x0, zs, as_, _, _ = ws.views(B)
        Ws = self._weight_views(params)
        K.gather_rows(X, idx, B, ws.buf, ws.lay)
        a = x0
        L = self.layout.n_layers
        norm = self.norm
        if norm is not None:
            if training:
                norm.check_batch(B)
            nb = self._norm_views(params, B)
            g = norm.ghost_size(B) if training else B
            has_mask = int(training and norm.dropout > 0)
        for l in range(L):
            np.matmul(a, Ws[l], out=zs[l])
            if norm is None or l == L - 1:
                K.bias_act_forward(B, params, ws.buf, ws.lay, l)
            else:
                b, gam, bet, rm, rv, mask, pre, act, xh, st, acc = nb[l]
                h = as_[l]
                if norm.bn == BN_AFTER:  # v = BN(a) is not needed by the backward pass:
                    pre = h  # written into h (and masked there in place)
                elif not has_mask:  # the last value is written straight into h
                    act = h
                KN.hidden_forward(
                    b,
                    gam,
                    bet,
                    rm,
                    rv,
                    mask,
                    zs[l],
                    pre,
                    act,
                    xh,
                    h,
                    st,
                    acc,
                    B,
                    g,
                    self.act_codes[l],
                    norm.bn,
                    int(training),
                    has_mask,
                    norm.eps,
                )
            a = as_[l]

    def _loss_grad_py(self, params, grad, X, yi, yf, idx, B, ws, want_sqn, want_row_loss):
        self._forward_py(params, X, idx, B, ws, self.norm is not None)
        x0, zs, as_, ds, _ = ws.views(B)
        loss = K.loss_rows(yi, yf, idx, B, ws.buf, ws.lay, self.loss_code, want_row_loss and not want_sqn)
        Ws = self._weight_views(params)
        gWs = self._weight_views(grad)
        L = self.layout.n_layers
        scale = float(B) * float(B)
        for l in range(L - 1, -1, -1):
            a_prev = x0 if l == 0 else as_[l - 1]
            np.matmul(a_prev.T, ds[l], out=gWs[l])
            K.bias_grad(B, grad, ws.buf, ws.lay, l)
            if want_sqn:
                K.sqnorm_accumulate(B, ws.buf, ws.lay, l, scale, l == L - 1)
            if l > 0:
                np.matmul(ds[l], Ws[l].T, out=ds[l - 1])
                if self.norm is None:
                    K.act_backward(B, ws.buf, ws.lay, l - 1)
                else:
                    self._hidden_backward(l - 1, B, ws, params, grad)
        return loss

    # -- batch norm and dropout (kernels/cpu_norm.py) -------------------------------------------
    def _reserve_norm(self, capacity):
        super()._reserve_norm(capacity)
        norm = self.norm
        if norm is None:
            return
        hid = self.layout.hidden
        n_ghosts = -(-capacity // norm.ghost) if (norm.bn and norm.ghost) else 1
        alloc = lambda n, on: np.zeros((capacity if on else 0, n), self.dtype)  # noqa: E731
        self._nbuf = [
            dict(
                pre=alloc(n, norm.bn == BN_BEFORE),
                act=alloc(n, True),
                xh=alloc(n, norm.bn),
                stats=np.zeros((3, n_ghosts, n)),
                acc=np.zeros((2, n)),
            )
            for n in hid
        ]
        self._nviews = {}

    def _norm_views(self, params, B):
        """Per hidden layer the argument views of the cpu_norm kernels for B rows."""
        key = (B, id(params))  # the entry keeps params alive: its id stays its own
        e = self._nviews.get(key)
        if e is None:
            _, bs = self.layout.views(params)
            gam, bet = self.layout.bn_views(params)
            rm, rv = self.layout.running_views(self.running)
            v = []
            for l, nb in enumerate(self._nbuf):
                mask = self.masks[l][:B] if self.masks else nb["act"][:0]
                act = nb["act"][:B]
                pre = nb["pre"][:B] if self.norm.bn == BN_BEFORE else act
                xh = nb["xh"][:B] if self.norm.bn else act
                v.append((bs[l], gam[l], bet[l], rm[l], rv[l], mask, pre, act, xh, nb["stats"], nb["acc"]))
            if len(self._nviews) > 8:
                self._nviews.clear()
            e = self._nviews[key] = (v, params)
        return e[0]

    def _hidden_backward(self, l, B, ws, params, grad):
        """ds[l] = dLoss/dh_l -> dLoss/dz_l, and dgamma_l, dbeta_l into ``grad``."""
        _, zs, as_, ds, _ = ws.views(B)
        norm = self.norm
        _, gam, _, _, _, mask, pre, act, xh, st, acc = self._norm_views(params, B)[l]
        has_mask = int(norm.dropout > 0)
        if not has_mask and norm.bn == BN_BEFORE:  # as in _forward_py: a_l was written to h
            act = as_[l]
        ggam, gbet = self._bn_grad_views(grad)
        KN.hidden_backward(
            mask,
            zs[l],
            pre,
            act,
            xh,
            gam,
            st,
            ds[l],
            ggam[l],
            gbet[l],
            acc,
            B,
            norm.ghost_size(B),
            self.act_codes[l],
            norm.bn,
            has_mask,
        )

    def _bn_grad_views(self, vec):
        c = getattr(self, "_gv", None)
        if c is None or c[0] is not vec:
            c = self._gv = (vec, self.layout.bn_views(vec))
        return c[1]

    def update_running(self, B):
        """Fold the whole-batch statistics of the last training pass into ``running``."""
        norm = self.norm
        if norm is None or not norm.bn:
            return
        g = norm.ghost_size(B)
        rm, rv = self.layout.running_views(self.running)
        for l, nb in enumerate(self._nbuf):
            KN.running_update(nb["stats"], B, g, norm.momentum, rm[l], rv[l])

    def _weight_views(self, vec):
        # cached per array object: params/grad are long-lived flat vectors.  The entry keeps
        # vec alive, so its id cannot be reused while cached.  (Not vec.ctypes.data: each
        # .ctypes builds objects that only the cyclic gc frees, a per-step allocation.)
        key = id(vec)
        cache = getattr(self, "_wv", None)
        if cache is None:
            cache = self._wv = {}
        v = cache.get(key)
        if v is None:
            if len(cache) > 8:
                cache.clear()
            v = cache[key] = (self.layout.views(vec)[0], vec)
        return v[0]

    # -- per-example gradient statistics (kernels/cpu_stats.py) ---------------------------------
    def _stats_scratch(self, B):
        """Scratch for the stats kernels: (grad-sized vector, two (max width * B) blocks,
        two buffers of the largest layer's weight count)."""
        s = getattr(self, "_st", None)
        sizes = self.layout.sizes
        if s is None or s[1].shape[0] < max(sizes) * B:
            big = max(a * b for a, b in zip(sizes[:-1], sizes[1:]))
            wb = max(sizes) * max(B, 1)
            s = self._st = (
                np.zeros(self.layout.n_params, self.dtype),
                np.zeros(wb, self.dtype),
                np.zeros(wb, self.dtype),
                np.zeros(big, self.dtype),
                np.zeros(big, self.dtype),
            )
        return s

    def per_example_terms(self, params, X, yi, yf, idx, B, grad=None):
        """[(A_l, Dper_l)]: the layer inputs (workspace views) and per-example deltas
        (B times the workspace's mean-loss deltas, new arrays) of one loss_grad call."""
        check_per_example(self.norm, "per-example gradients")
        g = self._stats_scratch(B)[0] if grad is None else grad
        self.loss_grad(params, g, X, yi, yf, idx, B)
        x0, _, as_, ds, _ = self.ws.views(B)
        return [(x0 if l == 0 else as_[l - 1], ds[l] * B) for l in range(self.layout.n_layers)]

    def per_example_grads(self, params, X, yi, yf, idx, B, out):
        check_per_example(self.norm, "per-example gradients")
        g, _, _, tmp, _ = self._stats_scratch(B)
        self.loss_grad(params, g, X, yi, yf, idx, B)
        KS.per_example_fill(B, self.ws.buf, self.ws.lay, out, tmp)

    #: ``moments_update`` takes ``exact=`` (``grad_moments`` passes it through)
    moments_shortcut = True
    #: debug counters of the guarded shortcut: weights whose chunk M2 fell back to the exact
    #: two-pass form in the last ``moments_update`` call, and in all calls so far
    last_moments_fallbacks = 0
    moments_fallbacks = 0
    #: whether the float32 moments sweep with the register-blocked tiles (``KS._sq_dev_tiled``;
    #: default: on CPUs with AVX-512, where they run 1.6-2.2x the loops; chunks of at least
    #: ``KS.TILE_MIN_ROWS`` rows, where the tiles built: ``_tiles.ensure()``) or ``KS._sq_dev``
    moments_tiles = _tiles.FAST
    #: opt in to the one-pass form (``KS.moments_update_onepass``: S1 and S2 by the tiles, no
    #: weight-gradient GEMM) for float32 chunks of at least ``KS.ONEPASS_MIN_ROWS`` rows where
    #: the tiles built, instead of the blocked two-pass form.  Off by default: its guard bounds
    #: the rounding of S2 statistically (independent roundings), and data whose rows repeat
    #: break that -- duplicated rows after one large row put M2 3e-6 off, 50 u of S2 (the
    #: kernel's Notes); the blocked form's bound holds for any data.  7-14% less time where it
    #: applies (bench/results/gradstats_issue20.md)
    moments_onepass = False

    def moments_update(self, params, grad, X, yi, yf, idx, B, n_old, mean, m2, exact=None):
        """Fold the batch's per-example gradients into the float64 running moments.

        ``exact`` picks how each weight's chunk M2 is computed: True, the two-pass form
        (``KS.moments_update``, float32 sums over the whole chunk); False, the guarded float64
        shortcut (``KS.moments_update_shortcut``: one GEMM of squared factors, the
        two-pass form where the guard finds cancellation); None, the shortcut for float64
        models and for float32 ones the blocked two-pass form (``KS.moments_update_blocked``:
        the same sweep over 32-row blocks, in groups of rows, summed in float64, the weights
        whose centre's rounding or the squares' underflow could matter recomputed exactly;
        within 6e-7 where the plain float32 two-pass was off by up to 2e-6, and by 1e-3 at a
        signal-to-noise ratio of 1e8) -- or, where ``moments_onepass`` opts in, for chunks of
        at least ``KS.ONEPASS_MIN_ROWS`` rows, the one-pass form (``KS.moments_update_onepass``:
        S1 and S2 of each weight by IR tiles, without the weight-gradient GEMMs, guarded
        against cancellation by a statistical rounding bound; the blocked form for the
        weights it refuses).  On x86 SIMD a float64 FMA costs
        two float32 ones, so for a float32 model the shortcut's GEMM costs what the
        float32 two-pass it replaces costs (measured: bench/results/gradstats.md) while
        a float32 model also needs S1 in float64 (a second GEMM); for a float64 model it
        halves that work.  A batch of one row always takes the two-pass form (M2 = 0).
        """
        check_per_example(self.norm, "gradient moments")
        if exact is not None and not isinstance(exact, (bool, np.bool_)):
            raise TypeError(f"exact: expected None, True or False, got {type(exact).__name__} {exact!r}")
        shortcut = B >= 2 and (exact is False or (exact is None and self.dtype == np.float64))
        blocked = B >= 2 and exact is None and self.dtype == np.float32
        if blocked and self.moments_onepass and B >= KS.ONEPASS_MIN_ROWS and _tiles.ensure():
            if self.norm is None and self.use_blas(B) and self.compiled_blas:
                ws = self.reserve(B)  # (the weight-gradient GEMMs are not needed)
                K.loss_deltas_blas(X, yi, yf, idx, B, params, grad, ws.buf, ws.lay, self.loss_code)
            else:
                self.loss_grad(params, grad, X, yi, yf, idx, B)
            _, _, _, mus, acc = self._stats_scratch(B)
            bsc = self._blocked_scratch(B)
            snr_max = KS.blocked_snr_max(float(B), KS.BLOCKED_TAU)
            nbad = KS.moments_update_onepass(
                B,
                grad,
                self.ws.buf,
                self.ws.lay,
                n_old,
                mean,
                m2,
                mus,
                acc,
                *bsc,
                snr_max,
                *self._onepass_scratch(B),
                KS.ONEPASS_TAU,
            )
            self.last_moments_fallbacks = int(nbad)
            self.moments_fallbacks += int(nbad)
            return
        self.loss_grad(params, grad, X, yi, yf, idx, B)
        if blocked:
            _, _, _, mus, acc = self._stats_scratch(B)
            bsc = self._blocked_scratch(B)
            snr_max = KS.blocked_snr_max(float(B), KS.BLOCKED_TAU)
            buf, lay = self.ws.buf, self.ws.lay
            tiles = bool(self.moments_tiles and B >= KS.TILE_MIN_ROWS and _tiles.ensure())
            nbad = KS.moments_update_blocked(B, grad, buf, lay, n_old, mean, m2, mus, acc, *bsc, snr_max, tiles)
            self.last_moments_fallbacks = int(nbad)
            self.moments_fallbacks += int(nbad)
            return
        if not shortcut:
            _, tr, dsc, mus, acc = self._stats_scratch(B)
            KS.moments_update(B, grad, self.ws.buf, self.ws.lay, n_old, mean, m2, tr, dsc, mus, acc)
            self.last_moments_fallbacks = 0
            return
        need_s1 = bool(self.dtype == np.float32)
        a2, x2, a64, x64, s2, s1, xT, ac = sc = self._shortcut_scratch(B, need_s1)
        buf, lay, tau = self.ws.buf, self.ws.lay, KS.SHORTCUT_TAU
        if self.compiled_blas:
            nbad = KS.moments_update_shortcut(B, grad, buf, lay, n_old, mean, m2, *sc, need_s1, tau)
        else:  # the GEMMs from Python (no SciPy BLAS bindings)
            nbad = 0
            sizes = self.layout.sizes
            for l in range(self.layout.n_layers):
                fi, fo = sizes[l], sizes[l + 1]
                KS.shortcut_prep(B, buf, lay, l, a2, x2, a64, x64, need_s1)
                np.matmul(a2[: B * fi].reshape(B, fi).T, x2[: B * fo].reshape(B, fo), out=s2[: fi * fo].reshape(fi, fo))
                if need_s1:
                    np.matmul(
                        a64[: B * fi].reshape(B, fi).T, x64[: B * fo].reshape(B, fo), out=s1[: fi * fo].reshape(fi, fo)
                    )
                nbad += KS.shortcut_finish(B, grad, buf, lay, l, n_old, mean, m2, s2, s1, xT, ac, need_s1, tau)
        self.last_moments_fallbacks = int(nbad)
        self.moments_fallbacks += int(nbad)

    def _blocked_scratch(self, B):
        """Scratch of the blocked two-pass form, sized once for the workspace's capacity (or
        B): float64 (M2 sums, the transposed sweep's sums, means, per-example deltas
        transposed, one input column), then the tiled sweep's (``qt``, ``mt`` float32,
        ``st`` float64: ``KS._sq_dev_tiled``)."""
        cap = max(int(B), self.ws.capacity)
        s = getattr(self, "_bsc", None)
        if s is None or s[0] < cap:
            sizes = self.layout.sizes
            fo, wide = max(sizes[1:]), max(sizes)
            big = max(max(a * b for a, b in zip(sizes[:-1], sizes[1:])), 2 * fo)
            f64 = tuple(np.zeros(n, np.float64) for n in (big, big, fo, cap * fo, cap))
            W = _tiles.LANES
            panel = max(
                3 * W * KS.TILE_PASS_ROWS, 16 * _tiles.SUMS_VECS * KS.ONEPASS_PASS_ROWS
            )  # (and the one-pass form's)
            tiles = (np.zeros(panel, np.float32), np.zeros(W * wide, np.float32), np.zeros(W * wide, np.float64))
            s = self._bsc = (cap, f64 + tiles)
        return s[1]

    def _onepass_scratch(self, B):
        """Scratch of the one-pass form beyond the blocked form's, sized once for the
        workspace's capacity (or B): one pass's (p, p^2) rows (float32), the column scales,
        the sums and the tiles' last columns (float64), the refused weights' flags."""
        cap = max(int(B), self.ws.capacity)
        s = getattr(self, "_osc", None)
        if s is None or s[0] < cap:
            sizes = self.layout.sizes
            wide, fi, fo = max(sizes), max(sizes[:-1]), max(sizes[1:])
            big = max(a * b for a, b in zip(sizes[:-1], sizes[1:]))
            pp = np.zeros(2 * min(cap, KS.ONEPASS_PASS_ROWS) * wide, np.float32)
            f64 = tuple(
                np.zeros(n, np.float64) for n in (2 * (fi + fo), 2 * big + 8 * wide, 16 * _tiles.SUMS_VECS * wide)
            )
            s = self._osc = (cap, (pp, *f64, np.zeros(big, np.uint8)))
        return s[1]

    def _shortcut_scratch(self, B, need_s1):
        """float64 scratch of the shortcut, sized once for the workspace's capacity (or B):
        (A*A, X*X, A, X, S2, S1, X transposed, one input column); A, X and S1 are empty
        unless ``need_s1`` (float32 models)."""
        cap = max(int(B), self.ws.capacity)
        s = getattr(self, "_sc", None)
        if s is None or s[0] < cap or (need_s1 and s[1][2].shape[0] == 0):
            sizes = self.layout.sizes
            fi, fo = max(sizes[:-1]), max(sizes[1:])
            big = max(a * b for a, b in zip(sizes[:-1], sizes[1:]))
            k = 1 if need_s1 else 0
            s = self._sc = (
                cap,
                tuple(
                    np.zeros(n, np.float64)
                    for n in (cap * fi, cap * fo, k * cap * fi, k * cap * fo, big, k * big, cap * fo, cap)
                ),
            )
        return s[1]
