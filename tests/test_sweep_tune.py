"""The tuning stage: deterministic trials, the same points for every arm, the split, and the known best trial."""
import math
import random

import numpy as np
import pytest

from diffrl_bench.sweep.tune import (TuneError, chosen_overrides, expand_trials, parse_split_source, parse_tune, report_lines,
                  select_best, split_source, trial_budget, trial_config, unit_points, validation_split)

ARMS = ["nft", "awm", "rft"]
RAW = {
    "trials": 6, "seed": 3, "budget_fraction": 0.25, "validation": {"fraction": 0.25, "seed": 1},
    "space": {
        "optim.lr": {"log_uniform": [1.0e-5, 1.0e-4]},
        "kl": {"key": {"nft": "algo.kl_beta", "awm": "algo.beta", "rft": None}, "log_uniform": [1.0e-4, 1.0e-1]},
    },
}


def test_trials_are_deterministic_equal_per_arm_and_shared_points():
    tune = parse_tune(RAW, ARMS)
    first, again = expand_trials(tune, ARMS), expand_trials(tune, ARMS)
    assert [(t.name, t.overrides) for t in first] == [(t.name, t.overrides) for t in again]
    for arm in ARMS:
        assert sum(t.arm == arm for t in first) == 6
    by_arm = {arm: [t for t in first if t.arm == arm] for arm in ARMS}
    # The same points for every arm; each arm's own KL key; rft has no KL knob and only gets the lr.
    assert [t.point for t in by_arm["nft"]] == [t.point for t in by_arm["awm"]] == [t.point for t in by_arm["rft"]]
    assert all(set(t.overrides) == {"optim.lr", "algo.kl_beta"} for t in by_arm["nft"])
    assert all(set(t.overrides) == {"optim.lr", "algo.beta"} for t in by_arm["awm"])
    assert all(set(t.overrides) == {"optim.lr"} for t in by_arm["rft"])
    for t in first:
        assert 1e-5 <= t.point["optim.lr"] <= 1e-4 and 1e-4 <= t.point["kl"] <= 1e-1
    other = expand_trials(parse_tune({**RAW, "seed": 4}, ARMS), ARMS)
    assert [t.point for t in other] != [t.point for t in first]


def test_latin_hypercube_covers_every_stratum():
    cube = unit_points(7, 3, seed=11)
    assert cube.shape == (7, 3) and np.all((cube >= 0) & (cube < 1))
    for column in cube.T:
        assert sorted(np.floor(column * 7).astype(int)) == list(range(7))


def test_grid_sampler_is_the_product():
    raw = {**RAW, "sampler": "grid", "trials": 4,
           "space": {"optim.lr": {"values": [1e-5, 3e-5]}, "algo.kl_beta": {"values": [0.01, 0.1]}}}
    trials = expand_trials(parse_tune(raw, ["nft"]), ["nft"])
    assert sorted((t.overrides["optim.lr"], t.overrides["algo.kl_beta"]) for t in trials) == \
        [(1e-5, 0.01), (1e-5, 0.1), (3e-5, 0.01), (3e-5, 0.1)]
    with pytest.raises(TuneError, match=r"tune\.trials: the grid has 4 points"):
        parse_tune({**raw, "trials": 5}, ["nft"])


@pytest.mark.parametrize("change, where", [
    ({"trials": 0}, "tune.trials"),
    ({"budget_fraction": 1.5}, "tune.budget_fraction"),
    ({"validation": {"fraction": 1.0}}, "tune.validation.fraction"),
    ({"validation": {"fraction": 0.2, "split": 1}}, "tune.validation.split"),
    ({"sampler": "sobol"}, "tune.sampler"),
    ({"budget": 1}, "tune.budget"),
    ({"space": {"optim.lr": {"log_uniform": [1e-4, 1e-5]}}}, "tune.space.optim.lr.log_uniform"),
    ({"space": {"optim.lr": {"log_uniform": [0.0, 1e-5]}}}, "tune.space.optim.lr.log_uniform"),
    ({"space": {"optim.lr": {"uniform": [0, 1], "values": [1]}}}, "tune.space.optim.lr"),
    ({"space": {"kl": {"key": {"nft": "algo.kl_beta"}, "values": [1]}}}, "tune.space.kl.key"),
    ({"space": {"kl": {"key": {"nft": "a", "awm": "b", "rfd": "c"}, "values": [1]}}}, "tune.space.kl.key"),
    ({"space": {}}, "tune.space"),
])
def test_bad_tune_section_names_the_key(change, where):
    with pytest.raises(TuneError) as error:
        parse_tune({**RAW, **change}, ARMS)
    assert str(error.value).startswith(f"{where}:")


def test_missing_section_keys():
    raw = {k: v for k, v in RAW.items() if k != "validation"}
    with pytest.raises(TuneError, match=r"^tune\.validation: missing"):
        parse_tune(raw, ARMS)


def test_select_best_picks_the_known_best_trial():
    tune = parse_tune(RAW, ARMS)
    trials = expand_trials(tune, ARMS)
    scores = {t.name: 0.1 * t.index for t in trials}       # the last trial is best ...
    scores["nft/trial02"] = 0.9                             # ... except for nft, where trial 2 is
    scores["awm/trial05"] = float("nan")                    # awm's nominal best diverged: trial 4 wins
    scores["rft/trial01"] = scores["rft/trial05"]           # a tie: the lower index wins
    best = select_best(trials, scores)
    assert {arm: t.index for arm, t in best.items()} == {"nft": 2, "awm": 4, "rft": 1}
    assert chosen_overrides(best)["nft"] == trials[2].overrides
    lower = select_best(trials, {name: -value for name, value in scores.items()}, higher_is_better=False)
    assert lower["nft"].index == 2


def test_select_best_refuses_unfinished_or_all_diverged():
    tune = parse_tune(RAW, ["nft"])
    trials = expand_trials(tune, ["nft"])
    scores = {t.name: 0.5 for t in trials[:-1]}
    with pytest.raises(TuneError, match="nft/trial05"):
        select_best(trials, scores)
    with pytest.raises(TuneError, match="arm 'nft': every one"):
        select_best(trials, {t.name: float("nan") for t in trials})


def test_validation_split_is_disjoint_sized_and_order_free():
    prompts = [f"a photo of {i} cats" for i in range(40)]
    fit, val = validation_split(prompts, 0.25, seed=1)
    assert len(val) == 10 and sorted(fit + val) == list(range(40)) and not set(fit) & set(val)
    shuffled = prompts[:]
    random.Random(0).shuffle(shuffled)
    _, val2 = validation_split(shuffled, 0.25, seed=1)
    assert {shuffled[i] for i in val2} == {prompts[i] for i in val}
    _, val3 = validation_split(prompts, 0.25, seed=2)
    assert set(val3) != set(val)
    items = ["x", "y", "x", "z"]
    fit_d, val_d = validation_split(items, 0.5, seed=0)
    assert not {items[i] for i in fit_d} & {items[i] for i in val_d}   # a repeated prompt stays on one side


def test_trial_budget_and_config():
    tune = parse_tune(RAW, ARMS)
    assert trial_budget(tune, {"gpu_hours": 0.03, "max_steps": 500}) == {"gpu_hours": pytest.approx(0.0075),
                                                                         "max_steps": 500}
    assert trial_budget(tune, {"nfe": 10}) == {"nfe": 2}          # round(2.5) -> 2, still an integer
    assert trial_budget(tune, {"flops": 4e12}) == {"flops": pytest.approx(1e12)}  # a FLOP budget scales too
    trial = expand_trials(tune, ["nft"])[0]
    config = trial_config(tune, trial, "toy:train")
    assert parse_split_source(config["data.eval_prompts"]) == ("toy:train", "val", 0.25, 1)
    assert parse_split_source(config["data.train_prompts"])[1] == "fit"
    assert parse_split_source("toy:heldout") is None
    assert split_source("geneval:/a/b.jsonl", "val", 0.2, 0) == "geneval:/a/b.jsonl~val:0.2:0"


def test_report_lines_state_budget_space_and_choice():
    tune = parse_tune(RAW, ARMS)
    trials = expand_trials(tune, ARMS)
    scores = {t.name: float(t.index) for t in trials}
    best = select_best(trials, scores)
    text = "\n".join(report_lines(tune, {"gpu_hours": 0.04}, trials, best, scores))
    assert "6 trials" in text and "gpu_hours 0.01" in text and "25% of the training prompts" in text
    assert "kl (nft: algo.kl_beta, awm: algo.beta, rft: none)" in text
    lr = best["nft"].overrides["optim.lr"]
    assert f"optim.lr={lr:g}" in text and "| rft | optim.lr=" in text
