"""The tuning stage as runs: one `SweepRun` per trial (under `results_dir/tune/<arm>/trialNN`), their validation
scores, and the choice written to `results_dir/tune/chosen.json`.

Trials are ordinary runs: the same markers, locks, `arm.json` identities, executors and `--status`, so the stage
is resumable and idempotent like the seeded runs. The choice is made only when every trial has ended (a failed
trial scores NaN and ranks last, so one diverging learning rate cannot block the stage); choosing among the
finished trials only would favour the arms whose trials happen to finish first.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from diffrl_bench.config import ConfigError, load_config
from diffrl_bench.fileio import atomic_write
from diffrl_bench.sweep.spec import Spec, SweepError, SweepRun, budget_overrides
from diffrl_bench.sweep.state import DONE, FAILED, status_of
from diffrl_bench.sweep.tune import Trial, expand_trials, select_best, trial_budget, trial_config

TUNE_DIR, CHOSEN_FILE = "tune", "chosen.json"
log = logging.getLogger(__name__)


def chosen_path(spec: Spec) -> Path:
    return spec.results_dir / TUNE_DIR / CHOSEN_FILE


def trials_of(spec: Spec) -> List[Trial]:
    return expand_trials(spec.tune, [a.name for a in spec.arms]) if spec.tune else []


def _train_source(spec: Spec, arm, values: Dict[str, Any]) -> str:
    from diffrl_bench.sweep.expansion import dotlist

    try:
        cfg = load_config(arm.config, dotlist(values))
    except ConfigError as error:
        raise SweepError(f"sweep spec {spec.path}: arm '{arm.name}' (config {arm.config}): {error}") from None
    return str(cfg.data.train_prompts)


def expand_tuning(spec: Spec) -> List[SweepRun]:
    """One run per trial of every arm (arm-major), or [] without a `tune:` section. Overrides in the order of
    `expand`'s: common, the trial's share of the budget, fairness, the arm's, then the trial's point, its prompt
    split (fit/val of the training prompts) and `train.seed = tune.seed`."""
    from diffrl_bench.sweep.expansion import dotlist

    if spec.tune is None:
        return []
    arms = {a.name: a for a in spec.arms}
    budget = budget_overrides(trial_budget(spec.tune, spec.budget))
    runs = []
    for trial in trials_of(spec):
        arm = arms[trial.arm]
        values: Dict[str, Any] = {}
        values.update(spec.common)
        values.update(budget)
        values.update(spec.fairness)
        values.update(arm.overrides)
        values.update(trial_config(spec.tune, trial, _train_source(spec, arm, values)))
        name = f"{arm.name}-tune{trial.index:02d}"
        out = spec.results_dir / TUNE_DIR / arm.name / f"trial{trial.index:02d}"
        values.update({"name": name, "output_dir": str(out), "checkpoint.resume": True})
        runs.append(SweepRun(name=name, arm=arm.name, seed=spec.tune.seed, grid={}, config=arm.config,
                             overrides=dotlist(values), shown=dotlist(trial.overrides), output_dir=str(out),
                             sweep=spec.name, trial=trial.index))
    return runs


def _eval_reward(run: SweepRun) -> Optional[str]:
    from omegaconf import OmegaConf

    path = run.out / "config.yaml"
    try:
        rewards = OmegaConf.load(path).eval.rewards if path.is_file() else None
    except Exception:  # an unreadable record only loses the default column; `tune.metric` still works
        return None
    return str(rewards[0]) if rewards else None


def final_scores(runs: Sequence[SweepRun], metric: Optional[str] = None) -> Tuple[Dict[str, float], str]:
    """Each trial's score at its last eval by run id (NaN for a trial not DONE or without the column), and the
    column: `metric`, else the report's headline rule for the training reward (`eval/<r>.strict.task_mean`, else
    `.task_mean`, else `eval/<r>`), the first form any trial has, so every trial is held to the same column."""
    import pandas as pd

    frames = {}
    for run in runs:
        path = run.out / "metrics.csv"
        frames[run.id] = pd.read_csv(path) if status_of(run) == DONE and path.is_file() else None
    column = metric
    if column is None:
        reward = next((r for r in (_eval_reward(run) for run in runs if frames[run.id] is not None) if r), None)
        forms = [f"eval/{reward}.strict.task_mean", f"eval/{reward}.task_mean", f"eval/{reward}"] if reward else []
        column = next((c for c in forms if any(f is not None and c in f for f in frames.values())), None)
    scores = {}
    for run in runs:
        frame = frames[run.id]
        values = frame[column].dropna() if frame is not None and column in frame else []
        scores[run.id] = float(values.iloc[-1]) if len(values) else math.nan
    return scores, column or "(no eval column)"


def stage_progress(runs: Sequence[SweepRun]) -> Tuple[int, int]:
    """(trials ended, trials): ended = DONE or FAILED."""
    return sum(status_of(r) in (DONE, FAILED) for r in runs), len(runs)


def choose(spec: Spec, runs: Sequence[SweepRun]) -> Optional[Dict[str, Any]]:
    """When every trial has ended: pick the best per arm, write chosen.json atomically and return its content;
    else None. `runs` must be the spec's whole stage (`expand_tuning`), not an `--only` subset."""
    done, total = stage_progress(runs)
    if done < total or not runs:
        return None
    scores, column = final_scores(runs, spec.tune.metric)
    trials = trials_of(spec)
    best = select_best(trials, {t.name: scores[t.name] for t in trials})
    # null, not NaN, for a trial without a score: chosen.json stays strict JSON.
    chosen = {"metric": column, "scores": {k: v if math.isfinite(v) else None for k, v in scores.items()},
              "arms": {arm: {"trial": t.index, "score": scores[t.name], "overrides": t.overrides}
                       for arm, t in best.items()}}
    atomic_write(chosen_path(spec), json.dumps(chosen, indent=2))
    return chosen


def load_chosen(spec: Spec) -> Optional[Dict[str, Any]]:
    """chosen.json when the stage has been decided, keeping only the arms whose recorded choice still fits the spec;
    None when there is no such arm (or no file).

    An arm added to the spec after the choice has none, and one whose values no longer match the space for the
    trial they name (the range changed) has a stale one: taking the file as it is would start such an arm's seeded
    runs with its untuned preset values, or with values no trial ran. Those arms are left out (`undecided_arms`
    names them): their trials run, and `choose` decides again once every trial has ended; the other arms' trials
    and scores are unchanged, so their choice, and the seeded runs already made with it, stay valid."""
    path = chosen_path(spec)
    if spec.tune is None or not path.is_file():
        return None
    try:
        chosen = json.loads(path.read_text())
        arms = chosen["arms"]
        points = {(t.arm, t.index): t.overrides for t in trials_of(spec)}
        valid = {arm: entry for arm, entry in arms.items()
                 if points.get((arm, entry["trial"])) == entry["overrides"]}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise SweepError(f"{path} is unreadable ({type(error).__name__}: {error}); delete it to choose again from "
                         "the trials") from None
    left_out = [a.name for a in spec.arms if a.name not in valid]
    if left_out:
        log.warning("tuning: %s has no choice that fits the spec for arm(s) %s (added, or their space changed); "
                    "their seeded runs wait until every trial has ended and the choice is made again",
                    path, ", ".join(left_out))
    return {**chosen, "arms": valid} if valid else None


def undecided_arms(spec: Spec, chosen: Optional[Dict[str, Any]]) -> List[str]:
    """The spec's arms without a choice yet (all of them before the stage ends; none without a `tune:` section)."""
    if spec.tune is None:
        return []
    decided = (chosen or {}).get("arms", {})
    return [a.name for a in spec.arms if a.name not in decided]


def chosen_overrides(chosen: Optional[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per arm, the config values its seeded runs take from the stage ({} before the choice)."""
    return {arm: dict(entry["overrides"]) for arm, entry in (chosen or {}).get("arms", {}).items()}
