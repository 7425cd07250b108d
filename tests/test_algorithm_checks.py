"""The option checks the plugins share (algorithms/checks.py) and how the harness reports them (the field path)."""
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from diffrl_bench.algorithm import OptionError, require
from diffrl_bench.algorithms.checks import check_decays, check_time_distribution, check_training_times
from diffrl_bench.config import CONFIG_DIR, ConfigError, load_config


@dataclass
class Options:
    old_decay: Any = "nft"
    sampler_decay: Any = "0-0.5-0.001-0.9"
    time_distribution: str = "grid_subset"
    num_train_times: int = 9


def run_with_steps(steps):
    return SimpleNamespace(rollout=SimpleNamespace(sampler=SimpleNamespace(num_steps=steps)))


def test_require_names_the_field():
    require(True, "kl_beta", "never raised")
    with pytest.raises(OptionError) as info:
        require(False, "kl_beta", "must be non-negative")
    assert info.value.key == "kl_beta" and info.value.reason == "must be non-negative"


def test_check_decays_accepts_presets_specs_and_names_the_bad_field():
    check_decays(Options(), "old_decay", "sampler_decay")
    with pytest.raises(OptionError) as info:
        check_decays(Options(sampler_decay="fastest"), "old_decay", "sampler_decay")
    assert info.value.key == "sampler_decay" and "presets" in info.value.reason and "nft" in info.value.reason


@pytest.mark.parametrize("change, key", [({"time_distribution": "gaussian"}, "time_distribution"),
                                         ({"num_train_times": 0}, "num_train_times")])
def test_check_time_distribution_rejects_each_field(change, key):
    check_time_distribution(Options())
    with pytest.raises(OptionError) as info:
        check_time_distribution(Options(**change))
    assert info.value.key == key


def test_check_training_times_bounds_grid_distributions_only():
    check_training_times(Options(num_train_times=10), run_with_steps(10))
    with pytest.raises(OptionError, match="11 times per sample from grid_subset exceeds the 10"):
        check_training_times(Options(num_train_times=11), run_with_steps(10))
    # uniform / logit_normal draw anywhere in (0, 1): any number of times fits
    check_training_times(Options(time_distribution="uniform", num_train_times=50), run_with_steps(10))


def test_stratified_index_may_repeat_points_but_its_span_must_fit_the_grid():
    fixed = Options(time_distribution="stratified_index", num_train_times=20)
    fixed.time_index_range = [0, 8]
    check_time_distribution(fixed)
    check_training_times(fixed, run_with_steps(10))  # 20 times on a 10-step grid: strata of width <= 1
    with pytest.raises(OptionError, match=r"\[0, 8\] reaches past the 6 non-zero points") as info:
        check_training_times(fixed, run_with_steps(6))
    assert info.value.key == "time_index_range"
    for distribution, span in (("grid_subset", [0, 8]), ("stratified_index", [4, 4]), ("stratified_index", [1])):
        bad = Options(time_distribution=distribution)
        bad.time_index_range = span
        with pytest.raises(OptionError) as info:
            check_time_distribution(bad)
        assert info.value.key == "time_index_range"


def test_time_draw_is_checked_where_a_plugin_has_it():
    draws = Options()
    draws.time_draw = "per_sample"
    with pytest.raises(OptionError, match="micro_batch") as info:
        check_time_distribution(draws)
    assert info.value.key == "time_draw"


@pytest.mark.parametrize("config, override, key", [
    ("toy_nft", "algo.time_distribution=gaussian", "algo.time_distribution"),
    ("toy_crd", "algo.sampler_decay=fastest", "algo.sampler_decay"),
    ("toy_awm", "algo.num_train_times=0", "algo.num_train_times"),
    ("toy_awm", "algo.time_draw=per_sample", "algo.time_draw"),
    ("toy_crd", "algo.time_index_range=[0,4]", "algo.time_index_range"),
    ("toy_crd", "algo.time_distribution=stratified_index algo.time_index_range=[0,12]", "algo.time_index_range"),
    ("toy_flow_grpo", "algo.clip_range=0", "algo.clip_range"),
    ("toy_elbo_pg", "algo.advantage=centered_x", "algo.advantage"),
])
def test_validate_errors_keep_the_field_path(config, override, key):
    with pytest.raises(ConfigError, match=f"bad config key '{key}': "):
        load_config(config, override.split())


TIME_DRAWING_CONFIGS = [path.stem for path in sorted(CONFIG_DIR.glob("toy_*.yaml"))
                        if "time_distribution" in load_config(path.stem).algo]


def test_the_forward_process_methods_are_all_checked_below():
    assert {load_config(name).algorithm for name in TIME_DRAWING_CONFIGS} >= {"nft", "awm", "crd", "elbo_pg", "rft"}


@pytest.mark.parametrize("config", TIME_DRAWING_CONFIGS)
def test_every_algorithm_drawing_times_from_the_grid_refuses_more_times_than_it_has_at_load(config):
    """Caught at load, naming the key, not by the first training step after a whole rollout (NFT once was)."""
    cfg = load_config(config)
    steps = cfg.rollout.sampler.num_steps
    overrides = ["algo.time_distribution=grid_subset", f"algo.num_train_times={steps + 1}"]
    if "time_index_range" in cfg.algo:
        overrides.append("algo.time_index_range=null")
    with pytest.raises(ConfigError, match=f"bad config key 'algo.num_train_times': {steps + 1} times per sample "
                                          f"from grid_subset exceeds the {steps} non-zero points"):
        load_config(config, overrides)
    load_config(config, overrides[:1] + [f"algo.num_train_times={steps}"] + overrides[2:])
