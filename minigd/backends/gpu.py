"""The ``"gpu"`` backend: CuPy arrays, cuBLAS and the CUDA kernels of ``kernels/gpu_*.cu``.

**Status: verified on the CPU emulator, never run on a GPU.**  Every CUDA source compiles
with NVRTC for sm_80 and sm_90 in the test suite (tests/test_gpu_sources.py).  The parity
tests against the NumPy reference (tests/test_gpu_backend.py, tests/test_gpu_norm.py) run
this module's host code and the very kernel text on :mod:`minigd.testing.gpu_emu`, a CPU
emulator of the CuPy API and of the CUDA execution model, in CI, and pass; on a real device
they skip where there is none, which so far has been everywhere this code was developed.
The suite also runs a selection of them with the kernels built with AddressSanitizer
(accesses past any device allocation) and with ThreadSanitizer (data races between the
threads of a launch, between blocks included).  What the emulator cannot show (speed,
memory ordering beyond barriers and atomics, out-of-bounds accesses inside one
allocation, the device math library) is unverified until those tests pass on hardware:
``bash bench/gpu_session.sh`` there runs them and the benchmark in one go.

A model's memory, kernels and stream live on the device that was current when it was
made (``backend_impl.device``); every method of the kernel contract makes that device
current, so a model keeps working while user code has another device current.  CuPy
compiles every kernel with ``-ftz=true``: float32 subnormals (below about 1.2e-38) are
flushed to zero on the device, where the cpu backend keeps them (float64 is unaffected).

Design
------
Parameters, gradient, optimizer state, workspace and training data live on the device as
CuPy arrays.  A training step is a fixed sequence of kernel launches on one stream:
gather -> per layer GEMM + bias/activation epilogue -> fused loss forward/backward
(softmax cross-entropy, MSE or BCE-with-logits, one warp per row) -> deterministic loss
sum -> per layer weight-gradient GEMM, bias gradient, optional per-example squared norms,
delta GEMM with the activation-backward epilogue -> optimizer (one fused pass for the
usual chains, or one pass per primitive) -> "apply if finite" -> step end.  Nothing in
the sequence allocates or synchronises with the host; what changes from step to step
(batch indices, learning rate, update count) is read by the kernels from device memory
(see the step control block in ``kernels/gpu_common.cuh``), so the sequence can be
captured once in a CUDA graph and replayed.

Two GEMM flavours:

* ``"cublas"``: ``cupy.matmul(out=...)`` into workspace views, then the epilogue kernels.
  Used for batches above ``graph_max_batch``.
* ``"tiled"``: the 16x16 tiled GEMM of ``gpu_dense.cu`` with the bias + activation (or
  activation-backward) epilogue fused in.  CuPy refuses cuBLAS calls during stream
  capture, so the CUDA-graph path (batches up to ``graph_max_batch``, where a step is
  launch-bound) uses these.

The model hands the backend NumPy arrays (``model.params`` is a host array the user may
read and write at any time), so each ``train_step`` uploads the parameters and optimizer
state, runs the step (a graph replay for small batches), and downloads parameters, state
and the step's (loss, applied, |g|^2) record: one host synchronisation per step, at its
end.  The training data are uploaded once per ``fit`` (cached by array identity from the
``reserve`` call that ``fit`` makes before its first step).  :meth:`GpuBackend.run_steps`
is the device-resident loop: many steps with parameters and state kept on the device and
the losses read back every ``read_every`` steps.  ``fit`` uses it for runs of up to
``read_every`` full batches between the points where it must look at the model
(evaluations, checkpoints, budgets; see ``minigd.train._chunk_steps``), and single steps
through it too; it steps through ``train_step`` one at a time only when the host acts at
every step (per-step callbacks, noise tracking).

Batch norm (before / after the activation, ghost batches) and dropout (``gpu_norm.cu``)
are wired into every regime (graph, tiled, cuBLAS) and both dtypes: a hidden layer of
such a model runs linear (+ activation) -> per ghost batch statistics / normalisation ->
(activation) -> dropout, and the backward pass the reverse, with dgamma / dbeta written
into the gradient vector (after the last bias, as ``ParamLayout`` puts them).  Dropout
masks come from the host's uniforms (the same as every backend draws, so the same masks
for the same generator state): ``run_steps(dropout_rng=)`` draws those of all its steps
up front in the per-step order and uploads them, outside any graph capture, into a step
table; ``mgd_dropout_forward`` in step c reads row c (the step counter in device memory)
and makes the masks there.  A single pass outside a step (``loss_and_grad``, statistics)
uploads the uniforms of the last ``draw_dropout``.  The running statistics are the
model's host array (``self.running``): an evaluation uploads them; ``run_steps(
update_running=True)`` uploads them once, folds in every applied step's whole-batch mean
and unbiased variance on the device (``mgd_bn_running_update`` skips a rejected step) and
downloads them at the end; ``update_running(B)`` does the same for the last training
pass alone.  Per-example statistics raise for batch norm
(:func:`~minigd.backends.base.check_per_example`) and are exact with dropout alone (each
row with its own mask row).

Not done: the fully fused narrow-MLP kernel (activations in shared memory across layers),
and any tuning of ``graph_max_batch`` (no GPU was available to measure the crossover).
Likely costs on hardware that are analysed, not measured: the column reductions
(``mgd_bias_grad``, the batch-norm statistics) split rows over 8 stripes of one block per 32
columns, not over blocks, so a narrow layer at a large batch runs on few SMs; ``train_step``
copies through pageable host memory and reads back synchronously; the cuBLAS regime costs
the Python of one CuPy call per launch, as it cannot be captured in a graph.
"""
from __future__ import annotations

import functools

import numpy as np

from minigd.backends.base import BN_AFTER, BN_BEFORE, Backend, check_per_example
from minigd.errors import BackendUnavailable
from minigd.kernels import gpu_sources as S
from minigd.kernels.workspace import Workspace

OP_CLIP, OP_DECAY, OP_TRACE, OP_ADAM, OP_SCALE_LR, OP_SCALE = range(6)
#: mgd_opt_primitive op for each optimizer code (0: multiply by hp[k, 3])
_PRIM_OP = {OP_CLIP: 0, OP_DECAY: 1, OP_TRACE: 2, OP_ADAM: 3, OP_SCALE_LR: 0, OP_SCALE: 5}

#: per (device id, dtype): {kernel name: cupy RawKernel}
_KERNEL_CACHE: dict = {}


def _cupy():
    """Import CuPy and check that it can use a device; BackendUnavailable otherwise.  With
    the GPU emulator switched on (:func:`minigd.backends.gpu_emulator`), the emulator
    module instead, which stands in for CuPy and runs the same kernels on the CPU."""
    from minigd.backends import _gpu_reason, gpu_emulator

    reason = _gpu_reason()
    if reason is not None:
        raise BackendUnavailable("gpu", reason)
    emu = gpu_emulator()
    if emu is not None:
        return emu
    import cupy

    return cupy


class _Kernels:
    """The kernels of every source for one dtype, by op name without the suffix
    (``k.gemm`` is ``mgd_gemm_f32`` for a float32 model; dtype-free kernels keep their
    name without the ``mgd_`` prefix: ``k.sum_rows``, ``k.step_end``)."""

    def __init__(self, cp, dtype):
        sfx = S.suffix(dtype)
        key = (cp.__name__, cp.cuda.runtime.getDevice(), sfx)
        table = _KERNEL_CACHE.get(key)
        if table is None:
            table = {}
            for src in S.SOURCES:
                mod = S.load_module(src, cp)
                for name in S.kernel_names(src):
                    if name.endswith("_f32") or name.endswith("_f64"):
                        if not name.endswith(sfx):
                            continue
                        op = name[4:-4]
                    else:
                        op = name[4:]
                    table[op] = mod.get_function(name)
            _KERNEL_CACHE[key] = table
        self.__dict__.update(table)


class GpuBackend(Backend):
    """CuPy / CUDA implementation of the backend contract (see :mod:`minigd.backends.base`).

    Attributes
    ----------
    graph_max_batch : int
        Batches up to this size run as a captured CUDA graph with the tiled GEMMs; larger
        ones through cuBLAS without a graph.  Default 64 (a guess: not measured yet).
    use_graphs : bool
        False runs the small-batch path without capturing it (same kernels, launched one
        by one); for debugging.
    read_every : int
        ``fit`` hands up to this many consecutive full-batch steps to :meth:`run_steps`
        (parameters, optimizer state and losses stay on the device; one host
        synchronisation per chunk), cutting chunks at evaluations, checkpoints and budgets
        (see ``minigd.train._chunk_steps``).  1 makes ``fit`` synchronise at every step.
    """

    name = "gpu"

    def __init__(self, layout, act_codes, loss_code, dtype, norm=None):
        super().__init__(layout, act_codes, loss_code, dtype, norm)
        self.cp = cp = _cupy()
        #: the device this model's memory, kernels and stream live on (the one current when
        #: it was made); every public method runs with it current, whatever is current then
        self.device = cp.cuda.Device()
        with self.device:
            self._init_device(layout.n_params)

    def _init_device(self, P: int) -> None:
        cp = self.cp
        self.k = _Kernels(cp, self.dtype)
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.graph_max_batch = 64
        self.use_graphs = True
        self.read_every = 64
        with self.stream:   # zeros is a memset on the current stream: ours, which does not wait for the null stream
            self.d_params = cp.zeros(P, self.dtype)
            self.d_grad = cp.zeros(P, self.dtype)
            self._d_dummy = cp.zeros(1, self.dtype)
            self._d_dummy_i = cp.zeros(1, np.int64)
        self._pW, self._pb = self.layout.views(self.d_params)
        self._gW, self._gb = self.layout.views(self.d_grad)
        self._data = None          # (key, dX, dyi, dyf): training data on the device
        self._graphs = {}          # (B, want_sqn, opt key, generation) -> cupy Graph
        self._gen = 0              # bumped whenever a buffer a graph points at is replaced
        self._opt = None           # (key, device hp, device state)
        self._steps_cap = 0
        self._G = None             # (B, P) per-example gradients (stats)

    # -- buffers ------------------------------------------------------------------------------
    def reserve(self, capacity: int) -> Workspace:
        """Device workspace for ``capacity`` rows.  Also forgets the cached device copy of
        the training data: ``fit`` calls this once before its first step, so every ``fit``
        uploads its data once (in-place changes to X between fits are seen)."""
        self._data = None
        return self._ensure(capacity)

    def _ensure(self, capacity: int) -> Workspace:
        cp = self.cp
        if self.ws is None or self.ws.capacity < capacity:
            capacity = int(capacity)
            with self.stream:
                self.ws = Workspace(self.layout, self.act_codes, capacity, self.dtype, xp=cp)
                self._rowloss = cp.zeros(capacity, np.float64)
                self._sqn = cp.zeros(capacity, np.float64)
                self._arange = cp.arange(capacity, dtype=np.int64)
                self._partial = cp.zeros(S.REDUCE_BLOCKS, np.float64)
                self._res = cp.zeros(8, np.float64)
                self._st = cp.zeros(4, np.int32)
                self._reserve_norm(capacity)
            self._gen += 1
            self._graphs.clear()
        return self.ws

    def _ensure_steps(self, n_steps: int, rows: int = 1) -> None:
        """Step tables for a run of ``n_steps`` steps of ``rows`` rows each: batch indices
        (n_steps * rows), schedule (n_steps, 2), records (n_steps, 3).  Sized by the runs
        (never by the workspace, which a whole-dataset pass makes large)."""
        have = getattr(self, "_idx", None)
        if n_steps > self._steps_cap or have is None or have.size < n_steps * rows:
            cp = self.cp
            size = max(n_steps * rows, have.size if have is not None else 0)
            n_steps = max(n_steps, self._steps_cap)
            with self.stream:
                self._idx = cp.zeros(size, np.int64)
                self._sched = cp.zeros((n_steps, 2), np.float64)
                self._rec = cp.zeros((n_steps, 3), np.float64)
            self._steps_cap = n_steps
            self._gen += 1
            self._graphs.clear()

    def _device_data(self, X, yi, yf):
        """The device copy of (X, yi, yf), uploaded on first use after ``reserve``."""
        key = tuple((id(a), a.__array_interface__["data"][0], a.shape, a.dtype.str) for a in (X, yi, yf))
        if self._data is None or self._data[0] != key:
            cp = self.cp
            with self.stream:   # C order: a raw kernel sees only the data pointer (cupy.asarray keeps F order)
                dX = cp.ascontiguousarray(X)
                dyi = cp.ascontiguousarray(yi) if yi.size else self._d_dummy_i
                dyf = cp.ascontiguousarray(yf) if yf.size else self._d_dummy
            self._data = (key, dX, dyi, dyf)
            self._gen += 1
            self._graphs.clear()
        return self._data[1:]

    def _device_opt(self, opt_state):
        """Device copies of the optimizer's hyper-parameter table and state (re-created
        when another OptState object comes in)."""
        key = (id(opt_state), opt_state.state.shape, tuple(int(c) for c in opt_state.codes))
        if self._opt is None or self._opt[0] != key:
            cp = self.cp
            with self.stream:
                hp = cp.asarray(opt_state.hp)
                st = cp.zeros(max(opt_state.state.size, 1), self.dtype)
            self._opt = (key, hp, st)
            self._gen += 1
            self._graphs.clear()
        return self._opt[1], self._opt[2]

    def _upload_opt(self, opt_state):
        hp, st = self._device_opt(opt_state)
        hp.set(opt_state.hp, stream=self.stream)
        if opt_state.state.size:
            st[:opt_state.state.size].set(opt_state.state, stream=self.stream)
        return hp, st

    def _download_opt(self, opt_state):
        hp, st = self._opt[1], self._opt[2]
        if opt_state.state.size:
            st[:opt_state.state.size].get(stream=self.stream, out=opt_state.state)
        hp.get(stream=self.stream, out=opt_state.hp)

    # -- launching ----------------------------------------------------------------------------
    def _launch(self, kern, grid, block, args):
        # RawKernel launches on the current stream (it takes no stream argument): ours,
        # made current by the public method that got here (see _on_device)
        kern(grid, block, args)

    def _elementwise_grid(self, n):
        return S.grid_1d(n), (S.THREADS,)

    def _layer_views(self, B):
        x0, zs, as_, ds, _ = self.ws.views(B)
        return x0, zs, as_, ds

    def _enqueue_forward(self, B, gemm, training=False, step=False):
        """Forward of the staged batch; ``training`` matters only with batch norm / dropout
        (ghost-batch statistics and the uploaded dropout masks instead of the running
        statistics and no dropout); ``step``: inside a training step, whose dropout
        uniforms are row st[0] of the step table."""
        cp = self.cp
        x0, zs, as_, _ = self._layer_views(B)
        L = self.layout.n_layers
        for l in range(L):
            A = x0 if l == 0 else as_[l - 1]
            if self.norm is not None and l < L - 1:
                self._enqueue_hidden_norm(l, A, B, gemm, training, step)
                continue
            W, b = self._pW[l], self._pb[l]
            fi, fo = W.shape
            act = self.act_codes[l] if l < L - 1 else -1
            aout = as_[l] if l < L - 1 else zs[l]
            if gemm == "cublas":
                cp.matmul(A, W, out=zs[l])
                self._launch(self.k.bias_act_forward, *self._elementwise_grid(B * fo),
                             (zs[l], b, aout, np.int32(B), np.int32(fo), np.int32(act)))
            else:
                grid, block = S.grid_gemm(B, fo)
                self._launch(self.k.gemm, grid, block,
                             (A, W, zs[l], np.int32(B), np.int32(fo), np.int32(fi), np.int32(0), np.int32(0),
                              np.int32(1), b, aout, self._d_dummy, self._d_dummy, np.int32(act)))

    def _enqueue_loss(self, B, dyi, dyf, idx, st, res, slot, train):
        """Loss kernel + deterministic mean: to rec[c, slot] (st given) or res[slot]."""
        _, zs, _, ds = self._layer_views(B)
        n = self.layout.sizes[-1]
        self._launch(self.k.loss_fwd_bwd, S.grid_rows(B), (S.THREADS,),
                     (zs[-1], ds[-1], dyi, dyf, idx, st, np.int32(B), np.int32(n), np.int32(self.loss_code),
                      np.float64(1.0 / B), self._rowloss))
        self._launch(self.k.sum_rows, (1,), (S.THREADS,),
                     (self._rowloss, np.int32(B), np.float64(1.0 / B), res, st, np.int32(slot), np.int32(train)))

    def _enqueue_backward(self, B, gemm, want_sqn):
        cp = self.cp
        x0, zs, as_, ds = self._layer_views(B)
        L = self.layout.n_layers
        for l in range(L - 1, -1, -1):
            A = x0 if l == 0 else as_[l - 1]
            D = ds[l]
            fi, fo = self._pW[l].shape
            if gemm == "cublas":
                cp.matmul(A.T, D, out=self._gW[l])
            else:
                grid, block = S.grid_gemm(fi, fo)
                self._launch(self.k.gemm, grid, block,
                             (A, D, self._gW[l], np.int32(fi), np.int32(fo), np.int32(B), np.int32(1), np.int32(0),
                              np.int32(0), self._d_dummy, self._d_dummy, self._d_dummy, self._d_dummy, np.int32(-1)))
            grid, block = S.grid_bias_grad(fo)
            self._launch(self.k.bias_grad, grid, block, (D, np.int32(B), np.int32(fo), self._gb[l]))
            if want_sqn:
                self._launch(self.k.sqnorm_accumulate, S.grid_rows(B), (S.THREADS,),
                             (A, D, np.int32(B), np.int32(fi), np.int32(fo), np.float64(float(B) * float(B)),
                              np.int32(l == L - 1), self._sqn))
            if l > 0 and self.norm is not None:
                self._enqueue_hidden_norm_backward(l - 1, D, B, gemm)
            elif l > 0:
                act = self.act_codes[l - 1]
                if gemm == "cublas":
                    cp.matmul(D, self._pW[l].T, out=ds[l - 1])
                    self._launch(self.k.act_backward, *self._elementwise_grid(B * fi),
                                 (zs[l - 1], as_[l - 1], ds[l - 1], np.int64(B * fi), np.int32(act)))
                else:
                    grid, block = S.grid_gemm(B, fi)
                    self._launch(self.k.gemm, grid, block,
                                 (D, self._pW[l], ds[l - 1], np.int32(B), np.int32(fi), np.int32(fo), np.int32(0),
                                  np.int32(1), np.int32(2), self._d_dummy, self._d_dummy, zs[l - 1], as_[l - 1],
                                  np.int32(act)))

    def _enqueue_sumsq(self, vec, hp, k, rec, st):
        """|vec|^2 in two deterministic stages; clip factor into hp[k, 3] (k >= 0) and/or
        |vec|^2 into rec[c, 2] (rec given)."""
        P = vec.shape[0]
        nb = S.reduce_blocks(P)
        self._launch(self.k.sumsq_partial, (nb,), (S.THREADS,), (vec, np.int64(P), self._partial))
        self._launch(self.k.clip_factor, (1,), (S.THREADS,),
                     (self._partial, np.int32(nb), hp, np.int32(k), rec if rec is not None else np.uint64(0), st))

    def _enqueue_opt(self, opt_state, hp, dstate, st):
        """The optimizer chain and the conditional update (see gpu_optim.cu)."""
        k = self.k
        P = self.layout.n_params
        codes = [int(c) for c in opt_state.codes]
        plan = [int(v) for v in opt_state.plan]
        nrows = int(opt_state.hp.shape[0])
        soff = [int(s) for s in opt_state.soff]
        grid = self._elementwise_grid(P)
        sched = self._sched
        dummy = self._d_dummy

        def slots(i):
            if codes[i] == OP_TRACE:
                return dstate[soff[i]:soff[i] + P], dummy
            if codes[i] == OP_ADAM:
                return dstate[soff[i]:soff[i] + P], dstate[soff[i] + P:soff[i] + 2 * P]
            return dummy, dummy

        if plan[0]:
            i_mid = plan[3]
            mid = codes[i_mid] if i_mid >= 0 else -1
            i_adam = i_mid if mid == OP_ADAM else -1
            self._launch(k.opt_prepare, (1,), (1,), (hp, np.int32(plan[5]), np.int32(i_adam), sched, st))
            if plan[1] >= 0:
                self._enqueue_sumsq_clip(hp, plan[1], st)
            s1, s2 = slots(i_mid) if i_mid >= 0 else (dummy, dummy)
            self._launch(k.opt_fused, *grid,
                         (self.d_params, self.d_grad, s1, s2, np.int64(P), hp, np.int32(nrows), np.int32(plan[1]),
                          np.int32(plan[2]), np.int32(i_mid), np.int32(mid), np.int32(plan[4]), np.int32(plan[5]), st))
        else:
            self._launch(k.opt_prepare, (1,), (1,), (hp, np.int32(-1), np.int32(-1), sched, st))
            for i, c in enumerate(codes):
                if c == OP_CLIP:
                    self._enqueue_sumsq_clip(hp, i, st)
                elif c == OP_ADAM:
                    self._launch(k.opt_prepare, (1,), (1,), (hp, np.int32(-1), np.int32(i), sched, st))
                elif c == OP_SCALE_LR:
                    self._launch(k.opt_prepare, (1,), (1,), (hp, np.int32(i), np.int32(-1), sched, st))
                s1, s2 = slots(i)
                self._launch(k.opt_primitive, *grid,
                             (self.d_params, self.d_grad, s1, s2, np.int64(P), hp, np.int32(nrows), np.int32(i),
                              np.int32(_PRIM_OP[c]), st))
            self._launch(k.check_finite, *grid, (self.d_params, self.d_grad, np.int64(P), st))
        self._launch(k.apply_update, *grid, (self.d_params, self.d_grad, np.int64(P), st))

    def _enqueue_sumsq_clip(self, hp, i, st):
        P = self.layout.n_params
        nb = S.reduce_blocks(P)
        self._launch(self.k.sumsq_partial, (nb,), (S.THREADS,), (self.d_grad, np.int64(P), self._partial))
        self._launch(self.k.clip_factor, (1,), (S.THREADS,),
                     (self._partial, np.int32(nb), hp, np.int32(i), np.uint64(0), st))   # rec: null

    def _enqueue_step(self, B, want_sqn, opt_state, hp, dstate, gemm, running=False):
        """One whole training step of the batch at row c of the index table (``running``:
        and batch norm's running statistics, if the step is applied)."""
        dX, dyi, dyf = self._data[1:]
        n0 = self.layout.sizes[0]
        x0 = self._layer_views(B)[0]
        st = self._st
        self._launch(self.k.gather, *self._elementwise_grid(B * n0),
                     (dX, self._idx, st, np.int32(B), np.int32(n0), x0))
        self._enqueue_forward(B, gemm, training=True, step=True)
        self._enqueue_loss(B, dyi, dyf, self._idx, st, self._rec, 0, 1)
        self._enqueue_backward(B, gemm, want_sqn)
        if want_sqn:
            self._enqueue_sumsq(self.d_grad, hp, -1, self._rec, st)
        self._enqueue_opt(opt_state, hp, dstate, st)
        if running:
            self._enqueue_running(B, st)
        self._launch(self.k.step_end, (1,), (1,), (st, self._rec))

    def _step_runner(self, B, want_sqn, opt_state, hp, dstate, running=False):
        """A callable that enqueues one step: a graph replay (B <= graph_max_batch) or the
        cuBLAS sequence."""
        if B > self.graph_max_batch:
            return lambda: self._enqueue_step(B, want_sqn, opt_state, hp, dstate, "cublas", running)
        if not self.use_graphs:
            return lambda: self._enqueue_step(B, want_sqn, opt_state, hp, dstate, "tiled", running)
        key = (B, bool(want_sqn), bool(running), self._opt[0], self._gen)
        g = self._graphs.get(key)
        if g is None:
            self.stream.synchronize()
            with self.stream:
                self.stream.begin_capture()
                try:
                    self._enqueue_step(B, want_sqn, opt_state, hp, dstate, "tiled", running)
                except BaseException:
                    try:   # end the capture, but report what broke it, not the invalidated capture
                        self.stream.end_capture()
                    except Exception:
                        pass
                    raise
                g = self.stream.end_capture()
            if len(self._graphs) > 16:
                self._graphs.clear()
            self._graphs[key] = g
        return lambda: g.launch(self.stream)

    # -- batch norm and dropout (kernels/gpu_norm.cu) -------------------------------------------
    def _reserve_norm(self, capacity: int) -> None:
        """Host mask buffers (Backend's) and the device buffers of batch norm / dropout for
        ``capacity`` rows; called by :meth:`_ensure` with every new workspace (which drops
        the cached graphs, so no graph points at a freed buffer).  Per hidden layer (each
        ``capacity`` rows of the layer's width, or empty when unused): ``xh`` batch norm's
        xhat (training; the BN input's scratch in evaluation), ``inv`` 1/sqrt(var + eps) per
        ghost batch, ``pre`` the BN output of batch norm before the activation, ``act`` the
        unmasked activation (the BN input of batch norm after it; what the activation's
        backward reads under dropout), ``mask`` / ``unif`` the dropout masks and the host's
        uniforms they are made from.  Shared: ``dt`` (the backward's dLoss/da before batch
        norm), a zero bias (the activation of a normalised z is bias_act_forward with it)
        and the running statistics' device copy."""
        super()._reserve_norm(capacity)
        norm = self.norm
        if norm is None:
            return
        cp = self.cp
        hid = self.layout.hidden
        bn, drop = norm.bn, norm.dropout > 0
        n_ghosts = -(-capacity // norm.ghost) if (bn and norm.ghost) else 1

        def rows(n, on, dtype=self.dtype):
            return cp.zeros(capacity * n if on else 0, dtype)

        self._nd = [dict(xh=rows(n, bn), inv=cp.zeros(n_ghosts * n if bn else 0, self.dtype),
                         pre=rows(n, bn == BN_BEFORE), act=rows(n, bn == BN_AFTER or drop),
                         mask=rows(n, drop), unif=rows(n, drop, np.float64)) for n in hid]
        self._d_dt = cp.zeros(capacity * max(hid) if bn else 0, self.dtype)
        self._d_zero = cp.zeros(max(hid), self.dtype)
        self._d_running = cp.zeros(max(self.layout.n_running, 1), self.dtype)
        self._d_rm, self._d_rv = self.layout.running_views(self._d_running)
        self._nviews = {}

    def _norm_views(self, l: int, B: int) -> dict:
        """(B, n_l) views of hidden layer l's norm buffers for a batch of B rows, with the
        ghost size ``g`` and the number of ghost batches ``nch`` (cached: no allocation in
        a step)."""
        v = self._nviews.get((l, B))
        if v is None:
            n = self.layout.hidden[l]
            d = self._nd[l]
            g = self.norm.ghost_size(B)
            nch = -(-B // g)

            def rows(a, width=n):
                return a[:B * width].reshape(B, width) if a.size else self._d_dummy

            v = {name: rows(d[name]) for name in ("xh", "pre", "act", "mask", "unif")}
            v["inv"] = d["inv"][:nch * n] if d["inv"].size else self._d_dummy
            v["dt"] = rows(self._d_dt)
            v["g"], v["nch"] = g, nch
            if len(self._nviews) > 64:
                self._nviews.clear()
            self._nviews[(l, B)] = v
        return v

    def _bn_dev(self):
        """(gammas, betas, dgammas, dbetas): per hidden layer, views of the device parameter
        and gradient vectors."""
        c = getattr(self, "_bn_dev_views", None)
        if c is None or c[0] is not self.d_params or c[1] is not self.d_grad:
            c = self._bn_dev_views = (self.d_params, self.d_grad, *self.layout.bn_views(self.d_params),
                                      *self.layout.bn_views(self.d_grad))
        return c[2:]

    def _grow(self, capacity: int) -> None:
        """``draw_dropout``'s room for the masks: :meth:`_ensure`, not ``reserve`` (which
        would forget the device copy of the training data).  The host draws the uniforms
        as every backend does (the same masks for the same generator state); the next
        training pass uploads them before its kernels run, never inside a captured step
        (a step reads its row of the table ``_unif_tab``, a pass outside a step the buffer
        ``unif``), and ``mgd_dropout_forward`` turns them into the masks there."""
        self._ensure(capacity)

    def _stage_norm(self, B: int, training: bool) -> None:
        """Host -> device before a pass (outside any capture): in training the ghost-batch
        check and the dropout uniforms of rows [0, B); in evaluation with batch norm the
        running statistics (``self.running``, the model's array, is the source of truth)."""
        norm = self.norm
        if norm is None:
            return
        s = self.stream
        if training:
            norm.check_batch(B)
            if norm.dropout > 0:
                for l, u in enumerate(self._unif):
                    self._norm_views(l, B)["unif"].set(u[:B], stream=s)
        elif norm.bn:
            self._d_running[:self.running.size].set(self.running, stream=s)

    def _check_norm_steps(self, B: int, n_steps: int, want_sqn: bool, dropout_rng, update_running) -> None:
        if want_sqn:
            check_per_example(self.norm, "per-example gradient norms")
        if n_steps > 1 and self.dropout > 0 and dropout_rng is None:
            raise ValueError(f"dropout_rng: {n_steps} steps of a model with dropout need the generator to "
                             f"draw each step's masks from (fit passes its own), got None")
        if n_steps > 1 and self.norm.bn and not update_running:
            raise ValueError(f"update_running: {n_steps} steps of a model with batch norm must update the "
                             f"running statistics on the device (update_running=True, as fit does)")
        self.norm.check_batch(B)

    #: device memory the dropout uniforms of one run may take (``fit`` shortens its runs of
    #: a dropout model to fit: :meth:`max_run_steps`)
    dropout_table_bytes = 64 << 20

    def max_run_steps(self, B: int) -> int:
        """The most steps of batch size B one :meth:`run_steps` call should take: every
        step of a dropout model needs B * (sum of hidden widths) float64 uniforms on the
        device, kept under ``dropout_table_bytes``."""
        if self.dropout <= 0:
            return 1 << 30
        return max(1, self.dropout_table_bytes // (8 * B * sum(self.layout.hidden)))

    def _upload_uniforms(self, B: int, n_steps: int, rng) -> None:
        """Dropout uniforms of steps 0..n_steps-1 into the device table the step reads (row c
        at c * B * n, grown to n_steps * B * n when short: a new table invalidates the
        captured graphs): drawn from ``rng`` step by step and layer by layer, the order of
        ``draw_dropout`` once per step (so the masks are those of the per-step loop), or,
        with no ``rng`` (one step), the ones the last ``draw_dropout`` drew.  Afterwards
        the host masks hold the last step's, as after the per-step loop."""
        hid = self.layout.hidden
        self._ensure_uniforms(n_steps * B)
        if rng is None:
            for l, n in enumerate(hid):
                self._unif_host[l][:B * n] = self._unif[l][:B].ravel()
        else:
            for c in range(n_steps):
                for l, n in enumerate(hid):
                    rng.random(out=self._unif_host[l][c * B * n:(c + 1) * B * n])
            self._grow(B)
            for l, n in enumerate(hid):   # the host state of draw_dropout after the last step
                np.copyto(self._unif[l][:B], self._unif_host[l][(n_steps - 1) * B * n:n_steps * B * n].reshape(B, n))
            self._masks_from_uniforms(B)
        for l, n in enumerate(hid):
            self._unif_tab[l][:n_steps * B * n].set(self._unif_host[l][:n_steps * B * n], stream=self.stream)

    def _ensure_uniforms(self, rows: int) -> None:
        """The dropout uniforms table (device and host) for ``rows`` rows of every hidden
        layer; a new table invalidates the captured graphs."""
        if getattr(self, "_unif_rows", 0) < rows:
            hid = self.layout.hidden
            with self.stream:
                self._unif_tab = [self.cp.zeros(rows * n, np.float64) for n in hid]
            self._unif_host = [np.zeros(rows * n, np.float64) for n in hid]
            self._unif_rows = rows
            self._gen += 1
            self._graphs.clear()

    def _enqueue_running(self, B: int, st) -> None:
        """Batch norm's running statistics from the last training pass into the device copy
        (``st``: only if that step is applied; np.uint64(0): always)."""
        norm = self.norm
        zs = self._layer_views(B)[1]
        for l, n in enumerate(self.layout.hidden):
            x = zs[l] if norm.bn == BN_BEFORE else self._norm_views(l, B)["act"]
            self._launch(self.k.bn_running_update, *S.grid_columns(n),
                         (x, np.int32(B), np.int32(n), np.float64(norm.momentum), self._d_rm[l], self._d_rv[l],
                          st))

    def _enqueue_hidden_norm(self, l, A, B, gemm, training, step=False):
        """Forward of hidden layer l of a model with batch norm and/or dropout:
        before: z -> BN -> f -> [dropout]; after: z -> f -> BN -> [dropout]; dropout alone:
        z -> f -> dropout (as numpy_ref's ``_forward_all``).  Training keeps what the
        backward pass and :meth:`update_running` read: z in zs[l] (BN before: the BN input),
        the unmasked f in ``act`` (BN after: the BN input), xhat and inv.  Evaluation uses
        the running statistics, no dropout, and writes the BN input into the ``xh`` scratch,
        so an evaluation between a training step and ``update_running`` does not clobber
        the statistics' source."""
        cp, k, norm = self.cp, self.k, self.norm
        _, zs, as_, _ = self._layer_views(B)
        W, b = self._pW[l], self._pb[l]
        fi, fo = W.shape
        act = self.act_codes[l]
        v = self._norm_views(l, B)
        gams, bets = self._bn_dev()[:2]
        bn = norm.bn
        drop = training and norm.dropout > 0
        if bn == BN_BEFORE:      # linear only
            z, lin_act, lin_out = (zs[l] if training else v["xh"]), -1, self._d_dummy
        elif bn == BN_AFTER:     # linear + activation: the BN input
            z, lin_act, lin_out = zs[l], act, (v["act"] if training else v["xh"])
        else:                    # dropout alone
            z, lin_act, lin_out = zs[l], act, (v["act"] if drop else as_[l])
        if gemm == "cublas":
            cp.matmul(A, W, out=z)
            self._launch(k.bias_act_forward, *self._elementwise_grid(B * fo),
                         (z, b, lin_out, np.int32(B), np.int32(fo), np.int32(lin_act)))
        else:
            grid, block = S.grid_gemm(B, fo)
            self._launch(k.gemm, grid, block,
                         (A, W, z, np.int32(B), np.int32(fo), np.int32(fi), np.int32(0), np.int32(0),
                          np.int32(1), b, lin_out, self._d_dummy, self._d_dummy, np.int32(lin_act)))
        out = lin_out
        if bn:
            x = z if bn == BN_BEFORE else lin_out
            out = v["pre"] if bn == BN_BEFORE else as_[l]
            if training:
                self._launch(k.bn_train_forward, *S.grid_columns(fo, v["nch"]),
                             (x, out, v["xh"], v["inv"], gams[l], bets[l], np.int32(B), np.int32(fo),
                              np.int32(v["g"]), np.float64(norm.eps)))
            else:
                self._launch(k.bn_eval_forward, *self._elementwise_grid(B * fo),
                             (x, out, self._d_rm[l], self._d_rv[l], gams[l], bets[l], np.int32(B),
                              np.int32(fo), np.float64(norm.eps)))
            if bn == BN_BEFORE:  # f of the normalised z (a zero bias; pre + 0 is pre)
                out = v["act"] if drop else as_[l]
                self._launch(k.bias_act_forward, *self._elementwise_grid(B * fo),
                             (v["pre"], self._d_zero[:fo], out, np.int32(B), np.int32(fo), np.int32(act)))
        if drop:                 # as_[l] = out * mask, the mask made from the uploaded uniforms
            self._launch(k.dropout_forward, *self._elementwise_grid(B * fo),
                         (self._unif_tab[l] if step else v["unif"], v["mask"], out, as_[l], np.int64(B * fo),
                          np.float64(norm.dropout), self._st if step else np.uint64(0),
                          np.int64(B * fo if step else 0)))

    def _enqueue_hidden_norm_backward(self, h, D, B, gemm):
        """ds[h] = dLoss/dz_h from D = dLoss/dz_{h+1}: through W_{h+1}, then the reverse of
        :meth:`_enqueue_hidden_norm` (training mode: the mask, the activation and batch norm
        per ghost batch, in numpy_ref's ``_hidden_backward`` order); dgamma_h and dbeta_h of
        the mean loss into the gradient (D carries 1/B already)."""
        cp, k, norm = self.cp, self.k, self.norm
        _, zs, as_, ds = self._layer_views(B)
        W = self._pW[h + 1]
        fi, fo = W.shape
        act = self.act_codes[h]
        v = self._norm_views(h, B)
        bn, drop = norm.bn, norm.dropout > 0
        n = B * fi
        grid = self._elementwise_grid(n)
        # G = dLoss/d(layer h's output) = D W^T: into ds[h], or into the scratch when batch
        # norm's backward writes ds[h] from it
        G = v["dt"] if bn else ds[h]
        if gemm == "cublas":
            cp.matmul(D, W.T, out=G)
        else:
            grid2, block2 = S.grid_gemm(B, fi)
            self._launch(k.gemm, grid2, block2,
                         (D, W, G, np.int32(B), np.int32(fi), np.int32(fo), np.int32(0), np.int32(1),
                          np.int32(0), self._d_dummy, self._d_dummy, self._d_dummy, self._d_dummy, np.int32(-1)))
        if drop:
            self._launch(k.dropout_backward, *grid, (v["mask"], G, np.int64(n)))
        if bn == BN_BEFORE:      # through f (of the BN output) first
            self._launch(k.act_backward, *grid,
                         (v["pre"], v["act"] if drop else as_[h], G, np.int64(n), np.int32(act)))
        if bn:
            gams, _, ggams, gbets = self._bn_dev()
            self._launch(k.bn_param_grad, *S.grid_columns(fi),
                         (G, v["xh"], np.int32(B), np.int32(fi), ggams[h], gbets[h]))
            self._launch(k.bn_train_backward, *S.grid_columns(fi, v["nch"]),
                         (G, v["xh"], v["inv"], gams[h], ds[h], np.int32(B), np.int32(fi), np.int32(v["g"])))
        if bn != BN_BEFORE:      # through f of z (unmasked f(z) in ``act``)
            self._launch(k.act_backward, *grid, (zs[h], v["act"], ds[h], np.int64(n), np.int32(act)))

    def update_running(self, B: int) -> None:
        """Fold the whole-batch mean and unbiased variance of the last training pass's
        batch-norm inputs (still on the device: z_l before the activation, f(z_l) after it)
        into ``running`` with the momentum: ``running`` (the model's host array) is
        uploaded, updated by ``mgd_bn_running_update`` and downloaded."""
        norm = self.norm
        if norm is None or not norm.bn:
            return
        if self.ws is None or self.ws.capacity < B:
            raise RuntimeError(f"update_running: no training pass of {B} rows to take the statistics from")
        s = self.stream
        self._d_running[:self.running.size].set(self.running, stream=s)
        self._enqueue_running(B, np.uint64(0))
        self._d_running[:self.running.size].get(stream=s, out=self.running)
        s.synchronize()

    # -- contract: training ---------------------------------------------------------------------
    def warm_up(self, params, grad, X, yi, yf, batch_sizes, opt_state, want_sqn=False):
        """Before ``fit``'s clock starts (the kernels were compiled when the model was made):
        upload the training data and the optimizer's device buffers, size the step tables
        (and a dropout model's uniforms table) for runs of up to ``read_every`` steps of the
        largest batch, and capture the CUDA graph of a step of every batch size the graph
        regime takes -- so no timed step allocates, uploads the data or captures.  A capture
        records and runs nothing: ``params``, ``opt_state`` and ``running`` are untouched."""
        sizes = sorted({int(b) for b in batch_sizes})
        if not sizes:
            return
        self._ensure(sizes[-1])
        self._device_data(X, yi, yf)
        steps = max(1, int(self.read_every or 1))
        self._ensure_steps(steps, sizes[-1])
        if self.dropout > 0:
            self._ensure_uniforms(max(min(steps, self.max_run_steps(b)) * b for b in sizes))
        hp, dstate = self._device_opt(opt_state)
        running = self.norm is not None and bool(self.norm.bn)
        for b in sizes:
            if b <= self.graph_max_batch and self.use_graphs:
                self._step_runner(b, want_sqn, opt_state, hp, dstate, running)

    def train_step(self, params, grad, X, yi, yf, idx, B, opt_state, lr, t, want_sqn=False):
        res = self.run_steps(params, X, yi, yf, idx, B, 1, opt_state, [lr], t, want_sqn=want_sqn,
                             grad=grad)
        loss, ok, gsq = res["loss"][0], bool(res["applied"][0]), res["grad_norm_sq"][0]
        return float(loss), ok, float(gsq) if want_sqn or not np.isfinite(loss) else 0.0

    def run_steps(self, params, X, yi, yf, idx, B, n_steps, opt_state, lrs, t0, want_sqn=False,
                  read_every=None, grad=None, dropout_rng=None, update_running=False):
        """``n_steps`` training steps of batch size B on the device, rows
        ``idx[s * B:(s + 1) * B]`` for step s, learning rates ``lrs[s]`` and update counts
        ``t0 + s``; parameters and optimizer state stay on the device between steps and are
        written back to ``params`` / ``opt_state.state`` at the end.  The step records are
        read back every ``read_every`` steps (default: only at the end), and the loop stops
        at the first rejected step (non-finite loss or update), as ``fit`` does.

        Batch norm and dropout: with ``dropout_rng`` each step's masks are drawn from it up
        front (the order ``draw_dropout`` once per step would use; without it, one step uses
        the last ``draw_dropout``'s), and ``update_running=True`` folds each applied step's
        batch statistics into ``running`` on the device, downloaded at the end -- what
        ``fit`` does per step with ``draw_dropout`` and ``update_running(B)``.  Several steps
        of such a model need both.

        Returns a dict of (n_done,) arrays ``loss``, ``applied``, ``grad_norm_sq`` (0 unless
        ``want_sqn``) for the steps run; with ``want_sqn`` the last step's per-example
        squared norms are available from :meth:`last_sqnorms`.
        """
        n_steps = int(n_steps)
        if n_steps < 1:
            raise ValueError(f"n_steps: expected at least 1, got {n_steps}")
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        if idx.shape[0] < n_steps * B:
            raise ValueError(f"idx: expected at least n_steps * B = {n_steps * B} row indices, got {idx.shape[0]}")
        lrs = np.asarray(lrs, np.float64)
        if lrs.shape != (n_steps,):
            raise ValueError(f"lrs: expected {n_steps} learning rates, got shape {lrs.shape}")
        running = bool(update_running) and self.norm is not None and bool(self.norm.bn)
        if self.norm is not None:
            self._check_norm_steps(B, n_steps, want_sqn, dropout_rng, running)
        self._ensure(B)
        self._ensure_steps(n_steps, B)
        if self.dropout > 0:
            self._upload_uniforms(B, n_steps, dropout_rng)
        if running:
            self._d_running[:self.running.size].set(self.running, stream=self.stream)
        self._device_data(X, yi, yf)
        hp, dstate = self._upload_opt(opt_state)
        s = self.stream
        self.d_params.set(params, stream=s)
        sched = np.empty((n_steps, 2), np.float64)
        sched[:, 0] = lrs
        sched[:, 1] = t0 + np.arange(n_steps)
        self._sched[:n_steps].set(sched, stream=s)
        self._idx[:n_steps * B].set(idx[:n_steps * B], stream=s)
        self._st.set(np.zeros(4, np.int32), stream=s)
        with s:
            self._rec[:n_steps].fill(0)
        step = self._step_runner(B, want_sqn, opt_state, hp, dstate, running)
        every = n_steps if not read_every else max(1, int(read_every))
        rec = np.zeros((n_steps, 3), np.float64)
        done = 0
        while done < n_steps:
            upto = min(n_steps, done + every)
            for _ in range(done, upto):
                step()
            self._rec[done:upto].get(stream=s, out=rec[done:upto])   # the one host sync
            bad = np.flatnonzero(rec[done:upto, 1] == 0)
            if bad.size:
                upto = done + int(bad[0]) + 1
                done = upto
                break
            done = upto
        self.d_params.get(stream=s, out=params)
        if grad is not None:
            self.d_grad.get(stream=s, out=grad)
        if running:
            self._d_running[:self.running.size].get(stream=s, out=self.running)
        self._download_opt(opt_state)
        s.synchronize()
        return {"loss": rec[:done, 0].copy(), "applied": rec[:done, 1] != 0, "grad_norm_sq": rec[:done, 2].copy()}

    def opt_apply(self, params, grad, opt_state, lr, t):
        self._ensure(1)
        self._ensure_steps(1)
        hp, dstate = self._upload_opt(opt_state)
        s = self.stream
        self.d_params.set(params, stream=s)
        self.d_grad.set(grad, stream=s)
        self._sched[:1].set(np.array([[lr, t]], np.float64), stream=s)
        self._st.set(np.zeros(4, np.int32), stream=s)
        self._enqueue_sumsq(self.d_grad, hp, -1, self._rec, self._st)
        self._enqueue_opt(opt_state, hp, dstate, self._st)
        self._launch(self.k.step_end, (1,), (1,), (self._st, self._rec))
        rec = self._rec[:1].get(stream=s)
        self.d_params.get(stream=s, out=params)
        self.d_grad.get(stream=s, out=grad)
        self._download_opt(opt_state)
        s.synchronize()
        return bool(rec[0, 1] != 0), float(rec[0, 2])

    # -- contract: evaluation and gradients (no graph; the batch is gathered on the host) ------
    def _stage_batch(self, params, X, yi, yf, idx, B):
        """Upload params and rows idx[:B] (gathered on the host, so no stale device copy
        of X is ever read here); returns (dyi, dyf, identity indices)."""
        self._ensure(B)
        s = self.stream
        rows = np.asarray(idx[:B], np.int64)
        self.d_params.set(params, stream=s)
        self.ws.x0(B).set(np.ascontiguousarray(X[rows]), stream=s)
        cp = self.cp
        with s:
            dyi = cp.asarray(yi[rows]) if yi.size else self._d_dummy_i
            dyf = cp.asarray(np.ascontiguousarray(yf[rows])) if yf.size else self._d_dummy
        return dyi, dyf, self._arange

    def _gemm_kind(self, B):
        return "tiled" if B <= self.graph_max_batch else "cublas"

    def forward(self, params, X, idx, B, training=False):
        training = bool(training) and self.norm is not None
        self._stage_batch(params, X, np.empty(0, np.int64), np.empty(0, self.dtype), idx, B)
        self._stage_norm(B, training)
        self._enqueue_forward(B, self._gemm_kind(B), training)
        out = self.ws.views(B)[1][-1].get(stream=self.stream)
        return out

    def losses(self, params, X, yi, yf, idx, B):
        dyi, dyf, ar = self._stage_batch(params, X, yi, yf, idx, B)
        self._stage_norm(B, False)
        self._enqueue_forward(B, self._gemm_kind(B))
        self._enqueue_loss(B, dyi, dyf, ar, np.uint64(0), self._res, 0, 0)
        return self._rowloss[:B].get(stream=self.stream)

    def _device_loss_grad(self, params, X, yi, yf, idx, B, want_sqn):
        dyi, dyf, ar = self._stage_batch(params, X, yi, yf, idx, B)
        self._stage_norm(B, True)
        gemm = self._gemm_kind(B)
        self._enqueue_forward(B, gemm, training=True)
        self._enqueue_loss(B, dyi, dyf, ar, np.uint64(0), self._res, 0, 0)
        self._enqueue_backward(B, gemm, want_sqn)

    def loss_grad(self, params, grad, X, yi, yf, idx, B, want_sqn=False, want_row_loss=False):
        if want_sqn:
            check_per_example(self.norm, "per-example gradient norms")
        self._device_loss_grad(params, X, yi, yf, idx, B, want_sqn)
        s = self.stream
        self.d_grad.get(stream=s, out=grad)
        loss = float(self._res[:1].get(stream=s)[0])
        rows = None
        if want_sqn:
            rows = self._sqn[:B].get(stream=s)
        elif want_row_loss:
            rows = self._rowloss[:B].get(stream=s)
        return loss, rows

    def last_sqnorms(self, B):
        """(B,) float64 per-example squared gradient norms of the last
        ``train_step(want_sqn=True)`` (a host copy)."""
        return self._sqn[:B].get(stream=self.stream)

    # -- per-example gradient statistics ----------------------------------------------------------
    def per_example_terms(self, params, X, yi, yf, idx, B, grad=None):
        check_per_example(self.norm, "per-example gradients")
        self._device_loss_grad(params, X, yi, yf, idx, B, False)
        s = self.stream
        if grad is not None:
            self.d_grad.get(stream=s, out=grad)
        x0, _, as_, ds = self._layer_views(B)
        terms = []
        for l in range(self.layout.n_layers):
            A = (x0 if l == 0 else as_[l - 1]).get(stream=s)
            D = ds[l].get(stream=s) * self.dtype.type(B)
            terms.append((A, D))
        return terms

    def per_example_grads(self, params, X, yi, yf, idx, B, out):
        check_per_example(self.norm, "per-example gradients")
        self._device_loss_grad(params, X, yi, yf, idx, B, False)
        P = self.layout.n_params
        if self._G is None or self._G.shape[0] < B:
            with self.stream:   # zeros is a memset: on our stream, ordered before the fill kernel
                self._G = self.cp.zeros((B, P), self.dtype)
        G = self._G[:B]
        self._enqueue_layers(self.k.per_example_fill, B, lambda A, D, fi, fo, wo, bo: (
            A, D, np.int32(B), np.int32(fi), np.int32(fo), np.int64(wo), np.int64(bo), np.int64(P), G),
            total=lambda fi, fo: B * (fi * fo + fo))
        G.get(stream=self.stream, out=out[:B])

    def moments_update(self, params, grad, X, yi, yf, idx, B, n_old, mean, m2):
        check_per_example(self.norm, "gradient moments")
        cp = self.cp
        self._device_loss_grad(params, X, yi, yf, idx, B, False)
        s = self.stream
        with s:
            dmean = cp.asarray(mean)
            dm2 = cp.asarray(m2)
        n_new = n_old + B
        w, c = B / n_new, n_old * B / n_new
        self._enqueue_layers(self.k.moments_update, B, lambda A, D, fi, fo, wo, bo: (
            A, D, self.d_grad, np.int32(B), np.int32(fi), np.int32(fo), np.int64(wo), np.int64(bo),
            np.int64(n_old), np.float64(w), np.float64(c), dmean, dm2),
            total=lambda fi, fo: fi * fo + fo)
        dmean.get(stream=s, out=mean)
        dm2.get(stream=s, out=m2)
        self.d_grad.get(stream=s, out=grad)
        s.synchronize()

    def _enqueue_layers(self, kern, B, args, total):
        x0, _, as_, ds = self._layer_views(B)
        wo, bo = self.layout._offsets()
        for l in range(self.layout.n_layers):
            fi, fo = self.layout.sizes[l], self.layout.sizes[l + 1]
            A = x0 if l == 0 else as_[l - 1]
            self._launch(kern, *self._elementwise_grid(total(fi, fo)), args(A, ds[l], fi, fo, wo[l], bo[l]))


def _on_device(fn):
    @functools.wraps(fn)
    def on_device(self, *args, **kwargs):
        with self.device, self.stream:
            return fn(self, *args, **kwargs)
    return on_device


# The kernel contract, run with the model's device and stream current: CuPy launches
# kernels, makes copies and checks streams against the *current* device, and a model's
# memory, kernels and stream are on the device that was current when it was made.  Entering
# the stream once per call, not once per launch, saves the Python of a context switch on
# each of the dozens of launches of a step (tests/test_gpu_emu.py checks that no work of
# the backend reaches the null stream).
for _name in ("reserve", "warm_up", "draw_dropout", "update_running", "max_run_steps", "train_step", "run_steps",
              "opt_apply", "forward", "losses", "loss_grad", "last_sqnorms", "per_example_terms",
              "per_example_grads", "moments_update"):
    setattr(GpuBackend, _name, _on_device(getattr(GpuBackend, _name)))
del _name
