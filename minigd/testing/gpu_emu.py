"""A CPU emulator of the slice of CuPy the ``"gpu"`` backend uses, running the backend's
own CUDA kernels (``kernels/gpu_*.cu``) compiled as C++ for the host.

Why: most machines that develop and test minigd have no GPU.  Compiling the sources with
NVRTC proves they are valid CUDA; it does not prove they compute the right thing.  The
emulator runs the very same kernel text, launch by launch, with the backend's host code
unchanged, so the parity tests of ``tests/test_gpu_backend.py`` (forward, gradients,
per-example norms, moments, training runs, CUDA-graph replay) run everywhere a C++
compiler does.  It is a correctness tool: slow (every CUDA thread is a fiber), and it
does not replace a run on hardware (see the limits in ``kernels/gpu_emu.h``).

Use::

    MINIGD_GPU_EMULATE=1 python -c "import minigd as mg; mg.MLP([4, 3], backend='gpu')"

or, in code, ``with minigd.testing.gpu_emu.emulated(): model = mg.MLP(..., backend="gpu")``
(the backend keeps the emulator it was created with).  Nothing imports this module unless
asked to: the backend registry (:func:`minigd.backends.gpu_emulator`) imports it only when
MINIGD_GPU_EMULATE is set, or finds it already imported by the code that switched it on.

What is emulated, and checked more strictly than CuPy does:

* ``ndarray``: a NumPy array ("device memory") with CuPy's ``get(stream=, out=)`` and
  ``set(arr, stream=)``; ``set`` requires the same shape and dtype.
* ``RawModule(code=...)``: the code is compiled by the host compiler after
  ``kernels/gpu_emu.h`` (cached on disk by content); ``get_function(name)`` gives a kernel
  that, when called as ``kernel(grid, block, args)``, checks every argument against the
  kernel's parameter list -- count, pointer or value, the value's size (an ``np.int32``
  where the kernel takes a ``long long`` is an error, not silent garbage), and the dtype of
  an array against the pointee type -- and then runs it.
* ``cuda.Stream``: work runs synchronously.  ``begin_capture`` / ``end_capture`` record the
  kernel launches into a graph that ``launch`` replays with the captured arguments, as a
  CUDA graph does; while capturing, ``matmul`` raises NotImplementedError (CuPy refuses
  cuBLAS calls during stream capture) and host copies (``get``, ``set``, ``fill``) raise,
  as the CUDA runtime refuses them.
* ``matmul(a, b, out=)``: NumPy's (cuBLAS is not emulated, only its contract).
* ``asarray`` keeps a Fortran-ordered host array Fortran-ordered (CuPy's default order
  'K'); a raw kernel refuses it here, where CuPy would pass the pointer and read the wrong
  elements.  ``ascontiguousarray`` gives C order.
* ``cuda.Device``: two devices.  Device memory remembers the device it was made on and
  may only be used with that device current; a stream is entered only with its device
  current (CuPy's check), so a model used while another device is current is caught.

Sanitizers (``MINIGD_GPU_EMU_SANITIZE``, with the runtime preloaded): ``address`` reports
accesses past a device allocation; ``thread`` reports data races between the threads of a
launch, between blocks included (see ``kernels/gpu_emu.h``).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np

from minigd.backends import EMULATE_ENV
from minigd.kernels import gpu_sources as S

ENV = EMULATE_ENV  # "MINIGD_GPU_EMULATE"
_HEADER = Path(S.__file__).resolve().parent / "gpu_emu.h"  # shipped with the CUDA sources
_CXX_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-fno-fast-math", "-w")
#: MINIGD_GPU_EMU_SANITIZE=address (or 1) builds the kernels with AddressSanitizer (run
#: Python with libasan preloaded): an access past the end of a device allocation aborts with
#: a report.  MINIGD_GPU_EMU_SANITIZE=thread builds them with ThreadSanitizer (libtsan
#: preloaded): the threads of a launch become concurrent TSan fibers, ordered only by
#: __syncthreads, atomics and launch boundaries, so a race between blocks is reported.
SANITIZE_ENV = "MINIGD_GPU_EMU_SANITIZE"
_SANITIZERS = {
    "address": ("-fsanitize=address", "-fno-omit-frame-pointer", "-g"),
    "thread": ("-fsanitize=thread", "-DMGD_EMU_TSAN", "-g"),
}


def sanitizer() -> str | None:
    """The sanitizer the kernels are built with: None, "address" or "thread" (from
    MINIGD_GPU_EMU_SANITIZE)."""
    val = os.environ.get(SANITIZE_ENV, "")
    if val in ("", "0"):
        return None
    if val == "1":
        return "address"
    if val in _SANITIZERS:
        return val
    raise ValueError(f"{SANITIZE_ENV}: expected 'address' (or '1'), 'thread', or '0'/unset, got {val!r}")


_KERNEL = re.compile(r'extern\s+"C"\s+void\s+(\w+)\s*\(')
_SHARED = re.compile(r"\b(static\s+|extern\s+)?__shared__\b([^;]*);")
_lock = threading.RLock()  # builds, and launches: the fiber scheduler is one per library
_forced = threading.local()


# ============================================================================ switching it on
def enabled() -> bool:
    """True when the gpu backend should run on the emulator: inside :func:`emulated`, or
    with the environment variable MINIGD_GPU_EMULATE=1."""
    if getattr(_forced, "on", None) is not None:
        return bool(_forced.on)
    val = os.environ.get(ENV, "")
    if val in ("", "0"):
        return False
    if val == "1":
        return True
    raise ValueError(f"{ENV}: expected '1' (emulate the GPU on the CPU) or '0'/unset, got {val!r}")


@contextlib.contextmanager
def emulated(on: bool = True):
    """Within this block, ``backend="gpu"`` models are created on the emulator (``on``) or
    on a real device (``on=False``, whatever MINIGD_GPU_EMULATE says)."""
    prev = getattr(_forced, "on", None)
    _forced.on = on
    try:
        yield
    finally:
        _forced.on = prev


def compiler() -> str | None:
    """The C++ compiler the emulator uses: $CXX, else c++, g++ or clang++ on PATH."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or (cxx if os.path.isfile(cxx) else None)
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def reason() -> str | None:
    """None when the emulator can run here, else why not."""
    if os.name != "posix":
        return f"the GPU emulator needs a POSIX system (ucontext fibers); this is {os.name!r}"
    if compiler() is None:
        return "the GPU emulator needs a C++ compiler: none found ($CXX, c++, g++, clang++)"
    return None


# ============================================================================ building
def _cache_dir() -> Path:
    """$MINIGD_CACHE_DIR/gpu_emu, else ~/.cache/minigd/gpu_emu; a private temporary
    directory when neither is writable."""
    base = os.environ.get("MINIGD_CACHE_DIR")
    root = Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minigd"
    d = root / "gpu_emu"
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _trusted(d, dir_=True):  # another user could swap the libraries in it
            raise PermissionError(f"{d} is not owned by this user or is writable by others")
        probe = d / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return d
    except OSError:
        global _TMP
        if _TMP is None:
            _TMP = Path(tempfile.mkdtemp(prefix="minigd-gpu-emu-"))
        return _TMP


def _trusted(path: Path, dir_: bool = False) -> bool:
    """Whether ``path`` is a regular file (a directory with ``dir_``), not a symbolic link,
    owned by this user and writable by no one else: a cached library that is not is never
    loaded (``ctypes.CDLL`` runs its code in this process) but rebuilt."""
    import stat

    try:
        st = os.lstat(path)
    except OSError:
        return False
    kind = stat.S_ISDIR if dir_ else stat.S_ISREG
    own = not hasattr(os, "getuid") or st.st_uid == os.getuid()
    return kind(st.st_mode) and own and not st.st_mode & 0o022


_TMP: Path | None = None
_LIBS: dict = {}


def _run(cmd, what):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"GPU emulator: {what} failed ({' '.join(map(str, cmd[:2]))} ...):\n{proc.stderr[-4000:]}")
    return proc.stdout


def _declarators(decl: str) -> list:
    """Names declared by the text after ``__shared__`` (``T a[4][4], b``: a and b)."""
    parts, depth, cur = [], 0, ""
    for ch in decl:
        depth += ch in "<[(" and 1 or 0
        depth -= ch in ">])" and 1 or 0
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    names = []
    for part in parts:
        m = re.search(r"(\w+)\s*(?:\[[^\]]*\]\s*)*$", part.strip())
        if not m:
            raise RuntimeError(f"GPU emulator: cannot parse the __shared__ declaration {decl.strip()!r}")
        names.append(m.group(1))
    return names


def _place_shared(code: str) -> str:
    """Rewrite every ``__shared__ T a[n], b;`` as a local struct of those members placed by
    ``mgd_emu::shared<S>()`` (per block, filled with NaN at its start; see gpu_emu.h) and
    references ``a``, ``b`` to them; ``static __shared__`` is CUDA's spelling of the same."""
    serial = iter(range(1 << 30))

    def sub(m):
        spec, decl = m.group(1) or "", m.group(2)
        if spec.strip() == "extern":
            raise RuntimeError("GPU emulator: dynamic shared memory (extern __shared__) is not emulated")
        if "=" in decl:
            raise RuntimeError(f"GPU emulator: a __shared__ variable cannot have an initializer: {decl.strip()!r}")
        k = next(serial)
        return (
            f"struct mgd_emu_sh_{k} {{{decl};}}; auto& mgd_emu_shr_{k} = mgd_emu::shared<mgd_emu_sh_{k}>();"
            + "".join(f" auto& {n} = mgd_emu_shr_{k}.{n};" for n in _declarators(decl))
        )

    return _SHARED.sub(sub, code)


def build(code: str):
    """(ctypes library, kernel names) for a CUDA source text; compiled once per content
    (the cache key is the exact text compiled, header included)."""
    why = reason()
    if why is not None:
        raise RuntimeError(why)
    cxx = compiler()
    san = sanitizer()
    flags = _CXX_FLAGS + (_SANITIZERS[san] if san else ())
    body = f'#include "{_HEADER.name}"\n{_place_shared(code)}\n'
    header = _HEADER.read_text(encoding="utf-8")
    key = hashlib.sha256("\0".join((body, header, cxx, *flags)).encode()).hexdigest()[:24]
    with _lock:
        if key in _LIBS:
            return _LIBS[key]
        d = _cache_dir()
        so, names_file = d / f"{key}.so", d / f"{key}.names"
        if not (_trusted(so) and _trusted(names_file)):  # missing, or not ours alone: rebuild
            with tempfile.TemporaryDirectory(dir=d) as tmp:
                cpp = Path(tmp) / "unit.cpp"
                cpp.write_text(body, encoding="utf-8")
                pre = _run([cxx, "-E", "-std=c++17", f"-I{_HEADER.parent}", str(cpp)], "preprocessing")
                names = sorted(set(_KERNEL.findall(pre)))
                if not names:
                    raise RuntimeError('GPU emulator: the code defines no extern "C" kernel')
                cpp.write_text(body + "".join(f"MGD_EMU_ENTRY({n})\n" for n in names), encoding="utf-8")
                out = Path(tmp) / "unit.so"
                _run([cxx, *flags, f"-I{_HEADER.parent}", "-o", str(out), str(cpp)], "compiling")
                (Path(tmp) / "names").write_text("\n".join(names), encoding="utf-8")
                os.replace(out, so)  # atomic: a crash never leaves half a library
                os.replace(Path(tmp) / "names", names_file)
        lib = ctypes.CDLL(str(so))
        lib.mgd_emu_launch.restype = ctypes.c_int
        lib.mgd_emu_launch.argtypes = (
            [ctypes.c_void_p] + [ctypes.c_uint] * 6 + [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_int]
        )
        names = tuple(names_file.read_text(encoding="utf-8").split())
        _LIBS[key] = (lib, names)
        return _LIBS[key]


class _Entry(ctypes.Structure):
    _fields_ = [
        ("call", ctypes.c_void_p),
        ("nargs", ctypes.c_int),
        ("kinds", ctypes.c_ubyte * 32),
        ("sizes", ctypes.c_int * 32),
        ("pointee", ctypes.c_ubyte * 32),
    ]


# ============================================================================ streams (state)
_tls = threading.local()  # per thread: the stacks of current streams and devices, the capturing stream


def _stack(name: str) -> list:
    """This thread's stack ``name`` ("streams", "devices"): what ``with stream:`` /
    ``with Device(i):`` made current, innermost last."""
    st = getattr(_tls, name, None)
    if st is None:
        st = []
        setattr(_tls, name, st)
    return st


def _current_stream():
    """The stream work is enqueued on (None: the null stream), as CuPy's current stream."""
    st = _stack("streams")
    return st[-1] if st else None


def _capturing_here():
    """The stream this thread is capturing, or None."""
    return getattr(_tls, "capturing", None)


#: what the emulated device has been asked to do, for tests of the backend's habits (no
#: allocation inside a step, one read-back per k steps): "alloc" (new device arrays),
#: "get" (device -> host copies), "set" (host -> device copies), "launch" (kernels run),
#: "graph_launch", "matmul", "sync", "capture" (stream captures begun); and "null_stream": work (a launch, memset, matmul or
#: copy) enqueued with no stream current and none given -- on CuPy, the legacy null
#: stream, which a non-blocking stream does not wait for.  Reset it with ``counts.clear()``.
counts: collections.Counter = collections.Counter()


def _note_stream(stream=None) -> None:
    if stream is None and _current_stream() is None:
        counts["null_stream"] += 1


def _refuse_during_capture(what: str) -> None:
    if _capturing_here() is not None:
        raise RuntimeError(
            f"{what} while a stream is being captured: the CUDA runtime refuses "
            f"host copies, allocations and synchronisation inside a graph capture"
        )


def _root(a: np.ndarray) -> np.ndarray:
    """The allocation a device view belongs to."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


# ============================================================================ device memory
class ndarray(np.ndarray):
    """Device memory: a NumPy array with CuPy's host-transfer methods.  Like CuPy's, it does
    not turn into a host array implicitly: NumPy ufuncs and functions on it raise TypeError
    (use ``get()``); the backend must never compute on device memory with NumPy."""

    __array_ufunc__ = None
    device_id = 0  # the device the allocation was made on (views inherit it)

    def __array_finalize__(self, obj):
        self.device_id = getattr(obj, "device_id", _current_device())

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(
            f"numpy.{func.__name__} on emulated device memory: device arrays are not "
            f"host arrays (as with CuPy); copy with .get() first"
        )

    def get(self, stream=None, out=None):
        _refuse_during_capture("ndarray.get")
        counts["get"] += 1
        _note_stream(stream)
        if out is None:
            return np.array(self.view(np.ndarray), copy=True)
        if not isinstance(out, np.ndarray) or isinstance(out, ndarray):
            raise TypeError("ndarray.get: out must be a host numpy.ndarray")
        if out.shape != self.shape or out.dtype != self.dtype:
            raise ValueError(
                f"ndarray.get: out has shape {out.shape} and dtype {out.dtype}, the array {self.shape} and {self.dtype}"
            )
        out[...] = self.view(np.ndarray)
        return out

    def set(self, arr, stream=None):
        _refuse_during_capture("ndarray.set")
        counts["set"] += 1
        _note_stream(stream)
        if not isinstance(arr, np.ndarray) or isinstance(arr, ndarray):
            raise TypeError(f"ndarray.set: expected a host numpy.ndarray, got {type(arr).__name__}")
        if not self.flags.c_contiguous:
            raise RuntimeError("ndarray.set: the target must be a contiguous device array (as in CuPy)")
        if arr.shape != self.shape:
            raise ValueError(f"ndarray.set: shape mismatch, array {self.shape}, host {arr.shape}")
        if arr.dtype != self.dtype:
            raise TypeError(f"ndarray.set: dtype mismatch, array {self.dtype}, host {arr.dtype}")
        np.copyto(self.view(np.ndarray), arr)

    def fill(self, value):
        """A memset on the current stream: recorded when that stream is capturing."""
        s = _current_stream()
        _note_stream()
        host = self.view(np.ndarray)
        if s is not None and s.is_capturing():
            s._record(lambda: host.fill(value), [weakref.ref(_root(self))], "fill")
        else:
            host.fill(value)


def _alloc(a: np.ndarray) -> ndarray:
    _refuse_during_capture("allocating device memory")
    counts["alloc"] += 1
    d = a.view(ndarray)
    d.device_id = _current_device()
    return d


def zeros(shape, dtype=float):
    _note_stream()  # a memset, on the current stream
    return _alloc(np.zeros(shape, dtype))


def empty(shape, dtype=float):
    return _alloc(np.empty(shape, dtype))


def arange(*args, dtype=None):
    _note_stream()  # a kernel, on the current stream
    return _alloc(np.arange(*args, dtype=dtype))


def asarray(a, dtype=None, order=None):
    """A device copy of a host array (as cupy.asarray: host data are copied, never shared).
    As CuPy's, the default order ('K') keeps a Fortran-ordered array Fortran-ordered -- and
    a raw kernel, which sees only the data pointer, must not be given one (the launch
    check refuses it here; CuPy would pass it and the kernel would read the wrong
    elements): use :func:`ascontiguousarray`."""
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype) and order in (None, "K", "A"):
        return a
    counts["set"] += 1
    _note_stream()
    src = a.view(np.ndarray) if isinstance(a, ndarray) else np.asanyarray(a)
    if order in (None, "K", "A"):
        order = "F" if src.flags.f_contiguous and not src.flags.c_contiguous else "C"
    return _alloc(np.array(src, dtype=dtype, copy=True, order=order))


def ascontiguousarray(a, dtype=None):
    """A C-ordered device copy (or ``a`` itself when it already is one)."""
    if isinstance(a, ndarray) and a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return asarray(a, dtype=dtype, order="C")


def matmul(a, b, out=None):
    s = _current_stream()
    if s is not None and s.is_capturing():
        raise NotImplementedError("cuBLAS is not supported during stream capture (as in CuPy)")
    for name, x in (("a", a), ("b", b), ("out", out)):
        if x is not None and not isinstance(x, ndarray):
            raise TypeError(f"matmul: {name} is a host array ({type(x).__name__}), not device memory")
        if x is not None:
            _check_device(f"matmul: {name}", x)
    counts["matmul"] += 1
    _note_stream()
    if out is None:
        return _alloc(np.matmul(a.view(np.ndarray), b.view(np.ndarray)))
    np.matmul(a.view(np.ndarray), b.view(np.ndarray), out=out.view(np.ndarray))
    return out


def is_available() -> bool:
    return reason() is None


# ============================================================================ kernels
_PACK = {
    ("i", 1): (np.int8, ctypes.c_int8),
    ("u", 1): (np.uint8, ctypes.c_uint8),
    ("i", 2): (np.int16, ctypes.c_int16),
    ("u", 2): (np.uint16, ctypes.c_uint16),
    ("i", 4): (np.int32, ctypes.c_int32),
    ("u", 4): (np.uint32, ctypes.c_uint32),
    ("i", 8): (np.int64, ctypes.c_int64),
    ("u", 8): (np.uint64, ctypes.c_uint64),
    ("f", 4): (np.float32, ctypes.c_float),
    ("f", 8): (np.float64, ctypes.c_double),
}


class RawKernel:
    """One kernel of a :class:`RawModule`; ``kernel(grid, block, args)`` as in CuPy."""

    def __init__(self, lib, name):
        self.name = name
        fn = getattr(lib, f"mgd_emu_entry_{name}")
        fn.restype = ctypes.POINTER(_Entry)
        self._entry_ptr = fn()
        e = self._entry_ptr.contents
        #: [(kind 'p'/'i'/'u'/'f', size in bytes (of the pointee for 'p'), pointee 'i'/'u'/'f' or '')]
        self.params = [
            (chr(e.kinds[i]), int(e.sizes[i]), chr(e.pointee[i]) if e.pointee[i] else "") for i in range(e.nargs)
        ]
        self._lib = lib

    def _type(self, where, kind, size):
        t = _PACK.get((kind, size))
        if t is None:
            what = {"i": "signed integer", "u": "unsigned integer", "f": "floating-point"}.get(kind, kind)
            raise TypeError(
                f"{where}: the emulator does not pass a {size}-byte {what} (struct or "
                f"unusual parameter types are not emulated)"
            )
        return t

    def _pack(self, args):
        """(ctypes values to keep alive, the argument pointer array, weakrefs to the
        allocations the pointers point into)."""
        if not isinstance(args, tuple):
            raise TypeError(f"{self.name}: args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self.params):
            raise TypeError(f"{self.name}: takes {len(self.params)} arguments, got {len(args)}")
        keep, roots, ptrs = [], [], (ctypes.c_void_p * max(1, len(args)))()
        for i, (a, (kind, size, pointee)) in enumerate(zip(args, self.params)):
            where = f"{self.name} argument {i}"
            if kind == "p":
                if isinstance(a, np.ndarray):
                    if not isinstance(a, ndarray):
                        raise TypeError(f"{where}: a host numpy array passed where the kernel takes device memory")
                    if not a.flags.c_contiguous:
                        raise ValueError(f"{where}: a non-contiguous view {a.shape} strides {a.strides}")
                    _check_device(where, a)
                    want = self._type(where, pointee, size)[0]
                    if a.dtype != np.dtype(want):
                        raise TypeError(f"{where}: the kernel takes {np.dtype(want)}*, the array is {a.dtype}")
                    v = ctypes.c_void_p(a.__array_interface__["data"][0])
                    roots.append(weakref.ref(_root(a)))
                elif isinstance(a, np.uint64):  # an address: 0 is the null pointer
                    v = ctypes.c_void_p(int(a))
                else:
                    raise TypeError(f"{where}: the kernel takes a pointer, got {type(a).__name__}")
            else:
                if not isinstance(a, np.generic) or isinstance(a, np.bool_):
                    raise TypeError(
                        f"{where}: pass a sized numpy scalar (np.int32, np.int64, np.float64), "
                        f"got {type(a).__name__} (its C type is ambiguous)"
                    )
                want_np, want_c = self._type(where, kind, size)
                if a.dtype != np.dtype(want_np):
                    raise TypeError(f"{where}: the kernel takes a {np.dtype(want_np)} value, got {a.dtype}")
                v = want_c(a.item())
            keep.append(v)
            ptrs[i] = ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
        return (keep, ptrs), roots

    def _run(self, grid, block, packed):
        keep, ptrs = packed
        err = ctypes.create_string_buffer(1024)
        with _lock:  # one fiber scheduler per library: launches from several threads take turns
            counts["launch"] += 1
            rc = self._lib.mgd_emu_launch(
                ctypes.cast(self._entry_ptr, ctypes.c_void_p), *grid, *block, ptrs, err, len(err)
            )
        if rc != 0:
            raise RuntimeError(f"{self.name}: {err.value.decode(errors='replace')}")

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        if shared_mem:
            raise NotImplementedError("dynamic shared memory is not emulated")
        grid3 = tuple(int(g) for g in tuple(grid) + (1,) * (3 - len(grid)))
        block3 = tuple(int(b) for b in tuple(block) + (1,) * (3 - len(block)))
        packed, roots = self._pack(args)
        _note_stream(stream)
        s = _current_stream()
        if s is not None and s.is_capturing():
            s._record(lambda: self._run(grid3, block3, packed), roots, self.name)
        else:
            self._run(grid3, block3, packed)


class RawModule:
    """``cupy.RawModule(code=...)``: the code compiled for the host."""

    def __init__(self, code=None, options=(), name_expressions=None, **kwargs):
        if code is None:
            raise ValueError("RawModule: the emulator compiles source code (code=...)")
        self._lib, self.names = build(code)
        self._kernels = {}

    def get_function(self, name):
        if name not in self.names:
            raise KeyError(f"RawModule.get_function: no kernel {name!r} (the module has {list(self.names)})")
        if name not in self._kernels:
            self._kernels[name] = RawKernel(self._lib, name)
        return self._kernels[name]


# ============================================================================ streams and graphs
class Graph:
    """Captured work (kernel launches, memsets), replayed in order with the captured
    arguments.  Holds only weak references to the memory it points into: replaying after
    an allocation it uses was freed is an error (on a GPU, a write into freed memory)."""

    def __init__(self, nodes):
        self.nodes = nodes

    def launch(self, stream=None):
        _refuse_during_capture("Graph.launch")
        counts["graph_launch"] += 1
        for _fn, roots, what in self.nodes:
            if any(r() is None for r in roots):
                raise RuntimeError(
                    f"Graph.launch: {what} points into device memory freed since the capture "
                    f"(replaying would write into freed memory on a GPU)"
                )
        for run, _, _ in self.nodes:
            run()


class Stream:
    """A stream: work runs at once (synchronously), except while it is capturing."""

    def __init__(self, non_blocking=False, null=False, ptds=False):
        self._capture = None
        self.device_id = _current_device()

    def __enter__(self):
        if self.device_id != _current_device():  # CuPy's check_stream_device_match
            raise RuntimeError(
                f"The device that the stream is created on ({self.device_id}) does not match "
                f"with the current device ({_current_device()})"
            )
        _stack("streams").append(self)
        return self

    def __exit__(self, *exc):
        _stack("streams").pop()
        return False

    def synchronize(self):
        _refuse_during_capture("Stream.synchronize")
        counts["sync"] += 1

    def _record(self, run, roots, what):
        self._capture.append((run, roots, what))

    def begin_capture(self, mode=None):
        if _capturing_here() is not None:
            raise RuntimeError("begin_capture: a stream capture is already under way in this thread")
        self._capture = []
        _tls.capturing = self
        counts["capture"] += 1

    def is_capturing(self):
        return self._capture is not None

    def end_capture(self):
        if not self.is_capturing():
            raise RuntimeError("end_capture: this stream is not capturing")
        g = Graph(self._capture)
        self._capture = None
        _tls.capturing = None
        return g


#: the emulator has two devices, so that code which switches devices (or a model used
#: while another device is current) is exercised
N_DEVICES = 2


def _current_device() -> int:
    st = _stack("devices")
    return st[-1] if st else 0


def _check_device(where, a) -> None:
    if a.device_id != _current_device():
        raise RuntimeError(f"{where}: memory of device {a.device_id} used while device {_current_device()} is current")


class Device:
    """``cupy.cuda.Device(id)``: a context manager that makes the device current (in this
    thread); ``Device()`` is the current one."""

    def __init__(self, device=None):
        d = _current_device() if device is None else int(device)
        if not 0 <= d < N_DEVICES:
            raise RuntimeError(
                f"cudaErrorInvalidDevice: invalid device ordinal {d} (the emulator has {N_DEVICES} devices)"
            )
        self.id = d

    def __enter__(self):
        _stack("devices").append(self.id)
        return self

    def __exit__(self, *exc):
        _stack("devices").pop()
        return False

    def synchronize(self):
        _refuse_during_capture("Device.synchronize")
        counts["sync"] += 1

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


class _Runtime:
    @staticmethod
    def getDevice():
        return _current_device()

    @staticmethod
    def getDeviceCount():
        return N_DEVICES


class _Cuda:
    Stream = Stream
    Device = Device
    runtime = _Runtime()

    class graph:
        Graph = Graph


cuda = _Cuda()
__version__ = "emulated"
