"""`extend:`: a slow arm's finished seeded runs continue to a longer budget (so its cost to a high threshold is
measured rather than censored), exactly as if they had run that long from the start."""
import json

import pytest
import yaml

from diffrl_bench.sweep import SweepError, expand, load_spec, main, validate_runs
from diffrl_bench.sweep.state import DONE, PARTIAL, extension_of, status_of

from test_sweep import make_spec, rows, snapshot

EXACT = ("cost/nfe", "cost/flops", "train/optimizer_steps")   # and every reward/* and loss/* value; not timings


def training_values(row):
    return {k: v for k, v in row.items() if k.startswith(("reward/", "loss/")) or k in EXACT}


def spec_with_extend(tmp_path, tiny_model_dir, extend, **changes):
    path = make_spec(tmp_path, tiny_model_dir, **changes)
    raw = yaml.safe_load(path.read_text())
    raw["extend"] = extend
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("extend, where", [
    ({"arms": ["c"], "budget": {"steps": 4}}, "extend.arms"),
    ({"arms": [], "budget": {"steps": 4}}, "extend.arms"),
    ({"arms": ["a"], "budget": {"nfe": 400}}, "extend.budget"),
    ({"arms": ["a"], "budget": {"steps": 2}}, "extend.budget.steps"),      # not above the sweep's 2
    ({"arms": ["a"], "budget": {"steps": 3.5}}, "extend.budget.steps"),
    ({"arms": ["a"], "budget": {"steps": 4}, "seeds": [0]}, "extend"),
])
def test_a_bad_extend_section_names_the_key(tmp_path, tiny_model_dir, extend, where):
    with pytest.raises(SweepError) as error:
        load_spec(spec_with_extend(tmp_path, tiny_model_dir, extend))
    assert f"{where}:" in str(error.value) and "spec.yaml" in str(error.value)


def test_only_the_extended_arms_get_the_longer_budget_and_fairness_still_holds(tmp_path, tiny_model_dir):
    spec = load_spec(spec_with_extend(tmp_path, tiny_model_dir, {"arms": ["a"], "budget": {"steps": 4}}))
    runs = {r.arm: r for r in expand(spec)}
    assert "train.steps=4" in runs["a"].overrides and "train.steps=2" in runs["b"].overrides
    configs = validate_runs(spec, list(runs.values()))   # the budget differs by design; nothing else may
    assert configs[runs["a"].id].train.steps == 4 and configs[runs["b"].id].train.steps == 2
    assert spec.describe()["extend"] == {"arms": ["a"], "budget": {"steps": 4}}


@pytest.mark.slow
def test_an_extended_run_continues_and_equals_a_run_that_long_from_the_start(tmp_path, tiny_model_dir, capsys):
    short = make_spec(tmp_path, tiny_model_dir)
    assert main([str(short), "--no-progress"]) == 0
    results = tmp_path / "results" / "runs"
    b_before = snapshot(results / "b")
    first_two = rows(results / "a" / "seed0")

    longer = spec_with_extend(tmp_path, tiny_model_dir, {"arms": ["a"], "budget": {"steps": 4}}, name="long.yaml")
    spec = load_spec(longer)
    run_a = next(r for r in expand(spec) if r.arm == "a")
    assert extension_of(run_a) == {"key": "train.steps", "recorded": 2.0, "new": 4.0}
    assert status_of(run_a) == PARTIAL            # a finished run with more budget to run
    capsys.readouterr()
    assert main([str(longer), "--no-progress"]) == 0
    a_dir = results / "a" / "seed0"
    extended = rows(a_dir)
    assert [r["step"] for r in extended] == [1, 2, 3, 4]
    assert extended[:2] == first_two      # continued from its checkpoint: not re-run (timings included)
    assert status_of(run_a) == DONE and (a_dir / "DONE.before_extension").exists()
    assert "train.steps=2" in json.loads((a_dir / "arm.before_extension.json").read_text())["overrides"]
    assert "train.steps=4" in json.loads((a_dir / "arm.json").read_text())["overrides"]
    assert snapshot(results / "b") == b_before      # the other arm is not touched

    # The same arm run for 4 steps from the start, in another folder: the same steps, value for value.
    direct = make_spec(tmp_path, tiny_model_dir, steps=4, name="direct.yaml",
                       results_dir=str(tmp_path / "direct"), arms={"a": {"config": "toy_nft"}})
    assert main([str(direct), "--no-progress"]) == 0
    reference = rows(tmp_path / "direct" / "runs" / "a" / "seed0")
    assert len(reference) == 4 and len(training_values(reference[0])) > 5
    for got, want in zip(extended, reference):
        assert training_values(got) == training_values(want)

    # Without `extend:` again, the longer run still counts as done (it holds the 2-step run as its beginning).
    capsys.readouterr()
    assert main([str(short), "--no-progress"]) == 0
    assert "done 2 (2 runs)" in capsys.readouterr().out
    assert [r["step"] for r in rows(a_dir)] == [1, 2, 3, 4]
