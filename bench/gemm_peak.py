"""The big-model step against the machine's GEMM peak, and which BLAS the step should call.

Usage::

    NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        python bench/gemm_peak.py [--rounds 9] [--target-s 0.05] [--json out.json]

For 64-128-128-10 and 784-256-256-10 (ReLU, float32, SGD) at B = 512 and 2048, timed in
interleaved rounds in one process (medians, and the interquartile range over the median as
the spread):

* ``minigd``: ``backend.train_step`` exactly as ``fit`` calls it (default settings);
* ``minigd[...]``: the same step in each other BLAS regime the backend offers (compiled with
  SciPy's OpenBLAS through numba's ``np.dot``; compiled with NumPy's OpenBLAS through its
  CBLAS symbol; driven from Python with ``np.matmul(out=...)``), where this minigd has them;
* ``gemm numpy``: the GEMM chain of one step in ``np.matmul(out=...)`` (the peak that
  ``bench/peers.py`` divides by), and ``gemm scipy``: the same chain from compiled code
  through numba's ``np.dot`` (SciPy's OpenBLAS);
* ``torch``: PyTorch eager, as in ``bench/peers.py`` (when installed).

Fraction of GEMM peak = numpy chain time / step time (the FLOPs are the same).  The epilogues
(bias + activation, softmax cross-entropy, activation backward, bias gradients, the update)
are timed on their own too.  Results: ``bench/results/gemm_peak.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import log, machine, synthetic_data, train_step_runner  # noqa: E402
from _peers_setup import _gemm_chain, _torch_step, step_flops  # noqa: E402
from _timing import Rounds  # noqa: E402

MODELS = ((64, 128, 128, 10), (784, 256, 256, 10))
BATCHES = (512, 2048)


def _scipy_chain(np, sizes, B, rng):
    """run(k): the chain of ``_gemm_chain`` from compiled code (numba's np.dot: SciPy's BLAS)."""
    import numba

    @numba.njit(cache=False, nogil=True)
    def chain(a0, a1, a2, w0, w1, w2, z0, z1, z2, d0, d1, d2, g0, g1, g2, p1, p2, k):
        for _ in range(k):
            np.dot(a0, w0, z0)
            np.dot(a1, w1, z1)
            np.dot(a2, w2, z2)
            np.dot(a2.T, d2, g2)
            np.dot(d2, w2.T, p2)
            np.dot(a1.T, d1, g1)
            np.dot(d1, w1.T, p1)
            np.dot(a0.T, d0, g0)

    assert len(sizes) == 4, "three layers"
    f32 = np.float32
    a = [rng.standard_normal((B, sizes[l])).astype(f32) for l in range(3)]
    w = [rng.standard_normal((sizes[l], sizes[l + 1])).astype(f32) for l in range(3)]
    z = [np.empty((B, sizes[l + 1]), f32) for l in range(3)]
    d = [rng.standard_normal((B, sizes[l + 1])).astype(f32) for l in range(3)]
    g = [np.empty_like(x) for x in w]
    p = [np.empty((B, sizes[l]), f32) for l in range(3)]
    return lambda k: chain(*a, *w, *z, *d, *g, p[1], p[2], k)


def _step_variant(sizes, X, y, yf, idx, B, **attrs):
    """A minigd step runner with backend attributes set (None when this minigd lacks one)."""
    import minigd as mg

    m = mg.MLP(sizes, dtype="float32", backend="cpu", seed=0)
    impl = m.backend_impl
    for k, v in attrs.items():
        if not hasattr(impl, k):
            return None
        setattr(impl, k, v)
    impl.reserve(B)
    opt = mg.SGD(lr=1e-3).init(m.params)

    def run(k):
        for _ in range(k):
            impl.train_step(m.params, m._grad, X, y, yf, idx, B, opt, 1e-3, 1)

    return run


def _epilogues(sizes, X, y, yf, idx, B):
    """run(k) of each step's non-GEMM work, through the Python-driven path's kernels."""
    import numpy as np

    import minigd as mg
    from minigd.kernels import cpu as K

    m = mg.MLP(sizes, dtype="float32", backend="cpu", seed=0)
    impl = m.backend_impl
    ws = impl.reserve(B)
    buf, lay, L = ws.buf, ws.lay, len(sizes) - 1
    p, g = m.params, m._grad
    opt = mg.SGD(lr=1e-3).init(p)
    g0 = np.zeros_like(g)

    def fwd(k):
        for _ in range(k):
            K.gather_rows(X, idx, B, buf, lay)
            for l in range(L):
                K.bias_act_forward(B, p, buf, lay, l)
            K.loss_rows(y, yf, idx, B, buf, lay, impl.loss_code, False)

    def bwd(k):
        for _ in range(k):
            for l in range(L - 1, -1, -1):
                K.bias_grad(B, g, buf, lay, l)
                if l > 0:
                    K.act_backward(B, buf, lay, l - 1)

    def upd(k):
        for _ in range(k):
            K.opt_apply(p, g0, opt.codes, opt.hp, opt.soff, opt.state, opt.plan, 0.0, 1)

    return {"epi gather+bias/act+loss": fwd, "epi act bwd+bias grad": bwd, "epi update": upd}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--target-s", type=float, default=0.1, help="seconds per timed block")
    ap.add_argument("--gap-s", type=float, default=0.02, help="settle time before each block (0: no contention checks)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-epilogues", action="store_true")
    ap.add_argument("--models", default="all", help="'all', or e.g. 64-128-128-10")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    import numpy as np

    torch = None
    if not args.no_torch:
        try:
            import torch

            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        except ImportError:
            torch = None
    models = MODELS if args.models == "all" else [tuple(int(x) for x in args.models.split("-"))]
    rng = np.random.default_rng(0)
    rows = []
    for sizes in models:
        for B in (int(b) for b in args.batches.split(",")):
            X, y = synthetic_data(rng, sizes, 2 * B)
            yf = np.empty((0, sizes[-1]), np.float32)
            idx = rng.permutation(2 * B)[:B].astype(np.int64)
            runners = {"minigd": train_step_runner(sizes, "cpu", X, y, yf, idx, B)}
            variants = {
                "minigd[compiled, scipy BLAS]": dict(compiled_blas=True, blas="scipy"),
                "minigd[compiled, numpy BLAS]": dict(compiled_blas=True, blas="numpy"),
                "minigd[python, numpy BLAS]": dict(compiled_blas=False),
            }
            for name, attrs in variants.items():
                run = _step_variant(sizes, X, y, yf, idx, B, **attrs)
                if run is None and name == "minigd[compiled, scipy BLAS]":  # before `blas` existed
                    run = _step_variant(sizes, X, y, yf, idx, B, compiled_blas=True)
                if run is not None:
                    runners[name] = run
            runners["gemm numpy"] = _gemm_chain(np, sizes, B, rng)
            runners["gemm scipy"] = _scipy_chain(np, sizes, B, rng)
            if torch is not None:
                runners["torch"] = _torch_step(torch, sizes, X, y, idx)
            if not args.no_epilogues:
                runners.update(_epilogues(sizes, X, y, yf, idx, B))
            timer = Rounds(runners, args.rounds, args.target_s, args.gap_s)
            med = timer.run()
            best = {k: float(np.min(v)) for k, v in timer.clean.items()}
            spread = {}
            for k, v in timer.clean.items():
                q1, q3 = np.percentile(v, [25, 75])
                spread[k] = float((q3 - q1) / np.median(v))
            F = step_flops(sizes, B)
            row = {
                "model": "-".join(map(str, sizes)),
                "batch": B,
                "flops": F,
                "us": {k: v * 1e6 for k, v in med.items()},
                "spread": spread,
                "best_us": {k: v * 1e6 for k, v in best.items()},
                "gflops": {k: F / v / 1e9 for k, v in med.items() if not k.startswith("epi")},
                "fraction_of_numpy_gemm": {
                    k: med["gemm numpy"] / v for k, v in med.items() if k.startswith(("minigd", "torch"))
                },
            }
            row["fraction_of_numpy_gemm_best"] = {
                k: best["gemm numpy"] / v for k, v in best.items() if k.startswith(("minigd", "torch"))
            }
            if "torch" in med:
                row["torch_over_best"] = {k: best["torch"] / v for k, v in best.items() if k.startswith("minigd")}
            if "torch" in med:
                row["torch_over"] = {k: med["torch"] / v for k, v in med.items() if k.startswith("minigd")}
            rows.append(row)
            msg = f"{row['model']} B={B}: " + ", ".join(
                f"{k} {v:.0f}us ({spread[k]:.0%})" for k, v in row["us"].items()
            )
            msg += "\n   fraction of numpy GEMM: "
            msg += ", ".join(f"{k} {v:.1%}" for k, v in row["fraction_of_numpy_gemm"].items())
            if "torch_over" in row:
                msg += "\n   torch / minigd: " + ", ".join(f"{k} {v:.3f}x" for k, v in row["torch_over"].items())
            log(msg)
    out = {"machine": machine(), "rounds": args.rounds, "target_s": args.target_s, "rows": rows}
    if torch is not None:
        out["machine"]["torch"] = torch.__version__
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
