"""The GPU backend without a GPU: its CUDA sources compile with NVRTC, and its host code.

* Every ``kernels/gpu_*.cu`` source compiles with **NVRTC** (the compiler CuPy uses at run
  time; nvcc accepts code NVRTC rejects, e.g. standard headers) for sm_80 and sm_90, with
  an empty log (no warnings), and every ``extern "C"`` kernel the source exports is a
  function symbol of the cubin.  This needs only CuPy's low-level ``cupy.cuda.nvrtc``
  bindings and the NVRTC library (the ``gpu-verify`` extra, part of ``test``), not a device;
  it skips, saying why, only where those cannot be imported.
* The sources are self-contained (no include but the common header).
* Every kernel the backend launches exists, and each launch passes as many arguments as
  the kernel declares (read from the sources and from the backend's code).
* Launch geometry, the availability probe and the errors asked for without a GPU.
"""

from __future__ import annotations

import ast
import inspect
import re
import struct

import numpy as np
import pytest

import minigd as mg
from minigd.backends import available_backends, get_backend_class
from minigd.kernels import gpu_sources as S


def _nvrtc_or_skip():
    try:
        S.nvrtc_version()
    except Exception as exc:  # no CuPy, or CuPy without an NVRTC library
        pytest.skip(
            f"NVRTC is not available here ({type(exc).__name__}: {exc}); "
            f"install minigd[gpu-verify] (cupy-cuda12x + nvidia-cuda-nvrtc-cu12) to compile the CUDA sources"
        )


def elf_function_symbols(blob: bytes) -> set:
    """Names of the STT_FUNC symbols in an ELF64 little-endian object (a cubin)."""
    assert blob[:4] == b"\x7fELF" and blob[4] == 2 and blob[5] == 1, "not an ELF64 LE object"
    (shoff,) = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", blob, 0x3A)
    sections = []
    for i in range(shnum):
        o = shoff + i * shentsize
        _name, stype, _flags, _addr, offset, size, link, _info, _align, entsize = struct.unpack_from(
            "<IIQQQQIIQQ", blob, o
        )
        sections.append((stype, offset, size, link, entsize))
    names = set()
    for stype, offset, size, link, entsize in sections:
        if stype != 2:  # SHT_SYMTAB
            continue
        stroff = sections[link][1]
        for k in range(size // entsize):
            st_name, st_info = struct.unpack_from("<IB", blob, offset + k * entsize)
            if st_info & 0xF == 2:  # STT_FUNC
                end = blob.index(b"\0", stroff + st_name)
                names.add(blob[stroff + st_name : end].decode())
    return names


# ============================================================================ NVRTC
@pytest.mark.parametrize("arch", S.ARCHS)
@pytest.mark.parametrize("src", S.SOURCES)
def test_source_compiles_with_nvrtc_and_exports_its_kernels(src, arch):
    _nvrtc_or_skip()
    from cupy.cuda import nvrtc

    prog = nvrtc.createProgram(S.source(src), src, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", *S.NVRTC_OPTIONS, *S.CUPY_ADDED_OPTIONS])
        except nvrtc.NVRTCError as exc:
            pytest.fail(f"{src} does not compile for {arch}: {exc}\n{nvrtc.getProgramLog(prog)}")
        log = nvrtc.getProgramLog(prog).strip()
        assert log == "", f"{src} compiles for {arch} with diagnostics:\n{log}"
        cubin = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    names = S.kernel_names(src)
    assert names, f"{src} exports no kernel"
    syms = elf_function_symbols(cubin)
    missing = [n for n in names if n not in syms]
    assert not missing, f"{src} ({arch}): kernels missing from the cubin: {missing}"
    # nothing exported that the name table does not know about (the table is what the
    # backend loads from)
    extra = sorted(s for s in syms if s.startswith("mgd_") and s not in names)
    assert not extra, f"{src}: kernels not found by kernel_names(): {extra}"


def test_nvrtc_compile_helper_reports_the_log():
    _nvrtc_or_skip()
    cubin = S.nvrtc_compile("gpu_loss.cu", "sm_80")
    assert "mgd_sum_rows" in elf_function_symbols(cubin)
    with pytest.raises(ValueError, match="arch"):
        S.nvrtc_compile("gpu_loss.cu", "compute_90x")


# ============================================================================ sources
def test_sources_are_self_contained():
    inc = re.compile(r"^\s*#\s*include\s*[<\"]([^>\"]+)", re.M)
    assert inc.findall(S.raw_text(S.COMMON)) == []
    for src in S.SOURCES:
        assert inc.findall(S.raw_text(src)) == [S.COMMON], src
        text = S.source(src)
        assert inc.findall(text) == [], src
        assert 'extern "C"' in text and "__global__" in text


def test_source_rejects_unknown_names_and_foreign_includes(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="name: expected one of"):
        S.source("nope.cu")
    bad = tmp_path / "gpu_dense.cu"
    bad.write_text('#include <cmath>\n#include "gpu_common.cuh"\n')
    (tmp_path / S.COMMON).write_text("// empty\n")
    monkeypatch.setattr(S, "_DIR", tmp_path)
    with pytest.raises(ValueError, match="may include only"):
        S.source("gpu_dense.cu")


def test_kernel_names_follow_the_convention():
    allk = S.all_kernel_names()
    assert set(allk) == set(S.SOURCES)
    seen = set()
    for _src, names in allk.items():
        for n in names:
            assert re.fullmatch(r"mgd_[a-z0-9_]+", n), n
            assert n not in seen, f"{n} exported twice"
            seen.add(n)
        typed = {n[:-4] for n in names if n.endswith(("_f32", "_f64"))}
        for op in typed:  # both dtypes, always
            assert op + "_f32" in names and op + "_f64" in names, op
    # the kernels the issue asks for
    for op in (
        "gather",
        "gemm",
        "bias_act_forward",
        "act_backward",
        "bias_grad",
        "loss_fwd_bwd",
        "sqnorm_accumulate",
        "sumsq_partial",
        "opt_fused",
        "opt_primitive",
        "clip_factor",
        "apply_update",
        "per_example_fill",
        "moments_update",
        "bn_train_forward",
        "bn_train_backward",
        "bn_param_grad",
        "bn_eval_forward",
        "bn_running_update",
        "dropout_forward",
        "dropout_backward",
    ):
        assert f"mgd_{op}_f32" in seen and f"mgd_{op}_f64" in seen, op
    assert {"mgd_sum_rows", "mgd_step_end"} <= seen


def test_codes_in_the_sources_match_minigd():
    """The CUDA sources cannot import the one table of codes (minigd.kernels.codes): their
    #define copies must equal it, and the Python layers must use it."""
    from minigd import nn
    from minigd.kernels import codes as C
    from minigd.optim import base as ob

    common = S.raw_text(S.COMMON)

    def define(name):
        return float(re.search(rf"#define {name} (\S+)", common).group(1))

    assert len(C.ACTIVATIONS) == 6 and len(C.LOSSES) == 3
    for name, code in C.ACTIVATIONS.items():
        assert define(f"MGD_{name.upper()}") == code, name
    for name, code in C.LOSSES.items():
        assert define(f"MGD_{name.upper()}") == code, name
    assert define("MGD_LEAKY_SLOPE") == C.LEAKY_SLOPE
    assert define("MGD_FLUSH") == C.FLUSH
    assert define("MGD_HP_COLS") == ob._HP_COLS
    assert nn.ACTIVATIONS is C.ACTIVATIONS and nn.LOSSES is C.LOSSES  # re-exported, not copied
    assert (ob.OP_CLIP, ob.OP_DECAY, ob.OP_TRACE, ob.OP_ADAM, ob.OP_SCALE_LR, ob.OP_SCALE) == (
        C.OP_CLIP,
        C.OP_DECAY,
        C.OP_TRACE,
        C.OP_ADAM,
        C.OP_SCALE_LR,
        C.OP_SCALE,
    )
    from minigd.backends.gpu import _step

    assert set(_step._PRIM_OP) == {C.OP_CLIP, C.OP_DECAY, C.OP_TRACE, C.OP_ADAM, C.OP_SCALE_LR, C.OP_SCALE}


# ============================================================================ host code vs kernels
def _param_kind(decl: str) -> str:
    """'ptr', 'int', 'i64' or 'double' for one C parameter declaration."""
    decl = decl.strip()
    if "*" in decl:
        return "ptr"
    typ = decl.split()[-2]
    return {"int": "int", "mgd_i64": "i64", "double": "double"}[typ]


def _kernel_params() -> dict:
    """{op (name without mgd_ and the dtype suffix): [parameter kinds]} from the sources."""
    out = {}
    sig = re.compile(r"\b(mgd_\w+?)(?:_##S)?\s*\(([^)]*)\)\s*\{", re.S)
    for src in S.SOURCES:
        names = set(S.kernel_names(src))
        for m in sig.finditer(S.raw_text(src)):
            name = m.group(1)
            if name not in {n[:-4] for n in names} | names:
                continue
            params = [p for p in m.group(2).replace("\\", " ").split(",") if p.strip()]
            out[name[4:]] = [_param_kind(p) for p in params]
    return out


def _arg_kind(node) -> str:
    """The kind of a launch argument: np.int32(...) int, np.int64(...) i64, np.float64(...)
    double, np.uint64(0) a null pointer, anything else an array (a pointer)."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "np"
    ):
        return {"int32": "int", "int64": "i64", "float64": "double", "uint64": "ptr"}[node.func.attr]
    if isinstance(node, ast.IfExp):
        kinds = {_arg_kind(node.body), _arg_kind(node.orelse)}
        assert len(kinds) == 1, ast.dump(node)
        return kinds.pop()
    if isinstance(node, ast.Constant):
        raise AssertionError(f"a bare Python constant {node.value!r} as a kernel argument (its C type is ambiguous)")
    return "ptr"


def _launches():
    """(kernel op, argument kinds, "file:line") for every launch in the modules of the
    minigd/backends/gpu/ package."""
    import importlib
    import pkgutil

    from minigd.backends import gpu as G

    found = []
    for info in pkgutil.iter_modules(G.__path__):
        mod = importlib.import_module(f"{G.__name__}.{info.name}")
        found += _launches_in(mod)
    return found


def _launches_in(mod):
    tree = ast.parse(inspect.getsource(mod))
    where = mod.__name__.rsplit(".", 1)[-1] + ".py"
    found = []

    def kname(node):
        if isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Attribute, ast.Name)):
            base = node.value.attr if isinstance(node.value, ast.Attribute) else node.value.id
            if base == "k":
                return node.attr
        return None

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if node.func.attr == "_launch" and node.args and kname(node.args[0]):
            tup = node.args[-1]
            assert isinstance(tup, ast.Tuple), f"line {node.lineno}: arguments must be a literal tuple"
            found.append((kname(node.args[0]), [_arg_kind(e) for e in tup.elts], f"{where}:{node.lineno}"))
        elif node.func.attr == "_enqueue_layers" and node.args and kname(node.args[0]):
            lam = node.args[2]
            assert isinstance(lam, ast.Lambda) and isinstance(lam.body, ast.Tuple)
            found.append((kname(node.args[0]), [_arg_kind(e) for e in lam.body.elts], f"{where}:{node.lineno}"))
    return found


def test_every_launch_matches_a_kernel_signature():
    """Argument count AND kind (pointer / int / int64 / double) of every launch: CuPy packs
    numpy scalars by their own size, so an np.int32 where the kernel takes a long long
    would silently pass garbage."""
    params = _kernel_params()
    launches = _launches()
    assert len(launches) >= 20
    used = set()
    for op, kinds, line in launches:
        assert op in params, f"minigd/backends/gpu/{line}: no kernel mgd_{op}[_f32|_f64] in the sources"
        assert kinds == params[op], (
            f"minigd/backends/gpu/{line}: mgd_{op} takes {params[op]}, the launch passes {kinds}"
        )
        used.add(op)
    # every training-path kernel is used by the backend, batch norm's and dropout's included
    for op in (
        "gather",
        "gemm",
        "bias_act_forward",
        "act_backward",
        "bias_grad",
        "loss_fwd_bwd",
        "sum_rows",
        "sqnorm_accumulate",
        "sumsq_partial",
        "clip_factor",
        "opt_prepare",
        "opt_fused",
        "opt_primitive",
        "check_finite",
        "apply_update",
        "step_end",
        "per_example_fill",
        "moments_update",
        "bn_train_forward",
        "bn_train_backward",
        "bn_param_grad",
        "bn_eval_forward",
        "bn_running_update",
        "dropout_forward",
        "dropout_backward",
    ):
        assert op in used, op


# ============================================================================ launch geometry
def test_launch_geometry():
    assert S.grid_1d(0) == (1,) and S.grid_1d(1) == (1,) and S.grid_1d(256) == (1,) and S.grid_1d(257) == (2,)
    assert S.grid_1d(10**9) == (S.MAX_BLOCKS,)
    assert S.grid_rows(1) == (1,) and S.grid_rows(8) == (1,) and S.grid_rows(9) == (2,)
    grid, block = S.grid_gemm(1, 10)
    assert grid == (1, 1) and block == (16, 16)
    assert S.grid_gemm(33, 17) == ((3, 2), (16, 16))  # rows on grid.x
    assert S.grid_gemm(2_000_000, 10)[0] == (125_000, 1)  # > 65535 row tiles: fine on grid.x
    with pytest.raises(ValueError, match="65535"):
        S.grid_gemm(10, 16 * 65535 + 1)
    assert S.grid_bias_grad(33) == ((2,), (32, 8))
    assert S.grid_columns(33) == ((2, 1), (32, 8)) and S.grid_columns(64, 10**6) == ((2, 65535), (32, 8))
    assert S.reduce_blocks(1) == 1 and S.reduce_blocks(10**8) == S.REDUCE_BLOCKS
    for bad in (
        lambda: S.grid_1d(-1),
        lambda: S.grid_rows(0),
        lambda: S.grid_gemm(0, 3),
        lambda: S.grid_bias_grad(0),
        lambda: S.grid_columns(0),
        lambda: S.grid_columns(3, 0),
    ):
        with pytest.raises(ValueError):
            bad()
    assert S.THREADS % 32 == 0 and S.ROWS_PER_BLOCK * 32 == S.THREADS
    assert S.suffix("float32") == "f32" and S.suffix(np.float64) == "f64"
    with pytest.raises(ValueError, match="dtype"):
        S.suffix("float16")


def test_cuda_sources_ship_with_the_package():
    from importlib import resources

    files = {p.name for p in resources.files("minigd.kernels").iterdir()}
    assert set(S.SOURCES) | {S.COMMON} <= files


# ============================================================================ availability
def test_availability_is_reported_without_raising():
    av = available_backends()
    assert av["cpu"] is None and av["numpy"] is None
    reason = av["gpu"]
    try:
        import cupy
    except Exception:
        assert "CuPy is not installed" in reason and "minigd[gpu]" in reason
        return
    if cupy.is_available():
        assert reason is None
    else:
        assert isinstance(reason, str) and reason
        assert any(w in reason for w in ("driver", "device", "GPU")), reason


def test_gpu_without_a_gpu_is_a_clear_error():
    reason = available_backends()["gpu"]
    if reason is None:
        pytest.skip("a GPU is available here")
    with pytest.raises(mg.BackendUnavailable, match=re.escape(reason)):
        mg.MLP([3, 2], backend="gpu")
    with pytest.raises(mg.BackendUnavailable, match="backend 'gpu' is not available"):
        get_backend_class("gpu")
