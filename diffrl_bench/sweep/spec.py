"""A sweep spec: its format (keys, budget, executor), the fairness rule for arms and the grid, and `SweepRun`, one
(arm, seed, grid point) run a spec expands into. `load_spec` reads and checks a spec; see docs/sweeps.md."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffrl_bench.config import CONFIG_DIR
from diffrl_bench.sweep.tune import TuneError, TuneSpec, parse_tune

# Every arm must see the same value of these (the comparison's fixed conditions); an arm or the grid may set one
# only when it is listed under `ablate`. Whole sections are prefixes; the rest are exact keys.
FAIRNESS_SECTIONS = ("model", "reward", "data", "eval")
FAIRNESS_KEYS = ("rollout.images_per_prompt", "rollout.prompts_per_step", "train.steps", "train.budget_gpu_hours",
                 "train.budget_nfe", "train.budget_flops")
BUDGET_TARGETS = {"steps": "train.steps", "gpu_hours": "train.budget_gpu_hours", "nfe": "train.budget_nfe",
                  "flops": "train.budget_flops"}
# Budgets that may be fractional; the others count whole steps or network calls.
REAL_BUDGETS = ("gpu_hours", "flops")
# Keys the sweep sets per run; a spec that set them would break the run folder layout or resumption.
RUN_KEYS = ("name", "output_dir", "train.seed", "checkpoint.resume", "log.group", "log.tags")
# A budget in GPU-hours, NFEs or FLOPs stops the run; train.steps then only has to be out of the way.
DEFAULT_MAX_STEPS = 1_000_000

SPEC_KEYS = ("name", "results_dir", "seeds", "budget", "fairness", "common", "arms", "grid", "ablate", "baseline",
             "executor", "tune", "per_arm", "extend")
ARM_KEYS = ("config", "overrides")
BUDGET_KEYS = ("steps", "gpu_hours", "nfe", "flops", "max_steps")
EXTEND_KEYS = ("arms", "budget")
EXECUTOR_KEYS = ("kind", "parallel", "launcher", "num_processes", "launcher_args", "parameters", "cluster")
EXECUTOR_KINDS = ("sequential", "local", "slurm")
LAUNCHERS = ("python", "accelerate")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class SweepError(ValueError):
    """A problem with a sweep spec, reported with the spec file and the offending key."""


@dataclass
class Arm:
    name: str
    config: str
    """a shipped config name, or an absolute path to a YAML file"""
    overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ExecutorSpec:
    kind: str = "sequential"
    parallel: Optional[int] = None
    """concurrent jobs (local) or the Slurm array's parallelism (slurm); None: one per device group / unlimited"""
    launcher: str = "python"
    num_processes: int = 1
    """processes per run under `launcher: accelerate`"""
    launcher_args: List[str] = field(default_factory=list)
    """extra `accelerate launch` arguments"""
    parameters: Dict[str, Any] = field(default_factory=dict)
    """passed to submitit's AutoExecutor.update_parameters (e.g. timeout_min, gpus_per_node, slurm_partition)"""
    cluster: str = "slurm"
    """submitit cluster for `kind: slurm`; `local` or `debug` try a Slurm spec on this machine"""


@dataclass
class Spec:
    path: Path
    name: str
    results_dir: Path
    seeds: List[int]
    budget: Dict[str, Any]
    fairness: Dict[str, Any]
    common: Dict[str, Any]
    arms: List[Arm]
    grid: Dict[str, List[Any]]
    ablate: List[str]
    baseline: Optional[str]
    executor: ExecutorSpec
    tune: Optional[TuneSpec] = None
    """the equal-tuning-budget stage (`tune:`), or None"""
    tune_raw: Optional[Dict[str, Any]] = None
    """the `tune:` mapping as written, for sweep.json (the report rebuilds the stage from it)"""
    per_arm: List[str] = field(default_factory=list)
    """fairness keys each arm deliberately takes from its own config (its authors' setting, e.g. the evaluation
    CFG): exempt from the agreement check, not an ablation axis; the report states their values per arm"""
    extend: Optional[Dict[str, Any]] = None
    """`{arms: [...], budget: {kind: value}}`: these arms' seeded runs continue to a longer budget of the same kind,
    so that a slow arm's cost to a high threshold is measured instead of censored; every comparison of finals
    stays at the common `budget` (the report cuts the longer runs there)"""

    def budget_for(self, arm: str) -> Dict[str, Any]:
        """The budget of `arm`'s seeded runs: the extended one for an arm under `extend:`, else the sweep's."""
        if self.extend and arm in self.extend["arms"]:
            return {**self.budget, **self.extend["budget"]}
        return self.budget

    def fairness_keys(self) -> List[str]:
        return list(FAIRNESS_SECTIONS) + list(FAIRNESS_KEYS) + [k for k in self.fairness if k not in FAIRNESS_KEYS]

    def budget_overrides(self) -> Dict[str, Any]:
        """The budget as config keys; the unused budget kinds are zeroed so a preset's own budget cannot leak in."""
        return budget_overrides(self.budget)

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "spec_file": str(self.path.resolve()), "results_dir": str(self.results_dir),
                "seeds": self.seeds, "budget": self.budget, "fairness": self.fairness, "common": self.common,
                "arms": {a.name: {"config": a.config, "overrides": a.overrides} for a in self.arms},
                "grid": self.grid, "ablate": self.ablate, "baseline": self.baseline, "executor": asdict(self.executor),
                "tune": self.tune_raw,
                "per_arm": self.per_arm, "extend": self.extend}


def budget_overrides(budget: Dict[str, Any]) -> Dict[str, Any]:
    """A `budget:` mapping as config keys (the sweep's, or a tuning trial's share of it)."""
    values: Dict[str, Any] = {"train.budget_gpu_hours": 0.0, "train.budget_nfe": 0, "train.budget_flops": 0.0}
    kind = next(k for k in BUDGET_TARGETS if k in budget)
    values[BUDGET_TARGETS[kind]] = budget[kind]
    if kind != "steps":
        values["train.steps"] = budget.get("max_steps", DEFAULT_MAX_STEPS)
    return values


@dataclass
class SweepRun:
    """One run of a sweep: an arm of the spec at one grid point and one seed, with everything that defines it."""

    name: str
    """the arm's name, with a suffix per grid value"""
    arm: str
    """the spec's arm it comes from"""
    seed: int
    grid: Dict[str, Any]
    config: str
    overrides: List[str]
    """every dot-list override, in order: `diffrl-bench train <config> <overrides>` reproduces the run"""
    shown: List[str]
    """the overrides that set this run apart (arm and grid), for tables"""
    output_dir: str
    sweep: str
    trial: Optional[int] = None
    """the tuning stage's trial index (a trial run, under results_dir/tune), or None for a seeded run"""

    @property
    def id(self) -> str:
        return f"{self.name}/seed{self.seed}" if self.trial is None else f"{self.arm}/trial{self.trial:02d}"

    @property
    def out(self) -> Path:
        return Path(self.output_dir)

    def record(self) -> Dict[str, Any]:
        record = {"arm": self.name, "seed": self.seed, "sweep": self.sweep, "config": self.config,
                  "overrides": self.overrides, "base_arm": self.arm, "grid": self.grid}
        if self.trial is not None:
            # `stage` keeps the report from reading a trial as a seed of its arm.
            record.update(stage="tune", trial=self.trial)
        return record


def spec_error(spec_path: Path, key: str, message: str) -> SweepError:
    """The error for a spec, naming its file and the offending key."""
    return SweepError(f"sweep spec {spec_path}: {key}: {message}")


def _check_keys(spec_path: Path, where: str, given: Dict[str, Any], allowed: Sequence[str]) -> None:
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise spec_error(spec_path, where, f"unknown key(s) {unknown}; allowed: {list(allowed)}")


def _mapping(spec_path: Path, key: str, value: Any) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise spec_error(spec_path, key, f"must be a mapping, got {value!r}")
    return {str(k): v for k, v in value.items()}


def key_under(key: str, prefix: str) -> bool:
    """Whether dotted `key` is `prefix` or lies inside it (`model.path` is under `model`; `modelx` is not)."""
    return key == prefix or key.startswith(prefix + ".")


def dotted_leaves(value: Any, prefix: str) -> Dict[str, Any]:
    """Dotted leaf paths of a (nested) mapping; `{"a": {"b": 1}}` under `x` -> `{"x.a.b": 1}`."""
    if isinstance(value, dict) and value:
        out: Dict[str, Any] = {}
        for k, v in value.items():
            out.update(dotted_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _resolve_arm_config(spec_path: Path, arm: str, config: Any) -> str:
    if not isinstance(config, str) or not config:
        raise spec_error(spec_path, f"arms.{arm}.config",
                         f"must be a shipped config name or a YAML path, got {config!r}")
    # A relative path is looked up next to the spec first, so a spec and its configs can travel together.
    for candidate in (spec_path.parent / config, Path(config)):
        if candidate.is_file():
            return str(candidate.resolve())
    if (CONFIG_DIR / f"{config}.yaml").is_file():
        return config
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise spec_error(spec_path, f"arms.{arm}.config", f"{config!r} is neither a file nor a shipped config ({known})")


def load_spec(path: str | Path) -> Spec:
    """Read and check a spec: keys, types, the budget, and the fairness rule for arms and the grid."""
    spec_path = Path(path)
    if not spec_path.is_file():
        raise SweepError(f"sweep spec {spec_path}: no such file")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(spec_path), resolve=True)
    except (OmegaConfBaseException, ValueError, OSError, yaml.YAMLError) as error:
        # A YAML syntax error's first line lacks the position: keep the whole message on one line.
        raise SweepError(f"sweep spec {spec_path}: cannot read it: {' '.join(str(error).split())}") from None
    raw = _mapping(spec_path, "(top level)", raw)
    _check_keys(spec_path, "(top level)", raw, SPEC_KEYS)

    name = str(raw.get("name") or spec_path.stem)
    if not _NAME.match(name):
        raise spec_error(spec_path, "name", f"{name!r} must be letters, digits, '.', '_', '+' or '-'")
    results_dir = Path(raw.get("results_dir") or f"results/sweeps/{name}").resolve()

    seeds = raw.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise spec_error(spec_path, "seeds", f"must be a non-empty list of non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise spec_error(spec_path, "seeds", f"{seeds} repeats a seed")

    budget = _mapping(spec_path, "budget", raw.get("budget"))
    _check_keys(spec_path, "budget", budget, BUDGET_KEYS)
    kinds = [k for k in BUDGET_TARGETS if k in budget]
    if len(kinds) != 1:
        raise spec_error(spec_path, "budget", f"give exactly one of steps, gpu_hours, nfe, flops "
                                              f"(got {kinds or 'none'})")
    value = budget[kinds[0]]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or \
            (kinds[0] not in REAL_BUDGETS and not isinstance(value, int)):
        kind = "number" if kinds[0] in REAL_BUDGETS else "integer"
        raise spec_error(spec_path, f"budget.{kinds[0]}", f"must be a positive {kind}, got {value!r}")
    if "max_steps" in budget and (kinds[0] == "steps" or not isinstance(budget["max_steps"], int)
                                  or budget["max_steps"] <= 0):
        raise spec_error(spec_path, "budget.max_steps",
                         "a positive integer cap, only with a gpu_hours, nfe or flops budget")

    fairness = _mapping(spec_path, "fairness", raw.get("fairness"))
    common = _mapping(spec_path, "common", raw.get("common"))
    ablate = raw.get("ablate") or []
    if not isinstance(ablate, list) or not all(isinstance(k, str) and k for k in ablate):
        raise spec_error(spec_path, "ablate", f"must be a list of config keys, got {ablate!r}")
    per_arm = raw.get("per_arm") or []
    if not isinstance(per_arm, list) or not all(isinstance(k, str) and k for k in per_arm):
        raise spec_error(spec_path, "per_arm", f"must be a list of config keys, got {per_arm!r}")
    for key in per_arm:
        clash = [f for f in fairness if key_under(f, key) or key_under(key, f)]
        if clash:
            raise spec_error(spec_path, "per_arm", f"'{key}' is also fixed under fairness ({clash[0]}); an arm "
                                                   "either keeps its own value or every arm shares one")

    executor_raw = _mapping(spec_path, "executor", raw.get("executor"))
    _check_keys(spec_path, "executor", executor_raw, EXECUTOR_KEYS)
    executor = ExecutorSpec(**executor_raw)
    if executor.kind not in EXECUTOR_KINDS:
        raise spec_error(spec_path, "executor.kind", f"{executor.kind!r} is not one of {list(EXECUTOR_KINDS)}")
    if executor.launcher not in LAUNCHERS:
        raise spec_error(spec_path, "executor.launcher", f"{executor.launcher!r} is not one of {list(LAUNCHERS)}")
    for key in ("parallel", "num_processes"):
        value = getattr(executor, key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise spec_error(spec_path, f"executor.{key}", f"must be a positive integer, got {value!r}")
    if not isinstance(executor.launcher_args, list) or not isinstance(executor.parameters, dict):
        raise spec_error(spec_path, "executor", "launcher_args must be a list and parameters a mapping")
    executor.launcher_args = [str(a) for a in executor.launcher_args]

    arms_raw = _mapping(spec_path, "arms", raw.get("arms"))
    if not arms_raw:
        raise spec_error(spec_path, "arms", "at least one arm is needed, e.g. `nft: {config: toy_nft}`")
    arms = []
    for arm_name, body in arms_raw.items():
        if not _NAME.match(arm_name):
            raise spec_error(spec_path, f"arms.{arm_name}", "an arm name is letters, digits, '.', '_', '+' or '-'")
        body = _mapping(spec_path, f"arms.{arm_name}", body)
        _check_keys(spec_path, f"arms.{arm_name}", body, ARM_KEYS)
        arms.append(Arm(arm_name, _resolve_arm_config(spec_path, arm_name, body.get("config")),
                        _mapping(spec_path, f"arms.{arm_name}.overrides", body.get("overrides"))))

    grid = _mapping(spec_path, "grid", raw.get("grid"))
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise spec_error(spec_path, f"grid.{key}", f"must be a non-empty list of values, got {values!r}")

    baseline = raw.get("baseline")
    if baseline is not None and baseline not in arms_raw:
        raise spec_error(spec_path, "baseline", f"{baseline!r} is not an arm ({list(arms_raw)})")

    tune, tune_raw = None, None
    if raw.get("tune") is not None:
        tune_raw = raw["tune"]
        if grid:
            raise spec_error(spec_path, "tune", "a tuning stage with a `grid:` is not supported: tune one setting "
                                                "per arm, or run the grid without `tune:`")
        try:
            tune = parse_tune(tune_raw, list(arms_raw))
        except TuneError as error:
            raise SweepError(f"sweep spec {spec_path}: {error}") from None

    extend = _parse_extend(spec_path, raw.get("extend"), budget, list(arms_raw))
    spec = Spec(spec_path, name, results_dir, seeds, budget, fairness, common, arms, grid, ablate, baseline, executor,
                tune, tune_raw, per_arm, extend)
    _check_fairness_rules(spec)
    return spec


def _parse_extend(spec_path: Path, raw: Any, budget: Dict[str, Any], arms: List[str]) -> Optional[Dict[str, Any]]:
    """`extend: {arms: [a, ...], budget: {<the sweep's budget kind>: larger value}}`, checked; None when absent."""
    if raw is None:
        return None
    raw = _mapping(spec_path, "extend", raw)
    _check_keys(spec_path, "extend", raw, EXTEND_KEYS)
    chosen = raw.get("arms")
    if not isinstance(chosen, list) or not chosen or not all(isinstance(a, str) for a in chosen):
        raise spec_error(spec_path, "extend.arms", f"must be a non-empty list of arm names, got {chosen!r}")
    unknown = [a for a in chosen if a not in arms]
    if unknown:
        raise spec_error(spec_path, "extend.arms", f"{unknown[0]!r} is not an arm ({arms})")
    longer = _mapping(spec_path, "extend.budget", raw.get("budget"))
    kind = next(k for k in BUDGET_TARGETS if k in budget)
    if list(longer) != [kind]:
        raise spec_error(spec_path, "extend.budget", f"give the sweep's budget kind only ({{{kind}: ...}}), got "
                                                     f"{sorted(longer) or 'none'}")
    value = longer[kind]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > budget[kind] or \
            (kind not in REAL_BUDGETS and not isinstance(value, int)):
        word = "number" if kind in REAL_BUDGETS else "integer"
        raise spec_error(spec_path, f"extend.budget.{kind}", f"must be a {word} above the sweep's budget "
                                                             f"{budget[kind]!r}, got {value!r}")
    return {"arms": list(dict.fromkeys(chosen)), "budget": {kind: value}}


def _check_fairness_rules(spec: Spec) -> None:
    """Where each kind of key may be set: per-run keys nowhere, the budget only under `budget`, fairness keys
    only under `fairness` (or, when ablated, in an arm or the grid)."""
    fair = spec.fairness_keys()

    def touches_fairness(leaf: str) -> bool:
        return any(key_under(leaf, k) or key_under(k, leaf) for k in fair)

    def ablated(leaf: str) -> bool:
        return any(key_under(leaf, a) for a in spec.ablate + spec.per_arm)

    blocks = [("fairness", spec.fairness), ("common", spec.common), ("grid", {k: None for k in spec.grid})]
    blocks += [(f"arms.{a.name}.overrides", a.overrides) for a in spec.arms]
    for where, block in blocks:
        for key, value in block.items():
            for leaf in dotted_leaves(value, key) if where != "grid" else [key]:
                if any(key_under(leaf, k) or key_under(k, leaf) for k in RUN_KEYS):
                    raise spec_error(spec.path, f"{where}.{key}", f"'{leaf}' is set by the sweep for each run "
                                                            f"({', '.join(RUN_KEYS)}); remove it")
                if where == "fairness":
                    if any(key_under(leaf, k) for k in BUDGET_TARGETS.values()):
                        raise spec_error(spec.path, f"fairness.{key}", "state the budget under `budget:` "
                                                                 "(steps, gpu_hours, nfe or flops)")
                    continue
                if where == "common":
                    if touches_fairness(leaf):
                        raise spec_error(spec.path, f"common.{key}", f"'{leaf}' is a fairness key; state it under "
                                                               "`fairness:` instead")
                    continue
                if touches_fairness(leaf) and not ablated(leaf):
                    who = "the grid" if where == "grid" else f"arm '{where.split('.')[1]}'"
                    raise spec_error(spec.path, f"{where}.{key}",
                               f"{who} sets '{leaf}', which breaks fairness between arms (every arm must share "
                               f"model, reward, data, eval, group size, prompts per step and budget); list "
                               f"'{leaf}' under `ablate:` if it is the axis this sweep studies")
    for key in spec.common:
        if key in spec.fairness:
            raise spec_error(spec.path, f"common.{key}", "also stated under `fairness:`; state it once")
    # Tuning may not move what every arm shares, nor what the sweep sets per run.
    for dim in (spec.tune.space if spec.tune else []):
        for arm, leaf in dim.keys.items():
            if not leaf:
                continue
            where = f"tune.space.{dim.name}" + (f".key.{arm}" if len(set(dim.keys.values())) > 1 else "")
            if any(key_under(leaf, k) or key_under(k, leaf) for k in RUN_KEYS):
                raise spec_error(spec.path, where, f"'{leaf}' is set by the sweep for each run; it cannot be tuned")
            if touches_fairness(leaf):
                raise spec_error(spec.path, where, f"'{leaf}' is a fairness key (the same for every arm); tuning "
                                                   "must not change it")
