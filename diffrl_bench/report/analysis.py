"""The analysis behind a report: per-run and per-arm tables, threshold, baseline, speedups, sentences and
ablation tables, before any file is written."""
from __future__ import annotations

import json
import logging
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from diffrl_bench.ledger import PHASES
from diffrl_bench.report.completeness import (recorded_sweeps, spec_baseline, spec_extension, sweep_file,
                                              unfinished_runs)
from diffrl_bench.report.errors import ReportError, UnknownArmError
from diffrl_bench.report.runs import (COST_UNITS, MISSING, RunResult, config_value, cut_at_budget, load_runs,
                                     phase_breakdown, resolve_metrics, short_of_budget)
from diffrl_bench.report.stats import bootstrap_ci, speedup_ci, t_interval, threshold_crossing
from diffrl_bench.report.wording import speedup_sentence

log = logging.getLogger("diffrl_bench")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _is_flow_grpo(name: str) -> bool:
    return "flowgrpo" in _norm(name)


def default_baseline(arms: Sequence[str]) -> str:
    """The arm named like Flow-GRPO (`flow_grpo`, `Flow-GRPO`, `flow_grpo_fast`...; the shortest such name, so
    plain Flow-GRPO wins over its variants), else the first arm alphabetically."""
    matches = sorted((a for a in arms if _is_flow_grpo(a)), key=lambda a: (len(_norm(a)), a))
    return matches[0] if matches else sorted(arms)[0]


def _rng_for(seed: int, *names: str) -> np.random.Generator:
    # One stream per arm (and per arm pair): adding or renaming another arm leaves these intervals unchanged.
    return np.random.default_rng([int(seed)] + [zlib.crc32(n.encode()) for n in names])


@dataclass
class Analysis:
    """Everything the report shows, before any file is written."""

    results_dir: Path
    runs: List[RunResult]
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
    tuning: List[str] = field(default_factory=list)
    """report.md lines on the sweep's tuning stage (`tuning_lines`)"""
    full_runs: Optional[List[RunResult]] = None
    """under a sweep's `extend:`, the runs as they are (the extended arms' longer runs whole); `runs` then holds
    them cut at the common budget, which every table, final and held-out comparison reads. None otherwise."""


def sweep_ablate_keys(results_dir) -> List[str]:
    """The `ablate` keys of the sweep spec(s) recorded in `results_dir/sweep.json` (none if there is no such file)."""
    keys: List[str] = []
    for entry in recorded_sweeps(results_dir).values():
        for key in entry["spec"].get("ablate") or []:
            if key not in keys:
                keys.append(key)
    return keys


def tuning_lines(results_dir) -> List[str]:
    """report.md lines on the sweep's tuning stage (`tune:` in sweep.json, the choice in tune/chosen.json): the
    search budget, the space and the chosen values per arm; none without a tuning stage."""
    from diffrl_bench.sweep.tune import TuneError, Trial, expand_trials, parse_tune, report_lines

    lines: List[str] = []
    for name, entry in recorded_sweeps(results_dir).items():
        spec = entry["spec"]
        if not spec.get("tune"):
            continue
        arms = list(spec.get("arms") or {})
        try:
            tune = parse_tune(spec["tune"], arms)
        except TuneError as error:
            raise ReportError(f"{sweep_file(results_dir)}: sweep {name}: {error}") from error
        trials = expand_trials(tune, arms)
        chosen_file = Path(results_dir) / "tune" / "chosen.json"
        if not chosen_file.exists():
            lines += ["## Tuning", "", f"Sweep {name} declares a tuning stage ({tune.trials} trials per arm) but "
                      f"{chosen_file} does not exist yet: the stage has not finished.", ""]
            continue
        chosen = json.loads(chosen_file.read_text())
        scores = {k: float("nan") if v is None else float(v) for k, v in chosen.get("scores", {}).items()}
        by_name = {t.name: t for t in trials}
        best: Dict[str, Trial] = {arm: by_name[f"{arm}/trial{int(e['trial']):02d}"]
                                  for arm, e in chosen.get("arms", {}).items()}
        lines += report_lines(tune, spec.get("budget") or {}, [t for t in trials if t.arm in best], best, scores)
    return lines


def ablation_tables(runs: Sequence[RunResult], per_run: pd.DataFrame,
                    keys: Sequence[str]) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """(by arm, by value) tables of an ablation over the config `keys`.

    Only arms whose run configs set every key take part (reference arms of other methods drop out). By arm: each
    arm's value of every key, its seeds, and its mean final score and held-out scores. By value: for each key and
    each of its values, the mean, min and max of the arm means over the arms with that value: a main effect, read
    across all the other axes. Raises `ReportError` if one arm's seeds disagree on a key's value."""
    values: Dict[str, Dict[str, object]] = {}
    for run in runs:
        found = {key: config_value(run.config, key) for key in keys}
        if any(value is MISSING for value in found.values()):
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
    full_runs = None
    extension = spec_extension(results_dir)
    if extension is not None:
        full_runs = runs
        runs = [cut_at_budget(r, extension["column"], extension["budget"]) if r.arm in extension["arms"] else r
                for r in runs]
        notes.append(f"{', '.join(extension['arms'])} ran on to {extension['extended']:g} {extension['kind']} "
                     f"(`extend:`) so that their cost to the claims' thresholds is measured, not censored; every "
                     f"table, final score and held-out comparison here reads them at the common budget "
                     f"({extension['budget']:g} {extension['kind']}), the claims' crossing costs read the whole runs")
        short = short_of_budget([r for r in full_runs if r.arm in extension["arms"]], extension["column"],
                                extension["extended"])
        if short:
            listed = ", ".join(f"{r.arm} seed {r.seed} ({spent:.2g})" for r, spent in short)
            notes.append(f"{len(short)} extended run(s) stopped short of {extension['extended']:g} "
                         f"{extension['kind']} (not extended yet, or stopped early): {listed}; each such "
                         f"seed is censored at its own last evaluation")
    for run in full_runs or runs:
        if run.recomputed is not None:
            notes.append(f"{run.arm} seed {run.seed} restarted from step 0: it {run.recomputed.describe()}"
                         + (f"; the evaluations it skipped up to step {run.recomputed.equal_through} are read from "
                            f"that table" if run.recomputed.evals_matched else ""))
            if run.recomputed.difference is not None:
                log.warning("report: %s", notes[-1])
    arms = sorted({r.arm for r in runs})
    unfinished = unfinished_runs(results_dir)
    if unfinished:
        listed = "; ".join(f"{arm} ({directory})" for arm, directory in unfinished)
        notes.append(f"{len(unfinished)} run(s) not finished (no metrics.csv), left out: {listed}")
        log.warning("report: %s", notes[-1])
    named = spec_baseline(results_dir) if baseline is None else None
    if named is not None:
        if named not in arms:
            waiting = [str(d) for arm, d in unfinished if arm == named]
            raise ReportError(f"the sweep spec's baseline arm {named!r} has no finished run under {results_dir}"
                              + (f" (unfinished: {', '.join(waiting)})" if waiting else "")
                              + f"; finish the sweep, or pass --baseline ARM (finished arms: {arms})")
        baseline, baseline_reason = named, "the sweep spec's baseline"
    elif baseline is None:
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
        for phase in PHASES:
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
                    threshold_reason, level, int(n_boot), summary, per_run, sentences, keys, by_arm, by_value,
                    tuning_lines(results_dir), full_runs)
