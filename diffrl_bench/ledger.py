"""The cost ledger: what each run spent, per phase, in the units the papers report.

Phases are timed on the main process's wall clock. `rollout`, `reward` and `train` make up the budget;
`eval` is logged but kept out of it. Device-seconds are world size x wall seconds; GPU-hours (device-hours) are
their cumulative sum / 3600, with the device kind recorded beside them. FLOPs are the policy's model FLOPs
(diffrl_bench/flops.py: forward once per call, backward 2x): a cost that does not depend on how busy the machine is. When rewards run in a worker thread
overlapping the next rollout chunk, `reward` counts only the time the main process waited for them, so the budget
phases add up to the wall time actually spent.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Dict, Iterator

PHASES = ("rollout", "reward", "train", "eval")
BUDGET_PHASES = ("rollout", "reward", "train")


class CostLedger:
    """What one run has spent so far, per phase: wall seconds, NFEs, model FLOPs, and the training images generated.

    The Trainer times each phase with `phase(name)` (or adds a measured wait with `add_time`) and counts NFEs and
    images as it goes; every count is cumulative over the run. `columns()` turns the totals into the metrics
    table's `cost/*` columns (device-seconds, GPU-hours and NFEs of the budget phases), and `state_dict` /
    `load_state_dict` carry them through a checkpoint, rescaled when a run resumes on another world size.
    Each second of wall time is charged to `world_size` devices, plus `reward_server_devices` in the budget phases.
    """

    def __init__(self, world_size: int = 1, device_kind: str = "cpu", reward_server_devices: int = 0):
        self.world_size = world_size
        # Devices held by an external reward server (e.g. GenEval's detector) are busy for the whole run: they are
        # charged the budget phases' wall time like the training processes, but not evaluation.
        self.reward_server_devices = reward_server_devices
        self.device_kind = device_kind
        self.wall_s: Dict[str, float] = {p: 0.0 for p in PHASES}
        self.nfe: Dict[str, int] = {p: 0 for p in PHASES}
        self.flops: Dict[str, int] = {p: 0 for p in PHASES}
        self.images = 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in self.wall_s:
            raise KeyError(f"unknown ledger phase {name!r}; phases: {PHASES}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.wall_s[name] += time.perf_counter() - start

    def add_time(self, name: str, seconds: float) -> None:
        self.wall_s[name] += seconds

    def add_nfe(self, name: str, count: int) -> None:
        """Network function evaluations, counted per sample (a batch of 8 images at 10 steps is 80)."""
        self.nfe[name] += int(count)

    def add_flops(self, name: str, flops: int) -> None:
        """Model FLOPs of the policy's network calls in a phase (forwards, backwards, decoding)."""
        self.flops[name] += int(flops)

    def add_images(self, count: int) -> None:
        """Training images generated (eval images are not counted)."""
        self.images += int(count)

    def device_seconds(self, name: str) -> float:
        devices = self.world_size + (self.reward_server_devices if name in BUDGET_PHASES else 0)
        return self.wall_s[name] * devices

    @property
    def budget_device_seconds(self) -> float:
        return sum(self.device_seconds(p) for p in BUDGET_PHASES)

    @property
    def gpu_hours(self) -> float:
        return self.budget_device_seconds / 3600.0

    @property
    def budget_nfe(self) -> int:
        return sum(self.nfe[p] for p in BUDGET_PHASES)

    @property
    def budget_flops(self) -> int:
        return sum(self.flops[p] for p in BUDGET_PHASES)

    def columns(self) -> Dict[str, float]:
        """The `cost/*` columns of the metrics table (all cumulative)."""
        row: Dict[str, float] = {}
        for p in PHASES:
            row[f"cost/{p}_s"] = self.wall_s[p]
            row[f"cost/{p}_device_s"] = self.device_seconds(p)
            row[f"cost/nfe_{p}"] = self.nfe[p]
            row[f"cost/flops_{p}"] = float(self.flops[p])
        row["cost/device_s"] = self.budget_device_seconds
        row["cost/gpu_hours"] = self.gpu_hours
        row["cost/nfe"] = self.budget_nfe
        row["cost/flops"] = float(self.budget_flops)
        row["cost/images"] = self.images
        row["cost/world_size"] = self.world_size
        row["cost/reward_server_devices"] = self.reward_server_devices
        return row

    def state_dict(self) -> dict:
        return {"world_size": self.world_size, "device_kind": self.device_kind, "wall_s": dict(self.wall_s),
                "nfe": dict(self.nfe), "flops": dict(self.flops), "images": self.images}

    def load_state_dict(self, state: dict) -> None:
        self.wall_s = {p: float(state["wall_s"][p]) for p in PHASES}
        self.nfe = {p: int(state["nfe"][p]) for p in PHASES}
        # Checkpoints written before FLOPs were counted carry none: their count restarts at 0.
        self.flops = {p: int(state.get("flops", {}).get(p, 0)) for p in PHASES}
        self.images = int(state["images"])
        # A resumed run may run on another world size; what was spent before keeps its own device-seconds.
        if state["world_size"] != self.world_size:
            scale = state["world_size"] / self.world_size
            self.wall_s = {p: s * scale for p, s in self.wall_s.items()}
