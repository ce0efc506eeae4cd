"""minigd's build backend: setuptools', plus the CPU kernels compiled into the wheel.

A plain ``pip install .`` (or of the sdist) builds a wheel and installs it; without this, the
first ``fit`` afterwards compiled the kernels for 10-23 s (issue 20, bench/results/cold_start.md).
Here the wheel's build runs ``minigd warmup`` on the package it has just laid out in its
build directory, so that numba writes its on-disk cache into
``build_lib/minigd/kernels/__pycache__`` and the wheel ships it (``*.nbi``, ``*.nbc``).  The
cache's stamp is the kernel sources' contents (``kernels/_jit.py``), not their paths or
mtimes, so it stays valid in site-packages; numba's own keys (its version, the Python
version, the CPU's name and features) still apply: a wheel built on another CPU or with
another numba just compiles on first use, as before, with its notice.

* ``get_requires_for_build_wheel`` adds what the warm-up imports: numpy and numba, and SciPy,
  so that both BLAS regimes of the CPU backend get compiled (with SciPy the compiled one,
  ``train_step_blas``; a second pass with SciPy hidden compiles the Python-driven one, what
  an install without SciPy runs).  Editable installs (``pip install -e .``, ``make install``)
  and sdists get setuptools only, as before: ``make install`` warms the checkout itself.
* ``MINIGD_BUILD_WARMUP=0`` skips the warm-up (and those requirements); a list of dtypes
  (``MINIGD_BUILD_WARMUP=float32,float64``) warms those instead of float32 alone.
* The warm-up never fails the build: on any error it says so and the wheel is built without
  the cache (the first ``fit`` then compiles, as it did before).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from setuptools import build_meta as _orig
from setuptools.command.build_py import build_py as _build_py

build_wheel = _orig.build_wheel
build_sdist = _orig.build_sdist
prepare_metadata_for_build_wheel = _orig.prepare_metadata_for_build_wheel
get_requires_for_build_sdist = _orig.get_requires_for_build_sdist
build_editable = _orig.build_editable
prepare_metadata_for_build_editable = _orig.prepare_metadata_for_build_editable
get_requires_for_build_editable = _orig.get_requires_for_build_editable  # setuptools' own list

#: what the warm-up imports (numpy, numba: minigd's own requirements; SciPy: numba's np.dot)
WARMUP_REQUIRES = ["numpy>=1.24", "numba>=0.59", "scipy>=1.10"]
#: the seconds one warm-up pass may take before the build goes on without it
TIMEOUT_S = 1200


def _dtypes() -> list[str]:
    """The dtypes to warm (``MINIGD_BUILD_WARMUP``), empty when it says to skip."""
    value = os.environ.get("MINIGD_BUILD_WARMUP", "float32").strip().lower()
    if value in ("0", "no", "off", "false", "none"):
        return []
    return [d.strip() for d in value.split(",") if d.strip()] or ["float32"]


def get_requires_for_build_wheel(config_settings=None):
    return _orig.get_requires_for_build_wheel(config_settings) + (WARMUP_REQUIRES if _dtypes() else [])


_PASS = """
import os, sys
if sys.argv[1] == "no-scipy":  # what an install without SciPy runs: the Python-driven BLAS regime
    sys.modules["scipy"] = None
import minigd.kernels
here = os.path.realpath(os.getcwd()) + os.sep
for mod in (minigd, minigd.kernels):  # not an installed minigd (an editable one, say)
    if not os.path.realpath(mod.__file__).startswith(here):
        sys.exit(f"imported {mod.__name__} from {mod.__file__}, not from the build directory {here}")
from minigd.cli import main
sys.exit(main(["warmup", "--dtypes", sys.argv[2]]))
"""


def _say(msg: str) -> None:
    print(f"minigd build: {msg}", flush=True)


def warm_build_lib(build_lib: str, dtypes: list[str], timeout: float = TIMEOUT_S) -> int:
    """Compile the kernels of the package laid out in ``build_lib`` into its own
    ``minigd/kernels/__pycache__``; returns the number of cache index files written there.
    Never raises: on any failure it says so and returns what was written (0: none)."""
    cache = os.path.join(build_lib, "minigd", "kernels", "__pycache__")
    shutil.rmtree(cache, ignore_errors=True)  # a previous build's, possibly stale
    env = dict(os.environ)
    for k in ("NUMBA_CACHE_DIR", "MINIGD_NO_CACHE", "NUMBA_DISABLE_JIT", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES"):
        env.pop(k, None)  # the cache must go into build_lib, compiled for this CPU
    env.update(
        PYTHONPATH=os.pathsep.join([build_lib] + [p for p in [env.get("PYTHONPATH")] if p]),
        PYTHONDONTWRITEBYTECODE="1",  # ship numba's cache, not .pyc files (pip writes those)
        NUMBA_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
    )
    try:
        import importlib.util

        have_scipy = importlib.util.find_spec("scipy") is not None
    except Exception:  # noqa: BLE001 - a broken scipy is no scipy here
        have_scipy = False
    passes = ["with-scipy", "no-scipy"] if have_scipy else ["no-scipy"]
    t0 = time.perf_counter()
    for which in passes:
        try:
            out = subprocess.run(
                [sys.executable, "-c", _PASS, which, ",".join(dtypes)],
                cwd=build_lib,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except Exception as exc:  # noqa: BLE001 - whatever it is, the build goes on
            _say(f"kernel warm-up ({which}) did not run: {type(exc).__name__}: {exc}")
            break
        if out.returncode != 0:
            tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-5:])
            _say(f"kernel warm-up ({which}) failed (exit {out.returncode}):\n{tail}")
            break
        for line in out.stdout.strip().splitlines():
            _say(f"  [{which}] {line}")
    try:
        n = sum(f.endswith(".nbi") for f in os.listdir(cache))
    except OSError:
        n = 0
    if n:
        _say(f"{n} compiled kernels in the wheel ({time.perf_counter() - t0:.1f} s): the first fit loads them")
    else:
        _say(
            "building WITHOUT compiled kernels: the first fit after installing compiles them "
            "(~10-20 s, once; `minigd warmup` does it ahead)"
        )
    return n


class build_py(_build_py):
    """setuptools' build_py, then (wheels only) the kernels compiled into the build directory."""

    def run(self):
        super().run()
        if self.editable_mode or self.dry_run:
            return  # pip install -e: the sources stay in the tree (make install warms them there)
        build_lib = os.path.abspath(self.build_lib)
        # a previous build's cache in a reused build directory: never shipped unless rebuilt now
        shutil.rmtree(os.path.join(build_lib, "minigd", "kernels", "__pycache__"), ignore_errors=True)
        dtypes = _dtypes()
        if not dtypes:
            _say("MINIGD_BUILD_WARMUP=0: building without compiled kernels")
            return
        try:
            import numba  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - e.g. --no-build-isolation without numba
            _say(f"numba not importable in the build environment ({exc}): building without compiled kernels")
            return
        warm_build_lib(build_lib, dtypes)
