"""minigd against the peers a user would pick instead: PyTorch eager, scikit-learn, BLAS.

Usage::

    python bench/peers.py              # everything; writes bench/results/peers.{md,json,png}
    python bench/peers.py --quick      # tiny sizes, one round (the smoke test uses this)
    python bench/peers.py --threads 1 --sections step,gemm --rounds 5
    python bench/peers.py --render bench/results/peers.json   # rebuild peers.md/.png only

Optional peers (each one missing is reported as missing, never faked)::

    pip install torch==2.13.0                                        # PyTorch eager + torch.func
    pip install --no-deps backpack-for-pytorch einops unfoldNd        # BackPACK (see below)
    pip install scikit-learn                                          # MLPClassifier; also the digits data

(``--no-deps`` for BackPACK: its metadata asks for torchvision, which would pull in
another torch build; BackPACK itself only needs torch, einops and unfoldNd.)

Sections (``--sections``, default all):

``step``
    One training step -- gather the batch by index, forward, softmax cross-entropy,
    backward, SGD update -- for MLPs 64-128-128-10 and 784-256-256-10 (ReLU, float32) at
    batch sizes 1, 2, 8, 32, 128, 512, 2048, on each thread count: minigd ``cpu``
    (``backend.train_step``, exactly as ``bench/step.py`` and ``fit`` call it), minigd's
    ``numpy`` reference, PyTorch eager (``nn.Sequential`` of ``Linear``/``ReLU``,
    ``CrossEntropyLoss``, ``torch.optim.SGD`` with its defaults, ``zero_grad(set_to_none=
    True)``, the batch gathered with ``X[idx]``; same initial weights as minigd) and
    scikit-learn's ``MLPClassifier`` (``solver='sgd'``, ``batch_size=B``, momentum 0,
    ``alpha=0``, ``shuffle=False``: the per-step cost of a ``partial_fit`` epoch over k*B
    rows, divided by k).
``gemm``
    The machine's float32 GEMM throughput on the shapes the step computes, at B >= 512:
    the chain of numpy ``matmul(out=...)`` calls a step makes (forward ``a @ W``, weight
    gradients ``a.T @ d``, input gradients ``d @ W.T`` for layers > 0, with minigd's memory
    layout), timed interleaved with the steps above, on the same thread count; the same
    chain in ``torch.mm`` (MKL) and one square 1024^3 GEMM for reference.  FLOPs are what a
    step really computes: 2*B*sum(fan_in*fan_out) forward + the same for the weight
    gradients + 2*B*sum over layers > 0 for the input gradients (bias, activation, loss
    and update are not counted: they are extra work the step does for free).  "Fraction
    of GEMM peak" = (step FLOPs / step time) / (chain FLOPs / chain time) = chain time /
    step time.
``stats``
    Per-example statistics, one thread, B = 8, 32, 128, 512, each as a ratio to the same
    framework's plain forward + backward on the same batch: minigd per-example gradient
    norms (``loss_grad(want_sqn=True)``, i.e. ``per_example_grad_norms`` / ``fit(track_noise)``)
    and per-parameter gradient moments (``moments_update``, one chunk of
    ``grad_moments``), plus the public calls ``mg.per_example_grad_norms`` /
    ``mg.grad_moments`` against ``model.loss_and_grad``; torch.func per-sample gradients
    (``vmap(grad(loss of one example))``) then their norms, or their mean and variance; and
    BackPACK's ``BatchL2Grad`` and ``Variance`` extensions.
``e2e``
    Wall time to reach 95% validation accuracy on scikit-learn's digits (80/20 stratified
    split), MLP 64-64-10, He-uniform init (PyTorch gets minigd's initial weights), SGD with
    momentum 0.9 and the same learning rate per batch size for both (B=1: 0.003, 8: 0.03,
    32: 0.1, 256: 0.3), B = 1, 8, 32, 256.  Both see the same batches in the same order
    (minigd's shuffle sampler, replayed in the PyTorch loop), so both follow nearly the
    same trajectory and need nearly the same number of steps.  Accuracy is evaluated
    every max(1, 128 // B) steps; evaluation time is excluded for both.  minigd: the whole
    ``mg.fit`` call; PyTorch: a plain loop over index tensors (no DataLoader, which would
    only add overhead).  Median over seeds.

Method: one subprocess per thread count, with NUMBA_NUM_THREADS / OPENBLAS_NUM_THREADS /
OMP_NUM_THREADS / MKL_NUM_THREADS set before anything is imported and
``torch.set_num_threads``; the thread counts each library reports are recorded (the
per-example statistics run in the one-thread subprocess).  In each (model, batch) cell
every peer is warmed up, its repetitions are calibrated to about ``--target`` seconds, and
the peers then run in ``--rounds`` interleaved rounds (the order rotating every round); the
median round is reported, so slow drifts hit all peers alike.  A pause precedes each timed
block (``--gap``; half of it with one thread) so that the previous peer's spinning worker
threads (OpenMP, OpenBLAS: several pools live in one process) have gone to sleep.

On a shared machine other processes' bursts are the main noise, and they are ruinous for
two threads on two cores (a step waits for its descheduled worker thread).  So the
benchmark waits for the other processes to go quiet before each block (/proc/stat), marks
a block contended when the kernel's CPU pressure stall (/proc/pressure/cpu) exceeded 5% of
its wall time, re-times it (at most twice), and takes the medians over uncontended rounds
when at least 3 exist.  The counts are printed per thread count; cells whose rounds still
spread by more than 25% are marked †, and every round's time is in peers.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from _common import cpu_model, synthetic_data

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
MODELS = ([64, 128, 128, 10], [784, 256, 256, 10])
BATCHES = (1, 2, 8, 32, 128, 512, 2048)
STATS_BATCHES = (8, 32, 128, 512)
GEMM_MIN_BATCH = 512
E2E_SIZES = [64, 64, 10]
E2E_LR = {1: 0.003, 8: 0.03, 32: 0.1, 256: 0.3}
E2E_TARGET = 0.95
PEERS = ("cpu", "numpy", "torch", "sklearn", "backpack")
SECTIONS = ("step", "gemm", "stats", "e2e")
THREAD_VARS = ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

#: issue 7's step targets, 1 thread: (model, batch size, PyTorch time / minigd time >= bound)
STEP_TARGETS = (("64-128-128-10", 1, 20.0), ("64-128-128-10", 32, 4.0), ("64-128-128-10", 2048, 1.3),
                ("784-256-256-10", 1, 5.0), ("784-256-256-10", 32, 1.5), ("784-256-256-10", 2048, 0.95))
NORMS_TARGET, MOMENTS_TARGET, GEMM_TARGET = 1.10, 1.5, 0.85
#: a cell whose rounds spread more than this (interquartile range / median) is flagged
NOISY_IQR = 0.25


def _thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in THREAD_VARS:
        env[k] = str(threads)
    return env


def _atomic_write(path: str, data) -> None:
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _name(sizes) -> str:
    return "-".join(map(str, sizes))


def step_flops(sizes, B: int) -> int:
    """FLOPs of the GEMMs in one training step (see the module docstring)."""
    layers = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    return 2 * B * (2 * sum(layers) + sum(layers[1:]))


_T0 = time.perf_counter()


def _log(msg: str) -> None:
    print(f"{msg}  [+{time.perf_counter() - _T0:.0f} s]", file=sys.stderr, flush=True)


# ============================================================================ child side
def _import_peer(name: str, wanted):
    """(module or None, status string)."""
    if name not in wanted:
        return None, "not requested (--peers)"
    try:
        if name == "torch":
            import torch
            return torch, f"torch {torch.__version__}"
        if name == "sklearn":
            import sklearn
            from sklearn.neural_network import MLPClassifier  # noqa: F401
            return sklearn, f"scikit-learn {sklearn.__version__}"
        if name == "backpack":
            import backpack
            from backpack.extensions import BatchL2Grad, Variance  # noqa: F401
            from importlib.metadata import version
            try:
                v = version("backpack-for-pytorch")
            except Exception:  # pragma: no cover
                v = "?"
            return backpack, f"backpack-for-pytorch {v}"
    except Exception as e:  # ImportError, or a broken install
        return None, f"missing ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return None, "unknown peer"


def _pinned(torch) -> dict:
    """What each library reports as its thread count, in this process."""
    import numba
    out = {"env": {k: os.environ.get(k) for k in THREAD_VARS}, "numba": numba.get_num_threads()}
    try:
        import threadpoolctl
        out["threadpools"] = [{k: p.get(k) for k in ("internal_api", "version", "num_threads",
                                                      "threading_layer", "architecture", "filepath")}
                              for p in threadpoolctl.threadpool_info()]
        for p in out["threadpools"]:
            p["filepath"] = os.path.basename(p["filepath"] or "")
    except Exception as e:  # pragma: no cover - informational
        out["threadpools"] = f"unavailable: {e}"
    if torch is not None:
        out["torch"] = torch.get_num_threads()
    return out


class _Machine:
    """Contention from other processes, measured around every timed block.

    The machine may be shared (other people's test runs): a burst of another process on
    one of two cores makes a two-thread step wait for its descheduled worker thread, and
    the step takes 10-100x longer.  Two signals, both from /proc (Linux; elsewhere nothing
    is checked):

    * before each block, the cores used by other processes (/proc/stat busy time minus
      this process's CPU time) over a short window: while it exceeds ``quiet`` we wait (at
      most ``max_wait`` s per block, ``budget`` s per process, then go on);
    * during each block, the CPU pressure stall (/proc/pressure/cpu "some": time during
      which some runnable task had no CPU) as a fraction of the block's wall time: a block
      above ``stall`` is contended; it is timed again (at most twice), and the medians
      use only uncontended rounds when at least 3 exist.
    """

    def __init__(self, quiet=0.25, stall=0.05, max_wait=3.0, budget=90.0):
        self.quiet, self.stall, self.max_wait, self.budget = quiet, stall, max_wait, budget
        self.retime_budget = budget       # seconds of re-timed blocks per process
        self.retime_s = 0.0
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.has_stat = os.path.exists("/proc/stat")
        self.has_psi = self._psi() is not None
        self.waited = 0.0
        self.blocks = self.retimed = self.contended = 0

    @staticmethod
    def _psi():
        try:
            with open("/proc/pressure/cpu") as f:
                return int(f.readline().rsplit("total=", 1)[1]) * 1e-6
        except (OSError, ValueError, IndexError):
            return None

    def _snap(self):
        busy = 0.0
        if self.has_stat:
            with open("/proc/stat", "rb") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
            busy = (sum(v) - v[3] - v[4]) / self.hz
        return busy, time.process_time(), time.perf_counter(), (self._psi() if self.has_psi else 0.0)

    def others(self, a, b) -> float:
        """Cores used by other processes between two snapshots (tick resolution)."""
        dt = b[2] - a[2]
        if not self.has_stat or dt <= 0:
            return 0.0
        return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / dt)

    def stalled(self, a, b) -> float:
        """Fraction of the wall time between two snapshots with a runnable task waiting."""
        dt = b[2] - a[2]
        return (b[3] - a[3]) / dt if dt > 0 else 0.0

    def settle(self, window: float) -> float:
        """Sleep ``window`` seconds, and longer while other processes are busy."""
        start = time.perf_counter()
        while True:
            a = self._snap()
            time.sleep(window)
            load = self.others(a, self._snap())
            extra = time.perf_counter() - start - window
            if load <= self.quiet or extra >= self.max_wait or self.waited + extra >= self.budget:
                self.waited += max(0.0, extra)
                return load

    def time_block(self, fn, k: int, window: float) -> tuple:
        """(seconds per call, contended?) of fn(k), after settling."""
        for attempt in range(3):
            if window:
                self.settle(window)
            a = self._snap()
            t0 = time.perf_counter()
            fn(k)
            dt = time.perf_counter() - t0
            bad = self.stalled(a, self._snap()) > self.stall
            if not bad or not window or attempt == 2 or self.retime_s + dt > self.retime_budget:
                break
            self.retimed += 1
            self.retime_s += dt
        self.blocks += 1
        self.contended += bad
        return dt / k, bad

    def summary(self) -> dict:
        return {"blocks": self.blocks, "retimed": self.retimed, "contended": self.contended,
                "waited_s": round(self.waited, 1), "proc_stat": self.has_stat, "psi": self.has_psi}


#: one per process (see _Machine)
MACHINE = _Machine()


class _Rounds:
    """Calibrate, then time named runners in interleaved rounds; medians per runner."""

    def __init__(self, runners: dict, rounds: int, target_s: float, gap_s: float):
        self.runners, self.rounds, self.target_s, self.gap_s = runners, rounds, target_s, gap_s

    def run(self) -> dict:
        import numpy as np
        reps = {}
        for name, fn in self.runners.items():
            fn(1)
            fn(1)                       # warm-up: JIT, caches, first touch, lazy init
            t0 = time.perf_counter()
            fn(2)
            per = (time.perf_counter() - t0) / 2
            reps[name] = max(1, int(self.target_s / max(per, 1e-7)))
        names = list(self.runners)
        samples = {n: [] for n in names}
        bad = {n: [] for n in names}
        for r in range(self.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                t, b = MACHINE.time_block(self.runners[name], reps[name], self.gap_s)
                samples[name].append(t)
                bad[name].append(b)
        self.samples = {n: np.asarray(v) for n, v in samples.items()}
        self.contended = {n: np.asarray(v, bool) for n, v in bad.items()}
        self.clean = {}
        for n, v in self.samples.items():
            ok = v[~self.contended[n]]
            self.clean[n] = ok if len(ok) >= min(3, len(v)) else v
        return {n: float(np.median(v)) for n, v in self.clean.items()}

    def noisy(self, rel_iqr: float = NOISY_IQR) -> list:
        """Runners whose rounds spread by more than rel_iqr (interquartile range / median)."""
        import numpy as np
        out = []
        for n, v in self.clean.items():
            if len(v) >= 4:
                q1, med, q3 = np.percentile(v, [25, 50, 75])
                if (q3 - q1) > rel_iqr * med:
                    out.append(n)
        return out


def _torch_mlp(torch, m):
    """nn.Sequential with minigd model m's current weights."""
    nn = torch.nn
    layers = []
    L = len(m.weights)
    for l, (W, b) in enumerate(zip(m.weights, m.biases)):
        lin = nn.Linear(W.shape[0], W.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W.T.copy()))
            lin.bias.copy_(torch.from_numpy(b.copy()))
        layers.append(lin)
        if l < L - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _gemm_chain(np, sizes, B, rng):
    """run(k): k times the GEMMs of one step, on minigd's memory layout, preallocated, in numpy."""
    L = len(sizes) - 1
    acts = [rng.standard_normal((B, sizes[l])).astype(np.float32) for l in range(L)]
    Ws = [rng.standard_normal((sizes[l], sizes[l + 1])).astype(np.float32) for l in range(L)]
    zs = [np.empty((B, sizes[l + 1]), np.float32) for l in range(L)]
    ds = [rng.standard_normal((B, sizes[l + 1])).astype(np.float32) for l in range(L)]
    gWs = [np.empty_like(W) for W in Ws]
    dprev = [np.empty((B, sizes[l]), np.float32) for l in range(L)]

    def run(k):
        for _ in range(k):
            for l in range(L):
                np.matmul(acts[l], Ws[l], out=zs[l])
            for l in range(L - 1, -1, -1):
                np.matmul(acts[l].T, ds[l], out=gWs[l])
                if l > 0:
                    np.matmul(ds[l], Ws[l].T, out=dprev[l])
    return run


def _gemm_chain_torch(torch, sizes, B):
    """The same chain in torch.mm (MKL in the PyTorch wheels)."""
    L = len(sizes) - 1
    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(B, sizes[l], generator=g) for l in range(L)]
    Ws = [torch.randn(sizes[l], sizes[l + 1], generator=g) for l in range(L)]
    zs = [torch.empty(B, sizes[l + 1]) for l in range(L)]
    ds = [torch.randn(B, sizes[l + 1], generator=g) for l in range(L)]
    gWs = [torch.empty_like(W) for W in Ws]
    dprev = [torch.empty(B, sizes[l]) for l in range(L)]

    def run(k):
        for _ in range(k):
            for l in range(L):
                torch.mm(acts[l], Ws[l], out=zs[l])
            for l in range(L - 1, -1, -1):
                torch.mm(acts[l].t(), ds[l], out=gWs[l])
                if l > 0:
                    torch.mm(ds[l], Ws[l].t(), out=dprev[l])
    return run


def measure_step(models, batches, peers, rounds, target_s, gap_s, gemm_min, threads) -> tuple:
    import numpy as np

    import minigd as mg
    torch, sklearn = peers.get("torch"), peers.get("sklearn")
    rng = np.random.default_rng(0)
    rows, gemm_rows = [], []
    for sizes in models:
        n = max(batches) * 2
        X, y = synthetic_data(rng, sizes, n)
        yf = np.empty((0, sizes[-1]), np.float32)
        for B in batches:
            idx = rng.permutation(n)[:B].astype(np.int64)
            runners = {}
            for be in ("cpu", "numpy"):
                if be not in peers:
                    continue
                m = mg.MLP(sizes, dtype="float32", backend=be, seed=0)
                impl = m.backend_impl
                impl.reserve(B)
                opt = mg.SGD(lr=1e-3).init(m.params)

                def run(k, impl=impl, m=m, opt=opt):
                    for _ in range(k):
                        impl.train_step(m.params, m._grad, X, y, yf, idx, B, opt, 1e-3, 1)
                runners["minigd" if be == "cpu" else "numpy"] = run
            if torch is not None:
                tm = _torch_mlp(torch, mg.MLP(sizes, seed=0))
                ce = torch.nn.CrossEntropyLoss()
                topt = torch.optim.SGD(tm.parameters(), lr=1e-3)
                Xt, yt, it = torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(idx)

                def trun(k, tm=tm, ce=ce, topt=topt, Xt=Xt, yt=yt, it=it):
                    for _ in range(k):
                        xb, yb = Xt[it], yt[it]
                        topt.zero_grad(set_to_none=True)
                        loss = ce(tm(xb), yb)
                        loss.backward()
                        topt.step()
                runners["torch"] = trun
            if sklearn is not None:
                runners["sklearn"] = _sklearn_runner(np, sizes, B, rng)
            if B >= gemm_min:
                runners["gemm"] = _gemm_chain(np, sizes, B, rng)
                if torch is not None:
                    runners["gemm_torch"] = _gemm_chain_torch(torch, sizes, B)
            timer = _Rounds(runners, rounds, target_s, gap_s)
            med = timer.run()
            row = {"model": _name(sizes), "batch": B, "threads": threads}
            for k, v in med.items():
                if not k.startswith("gemm"):
                    row[f"{k}_us"] = v * 1e6
            row["rounds_us"] = {k: [round(x * 1e6, 2) for x in v] for k, v in timer.samples.items()}
            row["contended_rounds"] = {k: int(v.sum()) for k, v in timer.contended.items()}
            row["best_us"] = {k: float(v.min() * 1e6) for k, v in timer.samples.items()}
            if "minigd" in med and "torch" in med:
                row["torch_over_minigd_best"] = row["best_us"]["torch"] / row["best_us"]["minigd"]
            row["noisy"] = timer.noisy()
            if "minigd" in med:
                for k in ("numpy", "torch", "sklearn"):
                    if k in med:
                        row[f"{k}_over_minigd"] = med[k] / med["minigd"]
            rows.append(row)
            _log(f"[peers {threads}T] step {row['model']} B={B}: " +
                 ", ".join(f"{k} {v * 1e6:.1f}us" for k, v in med.items()))
            if "gemm" in med:
                F = step_flops(sizes, B)
                g = {"model": _name(sizes), "batch": B, "threads": threads, "flops": F,
                     "gemm_chain_us": med["gemm"] * 1e6, "gemm_chain_gflops": F / med["gemm"] / 1e9}
                if "gemm_torch" in med:
                    g["gemm_torch_chain_us"] = med["gemm_torch"] * 1e6
                    g["gemm_torch_chain_gflops"] = F / med["gemm_torch"] / 1e9
                for k in ("minigd", "torch", "numpy", "sklearn"):
                    if k in med:
                        g[f"{k}_gflops"] = F / med[k] / 1e9
                        g[f"{k}_fraction_of_gemm"] = med["gemm"] / med[k]
                gemm_rows.append(g)
    return rows, gemm_rows


def _sklearn_runner(np, sizes, B, rng):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    n_out = sizes[-1]
    clf = MLPClassifier(hidden_layer_sizes=tuple(sizes[1:-1]), activation="relu", solver="sgd",
                        batch_size=B, learning_rate_init=1e-3, momentum=0.0, nesterovs_momentum=False,
                        alpha=0.0, shuffle=False, random_state=0)
    data = {"X": np.empty((0, sizes[0]), np.float32), "y": np.empty(0, np.int64)}

    def rows(k):
        need = k * B
        if len(data["X"]) < need:
            m = max(need, 2 * len(data["X"]), n_out)
            data["X"] = rng.standard_normal((m, sizes[0])).astype(np.float32)
            data["y"] = (np.arange(m) % n_out).astype(np.int64)   # every class present
        return data["X"][:need], data["y"][:need]

    Xi, yi = rows(max(1, -(-n_out // B)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.partial_fit(Xi, yi, classes=np.arange(n_out))

    def run(k):
        Xk, yk = rows(k)
        clf.partial_fit(Xk, yk)      # one epoch over k*B rows = k steps of batch B
    return run


def measure_square_gemm(peers, rounds, target_s, gap_s, threads, n=1024) -> dict:
    import numpy as np
    torch = peers.get("torch")
    rng = np.random.default_rng(0)
    A = rng.standard_normal((n, n)).astype(np.float32)
    Bm = rng.standard_normal((n, n)).astype(np.float32)
    C = np.empty((n, n), np.float32)

    def npr(k):
        for _ in range(k):
            np.matmul(A, Bm, out=C)
    runners = {"numpy": npr}
    if torch is not None:
        At, Bt, Ct = torch.from_numpy(A), torch.from_numpy(Bm), torch.empty(n, n)

        def tr(k):
            for _ in range(k):
                torch.mm(At, Bt, out=Ct)
        runners["torch"] = tr
    med = _Rounds(runners, rounds, target_s, gap_s).run()
    out = {"n": n, "threads": threads}
    for k, v in med.items():
        out[f"{k}_gflops"] = 2 * n ** 3 / v / 1e9
    _log(f"[peers {threads}T] square GEMM {n}^3: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in out.items() if k.endswith("gflops")))
    return out


# ------------------------------------------------------------------------ per-example stats
def measure_stats(models, batches, peers, rounds, target_s, gap_s) -> list:
    import numpy as np

    import minigd as mg
    torch, backpack = peers.get("torch"), peers.get("backpack")
    rng = np.random.default_rng(0)
    rows = []
    for sizes in models:
        n = max(2 * max(batches), 1024)
        X, y = synthetic_data(rng, sizes, n)
        for B in batches:
            idx = np.random.default_rng(1).permutation(n)[:B].astype(np.int64)
            runners = {}
            if "cpu" in peers:
                runners.update(_minigd_stats(np, mg, sizes, X, y, idx, B))
            if torch is not None:
                runners.update(_torch_stats(torch, mg, sizes, X, y, idx, B, backpack))
            timer = _Rounds(runners, rounds, target_s, gap_s)
            med = timer.run()
            row = {"model": _name(sizes), "batch": B}
            for k, v in med.items():
                row[f"{k}_us"] = v * 1e6
            # ratios per round (numerator and denominator from the same round), then median
            r = timer.samples
            pairs = {"minigd_norms": ("mg_norms", "mg_plain"), "minigd_moments": ("mg_moments", "mg_plain"),
                     "minigd_api_norms": ("mg_api_norms", "mg_api_plain"),
                     "minigd_api_moments": ("mg_api_moments", "mg_api_plain"),
                     "torchfunc_norms": ("tf_norms", "t_plain"), "torchfunc_moments": ("tf_moments", "t_plain"),
                     "backpack_norms": ("bp_l2", "t_plain"), "backpack_moments": ("bp_var", "t_plain"),
                     "backpack_plain": ("bp_plain", "t_plain")}
            c = timer.contended
            for name, (a, b) in pairs.items():
                if a in r and b in r:
                    ok = ~(c[a] | c[b])
                    ratio = r[a] / r[b]
                    row[f"{name}_x"] = float(np.median(ratio[ok] if ok.sum() >= min(3, len(ok)) else ratio))
            row["contended_rounds"] = {k: int(v.sum()) for k, v in c.items()}
            if "mg_plain" in med and "t_plain" in med:
                row["torch_plain_over_minigd"] = med["t_plain"] / med["mg_plain"]
            rows.append(row)
            _log(f"[peers 1T] stats {row['model']} B={B}: " +
                 ", ".join(f"{k} {v:.2f}x" for k, v in row.items() if k.endswith("_x")))
    return rows


def _minigd_stats(np, mg, sizes, X, y, idx, B) -> dict:
    m = mg.MLP(sizes, dtype="float32", backend="cpu", seed=0)
    Xc, yi, yf = m.check_Xy(X, y)
    impl = m.backend_impl
    impl.reserve(B)
    g = np.zeros(m.n_params, np.float32)
    mean, m2 = np.zeros(m.n_params), np.zeros(m.n_params)
    params = m.params
    Xb, yb = np.ascontiguousarray(X[idx]), y[idx]

    def plain(k):
        for _ in range(k):
            impl.loss_grad(params, g, Xc, yi, yf, idx, B)

    def norms(k):
        for _ in range(k):
            impl.loss_grad(params, g, Xc, yi, yf, idx, B, want_sqn=True)

    def moments(k):
        for _ in range(k):
            impl.moments_update(params, g, Xc, yi, yf, idx, B, 1000, mean, m2)

    def api_plain(k):
        for _ in range(k):
            m.loss_and_grad(Xb, yb)

    def api_norms(k):
        for _ in range(k):
            mg.per_example_grad_norms(m, Xb, yb)

    def api_moments(k):
        for _ in range(k):
            mg.grad_moments(m, Xb, yb, chunk_size=B)

    out = {"mg_plain": plain, "mg_norms": norms, "mg_moments": moments}
    if B >= 2:
        out.update({"mg_api_plain": api_plain, "mg_api_norms": api_norms, "mg_api_moments": api_moments})
    return out


def _torch_stats(torch, mg, sizes, X, y, idx, B, backpack) -> dict:
    import copy

    from torch.func import functional_call, grad, vmap
    F = torch.nn.functional
    tm = _torch_mlp(torch, mg.MLP(sizes, seed=0))
    ce = torch.nn.CrossEntropyLoss()
    Xt, yt, it = torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(idx)

    def plain(k):
        for _ in range(k):
            xb, yb = Xt[it], yt[it]
            tm.zero_grad(set_to_none=True)
            ce(tm(xb), yb).backward()

    params = {k: v.detach() for k, v in tm.named_parameters()}

    def loss_one(p, x, t):
        return F.cross_entropy(functional_call(tm, p, (x.unsqueeze(0),)), t.unsqueeze(0))
    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def tf_norms(k):
        for _ in range(k):
            g = per_sample(params, Xt[it], yt[it])
            torch.sqrt(sum(v.reshape(B, -1).square().sum(1) for v in g.values()))

    def tf_moments(k):
        # explicit two-pass mean / variance (ddof=1): 1.5-7x faster here than
        # torch.var_mean(dim=0), whose strided reduction over the batch dimension is slow
        for _ in range(k):
            g = per_sample(params, Xt[it], yt[it])
            for v in g.values():
                mean = v.mean(0)
                (v - mean).square_().sum(0).div_(B - 1)

    out = {"t_plain": plain, "tf_norms": tf_norms, "tf_moments": tf_moments}
    if backpack is not None:
        from backpack import backpack as bp_ctx
        from backpack import extend
        from backpack.extensions import BatchL2Grad, Variance
        bm = extend(copy.deepcopy(tm))
        bce = extend(torch.nn.CrossEntropyLoss())

        def bp_plain(k):
            for _ in range(k):
                bm.zero_grad(set_to_none=True)
                bce(bm(Xt[it]), yt[it]).backward()

        def bp_l2(k):
            for _ in range(k):
                bm.zero_grad(set_to_none=True)
                loss = bce(bm(Xt[it]), yt[it])
                with bp_ctx(BatchL2Grad()):
                    loss.backward()
                torch.sqrt(sum(p.batch_l2 for p in bm.parameters()))

        def bp_var(k):
            for _ in range(k):
                bm.zero_grad(set_to_none=True)
                loss = bce(bm(Xt[it]), yt[it])
                with bp_ctx(Variance()):
                    loss.backward()
        out.update({"bp_plain": bp_plain, "bp_l2": bp_l2, "bp_var": bp_var})
    return out


# ------------------------------------------------------------------------------ end to end
def _digits(np):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    X = (d.data / 16).astype(np.float32)
    y = d.target.astype(np.int64)
    return train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)


def measure_e2e(batches, seeds, peers, threads, target=E2E_TARGET, max_epochs=200, gap_s=0.0) -> list:
    import numpy as np

    import minigd as mg
    torch = peers.get("torch")
    if peers.get("sklearn") is None:
        return [{"skipped": "scikit-learn missing (digits data)"}]
    Xt, Xv, yt, yv = _digits(np)
    rows = []
    for B in batches:
        lr = E2E_LR.get(B, 0.1)
        every = max(1, 128 // B)
        res = {"minigd": [], "torch": []}
        for s in list(seeds):
            order = ["minigd", "torch"] if s % 2 == 0 else ["torch", "minigd"]
            for fw in order:
                if gap_s:
                    MACHINE.settle(gap_s)
                if fw == "minigd" and "cpu" in peers:
                    res[fw].append(_e2e_minigd(mg, Xt, yt, Xv, yv, B, lr, every, s, target, max_epochs))
                elif fw == "torch" and torch is not None:
                    res[fw].append(_e2e_torch(torch, np, mg, Xt, yt, Xv, yv, B, lr, every, s, target, max_epochs))
        row = {"batch": B, "lr": lr, "eval_every": every, "threads": threads, "seeds": list(seeds)}
        for fw, rs in res.items():
            if not rs:
                continue
            ok = [r for r in rs if r["reached"]]
            row[f"{fw}_reached"] = f"{len(ok)}/{len(rs)}"
            row[f"{fw}_runs"] = rs
            if ok:
                row[f"{fw}_s"] = float(np.median([r["wall_s"] for r in ok]))
                row[f"{fw}_steps"] = float(np.median([r["steps"] for r in ok]))
        both = [(a, b) for a, b in zip(res["minigd"], res["torch"]) if a["reached"] and b["reached"]]
        if both:
            row["torch_over_minigd"] = float(np.median([b["wall_s"] / a["wall_s"] for a, b in both]))
        rows.append(row)
        _log(f"[peers {threads}T] e2e B={B}: minigd {row.get('minigd_s', float('nan')):.4f}s "
             f"({row.get('minigd_reached')}), torch {row.get('torch_s', float('nan')):.4f}s ({row.get('torch_reached')})")
    return rows


def _e2e_minigd(mg, Xt, yt, Xv, yv, B, lr, every, seed, target, max_epochs) -> dict:
    m = mg.MLP(E2E_SIZES, seed=seed)
    ev = [0.0]
    evaluate = m.evaluate

    def timed_evaluate(X, y):
        t0 = time.perf_counter()
        r = evaluate(X, y)
        ev[0] += time.perf_counter() - t0
        return r
    m.evaluate = timed_evaluate       # fit calls model.evaluate: exclude its time
    t0 = time.perf_counter()
    h = mg.fit(m, Xt, yt, batch_size=B, epochs=max_epochs, optimizer=mg.SGD(lr=lr, momentum=0.9),
               validation=(Xv, yv), eval_every=every, target={"val_accuracy": target}, seed=seed)
    wall = time.perf_counter() - t0 - ev[0]
    return {"seed": seed, "reached": bool(h.reached), "steps": h.steps_to_target, "wall_s": wall,
            "step_time_s": h.time_to_target}


def _e2e_torch(torch, np, mg, Xt, yt, Xv, yv, B, lr, every, seed, target, max_epochs) -> dict:
    tm = _torch_mlp(torch, mg.MLP(E2E_SIZES, seed=seed))       # minigd's He-uniform init
    ce = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    opt = torch.optim.SGD(tm.parameters(), lr=lr, momentum=0.9)
    X_, y_ = torch.from_numpy(Xt), torch.from_numpy(yt)
    Xv_, yv_ = torch.from_numpy(Xv), torch.from_numpy(yv)
    n = len(Xt)
    rng = np.random.default_rng(seed)             # minigd's shuffle sampler, replayed
    order = np.arange(n, dtype=np.int64)
    per_epoch = -(-n // B)
    step, ev, reached = 0, 0.0, False
    for _ in range(max_epochs):
        rng.shuffle(order)
        src = torch.from_numpy(order)
        for k in range(per_epoch):
            idx = src[k * B:(k + 1) * B]
            xb, yb = X_[idx], y_[idx]
            opt.zero_grad(set_to_none=True)
            loss = ce(tm(xb), yb)
            loss.backward()
            opt.step()
            step += 1
            if step % every == 0:
                te = time.perf_counter()
                with torch.no_grad():
                    acc = (tm(Xv_).argmax(1) == yv_).float().mean().item()
                reached = acc >= target
                ev += time.perf_counter() - te
                if reached:
                    break
        if reached:
            break
    wall = time.perf_counter() - t0 - ev
    return {"seed": seed, "reached": reached, "steps": step if reached else None, "wall_s": wall}


# --------------------------------------------------------------------------- child driver
def _child(args) -> None:
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    wanted = set(args.peers.split(","))
    peers, status = {}, {}
    for name in PEERS:
        if name in ("cpu", "numpy"):
            if name in wanted:
                peers[name] = True
                status[name] = "minigd " + ("cpu (numba)" if name == "cpu" else "numpy reference")
            else:
                status[name] = "not requested (--peers)"
            continue
        mod, status[name] = _import_peer(name, wanted)
        if mod is not None:
            peers[name] = mod
    if "backpack" in peers and "torch" not in peers:
        peers.pop("backpack")
        status["backpack"] = "skipped (needs torch)"
    torch = peers.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    cfg = json.loads(args.config)
    gap = cfg["gap_s"] if threads > 1 else cfg["gap1_s"]
    MACHINE.budget = MACHINE.retime_budget = cfg["wait_budget_s"]
    out = {"threads": threads, "peers": status, "pinned": _pinned(torch)}
    sections = cfg["sections"]
    if "stats" in sections and threads == 1:
        import warnings
        warnings.filterwarnings("ignore", message="Full backward hook")     # BackPACK's hooks
        out["stats"] = measure_stats(cfg["models"], cfg["stats_batches"], peers, cfg["stats_rounds"],
                                     cfg["target_s"], cfg["gap1_s"])
    if args.child == "main":
        if "step" in sections or "gemm" in sections:
            gemm_min = cfg["gemm_min"] if "gemm" in sections else 10 ** 9
            batches = cfg["batches"] if "step" in sections else [b for b in cfg["batches"] if b >= gemm_min]
            out["step"], out["gemm"] = measure_step(cfg["models"], batches, peers, cfg["rounds"],
                                                    cfg["target_s"], gap, gemm_min, threads)
            if "step" not in sections:
                out.pop("step")
        if "gemm" in sections:
            out["square_gemm"] = measure_square_gemm(peers, cfg["rounds"], cfg["target_s"], gap, threads,
                                                     n=cfg["square_n"])
        if "e2e" in sections:
            out["e2e"] = measure_e2e(cfg["e2e_batches"], cfg["e2e_seeds"], peers, threads,
                                     target=cfg["e2e_target"], max_epochs=cfg["e2e_max_epochs"], gap_s=gap)
    out["pinned_after"] = _pinned(torch)
    if torch is not None:
        out["torch_info"] = _torch_info(torch)
    out["machine_load"] = MACHINE.summary()
    print(json.dumps(out))


# =========================================================================== parent side
def _run_child(kind: str, config: dict, peers: str, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--config", json.dumps(config),
           "--peers", peers]
    out = subprocess.run(cmd, env=_thread_env(threads), stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child ({kind}, {threads} thread(s)) failed with exit code {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpu": cpu_model(), "logical_cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
        flags = next((ln for ln in txt.splitlines() if ln.startswith("flags")), "")
        info["simd"] = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
                                if f" {f}" in flags)
    except OSError:
        pass
    try:
        import numba
        import numpy as np
        info["numpy"] = np.__version__
        info["numba"] = numba.__version__
        blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
        info["numpy_blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # pragma: no cover
        pass
    try:
        root = os.path.dirname(HERE)
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "minigd", "kernels"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            info["minigd_commit"] = head.stdout.strip() + (" (+ uncommitted changes in minigd/kernels)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import scipy
        info["scipy"] = scipy.__version__
        blas = scipy.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
        info["scipy_blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:
        info["scipy"] = "missing (minigd's cpu backend then drives BLAS from Python)"
    return info


def _torch_info(torch) -> dict:
    """Version and build configuration of torch (read in a benchmark subprocess)."""
    return {"version": torch.__version__, "config": torch.__config__.show(),
            "parallel": torch.__config__.parallel_info()}


def _torch_build_summary(cfg: str) -> str:
    keep = []
    for line in cfg.splitlines():
        s = line.strip(" -")
        if s.startswith(("Intel(R) oneAPI Math Kernel", "Intel(R) MKL-DNN", "OpenMP", "CPU capability", "GCC")):
            keep.append(s)
        if s.startswith("Build settings"):
            for kv in s.split(", "):
                if kv.startswith(("BLAS_INFO", "USE_MKLDNN", "USE_OPENMP", "USE_CUDA")):
                    keep.append(kv.split(": ")[-1])
    return "; ".join(keep)


def targets(result: dict) -> list:
    """The issue's targets, each with its measured value and whether it is met."""
    out = []
    runs = {r["threads"]: r for r in result["runs"]}
    step1 = {(r["model"], r["batch"]): r for r in runs.get(1, {}).get("step", [])}
    for model, B, bound in STEP_TARGETS:
        r = step1.get((model, B), {})
        v = r.get("torch_over_minigd")
        out.append({"target": f"{model}, 1 thread, B={B}: PyTorch/minigd >= {bound}x",
                    "measured": None if v is None else f"{v:.2f}x", "met": None if v is None else v >= bound})
    if 2 in runs and runs[2].get("step"):
        vals = [(r["model"], r["batch"], r.get("torch_over_minigd")) for r in runs[2]["step"]]
        vals = [v for v in vals if v[2] is not None]
        if vals:
            worst = min(vals, key=lambda v: v[2])
            behind = [f"{m} B={b} ({x:.2f}x)" for m, b, x in vals if x <= 1.0]
            out.append({"target": "2 threads: minigd ahead of PyTorch at every batch size",
                        "measured": f"lowest PyTorch/minigd {worst[2]:.2f}x ({worst[0]} B={worst[1]})"
                                    + (f"; behind at {', '.join(behind)}" if behind else ""),
                        "met": not behind})
    st = result.get("stats") or []
    for key, bound, label in (("minigd_norms_x", NORMS_TARGET, "per-example norms"),
                              ("minigd_moments_x", MOMENTS_TARGET, "gradient moments")):
        vals = [(r["model"], r["batch"], r[key]) for r in st if key in r]
        if vals:
            worst = max(vals, key=lambda v: v[2])
            out.append({"target": f"minigd {label} <= {bound}x a plain forward+backward (1 thread, all B)",
                        "measured": f"worst {worst[2]:.2f}x ({worst[0]} B={worst[1]})",
                        "met": worst[2] <= bound})
    for t, run in sorted(runs.items()):
        vals = [(g["model"], g["batch"], g["minigd_fraction_of_gemm"]) for g in run.get("gemm", [])
                if "minigd_fraction_of_gemm" in g]
        if vals:
            worst = min(vals, key=lambda v: v[2])
            out.append({"target": f"minigd step >= {GEMM_TARGET:.0%} of GEMM peak at B >= {GEMM_MIN_BATCH}, {t} thread(s)",
                        "measured": f"lowest {worst[2]:.0%} ({worst[0]} B={worst[1]})",
                        "met": worst[2] >= GEMM_TARGET})
    return out


def _f(v, fmt="{:.1f}", missing="missing") -> str:
    return missing if v is None else fmt.format(v)


def to_markdown(result: dict) -> str:
    mi = result["machine"]
    ti = result.get("torch") or {}
    L = ["# minigd against its peers (bench/peers.py)", "",
         f"Machine: {mi.get('cpu')} ({mi.get('logical_cpus')} logical CPUs; {mi.get('simd')}); {mi.get('platform')}; "
         f"Python {mi.get('python')}.", "",
         f"- minigd{(' ' + mi['minigd_commit']) if mi.get('minigd_commit') else ''}: numba {mi.get('numba')}; numpy {mi.get('numpy')} ({mi.get('numpy_blas')}); "
         f"scipy {mi.get('scipy')} ({mi.get('scipy_blas', '-')}; the BLAS minigd's compiled step calls)",
         f"- PyTorch: {ti.get('version') or 'missing'}" + (f" ({_torch_build_summary(ti.get('config', ''))})" if ti.get('version') else ""),
         "- peers: " + "; ".join(f"{k}: {v}" for k, v in result["peers"].items()),
         f"- method: {result['config']['rounds']} interleaved rounds ({result['config'].get('stats_rounds')} for the "
         f"per-example statistics) of ~{result['config']['target_s'] * 1e3:.0f} ms per peer and cell, medians (of the rounds not slowed by other processes, when at least 3 are "
         "left); thread counts pinned per subprocess (see below); "
         f"{result['elapsed_s']:.0f} s in all.", ""]
    L += ["## Targets (issue 7)", "", "| target | measured | met |", "|---|---|---|"]
    for t in result["targets"]:
        L.append(f"| {t['target']} | {t['measured'] or 'missing'} | "
                 f"{'n/a' if t['met'] is None else ('yes' if t['met'] else '**no**')} |")
    L.append("")
    for run in result["runs"]:
        t = run["threads"]
        p = run["pinned"]
        pools = p.get("threadpools")
        pools = ", ".join(f"{q['internal_api']} {q.get('version') or ''} ({q['filepath']}): {q['num_threads']}"
                          for q in pools) if isinstance(pools, list) else str(pools)
        ml = run.get("machine_load", {})
        L += [f"## {t} thread(s)", "",
              f"Pinned: numba {p.get('numba')}, torch {p.get('torch', '-')}, {pools}.", "",
              f"Other processes: {ml.get('blocks', 0)} timed blocks, {ml.get('retimed', 0)} re-timings because "
              f"other processes were busy, {ml.get('contended', 0)} still contended; "
              f"{ml.get('waited_s', 0)} s spent waiting for a quiet machine.", ""]
        if run.get("step"):
            L += ["### Training step (µs per step; gather + forward + softmax-CE + backward + SGD update)", "",
                  "| model | B | minigd | numpy ref | PyTorch | sklearn | PyTorch/minigd | (best rounds) | sklearn/minigd | minigd samples/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in run["step"]:
                L.append(f"| {r['model']} | {r['batch']}{' †' if r.get('noisy') else ''} | {_f(r.get('minigd_us'))} | {_f(r.get('numpy_us'))} | "
                         f"{_f(r.get('torch_us'))} | {_f(r.get('sklearn_us'))} | "
                         f"{_f(r.get('torch_over_minigd'), '{:.2f}x')} | {_f(r.get('torch_over_minigd_best'), '{:.2f}x')} | "
                         f"{_f(r.get('sklearn_over_minigd'), '{:.2f}x')} | "
                         f"{_f(r['batch'] / r['minigd_us'] * 1e6 if r.get('minigd_us') else None, '{:,.0f}')} |")
            if any(r.get("noisy") for r in run["step"]):
                L += ["", f"† the rounds of at least one peer in this cell spread by more than {NOISY_IQR:.0%} "
                      "(interquartile range / median): machine noise; the per-round times are in peers.json. "
                      "`(best rounds)`: the same ratio from each peer's fastest round."]
            L.append("")
        if run.get("gemm"):
            sq = run.get("square_gemm", {})
            L += ["### GEMM peak (GFLOP/s on the GEMMs a step computes)", "",
                  f"Square 1024^3 sgemm: numpy {_f(sq.get('numpy_gflops'))}, torch {_f(sq.get('torch_gflops'))} GFLOP/s.", "",
                  "| model | B | GFLOP/step | numpy GEMM chain | torch.mm chain | minigd step | PyTorch step | minigd / numpy GEMM | PyTorch / numpy GEMM |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for g in run["gemm"]:
                L.append(f"| {g['model']} | {g['batch']} | {g['flops'] / 1e9:.3f} | {g['gemm_chain_gflops']:.1f} | "
                         f"{_f(g.get('gemm_torch_chain_gflops'))} | {_f(g.get('minigd_gflops'))} | "
                         f"{_f(g.get('torch_gflops'))} | {_f(g.get('minigd_fraction_of_gemm'), '{:.0%}')} | "
                         f"{_f(g.get('torch_fraction_of_gemm'), '{:.0%}')} |")
            L.append("")
        e2e = run.get("e2e")
        if e2e:
            if "skipped" in e2e[0]:
                L += ["### End to end", "", f"Skipped: {e2e[0]['skipped']}.", ""]
            else:
                L += [f"### End to end: wall time to {E2E_TARGET:.0%} validation accuracy (digits, MLP "
                      f"{_name(E2E_SIZES)}, SGD momentum 0.9, evaluation excluded)", "",
                      "| B | lr | eval every | minigd s | steps | PyTorch s | steps | PyTorch/minigd | reached (minigd, PyTorch) |",
                      "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
                for r in e2e:
                    L.append(f"| {r['batch']} | {r['lr']} | {r['eval_every']} | {_f(r.get('minigd_s'), '{:.4f}')} | "
                             f"{_f(r.get('minigd_steps'), '{:.0f}')} | {_f(r.get('torch_s'), '{:.4f}')} | "
                             f"{_f(r.get('torch_steps'), '{:.0f}')} | {_f(r.get('torch_over_minigd'), '{:.1f}x')} | "
                             f"{r.get('minigd_reached', '-')}, {r.get('torch_reached', '-')} |")
                L.append("")
    st = result.get("stats")
    if st:
        L += ["## Per-example statistics (1 thread; ratio to the same framework's plain forward + backward)", "",
              "minigd: kernel level (`loss_grad(want_sqn=True)`, `moments_update`) and public API "
              "(`per_example_grad_norms`, `grad_moments` vs `loss_and_grad`). torch.func: "
              "`vmap(grad)` per-sample gradients, then norms / mean+variance. BackPACK: "
              "`BatchL2Grad` / `Variance`.", "",
              "| model | B | minigd plain µs | norms | moments | API norms | API moments | PyTorch plain µs | torch.func norms | torch.func moments | BackPACK norms | BackPACK variance |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        x = lambda r, k: _f(r.get(k), "{:.2f}x")  # noqa: E731
        for r in st:
            L.append(f"| {r['model']} | {r['batch']} | {_f(r.get('mg_plain_us'))} | {x(r, 'minigd_norms_x')} | "
                     f"{x(r, 'minigd_moments_x')} | {x(r, 'minigd_api_norms_x')} | {x(r, 'minigd_api_moments_x')} | "
                     f"{_f(r.get('t_plain_us'))} | {x(r, 'torchfunc_norms_x')} | {x(r, 'torchfunc_moments_x')} | "
                     f"{x(r, 'backpack_norms_x')} | {x(r, 'backpack_moments_x')} |")
        L.append("")
    return "\n".join(L)


def _legend(a, **kw) -> None:
    if a.get_legend_handles_labels()[0]:
        a.legend(**kw)


def _batch_axis(a, batches) -> None:
    a.set_xscale("log")
    if batches:
        a.set_xticks(sorted(set(batches)), [str(b) for b in sorted(set(batches))])
        a.minorticks_off()


def plot(result: dict, path: str) -> None:
    """peers.png: six panels (step time per example per model, speed-up over PyTorch,
    per-example statistics, end to end, GEMM throughput)."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 3, figsize=(16, 9.5))
    colors = {"minigd": "C0", "numpy": "C7", "torch": "C3", "sklearn": "C2"}
    labels = {"minigd": "minigd cpu", "numpy": "minigd numpy ref", "torch": "PyTorch eager", "sklearn": "sklearn MLP"}
    styles = {1: "-", 2: "--"}
    steps = [r for run in result["runs"] for r in run.get("step", [])]
    batches = sorted({r["batch"] for r in steps})
    models = sorted({r["model"] for r in steps}, key=lambda m: [int(x) for x in m.split("-")])
    for j in range(2):
        a = ax[0, j]
        if j >= len(models):
            a.axis("off")
            continue
        model = models[j]
        for run in result["runs"]:
            rows = [r for r in run.get("step", []) if r["model"] == model]
            for peer in colors:
                pts = [(r["batch"], r[f"{peer}_us"] / r["batch"]) for r in rows if f"{peer}_us" in r]
                if pts:
                    a.plot(*zip(*pts), styles.get(run["threads"], ":"), color=colors[peer], marker="o", ms=3,
                           label=f"{labels[peer]}, {run['threads']}T")
        a.set(yscale="log", xlabel="batch size", ylabel="µs per example (lower is better)",
              title=f"training step, MLP {model}")
        _batch_axis(a, batches)
        _legend(a, fontsize=7)
    a = ax[0, 2]
    for run in result["runs"]:
        for k, model in enumerate(models):
            pts = [(r["batch"], r["torch_over_minigd"]) for r in run.get("step", [])
                   if r["model"] == model and "torch_over_minigd" in r]
            if pts:
                a.plot(*zip(*pts), styles.get(run["threads"], ":"), color=f"C{k}", marker="o", ms=3,
                       label=f"{model}, {run['threads']}T")
    for k, model in enumerate(models):
        tg = [(B, b) for m, B, b in STEP_TARGETS if m == model]
        if tg:
            a.plot(*zip(*tg), "v", color=f"C{k}", ms=9, mfc="none", label=f"target {model}, 1T")
    a.axhline(1.0, color="k", lw=0.8)
    a.set(yscale="log", xlabel="batch size", ylabel="PyTorch time / minigd time",
          title="speed-up over PyTorch eager (> 1: minigd faster)")
    _batch_axis(a, batches)
    _legend(a, fontsize=7)

    a = ax[1, 0]
    st = result.get("stats") or []
    series = (("minigd_norms_x", "minigd norms", "C0", "-"), ("minigd_moments_x", "minigd moments", "C0", "--"),
              ("torchfunc_norms_x", "torch.func norms", "C3", "-"),
              ("torchfunc_moments_x", "torch.func moments", "C3", "--"),
              ("backpack_norms_x", "BackPACK BatchL2Grad", "C1", "-"),
              ("backpack_moments_x", "BackPACK Variance", "C1", "--"))
    smodels = sorted({r["model"] for r in st}, key=lambda m: [int(x) for x in m.split("-")])
    for k, model in enumerate(smodels):
        for key, lab, c, ls in series:
            pts = [(r["batch"], r[key]) for r in st if r["model"] == model and key in r]
            if pts:
                a.plot(*zip(*pts), ls, color=c, marker="os"[k % 2], ms=4, label=lab if k == 0 else None)
    if st:
        a.axhline(NORMS_TARGET, color="k", lw=0.6, ls=":")
        a.axhline(MOMENTS_TARGET, color="k", lw=0.6, ls="-.")
        a.set(yscale="log", xlabel="batch size", ylabel="× plain forward+backward (same framework)",
              title="per-example statistics, 1 thread (targets: 1.1x, 1.5x)\n"
                    + ", ".join(f"{'●■'[k % 2]} {m}" for k, m in enumerate(smodels)))
        _batch_axis(a, [r["batch"] for r in st])
        _legend(a, fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    else:
        a.axis("off")

    a = ax[1, 1]
    width = 0.2
    bars = [(run["threads"], fw, c) for run in result["runs"] if any("batch" in r for r in run.get("e2e", []))
            for fw, c in (("minigd", "C0"), ("torch", "C3"))]
    e2e_b = sorted({r["batch"] for run in result["runs"] for r in run.get("e2e", []) if "batch" in r})
    for i, (t, fw, c) in enumerate(bars):
        rows = {r["batch"]: r for run in result["runs"] if run["threads"] == t for r in run.get("e2e", []) if "batch" in r}
        ys = [rows.get(b, {}).get(f"{fw}_s", float("nan")) for b in e2e_b]
        a.bar([x + (i - (len(bars) - 1) / 2) * width for x in range(len(e2e_b))], ys, width, color=c,
              alpha=1.0 if t == 1 else 0.45, label=f"{labels[fw]}, {t}T")
    if bars:
        a.set_xticks(range(len(e2e_b)), [str(b) for b in e2e_b])
        a.set(yscale="log", xlabel="batch size", ylabel="seconds (evaluation excluded)",
              title=f"time to {E2E_TARGET:.0%} validation accuracy, digits, MLP {_name(E2E_SIZES)}")
        _legend(a, fontsize=7)
    else:
        a.axis("off")

    a = ax[1, 2]
    rowsg = [(run["threads"], g) for run in result["runs"] for g in run.get("gemm", [])]
    if rowsg:
        xs = range(len(rowsg))
        for i, (key, lab, c) in enumerate((("gemm_chain_gflops", "numpy GEMM chain (peak)", "C7"),
                                           ("gemm_torch_chain_gflops", "torch.mm chain (MKL)", "C5"),
                                           ("minigd_gflops", "minigd step", "C0"),
                                           ("torch_gflops", "PyTorch step", "C3"))):
            a.bar([x + (i - 1.5) * width for x in xs], [g.get(key, float("nan")) for _, g in rowsg], width,
                  color=c, label=lab)
        a.set_xticks(list(xs), [f"{g['model']}\nB={g['batch']}, {t}T" for t, g in rowsg], fontsize=6,
                     rotation=35, ha="right")
        a.set(ylabel="GFLOP/s (GEMM FLOPs of one step)", title="GEMM throughput at large batches")
        _legend(a, fontsize=7)
    else:
        a.axis("off")
    mi = result["machine"]
    fig.suptitle(f"minigd vs peers — {mi.get('cpu')}, {mi.get('logical_cpus')} CPUs, float32; "
                 "solid: 1 thread, dashed: 2 threads", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _atomic_write(path, buf.getvalue())


def _plot_if_possible(result: dict, path: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _log("matplotlib is not installed: no peers.png (pip install matplotlib)")
        return
    plot(result, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (smoke test)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    p.add_argument("--peers", default=",".join(PEERS), help=f"subset of {','.join(PEERS)} (default all)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--target", type=float, default=0.03, help="seconds per peer per round")
    p.add_argument("--gap", type=float, default=0.2,
                   help="seconds of pause before each timed block with > 1 thread, so that idle thread pools "
                        "go to sleep (half of it with 1 thread); longer while other processes are busy")
    p.add_argument("--wait-budget", type=float, default=60.0,
                   help="seconds per subprocess it may wait for other processes to go quiet "
                        "(and, separately, spend re-timing contended blocks)")
    p.add_argument("--seeds", type=int, default=5, help="end-to-end runs per batch size")
    p.add_argument("--out", default=None,
                   help="directory for peers.md/.json/.png (default bench/results, or nothing with --quick; '' = don't write)")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="only rebuild peers.md / peers.png (in --out, default the JSON's folder) from a saved peers.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return {}
    if args.render:
        with open(args.render) as f:
            result = json.load(f)
        out_dir = args.out if args.out is not None else os.path.dirname(os.path.abspath(args.render))
        md = to_markdown(result)
        print(md)
        if out_dir:
            _atomic_write(os.path.join(out_dir, "peers.md"), md)
            _plot_if_possible(result, os.path.join(out_dir, "peers.png"))
        return result
    t_start = time.perf_counter()
    sections = [s for s in args.sections.split(",") if s]
    bad = set(sections) - set(SECTIONS)
    if bad:
        p.error(f"--sections: unknown {sorted(bad)}; choose from {SECTIONS}")
    bad = set(args.peers.split(",")) - set(PEERS)
    if bad:
        p.error(f"--peers: unknown {sorted(bad)}; choose from {PEERS}")
    if args.quick:
        config = {"models": [[4, 3, 2]], "batches": [1, 8], "stats_batches": [8], "gemm_min": 8,
                  "rounds": 1, "stats_rounds": 1, "target_s": 0.001, "gap_s": 0.0, "gap1_s": 0.0, "wait_budget_s": 0.0,
                  "square_n": 64,
                  "e2e_batches": [32], "e2e_seeds": [0], "e2e_target": 0.5, "e2e_max_epochs": 3}
    else:
        config = {"models": [list(m) for m in MODELS], "batches": list(BATCHES),
                  "stats_batches": list(STATS_BATCHES), "gemm_min": GEMM_MIN_BATCH,
                  "rounds": args.rounds, "target_s": args.target, "gap_s": args.gap, "gap1_s": args.gap / 2,
                  "wait_budget_s": args.wait_budget, "square_n": 1024,
                  "stats_rounds": max(1, min(args.rounds, 5)),
                  "e2e_batches": sorted(E2E_LR), "e2e_seeds": list(range(args.seeds)),
                  "e2e_target": E2E_TARGET, "e2e_max_epochs": 200}
    config["sections"] = sections
    result = {"machine": machine(), "torch": {},
              "config": config, "runs": []}
    main_sections = [s for s in sections if s != "stats"]
    thread_counts = [int(t) for t in args.threads.split(",")]
    if main_sections:
        for threads in thread_counts:
            run = _run_child("main", config, args.peers, threads)
            if "stats" in run:                  # per-example statistics ran in the 1-thread child
                result["stats"] = run.pop("stats")
            result["runs"].append(run)
    if "stats" in sections and "stats" not in result:
        run = _run_child("stats", config, args.peers, 1)
        result["stats"] = run.pop("stats")
        result["stats_run"] = run
    first = (result["runs"] or [result.get("stats_run", {})])[0]
    result["peers"] = first.get("peers", {})
    result["torch"] = first.pop("torch_info", {})
    for run in result["runs"]:
        run.pop("torch_info", None)
    result["targets"] = targets(result)
    result["elapsed_s"] = time.perf_counter() - t_start
    md = to_markdown(result)
    print(md)
    out_dir = args.out if args.out is not None else ("" if args.quick else RESULTS)
    if out_dir:
        args.out = out_dir
        _atomic_write(os.path.join(args.out, "peers.json"), json.dumps(result, indent=1))
        _atomic_write(os.path.join(args.out, "peers.md"), md)
        _plot_if_possible(result, os.path.join(args.out, "peers.png"))
    return result


if __name__ == "__main__":
    main()
