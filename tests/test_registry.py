import sys
import types

import pytest

from diffrl_bench import registry


def test_third_party_plugins_register_through_entry_points(monkeypatch):
    """A package exposing a module under the `diffrl_bench.rewards` group is imported and its decorator runs."""
    module = types.ModuleType("thirdparty_reward_plugin")
    code = (
        "from diffrl_bench.registry import REWARDS\n"
        "@REWARDS.register('thirdparty_sharpness')\n"
        "class Sharpness:\n"
        "    name = 'thirdparty_sharpness'\n"
        "    def __call__(self, images, prompts, metadata):\n"
        "        return {self.name: images.std(dim=(1, 2, 3))}\n"
    )
    monkeypatch.setitem(sys.modules, "thirdparty_reward_plugin", module)

    class EntryPoint:
        def load(self):
            exec(code, module.__dict__)
            return module

    groups = {}
    monkeypatch.setattr(registry, "entry_points", lambda group: groups.setdefault(group, [EntryPoint()] if group == "diffrl_bench.rewards" else []))
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry.REWARDS, "_items", dict(registry.REWARDS._items))
    assert "thirdparty_sharpness" in registry.REWARDS.names()
    assert "toy_geneval" in registry.REWARDS.names()  # built-ins still there
    assert set(groups) == {f"diffrl_bench.{g}" for g in ("algorithms", "rewards", "samplers", "models")}


def test_unknown_name_lists_what_is_registered():
    with pytest.raises(KeyError, match="nft"):
        registry.ALGORITHMS.get("no_such_algorithm")


def test_registering_two_things_under_one_name_is_an_error(monkeypatch):
    monkeypatch.setattr(registry.SAMPLERS, "_items", dict(registry.SAMPLERS._items))
    with pytest.raises(ValueError, match="euler"):
        registry.SAMPLERS.register("euler")(lambda *a, **k: None)
