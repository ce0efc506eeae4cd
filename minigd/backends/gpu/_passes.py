"""Forward and backward passes of the gpu backend, enqueued on the model's stream.

A pass is a fixed sequence of kernel launches (``kernels/gpu_dense.cu``, ``gpu_loss.cu``):
per layer a GEMM and the bias + activation epilogue -> the fused loss forward/backward
(softmax cross-entropy, MSE or BCE-with-logits, one warp per row) and its deterministic
mean -> per layer, in reverse, the weight-gradient GEMM, the bias gradient, optionally the
per-example squared norms, and the delta GEMM with the activation-backward epilogue.
Hidden layers of a model with batch norm or dropout go through :mod:`._norm` instead.

Two GEMM flavours (``gemm``):

* ``"cublas"``: ``cupy.matmul(out=...)`` into workspace views, then the epilogue kernels.
  Used for batches above ``graph_max_batch``.
* ``"tiled"``: the 16x16 tiled GEMM of ``gpu_dense.cu`` with the bias + activation (or
  activation-backward) epilogue fused in.  CuPy refuses cuBLAS calls during stream
  capture, so the CUDA-graph path (batches up to ``graph_max_batch``, where a step is
  launch-bound) uses these.
"""

from __future__ import annotations

import numpy as np

from minigd.kernels import gpu_sources as S


class Passes:
    """Forward, loss and backward of the staged batch (no allocation, no host sync)."""

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
                self._launch(
                    self.k.bias_act_forward,
                    *self._elementwise_grid(B * fo),
                    (zs[l], b, aout, np.int32(B), np.int32(fo), np.int32(act)),
                )
            else:
                grid, block = S.grid_gemm(B, fo)
                self._launch(
                    self.k.gemm,
                    grid,
                    block,
                    (
                        A,
                        W,
                        zs[l],
                        np.int32(B),
                        np.int32(fo),
                        np.int32(fi),
                        np.int32(0),
                        np.int32(0),
                        np.int32(1),
                        b,
                        aout,
                        self._d_dummy,
                        self._d_dummy,
                        np.int32(act),
                    ),
                )

    def _enqueue_loss(self, B, dyi, dyf, idx, st, res, slot, train):
        """Loss kernel + deterministic mean: to rec[c, slot] (st given) or res[slot]."""
        _, zs, _, ds = self._layer_views(B)
        n = self.layout.sizes[-1]
        self._launch(
            self.k.loss_fwd_bwd,
            S.grid_rows(B),
            (S.THREADS,),
            (
                zs[-1],
                ds[-1],
                dyi,
                dyf,
                idx,
                st,
                np.int32(B),
                np.int32(n),
                np.int32(self.loss_code),
                np.float64(1.0 / B),
                self._rowloss,
            ),
        )
        self._launch(
            self.k.sum_rows,
            (1,),
            (S.THREADS,),
            (self._rowloss, np.int32(B), np.float64(1.0 / B), res, st, np.int32(slot), np.int32(train)),
        )

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
                self._launch(
                    self.k.gemm,
                    grid,
                    block,
                    (
                        A,
                        D,
                        self._gW[l],
                        np.int32(fi),
                        np.int32(fo),
                        np.int32(B),
                        np.int32(1),
                        np.int32(0),
                        np.int32(0),
                        self._d_dummy,
                        self._d_dummy,
                        self._d_dummy,
                        self._d_dummy,
                        np.int32(-1),
                    ),
                )
            grid, block = S.grid_bias_grad(fo)
            self._launch(self.k.bias_grad, grid, block, (D, np.int32(B), np.int32(fo), self._gb[l]))
            if want_sqn:
                self._launch(
                    self.k.sqnorm_accumulate,
                    S.grid_rows(B),
                    (S.THREADS,),
                    (
                        A,
                        D,
                        np.int32(B),
                        np.int32(fi),
                        np.int32(fo),
                        np.float64(float(B) * float(B)),
                        np.int32(l == L - 1),
                        self._sqn,
                    ),
                )
            if l > 0 and self.norm is not None:
                self._enqueue_hidden_norm_backward(l - 1, D, B, gemm)
            elif l > 0:
                act = self.act_codes[l - 1]
                if gemm == "cublas":
                    cp.matmul(D, self._pW[l].T, out=ds[l - 1])
                    self._launch(
                        self.k.act_backward,
                        *self._elementwise_grid(B * fi),
                        (zs[l - 1], as_[l - 1], ds[l - 1], np.int64(B * fi), np.int32(act)),
                    )
                else:
                    grid, block = S.grid_gemm(B, fi)
                    self._launch(
                        self.k.gemm,
                        grid,
                        block,
                        (
                            D,
                            self._pW[l],
                            ds[l - 1],
                            np.int32(B),
                            np.int32(fi),
                            np.int32(fo),
                            np.int32(0),
                            np.int32(1),
                            np.int32(2),
                            self._d_dummy,
                            self._d_dummy,
                            zs[l - 1],
                            as_[l - 1],
                            np.int32(act),
                        ),
                    )

    def _enqueue_layers(self, kern, B, args, total):
        x0, _, as_, ds = self._layer_views(B)
        wo, bo = self.layout._offsets()
        for l in range(self.layout.n_layers):
            fi, fo = self.layout.sizes[l], self.layout.sizes[l + 1]
            A = x0 if l == 0 else as_[l - 1]
            self._launch(kern, *self._elementwise_grid(total(fi, fo)), args(A, ds[l], fi, fo, wo[l], bo[l]))
