"""Which logged column stands for an eval reward: one rule for the Trainer's log line and reward_vs_cost.png and for
the report (diffrl_bench/report/runs.py), so a run never shows one score while the report ranks it on another.

A reward's column is the first that exists of `eval/<r>.strict.task_mean` (GenEval's strict overall score),
`eval/<r>.task_mean` (the mean over prompt families, for tagged eval prompts) and `eval/<r>` (the plain mean, e.g.
PickScore or OCR on untagged prompts). The headline is the column of the first of `eval.rewards`.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

Has = Callable[[str], bool]


def metric_forms(reward: str) -> List[str]:
    """The candidate columns of `reward`, preferred first."""
    return [f"eval/{reward}.strict.task_mean", f"eval/{reward}.task_mean", f"eval/{reward}"]


def metric_column(reward: str, has: Has) -> Optional[str]:
    """The first of `metric_forms(reward)` for which `has(column)`, or None."""
    return next((column for column in metric_forms(reward) if has(column)), None)


def headline_column(eval_rewards: Sequence[str], has: Has) -> str:
    """The headline: the first eval reward's column; when it has none yet, its preferred form (a missing column
    then reads as nan in the log line)."""
    first = eval_rewards[0] if eval_rewards else "reward"
    return metric_column(first, has) or metric_forms(first)[0]


def frame_has(frame) -> Has:
    """`has` for a pandas frame: the column exists and holds at least one value."""
    return lambda column: column in frame and bool(frame[column].notna().any())
