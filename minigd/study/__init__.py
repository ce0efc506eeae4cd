"""The batch-size study: sweeps, search, execution, storage and analysis.

``run_study`` is what ``minigd study`` runs: build the trials of a :class:`SweepSpec` for a
dataset, run the missing ones (locally or on Dask) into a SQLite store, analyse them and
hand the analysis to a report writer (``minigd study`` passes :func:`minigd.report.write_report`:
plots + Markdown/HTML summary).  The arrow goes one way: ``minigd.report`` reads this
package's analysis, and nothing here imports ``minigd.report``.
"""

from .analysis import analyze, regime
from .config import DataSpec, TrialConfig
from .executors import DaskExecutor, LocalExecutor, SerialExecutor, make_executor
from .search import SearchSpace, search
from .store import ResultStore, StudyLocked, study_lock
from .sweep import SweepSpec, default_batch_sizes, run_sweep
from .trial import run_trial


def run_study(
    spec: SweepSpec,
    out_dir,
    *,
    workers=None,
    scheduler=None,
    progress=False,
    retry_failed=False,
    report=None,
    log=None,
    questions=(),
) -> dict:
    """Run (or resume) the sweep ``spec`` into ``out_dir/results.sqlite``, analyse it and,
    given a ``report`` writer, write the report to ``out_dir/report``.  Returns {"counts",
    "analysis", "report", "results", "probe"}.

    ``report``: the writer of the report, called as ``report(analysis, report_dir,
    spec=spec_dict)`` and returning the paths it wrote; ``analysis.json`` goes next to
    them.  :func:`minigd.report.write_report` is the standard one (what ``minigd study``
    passes)::

        from minigd.report import write_report
        run_study(spec, "out", report=write_report)

    None (or False) writes no report.  The study does not import the report package (the
    report reads the study's analysis, not the reverse), so the caller hands the writer in.

    The phases, each resumable (finished trials are stored one by one):

    1. the kernels are compiled (or loaded from Numba's cache) here, once, before any
       worker starts;
    2. the grid of ``spec`` runs (locally, or on Dask with ``scheduler``), with the adaptive
       arm beside it when ``spec.adaptive`` (:meth:`SweepSpec.adaptive_trials`);
    3. with ``lr_policy="tuned"``, a batch size whose best learning rate lies at an edge of
       the rates tried gets the next factor of 2 past that edge (every seed), up to
       ``spec.lr_extend`` times (:func:`lr_extensions`; the adaptive arm's rates too);
    4. the throughput probe times one step per batch size with nothing else running
       (:mod:`minigd.study.probe`; stored, and re-used when the study is resumed on the same
       host), and the adaptive run's steps and one-time set-up;
    5. the analysis (with its bootstrap seeded by ``spec.seed``);
    6. the arms of ``questions`` (names of :data:`minigd.study.questions.QUESTIONS`; their
       trials stored next to the grid's), answered into ``analysis["questions"]``;
    7. the report.

    ``log``: an optional callable taking one line of text (what is happening, for a console).
    The study holds an exclusive lock on ``out_dir`` (:func:`~minigd.study.store.study_lock`)
    from the first trial to the last file of the report: a second study started on the same
    directory meanwhile raises :class:`StudyLocked`."""
    import json
    import os

    from .executors import make_executor
    from .trial import load_data

    if report is False:
        report = None
    if report is not None and not callable(report):
        raise TypeError(
            f"report: expected a report writer such as minigd.report.write_report, or None or False, got {report!r}"
        )
    say = log or (lambda line: None)
    os.makedirs(out_dir, exist_ok=True)
    ds = load_data(spec.data, spec.dtype)
    if ds.task != "classification" and "accuracy" in spec.target_metric:
        raise ValueError(
            f"target_metric: expected 'val_loss' with a loss target for the regression "
            f"dataset {spec.data.name!r}, got {spec.target_metric!r}"
        )
    configs = spec.trials(len(ds.X_train), ds.X_train.shape[1], ds.n_out)
    configs += spec.adaptive_trials(len(ds.X_train), ds.X_train.shape[1], ds.n_out)
    path = os.path.join(out_dir, "results.sqlite")
    with study_lock(out_dir), ResultStore(path) as store:
        store.set_meta("spec", spec.to_dict())
        ex = make_executor(workers, scheduler)
        stored = store.keys("ok") if retry_failed else store.keys()
        if spec.backend == "cpu" and scheduler is None and any(c.key not in stored for c in configs):
            from minigd.warmup import announce_warmup

            announce_warmup((spec.dtype,), say)  # here, once: the workers load them from the cache
        counts = run_sweep(configs, store, executor=ex, progress=progress, retry_failed=retry_failed)
        study = list(configs)
        for _round in range(spec.lr_extend if spec.lr_policy == "tuned" else 0):
            keys = {c.key for c in study}
            extra = lr_extensions(spec, [(c, r) for c, r in store.rows() if c.key in keys])
            if not extra:
                break
            new = sum(c.key not in store.keys() for c in extra)
            say(
                f"learning-rate grid extended past its edge for {len({(c.sizes, c.batch_size) for c in extra})} "
                f"batch size(s) (or the adaptive run): {len(extra)} more trials"
                + (f" ({new} to run)" if new != len(extra) else "")
            )
            more = run_sweep(
                extra,
                store,
                executor=ex if len(extra) > 8 else make_executor(1, scheduler),
                progress=progress,
                retry_failed=retry_failed,
            )
            for k in ("total", "skipped", "ran", "failed"):
                counts[k] += more[k]
            study += extra
        keys = {c.key for c in study}
        store.set_meta("study_keys", sorted(keys))
        rows = [(c, r) for c, r in store.rows() if c.key in keys]
        probe = measured_probe(store, [c for c, r in rows if r.get("status") == "ok"], ex, spec.seed, say, rows=rows)
        analysis = analyze(rows, probe=probe, seed=spec.seed)
        if questions:  # (the context leaves the adaptive arm out of what the arms see)
            from .questions import QuestionContext, answer_questions

            ctx = QuestionContext(
                spec=spec,
                ds=ds,
                main_rows=rows,
                main_analysis=analysis,
                main_probe=probe,
                store=store,
                executor=ex,
                report_dir=os.path.join(out_dir, "report"),
                log=say,
                progress=progress,
            )
            analysis["questions"] = answer_questions(ctx, questions)
        files = []
        if report is not None:
            from minigd._io import atomic_write_text

            files = report(analysis, os.path.join(out_dir, "report"), spec=spec.to_dict())
            atomic_write_text(
                os.path.join(out_dir, "report", "analysis.json"), json.dumps(analysis, indent=1, default=str)
            )
    return {"counts": counts, "analysis": analysis, "report": files, "results": path, "probe": probe}


def lr_extensions(spec: SweepSpec, rows) -> list:
    """The trials that extend the learning-rate grid past its edge: for every architecture
    and batch size whose best learning rate (fewest median steps to the target, which it
    reached) is the largest (smallest) rate tried, the rate twice (half) that, for every
    seed -- unless that would go more than ``spec.lr_extend`` factors of 2 past the grid.
    The adaptive arm likewise, its best rate the one with the least median in-trial wall
    time to the target (:func:`minigd.study._adaptive.adaptive_best_lr`).
    Deterministic in the stored results, so a resumed study extends the same way."""
    import dataclasses
    import math
    from collections import defaultdict

    from minigd.optim.schedules import scale_lr

    from .analysis import best_lrs

    groups: defaultdict[tuple, list[tuple[TrialConfig, dict]]] = defaultdict(list)
    adaptive: defaultdict[tuple, list[tuple[TrialConfig, dict]]] = defaultdict(list)
    for cfg, res in rows:
        if res.get("status") == "ok":
            (adaptive if cfg.is_adaptive else groups)[
                (tuple(cfg.sizes), cfg.activation, cfg.optimizer, cfg.norm_label)
            ].append((cfg, res))
    lo_f, hi_f = min(spec.lr_grid), max(spec.lr_grid)
    cap = 2.0**spec.lr_extend * (1 + 1e-9)
    out = []
    for items in adaptive.values():  # the adaptive arm: its best rate by wall time (in-trial here)
        from ._adaptive import adaptive_best_lr

        info = adaptive_best_lr(items)
        if info is None or info["at_edge"] not in ("low", "high"):
            continue
        tmpl = next(c for c, _ in items if c.lr == info["best_lr"])
        lr = info["best_lr"] * (2.0 if info["at_edge"] == "high" else 0.5)
        b0 = int(dict(tmpl.adaptive).get("min", spec.adaptive_min))
        f = lr / scale_lr(spec.base_lr, b0, spec.base_batch_size, "sqrt")
        if math.isfinite(lr) and lo_f / cap <= f <= hi_f * cap:
            out += [dataclasses.replace(tmpl, lr=float(lr), seed=int(seed)) for seed in spec.trial_seeds()]
    for items in groups.values():
        for B, info in sorted(best_lrs(items).items()):
            edge = info.get("at_edge")
            if edge not in ("low", "high"):
                continue
            tmpl = next(c for c, _ in items if c.batch_size == B and c.lr == info["best_lr"])
            lr = info["best_lr"] * (2.0 if edge == "high" else 0.5)
            f = lr / scale_lr(spec.base_lr, B, spec.base_batch_size, "sqrt")
            if not (math.isfinite(lr) and lo_f / cap <= f <= hi_f * cap):
                continue
            for seed in spec.trial_seeds():
                out.append(dataclasses.replace(tmpl, lr=float(lr), seed=int(seed)))
    return out


def measured_probe(store, configs, executor, seed: int, say=lambda line: None, *, rows=()) -> list:
    """The throughput probe's entries for ``configs``: re-used from ``store`` when it holds
    an entry for every step cost they need, measured on this host; else measured now (on
    the Dask cluster when ``executor`` is one, else in this process) and stored.
    ``rows``: ``(config, result)`` pairs whose adaptive trials need the adaptive entries
    (:func:`~minigd.study.probe.adaptive_probe_jobs`)."""
    import platform

    from .probe import adaptive_probe_jobs, adaptive_probe_key, probe, probe_jobs, probe_key

    jobs = probe_jobs(configs)
    ajobs = adaptive_probe_jobs(rows)
    need = {probe_key(c) for c in jobs} | {adaptive_probe_key(c, k) for k, c in ajobs}
    old = store.meta("throughput_probe") or []
    have = {e.get("key"): e for e in old if isinstance(e, dict)}
    if (
        need
        and all(k in have for k in need)
        and (executor.name == "dask" or all(have[k].get("host") == platform.node() for k in need))
    ):
        return [have[k] for k in sorted(need)]
    if not jobs and not ajobs:
        return []
    say(
        f"timing one training step at each of {len(jobs)} batch size(s) (throughput probe, one thread, "
        f"nothing else running)"
        + (
            f", and the adaptive run's steps at {sum(k == 'step' for k, _ in ajobs)} batch size(s) and its set-up"
            if ajobs
            else ""
        )
        + " ..."
    )
    if executor.name == "dask":
        import functools

        entries = next(iter(executor.run(functools.partial(probe, seed=seed, adaptive=ajobs), [jobs])))[1]
        if isinstance(entries, dict):  # the cluster failed it
            raise RuntimeError(f"throughput probe: failed on the Dask cluster: {entries.get('error')}")
    else:
        entries = probe(jobs, seed=seed, adaptive=ajobs)
    store.set_meta("throughput_probe", entries)
    return entries


__all__ = [
    "analyze",
    "regime",
    "DataSpec",
    "TrialConfig",
    "DaskExecutor",
    "LocalExecutor",
    "SerialExecutor",
    "make_executor",
    "SearchSpace",
    "search",
    "ResultStore",
    "StudyLocked",
    "SweepSpec",
    "default_batch_sizes",
    "run_sweep",
    "run_trial",
    "run_study",
    "lr_extensions",
    "measured_probe",
]
