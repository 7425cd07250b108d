"""`diffrl-bench sweep SPEC.yaml` (also `python -m diffrl_bench.sweep`): options, dry run and status tables,
exit status."""
from __future__ import annotations

import argparse
import logging
import os
from collections import Counter
from typing import Dict, List, Optional, Sequence

from diffrl_bench.config import ConfigError
from diffrl_bench.console import setup_logging
from diffrl_bench.run_guards import stop_on_sigterm
from diffrl_bench.sweep.executors import execute
from diffrl_bench.sweep.expansion import dotlist, expand, validate_runs
from diffrl_bench.sweep.spec import EXECUTOR_KINDS, Spec, SweepError, SweepRun, load_spec
from diffrl_bench.sweep.state import DONE, FAILED, FAILED_FILE, RUNNING, STATUSES, status_of, write_sweep_record
from diffrl_bench.sweep.tune import TuneError
from diffrl_bench.sweep.tuning import (chosen_overrides, chosen_path, choose, expand_tuning, load_chosen, stage_progress,
                                       undecided_arms)

log = logging.getLogger("diffrl_bench.sweep")

DESCRIPTION = ("`diffrl-bench sweep SPEC.yaml`: run a spec of arms x seeds x override grids under one shared "
               "budget.")


def _shorten(path: str) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return path


def format_table(runs: Sequence[SweepRun], statuses: Dict[str, str]) -> str:
    rows = [("arm", "seed", "status", "config", "overrides", "output dir")]
    for run in runs:
        config = run.config if not os.path.isabs(run.config) else _shorten(run.config)
        rows.append((run.name, str(run.seed), statuses[run.id], config, " ".join(run.shown) or "-",
                     _shorten(run.output_dir)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([c.ljust(w) for c, w in zip(r[:-1], widths)] + [r[-1]]) for r in rows)


def format_counts(statuses: Dict[str, str]) -> str:
    counts = Counter(statuses.values())
    return ", ".join(f"{s} {counts[s]}" for s in STATUSES) + f" ({len(statuses)} runs)"


def _print_header(spec: Spec) -> None:
    print(f"sweep {spec.name} ({spec.path}) -> {_shorten(str(spec.results_dir))}")
    print(f"  budget: {spec.budget}    seeds: {spec.seeds}    baseline: {spec.baseline}")
    print(f"  fairness: {' '.join(dotlist(spec.fairness)) or '-'}")
    if spec.common:
        print(f"  common: {' '.join(dotlist(spec.common))}")
    if spec.ablate:
        print(f"  ablated: {', '.join(spec.ablate)}")
    if spec.per_arm:
        print(f"  per arm (each arm's own value): {', '.join(spec.per_arm)}")
    e = spec.executor
    details = [f"launcher {e.launcher}"] + ([f"{e.num_processes} processes"] if e.launcher == "accelerate" else [])
    details += [f"parallel {e.parallel}"] if e.parallel else []
    print(f"  executor: {e.kind} ({', '.join(details)})")


def _tune_header(spec: Spec) -> str:
    t = spec.tune
    lines = [f"tuning stage: {t.trials} trials per arm ({t.sampler}, seed {t.seed}), {t.budget_fraction:g} of the "
             f"budget each, scored on {t.validation_fraction:.0%} of the training prompts (split seed "
             f"{t.validation_seed})" + (f" on {t.metric}" if t.metric else "")]
    lines += [f"  space: {d.describe()}" for d in t.space]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="sweep spec (YAML); see docs/sweeps.md")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the run table with each run's status; run nothing")
    parser.add_argument("--status", action="store_true", help="print how many runs are done/running/partial/failed/new")
    parser.add_argument("--executor", choices=EXECUTOR_KINDS, help="override the spec's executor.kind")
    parser.add_argument("--parallel", type=int, help="override the spec's executor.parallel")
    parser.add_argument("--only", action="append", metavar="ARM",
                        help="only this arm (a spec arm, or an arm with its grid suffix); repeatable")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        setup_logging(getattr(args, "verbose", False))
    stop_on_sigterm()  # `kill PID` on a background sweep stops it (and a local sweep's jobs) as Ctrl-C does
    try:
        spec = load_spec(args.spec)
        if args.executor:
            spec.executor.kind = args.executor
        if args.parallel is not None:
            if args.parallel < 1:
                raise SweepError("--parallel must be at least 1")
            spec.executor.parallel = args.parallel
        trials_all = expand_tuning(spec)
        chosen = load_chosen(spec)
        if undecided_arms(spec, chosen) and not (args.dry_run or args.status):
            chosen = choose(spec, trials_all) or chosen
        runs = runs_all = expand(spec, chosen_overrides(chosen))
        trials = trials_all
        if args.only:
            known = {r.arm for r in runs} | {r.name for r in runs}
            unknown = [a for a in args.only if a not in known]
            if unknown:
                raise SweepError(f"--only {unknown}: not an arm of {spec.path} ({sorted(known)})")
            runs = [r for r in runs if r.arm in args.only or r.name in args.only]
            trials = [r for r in trials if r.arm in args.only]
        # Fairness is checked within each stage: the trials' prompt split differs from the seeded runs' on purpose.
        if trials:
            validate_runs(spec, trials)
        validate_runs(spec, runs)
        undecided = undecided_arms(spec, chosen)
        waiting = bool(undecided)
        if args.dry_run or args.status:
            statuses = {run.id: status_of(run) for run in trials + runs}
            if args.dry_run:
                _print_header(spec)
                if trials:
                    print(_tune_header(spec))
                    print(format_table(trials, statuses))
                    print(format_counts({r.id: statuses[r.id] for r in trials}))
                    print("seeded runs:")
                if waiting:
                    ended, total = stage_progress(trials_all)
                    print(f"  waiting for tuning ({ended}/{total} trials ended) for {', '.join(undecided)}: their "
                          "rows show each arm's own settings; the chosen values are added once every trial has ended")
                print(format_table(runs, statuses))
            if args.status and trials:
                print(f"tuning: {format_counts({r.id: statuses[r.id] for r in trials})}"
                      + (f"; waiting for the choice ({', '.join(undecided)})" if waiting
                         else f"; chosen ({chosen_path(spec)})"))
            print(format_counts({r.id: statuses[r.id] for r in runs}))
            for run in trials + runs:
                if args.status and statuses[run.id] == FAILED:
                    last = (run.out / FAILED_FILE).read_text().strip().splitlines()[-1:]
                    print(f"  failed {run.id}: {last[0] if last else '?'}")
            return 0
        # The record is the whole spec's, whatever --only runs now: the report reads its arms from it.
        write_sweep_record(spec, trials_all + runs_all)
        counts = Counter()
        if trials:
            counts.update(execute(spec, trials, progress=not args.no_progress))
            if waiting:
                decided = choose(spec, trials_all)
                if decided is None:
                    ended, total = stage_progress(trials_all)
                    log.warning("tuning: %d/%d trials ended; the seeded runs of %s wait for the rest (run the other "
                                "arms' trials, then this command again)", ended, total, ", ".join(undecided))
                    runs = [r for r in runs if r.arm not in undecided]
                else:
                    chosen = decided
                    log.info("tuning: chosen %s -> %s", {a: e["trial"] for a, e in chosen["arms"].items()},
                             chosen_path(spec))
                    names = {r.name for r in runs}
                    runs_all = expand(spec, chosen_overrides(chosen))
                    runs = [r for r in runs_all if r.name in names]
                    validate_runs(spec, runs)
                    write_sweep_record(spec, trials_all + runs_all)
        elif waiting:   # --only without the undecided arms' trials: their seeded runs still wait
            runs = [r for r in runs if r.arm not in undecided]
        if runs:
            counts.update(execute(spec, runs, progress=not args.no_progress))
    except (SweepError, ConfigError, TuneError) as error:
        log.error("%s", error)
        return 2
    except KeyboardInterrupt:
        log.warning("interrupted; run the same command again to resume (finished runs are kept)")
        return 130
    runs = trials + runs
    summary = ", ".join(f"{s} {counts[s]}" for s in (DONE, FAILED, RUNNING) if counts[s])
    print(f"sweep {spec.name}: {summary} ({len(runs)} runs) -> {_shorten(str(spec.results_dir))}")
    if counts[RUNNING]:
        print(f"  {counts[RUNNING]} run(s) were being run by another process and were left to it")
    return 1 if counts[FAILED] else 0


def main(argv: Optional[List[str]] = None) -> int:
    from diffrl_bench.threads import configure_openmp_env

    configure_openmp_env()  # before torch loads, here and in every job process (they inherit it)
    parser = argparse.ArgumentParser(prog="diffrl-bench sweep", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true")
    add_arguments(parser)
    return run(parser.parse_args(argv))
