"""Which runs of a results folder are not finished, and the baseline its sweep spec names: a report on a
half-finished sweep says what is left out instead of silently comparing the arms that happen to be done."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

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


def spec_baseline(results_dir) -> Optional[str]:
    """The `baseline` of the sweep spec(s) recorded in `results_dir/sweep.json`, when they name one (and agree)."""
    path = Path(results_dir) / "sweep.json"
    if not path.exists():
        return None
    try:
        sweeps = json.loads(path.read_text()).get("sweeps", {})
        named = {(s.get("spec") or {}).get("baseline") for s in sweeps.values()} - {None}
    except (ValueError, AttributeError) as error:
        raise ReportError(f"cannot read {path}: {error}") from error
    if len(named) > 1:
        raise ReportError(f"{path}: the sweeps recorded there name different baselines {sorted(named)}; "
                          f"pass --baseline ARM")
    return next(iter(named), None)


def spec_budget_cost(results_dir) -> Optional[str]:
    """`flops` when the sweep(s) recorded in `results_dir/sweep.json` budget every run in FLOPs, else None.

    Such a sweep gave every arm the same compute rather than the same wall time, so its claims are judged in FLOPs
    (device-hours on a shared machine then measure the load as much as the method)."""
    path = Path(results_dir) / "sweep.json"
    if not path.exists():
        return None
    try:
        sweeps = json.loads(path.read_text()).get("sweeps", {})
        budgets = [(s.get("spec") or {}).get("budget") or {} for s in sweeps.values()]
    except (ValueError, AttributeError) as error:
        raise ReportError(f"cannot read {path}: {error}") from error
    return "flops" if budgets and all("flops" in b for b in budgets) else None


# The metrics column each budget kind is counted in (the ledger's; `steps` is the step itself).
BUDGET_COLUMNS = {"steps": "step", "gpu_hours": "cost/gpu_hours", "nfe": "cost/nfe", "flops": "cost/flops"}


def spec_extension(results_dir) -> Optional[Dict[str, Any]]:
    """The `extend:` of the sweep recorded in `results_dir/sweep.json`, as `{arms, column, budget, extended}`
    (the metrics column of the budget's kind, the common budget, the longer one), or None without one. Two
    sweeps there with different extensions are an error: which budget is common would be ambiguous."""
    path = Path(results_dir) / "sweep.json"
    if not path.exists():
        return None
    try:
        specs = [s.get("spec") or {} for s in json.loads(path.read_text()).get("sweeps", {}).values()]
    except (ValueError, AttributeError) as error:
        raise ReportError(f"cannot read {path}: {error}") from error
    found = []
    for spec in specs:
        extend = spec.get("extend")
        if not extend:
            continue
        kind = next(iter(extend["budget"]))
        found.append({"arms": list(extend["arms"]), "column": BUDGET_COLUMNS[kind], "kind": kind,
                      "budget": float(spec["budget"][kind]), "extended": float(extend["budget"][kind])})
    if len(found) > 1 and any(f != found[0] for f in found[1:]):
        raise ReportError(f"{path}: the sweeps recorded there extend different arms or budgets; report them from "
                          "separate folders")
    return found[0] if found else None
