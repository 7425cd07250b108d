"""A run restarted from step 0 over a set-aside table: is it recomputing that table, or a new draw?"""
import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest

from diffrl_bench.config import load_config
from diffrl_bench.recomputation import comparable, compare, read_table, reference_table, row_difference
from diffrl_bench.report.runs import load_runs
from diffrl_bench.train import train

TRAIN = ("reward/mean", "loss/loss", "train/grad_norm", "cost/flops", "cost/nfe")


def test_wall_times_and_the_eval_charge_are_not_compared_and_everything_else_is():
    for column in ("cost/rollout_s", "cost/device_s", "cost/gpu_hours", "train/step_s", "cost/eval_device_s",
                   "cost/nfe_eval", "cost/flops_eval", "step"):
        assert not comparable(column), column
    for column in ("reward/mean", "loss/kl_loss", "train/grad_norm", "cost/flops", "cost/nfe", "cost/flops_train",
                   "cost/images", "eval/toy_geneval.strict.task_mean", "eval/images"):
        assert comparable(column), column


def test_a_written_table_reads_back_the_exact_floats(tmp_path):
    values = [0.1 + 0.2, 1 / 3, 2.0 ** -1074, 1e300, 0.12967181205749512, -0.0014192489907145500]
    pd.DataFrame({"step": range(len(values)), "train/grad_norm": values}).to_csv(tmp_path / "m.csv", index=False)
    table = read_table(tmp_path / "m.csv")
    assert [table[s]["train/grad_norm"] for s in range(len(values))] == values
    # JSON lines: a step's train and eval rows merge, a redone row replaces the earlier one, empty cells drop out.
    rows = [{"step": 1, "loss/loss": 0.5, "x": None}, {"step": 1, "eval/a": 0.25}, {"step": 1, "loss/loss": 0.75}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_table(tmp_path / "m.jsonl") == {1: {"step": 1, "loss/loss": 0.75, "eval/a": 0.25}}


def _table(steps, changes=None):
    """{step: row} of a synthetic run: train columns, a wall time, evaluations at steps 0 and 2."""
    rows = {}
    for step in steps:
        row = {"train/grad_norm": 0.1 * step + 0.01, "cost/flops": 10.0 * step, "cost/device_s": 3.0 * step}
        if step % 2 == 0:
            row["eval/score"] = 0.2 + 0.01 * step
        rows[step] = {**row, **(changes or {}).get(step, {})}
    return rows


def _write(path, rows):
    pd.DataFrame([{"step": s, **r} for s, r in rows.items()]).to_csv(path, index=False)
    return path


def test_equal_rows_reproduce_the_table_whatever_the_wall_times(tmp_path):
    table = _write(tmp_path / "metrics.csv.attempt1", _table(range(5)))
    # Another machine: three times slower, and it evaluated only at step 0.
    new = {s: {k: v for k, v in r.items() if k != "eval/score" or s == 0} for s, r in _table(range(7)).items()}
    for row in new.values():
        row["cost/device_s"] *= 3
    result = compare(table, new)
    assert (result.reproduced, result.equal_through, result.table_last, result.evals_matched) == (True, 4, 4, 1)
    assert "bit for bit through its last step 4" in result.describe()


def test_the_first_differing_value_is_named_and_ends_the_comparison(tmp_path):
    table = _write(tmp_path / "metrics.csv.attempt1", _table(range(5)))
    new = _table(range(5), {3: {"train/grad_norm": 0.31 + 1e-16}, 4: {"cost/flops": -1.0}})
    assert 0.31 + 1e-16 != 0.31  # one unit in the last place
    result = compare(table, new)
    assert not result.reproduced and result.equal_through == 2
    assert (result.difference.step, result.difference.column) == (3, "train/grad_norm")
    assert "a new draw" in result.describe()
    # A column only one side holds (a metric added since) is not compared; NaN equals NaN.
    assert row_difference({"a": 1.0, "b": np.nan}, {"step": 1, "a": 1.0, "b": np.nan, "c": 5.0}) is None


def test_the_table_compared_with_is_the_one_reaching_furthest(tmp_path):
    _write(tmp_path / "metrics.csv.attempt1", _table(range(9)))
    (tmp_path / "metrics.jsonl.attempt1").write_text("")  # the same attempt's rows: its table stands for it
    _write(tmp_path / "metrics.csv.attempt2", _table(range(3)))  # a recomputation killed early
    assert reference_table(tmp_path).name == "metrics.csv.attempt1"
    assert reference_table(tmp_path / "nothing") is None


# ------------------------------------------------------------------------------------ through the Trainer
# Scored on the brightness test reward: the tiny random model scores 0 on the toy GenEval, which would make equal
# evaluations prove nothing.
COMMON = ("checkpoint.every=1", "optim.lr=1e-3", "eval.rewards=[test_brightness]")


def _committed_copy(run, folder):
    """A finished run's table copied back without its rows and checkpoints (a committed reference run)."""
    folder.mkdir(parents=True)
    shutil.copy(run / "metrics.csv", folder / "metrics.csv")
    return folder


def test_a_restart_over_its_committed_table_recomputes_it_and_the_report_reads_its_skipped_evals(
        tiny_run, tmp_path, caplog):
    first = tmp_path / "first"
    train(load_config("toy_nft", tiny_run("train.steps=3", "eval.every=1", *COMMON, out=first)), progress=False)
    extended = _committed_copy(first, tmp_path / "results" / "extended")
    caplog.set_level(logging.INFO, logger="diffrl_bench")
    # Extended to 5 steps, evaluating at every step as the first run did.
    train(load_config("toy_nft", tiny_run("train.steps=5", "eval.every=1", *COMMON, out=extended)), progress=False)
    assert "steps 1-3 recompute metrics.csv.attempt1 bit for bit" in caplog.text
    assert "step 1: the evaluations metrics.csv.attempt1 holds are skipped" in caplog.text
    assert "differs from its set-aside table" not in caplog.text
    before, after = pd.read_csv(first / "metrics.csv"), pd.read_csv(extended / "metrics.csv")
    assert after[after["step"] <= 3][list(TRAIN)].equals(before[list(TRAIN)])  # the premise, checked directly
    assert (after["train/grad_norm"][1:] > 0).all()

    (run,) = load_runs(tmp_path / "results")
    assert run.recomputed.reproduced and run.recomputed.evals_matched == 1  # the step-0 evaluation agrees
    score = "eval/test_brightness"
    read = run.frame.set_index("step")[score]
    own = after.set_index("step")[score]
    # The run evaluated at step 0 (which agreed with the table) and past the table; steps 1-3 it left to the table.
    assert own[[1, 2, 3]].isna().all() and own[[0, 4, 5]].notna().all()
    assert read[[0, 1, 2, 3]].tolist() == before.set_index("step")[score][[0, 1, 2, 3]].tolist()
    assert read[[0, 1, 2, 3]].nunique() == 4  # the policy's evaluations moved, so equal ones mean something
    assert read[[4, 5]].tolist() == own[[4, 5]].tolist()


def test_a_restart_that_draws_anew_is_named_at_its_first_differing_step(tiny_run, tmp_path, caplog):
    first = tmp_path / "first"
    train(load_config("toy_nft", tiny_run("train.steps=3", "eval.every=1", *COMMON, out=first)), progress=False)
    other = _committed_copy(first, tmp_path / "results" / "other")
    table = pd.read_csv(other / "metrics.csv")
    table.loc[table["step"] == 2, "train/grad_norm"] *= 1 + 1e-12  # what another machine's float sums look like
    table.to_csv(other / "metrics.csv", index=False)
    caplog.set_level(logging.INFO, logger="diffrl_bench")
    train(load_config("toy_nft", tiny_run("train.steps=3", "eval.every=1", *COMMON, out=other)), progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("differs from its set-aside table metrics.csv.attempt1 at step 2: train/grad_norm" in w
               for w in warnings), warnings

    (run,) = load_runs(tmp_path / "results")
    assert run.recomputed.difference.step == 2 and run.recomputed.equal_through == 1
    # Step 1's evaluation, before the difference, was left to the table; from step 2 on the run evaluates itself.
    own = pd.read_csv(other / "metrics.csv").set_index("step")["eval/test_brightness"]
    assert own.notna().tolist() == [True, False, True, True]
    evaluated = run.frame[run.frame["eval/test_brightness"].notna()]["step"].tolist()
    assert evaluated == [0, 1, 2, 3]
