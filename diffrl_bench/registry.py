"""Name -> component registries, with third-party plugins discovered through entry points.

A plugin registers itself with a decorator (`@ALGORITHMS.register("nft")`). The built-in plugins live in the
`algorithms/` and `rewards/` folders of the repository (installed as `diffrl_bench.algorithms` and
`diffrl_bench.rewards`); third-party packages expose a module under the entry-point groups
`diffrl_bench.algorithms`, `diffrl_bench.rewards`, `diffrl_bench.samplers` or `diffrl_bench.models`, and importing
that module runs its decorators.

A plugin that fails to import, or registers a name another plugin already holds, must not take every command down
with it (not even `list`): its failure is recorded with the plugin's name and the error, whatever it registered
before failing is withdrawn, the other plugins load, and the error is raised only when one of its names is asked
for (`Registry.get`). `broken_plugins()` lists the failures, e.g. for `diffrl-bench list`.
"""
from __future__ import annotations

import importlib
import pkgutil
import threading
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Dict, Generic, List, Optional, Tuple, TypeVar

T = TypeVar("T")

_BUILTIN_PACKAGES = {
    "algorithms": ("diffrl_bench.algorithms",),
    "rewards": ("diffrl_bench.rewards",),
    "samplers": ("diffrl_bench.sampling", "diffrl_bench.sde", "diffrl_bench.diffusers_sampler"),
    "models": ("diffrl_bench.toy.model", "diffrl_bench.backends"),
}


class PluginError(LookupError):
    """A name was asked for whose plugin failed to load, or that two plugins register."""

    def __str__(self) -> str:  # LookupError would quote the message like a KeyError's key otherwise
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that failed to load: `plugin` names it (module or entry point), `error` says why."""

    group: str
    plugin: str
    error: str
    names: Tuple[str, ...] = ()
    """the names it would have provided, as far as known (an entry point's name, the module's last part, a clash)"""

    def describe(self) -> str:
        return f"{self.plugin} (group diffrl_bench.{self.group}): {self.error}"


class NameClash(ValueError):
    """Two plugins register one name (a ValueError, as before)."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


def _origin(obj) -> str:
    module = getattr(obj, "__module__", None) or "?"
    return f"{module}.{getattr(obj, '__qualname__', type(obj).__name__)}"


class Registry(Generic[T]):
    """A mapping from names to factories, filled by the `register` decorator."""

    def __init__(self, kind: str, group: Optional[str] = None):
        self.kind = kind
        self.group = group
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise NameClash(f"{self.kind} {name!r} is registered twice: by {_origin(self._items[name])} and by "
                                f"{_origin(obj)}", name)
            self._items[name] = obj
            return obj

        return decorator

    def _broken_for(self, name: str) -> List[BrokenPlugin]:
        return [b for b in _broken if b.group == self.group and name in b.names]

    def get(self, name: str) -> T:
        load_plugins()
        broken = self._broken_for(name)
        if broken:
            # A clash leaves the first registration in place, but which one the user meant is unknown.
            raise PluginError(f"{self.kind} {name!r} is unavailable: plugin " +
                              "; plugin ".join(b.describe() for b in broken))
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "none"
            failed = [b for b in _broken if b.group == self.group]
            note = ("; plugins that failed to load (one may provide it): " + "; ".join(b.describe() for b in failed)
                    if failed else "")
            raise KeyError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {known}{note}")
        return self._items[name]

    def names(self) -> List[str]:
        """The names that `get` returns (a name claimed by a broken or clashing plugin is left out)."""
        load_plugins()
        return sorted(name for name in self._items if not self._broken_for(name))

    def __contains__(self, name: str) -> bool:
        """True also for a name of a broken plugin, so that `get` is reached and explains the failure."""
        load_plugins()
        return name in self._items or bool(self._broken_for(name))


ALGORITHMS: Registry = Registry("algorithm", "algorithms")
REWARDS: Registry = Registry("reward", "rewards")
SAMPLERS: Registry = Registry("sampler", "samplers")
MODELS: Registry = Registry("model backend", "models")
_REGISTRIES = (ALGORITHMS, REWARDS, SAMPLERS, MODELS)

_loaded = False
_loading_thread: Optional[int] = None
_lock = threading.RLock()
_broken: List[BrokenPlugin] = []


def broken_plugins() -> List[BrokenPlugin]:
    """The plugins that failed to load (after loading them all once), in load order."""
    load_plugins()
    return list(_broken)


def _try_load(group: str, plugin: str, module: Optional[str], names: Tuple[str, ...],
              load: Callable[[], object]) -> None:
    """Run one plugin's import; on failure withdraw what it registered and record it under its name.

    Withdrawn are the names the failed module itself registered (Python drops a module whose import raised from
    sys.modules); a sibling module it imported successfully stays imported, so its names stay too."""
    import sys

    before = [set(registry._items) for registry in _REGISTRIES]
    try:
        load()
    except Exception as error:  # noqa: BLE001 - any failure of third-party code is recorded, never fatal here
        for registry, names_before in zip(_REGISTRIES, before):
            for name in set(registry._items) - names_before:
                owner = getattr(registry._items[name], "__module__", None)
                if owner == module or owner not in sys.modules:
                    del registry._items[name]
        if isinstance(error, NameClash):
            names = (*names, error.name)
        _broken.append(BrokenPlugin(group, plugin, f"{type(error).__name__}: {error}", names))


def _entry_point_label(ep) -> str:
    dist = getattr(getattr(ep, "dist", None), "name", None)
    return (f"entry point {getattr(ep, 'name', '?')!r} = {getattr(ep, 'value', '?')!r}"
            + (f" of distribution {dist!r}" if dist else ""))


def load_plugins() -> None:
    """Import every built-in plugin module and every entry-point plugin, once, safely from several threads.

    The done flag is set only after the pass; a caller on another thread waits for it on the lock. A plugin that
    asks a registry for a name while being imported (same thread, lock held) sees what is registered so far."""
    global _loaded, _loading_thread
    if _loaded:
        return
    with _lock:
        if _loaded or _loading_thread == threading.get_ident():
            return
        _loading_thread = threading.get_ident()
        try:
            _broken.clear()
            for group, package_names in _BUILTIN_PACKAGES.items():
                for package_name in package_names:
                    # The built-in packages themselves are part of diffrl-bench: failing to import one is a bug.
                    package = importlib.import_module(package_name)
                    if hasattr(package, "__path__"):
                        for info in pkgutil.iter_modules(package.__path__):
                            if not info.name.startswith("_"):
                                module = f"{package_name}.{info.name}"
                                _try_load(group, f"module {module}", module, (info.name,),
                                          lambda m=module: importlib.import_module(m))
                for ep in entry_points(group=f"diffrl_bench.{group}"):
                    module = getattr(ep, "module", None) or str(getattr(ep, "value", "")).split(":")[0] or None
                    names = (ep.name,) if getattr(ep, "name", None) else ()
                    _try_load(group, _entry_point_label(ep), module, names, ep.load)
            _loaded = True
        finally:
            _loading_thread = None
