"""The equal-tuning-budget stage of a sweep: the `tune:` section, its trials, and the choice of the best per arm.

Every arm gets the same number of trials over the same declared search space, at the same fraction of the sweep's
budget, scored on a validation split of the *training* prompts (never the held-out prompts the report judges on);
the best trial's values go into the arm's seeded runs. This module is pure (no runs, no files): parsing the section,
expanding the trials, picking the best, and the report's lines. `sweep.tuning` runs the trials as sweep runs; the
prompt split itself lives in `prompts` (re-exported here).

```yaml
tune:
  trials: 8                  # per arm, the same for every arm
  seed: 0                    # the trial points and the trial runs' train.seed
  budget_fraction: 0.25      # each trial gets this fraction of the sweep budget
  validation: {fraction: 0.25, seed: 0}   # share of the training prompts that scores the trials
  sampler: lhs               # lhs (Latin hypercube, the default) or grid (every `values` combination)
  space:
    optim.lr: {log_uniform: [1.0e-5, 1.0e-4]}
    kl: {key: {nft: algo.kl_beta, awm: algo.beta, rft: null}, log_uniform: [1.0e-4, 1.0e-1]}
```

A dimension is named by its config key, or by any name with `key:` giving the key (one for all arms, or one per
arm; `null` for an arm without that knob, which then ignores the dimension). Every arm sees the same points of the
unit cube, so no arm gets luckier draws than another.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from diffrl_bench.prompts import parse_split_source, split_source, validation_split  # noqa: F401

TUNE_KEYS = ("trials", "seed", "budget_fraction", "validation", "sampler", "space", "metric")
VALIDATION_KEYS = ("fraction", "seed")
DIM_KEYS = ("key", "log_uniform", "uniform", "values")
SAMPLERS = ("lhs", "grid")
INTEGER_BUDGETS = ("steps", "nfe")


class TuneError(ValueError):
    """A bad `tune:` section or incomplete trial results; the message names the key, arm or trial."""


@dataclass
class Dimension:
    name: str
    keys: Dict[str, Optional[str]]
    """per arm: the config key this dimension sets, or None when the arm has no such knob"""
    kind: str
    """log_uniform, uniform or values"""
    low: float = float("nan")
    high: float = float("nan")
    values: List[Any] = field(default_factory=list)

    def value(self, u: float) -> Any:
        """The value at position u in [0, 1) of this dimension."""
        if self.kind == "values":
            return self.values[min(int(u * len(self.values)), len(self.values) - 1)]
        if self.kind == "log_uniform":
            raw = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            raw = self.low + u * (self.high - self.low)
        # Three significant digits: the chosen value is written into configs and the report as is.
        return float(f"{raw:.3g}")

    def describe(self) -> str:
        span = (f"one of {self.values}" if self.kind == "values"
                else f"{self.kind.replace('_', '-')} in [{self.low:g}, {self.high:g}]")
        keys = sorted({k for k in self.keys.values() if k})
        where = keys[0] if len(keys) == 1 and all(self.keys.values()) else \
            ", ".join(f"{arm}: {key or 'none'}" for arm, key in self.keys.items())
        return f"{self.name} ({where}): {span}"


@dataclass
class TuneSpec:
    trials: int
    seed: int
    budget_fraction: float
    validation_fraction: float
    validation_seed: int
    sampler: str
    space: List[Dimension]
    metric: Optional[str] = None
    """the column that scores a trial (default: the report's headline on the validation prompts)"""


@dataclass
class Trial:
    arm: str
    index: int
    point: Dict[str, Any]
    """dimension name -> value"""
    overrides: Dict[str, Any]
    """config key -> value (dimensions the arm has no key for left out)"""

    @property
    def name(self) -> str:
        return f"{self.arm}/trial{self.index:02d}"


def _err(where: str, message: str) -> TuneError:
    return TuneError(f"{where}: {message}")


def _positive_int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _err(where, f"must be a positive integer, got {value!r}")
    return value


def _fraction(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise _err(where, f"must be a number in (0, 1], got {value!r}")
    return float(value)


def _dimension(where: str, name: str, body: Any, arms: Sequence[str]) -> Dimension:
    if not isinstance(body, dict):
        raise _err(where, f"must be a mapping like {{log_uniform: [1e-5, 1e-4]}}, got {body!r}")
    unknown = [k for k in body if k not in DIM_KEYS]
    if unknown:
        raise _err(f"{where}.{unknown[0]}", f"unknown key; allowed: {', '.join(DIM_KEYS)}")
    key = body.get("key", name)
    if isinstance(key, str):
        keys: Dict[str, Optional[str]] = {arm: key for arm in arms}
    elif isinstance(key, dict):
        # Keys for arms this sweep does not run are allowed (one section serves sweeps of arm subsets); a typo
        # in an arm's name still fails below, as that arm's missing key.
        absent = [a for a in arms if a not in key]
        if absent:
            raise _err(f"{where}.key", f"no key for arm {absent[0]!r} (give null if it has no such knob)")
        if not all(v is None or (isinstance(v, str) and v) for v in key.values()):
            raise _err(f"{where}.key", f"values must be config keys or null, got {key!r}")
        keys = {arm: key[arm] for arm in arms}
    else:
        raise _err(f"{where}.key", f"must be a config key or a mapping arm -> key, got {key!r}")
    kinds = [k for k in ("log_uniform", "uniform", "values") if k in body]
    if len(kinds) != 1:
        raise _err(where, f"give exactly one of log_uniform, uniform, values (got {kinds or 'none'})")
    kind = kinds[0]
    if kind == "values":
        values = body["values"]
        if not isinstance(values, list) or not values:
            raise _err(f"{where}.values", f"must be a non-empty list, got {values!r}")
        return Dimension(name, keys, kind, values=list(values))
    span = body[kind]
    if not (isinstance(span, list) and len(span) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in span)):
        raise _err(f"{where}.{kind}", f"must be [low, high], got {span!r}")
    low, high = float(span[0]), float(span[1])
    if not low < high:
        raise _err(f"{where}.{kind}", f"low {low:g} must be below high {high:g}")
    if kind == "log_uniform" and low <= 0:
        raise _err(f"{where}.{kind}", f"a log-uniform range must be positive, got low {low:g}")
    return Dimension(name, keys, kind, low, high)


def parse_tune(raw: Any, arms: Sequence[str], where: str = "tune") -> TuneSpec:
    """Check a `tune:` mapping against the sweep's arms. Errors name the key (`tune.space.kl.key`, ...)."""
    if not isinstance(raw, dict):
        raise _err(where, f"must be a mapping, got {raw!r}")
    unknown = [k for k in raw if k not in TUNE_KEYS]
    if unknown:
        raise _err(f"{where}.{unknown[0]}", f"unknown key; allowed: {', '.join(TUNE_KEYS)}")
    for key in ("trials", "space", "budget_fraction", "validation"):
        if key not in raw:
            raise _err(f"{where}.{key}", "missing")
    trials = _positive_int(f"{where}.trials", raw["trials"])
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise _err(f"{where}.seed", f"must be a non-negative integer, got {seed!r}")
    budget_fraction = _fraction(f"{where}.budget_fraction", raw["budget_fraction"])
    validation = raw["validation"]
    if not isinstance(validation, dict):
        raise _err(f"{where}.validation", f"must be a mapping like {{fraction: 0.25, seed: 0}}, got {validation!r}")
    stray = [k for k in validation if k not in VALIDATION_KEYS]
    if stray:
        raise _err(f"{where}.validation.{stray[0]}", f"unknown key; allowed: {', '.join(VALIDATION_KEYS)}")
    val_fraction = _fraction(f"{where}.validation.fraction", validation.get("fraction"))
    if val_fraction >= 1:
        raise _err(f"{where}.validation.fraction", "must leave training prompts to train on (below 1)")
    val_seed = validation.get("seed", 0)
    if isinstance(val_seed, bool) or not isinstance(val_seed, int):
        raise _err(f"{where}.validation.seed", f"must be an integer, got {val_seed!r}")
    sampler = raw.get("sampler", "lhs")
    if sampler not in SAMPLERS:
        raise _err(f"{where}.sampler", f"{sampler!r} is not one of {list(SAMPLERS)}")
    space_raw = raw["space"]
    if not isinstance(space_raw, dict) or not space_raw:
        raise _err(f"{where}.space", f"must be a non-empty mapping of dimensions, got {space_raw!r}")
    space = [_dimension(f"{where}.space.{name}", name, body, arms) for name, body in space_raw.items()]
    if sampler == "grid":
        not_listed = [d.name for d in space if d.kind != "values"]
        if not_listed:
            raise _err(f"{where}.space.{not_listed[0]}", "the grid sampler needs `values` on every dimension")
        size = math.prod(len(d.values) for d in space)
        if size != trials:
            raise _err(f"{where}.trials", f"the grid has {size} points; trials must equal it, got {trials}")
    metric = raw.get("metric")
    if metric is not None and not (isinstance(metric, str) and metric):
        raise _err(f"{where}.metric", f"must be an eval column, got {metric!r}")
    return TuneSpec(trials, seed, budget_fraction, val_fraction, val_seed, sampler, space, metric)


def unit_points(n: int, dims: int, seed: int) -> np.ndarray:
    """n points in [0, 1)^dims, a Latin hypercube: each dimension has exactly one point in each of its n strata,
    so even 4 trials cover a learning-rate range end to end. Deterministic in `seed`."""
    rng = np.random.default_rng([int(seed), 0x7475_6E65])
    columns = [(rng.permutation(n) + rng.random(n)) / n for _ in range(dims)]
    return np.stack(columns, axis=1) if dims else np.zeros((n, 0))


def expand_trials(tune: TuneSpec, arms: Sequence[str]) -> List[Trial]:
    """Every arm's trials, arm-major; the same points for every arm (deterministic in `tune.seed`)."""
    if tune.sampler == "grid":
        points = [dict(zip([d.name for d in tune.space], combo))
                  for combo in itertools.product(*(d.values for d in tune.space))]
    else:
        cube = unit_points(tune.trials, len(tune.space), tune.seed)
        points = [{d.name: d.value(float(u)) for d, u in zip(tune.space, row)} for row in cube]
    trials = []
    for arm in arms:
        for index, point in enumerate(points):
            overrides = {d.keys[arm]: point[d.name] for d in tune.space if d.keys.get(arm)}
            trials.append(Trial(arm, index, dict(point), overrides))
    return trials


def trial_budget(tune: TuneSpec, budget: Mapping[str, Any]) -> Dict[str, Any]:
    """The sweep budget (`{gpu_hours: 0.03}`, `{nfe: ...}`, `{flops: ...}`, `{steps: ...}`) scaled by `budget_fraction`; integer
    budgets stay integers (at least 1). `max_steps` is a cap, not a budget, and is kept."""
    out: Dict[str, Any] = {}
    for kind, value in budget.items():
        if kind == "max_steps":
            out[kind] = value
        elif kind in INTEGER_BUDGETS:
            out[kind] = max(1, int(round(value * tune.budget_fraction)))
        else:
            out[kind] = float(value) * tune.budget_fraction
    return out


# The validation split of the training prompts lives in `prompts` (which loads `SOURCE~val:F:S` sources);
# re-exported here because the tuning stage is what uses it.


def trial_config(tune: TuneSpec, trial: Trial, train_source: str) -> Dict[str, Any]:
    """The config values a trial adds to its arm's (on top of the sweep's budget, scaled by `trial_budget`):
    the trial's point, training on the fit part and evaluating on the validation part of the training prompts."""
    values = dict(trial.overrides)
    values["data.train_prompts"] = split_source(train_source, "fit", tune.validation_fraction, tune.validation_seed)
    values["data.eval_prompts"] = split_source(train_source, "val", tune.validation_fraction, tune.validation_seed)
    values["train.seed"] = tune.seed
    return values


# ------------------------------------------------------------------------------------------- the choice
def select_best(trials: Sequence[Trial], scores: Mapping[str, float],
                higher_is_better: bool = True) -> Dict[str, Trial]:
    """Per arm, the trial with the best validation score (`scores` by trial name). A trial without a score is
    an error (the stage is not finished: choosing among the finished ones would favour fast arms); a NaN score
    (a diverged run) ranks last; ties go to the lower trial index, so the choice is reproducible."""
    missing = [t.name for t in trials if t.name not in scores]
    if missing:
        raise TuneError(f"{len(missing)} trial(s) have no score yet: {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}")
    best: Dict[str, Trial] = {}
    sign = 1.0 if higher_is_better else -1.0

    def key(trial: Trial):
        value = float(scores[trial.name])
        return (0, -sign * value, trial.index) if math.isfinite(value) else (1, 0.0, trial.index)

    for arm in dict.fromkeys(t.arm for t in trials):
        mine = [t for t in trials if t.arm == arm]
        choice = min(mine, key=key)
        if not math.isfinite(float(scores[choice.name])):
            raise TuneError(f"arm {arm!r}: every one of its {len(mine)} trials has a non-finite score")
        best[arm] = choice
    return best


def chosen_overrides(best: Mapping[str, Trial]) -> Dict[str, Dict[str, Any]]:
    """Per arm, the config values its seeded runs take from the tuning stage."""
    return {arm: dict(trial.overrides) for arm, trial in best.items()}


def report_lines(tune: TuneSpec, budget: Mapping[str, Any], trials: Sequence[Trial], best: Mapping[str, Trial],
                 scores: Mapping[str, float]) -> List[str]:
    """Markdown lines for the report: the search budget, the space, and the chosen values per arm."""
    per_trial = trial_budget(tune, budget)
    spent = ", ".join(f"{k} {v:g}" for k, v in per_trial.items() if k != "max_steps")
    arms = list(dict.fromkeys(t.arm for t in trials))
    lines = ["## Tuning", "",
             f"Every arm had {tune.trials} trials ({tune.sampler}, seed {tune.seed}), each with "
             f"{tune.budget_fraction:g} of the budget ({spent}), scored on {tune.validation_fraction:.0%} of the "
             f"training prompts held out for validation (split seed {tune.validation_seed}; never the held-out "
             f"evaluation prompts){f', on {tune.metric}' if tune.metric else ''}.", "", "Search space:", ""]
    lines += [f"- {d.describe()}" for d in tune.space]
    lines += ["", "| arm | chosen | validation score | trials scored |", "|---|---|---|---|"]
    for arm in arms:
        trial = best[arm]
        chosen = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.overrides.items())
        scored = sum(1 for t in trials if t.arm == arm and math.isfinite(float(scores.get(t.name, math.nan))))
        lines.append(f"| {arm} | {chosen or '(no tunable key)'} | {float(scores[trial.name]):.4g} | "
                     f"{scored}/{tune.trials} |")
    return lines + [""]
