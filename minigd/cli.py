"""Command line: ``minigd demo`` (train on digits at several batch sizes) and
``minigd backends`` (which compute backends run here, and why not)."""
from __future__ import annotations

import argparse
import sys
import time


def _digits(seed: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit("minigd demo needs scikit-learn for its bundled digits data: "
                         "pip install 'minigd[sklearn]'") from exc
    import numpy as np

    d = load_digits()
    X = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(X))
    n_val = len(X) // 5
    va, tr = perm[:n_val], perm[n_val:]
    mu, sd = X[tr].mean(0), X[tr].std(0) + 0.1
    X = ((X - mu) / sd).astype(np.float32)
    return X[tr], y[tr], X[va], y[va]


def cmd_demo(args) -> int:
    import numpy as np

    import minigd as mg

    from minigd.kernels import warmup

    Xtr, ytr, Xva, yva = _digits(args.seed)
    t0 = time.perf_counter()
    warmup(("float32",))   # compile (or load cached) kernels before anything is timed
    print(f"(kernels ready in {time.perf_counter() - t0:.2f} s)")
    n = len(Xtr)
    sizes = [64] + [args.width] * args.depth + [10]
    batch_sizes = [int(b) if b != "full" else n for b in args.batch_sizes.split(",")]
    print(f"minigd demo: MLP {sizes} (relu, softmax cross-entropy, float32, backend {args.backend}) "
          f"on scikit-learn digits: {n} train / {len(Xva)} validation examples.")
    print(f"SGD with momentum 0.9; lr = {args.lr} * sqrt(B / 32) (square-root scaling, Hoffer et al. 2017); "
          f"budget {args.epochs} epochs; target: validation accuracy >= {args.target:.0%}.\n")
    head = (f"{'batch':>6} {'lr':>7} {'steps':>7} {'steps→tgt':>10} {'examples→tgt':>13} {'time→tgt s':>11} "
            f"{'µs/step':>8} {'val acc':>8} {'train acc':>9}")
    print(head)
    print("-" * len(head))
    for B in batch_sizes:
        lr = mg.scale_lr(args.lr, B, 32, "sqrt")
        model = mg.MLP(sizes, seed=args.seed, backend=args.backend)
        spe = -(-n // B)
        hist = mg.fit(model, Xtr, ytr, batch_size=B, epochs=args.epochs,
                      optimizer=mg.SGD(lr=lr, momentum=0.9), validation=(Xva, yva),
                      eval_every=max(1, spe // 4), target={"val_accuracy": args.target}, seed=args.seed)
        final = model.evaluate(Xva, yva)["accuracy"]
        train_acc = model.evaluate(Xtr, ytr)["accuracy"]
        per_step = hist.column("time")[-1] / hist.n_steps * 1e6
        reached = hist.reached
        fmt = (lambda v, f: format(v, f) if reached else "not reached")
        label = "full" if B == n else str(B)
        print(f"{label:>6} {lr:7.3f} {hist.n_steps:7d} {fmt(hist.steps_to_target, 'd'):>10} "
              f"{fmt(hist.examples_to_target, ',d'):>13} {fmt(hist.time_to_target, '.3f'):>11} "
              f"{per_step:8.1f} {final:8.3f} {train_acc:9.3f}")
    print("\nSteps fall as the batch grows while examples rise: the steps/examples trade-off "
          "of McCandlish et al. 2018. Times exclude evaluation.")
    return 0


def cmd_backends(args) -> int:
    import minigd as mg

    for name, reason in mg.available_backends().items():
        print(f"{name:6s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minigd", description="Train MLPs and measure what batch size does.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train on scikit-learn's digits at several batch sizes and print a table",
                       description="Train the same MLP on scikit-learn's bundled digits at several batch sizes "
                                   "and print steps, examples and time to a target validation accuracy.")
    d.add_argument("--batch-sizes", default="1,8,32,128,full", help="comma-separated; 'full' = full batch")
    d.add_argument("--epochs", type=int, default=30, help="epoch budget per batch size (default 30)")
    d.add_argument("--lr", type=float, default=0.02, help="learning rate at batch 32 (default 0.02)")
    d.add_argument("--width", type=int, default=64, help="hidden width (default 64)")
    d.add_argument("--depth", type=int, default=1, help="number of hidden layers (default 1)")
    d.add_argument("--target", type=float, default=0.95, help="target validation accuracy (default 0.95)")
    d.add_argument("--backend", default="cpu", help="cpu (default) or numpy")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    b = sub.add_parser("backends", help="list the compute backends and why one is unavailable")
    b.set_defaults(func=cmd_backends)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
