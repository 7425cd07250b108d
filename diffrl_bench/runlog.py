"""The run's records: the metrics table (JSON lines, one row per RL step, converted to CSV) and run facts."""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Dict, List

from diffrl_bench.fileio import atomic_write

log = logging.getLogger("diffrl_bench")

TRACKED_PACKAGES = ("diffrl-bench", "torch", "diffusers", "transformers", "accelerate", "peft", "deepspeed",
                    "omegaconf", "numpy", "pandas")


class MetricsLog:
    """Append-only `metrics.jsonl`; `metrics.csv` is regenerated from it (a tidy table: one row per step)."""

    def __init__(self, directory: Path, writable: bool = True):
        self.path = directory / "metrics.jsonl"
        self.csv_path = directory / "metrics.csv"
        # Only the main process writes; the others read the same table (multi-process runs).
        self.writable = writable

    def append(self, row: Dict[str, float]) -> None:
        if not self.writable:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")
            handle.flush()

    def rows(self) -> List[dict]:
        """The logged rows. A last line cut short (a kill or a full disk mid-write) is named and left out (the
        next `truncate_after` rewrites the file without it); a broken line before the last is an error."""
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                if number == len(lines):
                    log.warning("%s:%d: the last row was cut short (%s); dropped, the %d rows before it are kept",
                                self.path, number, error.msg, len(rows))
                    continue
                raise ValueError(f"{self.path}:{number}: not a JSON row ({error.msg}); only the last row can be "
                                 f"cut short by a crash, so this file was edited or damaged") from None
        return rows

    def truncate_after(self, step: int) -> int:
        """Drop rows logged after `step` (a resumed run redoes them); returns how many were dropped."""
        rows = self.rows()
        kept = [r for r in rows if r.get("step", -1) <= step]
        if not self.writable:
            return len(rows) - len(kept)
        # Rewritten atomically: a kill mid-write must not lose the rows being kept.
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return len(rows) - len(kept)

    def has_eval_at(self, step: int) -> bool:
        return any(r.get("step") == step and any(k.startswith("eval/") for k in r) for r in self.rows())

    def set_aside(self) -> Path | None:
        """Move an earlier attempt's rows to `metrics.jsonl.attemptN` and its table to `metrics.csv.attemptN` (never
        deleted); returns where the rows went (or the table, when only a table was there), if anywhere.

        The table goes too: it is what `report` reads, and left in place it would describe a trajectory the
        restarted run no longer has (a finished run's table copied back without its rows or checkpoints, then
        extended, restarts from step 0 on other float sums)."""
        files = (self.path, self.csv_path)
        present = [path for path in files if path.exists()]
        if not self.writable or not present:
            return None
        n = 1
        while any(path.with_name(f"{path.name}.attempt{n}").exists() for path in files):
            n += 1
        for path in present:
            os.replace(path, path.with_name(f"{path.name}.attempt{n}"))
        return present[0].with_name(f"{present[0].name}.attempt{n}")

    def to_frame(self):
        import pandas as pd

        rows = self.rows()
        if not rows:
            return pd.DataFrame()
        # Eval rows and train rows of one step are merged into that step's row.
        frame = pd.DataFrame(rows).groupby("step", as_index=False).last()
        return frame

    def write_csv(self):
        frame = self.to_frame()
        frame.to_csv(self.csv_path, index=False)
        return frame


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return "unknown"
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_info(device_kind: str, world_size: int) -> dict:
    packages = {}
    for name in TRACKED_PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {"git_commit": git_commit(), "packages": packages, "python": sys.version.split()[0],
            "platform": platform.platform(), "device_kind": device_kind, "world_size": world_size,
            "command": sys.argv, "cpu_env": cpu_env(), "cpu": cpu_kind()}


def cpu_model(cpuinfo: str) -> str | None:
    """The processor's name in a Linux /proc/cpuinfo text (its first `model name` line), None without one."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return None


def cpu_kind() -> dict:
    """The processor and the vector instruction set torch's CPU kernels dispatch to: which machines can recompute
    this run bit for bit (float sums differ across them; docs/sweeps.md, "Extending a run whose checkpoints are
    gone")."""
    import torch

    try:
        model = cpu_model(Path("/proc/cpuinfo").read_text())
    except OSError:
        model = None
    return {"model": model or platform.processor() or None, "capability": torch.backends.cpu.get_cpu_capability()}


# What decides a CPU run's speed but not its results (the thread count is in device_kind): timings of two runs
# compare only when these match.
CPU_ENV_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LD_PRELOAD", "OMP_NUM_THREADS", "DIFFRL_BENCH_MAX_THREADS")


def cpu_env() -> dict:
    """The environment settings that shape a CPU run's speed (OpenMP wait policy, preloaded allocator, thread
    caps), None where unset."""
    return {key: os.environ.get(key) for key in CPU_ENV_KEYS}


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def run_summary(directory: Path, eval_rewards: List[str], seconds: float) -> str:
    """The line `train` ends with: held-out score at the first and last evaluation, time, and the figures."""
    rows = MetricsLog(directory).rows()
    first = eval_rewards[0] if eval_rewards else "reward"
    # The headline the Trainer logs (strict task mean); rewards without a strict part have only their own column.
    candidates = [f"eval/{first}.strict.task_mean", f"eval/{first}"]
    evals = [r for r in rows if any(r.get(k) is not None for k in candidates)]
    if evals:
        key = next(k for k in candidates if evals[0].get(k) is not None)
        evals = [r for r in evals if r.get(key) is not None]
        start, end = evals[0], evals[-1]
        score = (f"held-out {key[len('eval/'):]}: {start[key]:.4f} at step {start['step']} -> "
                 f"{end[key]:.4f} at step {end['step']}")
    else:
        score = "no held-out evaluation (eval.every < 0)"
    took = f"took {_duration(seconds)}"
    device_s = next((r["cost/device_s"] for r in reversed(rows) if r.get("cost/device_s") is not None), None)
    if device_s is not None and abs(device_s - seconds) > 1:
        took += f" ({_duration(device_s)} device time over all attempts)"
    figures = [p.name for p in [directory / "reward_vs_cost.png", *sorted(directory.glob("grid_*.png"))] if p.exists()]
    where = f"figures in {directory}: {', '.join(figures)}" if figures else f"results in {directory}"
    return f"done: {score}; {took}; {where}"
