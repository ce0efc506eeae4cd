"""Device memory of the gpu backend: the kernels of one dtype, the parameter, gradient and
optimizer buffers, the workspace, the step tables, and the device copy of the training data.

Everything a training step touches is allocated here, before the step: a step only launches
kernels on buffers that exist.  Replacing a buffer that a captured CUDA graph points at
bumps ``_gen`` and drops the graphs (:mod:`._step` captures them again).  The training data
are uploaded once per ``fit`` (cached by array identity from the ``reserve`` call that
``fit`` makes before its first step); a pass outside a step (evaluation, statistics)
gathers its rows on the host and uploads them (:meth:`DeviceMemory._stage_batch`).
"""

from __future__ import annotations

import numpy as np

from minigd.errors import BackendUnavailable
from minigd.kernels import gpu_sources as S
from minigd.kernels.workspace import Workspace

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


class DeviceMemory:
    """The buffers of one model on its device, and the launch helper every pass uses."""

    def _init_device(self, P: int) -> None:
        cp = self.cp
        self.k = _Kernels(cp, self.dtype)
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.graph_max_batch = 64
        self.use_graphs = True
        self.read_every = 64
        with self.stream:  # zeros is a memset on the current stream: ours, which does not wait for the null stream
            self.d_params = cp.zeros(P, self.dtype)
            self.d_grad = cp.zeros(P, self.dtype)
            self._d_dummy = cp.zeros(1, self.dtype)
            self._d_dummy_i = cp.zeros(1, np.int64)
        self._pW, self._pb = self.layout.views(self.d_params)
        self._gW, self._gb = self.layout.views(self.d_grad)
        self._data = None  # (key, dX, dyi, dyf): training data on the device
        self._graphs = {}  # (B, want_sqn, opt key, generation) -> cupy Graph
        self._gen = 0  # bumped whenever a buffer a graph points at is replaced
        self._opt = None  # (key, device hp, device state)
        self._steps_cap = 0
        self._G = None  # (B, P) per-example gradients (stats)

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
            with self.stream:  # C order: a raw kernel sees only the data pointer (cupy.asarray keeps F order)
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
            st[: opt_state.state.size].set(opt_state.state, stream=self.stream)
        return hp, st

    def _download_opt(self, opt_state):
        hp, st = self._opt[1], self._opt[2]
        if opt_state.state.size:
            st[: opt_state.state.size].get(stream=self.stream, out=opt_state.state)
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
