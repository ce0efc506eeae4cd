"""One whole training step on the device, and its CUDA graph.

A step is gather -> forward -> loss -> backward (:mod:`._passes`) -> optimizer (one fused
pass for the usual chains, or one pass per primitive; ``kernels/gpu_optim.cu``) -> "apply
if finite" -> step end.  Nothing in the sequence allocates or synchronises with the host;
what changes from step to step (batch indices, learning rate, update count) is read by the
kernels from device memory (the step control block in ``kernels/gpu_common.cuh``), so the
sequence is captured once in a CUDA graph and replayed for batches up to
``graph_max_batch``; larger ones run the cuBLAS sequence without a graph.
"""

from __future__ import annotations

import numpy as np

from minigd.kernels import gpu_sources as S
from minigd.kernels.codes import OP_ADAM, OP_CLIP, OP_DECAY, OP_SCALE, OP_SCALE_LR, OP_TRACE

#: mgd_opt_primitive op for each optimizer code (0: multiply by hp[k, 3])
_PRIM_OP = {OP_CLIP: 0, OP_DECAY: 1, OP_TRACE: 2, OP_ADAM: 3, OP_SCALE_LR: 0, OP_SCALE: 5}


class StepSequence:
    """The optimizer chain and the whole step, enqueued or replayed as a graph."""

    def _enqueue_sumsq(self, vec, hp, k, rec, st):
        """|vec|^2 in two deterministic stages; clip factor into hp[k, 3] (k >= 0) and/or
        |vec|^2 into rec[c, 2] (rec given)."""
        P = vec.shape[0]
        nb = S.reduce_blocks(P)
        self._launch(self.k.sumsq_partial, (nb,), (S.THREADS,), (vec, np.int64(P), self._partial))
        self._launch(
            self.k.clip_factor,
            (1,),
            (S.THREADS,),
            (self._partial, np.int32(nb), hp, np.int32(k), rec if rec is not None else np.uint64(0), st),
        )

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
                return dstate[soff[i] : soff[i] + P], dummy
            if codes[i] == OP_ADAM:
                return dstate[soff[i] : soff[i] + P], dstate[soff[i] + P : soff[i] + 2 * P]
            return dummy, dummy

        if plan[0]:
            i_mid = plan[3]
            mid = codes[i_mid] if i_mid >= 0 else -1
            i_adam = i_mid if mid == OP_ADAM else -1
            self._launch(k.opt_prepare, (1,), (1,), (hp, np.int32(plan[5]), np.int32(i_adam), sched, st))
            if plan[1] >= 0:
                self._enqueue_sumsq_clip(hp, plan[1], st)
            s1, s2 = slots(i_mid) if i_mid >= 0 else (dummy, dummy)
            self._launch(
                k.opt_fused,
                *grid,
                (
                    self.d_params,
                    self.d_grad,
                    s1,
                    s2,
                    np.int64(P),
                    hp,
                    np.int32(nrows),
                    np.int32(plan[1]),
                    np.int32(plan[2]),
                    np.int32(i_mid),
                    np.int32(mid),
                    np.int32(plan[4]),
                    np.int32(plan[5]),
                    st,
                ),
            )
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
                self._launch(
                    k.opt_primitive,
                    *grid,
                    (
                        self.d_params,
                        self.d_grad,
                        s1,
                        s2,
                        np.int64(P),
                        hp,
                        np.int32(nrows),
                        np.int32(i),
                        np.int32(_PRIM_OP[c]),
                        st,
                    ),
                )
            self._launch(k.check_finite, *grid, (self.d_params, self.d_grad, np.int64(P), st))
        self._launch(k.apply_update, *grid, (self.d_params, self.d_grad, np.int64(P), st))

    def _enqueue_sumsq_clip(self, hp, i, st):
        P = self.layout.n_params
        nb = S.reduce_blocks(P)
        self._launch(self.k.sumsq_partial, (nb,), (S.THREADS,), (self.d_grad, np.int64(P), self._partial))
        self._launch(
            self.k.clip_factor, (1,), (S.THREADS,), (self._partial, np.int32(nb), hp, np.int32(i), np.uint64(0), st)
        )  # rec: null

    def _enqueue_step(self, B, want_sqn, opt_state, hp, dstate, gemm, running=False):
        """One whole training step of the batch at row c of the index table (``running``:
        and batch norm's running statistics, if the step is applied)."""
        dX, dyi, dyf = self._data[1:]
        n0 = self.layout.sizes[0]
        x0 = self._layer_views(B)[0]
        st = self._st
        self._launch(self.k.gather, *self._elementwise_grid(B * n0), (dX, self._idx, st, np.int32(B), np.int32(n0), x0))
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
                    try:  # end the capture, but report what broke it, not the invalidated capture
                        self.stream.end_capture()
                    except Exception:
                        pass
                    raise
                g = self.stream.end_capture()
            if len(self._graphs) > 16:
                self._graphs.clear()
            self._graphs[key] = g
        return lambda: g.launch(self.stream)
