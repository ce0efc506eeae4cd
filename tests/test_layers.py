"""The arrows between minigd's layers point one way (issue 18, "Clean edges").

Read from the source files, not from ``sys.modules`` (importing any ``minigd.*`` module
imports the ``minigd`` package first, so a run-time check could not tell who imported what):

* the compute core (``kernels/``, import name ``minigd.kernels``) imports nothing from the
  layers above it -- only the standard library, numpy, numba and ``minigd.kernels.*``;
* the study (``minigd/study/**``) never imports the report (``minigd.report`` reads the
  study's analysis; the study hands its analysis to a report writer it is given), nor the
  kernels (it goes through the model and ``minigd.warmup``);
* the GPU emulator (``minigd.testing``) is imported by no library module at import time;
  the backend registry imports it only when asked for (checked at run time, in a fresh
  interpreter);
* the integer codes the kernels branch on are defined once, in ``kernels/codes.py``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import minigd
import minigd.kernels
from minigd.kernels import codes

MINIGD = Path(minigd.__file__).resolve().parent
KERNELS = Path(minigd.kernels.__file__).resolve().parent


def _module_name(path: Path) -> str:
    """The import name of a source file of the minigd distribution."""
    if path.is_relative_to(KERNELS):
        rel, base = path.relative_to(KERNELS), ["minigd", "kernels"]
    else:
        rel, base = path.relative_to(MINIGD), ["minigd"]
    parts = base + list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list:
    """(absolute module name, line, at module level?) of every import in ``path``: import
    statements anywhere in the file (functions included, relative ones resolved) and
    ``importlib.import_module("...")`` / ``__import__("...")`` calls with a literal name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        level0 = id(node) in top
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, level0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.append((mod, node.lineno, level0))
            out += [(f"{mod}.{a.name}", node.lineno, level0) for a in node.names]  # from pkg import module
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if fname in ("import_module", "__import__"):
                out.append((node.args[0].value, node.lineno, level0))
    return out


def _sources(root: Path) -> list:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _under(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def test_the_walk_sees_relative_lazy_and_dynamic_imports(tmp_path, monkeypatch):
    """The checks below can fail: the walker finds each kind of import they look for."""
    pkg = tmp_path / "minigd" / "study"
    pkg.mkdir(parents=True)
    f = pkg / "probe_layers.py"
    f.write_text(
        "import os\nfrom .. import report\n\n\ndef g():\n    from ..report.plots import x\n"
        "    import importlib\n    importlib.import_module('minigd.report')\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "MINIGD", tmp_path / "minigd")
    found = [(m, top) for m, _, top in _imports(f)]
    assert ("minigd.report", True) in found  # from .. import report
    assert ("minigd.report.plots", False) in found  # from ..report.plots import x
    assert [m for m, top in found if m == "minigd.report" and not top] == ["minigd.report"]  # import_module
    assert ("os", True) in found


def test_kernels_import_nothing_from_the_layers_above():
    files = _sources(KERNELS)
    assert {"codes.py", "cpu.py", "workspace.py", "gpu_sources.py", "__init__.py"} <= {p.name for p in files}
    bad = [
        f"{p.name}:{line} imports {mod}"
        for p in files
        for mod, line, _ in _imports(p)
        if _under(mod, "minigd") and not _under(mod, "minigd.kernels")
    ]
    assert bad == [], "the compute core reaches up: " + "; ".join(bad)


def test_the_study_never_imports_the_report():
    files = _sources(MINIGD / "study")
    assert len(files) > 10
    bad = [
        f"{p.relative_to(MINIGD)}:{line} imports {mod}"
        for p in files
        for mod, line, _ in _imports(p)
        if _under(mod, "minigd.report")
    ]
    assert bad == [], "study -> report (the report reads the study, not the reverse): " + "; ".join(bad)


def test_the_study_reaches_the_compute_core_only_through_the_model():
    """Warm-up, workspace sizes: the study asks minigd's public API (minigd.warmup,
    MLP.workspace_bytes), never the kernels."""
    bad = [
        f"{p.relative_to(MINIGD)}:{line} imports {mod}"
        for p in _sources(MINIGD / "study")
        for mod, line, _ in _imports(p)
        if _under(mod, "minigd.kernels")
    ]
    assert bad == [], "; ".join(bad)


def test_no_library_module_imports_the_testing_package_at_import_time():
    """minigd.testing (the GPU emulator) is a tool for tests: a library module may import it
    only inside a function, and only the backend registry does (on MINIGD_GPU_EMULATE=1)."""
    lazy, eager = [], []
    for p in _sources(MINIGD):
        if p.is_relative_to(MINIGD / "testing"):
            continue
        for mod, line, top in _imports(p):
            if _under(mod, "minigd.testing"):
                (eager if top else lazy).append(f"{p.relative_to(MINIGD)}:{line}")
    assert eager == []
    assert lazy and all(w.startswith(os.path.join("backends", "__init__.py")) for w in lazy), lazy
    assert not (MINIGD / "backends" / "gpu_emu.py").exists()


def test_the_emulator_is_not_loaded_unless_asked_for():
    """A fresh interpreter: making a model, listing the backends (the registry probes the
    gpu) and `minigd backends` leave minigd.testing unimported; MINIGD_GPU_EMULATE=1 loads it."""
    code = (
        "import sys, minigd as mg\n"
        "from minigd.cli import main\n"
        "mg.MLP([3, 2]); mg.available_backends(); main(['backends'])\n"
        "print('LOADED' if 'minigd.testing.gpu_emu' in sys.modules else 'NOT LOADED')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MINIGD_GPU_EMULATE"}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert off.returncode == 0, off.stderr
    assert off.stdout.splitlines()[-1] == "NOT LOADED"
    on = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "MINIGD_GPU_EMULATE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert on.returncode == 0, on.stderr
    assert on.stdout.splitlines()[-1] == "LOADED" and "EMULATED" in on.stdout


def _assigned_names(path: Path) -> set:
    """Names bound by module-level assignments in ``path`` (tuple unpacking included)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        for t in targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Name):
                    names.add(n.id)
    return names


def test_the_codes_are_defined_once():
    """Every code (and shared constant) of minigd.kernels.codes is bound by an assignment
    there and nowhere else: the other modules import it."""
    shared = set(codes.__all__)
    assert {"RELU", "CROSS_ENTROPY", "BN_AFTER", "OP_ADAM", "ACTIVATIONS", "LOSSES", "BATCH_NORM"} <= shared
    assert shared <= _assigned_names(KERNELS / "codes.py")
    copies = {
        f"{p.relative_to(p.parents[1])}: {sorted(shared & _assigned_names(p))}"
        for p in _sources(MINIGD) + _sources(KERNELS)
        if p.name != "codes.py" and shared & _assigned_names(p)
    }
    assert copies == set(), f"copies of the code table: {sorted(copies)}"


@pytest.mark.parametrize("name, table", [("ACTIVATIONS", codes.ACTIVATIONS), ("LOSSES", codes.LOSSES)])
def test_the_code_tables_are_one_to_one(name, table):
    assert sorted(table.values()) == list(range(len(table))), name


def test_the_batch_norm_tables_invert_each_other():
    assert (
        set(codes.BATCH_NORM_ARG) == set(codes.BATCH_NORM.values()) == {codes.BN_NONE, codes.BN_BEFORE, codes.BN_AFTER}
    )
    for code, arg in codes.BATCH_NORM_ARG.items():
        assert codes.BATCH_NORM[arg] == code


@pytest.mark.parametrize("sizes, dtype", [([4, 8, 3], "float32"), ([5, 2], "float64"), ([3, 7, 7, 2], "float64")])
def test_the_model_says_what_a_step_workspace_takes(sizes, dtype):
    """MLP.workspace_bytes (what a study trial records) is the size of the workspace the
    backend allocates for that batch, computed without allocating it."""
    import minigd as mg

    for B in (1, 7, 64):
        m = mg.MLP(sizes, dtype=dtype, backend="cpu")
        assert m.workspace_bytes(B) == m.backend_impl.reserve(B).nbytes > 0
    with pytest.raises(ValueError, match="batch_size"):
        m.workspace_bytes(0)
    with pytest.raises(TypeError, match="batch_size"):
        m.workspace_bytes(2.5)
