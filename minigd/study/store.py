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
import sqlite3
import time
import warnings

from minigd.errors import ResultStoreError

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
        self._warned: set = set()
        memory = self.path in ("", ":memory:")
        if not memory:
            d = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(d):
                raise FileNotFoundError(f"results: expected a path in an existing directory, got {self.path!r}")
            if os.path.lexists(self.path):  # an existing file must be a minigd results file
                self._check_file()
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._error(f"cannot be opened ({exc})") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed trial survives power loss
            if not memory:
                self._check_schema()
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self._db.close()
            raise self._error(self._why(exc)) from None
        except BaseException:
            self._db.close()
            raise

    # -- validating what is on disk ------------------------------------------------------------
    def _error(self, what: str) -> ResultStoreError:
        return ResultStoreError(
            f"results: expected a minigd results file (SQLite), got {self.path!r}, which {what}", self.path
        )

    @staticmethod
    def _why(exc) -> str:
        text = str(exc)
        if "full" in text:
            return f"cannot be written: the disk is full ({text})"
        return f"is damaged, truncated or not minigd's ({type(exc).__name__}: {text})"

    def _check_file(self) -> None:
        """Refuse (before SQLite touches it) a special file, an empty file and a file that is
        not an SQLite database: SQLite would turn an empty file into a fresh store (losing
        track of the study) and happily write tables into any other database."""
        from minigd._io import open_regular

        f, size = open_regular(self.path, "results", ResultStoreError)
        with f:
            head = f.read(100)
        if size == 0:
            raise self._error("is empty (0 bytes): not a store minigd wrote (remove it to start a fresh study)")
        if not head.startswith(_HEADER):
            raise self._error("is not an SQLite database (wrong header)")
        if len(head) < 100:
            raise self._error(f"is truncated ({size} bytes, shorter than an SQLite header)")

    def _check_schema(self) -> None:
        """An empty database becomes a store; one with tables must have minigd's."""
        tables = {
            r[0]
            for r in self._db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            ).fetchall()
        }
        if not tables:
            return
        for t, cols in _COLUMNS.items():
            if t not in tables:
                raise self._error(f"is a foreign database: no {t!r} table (it has {', '.join(sorted(tables))})")
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({t})").fetchall()}
            if not cols <= have:
                raise self._error(
                    f"is a foreign database: its {t!r} table lacks the column(s) {', '.join(sorted(cols - have))}"
                )

    def _sql(self, query: str, args=()) -> list:
        """Run ``query``; any SQLite error (a file damaged after it was opened, a full disk)
        becomes a :class:`ResultStoreError` naming the file."""
        try:
            return self._db.execute(query, args).fetchall()
        except sqlite3.Error as exc:
            raise self._error(self._why(exc)) from None

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
        self._sql(
            "INSERT OR REPLACE INTO trials (key, config, status, result, error, finished) VALUES (?,?,?,?,?,?)",
            (
                cfg.key,
                json.dumps(cfg.to_dict(), sort_keys=True),
                status,
                json.dumps(result),
                result.get("error"),
                time.time(),
            ),
        )

    def set_meta(self, name: str, value) -> None:
        self._sql("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, json.dumps(value)))

    # -- reading ----------------------------------------------------------------------------
    def meta(self, name: str, default=None):
        """The meta entry ``name`` (``default`` when absent), validated before use: the
        entries the study reads back (``spec``, ``study_keys``, ``question_keys``,
        ``throughput_probe``, ``probe:<name>``) must have their types -- a crafted ``spec``
        goes through :class:`~minigd.study.SweepSpec`'s own validation -- or
        :class:`ResultStoreError` names the file and the entry; a probe entry with a
        non-finite or negative time (or no key) is dropped with a warning."""
        rows = self._sql("SELECT value FROM meta WHERE name = ?", (name,))
        if not rows:
            return default
        try:
            if not isinstance(rows[0][0], str):
                raise ValueError(f"a {type(rows[0][0]).__name__}, not JSON text")
            value = json.loads(rows[0][0])
        except (ValueError, RecursionError) as exc:
            raise self._error(f"holds a damaged meta entry {name!r} ({_short(exc)})") from None
        check = _META_CHECKS.get(name) or (_check_probe if name.startswith("probe:") else None)
        if check is None or value is None:
            return value
        try:
            return check(self, name, value)
        except (TypeError, ValueError, KeyError, RecursionError) as exc:
            raise self._error(f"holds a meta entry {name!r} that does not validate ({_short(exc)})") from None

    def _valid_rows(self) -> list:
        """[(key, TrialConfig, result)] of the rows that validate, oldest first; each row that
        does not is skipped with a :class:`RuntimeWarning` naming its key (once per store)."""
        out = []
        for key, cfg, status, res in self._sql("SELECT key, config, status, result FROM trials ORDER BY finished"):
            try:
                out.append((key, *_check_row(key, cfg, status, res)))
            except (TypeError, ValueError, KeyError, RecursionError) as exc:
                if key not in self._warned:
                    self._warned.add(key)
                    warnings.warn(
                        f"results: {self.path!r}: skipping the damaged trial row {str(key)[:40]!r} "
                        f"({_short(exc)}); a resumed study runs that trial again",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        return out

    def keys(self, status: str | None = None) -> set:
        """The keys of the stored trials (with ``status`` only); rows that do not validate
        are not stored as far as a sweep is concerned: it runs them again (replacing them)."""
        return {k for k, _, r in self._valid_rows() if status is None or r["status"] == status}

    def rows(self) -> list:
        """[(TrialConfig, result dict)] for every stored trial, oldest first.

        Every row is validated before it is returned: its config must parse as a
        :class:`TrialConfig` with the types the study uses (sizes, batch size, learning
        rate, seed, names ...) and its result must be a JSON object with a ``status`` of
        "ok" or "failed" and numbers (or null) where numbers are measured.  **A row that does
        not validate is skipped with a RuntimeWarning naming its key** -- one damaged row
        must not cost the study its other results -- and a resumed study runs its trial
        again.  A file damaged beyond single rows raises :class:`ResultStoreError`."""
        return [(c, r) for _, c, r in self._valid_rows()]

    def __len__(self):
        return self._sql("SELECT COUNT(*) FROM trials")[0][0]


_HEADER = b"SQLite format 3\x00"
_COLUMNS = {"trials": {"key", "config", "status", "result", "finished"}, "meta": {"name", "value"}}


def _short(exc, n: int = 160) -> str:
    """An error's text, cut short: never a whole crafted value."""
    text = str(exc)
    return text if len(text) <= n else text[:n] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: TrialConfig fields and the type each must have in a stored row
_CFG_TYPES = {
    "activation": str,
    "loss": str,
    "dtype": str,
    "init": str,
    "backend": str,
    "optimizer": str,
    "lr_policy": str,
    "sampler": str,
    "target_metric": str,
    "search_id": str,
    "full_batch": bool,
    "nesterov": bool,
    "drop_last": bool,
    "stop_at_target": bool,
}
_CFG_INTS = {"batch_size": 1, "base_batch_size": 1, "warmup_steps": 0, "seed": 0, "max_epochs": 1, "min_steps": 0}
_CFG_NUMS = ("lr", "momentum", "weight_decay", "base_lr", "target", "dropout", "eval_rel_step")
#: result fields that are numbers (or null) when present
_RES_NUMS = (
    "steps_to_target",
    "examples_to_target",
    "time_to_target",
    "steps",
    "examples",
    "epochs",
    "train_time",
    "us_per_step",
    "throughput",
    "memory_bytes",
    "workspace_bytes",
    "final_val_loss",
    "final_val_accuracy",
    "final_train_loss",
    "final_train_accuracy",
    "gen_gap_loss",
    "gen_gap_accuracy",
    "batch_size",
    "n_train",
    "steps_to_target_interp",
    "examples_to_target_interp",
    "n_params",
)


def _check_row(key, cfg_text, status, res_text):
    """(TrialConfig, result) of one stored row, or TypeError/ValueError saying what is wrong."""
    if not isinstance(key, str):
        raise TypeError(f"its key is a {type(key).__name__}, not text")
    if not isinstance(cfg_text, str) or not isinstance(res_text, str):
        raise TypeError("its config or result is not JSON text")
    try:
        d, res = json.loads(cfg_text), json.loads(res_text)
    except ValueError as exc:
        raise ValueError(f"garbage JSON: {_short(exc, 80)}") from None
    if not isinstance(d, dict) or not isinstance(res, dict):
        raise TypeError("its config and result must be JSON objects")
    sizes = d.get("sizes")
    if not (isinstance(sizes, list) and len(sizes) >= 2 and all(_is_int(s) and s >= 1 for s in sizes)):
        raise ValueError("config: sizes must be a list of >= 2 positive integers")
    for k, t in _CFG_TYPES.items():
        if k in d and not isinstance(d[k], t):
            raise TypeError(f"config: {k} must be a {t.__name__}")
    adaptive = d.get("batch_size") == "adaptive"
    for k, low in _CFG_INTS.items():
        if k == "batch_size" and adaptive:
            continue
        if k in d and not (_is_int(d[k]) and d[k] >= low):
            raise ValueError(
                f"config: {k} must be an integer >= {low}" + (" or 'adaptive'" if k == "batch_size" else "")
            )
    settings = d.get("adaptive", [])
    if not (
        isinstance(settings, list)
        and all(
            isinstance(p, list)
            and len(p) == 2
            and isinstance(p[0], str)
            and (p[1] is None or isinstance(p[1], (str, int, float)))
            for p in settings
        )
    ):
        raise ValueError("config: adaptive must be a list of [setting, value] pairs")
    if bool(settings) != adaptive:
        raise ValueError("config: adaptive settings go with batch_size 'adaptive' (and only with it)")
    for k in _CFG_NUMS:
        if k in d and not _is_num(d[k]):
            raise ValueError(f"config: {k} must be a finite number")
    data = d.get("data", {})
    if not (
        isinstance(data, dict)
        and isinstance(data.get("name", ""), str)
        and isinstance(data.get("params", []), list)
        and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in data.get("params", []))
    ):
        raise TypeError("config: data must be an object with a name and [key, value] params")
    for k in ("bs_schedule", "lr_decay"):
        v = d.get(k, [])
        if not (isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 and all(map(_is_num, p)) for p in v)):
            raise ValueError(f"config: {k} must be a list of [number, number] pairs")
    try:
        cfg = TrialConfig.from_dict(d)
    except TypeError as exc:
        raise TypeError(f"config: not a TrialConfig ({_short(exc, 80)})") from None
    if adaptive:
        try:
            cfg.adaptive_spec()  # AdaptiveBatchSize's own checks of every setting
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config: adaptive settings do not validate ({_short(exc, 80)})") from None
    if res.setdefault("status", status) not in ("ok", "failed") or res["status"] != status:
        raise ValueError("result: status must be 'ok' or 'failed' (and match its column)")
    for k in _RES_NUMS:
        v = res.get(k)
        if v is not None and not _is_num(v):
            raise ValueError(f"result: {k} must be a finite number or null")
    if "reached" in res and not isinstance(res["reached"], bool):
        raise TypeError("result: reached must be true or false")
    for k, t in (("noise", list), ("curve", list), ("error", str)):
        if res.get(k) is not None and not isinstance(res[k], t):
            raise TypeError(f"result: {k} must be a {t.__name__} or null")
    if res.get("adaptive") is not None:
        _check_adaptive_result(res["adaptive"])
    return cfg, res


def _check_adaptive_result(a) -> None:
    """An adaptive trial's record (:func:`minigd.study.trial.adaptive_record`): the numbers
    the analysis turns into a wall time must be numbers."""
    if not isinstance(a, dict):
        raise TypeError("result: adaptive must be an object or null")
    if not (isinstance(a.get("candidates", []), list) and all(_is_int(c) and c >= 1 for c in a.get("candidates", []))):
        raise ValueError("result: adaptive.candidates must be a list of positive integers")
    for k, width in (("steps_by_batch", 2), ("step_s_by_batch", 2), ("decisions", 3)):
        v = a.get(k)
        if v is not None and not (
            isinstance(v, list) and all(isinstance(p, list) and len(p) == width and all(map(_is_num, p)) for p in v)
        ):
            raise ValueError(f"result: adaptive.{k} must be a list of {width}-number lists or null")
    for k in ("setup_s", "final_batch_size", "max_batch_size"):
        if a.get(k) is not None and not _is_num(a[k]):
            raise ValueError(f"result: adaptive.{k} must be a finite number or null")


def _check_spec(store, name, value):
    from .sweep import SweepSpec

    if not isinstance(value, dict) or not isinstance(value.get("data"), dict):
        raise TypeError("a sweep specification must be an object with a data object")
    SweepSpec.from_dict(value)  # SweepSpec's own validation (raises on nonsense)
    return value


def _check_str_list(store, name, value):
    if not (isinstance(value, list) and all(isinstance(k, str) for k in value)):
        raise TypeError("expected a list of trial keys (strings)")
    return value


def _check_question_keys(store, name, value):
    if not (
        isinstance(value, dict)
        and all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v) for k, v in value.items()
        )
    ):
        raise TypeError("expected an object of question name -> list of trial keys")
    return value


def _check_probe(store, name, value):
    """Probe entries: a list; an entry that is not an object with a key, a batch size and
    finite non-negative times is dropped with a warning (it would become a wall time)."""
    if not isinstance(value, list):
        raise TypeError("expected a list of throughput probe entries")
    out = []
    for i, e in enumerate(value):
        ok = (
            isinstance(e, dict)
            and isinstance(e.get("key"), str)
            and _is_int(e.get("batch_size"))
            and e["batch_size"] >= 1
            and all(_is_num(e.get(k)) and e[k] >= 0 for k in ("median_s", "lo_s", "hi_s"))
            and isinstance(e.get("round_s", []), list)
            and all(_is_num(x) and x >= 0 for x in e.get("round_s", []))
            and e.get("adaptive") in (None, "step", "setup")
        )
        if ok:
            out.append(e)
        else:
            warnings.warn(
                f"results: {store.path!r}: ignoring throughput probe entry {i} of meta {name!r}: not "
                f"an object with a key, a batch size and finite non-negative times (and an adaptive "
                f"kind, if any, of 'step' or 'setup')",
                RuntimeWarning,
                stacklevel=4,
            )
    return out


_META_CHECKS = {
    "spec": _check_spec,
    "study_keys": _check_str_list,
    "question_keys": _check_question_keys,
    "throughput_probe": _check_probe,
}


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
            raise StudyLocked(
                f"another study is already running in {os.fspath(out_dir)!r} "
                f"(process {holder} holds {path}); wait for it to finish or use "
                f"another output directory"
            ) from None
        except OSError as exc:  # a file system without locks (some network mounts): run unlocked
            warnings.warn(
                f"study_lock: cannot lock {path} ({exc}); running without the lock, so do "
                f"not start a second study on {os.fspath(out_dir)!r} meanwhile",
                RuntimeWarning,
                stacklevel=3,
            )
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
