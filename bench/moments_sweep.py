"""Throughput of the float32 moments sweep: numba loops against the register-blocked tiles.

The sweep is ``S[o, j] = sum_r (P[r, o] Q[r, j] - M[o, j])^2`` over a layer's input block
and deltas (two fused multiply-adds per term), the part of ``grad_moments`` that a plain
forward + backward does not do.  Timed side by side in the same rounds, on float32
Gaussian factors with M their chunk mean, one thread, this thread's CPU time:

* ``loops``: ``kernels.cpu_stats._sq_dev`` (numba; the float32 default's sweep where the
  CPU has no AVX-512, and at chunks below ``TILE_MIN_ROWS``),
* ``tiles``: ``kernels.cpu_stats._sq_dev_tiled`` (the LLVM IR tiles of ``kernels/_tiles.py``),
* ``sgemm``: NumPy's ``P.T @ Q`` on the same shapes, for scale (the step's own GEMM rate).

Reported as G terms/s (B x n_o x n_j / time) for the sweeps and G FMA/s for sgemm (a term
is two FMAs: the sweep is at the GEMM's FMA rate when its figure is half sgemm's), the
median over rounds.  Usage: ``python bench/moments_sweep.py [--batches 128,512,2048]
[--rounds 7]``; prints a markdown table (results: bench/results/gradstats_issue20.md).
"""

from __future__ import annotations

import os

for _k in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_k, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

#: (n_o, n_j) of the layers of bench/gradstats.py's models, as the sweep sees them (the
#: 10-output layers transposed)
SHAPES = ((784, 256), (256, 256), (10, 256), (64, 128), (128, 128), (10, 128))


def measure(batches, rounds: int, seed: int = 1) -> list:
    from minigd.kernels import _tiles
    from minigd.kernels import cpu_stats as KS

    _tiles.ensure()
    rng = np.random.default_rng(seed)
    every = KS._EVERY[1]
    rows = []
    for B in batches:
        for no, nj in SHAPES:
            P = rng.standard_normal((B, no)).astype(np.float32)
            Q = rng.standard_normal((B, nj)).astype(np.float32)
            M = (P.T @ Q / B).astype(np.float32)
            S, S2, out, C = (
                np.empty((no, nj)),
                np.empty((no, nj)),
                np.empty((no, nj), np.float32),
                np.empty((no, nj), np.float32),
            )
            W = _tiles.LANES
            qt = np.empty(3 * W * KS.TILE_PASS_ROWS, np.float32)
            mt, st = np.empty(W * no, np.float32), np.empty(W * no)
            arms = {
                "loops": lambda: KS._sq_dev(P.T, Q, M, out, S2, every),
                "tiles": lambda: KS._sq_dev_tiled(P, Q, M, S, every, qt, mt, st),
                "sgemm": lambda: np.matmul(P.T, Q, out=C),
            }
            t = {k: [] for k in arms}
            for f in arms.values():
                f()
            for _ in range(rounds):
                for k, f in arms.items():
                    t0 = time.thread_time()
                    f()
                    t[k].append(time.thread_time() - t0)
            n = B * no * nj / 1e9
            rows.append({"B": B, "n_o": no, "n_j": nj, **{k: n / float(np.median(v)) for k, v in t.items()}})
    return rows


def to_markdown(rows) -> str:
    lines = [
        "| B | n_o x n_j | loops (G terms/s) | tiles (G terms/s) | tiles / loops | sgemm (G FMA/s) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['B']} | {r['n_o']} x {r['n_j']} | {r['loops']:.1f} | {r['tiles']:.1f} | "
            f"{r['tiles'] / r['loops']:.2f}x | {r['sgemm']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="128,512,2048", help="comma list of chunk sizes")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    if not batches or min(batches) < 1 or args.rounds < 1:
        p.error(f"--batches: positive integers and --rounds >= 1 expected, got {args.batches!r}, {args.rounds}")
    rows = measure(batches, args.rounds)
    print(to_markdown(rows))
    return rows


if __name__ == "__main__":
    main()
