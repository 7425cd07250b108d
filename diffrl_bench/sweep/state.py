"""What a sweep keeps on disk: per-run markers (`DONE`, `FAILED`), locks, `arm.json` identities, the status of
each run, and the sweep's own record `sweep.json`."""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from omegaconf.errors import OmegaConfBaseException

from diffrl_bench.fileio import atomic_write
from diffrl_bench.sweep.spec import BUDGET_TARGETS, Spec, SweepRun

DONE_FILE, FAILED_FILE, LOCK_FILE, ARM_FILE = "DONE", "FAILED", ".lock", "arm.json"
NEW, PARTIAL, RUNNING, DONE, FAILED = "new", "partial", "running", "done", "failed"
STATUSES = (DONE, RUNNING, PARTIAL, FAILED, NEW)


def _identity(record: Dict[str, Any]) -> Dict[str, Any]:
    # The folder's location is not part of what the run is: a moved results folder is still the same run. Nor are
    # the tracker grouping keys (added later; a run folder written before them is still the same run).
    return {"config": record.get("config"),
            "overrides": [o for o in record.get("overrides", [])
                          if not o.startswith(("output_dir=", "log.group=", "log.tags="))]}


_BUDGET_KEYS = tuple(BUDGET_TARGETS.values())


def _budgets(overrides) -> Dict[str, float]:
    from diffrl_bench.sweep.expansion import parse_dotlist_value  # expansion imports this module

    out = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key in _BUDGET_KEYS:
            try:
                out[key] = float(parse_dotlist_value(value))
            except (TypeError, ValueError, OmegaConfBaseException):
                out[key] = float("nan")
    return out


def _recorded_identity(run: SweepRun) -> Optional[Dict[str, Any]]:
    """The identity `arm.json` in the run's folder records, or None when there is none or it is unreadable."""
    try:
        return _identity(json.loads((run.out / ARM_FILE).read_text()))
    except (OSError, ValueError):
        return None


def _budget_change(mine: Dict[str, Any], theirs: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """When two run identities differ only in one budget of the same kind: the key with the recorded (`theirs`)
    and new (`mine`) values; else None."""
    if mine["config"] != theirs["config"]:
        return None
    rest = [{o for o in side["overrides"] if o.partition("=")[0] not in _BUDGET_KEYS} for side in (mine, theirs)]
    if rest[0] != rest[1]:
        return None
    new, old = _budgets(mine["overrides"]), _budgets(theirs["overrides"])
    moved = [k for k in _BUDGET_KEYS if new.get(k, 0.0) != old.get(k, 0.0)]
    if len(moved) != 1 or not old.get(moved[0], 0.0) > 0 or not new.get(moved[0], 0.0) > 0:
        return None
    return {"key": moved[0], "recorded": old[moved[0]], "new": new[moved[0]]}


def extension_of(run: SweepRun) -> Optional[Dict[str, Any]]:
    """When the run's folder holds the same run with a smaller budget (the spec's `extend:` raised it): the
    budget key with its recorded and new values; else None. Such a run is continued, not refused: its first
    budget is the recorded run itself (the training does not depend on the budget; resuming is exact)."""
    theirs = _recorded_identity(run)
    change = _budget_change(_identity(run.record()), theirs) if theirs is not None else None
    return change if change is not None and change["new"] > change["recorded"] else None


def reopen_for_extension(run: SweepRun) -> None:
    """Make a finished run that `extension_of` found resumable (the caller holds the run's lock and then writes the
    new `arm.json`): its `DONE` marker and `arm.json` are kept as `DONE.before_extension` and
    `arm.before_extension.json`, and the run resumes from its last checkpoint."""
    import shutil

    shutil.copy2(run.out / ARM_FILE, run.out / "arm.before_extension.json")
    os.replace(run.out / DONE_FILE, run.out / f"{DONE_FILE}.before_extension")


def identity_conflict(run: SweepRun) -> Optional[str]:
    """Why the run's folder cannot hold this run (its `arm.json` records another config or overrides), or None.
    Another budget of the same kind is no conflict: a smaller one is extended (`extension_of`), and a run that went
    further than the spec now asks (its `extend:` was removed) holds this one as its beginning and stays done."""
    path = run.out / ARM_FILE
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"{path} is unreadable; it cannot be checked against run {run.id}"
    mine, theirs = _identity(run.record()), _identity(recorded)
    if mine == theirs or _budget_change(mine, theirs) is not None:
        return None
    changed = sorted(set(mine["overrides"]) ^ set(theirs["overrides"]))
    if mine["config"] != theirs["config"]:
        changed.insert(0, f"config {theirs['config']} -> {mine['config']}")
    return (f"run folder {run.out} holds run {run.id} of a different definition (differences: {changed}); "
            f"resuming it would mix two experiments. Use another results_dir (or another arm name)")


def run_lock(run_dir: Path):
    """The run folder's lock: whoever holds it is executing the run."""
    from filelock import FileLock

    return FileLock(str(run_dir / LOCK_FILE))


def _lock_held(run_dir: Path) -> bool:
    from filelock import Timeout

    lock = run_lock(run_dir)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def status_of(run: SweepRun) -> str:
    """One of STATUSES, from the run folder's markers, lock and records."""
    out = run.out
    if not out.is_dir():
        return NEW
    if (out / DONE_FILE).exists():
        # A finished run whose budget the spec has since raised (`extend:`) has more to run.
        return PARTIAL if extension_of(run) is not None else DONE
    if _lock_held(out):
        return RUNNING
    if (out / FAILED_FILE).exists():
        return FAILED
    if (out / "metrics.jsonl").exists() or (out / "checkpoints").exists():
        return PARTIAL
    return NEW


def last_step(out: Path) -> Optional[int]:
    """The step of the last row in a run folder's metrics table, or None when there is none."""
    try:
        lines = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return json.loads(lines[-1]).get("step") if lines else None
    except (OSError, ValueError):
        return None


def write_sweep_record(spec: Spec, runs: Sequence[SweepRun]) -> Path:
    """`<results_dir>/sweep.json`: the resolved spec and run table of every sweep writing to this folder."""
    from filelock import FileLock

    spec.results_dir.mkdir(parents=True, exist_ok=True)
    path = spec.results_dir / "sweep.json"
    with FileLock(str(spec.results_dir / ".sweep.json.lock")):
        try:
            sweeps = json.loads(path.read_text()).get("sweeps", {}) if path.exists() else {}
        except ValueError:
            sweeps = {}
        sweeps[spec.name] = {"spec": spec.describe(),
                             "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "runs": [{**run.record(), "output_dir": run.output_dir} for run in runs]}
        atomic_write(path, json.dumps({"sweeps": sweeps}, indent=2))
    return path
