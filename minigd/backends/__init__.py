"""Backend registry: ``available_backends()`` says which backends run here and why not."""

from __future__ import annotations

import os
import sys

from minigd.errors import BackendUnavailable

from .base import Backend

BACKENDS = ("cpu", "numpy", "gpu")

#: the environment variable that runs the gpu backend on the CPU emulator (tests, CI)
EMULATE_ENV = "MINIGD_GPU_EMULATE"
_EMULATOR = "minigd.testing.gpu_emu"


def gpu_emulator():
    """The GPU emulator module (:mod:`minigd.testing.gpu_emu`, which stands in for CuPy) when
    the gpu backend is to run on it, else None.

    The emulator is a testing tool, switched on only explicitly: with MINIGD_GPU_EMULATE=1
    (then it is imported here), or inside its ``emulated()`` block (then the caller has
    imported it).  Otherwise it is never imported.  Raises ValueError for a malformed
    MINIGD_GPU_EMULATE.
    """
    emu = sys.modules.get(_EMULATOR)
    if emu is None:
        if os.environ.get(EMULATE_ENV, "") in ("", "0"):
            return None
        from minigd.testing import gpu_emu as emu
    return emu if emu.enabled() else None


def _gpu_reason() -> str | None:
    """None when the gpu backend can run here, else the reason it cannot.

    Probes without raising: CuPy importable, ``cupy.is_available()`` (a CUDA driver, a
    device, and a driver recent enough for CuPy's CUDA runtime), and, when that says no,
    which of those is missing.  With the GPU emulator switched on (:func:`gpu_emulator`),
    whether the emulator can run instead.
    """
    try:
        emu = gpu_emulator()
    except ValueError as exc:  # a malformed MINIGD_GPU_EMULATE
        return str(exc)
    if emu is not None:
        why = emu.reason()
        return None if why is None else f"{EMULATE_ENV} is set but {why}"
    try:
        import cupy
    except Exception as exc:  # ImportError or a broken install
        return f"CuPy is not installed ({type(exc).__name__}: {exc}); install minigd[gpu]"
    try:
        if cupy.is_available():
            return None
    except Exception as exc:  # pragma: no cover - is_available does not raise in CuPy >= 9
        return f"CuPy cannot use a GPU here ({type(exc).__name__}: {exc})"
    return _gpu_detail(cupy)


def _gpu_detail(cupy) -> str:
    """Why ``cupy.is_available()`` is False: no driver, a driver too old, or no device."""
    rt = cupy.cuda.runtime
    try:
        driver = int(rt.driverGetVersion())
    except Exception:
        driver = 0
    try:
        runtime = int(rt.runtimeGetVersion())
    except Exception:  # pragma: no cover
        runtime = 0

    def ver(v):
        return f"{v // 1000}.{(v % 1000) // 10}"

    if driver == 0:
        return "no NVIDIA GPU driver found (cupy.is_available() is False): this machine has no usable GPU"
    if runtime and driver < runtime:
        return (
            f"the NVIDIA driver is too old: it supports CUDA {ver(driver)}, CuPy was built for "
            f"CUDA {ver(runtime)}; update the driver or install a CuPy for an older CUDA"
        )
    try:
        n = int(rt.getDeviceCount())
    except Exception as exc:
        return f"CUDA reports no usable device ({type(exc).__name__}: {exc})"
    if n == 0:
        return "no CUDA device found (the driver is installed but sees no GPU)"
    return "cupy.is_available() is False (CuPy cannot use the GPU here)"


def available_backends() -> dict:
    """{name: None if usable else the reason it is not}."""
    return {"cpu": None, "numpy": None, "gpu": _gpu_reason()}


def get_backend_class(name: str):
    if name == "cpu":
        from .cpu import CpuBackend

        return CpuBackend
    if name == "numpy":
        from .numpy_ref import NumpyBackend

        return NumpyBackend
    if name == "gpu":
        reason = _gpu_reason()
        if reason is not None:
            raise BackendUnavailable("gpu", reason)
        from .gpu import GpuBackend

        return GpuBackend
    raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {name!r}")


__all__ = ["Backend", "BACKENDS", "EMULATE_ENV", "available_backends", "get_backend_class", "gpu_emulator"]
