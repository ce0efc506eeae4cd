"""The training side of the backend contract on the device: ``warm_up``, ``train_step``,
``opt_apply`` and the device-resident loop ``run_steps``.

The model hands the backend NumPy arrays (``model.params`` is a host array the user may
read and write at any time), so each call uploads the parameters and optimizer state, runs
its steps (graph replays for small batches) and downloads parameters, state and the steps'
(loss, applied, |g|^2) records.  :meth:`Runner.run_steps` keeps parameters and state on the
device across its steps and reads the records back every ``read_every`` steps (default:
once, at the end); ``fit`` hands it up to ``steps_per_call`` (= ``read_every``, 64) full
batches at a time, cutting runs where it must look at the model (evaluations, checkpoints,
budgets, tracked steps).
"""

from __future__ import annotations

import time

import numpy as np


class Runner:
    """warm_up, train_step, run_steps and opt_apply."""

    def warm_up(self, params, grad, X, yi, yf, batch_sizes, opt_state, want_sqn=False, eval_sizes=()):
        """Before ``fit``'s clock starts (the kernels were compiled when the model was made):
        upload the training data and the optimizer's device buffers, size the step tables
        (and a dropout model's uniforms table) for runs of up to ``read_every`` steps of the
        largest batch, and capture the CUDA graph of a step of every batch size the graph
        regime takes -- so no timed step allocates, uploads the data or captures.  A capture
        records and runs nothing: ``params``, ``opt_state`` and ``running`` are untouched.
        (``eval_sizes``: nothing to do, the evaluation kernels compiled with the model.)"""
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
        res = self.run_steps(params, X, yi, yf, idx, B, 1, opt_state, [lr], t, want_sqn=want_sqn, grad=grad)
        loss, ok, gsq = res["loss"][0], bool(res["applied"][0]), res["grad_norm_sq"][0]
        return float(loss), ok, float(gsq) if want_sqn or not np.isfinite(loss) else 0.0

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
        """``n_steps`` training steps of batch size B on the device, rows
        ``idx[s * B:(s + 1) * B]`` for step s (or all of ``idx`` when it holds just B rows:
        full-batch steps), learning rates ``lrs[s]`` and update counts ``t0 + s``;
        parameters and optimizer state stay on the device between steps and are written
        back to ``params`` / ``opt_state.state`` at the end.  The step records are read back
        every ``read_every`` steps (default: only at the end), and the loop stops at the
        first rejected step (non-finite loss or update), as ``fit`` does, and, with
        ``max_time``, at the first read-back that comes ``max_time`` seconds or more after
        the call started (the device cannot stop between two read-backs).

        Batch norm and dropout: with ``dropout_rng`` each step's masks are drawn from it up
        front (the order ``draw_dropout`` once per step would use; without it, one step uses
        the last ``draw_dropout``'s), and ``update_running=True`` folds each applied step's
        batch statistics into ``running`` on the device, downloaded at the end -- what
        ``fit`` does per step with ``draw_dropout`` and ``update_running(B)``.  Several steps
        of such a model need both.

        Returns a dict of (n_done,) arrays ``loss``, ``applied``, ``grad_norm_sq`` (0 unless
        ``want_sqn``) and ``time`` for the steps run; with ``want_sqn`` the last step's
        per-example squared norms are available from :meth:`last_sqnorms`.  ``time`` is the
        seconds from the call's start to the end of each step; the device does not time its
        steps one by one, so step j gets ``elapsed * (j + 1) / n_done`` of the whole call's
        ``elapsed`` (uploads and read-backs included).
        """
        if track is not None:
            raise ValueError(
                "track: the gpu backend computes per-example norms for a whole run (want_sqn); "
                "its tracks_within_run is False, so fit ends a run at each tracked step"
            )
        start = time.perf_counter()
        n_steps = int(n_steps)
        if n_steps < 1:
            raise ValueError(f"n_steps: expected at least 1, got {n_steps}")
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        if idx.shape[0] == B and n_steps > 1:  # full-batch steps: the same rows at every step
            idx = np.tile(idx, n_steps)
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
            self._d_running[: self.running.size].set(self.running, stream=self.stream)
        self._device_data(X, yi, yf)
        hp, dstate = self._upload_opt(opt_state)
        s = self.stream
        self.d_params.set(params, stream=s)
        sched = np.empty((n_steps, 2), np.float64)
        sched[:, 0] = lrs
        sched[:, 1] = t0 + np.arange(n_steps)
        self._sched[:n_steps].set(sched, stream=s)
        self._idx[: n_steps * B].set(idx[: n_steps * B], stream=s)
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
            self._rec[done:upto].get(stream=s, out=rec[done:upto])  # the one host sync
            bad = np.flatnonzero(rec[done:upto, 1] == 0)
            if bad.size:
                upto = done + int(bad[0]) + 1
                done = upto
                break
            done = upto
            if max_time is not None and time.perf_counter() - start >= max_time:
                break
        self.d_params.get(stream=s, out=params)
        if grad is not None:
            self.d_grad.get(stream=s, out=grad)
        if running:
            self._d_running[: self.running.size].get(stream=s, out=self.running)
        self._download_opt(opt_state)
        s.synchronize()
        elapsed = time.perf_counter() - start
        return {
            "loss": rec[:done, 0].copy(),
            "applied": rec[:done, 1] != 0,
            "grad_norm_sq": rec[:done, 2].copy(),
            "time": elapsed * np.arange(1, done + 1, dtype=np.float64) / done,
        }

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
