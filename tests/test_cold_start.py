"""Cold start (issue 20): what the first run on a machine compiles, and what it says.

* A warm-up that compiles for longer than ``NOTICE_AFTER_S`` says "compiling kernels (first
  run only)" on stderr, then how long it took; one that only loads from numba's cache prints
  nothing, however long it takes, and a fast one nothing, not even later.
* The first fit with a named optimizer never compiles the generic optimizer chain: a chain
  that does not fuse runs the ``*_generic`` kernels, compiled only when a run uses one
  (bench/results/cold_start.md measures the saving).
* The study compiles once, in its own process, before any worker starts; no worker compiles
  anything (an empty numba cache, every process's compilations logged).
* ``minigd warmup`` says what it covers, where the cache is (numba's user-wide directory when
  the package directory is not writable) and whether it compiled or loaded; with no cache
  at all it says so and compiles nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from numba.core import config as numba_config

import minigd as mg
from minigd.backends import cpu as cpu_backend
from minigd.kernels import _jit
from minigd.kernels import cpu as K
from minigd.optim import add_decayed_weights, chain, clip_by_global_norm, scale_by_lr, trace

NOTICE = "compiling kernels (first run only)"


def _data(n=64, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, k, n)


def _fit(batch_size=8, optimizer=None, backend="cpu", steps=3):
    X, y = _data()
    m = mg.MLP([5, 7, 3], seed=0, backend=backend)
    mg.fit(m, X, y, batch_size=batch_size, steps=steps, optimizer=optimizer or mg.SGD(lr=0.1), seed=0)
    return m


def _compiling(seconds):
    """Take ``seconds``, one real (tiny) numba compilation among them."""
    _jit.jit(cache=False)(lambda x: x + 1)(1)
    time.sleep(seconds)


def _wrap_steps(monkeypatch, wrap, keys=((False, True),)):
    """Replace the compiled training step of the given (loops?, fused?) regimes by
    ``wrap(real)``: the step kernel (``_STEP``) and, where steps run in compiled runs
    (``CpuBackend.run_steps``, a fused chain), the run kernel that calls it."""
    for key in keys:
        monkeypatch.setitem(cpu_backend._STEP, key, wrap(cpu_backend._STEP[key]))
        name = "run_steps_loops" if key[0] else "run_steps_blas"
        monkeypatch.setattr(cpu_backend.K, name, wrap(getattr(cpu_backend.K, name)))


def test_slow_warm_up_says_it_compiles(monkeypatch, capsys):
    _fit()  # kernels compiled (or loaded) here
    ref = _fit().params.copy()
    capsys.readouterr()

    def slow(real):  # a kernel that compiles for 0.4 s
        return lambda *args: (_compiling(0.4), real(*args))[1]

    monkeypatch.setattr(cpu_backend, "NOTICE_AFTER_S", 0.1)
    _wrap_steps(monkeypatch, slow)
    m = _fit()
    err = capsys.readouterr().err
    assert NOTICE in err
    lines = [ln for ln in err.splitlines() if ln.startswith("minigd:")]
    assert len(lines) == 2 and NOTICE in lines[0], err
    assert lines[1].startswith("minigd: kernels ready in ") and lines[1].endswith(" s (cached for later runs)")
    assert float(lines[1].split("ready in ")[1].split(" s")[0]) >= 0.4
    np.testing.assert_array_equal(m.params, ref)  # the notice changes nothing


def test_slow_warm_up_that_only_loads_prints_nothing(monkeypatch, capsys):
    """Loading from numba's cache can take over a second on a busy machine (the study's
    workers load every kernel): that is not compiling, and says nothing."""
    _fit()
    capsys.readouterr()
    monkeypatch.setattr(cpu_backend, "NOTICE_AFTER_S", 0.1)
    _wrap_steps(monkeypatch, lambda real: lambda *a: (time.sleep(0.5), real(*a))[1])
    n0 = _jit.compile_count()
    _fit()
    assert _jit.compile_count() == n0
    assert "minigd:" not in capsys.readouterr().err


def test_a_compile_after_a_slow_load_is_announced(monkeypatch, capsys):
    """The notice looks again after the first second: a compilation that starts late (after a
    slow load) is still announced."""
    _fit()
    capsys.readouterr()
    monkeypatch.setattr(cpu_backend, "NOTICE_AFTER_S", 0.1)
    _wrap_steps(monkeypatch, lambda real: lambda *a: (time.sleep(0.3), _compiling(0.5), real(*a))[2])
    _fit()
    err = capsys.readouterr().err
    assert err.count(NOTICE) == 1 and err.count("kernels ready in") == 1, err


def test_fast_warm_up_prints_nothing(monkeypatch, capsys):
    _fit()
    capsys.readouterr()
    monkeypatch.setattr(cpu_backend, "NOTICE_AFTER_S", 0.3)
    _fit()
    time.sleep(0.6)  # the timer was cancelled: nothing arrives late either
    assert "minigd:" not in capsys.readouterr().err


def test_notice_threshold_is_one_second():
    assert cpu_backend.NOTICE_AFTER_S == 1.0


@pytest.mark.parametrize("batch_size", [1, 8], ids=["loops", "blas"])
def test_non_fusing_chain_runs_the_generic_kernels(batch_size):
    """decay -> clip -> trace -> lr does not fuse (the fused pass clips first): it runs
    train_step_*_generic, with the NumPy reference's results."""
    opt = lambda: chain(add_decayed_weights(1e-2), clip_by_global_norm(0.5), trace(0.9), scale_by_lr(), lr=0.05)  # noqa: E731
    assert opt().init(np.zeros(3, np.float32)).plan[0] == 0
    got = _fit(batch_size, opt(), steps=4)
    ref = _fit(batch_size, opt(), backend="numpy", steps=4)
    np.testing.assert_allclose(got.params, ref.params, rtol=2e-5, atol=2e-6)
    assert not np.array_equal(got.params, _fit(batch_size, mg.SGD(lr=0.05), steps=4).params)


def test_fused_kernels_refuse_a_non_fusing_chain():
    """Called with plan[0] == 0 (a chain that must run the generic kernels), the fused
    entry points apply nothing rather than skip the optimizer silently."""
    m = mg.MLP([3, 4, 2], seed=0)
    st = chain(add_decayed_weights(1e-2), clip_by_global_norm(0.5), trace(0.9), scale_by_lr(), lr=0.1).init(m.params)
    g = np.ones_like(m.params)
    before = m.params.copy()
    applied, _ = K.opt_apply(m.params, g, st.codes, st.hp, st.soff, st.state, st.plan, 0.1, 1)
    assert applied == 0
    np.testing.assert_array_equal(m.params, before)
    applied, _ = K.opt_apply_generic(m.params, g.copy(), st.codes, st.hp, st.soff, st.state, st.plan, 0.1, 1)
    assert applied == 1 and not np.array_equal(m.params, before)


_COLD = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import minigd as mg
from minigd.kernels import cpu as K
X = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
y = np.arange(256) % 10
mg.fit(mg.MLP([64, 128, 10]), X, y, batch_size=32, steps=5)
print(json.dumps({"seconds": time.perf_counter() - t0, "compiled": sorted(
    name for name in ("_opt_chain_generic", "_opt_update_generic", "train_step_blas_generic",
                      "train_step_loops_generic", "train_step_loops", "train_step_blas")
    if sum(getattr(K, name).stats.cache_misses.values()))}))
"""


def test_cold_first_fit_says_so_and_skips_what_it_does_not_use(tmp_path):
    """A fresh process with an empty numba cache: the first fit compiles (and says so) only
    the kernels its regime and optimizer use; a second process loads them from the cache
    (compiles nothing) and is silent."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("MINIGD_NO_CACHE", None)
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", _COLD], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append((json.loads(out.stdout.strip().splitlines()[-1]), out.stderr))
    (cold, cold_err), (warm, warm_err) = runs
    assert cold["compiled"] == ["train_step_blas"], cold
    assert NOTICE in cold_err and "kernels ready in" in cold_err
    assert warm["compiled"] == [] and "minigd:" not in warm_err, warm_err
    assert warm["seconds"] < cold["seconds"]


def test_warmup_speaks_once_for_all_its_fits(monkeypatch, capsys):
    """``minigd.warmup.warmup`` runs many fits under one notice: nested warm-ups are silent."""
    from minigd.warmup import warmup

    warmup(("float32",))
    capsys.readouterr()
    monkeypatch.setattr(cpu_backend, "NOTICE_AFTER_S", 0.1)
    _wrap_steps(monkeypatch, lambda real: lambda *a: (_compiling(0.15), real(*a))[1], ((True, True), (False, True)))
    warmup(("float32",))
    err = capsys.readouterr().err
    assert err.count(NOTICE) == 1 and err.count("kernels ready in") == 1, err
    assert cpu_backend._CompileNotice._depth == 0


# Logs every numba compilation (cache miss) of every Python process started with this on its
# path, the study's workers included (they inherit the environment), one file per process.
_HOOK = """
import os
if os.environ.get("MINIGD_TEST_COMPILE_LOG"):
    import json, sys, time
    _path = os.path.join(os.environ["MINIGD_TEST_COMPILE_LOG"], f"{os.getpid()}.jsonl")

    def _log(rec):
        with open(_path, "a") as f:
            f.write(json.dumps(rec) + "\\n")

    _log({"ev": "start", "t": time.time(), "argv": sys.argv})
    from numba.core import event

    class _Listener(event.Listener):
        def on_start(self, ev):
            _log({"ev": "compile", "name": ev.data["dispatcher"].py_func.__qualname__, "t": time.time()})

        def on_end(self, ev):
            _log({"ev": "compiled", "t": time.time()})

    event.register("numba:compile", _Listener())
"""

_STUDY = """
import sys
from minigd.study import SweepSpec, run_study
spec = SweepSpec(batch_sizes=(1, 32), lr_grid=(1.0,), n_seeds=2, max_epochs=2, min_steps=1, adaptive=True,
                 lr_policy="fixed")
run_study(spec, sys.argv[1], workers=2, report=None, log=print)
"""


def test_the_study_compiles_once_before_its_workers_start(tmp_path):
    """An empty numba cache: the study's own process compiles the kernels (and says so)
    before the first worker starts; no worker (the sweep's, the probe's) compiles anything:
    everything a trial runs, the gradient moments of its noise measurement included, loads
    from the cache.  (Slow by nature: a cold compile of the float32 kernels, ~30 s.)"""
    hook, log = tmp_path / "hook", tmp_path / "log"
    hook.mkdir()
    log.mkdir()
    (hook / "sitecustomize.py").write_text(_HOOK)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), MINIGD_TEST_COMPILE_LOG=str(log))
    env["PYTHONPATH"] = os.pathsep.join([str(hook)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("MINIGD_NO_CACHE", None)
    out = subprocess.run(
        [sys.executable, "-c", _STUDY, str(tmp_path / "study")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    procs = {}
    for f in log.glob("*.jsonl"):
        recs = [json.loads(line) for line in f.read_text().splitlines()]
        procs[int(f.stem)] = recs
    study_pid = next(pid for pid, recs in procs.items() if recs[0]["argv"] == ["-c", str(tmp_path / "study")])
    workers = {pid: recs for pid, recs in procs.items() if "--multiprocessing-fork" in recs[0]["argv"]}
    assert len(workers) >= 2, sorted(procs)  # the pool did start its workers
    compiled_in = {pid: [r["name"] for r in recs if r["ev"] == "compile"] for pid, recs in procs.items()}
    assert not any(compiled_in[pid] for pid in procs if pid != study_pid), {
        pid: names for pid, names in compiled_in.items() if pid != study_pid and names
    }
    assert compiled_in[study_pid], "an empty cache, yet the study compiled nothing"
    assert {"_moments_update_blocked", "train_step_blas", "train_step_loops"} <= set(compiled_in[study_pid])
    first_worker = min(recs[0]["t"] for recs in workers.values())
    last_compile = max(r["t"] for r in procs[study_pid] if r["ev"] == "compiled")
    assert last_compile < first_worker
    assert "compiling kernels (first run only" in out.stdout and "float32: compiled in" in out.stdout, out.stdout
    assert "minigd: compiling kernels" not in out.stderr  # the workers only load: no notice


def test_minigd_warmup_says_what_it_covers_and_where_the_cache_is(capsys):
    from minigd.cli import main
    from minigd.warmup import COVERS, where

    assert main(["warmup", "--dtypes", "float32"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert all(c in out[0] for c in COVERS), out
    assert out[1] == f"numba cache: {where()}" and where() == ", ".join(_jit.cache_dirs())
    assert _jit.cache_status() == "enabled" and len(_jit.cache_dirs()) == 1
    assert os.path.isdir(_jit.cache_dirs()[0])
    # the kernels of this process are compiled (or loaded) by now: nothing to compile
    assert out[3].startswith("  float32: loaded from numba's cache in "), out


_PROBE_KERNEL = """
from ._jit import jit


@jit
def plus_one(x):
    return x + 1
"""

_WHERE = """
import json
from minigd.warmup import where
from minigd.kernels import _jit, _probe_kernel
assert _probe_kernel.plus_one(1) == 2
print(json.dumps({"where": where(), "dirs": _jit.cache_dirs(), "status": _jit.cache_status()}))
"""


def _copy_package(site):
    """The package copied to ``site`` as pip installs it (kernels as minigd/kernels), without
    any ``__pycache__``."""
    import shutil

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(os.path.join(root, "minigd"), site / "minigd", ignore=ignore)
    shutil.copytree(os.path.join(root, "kernels"), site / "minigd" / "kernels", ignore=ignore)
    return site


def _readonly_copy(tmp_path):
    """The package copied to tmp_path/site, with a tiny cached kernel added and a *file*
    where the kernels' ``__pycache__`` would go: the package directory cannot take numba's
    cache (even for root, whom permissions do not stop)."""
    site = _copy_package(tmp_path / "site")
    (site / "minigd" / "kernels" / "_probe_kernel.py").write_text(_PROBE_KERNEL)
    (site / "minigd" / "kernels" / "__pycache__").write_text("not a directory")
    return site


def _run_where(site, xdg, *args):
    env = dict(os.environ, PYTHONPATH=str(site), XDG_CACHE_HOME=str(xdg), PYTHONDONTWRITEBYTECODE="1")
    for k in ("NUMBA_CACHE_DIR", "MINIGD_NO_CACHE"):
        env.pop(k, None)
    cmd = [sys.executable, "-c", _WHERE] if not args else [sys.executable, "-m", "minigd", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(site))
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_unwritable_package_dir_caches_in_the_user_wide_directory(tmp_path):
    """numba falls back to its user-wide cache directory ($XDG_CACHE_HOME/numba) when the
    package's ``__pycache__`` cannot be made; ``where()`` (what ``minigd warmup`` prints)
    names it, and the compiled kernel is stored there."""
    site = _readonly_copy(tmp_path)
    out = _run_where(site, tmp_path / "xdg")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["status"] == "enabled"
    assert len(got["dirs"]) == 1 and got["dirs"][0].startswith(str(tmp_path / "xdg" / "numba")), got
    assert got["where"] == got["dirs"][0]
    assert any(f.endswith(".nbi") and f.startswith("_probe_kernel") for f in os.listdir(got["dirs"][0]))


def test_no_writable_cache_location_warns_and_warmup_says_so(tmp_path):
    """Nowhere to write (the package directory and the user-wide directory both refused):
    minigd warns once, compiles in memory, and ``minigd warmup`` says there is nothing to
    keep instead of compiling for nothing."""
    site = _readonly_copy(tmp_path)
    xdg = tmp_path / "xdg"
    xdg.write_text("a file, not a directory")
    out = _run_where(site, xdg)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["status"].startswith("disabled: ") and got["dirs"] == []
    assert got["where"].startswith("no cache (disabled: ") and "NUMBA_CACHE_DIR" in got["where"]
    assert out.stderr.count("numba cannot write its compile cache here") == 1, out.stderr
    out = _run_where(site, xdg, "warmup", "--dtypes", "float32")
    assert "minigd warmup: nothing to do: no cache (disabled: " in out.stderr
    assert "compiled in" not in out.stdout and "loaded from" not in out.stdout


@pytest.mark.parametrize(
    "n_val, expect",
    [(0, []), (40, [40]), (2049, [1, 2048])],
    ids=["no-validation", "one-chunk", "two-regimes"],
)
def test_a_run_that_evaluates_warms_its_evaluation_up_front(monkeypatch, n_val, expect):
    """fit's warm-up (before the clock) also runs one evaluation per regime of the run's
    evaluation chunks (EVAL_CHUNK rows and the rest), so that the first evaluation does not
    compile mid-run; a run that does not evaluate does not; the results are unchanged."""
    log = []
    real_warm, real_losses = cpu_backend.CpuBackend.warm_up, cpu_backend.CpuBackend.losses

    def warm_up(self, *a, **kw):
        log.append("warm_up")
        real_warm(self, *a, **kw)
        log.append("end")

    def losses(self, params, X, yi, yf, idx, B):
        log.append(B)
        return real_losses(self, params, X, yi, yf, idx, B)

    X, y = _data(n=64)
    Xv, yv = _data(n=max(n_val, 1), seed=1)
    val = (Xv, yv) if n_val else None
    kw = dict(batch_size=8, steps=3, optimizer=mg.SGD(lr=0.1), seed=0, validation=val)
    ref_m = mg.MLP([5, 7, 3], seed=0)
    ref = mg.fit(ref_m, X, y, **kw)
    monkeypatch.setattr(cpu_backend.CpuBackend, "warm_up", warm_up)
    monkeypatch.setattr(cpu_backend.CpuBackend, "losses", losses)
    m = mg.MLP([5, 7, 3], seed=0)
    assert m.backend_impl.use_blas(2048) and not m.backend_impl.use_blas(1)
    hist = mg.fit(m, X, y, **kw)
    assert log[0] == "warm_up" and sorted(log[1 : log.index("end")]) == expect, log
    untimed = lambda h: [{k: v for k, v in e.items() if k != "time"} for e in h.evals]  # noqa: E731
    assert untimed(hist) == untimed(ref)
    np.testing.assert_array_equal(m.params, ref_m.params)


_RELOCATE = """
import json, sys
import numpy as np
import minigd as mg
from minigd.kernels import _jit, cpu_stats as KS
n0 = _jit.compile_count()
KS.sum64(np.zeros(3))  # a small kernel in another file (kernels/cpu.py) than the one edited below
if sys.argv[1] == "fit":
    X = np.ones((16, 3), np.float32)
    mg.fit(mg.MLP([3, 4, 2], seed=0), X, np.arange(16) % 2, batch_size=8, steps=2, optimizer=mg.SGD(lr=0.1))
print(json.dumps({"compiled": _jit.compile_count() - n0, "replaced": _jit.stamp_replaced,
                  "dirs": _jit.cache_dirs(), "file": mg.__file__}))
"""


def _run_relocate(site, what, **env_extra):
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1", **env_extra)
    for k in ("NUMBA_CACHE_DIR", "MINIGD_NO_CACHE"):
        env.pop(k, None)
    out = subprocess.run(
        [sys.executable, "-c", _RELOCATE, what], env=env, capture_output=True, text=True, timeout=600, cwd=str(site)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["file"] == str(site / "minigd" / "__init__.py") and got["replaced"], got
    if "NUMBA_CACHE_LOCATOR_CLASSES" not in env_extra:
        assert got["dirs"] == [str(site / "minigd" / "kernels" / "__pycache__")], got
    return got


def test_a_cache_filled_in_one_copy_loads_in_another(tmp_path):
    """What the wheel relies on (setup.py fills the cache in its build directory, pip copies
    the files elsewhere): the cache stamp is the kernel sources' contents, not their paths
    or modification times.  A cache filled by a small fit in one copy of the package, moved
    to a copy in another directory whose files all have other mtimes, loads there: the same
    fit compiles nothing.  Editing a kernel source (its content) invalidates every kernel,
    those of other files included; another CPU (numba's key: CPU name and features) is a
    cache miss that just compiles."""
    import shutil

    a, b = _copy_package(tmp_path / "a" / "site"), _copy_package(tmp_path / "b" / "site")
    for root, _, files in os.walk(b):
        for f in files:
            os.utime(os.path.join(root, f), ns=(10**18, 10**18))  # 2001: none like a's
    assert _run_relocate(a, "fit")["compiled"] > 0  # an empty cache
    shutil.copytree(a / "minigd" / "kernels" / "__pycache__", b / "minigd" / "kernels" / "__pycache__")
    assert _run_relocate(b, "fit")["compiled"] == 0
    if hasattr(numba_config, "CACHE_LOCATOR_CLASSES"):  # a numba that lets the locator be chosen
        # the package directory not writable (what numba's user-wide locator is for): the
        # shipped entries are copied to the user-wide directory, and load from there
        xdg = tmp_path / "xdg"
        got = _run_relocate(b, "fit", NUMBA_CACHE_LOCATOR_CLASSES="UserWideCacheLocator", XDG_CACHE_HOME=str(xdg))
        assert got["compiled"] == 0 and len(got["dirs"]) == 1 and got["dirs"][0].startswith(str(xdg)), got
        assert any(f.startswith("cpu.train_step_blas") for f in os.listdir(got["dirs"][0]))
    assert _run_relocate(b, "probe", NUMBA_CPU_NAME="generic")["compiled"] == 1  # another CPU: compiles
    assert _run_relocate(b, "probe")["compiled"] == 0
    codes = b / "minigd" / "kernels" / "codes.py"
    codes.write_bytes(codes.read_bytes() + b"\n# edited\n")
    assert _run_relocate(b, "probe")["compiled"] == 1  # sum64 lives in kernels/cpu.py, not codes.py


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_backend():
    """The build backend (``_build_backend/minigd_build.py``) as a module; it needs setuptools."""
    import importlib.util

    pytest.importorskip("setuptools")
    path = os.path.join(_ROOT, "_build_backend", "minigd_build.py")
    spec = importlib.util.spec_from_file_location("_minigd_build_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_build_warmup_setting(monkeypatch):
    """MINIGD_BUILD_WARMUP: unset -> float32; 0 (or no/off/false) -> skipped, and the wheel's
    build does not ask for numpy/numba/SciPy; a list -> those dtypes."""
    mb = _build_backend()
    monkeypatch.delenv("MINIGD_BUILD_WARMUP", raising=False)
    assert mb._dtypes() == ["float32"]
    for off in ("0", "off", "False"):
        monkeypatch.setenv("MINIGD_BUILD_WARMUP", off)
        assert mb._dtypes() == []
    monkeypatch.setenv("MINIGD_BUILD_WARMUP", "float32, float64")
    assert mb._dtypes() == ["float32", "float64"]
    assert {r.split(">")[0] for r in mb.WARMUP_REQUIRES} == {"numpy", "numba", "scipy"}


@pytest.mark.parametrize("case", ["no-package", "bad-dtype"])
def test_a_failed_build_warmup_never_fails_the_build(tmp_path, capsys, case):
    """The warm-up of the wheel's build (``warm_build_lib``) that cannot run -- the package is
    not where it should be, or the warm-up itself fails -- says so and returns 0 (no cache
    written) instead of raising: the wheel is then built without the cache."""
    mb = _build_backend()
    build_lib = tmp_path / "build_lib"
    build_lib.mkdir()
    if case == "bad-dtype":
        _copy_package(build_lib)
    n = mb.warm_build_lib(str(build_lib), ["float16"] if case == "bad-dtype" else ["float32"], timeout=300)
    out = capsys.readouterr().out
    assert n == 0
    assert "failed (exit" in out and "building WITHOUT compiled kernels" in out, out
    if case == "bad-dtype":
        assert "float16" in out  # the warm-up's own error, passed on
    assert not (build_lib / "minigd" / "kernels" / "__pycache__").exists()


def _src_copy(src):
    """What the sdist holds, copied to ``src`` (without any cache)."""
    import shutil

    pytest.importorskip("setuptools")
    for name in ("minigd", "kernels", "_build_backend"):
        shutil.copytree(os.path.join(_ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy(os.path.join(_ROOT, name), src / name)
    return src


def _setuptools_major() -> int:
    from importlib.metadata import version

    try:
        return int(version("setuptools").split(".")[0])
    except Exception:  # not installed, or an odd version string
        return 0


def _pip_wheel(src, out_dir, env):
    """``pip wheel`` of ``src`` without build isolation (this environment's setuptools and
    numba; no network); returns pip's output, the backend's lines included."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(out_dir), "."],
        cwd=str(src),
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    log = out.stdout + out.stderr  # pip passes the backend's output on (on stderr)
    assert out.returncode == 0, log[-3000:]
    return log


@pytest.mark.skipif(
    _setuptools_major() < 77,
    reason="builds without isolation: needs this environment's setuptools to meet [build-system] (>= 77)",
)
def test_a_wheel_built_without_the_warm_up_ships_no_cache(tmp_path):
    """MINIGD_BUILD_WARMUP=0: the wheel holds no numba cache, not even one a previous build
    left in the reused build directory (it would be valid, and compiled for this machine
    only: a wheel meant for elsewhere must not carry it); the build backend and its build_py
    (pyproject.toml: backend-path, cmdclass) run end to end, without compiling anything."""
    import zipfile

    src = _src_copy(tmp_path / "src")
    stale = src / "build" / "lib" / "minigd" / "kernels" / "__pycache__"
    stale.mkdir(parents=True)
    (stale / "cpu.train_step_blas-1.py311.nbi").write_bytes(b"left by an earlier build")
    env = dict(os.environ, MINIGD_BUILD_WARMUP="0")
    log = _pip_wheel(src, tmp_path / "wh", env)
    assert "MINIGD_BUILD_WARMUP=0: building without compiled kernels" in log, log[-3000:]
    (whl,) = (tmp_path / "wh").glob("minigd-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "minigd/kernels/cpu.py" in names and "minigd/kernels/gpu_dense.cu" in names
    assert not [n for n in names if "__pycache__" in n], names


_WHEEL_FIT = """
import json
import numpy as np
import minigd as mg
from minigd.kernels import _jit
X = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
y = np.arange(256) % 10
n0 = _jit.compile_count()
for B in (1, 32, 256):
    mg.fit(mg.MLP([64, 128, 10]), X, y, batch_size=B, steps=3)
print(json.dumps({"compiled": _jit.compile_count() - n0, "file": mg.__file__, "dirs": _jit.cache_dirs()}))
"""


@pytest.mark.skipif(
    not os.environ.get("MINIGD_TEST_WHEEL"),
    reason="builds a wheel with its kernel warm-up (~1-2 min of compiling); set MINIGD_TEST_WHEEL=1 to run it",
)
def test_the_wheel_ships_the_compiled_kernels(tmp_path):
    """``pip wheel`` of the project (here without build isolation: this environment's numba,
    so that the shipped cache's keys match it; no network) holds numba's cache of the
    kernels, for both BLAS regimes; unpacked elsewhere (a wheel is installed by unpacking)
    the first fits of B = 1, 32, 256 compile nothing, with SciPy and without."""
    import zipfile

    env = {
        k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "MINIGD_NO_CACHE", "MINIGD_BUILD_WARMUP")
    }
    log = _pip_wheel(_src_copy(tmp_path / "src"), tmp_path / "wh", env)
    assert "compiled kernels in the wheel" in log, log[-3000:]
    (whl,) = (tmp_path / "wh").glob("minigd-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    cached = {n.split("/")[-1].split("-")[0] for n in names if n.startswith("minigd/kernels/__pycache__/")}
    # the compiled BLAS regime's step (SciPy present), the loops', the Python-driven regime's epilogues (without)
    assert {"cpu.train_step_blas", "cpu.train_step_loops", "cpu.bias_act_forward", "cpu.gather_rows"} <= cached
    assert not [n for n in names if n.endswith(".pyc")]
    site = tmp_path / "site"
    zipfile.ZipFile(whl).extractall(site)
    for hide_scipy in (False, True):
        code = ("import sys; sys.modules['scipy'] = None\n" if hide_scipy else "") + _WHEEL_FIT
        env["PYTHONPATH"] = str(site)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path)
        )
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["file"] == str(site / "minigd" / "__init__.py")
        assert got["dirs"] == [str(site / "minigd" / "kernels" / "__pycache__")]
        assert got["compiled"] == 0, (hide_scipy, out.stderr[-2000:])


def test_the_notice_does_not_promise_a_cache_that_is_off(monkeypatch, capsys):
    """With numba's cache off (``MINIGD_NO_CACHE``, or no writable location) the notice says
    the kernels are not cached, instead of "cached for later runs"."""
    from minigd.kernels import _jit as jit_mod

    _fit()
    capsys.readouterr()
    monkeypatch.setattr(cpu_backend, "NOTICE_AFTER_S", 0.1)
    monkeypatch.setattr(jit_mod, "_cache_disabled_reason", "MINIGD_NO_CACHE is set")
    _wrap_steps(monkeypatch, lambda real: lambda *a: (_compiling(0.3), real(*a))[1])
    _fit()
    err = capsys.readouterr().err
    assert "kernels ready in" in err and "cached for later runs" not in err, err
    assert "not cached: numba's compile cache is disabled: MINIGD_NO_CACHE is set" in err, err
