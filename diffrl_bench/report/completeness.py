"""Which runs of a results folder are not finished, and the baseline its sweep spec names: a report on a
half-finished sweep says what is left out instead of silently comparing the arms that happen to be done."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from diffrl_bench.report.claims import COSTS
from diffrl_bench.report.errors import ReportError


def unfinished_runs(results_dir) -> List[Tuple[str, Path]]:
    """(arm, folder) of every run folder (one holding `arm.json` or `config.yaml`) without a `metrics.csv`, which a
    run writes when it ends: started (or only planned) but not finished. The arm is read from `arm.json` when there
    is one, else the folder's name."""
    found = []
    root = Path(results_dir)
    for marker in sorted({*root.rglob("arm.json"), *root.rglob("config.yaml")}):
        directory = marker.parent
        if (directory / "metrics.csv").exists() or any(d == directory for _, d in found):
            continue
        arm = directory.name
        try:
            arm = str(json.loads((directory / "arm.json").read_text())["arm"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        found.append((arm, directory))
    return found


def sweep_file(results_dir) -> Path:
    """Where a results folder records the sweep(s) that made it."""
    return Path(results_dir) / "sweep.json"


def recorded_sweeps(results_dir) -> Dict[str, Dict[str, Any]]:
    """The sweeps recorded in `results_dir/sweep.json` by name (empty if there is no such file), each a mapping
    whose `spec` is a mapping (empty when absent), so that every reader can index them without its own checks."""
    path = sweep_file(results_dir)
    if not path.exists():
        return {}
    try:
        sweeps = json.loads(path.read_text()).get("sweeps", {})
        bad = [name for name, entry in sweeps.items()
               if not isinstance(entry, dict) or not isinstance(entry.get("spec") or {}, dict)]
    except (ValueError, AttributeError) as error:
        raise ReportError(f"cannot read {path}: {error}") from error
    if bad:
        raise ReportError(f"cannot read {path}: the record of sweep {bad[0]!r} (or its spec) is not a mapping")
    return {name: {**entry, "spec": entry.get("spec") or {}} for name, entry in sweeps.items()}


def _recorded_specs(results_dir) -> List[Dict[str, Any]]:
    return [entry["spec"] for entry in recorded_sweeps(results_dir).values()]


def spec_baseline(results_dir) -> Optional[str]:
    """The `baseline` of the sweep spec(s) recorded in `results_dir/sweep.json`, when they name one (and agree)."""
    named = {spec.get("baseline") for spec in _recorded_specs(results_dir)} - {None}
    if len(named) > 1:
        raise ReportError(f"{sweep_file(results_dir)}: the sweeps recorded there name different baselines "
                          f"{sorted(named)}; pass --baseline ARM")
    return next(iter(named), None)


def spec_budget_cost(results_dir) -> Optional[str]:
    """`flops` when the sweep(s) recorded in `results_dir/sweep.json` budget every run in FLOPs, else None.

    Such a sweep gave every arm the same compute rather than the same wall time, so its claims are judged in FLOPs
    (device-hours on a shared machine then measure the load as much as the method)."""
    budgets = [spec.get("budget") or {} for spec in _recorded_specs(results_dir)]
    return "flops" if budgets and all("flops" in b for b in budgets) else None


# The metrics column each budget kind is counted in: the claims' cost columns (the ledger's), and the step itself.
BUDGET_COLUMNS = {**COSTS, "steps": "step"}


def spec_extension(results_dir) -> Optional[Dict[str, Any]]:
    """The `extend:` of the sweep recorded in `results_dir/sweep.json`, as `{arms, column, budget, extended}`
    (the metrics column of the budget's kind, the common budget, the longer one), or None without one. Two
    sweeps there with different extensions are an error: which budget is common would be ambiguous."""
    specs = _recorded_specs(results_dir)
    found = []
    for spec in specs:
        extend = spec.get("extend")
        if not extend:
            continue
        kind = next(iter(extend["budget"]))
        found.append({"arms": list(extend["arms"]), "column": BUDGET_COLUMNS[kind], "kind": kind,
                      "budget": float(spec["budget"][kind]), "extended": float(extend["budget"][kind])})
    if len(found) > 1 and any(f != found[0] for f in found[1:]):
        raise ReportError(f"{sweep_file(results_dir)}: the sweeps recorded there extend different arms or "
                          "budgets; report them from separate folders")
    return found[0] if found else None
