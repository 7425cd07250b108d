"""What a sweep keeps on disk: per-run markers (`DONE`, `FAILED`), locks, `arm.json` identities, the status of
each run, and the sweep's own record `sweep.json`."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from diffrl_bench.fileio import atomic_write
from diffrl_bench.sweep.spec import Spec, SweepRun

DONE_FILE, FAILED_FILE, LOCK_FILE, ARM_FILE = "DONE", "FAILED", ".lock", "arm.json"
NEW, PARTIAL, RUNNING, DONE, FAILED = "new", "partial", "running", "done", "failed"
STATUSES = (DONE, RUNNING, PARTIAL, FAILED, NEW)


def _identity(record: Dict[str, Any]) -> Dict[str, Any]:
    # The folder's location is not part of what the run is: a moved results folder is still the same run. Nor are
    # the tracker grouping keys (added later; a run folder written before them is still the same run).
    return {"config": record.get("config"),
            "overrides": [o for o in record.get("overrides", [])
                          if not o.startswith(("output_dir=", "log.group=", "log.tags="))]}


def identity_conflict(run: SweepRun) -> Optional[str]:
    """Why the run's folder cannot hold this run (its `arm.json` records another config or overrides), or None."""
    path = run.out / ARM_FILE
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"{path} is unreadable; it cannot be checked against run {run.id}"
    mine, theirs = _identity(run.record()), _identity(recorded)
    if mine == theirs:
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
        return DONE
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
