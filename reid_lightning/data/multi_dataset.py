"""Several data sets in one run: the entries of ``data.train_sets`` / ``data.test_sets``
and the combined training set (fast-reid's ``DATASETS.NAMES`` / ``DATASETS.TESTS``)::

    entries = parse_entries(["market1501", {"name": "folder", "root": "/my/data"}], "data.train_sets", "datasets")
    parsed = [load_entry(entry) for entry in entries]
    train = combine_train_sets(parsed)   # identities and cameras kept apart per data set
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

from reid_lightning.data.datasets import build_dataset
from reid_lightning.data.samples import ReIDSplits, Sample


@dataclass(frozen=True)
class DatasetEntry:
    """One data set of a list: the parser ``name``, its data ``root``, the parser options
    and the ``label`` that names it in logs and metrics.json.

    Attributes:
        name: registry name (a key of :data:`reid_lightning.data.datasets.DATASETS`).
        root: the data root handed to the parser.
        kwargs: parser options (``subset`` of ``cuhk03_np``, ``seed`` of ``demo``, ...).
        label: unique name of the entry in its list (default: ``name``).
        where: the config key of the entry, e.g. ``data.test_sets[1]``, for messages.
    """

    name: str
    root: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    where: str = ""

    def key(self) -> tuple:
        """What identifies the parsed data: two entries with equal keys share one parse."""
        return (self.name, self.root, tuple(sorted((k, repr(v)) for k, v in self.kwargs.items())))


def parse_entries(
    items: Sequence[str | Mapping[str, Any]],
    where: str,
    root: str,
    defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[DatasetEntry]:
    """Reads a ``data.train_sets`` / ``data.test_sets`` list.

    Each item is a data set name (``"market1501"``) or a mapping with ``name`` and
    optionally ``root`` (default: ``root``), ``label`` (default: ``name``) and parser options
    (``{name: folder, root: /my/data}``, ``{name: cuhk03_np, subset: labeled}``).

    Args:
        items: the list from the config.
        where: its config key, for messages (``"data.train_sets"``); empty: the entries
            carry no key and their errors no prefix (the single ``data.dataset``).
        root: the data root of entries that name none (``data.root``).
        defaults: parser options of entries given by name alone, per name (the options of
            ``data.dataset``, so that the set of ``data=...`` keeps its ``dataset_kwargs``).

    Returns:
        The entries, in list order.

    Raises:
        ValueError: the list is empty or not a list, an item lacks ``name``, or two items share a label.
    """
    if isinstance(items, (str, Mapping)) or not isinstance(items, Sequence) or not items:
        raise ValueError(f"{where} must be a non-empty list of data set names or mappings, got {items!r}")
    entries = []
    for position, item in enumerate(items):
        at = f"{where}[{position}]" if where else ""
        if isinstance(item, str):
            options = dict((defaults or {}).get(item, {}))
            entries.append(DatasetEntry(item, str(root), options, item, at))
            continue
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise ValueError(f"{at} must be a data set name or a mapping with a 'name' key, got {item!r}")
        options = {k: v for k, v in item.items() if k not in ("name", "root", "label")}
        entry_root = str(item.get("root") or root)
        entries.append(DatasetEntry(item["name"], entry_root, options, str(item.get("label") or item["name"]), at))
    labels = [entry.label for entry in entries]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(
            f"{where} names {', '.join(map(repr, repeated))} more than once; give each entry its own 'label'"
        )
    return entries


def load_entry(entry: DatasetEntry) -> ReIDSplits:
    """Parses the data set of an entry.

    Args:
        entry: the entry.

    Returns:
        Its splits, named by the entry's label.

    Raises:
        FileNotFoundError, ValueError, TypeError: as the parser does, the message starting
            with the entry's config key and label (``data.test_sets[1] (dukemtmc): ...``).
    """
    try:
        splits = build_dataset(entry.name, entry.root, **entry.kwargs)
    except (FileNotFoundError, ValueError, TypeError) as error:
        if not entry.where:
            raise
        raise type(error)(f"{entry.where} ({entry.label}): {error}") from error
    splits.name = entry.label
    return splits


def combine_train_sets(parsed: Sequence[ReIDSplits]) -> list[Sample]:
    """Joins the training samples of several data sets into one label space.

    Identities of different data sets stay distinct (as fast-reid's prefix of each pid by
    its data set name): set ``i``'s labels follow those of sets ``0..i-1``, so the result is
    labelled ``0..N-1`` in data set order, then in each set's own label order. Cameras are
    shifted the same way (set ``i``'s cameras follow the largest camera of the sets before).

    Args:
        parsed: the splits of each training data set, in list order.

    Returns:
        The training samples of all sets, relabelled.
    """
    combined: list[Sample] = []
    pid_offset = cam_offset = 0
    for splits in parsed:
        labels = {pid: label for label, pid in enumerate(sorted({s.pid for s in splits.train}))}
        combined += [Sample(s.path, pid_offset + labels[s.pid], cam_offset + s.camid) for s in splits.train]
        pid_offset += len(labels)
        cam_offset += 1 + max(s.camid for s in splits.train)
    return combined
