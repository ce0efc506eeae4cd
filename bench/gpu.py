"""Time one training step on the GPU backend, next to the cpu backend and PyTorch CUDA.

Usage::

    python bench/gpu.py              # batch sizes 1..8192, writes bench/results/gpu.{md,json}
    python bench/gpu.py --quick      # tiny sizes, one round (the smoke test uses this)

Without a usable GPU it prints why (``minigd.available_backends()["gpu"]``) and exits
with status 0, writing nothing.  **It has not been run on a GPU yet** (see docs/guide/backends.md).
With ``MINIGD_GPU_EMULATE=1`` it runs on the CPU emulator of the GPU backend: a smoke test
of this script and of the paths it times, whose numbers are emulator times, not GPU
timings (the output says so, and it refuses to write them into bench/results).

Models 64-128-128-10 and 784-256-256-10, ReLU, softmax cross-entropy, float32,
``SGD(lr=1e-3)``; batches gathered by index from a larger X inside the step, as
``minigd.fit`` does.  Columns (µs per step, median of interleaved rounds):

* ``gpu step``: ``backend.train_step``, what ``fit`` calls per step.  Because the model's
  parameters are a host NumPy array, this uploads parameters (and optimizer state) and
  downloads them and the step's loss every step: one host synchronisation per step.
* ``gpu resident``: ``backend.run_steps``: parameters and state stay on the device, the
  losses are read back every ``--read-every`` steps (default 100): the device's own cost.
* ``cpu``: ``backend.train_step`` of the cpu backend (numba / BLAS), this machine's threads.
* ``resident graph`` / ``resident cublas``: ``run_steps`` pinned to one regime
  (``graph_max_batch`` above every batch, or 0), to find the crossover that
  ``graph_max_batch`` should be.
* ``torch cuda``: a PyTorch ``nn.Sequential`` with ``torch.optim.SGD`` on the device, the
  data on the device, the loss kept on the device (``.item()`` only at the end of a block).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from _common import cpu_model, synthetic_data

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
MODELS = ([64, 128, 128, 10], [784, 256, 256, 10])
BATCHES = (1, 2, 8, 32, 128, 512, 2048, 8192)
GRAPH_MAX_MEASURED = 2048  # the tiled-GEMM graph regime is timed up to this batch size


def _block_time(fn, min_time):
    """Calibrate repetitions so one block takes about ``min_time`` s; returns (reps, fn)."""
    reps = 1
    while True:
        t0 = time.perf_counter()
        fn(reps)
        dt = time.perf_counter() - t0
        if dt >= min_time or reps >= 1 << 16:
            return reps
        reps *= 2 if dt <= 0 else max(2, min(16, int(min_time / dt) + 1))


def contenders(sizes, B, n, read_every):
    """{name: run(reps) -> None} for one (model, batch size)."""
    import numpy as np

    import minigd as mg

    rng = np.random.default_rng(0)
    X, y = synthetic_data(rng, sizes, n)
    out = {}
    for backend in ("gpu", "cpu"):
        m = mg.MLP(sizes, backend=backend, seed=0)
        Xc, yi, yf = m.check_Xy(X, y)
        opt = mg.SGD(lr=1e-3)
        st = opt.init(m.params)
        impl = m.backend_impl
        impl.reserve(B)
        idx = rng.integers(0, n, size=B * 64).astype(np.int64)

        def step(reps, impl=impl, m=m, Xc=Xc, yi=yi, yf=yf, st=st, idx=idx):
            for r in range(reps):
                s = (r % 64) * B
                impl.train_step(m.params, m._grad, Xc, yi, yf, idx[s : s + B], B, st, 1e-3, r + 1)

        out[f"{backend} step"] = step
        if backend == "gpu":

            def resident(reps, impl=impl, m=m, Xc=Xc, yi=yi, yf=yf, st=st, idx=idx):
                k = max(1, reps)
                ii = np.resize(idx, k * B)
                impl.run_steps(m.params, Xc, yi, yf, ii, B, k, st, np.full(k, 1e-3), 1, read_every=read_every)

            out["gpu resident"] = resident
            # the two regimes side by side, to set graph_max_batch from the crossover
            for name, gmb in (("graph", 10**9), ("cublas", 0)):
                if name == "graph" and B > GRAPH_MAX_MEASURED:
                    continue
                mm = mg.MLP(sizes, backend="gpu", seed=0)
                mm.backend_impl.graph_max_batch = gmb
                mm.backend_impl.reserve(B)
                sm = opt.init(mm.params)

                def regime(reps, impl=mm.backend_impl, m=mm, Xc=Xc, yi=yi, yf=yf, st=sm, idx=idx):
                    k = max(1, reps)
                    impl.run_steps(
                        m.params,
                        Xc,
                        yi,
                        yf,
                        np.resize(idx, k * B),
                        B,
                        k,
                        st,
                        np.full(k, 1e-3),
                        1,
                        read_every=read_every,
                    )

                out[f"resident {name}"] = regime
    torch_fn = _torch_contender(sizes, X, y, B)
    if torch_fn is not None:
        out["torch cuda"] = torch_fn
    return out


def _torch_contender(sizes, X, y, B):
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    dev = torch.device("cuda")
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    Xd = torch.as_tensor(X, device=dev)
    yd = torch.as_tensor(y, device=dev)
    g = torch.Generator(device=dev)
    g.manual_seed(0)
    idx = torch.randint(0, X.shape[0], (64 * B,), device=dev, generator=g)
    lossf = torch.nn.CrossEntropyLoss()

    def run(reps):
        acc = torch.zeros((), device=dev)
        for r in range(reps):
            s = (r % 64) * B
            ii = idx[s : s + B]
            opt.zero_grad(set_to_none=True)
            loss = lossf(net(Xd[ii]), yd[ii])
            loss.backward()
            opt.step()
            acc += loss.detach()
        acc.item()

    return run


def measure(quick, rounds, read_every):
    import numpy as np

    batches = (1, 8) if quick else BATCHES
    models = ([16, 32, 32, 4],) if quick else MODELS
    min_time = 0.02 if quick else 0.2
    rows = []
    for sizes in models:
        for B in batches:
            n = max(4 * B, 1024)
            cs = contenders(sizes, B, n, read_every)
            reps = {}
            for name, fn in cs.items():
                fn(2)  # warm up: compile, capture the graph, cuBLAS handles
                reps[name] = _block_time(fn, min_time)
            times = {name: [] for name in cs}
            for _ in range(rounds):
                for name, fn in cs.items():
                    t0 = time.perf_counter()
                    fn(reps[name])
                    times[name].append((time.perf_counter() - t0) / reps[name] * 1e6)
            row = {"model": "-".join(map(str, sizes)), "batch": B}
            row.update({name: float(np.median(v)) for name, v in times.items()})
            rows.append(row)
            print(row, flush=True)
    return rows


def device_info():
    from minigd.backends import gpu_emulator

    if gpu_emulator() is not None:
        return {
            "gpu": "EMULATED on the CPU (minigd.testing.gpu_emu): these are emulator times, NOT GPU timings",
            "cuda_runtime": "-",
            "driver": "-",
            "cupy": "-",
            "cpu": cpu_model(),
            "python": platform.python_version(),
        }
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return {
        "gpu": name,
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "driver": cupy.cuda.runtime.driverGetVersion(),
        "cupy": cupy.__version__,
        "cpu": cpu_model(),
        "python": platform.python_version(),
    }


def write(rows, info, outdir):
    from minigd._io import atomic_write_text

    os.makedirs(outdir, exist_ok=True)
    names = ("gpu step", "gpu resident", "resident graph", "resident cublas", "cpu step", "torch cuda")
    cols = [c for c in names if any(c in r for r in rows)]
    lines = [
        "# GPU training step (µs per step, median of interleaved rounds)",
        "",
        f"GPU: {info['gpu']}; CUDA runtime {info['cuda_runtime']}, driver {info['driver']}, "
        f"CuPy {info['cupy']}; CPU: {info['cpu']}.",
        "",
        "| model | batch | " + " | ".join(cols) + " |",
        "|---|---:|" + "---:|" * len(cols),
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | " + " | ".join(f"{r[c]:.1f}" if c in r else "-" for c in cols) + " |"
        )
    lines += [
        "",
        "`resident graph` / `resident cublas`: `run_steps` with every batch on the CUDA-graph "
        "path (tiled GEMMs) or on cuBLAS; where they cross is the `graph_max_batch` to set.",
    ]
    atomic_write_text(os.path.join(outdir, "gpu.md"), "\n".join(lines) + "\n")
    atomic_write_text(os.path.join(outdir, "gpu.json"), json.dumps({"info": info, "rows": rows}, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; 1 with --quick)")
    ap.add_argument("--read-every", type=int, default=100, help="gpu resident: read the losses back every k steps")
    ap.add_argument("--out", default=RESULTS, help="results directory")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(HERE))
    from minigd.backends import available_backends, gpu_emulator

    reason = available_backends()["gpu"]
    if reason is not None:
        print(f"bench/gpu.py: no usable GPU here, nothing measured: {reason}")
        return 0
    if gpu_emulator() is not None and os.path.abspath(args.out) == os.path.abspath(RESULTS):
        print(
            "bench/gpu.py: MINIGD_GPU_EMULATE is set: emulator times are not GPU timings and are not "
            "written into bench/results; pass --out DIR for a smoke run",
            file=sys.stderr,
        )
        return 2
    rounds = args.rounds or (1 if args.quick else 5)
    rows = measure(args.quick, rounds, args.read_every)
    write(rows, device_info(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
