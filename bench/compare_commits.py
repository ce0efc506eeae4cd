"""fit's step time at two commits, side by side: the regression check of a refactor.

Usage::

    python bench/compare_commits.py 31ed910            # this checkout against commit 31ed910
    python bench/compare_commits.py 31ed910 --rounds 4 --out bench/results/loop_refactor.md

The other commit is checked out (``git worktree``) into a temporary directory.  Each round
runs one fresh process per checkout, alternating, so machine noise hits both alike; each
process times ``minigd.fit`` (the whole training loop: sampler, schedule, history; one
thread, float32, SGD) per step at B = 1, 32, 2048 on two models, the best of three fits.
The table gives the median over rounds and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHILD = r"""
import os, sys, time
sys.path.insert(0, sys.argv[2])
from _common import use_checkout
use_checkout(sys.argv[1])  # minigd AND its kernels from the checkout (the editable install maps kernels/)
import numpy as np, minigd as mg, minigd.kernels.cpu as K
assert mg.__file__.startswith(sys.argv[1]) and K.__file__.startswith(sys.argv[1]), (mg.__file__, K.__file__)
rng = np.random.default_rng(0)
out = {}
for sizes in ([64, 128, 128, 10], [784, 256, 256, 10]):
    X = rng.normal(size=(4096, sizes[0])).astype(np.float32)
    y = rng.integers(0, 10, 4096)
    for B in (1, 32, 2048):
        m = mg.MLP(sizes, dtype="float32", seed=0)
        steps = {1: 3000, 32: 600, 2048: 20}[B] if sizes[0] == 64 else {1: 800, 32: 200, 2048: 6}[B]
        mg.fit(m, X, y, batch_size=B, steps=5, optimizer=mg.SGD(lr=1e-3))
        best = []
        for _ in range(3):
            t0 = time.perf_counter()
            mg.fit(m, X, y, batch_size=B, steps=steps, optimizer=mg.SGD(lr=1e-3), eval_every=10**9)
            best.append((time.perf_counter() - t0) / steps)
        out[f"{'-'.join(map(str, sizes))} B={B}"] = min(best)
print(repr(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="the commit to compare against")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default="", help="write the markdown table here (atomically)")
    a = p.parse_args()
    env = dict(os.environ)
    for k in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base")
        subprocess.run(
            ["git", "-C", ROOT, "worktree", "add", "-f", "--detach", base, a.base], check=True, capture_output=True
        )
        try:
            times: dict = {"base": {}, "here": {}}
            for _ in range(a.rounds):
                for which, tree in (("base", base), ("here", ROOT)):
                    r = subprocess.run(
                        [sys.executable, "-c", CHILD, tree, HERE], env=env, capture_output=True, text=True, check=True
                    )
                    for k, v in ast.literal_eval(r.stdout.strip().splitlines()[-1]).items():
                        times[which].setdefault(k, []).append(v)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base], capture_output=True)
    lines = [
        f"| model, B | {a.base} | this checkout | ratio (median of {a.rounds} paired rounds, range) |",
        "|---|---:|---:|---:|",
    ]
    for k, old in times["base"].items():
        new = times["here"][k]
        ratios = [n / o for o, n in zip(old, new)]
        lines.append(
            f"| {k} | {statistics.median(old) * 1e6:,.1f} µs | {statistics.median(new) * 1e6:,.1f} µs | "
            f"{statistics.median(ratios):.3f} ({min(ratios):.2f}–{max(ratios):.2f}) |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        from _common import atomic_write

        atomic_write(a.out, text)


if __name__ == "__main__":
    main()
