"""Training batches that cross from the loader workers in two tensors: the uint8 images and one
int64 tensor holding every integer field (``targets``, ``camids``, the ``erase_box`` rectangles).

A loader worker hands each tensor of a batch to the main process through its own file
descriptor, and receiving one costs the main process (the pin-memory thread on a GPU host) a
socket connection with its authentication handshake: on the 2-core CPU, a CUHK03-NP batch of 64
at 256x128 from 2 workers took the receiving thread 3.5 ms of CPU as four tensors and 2.7 ms as
two. With ``normalize_on_device`` the training loader collates with :func:`collate_packed`, and
:class:`~reid_lightning.data.batch_normalize.BatchNormalizer` (the datamodule's
``on_after_batch_transfer``) calls :func:`unpack_integer_fields` on the device::

    batch = collate_packed([dataset[i] for i in keys])   # {"images", "packed_ints", "packed_layout"}
    batch = unpack_integer_fields(batch)                  # {"images", "erase_box", "targets", "camids"}

The unpacked fields are views of the packed tensor, equal to what ``default_collate`` gives; one
copy to the device carries them all. A batch without two integer fields comes back as
``default_collate`` makes it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

PACKED = "packed_ints"
LAYOUT = "packed_layout"


def collate_packed(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``default_collate`` of ``samples``, then :func:`pack_integer_fields`."""
    return pack_integer_fields(default_collate(list(samples)))


def pack_integer_fields(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` with every int64 field of shape ``(B,)`` or ``(B, n)`` but ``"images"`` moved into
    one ``(rows, B)`` int64 tensor, ``PACKED``; ``LAYOUT`` holds ``(name, n)`` per field in row
    order (``n`` 0 for a ``(B,)`` field). With fewer than two such fields, ``batch`` as it is."""
    fields = [
        (name, value) for name, value in batch.items()
        if name != "images" and torch.is_tensor(value) and value.dtype == torch.int64 and value.dim() in (1, 2)
    ]
    if len(fields) < 2:
        return dict(batch)
    packed = torch.cat([value.reshape(len(value), -1).t() for _, value in fields])
    layout = tuple((name, value.shape[1] if value.dim() == 2 else 0) for name, value in fields)
    moved = {name for name, _ in fields}
    return {**{name: value for name, value in batch.items() if name not in moved}, PACKED: packed, LAYOUT: layout}


def unpack_integer_fields(batch: Any) -> Any:
    """The fields of a :func:`collate_packed` batch, views of its ``PACKED`` tensor wherever it is
    (a ``(B,)`` field is one contiguous row); any other batch comes back as it is."""
    if not isinstance(batch, Mapping) or PACKED not in batch:
        return batch
    packed, row = batch[PACKED], 0
    fields: dict[str, torch.Tensor] = {}
    for name, width in batch[LAYOUT]:
        rows = max(width, 1)
        block = packed[row : row + rows]
        fields[name] = block.t() if width else block[0]
        row += rows
    return {**{name: value for name, value in batch.items() if name not in (PACKED, LAYOUT)}, **fields}
