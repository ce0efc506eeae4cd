"""Where should the cpu backend switch from hand-written loops to BLAS?

Times one ``train_step`` (float32, ReLU, softmax-CE, SGD) on the loop path and on the BLAS
path (compiled with SciPy, and Python-driven without) for a few widths and small batch
sizes, interleaved, medians; prints the table and the smallest batch size at which BLAS
wins.  ``CpuBackend.default_blas_min_batch`` encodes the result.

    OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/crossover.py
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

import minigd as mg
from minigd._io import atomic_write_text

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

WIDTHS = (32, 64, 128, 256, 512)
#: besides [64, w, w, 10]: the 784-input bench MLP and one wide single hidden layer
EXTRA = ([784, 256, 256, 10], [784, 1024, 10])
BATCHES = (1, 2, 4, 8, 16, 32, 64)


def main(quick: bool = False) -> list:
    shapes = [[64, 8, 8, 10]] if quick else [[64, w, w, 10] for w in WIDTHS] + [list(s) for s in EXTRA]
    batches = (1, 4) if quick else BATCHES
    rng = np.random.default_rng(0)
    out = []
    print(f"{'sizes':>18} {'B':>4} {'loops µs':>9} {'blas µs':>8} {'py-blas µs':>10}")
    for sizes in shapes:
        X = rng.standard_normal((256, sizes[0])).astype(np.float32)
        y = rng.integers(0, 10, 256)
        yf = np.empty((0, 10), np.float32)
        m = mg.MLP(sizes, seed=0)
        impl = m.backend_impl
        opt = mg.SGD(lr=1e-3).init(m.params)
        for B in batches:
            idx = np.arange(B, dtype=np.int64)
            impl.reserve(B)
            modes = {"loops": (10**9, True), "blas": (1, True), "py-blas": (1, False)}
            t = {k: [] for k in modes}
            for mb, cb in modes.values():
                impl.blas_min_batch, impl.compiled_blas = mb, cb
                impl.train_step(m.params, m._grad, X, y, yf, idx, B, opt, 1e-3, 1)
            # about 40 ms of work per mode and round (200 reps for small models)
            reps = 1 if quick else max(10, min(200, int(4e7 / (m.n_params * max(B, 4)))))
            for _ in range(1 if quick else 7):
                for k, (mb, cb) in modes.items():
                    impl.blas_min_batch, impl.compiled_blas = mb, cb
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        impl.train_step(m.params, m._grad, X, y, yf, idx, B, opt, 1e-3, 1)
                    t[k].append((time.perf_counter() - t0) / reps * 1e6)
            med = {k: float(np.median(v)) for k, v in t.items()}
            out.append({"sizes": sizes, "batch": B, **med})
            print(f"{str(sizes):>18} {B:4d} {med['loops']:9.1f} {med['blas']:8.1f} {med['py-blas']:10.1f}")
    return out


def write(rows: list, out_dir: str = RESULTS) -> None:
    os.makedirs(out_dir, exist_ok=True)
    env = {k: os.environ.get(k) for k in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    lines = [
        "# Loops vs BLAS crossover (bench/crossover.py)",
        "",
        f"One `train_step`, float32, ReLU, softmax-CE, SGD; threads {env}; medians of 7 interleaved "
        "rounds. `blas` = the compiled BLAS step (numba np.dot via SciPy); `py-blas` = BLAS driven "
        "from Python (no SciPy).",
        "",
        "| sizes | batch | loops µs | blas µs | py-blas µs |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {'-'.join(map(str, r['sizes']))} | {r['batch']} | {r['loops']:.1f} | "
            f"{r['blas']:.1f} | {r['py-blas']:.1f} |"
        )
    atomic_write_text(os.path.join(out_dir, "crossover.md"), "\n".join(lines) + "\n")
    atomic_write_text(os.path.join(out_dir, "crossover.json"), json.dumps({"threads": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    rows = main(quick=quick)
    if not quick:
        write(rows)
