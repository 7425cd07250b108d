"""Executing a sweep's runs: in this process one after another, as submitit local jobs side by side (on disjoint
device groups, sharing the CPU cores without oversubscribing them), or as one Slurm job array (jobs requeue themselves when preempted or timed out: job.RequeueableRun); a progress
bar over runs; `execute` skips what is done or running elsewhere."""
from __future__ import annotations

import logging
import os
import queue
import threading
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from diffrl_bench.sweep.job import RequeueableRun, RunJob, run_job
from diffrl_bench.sweep.spec import Spec, SweepError, SweepRun, spec_error
from diffrl_bench.sweep.state import DONE, FAILED, FAILED_FILE, RUNNING, status_of
from diffrl_bench.threads import available_cores

log = logging.getLogger("diffrl_bench.sweep")

# submitit's local executor kills a job after 2 minutes unless told otherwise; a training run takes far longer.
LOCAL_TIMEOUT_MIN = 7 * 24 * 60
# After Ctrl-C, how long the sweep waits for its local job processes to end (submitit kills them within seconds).
CANCEL_WAIT_S = 30.0


class Progress:
    """A tqdm bar over runs with counts, plus a log line per run start and finish."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        self.bar = tqdm(total=total, unit="run", desc="sweep", disable=not enabled, dynamic_ncols=True)

    def _refresh(self) -> None:
        self.bar.set_postfix_str(", ".join(f"{k} {self.counts[k]}" for k in (DONE, "active", FAILED, RUNNING)
                                           if self.counts[k]))

    def already(self, run: SweepRun, status: str) -> None:
        with self.lock:
            self.counts[status] += 1
            if status == RUNNING:
                log.info("skip %s: another process is running it (its lock is held)", run.id)
            self.bar.update(1)
            self._refresh()

    def started(self, run: SweepRun, how: str) -> None:
        with self.lock:
            self.counts["active"] += 1
            log.info("start %s (%s)", run.id, how)
            self._refresh()

    def finished(self, run: SweepRun, result: Dict[str, Any]) -> None:
        with self.lock:
            self.counts["active"] -= 1
            status = result["status"]
            self.counts[status] += 1
            if status == DONE:
                log.info("done %s in %.1f s", run.id, result.get("seconds", 0.0))
            elif status == RUNNING:
                log.info("skip %s: another process took it first", run.id)
            else:
                log.error("FAILED %s: %s (details in %s)", run.id, result.get("error"), run.out / FAILED_FILE)
            self.bar.update(1)
            self._refresh()

    def close(self) -> None:
        self.bar.close()


def _visible_devices() -> List[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch CUDA at all means no devices
        return []


def device_groups(devices: Sequence[str], per_job: int) -> List[str]:
    """Disjoint CUDA_VISIBLE_DEVICES strings of `per_job` devices each (e.g. ["0,1", "2,3"])."""
    return [",".join(devices[i:i + per_job]) for i in range(0, len(devices) - per_job + 1, per_job)]


def _job(spec: Spec, run: SweepRun, devices: Optional[str] = None, max_threads: Optional[int] = None) -> RunJob:
    e = spec.executor
    return RunJob(run=run, launcher=e.launcher, num_processes=e.num_processes, launcher_args=e.launcher_args,
                  devices=devices, max_threads=max_threads)


def processes_per_run(spec: Spec) -> int:
    return spec.executor.num_processes if spec.executor.launcher == "accelerate" else 1


def thread_share(parallel: int, processes: int = 1, cores: Optional[int] = None) -> int:
    """CPU threads per process when `parallel` runs of `processes` processes each share the cores: an equal
    whole share, at least one (docs/sweeps.md, "Threads")."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // (parallel * processes))


def cpu_parallelism(spec: Spec, requested: int, has_devices: bool) -> int:
    """At most as many concurrent CPU runs as their processes have cores: past that even one thread each
    oversubscribes them. Runs on devices are left as asked (their CPU work is small)."""
    cores = available_cores()
    fits = max(1, cores // processes_per_run(spec))
    if has_devices or requested <= fits:
        return requested
    log.warning("executor.parallel %d lowered to %d: %d cores fit %d CPU runs of %d process(es) at one thread "
                "each; more would oversubscribe them", requested, fits, cores, fits, processes_per_run(spec))
    return fits


def _submitit_error(spec: Spec, error: Exception) -> SweepError:
    return spec_error(spec.path, "executor.parameters", f"submitit refused them: {error}")


def _execute_sequential(spec: Spec, runs: Sequence[SweepRun], progress: Progress) -> None:
    for run in runs:
        progress.started(run, "in this process" if spec.executor.launcher == "python" else "accelerate launch")
        progress.finished(run, run_job(_job(spec, run)))


def _receive_sigint() -> None:
    """Stopping local jobs is SIGINT to each (submitit's `cancel`). A process started in the background by a script
    (`nohup diffrl-bench sweep ... &`) inherits SIGINT ignored, and so would the jobs it starts, which could then
    not be stopped: take SIGINT back (as Ctrl-C) before any job is started, so that they are born with it too."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _child_pids(pid: int) -> List[int]:
    """The processes `pid` started, from /proc (empty where there is none: the caller falls back)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The parent pid is the 2nd field after the command name, which is in parentheses and may hold spaces.
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):  # the process ended while we looked
            continue
    return children


def _stop_local_jobs(jobs: Sequence[Any]) -> None:
    """SIGINT to each job's run process (the run stops as on Ctrl-C, its checkpoints kept): submitit's controller
    of the job sees it end and exits normally. submitit's own `cancel` signals the controller instead, which
    then prints a KeyboardInterrupt traceback into the sweep's log and SIGKILLs the run after a second; it
    remains the fallback for a controller whose run cannot be found (no /proc) or outlives half the wait."""
    for job in jobs:
        children = _child_pids(int(job.job_id)) if not job.done() else []
        for pid in children:
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        if not children and not job.done():
            job.cancel(check=False)
    deadline = time.monotonic() + CANCEL_WAIT_S
    half = time.monotonic() + CANCEL_WAIT_S / 2
    cancelled = False
    while any(not job.done() for job in jobs) and time.monotonic() < deadline:
        if not cancelled and time.monotonic() > half:
            for job in jobs:
                if not job.done():
                    job.cancel(check=False)
            cancelled = True
        time.sleep(0.1)


def _execute_local(spec: Spec, runs: Sequence[SweepRun], progress: Progress) -> None:
    """submitit's local executor, at most `parallel` jobs at a time, each on its own device group."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    import submitit

    per_job = processes_per_run(spec)
    groups = device_groups(_visible_devices(), per_job)
    parallel = cpu_parallelism(spec, spec.executor.parallel or max(1, len(groups)), bool(groups))
    # Runs side by side share the cores: each gets an equal whole share of threads, never oversubscribing them.
    max_threads = thread_share(parallel, per_job)
    log.info("local executor: %d run(s) at a time, at most %d CPU thread(s) per process", parallel, max_threads)
    _receive_sigint()
    executor = submitit.AutoExecutor(folder=spec.results_dir / "submitit", cluster="local")
    try:
        executor.update_parameters(**{"timeout_min": LOCAL_TIMEOUT_MIN, **spec.executor.parameters})
    except (NameError, AssertionError, ValueError) as error:
        raise _submitit_error(spec, error) from None
    # One token per concurrent job; with more jobs than device groups, groups are shared round-robin.
    slots: "queue.Queue[Optional[str]]" = queue.Queue()
    for i in range(parallel):
        slots.put(groups[i % len(groups)] if groups else None)
    submit_lock = threading.Lock()
    jobs = []

    def work(run: SweepRun) -> Dict[str, Any]:
        devices = slots.get()
        try:
            with submit_lock:
                job = executor.submit(RequeueableRun(), _job(spec, run, devices, max_threads))
                jobs.append(job)
            where = f"local job {job.job_id}" + (f", CUDA_VISIBLE_DEVICES={devices}" if devices else "")
            progress.started(run, where)
            try:
                return job.result()
            except Exception as error:  # noqa: BLE001 - the job process died (killed, out of memory)
                return {"run": run.id, "status": FAILED, "error": f"job {job.job_id} died: {error}"}
        finally:
            slots.put(devices)

    pool = ThreadPoolExecutor(max_workers=parallel)
    try:
        futures = {pool.submit(work, run): run for run in runs}
        for future in as_completed(futures):
            progress.finished(futures[future], future.result())
    except KeyboardInterrupt:
        # Local job processes outlive this one unless told to stop; the sweep returns once they are gone, so that
        # nothing of it is left running.
        pool.shutdown(wait=False, cancel_futures=True)
        _stop_local_jobs(list(jobs))
        raise
    pool.shutdown()


def _execute_slurm(spec: Spec, runs: Sequence[SweepRun], progress: Progress) -> None:
    """One Slurm job array through submitit; this process only waits for the jobs (killing it leaves them be)."""
    import submitit
    from submitit.helpers import as_completed, clean_env

    cluster = spec.executor.cluster
    try:
        executor = submitit.AutoExecutor(folder=spec.results_dir / "submitit", cluster=cluster)
        parameters = dict(spec.executor.parameters)
        if spec.executor.parallel:
            parameters.setdefault("slurm_array_parallelism", spec.executor.parallel)
        if cluster == "local":
            parameters.setdefault("timeout_min", LOCAL_TIMEOUT_MIN)
        executor.update_parameters(**parameters)
    except (NameError, AssertionError, ValueError, RuntimeError) as error:
        raise _submitit_error(spec, error) from None
    # A sweep started inside a Slurm allocation must not hand its SLURM_* variables to the jobs it submits.
    with clean_env():
        with executor.batch():
            jobs = [executor.submit(RequeueableRun(), _job(spec, run)) for run in runs]
    by_job = {}
    for job, run in zip(jobs, runs):
        by_job[id(job)] = run
        progress.started(run, f"{cluster} job {job.job_id}")
    for job in as_completed(jobs, poll_frequency=30 if cluster == "slurm" else 0.5):
        run = by_job[id(job)]
        try:
            result = job.result()
        except Exception as error:  # noqa: BLE001 - the job died or was cancelled
            result = {"run": run.id, "status": FAILED, "error": f"job {job.job_id}: {error}"}
        progress.finished(run, result)


EXECUTORS = {"sequential": _execute_sequential, "local": _execute_local, "slurm": _execute_slurm}


def execute(spec: Spec, runs: Sequence[SweepRun], progress: bool = True) -> Counter:
    """SweepRun what is not done yet; returns the final count per status."""
    bar = Progress(len(runs), progress)
    todo = []
    for run in runs:
        status = status_of(run)
        if status in (DONE, RUNNING):
            bar.already(run, status)
        else:
            todo.append(run)
    log.info("sweep %s: %d runs, %d to run (%s executor) -> %s", spec.name, len(runs), len(todo),
             spec.executor.kind, spec.results_dir)
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            if todo:
                EXECUTORS[spec.executor.kind](spec, todo, bar)
    finally:
        bar.close()
    return bar.counts
