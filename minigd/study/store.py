"""The results store: one SQLite file, one row per trial, keyed by its full configuration.

Every finished trial is committed in its own transaction the moment its result arrives, so
an interrupted sweep (Ctrl-C, a killed worker, a crashed machine) loses at most the trials
that were still running; SQLite's journal makes each commit atomic.  Resuming reads the
keys already stored and runs only the missing trials.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
import sqlite3
import time

from .config import TrialConfig

_SCHEMA = """
CREATE TABLE IF NOT EXISTS trials (
    key TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    status TEXT NOT NULL,          -- 'ok' or 'failed'
    result TEXT NOT NULL,
    error TEXT,
    finished REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _finite_json(x):
    """Non-finite floats become None: the stored JSON stays standard (no NaN/Infinity)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_json(v) for v in x]
    return x


class ResultStore:
    """SQLite-backed store of trial results.

    Parameters
    ----------
    path : str
        The database file (created if missing).  Opening a file that is not a minigd
        results database is a clear error.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        d = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(d):
            raise FileNotFoundError(f"results: expected a path in an existing directory, got {self.path!r}")
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")   # a committed trial survives power loss
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"results: expected a minigd SQLite results file, got {self.path!r} ({exc})") from exc

    def close(self):
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- writing ----------------------------------------------------------------------------
    def put(self, cfg: TrialConfig, result: dict) -> None:
        """Record one trial (replacing an earlier row for the same key), atomically."""
        status = result.get("status", "failed")
        result = _finite_json(result)
        self._db.execute(
            "INSERT OR REPLACE INTO trials (key, config, status, result, error, finished) VALUES (?,?,?,?,?,?)",
            (cfg.key, json.dumps(cfg.to_dict(), sort_keys=True), status, json.dumps(result),
             result.get("error"), time.time()))

    def set_meta(self, name: str, value) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, json.dumps(value)))

    # -- reading ----------------------------------------------------------------------------
    def meta(self, name: str, default=None):
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return default if row is None else json.loads(row[0])

    def keys(self, status: str | None = None) -> set:
        q = "SELECT key FROM trials" + (" WHERE status = ?" if status else "")
        return {r[0] for r in self._db.execute(q, (status,) if status else ())}

    def rows(self) -> list:
        """[(TrialConfig, result dict)] for every stored trial, oldest first."""
        out = []
        for cfg, res in self._db.execute("SELECT config, result FROM trials ORDER BY finished"):
            out.append((TrialConfig.from_dict(json.loads(cfg)), json.loads(res)))
        return out

    def __len__(self):
        return self._db.execute("SELECT COUNT(*) FROM trials").fetchone()[0]


#: the lock file a running study holds in its output directory
LOCK_NAME = ".minigd-study.lock"


class StudyLocked(RuntimeError):
    """Another study is running on the same output directory."""


@contextlib.contextmanager
def study_lock(out_dir):
    """Hold an exclusive lock on the output directory ``out_dir`` for the duration.

    Two studies on one directory would each run every trial (each reads the stored keys
    before the other has written any): the second one raises :class:`StudyLocked` at once,
    naming the directory and the process that holds it.  The lock is ``fcntl.flock`` on
    ``out_dir/.minigd-study.lock``: the operating system releases it when the holder exits,
    however it exits (SIGKILL included), so a stale lock file never blocks a re-run.
    Where ``fcntl`` does not exist (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = os.path.join(os.fspath(out_dir), LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise StudyLocked(f"another study is already running in {os.fspath(out_dir)!r} "
                              f"(process {holder} holds {path}); wait for it to finish or use "
                              f"another output directory") from None
        except OSError as exc:   # a file system without locks (some network mounts): run unlocked
            warnings.warn(f"study_lock: cannot lock {path} ({exc}); running without the lock, so do "
                          f"not start a second study on {os.fspath(out_dir)!r} meanwhile", RuntimeWarning,
                          stacklevel=3)
            yield
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
