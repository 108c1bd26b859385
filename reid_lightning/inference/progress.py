"""A rich progress bar that counts images and shows images/s.

Called as::

    with images_progress(total=len(dataset), enabled=True) as advance:
        for batch in loader:
            ...
            advance(len(batch))
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class ImagesPerSecondColumn(ProgressColumn):
    """The task's speed in images per second."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f} img/s" if task.speed else "- img/s")


@contextmanager
def images_progress(total: int, enabled: bool = True, description: str = "features") -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``, which moves a progress bar over ``total`` images by ``n``.

    Args:
        total: number of images.
        enabled: ``False`` yields a no-op ``advance`` and draws nothing.
        description: text left of the bar.
    """
    if not enabled:
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), ImagesPerSecondColumn(), TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
