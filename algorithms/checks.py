"""Option checks several plugins share, each written once: decay schedules, training-time distributions, and how
many training times the rollout grid can supply. They raise `OptionError`, which names the `algo.<field>`."""
from __future__ import annotations

from typing import Any

from diffrl_bench.algorithm import OptionError, require
from diffrl_bench.schedules import DECAY_PRESETS, decay_schedule
from diffrl_bench.timesteps import TIME_DISTRIBUTIONS

GRID_TIME_DISTRIBUTIONS = ("grid_subset", "stratified_grid", "grid_prefix", "stratified_index")
"""time distributions that draw from the rollout grid's non-zero points"""
DISTINCT_GRID_TIME_DISTRIBUTIONS = ("grid_subset", "stratified_grid", "grid_prefix")
"""grid time distributions that give a sample distinct points, so at most the grid's number of them
(`stratified_index` may repeat a point: CRD's 20 times on a 10-step grid)"""
TIME_DRAWS = ("micro_batch", "optimizer_step")
"""when forward-process times and noise are drawn: afresh for every training item, or once per optimizer step"""


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
    span = getattr(config, "time_index_range", None)
    if span is not None:
        require(config.time_distribution == "stratified_index", "time_index_range",
                f"applies to time_distribution stratified_index only, not {config.time_distribution!r}")
        span = list(span)
        require(len(span) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
                and 0 <= span[0] < span[1], "time_index_range",
                f"must be two grid indices [lo, hi] with 0 <= lo < hi, got {span}")
    if hasattr(config, "time_draw"):
        require(config.time_draw in TIME_DRAWS, "time_draw", f"{config.time_draw!r} is not one of {TIME_DRAWS}")


def check_training_times(config: Any, run: Any) -> None:
    """Load-time check: grid time distributions draw from the rollout grid's non-zero points, so they cannot give a
    sample more times than the grid has."""
    steps = run.rollout.sampler.num_steps
    span = getattr(config, "time_index_range", None)
    require(span is None or span[1] <= steps, "time_index_range",
            f"{list(span or [])} reaches past the {steps} non-zero points of the rollout grid "
            f"(rollout.sampler.num_steps): hi must be at most {steps}")
    require(config.time_distribution not in DISTINCT_GRID_TIME_DISTRIBUTIONS or config.num_train_times <= steps,
            "num_train_times", f"{config.num_train_times} times per sample from {config.time_distribution} exceeds "
                               f"the {steps} non-zero points of the rollout grid (rollout.sampler.num_steps); lower "
                               f"it or use uniform / logit_normal")
