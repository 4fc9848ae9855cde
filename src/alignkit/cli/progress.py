"""The progress bar of the commands that score or generate for a while."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console


@contextmanager
def progress_bar(
    what: str,
    console: Console | None = None,
    *,
    transient: bool = True,
    enabled: bool = True,
) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar with ETA labelled `what` (gone when done unless not `transient`);
    yields the ``(done, total)`` callback that updates it."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn(what),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=not enabled,
    ) as bar:
        job = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(job, completed=done, total=total)
