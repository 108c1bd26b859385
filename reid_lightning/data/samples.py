"""The record types every data set parser returns: one :class:`Sample` per image and
a :class:`ReIDSplits` holding the train / query / gallery lists."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence


class Sample(NamedTuple):
    """One image of a re-identification data set.

    Attributes:
        path: image file path.
        pid: identity label. Train samples carry labels relabelled to ``0..N-1``;
            query and gallery samples keep the data set's own identity numbers
            (``0`` marks a distractor in the gallery).
        camid: zero-based camera index.
    """

    path: str
    pid: int
    camid: int


def split_statistics(samples: Sequence[Sample]) -> tuple[int, int, int]:
    """Counts identities, images and cameras of a list of samples.

    Args:
        samples: the samples of one split.

    Returns:
        ``(num_ids, num_images, num_cameras)``.
    """
    return len({s.pid for s in samples}), len(samples), len({s.camid for s in samples})


@dataclass
class ReIDSplits:
    """The three splits of a re-identification data set.

    Built by :func:`reid_lightning.data.build_dataset`, e.g.
    ``splits = build_dataset("market1501", "datasets"); print(splits.summary_table())``.

    Attributes:
        name: data set name shown in the summary table.
        train: training samples, pids relabelled to ``0..num_train_pids-1``.
        query: query samples with their original pids.
        gallery: gallery samples with their original pids (distractors included).
    """

    name: str
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]

    @property
    def num_train_pids(self) -> int:
        """Number of training identities (the classifier's output size)."""
        return len({s.pid for s in self.train})

    @property
    def num_train_cams(self) -> int:
        """Number of distinct cameras among the training images."""
        return len({s.camid for s in self.train})

    def num_matchable_queries(self) -> int:
        """Queries with a gallery image of their pid from another camera: the ones the Market
        protocol can score (it drops same-camera matches); 0 makes every evaluation fail."""
        cameras: dict[int, set[int]] = {}
        for sample in self.gallery:
            cameras.setdefault(sample.pid, set()).add(sample.camid)
        return sum(bool(cameras.get(q.pid, set()) - {q.camid}) for q in self.query)

    def summary_table(self) -> str:
        """Renders fast-reid's data set summary.

        Returns:
            A plain-text table with one row per split (train, query, gallery) and
            the columns ``# ids``, ``# images`` and ``# cameras``.
        """
        header = ("subset", "# ids", "# images", "# cameras")
        rows = [
            (split, *map(str, split_statistics(samples)))
            for split, samples in (("train", self.train), ("query", self.query), ("gallery", self.gallery))
        ]
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

        def line(cells: Sequence[str]) -> str:
            return " | ".join(cell.ljust(width) for cell, width in zip(cells, widths))

        rule = "-+-".join("-" * width for width in widths)
        return "\n".join([f"Data set {self.name}:", line(header), rule, *(line(row) for row in rows)])
