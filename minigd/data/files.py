"""Reading user data files: ``.npz``, ``.csv``/``.tsv`` and MNIST-style IDX, plain or gzip.

Every reader treats its file as hostile: only a regular file is opened, at most
:data:`MAX_DATA_BYTES` are read, compressed data is expanded with a cap (a decompression
bomb is refused, not expanded), a ``.npz`` entry's header is checked against its size
before anything is allocated and pickles are refused, and every malformed file is a
ValueError naming the argument, what was expected and what was found.  Each loader returns
a :class:`~minigd.data.dataset.RawData` for the pipeline (:mod:`minigd.data.pipeline`).
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import os
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np

from minigd._io import GzipError, GzipLimitError, gunzip_capped, read_npy_header, read_regular
from minigd._validation import _got, check_choice

from .dataset import TASKS, RawData

__all__ = ["read_idx", "MAX_DATA_BYTES", "MAX_EXPANSION", "EXPANSION_FLOOR"]


_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_NAME = re.compile(r"idx\d+-ubyte(\.gz)?$|\.idx\d*(\.gz)?$", re.IGNORECASE)


#: the largest data file read, in bytes, and the most a compressed one (a ``.gz`` file, a
#: deflated ``.npz`` entry) may decompress to; a module attribute, so it can be raised
MAX_DATA_BYTES = 1 << 31
#: a compressed file may decompress to at most this many times its own size (above
#: :data:`EXPANSION_FLOOR`): real data compresses far less (MNIST: ~5x), a bomb of zeros ~1000x
MAX_EXPANSION = 256
#: below this many decompressed bytes the expansion ratio is not checked
EXPANSION_FLOOR = 64 << 20


def _decompressed_limit(n_compressed: int) -> int:
    return min(MAX_DATA_BYTES, max(EXPANSION_FLOOR, MAX_EXPANSION * n_compressed))


def _read_bytes(path: Path, arg: str) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic.

    Only a regular file is opened (``/dev/zero``, a FIFO, a socket, a device or a
    directory is a ValueError at once, without blocking); at most :data:`MAX_DATA_BYTES`
    are read, and gzip data is decompressed with a cap (:func:`_decompressed_limit`):
    a decompression bomb is refused, not expanded."""
    try:
        data = read_regular(path, arg, MAX_DATA_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(f"{arg}: expected an existing file, got {str(path)!r} (no such file)") from None
    except OSError as exc:
        raise ValueError(f"{arg}: expected a readable file, got {str(path)!r} ({exc.strerror or exc})") from exc
    if data[:2] == b"\x1f\x8b":
        limit = _decompressed_limit(len(data))
        try:
            data = gunzip_capped(data, limit)
        except GzipLimitError as exc:
            raise ValueError(
                f"{arg}: expected a gzip file that decompresses to at most {limit} bytes "
                f"({MAX_EXPANSION} times its {len(data)} bytes, at least {EXPANSION_FLOOR}, "
                f"at most MAX_DATA_BYTES={MAX_DATA_BYTES}), got {str(path)!r}: {exc}"
            ) from None
        except GzipError as exc:
            raise ValueError(
                f"{arg}: expected a valid gzip file, got {str(path)!r} which could not be decompressed ({exc})"
            ) from None
    return data


def read_idx(path, *, arg: str = "path") -> np.ndarray:
    """Read one IDX file (the MNIST format), plain or gzip-compressed.

    Parameters
    ----------
    path : str or os.PathLike
    arg : str
        The argument name used in error messages.

    Returns
    -------
    ndarray
        Shape from the header, in the native-endian version of the stored dtype.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Bad magic (the first two bytes must be zero), an unknown type code, zero
        dimensions, or a data section shorter or longer than the header says.

    Notes
    -----
    Header: two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a
    big-endian uint32; the data follow, big-endian, row-major.
    """
    path = Path(path)
    data = _read_bytes(path, arg)
    where = f"{arg} ({str(path)!r})"
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{where}: expected an IDX file starting with magic 0x00 0x00 <type> <ndims>, "
            f"got bytes {data[:4].hex(' ') or '(empty file)'}"
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(
            f"{where}: expected an IDX type code in {[hex(c) for c in _IDX_DTYPES]}, got {hex(code)} (bad magic)"
        )
    if ndim == 0:
        raise ValueError(f"{where}: expected at least 1 dimension in the IDX header, got 0 (bad magic)")
    head = 4 + 4 * ndim
    if len(data) < head:
        raise ValueError(f"{where}: truncated IDX header: expected {head} bytes for {ndim} dimensions, got {len(data)}")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dt = _IDX_DTYPES[code]
    if 0 in dims:
        raise ValueError(f"{where}: expected an IDX file holding at least one value, got dimensions {dims}")
    need = math.prod(dims) * dt.itemsize
    have = len(data) - head
    if have < need:
        raise ValueError(
            f"{where}: truncated IDX data: expected {need} bytes for shape {dims} of {dt.newbyteorder('=')}, got {have}"
        )
    if have > need:
        raise ValueError(
            f"{where}: expected exactly {need} bytes of IDX data for shape {dims}, "
            f"got {have} ({have - need} trailing bytes)"
        )
    return np.frombuffer(data, dt, count=math.prod(dims), offset=head).reshape(dims).astype(dt.newbyteorder("="))


def _idx_candidates(directory: Path, part: str, kind: str) -> list[Path]:
    stem = {"images": "idx3", "labels": "idx1"}[kind]
    names = [f"{part}-{kind}-{stem}-ubyte", f"{part}-{kind}.{stem}-ubyte"]
    return [directory / (nm + gz) for nm in names for gz in ("", ".gz")]


def _load_idx(
    *, n: int | None, seed: int, path: Path, labels=None, part: str = "train", task: str | None = None
) -> RawData:
    """MNIST-style IDX files: an images file and a labels file.

    ``path`` is the images file (``labels=`` the labels file; when omitted, the sibling
    with the standard name, ``...-labels-idx1-ubyte[.gz]``, is used if it exists) or a
    directory holding ``{part}-images-idx3-ubyte[.gz]`` and ``{part}-labels-idx1-ubyte[.gz]``
    (``part``: ``"train"``, the default, or ``"t10k"``).  Images are flattened to
    ``(n, rows * cols)`` with pixel values as stored (0..255 for MNIST): scaling is the
    job of ``standardize``.  Integer labels mean classification unless ``task`` says
    otherwise.
    """
    if not isinstance(part, str) or not re.fullmatch(r"[A-Za-z0-9_.]+", part):
        raise ValueError(
            f"part: expected the prefix of the standard IDX names, e.g. 'train' or 't10k', got {_got(part)}"
        )
    labels_path: Path | None  # a Path once every branch below is through
    if path.is_dir():
        found = {}
        for kind in ("images", "labels"):
            cands = _idx_candidates(path, part, kind)
            hit = next((c for c in cands if c.is_file()), None)
            if hit is None:
                raise FileNotFoundError(
                    f"name_or_path: expected a directory with the standard IDX {kind} file, "
                    f"one of {[c.name for c in cands]}, got {str(path)!r} without any"
                )
            found[kind] = hit
        if labels is not None:
            raise ValueError(
                f"labels: expected None when name_or_path is a directory "
                f"(the labels file is {found['labels'].name}), got {_got(labels)}"
            )
        images_path, labels_path = found["images"], found["labels"]
    else:
        images_path = path
        if labels is None:
            sib = re.sub(r"images([-.])idx3", r"labels\1idx1", path.name)
            cands = (
                []
                if sib == path.name
                else [path.with_name(sib), path.with_name(sib + ".gz"), path.with_name(sib.removesuffix(".gz"))]
            )
            labels_path = next((c for c in cands if c.is_file()), None)
            if labels_path is None:
                raise ValueError(
                    f"labels: expected the path of the IDX labels file for images "
                    f"{path.name!r} (no sibling with the standard name found), got None"
                )
        elif isinstance(labels, (str, os.PathLike)):
            labels_path = Path(labels)
            if not labels_path.exists():  # (a FIFO or device: read_idx refuses it, naming what it is)
                raise FileNotFoundError(
                    f"labels: expected an existing IDX labels file, got {str(labels)!r} (no such file)"
                )
        else:
            raise TypeError(f"labels: expected a path (str or os.PathLike) to an IDX labels file, got {_got(labels)}")
    X = read_idx(images_path, arg="name_or_path")
    y = read_idx(labels_path, arg="labels")
    if X.ndim < 2:
        raise ValueError(
            f"name_or_path: expected an IDX images file with >= 2 dimensions (n, ...), got "
            f"shape {X.shape} in {images_path.name!r} -- is it the labels file?"
        )
    if y.ndim != 1:
        raise ValueError(
            f"labels: expected a 1-dimensional IDX labels file, got shape {y.shape} in {labels_path.name!r}"
        )
    info = {
        "source": "IDX files",
        "path": str(images_path.resolve()),
        "labels_path": str(labels_path.resolve()),
        "image_shape": list(X.shape[1:]),
    }
    X2 = X.reshape(X.shape[0], math.prod(X.shape[1:]))
    return RawData(X2, y, _task_from_dtype(y, task), info)


def _task_from_dtype(y: np.ndarray, task) -> str:
    if task is not None:
        return check_choice("task", task, TASKS)
    if y.dtype.kind in "iub":
        return "classification"
    return "regression"


def _load_npz(*, n: int | None, seed: int, path: Path, task: str | None = None) -> RawData:
    """A ``.npz`` archive with arrays ``X`` (n, ...) and ``y``, optionally ``X_val`` and ``y_val``.

    ``X`` with more than two dimensions is flattened per example.  Integer (or bool)
    ``y`` means classification, floating ``y`` regression, unless ``task`` says
    otherwise.  When ``X_val``/``y_val`` are present they are the validation set and no
    split is made (``val_fraction`` is not used).
    """
    data = _read_bytes(path, "name_or_path")
    if data[:4] != b"PK\x03\x04" and data[:4] != b"PK\x05\x06":
        raise ValueError(
            f"name_or_path: expected a valid .npz archive (a zip file), got {str(path)!r} "
            f"which starts with bytes {data[:4].hex(' ') or '(empty file)'}"
        )
    arrays = _read_npz(data, path)
    missing = [k for k in ("X", "y") if k not in arrays]
    if missing:
        raise ValueError(
            f"name_or_path ({str(path)!r}): expected arrays 'X' and 'y' in the .npz, "
            f"got {sorted(arrays)} (missing {missing})"
        )
    if ("X_val" in arrays) != ("y_val" in arrays):
        raise ValueError(
            f"name_or_path ({str(path)!r}): expected both 'X_val' and 'y_val' or neither, "
            f"got only {'X_val' if 'X_val' in arrays else 'y_val'}"
        )
    X, y = arrays["X"], arrays["y"]
    task = _task_from_dtype(y, task)
    info: dict[str, object] = {"source": "npz file", "path": str(path.resolve())}
    if X.ndim > 2:
        info["example_shape"] = list(X.shape[1:])
        X = X.reshape(X.shape[0], math.prod(X.shape[1:]))
    Xv, yv = arrays.get("X_val"), arrays.get("y_val")
    if Xv is not None and Xv.ndim > 2:
        Xv = Xv.reshape(Xv.shape[0], math.prod(Xv.shape[1:]))
    return RawData(X, y, task, info, X_val=Xv, y_val=yv)


class _NpzEntryError(ValueError):
    pass


def _read_npz(data: bytes, path: Path) -> dict:
    """The ``.npy`` entries of a ``.npz`` archive held in ``data``, read without trusting
    it: the entries' declared sizes together may not exceed :func:`_decompressed_limit`
    (a deflated entry is never expanded past its declared size: zipfile stops there),
    every array header is checked against its entry's size before anything is allocated
    (a header claiming 10**12 elements is refused, not allocated), and object arrays
    (pickle) are refused.  Entries not named ``*.npy`` are ignored."""
    where = f"name_or_path ({str(path)!r})"
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except Exception as exc:  # zipfile.BadZipFile, OSError, EOFError...
        raise ValueError(
            f"name_or_path: expected a valid .npz archive, got {str(path)!r} "
            f"which could not be read ({type(exc).__name__}: {exc})"
        ) from exc
    budget = _decompressed_limit(len(data))
    total = sum(i.file_size for i in infos)
    if total > budget:
        raise ValueError(
            f"{where}: expected a .npz whose entries hold at most {budget} bytes "
            f"({MAX_EXPANSION} times the file's {len(data)} bytes, at least {EXPANSION_FLOOR}, "
            f"at most MAX_DATA_BYTES={MAX_DATA_BYTES}), got entries of {total} bytes"
        )
    arrays = {}
    with zf:
        for info in infos:
            name = info.filename
            if not name.endswith(".npy") or info.is_dir():
                continue
            try:
                with zf.open(info) as f:
                    version, shape, fortran, dt = read_npy_header(f, _NpzEntryError)
                    if dt.hasobject:
                        raise ValueError(
                            f"{where}: expected a .npz of numeric arrays, got an entry that "
                            f"needs pickle ({name!r}: an object array, dtype {dt})"
                        )
                    if dt.itemsize == 0:
                        raise _NpzEntryError(f"a dtype of zero size ({dt})")
                    nbytes = dt.itemsize * math.prod(shape)
                    if nbytes > info.file_size:
                        raise _NpzEntryError(
                            f"a header claiming shape {shape} of {dt} ({nbytes} bytes), "
                            f"more than the entry's {info.file_size} bytes"
                        )
                    buf = f.read(nbytes)
                    if len(buf) != nbytes:
                        raise _NpzEntryError(f"{len(buf)} bytes of data, its header needs {nbytes}")
                arr = np.frombuffer(buf, dtype=dt, count=math.prod(shape))
                if dt.kind == "b":  # a crafted byte other than 0/1 is True to some numpy calls only
                    arr = arr.view(np.uint8) != 0
                arrays[name[:-4]] = arr.reshape(shape, order="F" if fortran else "C").copy()
            except _NpzEntryError as exc:
                raise ValueError(f"{where}: expected a .npz of numeric arrays, got entry {name!r} with {exc}") from None
            except ValueError as exc:
                if str(exc).startswith(where):
                    raise
                raise ValueError(
                    f"name_or_path: expected a valid .npz archive, got {str(path)!r} whose "
                    f"entry {name!r} could not be read ({exc})"
                ) from exc
            except Exception as exc:  # a damaged entry: CRC, deflate stream, header syntax, ...
                raise ValueError(
                    f"name_or_path: expected a valid .npz archive, got {str(path)!r} whose "
                    f"entry {name!r} could not be read ({type(exc).__name__}: {exc})"
                ) from exc
    return arrays


def _parse_float(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def _csv_fast(text: str, delimiter: str, skip: int, width: int | None) -> np.ndarray | None:
    """numpy's C parser for a well-formed file; ``None`` sends the caller to the exact slow path."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "input contained no data" and the like
            values = np.loadtxt(
                io.StringIO(text), dtype=np.float64, delimiter=delimiter, comments="#", skiprows=skip, ndmin=2
            )
    except (ValueError, Warning):
        return None
    if values.shape[0] == 0 or (width is not None and values.shape[1] != width):
        return None
    return values


def _load_csv(
    *,
    n: int | None,
    seed: int,
    path: Path,
    label_column=-1,
    header=None,
    delimiter: str | None = None,
    task: str | None = None,
) -> RawData:
    """A numeric ``.csv`` (or ``.tsv``; ``.gz`` compressed too): one example per row.

    ``header``: ``None`` (detect: the first row is a header when none of its fields is a
    number, data when all are; a mix is an error), ``True`` or ``False``.  ``label_column``: the target column, an index
    (negative counts from the end; default ``-1``, the last) or a header name.
    ``delimiter``: default ``","`` (``"\\t"`` for ``.tsv``).  Blank lines and lines
    starting with ``#`` are skipped.  Integer-valued labels mean classification,
    anything else regression, unless ``task`` says otherwise.
    """
    if header is not None and not isinstance(header, bool):
        raise TypeError(f"header: expected None (detect), True or False, got {_got(header)}")
    if delimiter is None:
        delimiter = "\t" if re.search(r"\.tsv(\.gz)?$", path.name, re.IGNORECASE) else ","
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise ValueError(f"delimiter: expected a single character, got {_got(delimiter)}")
    raw = _read_bytes(path, "name_or_path")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"name_or_path: expected a UTF-8 text .csv file, got {str(path)!r} "
            f"which is not text ({exc.reason} at byte {exc.start})"
        ) from exc
    where = f"name_or_path ({path.name!r})"

    def records():  # (line number, stripped fields) of the rows that hold data or a header
        try:
            for lineno, fields in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), start=1):
                if not fields or all(not f.strip() for f in fields) or fields[0].lstrip().startswith("#"):
                    continue
                yield lineno, [f.strip() for f in fields]
        except csv.Error as exc:  # a field past csv's size limit, a stray quote, ...
            raise ValueError(
                f"{where}: expected a well-formed .csv, got a line the csv reader refuses ({exc})"
            ) from None

    first = next(records(), None)
    if first is None:
        raise ValueError(f"{where}: expected at least one data row in the .csv, got none")
    first_line, first_fields = first
    if header is None:
        text_fields = [f for f in first_fields if _parse_float(f) is None]
        if text_fields and len(text_fields) < len(first_fields):
            raise ValueError(
                f"header: could not tell whether line {first_line} of {path.name!r} is a header "
                f"(it mixes numbers and text such as {text_fields[0]!r}); expected "
                f"header=True or header=False, got None (detect)"
            )
        header = bool(text_fields)
    names = first_fields if header else None
    values = _csv_fast(
        text, delimiter, skip=first_line if header else 0, width=len(names) if names is not None else None
    )
    if values is None:  # the slow path: exact line and column of whatever is wrong
        rows = list(records())[1 if header else 0 :]
        if not rows:
            raise ValueError(f"{where}: expected data rows after the header, got only the header")
        width = len(names) if names is not None else len(rows[0][1])
        values = np.empty((len(rows), width), np.float64)
        for r, (lineno, fields) in enumerate(rows):
            if len(fields) != width:
                raise ValueError(
                    f"{where}: ragged rows: expected {width} fields per row "
                    f"({'as the header' if names is not None else 'as the first row'}), "
                    f"got {len(fields)} on line {lineno}"
                )
            for c, f in enumerate(fields):
                v = _parse_float(f)
                if v is None:
                    raise ValueError(f"{where}: expected numeric entries, got {f!r} on line {lineno}, column {c + 1}")
                values[r, c] = v
    width = values.shape[1]
    if width < 2:
        raise ValueError(f"{where}: expected at least 2 columns (features and a label), got {width}")
    # the label column
    if isinstance(label_column, str):
        if names is None:
            raise ValueError(
                f"label_column: expected a column index (the .csv has no header), got the name {label_column!r}"
            )
        if label_column not in names:
            raise ValueError(f"label_column: expected one of the header's names {names}, got {label_column!r}")
        j = names.index(label_column)
    elif isinstance(label_column, numbers.Integral) and not isinstance(label_column, bool):
        j = int(label_column)
        if not -width <= j < width:
            raise ValueError(f"label_column: expected an index in [{-width}, {width}) for {width} columns, got {j}")
        j %= width
    else:
        raise TypeError(f"label_column: expected an int index or a header name, got {_got(label_column)}")
    y = values[:, j]
    X = np.delete(values, j, axis=1)
    if task is None:
        fin = np.isfinite(y)
        task = "classification" if fin.all() and np.array_equal(y, np.round(y)) else "regression"
    else:
        task = check_choice("task", task, TASKS)
    info = {
        "source": "csv file",
        "path": str(path.resolve()),
        "header": bool(names is not None),
        "label_column": j if names is None else names[j],
    }
    if names is not None:
        info["feature_names"] = [nm for i, nm in enumerate(names) if i != j]
    return RawData(X, y, task, info)


_FILE_LOADERS = {"npz": _load_npz, "csv": _load_csv, "idx": _load_idx}


def _file_kind(path: Path) -> str | None:
    if path.is_dir():
        return "idx"
    nm = path.name.lower()
    if nm.endswith(".npz"):
        return "npz"
    if re.search(r"\.(csv|tsv)(\.gz)?$", nm):
        return "csv"
    if _IDX_NAME.search(nm):
        return "idx"
    return None
