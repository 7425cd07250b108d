"""The CPU thread policy of a run: how many intra-op threads torch uses, and how OpenMP's idle threads wait.

Oversubscribing the cores is the largest cost on a shared CPU machine (issue 18: a 2-thread toy step took 75 s
against 10.9 s with one thread while another process kept one of the two cores busy), so a run never uses more
threads than the cores this process may run on (`os.sched_getaffinity`, which follows `taskset`, cgroup cpusets
and Slurm's CPU binding), nor more than a sweep executor's share (`MAX_THREADS_ENV`, set for the runs it starts
side by side):

- `train.threads: 0` (auto): the cores available, capped by `OMP_NUM_THREADS` when that is set and by torch's
  own default (which counts physical cores but not the affinity set: alone it oversubscribes a container's or a
  Slurm job's share of a large machine);
- `train.threads: N`: N, but never more than the cores available (a warning says when it is lowered).
Both are capped by `MAX_THREADS_ENV`. The count is a deterministic function of the configuration and the CPU set,
never of the momentary load, because the thread count can change float reduction order and with it the last
digits of a run; the count used is recorded in the run's `run_info.json` (`device_kind`, "cpu (N threads)").

`configure_openmp_env` (OMP_WAIT_POLICY=PASSIVE when other processes keep a core busy at start) must run before torch is
imported (the CLI entry points call it first thing): GNU OpenMP reads its wait policy once, when torch loads it.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import MutableMapping, Optional

log = logging.getLogger("diffrl_bench")

MAX_THREADS_ENV = "DIFFRL_BENCH_MAX_THREADS"
"""a cap on every run's intra-op threads; a sweep executor sets it for the runs it starts side by side"""
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
# GNU OpenMP's own knob for the same spinning; a user who set either has chosen, and is left alone.
SPIN_ENV = "GOMP_SPINCOUNT"
DEFAULT_WAIT_POLICY = "PASSIVE"
BUSY_LOAD = 0.5
"""cores' worth of other processes' work (`busy_cores`) from which the machine counts as busy at start"""


def available_cores() -> int:
    """The CPUs this process may run on (its affinity set), or the machine's count where affinity is unknown."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _env_count(name: str, env: Optional[MutableMapping[str, str]] = None) -> Optional[int]:
    """A positive integer from the environment, None when unset; a malformed value is refused, naming it (a
    ConfigError, so that the command line prints one line)."""
    from diffrl_bench.config import ConfigError

    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return None
    # OMP_NUM_THREADS may list nested levels ("4,2"): the first is the outer level's count.
    first = raw.split(",")[0].strip()
    if not first.isdigit() or int(first) < 1:
        raise ConfigError(f"environment variable {name}={raw!r} must be a positive integer")
    return int(first)


def thread_cap() -> int:
    """The most threads a run may use here: the available cores, or the executor's share when lower."""
    cap = available_cores()
    share = _env_count(MAX_THREADS_ENV)
    return min(cap, share) if share is not None else cap


def resolve_threads(requested: int, default: Optional[int] = None) -> int:
    """The intra-op thread count for `train.threads = requested` (0: auto) under this process's cap; auto takes
    `default` (torch's own choice, see `apply_threads`) when given, else every core available."""
    if requested < 0:
        raise ValueError(f"train.threads must be 0 (auto) or a positive count, got {requested}")
    cap = thread_cap()
    if requested == 0:
        omp = _env_count("OMP_NUM_THREADS")
        auto = min(cap, omp) if omp is not None else cap
        return min(auto, default) if default is not None else auto
    if requested > cap:
        log.warning("train.threads=%d lowered to %d: only %d cores are available to this run (more threads than "
                    "cores oversubscribe them, which costs far more than it gains)", requested, cap, cap)
    return min(requested, cap)


_torch_default: Optional[int] = None


def apply_threads(requested: int) -> int:
    """Set torch's intra-op threads by `resolve_threads`; returns the count. Auto never exceeds torch's own
    default (the physical cores: hyper-threads seldom help these kernels), taken before anything here changed it,
    so that runs after another one in the same process (a sequential sweep) resolve alike."""
    global _torch_default
    import torch

    if _torch_default is None:
        _torch_default = torch.get_num_threads()
    count = resolve_threads(requested, _torch_default)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def busy_cores(interval: float = 0.2) -> Optional[float]:
    """How many cores' worth of work other processes are doing now: the machine's non-idle CPU time over a short
    sample of /proc/stat, taken while this process sleeps (so its own start-up is not counted). None where
    /proc/stat is missing. Unlike the load average (a one-minute mean), it does not still count a run that just
    ended, e.g. the previous run of a sequential sweep."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    cpus = os.cpu_count() or 1
    return cpus * (1.0 - (idle1 - idle0) / (total1 - total0))


def configure_openmp_env(env: Optional[MutableMapping[str, str]] = None, load: Optional[float] = None) -> Optional[str]:
    """Let idle OpenMP threads sleep instead of spinning (`OMP_WAIT_POLICY=PASSIVE`) when other processes already
    keep at least BUSY_LOAD cores' worth busy at start (`busy_cores`, or `load` when given), unless the environment
    chose (`OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` set). Measured on the toy step (benchmarks/speed.py, 2-core Intel
    Xeon): on a quiet machine spinning is faster (PASSIVE 1.68x the step time), with a busy neighbour PASSIVE is
    faster (0.60x of spinning's, which waits for a descheduled sibling at every barrier), and far more so under
    heavier load. The wait policy changes no result (only how threads idle), so choosing it by the machine's state
    is safe, unlike the thread count. Returns the value set, or None. Takes effect only before torch (and its
    OpenMP) is loaded; child processes inherit it."""
    env = os.environ if env is None else env
    if WAIT_POLICY_ENV in env or SPIN_ENV in env:
        return None
    if load is None:
        load = busy_cores()
        if load is None:
            return None
    if load < BUSY_LOAD:
        return None
    env[WAIT_POLICY_ENV] = DEFAULT_WAIT_POLICY
    return DEFAULT_WAIT_POLICY
