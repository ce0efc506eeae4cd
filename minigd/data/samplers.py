"""Samplers: which rows of X each training step takes.

A sampler walks through epochs.  At the start of an epoch it lays out the epoch's row
indices (``src``: a fresh permutation, the rows in order, or i.i.d. draws); every step
then takes the next ``B`` of them from its position ``pos``.  The batch size may change
between any two steps (a batch-size schedule at an epoch boundary, or an adaptive
controller in the middle of an epoch): the position counts rows, so an epoch without
replacement still hands out every row exactly once, whatever sizes its steps had.

``"shuffle"``
    A fresh random permutation every epoch (without replacement).  A full batch (B = n)
    takes the rows in order: shuffling it would change only the summation order, so no
    random number is drawn.
``"sequential"``
    Rows in order, every epoch.
``"replacement"``
    I.i.d. uniform draws: an epoch lays out ``steps_per_epoch(n, B) * B`` draws for its
    first batch size B and ends when fewer than a batch of them remain (after a
    mid-epoch change of the batch size the last few draws may go unused: they are
    i.i.d., so nothing is skipped that another epoch would not draw).

The last batch of an epoch without replacement holds the ``n % B`` remaining rows, or is
dropped with ``drop_last=True``.  The state a checkpoint needs is ``order`` (the current
permutation), ``draws`` (the current i.i.d. draws) and the position (``fit`` keeps it as
the rows of the epoch done, ``LoopState.ep_count``).  Drawing: ``numpy.random.Generator.
shuffle`` of the permutation in place, ``Generator.integers(0, n, size, int64)`` for the
draws, so the same generator gives the same batches on every backend.
"""

from __future__ import annotations

import numpy as np

#: the sampler names ``fit(sampler=...)`` accepts
SAMPLERS = ("shuffle", "replacement", "sequential")


def steps_per_epoch(n: int, B: int, drop_last: bool) -> int:
    """Number of steps in one epoch of n examples at batch size B."""
    return n // B if drop_last else -(-n // B)


class Sampler:
    """Row indices for each step (see the module doc).

    Parameters
    ----------
    kind : {"shuffle", "replacement", "sequential"}
    n : int
        Rows of the training set.
    rng : numpy.random.Generator
        Draws the permutations and i.i.d. indices (advanced in place).
    drop_last : bool
        Drop an epoch's partial last batch.
    """

    def __init__(self, kind: str, n: int, rng: np.random.Generator, drop_last: bool = False) -> None:
        if kind not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {list(SAMPLERS)}, got {kind!r}")
        self.kind, self.n, self.rng, self.drop_last = kind, int(n), rng, bool(drop_last)
        self.order = np.arange(self.n, dtype=np.int64)  # "shuffle": permuted in place each epoch
        self._seq = np.arange(self.n, dtype=np.int64)
        self.draws: np.ndarray | None = None  # "replacement": this epoch's draws
        self.src = self._seq
        self.pos = 0

    def _in_order(self, B: int) -> bool:
        return self.kind == "sequential" or (B == self.n and self.kind != "replacement")

    def start_epoch(self, B: int) -> None:
        """Lay out a new epoch whose first batch size is B (draws random numbers for a
        shuffled or i.i.d. epoch)."""
        if self._in_order(B):
            self.src = self._seq
        elif self.kind == "shuffle":
            self.rng.shuffle(self.order)
            self.src = self.order
        else:
            size = steps_per_epoch(self.n, B, self.drop_last) * B
            self.src = self.draws = self.rng.integers(0, self.n, size=size, dtype=np.int64)
        self.pos = 0

    def restore(self, B: int, pos: int, order: np.ndarray, draws: np.ndarray | None) -> None:
        """Continue an epoch laid out for batch size B at row ``pos`` (a checkpoint's
        ``order`` / ``draws``, checked by the caller), drawing nothing."""
        self.order[...] = order
        self.draws = draws
        if self._in_order(B):
            self.src = self._seq
        elif self.kind == "shuffle":
            self.src = self.order
        else:
            assert draws is not None  # "replacement": the caller checked the saved draws
            self.src = draws
        self.pos = int(pos)

    def batches_left(self, B: int) -> int:
        """Steps of (up to) B rows left in this epoch: the full batches, plus the partial
        last one unless it is dropped (or the draws are i.i.d.)."""
        rest = self.src.shape[0] - self.pos
        full = rest // B
        return full + (1 if rest % B and not self.drop_last and self.kind != "replacement" else 0)

    def full_batches_left(self, B: int) -> int:
        """Consecutive full batches of B rows left in this epoch."""
        return (self.src.shape[0] - self.pos) // B

    def next_size(self, B: int) -> int:
        """Rows of the next batch at batch size B (B, or the partial last batch)."""
        return min(B, self.src.shape[0] - self.pos)

    def take(self, rows: int) -> np.ndarray:
        """The next ``rows`` indices of the epoch (a view; the caller takes whole batches)."""
        p = self.pos
        self.pos = p + rows
        return self.src[p : p + rows]
