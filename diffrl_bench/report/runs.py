"""Loading runs: every run folder under a results directory as a `RunResult` (arm, seed, metrics, config), and
the eval columns the report reads from them."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from diffrl_bench.headline import frame_has, metric_column, metric_forms
from diffrl_bench.ledger import PHASES
from diffrl_bench.recomputation import Recomputation, compare, is_eval, read_table, reference_table
from diffrl_bench.report.errors import MissingColumnError, NoRunsError, ReportError

# (column, axis label with unit, file/column stem); every run must have these columns.
AXES = (
    ("cost/gpu_hours", "GPU-hours (device-hours: world size x wall; rollout + reward + train)", "gpu_hours"),
    ("cost/nfe", "NFEs (network evaluations per sample; rollout + reward + train)", "nfe"),
    ("train/optimizer_steps", "optimizer steps", "optimizer_steps"),
)
# Axes drawn when every run has the column: runs logged before the ledger counted FLOPs have none.
OPTIONAL_AXES = (
    ("cost/flops", "model FLOPs (forward 1x, backward 2x: diffrl_bench/flops.py; rollout + reward + train)", "flops"),
)
# Costs to threshold are reported in these two units (the papers' units).
COST_UNITS = (("cost/gpu_hours", "gpu_hours", "GPU-hours"), ("cost/nfe", "nfe", "NFEs"))


@dataclass
class RunResult:
    """One seed of one arm: its directory, its metrics table (sorted by step) and its eval rewards."""

    arm: str
    seed: int
    path: Path
    frame: pd.DataFrame
    eval_rewards: List[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    """the run's config.yaml as written (empty when there is none)"""
    recomputed: Optional[Recomputation] = None
    """for a run that restarted from step 0 over a set-aside table: how its rows compare with that table"""

    def eval_points(self, column: str) -> pd.DataFrame:
        """Eval rows (where `column` has a value) with the cost axes, in step order."""
        rows = self.frame[self.frame[column].notna()]
        axes = [axis for axis, _, _ in AXES + OPTIONAL_AXES if axis in self.frame]
        return rows[["step", column] + axes]


def cost_axes(runs: Sequence[RunResult]) -> tuple:
    """The axes the curves are drawn against: `AXES`, and each of `OPTIONAL_AXES` that every run has."""
    return AXES + tuple(axis for axis in OPTIONAL_AXES if all(axis[0] in run.frame for run in runs))


_SEED_SUFFIX = re.compile(r"_seed(\d+)$")


def _read_config(path: Path) -> dict:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except Exception as error:  # noqa: BLE001 - any parse failure is reported with the file's name
        raise ReportError(f"cannot read {path}: {error}") from error


def _run_identity(directory: Path, config: dict) -> Tuple[str, int]:
    arm_file = directory / "arm.json"
    if arm_file.exists():
        try:
            info = json.loads(arm_file.read_text())
            return str(info["arm"]), int(info["seed"])
        except (ValueError, KeyError, TypeError) as error:
            raise ReportError(f"{arm_file}: expected {{\"arm\": str, \"seed\": int}}: {error}") from error
    name = str(config.get("name") or directory.name)
    arm = _SEED_SUFFIX.sub("", name)
    seed = (config.get("train") or {}).get("seed")
    if seed is None:
        match = _SEED_SUFFIX.search(name)
        if match is None:
            raise ReportError(f"{directory}: no arm.json and no train.seed in config.yaml; cannot tell its seed")
        seed = match.group(1)
    return arm, int(seed)


def _is_tuning_trial(directory: Path) -> bool:
    # A sweep's tuning trials (arm.json `"stage": "tune"`) ran on a validation split at a fraction of the budget:
    # counted as seeds they would mix two experiments into one arm.
    try:
        return json.loads((directory / "arm.json").read_text()).get("stage") == "tune"
    except (OSError, ValueError, AttributeError):
        return False


def _prepare_frame(frame: pd.DataFrame, directory: Path) -> pd.DataFrame:
    if "step" not in frame:
        raise MissingColumnError(f"{directory / 'metrics.csv'} has no 'step' column")
    frame = frame.sort_values("step", kind="stable").reset_index(drop=True)
    for column, _, _ in AXES:
        if column not in frame:
            raise MissingColumnError(f"run {directory} has no column {column!r} in metrics.csv")
    # The step-0 eval row precedes any optimizer step, so its NaN count means 0; cost columns are cumulative, so
    # a gap carries the previous total forward.
    cumulative = [c for c in frame.columns if c.startswith("cost/")] + ["train/optimizer_steps"]
    frame[cumulative] = frame[cumulative].ffill().fillna(0.0)
    return frame


def _recomputation(frame: pd.DataFrame, directory: Path) -> Tuple[pd.DataFrame, Optional[Recomputation]]:
    """A run that restarted from step 0 over a set-aside table (recomputation.py): the comparison, and the frame
    with the evaluations that the recomputation skipped read from that table at the steps it reproduced bit for bit
    (the same weights, evaluated the same way: at least one evaluation both hold agrees). Evaluations the run
    made itself are never replaced."""
    table = reference_table(directory)
    if table is None:
        return frame, None
    result = compare(table, read_table(directory / "metrics.csv"))
    if not result.evals_matched or "step" not in frame:
        return frame, result
    before = read_table(table)
    skipped = [{"step": step, **{k: v for k, v in row.items() if is_eval(k)}}
               for step, row in before.items() if step <= result.equal_through]
    skipped = pd.DataFrame([row for row in skipped if len(row) > 1])
    if skipped.empty:
        return frame, result
    own = frame.set_index("step")
    skipped = skipped.set_index("step")
    skipped = skipped[skipped.index.isin(own.index)]
    evaluated = own.filter(regex=r"^eval/").notna().any(axis=1)
    skipped = skipped[~skipped.index.isin(own.index[evaluated])]
    merged = own.combine_first(skipped)[list(own.columns) + [c for c in skipped.columns if c not in own.columns]]
    return merged.reset_index(), result


def load_runs(results_dir) -> List[RunResult]:
    """Every run under `results_dir` (recursively: each folder with a `metrics.csv`), sorted by arm and seed.

    A sweep's tuning trials (`"stage": "tune"` in arm.json) are skipped. The arm and seed come from `arm.json` when
    present, else from config.yaml: `name` without a trailing
    `_seed<N>`, and `train.seed`. Raises `NoRunsError` if there is none and `ReportError` if two runs claim the
    same arm and seed.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise NoRunsError(f"results directory {root} does not exist")
    runs: List[RunResult] = []
    seen: Dict[Tuple[str, int], Path] = {}
    for metrics in sorted(root.rglob("metrics.csv")):
        directory = metrics.parent
        config_path = directory / "config.yaml"
        config = _read_config(config_path) if config_path.exists() else {}
        if _is_tuning_trial(directory):
            continue
        arm, seed = _run_identity(directory, config)
        if (arm, seed) in seen:
            raise ReportError(f"runs {seen[(arm, seed)]} and {directory} are both arm {arm!r} seed {seed}; "
                              "a seed counted twice would shrink the intervals")
        seen[(arm, seed)] = directory
        try:
            frame = pd.read_csv(metrics)
        except (ValueError, OSError) as error:
            raise ReportError(f"cannot read {metrics}: {error}") from error
        rewards = list((config.get("eval") or {}).get("rewards") or [])
        frame, recomputed = _recomputation(frame, directory)
        runs.append(RunResult(arm, seed, directory, _prepare_frame(frame, directory), rewards, config, recomputed))
    if not runs:
        raise NoRunsError(f"no runs under {root}: no folder there holds a metrics.csv")
    runs.sort(key=lambda r: (r.arm, r.seed))
    return runs


def cut_at_budget(run: RunResult, column: str, budget: float) -> RunResult:
    """The run as it stood when it first spent `budget` in `column` (every row up to the step of the first that
    reaches it, so the evaluation at that step stays; the whole run when none does): an extended run read at the
    sweep's common budget."""
    import dataclasses

    values = run.frame[column].to_numpy(dtype=float) if column in run.frame else None
    if values is None:
        raise MissingColumnError(f"run {run.path} has no column {column!r} to cut it at the common budget")
    reached = np.flatnonzero(values >= budget)
    if not len(reached):
        return run
    last = run.frame["step"].iloc[reached[0]]
    return dataclasses.replace(run, frame=run.frame[run.frame["step"] <= last].copy())


def short_of_budget(runs: Sequence[RunResult], column: str, budget: float) -> List[Tuple[RunResult, float]]:
    """(run, what it spent) of every run that spent less than `budget` in `column`: runs of an `extend:`
    that has not run yet (or stopped early), whose seeds are censored at their own last evaluation instead."""
    spent = [(run, float(run.frame[column].max())) for run in runs]   # cut_at_budget has checked the column
    return [(run, cost) for run, cost in spent if not cost >= budget]


def _metric_for(reward: str, runs: Sequence[RunResult]) -> Optional[str]:
    # The first form that some run has wins (diffrl_bench/headline.py, the Trainer's rule too); every run is then
    # held to that same column, because mixing the strict and partial-credit forms across arms would compare
    # different scores.
    return metric_column(reward, lambda column: any(frame_has(r.frame)(column) for r in runs))


def resolve_metrics(runs: Sequence[RunResult], metric: Optional[str] = None) -> Tuple[str, List[str], List[str]]:
    """The headline column, the held-out columns every run has, and notes on held-out metrics left out.

    Default headline: for the training reward (first of `eval.rewards`) the first of
    `eval/<r>.strict.task_mean`, `eval/<r>.task_mean`, `eval/<r>` that exists; held-out metrics likewise for
    the other eval rewards. `metric` overrides the headline (with or without the `eval/` prefix). Raises
    `MissingColumnError` naming the run and column when a run lacks the headline.
    """
    notes: List[str] = []
    firsts = sorted({r.eval_rewards[0] for r in runs if r.eval_rewards})
    if metric is not None:
        headline = metric
        if not any(metric in r.frame for r in runs) and any(f"eval/{metric}" in r.frame for r in runs):
            headline = f"eval/{metric}"
    else:
        if not firsts:
            raise ReportError("no run's config.yaml lists eval.rewards; pass --metric COLUMN")
        if len(firsts) > 1:
            raise ReportError(f"runs are evaluated on different first rewards {firsts}; pass --metric COLUMN")
        headline = _metric_for(firsts[0], runs) or metric_forms(firsts[0])[0]
    for run in runs:
        if headline not in run.frame or not run.frame[headline].notna().any():
            raise MissingColumnError(f"run {run.path} has no values in headline column {headline!r}")
    heldout: List[str] = []
    others: List[str] = []
    for run in runs:
        for reward in run.eval_rewards[1:]:
            if reward not in others:
                others.append(reward)
    for reward in others:
        column = _metric_for(reward, runs)
        if column is None or column == headline:
            continue
        lacking = [str(r.path) for r in runs if column not in r.frame or not r.frame[column].notna().any()]
        if lacking:
            notes.append(f"held-out metric {column} left out: missing in {', '.join(lacking)}")
        else:
            heldout.append(column)
    return headline, heldout, notes


# A config key that is absent (None is a value a config may hold).
MISSING = object()


def config_value(config: dict, key: str):
    """The value at a dotted `key` of a nested config dict, or `MISSING`."""
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def phase_breakdown(frame: pd.DataFrame) -> Dict[str, float]:
    """Device-hours per phase (rollout, reward, train, eval) from the last row of a run's metrics table.

    Cost columns are cumulative, so the last row holds the run's totals; a phase column that is missing gives
    NaN. Eval is returned too but is not part of the budget.
    """
    out = {}
    for phase in PHASES:
        column = f"cost/{phase}_device_s"
        if column in frame and frame[column].notna().any():
            out[phase] = float(frame[column].ffill().iloc[-1]) / 3600.0
        else:
            out[phase] = float("nan")
    return out
