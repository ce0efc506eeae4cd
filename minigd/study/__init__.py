"""The batch-size study: sweeps, search, execution, storage and analysis.

``run_study`` is what ``minigd study`` runs: build the trials of a :class:`SweepSpec` for a
dataset, run the missing ones (locally or on Dask) into a SQLite store, analyse them and
write a report (plots + Markdown/HTML summary).
"""
from .analysis import analyze, regime
from .config import DataSpec, TrialConfig
from .executors import DaskExecutor, LocalExecutor, SerialExecutor, make_executor
from .search import SearchSpace, search
from .store import ResultStore, StudyLocked, study_lock
from .sweep import SweepSpec, default_batch_sizes, run_sweep
from .trial import run_trial


def run_study(spec: SweepSpec, out_dir, *, workers=None, scheduler=None, progress=False,
              retry_failed=False, report=True) -> dict:
    """Run (or resume) the sweep ``spec`` into ``out_dir/results.sqlite``, analyse it and
    write the report to ``out_dir/report``.  Returns {"counts", "analysis", "report"}.

    The sweep holds an exclusive lock on ``out_dir`` (:func:`~minigd.study.store.study_lock`):
    a second study started on the same directory meanwhile raises :class:`StudyLocked`."""
    import json
    import os

    from .trial import load_data

    os.makedirs(out_dir, exist_ok=True)
    ds = load_data(spec.data, spec.dtype)
    if ds.task != "classification" and "accuracy" in spec.target_metric:
        raise ValueError(f"target_metric: expected 'val_loss' with a loss target for the regression "
                         f"dataset {spec.data.name!r}, got {spec.target_metric!r}")
    configs = spec.trials(len(ds.X_train), ds.X_train.shape[1], ds.n_out)
    path = os.path.join(out_dir, "results.sqlite")
    with study_lock(out_dir), ResultStore(path) as store:
        store.set_meta("spec", spec.to_dict())
        counts = run_sweep(configs, store, workers=workers, scheduler=scheduler, progress=progress,
                           retry_failed=retry_failed)
        keys = {c.key for c in configs}
        rows = [(c, r) for c, r in store.rows() if c.key in keys]
    analysis = analyze(rows)
    files = []
    if report:
        from minigd.report import write_report
        files = write_report(analysis, os.path.join(out_dir, "report"), spec=spec.to_dict())
        from minigd._io import atomic_write_text
        atomic_write_text(os.path.join(out_dir, "report", "analysis.json"),
                          json.dumps(analysis, indent=1, default=str))
    return {"counts": counts, "analysis": analysis, "report": files, "results": path}


__all__ = ["analyze", "regime", "DataSpec", "TrialConfig", "DaskExecutor", "LocalExecutor",
           "SerialExecutor", "make_executor", "SearchSpace", "search", "ResultStore", "StudyLocked", "SweepSpec",
           "default_batch_sizes", "run_sweep", "run_trial", "run_study"]
