"""``NonFiniteLossWatch``: finds a NaN/inf training loss without waiting for the device every step.

Used by :class:`reid_lightning.engine.module.ReIDModule`::

    watch = NonFiniteLossWatch()
    watch.update(iteration, epoch, total, loss_dict)   # every step: keeps the tensors, no kernel
    watch.check()                                      # at the log interval: one copy, may raise
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

# the steps kept unread at most; the next update reads them (bounds the memory they hold when
# checks are rare, e.g. a very long log interval)
MAX_PENDING = 1024


class NonFiniteLossWatch:
    """Keeps each step's losses, detached and unread, until :meth:`check` reads them all at once
    (one host-device copy per check) and fails the run at the first step whose total loss was not
    finite, naming its iteration, epoch and loss terms. A step launches no kernel, so the host
    does not spend time on the check between two reads."""

    def __init__(self) -> None:
        self._pending: list[tuple[int, int, torch.Tensor, dict[str, torch.Tensor]]] = []

    def update(self, iteration: int, epoch: int, total: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> None:
        """Record the step's losses (nothing is read back to the host; after :data:`MAX_PENDING`
        unread steps, :meth:`check` runs first).

        Args:
            iteration: the step's global iteration.
            epoch: the step's epoch.
            total: the total loss (one element).
            terms: the loss terms by name (one element each), reported when ``total`` is not finite.

        Raises:
            FloatingPointError: from the :meth:`check` that runs when too many steps are unread.
        """
        if len(self._pending) >= MAX_PENDING:
            self.check()
        self._pending.append((iteration, epoch, total.detach(), {name: value.detach() for name, value in terms.items()}))

    def check(self) -> None:
        """Read the steps recorded since the last check (one host-device copy) and raise when a
        total loss was not finite.

        Raises:
            FloatingPointError: naming the first non-finite iteration, its epoch and loss terms
                (and again at every later check).
        """
        pending, self._pending = self._pending, []
        if not pending:
            return
        finite = torch.isfinite(torch.stack([total.reshape(()).float() for _, _, total, _ in pending])).tolist()
        if all(finite):
            return
        first = pending[finite.index(False)]
        self._pending = [first]  # later checks fail too
        iteration, epoch, _, terms = first
        values = torch.stack([value.reshape(()).double() for value in terms.values()]).tolist() if terms else []
        shown = ", ".join(f"{name}={value:.4g}" for name, value in zip(terms, values))
        raise FloatingPointError(f"Loss became infinite or NaN at iteration {iteration} (epoch {epoch}): {shown}")
