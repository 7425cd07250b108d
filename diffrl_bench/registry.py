"""Name -> component registries, with third-party plugins discovered through entry points.

A plugin registers itself with a decorator (`@ALGORITHMS.register("nft")`). The built-in plugins live in the
`algorithms/` and `rewards/` folders of the repository (installed as `diffrl_bench.algorithms` and
`diffrl_bench.rewards`); third-party packages expose a module under the entry-point groups
`diffrl_bench.algorithms`, `diffrl_bench.rewards`, `diffrl_bench.samplers` or `diffrl_bench.models`, and importing
that module runs its decorators.
"""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Callable, Dict, Generic, List, TypeVar

T = TypeVar("T")

_BUILTIN_PACKAGES = {
    "algorithms": ("diffrl_bench.algorithms",),
    "rewards": ("diffrl_bench.rewards",),
    "samplers": ("diffrl_bench.sampling", "diffrl_bench.sde"),
    "models": ("diffrl_bench.toy.model", "diffrl_bench.backends"),
}


class Registry(Generic[T]):
    """A mapping from names to factories, filled by the `register` decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        load_plugins()
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {known}")
        return self._items[name]

    def names(self) -> List[str]:
        load_plugins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._items


ALGORITHMS: Registry = Registry("algorithm")
REWARDS: Registry = Registry("reward")
SAMPLERS: Registry = Registry("sampler")
MODELS: Registry = Registry("model backend")

_loaded = False


def load_plugins() -> None:
    """Import every built-in plugin module and every entry-point plugin, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for group, package_names in _BUILTIN_PACKAGES.items():
        for package_name in package_names:
            package = importlib.import_module(package_name)
            if hasattr(package, "__path__"):
                for info in pkgutil.iter_modules(package.__path__):
                    if not info.name.startswith("_"):
                        importlib.import_module(f"{package_name}.{info.name}")
        for ep in entry_points(group=f"diffrl_bench.{group}"):
            ep.load()
