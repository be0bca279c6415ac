"""The ``memobench`` command line (Typer + rich).

Bad input — unknown plugin, unreadable file, bad seed spec, unwritable output directory, corrupt cache entry —
prints one line ``error: …`` naming the input and the fix, and exits with code 2.

The application and its shared state live in :mod:`memobench.cli_app`; the commands in :mod:`memobench.cli_run`
(run, aggregate, matrix) and :mod:`memobench.cli_tools` (plugins, ls, cache, data, leaderboard), imported here in
the order ``memobench --help`` lists them. This module adds the plugins' commands and maps exceptions to exit codes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import cli_run, cli_tools  # noqa: F401  (registers the commands, in this order)
from .cache import CacheError
from .cli_app import _State, _registry, app
from .cli_run import _print_summary, matrix_pairings, parse_metric_params, run, substitution_lines  # noqa: F401
from .config import BadInput
from .data import DataError
from .registry import PluginError, UnknownPluginError, call_hookimpl

BAD_INPUT = (BadInput, UnknownPluginError, CacheError, DataError, FileNotFoundError, PluginError)


def _click_exceptions(name: str) -> tuple[type, ...]:
    """``name`` from click and from the copy of click that recent Typer versions vendor as ``typer._click`` (its
    exceptions are not click's, so ``except click.UsageError`` alone misses Typer's usage errors)."""
    import importlib

    out = []
    for mod in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            cls = getattr(importlib.import_module(mod), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in out:
            out.append(cls)
    return tuple(out)


_NO_ARGS_IS_HELP = _click_exceptions("NoArgsIsHelpError")
_USAGE_ERROR = _click_exceptions("UsageError")
_CLICK_EXCEPTION = _click_exceptions("ClickException")
_EXIT = _click_exceptions("Exit")
_ABORT = _click_exceptions("Abort")



# ----------------------------------------------------------------------------------------------------- main
def _add_plugin_commands() -> None:
    """Call every plugin's ``register_commands(app)`` hook once per process (failure-tolerant)."""
    reg = _registry()  # PluginError (strict mode) propagates
    for impl in reg.pm.hook.register_commands.get_hookimpls():
        if impl.plugin_name in _State.commands_added:
            continue
        _State.commands_added.add(impl.plugin_name)
        try:
            call_hookimpl("register_commands", impl, app=app)
        except Exception as e:
            p = next((q for q in reg.plugins if q["name"] == impl.plugin_name), {})
            reg.failures.append({"name": impl.plugin_name, "dist": p.get("dist"), "version": p.get("version"),
                                 "error": f"register_commands: {type(e).__name__}: {e}"})
            print(f"warning: plugin {impl.plugin_name} failed to add commands: {type(e).__name__}: {e}",
                  file=sys.stderr)


def _pre_parse_plugins_dir(argv: list[str]) -> None:
    for i, a in enumerate(argv):
        if a == "--plugins-dir" and i + 1 < len(argv):
            _State.plugins_dir = Path(argv[i + 1])
        elif a.startswith("--plugins-dir="):
            _State.plugins_dir = Path(a.split("=", 1)[1])


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _invoke(argv: list[str]):
    """``app(args=argv, standalone_mode=False)``, except that a ``KeyboardInterrupt`` reaches :func:`main`: Typer
    turns one into a bare exit code 130, which printed nothing and lost the counts a run attaches to it."""
    import typer.main

    cmd = typer.main.get_command(app)
    with cmd.make_context("memobench", list(argv)) as ctx:
        return cmd.invoke(ctx)


def _pacify_std_streams() -> None:
    """Silence the flush of a closed stdout/stderr at exit (what Typer does on a broken pipe)."""
    try:
        from click.utils import PacifyFlushWrapper
    except ImportError:
        return
    sys.stdout = PacifyFlushWrapper(sys.stdout)
    sys.stderr = PacifyFlushWrapper(sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _State.plugins_dir = None  # main() may be called more than once in a process (tests, notebooks)
    try:
        _pre_parse_plugins_dir(argv)
        if _State.plugins_dir is not None and not _State.plugins_dir.is_dir():
            raise BadInput(f"--plugins-dir: not a directory: {_State.plugins_dir}")
        _add_plugin_commands()
        rv = _invoke(argv)
        return int(rv or 0)
    except BAD_INPUT as e:  # memobench's own bad-input errors only: any other ValueError is an internal error below
        print(f"error: {_one_line(e) or type(e).__name__}", file=sys.stderr)
        return 2
    except _EXIT as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except (*_ABORT, EOFError):
        print("error: aborted", file=sys.stderr)
        return 1
    except _NO_ARGS_IS_HELP as e:  # `memobench` / `memobench cache` without a sub-command: show the help
        text = e.format_message()  # (Typer's rich help has already been printed; plain help is returned)
        if text.strip():
            print(text)
        return 0
    except _USAGE_ERROR as e:  # wrong option, missing argument, value of the wrong type
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "memobench"
        print(f"error: {_one_line(e.format_message())} (see `{where} --help`)", file=sys.stderr)
        return 2
    except _CLICK_EXCEPTION as e:
        print(f"error: {_one_line(e.format_message())}", file=sys.stderr)
        return int(getattr(e, "exit_code", 1))
    except KeyboardInterrupt as e:  # Ctrl-C; a run's (memobench.progress.Interrupted) carries the sample counts
        from .progress import interrupted_message

        print(interrupted_message(e), file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `memobench plugins | head -1`: the reader went away
        _pacify_std_streams()
        return 1
    except Exception as e:
        from .distributed import DistributedError

        if isinstance(e, DistributedError):
            print(f"error: {_one_line(e)}", file=sys.stderr)  # another rank died: not bad input, but one line
            return 1
        import os

        if os.environ.get("MEMOBENCH_DEBUG", "") not in ("", "0"):
            raise  # the full traceback (exit code 1)
        from .boundary import PluginFailure

        if isinstance(e, PluginFailure):  # names the plugin, its hook and the exception
            print(f"error: {_one_line(e)} (a fault of that plugin, not of your input; rerun with MEMOBENCH_DEBUG=1 "
                  "for the traceback)", file=sys.stderr)
            return 1
        # not bad input: a fault of memobench or of a plugin. One line, exit code 1; the traceback on request
        first = str(e).strip().splitlines()[0][:500] if str(e).strip() else "(no message)"
        print(f"error: internal error: {type(e).__name__}: {first} (not a problem with your input; rerun with "
              "MEMOBENCH_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        return 1


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()

