"""Tools for testing minigd, not used by training: nothing in the library imports this
package unless asked to.

``minigd.testing.gpu_emu``
    a CPU emulator of the slice of CuPy the ``"gpu"`` backend uses, which runs the
    backend's own CUDA kernels compiled as C++ for the host.  Switched on explicitly: the
    environment variable ``MINIGD_GPU_EMULATE=1``, or ``with gpu_emu.emulated(): ...``.
"""
