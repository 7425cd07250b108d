"""Does a run that restarted from step 0 recompute the table it set aside, value for value?

A run restarts from step 0 when it has no checkpoint: killed before its first one, or a finished run copied back
without its checkpoints (a committed reference run) and then extended. Its earlier table is set aside as
`metrics.csv.attemptN` / `metrics.jsonl.attemptN` (runlog.MetricsLog.set_aside). On the same kind of machine, at
the same thread count, the restart recomputes that table bit for bit, and its continuation past the table's end is
the continuation of the same trajectory. On another machine kind the float sums differ from the first step, and the
restart is a new draw of the seed: extending only the seeds that were censored by redrawing them would favour the
arm (a slow seed replaced by a random one). This module tells the two apart, for the Trainer as the rows come
(a warning at the first difference, so hours are not spent on a draw nobody asked for; while the rows agree, the
evaluations the table holds are skipped) and for `report`, which then reads those evaluations from the set-aside
table the run equals.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

log = logging.getLogger("diffrl_bench")

_ATTEMPT = re.compile(r"^metrics\.(csv|jsonl)\.attempt(\d+)$")


def comparable(column: str) -> bool:
    """Columns a recomputation must reproduce exactly: everything but wall times (`*_s`, `cost/gpu_hours`: the
    machine's speed) and the evaluation's charge (`cost/*_eval`: `eval.every` may change on resume, and evaluating
    does not touch training)."""
    if column == "step" or column.endswith("_s") or column == "cost/gpu_hours":
        return False
    return not (column.startswith("cost/") and column.endswith("_eval"))


def _same(a, b) -> bool:
    missing_a = a is None or (isinstance(a, float) and math.isnan(a))
    missing_b = b is None or (isinstance(b, float) and math.isnan(b))
    if missing_a or missing_b:
        return missing_a and missing_b
    return a == b


@dataclass(frozen=True)
class Difference:
    step: int
    column: str
    before: object
    now: object

    def __str__(self) -> str:
        return f"step {self.step}: {self.column} was {self.before!r}, now {self.now!r}"


def row_difference(before: Dict[str, object], row: Dict[str, object]) -> Optional[Difference]:
    """The first comparable column (in `row`'s order) that both rows hold and that differs; None when all agree.
    A column only one of them holds is not compared (an evaluation the other did not run, a metric added since)."""
    for column, value in row.items():
        if comparable(column) and column in before and not _same(before[column], value):
            return Difference(int(row["step"]), column, before[column], value)
    return None


def read_table(path: Path) -> Dict[int, Dict[str, object]]:
    """A metrics table (`.csv` or JSON lines, set aside or current) as {step: row}; a step's train and eval rows
    are merged, a redone row replaces the earlier one, and empty cells are left out."""
    path = Path(path)
    by_step: Dict[int, Dict[str, object]] = {}
    if ".csv" in path.name:
        import pandas as pd

        # pandas 3 parses the exact float that was written; pandas 2 does so only with `round_trip` (which
        # pandas 3 deprecates).
        exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
        frame = pd.read_csv(path, **exact)
        rows: Iterable[dict] = frame.to_dict("records")
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        step = int(row["step"])
        clean = {k: v for k, v in row.items() if not _same(v, None)}
        by_step.setdefault(step, {}).update(clean)
    return by_step


def set_aside_tables(directory: Path) -> List[Path]:
    """The run folder's set-aside tables, one per attempt (the CSV where an attempt left both), oldest first."""
    found: Dict[int, Path] = {}
    for path in Path(directory).glob("metrics.*.attempt*"):
        match = _ATTEMPT.match(path.name)
        if match and (match.group(1) == "csv" or int(match.group(2)) not in found):
            found[int(match.group(2))] = path
    return [found[n] for n in sorted(found)]


def reference_table(directory: Path) -> Optional[Path]:
    """The set-aside table a restart is compared with: the one reaching the furthest step (a committed run's table,
    rather than a recomputation killed early before its first checkpoint); the newest of equals."""
    best, best_last = None, -1
    for path in set_aside_tables(directory):
        steps = read_table(path)
        last = max(steps) if steps else -1
        if last >= best_last:
            best, best_last = path, last
    return best


@dataclass
class Recomputation:
    """How a restarted run's rows compare with the set-aside table `table` (which ends at step `table_last`)."""

    table: Path
    table_last: int
    equal_through: int
    """the last step up to which every row compared so far equals the table (0: none yet, or step 1 differs)"""
    difference: Optional[Difference] = None
    evals_matched: int = 0
    """steps up to `equal_through` at which both hold evaluation scores (and they agree): the evidence that the
    table was evaluated as this run evaluates, before its skipped evaluations are read from the table"""

    @property
    def reproduced(self) -> bool:
        """Every step of the table has been recomputed, value for value."""
        return self.difference is None and self.equal_through >= self.table_last

    def describe(self) -> str:
        if self.difference is not None:
            return (f"differs from {self.table.name} at {self.difference}: a new draw of this seed, not a "
                    f"recomputation of it (another machine kind or thread count sums floats in another order)")
        if self.reproduced:
            return (f"recomputes {self.table.name} bit for bit through its last step {self.table_last}; "
                    f"past it, the run continues that trajectory")
        return f"equals {self.table.name} bit for bit so far (through step {self.equal_through} of {self.table_last})"


def compare(table: Path, rows: Dict[int, Dict[str, object]]) -> Recomputation:
    """Compare a run's rows ({step: row}, e.g. `read_table` of its metrics.csv) with a set-aside table."""
    before = read_table(table)
    result = Recomputation(table, max(before) if before else 0, 0)
    for step in sorted(rows):
        if step not in before:
            if step <= result.table_last:
                continue  # a step the table lacks (it cannot be compared); later steps still are
            break
        difference = row_difference(before[step], {"step": step, **rows[step]})
        if difference is not None:
            result.difference = difference
            break
        result.equal_through = step
        result.evals_matched += any(is_eval(c) and c in before[step] for c in rows[step])
    return result


def is_eval(column: str) -> bool:
    return column.startswith("eval/")


class RecomputationCheck:
    """The Trainer's live comparison: each logged row against the run's reference set-aside table; logs a warning
    at the first difference and a line when the table's last step is recomputed."""

    def __init__(self, table: Path):
        self.table = table
        self.before = read_table(table)
        self.last = max(self.before) if self.before else 0
        self.warned = False
        self.announced = False
        self.equal_through = -1
        """the last step whose rows all equal the table's (-1: none yet)"""
        self.evals_matched = 0
        self.skipping_announced = False
        log.info("this run once restarted from step 0 over an earlier table, set aside as %s (through step %d): each "
                 "of its rows is compared with it", table.name, self.last)

    @classmethod
    def for_run(cls, directory: Path) -> Optional["RecomputationCheck"]:
        table = reference_table(directory)
        return cls(table) if table is not None else None

    def check(self, row: Dict[str, object]) -> None:
        step = int(row["step"])
        if self.warned or step not in self.before:
            return
        difference = row_difference(self.before[step], row)
        if difference is None:
            self.equal_through = step
            self.evals_matched += any(is_eval(c) and c in self.before[step] for c in row)
        if difference is not None:
            self.warned = True
            log.warning("this run differs from its set-aside table %s at %s: it is a new draw of the seed, not a "
                        "recomputation (another machine kind or thread count sums floats in another order); "
                        "extending only censored seeds this way would favour the arm", self.table.name, difference)
        elif step == self.last and not self.announced:
            self.announced = True
            log.info("steps 1-%d recompute %s bit for bit; from here on the run continues that trajectory", step,
                     self.table.name)

    def holds_eval(self, step: int) -> bool:
        """Whether the evaluation due at `step` can be left to the table: this step's row equals the table's, the
        table evaluated at this step, and an evaluation both hold agrees (the step-0 one: the table was evaluated
        as this run evaluates). `report` then reads it from the table; a recomputation costs its training only."""
        held = (not self.warned and self.evals_matched > 0 and self.equal_through == step
                and any(is_eval(c) for c in self.before.get(step, {})))
        if held and not self.skipping_announced:
            self.skipping_announced = True
            log.info("step %d: the evaluations %s holds are skipped while this run recomputes it (report reads them "
                     "from it)", step, self.table.name)
        return held
