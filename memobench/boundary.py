"""The plugin boundary: every call from the core into a plugin's hook goes through here.

A plugin that raises (other than memobench's own bad-input errors, which stay bad input) or returns the wrong type
becomes one :class:`PluginFailure` naming the plugin, its kind, the hook and the exception; the CLI prints it as one
line (exit code 1) and shows the full traceback, the plugin's frames included, with ``MEMOBENCH_DEBUG=1``.
"""

from __future__ import annotations

from typing import Any, Callable


class PluginFailure(Exception):
    """A plugin hook raised or returned the wrong type (not bad input: a fault of the plugin)."""

    def __init__(self, plugin: Any, hook: str, detail: str):
        self.plugin_name = getattr(plugin, "name", type(plugin).__name__)
        self.kind = getattr(plugin, "kind_label", "plugin")
        self.hook = hook
        where = hook if "(" in hook else f"{hook}()"
        super().__init__(f"{self.kind} '{self.plugin_name}' failed in {where}: {detail}")


def _passes(e: BaseException) -> bool:
    """Errors that keep their own meaning across the boundary (bad input, cache and data faults, a dead rank, a
    nested plugin's failure, Ctrl-C)."""
    from .cache import CacheError
    from .config import BadInput
    from .data import DataError
    from .registry import PluginError, UnknownPluginError

    if isinstance(e, (BadInput, CacheError, DataError, PluginError, UnknownPluginError, PluginFailure,
                      FileNotFoundError)):
        return True
    try:
        from .distributed import DistributedError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, DistributedError)


def _describe(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else "(no message)"
    return f"{type(e).__name__}: {msg}"


def failure(plugin: Any, hook: str, e: Exception) -> PluginFailure:
    """``e`` as a :class:`PluginFailure` of ``plugin``'s ``hook`` (itself when it already is one)."""
    return e if isinstance(e, PluginFailure) else PluginFailure(plugin, hook, _describe(e))


def call(plugin: Any, hook: str, fn: Callable, *args, expect: type | tuple[type, ...] | None = None, **kw):
    """``fn(*args, **kw)`` — a plugin's hook — with its failures named; ``expect``: the type(s) it must return."""
    try:
        out = fn(*args, **kw)
    except Exception as e:
        if _passes(e):
            raise
        raise failure(plugin, hook, e) from e
    if expect is not None and not isinstance(out, expect):
        names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        raise PluginFailure(plugin, hook, f"returned {type(out).__name__}, expected {names}")
    return out


class context:
    """``with context(plugin, "apply", lambda: mitigation.apply(...)):`` — a plugin's context manager whose
    entering and exiting are guarded like :func:`call`; exceptions of the ``with`` body pass through unchanged."""

    def __init__(self, plugin: Any, hook: str, make: Callable):
        self.plugin, self.hook, self.make = plugin, hook, make
        self.cm = None

    def __enter__(self):
        self.cm = call(self.plugin, self.hook, self.make)
        if not (hasattr(self.cm, "__enter__") and hasattr(self.cm, "__exit__")):
            raise PluginFailure(self.plugin, self.hook, f"returned {type(self.cm).__name__}, expected a context "
                                                        "manager (decorate it with @contextlib.contextmanager)")
        return call(self.plugin, self.hook, self.cm.__enter__)

    def __exit__(self, et, ev, tb):
        try:
            return self.cm.__exit__(et, ev, tb)
        except BaseException as e:
            if e is ev or _passes(e) or not isinstance(e, Exception):
                raise
            raise PluginFailure(self.plugin, f"{self.hook}() on exit", _describe(e)) from e
