"""One run as a job: what a worker (this process, a local job or a Slurm job) needs, how it executes the run under
its folder lock, in-process or through `accelerate launch`, and `RequeueableRun`, the submitit callable that
requeues itself when preempted or at its time limit."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from submitit.helpers import Checkpointable, DelayedSubmission

from diffrl_bench.config import load_config
from diffrl_bench.console import setup_logging
from diffrl_bench.fileio import atomic_write
from diffrl_bench.sweep.spec import SweepRun
from diffrl_bench.sweep.state import (ARM_FILE, DONE, DONE_FILE, FAILED, FAILED_FILE, RUNNING, extension_of,
                                      identity_conflict, last_step, reopen_for_extension, run_lock)
from diffrl_bench.threads import MAX_THREADS_ENV

log = logging.getLogger("diffrl_bench.sweep")

# A status probe holds a run's lock for an instant; a job waits this long before concluding another process runs it.
LOCK_WAIT_S = 5.0


@dataclass
class RunJob:
    """What a worker (this process, a local job or a Slurm job) needs to execute one run."""
    run: SweepRun
    launcher: str = "python"
    num_processes: int = 1
    launcher_args: List[str] = field(default_factory=list)
    devices: Optional[str] = None
    """CUDA_VISIBLE_DEVICES for this job; None keeps the environment's"""
    max_threads: Optional[int] = None
    """the most CPU threads the run may use (threads.MAX_THREADS_ENV), its share of the cores when runs go side by
    side; None keeps the environment's"""
    lock_wait_s: float = LOCK_WAIT_S


def accelerate_command(config: str, overrides: Sequence[str], num_processes: int = 1,
                       launcher_args: Sequence[str] = (), main_process_port: Optional[int] = None,
                       python: str = sys.executable) -> List[str]:
    """`accelerate launch ... -m diffrl_bench.cli train CONFIG OVERRIDES`, through this interpreter so that a job
    uses the same environment as the sweep whatever its PATH."""
    command = [python, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if num_processes > 1 and "--multi_gpu" not in launcher_args:
        command.append("--multi_gpu")
    if main_process_port is not None and "--main_process_port" not in launcher_args:
        command += ["--main_process_port", str(main_process_port)]
    command += list(launcher_args)
    command += ["-m", "diffrl_bench.cli", "train", "--no-progress", config, *overrides]
    return command


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_accelerate(job: RunJob) -> None:
    port = _free_port() if job.num_processes > 1 else None
    command = accelerate_command(job.run.config, job.run.overrides, job.num_processes, job.launcher_args, port)
    env = dict(os.environ)
    if job.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = job.devices
    log_path = job.run.out / "train.log"
    with open(log_path, "a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"accelerate launch exited with status {code}; end of {log_path}:\n{tail}")


def _set_aside_unresumable_metrics(out: Path) -> None:
    """A run killed before its first checkpoint restarts from step 0, and the Trainer would append its rows after
    the killed attempt's: keep those rows, but out of the run's table."""
    from diffrl_bench.checkpoint import latest_checkpoint
    from diffrl_bench.runlog import MetricsLog

    if latest_checkpoint(out / "checkpoints") is not None:
        return
    moved = MetricsLog(out).set_aside()
    if moved is not None:
        log.warning("%s: no checkpoint to resume from; the earlier attempt's metrics moved aside (%s)", out, moved.name)


def run_job(job: RunJob) -> Dict[str, Any]:
    """Execute one run under its folder lock. Never raises for a failed run: the failure goes to `FAILED`."""
    from filelock import Timeout

    if not logging.getLogger().handlers:  # a fresh submitit job process
        setup_logging(False)
    if job.devices is not None:
        # Before anything initialises CUDA in this job process.
        os.environ["CUDA_VISIBLE_DEVICES"] = job.devices
    if job.max_threads is not None:
        # Read by the run's thread policy (and inherited by an `accelerate launch`'s processes).
        os.environ[MAX_THREADS_ENV] = str(job.max_threads)
    run, out = job.run, job.run.out
    result = {"run": run.id, "status": FAILED, "seconds": 0.0, "error": None}
    out.mkdir(parents=True, exist_ok=True)
    lock = run_lock(out)
    try:
        lock.acquire(timeout=job.lock_wait_s)
    except Timeout:
        return {**result, "status": RUNNING, "error": "another process holds the run's lock"}
    try:
        if (out / DONE_FILE).exists():
            grown = extension_of(run)
            if grown is None:
                return {**result, "status": DONE, "skipped": True}
            reopen_for_extension(run)
            log.info("extending %s: %s %g -> %g, from its last checkpoint", run.id, grown["key"], grown["recorded"],
                     grown["new"])
        conflict = identity_conflict(run)
        if conflict:
            return {**result, "error": conflict}
        atomic_write(out / ARM_FILE, json.dumps(run.record(), indent=2))
        if (out / FAILED_FILE).exists():
            os.replace(out / FAILED_FILE, out / f"{FAILED_FILE}.previous")
        _set_aside_unresumable_metrics(out)
        start = time.time()
        try:
            if job.launcher == "accelerate":
                _launch_accelerate(job)
            else:
                from diffrl_bench.train import train

                train(load_config(run.config, run.overrides), progress=False)
        except Exception:  # noqa: BLE001 - any failure of one run is recorded and the sweep goes on
            text = traceback.format_exc()
            atomic_write(out / FAILED_FILE, text)
            return {**result, "seconds": time.time() - start, "error": text.strip().splitlines()[-1]}
        seconds = time.time() - start
        atomic_write(out / DONE_FILE, json.dumps({
            "run": run.id, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(), "last_step": last_step(out), "seconds_this_attempt": round(seconds, 1),
        }, indent=2))
        return {**result, "status": DONE, "seconds": seconds}
    finally:
        lock.release()


class RequeueableRun(Checkpointable):
    """`run_job` as a submitit job that goes back into the queue when Slurm preempts it or its time limit nears.

    submitit's job process catches the signal Slurm sends ahead of the end (USR2 by default, `--signal`
    USR2@`signal_delay_s`; SIGTERM alone is ignored), calls `checkpoint`, requeues the job (`scontrol requeue`;
    the local executor restarts it) and exits: the SystemExit unwinds the Trainer and releases the run's lock. The
    state is the run folder itself: the next attempt's Trainer resumes from the newest checkpoint and truncates
    metrics.jsonl after it, so the steps since then are redone and logged once. Preemptions requeue without limit;
    time limits at most `slurm_max_num_timeout` times (submitit's default 3).
    """

    def __call__(self, job: RunJob) -> Dict[str, Any]:
        return run_job(job)

    def checkpoint(self, job: RunJob) -> DelayedSubmission:
        from diffrl_bench.checkpoint import latest_checkpoint

        newest = latest_checkpoint(job.run.out / "checkpoints")
        log.warning("%s: interrupted; requeued to resume from %s", job.run.id,
                    newest.name if newest is not None else "the start (no checkpoint yet)")
        return DelayedSubmission(self, job)
