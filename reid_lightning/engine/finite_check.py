"""``NonFiniteLossWatch``: finds a NaN/inf training loss without waiting for the device every step.

Used by :class:`reid_lightning.engine.module.ReIDModule`::

    watch = NonFiniteLossWatch()
    watch.update(iteration, epoch, total, loss_dict)   # every step: a few kernels, no host copy
    watch.check()                                      # at the log interval: one copy, may raise
"""
from __future__ import annotations

from collections.abc import Mapping

import torch


class NonFiniteLossWatch:
    """Keeps, on the loss's device, the first iteration whose total loss was not finite, with its
    epoch and loss terms; :meth:`check` reads them and fails the run."""

    def __init__(self) -> None:
        self._names: tuple[str, ...] = ()
        self._found: torch.Tensor | None = None
        self._iteration: torch.Tensor | None = None
        self._epoch: torch.Tensor | None = None
        self._terms: torch.Tensor | None = None

    def update(self, iteration: int, epoch: int, total: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> None:
        """Record the step's losses (nothing is read back to the host).

        Args:
            iteration: the step's global iteration.
            epoch: the step's epoch.
            total: the total loss (one element).
            terms: the loss terms by name (one element each), reported when ``total`` is not finite.
        """
        total = total.detach().reshape(())
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()]) if terms else total.new_zeros(0)
        if self._found is None or tuple(terms) != self._names:
            self._names = tuple(terms)
            self._found = torch.zeros((), dtype=torch.bool, device=total.device)
            self._iteration = torch.full((), -1, dtype=torch.long, device=total.device)
            self._epoch = torch.full((), -1, dtype=torch.long, device=total.device)
            self._terms = torch.zeros_like(values)
        bad = ~torch.isfinite(total)
        first = bad & ~self._found
        self._iteration = torch.where(first, iteration, self._iteration)
        self._epoch = torch.where(first, epoch, self._epoch)
        self._terms = torch.where(first, values, self._terms)
        self._found = self._found | bad

    def check(self) -> None:
        """Read the record (one host-device copy) and raise when a loss was not finite.

        Raises:
            FloatingPointError: naming the first non-finite iteration, its epoch and loss terms.
        """
        if self._found is None:
            return
        record = torch.cat([torch.stack([self._found.double(), self._iteration.double(), self._epoch.double()]),
                            self._terms.double()]).tolist()
        if not record[0]:
            return
        terms = ", ".join(f"{name}={value:.4g}" for name, value in zip(self._names, record[3:]))
        raise FloatingPointError(
            f"Loss became infinite or NaN at iteration {int(record[1])} (epoch {int(record[2])}): {terms}"
        )
