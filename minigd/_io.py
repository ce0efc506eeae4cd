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
    if not os.path.isdir(d):  # else open() names the temporary file, not the user's path
        raise FileNotFoundError(f"path: expected a file in an existing directory, got {path!r} (no directory {d!r})")
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


def check_writable_dir(d, what: str, error: type = ValueError) -> None:
    """Raise ``error`` naming ``what`` unless a file can be created in the existing
    directory ``d`` (tried for real, with a temporary file removed at once: permission
    bits say nothing for root, a read-only mount or a full disk)."""
    d = os.fspath(d)
    tmp = os.path.join(d, f".minigd-write-check.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise error(f"{what}: expected a directory this process can write, got {d!r} ({exc.strerror or exc})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


# ============================================================================ reading hostile paths
def _file_kind(mode: int) -> str:
    """What a non-regular ``st_mode`` is, in words."""
    import stat

    for test, what in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def open_regular(path, what: str, error: type = ValueError):
    """Open ``path`` for binary reading only if it is a regular file; returns
    ``(file object, size in bytes)``.

    ``/dev/zero``, a FIFO, a directory, a socket or a device is refused with ``error``
    (``"<what>: expected a regular file, got '<path>' which is a FIFO (named pipe)"``)
    before anything is read: it is checked with :func:`os.stat` before opening (opening
    some devices has side effects) and again with :func:`os.fstat` on what was opened
    (the path may have been swapped in between).  The open itself never blocks: it uses
    ``O_NONBLOCK`` (a FIFO without a writer would otherwise hang ``open``).  A missing
    file is :class:`FileNotFoundError`; other ``OSError`` (permissions) propagate.
    """
    import stat

    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: expected an existing file, got {path!r} (no such file)") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what}: expected a regular file, got {path!r} which is {_file_kind(st.st_mode)}")
    flags = os.O_RDONLY
    for name in ("O_NONBLOCK", "O_NOCTTY", "O_CLOEXEC", "O_BINARY"):
        flags |= getattr(os, name, 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what}: expected a regular file, got {path!r} which is {_file_kind(st.st_mode)}")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return f, st.st_size


def read_regular(path, what: str, limit: int, error: type = ValueError) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`), refused with
    ``error`` when it holds more than ``limit`` bytes (checked before reading, and while
    reading: a file that grows is read no further than ``limit + 1`` bytes)."""
    f, size = open_regular(path, what, error)
    with f:
        if size > limit:
            raise error(f"{what}: expected a file of at most {limit} bytes, got {os.fspath(path)!r} of {size} bytes")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise error(
            f"{what}: expected a file of at most {limit} bytes, got {os.fspath(path)!r}, "
            f"which grew past that while being read"
        )
    return data


class GzipError(ValueError):
    """Damaged gzip data (:func:`gunzip_capped`); the message says what, without a path."""


class GzipLimitError(GzipError):
    """gzip data that decompresses to more than the cap (a decompression bomb?)."""


def gunzip_capped(data: bytes, limit: int) -> bytes:
    """Decompress gzip ``data`` (one member or several, concatenated; trailing NUL padding
    allowed) into at most ``limit`` bytes.  A gzip bomb raises :class:`GzipLimitError` as
    soon as the output passes ``limit``, without ever holding more than that (plus one
    64 KiB input chunk); a truncated or damaged stream (CRC or length mismatch included:
    zlib checks the gzip trailer) raises :class:`GzipError`.  Callers add the path."""
    import zlib

    chunk = 1 << 16
    mv = memoryview(data)
    n = len(data)
    pos = 0
    parts = []
    total = 0
    while True:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            while not d.eof:
                if d.unconsumed_tail:
                    inp = d.unconsumed_tail
                elif pos < n:
                    inp = mv[pos : pos + chunk]
                    pos += len(inp)
                else:
                    inp = b""
                buf = d.decompress(inp, limit - total + 1)
                total += len(buf)
                if total > limit:
                    raise GzipLimitError(
                        f"it decompresses to more than {limit} bytes (refused there: a decompression bomb?)"
                    )
                parts.append(buf)
                if not buf and not len(inp):
                    break
        except zlib.error as exc:
            raise GzipError(f"damaged gzip data ({exc})") from None
        if not d.eof:
            raise GzipError("truncated gzip data (the stream ends early)")
        pos -= len(d.unused_data)
        if pos >= n:
            break
        if data[pos : pos + 2] != b"\x1f\x8b":
            if data.count(b"\0", pos) == n - pos:  # NUL padding after the last member
                break
            raise GzipError(f"{n - pos} trailing bytes after the gzip data that are not a gzip member")
    return b"".join(parts)


def read_npy_header(f, error: type = ValueError):
    """The header of a ``.npy`` stream ``f`` (positioned at its start): ``(version, shape,
    fortran_order, dtype)``, leaving ``f`` at the data.  Only format versions 1.0 and 2.0
    are read (nothing reached through a pickle); any other raises ``error`` naming it."""
    import numpy as np

    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dt = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dt = np.lib.format.read_array_header_2_0(f)
    else:
        raise error(f"an unsupported .npy format version {version}")
    return version, shape, fortran, dt
