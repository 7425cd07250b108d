"""Expanding a spec into runs (seeds x arms x grid points, each with its full dot-list of overrides) and checking
them all before any starts: every config loads, every run agrees on the fairness keys, no run folder holds a
different definition."""
from __future__ import annotations

import itertools
import json
import re
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffrl_bench.config import ConfigError, load_config
from diffrl_bench.sweep.spec import (BUDGET_TARGETS, Spec, SweepError, SweepRun, budget_overrides, dotted_leaves,
                                    key_under, spec_error)
from diffrl_bench.sweep.state import identity_conflict


def parse_dotlist_value(text: str) -> Any:
    """A `key=value` override's value as `diffrl-bench train` reads it (YAML, through OmegaConf)."""
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]


def format_value(value: Any) -> str:
    """A value as `diffrl-bench train`'s dot-list parser (YAML) reads it back unchanged."""
    if isinstance(value, str):
        # Plain when YAML gives the same string back; quoted otherwise ("1e-4", "true", "", "a: b").
        try:
            if value and parse_dotlist_value(value) == value:
                return value
        except (OmegaConfBaseException, ValueError):
            pass
        return json.dumps(value)
    # JSON numbers, booleans, null, lists and objects are YAML flow syntax.
    return json.dumps(value)


def dotlist(values: Dict[str, Any]) -> List[str]:
    """`key=value` overrides as `diffrl-bench train` takes them."""
    return [f"{key}={format_value(value)}" for key, value in values.items()]


def _suffix(keys: Sequence[str], key: str, value: Any) -> str:
    leaf = key.rsplit(".", 1)[-1]
    label = key if sum(k.rsplit(".", 1)[-1] == leaf for k in keys) > 1 else leaf
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", f"{label}{text}")


def expand(spec: Spec, tuned: Optional[Dict[str, Dict[str, Any]]] = None) -> List[SweepRun]:
    """One run per (seed, arm, grid point). Seed-major, so that a sequential sweep compares every arm on seed 0
    before it spends time on seed 1. `tuned`: per arm, the tuning stage's chosen values (`tuning.chosen_overrides`),
    applied after the arm's overrides; they enter each run's recorded overrides, so a folder trained with another
    choice is refused rather than resumed."""
    grid_keys = list(spec.grid)
    points = [dict(zip(grid_keys, combo)) for combo in itertools.product(*spec.grid.values())]
    runs: List[SweepRun] = []
    ids = set()
    for seed in spec.seeds:
        for arm in spec.arms:
            for point in points:
                name = "-".join([arm.name] + [_suffix(grid_keys, k, v) for k, v in point.items()])
                if (name, seed) in ids:
                    raise spec_error(spec.path, "arms", f"two runs would share the name {name!r}; rename an arm")
                ids.add((name, seed))
                out = spec.results_dir / "runs" / name / f"seed{seed}"
                # Later entries win: the arm may change `common`; an ablated key may change `fairness`.
                values: Dict[str, Any] = {}
                values.update(spec.common)
                values.update(budget_overrides(spec.budget_for(arm.name)))
                values.update(spec.fairness)
                values.update(arm.overrides)
                values.update((tuned or {}).get(arm.name, {}))
                values.update(point)
                shown = dotlist({**arm.overrides, **(tuned or {}).get(arm.name, {}), **point})
                values.update({"name": f"{name}_seed{seed}", "output_dir": str(out), "train.seed": seed,
                               "checkpoint.resume": True, "log.group": spec.name,
                               "log.tags": {"arm": arm.name, "seed": str(seed)}})
                runs.append(SweepRun(name=name, arm=arm.name, seed=seed, grid=point, config=arm.config,
                                overrides=dotlist(values), shown=shown, output_dir=str(out), sweep=spec.name))
    return runs


def validate_runs(spec: Spec, runs: Sequence[SweepRun]) -> Dict[str, Any]:
    """Load every run's config (so a typo fails before any run starts), check that all runs agree on every
    fairness key once their configs are applied, and that no run folder belongs to a different definition."""
    configs = {}
    for run in runs:
        try:
            configs[run.id] = load_config(run.config, run.overrides)
        except ConfigError as error:
            raise SweepError(f"sweep spec {spec.path}: arm '{run.arm}' (run {run.id}, config {run.config}): "
                             f"{error}") from None
    views = {run.id: _fairness_view(spec, configs[run.id]) for run in runs}
    first = runs[0] if runs else None
    for run in runs[1:]:
        a, b = views[first.id], views[run.id]
        for key in sorted(set(a) | set(b)):
            if a.get(key, "<unset>") != b.get(key, "<unset>"):
                raise SweepError(
                    f"sweep spec {spec.path}: arms '{first.name}' and '{run.name}' differ in fairness key '{key}' "
                    f"({a.get(key, '<unset>')!r} vs {b.get(key, '<unset>')!r}) once their configs "
                    f"({first.config}, {run.config}) are applied; state it under `fairness:` so every arm gets "
                    f"the same value (a mapping there merges into the config's), list it under `ablate:`, or under "
                    f"`per_arm:` if each arm should keep its own (its authors') value")
    for run in runs:
        conflict = identity_conflict(run)
        if conflict:
            raise SweepError(f"sweep spec {spec.path}: {conflict}")
    return configs


def _fairness_view(spec: Spec, cfg) -> Dict[str, Any]:
    container = OmegaConf.to_container(cfg, resolve=True)
    view: Dict[str, Any] = {}
    for key in spec.fairness_keys():
        node: Any = container
        for part in key.split("."):
            node = node.get(part, "<unset>") if isinstance(node, dict) else "<unset>"
        view.update(dotted_leaves(node, key))
    # Under `extend:` the budget differs between arms by design (budgets come only from `budget:` and `extend:`).
    exempt = spec.ablate + spec.per_arm + (list(BUDGET_TARGETS.values()) if spec.extend else [])
    return {k: v for k, v in view.items() if not any(key_under(k, a) for a in exempt)}
