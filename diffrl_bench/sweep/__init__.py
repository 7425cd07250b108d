"""`diffrl-bench sweep SPEC.yaml`: run a spec of arms x seeds x override grids under one shared budget.

A spec states once what every arm must share (model, reward, prompt split, group size, images per step, eval
cadence and prompts, the budget), expands into one run folder per (arm, seed), validates every run's config before
anything starts, and executes the runs in-process, as local submitit jobs or as Slurm jobs. Re-running a spec is
safe: finished runs (a `DONE` marker) are skipped, interrupted ones resume from their last checkpoint, and a lock
per run folder keeps two sweeps from running the same run at once. The format is documented in docs/sweeps.md.

A `tune:` section first runs an equal-budget tuning stage per arm (trials under `tune/`, the choice in
`tune/chosen.json`) whose best setting goes into the seeded runs.

Modules, in import order: `tune` (the `tune:` section, trial points and the choice; pure), `spec` (the format, the
fairness rule, `SweepRun`), `state` (markers, locks, statuses, `sweep.json`), `expansion` (spec -> runs, checked
before any starts), `tuning` (the tuning stage's runs and choice), `job` (one run under its lock, in-process or
through `accelerate launch`), `executors` (sequential, submitit local, Slurm), `cli` (`diffrl-bench sweep`;
`__main__` for `python -m diffrl_bench.sweep`).
"""
from diffrl_bench.sweep.cli import add_arguments, format_counts, format_table, main, run
from diffrl_bench.sweep.executors import EXECUTORS, Progress, device_groups, execute
from diffrl_bench.sweep.expansion import dotlist, expand, format_value, validate_runs
from diffrl_bench.sweep.job import RequeueableRun, RunJob, accelerate_command, run_job
from diffrl_bench.sweep.spec import Arm, ExecutorSpec, Spec, SweepError, SweepRun, load_spec
from diffrl_bench.sweep.state import STATUSES, status_of, write_sweep_record
from diffrl_bench.sweep.tuning import choose, expand_tuning, load_chosen

__all__ = ["EXECUTORS", "STATUSES", "Arm", "ExecutorSpec", "Progress", "RequeueableRun", "RunJob", "Spec", "SweepError", "SweepRun",
           "accelerate_command", "add_arguments", "choose", "device_groups", "dotlist", "execute", "expand",
           "expand_tuning", "format_counts", "format_table", "format_value", "load_chosen", "load_spec", "main", "run",
           "run_job", "status_of", "validate_runs", "write_sweep_record"]
