"""The tuning stage as sweep runs: the `tune:` section in a spec, trial runs, the choice from (synthetic) trial
results, its injection into the seeded runs, the report skipping trials, and the dry run."""
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from diffrl_bench.config import load_config
from diffrl_bench.prompts import PromptFileError, load_prompts
from diffrl_bench.sweep import SweepError, expand, load_spec, main, validate_runs
from diffrl_bench.sweep.state import ARM_FILE, DONE_FILE, FAILED_FILE
from diffrl_bench.sweep.tuning import (chosen_overrides, chosen_path, choose, expand_tuning, load_chosen, trials_of,
                                      undecided_arms)

TUNE = {"trials": 3, "seed": 0, "budget_fraction": 0.5, "validation": {"fraction": 0.25, "seed": 0},
        "space": {"optim.lr": {"log_uniform": [1.0e-5, 1.0e-3]},
                  "kl": {"key": {"a": "algo.kl_beta", "b": "algo.kl_beta"}, "log_uniform": [1.0e-4, 1.0e-1]}}}


def tune_spec(tmp_path, tune=TUNE, **changes):
    spec = {"name": "t", "results_dir": str(tmp_path / "results"), "seeds": [0, 1], "budget": {"steps": 8},
            "fairness": {"rollout.prompts_per_step": 2, "rollout.images_per_prompt": 4, "eval.every": 0},
            "arms": {"a": {"config": "toy_nft"}, "b": {"config": "toy_flow_grpo"}}, "tune": tune}
    spec.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def finish_trial(run, score=None, failed=False):
    """A trial folder as a finished run leaves it: arm.json, config.yaml, metrics.csv with a final score, DONE."""
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / ARM_FILE).write_text(json.dumps(run.record()))
    (run.out / "config.yaml").write_text(yaml.safe_dump({"eval": {"rewards": ["toy_geneval", "toy_naturalness"]},
                                                         "train": {"seed": run.seed}}))
    if failed:
        (run.out / FAILED_FILE).write_text("Traceback\nRuntimeError: diverged\n")
        return
    frame = pd.DataFrame({"step": [0, 4], "cost/gpu_hours": [0.0, 0.01], "cost/nfe": [0, 400],
                          "train/optimizer_steps": [0, 4],
                          "eval/toy_geneval.strict.task_mean": [0.2, score],
                          "eval/toy_naturalness": [1.0, 0.5]})   # a held-out column that must not decide
    frame.to_csv(run.out / "metrics.csv", index=False)
    (run.out / DONE_FILE).write_text("done\n")


def test_spec_tune_section_is_parsed_and_recorded(tmp_path):
    spec = load_spec(tune_spec(tmp_path))
    assert spec.tune.trials == 3 and [d.name for d in spec.tune.space] == ["optim.lr", "kl"]
    assert spec.describe()["tune"] == TUNE


@pytest.mark.parametrize("tune, where", [
    ({**TUNE, "trails": 3}, "tune.trails"),
    ({k: v for k, v in TUNE.items() if k != "validation"}, "tune.validation"),
    ({**TUNE, "space": {"kl": {"key": {"a": "algo.kl_beta"}, "log_uniform": [1e-4, 1e-1]}}}, "tune.space.kl.key"),
    ({**TUNE, "space": {"rollout.images_per_prompt": {"values": [4, 8]}}}, "tune.space.rollout.images_per_prompt"),
    ({**TUNE, "space": {"data.train_prompts": {"values": ["toy:all"]}}}, "tune.space.data.train_prompts"),
    ({**TUNE, "space": {"train.seed": {"values": [1, 2]}}}, "tune.space.train.seed"),
])
def test_bad_tune_sections_name_the_key(tmp_path, tune, where):
    with pytest.raises(SweepError) as error:
        load_spec(tune_spec(tmp_path, tune=tune))
    assert where in str(error.value) and "spec.yaml" in str(error.value)


def test_tune_with_a_grid_is_refused(tmp_path):
    with pytest.raises(SweepError, match="tune: .*grid"):
        load_spec(tune_spec(tmp_path, grid={"train.optimizer_steps_per_rollout": [1, 2]}))


def test_trials_are_runs_in_their_own_folder_on_the_validation_split(tmp_path):
    spec = load_spec(tune_spec(tmp_path))
    trials = expand_tuning(spec)
    assert [r.id for r in trials] == [f"{arm}/trial{i:02d}" for arm in "ab" for i in range(3)]
    # The same points for every arm: no arm gets luckier draws.
    assert [r.shown for r in trials[:3]] == [r.shown for r in trials[3:]]
    run = trials[4]
    assert run.out == spec.results_dir / "tune" / "b" / "trial01"
    assert "train.steps=4" in run.overrides                              # half of the 8-step budget
    assert "data.train_prompts=toy:train~fit:0.25:0" in run.overrides
    assert "data.eval_prompts=toy:train~val:0.25:0" in run.overrides    # never toy:heldout
    assert run.record()["stage"] == "tune" and run.record()["trial"] == 1
    configs = validate_runs(spec, trials)
    assert configs[run.id].optim.lr == pytest.approx(float(run.shown[0].split("=")[1]))


def test_the_choice_takes_the_best_trial_per_arm_and_goes_into_the_seeded_runs(tmp_path):
    spec = load_spec(tune_spec(tmp_path))
    trials = expand_tuning(spec)
    scores = {"a/trial00": 0.3, "a/trial01": 0.7, "a/trial02": 0.5, "b/trial00": 0.4, "b/trial02": 0.1}
    for run in trials[:-1]:
        finish_trial(run, scores.get(run.id), failed=run.id == "b/trial01")   # a diverged trial ranks last
    assert choose(spec, trials) is None and load_chosen(spec) is None   # b/trial02 has not ended
    finish_trial(trials[-1], scores["b/trial02"])
    chosen = choose(spec, trials)
    assert chosen["metric"] == "eval/toy_geneval.strict.task_mean"
    assert {arm: e["trial"] for arm, e in chosen["arms"].items()} == {"a": 1, "b": 0}
    assert json.loads(chosen_path(spec).read_text()) == chosen == load_chosen(spec)
    assert chosen["scores"]["b/trial01"] is None
    tuned = chosen_overrides(chosen)
    seeded = expand(spec, tuned)
    a_lr = next(o for o in trials[1].shown if o.startswith("optim.lr="))
    b_lr = next(o for o in trials[3].shown if o.startswith("optim.lr="))
    assert all(a_lr in r.overrides for r in seeded if r.arm == "a")
    assert all(b_lr in r.overrides for r in seeded if r.arm == "b")
    assert all(r.out.parent.parent.name == "runs" for r in seeded)
    # A seeded folder trained with another choice is refused, not resumed.
    other = expand(spec, {"a": {"optim.lr": 1.0}, "b": {}})[0]
    other.out.mkdir(parents=True)
    (other.out / ARM_FILE).write_text(json.dumps(other.record()))
    with pytest.raises(SweepError, match="different definition"):
        validate_runs(spec, seeded)


def test_an_arm_added_after_the_choice_is_tuned_before_its_seeded_runs(tmp_path, capsys):
    # Taking the old choice as it is would start the new arm's seeded runs with its untuned preset values;
    # dropping it would refuse the earlier arms' seeded folders as "of a different definition".
    spec = load_spec(tune_spec(tmp_path))
    trials = expand_tuning(spec)
    scores = {"a/trial00": 0.3, "a/trial01": 0.7, "a/trial02": 0.5, "b/trial00": 0.4, "b/trial01": 0.2,
              "b/trial02": 0.1}
    for run in trials:
        finish_trial(run, scores[run.id])
    first = choose(spec, trials)
    for run in expand(spec, chosen_overrides(first))[:2]:          # seeded folders made with the first choice
        run.out.mkdir(parents=True)
        (run.out / ARM_FILE).write_text(json.dumps(run.record()))
    tune = {**TUNE, "space": {**TUNE["space"], "kl": {"key": {"a": "algo.kl_beta", "b": "algo.kl_beta", "c": None},
                                                      "log_uniform": [1.0e-4, 1.0e-1]}}}
    grown_path = tune_spec(tmp_path, tune=tune, arms={"a": {"config": "toy_nft"}, "b": {"config": "toy_flow_grpo"},
                                                      "c": {"config": "toy_grpo_guard"}})
    grown = load_spec(grown_path)
    kept = load_chosen(grown)
    assert kept["arms"] == first["arms"] and undecided_arms(grown, kept) == ["c"]
    assert main([str(grown_path), "--status"]) == 0                 # the earlier seeded folders still fit
    assert "waiting for the choice (c)" in capsys.readouterr().out
    all_trials = expand_tuning(grown)
    assert choose(grown, all_trials) is None                        # c's trials have not run
    for run in all_trials:
        if run.arm == "c":
            finish_trial(run, {0: 0.2, 1: 0.1, 2: 0.6}[run.trial])
    again = choose(grown, all_trials)
    assert {arm: e["trial"] for arm, e in again["arms"].items()} == {"a": 1, "b": 0, "c": 2}
    assert {arm: again["arms"][arm] for arm in "ab"} == first["arms"]   # the earlier arms keep their choice
    c_trial = trials_of(grown)[-1]
    assert c_trial.arm == "c" and again["arms"]["c"]["overrides"] == {"optim.lr": c_trial.point["optim.lr"]}
    assert load_chosen(grown) == again and undecided_arms(grown, again) == []
    # A changed range makes the recorded values wrong for the trials they name: those arms are undecided again.
    moved = {**TUNE, "space": {**TUNE["space"], "optim.lr": {"log_uniform": [1.0e-6, 1.0e-5]}}}
    assert load_chosen(load_spec(tune_spec(tmp_path, tune=moved))) is None


def test_report_reads_trials_not_as_seeds_and_states_the_tuning(tmp_path):
    from diffrl_bench.report import analyse, load_runs
    from diffrl_bench.report.output import write_analysis
    from diffrl_bench.sweep.state import write_sweep_record

    spec = load_spec(tune_spec(tmp_path))
    trials = expand_tuning(spec)
    for i, run in enumerate(trials):
        finish_trial(run, 0.1 * i)
    chosen = choose(spec, trials)
    seeded = expand(spec, chosen_overrides(chosen))
    for run in seeded:
        finish_trial(run, 0.5 + 0.01 * run.seed)
    write_sweep_record(spec, trials + seeded)
    runs = load_runs(spec.results_dir)
    assert sorted((r.arm, r.seed) for r in runs) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    analysis = analyse(spec.results_dir, n_boot=50)
    text = write_analysis(analysis, tmp_path / "out").read_text()
    section = text.split("## Tuning")[1]
    assert "3 trials" in section and "steps 4" in section   # half of the 8-step budget per trial
    assert "optim.lr" in section and "log-uniform in [1e-05, 0.001]" in section
    assert "| a | " in section and "| b | " in section


def test_dry_run_shows_the_trials_and_waits_for_the_choice(tmp_path, capsys):
    path = tune_spec(tmp_path)
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tuning stage: 3 trials per arm" in out and "a-tune02" in out and "b-tune00" in out
    assert "waiting for tuning (0/6 trials ended)" in out
    assert not (tmp_path / "results").exists()   # a dry run writes nothing


def test_split_prompt_sources_partition_the_training_prompts():
    train = load_prompts("toy:train")
    fit = load_prompts("toy:train~fit:0.25:0")
    val = load_prompts("toy:train~val:0.25:0")
    assert len(val) == round(0.25 * len(train)) and len(fit) + len(val) == len(train)
    assert {p.text for p in fit} | {p.text for p in val} == {p.text for p in train}
    assert not {p.text for p in fit} & {p.text for p in val}
    assert all(p.metadata.get("include") for p in val)   # the toy scorer's metadata travels with the split
    with pytest.raises(PromptFileError, match="held-out"):
        load_prompts("toy:heldout~val:0.25:0", "data.eval_prompts")


def recorded_config(run_dir):
    record = json.loads((run_dir / ARM_FILE).read_text())
    return load_config(record["config"], record["overrides"])


def test_a_sweep_runs_trials_then_chooses_then_the_seeded_runs_and_resumes(tmp_path, tiny_model_dir, capsys):
    spec = {"name": "t", "results_dir": str(tmp_path / "results"), "seeds": [0], "budget": {"steps": 2},
            "fairness": {"model.path": tiny_model_dir, "reward.components": {"test_brightness": 1.0},
                         "eval.rewards": ["test_brightness"], "rollout.prompts_per_step": 2,
                         "rollout.images_per_prompt": 4, "eval.every": 0, "eval.images_per_prompt": 2,
                         "eval.sampler.num_steps": 3},
            "common": {"train.threads": 1, "rollout.chunk_size": 4, "rollout.sampler.num_steps": 3,
                       "train.micro_batch_size": 4, "algo.num_train_times": 2, "checkpoint.every": 1},
            "arms": {"a": {"config": "toy_nft"}, "b": {"config": "toy_nft"}},
            "tune": {"trials": 2, "budget_fraction": 0.5, "validation": {"fraction": 0.25},
                     "space": {"optim.lr": {"values": [1.0e-5, 1.0e-3]}}, "sampler": "grid"}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main([str(path), "--no-progress"]) == 0
    results = tmp_path / "results"
    chosen = json.loads((results / "tune" / "chosen.json").read_text())
    for arm in ("a", "b"):
        scores = [chosen["scores"][f"{arm}/trial{i:02d}"] for i in range(2)]
        assert chosen["arms"][arm]["trial"] == scores.index(max(scores))
        seeded = results / "runs" / arm / "seed0"
        assert (seeded / "DONE").exists()
        assert recorded_config(seeded).optim.lr == pytest.approx(chosen["arms"][arm]["overrides"]["optim.lr"])
        trial = recorded_config(results / "tune" / arm / "trial00")
        assert trial.train.steps == 1 and trial.data.eval_prompts.startswith("toy:train~val:")
    capsys.readouterr()
    assert main([str(path), "--no-progress"]) == 0          # everything done: nothing runs again
    assert "done 6 (6 runs)" in capsys.readouterr().out
