"""Buffer layout: where each parameter block and workspace block lives.

Everything is computed once from (layer sizes, activation codes, capacity) and handed to
the kernels as one int64 table (``lay``, see ``kernels/cpu.py``).  Nothing here depends on
the array module, so the GPU backend uses the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ParamLayout:
    """Offsets and shapes of W_l, b_l in the flat parameter vector (W0, b0, W1, b1, ...).

    W_l has shape (sizes[l], sizes[l+1]), row-major; b_l has shape (sizes[l+1],).
    With ``batch_norm`` the batch-norm scale and shift of every hidden layer follow the
    last bias: gamma_0, beta_0, gamma_1, beta_1, ... (each (sizes[l+1],)), so the
    weights and biases keep the offsets of the plain model.
    """

    sizes: tuple
    batch_norm: bool = False

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def w_offsets(self) -> tuple:
        return tuple(self._offsets()[0])

    @property
    def b_offsets(self) -> tuple:
        return tuple(self._offsets()[1])

    @property
    def n_dense(self) -> int:
        """Number of weights and biases (the offset of the batch-norm block)."""
        return int(sum(a * b + b for a, b in zip(self.sizes[:-1], self.sizes[1:])))

    @property
    def hidden(self) -> tuple:
        """Widths of the hidden layers."""
        return tuple(self.sizes[1:-1])

    @property
    def n_params(self) -> int:
        return self.n_dense + (2 * sum(self.hidden) if self.batch_norm else 0)

    @property
    def n_running(self) -> int:
        """Length of the running-statistics vector (mean and variance per hidden unit)."""
        return 2 * sum(self.hidden) if self.batch_norm else 0

    def bn_views(self, params: np.ndarray):
        """(gammas, betas): lists of views into ``params``, one per hidden layer (empty
        arrays without batch norm, so kernels keep one signature)."""
        return self._pairs(params, self.n_dense, self.batch_norm)

    def running_views(self, running: np.ndarray):
        """(means, variances): views into the running-statistics vector (mean_0, var_0,
        mean_1, var_1, ...)."""
        return self._pairs(running, 0, self.batch_norm)

    def _pairs(self, vec, off, on):
        first, second = [], []
        for n in self.hidden:
            if not on:
                first.append(vec[:0])
                second.append(vec[:0])
                continue
            first.append(vec[off : off + n])
            second.append(vec[off + n : off + 2 * n])
            off += 2 * n
        return first, second

    def _offsets(self):
        wo, bo, off = [], [], 0
        for a, b in zip(self.sizes[:-1], self.sizes[1:]):
            wo.append(off)
            off += a * b
            bo.append(off)
            off += b
        return wo, bo

    def views(self, params: np.ndarray):
        """(weights, biases): lists of views into ``params``."""
        W, b = [], []
        for l, (wo, bo) in enumerate(zip(*self._offsets())):
            fi, fo = self.sizes[l], self.sizes[l + 1]
            W.append(params[wo : wo + fi * fo].reshape(fi, fo))
            b.append(params[bo : bo + fo])
        return W, b


class Workspace:
    """Every per-batch buffer, in one flat array sized for ``capacity`` rows.

    Blocks (each batch-major, ``capacity`` rows): x0 (gathered input, n_0 wide); per layer
    l: z_l, a_l (hidden layers only) and d_l (n_{l+1} wide); and one (capacity,) scratch
    row used for per-example losses or squared gradient norms.
    """

    def __init__(self, layout: ParamLayout, act_codes, capacity: int, dtype, xp=np):
        L = layout.n_layers
        sizes = layout.sizes
        lay = np.zeros((8, max(L + 1, 5)), dtype=np.int64)
        lay[0, : L + 1] = sizes
        wo, bo = layout._offsets()
        lay[1, :L] = wo
        lay[2, :L] = bo
        lay[3, :L] = list(act_codes) + [0]  # output layer: identity (the loss holds the link)
        off = 0

        def take(n):
            nonlocal off
            start = off
            off += n
            return start

        x0 = take(capacity * sizes[0])
        for l in range(L):
            n = capacity * sizes[l + 1]
            lay[4, l] = take(n)
            lay[5, l] = take(n) if l < L - 1 else lay[4, l]
            lay[6, l] = take(n)
        scratch = take(capacity)
        # column 4: the BLAS of the compiled GEMMs (0 SciPy's through numba's np.dot, 1 NumPy's
        # through its CBLAS symbol); the cpu backend sets it, 0 for everyone else
        lay[7, :5] = [x0, scratch, capacity, L, 0]
        self.layout = layout
        self.capacity = int(capacity)
        self.lay = lay
        self.size = off
        self.dtype = np.dtype(dtype)
        self.buf = xp.zeros(off, dtype=self.dtype)
        self._views = {}

    @staticmethod
    def nbytes_for(layout: ParamLayout, capacity: int, dtype) -> int:
        """Bytes of a workspace for ``capacity`` rows (without allocating it)."""
        sizes = layout.sizes
        L = layout.n_layers
        n = capacity * sizes[0] + capacity
        for l in range(L):
            n += capacity * sizes[l + 1] * (3 if l < L - 1 else 2)
        return int(n * np.dtype(dtype).itemsize)

    @property
    def nbytes(self) -> int:
        return int(self.size * self.dtype.itemsize)

    def block(self, row: int, l: int, B: int):
        """(B, width) view of block ``row`` (4=z, 5=a, 6=d) of layer l."""
        n = self.layout.sizes[l + 1]
        o = int(self.lay[row, l])
        return self.buf[o : o + B * n].reshape(B, n)

    def x0(self, B: int):
        n = self.layout.sizes[0]
        o = int(self.lay[7, 0])
        return self.buf[o : o + B * n].reshape(B, n)

    def scratch(self, B: int):
        o = int(self.lay[7, 1])
        return self.buf[o : o + B]

    def views(self, B: int):
        """Cached (x0, [z_l], [a_l], [d_l], scratch) views for batch size B."""
        v = self._views.get(B)
        if v is None:
            L = self.layout.n_layers
            v = (
                self.x0(B),
                [self.block(4, l, B) for l in range(L)],
                [self.block(5, l, B) for l in range(L)],
                [self.block(6, l, B) for l in range(L)],
                self.scratch(B),
            )
            if len(self._views) > 8:
                self._views.clear()
            self._views[B] = v
        return v
