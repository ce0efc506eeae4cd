"""Batch norm and dropout of the hidden layers on the device (``kernels/gpu_norm.cu``).

Wired into every regime (graph, tiled, cuBLAS) and both dtypes: a hidden layer of such a
model runs linear (+ activation) -> per ghost batch statistics / normalisation ->
(activation) -> dropout, and the backward pass the reverse, with dgamma / dbeta written
into the gradient vector (after the last bias, as ``ParamLayout`` puts them).

Dropout masks come from the host's uniforms (the same as every backend draws, so the same
masks for the same generator state): ``run_steps(dropout_rng=)`` draws those of all its
steps up front in the per-step order and uploads them, outside any graph capture, into a
step table; ``mgd_dropout_forward`` in step c reads row c (the step counter in device
memory) and makes the masks there.  A single pass outside a step (``loss_and_grad``,
statistics) uploads the uniforms of the last ``draw_dropout``.

The running statistics are the model's host array (``self.running``): an evaluation uploads
them; ``run_steps(update_running=True)`` uploads them once, folds in every applied step's
whole-batch mean and unbiased variance on the device (``mgd_bn_running_update`` skips a
rejected step) and downloads them at the end; ``update_running(B)`` does the same for the
last training pass alone.  Per-example statistics raise for batch norm
(:func:`~minigd.backends.base.check_per_example`) and are exact with dropout alone (each row
with its own mask row).
"""

from __future__ import annotations

import numpy as np

from minigd.backends.base import check_per_example
from minigd.kernels import gpu_sources as S
from minigd.kernels.codes import BN_AFTER, BN_BEFORE


class DeviceNorm:
    """Batch norm / dropout buffers, their forward and backward passes, the running
    statistics and the dropout uniforms table."""

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

        self._nd = [
            dict(
                xh=rows(n, bn),
                inv=cp.zeros(n_ghosts * n if bn else 0, self.dtype),
                pre=rows(n, bn == BN_BEFORE),
                act=rows(n, bn == BN_AFTER or drop),
                mask=rows(n, drop),
                unif=rows(n, drop, np.float64),
            )
            for n in hid
        ]
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
                return a[: B * width].reshape(B, width) if a.size else self._d_dummy

            v = {name: rows(d[name]) for name in ("xh", "pre", "act", "mask", "unif")}
            v["inv"] = d["inv"][: nch * n] if d["inv"].size else self._d_dummy
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
            c = self._bn_dev_views = (
                self.d_params,
                self.d_grad,
                *self.layout.bn_views(self.d_params),
                *self.layout.bn_views(self.d_grad),
            )
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
            self._d_running[: self.running.size].set(self.running, stream=s)

    def _check_norm_steps(self, B: int, n_steps: int, want_sqn: bool, dropout_rng, update_running) -> None:
        if want_sqn:
            check_per_example(self.norm, "per-example gradient norms")
        if n_steps > 1 and self.dropout > 0 and dropout_rng is None:
            raise ValueError(
                f"dropout_rng: {n_steps} steps of a model with dropout need the generator to "
                f"draw each step's masks from (fit passes its own), got None"
            )
        if n_steps > 1 and self.norm.bn and not update_running:
            raise ValueError(
                f"update_running: {n_steps} steps of a model with batch norm must update the "
                f"running statistics on the device (update_running=True, as fit does)"
            )
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
                self._unif_host[l][: B * n] = self._unif[l][:B].ravel()
        else:
            for c in range(n_steps):
                for l, n in enumerate(hid):
                    rng.random(out=self._unif_host[l][c * B * n : (c + 1) * B * n])
            self._grow(B)
            for l, n in enumerate(hid):  # the host state of draw_dropout after the last step
                np.copyto(self._unif[l][:B], self._unif_host[l][(n_steps - 1) * B * n : n_steps * B * n].reshape(B, n))
            self._masks_from_uniforms(B)
        for l, n in enumerate(hid):
            self._unif_tab[l][: n_steps * B * n].set(self._unif_host[l][: n_steps * B * n], stream=self.stream)

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
            self._launch(
                self.k.bn_running_update,
                *S.grid_columns(n),
                (x, np.int32(B), np.int32(n), np.float64(norm.momentum), self._d_rm[l], self._d_rv[l], st),
            )

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
        if bn == BN_BEFORE:  # linear only
            z, lin_act, lin_out = (zs[l] if training else v["xh"]), -1, self._d_dummy
        elif bn == BN_AFTER:  # linear + activation: the BN input
            z, lin_act, lin_out = zs[l], act, (v["act"] if training else v["xh"])
        else:  # dropout alone
            z, lin_act, lin_out = zs[l], act, (v["act"] if drop else as_[l])
        if gemm == "cublas":
            cp.matmul(A, W, out=z)
            self._launch(
                k.bias_act_forward,
                *self._elementwise_grid(B * fo),
                (z, b, lin_out, np.int32(B), np.int32(fo), np.int32(lin_act)),
            )
        else:
            grid, block = S.grid_gemm(B, fo)
            self._launch(
                k.gemm,
                grid,
                block,
                (
                    A,
                    W,
                    z,
                    np.int32(B),
                    np.int32(fo),
                    np.int32(fi),
                    np.int32(0),
                    np.int32(0),
                    np.int32(1),
                    b,
                    lin_out,
                    self._d_dummy,
                    self._d_dummy,
                    np.int32(lin_act),
                ),
            )
        out = lin_out
        if bn:
            x = z if bn == BN_BEFORE else lin_out
            out = v["pre"] if bn == BN_BEFORE else as_[l]
            if training:
                self._launch(
                    k.bn_train_forward,
                    *S.grid_columns(fo, v["nch"]),
                    (
                        x,
                        out,
                        v["xh"],
                        v["inv"],
                        gams[l],
                        bets[l],
                        np.int32(B),
                        np.int32(fo),
                        np.int32(v["g"]),
                        np.float64(norm.eps),
                    ),
                )
            else:
                self._launch(
                    k.bn_eval_forward,
                    *self._elementwise_grid(B * fo),
                    (
                        x,
                        out,
                        self._d_rm[l],
                        self._d_rv[l],
                        gams[l],
                        bets[l],
                        np.int32(B),
                        np.int32(fo),
                        np.float64(norm.eps),
                    ),
                )
            if bn == BN_BEFORE:  # f of the normalised z (a zero bias; pre + 0 is pre)
                out = v["act"] if drop else as_[l]
                self._launch(
                    k.bias_act_forward,
                    *self._elementwise_grid(B * fo),
                    (v["pre"], self._d_zero[:fo], out, np.int32(B), np.int32(fo), np.int32(act)),
                )
        if drop:  # as_[l] = out * mask, the mask made from the uploaded uniforms
            self._launch(
                k.dropout_forward,
                *self._elementwise_grid(B * fo),
                (
                    self._unif_tab[l] if step else v["unif"],
                    v["mask"],
                    out,
                    as_[l],
                    np.int64(B * fo),
                    np.float64(norm.dropout),
                    self._st if step else np.uint64(0),
                    np.int64(B * fo if step else 0),
                ),
            )

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
            self._launch(
                k.gemm,
                grid2,
                block2,
                (
                    D,
                    W,
                    G,
                    np.int32(B),
                    np.int32(fi),
                    np.int32(fo),
                    np.int32(0),
                    np.int32(1),
                    np.int32(0),
                    self._d_dummy,
                    self._d_dummy,
                    self._d_dummy,
                    self._d_dummy,
                    np.int32(-1),
                ),
            )
        if drop:
            self._launch(k.dropout_backward, *grid, (v["mask"], G, np.int64(n)))
        if bn == BN_BEFORE:  # through f (of the BN output) first
            self._launch(k.act_backward, *grid, (v["pre"], v["act"] if drop else as_[h], G, np.int64(n), np.int32(act)))
        if bn:
            gams, _, ggams, gbets = self._bn_dev()
            self._launch(
                k.bn_param_grad, *S.grid_columns(fi), (G, v["xh"], np.int32(B), np.int32(fi), ggams[h], gbets[h])
            )
            self._launch(
                k.bn_train_backward,
                *S.grid_columns(fi, v["nch"]),
                (G, v["xh"], v["inv"], gams[h], ds[h], np.int32(B), np.int32(fi), np.int32(v["g"])),
            )
        if bn != BN_BEFORE:  # through f of z (unmasked f(z) in ``act``)
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
        self._d_running[: self.running.size].set(self.running, stream=s)
        self._enqueue_running(B, np.uint64(0))
        self._d_running[: self.running.size].get(stream=s, out=self.running)
        s.synchronize()
