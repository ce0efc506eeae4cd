"""Time one training step (forward + loss + backward + SGD update) per backend.

Usage::

    python bench/step.py                 # full table, 1 and 2 threads, writes bench/results/step.{md,json}
    python bench/step.py --quick         # tiny sizes, one repeat (the smoke test uses this)

Every measurement is taken side by side in one process per thread count: for each
(model, batch size) the backends run in interleaved rounds and the median round is
reported, so machine noise hits all of them alike.  Thread counts are pinned through the
environment (NUMBA_NUM_THREADS, OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS)
before numpy is imported, in a fresh subprocess per count.

It also records numba's first-call cost: import + first training step in a fresh process
with an empty cache directory (cold: JIT compile) and again with that cache filled (warm).

What a "step" is: ``backend.train_step`` on a batch already gathered by index from X --
exactly what ``minigd.fit`` calls once per step -- with ``SGD(lr=1e-3)``.  The ``fit``
column adds the whole Python training loop (sampler, schedule, history) per step, for
the cpu backend.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import atomic_write, machine, synthetic_data, thread_env, train_step_runner, use_checkout

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
MODELS = ([64, 128, 128, 10], [784, 256, 256, 10])
BATCHES = (1, 2, 8, 32, 128, 512, 2048)
BACKENDS = ("cpu", "numpy")


# ------------------------------------------------------------------------------ child side
def _measure(models, batches, backends, target_s: float, rounds: int) -> list:
    import numpy as np

    import minigd as mg

    rng = np.random.default_rng(0)
    rows = []
    for sizes in models:
        n = max(batches) * 2
        X, y = synthetic_data(rng, sizes, n)
        yf = np.empty((0, sizes[-1]), np.float32)
        for B in batches:
            idx = rng.permutation(n)[:B].astype(np.int64)
            runners = {}
            for be in backends:
                run = train_step_runner(sizes, be, X, y, yf, idx, B)
                run(2)  # warm-up (JIT compile, caches)
                t0 = time.perf_counter()
                run(3)
                per = (time.perf_counter() - t0) / 3
                runners[be] = (run, max(1, int(target_s / max(per, 1e-7))))
            # the fit loop (cpu): whole Python training loop per step
            mfit = mg.MLP(sizes, dtype="float32", backend="cpu", seed=0)
            fit_steps = max(2, min(2000, runners["cpu"][1] if "cpu" in runners else 2))
            samples = {be: [] for be in runners}
            samples["fit"] = []
            for _ in range(rounds):
                for be, (run, k) in runners.items():
                    t0 = time.perf_counter()
                    run(k)
                    samples[be].append((time.perf_counter() - t0) / k)
                if "cpu" in runners:
                    samples["fit"].append(_fit_time(mg, mfit, X, y, B, fit_steps))
            med = {be: float(np.median(v)) for be, v in samples.items() if v}
            row = {
                "model": "-".join(map(str, sizes)),
                "batch": B,
                "path": ("blas" if mg.MLP(sizes, backend="cpu").backend_impl.use_blas(B) else "loops"),
            }
            for be, v in med.items():
                row[f"{be}_us"] = v * 1e6
                row[f"{be}_samples_per_s"] = B / v
            if "cpu" in med and "numpy" in med:
                row["numpy_over_cpu"] = med["numpy"] / med["cpu"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def _fit_time(mg, model, X, y, B, steps) -> float:
    t0 = time.perf_counter()
    mg.fit(model, X, y, batch_size=B, steps=steps, optimizer=mg.SGD(lr=1e-3), sampler="sequential")
    return (time.perf_counter() - t0) / steps


def _first_step() -> float:
    t0 = time.perf_counter()
    import numpy as np

    import minigd as mg

    m = mg.MLP([64, 128, 128, 10], seed=0)
    X = np.zeros((8, 64), np.float32)
    mg.fit(m, X, np.zeros(8, np.int64), batch_size=8, steps=1)
    return time.perf_counter() - t0


def _child(args) -> None:
    if args.child == "compile":
        print(json.dumps({"seconds": _first_step()}))
        return
    if args.child == "floor":
        use_checkout(args.root)
        print(json.dumps(_floor_child(args)))
        return
    models = json.loads(args.models)
    batches = json.loads(args.batches)
    rows = _measure(models, batches, BACKENDS, args.target, args.rounds)
    print(json.dumps(rows))


# ------------------------------------------------------------------------------ the B = 1 floor
#: (name, optimizer) of the floor benchmark
FLOOR_OPTS = (("SGD", "SGD(lr=1e-3)"), ("momentum", "SGD(lr=1e-3, momentum=0.9)"), ("Adam", "Adam(lr=1e-3)"))


def _bandwidth(sizes_kb=(128, 1024, 4096), target_bytes=1 << 28) -> dict:
    """One thread streaming a float32 array in a compiled loop (minigd's fast-math policy):
    read, write, and read + write (a[i] = a[i] * c, 8 bytes per element), GB/s, best of 5."""
    import numpy as np

    from minigd.kernels._jit import jit

    @jit(cache=False)
    def rw(a, c, reps):
        for _ in range(reps):
            for i in range(a.shape[0]):
                a[i] = a[i] * c

    @jit(cache=False)
    def rd(a, reps):
        s = a[0] * np.float32(0)
        for _ in range(reps):
            for i in range(a.shape[0]):
                s += a[i]
        return s

    @jit(cache=False)
    def wr(a, c, reps):
        for _ in range(reps):
            for i in range(a.shape[0]):
                a[i] = c

    out = {}
    for kb in sizes_kb:
        a = np.ones(kb * 256, np.float32)
        reps = max(1, target_bytes // a.nbytes)
        row = {}
        for name, fn, args, per in (
            ("read", rd, (a, reps), 4),
            ("write", wr, (a, np.float32(1), reps), 4),
            ("read_write", rw, (a, np.float32(1.0000001), reps), 8),
        ):
            fn(*args)
            best = min(_timed(fn, args) for _ in range(5))
            row[name] = a.size * reps * per / best / 1e9
        out[f"{kb}KB"] = row
    return out


def _timed(fn, args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def step_bytes(sizes, fused: bool, itemsize: int = 4) -> int:
    """Bytes a batch-1 SGD step streams over the parameter-sized vectors, each read or write
    of an element counted once (as the bandwidth loop counts them).  Separate passes:
    forward (read W), backward (write the gradient, read W_l>0 for d_prev), optimizer (read
    gradient and W, write the update), update (read W and update, write W): 8 P + P_d
    elements.  Fused: forward (read W), d_prev (read W_l>0), then per block, in cache
    since d_prev read it, read W_0 rows (layer 0 has no d_prev), write W and the undo
    record: 4 P."""
    P = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    Pd = sum(a * b for a, b in zip(sizes[1:-1], sizes[2:]))
    return itemsize * (4 * P if fused else 8 * P + Pd)


def _floor_child(args) -> dict:
    """Per model, interleaved rounds of B = 1 steps (``backend.train_step``, float32, one
    thread) per optimizer; median and range per round set, µs."""
    import numpy as np

    import minigd as mg
    from minigd.kernels import cpu as K

    rng = np.random.default_rng(0)
    res = {"fused": hasattr(K, "FUSE_BLOCK"), "kernels": K.__file__, "steps": {}}
    for sizes in json.loads(args.models):
        X, y = synthetic_data(rng, sizes, 4096)
        yf = np.empty((0, sizes[-1]), np.float32)
        idxs = [rng.permutation(4096)[:1].astype(np.int64) for _ in range(64)]
        runners = {}
        for name, expr in FLOOR_OPTS:
            m = mg.MLP(sizes, dtype="float32", seed=0)
            impl = m.backend_impl
            impl.reserve(1)
            st = eval(f"mg.{expr}").init(m.params)

            def run(k, impl=impl, m=m, st=st):
                for i in range(k):
                    impl.train_step(m.params, m._grad, X, y, yf, idxs[i & 63], 1, st, 1e-3, 1)

            run(20)
            runners[name] = run
        k = max(20, int(args.target / 1e-5)) if sizes[0] < 256 else max(20, int(args.target / 1e-4))
        samples = {n: [] for n in runners}
        for _ in range(args.rounds):
            for n, run in runners.items():
                t0 = time.perf_counter()
                run(k)
                samples[n].append((time.perf_counter() - t0) / k * 1e6)
        res["steps"]["-".join(map(str, sizes))] = samples
    res["bandwidth"] = _bandwidth()
    return res


def floor(against: str, rounds: int, procs: int, target: float, out_dir: str) -> dict:
    """The B = 1 step of this checkout and of commit ``against``, one fresh process per
    checkout per round, alternating; the step's bytes against the streaming bandwidth."""
    import statistics

    root = os.path.dirname(HERE)
    base = tempfile.mkdtemp(prefix="minigd_floor_")
    subprocess.run(
        ["git", "-C", root, "worktree", "add", "-f", "--detach", base, against], check=True, capture_output=True
    )
    models = [list(m) for m in MODELS]
    runs = {"before": [], "after": []}
    try:
        env = thread_env(1)
        for r in range(procs):
            for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
                checkout = base if name == "before" else root
                extra = ["--child", "floor", "--root", checkout, "--models", json.dumps(models)]
                extra += ["--rounds", str(rounds), "--target", str(target)]
                runs[name].append(_run_child(extra, env))
    finally:
        subprocess.run(["git", "-C", root, "worktree", "remove", "--force", base], capture_output=True)
    result = {"machine": machine(), "against": against, "procs": procs, "rounds": rounds, "rows": []}
    bw = [r["bandwidth"] for rs in runs.values() for r in rs]
    result["bandwidth_gbs"] = {kb: {k: statistics.median(b[kb][k] for b in bw) for k in bw[0][kb]} for kb in bw[0]}
    limit = result["bandwidth_gbs"]["1024KB"]["read_write"]
    for model in ("-".join(map(str, m)) for m in models):
        sizes = [int(s) for s in model.split("-")]
        for opt, _ in FLOOR_OPTS:
            row = {"model": model, "optimizer": opt}
            for name, rs in runs.items():
                meds = [statistics.median(r["steps"][model][opt]) for r in rs]
                med = statistics.median(meds)
                row[f"{name}_us"] = med
                row[f"{name}_range_us"] = [min(meds), max(meds)]
                if opt == "SGD":
                    nbytes = step_bytes(sizes, rs[0]["fused"])
                    row[f"{name}_bytes"] = nbytes
                    row[f"{name}_gbs"] = nbytes / med / 1e3
                    row[f"{name}_fraction"] = nbytes / med / 1e3 / limit
            ratios = [
                statistics.median(b["steps"][model][opt]) / statistics.median(a["steps"][model][opt])
                for b, a in zip(runs["before"], runs["after"])
            ]
            row["speedup"] = statistics.median(ratios)
            row["speedup_range"] = [min(ratios), max(ratios)]
            result["rows"].append(row)
    if out_dir:
        atomic_write(os.path.join(out_dir, "b1_floor.json"), json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------------------ parent side
def _run_child(extra: list, env: dict) -> object:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *extra], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compile_times(env: dict) -> dict:
    """Import + first fit step in a fresh process: cold (empty numba cache) and warm."""
    with tempfile.TemporaryDirectory() as cache:
        e = dict(env, NUMBA_CACHE_DIR=cache)
        cold = _run_child(["--child", "compile"], e)["seconds"]
        warm = _run_child(["--child", "compile"], e)["seconds"]
    return {"cold_s": cold, "warm_s": warm}


def to_markdown(result: dict) -> str:
    lines = [
        "# Training-step benchmark (bench/step.py)",
        "",
        f"Machine: {result['machine'].get('cpu')}; numpy {result['machine'].get('numpy')} "
        f"({result['machine'].get('numpy_blas')}), numba {result['machine'].get('numba')}, "
        f"Python {result['machine'].get('python')}.",
        "",
        "float32, ReLU, softmax cross-entropy, SGD. `cpu`/`numpy`: one `train_step` call "
        "(gather + forward + loss + backward + update); `fit`: the whole Python training "
        "loop per step on the cpu backend. Medians of interleaved rounds; "
        "`numpy/cpu` > 1 means the cpu backend is faster.",
        "",
    ]
    for run in result["runs"]:
        lines += [
            f"## {run['threads']} thread(s)",
            "",
            "| model | batch | cpu path | cpu µs/step | numpy µs/step | fit µs/step | cpu samples/s | numpy/cpu |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in run["rows"]:
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['path']} | {r.get('cpu_us', float('nan')):.1f} | "
                f"{r.get('numpy_us', float('nan')):.1f} | {r.get('fit_us', float('nan')):.1f} | "
                f"{r.get('cpu_samples_per_s', float('nan')):,.0f} | {r.get('numpy_over_cpu', float('nan')):.2f} |"
            )
        lines.append("")
    c = result.get("compile")
    if c:
        lines += [
            "## First call (import + first training step, fresh process)",
            "",
            f"- cold numba cache (JIT compile): {c['cold_s']:.2f} s",
            f"- warm numba cache: {c['warm_s']:.2f} s",
            "",
        ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (smoke test)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--target", type=float, default=0.02, help="seconds per backend per round")
    p.add_argument("--out", default=RESULTS, help="directory for step.md / step.json ('' = don't write)")
    p.add_argument("--no-compile", action="store_true", help="skip the cold/warm compile timing")
    p.add_argument(
        "--floor",
        metavar="COMMIT",
        default=None,
        help="only the B = 1 floor: this checkout against COMMIT (fresh processes, alternating), "
        "the step's bytes against the streaming bandwidth; writes b1_floor.json",
    )
    p.add_argument("--procs", type=int, default=6, help="--floor: processes per checkout")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)
    p.add_argument("--models", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batches", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return {}
    if args.floor:
        res = floor(args.floor, args.rounds, args.procs, args.target, args.out)
        for r in res["rows"]:
            print(json.dumps(r))
        print(json.dumps(res["bandwidth_gbs"]))
        return res
    models = [[4, 3, 2]] if args.quick else [list(m) for m in MODELS]
    batches = [1, 8] if args.quick else list(BATCHES)
    rounds, target = (1, 0.001) if args.quick else (args.rounds, args.target)
    result = {"machine": machine(), "runs": []}
    for threads in [int(t) for t in args.threads.split(",")]:
        rows = _run_child(
            [
                "--child",
                "measure",
                "--models",
                json.dumps(models),
                "--batches",
                json.dumps(batches),
                "--rounds",
                str(rounds),
                "--target",
                str(target),
            ],
            thread_env(threads),
        )
        result["runs"].append({"threads": threads, "rows": rows})
    if not args.no_compile and not args.quick:
        result["compile"] = compile_times(thread_env(1))
    md = to_markdown(result)
    print(md)
    if args.out:
        atomic_write(os.path.join(args.out, "step.json"), json.dumps(result, indent=1))
        atomic_write(os.path.join(args.out, "step.md"), md)
    return result


if __name__ == "__main__":
    main()
