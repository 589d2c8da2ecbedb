"""Plugin discovery and the per-stage registries.

Every plugin, built-in or third-party, is a module named by an entry point in the group `trtkit`.
Loading is controlled by environment variables, read when plugins are first loaded:

- TRTKIT_LOAD_PLUGINS=a,b      allow-list: only these third-party plugins load (built-ins always do);
                               set it empty to load no third-party plugin at all.
- TRTKIT_DISABLE_PLUGIN_AUTOLOAD=1   load only the built-in plugins.
- TRTKIT_BLOCK_PLUGINS=a,b     never load these plugins (built-in or not); the CLI's `--no-plugin NAME`
                               adds to this list.

A plugin that fails to import, whose hook raises, or that registers something invalid (wrong type, bad
name, a name another plugin already took) is skipped as a whole with a one-line warning; the rest work.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pluggy

from . import hookspecs
from .errors import OptionError, PluginError, unknown_name
from .stages import STAGES, Builder, Calibrator, Component, Evaluator, Exporter, GraphPass, PruningCriterion

ENTRY_POINT_GROUP = "trtkit"
BUILTIN_DISTRIBUTION = "trtkit"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")

C = TypeVar("C", bound=Component)


@dataclass
class PluginInfo:
    name: str
    module: str
    distribution: str | None
    version: str | None
    builtin: bool
    components: dict[str, list[str]] = field(default_factory=dict)
    hooks: list[str] = field(default_factory=list)


@dataclass
class Registry:
    """Everything the loaded plugins registered, one mapping per stage, plus what was skipped and why."""

    pm: pluggy.PluginManager
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    stages: dict[str, dict[str, Component]] = field(default_factory=lambda: {stage: {} for stage in STAGES})
    owners: dict[tuple[str, str], str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def get(self, stage: str, name: str) -> Component:
        components = self.stages[stage]
        if name not in components:
            raise unknown_name(_SINGULAR[stage], name, components)
        return components[name]

    def exporter(self, name: str) -> Exporter:
        return self.get("exporters", name)  # type: ignore[return-value]

    def graph_pass(self, name: str) -> GraphPass:
        return self.get("passes", name)  # type: ignore[return-value]

    def calibrator(self, name: str) -> Calibrator:
        return self.get("calibrators", name)  # type: ignore[return-value]

    def builder(self, name: str) -> Builder:
        return self.get("builders", name)  # type: ignore[return-value]

    def evaluator(self, name: str) -> Evaluator:
        return self.get("evaluators", name)  # type: ignore[return-value]

    def pruning_criterion(self, name: str) -> PruningCriterion:
        return self.get("pruning_criteria", name)  # type: ignore[return-value]

    def default(self, stage: str) -> Component:
        """The component of `stage` used when none is named: the first registered one marked `default=True`
        (built-ins register first, so a third party cannot take the default from them)."""
        for component in self.stages[stage].values():
            if component.default:
                return component
        raise OptionError(f"no installed {_SINGULAR[stage]} is marked as the default one: name one")

    def owner(self, stage: str, name: str) -> str:
        return self.owners[(stage, name)]


_SINGULAR = {
    "exporters": "exporter",
    "passes": "pass",
    "calibrators": "calibrator",
    "builders": "builder",
    "evaluators": "evaluator",
    "engines": "engine",
    "pruning_criteria": "pruning criterion",
}
_registry: Registry | None = None


def _names(variable: str) -> list[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    # Built-ins first (they win name clashes), then third parties in a stable order.
    unique = {(ep.name, ep.value): ep for ep in points}
    return sorted(
        unique.values(),
        key=lambda ep: (_distribution_name(ep) != BUILTIN_DISTRIBUTION, ep.name),
    )


def _distribution_name(ep: importlib.metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return _name_and_version(dist)[0] if dist is not None else None


@functools.cache
def _name_and_version(dist: importlib.metadata.Distribution) -> tuple[str, str]:
    """Parsed once per distribution: the entry points of one distribution share it, and parsing its metadata
    per entry point (three times each) was a measurable part of `trtkit --help`."""
    metadata = dist.metadata
    return metadata["Name"], metadata["Version"]


def load_plugins(block: Iterable[str] = (), extra_modules: Iterable[Any] = ()) -> Registry:
    """Discover, import and register every permitted plugin. Returns a fresh Registry.

    extra_modules: plugin objects registered after the entry points (for tests and embedding).
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    registry = Registry(pm=pm)
    allow = _names("TRTKIT_LOAD_PLUGINS")
    blocked = set(_names("TRTKIT_BLOCK_PLUGINS") or []) | set(block)
    autoload = os.environ.get("TRTKIT_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower() in ("", "0", "false", "no")

    for ep in _entry_points():
        dist_name = _distribution_name(ep)
        builtin = dist_name == BUILTIN_DISTRIBUTION
        if ep.name in blocked or ep.name in registry.plugins:
            continue
        if not builtin and (not autoload or (allow is not None and ep.name not in allow)):
            continue
        try:
            module = ep.load()
        except Exception as exc:  # a broken third-party plugin must never take trtkit down
            _skip(registry, ep.name, f"failed to import {ep.value}: {type(exc).__name__}: {exc}")
            continue
        dist = getattr(ep, "dist", None)
        version = _name_and_version(dist)[1] if dist is not None else None
        info = PluginInfo(ep.name, ep.value, dist_name, version, builtin)
        _register(registry, module, info)

    for module in extra_modules:
        name = getattr(module, "__name__", repr(module))
        _register(registry, module, PluginInfo(name, name, None, None, builtin=False))
    return registry


def _skip(registry: Registry, name: str, reason: str) -> None:
    message = f"plugin '{name}' skipped: {reason}"
    registry.problems.append(message)
    _warn(message)


def _register(registry: Registry, module: Any, info: PluginInfo) -> None:
    """Register one plugin transactionally: all of its components, or none of them."""
    try:
        registry.pm.register(module, name=info.name)
    except Exception as exc:
        _skip(registry, info.name, f"{type(exc).__name__}: {exc}")
        return
    staged: list[tuple[str, Component]] = []
    try:
        for stage, cls in STAGES.items():
            hook = getattr(registry.pm.hook, f"register_{stage}")
            for impl in hook.get_hookimpls():
                if impl.plugin_name == info.name:
                    impl.function(register=_stager(stage, cls, staged))
        seen: set[tuple[str, str]] = set()
        for stage, component in staged:
            key = (stage, component.name)
            if key in registry.owners or key in seen:
                other = registry.owners.get(key, info.name)
                raise PluginError(
                    f"{_SINGULAR[stage]} name '{component.name}' is already registered by plugin '{other}'"
                )
            seen.add(key)
    except Exception as exc:
        registry.pm.unregister(module)
        _skip(registry, info.name, str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}")
        return
    for stage, component in staged:
        registry.stages[stage][component.name] = component
        registry.owners[(stage, component.name)] = info.name
        info.components.setdefault(stage, []).append(component.name)
    callers = registry.pm.get_hookcallers(registry.pm.get_plugin(info.name)) or []
    info.hooks = sorted(caller.name for caller in callers)
    registry.plugins[info.name] = info


def _stager(stage: str, cls: type[Component], staged: list[tuple[str, Component]]) -> Callable[[Any], None]:
    def register(component: Any) -> None:
        if not isinstance(component, cls):
            raise PluginError(
                f"register_{stage} got {type(component).__name__}, expected trtkit.stages.{cls.__name__}"
            )
        if not isinstance(component.name, str) or not _NAME.match(component.name):
            raise PluginError(f"invalid {_SINGULAR[stage]} name {component.name!r} (use lowercase, digits, -_.)")
        staged.append((stage, component))

    return register


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _registry
    if _registry is None:
        _registry = load_plugins()
    return _registry


def set_registry(new: Registry | None) -> None:
    """Replace the process-wide registry (the CLI does this after applying --no-plugin)."""
    global _registry
    _registry = new
