"""Register-blocked tiles of the two-pass moments sweep, written in LLVM IR.

The float32 moments sweep (``cpu_stats._sq_dev``) costs two fused multiply-adds per
example and weight, ``S[o, j] += (P[r, o] Q[r, j] - M[o, j])^2``.  Written as numba loops,
its accumulators live in memory (a load and a store per few products) and, on the x86
CPUs with AVX-512 that LLVM tunes for 256-bit vectors ("prefer-256-bit": Skylake-X to
Sapphire Rapids), it runs at 256-bit width: ~20 G terms/s on one core, where the step's
sgemm runs ~65 G FMA/s (bench/results/gradstats_issue20.md).  The tiles here are what a
BLAS micro-kernel is: a block of ``I`` rows o x ``J`` vectors of 16 columns j whose
centres (``-M``) and float32 sums stay in the 32 vector registers for a whole run of rows
r, each row one broadcast of ``P[r, o]`` per tile row and one load of ``Q[r, j:j+16]`` per
vector -- 2 I J fused multiply-adds for I + J loads.  They are compiled from IR built
here, for the host CPU with 512-bit vectors allowed, with llvmlite (numba's own LLVM),
and one entry, :data:`ENTRY`, that dispatches on the tile size, is registered with LLVM
under a fixed name, so the numba kernels call it as an external function and numba's
on-disk cache stays valid (as :mod:`._blas` does for NumPy's gemm).

Contract of ``minigd_sqdev(I, J, P, ldp, Q, ldq, M, ldm, S, lds, nr, every, init)``
(1 <= I <= 4, 1 <= J <= 3; float32 P, Q, M; float64 S; element strides ldp, ldq, ldm, lds;
int64 counts), for i < I and j < 16 J::

    S[i, j] = (0 if init else S[i, j]) + sum over blocks b of float64(s_b[i, j])
    s_b[i, j] = sum over rows r of block b, in order, of t * t (float32 fma)
    t = fma(P[r, i], Q[r, j], -M[i, j])                 (float32, one rounding)

the blocks being ``every`` consecutive rows from row 0 (the last one shorter), nr >= 1 and
every >= 1.  This is the arithmetic of ``_sq_dev`` (the deviation formed before it is
squared), with its float32 partial sums at most ``every`` rows deep before they are added in
float64 -- the error bound of ``moments_update_blocked`` holds as it is.  (Each tile is
also emitted under its own name, ``minigd_sqdev_{I}x{J}``, with the same arguments.)

:data:`FAST` says whether the kernels use the tiles: only on CPUs with AVX-512 (32 vector
registers of 16 lanes; on the Xeon measured the sweep runs at 29-39 G terms/s with them,
~20 with ``_sq_dev``, i.e. at the FMA rate of the step's own sgemm).  Elsewhere the IR still
compiles (the name must resolve), but the kernels keep ``_sq_dev``, which runs near the
FMA throughput of AVX2 already.  Building the module costs ~0.15 s, once per process, at
the first gradient-moments call (:func:`ensure`), not at import.
"""

from __future__ import annotations

import os
import threading
import warnings

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import carray, cfunc, types

#: lanes of a tile vector (float32 in 512 bits), the largest tile (rows x vectors)
LANES, ROWS, VECS = 16, 4, 3


def name(i: int, j: int) -> str:
    """The registered symbol of the ``i`` x ``j``-vector tile."""
    return f"minigd_sqdev_{i}x{j}"


_f32, _f64, _i64, _i32 = ir.FloatType(), ir.DoubleType(), ir.IntType(64), ir.IntType(32)


def _c(v: int):
    return ir.Constant(_i64, v)


def _tile(mod: ir.Module, I: int, J: int) -> ir.Function:
    """Emit ``name(I, J)`` into ``mod`` (the contract in the module docstring)."""
    W = LANES
    V, V2 = ir.VectorType(_f32, W), ir.VectorType(_f64, W // 2)
    pf, pd = _f32.as_pointer(), _f64.as_pointer()
    fnty = ir.FunctionType(ir.VoidType(), [_i64, _i64, pf, _i64, pf, _i64, pf, _i64, pd, _i64, _i64, _i64, _i64])
    fn = ir.Function(mod, fnty, name(I, J))
    _, _, P, ldp, Q, ldq, Mp, ldm, S, lds, nr, every, init = fn.args  # (I, J: fixed here)
    for a in (P, Q, Mp, S):
        a.add_attribute("noalias")  # S never overlaps the inputs (the caller's buffers)
    fma = mod.globals.get(f"llvm.fma.v{W}f32") or ir.Function(mod, ir.FunctionType(V, [V, V, V]), f"llvm.fma.v{W}f32")

    entry = fn.append_basic_block("entry")
    b = ir.IRBuilder(entry)
    zero, zero2 = ir.Constant(V, [0.0] * W), ir.Constant(V2, [0.0] * (W // 2))
    halves = [ir.Constant(ir.VectorType(_i32, W // 2), list(range(h * W // 2, (h + 1) * W // 2))) for h in (0, 1)]

    def ptr(base, off, ty):
        return b.bitcast(b.gep(base, [off]), ty.as_pointer())

    def load(base, off, ty, align):
        v = b.load(ptr(base, off, ty))
        v.align = align
        return v

    def store(val, base, off, ty, align):
        b.store(val, ptr(base, off, ty)).align = align

    def s_off(i, j, h):  # the float64 half h of vector j of tile row i
        return b.add(b.mul(_c(i), lds), _c(j * W + h * (W // 2)))

    keys = [(i, j) for i in range(I) for j in range(J)]
    negm = {(i, j): b.fneg(load(Mp, b.add(b.mul(_c(i), ldm), _c(j * W)), V, 4)) for i, j in keys}
    zb, start = fn.append_basic_block("zero"), fn.append_basic_block("start")
    b.cbranch(b.icmp_signed("!=", init, _c(0)), zb, start)
    b.position_at_end(zb)
    for i, j in keys:
        for h in (0, 1):
            store(zero2, S, s_off(i, j, h), V2, 8)
    b.branch(start)

    outer, inner, flush, done = (fn.append_basic_block(n) for n in ("outer", "inner", "flush", "done"))
    b.position_at_end(start)
    b.branch(outer)
    b.position_at_end(outer)  # a block of rows [r0, rend)
    r0 = b.phi(_i64, "r0")
    r0.add_incoming(_c(0), start)
    rend = b.add(r0, every)
    rend = b.select(b.icmp_signed("<", rend, nr), rend, nr)
    b.branch(inner)
    b.position_at_end(inner)  # one row r: I broadcasts, J loads, 2 I J fmas
    r = b.phi(_i64, "r")
    r.add_incoming(r0, outer)
    acc = {}
    for key in keys:
        acc[key] = b.phi(V)
        acc[key].add_incoming(zero, outer)
    prow, qrow = b.mul(r, ldp), b.mul(r, ldq)
    splat0 = ir.Constant(ir.VectorType(_i32, W), [0] * W)
    a = []
    for i in range(I):
        v = b.insert_element(ir.Constant(V, ir.Undefined), b.load(b.gep(P, [b.add(prow, _c(i))])), ir.Constant(_i32, 0))
        a.append(b.shuffle_vector(v, ir.Constant(V, ir.Undefined), splat0))
    q = [load(Q, b.add(qrow, _c(j * W)), V, 4) for j in range(J)]
    new = {}
    for i, j in keys:
        t = b.call(fma, [a[i], q[j], negm[i, j]])
        new[i, j] = b.call(fma, [t, t, acc[i, j]])
        acc[i, j].add_incoming(new[i, j], inner)
    r1 = b.add(r, _c(1))
    r.add_incoming(r1, inner)
    b.cbranch(b.icmp_signed("<", r1, rend), inner, flush)
    b.position_at_end(flush)  # S += float64(the block's sums)
    for i, j in keys:
        for h in (0, 1):
            part = b.fpext(b.shuffle_vector(new[i, j], new[i, j], halves[h]), V2)
            store(b.fadd(load(S, s_off(i, j, h), V2, 8), part), S, s_off(i, j, h), V2, 8)
    r0.add_incoming(rend, flush)
    b.cbranch(b.icmp_signed("<", rend, nr), outer, done)
    b.position_at_end(done)
    b.ret_void()
    return fn


#: the one name the kernels call: it dispatches on (I, J) to the tile of that size
ENTRY = "minigd_sqdev"


def module_ir() -> str:
    """The IR of all tiles (1..ROWS rows x 1..VECS vectors) and of :data:`ENTRY`, which
    calls the I x J one (a switch: one predictable branch per call of a few thousand
    fmas); an (I, J) out of range does nothing."""
    mod = ir.Module("minigd_tiles")
    mod.triple = llvm.get_process_triple()
    tiles = {(i, j): _tile(mod, i, j) for i in range(1, ROWS + 1) for j in range(1, VECS + 1)}
    some = next(iter(tiles.values()))
    fn = ir.Function(mod, some.function_type, ENTRY)
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    I, J = fn.args[:2]
    key = b.add(b.mul(I, _c(VECS + 1)), J)
    done = fn.append_basic_block("done")
    sw = b.switch(key, done)
    for (i, j), tile in tiles.items():
        blk = fn.append_basic_block(f"t{i}x{j}")
        sw.add_case(_c(i * (VECS + 1) + j), blk)
        b.position_at_end(blk)
        b.call(tile, fn.args)
        b.ret_void()
    b.position_at_end(done)
    b.ret_void()
    return str(mod)


def host_has_avx512() -> bool:
    """Whether the host CPU has AVX-512F (the tiles' 32 registers of 16 float32 lanes)."""
    try:
        return bool(llvm.get_host_cpu_features().get("avx512f", False))
    except RuntimeError:  # llvmlite cannot read the features on this host
        return False


def _build():
    """Compile :func:`module_ir` for the host CPU (512-bit vectors allowed) and register
    :data:`ENTRY`'s address with LLVM.  Returns the engine (it owns the code: keep it alive)."""
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    mod = llvm.parse_assembly(module_ir())
    mod.verify()
    try:
        feats = llvm.get_host_cpu_features().flatten()
    except RuntimeError:  # llvmlite cannot read them here: the CPU name's defaults
        feats = ""
    if host_has_avx512():
        feats += ",-prefer-256-bit"  # (a tuning flag of the Intel CPUs: it would split the tiles' zmm)
    tm = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=feats, opt=3, jit=True
    )
    try:  # llvmlite >= 0.44's pass builder; without it, the IR is compiled as written (it is vectorised by hand)
        pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(3))
        pb.getModulePassManager().run(mod, pb)
    except AttributeError:  # pragma: no cover - older llvmlite
        pass
    engine = llvm.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    llvm.add_symbol(ENTRY, engine.get_function_address(ENTRY))
    return engine


def _fallback_tile(I, J, p, ldp, q, ldq, m, ldm, s, lds, nr, every, init):  # pragma: no cover - compiled
    """The tiles' contract in scalar loops (compiled as a C callback by :func:`_fallback`)."""
    W = LANES
    P = carray(p, ((nr - 1) * ldp + I,))
    Q = carray(q, ((nr - 1) * ldq + J * W,))
    M = carray(m, ((I - 1) * ldm + J * W,))
    S = carray(s, ((I - 1) * lds + J * W,))
    for i in range(I):
        for j in range(J * W):
            if init != 0:
                S[i * lds + j] = 0.0
            mu = M[i * ldm + j]
            r0 = 0
            while r0 < nr:
                acc = np.float32(0.0)
                for r in range(r0, min(r0 + every, nr)):
                    t = P[r * ldp + i] * Q[r * ldq + j] - mu
                    acc += t * t
                S[i * lds + j] += np.float64(acc)
                r0 += every


def _fallback() -> int:
    """The address of :func:`_fallback_tile` as a C callback (compiled on a build failure
    only; not cached: numba refuses ``cache=True`` where no cache directory is writable, and
    this path must not fail too)."""
    f32, f64, i64 = types.float32, types.float64, types.int64
    sig = types.void(
        i64,
        i64,
        types.CPointer(f32),
        i64,
        types.CPointer(f32),
        i64,
        types.CPointer(f32),
        i64,
        types.CPointer(f64),
        i64,
        i64,
        i64,
        i64,
    )
    return cfunc(sig)(_fallback_tile).address


_ENGINE = None
_LOCK = threading.Lock()
#: None before :func:`ensure`; then whether the IR tiles were built (False: the name is
#: bound to the scalar fallback, and the kernels keep the numba loops)
BUILT: bool | None = None


def ensure() -> bool:
    """Build and register the tiles once per process (idempotent, thread-safe: a second
    engine would re-register the name, and code already linked to the first one's
    address must keep it); returns :data:`BUILT`.  Call it before the first call of a
    kernel that names :data:`ENTRY` -- ``cpu_stats.moments_update_blocked`` (which does) or
    ``cpu_stats._sq_dev_tiled``: LLVM resolves the name when numba compiles or loads such
    a kernel, and an unresolved one is a crash, not an exception.  Should the IR not build
    (an llvmlite or platform this was not tried on), the name is bound to a scalar loop
    with the same contract, a RuntimeWarning says so, and the kernels keep ``_sq_dev``."""
    global _ENGINE, BUILT
    if BUILT is None:
        with _LOCK:
            if BUILT is None:
                try:
                    _ENGINE = _build()
                    BUILT = True
                except Exception as exc:  # noqa: BLE001 - any failure: the loops are correct without them
                    warnings.warn(
                        f"minigd: the float32 moments tiles could not be built ({type(exc).__name__}: {exc}); "
                        "gradient moments use the numba loops",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    llvm.add_symbol(ENTRY, _fallback())
                    BUILT = False
    return bool(BUILT)


#: whether ``moments_update_blocked`` sweeps with the tiles (AVX-512 hosts; MINIGD_NO_TILES
#: set to anything non-empty turns them off, e.g. to measure the difference)
FAST = host_has_avx512() and not os.environ.get("MINIGD_NO_TILES")

#: (pointers as integers: ``arr.ctypes.data`` plus a byte offset)
_SIG = types.void(*([types.int64] * 2 + [types.uintp, types.int64] * 4 + [types.int64] * 3))
#: the numba external function of :data:`ENTRY`: ``TILE(I, J, P, ldp, ...)`` runs the I x J tile
TILE = types.ExternalFunction(ENTRY, _SIG)
