"""Option checks several plugins share, each written once: decay schedules, training-time distributions, and how
many training times the rollout grid can supply. They raise `OptionError`, which names the `algo.<field>`."""
from __future__ import annotations

from typing import Any

from diffrl_bench.algorithm import OptionError, require
from diffrl_bench.schedules import DECAY_PRESETS, decay_schedule
from diffrl_bench.timesteps import TIME_DISTRIBUTIONS

GRID_TIME_DISTRIBUTIONS = ("grid_subset", "stratified_grid", "grid_prefix")
"""time distributions that draw from the rollout grid's non-zero points"""


def check_decays(config: Any, *fields: str) -> None:
    """Each named field holds a decay schedule (a preset name, a "start-value-slope-max" string or a dict)."""
    for key in fields:
        try:
            decay_schedule(getattr(config, key))
        except (ValueError, TypeError) as error:
            raise OptionError(key, f"{error} (presets: {sorted(DECAY_PRESETS)})") from None


def check_time_distribution(config: Any) -> None:
    """`time_distribution` is a known one and `num_train_times` (times per sample) is at least 1."""
    require(config.time_distribution in TIME_DISTRIBUTIONS, "time_distribution",
            f"{config.time_distribution!r} is not one of {TIME_DISTRIBUTIONS}")
    require(config.num_train_times >= 1, "num_train_times", f"must be at least 1, got {config.num_train_times}")


def check_training_times(config: Any, run: Any) -> None:
    """Load-time check: grid time distributions draw from the rollout grid's non-zero points, so they cannot give a
    sample more times than the grid has."""
    steps = run.rollout.sampler.num_steps
    require(config.time_distribution not in GRID_TIME_DISTRIBUTIONS or config.num_train_times <= steps,
            "num_train_times", f"{config.num_train_times} times per sample from {config.time_distribution} exceeds "
                               f"the {steps} non-zero points of the rollout grid (rollout.sampler.num_steps); lower "
                               f"it or use uniform / logit_normal")
