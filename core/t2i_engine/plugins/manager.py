"""The engine's plugin manager: pluggy plus entry-point discovery, isolation and registries.

Plugins are found through the ``t2i_engine.plugins`` entry-point group. A plugin that fails to
import (or whose registration hook raises) is recorded with its error and skipped; the rest load
and jobs that do not need it still run, while a job that lists it in ``engine.plugins`` stops
with its error. Two plugins registering the same component name (or two distributions with the
same plugin name) are a clash: the name is withheld from the registry and recorded, so only jobs
that use it stop, naming both plugins; ``t2i-engine plugins`` reports it. The core's own
components register through the same hooks from :mod:`t2i_engine.builtins`.

Environment switches:

* ``T2I_DISABLE_PLUGIN_AUTOLOAD=1``: do not load entry points (only the built-ins and plugins
  registered by hand).
* ``T2I_TRACE_PLUGINS=1``: print every hook call, its implementations and results to stderr.
"""

from __future__ import annotations

import difflib
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any

import pluggy

from t2i_engine import hookspecs
from t2i_engine.errors import ConfigError, PluginError

CORE_PLUGIN_NAME = "core"

KNOWN_DISTRIBUTIONS: dict[str, str] = {
    "sd": "t2i-plugin-sd",
    "imagen": "t2i-plugin-imagen",
    "dreambooth": "t2i-plugin-dreambooth",
    "controlnet": "t2i-plugin-controlnet",
    "instructpix2pix": "t2i-plugin-instructpix2pix",
}
"""Plugin name -> the pip distribution this project publishes (or plans to) for it. Install hints
name only these: a guessed ``t2i-plugin-<name>`` could be anyone's package."""

KNOWN_COMPONENTS: dict[tuple[str, str], str] = {
    ("model", "stable-diffusion"): "sd",
    ("model", "imagen"): "imagen",
    ("model", "controlnet"): "controlnet",
    ("task", "edit"): "instructpix2pix",  # its model is [model] type = "stable-diffusion"
    ("task", "dreambooth"): "dreambooth",
}
"""(kind, component name) -> first-party plugin that registers it, for install hints."""


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def distribution_for(plugin: str) -> str | None:
    """The pip distribution this project publishes for ``plugin``, or None for any other name."""
    return KNOWN_DISTRIBUTIONS.get(plugin)


def install_hint(plugin: str) -> str:
    """``; install it with `pip install t2i-plugin-sd``` for first-party plugins, else a pointer
    to the plugin's own documentation (no guessed package names)."""
    dist = distribution_for(plugin)
    if dist is not None:
        return f"; install it with `pip install {dist}`"
    return "; install the distribution that provides it (see its documentation)"


def did_you_mean(name: str, candidates: Any) -> str:
    """`` (did you mean 'x'?)`` for the nearest candidate, or an empty string."""
    close = difflib.get_close_matches(name, [str(c) for c in candidates], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass
class PluginInfo:
    """What the manager knows of one plugin, loaded or not."""

    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    error: str | None = None  # one-line error when it failed to load
    traceback: str | None = None
    registers: dict[str, list[str]] = field(default_factory=dict)  # kind -> names

    @property
    def loaded(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Registration:
    """One registered component: its factory and the plugin that registered it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str


class EnginePluginManager:
    """pluggy's manager with the engine's discovery, error isolation and registries.

    Use :func:`get_plugin_manager` for the process-wide instance that the CLI uses, or build one
    (``EnginePluginManager(); pm.load()``) in tests.
    """

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.clashes: dict[tuple[str, str], list[str]] = {}  # (kind, name) -> the plugins
        self._registries: dict[str, dict[str, Registration]] | None = None
        self._loaded = False
        if _truthy("T2I_TRACE_PLUGINS"):
            self._enable_trace()

    # --- loading ------------------------------------------------------------------------

    @property
    def hook(self) -> Any:
        """The hook relay: ``pm.hook.on_train_step_end(step=..., metrics=...)``."""
        return self.pm.hook

    def load(self, *, autoload: bool | None = None) -> EnginePluginManager:
        """Register the built-ins and, unless disabled, every entry-point plugin. Idempotent."""
        if self._loaded:
            return self
        self._loaded = True
        from t2i_engine import builtins

        self.register(builtins, name=CORE_PLUGIN_NAME, distribution="t2i-engine")
        if autoload is None:
            autoload = not _truthy("T2I_DISABLE_PLUGIN_AUTOLOAD")
        if autoload:
            for ep in sorted(entry_points(group=hookspecs.ENTRY_POINT_GROUP), key=lambda e: e.name):
                self._load_entry_point(ep)
        return self

    def _load_entry_point(self, ep: EntryPoint) -> None:
        dist = ep.dist.name if ep.dist is not None else None
        version = ep.dist.version if ep.dist is not None else None
        if ep.name in self.plugins:  # two distributions, one plugin name: neither is used
            first = self.plugins[ep.name]
            first.error = (f"two installed distributions provide a plugin named '{ep.name}': "
                           f"{first.distribution} and {dist}; uninstall one of them")
            if self.pm.has_plugin(ep.name):
                self.pm.unregister(name=ep.name)
            print(f"t2i-engine: {first.error}", file=sys.stderr)
            self._registries = None
            return
        info = PluginInfo(name=ep.name, distribution=dist, version=version, module=ep.value)
        self.plugins[ep.name] = info
        try:
            module = ep.load()
        except Exception as exc:  # noqa: BLE001 - isolation is the point
            info.error = f"{type(exc).__name__}: {exc}"
            info.traceback = traceback.format_exc()
            print(f"t2i-engine: plugin '{ep.name}' ({dist}) failed to load: {info.error}",
                  file=sys.stderr)
            return
        self.pm.register(module, name=ep.name)
        self._registries = None

    def register(self, plugin: ModuleType | object, *, name: str,
                 distribution: str | None = None, version: str | None = None) -> None:
        """Register a plugin object or module by hand (tests, notebooks, embedding)."""
        if name in self.plugins:
            raise PluginError(f"a plugin named '{name}' is already registered")
        if version is None and distribution is not None:
            from importlib.metadata import PackageNotFoundError, version as dist_version

            try:
                version = dist_version(distribution)
            except PackageNotFoundError:
                version = None
        self.plugins[name] = PluginInfo(name=name, distribution=distribution, version=version,
                                        module=getattr(plugin, "__name__", type(plugin).__name__))
        self.pm.register(plugin, name=name)
        self._registries = None

    def require(self, names: list[str]) -> None:
        """Check that every plugin in ``names`` is installed, imported and registered its
        components without error, or raise ConfigError / PluginError naming it and the error."""
        self.registries()  # runs the registration hooks: a hook that raises marks its plugin
        for name in names:
            info = self.plugins.get(name)
            if info is None:
                known = [p for p in self.plugins if p != CORE_PLUGIN_NAME]
                raise ConfigError(
                    f"engine.plugins: plugin '{name}' is not installed{install_hint(name)}"
                    f"{did_you_mean(name, known)}"
                )
            if info.error is not None:
                raise PluginError(
                    f"engine.plugins: plugin '{name}' ({info.distribution}) is installed but "
                    f"failed to load: {info.error}"
                )

    # --- registries ---------------------------------------------------------------------

    def registries(self) -> dict[str, dict[str, Registration]]:
        """Every registry, ``kind -> name -> Registration``, built once from the hooks; without
        the components of plugins that failed in any hook, and without clashing names."""
        if self._registries is None:
            self.load()
            self.clashes = {}
            for info in self.plugins.values():
                info.registers = {}
            registries: dict[str, dict[str, Registration]] = {k: {} for k in hookspecs.REGISTRATION_HOOKS.values()}
            for hook_name, kind in hookspecs.REGISTRATION_HOOKS.items():
                self._collect(hook_name, kind, registries[kind])
            for registry in registries.values():  # a plugin that failed in a later hook: none of it
                for name in [n for n, r in registry.items() if self.plugins[r.plugin].error is not None]:
                    del registry[name]
            self._registries = registries
        return self._registries

    def _collect(self, hook_name: str, kind: str, into: dict[str, Registration]) -> None:
        for plugin_name, plugin in self.pm.list_name_plugin():
            info = self.plugins[plugin_name]
            if info.error is not None:
                continue
            others = [p for n, p in self.pm.list_name_plugin() if n != plugin_name]
            caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
            try:
                results = caller()
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the rest
                info.error = f"{hook_name} raised {type(exc).__name__}: {exc}"
                info.traceback = traceback.format_exc()
                print(f"t2i-engine: plugin '{plugin_name}' failed in {hook_name}: {exc}",
                      file=sys.stderr)
                continue
            for mapping in results:
                if mapping is None:
                    continue
                if not isinstance(mapping, Mapping):
                    info.error = (f"{hook_name} must return a mapping of name -> factory, got "
                                  f"{type(mapping).__name__}")
                    print(f"t2i-engine: plugin '{plugin_name}': {info.error}", file=sys.stderr)
                    break
                for name, factory in mapping.items():
                    self._add(into, Registration(kind=kind, name=name, factory=factory, plugin=plugin_name))

    def _add(self, into: dict[str, Registration], reg: Registration) -> None:
        """Register ``reg``, or record a clash: a name two plugins register is withheld."""
        self.plugins[reg.plugin].registers.setdefault(reg.kind, []).append(reg.name)
        key = (reg.kind, reg.name)
        if key in self.clashes:
            self.clashes[key].append(reg.plugin)
        elif reg.name in into:
            first = into.pop(reg.name).plugin
            self.clashes[key] = [first, reg.plugin]
        else:
            into[reg.name] = reg

    def problems(self) -> list[str]:
        """One line per plugin that failed to load and per name clash (empty when all is well)."""
        self.registries()
        lines = [f"plugin '{i.name}' ({i.distribution}) failed to load: {i.error}"
                 for i in self.plugins.values() if i.error is not None]
        lines += [f"{kind} '{name}' is registered by two plugins: "
                  + " and ".join(f"'{p}'" for p in plugins) for (kind, name), plugins in self.clashes.items()]
        return lines

    def clashes_of(self, plugin: str) -> list[str]:
        """``"task 'x' is also registered by 'other'"`` for each name ``plugin`` shares."""
        self.registries()
        return [f"{kind} '{name}' is also registered by " + ", ".join(f"'{p}'" for p in plugins if p != plugin)
                for (kind, name), plugins in self.clashes.items() if plugin in plugins]

    def registry(self, kind: str) -> dict[str, Registration]:
        """The registry of one component kind (``"sampler"``, ``"model"``, ...)."""
        return self.registries()[kind]

    def get(self, kind: str, name: str, *, key: str | None = None) -> Registration:
        """Look a component up by kind and name; a missing one is a ConfigError with a hint."""
        registry = self.registry(kind)
        if name in registry:
            return registry[name]
        where = f"{key}: " if key else ""
        if (kind, name) in self.clashes:
            plugins = " and ".join(f"'{p}'" for p in self.clashes[kind, name])
            raise PluginError(f"{where}{kind} '{name}' is registered by two plugins: {plugins}; "
                              "uninstall one of them (`t2i-engine plugins` lists what each registers)")
        provider = KNOWN_COMPONENTS.get((kind, name))
        if provider is not None and provider not in self.plugins:
            raise ConfigError(
                f"{where}{kind} '{name}' is provided by the plugin '{provider}', which is not "
                f"installed{install_hint(provider)}"
            )
        if provider is not None and self.plugins[provider].error:
            raise ConfigError(
                f"{where}{kind} '{name}' comes from plugin '{provider}', which failed to load: "
                f"{self.plugins[provider].error}"
            )
        available = ", ".join(sorted(registry)) or "none"
        broken = [f"'{i.name}' ({i.error})" for i in self.plugins.values() if i.error is not None]
        note = f"; plugins that failed to load, which may provide it: {', '.join(broken)}" if broken else ""
        raise ConfigError(
            f"{where}unknown {kind} '{name}'{did_you_mean(name, registry)}; available: {available}{note}"
        )

    def build(self, component: Any) -> Any:
        """Build a selected component (a :class:`~t2i_engine.config.schema.ComponentConfig`)."""
        factory = self.get(component.kind, component.name).factory
        if getattr(factory, "Config", None) is None:
            return factory()
        return factory(component.options)

    # --- tracing ------------------------------------------------------------------------

    def _enable_trace(self) -> None:
        def before(hook_name: str, impls: list[Any], kwargs: Mapping[str, Any]) -> None:
            names = ", ".join(impl.plugin_name for impl in impls)
            print(f"[t2i trace] {hook_name}({', '.join(kwargs)}) -> [{names}]", file=sys.stderr)

        def after(outcome: Any, hook_name: str, impls: list[Any], kwargs: Mapping[str, Any]) -> None:
            exc = outcome.exception
            status = f"raised {type(exc).__name__}" if exc else "ok"
            print(f"[t2i trace] {hook_name} {status}", file=sys.stderr)

        self.pm.add_hookcall_monitoring(before, after)


_MANAGER: EnginePluginManager | None = None


def get_plugin_manager() -> EnginePluginManager:
    """The process-wide plugin manager, loaded on first use."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = EnginePluginManager().load()
    return _MANAGER


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (tests use this after changing the environment)."""
    global _MANAGER
    _MANAGER = None
