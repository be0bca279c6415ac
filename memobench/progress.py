"""Progress of long phases (generation, attacks, fitting) and of the long work inside them, shown on stderr.

* On a terminal: rich progress bars. A task opened while another is open (a plugin's per-prompt work, e.g. one
  DoRI optimisation inside the attack phase, NeMo's localization rounds inside its fit) is shown indented under
  the task it runs in; ``transient`` tasks vanish when they finish.
* Without a terminal (CI logs, ``nohup``, a pipe): no live display; instead one plain line per open task at least
  every :data:`PLAIN_INTERVAL_S` seconds (``MEMOBENCH_PROGRESS_INTERVAL`` sets another), e.g. ``[memobench] generate (nemo): 3/8, 1m20s elapsed`` (nested tasks
  indented below), and ``…: 8/8, done in 2m05s`` when a phase that was reported finishes.
* Ctrl-C (``KeyboardInterrupt``) stops the display where it stands: no task is marked complete. The runner turns
  it into :class:`Interrupted`, which carries how many of the run's samples are in the cache.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

PLAIN_INTERVAL_S = 30.0  # without a terminal: the longest time between two progress lines while a task is open

_clock = time.monotonic  # the heartbeat's clock (tests replace it)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: ``kept`` of the run's ``total`` planned samples are in the cache (a rerun of the same
    command generates only the others)."""

    def __init__(self, kept: int, total: int):
        super().__init__(f"interrupted ({kept} of {total} samples kept)")
        self.kept, self.total = int(kept), int(total)


def interrupted_message(exc: BaseException | None = None) -> str:
    """The line the CLI prints on Ctrl-C (with the counts when ``exc`` carries them)."""
    kept, total = getattr(exc, "kept", None), getattr(exc, "total", None)
    counts = f" ({kept} of {total} samples kept)" if kept is not None and total is not None else ""
    return f"interrupted — rerun the same command to resume{counts}"


def format_duration(seconds: float) -> str:
    """``45s``, ``1m20s``, ``2h03m``."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@dataclass(eq=False)
class _Task:
    description: str
    total: int | None
    transient: bool
    depth: int
    started: float
    completed: float = 0
    rich_id: int | None = None
    reported: bool = field(default=False)  # a plain progress line named it


class ProgressReporter:
    """``with reporter: … with reporter.task(description, total) as advance: advance(n)``.

    ``enabled=False``: nothing is shown. ``plain``: None = plain lines when ``console`` is not a terminal, rich bars
    when it is; True/False forces one or the other. ``interval``: seconds between plain lines (default
    :data:`PLAIN_INTERVAL_S`)."""

    def __init__(self, enabled: bool = True, console=None, plain: bool | None = None,
                 interval: float | None = None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.plain = (not self.console.is_terminal) if plain is None else bool(plain)
        self.interval = float(_env_interval() if interval is None else interval)
        self._progress = None
        self._active = False
        self._tasks: list[_Task] = []  # open tasks, outermost first
        self._lock = threading.RLock()
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._last_line = 0.0

    # ------------------------------------------------------------------------------------------- display
    def __enter__(self) -> "ProgressReporter":
        if not self.enabled:
            return self
        self._active = True
        self._last_line = _clock()
        if self.plain:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._heartbeat, name="memobench-progress", daemon=True)
            self._thread.start()
        else:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            # descriptions are plain text (prompt ids may hold "[…]", which is not rich markup here)
            self._progress = Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                      console=self.console)
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        # on an exception (Ctrl-C included) the display stops where it stands: open tasks keep their counts
        self._active = False
        if self._stop is not None:
            self._stop.set()
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(timeout=5)
            self._stop = self._thread = None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    @contextlib.contextmanager
    def task(self, description: str, total: int | None, transient: bool = False) -> Iterator[Callable[..., None]]:
        """A progress task yielding ``advance(n=1)``. A task opened inside another is shown under it. ``transient``
        tasks (per-target sub-tasks such as one DoRI optimisation) are removed when done, so a long run shows its
        phases and the current sub-tasks only. On an exception the task is not marked complete."""
        if not self._active:
            yield lambda n=1, **kw: None
            return
        with self._lock:
            t = _Task(str(description), None if total is None else int(total), transient, len(self._tasks), _clock())
            self._tasks.append(t)
            if self._progress is not None:
                t.rich_id = self._progress.add_task(self._label(t), total=t.total)

        def advance(n: float = 1, **fields) -> None:
            with self._lock:
                t.completed += n
                if "description" in fields:
                    t.description = str(fields.pop("description"))
                    if self._progress is not None:
                        fields["description"] = self._label(t)
                if self._progress is not None and t.rich_id is not None:
                    self._progress.update(t.rich_id, advance=n, **fields)
                elif self.plain and _clock() - self._last_line >= self.interval:
                    self.report()  # the heartbeat thread covers stretches without any advance

        try:
            yield advance
        except KeyboardInterrupt:
            self._close(t, "interrupted")
            raise
        except BaseException:
            self._close(t, "failed")
            raise
        else:
            self._close(t, "done")

    def _close(self, t: _Task, how: str) -> None:
        with self._lock:
            if t in self._tasks:
                self._tasks.remove(t)
            if self._progress is not None and t.rich_id is not None:
                if how == "interrupted":
                    pass  # left as it stands, transient sub-tasks included: the display shows where it stopped
                elif t.transient:
                    self._progress.remove_task(t.rich_id)
                elif how == "done":
                    # ``tasks`` is a list in display order, not indexed by task id (removed transient bars shift it)
                    task = next((x for x in self._progress.tasks if x.id == t.rich_id), None)
                    if task is not None:
                        self._progress.update(t.rich_id, completed=task.total or 0)
            elif self.plain and how == "done" and t.reported and not t.transient:
                done = t.total if t.total is not None else t.completed
                self._line(f"{t.description}: {_count(done)}/{_count(done)}, done in "
                           f"{format_duration(_clock() - t.started)}", t.depth)

    @staticmethod
    def _label(t: _Task) -> str:
        return t.description if t.depth == 0 else "  " * (t.depth - 1) + " └ " + t.description

    # ------------------------------------------------------------------------------------------- plain lines
    def _line(self, text: str, depth: int = 0) -> None:
        self.log("[memobench] " + "  " * depth + text)
        self._last_line = _clock()

    def report(self) -> None:
        """One plain line per open task (outermost first): ``description: done/total, elapsed``."""
        with self._lock:
            now = _clock()
            for t in list(self._tasks):
                counts = f"{_count(t.completed)}/{t.total}" if t.total is not None else f"{_count(t.completed)} done"
                self._line(f"{t.description}: {counts}, {format_duration(now - t.started)} elapsed", t.depth)
                t.reported = True
            self._last_line = now

    def _heartbeat(self) -> None:
        stop = self._stop
        while stop is not None and not stop.is_set():
            wait = self._last_line + self.interval - _clock()
            if wait > 0:
                stop.wait(min(wait, self.interval, 1.0))
                continue
            if stop.is_set():
                break
            if self._tasks:
                self.report()
            else:
                self._last_line = _clock()

    def log(self, msg: str) -> None:
        # plain text: "[memobench] …" is not rich markup, and a log line is never wrapped (it is parsed)
        self.console.print(msg, highlight=False, markup=False, soft_wrap=True)


def _env_interval() -> float:
    raw = os.environ.get("MEMOBENCH_PROGRESS_INTERVAL", "").strip()
    if not raw:
        return PLAIN_INTERVAL_S
    try:
        v = float(raw)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        from .config import BadInput

        raise BadInput(f"MEMOBENCH_PROGRESS_INTERVAL={raw!r}: not a positive number of seconds; unset it (default "
                       f"{PLAIN_INTERVAL_S:g}) or set e.g. 60")
    return v


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
