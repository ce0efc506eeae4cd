"""Command line.

``minigd study``     which batch size should I use? sweep, measure, analyse, report
``minigd report``    (re)write the report of a study from its results file
``minigd demo``      train one MLP on digits at a few batch sizes and print a table
``minigd backends``  which compute backends run here, and why one does not
``minigd warmup``    compile the CPU kernels now (the first run on a machine; cached after)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from minigd._constraints import arg_type, list_arg_type


def _digits(seed: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit(
            "minigd demo needs scikit-learn for its bundled digits data: pip install 'minigd[sklearn]'"
        ) from exc
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
    import minigd as mg
    from minigd.warmup import warmup

    Xtr, ytr, Xva, yva = _digits(args.seed)
    t0 = time.perf_counter()
    warmup(("float32",))  # compile (or load cached) kernels before anything is timed
    print(f"(kernels ready in {time.perf_counter() - t0:.2f} s)")
    n = len(Xtr)
    sizes = [64] + [args.width] * args.depth + [10]
    batch_sizes = [int(b) if b != "full" else n for b in args.batch_sizes.split(",")]
    print(
        f"minigd demo: MLP {sizes} (relu, softmax cross-entropy, float32, backend {args.backend}) "
        f"on scikit-learn digits: {n} train / {len(Xva)} validation examples."
    )
    print(
        f"SGD with momentum 0.9; lr = {args.lr} * sqrt(B / 32) (square-root scaling, Hoffer et al. 2017); "
        f"budget {args.epochs} epochs; target: validation accuracy >= {args.target:.0%}.\n"
    )
    head = (
        f"{'batch':>6} {'lr':>7} {'steps':>7} {'steps→tgt':>10} {'examples→tgt':>13} {'time→tgt s':>11} "
        f"{'µs/step':>8} {'val acc':>8} {'train acc':>9}"
    )
    print(head)
    print("-" * len(head))
    for B in batch_sizes:
        lr = mg.scale_lr(args.lr, B, 32, "sqrt")
        model = mg.MLP(sizes, seed=args.seed, backend=args.backend)
        spe = -(-n // B)
        hist = mg.fit(
            model,
            Xtr,
            ytr,
            batch_size=B,
            epochs=args.epochs,
            optimizer=mg.SGD(lr=lr, momentum=0.9),
            validation=(Xva, yva),
            eval_every=max(1, spe // 4),
            target={"val_accuracy": args.target},
            seed=args.seed,
        )
        final = model.evaluate(Xva, yva)["accuracy"]
        train_acc = model.evaluate(Xtr, ytr)["accuracy"]
        per_step = hist.column("time")[-1] / hist.n_steps * 1e6
        reached = hist.reached
        fmt = lambda v, f: format(v, f) if reached else "not reached"
        label = "full" if B == n else str(B)
        print(
            f"{label:>6} {lr:7.3f} {hist.n_steps:7d} {fmt(hist.steps_to_target, 'd'):>10} "
            f"{fmt(hist.examples_to_target, ',d'):>13} {fmt(hist.time_to_target, '.3f'):>11} "
            f"{per_step:8.1f} {final:8.3f} {train_acc:9.3f}"
        )
    print(
        "\nSteps fall as the batch grows while examples rise: the steps/examples trade-off "
        "of McCandlish et al. 2018. Times exclude evaluation."
    )
    return 0


def _bn_arg(text):
    choices = {"none": False, "before": True, "after": "after"}
    if text not in choices:
        raise argparse.ArgumentTypeError(f"expected one of {list(choices)}, got {text!r}")
    return choices[text]


def _ghost_list(text):
    """--ghost-batch-sizes: comma-separated ghost batch sizes (the table's
    ``ghost_batch_size``) or 'none'."""
    one = arg_type("ghost_batch_size")
    items = [t.strip() for t in text.split(",") if t.strip()]
    return tuple(None if t.lower() == "none" else one(t) for t in items)


def _batch_sizes_list(text):
    """--batch-sizes: comma-separated batch sizes (the table's ``batch_size``: ints >= 1 or
    'full'); 'auto' (the default) is the empty tuple."""
    if text.strip() == "auto":
        return ()
    return _BATCH_SIZES(text)


_BATCH_SIZES = list_arg_type("sweep_batch_size", what="a comma-separated list of batch sizes >= 1 or 'full'")


def _key_value(text):
    """KEY=VALUE with VALUE an int, a float or else a string (``noise=2.0``, ``n=5000``)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE like noise=2.0, got {text!r}")
    for kind in (int, float):
        try:
            v = kind(value)
        except ValueError:
            continue
        if kind is float and v != v:  # nan
            break
        return key, v
    return key, value.strip()


def _pairs(text):
    out = []
    for tok in filter(None, (t.strip() for t in text.split(","))):
        try:
            e, f = tok.split(":")
            out.append((int(e), float(f)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected EPOCH:FACTOR pairs like 10:2,20:4, got {text!r}") from None
    return tuple(out)


def _data_spec(args):
    from minigd.study import DataSpec

    params = dict((("std_floor", 1.0),) if args.data == "digits" else ())
    params.update(dict(args.data_param or ()))
    params = tuple(sorted(params.items()))
    return DataSpec(
        name=args.data,
        val_fraction=args.val_fraction,
        standardize=not args.no_standardize,
        seed=args.data_seed,
        params=params,
    )


def _print_answers(analysis, report_dir) -> None:
    """Print each architecture's headline numbers with their 90% bootstrap intervals and win
    rates, then the report's path, and end with the recommendation paragraph."""
    from minigd.study.analysis import fmt_duration, fmt_interval

    def count(v):
        return "not measured" if v is None else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4g}"

    def batch(v):
        return "not measured" if v is None else str(int(v)) if float(v).is_integer() else f"{v:g}"

    for arch in analysis["architectures"]:
        a = arch.get("answers") or {}
        h = arch.get("headline") or {}
        tgt = (
            f"{arch['target_metric']} {'>=' if 'accuracy' in (arch['target_metric'] or '') else '<='} {arch['target']}"
        )
        norm = f", {arch['norm']}" if arch.get("norm") else ""
        print(f"\nMLP {arch['sizes']} ({arch['activation']}, {arch['optimizer']}{norm}), target {tgt}:")

        def show(label, key, extra=None, fmt=count, tail=""):
            d = h.get(key) if isinstance(h.get(key), dict) else {"value": a.get(key)}
            s = fmt_interval(d, fmt) if d.get("value") is not None else "not measured"
            if d.get("value") is not None and d.get("wins") is not None:
                s += f", wins {100 * d['wins']:.0f}% of resamples"
            if extra and isinstance(h.get(extra[0]), dict) and h[extra[0]].get("value") is not None:
                s += f"; {fmt_interval(h[extra[0]], extra[1])}{extra[2]}"
            print(f"  {label:<44} {s}{tail}")

        show(
            "fastest batch size (wall time to target)",
            "fastest_wall_time",
            fmt=batch,
            extra=("time_to_target", fmt_duration, ""),
        )
        show(
            "fewest examples to target", "fewest_examples", fmt=batch, extra=("examples_to_target", count, " examples")
        )
        show("fewest steps to target", "fewest_steps", fmt=batch, extra=("steps_to_target", count, " steps"))
        show("highest goodput (throughput x efficiency)", "max_goodput", fmt=batch)
        show("smallest reasonable batch size", "smallest_reasonable", fmt=batch)
        tuning = arch.get("b_crit_tuning")
        show(
            "critical batch size (steps/examples fit)",
            "critical_batch_size_fit",
            tail=f" ({tuning})"
            if tuning and tuning != "tuned" and a.get("critical_batch_size_fit") is not None
            else "",
        )
        show("gradient noise scale B_simple (mid-run)", "critical_batch_size_noise")
        show("gradient noise scale B_simple (at target)", "noise_scale_target")
        show("best final validation (batch size)", "best_final_validation", fmt=batch)
        n = (arch.get("bootstrap") or {}).get("resamples")
        if n:
            print(f"  [lo, hi]: 90% bootstrap interval over {n:,} resamples of the seeds and timings")
        for w in arch.get("warnings", []):
            print(f"  note: {w}")
    if analysis["n_failed"]:
        print(f"\n{analysis['n_failed']} trial(s) failed; see the report's appendix.")
    if report_dir:
        print(f"\nReport: {os.path.join(report_dir, 'summary.md')} (and summary.html, summary.json, *.png)")
    rec = analysis.get("recommendation") or {}
    if rec.get("text"):
        print(f"\nRecommendation: {rec['text']}")


def _check_study_args(args, parser) -> None:
    """Validate every ``minigd study`` flag before any trial runs: a usage error naming the
    flag, what it expects and what it got (``parser.error``, exit status 2).  Resolves the
    defaults that depend on the data (``--target-metric``, ``--target``) in ``args``."""
    import math

    def bad(flag, expected, got):
        parser.error(f"argument {flag}: expected {expected}, got {got}")

    # each flag's own range was checked as it was parsed (argparse types built from the
    # parameter table, minigd._constraints); here: the rules between flags and the data
    def real(flag, v, lo=None, hi=None, lo_open=False, hi_open=False, what=None):
        ok = (
            math.isfinite(v)
            and (lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi))
        )
        if not ok:
            bad(flag, what, repr(v))

    for e, f in args.bs_growth:
        if e < 1:
            bad("--bs-growth", "EPOCH:FACTOR pairs with EPOCH >= 1", f"{e}:{f:g}")
        if not (math.isfinite(f) and f >= 1):
            bad("--bs-growth", "EPOCH:FACTOR pairs with FACTOR >= 1 (the batch grows)", f"{e}:{f:g}")
    if any(g is not None for g in args.ghost_batch_sizes) and args.batch_norm is False:
        bad(
            "--ghost-batch-sizes",
            "--batch-norm before or after with ghost batch sizes",
            f"--ghost-batch-sizes {','.join(str(g).lower() for g in args.ghost_batch_sizes)} without --batch-norm",
        )
    from minigd.study.questions import parse_questions

    try:
        args.questions = parse_questions(args.questions)
    except ValueError as exc:
        bad("--questions", str(exc).split("expected ", 1)[1].split(", got")[0], repr(args.questions))
    if args.questions and args.search:
        bad("--questions", "no --search (the questions run next to the grid study)", "--search " + args.search)
    import minigd as mg

    # with --scheduler the trials run on the cluster's workers: the backend need only run
    # there (their GPUs).  The data must load here too: the study reads its shape to lay
    # out the trials
    remote = args.scheduler is not None
    backends = mg.available_backends()
    if args.backend not in backends:
        bad("--backend", f"one of {', '.join(backends)}", repr(args.backend))
    if backends[args.backend] is not None and not remote:
        bad(
            "--backend",
            "a backend that runs here (see `minigd backends`; with --scheduler, on the workers)",
            f"{args.backend!r}, which is not available: {backends[args.backend]}",
        )
    # the data: it must load, and the target must suit its task
    from minigd.data import DATASETS
    from minigd.study.trial import load_data

    data_expected = f"{', '.join(sorted(DATASETS))} or a readable .npz/.csv/IDX file"
    if args.data not in DATASETS and not os.path.exists(args.data):
        bad("--data", data_expected, f"{args.data!r} (no such data set or file)")
    try:
        ds = load_data(_data_spec(args), "float32")
    except Exception as exc:  # any reason the data cannot be loaded is the --data flag's problem
        why = str(exc).removeprefix("name_or_path: ")
        bad("--data", data_expected, f"{args.data!r} ({type(exc).__name__}: {why})")
    regression = ds.task != "classification"
    if args.target_metric is None:
        args.target_metric = "val_loss" if regression else "val_accuracy"
    if regression and "accuracy" in args.target_metric:
        bad("--target-metric", f"val_loss for the regression data {args.data!r}", args.target_metric)
    if args.target is None:
        if "accuracy" not in args.target_metric:
            bad(
                "--target",
                f"a validation-loss target for --target-metric {args.target_metric} "
                f"(e.g. --target 0.01; no default fits every data set)",
                "none",
            )
        args.target = 0.95
    if "accuracy" in args.target_metric:
        real("--target", args.target, 0, 1, True, False, f"an accuracy in (0, 1] for {args.target_metric}")
    else:
        real("--target", args.target, 0, None, True, what=f"a loss > 0 for {args.target_metric}")
    n = len(ds.X_train)
    too_big = [b for b in args.batch_sizes if b != "full" and b > n]
    if too_big:
        bad(
            "--batch-sizes",
            f"batch sizes <= the {n} training examples of {args.data!r} (or 'full')",
            ",".join(map(str, too_big)),
        )
    _check_out_and_extras(args, bad)  # last: it creates --out (only for a study that will run)


#: below this much free space on --out's disk, the study refuses to start
MIN_FREE_BYTES = 20 * 2**20


def _check_scheduler(address: str, timeout: float = 5.0) -> str | None:
    """None when a TCP connection to the Dask scheduler ``address`` (``tcp://host:port``,
    ``host:port``) opens within ``timeout`` seconds, else why not."""
    import socket
    from urllib.parse import urlsplit

    text = address if "://" in address else "tcp://" + address
    try:
        u = urlsplit(text)
        host, port = u.hostname, u.port
    except ValueError as exc:
        return f"not an address ({exc})"
    if u.scheme not in ("tcp", "tls") or not host or port is None:
        return "not an address of the form tcp://host:port"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"no scheduler answers there within {timeout:g} s ({exc.strerror or exc})"


def _check_out_and_extras(args, bad) -> None:
    """``--out`` (non-empty, a directory that can be created and written, with free space,
    holding no damaged results file), the optional extras the options need and the
    scheduler: all found before the first trial, not after the last one."""
    import importlib.util
    import shutil

    from minigd._io import check_writable_dir

    if not args.out or not args.out.strip():
        bad("--out", "an output directory", repr(args.out))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        bad("--out", "a directory (or a path to create one)", f"the file {args.out!r}")
    try:
        os.makedirs(args.out, exist_ok=True)
        check_writable_dir(args.out, "--out", OSError)
    except OSError as exc:
        why = exc.strerror or str(exc).split(", got ", 1)[-1]
        bad("--out", "a directory that can be created and written", f"{args.out!r} ({why})")
    free = shutil.disk_usage(args.out).free
    if free < MIN_FREE_BYTES:
        bad(
            "--out",
            f"a directory on a disk with at least {MIN_FREE_BYTES // 2**20} MiB free",
            f"{args.out!r} ({free // 2**10} KiB free: the disk is full)",
        )
    results = os.path.join(args.out, "results.sqlite")
    if os.path.lexists(results):
        from minigd.errors import ResultStoreError
        from minigd.study import ResultStore

        try:
            ResultStore(results).close()
        except ResultStoreError as exc:
            bad(
                "--out",
                "a directory whose results.sqlite a study can resume",
                f"{results!r}, which {str(exc).split(' which ', 1)[-1]}",
            )
    extra = "pip install 'minigd[study]'"
    need = [("matplotlib", "matplotlib", "the report's figures")]
    if args.search == "bayes":
        need.append(("optuna", "optuna", "--search bayes"))
    if args.scheduler is not None:
        need.append(("dask.distributed", "distributed", "--scheduler"))
    for name, top, why in need:
        if importlib.util.find_spec(top) is None:
            flag = why if why.startswith("--") else "--out"
            bad(flag, f"{name} installed for {why} ({extra})", f"no module named {name!r}")
    if "search_strategies" in (args.questions or ()) and importlib.util.find_spec("optuna") is None:
        print(
            f"minigd study: note: Optuna is not installed ({extra}): the search_strategies question "
            f"will compare the grid and random search only",
            file=sys.stderr,
        )
    if args.scheduler is not None:
        why = _check_scheduler(args.scheduler)
        if why:
            bad(
                "--scheduler", "the address of a running Dask scheduler (tcp://host:port)", f"{args.scheduler!r}: {why}"
            )


def _compile_kernels() -> None:
    """Compile (or load from Numba's on-disk cache) the CPU kernels here, once, before any
    worker starts, saying so: the first run on a machine spends seconds compiling."""
    from minigd.warmup import announce_warmup

    announce_warmup(("float32",), lambda line: print(line, flush=True))


def _objective_text(objective: str, r: dict) -> str:
    v = r.get(objective)
    if v is None:
        return f"{objective}: not measured"
    if objective == "time_to_target":
        return (
            f"wall time to target {v * 1e3:.3g} ms (in-trial timing: the median step x the steps to "
            f"target, {r.get('steps_to_target')} steps)"
        )
    if objective == "steps_to_target":
        return f"{v:,} steps to target ({r.get('examples_to_target'):,} examples)"
    if objective == "examples_to_target":
        return f"{v:,} examples to target ({r.get('steps_to_target'):,} steps)"
    return f"final validation loss {v:.4g}"


def cmd_study(args) -> int:
    from minigd.study import SearchSpace, SweepSpec, TrialConfig, run_study, search

    data = _data_spec(args)
    if args.search:
        base = TrialConfig(
            data=data,
            activation=args.activation,
            optimizer=args.optimizer,
            max_epochs=args.max_epochs,
            target_metric=args.target_metric,
            target=args.target,
            backend=args.backend,
        )
        os.makedirs(args.out, exist_ok=True)
        space = SearchSpace(
            width_min=min(args.widths),
            width_max=max(args.widths),
            depth_min=min(args.depths),
            depth_max=max(args.depths),
        )
        from minigd.study.store import study_lock
        from minigd.study.sweep import _progress

        with study_lock(args.out):
            if args.backend == "cpu" and args.scheduler is None:
                _compile_kernels()
            print(
                f"minigd study: {args.search} search, {args.n_trials} trials minimising {args.objective}, "
                f"results in {args.out}/results.sqlite"
            )
            bar = _progress(args.n_trials, not args.quiet)
            try:
                res = search(
                    space,
                    args.n_trials,
                    os.path.join(args.out, "results.sqlite"),
                    method=args.search,
                    objective=args.objective,
                    base=base,
                    seed=args.seed,
                    workers=args.workers,
                    scheduler=args.scheduler,
                    progress=(lambda c, r: bar.update(1)) if bar else None,
                )
            finally:
                if bar is not None:
                    bar.close()
        if res["best"] is None:
            print(f"no trial reached the target ({args.objective} is inf for all {args.n_trials})")
            return 1
        cfg, r = res["best"]
        done = sum(v is not None for _, v in res["trials"])
        print(
            f"best of {args.n_trials} ({args.search} search; {done} reached the target):\n"
            f"  batch size {cfg['batch_size']}{' (full batch)' if cfg.get('full_batch') else ''}, "
            f"learning rate {cfg['lr']:.4g}, momentum {cfg['momentum']:.3g}, "
            f"hidden layers {list(cfg['sizes'][1:-1]) or 'none'}\n"
            f"  {_objective_text(args.objective, r)}"
        )
        return 0
    spec = SweepSpec(
        data=data,
        batch_sizes=args.batch_sizes,
        lr_policy=args.lr_policy,
        base_lr=args.base_lr,
        base_batch_size=args.base_batch_size,
        lr_grid=args.lr_grid,
        seeds=args.seeds or (),
        seed=args.seed,
        n_seeds=args.n_seeds,
        lr_extend=args.lr_extend,
        widths=args.widths,
        depths=args.depths,
        activation=args.activation,
        optimizer=args.optimizer,
        momentum=args.momentum,
        warmup_steps=args.warmup_steps,
        bs_growth=args.bs_growth,
        max_epochs=args.max_epochs,
        target_metric=args.target_metric,
        target=args.target,
        backend=args.backend,
        batch_norm=args.batch_norm,
        ghost_batch_sizes=args.ghost_batch_sizes,
        dropout=args.dropout,
        adaptive=not args.no_adaptive,
    )
    t0 = time.perf_counter()
    print(
        f"minigd study: {args.data}, results in {args.out}/results.sqlite (re-running resumes: only missing trials run)"
    )
    from minigd import report  # the study hands its analysis to the report; it does not import it

    out = run_study(
        spec,
        args.out,
        workers=args.workers,
        scheduler=args.scheduler,
        progress=not args.quiet,
        retry_failed=args.retry_failed,
        log=lambda line: print(line, flush=True),
        questions=args.questions,
        report=report.write_report,
    )
    c = out["counts"]
    print(
        f"{c['total']} trials: {c['skipped']} already stored, {c['ran']} ran ({c['failed']} failed) "
        f"on the {c['executor']} executor in {time.perf_counter() - t0:.1f} s"
    )
    _print_answers(out["analysis"], os.path.join(args.out, "report"))
    return 0


def _stored_data_shape(spec, rows):
    """The shape of the study's data as its stored grid trials record it (a
    :class:`~minigd.study.questions.StoredData`), or None when no trial of ``spec``'s data
    is stored: what ``minigd report`` uses instead of loading the data."""
    from minigd.study.questions import StoredData

    for c, r in rows:
        n = r.get("n_train")
        if c.data == spec.data and not c.search_id and isinstance(n, (int, float)) and n >= 1:
            return StoredData(
                int(n),
                int(c.sizes[0]),
                int(c.sizes[-1]),
                "classification" if c.loss == "cross_entropy" else "regression",
            )
    return None


def cmd_report(args) -> int:
    from minigd.report import write_report
    from minigd.study import ResultStore, analyze

    path = args.results
    if os.path.isdir(path):
        path = os.path.join(path, "results.sqlite")
    if not os.path.isfile(path):
        raise SystemExit(
            f"minigd report: RESULTS: expected a results.sqlite file or a study directory, got {args.results!r}"
        )
    with ResultStore(path) as store:
        rows = store.rows()
        spec = store.meta("spec")
        study_keys = store.meta("study_keys")
        probe = store.meta("throughput_probe")
    seed = 0
    if spec:  # only the trials of the study recorded in the file (not an earlier one, nor searches)
        from minigd.study import SweepSpec

        sw = SweepSpec.from_dict(spec)
        seed = sw.seed
        # the report never loads the data (a path named inside a results file is not the
        # user's to open): the data's shape comes from the stored trials themselves
        shape = _stored_data_shape(sw, rows)
        if isinstance(study_keys, list):  # the grid and its learning-rate extensions
            keys = set(map(str, study_keys))
        elif shape is not None:
            keys = {c.key for c in sw.trials(*shape.X_train.shape, shape.n_out)}
        else:
            keys = set()
        rows = [(c, r) for c, r in rows if c.key in keys]
    if not rows:
        import sqlite3

        from minigd.study.config import SCHEMA_VERSION

        try:  # trials stored by an older minigd: their keys (and meaning) differ
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                n_old = con.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error:
            n_old = 0
        if n_old:
            raise SystemExit(
                f"minigd report: {path} holds {n_old} trial(s), none of them of this study as this "
                f"minigd measures it (trial schema {SCHEMA_VERSION}: results stored by an older minigd "
                f"measured the noise scale and steps to target differently); re-run `minigd study` "
                f"into a fresh --out"
            )
        raise SystemExit(f"minigd report: {path} holds no trials yet")
    analysis = analyze(rows, probe=probe if isinstance(probe, list) else None, seed=seed)
    if spec:
        with ResultStore(path) as store:
            qkeys = store.meta("question_keys")
            if isinstance(qkeys, dict) and qkeys and shape is not None:
                from minigd.study.questions import QUESTIONS, QuestionContext, answer_questions

                ctx = QuestionContext(
                    spec=sw,
                    ds=shape,
                    main_rows=rows,
                    main_analysis=analysis,
                    main_probe=probe if isinstance(probe, list) else [],
                    store=store,
                    executor=None,
                    report_dir=args.out or os.path.join(os.path.dirname(os.path.abspath(path)), "report"),
                )
                analysis["questions"] = answer_questions(ctx, [q for q in QUESTIONS if q in qkeys])
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)), "report")
    write_report(analysis, out, spec=spec)
    _print_answers(analysis, out)
    return 0


def cmd_backends(args) -> int:
    import minigd as mg
    from minigd.backends import EMULATE_ENV, gpu_emulator

    for name, reason in mg.available_backends().items():
        line = f"{name:6s} {'available' if reason is None else 'unavailable: ' + reason}"
        if name == "gpu" and reason is None and gpu_emulator() is not None:
            line += (
                f" -- EMULATED on the CPU ({EMULATE_ENV}=1): the CUDA kernels run as C++ fibers, "
                f"for correctness checks only, far slower than any real backend"
            )
        print(line)
    return 0


def _check_warmup_args(args, parser) -> None:
    dts = [d.strip() for d in args.dtypes.split(",")]
    if not dts or any(d not in ("float32", "float64") for d in dts):
        parser.error(f"--dtypes: expected a comma-separated list of float32, float64, got {args.dtypes!r}")
    args.dtypes = dts


def cmd_warmup(args) -> int:
    from minigd.kernels._jit import cache_status
    from minigd.warmup import COVERS, announce_warmup, where

    say = lambda line: print(line, flush=True)
    loc = where()  # (imports the kernels: numba has tried the cache locations)
    if cache_status() != "enabled":  # nothing would be kept: say so and compile nothing
        print(f"minigd warmup: nothing to do: {loc}", file=sys.stderr)
        return 0
    say(f"minigd warmup: the CPU kernels of {'; '.join(COVERS)}")
    say(f"numba cache: {loc}")
    announce_warmup(args.dtypes, say)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minigd", description="Train MLPs and measure what batch size does.")
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser(
        "study",
        help="which batch size should I use? sweep, measure, analyse, report",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train the same model at many batch sizes (and learning rates, seeds, widths, depths), "
        "measure steps, examples and wall time to a target validation metric, throughput, "
        "memory and the gradient noise scale, then fit the steps/examples trade-off and say "
        "which batch size to use. With no options: a sensible sweep on scikit-learn's digits "
        "(12 batch sizes x 7 learning rates x 5 seeds, about a minute on 2 cores). Results go to OUT/results.sqlite, one row per trial: an "
        "interrupted study resumes where it stopped. The report (plots + summary) goes to OUT/report.",
    )
    g = st.add_argument_group("data")
    g.add_argument(
        "--data", default="digits", help="digits | teacher_student | linear_regression | a .npz/.csv/IDX file"
    )
    g.add_argument(
        "--val-fraction", type=arg_type("val_fraction"), default=0.2, help="held-out fraction for validation"
    )
    g.add_argument("--no-standardize", action="store_true", help="do not standardise features")
    g.add_argument("--data-seed", type=arg_type("seed"), default=0, help="seed of the train/validation split")
    g.add_argument(
        "--data-param",
        type=_key_value,
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a parameter of the data set's loader, repeatable: e.g. --data linear_regression "
        "--data-param noise=2.0 --data-param n=5000 (see minigd.data)",
    )
    g = st.add_argument_group("sweep")
    g.add_argument(
        "--batch-sizes",
        type=_batch_sizes_list,
        default="auto",
        help="e.g. 1,8,64,full; auto: powers of two up to the full batch",
    )
    g.add_argument(
        "--lr-policy",
        default="tuned",
        choices=["tuned", "linear", "sqrt", "fixed"],
        help="tuned: try --lr-grid multiples of the sqrt rule per batch size and keep the best "
        "(Shallue et al. 2018); linear/sqrt: scaling rule from --base-batch-size; fixed: --base-lr",
    )
    g.add_argument("--base-lr", type=arg_type("learning_rate"), default=0.02, help="learning rate at --base-batch-size")
    g.add_argument("--base-batch-size", type=arg_type("base_batch_size"), default=32)
    g.add_argument(
        "--lr-grid",
        type=list_arg_type("lr_multiplier", what="at least one multiplier"),
        default=(0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
        help="multipliers of the sqrt-rule rate tried by --lr-policy tuned",
    )
    g.add_argument(
        "--seeds",
        type=list_arg_type("seed", what="a comma-separated list of integers >= 0"),
        default=None,
        help="explicit trial seeds (default: --n-seeds seeds derived from --seed)",
    )
    g.add_argument("--n-seeds", type=arg_type("n_seeds"), default=5, help="trial seeds per (batch size, learning rate)")
    g.add_argument(
        "--lr-extend",
        type=arg_type("lr_extend"),
        default=3,
        help="--lr-policy tuned: where the best learning rate is at an edge of the grid, try "
        "the next factor of 2 past it, up to this many times",
    )
    g.add_argument(
        "--widths",
        type=list_arg_type("width", what="a comma-separated list of hidden widths >= 1"),
        default=(64,),
        help="hidden widths (1 allowed)",
    )
    g.add_argument(
        "--depths",
        type=list_arg_type("depth", what="a comma-separated list of numbers of hidden layers >= 0"),
        default=(1,),
        help="numbers of hidden layers (0 = linear model)",
    )
    g.add_argument("--activation", type=arg_type("activation"), default="relu")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    g.add_argument("--momentum", type=arg_type("momentum"), default=0.9)
    g.add_argument("--warmup-steps", type=arg_type("warmup_steps"), default=0, help="linear learning-rate warm-up")
    g.add_argument(
        "--bs-growth",
        type=_pairs,
        default=(),
        help="batch-size schedule instead of LR decay (Smith et al. 2018): EPOCH:FACTOR,... "
        "e.g. 10:2,20:4 doubles each trial's batch at epoch 10 and quadruples it at 20",
    )
    g.add_argument(
        "--max-epochs", type=arg_type("epochs"), default=50, help="budget per trial (large batches get >= 200 steps)"
    )
    g.add_argument(
        "--target-metric",
        default=None,
        choices=["val_accuracy", "val_loss"],
        help="default: val_accuracy for classification data, val_loss for regression data",
    )
    g.add_argument(
        "--target",
        type=float,
        default=None,
        help="target value of --target-metric (default: 0.95 for val_accuracy; a val_loss target must be given)",
    )
    g.add_argument("--backend", default="cpu")
    g.add_argument(
        "--batch-norm",
        type=_bn_arg,
        default="none",
        metavar="{none,before,after}",
        help="batch norm on the hidden layers, before or after the activation",
    )
    g.add_argument(
        "--ghost-batch-sizes",
        type=_ghost_list,
        default=(),
        help="ghost batch sizes to sweep next to the batch size, e.g. 4,8,16,none "
        "(none = the whole batch; needs --batch-norm)",
    )
    g.add_argument("--dropout", type=arg_type("dropout"), default=0.0, help="dropout on the hidden activations")
    g.add_argument(
        "--no-adaptive",
        action="store_true",
        help="leave out the adaptive arm: fit(batch_size='adaptive') from batch 32, at every learning "
        "rate and seed, compared with the recommended batch size (one more row of the report)",
    )
    g.add_argument(
        "--questions",
        default=None,
        metavar="all|NAME,...",
        help="also answer these questions, each with its own experiment: all, or a comma list of "
        "smallest_batch, sgd_batch_one, width_one, powers_of_two, lr_scaling, grow_vs_decay, "
        "generalisation, search_strategies",
    )
    g = st.add_argument_group("search (instead of the grid sweep)")
    g.add_argument(
        "--search",
        choices=["random", "bayes"],
        default=None,
        help="random or Bayesian (Optuna) search over batch size, lr, momentum, widths, depths",
    )
    g.add_argument("--n-trials", type=arg_type("n_trials"), default=30)
    g.add_argument(
        "--objective",
        default="time_to_target",
        choices=["time_to_target", "steps_to_target", "examples_to_target", "val_loss"],
    )
    g.add_argument(
        "--seed",
        type=arg_type("seed"),
        default=0,
        help="master seed of the study, grid or search: trial seeds (model initialisation, data "
        "order), the search's draws and the bootstrap of the intervals derive from it",
    )
    g = st.add_argument_group("execution")
    g.add_argument("--out", default="minigd-study", help="output directory")
    g.add_argument(
        "--workers",
        type=arg_type("workers"),
        default=None,
        help="local worker processes (default: one per CPU; 1 = in-process)",
    )
    g.add_argument(
        "--scheduler", default=None, help="Dask scheduler address (tcp://host:8786) to run trials on a cluster"
    )
    g.add_argument("--retry-failed", action="store_true", help="re-run trials stored as failed")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    st.set_defaults(func=cmd_study, check=_check_study_args, subparser=st)
    rp = sub.add_parser(
        "report",
        help="write the report (plots + summary) of a study's results",
        description="Analyse a study's results file and write the report.",
    )
    rp.add_argument("results", help="OUT/results.sqlite or the study directory OUT")
    rp.add_argument("--out", default=None, help="report directory (default: next to the results file, report/)")
    rp.set_defaults(func=cmd_report)
    d = sub.add_parser(
        "demo",
        help="train on scikit-learn's digits at several batch sizes and print a table",
        description="Train the same MLP on scikit-learn's bundled digits at several batch sizes "
        "and print steps, examples and time to a target validation accuracy.",
    )
    d.add_argument("--batch-sizes", default="1,8,32,128,full", help="comma-separated; 'full' = full batch")
    d.add_argument("--epochs", type=arg_type("epochs"), default=30, help="epoch budget per batch size (default 30)")
    d.add_argument(
        "--lr", type=arg_type("learning_rate"), default=0.02, help="learning rate at batch 32 (default 0.02)"
    )
    d.add_argument("--width", type=arg_type("width"), default=64, help="hidden width (default 64)")
    d.add_argument("--depth", type=arg_type("depth"), default=1, help="number of hidden layers (default 1)")
    d.add_argument(
        "--target", type=arg_type("target_accuracy"), default=0.95, help="target validation accuracy (default 0.95)"
    )
    d.add_argument("--backend", default="cpu", help="cpu (default), numpy or gpu")
    d.add_argument("--seed", type=arg_type("seed"), default=0)
    d.set_defaults(func=cmd_demo)
    b = sub.add_parser("backends", help="list the compute backends and why one is unavailable")
    b.set_defaults(func=cmd_backends)
    w = sub.add_parser(
        "warmup",
        help="compile the CPU kernels now (first run on a machine only; cached after)",
        description="Compile (or load from Numba's on-disk cache) every CPU kernel for the given "
        "dtypes, so that nothing timed later pays for compilation.",
    )
    w.add_argument("--dtypes", default="float32,float64", help="comma-separated: float32, float64")
    w.set_defaults(func=cmd_warmup, check=_check_warmup_args, subparser=w)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "check", None) is not None:  # loads the data: Ctrl-C may land here too
            args.check(args, args.subparser)
        return args.func(args)
    except Exception as exc:
        from minigd.errors import ResultStoreError
        from minigd.study.store import StudyLocked

        if isinstance(exc, StudyLocked):
            print(f"minigd {args.command}: error: --out: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, ResultStoreError):  # a damaged, empty or foreign results file
            print(f"minigd {args.command}: error: {exc}", file=sys.stderr)
            return 1
        import errno

        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(
                f"minigd {args.command}: error: the disk is full ({exc}); the finished trials are kept: "
                f"free some space and re-run the same command to resume",
                file=sys.stderr,
            )
            return 1
        raise
    except KeyboardInterrupt:
        if args.command != "study":
            print(f"\nminigd {args.command}: interrupted", file=sys.stderr)
            return 130
        path = os.path.join(args.out, "results.sqlite")
        stored = ""
        try:
            from minigd.study import ResultStore

            if os.path.isfile(path):
                with ResultStore(path) as store:
                    stored = f"{len(store)} finished trial(s) "
        except Exception:  # the message must not fail: it is all the user sees
            pass
        print(
            f"\nminigd study: interrupted; {stored or 'the finished trials '}kept in {path}; "
            f"re-run the same command to resume (only the missing trials run)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
