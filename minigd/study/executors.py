"""Where trials run: in this process, a local process pool (default), or a Dask cluster.

Every executor has one method, ``run(fn, items)``, an iterator of ``(item, result)`` pairs
in completion order; the sweep records each result as it arrives.  ``fn`` must never raise
(``run_trial`` turns errors into a "failed" result); what an executor adds is surviving
its workers: a worker that dies is replaced and its trial retried once, then recorded as
failed.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import signal

#: environment that pins a worker to one thread (set before numpy/numba load in the worker)
ONE_THREAD_ENV = {"NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MAX_ATTEMPTS = 2


def _died(item, why) -> dict:
    return {"status": "failed", "error": f"{why}; tried {MAX_ATTEMPTS} times"}


def cpu_model(default: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo; elsewhere ``default``, or else what
    :mod:`platform` knows (processor, then machine), or "this machine"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if default is not None:
        return default
    import platform

    return platform.processor() or platform.machine() or "this machine"


def thread_counts() -> dict:
    """The threads this process computes with now: ``{"blas_threads", "numba_threads"}``
    (``blas_threads`` is None when threadpoolctl is not installed or no BLAS is loaded).
    Every trial records it next to its timings."""
    out = {"blas_threads": None, "numba_threads": None}
    try:
        import numba

        out["numba_threads"] = int(numba.get_num_threads())
    except Exception:  # pragma: no cover - numba is a core dependency
        pass
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover - depends on the install (scikit-learn brings it)
        return out
    blas = [int(i["num_threads"]) for i in threadpool_info() if i.get("user_api") == "blas"]
    if blas:
        out["blas_threads"] = max(blas)
    return out


@contextlib.contextmanager
def one_thread():
    """Compute with one thread in *this* process, as the pool workers do (they get
    :data:`ONE_THREAD_ENV` before numpy loads): BLAS through threadpoolctl, Numba through
    ``numba.set_num_threads``; restored on exit.  Without threadpoolctl the BLAS threads
    cannot be changed once numpy is loaded; a warning says so (the trials record the count)."""
    import warnings

    limiter = contextlib.nullcontext()
    # numba's compiled np.dot calls SciPy's own OpenBLAS: load it before the limit is applied,
    # or it arrives later (at the first compiled GEMM) with its default thread count
    with contextlib.suppress(ImportError):
        import scipy.linalg  # noqa: F401
    try:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(limits=1)
    except ImportError:  # pragma: no cover - depends on the install
        warnings.warn(
            "--workers 1: threadpoolctl is not installed, so BLAS threads are not pinned to one "
            "as in the worker pool; timings may differ from the pool's "
            "(pip install threadpoolctl)",
            RuntimeWarning,
            stacklevel=3,
        )
    import numba

    old_numba = numba.get_num_threads()
    # not ONE_THREAD_ENV: Numba re-reads NUMBA_NUM_THREADS when it compiles and refuses a
    # value other than the thread pool it already launched
    with limiter:
        numba.set_num_threads(1)
        try:
            yield
        finally:
            numba.set_num_threads(old_numba)


class SerialExecutor:
    """Run trials one after another in this process (debugging, tiny sweeps), pinned to
    one thread like the pool workers (:func:`one_thread`), so timings match the pool's."""

    name = "serial"
    n_workers = 1

    def run(self, fn, items):
        for item in items:
            with one_thread():
                res = fn(item)
            yield item, res


@contextlib.contextmanager
def _env(extra: dict):
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class LocalExecutor:
    """A pool of worker processes on this machine, each pinned to one thread.

    Parameters
    ----------
    n_workers : int, optional
        Default: the number of CPUs available to this process.

    A worker that dies (a crash, the OOM killer, ``kill -9``) breaks the pool; the pool is
    rebuilt and the unfinished trials run again.  Only the trial whose worker died is
    charged an attempt: workers report each start through a queue, the trials queued
    behind are not charged, and when several trials were running at the break (the
    culprit unknown) each of them re-runs alone in a one-worker pool first, so a trial that
    keeps killing its worker fails by itself and never takes the trials that happened to
    run beside it (bystanders) down with it.
    """

    name = "local"

    def __init__(self, n_workers: int | None = None):
        if n_workers is None:
            n_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
            raise ValueError(f"n_workers: expected a positive int, got {n_workers!r}")
        self.n_workers = n_workers

    def run(self, fn, items):
        items = list(items)
        attempts = {i: 0 for i in range(len(items))}
        todo = list(range(len(items)))
        suspects = []  # running when a pool broke, culprit unknown: each re-runs alone
        ctx = multiprocessing.get_context("spawn")
        # workers are spawned lazily (at submit): keep the one-thread environment in place
        # for the whole run, so every worker inherits it before it imports numpy
        with _env(ONE_THREAD_ENV):
            while todo or suspects:
                # a suspect runs alone in a one-worker pool: if that pool breaks, it was its
                # own trial that killed the worker, and only it is charged an attempt
                if suspects:
                    batch, n_workers = [suspects.pop(0)], 1
                else:
                    batch, todo, n_workers = todo, [], self.n_workers
                started = ctx.SimpleQueue()  # put() writes synchronously: it survives os._exit
                pool = cf.ProcessPoolExecutor(
                    n_workers, mp_context=ctx, initializer=_init_worker, initargs=(started, os.getpid())
                )
                futures = {pool.submit(_announce_and_run, fn, i, items[i]): i for i in batch}
                broken = []
                try:
                    for fut in cf.as_completed(futures):
                        i = futures[fut]
                        try:
                            res = fut.result()
                        except cf.process.BrokenProcessPool:
                            broken.append(i)
                            continue
                        yield items[i], res
                except BaseException:
                    # Ctrl-C, or the caller stopped iterating: nobody wants the running
                    # trials' results, so end the workers now rather than wait for them
                    _terminate_workers(pool)
                    raise
                finally:
                    pool.shutdown(wait=False, cancel_futures=True)
                if not broken:
                    continue
                ran = _drain(started) & set(broken)
                if len(batch) == 1 or len(ran) == 1:
                    culprits = ran or set(broken)  # the one trial running when its worker died
                else:
                    culprits = set()  # several were running: find out which alone
                    suspects.extend(sorted(ran or broken))
                for i in broken:
                    if i in culprits:
                        attempts[i] += 1
                        if attempts[i] >= MAX_ATTEMPTS:
                            yield items[i], _died(items[i], "the worker process died while running it")
                        else:
                            todo.append(i)
                    elif i not in suspects:
                        todo.append(i)  # queued behind, never started: not charged


_STARTED = None
#: seconds between a worker's checks that the study process is still alive
PARENT_POLL_S = 0.5


def _init_worker(q, parent_pid: int):
    global _STARTED
    _STARTED = q
    # Ctrl-C reaches the whole process group: the study process handles it (and ends the
    # workers); a worker printing its own KeyboardInterrupt traceback would only be noise
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent_pid)


def _terminate_workers(pool) -> None:
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            p.terminate()


def _exit_with_parent(parent_pid: int) -> None:
    """End this worker when the process that started it dies.

    A parent killed with SIGKILL (or crashing) cannot shut its pool down: its workers would
    wait for work, or block writing a result into a pipe nobody reads, forever.  A daemon
    thread checks every :data:`PARENT_POLL_S` seconds whether the worker has been
    re-parented (``os.getppid()`` changed, as POSIX does when a parent dies; Windows keeps
    the dead parent's id, so there the check never fires) and then calls ``os._exit`` from
    its own thread, so a main thread stuck in a trial or a blocking write does not hold it
    up.  The check runs twice a second and costs microseconds, far below what a trial's
    median step timing can see.
    """
    import threading

    def alive() -> bool:
        return os.getppid() == parent_pid

    def watch():
        import time

        while alive():
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    if not alive():  # the parent died before this worker got going
        os._exit(1)
    threading.Thread(target=watch, name="minigd-parent-watch", daemon=True).start()


def _announce_and_run(fn, i, item):
    _STARTED.put(i)
    return fn(item)


def _drain(q) -> set:
    out = set()
    try:
        while not q.empty():
            out.add(q.get())
    except (OSError, EOFError):  # a pipe broken with the pool
        pass
    return out


class DaskExecutor:
    """Trials on a Dask distributed cluster.

    Parameters
    ----------
    client_or_address : dask.distributed.Client or str
        A client, or the scheduler address (``tcp://host:8786``).  Workers need minigd
        installed; pin their threads (``--nthreads 1`` and NUMBA_NUM_THREADS=1) for honest
        timings.
    """

    name = "dask"

    def __init__(self, client_or_address):
        try:
            from dask.distributed import Client
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError("the Dask executor needs dask.distributed: pip install 'minigd[study]'") from exc
        self.client = client_or_address if isinstance(client_or_address, Client) else Client(client_or_address)
        self.n_workers = max(1, len(self.client.scheduler_info().get("workers", {})))

    def run(self, fn, items):
        from dask.distributed import as_completed

        items = list(items)
        futures = {}
        for i, item in enumerate(items):
            futures[self.client.submit(fn, item, pure=False, retries=MAX_ATTEMPTS - 1)] = i
        try:
            for fut in as_completed(list(futures)):
                i = futures[fut]
                try:
                    res = fut.result()
                except Exception as exc:  # KilledWorker, or the task failing on the worker
                    res = _died(items[i], f"the trial failed on the Dask cluster ({type(exc).__name__}: {exc})")
                yield items[i], res
        finally:
            for fut in futures:
                fut.cancel()


def make_executor(workers=None, scheduler=None):
    """Dask when a scheduler (address or Client) is given, else a local pool
    (``workers=1`` runs in-process)."""
    if scheduler is not None:
        return DaskExecutor(scheduler)
    if workers == 1:
        return SerialExecutor()
    return LocalExecutor(workers)
