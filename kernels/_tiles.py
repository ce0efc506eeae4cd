"""Register-blocked tiles of the moments sweeps (two-pass and one-pass), written in LLVM IR.

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
    s_b[i, j] = sum over groups g of block b, in order, of s_g[i, j]   (float32)
    s_g[i, j] = sum over rows r of group g, in order, of t * t (float32 fma, from 0)
    t = fma(P[r, i], Q[r, j], -M[i, j])                 (float32, one rounding)

the blocks being ``every`` consecutive rows from row 0 (the last one shorter), and the groups
:data:`GROUP_ROWS` consecutive rows from a block's first (the last one shorter); nr >= 1
and every >= 1.  This is the arithmetic of ``_sq_dev`` (the deviation formed before it is
squared; there, groups of 4 rows), with its float32 partial sums at most ``every`` rows deep
before they are added in float64.  The groups bound what one large row can cost the rows
after it: a float32 sum that a large term dominates rounds every small addend after it
alike (the zero products of a sparse ReLU layer each add the same (-M)^2), so the error of
a sequential k-term sum grows like k u, not sqrt(k) u; in groups of g inside blocks of k
rows it is at most (g + k / g + 1) u with the deviation's rounding (13 u for 8 and 32: the bound
of ``moments_update_blocked``).  A whole group is unrolled, so the groups cost no more than
the plain sequential sum (measured on the Xeon).  (Each tile is also emitted under its own
name, ``minigd_sqdev_{I}x{J}``, with the same arguments.)

The one-pass moments (``cpu_stats.moments_update_onepass``) use a second family,
``minigd_sums(I, J, P, ldp, Q, ldq, S, lds, nr, every, init)`` (1 <= I <= 6, 1 <= J <= 4:
:data:`SUMS_ROWS`, :data:`SUMS_VECS`; float32 P, Q; float64 S), for i < I and lanes
l < 16 J::

    S[i, l] = (0 if init else S[i, l]) + sum over blocks b of float64(s_b[i, l])
    s_b[i, l] = sum over rows r of block b, in order, of P[r, 2 i + l % 2] Q[r, l]  (float32 fma)

P's rows hold (p, p^2) pairs and Q's rows (q, q^2) pairs, so lane 2c sums p q of column c
and lane 2c + 1 sums p^2 q^2: one fma updates both sums of 8 weights, the pair (p, p^2) is
one 64-bit broadcast, and a 6 x 4 tile (24 accumulators) costs 6 broadcasts and 4 loads
per row for 24 fmas, the load ratio of a GEMM micro-kernel.

:data:`FAST` says whether the kernels use the tiles: only on CPUs with AVX-512 (32 vector
registers of 16 lanes; on the Xeon measured the sweep runs at 29-39 G terms/s with them,
~20 with ``_sq_dev``, i.e. at the FMA rate of the step's own sgemm).  Elsewhere the IR still
compiles (the name must resolve), but the kernels keep ``_sq_dev``, which runs near the
FMA throughput of AVX2 already.  Building the module costs ~0.6 s (0.2 s without the one-pass tiles), once per
process, at the first gradient-moments call (:func:`ensure`), not at import.
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
#: rows per float32 group sum of the two-pass tiles (each group summed from 0, then added to
#: its block's float32 sum: the error bound in the module docstring)
GROUP_ROWS = 8


def name(i: int, j: int) -> str:
    """The registered symbol of the ``i`` x ``j``-vector tile."""
    return f"minigd_sqdev_{i}x{j}"


def sums_name(i: int, j: int) -> str:
    """The registered symbol of the ``i`` x ``j``-vector tile of the one-pass sums."""
    return f"minigd_sums_{i}x{j}"


_f32, _f64, _i64, _i32 = ir.FloatType(), ir.DoubleType(), ir.IntType(64), ir.IntType(32)


def _c(v: int):
    return ir.Constant(_i64, v)


def _tile(mod: ir.Module, I: int, J: int, kind: str = "sqdev") -> ir.Function:
    """Emit ``name(I, J)`` (``kind`` "sqdev") or ``sums_name(I, J)`` ("sums") into ``mod``
    (the contracts in the module docstring)."""
    W = LANES
    V, V2 = ir.VectorType(_f32, W), ir.VectorType(_f64, W // 2)
    pf, pd = _f32.as_pointer(), _f64.as_pointer()
    sums = kind == "sums"
    if sums:  # (I, J, P, ldp, Q, ldq, S, lds, nr, every, init)
        argt = [_i64, _i64, pf, _i64, pf, _i64, pd, _i64, _i64, _i64, _i64]
        fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), argt), sums_name(I, J))
        _, _, P, ldp, Q, ldq, S, lds, nr, every, init = fn.args
        ptrs = (P, Q, S)
    else:
        argt = [_i64, _i64, pf, _i64, pf, _i64, pf, _i64, pd, _i64, _i64, _i64, _i64]
        fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), argt), name(I, J))
        _, _, P, ldp, Q, ldq, Mp, ldm, S, lds, nr, every, init = fn.args  # (I, J: fixed here)
        ptrs = (P, Q, Mp, S)
    for a in ptrs:
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
    if not sums:
        negm = {(i, j): b.fneg(load(Mp, b.add(b.mul(_c(i), ldm), _c(j * W)), V, 4)) for i, j in keys}
    zb, start = fn.append_basic_block("zero"), fn.append_basic_block("start")
    b.cbranch(b.icmp_signed("!=", init, _c(0)), zb, start)
    b.position_at_end(zb)
    for i, j in keys:
        for h in (0, 1):
            store(zero2, S, s_off(i, j, h), V2, 8)
    b.branch(start)

    splat0 = ir.Constant(ir.VectorType(_i32, W), [0] * W)
    D8 = ir.VectorType(_f64, W // 2)
    splat0d = ir.Constant(ir.VectorType(_i32, W // 2), [0] * (W // 2))

    def row(r, acc):  # one row r at the builder: I broadcasts, J loads, 2 I J fmas (I J for sums)
        prow, qrow = b.mul(r, ldp), b.mul(r, ldq)
        q = [load(Q, b.add(qrow, _c(j * W)), V, 4) for j in range(J)]
        new = {}
        if sums:  # lanes (2k, 2k+1): (p q, p^2 q^2) of column k -- one fma for both sums
            for i in range(I):  # the pair (p, p^2) as one 64-bit value, broadcast
                x = b.load(b.bitcast(b.gep(P, [b.add(prow, _c(2 * i))]), _f64.as_pointer()))
                x.align = 4
                v = b.insert_element(ir.Constant(D8, ir.Undefined), x, ir.Constant(_i32, 0))
                a = b.bitcast(b.shuffle_vector(v, ir.Constant(D8, ir.Undefined), splat0d), V)
                for j in range(J):
                    new[i, j] = b.call(fma, [a, q[j], acc[i, j]])
        else:
            for i in range(I):
                v = b.load(b.gep(P, [b.add(prow, _c(i))]))
                v = b.insert_element(ir.Constant(V, ir.Undefined), v, ir.Constant(_i32, 0))
                a = b.shuffle_vector(v, ir.Constant(V, ir.Undefined), splat0)
                for j in range(J):
                    t = b.call(fma, [a, q[j], negm[i, j]])
                    new[i, j] = b.call(fma, [t, t, acc[i, j]])
        return new

    def phis(*incoming):  # a vector phi per tile vector, from (a vector or a dict of them, block) pairs
        out = {key: b.phi(V) for key in keys}
        for val, blk in incoming:
            for key in keys:
                out[key].add_incoming(val[key] if isinstance(val, dict) else val, blk)
        return out

    def enter(name, first, pred):  # branch from block pred to a new block: (it, its counter's phi from first)
        blk = fn.append_basic_block(name)
        b.branch(blk)
        b.position_at_end(blk)
        i = b.phi(_i64, name)
        i.add_incoming(first, pred)
        return blk, i

    def loop(lo, hi, pred):  # rows [lo, hi) (hi > lo) in a loop from block pred; returns (exit block, sums)
        body, r = enter("r", lo, pred)
        acc = phis((zero, pred))
        new = row(r, acc)
        for key in keys:
            acc[key].add_incoming(new[key], body)
        r1 = b.add(r, _c(1))
        r.add_incoming(r1, body)
        after = fn.append_basic_block("rows_done")
        b.cbranch(b.icmp_signed("<", r1, hi), body, after)
        b.position_at_end(after)
        return after, new

    flush, done = fn.append_basic_block("flush"), fn.append_basic_block("done")
    b.position_at_end(start)
    outer, r0 = enter("r0", _c(0), start)  # a block of rows [r0, rend)
    rend = b.add(r0, every)
    rend = b.select(b.icmp_signed("<", rend, nr), rend, nr)
    if sums:  # the block's rows, summed in order
        _, tot = loop(r0, rend, outer)
        b.branch(flush)
    else:  # groups of GROUP_ROWS rows [g0, gend), each summed afresh, then added to the block's sums
        group, g0 = enter("g0", r0, outer)
        blk = phis((zero, outer))
        gend = b.add(g0, _c(GROUP_ROWS))
        whole = b.icmp_signed("<=", gend, rend)
        gend = b.select(whole, gend, rend)
        full, part = fn.append_basic_block("full"), fn.append_basic_block("part")
        b.cbranch(whole, full, part)
        b.position_at_end(full)  # a whole group, unrolled
        acc = {key: zero for key in keys}
        for k in range(GROUP_ROWS):
            acc = row(b.add(g0, _c(k)), acc)
        gdone = fn.append_basic_block("gdone")
        b.branch(gdone)
        b.position_at_end(part)  # the block's last rows (fewer than a group)
        plast, pnew = loop(g0, gend, part)
        b.branch(gdone)
        b.position_at_end(gdone)  # the block's sums += the group's
        grp = phis((acc, full), (pnew, plast))
        tot = {key: b.fadd(blk[key], grp[key]) for key in keys}
        for key in keys:
            blk[key].add_incoming(tot[key], gdone)
        g0.add_incoming(gend, gdone)
        b.cbranch(b.icmp_signed("<", gend, rend), group, flush)
    b.position_at_end(flush)  # S += float64(the block's sums)
    for i, j in keys:
        v = tot[i, j]
        for h in (0, 1):
            part = b.fpext(b.shuffle_vector(v, v, halves[h]), V2)
            store(b.fadd(load(S, s_off(i, j, h), V2, 8), part), S, s_off(i, j, h), V2, 8)
    r0.add_incoming(rend, flush)
    b.cbranch(b.icmp_signed("<", rend, nr), outer, done)
    b.position_at_end(done)
    b.ret_void()
    return fn


#: the one name the kernels call: it dispatches on (I, J) to the tile of that size
ENTRY = "minigd_sqdev"


#: the entry of the one-pass sums' tiles (``SUMS_ROWS`` x ``SUMS_VECS`` at most)
SUMS_ENTRY = "minigd_sums"
SUMS_ROWS, SUMS_VECS = 6, 4


def _entry(mod: ir.Module, entry: str, tiles: dict, vecs: int) -> None:
    """Emit ``entry``: a switch on (I, J) to the tile of that size (one predictable branch
    per call of a few thousand fmas); an (I, J) out of range does nothing."""
    some = next(iter(tiles.values()))
    fn = ir.Function(mod, some.function_type, entry)
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    I, J = fn.args[:2]
    key = b.add(b.mul(I, _c(vecs + 1)), J)
    done = fn.append_basic_block("done")
    sw = b.switch(key, done)
    for (i, j), tile in tiles.items():
        blk = fn.append_basic_block(f"t{i}x{j}")
        sw.add_case(_c(i * (vecs + 1) + j), blk)
        b.position_at_end(blk)
        b.call(tile, fn.args)
        b.ret_void()
    b.position_at_end(done)
    b.ret_void()


def module_ir() -> str:
    """The IR of all tiles (1..ROWS rows x 1..VECS vectors of the two-pass sweep, 1..SUMS_ROWS
    x 1..SUMS_VECS of the one-pass sums) and of their entries :data:`ENTRY` and
    :data:`SUMS_ENTRY`."""
    mod = ir.Module("minigd_tiles")
    mod.triple = llvm.get_process_triple()
    tiles = {(i, j): _tile(mod, i, j) for i in range(1, ROWS + 1) for j in range(1, VECS + 1)}
    _entry(mod, ENTRY, tiles, VECS)
    sums = {(i, j): _tile(mod, i, j, "sums") for i in range(1, SUMS_ROWS + 1) for j in range(1, SUMS_VECS + 1)}
    _entry(mod, SUMS_ENTRY, sums, SUMS_VECS)
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
    for entry in (ENTRY, SUMS_ENTRY):
        llvm.add_symbol(entry, engine.get_function_address(entry))
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
                rend = min(r0 + every, nr)
                for g0 in range(r0, rend, GROUP_ROWS):
                    grp = np.float32(0.0)
                    for r in range(g0, min(g0 + GROUP_ROWS, rend)):
                        t = P[r * ldp + i] * Q[r * ldq + j] - mu
                        grp += t * t
                    acc += grp
                S[i * lds + j] += np.float64(acc)
                r0 += every


def _fallback_sums_tile(I, J, p, ldp, q, ldq, s, lds, nr, every, init):  # pragma: no cover - compiled
    """The one-pass sums' contract in scalar loops (compiled by :func:`_fallback_sums` on a
    build failure only)."""
    W = LANES
    P = carray(p, ((nr - 1) * ldp + 2 * I,))
    Q = carray(q, ((nr - 1) * ldq + J * W,))
    S = carray(s, ((I - 1) * lds + J * W,))
    for i in range(I):
        for j in range(J * W):
            if init != 0:
                S[i * lds + j] = 0.0
            k = j % 2  # (lane 2c: p q of column c; lane 2c + 1: p^2 q^2)
            r0 = 0
            while r0 < nr:
                acc = np.float32(0.0)
                for r in range(r0, min(r0 + every, nr)):
                    acc += P[r * ldp + 2 * i + k] * Q[r * ldq + j]
                S[i * lds + j] += np.float64(acc)
                r0 += every


def _fallback_sums() -> int:
    """The address of :func:`_fallback_sums_tile` as a C callback (see :func:`_fallback`)."""
    return cfunc(_SUMS_SIG_C)(_fallback_sums_tile).address


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


_f32p, _f64p = types.CPointer(types.float32), types.CPointer(types.float64)
_SUMS_SIG_C = types.void(*([types.int64] * 2 + [_f32p, types.int64] * 2 + [_f64p] + [types.int64] * 4))

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
                    llvm.add_symbol(SUMS_ENTRY, _fallback_sums())
                    BUILT = False
    return bool(BUILT)


#: whether ``moments_update_blocked`` sweeps with the tiles (AVX-512 hosts; MINIGD_NO_TILES
#: set to anything non-empty turns them off, e.g. to measure the difference)
FAST = host_has_avx512() and not os.environ.get("MINIGD_NO_TILES")

#: (pointers as integers: ``arr.ctypes.data`` plus a byte offset)
_SIG = types.void(*([types.int64] * 2 + [types.uintp, types.int64] * 4 + [types.int64] * 3))
#: the numba external function of :data:`ENTRY`: ``TILE(I, J, P, ldp, ...)`` runs the I x J tile
TILE = types.ExternalFunction(ENTRY, _SIG)
_SUMS_SIG = types.void(*([types.int64] * 2 + [types.uintp, types.int64] * 3 + [types.int64] * 3))
#: the numba external function of :data:`SUMS_ENTRY`: ``SUMS(I, J, P, P2, ldp, ...)``
SUMS = types.ExternalFunction(SUMS_ENTRY, _SUMS_SIG)
