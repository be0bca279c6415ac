"""The ``memobench`` Typer application and what its command modules share (:mod:`memobench.cli` adds the commands
and runs it).

Commands by group: :mod:`memobench.cli_run` (``run``, ``aggregate``, ``run --matrix``) and :mod:`memobench.cli_tools`
(``plugins``, ``ls``, ``cache``, ``data``, ``leaderboard``); plugins add theirs through the ``register_commands``
hook.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .config import BadInput
from .registry import get_registry

app = typer.Typer(
    name="memobench",
    help="Benchmark memorization mitigations × attacks for text-to-image diffusion models.\n\n"
         "Start with: memobench run --mitigation none --attack none  (the embedded `tiny` model, offline, CPU).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
cache_app = typer.Typer(help="Inspect or clear the content-addressed cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


class _State:
    plugins_dir: Optional[Path] = None
    commands_added: set[str] = set()  # plugins whose register_commands hook already ran in this process


def _registry():
    return get_registry(plugins_dir=_State.plugins_dir)


@app.callback()
def _main(
    plugins_dir: Optional[Path] = typer.Option(None, "--plugins-dir", help="Also load every *.py file in DIR as a "
                                               "plugin (one-off plugins without packaging)."),
):
    if plugins_dir is not None:
        if not plugins_dir.is_dir():
            raise BadInput(f"--plugins-dir: not a directory: {plugins_dir}")
        _State.plugins_dir = plugins_dir



def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


_WIDE = 1000  # console width for a pipe or file: no terminal to fit, so a table is as wide as its content


def _stdout_console():
    """A rich console on stdout. A terminal keeps its width; without one (a pipe, a file, CI logs) rich would assume
    80 columns and clip table cells, so the width is set wide: tables are then as wide as their content."""
    from rich.console import Console

    con = Console()
    return con if con.is_terminal else Console(width=_WIDE)
