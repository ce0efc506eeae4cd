"""Batch norm and dropout of an MLP's hidden layers: the spec a model hands its backend.

It sits below both the model and the backends (it imports only the kernel codes), so a
backend reads the model's normalisation without reaching up into the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from minigd.kernels.codes import BN_NONE


@dataclass(frozen=True)
class NormSpec:
    """Batch norm and dropout of the hidden layers (see :class:`minigd.MLP`).

    ``bn``: BN_NONE, BN_BEFORE (normalise z_l before the activation) or BN_AFTER
    (normalise the activation); ``ghost``: rows per ghost batch in training mode (None:
    the whole batch); ``dropout``: drop probability of hidden activations.  ``eps`` and
    ``momentum`` follow PyTorch's BatchNorm1d.
    """

    bn: int = BN_NONE
    ghost: int | None = None
    dropout: float = 0.0
    eps: float = 1e-5
    momentum: float = 0.1

    def ghost_size(self, B: int) -> int:
        """Rows per ghost batch for a training batch of B rows."""
        return B if self.ghost is None else min(self.ghost, B)

    def check_batch(self, B: int, name: str = "batch_size", hint: str = "") -> None:
        """Batch norm in training mode needs >= 2 rows in every ghost batch.  ``hint``
        (e.g. where the batch comes from) ends the ghost-batch message.  The rules live in
        :func:`minigd._constraints.check_norm`."""
        if self.bn:
            from minigd._constraints import check_norm

            check_norm(self, batch_sizes=(B,), name=name, hint=hint)

    def has_one_row_ghost(self, B: int) -> bool:
        """Whether a training batch of B rows would hold a ghost batch of 1 row (what
        :meth:`check_batch` refuses)."""
        return bool(self.bn) and B % self.ghost_size(B) == 1 if B > 1 else bool(self.bn)

    def drops_last(self, n: int, B: int) -> bool:
        """Whether an epoch of n rows in batches of B must drop its partial last batch
        (``n % B`` rows) because that batch would hold a ghost batch of 1 row."""
        return n % B > 0 and self.has_one_row_ghost(n % B)
