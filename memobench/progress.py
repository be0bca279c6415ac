"""Rich progress bars for long phases (generation, attacks, fitting), shown on stderr."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


class ProgressReporter:
    def __init__(self, enabled: bool = True, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self._progress = None

    def __enter__(self) -> "ProgressReporter":
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    @contextlib.contextmanager
    def task(self, description: str, total: int | None, transient: bool = False) -> Iterator[Callable[..., None]]:
        """A progress bar; ``transient`` bars (per-target sub-tasks such as one DoRI optimisation) are removed
        when done, so a long run shows its phases and the current sub-task only."""
        if self._progress is None:
            yield lambda n=1, **kw: None
            return
        tid = self._progress.add_task(description, total=total)

        def advance(n: int = 1, **fields) -> None:
            self._progress.update(tid, advance=n, **fields)

        try:
            yield advance
        finally:
            if transient:
                self._progress.remove_task(tid)
            else:
                # ``tasks`` is a list in display order, not indexed by task id (removed transient bars shift it)
                task = next((t for t in self._progress.tasks if t.id == tid), None)
                if task is not None:
                    self._progress.update(tid, completed=task.total or 0)

    def log(self, msg: str) -> None:
        # plain text: "[memobench] …" is not rich markup, and a log line is never wrapped (it is parsed)
        self.console.print(msg, highlight=False, markup=False, soft_wrap=True)
