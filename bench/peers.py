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
import subprocess
import sys
import time

from _common import atomic_write, log, machine, synthetic_data, thread_env, train_step_runner
from _peers_report import _plot_if_possible, targets, to_markdown
from _peers_setup import (
    BATCHES,
    E2E_LR,
    E2E_TARGET,
    GEMM_MIN_BATCH,
    MODELS,
    PEERS,
    SECTIONS,
    STATS_BATCHES,
    _digits,
    _e2e_minigd,
    _e2e_torch,
    _gemm_chain,
    _gemm_chain_torch,
    _import_peer,
    _minigd_stats,
    _name,
    _pinned,
    _sklearn_runner,
    _torch_info,
    _torch_stats,
    _torch_step,
    step_flops,
)
from _timing import MACHINE, Rounds

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


# ============================================================================ child side
def measure_step(models, batches, peers, rounds, target_s, gap_s, gemm_min, threads) -> tuple:
    import numpy as np

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
                runners["minigd" if be == "cpu" else "numpy"] = train_step_runner(sizes, be, X, y, yf, idx, B)
            if torch is not None:
                runners["torch"] = _torch_step(torch, sizes, X, y, idx)
            if sklearn is not None:
                runners["sklearn"] = _sklearn_runner(np, sizes, B, rng)
            if B >= gemm_min:
                runners["gemm"] = _gemm_chain(np, sizes, B, rng)
                if torch is not None:
                    runners["gemm_torch"] = _gemm_chain_torch(torch, sizes, B)
            timer = Rounds(runners, rounds, target_s, gap_s)
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
            log(
                f"[peers {threads}T] step {row['model']} B={B}: "
                + ", ".join(f"{k} {v * 1e6:.1f}us" for k, v in med.items())
            )
            if "gemm" in med:
                F = step_flops(sizes, B)
                g = {
                    "model": _name(sizes),
                    "batch": B,
                    "threads": threads,
                    "flops": F,
                    "gemm_chain_us": med["gemm"] * 1e6,
                    "gemm_chain_gflops": F / med["gemm"] / 1e9,
                }
                if "gemm_torch" in med:
                    g["gemm_torch_chain_us"] = med["gemm_torch"] * 1e6
                    g["gemm_torch_chain_gflops"] = F / med["gemm_torch"] / 1e9
                for k in ("minigd", "torch", "numpy", "sklearn"):
                    if k in med:
                        g[f"{k}_gflops"] = F / med[k] / 1e9
                        g[f"{k}_fraction_of_gemm"] = med["gemm"] / med[k]
                gemm_rows.append(g)
    return rows, gemm_rows


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
    med = Rounds(runners, rounds, target_s, gap_s).run()
    out = {"n": n, "threads": threads}
    for k, v in med.items():
        out[f"{k}_gflops"] = 2 * n**3 / v / 1e9
    log(
        f"[peers {threads}T] square GEMM {n}^3: "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in out.items() if k.endswith("gflops"))
    )
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
            timer = Rounds(runners, rounds, target_s, gap_s)
            med = timer.run()
            row = {"model": _name(sizes), "batch": B}
            for k, v in med.items():
                row[f"{k}_us"] = v * 1e6
            # ratios per round (numerator and denominator from the same round), then median
            r = timer.samples
            pairs = {
                "minigd_norms": ("mg_norms", "mg_plain"),
                "minigd_moments": ("mg_moments", "mg_plain"),
                "minigd_api_norms": ("mg_api_norms", "mg_api_plain"),
                "minigd_api_moments": ("mg_api_moments", "mg_api_plain"),
                "torchfunc_norms": ("tf_norms", "t_plain"),
                "torchfunc_moments": ("tf_moments", "t_plain"),
                "backpack_norms": ("bp_l2", "t_plain"),
                "backpack_moments": ("bp_var", "t_plain"),
                "backpack_plain": ("bp_plain", "t_plain"),
            }
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
            log(
                f"[peers 1T] stats {row['model']} B={B}: "
                + ", ".join(f"{k} {v:.2f}x" for k, v in row.items() if k.endswith("_x"))
            )
    return rows


# ------------------------------------------------------------------------------ end to end
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
        log(
            f"[peers {threads}T] e2e B={B}: minigd {row.get('minigd_s', float('nan')):.4f}s "
            f"({row.get('minigd_reached')}), torch {row.get('torch_s', float('nan')):.4f}s ({row.get('torch_reached')})"
        )
    return rows


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

        warnings.filterwarnings("ignore", message="Full backward hook")  # BackPACK's hooks
        out["stats"] = measure_stats(
            cfg["models"], cfg["stats_batches"], peers, cfg["stats_rounds"], cfg["target_s"], cfg["gap1_s"]
        )
    if args.child == "main":
        if "step" in sections or "gemm" in sections:
            gemm_min = cfg["gemm_min"] if "gemm" in sections else 10**9
            batches = cfg["batches"] if "step" in sections else [b for b in cfg["batches"] if b >= gemm_min]
            out["step"], out["gemm"] = measure_step(
                cfg["models"], batches, peers, cfg["rounds"], cfg["target_s"], gap, gemm_min, threads
            )
            if "step" not in sections:
                out.pop("step")
        if "gemm" in sections:
            out["square_gemm"] = measure_square_gemm(
                peers, cfg["rounds"], cfg["target_s"], gap, threads, n=cfg["square_n"]
            )
        if "e2e" in sections:
            out["e2e"] = measure_e2e(
                cfg["e2e_batches"],
                cfg["e2e_seeds"],
                peers,
                threads,
                target=cfg["e2e_target"],
                max_epochs=cfg["e2e_max_epochs"],
                gap_s=gap,
            )
    out["pinned_after"] = _pinned(torch)
    if torch is not None:
        out["torch_info"] = _torch_info(torch)
    out["machine_load"] = MACHINE.summary()
    print(json.dumps(out))


# =========================================================================== parent side
def _run_child(kind: str, config: dict, peers: str, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--config", json.dumps(config), "--peers", peers]
    out = subprocess.run(cmd, env=thread_env(threads), stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child ({kind}, {threads} thread(s)) failed with exit code {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (smoke test)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    p.add_argument("--peers", default=",".join(PEERS), help=f"subset of {','.join(PEERS)} (default all)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--target", type=float, default=0.03, help="seconds per peer per round")
    p.add_argument(
        "--gap",
        type=float,
        default=0.2,
        help="seconds of pause before each timed block with > 1 thread, so that idle thread pools "
        "go to sleep (half of it with 1 thread); longer while other processes are busy",
    )
    p.add_argument(
        "--wait-budget",
        type=float,
        default=60.0,
        help="seconds per subprocess it may wait for other processes to go quiet "
        "(and, separately, spend re-timing contended blocks)",
    )
    p.add_argument("--seeds", type=int, default=5, help="end-to-end runs per batch size")
    p.add_argument(
        "--out",
        default=None,
        help="directory for peers.md/.json/.png (default bench/results, or nothing with --quick; '' = don't write)",
    )
    p.add_argument(
        "--render",
        metavar="JSON",
        default=None,
        help="only rebuild peers.md / peers.png (in --out, default the JSON's folder) from a saved peers.json",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return {}
    if args.render:
        with open(args.render) as f:
            result = json.load(f)
        result["targets"] = targets(result)  # (the targets as they stand now, on the stored figures)
        out_dir = args.out if args.out is not None else os.path.dirname(os.path.abspath(args.render))
        md = to_markdown(result)
        print(md)
        if out_dir:
            atomic_write(os.path.join(out_dir, "peers.md"), md)
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
        config = {
            "models": [[4, 3, 2]],
            "batches": [1, 8],
            "stats_batches": [8],
            "gemm_min": 8,
            "rounds": 1,
            "stats_rounds": 1,
            "target_s": 0.001,
            "gap_s": 0.0,
            "gap1_s": 0.0,
            "wait_budget_s": 0.0,
            "square_n": 64,
            "e2e_batches": [32],
            "e2e_seeds": [0],
            "e2e_target": 0.5,
            "e2e_max_epochs": 3,
        }
    else:
        config = {
            "models": [list(m) for m in MODELS],
            "batches": list(BATCHES),
            "stats_batches": list(STATS_BATCHES),
            "gemm_min": GEMM_MIN_BATCH,
            "rounds": args.rounds,
            "target_s": args.target,
            "gap_s": args.gap,
            "gap1_s": args.gap / 2,
            "wait_budget_s": args.wait_budget,
            "square_n": 1024,
            "stats_rounds": max(1, min(args.rounds, 5)),
            "e2e_batches": sorted(E2E_LR),
            "e2e_seeds": list(range(args.seeds)),
            "e2e_target": E2E_TARGET,
            "e2e_max_epochs": 200,
        }
    config["sections"] = sections
    result = {"machine": machine(), "torch": {}, "config": config, "runs": []}
    main_sections = [s for s in sections if s != "stats"]
    thread_counts = [int(t) for t in args.threads.split(",")]
    if main_sections:
        for threads in thread_counts:
            run = _run_child("main", config, args.peers, threads)
            if "stats" in run:  # per-example statistics ran in the 1-thread child
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
        atomic_write(os.path.join(args.out, "peers.json"), json.dumps(result, indent=1))
        atomic_write(os.path.join(args.out, "peers.md"), md)
        _plot_if_possible(result, os.path.join(args.out, "peers.png"))
    return result


if __name__ == "__main__":
    main()
