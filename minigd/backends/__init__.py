"""Backend registry: ``available_backends()`` says which backends run here and why not."""
from __future__ import annotations

from minigd.errors import BackendUnavailable

from .base import Backend

BACKENDS = ("cpu", "numpy", "gpu")


def _gpu_reason() -> str | None:
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # ImportError or a broken install
        return f"CuPy is not installed ({type(exc).__name__}: {exc}); install minigd[gpu]"
    return "the CuPy GPU backend is not implemented yet in this version of minigd"


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
        raise BackendUnavailable("gpu", _gpu_reason())
    raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {name!r}")


__all__ = ["Backend", "BACKENDS", "available_backends", "get_backend_class"]
