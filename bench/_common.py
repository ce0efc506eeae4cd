"""Small helpers shared by the bench scripts (imported from the scripts' own directory)."""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
import time


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else platform.processor(), else "?")."""
    from minigd.study.executors import cpu_model as _model

    return _model(default=platform.processor() or "?")


def synthetic_data(rng, sizes, n):
    """Gaussian float32 inputs (n, sizes[0]) and int64 labels in [0, sizes[-1])."""
    import numpy as np

    X = rng.standard_normal((n, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], n).astype(np.int64)
    return X, y


def train_step_runner(sizes, backend, X, y, yf, idx, B):
    """``run(k)``: k training steps as ``minigd.fit`` takes them -- ``backend.train_step`` on
    the batch ``idx`` of ``X``, ``SGD(lr=1e-3)`` -- on a float32 ``MLP(sizes, seed=0)``.

    The one minigd step that ``step.py`` and ``peers.py`` both time."""
    import minigd as mg

    m = mg.MLP(sizes, dtype="float32", backend=backend, seed=0)
    impl = m.backend_impl
    impl.reserve(B)
    opt = mg.SGD(lr=1e-3).init(m.params)

    def run(k, impl=impl, m=m, opt=opt):
        for _ in range(k):
            impl.train_step(m.params, m._grad, X, y, yf, idx, B, opt, 1e-3, 1)

    return run


#: the bench/ directory
HERE = os.path.dirname(os.path.abspath(__file__))

THREAD_VARS = ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def thread_env(threads: int) -> dict:
    """This process's environment with every thread pool pinned to ``threads`` (for a child)."""
    env = dict(os.environ)
    for k in THREAD_VARS:
        env[k] = str(threads)
    return env


def atomic_write(path: str, data) -> None:
    """Write ``data`` (str, as UTF-8, or bytes) to ``path`` atomically, creating its directory:
    a reader never sees half a result file (:func:`minigd._io.atomic_path`)."""
    from minigd._io import atomic_path, atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not isinstance(data, bytes):
        atomic_write_text(path, data)
        return
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """``msg`` on stderr, with the seconds since the script started."""
    print(f"{msg}  [+{time.perf_counter() - _T0:.0f} s]", file=sys.stderr, flush=True)


def machine() -> dict:
    """What the results were measured on: Python, platform, CPU (model, logical CPUs, SIMD
    flags), numpy / numba / scipy versions and their BLAS, and minigd's git commit."""
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
        flags = next((ln for ln in txt.splitlines() if ln.startswith("flags")), "")
        info["simd"] = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags)
    except OSError:
        pass
    try:
        import numba
        import numpy as np

        info["numpy"] = np.__version__
        info["numba"] = numba.__version__
        blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
        info["numpy_blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
        from minigd.backends.cpu import DEFAULT_BLAS

        info["compiled_step_blas"] = DEFAULT_BLAS  # which one minigd's compiled BLAS step calls
    except Exception:  # pragma: no cover
        pass
    try:
        root = os.path.dirname(HERE)
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", root, "status", "--porcelain", "--", "minigd", "kernels"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            info["minigd_commit"] = head.stdout.strip() + (
                " (+ uncommitted changes in minigd/kernels)" if dirty else ""
            )
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import scipy

        info["scipy"] = scipy.__version__
        blas = scipy.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
        info["scipy_blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:
        info["scipy"] = "missing (minigd's cpu backend then drives BLAS from Python)"
    return info


def use_checkout(root: str) -> None:
    """Make ``import minigd`` load from checkout ``root`` (its ``kernels/`` directory is the
    package ``minigd.kernels``: the editable install maps it, so map it here first)."""
    sys.path.insert(0, root)
    kdir = os.path.join(root, "kernels")

    class _Kernels:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "minigd.kernels":
                return None
            init = os.path.join(kdir, "__init__.py")
            return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[kdir])

    sys.meta_path.insert(0, _Kernels)
