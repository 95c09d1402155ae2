"""The plugin manager: built-in plugins first, then installed ones from the ``qtune`` entry-point
group, and registries filled through the hooks in :mod:`qtune.hookspecs`.

Environment:
  QTUNE_LOAD_PLUGINS   comma-separated names of the plugins to load ("" loads none): entry-point or
                       distribution names, and for QTUNE_PLUGINS_DIR the file names without .py;
                       unset loads every installed plugin and every file of QTUNE_PLUGINS_DIR
  QTUNE_PLUGINS_DIR    a folder of ``*.py`` plugin modules to load as well (never loaded by default);
                       its files are executed (imported) by every qtune command; hidden files are skipped
  QTUNE_TRACE_PLUGINS  set to 1 to print every hook call with its arguments and results
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

import pluggy

from . import hookspecs
from .errors import QtuneError, describe

# Built-in features are plugins too, registered through the same hooks as third-party ones.
BUILTIN_PLUGINS = (
    "qtune.plugins.templates",
    "qtune.plugins.datasets",
    "qtune.plugins.data_formats",
    "qtune.plugins.models",
    "qtune.plugins.demo_model",
    "qtune.plugins.transformers_backend",
    "qtune.plugins.unsloth_backend",
    "qtune.plugins.memory_monitor",
    "qtune.plugins.progress",
    "qtune.plugins.trackers",
    "qtune.plugins.hf_exports",
    "qtune.plugins.gguf_export",
    "qtune.plugins.reports",
)

T = TypeVar("T")


@dataclass
class Registry(Generic[T]):
    """Named objects of one kind, with the plugin that registered each."""

    kind: str
    items: dict[str, T] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)

    def add(self, item: T, plugin: str) -> None:
        name = getattr(item, "name", None)
        if not isinstance(name, str) or not name:
            raise QtuneError(f"plugin {plugin!r} registered a {self.kind} without a name; give it a `name` attribute")
        if name in self.items:
            raise QtuneError(
                f"plugin {plugin!r} registers {self.kind} {name!r}, which plugin {self.owners[name]!r} "
                f"already registered; rename one of them or set QTUNE_LOAD_PLUGINS to load only one"
            )
        self.items[name] = item
        self.owners[name] = plugin

    def get(self, name: str) -> T:
        try:
            return self.items[name]
        except KeyError:
            raise QtuneError(f"unknown {self.kind} {name!r}{suggest(name, self.items)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.items))


def normalize_format(name: str) -> str:
    """Export format names are case-insensitive and ``_`` equals ``-`` (the seed's ``merged_16bit``)."""
    return name.strip().lower().replace("_", "-")


def suggest(name: str, choices: Any) -> str:
    """' (did you mean X?)' when a close choice exists, else the list of choices."""
    import difflib

    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; choose one of: {', '.join(choices)}" if choices else ""


def allowed_plugins() -> set[str] | None:
    """The names QTUNE_LOAD_PLUGINS lists (entry-point or distribution names, or a plugin folder's
    file names without ``.py``), or None when it is unset (everything loads)."""
    wanted = os.environ.get("QTUNE_LOAD_PLUGINS")
    return None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}


class PluginHost:
    """A pluggy manager plus the registries its hooks fill. Built once per process by :func:`get_host`."""

    def __init__(self, load_installed: bool = True, extra_plugins: dict[str, Any] | None = None) -> None:
        self.pm = pluggy.PluginManager("qtune")
        self.pm.add_hookspecs(hookspecs)
        self.distributions: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
        for module_path in BUILTIN_PLUGINS:
            self.pm.register(importlib.import_module(module_path), name=module_path)
        for name, plugin in (extra_plugins or {}).items():  # plugins handed in directly (tests, embedding)
            self.pm.register(plugin, name=name)
            self.distributions[name] = ("(registered in code)", "")
        if load_installed:
            self._load_entry_points()
            plugins_dir = os.environ.get("QTUNE_PLUGINS_DIR")
            if plugins_dir:
                self._load_directory(Path(plugins_dir))
        self.trace = bool(os.environ.get("QTUNE_TRACE_PLUGINS"))
        if self.trace:  # hooks called through pm.hook (register_commands) are traced by pluggy
            self.pm.trace.root.setwriter(lambda message: print(message, end="", file=sys.stderr))
            self.pm.enable_tracing()
        self.templates = self._collect("template", "register_templates")
        self.dataset_loaders = self._collect("dataset loader", "register_dataset_loaders")
        self.data_formats = self._collect("data format", "register_data_formats")
        self.models = self._collect("model", "register_models")
        self.backends = self._collect("backend", "register_backends")
        self.callbacks = self._collect("callback", "register_callbacks")
        self.trackers = self._collect("tracker", "register_trackers")
        self.exporters = self._collect("export format", "register_exporters")

    def _load_entry_points(self) -> None:
        allowed = allowed_plugins()
        for ep in entry_points(group="qtune"):
            dist = ep.dist.name if ep.dist else "unknown"
            if allowed is not None and ep.name not in allowed and dist not in allowed:
                continue
            if self.pm.has_plugin(ep.name):
                continue
            self.distributions[ep.name] = (dist, ep.dist.version if ep.dist else "")
            with self.guard(ep.name, "loading"):  # any failure while importing third-party code
                module = ep.load()
            self.pm.register(module, name=ep.name)

    def _load_directory(self, folder: Path) -> None:
        if not folder.is_dir():
            raise QtuneError(f"QTUNE_PLUGINS_DIR {str(folder)!r} is not a directory; point it at a folder of plugin .py files")
        allowed = allowed_plugins()
        for path in sorted(folder.glob("*.py")):
            if path.name.startswith("."):  # editor swap files, ._ files from macOS: never executed
                continue
            if allowed is not None and path.stem not in allowed:
                continue
            name = f"qtune_local_plugin_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec and spec.loader
            module = importlib.util.module_from_spec(spec)
            # Never leave a __pycache__ behind in the user's plugin folder.
            writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
            self.distributions[str(path)] = ("(plugin dir)", "")
            try:
                with self.guard(str(path), "loading"):
                    spec.loader.exec_module(module)
            finally:
                sys.dont_write_bytecode = writes_bytecode
            self.pm.register(module, name=str(path))

    def _collect(self, kind: str, hook_name: str) -> Registry:
        registry: Registry = Registry(kind)
        caller = getattr(self.pm.hook, hook_name)
        # Call each implementation on its own so the registry knows which plugin registered what.
        for impl in caller.get_hookimpls():  # registration order: built-ins first
            before = set(registry.items)
            with self.guard(impl.plugin_name, hook_name):
                impl.function(register=lambda item, _p=impl.plugin_name: registry.add(item, _p))
            if self.trace:
                added = sorted(set(registry.items) - before)
                print(f"qtune: {impl.plugin_name}.{hook_name}(register) -> {', '.join(added) or 'nothing'}", file=sys.stderr)
        return registry

    def add_commands(self, cli: Any) -> None:
        """Let each plugin add its commands to the click group, naming the plugin if it fails."""
        for impl in self.pm.hook.register_commands.get_hookimpls():
            with self.guard(impl.plugin_name, "register_commands"):
                impl.function(cli=cli)

    def plugin_label(self, plugin: str) -> str:
        """``plugin NAME (distribution DIST VERSION)``: how one-line errors name a plugin."""
        dist, version = self.distributions.get(plugin, ("qtune, built in", _qtune_version()))
        return f"plugin {plugin!r} (distribution {dist}{' ' + version if version else ''})"

    def guard_item(self, registry: Registry, name: str, doing: str):
        """:meth:`guard` for the plugin that registered ``name`` in ``registry``."""
        return self.guard(registry.owners.get(name, "?"), doing)

    @contextlib.contextmanager
    def guard(self, plugin: str, doing: str) -> Iterator[None]:
        """Turn an exception escaping a plugin's code into one QtuneError line naming the plugin and its
        distribution (the original stays attached as the cause: ``--debug`` prints its traceback).
        A QtuneError passes unchanged: it is the plugin's own message to the user."""
        try:
            yield
        except QtuneError:
            raise
        except Exception as exc:
            from .fsutil import disk_full_error, is_disk_full

            if is_disk_full(exc):  # not the plugin's fault
                raise disk_full_error(doing, getattr(exc, "filename", None) or ".") from exc
            dist = self.distributions.get(plugin, ("",))[0]
            remedy = f"`pip uninstall {dist}`, " if dist and not dist.startswith("(") else ""
            raise QtuneError(
                f"{self.plugin_label(plugin)} failed in {doing}: {describe(exc)}; fix the plugin, "
                f"{remedy}or leave it out with QTUNE_LOAD_PLUGINS (--debug shows the traceback)"
            ) from exc

    def plugin_rows(self) -> list[dict[str, Any]]:
        """One row per plugin: name, distribution, version, hooks it implements."""
        rows = []
        for name, plugin in self.pm.list_name_plugin():
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            dist, version = self.distributions.get(name, ("qtune (built-in)", _qtune_version()))
            rows.append({"name": name, "distribution": dist, "version": version, "hooks": hooks})
        return sorted(rows, key=lambda r: (r["distribution"] != "qtune (built-in)", r["name"]))


def make_callbacks(config: Any, extra: list[Any]) -> list[Any]:
    """Fresh instances of the config's callbacks (``qtune.types.TrainingCallback``), after ``extra``; one
    line naming a plugin whose callback fails to start."""
    registry = get_host().callbacks
    callbacks = list(extra)
    for index, entry in enumerate(config.callbacks):
        factory = registry.get(entry.name)
        try:
            callbacks.append(factory(**entry.options))
        except TypeError as exc:
            raise QtuneError(f"callbacks[{index}] ({entry.name}): bad options: {exc}") from None
        except QtuneError:
            raise
        except Exception:  # a plugin's constructor failing
            with get_host().guard_item(registry, entry.name, f"starting callback {entry.name!r} (callbacks[{index}])"):
                raise
    return callbacks


def _qtune_version() -> str:
    from . import __version__

    return __version__


_host: PluginHost | None = None


def get_host() -> PluginHost:
    global _host
    if _host is None:
        _host = PluginHost()
    return _host


def reset_host() -> None:
    """Forget the loaded plugins (tests use this after changing QTUNE_LOAD_PLUGINS)."""
    global _host
    _host = None
