"""Atomic file writes: a reader (or a crash) never sees half a file.

Write to a fresh temporary name in the destination directory, flush and fsync, then
``os.replace`` it over the destination (atomic on POSIX and Windows).
"""
from __future__ import annotations

import contextlib
import os
import secrets


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically,
    on error it is removed and ``path`` is untouched."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    if not os.path.isdir(d):   # else open() names the temporary file, not the user's path
        raise FileNotFoundError(f"path: expected a file in an existing directory, got {path!r} "
                                f"(no directory {d!r})")
    # a fresh name, not mkstemp: the file gets the usual umask permissions, not 0600
    tmp = os.path.join(d, f".{base}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return os.fspath(path)
