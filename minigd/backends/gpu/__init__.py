"""The ``"gpu"`` backend: CuPy arrays, cuBLAS and the CUDA kernels of ``kernels/gpu_*.cu``.

**Status: verified on the CPU emulator, never run on a GPU.**  Every CUDA source compiles
with NVRTC for sm_80 and sm_90 in the test suite (tests/test_gpu_sources.py).  The parity
tests against the NumPy reference (tests/test_gpu_backend.py, tests/test_gpu_norm.py) run
this module's host code and the very kernel text on :mod:`minigd.testing.gpu_emu`, a CPU
emulator of the CuPy API and of the CUDA execution model, in CI, and pass; on a real device
they skip where there is none, which so far has been everywhere this code was developed.
The suite also runs a selection of them with the kernels built with AddressSanitizer
(accesses past any device allocation) and with ThreadSanitizer (data races between the
threads of a launch, between blocks included).  What the emulator cannot show (speed,
memory ordering beyond barriers and atomics, out-of-bounds accesses inside one
allocation, the device math library) is unverified until those tests pass on hardware:
``bash bench/gpu_session.sh`` there runs them and the benchmark in one go.

A model's memory, kernels and stream live on the device that was current when it was
made (``backend_impl.device``); every method of the kernel contract makes that device
current, so a model keeps working while user code has another device current.  CuPy
compiles every kernel with ``-ftz=true``: float32 subnormals (below about 1.2e-38) are
flushed to zero on the device, where the cpu backend keeps them (float64 is unaffected).

The class is assembled from one mixin per concern, each in its own module:

==================  =====================================================================
``_memory``         device buffers, kernels, data and optimizer uploads (``reserve``)
``_passes``         forward, loss and backward passes (tiled or cuBLAS GEMMs)
``_step``           the optimizer chain and one whole training step, as a CUDA graph
``_norm``           batch norm and dropout on the device, running statistics
``_runner``         ``warm_up``, ``train_step``, ``run_steps``, ``opt_apply``
``_stats``          evaluation and per-example gradient statistics
==================  =====================================================================

Not done: the fully fused narrow-MLP kernel (activations in shared memory across layers),
and any tuning of ``graph_max_batch`` (no GPU was available to measure the crossover).
Likely costs on hardware that are analysed, not measured: the column reductions
(``mgd_bias_grad``, the batch-norm statistics) split rows over 8 stripes of one block per 32
columns, not over blocks, so a narrow layer at a large batch runs on few SMs; ``train_step``
copies through pageable host memory and reads back synchronously; the cuBLAS regime costs
the Python of one CuPy call per launch, as it cannot be captured in a graph.
"""

from __future__ import annotations

import functools

from minigd.backends.base import Backend

from ._memory import DeviceMemory, _cupy
from ._norm import DeviceNorm
from ._passes import Passes
from ._runner import Runner
from ._stats import Statistics
from ._step import StepSequence


class GpuBackend(Runner, Statistics, DeviceNorm, StepSequence, Passes, DeviceMemory, Backend):
    """CuPy / CUDA implementation of the backend contract (see :mod:`minigd.backends.base`).

    Attributes
    ----------
    graph_max_batch : int
        Batches up to this size run as a captured CUDA graph with the tiled GEMMs; larger
        ones through cuBLAS without a graph.  Default 64 (a guess: not measured yet).
    use_graphs : bool
        False runs the small-batch path without capturing it (same kernels, launched one
        by one); for debugging.
    read_every : int
        ``fit`` hands up to this many consecutive full-batch steps to :meth:`run_steps`
        (parameters, optimizer state and losses stay on the device; one host
        synchronisation per call), cutting runs at evaluations, checkpoints and budgets.
        1 makes ``fit`` synchronise at every step.  Default 64.
    steps_per_call : int
        The backend contract's name for ``read_every`` (the same value; setting either
        sets both).
    """

    name = "gpu"
    #: run_steps reads back the raw gradient's squared norm only with want_sqn (a reduction
    #: the device skips otherwise)
    reports_grad_norm_sq = False
    #: per-example norms apply to a whole device run (want_sqn): fit ends a run at each tracked step
    tracks_within_run = False

    def __init__(self, layout, act_codes, loss_code, dtype, norm=None):
        super().__init__(layout, act_codes, loss_code, dtype, norm)
        self.cp = cp = _cupy()
        #: the device this model's memory, kernels and stream live on (the one current when
        #: it was made); every public method runs with it current, whatever is current then
        self.device = cp.cuda.Device()
        with self.device:
            self._init_device(layout.n_params)

    @property
    def steps_per_call(self) -> int:
        """How many steps ``fit`` may hand to one :meth:`run_steps` call: ``read_every``."""
        return self.read_every

    @steps_per_call.setter
    def steps_per_call(self, value: int) -> None:
        self.read_every = value


def _on_device(fn):
    @functools.wraps(fn)
    def on_device(self, *args, **kwargs):
        with self.device, self.stream:
            return fn(self, *args, **kwargs)

    return on_device


# The kernel contract, run with the model's device and stream current: CuPy launches
# kernels, makes copies and checks streams against the *current* device, and a model's
# memory, kernels and stream are on the device that was current when it was made.  Entering
# the stream once per call, not once per launch, saves the Python of a context switch on
# each of the dozens of launches of a step (tests/test_gpu_emu.py checks that no work of
# the backend reaches the null stream).
for _name in (
    "reserve",
    "warm_up",
    "draw_dropout",
    "update_running",
    "max_run_steps",
    "train_step",
    "run_steps",
    "opt_apply",
    "forward",
    "losses",
    "loss_grad",
    "last_sqnorms",
    "per_example_terms",
    "per_example_grads",
    "moments_update",
):
    setattr(GpuBackend, _name, _on_device(getattr(GpuBackend, _name)))
del _name

__all__ = ["GpuBackend"]
