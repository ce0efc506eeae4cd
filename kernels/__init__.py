"""minigd's compute core (import name ``minigd.kernels``).

``codes`` is the one table of the integer codes the kernels branch on; ``workspace``
describes every buffer (shape, dtype, offset) from the layer sizes and the largest batch;
``cpu``, ``cpu_norm`` and ``cpu_stats`` hold the Numba kernels, ``gpu_sources`` the CUDA
sources of the gpu backend.  See ``kernels/cpu.py`` for the contract every backend follows.

The core imports nothing from the layers above it (the model, ``fit``, the backends);
``tests/test_layers.py`` checks that.  To compile every CPU kernel up front, use
:func:`minigd.warmup.warmup` (or ``minigd warmup``).
"""

from .workspace import ParamLayout, Workspace  # noqa: F401
