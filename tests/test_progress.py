"""Progress bars: a phase bar that closes after transient sub-task bars were removed (e.g. a DoRI target's bar
inside the attack phase) must not fail — rich keeps tasks in a list, so task ids are not list positions."""

import io

from rich.console import Console

from memobench.progress import ProgressReporter


def test_bar_closes_after_transient_bars_were_removed():
    with ProgressReporter(True, console=Console(file=io.StringIO(), force_terminal=True)) as pr:
        with pr.task("sub 1", 2, transient=True) as adv:
            adv(2)
        with pr.task("phase", 3) as adv:  # id 1, but list position 0 after "sub 1" was removed
            with pr.task("sub 2", 1, transient=True) as sub:
                sub()
            adv()
        (t,) = pr._progress.tasks
        assert t.description == "phase" and t.completed == 3  # closed at its total
