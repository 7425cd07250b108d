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
    registry.load_plugins()  # the built-ins register once per process: into the real dict, not the test's copy

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


# ------------------------------------------------------------------------------------------ broken plugins, threads
class _FakeEntryPoint:
    """An installed entry point whose module is `code` (run on load under `module_name`)."""

    def __init__(self, name, module_name, code, monkeypatch):
        self.name, self.value, self.module = name, f"{module_name}:unused", module_name
        self._code, self._monkeypatch = code, monkeypatch

    def load(self):
        module = types.ModuleType(self.module)
        exec(self._code, module.__dict__)  # raises like a failing import would, before sys.modules holds it
        self._monkeypatch.setitem(sys.modules, self.module, module)
        return module


@pytest.fixture
def fresh_registries(monkeypatch):
    """Plugin loading runs again (with the entry points a test installs); every registry is restored afterwards."""
    installed = {}
    registry.load_plugins()  # the built-ins register once per process: into the real dicts, not the test's copies
    monkeypatch.setattr(registry, "entry_points", lambda group: installed.get(group, []))
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_broken", [])
    for reg in registry._REGISTRIES:
        monkeypatch.setattr(reg, "_items", dict(reg._items))

    def install(group, name, code):
        module_name = f"fake_plugin_{name}"
        installed.setdefault(f"diffrl_bench.{group}", []).append(_FakeEntryPoint(name, module_name, code, monkeypatch))

    return install


def _reward_code(name, tail=""):
    return ("from diffrl_bench.registry import REWARDS\n"
            f"@REWARDS.register({name!r})\n"
            "class R:\n"
            "    def __call__(self, images, prompts, metadata):\n"
            "        return {}\n" + tail)


def test_a_plugin_raising_on_import_is_named_only_when_asked_for(fresh_registries):
    fresh_registries("rewards", "flaky", _reward_code("flaky", "raise ImportError('no module named torchmetrics')\n"))
    fresh_registries("rewards", "good_one", _reward_code("good_one"))
    # Everything else still loads and lists: the broken plugin's half-registered name is withdrawn.
    assert "good_one" in registry.REWARDS.names() and "toy_geneval" in registry.REWARDS.names()
    assert "flaky" not in registry.REWARDS.names()
    assert registry.ALGORITHMS.get("nft") is not None
    [broken] = registry.broken_plugins()
    assert broken.plugin == "entry point 'flaky' = 'fake_plugin_flaky:unused'"
    assert broken.error == "ImportError: no module named torchmetrics"
    with pytest.raises(registry.PluginError) as info:
        registry.REWARDS.get("flaky")
    assert str(info.value) == ("reward 'flaky' is unavailable: plugin entry point 'flaky' = 'fake_plugin_flaky:unused' "
                               "(group diffrl_bench.rewards): ImportError: no module named torchmetrics")
    # A name nobody provides mentions the failed plugin, which may have been meant to.
    with pytest.raises(KeyError, match="plugins that failed to load .*'flaky'.*torchmetrics"):
        registry.REWARDS.get("no_such_reward")


def test_a_plugin_clashing_with_a_builtin_name_is_refused_by_name(fresh_registries):
    fresh_registries("rewards", "shadow", _reward_code("toy_geneval"))
    [broken] = registry.broken_plugins()
    assert broken.names == ("shadow", "toy_geneval")
    assert "reward 'toy_geneval' is registered twice: by diffrl_bench.rewards.toy_geneval.ToyGenEvalReward and by " \
           "fake_plugin_shadow.R" in broken.error
    # Which of the two the user meant is unknown: the name is refused rather than silently resolved.
    assert "toy_geneval" not in registry.REWARDS.names()
    with pytest.raises(registry.PluginError, match="reward 'toy_geneval' is unavailable: plugin entry point 'shadow'"):
        registry.REWARDS.get("toy_geneval")
    assert "toy_naturalness" in registry.REWARDS.names()


def test_a_broken_builtin_module_is_named(fresh_registries, monkeypatch, tmp_path):
    package = tmp_path / "fake_builtin_rewards"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "good.py").write_text(_reward_code("fake_good"))
    (package / "typo.py").write_text("def broken(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry._BUILTIN_PACKAGES, "rewards", ("diffrl_bench.rewards", "fake_builtin_rewards"))
    assert "fake_good" in registry.REWARDS.names()
    [broken] = registry.broken_plugins()
    assert broken.plugin == "module fake_builtin_rewards.typo" and broken.error.startswith("SyntaxError: ")
    with pytest.raises(registry.PluginError, match="module fake_builtin_rewards.typo .*SyntaxError"):
        registry.REWARDS.get("typo")
    for name in ("fake_builtin_rewards", "fake_builtin_rewards.good"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def test_concurrent_first_callers_all_see_every_plugin(fresh_registries):
    """The first callers on several threads at once: none may see a half-loaded registry."""
    import threading

    # A slow plugin widens the window in which the old code let other threads through with nothing loaded.
    fresh_registries("rewards", "slow_plugin", "import time\ntime.sleep(0.3)\n" + _reward_code("slow_plugin"))
    barrier = threading.Barrier(6)
    seen, errors = [], []

    def first_call():
        barrier.wait()
        try:
            seen.append(registry.REWARDS.get("slow_plugin"))
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=first_call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == [] and len(seen) == 6 and len({id(obj) for obj in seen}) == 1
