"""What ``fit`` costs per step around the kernels: the compiled run of steps against the Python loop.

Usage::

    python bench/fit_loop.py            # writes bench/results/fit_loop.{md,json}
    python bench/fit_loop.py --quick    # one model, two batch sizes, 2 rounds (smoke test)

Three arms per (model, batch size), in interleaved rounds in one process, one thread
(NUMBA/OPENBLAS/OMP/MKL_NUM_THREADS=1, set before numpy is imported):

* ``kernel``: ``backend.train_step`` called in a bare Python loop (what ``bench/step.py``
  and ``bench/peers.py`` time), the same batch every step;
* ``fit, compiled runs``: ``mg.fit(batch_size=B, steps=n, SGD(lr=1e-3))`` as shipped: the cpu
  backend takes each run of up to 256 steps in one compiled call (``CpuBackend.run_steps``);
* ``fit, Python loop``: the same fit with ``CpuBackend.run_steps`` replaced by the base
  class's Python loop (one ``train_step`` call per step, itself a compiled run of one step):
  how ``fit`` stepped before.

Reported: process CPU time per step of the whole ``fit`` call (median over rounds; the
thread is alone on its core, so CPU time leaves out time spent descheduled), the ratio
Python loop / compiled runs per round (median and the range), and the history's own step
clock per step (``hist.column("time")``, what time-to-target measures).  Batch sizes where
the kernel step is long show the loop's cost vanish, as expected.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

for _k in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_k] = "1"

from _common import atomic_write, machine, synthetic_data, train_step_runner  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ([64, 128, 128, 10], [784, 256, 256, 10])
BATCHES = (1, 8, 32, 128, 512)


def _arms(mg):
    from minigd.backends import cpu as C
    from minigd.backends.base import Backend

    def fit(python_loop: bool):
        def run(sizes, X, y, B, steps):
            m = mg.MLP(sizes, seed=0)
            saved = C.CpuBackend.run_steps
            if python_loop:
                C.CpuBackend.run_steps = Backend.run_steps
            try:
                c0 = time.process_time()
                h = mg.fit(m, X, y, batch_size=B, steps=steps, optimizer=mg.SGD(lr=1e-3), seed=0)
                cpu = time.process_time() - c0
            finally:
                C.CpuBackend.run_steps = saved
            return cpu / steps, float(h.column("time")[-1]) / steps

        return run

    return {"fit, compiled runs": fit(False), "fit, Python loop": fit(True)}


def measure(models, batches, rounds: int, target_s: float) -> list:
    import numpy as np

    import minigd as mg

    rng = np.random.default_rng(0)
    arms = _arms(mg)
    rows = []
    for sizes in models:
        X, y = synthetic_data(rng, sizes, 4096)
        yf = np.empty((0, sizes[-1]), np.float32)
        for B in batches:
            kernel = train_step_runner(sizes, "cpu", X, y, yf, np.arange(B, dtype=np.int64), B)
            kernel(3)
            t0 = time.process_time()
            kernel(20)
            per = max((time.process_time() - t0) / 20, 1e-7)
            steps = int(min(max(target_s / per, 50), 20000))
            for run in arms.values():
                run(sizes, X, y, B, min(steps, 20))  # warm: compile or load every kernel the fit uses
            samples = {"kernel": [], **{k: [] for k in arms}}
            clock = {k: [] for k in arms}
            names = list(arms)
            for r in range(rounds):
                c0 = time.process_time()
                kernel(steps)
                samples["kernel"].append((time.process_time() - c0) / steps)
                for name in names[r % 2 :] + names[: r % 2]:
                    cpu, train = arms[name](sizes, X, y, B, steps)
                    samples[name].append(cpu)
                    clock[name].append(train)
            ratios = [p / c for p, c in zip(samples["fit, Python loop"], samples["fit, compiled runs"])]
            row = {
                "model": "-".join(map(str, sizes)),
                "B": B,
                "steps": steps,
                "rounds": rounds,
                "us_per_step": {k: 1e6 * float(np.median(v)) for k, v in samples.items()},
                "clock_us_per_step": {k: 1e6 * float(np.median(v)) for k, v in clock.items()},
                "python_over_compiled": float(np.median(ratios)),
                "python_over_compiled_range": [float(min(ratios)), float(max(ratios))],
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def to_markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# The fit loop's cost per step: compiled runs against the Python loop (bench/fit_loop.py)",
        "",
        f"Date {res['date']}. Machine: {m.get('cpu', '?')}, {m.get('logical_cpus', '?')} logical CPUs, one thread; "
        f"numpy {m.get('numpy', '?')}, numba {m.get('numba', '?')}, Python {m.get('python', '?')}; "
        f"minigd {res.get('commit', '?')}. {res['rounds']} interleaved rounds, medians; {res['seconds']:.0f} s.",
        "",
        "float32, ReLU, softmax cross-entropy, `SGD(lr=1e-3)`, random sampler. µs per step of process CPU time: "
        "`kernel` = `backend.train_step` in a bare loop (the same batch); the two `fit` arms = the whole "
        "`mg.fit(batch_size=B, steps=n)` call over its steps, with each run of steps one compiled call "
        "(as shipped) or the base class's Python loop of `train_step` calls (as before). Ratio = Python "
        "loop / compiled runs, per round: median [min, max]. Step clock = the history's own time per step "
        "(`hist.column('time')`, what time-to-target adds up).",
        "",
        "| model | B | steps | kernel µs | fit, compiled runs µs | fit, Python loop µs | Python loop / compiled | "
        "step clock µs: compiled / Python loop |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in res["rows"]:
        u, c = r["us_per_step"], r["clock_us_per_step"]
        lo, hi = r["python_over_compiled_range"]
        lines.append(
            f"| {r['model']} | {r['B']} | {r['steps']} | {u['kernel']:.2f} | {u['fit, compiled runs']:.2f} | "
            f"{u['fit, Python loop']:.2f} | {r['python_over_compiled']:.3f}x [{lo:.3f}, {hi:.3f}] | "
            f"{c['fit, compiled runs']:.2f} / {c['fit, Python loop']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one model, B = 1 and 32, 2 rounds (smoke test)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--target", type=float, default=0.15, help="seconds of kernel time per arm and round")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory ('' = don't write)")
    a = p.parse_args(argv)
    models, batches, rounds, target = MODELS, BATCHES, a.rounds, a.target
    if a.quick:
        models, batches, rounds, target = MODELS[:1], (1, 32), 2, 0.01
    t0 = time.perf_counter()
    rows = measure(models, batches, rounds, target)
    info = machine()
    res = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": info,
        "commit": info.get("minigd_commit", "?"),
        "rounds": rounds,
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }
    if a.out:
        atomic_write(os.path.join(a.out, "fit_loop.json"), json.dumps(res, indent=1))
        atomic_write(os.path.join(a.out, "fit_loop.md"), to_markdown(res))
    print(to_markdown(res))
    return res


if __name__ == "__main__":
    main()
