"""NumPy's own BLAS, callable from compiled kernels.

numba lowers ``np.dot`` inside compiled code to SciPy's BLAS (through
``scipy.linalg.cython_blas``).  NumPy's wheels bundle their own OpenBLAS, a different build
(``scipy-openblas64``, 64-bit integers), which on the machines measured runs the step's
GEMMs as fast or faster -- notably ``A.T @ D``, the weight gradients, 5-30% faster
(``bench/results/gemm_peak.md``).  Its CBLAS ``?gemm`` is a plain C symbol of a library that
``import numpy`` has already loaded; this module finds it, registers its address with LLVM
under a fixed name (:data:`SGEMM`, :data:`DGEMM`), and declares it to numba as an external
function, so compiled code calls it directly (no Python in between) and numba's on-disk cache
stays valid (the cached machine code names the symbol; it is registered again at every import,
before any kernel loads).

Where the symbol is not found (a NumPy built against another BLAS: MKL, Accelerate, a system
OpenBLAS without the ``scipy_`` prefix) the names are bound to a slow but correct loop
(compiled on first import only then) and :data:`AVAILABLE` is False: the backend then keeps
numba's ``np.dot``.  Which one a run uses is a fact of the installed libraries, never of a
timing, so it is the same in every process on the machine (bitwise resume depends on that).
"""

from __future__ import annotations

import ctypes
import glob
import os

import llvmlite.binding as llvm
import numpy as np
from numba import types

#: the names the kernels call (CBLAS row-major gemm: order, transa, transb, m, n, k, alpha,
#: a, lda, b, ldb, beta, c, ldc; 64-bit integers)
SGEMM, DGEMM = "minigd_numpy_cblas_sgemm", "minigd_numpy_cblas_dgemm"
#: CBLAS constants
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112

#: the library symbols looked for, in NumPy's bundled libraries (ILP64 scipy-openblas, as in
#: NumPy's wheels since 2.0)
_SYMBOLS = {SGEMM: "scipy_cblas_sgemm64_", DGEMM: "scipy_cblas_dgemm64_"}


def _library_dirs():
    root = os.path.dirname(os.path.abspath(np.__file__))
    site = os.path.dirname(root)
    return [os.path.join(site, "numpy.libs"), os.path.join(root, ".dylibs"), os.path.join(root, "_core")]


def _find() -> tuple[dict, str]:
    """({name: address}, library path) of NumPy's CBLAS gemms, or ({}, why not)."""
    if os.environ.get("MINIGD_NO_NUMPY_BLAS"):
        return {}, "MINIGD_NO_NUMPY_BLAS is set"
    for d in _library_dirs():
        for path in sorted(glob.glob(os.path.join(d, "*openblas*"))):
            try:
                lib = ctypes.CDLL(path)
                found = {k: ctypes.cast(getattr(lib, s), ctypes.c_void_p).value for k, s in _SYMBOLS.items()}
            except (OSError, AttributeError):
                continue
            if all(found.values()):
                return found, path
    return {}, "no scipy-openblas64 CBLAS in NumPy's bundled libraries"


def _fallback(dtype):
    """A C-callable row-major gemm in plain loops (bound where NumPy's BLAS is not found, so
    that the kernels still link; the backend does not call it then)."""
    from numba import carray, cfunc

    ft = types.float32 if dtype == np.float32 else types.float64
    sig = types.void(
        types.int32,
        types.int32,
        types.int32,
        types.int64,
        types.int64,
        types.int64,
        ft,
        types.CPointer(ft),
        types.int64,
        types.CPointer(ft),
        types.int64,
        ft,
        types.CPointer(ft),
        types.int64,
    )

    @cfunc(sig, cache=True)
    def gemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):  # pragma: no cover - other BLAS
        A = carray(a, ((k if ta == TRANS else m) * lda,))
        Bm = carray(b, ((n if tb == TRANS else k) * ldb,))
        C = carray(c, (m * ldc,))
        for i in range(m):
            for j in range(n):
                s = 0.0
                for p in range(k):
                    x = A[p * lda + i] if ta == TRANS else A[i * lda + p]
                    y = Bm[j * ldb + p] if tb == TRANS else Bm[p * ldb + j]
                    s += x * y
                C[i * ldc + j] = alpha * s + (beta * C[i * ldc + j] if beta != 0 else 0.0)

    return gemm.address


_ADDRESSES, SOURCE = _find()
#: whether the kernels' external gemms are NumPy's OpenBLAS (else a slow loop; don't use them)
AVAILABLE = bool(_ADDRESSES)
if not AVAILABLE:  # pragma: no cover - depends on the NumPy build
    _ADDRESSES = {SGEMM: _fallback(np.float32), DGEMM: _fallback(np.float64)}
for _name, _addr in _ADDRESSES.items():
    llvm.add_symbol(_name, _addr)


def _decl(name, ft):
    i32, i64, vp = types.int32, types.int64, types.voidptr
    return types.ExternalFunction(name, types.void(i32, i32, i32, i64, i64, i64, ft, vp, i64, vp, i64, ft, vp, i64))


#: the external functions the kernels call (pointers as ``arr.ctypes``)
sgemm = _decl(SGEMM, types.float32)
dgemm = _decl(DGEMM, types.float64)
