"""Cost of per-example gradient statistics relative to a plain step, on the cpu backend.

Usage::

    python bench/gradstats.py            # full table, writes bench/results/gradstats.{md,json}
    python bench/gradstats.py --quick    # tiny sizes, one round (smoke test)

Single thread: NUMBA_NUM_THREADS / OPENBLAS_NUM_THREADS / OMP_NUM_THREADS /
MKL_NUM_THREADS default to 1 (set before numpy is imported; pass other values in the
environment to override).  MLPs 64-128-128-10 and 784-256-256-10, float32 and float64,
ReLU, softmax cross-entropy, Gaussian inputs (dense: no zero inputs to skip), batch sizes
8, 32, 128, 512.

Operations, each on the same batch and backend (all after a warm-up call):

``plain``
    ``backend.loss_grad``: gather + forward + loss + backward -> the batch gradient.
``norms``
    the same with ``want_sqn=True``: per-example gradient norms fused into the backward
    pass (what ``per_example_grad_norms`` and ``fit(track_noise=k)`` use).  Target <= 1.10x.
``moments``
    ``backend.moments_update`` as ``grad_moments`` calls it by default (one chunk at chunk
    size B): the plain step plus each parameter's M2 over the batch's per-example
    gradients and the Chan merge into float64 running moments.  Target <= 1.8x (issue 20).
    Measured side by side in the same rounds:
``moments two-pass`` (``exact=True``)
    the exact two-pass M2 in the model dtype, two fused multiply-adds per example and
    weight (the float32 default until the blocked form, ``moments_update_blocked``: the
    same sweep with its float32 sums, in groups of rows, added into float64 every 32 rows
    and a guard against the float32 centre's rounding).
``moments shortcut`` (``exact=False``)
    the guarded float64 shortcut: one float64 GEMM of squared factors per layer, the
    two-pass form only where the guard finds cancellation (the default for float64
    models; float32 models also need the mean's sum in float64, a second GEMM).
``moments (one-pass)``
    the opt-in one-pass form (``moments_update_onepass``; the backend's ``moments_onepass``)
    for float32 chunks of at least 512 rows where the tiles built (elsewhere the same as
    ``moments``): faster, but its rounding bound is statistical and duplicated rows break
    it, so the default is the blocked two-pass form at every chunk size.
``moments (loops)``
    the default with the float32 sweep by numba loops (``_sq_dev``) instead of the
    register-blocked tiles (``_sq_dev_tiled``, ``kernels/_tiles.py``) that it uses on CPUs
    with AVX-512 at B >= 16 (for float64 models and elsewhere the same as ``moments``).
``per-example``
    ``backend.per_example_grads`` into a preallocated (B, P) array (memory-bound: it
    writes B * P numbers).
``train_step(want_sqn)``
    the backend's training step with the per-example norms and the batch gradient's norm
    (the kernel side of tracking), relative to a plain ``train_step`` (SGD with momentum).
``tracked step``
    ``fit``'s per-step work with ``track_noise=1``: ``train_step(want_sqn=True)`` plus the
    tracker's bookkeeping (about 1.5 us), relative to a plain ``train_step``.  Target
    <= 1.10x at B = 32..256.

Where ``moments`` can go: the exact two-pass M2 forms every deviation
``a_ri * (B d_rj) - mean_ij`` before squaring it, two fused multiply-adds per example and
weight, with no reuse that BLAS could block for; the numba kernel runs near the FMA peak.
The shortcut replaces them by one float64 GEMM, ``(A*A)^T (X*X)``, guarded against the
cancellation of ``S2 - S1^2/B`` (see ``minigd.kernels.cpu_stats.moments_update_shortcut``).
On x86 SIMD one float64 FMA costs two float32 ones, so for a float64 model the shortcut
halves the M2 work, while for a float32 model the GEMM costs what the two float32 FMAs it
replaces cost (and the float64 sum of the mean needs a second GEMM): the two-pass form
stays the float32 default.  Its two FMAs per example and weight, at the rate of the step's
own sgemm (which the tiles reach on AVX-512; the numba loops run at half of it there), cost
2 / 2.25 of a plain step for 784-256-256-10 (whose step is 2.25 FMAs per example and
weight) and 2 / 2.68 for 64-128-128-10, so float32 moments are bounded near 1.9x and
1.75x plus the per-weight passes.  At small B the float64 Chan merge (one pass over 2P
float64 state per chunk) dominates; ``grad_moments`` uses 2048-row chunks.  Before/after
figures: bench/results/gradstats_issue20.md.

Every operation of a (model, batch) pair runs in interleaved rounds; per round each ratio
to ``plain`` (or to the plain train step) is taken, and the median over rounds is
reported, so machine noise hits numerator and denominator alike.
"""

from __future__ import annotations

import os

for _k in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_k, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import _common  # noqa: E402
import numpy as np  # noqa: E402
from _common import atomic_write, synthetic_data  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
MODELS = ([64, 128, 128, 10], [784, 256, 256, 10])
DTYPES = ("float32", "float64")
BATCHES = (8, 32, 128, 512)
OPS = (
    "plain",
    "norms",
    "moments",
    "moments-exact",
    "moments-shortcut",
    "moments-loops",
    "moments-onepass",
    "per-example",
    "train",
    "train-sqn",
    "tracked",
)


def _runners(sizes, B, X, y, dtype="float32"):
    import minigd as mg
    from minigd.gradstats.tracking import NoiseTracker
    from minigd.kernels.cpu_stats import sum64

    m = mg.MLP(sizes, dtype=dtype, backend="cpu", seed=0)
    Xc, yi, yf = m.check_Xy(X.astype(dtype), y)
    impl = m.backend_impl
    impl.reserve(B)
    idx = np.random.default_rng(1).permutation(len(X))[:B].astype(np.int64)
    P = m.n_params
    g = np.zeros(P, dtype)
    mean = np.zeros(P)
    m2 = np.zeros(P)
    out = None  # (B, P): allocated by the per-example operation's first call only
    opt = mg.SGD(lr=0.0, momentum=0.9).init(m.params)  # lr 0: parameters stay put
    tracker = NoiseTracker(len(X))
    params, grad = m.params, m._grad

    def plain():
        impl.loss_grad(params, g, Xc, yi, yf, idx, B)

    def norms():
        impl.loss_grad(params, g, Xc, yi, yf, idx, B, want_sqn=True)

    def moments():
        impl.moments_update(params, g, Xc, yi, yf, idx, B, 1000, mean, m2)

    def moments_exact():
        impl.moments_update(params, g, Xc, yi, yf, idx, B, 1000, mean, m2, exact=True)

    def moments_shortcut():
        impl.moments_update(params, g, Xc, yi, yf, idx, B, 1000, mean, m2, exact=False)

    tiles = impl.moments_tiles

    def moments_loops():  # the default with the sweep by numba loops (``_sq_dev``), not the tiles
        impl.moments_tiles = False
        try:
            impl.moments_update(params, g, Xc, yi, yf, idx, B, 1000, mean, m2)
        finally:
            impl.moments_tiles = tiles

    onepass = impl.moments_onepass

    def moments_onepass():  # the opt-in one-pass form (float32 chunks >= 512 rows)
        impl.moments_onepass = True
        try:
            impl.moments_update(params, g, Xc, yi, yf, idx, B, 1000, mean, m2)
        finally:
            impl.moments_onepass = onepass

    def per_example():
        nonlocal out
        if out is None:
            out = np.empty((B, P), dtype)
        impl.per_example_grads(params, Xc, yi, yf, idx, B, out)

    def train():
        impl.train_step(params, grad, Xc, yi, yf, idx, B, opt, 0.0, 1)

    def train_sqn():
        impl.train_step(params, grad, Xc, yi, yf, idx, B, opt, 0.0, 1, True)

    def tracked():
        _, ok, gsq = impl.train_step(params, grad, Xc, yi, yf, idx, B, opt, 0.0, 1, True)
        if ok:
            tracker.update(0, B, sum64(impl.last_sqnorms(B)), gsq)

    return (
        {
            "plain": plain,
            "norms": norms,
            "moments": moments,
            "moments-exact": moments_exact,
            "moments-shortcut": moments_shortcut,
            "moments-loops": moments_loops,
            "moments-onepass": moments_onepass,
            "per-example": per_example,
            "train": train,
            "train-sqn": train_sqn,
            "tracked": tracked,
        },
        impl.use_blas(B),
        P,
    )


#: the clock of every timing: wall time, or with ``--clock cpu`` this thread's CPU time (on
#: a machine shared with other work the time this process spends descheduled is left out)
_CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = _CLOCK["wall"]


def _time(fn, k):
    t0 = _clock()
    for _ in range(k):
        fn()
    return (_clock() - t0) / k


def measure(models, batches, rounds: int, target_s: float, dtypes=DTYPES, ops=OPS) -> list:
    rng = np.random.default_rng(0)
    rows = []
    for dtype, sizes in [(d, s) for d in dtypes for s in models]:
        n = max(2 * max(batches), 1024)
        X, y = synthetic_data(rng, sizes, n)
        for B in batches:
            fns, blas, P = _runners(sizes, B, X, y, dtype)
            fns = {op: fn for op, fn in fns.items() if op in ops or op in ("plain", "train")}
            reps = {}
            for op, fn in fns.items():
                fn()
                fn()  # warm-up: JIT / caches / first-touch of buffers
                per = _time(fn, 2)
                reps[op] = max(1, int(target_s / max(per, 1e-7)))
            samples = {op: [] for op in fns}
            for _ in range(rounds):
                for op, fn in fns.items():
                    samples[op].append(_time(fn, reps[op]))
            s = {op: np.asarray(v) for op, v in samples.items()}
            row = {
                "model": "-".join(map(str, sizes)),
                "batch": B,
                "dtype": dtype,
                "P": P,
                "path": "blas" if blas else "loops",
                "plain_us": float(np.median(s["plain"]) * 1e6),
                "train_us": float(np.median(s["train"]) * 1e6),
            }
            for op in OPS:  # (relative to the plain step; the step's variants below)
                if op in ("plain", "train", "train-sqn", "tracked"):
                    continue
                if op in s:
                    row[f"{op}_x"] = float(np.median(s[op] / s["plain"]))
            for op in ("train-sqn", "tracked"):
                if op in s:
                    row[f"{op}_x"] = float(np.median(s[op] / s["train"]))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def machine() -> dict:
    """The shared machine description, with the thread counts this process runs on."""
    return dict(
        _common.machine(), threads={k: os.environ.get(k) for k in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    )


def _x(row: dict, op: str) -> str:
    """A ratio cell: ``1.23x``, or ``-`` for an operation not measured (``--ops``)."""
    v = row.get(f"{op}_x")
    return "-" if v is None else f"{v:.2f}x"


def to_markdown(result: dict) -> str:
    mi = result["machine"]
    lines = [
        "# Gradient-statistics benchmark (bench/gradstats.py)",
        "",
        *(
            [
                f"Run {result['date']}, timed by {result.get('clock', 'wall')} clock"
                + (
                    " (this thread's CPU time: the machine was shared with other work)"
                    if result.get("clock") == "cpu"
                    else ""
                )
                + "."
            ]
            if result.get("date")
            else []
        ),
        f"Machine: {mi.get('cpu')}; numpy {mi.get('numpy')}, numba {mi.get('numba')}, "
        f"Python {mi.get('python')}; threads {mi.get('threads')}.",
        "",
        "cpu backend, ReLU, softmax cross-entropy, Gaussian inputs. Ratios are "
        "medians over interleaved rounds of (operation time / plain step time), the "
        "plain step being forward + backward (`loss_grad`) on the same batch and dtype; "
        "`train_step(want_sqn)` and `tracked` (that plus the tracker's "
        "bookkeeping: `fit`'s per-step work with `track_noise=1`) are relative to a plain "
        "`train_step` (SGD, momentum). `moments` is `grad_moments`' default (the float64 "
        "shortcut for float64 models; for float32 ones the blocked two-pass form; the opt-in "
        "one-pass form, from 512 rows where the tiles built, is timed as `moments (one-pass)`); `two-pass` "
        "(`exact=True`: the plain two-pass form) and `shortcut` "
        "(`exact=False`) are measured in the same rounds, and `moments (loops)`: the float32 "
        "default with its sweep by numba loops (`_sq_dev`) instead of the register-blocked "
        "tiles (`_sq_dev_tiled`, used on CPUs with AVX-512). Targets: norms <= 1.10, moments "
        "<= 1.8, tracked <= 1.10 at B = 32..256. (What bounds moments: see the module "
        "docstring; the kernel before and after issue 20 side by side: "
        "gradstats_issue20.md.)",
        "",
        "| model | B | dtype | path | plain µs | norms | moments | moments two-pass | moments shortcut | moments (loops) | moments (one-pass) | per-example grads | train µs | train_step(want_sqn) | tracked step |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r.get('dtype', 'float32')} | {r['path']} | "
            f"{r['plain_us']:.1f} | {_x(r, 'norms')} | {_x(r, 'moments')} | "
            f"{_x(r, 'moments-exact')} | {_x(r, 'moments-shortcut')} | "
            f"{_x(r, 'moments-loops')} | {_x(r, 'moments-onepass')} | {_x(r, 'per-example')} | "
            f"{r['train_us']:.1f} | {_x(r, 'train-sqn')} | {_x(r, 'tracked')} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (smoke test)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--target", type=float, default=0.03, help="seconds per operation per round")
    p.add_argument(
        "--clock",
        choices=sorted(_CLOCK),
        default="wall",
        help="wall time, or this thread's CPU time (on a machine shared with other work)",
    )
    p.add_argument("--out", default=RESULTS, help="directory for gradstats.md/.json ('' = don't write)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of model dtypes")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma list of batch sizes")
    p.add_argument(
        "--ops",
        default=",".join(OPS),
        help=f"comma list of the operations to time (plain and train always are): {', '.join(OPS)}",
    )
    args = p.parse_args(argv)
    global _clock
    _clock = _CLOCK[args.clock]
    dtypes = [d for d in args.dtypes.split(",") if d]
    ops = tuple(o for o in args.ops.split(",") if o)
    bad = sorted(set(ops) - set(OPS))
    if bad:
        p.error(f"--ops: expected names among {', '.join(OPS)}, got {', '.join(bad)}")
    if args.quick:
        models, batches, rounds, target = [[4, 3, 2]], [1, 8], 1, 0.001
    else:
        batches = [int(b) for b in args.batches.split(",") if b]
        models, rounds, target = [list(m) for m in MODELS], args.rounds, args.target
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "clock": args.clock,
        "machine": machine(),
        "rows": measure(models, batches, rounds, target, dtypes, ops),
    }
    md = to_markdown(result)
    print(md)
    if args.out and not args.quick:
        atomic_write(os.path.join(args.out, "gradstats.json"), json.dumps(result, indent=1))
        atomic_write(os.path.join(args.out, "gradstats.md"), md)
    return result


if __name__ == "__main__":
    main()
