"""Metric storage shared by the training step and the hooks (detectron2/fast-reid's ``EventStorage``).

While training runs, the hook adapter keeps one :class:`EventStorage` open; anything in the
process can reach it::

    storage = get_event_storage()
    storage.put_scalar("loss_cls", 1.25)          # recorded at storage.iter
    storage.history("loss_cls").median(20)        # smoothed value for printing

Writers (``PeriodicWriter``) read the storage; producers (the adapter, hooks, the model) only put.
A tensor put on an accelerator stays there until something reads its history: reading converts
every pending value of the storage at once (one host-device copy per device), so a training
loop that reads only every ``period`` steps waits for the device only then.
"""
from __future__ import annotations

import statistics
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any

import torch

_STORAGE_STACK: list[EventStorage] = []
# a buffer converts its unread tensors once it holds this many (bounds the memory they hold)
_MAX_PENDING = 1024


def get_event_storage() -> EventStorage:
    """The innermost active :class:`EventStorage`.

    Returns:
        the storage opened most recently with ``with EventStorage(...)`` (the hook adapter opens
        one for the duration of ``trainer.fit``).

    Raises:
        RuntimeError: when no storage is active.
    """
    if not _STORAGE_STACK:
        raise RuntimeError(
            "get_event_storage() found no active EventStorage: call it during training with a HookBase "
            "registered on the Trainer, or inside a 'with EventStorage():' block."
        )
    return _STORAGE_STACK[-1]


class HistoryBuffer:
    """The recent values of one scalar, with their iterations, plus a running global average.

    ``buf.update(0.5, iteration=3)``; ``buf.latest()``; ``buf.median(20)``; ``buf.avg(20)``;
    ``buf.global_avg()``; ``buf.values()`` -> ``[(value, iteration), ...]``. A one-element tensor
    given to ``update`` is kept as it is and converted to a float when the buffer is first read.

    Args:
        max_length: number of values kept; older ones are dropped (the global average keeps them).
    """

    def __init__(self, max_length: int = 1_000_000) -> None:
        if max_length < 1:
            raise ValueError(f"HistoryBuffer max_length must be >= 1, got {max_length}")
        self._max_length = max_length
        self._data: deque[tuple[float, float]] = deque(maxlen=max_length)
        self._pending: list[tuple[torch.Tensor, float]] = []
        self._count = 0
        self._global_avg = 0.0

    def update(self, value: float | torch.Tensor, iteration: float | None = None) -> None:
        """Append ``value`` (a number, or a one-element tensor kept unread until the buffer is
        read) recorded at ``iteration`` (default: the number of updates so far)."""
        if iteration is None:
            iteration = self._count + len(self._pending)
        if torch.is_tensor(value):
            if value.numel() != 1:
                raise ValueError(f"HistoryBuffer takes one-element tensors, got shape {tuple(value.shape)}")
            self._pending.append((value.detach().reshape(()), iteration))
            if len(self._pending) >= _MAX_PENDING:
                self.materialize()
            return
        self.materialize()
        self._append(float(value), iteration)

    def _append(self, value: float, iteration: float) -> None:
        self._data.append((value, iteration))
        self._count += 1
        self._global_avg += (value - self._global_avg) / self._count

    def pending(self) -> list[tuple[torch.Tensor, float]]:
        """The tensors put and not read yet, with their iterations, oldest first."""
        return list(self._pending)

    def materialize(self, values: list[float] | None = None) -> None:
        """Convert the pending tensors to floats (``values``: their numbers, already read)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        numbers = values if values is not None else tensors_to_floats([t for t, _ in pending])
        for number, (_, iteration) in zip(numbers, pending):
            self._append(number, iteration)

    def _window(self, window_size: int) -> list[float]:
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.materialize()
        if not self._data:
            raise ValueError("HistoryBuffer is empty")
        start = max(0, len(self._data) - window_size)
        return [value for value, _ in islice(self._data, start, None)]

    def latest(self) -> float:
        """The most recent value."""
        self.materialize()
        if not self._data:
            raise ValueError("HistoryBuffer is empty")
        return self._data[-1][0]

    def median(self, window_size: int) -> float:
        """Median of the last ``window_size`` values."""
        return float(statistics.median(self._window(window_size)))

    def avg(self, window_size: int) -> float:
        """Mean of the last ``window_size`` values."""
        return float(statistics.fmean(self._window(window_size)))

    def global_avg(self) -> float:
        """Mean of every value ever added, including those dropped from the buffer."""
        self.materialize()
        return self._global_avg

    def values(self) -> list[tuple[float, float]]:
        """The kept ``(value, iteration)`` pairs, oldest first."""
        self.materialize()
        return list(self._data)

    def __len__(self) -> int:
        return min(self._max_length, len(self._data) + len(self._pending))


def tensors_to_floats(tensors: list[torch.Tensor]) -> list[float]:
    """The numbers of one-element ``tensors``, read with one stacked copy per device."""
    out = [0.0] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(i)
    for positions in by_device.values():
        numbers = torch.stack([tensors[i].reshape(()).float() for i in positions]).tolist()
        for i, number in zip(positions, numbers):
            out[i] = number
    return out


class EventStorage:
    """Scalars (with history), images, histograms and the current iteration and epoch of a
    training run.

    Used as a context manager so :func:`get_event_storage` finds it::

        with EventStorage(start_iter=0) as storage:
            storage.put_scalars(total_loss=1.0, lr=3.5e-4)
            storage.step()

    During training the hook adapter keeps :attr:`iter` (the current step) and :attr:`epoch`
    (the current epoch) up to date, as fast-reid's trainer does.

    Args:
        start_iter: iteration the first values are recorded at.
    """

    def __init__(self, start_iter: int = 0) -> None:
        self._history: defaultdict[str, HistoryBuffer] = defaultdict(HistoryBuffer)
        self._smoothing_hints: dict[str, bool] = {}
        self._latest_scalars: dict[str, tuple[float, int]] = {}
        self._iter = int(start_iter)
        self._prefix = ""
        self._vis_data: list[tuple[str, torch.Tensor, int]] = []
        self._histograms: list[dict[str, Any]] = []
        self.epoch = 0

    # ------------------------------------------------------------------ scalars
    def put_scalar(self, name: str, value: Any, smoothing_hint: bool = True) -> None:
        """Record ``value`` (a number or a one-element tensor) for ``name`` at the current iteration.

        Args:
            name: scalar name; prefixed by the active :meth:`name_scope`.
            value: a number (converted with ``float``) or a one-element tensor, kept on its device
                until the storage is read (see :meth:`materialize`).
            smoothing_hint: whether writers should smooth this scalar (median over a window);
                must stay the same for a name.
        """
        name = self._prefix + name
        if torch.is_tensor(value):
            if value.numel() != 1:
                raise ValueError(f"put_scalar({name!r}) takes a number or a one-element tensor, got shape {tuple(value.shape)}")
            value = value.detach()
        else:
            try:
                value = float(value)
            except (TypeError, ValueError) as err:
                raise TypeError(f"put_scalar({name!r}) takes a number or a one-element tensor, got {value!r}") from err
        hint = self._smoothing_hints.get(name, smoothing_hint)
        if hint != smoothing_hint:
            raise ValueError(f"Scalar {name!r} was put with smoothing_hint={hint} before, now {smoothing_hint}")
        self._smoothing_hints[name] = hint
        self._history[name].update(value, self._iter)
        self._latest_scalars[name] = (value, self._iter)

    def put_scalars(self, *, smoothing_hint: bool = True, **kwargs: Any) -> None:
        """Record several scalars at once: ``storage.put_scalars(loss=1.0, acc=0.5)``."""
        for name, value in kwargs.items():
            self.put_scalar(name, value, smoothing_hint=smoothing_hint)

    def materialize(self) -> None:
        """Convert every tensor put and not read yet to a float, with one copy per device."""
        buffers = [buf for buf in self._history.values() if buf.pending()]
        if not buffers:
            return
        pending = [buf.pending() for buf in buffers]
        numbers = tensors_to_floats([tensor for entries in pending for tensor, _ in entries])
        start = 0
        for buf, entries in zip(buffers, pending):
            buf.materialize(numbers[start : start + len(entries)])
            start += len(entries)

    def history(self, name: str) -> HistoryBuffer:
        """The :class:`HistoryBuffer` of ``name``.

        Raises:
            KeyError: when ``name`` was never put.
        """
        buffer = self._history.get(name)
        if buffer is None:
            raise KeyError(f"No history metric available for {name!r}; known: {sorted(self._history)}")
        self.materialize()
        return buffer

    def histories(self) -> dict[str, HistoryBuffer]:
        """All histories by name."""
        self.materialize()
        return dict(self._history)

    def latest(self) -> dict[str, tuple[float, int]]:
        """``{name: (latest value, iteration it was put at)}`` for every scalar."""
        self.materialize()
        return {name: (self._history[name].latest(), itr) for name, (_, itr) in self._latest_scalars.items()}

    def latest_iterations(self) -> dict[str, int]:
        """``{name: iteration of its latest value}`` for every scalar; reads no value."""
        return {name: itr for name, (_, itr) in self._latest_scalars.items()}

    def latest_with_smoothing_hint(self, window_size: int = 20) -> dict[str, tuple[float, int]]:
        """Like :meth:`latest`, with scalars put with ``smoothing_hint=True`` replaced by the median
        of their last ``window_size`` values."""
        self.materialize()
        return {
            name: (self._history[name].median(window_size) if self._smoothing_hints[name] else self._history[name].latest(), itr)
            for name, (_, itr) in self._latest_scalars.items()
        }

    def smoothing_hints(self) -> dict[str, bool]:
        """``{name: smoothing_hint}`` for every scalar."""
        return dict(self._smoothing_hints)

    # ------------------------------------------------------------------ images
    def put_image(self, name: str, tensor: torch.Tensor) -> None:
        """Record an image (CHW tensor, values in [0, 1] or [0, 255]) at the current iteration."""
        self._vis_data.append((self._prefix + name, tensor, self._iter))

    @property
    def images(self) -> list[tuple[str, torch.Tensor, int]]:
        """Images put since the last :meth:`clear_images`, as ``(name, tensor, iteration)``."""
        return list(self._vis_data)

    def clear_images(self) -> None:
        """Drop the recorded images (writers call it once they have written them)."""
        self._vis_data = []

    # ------------------------------------------------------------------ histograms
    def put_histogram(self, hist_name: str, hist_tensor: torch.Tensor, bins: int = 1000) -> None:
        """Record a histogram of ``hist_tensor``'s values at the current iteration (detectron2's API).

        The hook adapter writes the histograms to TensorBoard loggers (``add_histogram_raw``) with
        the scalars and then clears them. This reads the tensor's range on the host: call it from a
        hook, not on every step of a hot loop.

        Args:
            hist_name: histogram name; prefixed by the active :meth:`name_scope`.
            hist_tensor: any tensor; its values are histogrammed as float32.
            bins: number of equal-width bins between the minimum and the maximum.
        """
        values = hist_tensor.detach().float().flatten()
        if values.numel() == 0:
            raise ValueError(f"put_histogram({hist_name!r}) got an empty tensor")
        low, high = values.min().item(), values.max().item()
        counts = torch.histc(values, bins=bins)
        edges = torch.linspace(low, high, steps=bins + 1, dtype=torch.float32)
        self._histograms.append(
            {
                "tag": self._prefix + hist_name,
                "min": low,
                "max": high,
                "num": values.numel(),
                "sum": float(values.sum()),
                "sum_squares": float(values.square().sum()),
                "bucket_limits": edges[1:].tolist(),
                "bucket_counts": counts.tolist(),
                "global_step": self._iter,
            }
        )

    @property
    def histograms(self) -> list[dict[str, Any]]:
        """Histograms put since the last :meth:`clear_histograms`, as the keyword arguments of
        ``SummaryWriter.add_histogram_raw`` (``tag``, ``min``, ``max``, ``num``, ``sum``,
        ``sum_squares``, ``bucket_limits``, ``bucket_counts``, ``global_step``)."""
        return list(self._histograms)

    def clear_histograms(self) -> None:
        """Drop the recorded histograms (the adapter calls it once it has written them)."""
        self._histograms = []

    # ------------------------------------------------------------------ iteration
    @property
    def iter(self) -> int:
        """The iteration new values are recorded at."""
        return self._iter

    @iter.setter
    def iter(self, value: int) -> None:
        self._iter = int(value)

    def step(self) -> None:
        """Advance :attr:`iter` by one."""
        self._iter += 1

    @contextmanager
    def name_scope(self, name: str) -> Iterator[None]:
        """Prefix the names put inside the block with ``name/``: ``with storage.name_scope("bn"): ...``."""
        previous = self._prefix
        self._prefix = previous + name.rstrip("/") + "/"
        try:
            yield
        finally:
            self._prefix = previous

    # ------------------------------------------------------------------ context
    def __enter__(self) -> EventStorage:
        _STORAGE_STACK.append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not _STORAGE_STACK or _STORAGE_STACK[-1] is not self:
            raise RuntimeError("EventStorage contexts were exited out of order")
        _STORAGE_STACK.pop()
