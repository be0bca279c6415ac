"""Plugin discovery and the registries of models, prompt sets, mitigations, attacks, metrics and detectors.

Plugins are distributions declaring entry points in the group ``memobench`` (the built-ins under ``plugins/``
are declared the same way in memobench's own ``pyproject.toml``). Loading is failure-tolerant: each entry
point is imported and its hooks called on its own; a failure rolls back what that plugin registered, prints
one warning line and is listed by ``memobench plugins``. Environment switches:

* ``MEMOBENCH_STRICT_PLUGINS=1`` — re-raise the first plugin failure;
* ``MEMOBENCH_LOAD_PLUGINS="dist1,dist2"`` — load only the entry points of these distributions (or entry-point
  names; "" = none);
* ``MEMOBENCH_DISABLE_PLUGIN_AUTOLOAD=1`` — skip entry points entirely;
* ``MEMOBENCH_PLUGINS_DIR=DIR`` (or ``--plugins-dir``) — also register every ``*.py`` file in DIR;
* ``MEMOBENCH_TRACE_PLUGINS=1`` — print every hook call to stderr.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import inspect
import os
import re
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pluggy

from . import hookspecs

GROUP = "memobench"
KINDS = {
    "model": "register_models",
    "prompt_set": "register_prompt_sets",
    "mitigation": "register_mitigations",
    "attack": "register_attacks",
    "metric": "register_metrics",
    "detector": "register_detectors",
}
# what makes a plugin the default of its kind (what `memobench run` uses when the kind is not named)
DEFAULT_MARK = {
    "model": ("is_default = True", lambda cls: cls.is_default),
    "mitigation": ('kind = "none"', lambda cls: cls.kind == "none"),
    "attack": ("is_identity = True", lambda cls: cls.is_identity),
}
KIND_PLURAL = {"model": "models", "prompt_set": "prompt-sets", "mitigation": "mitigations", "attack": "attacks",
               "metric": "metrics", "detector": "detectors"}


class PluginError(Exception):
    """A plugin could not be loaded or registered."""


class UnknownPluginError(KeyError):
    """An unknown plugin name; the message suggests close matches and lists what is available."""

    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind, self.name, self.available = kind, name, available
        close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        label = kind.replace("_", " ")
        super().__init__(f"Unknown {label} '{name}'.{hint} Available: {', '.join(sorted(available)) or '(none)'}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


@dataclass
class Entry:
    cls: type
    kind: str
    name: str
    plugin: str  # entry-point name (or file) that registered it
    dist: str | None
    version: str
    origin_fallback: str = ""  # where register() was called (for classes without source)
    exact_origin: str | None = None  # e.g. the prompt file of a command-line prompt set

    @functools.cached_property
    def origin(self) -> str:
        """file:line of the class (computed on first use: reading source costs ~10 ms per class at start-up)."""
        return self.exact_origin or _origin(self.cls, self.origin_fallback or None)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "version": self.version, "plugin": self.plugin,
                "dist": self.dist, "origin": self.origin}


@dataclass
class Registry:
    pm: pluggy.PluginManager
    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})
    failures: list[dict] = field(default_factory=list)
    plugins: list[dict] = field(default_factory=list)

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str) -> type:
        try:
            return self.entries[kind][name].cls
        except KeyError:
            raise UnknownPluginError(kind, name, self.names(kind)) from None

    def entry(self, kind: str, name: str) -> Entry:
        self.get(kind, name)
        return self.entries[kind][name]

    def all_entries(self) -> list[Entry]:
        return [e for k in KINDS for e in self.entries[k].values()]

    def default(self, kind: str) -> str:
        """The name (the class's own ``name``, not an alias) of the one plugin of ``kind`` that declares itself the
        default: the model with ``is_default``, the mitigation of kind ``"none"``, the attack with ``is_identity``.
        :class:`PluginError` when no plugin, or several, declare it."""
        if kind not in DEFAULT_MARK:
            raise ValueError(f"Registry.default: no default for kind {kind!r}; kinds with one: "
                             f"{', '.join(DEFAULT_MARK)}")
        what, marked = DEFAULT_MARK[kind]
        found = list(dict.fromkeys(e.cls for e in self.entries[kind].values() if marked(e.cls)))
        if len(found) != 1:
            label = kind.replace("_", " ")
            names = ", ".join(f"{c.name} ({self.entries[kind][c.name].plugin})" for c in found)
            raise PluginError(f"default {label}: {'no' if not found else len(found)} registered {label} plugins "
                              f"declare {what}{f' ({names})' if found else ''}; exactly one must (or name one "
                              f"with --{kind})")
        return found[0].name


def _origin(obj, fallback: str | None = None) -> str:
    """``file:line`` of a class; for classes without source (made by ``type(...)``), ``fallback``."""
    try:
        f = inspect.getsourcefile(obj) or "?"
        line = inspect.getsourcelines(obj)[1]
        return f"{f}:{line}"
    except (OSError, TypeError):
        return fallback or getattr(obj, "__module__", "?")


def _validate_name(name: object, cls: type) -> str:
    if not isinstance(name, str) or not name or name != name.strip() or "/" in name or "\\" in name:
        raise PluginError(f"{cls.__module__}.{cls.__qualname__} has an invalid name {name!r} "
                          "(non-empty, no surrounding spaces, no path separators)")
    return name


def _kind_bases() -> dict[str, type]:
    from . import api

    return {"model": api.ModelPlugin, "prompt_set": api.PromptSet, "mitigation": api.Mitigation,
            "attack": api.Attack, "metric": api.Metric, "detector": api.Detector}


def _check_class(cls: object, kind: str, plugin_name: str) -> None:
    """A registered ``kind`` is a class derived from that kind's base in :mod:`memobench.api` with a dataclass
    ``Params``; otherwise one-line :class:`PluginError` naming the plugin and the fault. (Its ``name``, and those of
    its aliases, are checked next by :func:`_validate_name`: non-empty, no surrounding spaces, no path separator.)"""
    label = kind.replace("_", " ")
    base = _kind_bases()[kind]
    what = (f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else repr(cls))[:200]
    where = f"plugin {plugin_name} registers {what} as {'an' if label[0] in 'aeiou' else 'a'} {label}"
    if not isinstance(cls, type):
        raise PluginError(f"{where}, but it is not a class; register a subclass of memobench.api.{base.__name__}")
    if not issubclass(cls, base):
        raise PluginError(f"{where}, but it does not derive from memobench.api.{base.__name__}; subclass it (or "
                          f"register it under the hook of its own kind)")
    params = getattr(cls, "Params", None)
    if not (isinstance(params, type) and dataclasses.is_dataclass(params)):
        got = "a plain class" if isinstance(params, type) else repr(params)[:60]
        raise PluginError(f"{where}, but its 'Params' is not a dataclass ({got}); declare '@dataclass class "
                          "Params: ...' (empty when it takes no parameters)")


def _tracing() -> bool:
    return os.environ.get("MEMOBENCH_TRACE_PLUGINS", "") not in ("", "0")


def call_hookimpl(hook: str, impl, **kwargs):
    """Call one plugin's implementation of ``hook``; printed to stderr when ``MEMOBENCH_TRACE_PLUGINS=1``.

    (Calling one plugin at a time, for failure isolation, bypasses ``pm.hook``; hence the explicit trace.)"""
    if _tracing():
        print(f"[memobench hook] {hook}({', '.join(kwargs)}) -> {impl.plugin_name}", file=sys.stderr)
    return impl.function(**kwargs)


def _normalize_dist(name: str) -> str:
    """PEP 503 normalisation: ``Memobench_Example`` and ``memobench-example`` name the same distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _call_plugin_hooks(reg: Registry, plugin: object, plugin_name: str, dist: str | None) -> list[tuple[str, str]]:
    """Call one plugin's register_* hooks; returns what it added (kind, name). Raises on duplicates."""
    added: list[tuple[str, str]] = []
    for kind, hook in KINDS.items():
        caller = getattr(reg.pm.hook, hook)
        for impl in caller.get_hookimpls():
            if impl.plugin is not plugin:
                continue

            def register(cls, aliases=(), _kind=kind):
                caller = sys._getframe(1)  # where register() was called: the origin of a class made by type()
                fallback = f"{caller.f_code.co_filename}:{caller.f_lineno}"
                _check_class(cls, _kind, plugin_name)
                for nm in (getattr(cls, "name", None), *aliases):
                    nm = _validate_name(nm, cls)
                    if nm in reg.entries[_kind]:
                        other = reg.entries[_kind][nm]
                        raise PluginError(f"duplicate {_kind.replace('_', ' ')} name '{nm}': {_origin(cls, fallback)} "
                                          f"(plugin {plugin_name}) and {other.origin} (plugin {other.plugin})")
                    reg.entries[_kind][nm] = Entry(cls, _kind, nm, plugin_name, dist,
                                                   str(getattr(cls, "version", "0")), fallback)
                    added.append((_kind, nm))
                    if _tracing():
                        print(f"[memobench hook]   {plugin_name} registered {_kind.replace('_', ' ')} '{nm}' "
                              f"({cls.__module__}.{cls.__qualname__})", file=sys.stderr)

            call_hookimpl(hook, impl, register=register)
    return added


def _register_plugin(reg: Registry, obj: object, name: str, dist: str | None, dist_version: str | None,
                     strict: bool) -> None:
    added: list[tuple[str, str]] = []
    try:
        reg.pm.register(obj, name=name)
        reg.pm.check_pending()
        added = _call_plugin_hooks(reg, obj, name, dist)
        reg.plugins.append({"name": name, "dist": dist, "version": dist_version,
                            "hooks": sorted(h.name for h in reg.pm.get_hookcallers(obj) or [])})
    except Exception as e:  # roll back, record, warn
        for kind, nm in added:
            reg.entries[kind].pop(nm, None)
        if reg.pm.is_registered(obj):
            reg.pm.unregister(obj)
        msg = f"{type(e).__name__}: {e}"
        reg.failures.append({"name": name, "dist": dist, "version": dist_version, "error": msg})
        print(f"warning: plugin {name} ({dist or '-'} {dist_version or ''}) failed to load: {msg}".replace("  ", " "),
              file=sys.stderr)
        if strict:
            raise PluginError(f"plugin {name} failed to load: {msg}") from e


def _load_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"memobench_dir_plugin_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class _FailedImport:
    def __init__(self, error: BaseException):
        self.error = error


def build_registry(plugins_dir: str | Path | None = None) -> Registry:
    """Discover and load plugins into a fresh registry."""
    strict = os.environ.get("MEMOBENCH_STRICT_PLUGINS", "") not in ("", "0")
    pm = pluggy.PluginManager("memobench")
    pm.add_hookspecs(hookspecs)
    if _tracing():  # calls through pm.hook (registration calls each plugin itself: see call_hookimpl)
        pm.add_hookcall_monitoring(
            lambda name, impls, kw: print(f"[memobench hook] {name} -> {[i.plugin_name for i in impls]}",
                                          file=sys.stderr),
            lambda outcome, name, impls, kw: None)
    reg = Registry(pm)
    if os.environ.get("MEMOBENCH_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0"):
        only = os.environ.get("MEMOBENCH_LOAD_PLUGINS")
        allowed = None if only is None else {_normalize_dist(s.strip()) for s in only.split(",") if s.strip()}
        eps = sorted(metadata.entry_points(group=GROUP), key=lambda ep: (ep.dist.name if ep.dist else "", ep.name))
        for ep in eps:
            dist = ep.dist.name if ep.dist else None
            if allowed is not None and _normalize_dist(dist or "") not in allowed \
                    and _normalize_dist(ep.name) not in allowed:
                continue
            version = ep.dist.version if ep.dist else None
            try:
                obj = ep.load()
            except Exception as e:
                reg.failures.append({"name": ep.name, "dist": dist, "version": version,
                                     "error": f"{type(e).__name__}: {e}"})
                print(f"warning: plugin {ep.name} ({dist} {version}) failed to load: {type(e).__name__}: {e}",
                      file=sys.stderr)
                if strict:
                    raise PluginError(f"plugin {ep.name} failed to load: {e}") from e
                continue
            _register_plugin(reg, obj, ep.name, dist, version, strict)
    pdir = plugins_dir or os.environ.get("MEMOBENCH_PLUGINS_DIR")
    if pdir:
        for f in sorted(Path(pdir).glob("*.py")):
            try:
                mod = _load_file(f)
            except Exception as e:
                reg.failures.append({"name": str(f), "dist": None, "version": None,
                                     "error": f"{type(e).__name__}: {e}"})
                print(f"warning: plugin file {f} failed to load: {type(e).__name__}: {e}", file=sys.stderr)
                if strict:
                    raise PluginError(f"plugin file {f} failed to load: {e}") from e
                continue
            if not pm.is_registered(mod):
                _register_plugin(reg, mod, str(f), None, None, strict)
    return reg


_REGISTRY: Registry | None = None
_REGISTRY_DIR: str | None = None  # the plugins_dir the current registry was built with


def get_registry(plugins_dir: str | Path | None = None, reload: bool = False) -> Registry:
    """The process-wide registry (built once; ``reload=True`` or another ``plugins_dir`` rebuilds it)."""
    global _REGISTRY, _REGISTRY_DIR
    key = str(Path(plugins_dir).resolve()) if plugins_dir is not None else None
    if _REGISTRY is None or reload or (key is not None and key != _REGISTRY_DIR):
        _REGISTRY = build_registry(plugins_dir)
        _REGISTRY_DIR = key
    return _REGISTRY


def register_object(obj: object, name: str) -> Registry:
    """Register an in-process plugin object (tests, notebooks) into the current registry."""
    reg = get_registry()
    _register_plugin(reg, obj, name, None, None, strict=True)
    return reg


def unregister_object(name: str) -> None:
    """Undo :func:`register_object` (also forgets a failed registration under ``name``)."""
    reg = get_registry()
    reg.failures = [f for f in reg.failures if f["name"] != name]
    obj = reg.pm.get_plugin(name)
    if obj is None:
        return
    for kind in KINDS:
        for nm in [n for n, e in reg.entries[kind].items() if e.plugin == name]:
            del reg.entries[kind][nm]
    reg.plugins = [p for p in reg.plugins if p["name"] != name]
    reg.pm.unregister(obj)
