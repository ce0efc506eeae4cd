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

from _common import atomic_write, machine, synthetic_data, thread_env, train_step_runner

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
    models = json.loads(args.models)
    batches = json.loads(args.batches)
    rows = _measure(models, batches, BACKENDS, args.target, args.rounds)
    print(json.dumps(rows))


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
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--models", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batches", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return {}
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
