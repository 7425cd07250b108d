"""Head-to-head report over a results directory: `diffrl-bench report RESULTS_DIR`.

Every run directory under RESULTS_DIR (any folder holding a `metrics.csv`) is one seed of one arm. The report puts
the arms side by side on the same cost axes and answers "how much cheaper is X than the baseline to reach a given
score", with intervals over seeds:

- eval reward (and each held-out metric) vs cumulative GPU-hours, NFEs and optimizer steps: mean over seeds with a
  Student-t band (`aggregate_curves`);
- cost to first reach a threshold (`threshold_crossing`, linear interpolation between eval points) per arm with
  percentile-bootstrap intervals over seeds (`bootstrap_ci`), and speedups against a baseline arm
  (`speedup_ci`, seeds of each arm resampled independently);
- a per-phase cost breakdown (rollout, reward, train; eval shown but outside the budget);
- for an ablation (`--by KEY ...`, or the sweep spec's `ablate` keys found in RESULTS_DIR/sweep.json), the final
  score of every arm by its value of each ablated config key, and each value's mean over the arms that have it
  (`ablation_tables`), written to `ablation.csv`.

An arm counts as having reached the threshold only when every one of its seeds did (k/n is always reported):
averaging the cost over the seeds that happened to get there would make an unreliable arm look cheap.

Outputs (written atomically): `report.md`, `summary.csv` (one row per arm), `runs.csv` (one row per seed) and PNG
figures, by default in `RESULTS_DIR/report/`. See `docs/reports.md`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

log = logging.getLogger("diffrl_bench.report")

BUDGET_PHASES = ("rollout", "reward", "train")
# (column, axis label with unit, file/column stem); every run must have these columns.
AXES = (
    ("cost/gpu_hours", "GPU-hours (device-hours: world size x wall; rollout + reward + train)", "gpu_hours"),
    ("cost/nfe", "NFEs (network evaluations per sample; rollout + reward + train)", "nfe"),
    ("train/optimizer_steps", "optimizer steps", "optimizer_steps"),
)
# Costs to threshold are reported in these two units (the papers' units).
COST_UNITS = (("cost/gpu_hours", "gpu_hours", "GPU-hours"), ("cost/nfe", "nfe", "NFEs"))


class ReportError(ValueError):
    """A results directory that cannot be reported on; the message names the directory, column or arm."""


class NoRunsError(ReportError):
    """No run directory (a folder with `metrics.csv`) under the results directory."""


class MissingColumnError(ReportError):
    """A run lacks a column the report needs (the headline metric or a cost column)."""


class UnknownArmError(ReportError):
    """`--baseline` names an arm that is not in the results directory."""


# --------------------------------------------------------------------------------------------- pure statistics
def threshold_crossing(x: Sequence[float], y: Sequence[float], threshold: float) -> float:
    """Cost `x` at which the score `y` first reaches `threshold`, or NaN if it never does.

    The points are eval points in the order they were taken. Between the two eval points that bracket the first
    crossing the score is interpolated linearly; if the first point already reaches the threshold, its `x` is the
    answer. Points with a non-finite x or y are ignored. A run that reaches the threshold and later falls back
    still counts at its first crossing (the cost to get there once).
    """
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-d and of one length, got shapes {xs.shape} and {ys.shape}")
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    hits = np.flatnonzero(ys >= threshold)
    if hits.size == 0:
        return float("nan")
    i = int(hits[0])
    if i == 0:
        return float(xs[0])
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    # y0 < threshold <= y1, so y1 > y0 and the division is safe.
    return float(x0 + (threshold - y0) / (y1 - y0) * (x1 - x0))


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _apply_rowwise(statistic: Callable, samples: np.ndarray) -> np.ndarray:
    # Vectorised when the statistic takes `axis` (np.mean, np.median, ...): thousands of resamples stay cheap.
    try:
        out = np.asarray(statistic(samples, axis=1), dtype=float)
        if out.shape == (samples.shape[0],):
            return out
    except TypeError:
        pass
    return np.array([float(statistic(row)) for row in samples])


def bootstrap_ci(values: Sequence[float], statistic: Callable = np.mean, n_boot: int = 2000, level: float = 0.95,
                 rng=None) -> Tuple[float, float]:
    """Percentile-bootstrap interval of `statistic` over `values` (one value per seed).

    Resamples the values with replacement `n_boot` times and returns the (1 - level)/2 and (1 + level)/2
    quantiles of the statistic. Returns (NaN, NaN) for fewer than two values (one seed has no spread to resample)
    or when a value is not finite. `rng` is a numpy Generator or a seed.
    """
    data = np.asarray(values, dtype=float).ravel()
    if data.size < 2 or not np.all(np.isfinite(data)):
        return float("nan"), float("nan")
    gen = _as_rng(rng)
    samples = data[gen.integers(0, data.size, size=(int(n_boot), data.size))]
    stats = _apply_rowwise(statistic, samples)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def t_interval(values: Sequence[float], level: float = 0.95) -> Tuple[float, float]:
    """Student-t interval of the mean over seeds (n - 1 degrees of freedom); (NaN, NaN) below two seeds."""
    from scipy.stats import t as student_t

    data = np.asarray(values, dtype=float).ravel()
    if data.size < 2 or not np.all(np.isfinite(data)):
        return float("nan"), float("nan")
    half = student_t.ppf(0.5 + level / 2.0, data.size - 1) * data.std(ddof=1) / math.sqrt(data.size)
    mean = data.mean()
    return float(mean - half), float(mean + half)


def speedup_ci(baseline_costs: Sequence[float], arm_costs: Sequence[float], n_boot: int = 2000, level: float = 0.95,
               rng=None) -> Tuple[float, float, float]:
    """Speedup of an arm over the baseline: mean(baseline cost) / mean(arm cost), with a bootstrap interval.

    Returns (ratio, low, high); a ratio above 1 means the arm is cheaper. The interval resamples the seeds of each
    arm independently (they are independent runs) and takes percentiles of the resampled ratio. A cost that is
    NaN (a seed that never reached the threshold) makes everything NaN: the ratio is not defined. With fewer
    than two seeds on either side the ratio is returned with a NaN interval.
    """
    base = np.asarray(baseline_costs, dtype=float).ravel()
    arm = np.asarray(arm_costs, dtype=float).ravel()
    if base.size == 0 or arm.size == 0 or not (np.all(np.isfinite(base)) and np.all(np.isfinite(arm))):
        return float("nan"), float("nan"), float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.float64(base.mean()) / np.float64(arm.mean()))
        if base.size < 2 or arm.size < 2:
            return ratio, float("nan"), float("nan")
        gen = _as_rng(rng)
        base_means = base[gen.integers(0, base.size, size=(int(n_boot), base.size))].mean(axis=1)
        arm_means = arm[gen.integers(0, arm.size, size=(int(n_boot), arm.size))].mean(axis=1)
        ratios = base_means / arm_means
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(ratios, [alpha, 1.0 - alpha])
    return ratio, float(lo), float(hi)


@dataclass
class CurveBand:
    """Seeds of one arm on a common x grid: mean and a Student-t band (NaN band for a single seed)."""

    x: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n_seeds: int


def _dedupe_sorted(x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    # np.interp wants increasing x; of two evals at the same cost, the later one is the current score.
    last = np.r_[x[1:] != x[:-1], True]
    return x[last], y[last]


def aggregate_curves(xs: Sequence[Sequence[float]], ys: Sequence[Sequence[float]], n_points: int = 200,
                     level: float = 0.95) -> CurveBand:
    """Mean over seeds of piecewise-linear curves, with a Student-t confidence band of the mean.

    Each seed's eval points (x, y) are interpolated linearly onto one grid spanning the x range that every seed
    covers (from the largest first x to the smallest last x), so no seed is extrapolated. The band at each grid
    point is mean +- t_{(1+level)/2, n-1} * sd / sqrt(n) over the n seeds.
    """
    from scipy.stats import t as student_t

    curves = [_dedupe_sorted(np.asarray(x, dtype=float), np.asarray(y, dtype=float)) for x, y in zip(xs, ys)]
    curves = [c for c in curves if c[0].size]
    if not curves:
        empty = np.array([])
        return CurveBand(empty, empty, empty, empty, 0)
    start = max(c[0][0] for c in curves)
    stop = min(c[0][-1] for c in curves)
    grid = np.array([start]) if stop <= start else np.linspace(start, stop, int(n_points))
    table = np.stack([np.interp(grid, cx, cy) for cx, cy in curves])
    n = table.shape[0]
    mean = table.mean(axis=0)
    if n < 2:
        nan = np.full_like(mean, np.nan)
        return CurveBand(grid, mean, nan, nan.copy(), n)
    half = student_t.ppf(0.5 + level / 2.0, n - 1) * table.std(axis=0, ddof=1) / math.sqrt(n)
    return CurveBand(grid, mean, mean - half, mean + half, n)


def phase_breakdown(frame: pd.DataFrame) -> Dict[str, float]:
    """Device-hours per phase (rollout, reward, train, eval) from the last row of a run's metrics table.

    Cost columns are cumulative, so the last row holds the run's totals; a phase column that is missing gives
    NaN. Eval is returned too but is not part of the budget.
    """
    out = {}
    for phase in BUDGET_PHASES + ("eval",):
        column = f"cost/{phase}_device_s"
        if column in frame and frame[column].notna().any():
            out[phase] = float(frame[column].ffill().iloc[-1]) / 3600.0
        else:
            out[phase] = float("nan")
    return out


# --------------------------------------------------------------------------------------------------- loading
@dataclass
class Run:
    """One seed of one arm: its directory, its metrics table (sorted by step) and its eval rewards."""

    arm: str
    seed: int
    path: Path
    frame: pd.DataFrame
    eval_rewards: List[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    """the run's config.yaml as written (empty when there is none)"""

    def eval_points(self, column: str) -> pd.DataFrame:
        """Eval rows (where `column` has a value) with the cost axes, in step order."""
        rows = self.frame[self.frame[column].notna()]
        return rows[["step", column] + [axis for axis, _, _ in AXES]]


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


def load_runs(results_dir) -> List[Run]:
    """Every run under `results_dir` (recursively: each folder with a `metrics.csv`), sorted by arm and seed.

    The arm and seed come from `arm.json` when present, else from config.yaml: `name` without a trailing
    `_seed<N>`, and `train.seed`. Raises `NoRunsError` if there is none and `ReportError` if two runs claim the
    same arm and seed.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise NoRunsError(f"results directory {root} does not exist")
    runs: List[Run] = []
    seen: Dict[Tuple[str, int], Path] = {}
    for metrics in sorted(root.rglob("metrics.csv")):
        directory = metrics.parent
        config_path = directory / "config.yaml"
        config = _read_config(config_path) if config_path.exists() else {}
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
        runs.append(Run(arm, seed, directory, _prepare_frame(frame, directory), rewards, config))
    if not runs:
        raise NoRunsError(f"no runs under {root}: no folder there holds a metrics.csv")
    runs.sort(key=lambda r: (r.arm, r.seed))
    return runs


def _metric_for(reward: str, runs: Sequence[Run]) -> Optional[str]:
    # The first form that some run has wins; every run is then held to that same column, because mixing the
    # strict and partial-credit forms across arms would compare different scores.
    for column in (f"eval/{reward}.strict.task_mean", f"eval/{reward}.task_mean", f"eval/{reward}"):
        if any(column in r.frame and r.frame[column].notna().any() for r in runs):
            return column
    return None


def resolve_metrics(runs: Sequence[Run], metric: Optional[str] = None) -> Tuple[str, List[str], List[str]]:
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
        headline = _metric_for(firsts[0], runs) or f"eval/{firsts[0]}.strict.task_mean"
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


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _is_flow_grpo(name: str) -> bool:
    return "flowgrpo" in _norm(name)


def default_baseline(arms: Sequence[str]) -> str:
    """The arm named like Flow-GRPO (`flow_grpo`, `Flow-GRPO`, `flow_grpo_fast`...; the shortest such name, so
    plain Flow-GRPO wins over its variants), else the first arm alphabetically."""
    matches = sorted((a for a in arms if _is_flow_grpo(a)), key=lambda a: (len(_norm(a)), a))
    return matches[0] if matches else sorted(arms)[0]


# -------------------------------------------------------------------------------------------------- analysis
def _rng_for(seed: int, *names: str) -> np.random.Generator:
    # One stream per arm (and per arm pair): adding or renaming another arm leaves these intervals unchanged.
    return np.random.default_rng([int(seed)] + [zlib.crc32(n.encode()) for n in names])


@dataclass
class Analysis:
    """Everything the report shows, before any file is written."""

    results_dir: Path
    runs: List[Run]
    arms: List[str]
    headline: str
    heldout: List[str]
    notes: List[str]
    baseline: str
    baseline_reason: str
    threshold: float
    threshold_reason: str
    level: float
    n_boot: int
    summary: pd.DataFrame
    per_run: pd.DataFrame
    sentences: List[str]
    ablate: List[str] = field(default_factory=list)
    ablation: Optional[pd.DataFrame] = None
    ablation_effects: Optional[pd.DataFrame] = None


def _fmt_ratio(value: float) -> str:
    return f"{value:.0f}" if value >= 9.95 else f"{value:.1f}"


def _fmt_threshold(value: float) -> str:
    return f"{value:.3g}"


def _fmt_num(value: float, unit: str) -> str:
    if not np.isfinite(value):
        return "n/a"
    if unit == "nfe":
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _ratio_phrase(ratio: float, lo: float, hi: float) -> str:
    """'3.1x (2.4 to 4.0) cheaper' or, below 1, the inverse '2.0x (1.5 to 2.6) more expensive'."""
    word = "cheaper"
    if ratio < 1.0:
        # "0.5x cheaper" reads badly; the inverse ratio and the inverted (and swapped) interval say the same.
        with np.errstate(divide="ignore"):
            ratio, lo, hi = 1.0 / ratio, 1.0 / np.float64(hi), 1.0 / np.float64(lo)
        word = "more expensive"
    interval = f" ({_fmt_ratio(lo)} to {_fmt_ratio(hi)})" if np.isfinite(lo) and np.isfinite(hi) else ""
    return f"{_fmt_ratio(ratio)}x{interval} {word}"


def speedup_sentence(arm: str, baseline: str, threshold: float, row: dict, base_row: dict) -> str:
    """The head-to-head sentence for one arm, e.g. 'X is 3.1x (2.4 to 4.0) cheaper than Flow-GRPO to reach 0.8
    in GPU-hours, and 2.9x (2.2 to 3.8) cheaper in NFEs.', or the 'not reached' wording."""
    thr = _fmt_threshold(threshold)
    arm_reached = bool(row["reached"])
    base_reached = bool(base_row["reached"])
    if not arm_reached and not base_reached:
        return (f"Neither {arm} ({row['seeds_reached']}/{row['seeds']} seeds) nor {baseline} "
                f"({base_row['seeds_reached']}/{base_row['seeds']} seeds) reached {thr} in every seed: not reached.")
    if not arm_reached:
        return (f"{arm}: not reached ({row['seeds_reached']}/{row['seeds']} seeds reached {thr}); {baseline} reached "
                f"it at {_fmt_num(base_row['cost_gpu_hours_mean'], 'gpu_hours')} GPU-hours.")
    if not base_reached:
        return (f"{arm} reached {thr} at {_fmt_num(row['cost_gpu_hours_mean'], 'gpu_hours')} GPU-hours; "
                f"{baseline}: not reached ({base_row['seeds_reached']}/{base_row['seeds']} seeds), so no ratio.")
    if row["cost_gpu_hours_mean"] == 0:
        return f"{arm} already reaches {thr} before any training (first eval), so no ratio against {baseline}."

    def phrase(stem: str) -> str:
        return _ratio_phrase(row[f"speedup_{stem}"], row[f"speedup_{stem}_ci_low"], row[f"speedup_{stem}_ci_high"])

    sentence = f"{arm} is {phrase('gpu_hours')} than {baseline} to reach {thr} in GPU-hours"
    if np.isfinite(row["speedup_nfe"]) and row["cost_nfe_mean"] > 0:
        sentence += f", and {phrase('nfe')} in NFEs"
    lo, hi = row["speedup_gpu_hours_ci_low"], row["speedup_gpu_hours_ci_high"]
    if np.isfinite(lo) and lo <= 1.0 <= hi:
        sentence += " (the GPU-hours interval includes 1: no clear difference)"
    return sentence + "."


_MISSING = object()


def config_value(config: dict, key: str):
    """The value at a dotted `key` of a nested config dict, or `_MISSING`."""
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def sweep_ablate_keys(results_dir) -> List[str]:
    """The `ablate` keys of the sweep spec(s) recorded in `results_dir/sweep.json` (none if there is no such file)."""
    path = Path(results_dir) / "sweep.json"
    if not path.exists():
        return []
    try:
        sweeps = json.loads(path.read_text()).get("sweeps", {})
    except (ValueError, AttributeError) as error:
        raise ReportError(f"cannot read {path}: {error}") from error
    keys: List[str] = []
    for entry in sweeps.values():
        for key in (entry.get("spec") or {}).get("ablate") or []:
            if key not in keys:
                keys.append(key)
    return keys


def ablation_tables(runs: Sequence[Run], per_run: pd.DataFrame,
                    keys: Sequence[str]) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """(by arm, by value) tables of an ablation over the config `keys`.

    Only arms whose run configs set every key take part (reference arms of other methods drop out). By arm: each
    arm's value of every key, its seeds, and its mean final score and held-out scores. By value: for each key and
    each of its values, the mean, min and max of the arm means over the arms with that value: a main effect, read
    across all the other axes. Raises `ReportError` if one arm's seeds disagree on a key's value."""
    values: Dict[str, Dict[str, object]] = {}
    for run in runs:
        found = {key: config_value(run.config, key) for key in keys}
        if any(value is _MISSING for value in found.values()):
            continue
        found = {key: json.dumps(v) if isinstance(v, (dict, list)) else str(v) for key, v in found.items()}
        if run.arm in values and values[run.arm] != found:
            raise ReportError(f"arm {run.arm!r}: its seeds differ in {keys} ({values[run.arm]} vs {found} in "
                              f"{run.path}); an ablation row must be one setting")
        values[run.arm] = found
    columns = ["final_reward"] + [c for c in per_run.columns if c.startswith("final_heldout:")]
    rows = []
    for arm, found in values.items():
        mine = per_run[per_run["arm"] == arm]
        rows.append({"arm": arm, **found, "seeds": len(mine), **{c: float(mine[c].mean()) for c in columns}})
    by_arm = pd.DataFrame(rows, columns=["arm", *keys, "seeds", *columns])
    effects = []
    for key in keys:
        for value, group in by_arm.groupby(key, sort=True):
            effects.append({"key": key, "value": value, "arms": len(group),
                            "mean_final_reward": float(group["final_reward"].mean()),
                            "min_final_reward": float(group["final_reward"].min()),
                            "max_final_reward": float(group["final_reward"].max())})
    by_value = pd.DataFrame(effects, columns=["key", "value", "arms", "mean_final_reward", "min_final_reward",
                                              "max_final_reward"])
    return by_arm, by_value


def analyse(results_dir, *, baseline: Optional[str] = None, threshold: Optional[float] = None,
            threshold_fraction: float = 0.9, metric: Optional[str] = None, n_boot: int = 2000, seed: int = 0,
            level: float = 0.95, ablate: Optional[Sequence[str]] = None) -> Analysis:
    """Load the runs under `results_dir` and compute the summary table, per-run table and sentences; with
    `ablate` config keys (default: the sweep spec's `ablate` list in `results_dir/sweep.json`; [] for none), also
    the ablation tables."""
    if not 0.0 < level < 1.0:
        raise ReportError(f"the confidence level must lie between 0 and 1, got {level}")
    if int(n_boot) < 1:
        raise ReportError(f"the number of bootstrap resamples must be positive, got {n_boot}")
    if threshold is None and not threshold_fraction > 0:
        raise ReportError(f"the threshold fraction must be positive, got {threshold_fraction}")
    runs = load_runs(results_dir)
    headline, heldout, notes = resolve_metrics(runs, metric)
    arms = sorted({r.arm for r in runs})
    if baseline is None:
        baseline = default_baseline(arms)
        baseline_reason = ("default: the arm named like Flow-GRPO" if _is_flow_grpo(baseline)
                           else "default: no arm named like Flow-GRPO, so the first arm alphabetically")
    else:
        if baseline not in arms:
            raise UnknownArmError(f"baseline arm {baseline!r} is not in {results_dir}; arms there: {arms}")
        baseline_reason = "given with --baseline"
    # Baseline first, then the rest alphabetically: the order of every table and legend.
    arms = [baseline] + [a for a in arms if a != baseline]

    per_run_rows = []
    for run in runs:
        points = run.eval_points(headline)
        last = points.iloc[-1]
        row = {"arm": run.arm, "seed": run.seed, "run_dir": str(run.path), "final_step": int(last["step"]),
               "final_reward": float(last[headline]),
               "budget_gpu_hours": float(run.frame["cost/gpu_hours"].iloc[-1]),
               "budget_nfe": float(run.frame["cost/nfe"].iloc[-1])}
        for column in heldout:
            held = run.frame[column].dropna()
            row[f"final_heldout:{column.removeprefix('eval/')}"] = float(held.iloc[-1])
        for phase, hours in phase_breakdown(run.frame).items():
            row[f"{phase}_gpu_hours"] = hours
        per_run_rows.append(row)
    per_run = pd.DataFrame(per_run_rows)

    final_means = per_run.groupby("arm")["final_reward"].mean()
    if threshold is None:
        best_arm = final_means.idxmax()
        best = float(final_means.max())
        if not best > 0:
            raise ReportError(f"the best mean final {headline} is {best:.4g} (arm {best_arm!r}); a fraction of it "
                              "is no threshold, pass --threshold")
        # Rounded so that the threshold the report states is exactly the one used.
        threshold = float(f"{threshold_fraction * best:.3g}")
        threshold_reason = (f"default: {threshold_fraction:g} x the best arm's mean final reward "
                            f"({best:.4g}, {best_arm}), rounded to 3 significant digits")
    else:
        threshold = float(threshold)
        threshold_reason = "given with --threshold"

    for unit_col, stem, _ in COST_UNITS:
        costs = []
        for run in runs:
            points = run.eval_points(headline)
            costs.append(threshold_crossing(points[unit_col], points[headline], threshold))
        per_run[f"cost_{stem}_to_threshold"] = costs
    per_run["reached"] = np.isfinite(per_run["cost_gpu_hours_to_threshold"])

    rows = []
    for arm in arms:
        mine = per_run[per_run["arm"] == arm]
        finals = mine["final_reward"].to_numpy()
        lo, hi = t_interval(finals, level)
        n, k = len(mine), int(mine["reached"].sum())
        row = {"arm": arm, "seeds": n, "seed_ids": " ".join(str(s) for s in mine["seed"]), "metric": headline,
               "final_reward_mean": float(finals.mean()), "final_reward_ci_low": lo, "final_reward_ci_high": hi,
               "threshold": threshold, "seeds_reached": k, "reached": k == n}
        for _, stem, _ in COST_UNITS:
            values = mine[f"cost_{stem}_to_threshold"].to_numpy()
            if k == n:
                c_lo, c_hi = bootstrap_ci(values, np.mean, n_boot, level, _rng_for(seed, arm, stem))
                row.update({f"cost_{stem}_mean": float(values.mean()), f"cost_{stem}_ci_low": c_lo,
                            f"cost_{stem}_ci_high": c_hi})
            else:
                row.update({f"cost_{stem}_mean": float("nan"), f"cost_{stem}_ci_low": float("nan"),
                            f"cost_{stem}_ci_high": float("nan")})
        row["baseline"] = baseline
        base = per_run[per_run["arm"] == baseline]
        for _, stem, _ in COST_UNITS:
            if arm == baseline:
                # Resampling the baseline against itself would invent an interval around an identity.
                ratio, s_lo, s_hi = (1.0 if k == n else float("nan")), float("nan"), float("nan")
            else:
                ratio, s_lo, s_hi = speedup_ci(base[f"cost_{stem}_to_threshold"], mine[f"cost_{stem}_to_threshold"],
                                               n_boot, level, _rng_for(seed, baseline, arm, stem))
            row.update({f"speedup_{stem}": ratio, f"speedup_{stem}_ci_low": s_lo, f"speedup_{stem}_ci_high": s_hi})
        row["budget_gpu_hours_mean"] = float(mine["budget_gpu_hours"].mean())
        row["budget_nfe_mean"] = float(mine["budget_nfe"].mean())
        for phase in BUDGET_PHASES + ("eval",):
            row[f"{phase}_gpu_hours"] = float(mine[f"{phase}_gpu_hours"].mean())
        for column in heldout:
            key = f"final_heldout:{column.removeprefix('eval/')}"
            row[key] = float(mine[key].mean())
        rows.append(row)
    summary = pd.DataFrame(rows)

    records = {r["arm"]: r for r in rows}
    sentences = [speedup_sentence(arm, baseline, threshold, records[arm], records[baseline])
                 for arm in arms if arm != baseline]
    if len(arms) == 1:
        sentences.append(f"Only one arm ({baseline}); nothing to compare it with.")
    keys = list(sweep_ablate_keys(results_dir) if ablate is None else ablate)
    by_arm = by_value = None
    if keys:
        by_arm, by_value = ablation_tables(runs, per_run, keys)
        if by_arm.empty:
            raise ReportError(f"no run under {results_dir} sets every ablated key {keys} in its config.yaml")
    return Analysis(Path(results_dir), runs, arms, headline, heldout, notes, baseline, baseline_reason, threshold,
                    threshold_reason, level, int(n_boot), summary, per_run, sentences, keys, by_arm, by_value)


# --------------------------------------------------------------------------------------------------- figures
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    # A reader (or a crash) never sees a half-written file: write beside it, then rename over it. A plain open()
    # rather than mkstemp keeps the umask's permissions (mkstemp files are owner-only).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_figure(fig, path: Path) -> Path:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _atomic_write_bytes(path, buffer.getvalue())
    return path


def _new_figure(ncols: int, width: float = 5.2, height: float = 4.0):
    # A bare Figure renders through Agg without pyplot: no global backend switch, no figure registry to leak.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _short(column: str) -> str:
    return column.removeprefix("eval/")


def plot_curves(analysis: Analysis, axis: Tuple[str, str, str], path: Path) -> Path:
    """Headline and held-out metrics vs one cost axis: per arm the mean over seeds, its t-band, thin seed lines."""
    column, label, _ = axis
    metrics = [analysis.headline] + analysis.heldout
    fig, axes = _new_figure(len(metrics))
    pct = f"{analysis.level * 100:g}%"
    for ax, metric in zip(axes, metrics):
        for i, arm in enumerate(analysis.arms):
            color = f"C{i % 10}"
            seeds = [r for r in analysis.runs if r.arm == arm]
            xs, ys = [], []
            for run in seeds:
                points = run.eval_points(metric)
                xs.append(points[column].to_numpy())
                ys.append(points[metric].to_numpy())
                ax.plot(xs[-1], ys[-1], ".-", color=color, alpha=0.3, linewidth=0.8, markersize=4)
            band = aggregate_curves(xs, ys, level=analysis.level)
            ax.plot(band.x, band.mean, color=color, linewidth=2, label=f"{arm} (n={band.n_seeds})")
            if band.n_seeds > 1:
                ax.fill_between(band.x, band.lo, band.hi, color=color, alpha=0.2, linewidth=0)
        if metric == analysis.headline:
            ax.axhline(analysis.threshold, color="0.4", linestyle="--", linewidth=1,
                       label=f"threshold {_fmt_threshold(analysis.threshold)}")
            ax.set_title(f"{_short(metric)} (headline)", fontsize=10)
        else:
            ax.set_title(f"{_short(metric)} (held-out metric)", fontsize=10)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel(f"{_short(metric)} (score)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Eval score vs {label.split(' (')[0]}: mean over seeds, shaded {pct} Student-t band of the mean; "
                 "thin lines: single seeds", fontsize=10)
    return _save_figure(fig, path)


def plot_cost_to_threshold(analysis: Analysis, path: Path) -> Path:
    """Bars of mean cost to threshold per arm (GPU-hours, NFEs) with bootstrap whiskers; 'not reached k/n'."""
    fig, axes = _new_figure(len(COST_UNITS), width=5.2, height=0.6 * len(analysis.arms) + 1.8)
    table = analysis.summary.set_index("arm")
    pct = f"{analysis.level * 100:g}%"
    for ax, (_, stem, unit) in zip(axes, COST_UNITS):
        positions = np.arange(len(analysis.arms))[::-1]
        for pos, (i, arm) in zip(positions, enumerate(analysis.arms)):
            row = table.loc[arm]
            if row["reached"]:
                mean = row[f"cost_{stem}_mean"]
                lo, hi = row[f"cost_{stem}_ci_low"], row[f"cost_{stem}_ci_high"]
                err = None
                if np.isfinite(lo):
                    err = [[mean - lo], [hi - mean]]
                ax.barh(pos, mean, xerr=err, color=f"C{i % 10}", alpha=0.8, capsize=4)
            else:
                ax.text(0, pos, f" not reached ({row['seeds_reached']}/{row['seeds']} seeds)", va="center",
                        fontsize=8, color="0.3")
        ax.set_yticks(positions, analysis.arms)
        ax.set_ylim(-0.6, len(analysis.arms) - 0.4)
        ax.set_xlabel(f"{unit} to first reach {_fmt_threshold(analysis.threshold)}")
        ax.set_title(f"cost to threshold ({unit})", fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"Cost to reach {_short(analysis.headline)} >= {_fmt_threshold(analysis.threshold)}: mean over "
                 f"seeds, {pct} percentile-bootstrap interval", fontsize=10)
    return _save_figure(fig, path)


def plot_cost_breakdown(analysis: Analysis, path: Path) -> Path:
    """Stacked bars of mean device-hours per budget phase (rollout, reward, train) per arm."""
    fig, axes = _new_figure(1, width=7.5, height=0.6 * len(analysis.arms) + 1.8)
    ax = axes[0]
    table = analysis.summary.set_index("arm")
    positions = np.arange(len(analysis.arms))[::-1]
    left = np.zeros(len(analysis.arms))
    colors = {"rollout": "tab:blue", "reward": "tab:orange", "train": "tab:green"}
    for phase in BUDGET_PHASES:
        values = np.nan_to_num(np.array([table.loc[a, f"{phase}_gpu_hours"] for a in analysis.arms]))
        ax.barh(positions, values, left=left, color=colors[phase], label=phase)
        left += values
    ax.set_yticks(positions, analysis.arms)
    ax.set_xlabel("device-hours (GPU-hours), mean over seeds")
    ax.set_title("Budget per phase at the end of each run (eval excluded)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="x")
    return _save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------- report
def _ci_cell(mean: float, lo: float, hi: float, unit: str = "") -> str:
    if not np.isfinite(mean):
        return "n/a"
    if np.isfinite(lo) and np.isfinite(hi):
        return f"{_fmt_num(mean, unit)} ({_fmt_num(lo, unit)} to {_fmt_num(hi, unit)})"
    return _fmt_num(mean, unit)


def _markdown_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ablation_markdown(a: Analysis) -> List[str]:
    score = f"final {_short(a.headline)}"
    held = [c for c in a.ablation.columns if c.startswith("final_heldout:")]
    by_value = [[f"`{r['key']}`", str(r["value"]), str(r["arms"]), f"{r['mean_final_reward']:.3f}",
                 f"{r['min_final_reward']:.3f} to {r['max_final_reward']:.3f}"] for _, r in a.ablation_effects.iterrows()]
    ordered = a.ablation.sort_values("final_reward", ascending=False, kind="stable")
    by_arm = [[r["arm"], *[str(r[k]) for k in a.ablate], str(r["seeds"]), f"{r['final_reward']:.3f}",
               *[f"{r[c]:.3f}" for c in held]] for _, r in ordered.iterrows()]
    return ["## Ablation", "",
            f"Arms whose configs set every ablated key ({', '.join(f'`{k}`' for k in a.ablate)}); "
            f"{len(a.ablation)} of {len(a.arms)} arms. Each value's row averages the arm means over the arms with "
            "that value, so it reads across every setting of the other keys (a main effect).", "",
            _markdown_table(["key", "value", "arms", f"mean {score}", "range over those arms"], by_value), "",
            _markdown_table(["arm", *[f"`{k}`" for k in a.ablate], "seeds", score,
                             *[_short(c.removeprefix("final_heldout:")) for c in held]], by_arm), "",
            "Both tables, unrounded: [ablation.csv](ablation.csv).", ""]


def evaluated_weights(runs: List[Run]) -> str:
    """One sentence on which weights the arms' evaluations sampled: theta, or an EMA of it (`eval.ema_decay`)."""
    by_setting: Dict[str, List[str]] = {}
    for run in runs:
        decay = config_value(run.config, "eval.ema_decay")
        every = config_value(run.config, "eval.ema_every")
        if decay is _MISSING or not decay:  # written before the evaluation EMA existed, or with it off
            setting = "theta"
        else:
            setting = f"an EMA of the weights (decay {decay:g}, updated every {every if every is not _MISSING else 1}" \
                      f" optimizer step(s))"
        arms = by_setting.setdefault(setting, [])
        if run.arm not in arms:
            arms.append(run.arm)
    if len(by_setting) == 1:
        return f"Evaluated weights: {next(iter(by_setting))}, for every arm."
    parts = "; ".join(f"{setting} for {', '.join(arms)}" for setting, arms in by_setting.items())
    return f"**Evaluated weights differ between arms**, so their scores are not like for like: {parts}."


def render_markdown(analysis: Analysis, figures: Dict[str, str]) -> str:
    """The text of report.md: sentences, summary table, figures (relative links) and method notes."""
    a = analysis
    pct = f"{a.level * 100:g}%"
    thr = _fmt_threshold(a.threshold)
    out = [f"# Head-to-head report: {a.results_dir}", ""]
    out.append(f"{len(a.runs)} runs, {len(a.arms)} arm{'s' if len(a.arms) != 1 else ''}. Headline metric `{a.headline}`"
               + (f"; held-out metrics {', '.join(f'`{h}`' for h in a.heldout)}" if a.heldout else "") + ".")
    out.append(f"Threshold **{thr}** ({a.threshold_reason}). Baseline **{a.baseline}** ({a.baseline_reason}).")
    out.append(evaluated_weights(a.runs))
    out.append("")
    out += ["## Head to head", ""] + [f"- {s}" for s in a.sentences] + [""]

    header = ["arm", "seeds", f"final {_short(a.headline)} ({pct} CI)", f"reached {thr}",
              f"GPU-hours to {thr} ({pct} CI)", f"NFEs to {thr} ({pct} CI)",
              f"speedup vs {a.baseline}, GPU-hours", f"speedup vs {a.baseline}, NFEs"]
    rows = []
    for _, r in a.summary.iterrows():
        reached = f"{r['seeds_reached']}/{r['seeds']}" + ("" if r["reached"] else " (not reached)")
        cells = [r["arm"], str(r["seeds"]), _ci_cell(r["final_reward_mean"], r["final_reward_ci_low"],
                                                    r["final_reward_ci_high"]), reached]
        for _, stem, _ in COST_UNITS:
            cells.append(_ci_cell(r[f"cost_{stem}_mean"], r[f"cost_{stem}_ci_low"], r[f"cost_{stem}_ci_high"], stem)
                         if r["reached"] else "not reached")
        for _, stem, _ in COST_UNITS:
            if r["arm"] == a.baseline:
                cells.append("1 (baseline)" if r["reached"] else "not reached")
            elif np.isfinite(r[f"speedup_{stem}"]):
                ratio = r[f"speedup_{stem}"]
                lo, hi = r[f"speedup_{stem}_ci_low"], r[f"speedup_{stem}_ci_high"]
                cells.append(f"{ratio:.2f}x" + (f" ({lo:.2f} to {hi:.2f})" if np.isfinite(lo) else ""))
            else:
                cells.append("not reached")
        rows.append(cells)
    out += ["## Summary", "", _markdown_table(header, rows), "",
            "All columns, unrounded: [summary.csv](summary.csv); one row per seed: [runs.csv](runs.csv). "
            "A speedup above 1 means the arm is cheaper than the baseline.", ""]

    if a.ablation is not None:
        out += _ablation_markdown(a)
    out += ["## Eval score vs cost", ""]
    for column, label, stem in AXES:
        name = figures.get(f"curves_{stem}")
        if name:
            out += [f"![eval score vs {stem}]({name})", "",
                    f"*Eval score vs {label}. Thick line: mean over seeds (each seed interpolated linearly between "
                    f"its eval points onto a common grid over the range every seed covers); shaded: {pct} "
                    "Student-t interval of the mean; thin lines: single seeds. Held-out metrics in the other panels "
                    "on the same x axis: a headline that rises while a held-out metric falls is reward hacking.*",
                    ""]
    out += ["## Cost to threshold", "", f"![cost to threshold]({figures['cost_to_threshold']})", "",
            f"*Cost at which the headline first reaches {thr} (linear interpolation between the bracketing eval "
            f"points), mean over seeds with a {pct} percentile-bootstrap interval over seeds ({a.n_boot} "
            "resamples). An arm is reached only when all its seeds reached.*", ""]

    header = ["arm", "rollout h", "reward h", "train h", "budget h", "rollout %", "reward %", "train %",
              "eval h (not in budget)"]
    rows = []
    for _, r in a.summary.iterrows():
        parts = [r[f"{p}_gpu_hours"] for p in BUDGET_PHASES]
        total = float(np.nansum(parts))
        share = [f"{100 * p / total:.0f}%" if total > 0 and np.isfinite(p) else "n/a" for p in parts]
        rows.append([r["arm"]] + [_fmt_num(p, "h") for p in parts] + [_fmt_num(total, "h")] + share
                    + [_fmt_num(r["eval_gpu_hours"], "h")])
    out += ["## Cost per phase", "", _markdown_table(header, rows), "",
            f"![cost per phase]({figures['cost_breakdown']})", "",
            "*Device-hours per phase at the end of each run (cumulative `cost/<phase>_device_s` of the last row), "
            "mean over seeds. The budget is rollout + reward + train; eval is logged but kept out.*", ""]

    rows = []
    for _, r in a.per_run.iterrows():
        rows.append([r["arm"], str(r["seed"]), f"`{os.path.relpath(r['run_dir'], a.results_dir)}`",
                     str(r["final_step"]), f"{r['final_reward']:.4g}",
                     _fmt_num(r["cost_gpu_hours_to_threshold"], "h") if r["reached"] else "not reached",
                     _fmt_num(r["cost_nfe_to_threshold"], "nfe") if r["reached"] else "not reached",
                     _fmt_num(r["budget_gpu_hours"], "h")])
    out += ["## Runs", "", _markdown_table(["arm", "seed", "directory", "last eval step", "final score",
                                             f"GPU-hours to {thr}", f"NFEs to {thr}", "budget GPU-hours"], rows), ""]

    out += ["## Method", "",
            f"- Final score: the headline at each seed's last eval; mean and {pct} Student-t interval over seeds "
            "(n - 1 degrees of freedom; none for a single seed).",
            f"- Cost to threshold: per seed, the first crossing of {thr}, interpolated linearly in cost between the "
            "two eval points that bracket it (the first eval's cost if it already reaches it). Interval: percentile "
            f"bootstrap of the mean over seeds ({a.n_boot} resamples). With few seeds this interval is narrow and "
            "reads as the spread of the seeds (with 3 seeds it is close to their range), not as a guaranteed "
            f"{pct} coverage.",
            "- Reached: an arm counts as reached only if every seed reached; otherwise it is reported as not reached "
            "with k/n. Seeds that never got there have an unknown (censored) cost, and averaging over the seeds that "
            "did would make an unreliable arm look cheap.",
            "- Speedup: mean baseline cost / mean arm cost; interval by resampling the seeds of each arm "
            "independently and taking percentiles of the ratio.",
            "- Bootstrap resamples use a fixed seed per arm (and per arm pair), so the numbers are reproducible and "
            "adding an arm does not change the others'."]
    if a.notes:
        out += [""] + [f"- Note: {n}" for n in a.notes]
    return "\n".join(out) + "\n"


def write_report(results_dir, out_dir=None, *, baseline: Optional[str] = None, threshold: Optional[float] = None,
                 threshold_fraction: float = 0.9, metric: Optional[str] = None, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> Path:
    """Analyse `results_dir` and write report.md, summary.csv, runs.csv and PNG figures; returns report.md's path.

    `out_dir` defaults to `results_dir/report`. See `analyse` for the options; raises a `ReportError` (a
    ValueError) naming the directory, column or arm when the results cannot be reported on.
    """
    analysis = analyse(results_dir, baseline=baseline, threshold=threshold, threshold_fraction=threshold_fraction,
                       metric=metric, n_boot=n_boot, seed=seed, level=level)
    return write_analysis(analysis, out_dir)


def write_analysis(analysis: Analysis, out_dir=None) -> Path:
    """Write the files of an `analyse` result to `out_dir` (default `results_dir/report`); returns report.md."""
    out = Path(out_dir) if out_dir is not None else analysis.results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    for axis in AXES:
        name = f"reward_vs_{axis[2]}.png"
        plot_curves(analysis, axis, out / name)
        figures[f"curves_{axis[2]}"] = name
    plot_cost_to_threshold(analysis, out / "cost_to_threshold.png")
    figures["cost_to_threshold"] = "cost_to_threshold.png"
    plot_cost_breakdown(analysis, out / "cost_breakdown.png")
    figures["cost_breakdown"] = "cost_breakdown.png"
    _atomic_write_bytes(out / "summary.csv", analysis.summary.to_csv(index=False).encode())
    _atomic_write_bytes(out / "runs.csv", analysis.per_run.to_csv(index=False).encode())
    if analysis.ablation is not None:
        # One file: the by-value rows (key, value, ...) after the by-arm rows, so either reads with a filter.
        table = pd.concat([analysis.ablation.assign(table="by_arm"), analysis.ablation_effects.assign(table="by_value")],
                          ignore_index=True)
        _atomic_write_bytes(out / "ablation.csv", table.to_csv(index=False).encode())
    report = out / "report.md"
    _atomic_write_bytes(report, render_markdown(analysis, figures).encode())
    return report


# -------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the report options to `parser` (the standalone parser or a `diffrl-bench` subcommand)."""
    parser.add_argument("results_dir", metavar="RESULTS_DIR",
                        help="folder scanned recursively for run folders (each with metrics.csv)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RESULTS_DIR/report)")
    parser.add_argument("--baseline", default=None, metavar="ARM",
                        help="arm the speedups are measured against (default: the arm named like flow_grpo, "
                             "else the first arm alphabetically)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, default=None,
                       help="score to reach (default: --threshold-fraction x the best arm's mean final score)")
    group.add_argument("--threshold-fraction", type=float, default=0.9,
                       help="fraction of the best arm's mean final score used as the default threshold (0.9)")
    parser.add_argument("--metric", default=None, metavar="COLUMN",
                        help="headline eval column (default: eval/<first eval reward>.strict.task_mean, else "
                             ".task_mean, else the plain column)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (2000)")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level of every interval (0.95)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (0)")
    parser.add_argument("--by", nargs="*", default=None, metavar="KEY",
                        help="ablation: tabulate the final score by these config keys (default: the sweep spec's "
                             "`ablate` keys from RESULTS_DIR/sweep.json; --by with no key: no ablation table)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the report for parsed arguments; prints where it went and the head-to-head sentences.

    Returns 0, or 2 after printing the error when the results cannot be reported on.
    """
    try:
        analysis = analyse(args.results_dir, baseline=args.baseline, threshold=args.threshold,
                           threshold_fraction=args.threshold_fraction, metric=args.metric, n_boot=args.n_boot,
                           seed=args.seed, level=args.level, ablate=args.by)
        report = write_analysis(analysis, args.out)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    print(f"threshold {_fmt_threshold(analysis.threshold)} on {analysis.headline}, baseline {analysis.baseline}")
    for sentence in analysis.sentences:
        print(f"- {sentence}")
    if analysis.ablation_effects is not None:
        print("ablation (mean final score over the arms with each value):")
        for _, r in analysis.ablation_effects.iterrows():
            print(f"  {r['key']} = {r['value']}: {r['mean_final_reward']:.3f} over {r['arms']} arms")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """`diffrl-bench report` as a standalone program (also `python -m diffrl_bench.report`)."""
    parser = argparse.ArgumentParser(prog="diffrl-bench report", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
