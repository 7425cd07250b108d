"""Verdicts on synthetic seeds and run directories with known answers."""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from diffrl_bench.report import verdicts as V
from diffrl_bench.report.claims_output import write_claims
from diffrl_bench.report.claims import load_claim, parse_claim
from diffrl_bench.report import load_runs

HEADLINE = "eval/toy_geneval.strict.task_mean"
HELDOUT = "eval/toy_no_extra_objects"


def costs(values, limits=None):
    values = np.asarray(values, dtype=float)
    return V.SeedCosts(values, values if limits is None else limits)


# --------------------------------------------------------------------------------------------- the rules
@pytest.mark.parametrize("lo, hi, claimed, expected", [
    (20.0, 30.0, 25.0, V.SUPPORTED),            # the claim inside the interval
    (30.0, 40.0, 25.0, V.SUPPORTED),            # the whole interval above the claim
    (3.0, 6.0, 25.0, V.SMALLER),                # above 1, below the claim
    (0.7, 1.4, 25.0, V.NOT_CHEAPER),            # contains 1
    (0.3, 0.8, 25.0, V.REVERSED),               # below 1
])
def test_classify_each_rule(lo, hi, claimed, expected):
    assert V.classify(lo, hi, claimed)[0] == expected


def test_interval_holding_both_1_and_the_claim_is_supported_but_flagged():
    # The issue lists "supported" first; the reason must warn that 1 is inside too.
    verdict, reason = V.classify(0.8, 30.0, 25.0)
    assert verdict == V.SUPPORTED and "also contains 1" in reason
    assert "also contains 1" not in V.classify(20.0, 30.0, 25.0)[1]


def test_classify_bounds():
    # A lower bound (censored baseline) supports only from above the claim; else it cannot place it.
    assert V.classify(26.0, math.inf, 25.0, V.LOWER)[0] == V.SUPPORTED
    assert V.classify(2.3, math.inf, 25.0, V.LOWER)[0] == V.INCONCLUSIVE
    # An upper bound (censored arm) can only refute.
    assert V.classify(0.0, 0.8, 25.0, V.UPPER)[0] == V.REVERSED
    assert V.classify(0.0, 5.0, 25.0, V.UPPER)[0] == V.NOT_CHEAPER
    assert V.classify(0.0, 40.0, 25.0, V.UPPER)[0] == V.INCONCLUSIVE
    assert V.classify(float("nan"), float("nan"), 25.0, V.NO_BOUND)[0] == V.INCONCLUSIVE


# ------------------------------------------------------------------------------------ seeds to verdicts
SPREAD = np.array([0.9, 0.95, 1.0, 1.05, 1.1])


@pytest.mark.parametrize("true_speedup, expected", [
    (25.0, V.SUPPORTED), (60.0, V.SUPPORTED), (5.0, V.SMALLER), (0.5, V.REVERSED)])
def test_tight_seeds_give_each_verdict(true_speedup, expected):
    base = costs(100.0 * SPREAD)
    arm = costs(100.0 / true_speedup * SPREAD[::-1])
    result = V.censored_speedup(base, arm, n_boot=4000, rng=1)
    # Same seed spread on both sides, reversed: the means are exactly 100 and 100 / speedup.
    assert result.speedup == pytest.approx(true_speedup)
    assert result.bound == V.ESTIMATE and result.censored == "none"
    assert V.classify(result.ci_low, result.ci_high, 25.0, result.bound)[0] == expected


def test_noisy_equal_arms_are_not_shown_cheaper():
    rng = np.random.default_rng(3)
    base = costs(np.exp(rng.normal(0.0, 0.6, 6)))
    arm = costs(np.exp(rng.normal(0.0, 0.6, 6)))
    result = V.censored_speedup(base, arm, rng=2)
    assert result.ci_low < 1 < result.ci_high
    assert V.classify(result.ci_low, result.ci_high, 25.0)[0] == V.NOT_CHEAPER


def test_censored_baseline_gives_a_lower_bound_never_dropped():
    true = np.array([10.0, 16.0, 12.0, 19.0, 11.0])
    limits = np.array([20.0, 13.0, 20.0, 15.0, 20.0])   # seeds 1 and 3 stopped before reaching
    observed = np.where(true <= limits, true, np.nan)
    arm = costs([1.0] * 5)
    result = V.censored_speedup(V.SeedCosts(observed, limits), arm, rng=7)
    # Restricted mean by hand: censored seeds count at their limits (dropping them would give 11).
    assert result.speedup == pytest.approx((10 + 13 + 12 + 15 + 11) / 5)
    assert result.bound == V.LOWER and result.censored == "baseline" and math.isinf(result.ci_high)
    assert (result.k_base, result.n_base) == (3, 5)
    # Monotone: with the same resamples the true costs' interval lies above the censored bound.
    truth = V.censored_speedup(costs(true), arm, rng=7)
    assert result.ci_low <= truth.ci_low and result.speedup < truth.speedup
    assert V.classify(result.ci_low, result.ci_high, 5.0, result.bound)[0] == V.SUPPORTED
    assert V.classify(result.ci_low, result.ci_high, 25.0, result.bound)[0] == V.INCONCLUSIVE


def test_censored_arm_gives_an_upper_bound():
    base = costs([10.0, 11.0, 12.0, 10.0, 11.0])
    never = np.full(5, np.nan)
    result = V.censored_speedup(base, V.SeedCosts(never, np.full(5, 20.0)), rng=0)
    assert result.bound == V.UPPER and result.ci_low == 0 and result.ci_high < 1
    assert V.classify(result.ci_low, result.ci_high, 25.0, result.bound)[0] == V.REVERSED
    far = V.censored_speedup(base, V.SeedCosts(never, np.full(5, 0.2)), rng=0)
    assert far.ci_high > 25 and V.classify(far.ci_low, far.ci_high, 25.0, far.bound)[0] == V.INCONCLUSIVE


def test_the_cost_a_censored_baseline_needs_for_the_claim_is_the_binomial_tipping_point():
    """Arm seeds all cost 1, four baseline seeds 10, one censored at 10. A resample holding the censored seed k
    times has ratio (10 (5 - k) + k C) / 5; P(k >= 3) = 5.8% and P(k >= 4) = 0.7%, so the 97.5% point of the ratio
    is a k = 3 resample's, (20 + 3C) / 5, which is 25 at C = 35: 3.5x the budget."""
    base = V.SeedCosts([10.0, 10.0, 10.0, 10.0, np.nan], [10.0] * 5)
    arm = costs([1.0] * 5)
    for seed in range(3):
        needs = V.censored_cost_for_claim(base, arm, 25.0, lambda: np.random.default_rng(seed))
        assert needs == pytest.approx(35.0, rel=2e-3)
    # A claim already inside the interval at the budget (k = 3 gives 10 >= 8) needs nothing more.
    assert V.censored_cost_for_claim(base, arm, 8.0, lambda: np.random.default_rng(0)) == 10.0
    # Only a censored baseline against a fully reached arm has such a cost.
    assert math.isnan(V.censored_cost_for_claim(costs([10.0] * 5), arm, 25.0, lambda: np.random.default_rng(0)))
    censored_arm = V.SeedCosts([1.0, 1.0, 1.0, 1.0, np.nan], [1.0] * 5)
    assert math.isnan(V.censored_cost_for_claim(base, censored_arm, 25.0, lambda: np.random.default_rng(0)))


def test_a_censored_seed_arriving_past_the_tipping_cost_puts_the_claim_inside_and_before_it_does_not():
    """The tipping cost agrees with the verdict the same resamples would give had the seeds arrived there."""
    limits = np.array([30.0, 30.0, 30.0, 30.0, 24.0, 30.0])
    observed = np.array([10.0, 14.0, 12.0, 17.0, np.nan, np.nan])
    arm = costs([1.5, 2.0, 1.2, 2.5, 1.8])
    needs = V.censored_cost_for_claim(V.SeedCosts(observed, limits), arm, 25.0, lambda: np.random.default_rng(11))
    assert needs > limits.max()
    for factor, expected in ((1.01, V.SUPPORTED), (0.99, V.SMALLER)):
        arrived = np.where(np.isnan(observed), needs * factor, observed)
        result = V.censored_speedup(costs(arrived), arm, rng=np.random.default_rng(11))
        assert V.classify(result.ci_low, result.ci_high, 25.0, result.bound)[0] == expected


@pytest.mark.parametrize("base, arm, why", [
    (V.SeedCosts([np.nan] * 5, [9.0] * 5), V.SeedCosts([np.nan] * 5, [9.0] * 5), "neither"),
    (costs([1.0, 2.0]), costs([1.0, 2.0]), "too few"),
    (V.SeedCosts([1.0, np.nan, 2.0], [5.0] * 3), V.SeedCosts([np.nan, 1.0, 2.0], [5.0] * 3), "both"),
])
def test_inconclusive_cases(base, arm, why):
    result = V.censored_speedup(base, arm, min_seeds=3, rng=0)
    assert result.bound == V.NO_BOUND and why in result.reason
    assert V.classify(result.ci_low, result.ci_high, 2.0, result.bound)[0] == V.INCONCLUSIVE


# ------------------------------------------------------------------------------------------------ power
def test_power_half_is_the_speedup_whose_t_test_just_reaches_5_percent():
    rng = np.random.default_rng(0)
    la, lb0 = rng.normal(0, 0.4, 5), rng.normal(0, 0.3, 6)
    mde = V.min_detectable_speedup(np.exp(lb0), np.exp(la), power=0.5)
    lb = lb0 - lb0.mean() + la.mean() + math.log(mde)   # same spread, mean difference log(mde)
    assert stats.ttest_ind(lb, la).pvalue == pytest.approx(0.05, abs=1e-9)


def test_power_of_the_resolution_matches_the_noncentral_t():
    n, sigma = 5, 0.5
    z = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    logs = sigma * z / z.std(ddof=1)                    # sample sd exactly sigma on both sides
    mde = V.min_detectable_speedup(np.exp(logs), np.exp(logs), power=0.8)
    df = 2 * n - 2
    nc = math.log(mde) / (sigma * math.sqrt(2.0 / n))
    power = 1 - stats.nct.cdf(stats.t.ppf(0.975, df), df, nc)
    assert power == pytest.approx(0.8, abs=0.02)
    # More seeds resolve smaller speedups; no spread resolves any speedup.
    more = V.min_detectable_speedup(np.exp(np.r_[logs, logs]), np.exp(np.r_[logs, logs]))
    assert 1 < more < mde
    assert V.min_detectable_speedup([2.0] * 4, [1.0] * 4) == 1.0


# ---------------------------------------------------------------------------------------------- held-out
def test_heldout_difference_matches_welch_and_each_verdict():
    base = np.array([0.60, 0.65, 0.62, 0.58, 0.63])
    arm = np.array([0.80, 0.90, 0.85, 0.82, 0.88])
    diff, lo, hi = V.heldout_difference(base, arm)
    ci = stats.ttest_ind(arm, base, equal_var=False).confidence_interval(0.95)
    assert (diff, lo, hi) == pytest.approx((arm.mean() - base.mean(), ci.low, ci.high))
    assert V.classify_heldout(diff, lo, hi)[0] == V.SUPPORTED
    assert V.classify_heldout(*V.heldout_difference(arm, base))[0] == V.REVERSED
    assert V.classify_heldout(*V.heldout_difference(base, arm, higher_is_better=False))[0] == V.REVERSED
    assert V.classify_heldout(*V.heldout_difference(base, base[::-1] + 0.001))[0] == V.NOT_BETTER
    # The claims' condition "while keeping the reward": better held out but surely lower reward is inconclusive;
    # a reward interval reaching above 0 keeps `supported`; an arm worse on both stays reversed.
    assert V.classify_heldout(diff, lo, hi, reward_hi=-0.01)[0] == V.INCONCLUSIVE
    assert V.classify_heldout(diff, lo, hi, reward_hi=0.01)[0] == V.SUPPORTED
    assert V.classify_heldout(*V.heldout_difference(arm, base), reward_hi=-0.01)[0] == V.REVERSED


# -------------------------------------------------------------------------------- synthetic run folders
BASE, TOP, TAU = 0.2, 0.8, 10.0


def score(c, tau):
    return BASE + (TOP - BASE) * (1 - np.exp(-np.asarray(c) / tau))


def write_run(root: Path, arm, seed, x, y, heldout):
    d = root / arm / f"seed{seed}"
    d.mkdir(parents=True)
    frame = pd.DataFrame({"step": np.arange(len(x)) * 10, "cost/gpu_hours": x, "cost/nfe": np.asarray(x) * 1000,
                          "train/optimizer_steps": np.arange(len(x)) * 10, HEADLINE: y, HELDOUT: heldout})
    frame.to_csv(d / "metrics.csv", index=False)
    (d / "arm.json").write_text(json.dumps({"arm": arm, "seed": seed}))
    (d / "config.yaml").write_text(yaml.safe_dump({"eval": {"rewards": ["toy_geneval", "toy_no_extra_objects"]}}))


SCALES = [0.8, 0.9, 1.0, 1.1, 1.2]


def make_results(root, speedup=25.0, base_evals=40, heldout=(0.9, 0.6)):
    """Baseline seed i's curve is the arm's seed i stretched by `speedup` along the cost axis, on eval grids
    stretched the same way, so every seed's cost to any threshold is exactly `speedup` x the arm's."""
    grid = np.linspace(0.0, 8.0, 41)   # in units of tau
    for seed, s in enumerate(SCALES):
        x_arm = grid * TAU * s
        y = score(x_arm, TAU * s)
        write_run(root, "nft", seed, x_arm, y, np.full(grid.size, heldout[0] + 0.01 * seed))
        x_base = x_arm * speedup
        keep = grid <= base_evals * 8.0 / 40 + 1e-9
        write_run(root, "flow_grpo", seed, x_base[keep], y[keep], np.full(keep.sum(), heldout[1] + 0.01 * seed))
    return load_runs(root)


def claim(tmp_path, **change):
    body = {"claim": "nft is 25x cheaper", "source": "NFT paper", "arm": "nft", "baseline": "flow_grpo",
            "metric": {"paper": "GenEval"}, "threshold": {"paper": 0.95, "fraction": 0.5}, "cost": "gpu_hours",
            "claimed_speedup": 25, "provenance": {"baseline": "quoted"}}
    body.update(change)
    return parse_claim(body, tmp_path / f"{body['arm']}_{body['claimed_speedup']}.yaml")


def test_run_folders_known_speedup_and_threshold_curve(tmp_path):
    runs = make_results(tmp_path / "r")
    result = V.evaluate_claims(runs, HEADLINE, [claim(tmp_path)], n_boot=500, n_points=8)
    row = result.table.iloc[0]
    # Base: the step-0 score; best final: the common final score; threshold halfway between.
    final = score(8.0, 1.0)
    assert result.base == pytest.approx(BASE) and result.best_final == pytest.approx(final)
    assert row["threshold"] == pytest.approx(BASE + 0.5 * (final - BASE))
    assert row["speedup"] == pytest.approx(25.0) and row["ci_low"] <= 25 <= row["ci_high"]
    assert row["verdict"] == V.SUPPORTED and row["bound"] == V.ESTIMATE
    curve = result.curves[row["claim"]]
    assert len(curve) == 8 and curve["threshold"].is_monotonic_increasing
    assert curve["threshold"].iloc[-1] == pytest.approx(final)
    # The last threshold is the mean final itself, a knife edge that a seed may miss by a rounding error.
    assert np.allclose(curve["speedup"].iloc[:-1], 25.0)
    assert "supported" in result.sentences[0] and "25x" in result.sentences[0]


def test_run_folders_censored_baseline_curve_switches_to_lower_bound(tmp_path):
    # The baseline stops after 12 of 40 evals (2.4 tau in each seed's own scale): thresholds above
    # score(2.4 tau) are out of every baseline seed's reach.
    runs = make_results(tmp_path / "r", base_evals=12)
    result = V.evaluate_claims(runs, HEADLINE, [claim(tmp_path, threshold={"paper": 0.95, "fraction": 0.96})],
                               n_boot=500, n_points=10)
    row = result.table.iloc[0]
    assert row["bound"] == V.LOWER and row["k_base"] == 0 and row["k_arm"] == 5
    assert row["ci_low"] < 25 and row["verdict"] == V.INCONCLUSIVE and math.isinf(row["ci_high"])
    assert "at least" in result.sentences[0]
    # The true costs are 25x the arm's, beyond the budget; had the seeds arrived at their budget (18.75x each
    # seed's arm, the scales 0.8-1.2 crossed in the resamples) 25x would already be inside the interval.
    assert row["claim_needs_budgets"] == 1 and row["claim_needs_cost"] == pytest.approx(2.4 * TAU * 1.2 * 25)
    assert "is inside the interval even if flow_grpo's censored seeds reached the threshold at their budget" in \
        result.sentences[0]
    curve = result.curves[row["claim"]]
    reach = score(2.4, 1.0)
    assert (curve.loc[curve["threshold"] <= reach - 1e-9, "bound"] == V.ESTIMATE).all()
    assert (curve.loc[curve["threshold"] > reach + 1e-9, "bound"] == V.LOWER).all()
    assert np.allclose(curve.loc[curve["bound"] == V.ESTIMATE, "speedup"], 25.0)


def test_threshold_ranges_merge_equal_verdicts_in_threshold_order():
    nan, inf = float("nan"), float("inf")
    curve = pd.DataFrame([   # given out of order: ranges follow the thresholds
        {"fraction": 0.50, "threshold": 0.5, "speedup": 3.0, "ci_low": 2.0, "ci_high": 4.0, "bound": V.ESTIMATE},
        {"fraction": 0.25, "threshold": 0.3, "speedup": 1.1, "ci_low": 0.8, "ci_high": 1.5, "bound": V.ESTIMATE},
        {"fraction": 0.75, "threshold": 0.7, "speedup": 5.0, "ci_low": 4.0, "ci_high": 6.0, "bound": V.ESTIMATE},
        {"fraction": 1.00, "threshold": 0.9, "speedup": 2.0, "ci_low": 2.0, "ci_high": inf, "bound": V.LOWER},
    ])
    ranges = V.threshold_ranges(curve, claimed=25.0)
    assert [r["verdict"] for r in ranges] == [V.NOT_CHEAPER, V.SMALLER, V.INCONCLUSIVE]
    assert (ranges[1]["lo"], ranges[1]["hi"]) == (0.5, 0.7)
    assert (ranges[1]["speedup_lo"], ranges[1]["speedup_hi"]) == (3.0, 5.0)
    assert ranges[1]["frac_lo"] == 0.5 and ranges[1]["frac_hi"] == 0.75
    assert ranges[2]["bounds"] == [V.LOWER] and ranges[2]["speedup_lo"] == 2.0
    # A claim of 4x is inside the interval at 0.5 and 0.7: the same points then read supported.
    assert [r["verdict"] for r in V.threshold_ranges(curve, claimed=4.0)][:2] == [V.NOT_CHEAPER, V.SUPPORTED]
    empty = pd.DataFrame([{"fraction": 0.1, "threshold": 0.2, "speedup": nan, "ci_low": nan, "ci_high": nan,
                           "bound": V.NO_BOUND}])
    assert V.threshold_ranges(empty, 25.0)[0]["verdict"] == V.INCONCLUSIVE


def test_claims_md_reads_the_curve_as_ranges_and_writes_its_numbers(tmp_path):
    # Known answer: 25x everywhere the baseline reaches (supported), lower bounds above its reach (inconclusive).
    runs = make_results(tmp_path / "r", base_evals=12)
    result = V.evaluate_claims(runs, HEADLINE, [claim(tmp_path)], n_boot=300, n_points=10)
    curve = result.curves[result.table.iloc[0]["claim"]]
    ranges = V.threshold_ranges(curve, 25.0)
    assert [r["verdict"] for r in ranges] == [V.SUPPORTED, V.INCONCLUSIVE]
    assert ranges[0]["speedup_lo"] == pytest.approx(25.0) and ranges[0]["speedup_hi"] == pytest.approx(25.0)
    assert ranges[1]["bounds"] == [V.LOWER] and ranges[0]["hi"] < score(2.4, 1.0) < ranges[1]["lo"]
    paths = write_claims(result, tmp_path / "out")
    text = paths["md"].read_text()
    assert "## Along the thresholds" in text and "supported, 25x" in text and "inconclusive, at least" in text
    written = pd.read_csv(paths["curves_csv"])
    assert list(written["claim"].unique()) == ["nft_25"] and len(written) == 10
    assert np.allclose(written["threshold"], curve["threshold"])


def test_run_folders_heldout_and_missing_arm_and_outputs(tmp_path):
    runs = make_results(tmp_path / "r", heldout=(0.9, 0.6))
    held = parse_claim({"claim": "crd hacks less", "source": "CRD", "kind": "heldout", "arm": "nft",
                        "baseline": "flow_grpo", "metric": "GenEval", "heldout": {"metric": "toy_no_extra_objects"},
                        "provenance": {"baseline": "unknown"}}, tmp_path / "hacking.yaml")
    absent = claim(tmp_path, arm="dgpo", claimed_speedup=20)
    result = V.evaluate_claims(runs, HEADLINE, [claim(tmp_path), held, absent], n_boot=300, n_points=5)
    rows = result.table.set_index("claim")
    assert rows.loc["hacking", "difference"] == pytest.approx(0.3)
    assert rows.loc["hacking", "verdict"] == V.SUPPORTED
    assert rows.loc["dgpo_20", "verdict"] == V.INCONCLUSIVE and "not run" in rows.loc["dgpo_20", "reason"]
    paths = write_claims(result, tmp_path / "out")
    table = pd.read_csv(paths["csv"])
    for column in ("claim", "arm", "baseline", "threshold", "speedup", "ci_low", "ci_high", "censored", "verdict"):
        assert column in table.columns
    assert len(table) == 3
    text = paths["md"].read_text()
    assert "claims_threshold_curves.png" in text and "**supported**" in text
    assert paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_heldout_gain_with_a_lower_reward_is_inconclusive(tmp_path):
    # flow_grpo stops at 12 of 40 evals, so its final reward is score(2.4 tau) against nft's score(8 tau) in every
    # seed, while its held-out score is 0.3 higher: less hacking, but also less optimisation.
    runs = make_results(tmp_path / "r", base_evals=12, heldout=(0.6, 0.9))
    held = parse_claim({"claim": "flow_grpo hacks less", "source": "x", "kind": "heldout", "arm": "flow_grpo",
                        "baseline": "nft", "metric": "GenEval", "heldout": {"metric": "toy_no_extra_objects"},
                        "provenance": {"baseline": "unknown"}}, tmp_path / "hacking.yaml")
    result = V.evaluate_claims(runs, HEADLINE, [held], n_boot=100)
    row = result.table.iloc[0]
    assert row["difference"] == pytest.approx(0.3)
    assert row["reward_difference"] == pytest.approx(score(2.4, 1.0) - score(8.0, 1.0))
    assert row["reward_ci_high"] < 0 and row["verdict"] == V.INCONCLUSIVE
    assert "lower reward" in result.sentences[0] and "its reward" in result.sentences[0]
    text = write_claims(result, tmp_path / "out")["md"].read_text()
    assert "reward (arm - baseline)" in text and "**inconclusive**" in text


def test_a_claim_can_be_judged_on_a_second_evaluation_samplers_columns(tmp_path):
    """Runs with `eval.extra_samplers.euler` carry `eval_euler/...` beside `eval/...`; a claim naming those columns
    in full is judged on them. Here the two samplers disagree (DPM2: the arm hacks 0.3 less; Euler: 0.2 more), so
    each verdict can only come from its own column."""
    make_results(tmp_path / "r", heldout=(0.9, 0.6))
    for path in (tmp_path / "r").glob("*/seed*/metrics.csv"):
        frame = pd.read_csv(path)
        arm_side = path.parent.parent.name == "nft"
        frame["eval_euler/toy_no_extra_objects"] = (0.5 if arm_side else 0.7) + frame[HELDOUT] - frame[HELDOUT].round(1)
        frame["eval_euler/toy_geneval.strict.task_mean"] = frame[HEADLINE]
        frame.to_csv(path, index=False)
    runs = load_runs(tmp_path / "r")

    def held(name, metric, heldout):
        return parse_claim({"claim": "nft hacks less", "source": "x", "kind": "heldout", "arm": "nft",
                            "baseline": "flow_grpo", "metric": {"paper": "GenEval", "benchmark": metric},
                            "heldout": {"metric": heldout}, "provenance": {"baseline": "unknown"}},
                           tmp_path / f"{name}.yaml")

    claims = [held("dpm2", "headline", "toy_no_extra_objects"),
              held("euler", "eval_euler/toy_geneval.strict.task_mean", "eval_euler/toy_no_extra_objects")]
    rows = V.evaluate_claims(runs, HEADLINE, claims, n_boot=100).table.set_index("claim")
    assert rows.loc["dpm2", "heldout_metric"] == HELDOUT and rows.loc["dpm2", "metric"] == HEADLINE
    assert rows.loc["dpm2", "difference"] == pytest.approx(0.3) and rows.loc["dpm2", "verdict"] == V.SUPPORTED
    assert rows.loc["euler", "heldout_metric"] == "eval_euler/toy_no_extra_objects"
    assert rows.loc["euler", "metric"] == "eval_euler/toy_geneval.strict.task_mean"
    assert rows.loc["euler", "difference"] == pytest.approx(-0.2) and rows.loc["euler", "verdict"] == V.REVERSED


def test_an_extended_baseline_is_judged_on_its_whole_runs_and_compared_at_the_common_budget(tmp_path):
    # flow_grpo is nft stretched 25x along the cost axis: within the common budget (nft's whole run) it is
    # censored; its extended runs (`extend:`) reach every threshold nft does, at 25x the cost.
    from diffrl_bench.report import analyse

    root = tmp_path / "r"
    make_results(root)
    common = 8.0 * TAU * max(SCALES)
    (root / "sweep.json").write_text(json.dumps({"sweeps": {"t": {"spec": {
        "budget": {"gpu_hours": common}, "extend": {"arms": ["flow_grpo"], "budget": {"gpu_hours": 30 * common}}}}}}))
    analysis = analyse(root, n_boot=200)
    cut = {r.seed: r for r in analysis.runs if r.arm == "flow_grpo"}
    whole = {r.seed: r for r in analysis.full_runs if r.arm == "flow_grpo"}
    for seed, run in cut.items():
        costs = run.frame["cost/gpu_hours"].to_numpy()
        assert costs[-1] >= common and costs[-2] < common          # up to the first row at the common budget
        assert len(whole[seed].frame) == 41 > len(run.frame)
    assert all(r.frame.equals(f.frame) for r, f in zip(analysis.runs, analysis.full_runs) if r.arm == "nft")
    assert any("common budget" in note for note in analysis.notes)
    final = analysis.summary.set_index("arm").loc["flow_grpo", "final_reward_mean"]
    assert final == pytest.approx(np.mean([r.frame[HEADLINE].dropna().iloc[-1] for r in cut.values()]))
    held = parse_claim({"claim": "nft hacks less", "source": "x", "kind": "heldout", "arm": "nft",
                        "baseline": "flow_grpo", "metric": "GenEval", "heldout": {"metric": "toy_no_extra_objects"},
                        "provenance": {"baseline": "unknown"}}, tmp_path / "held.yaml")
    with_ext = V.evaluate_claims(analysis.runs, HEADLINE, [claim(tmp_path), held], n_boot=300, n_points=5,
                                 full_runs=analysis.full_runs)
    row = with_ext.table.set_index("claim").loc["nft_25"]
    assert row["bound"] == V.ESTIMATE and row["speedup"] == pytest.approx(25.0) and row["verdict"] == V.SUPPORTED
    assert with_ext.best_final == pytest.approx(score(8.0, 1.0))   # the best final is read at the common budget
    assert with_ext.table.set_index("claim").loc["held", "difference"] == pytest.approx(0.3)
    without = V.evaluate_claims(analysis.runs, HEADLINE, [claim(tmp_path)], n_boot=300, n_points=5)
    assert without.table.iloc[0]["bound"] == V.LOWER and without.table.iloc[0]["verdict"] == V.INCONCLUSIVE


def test_shipped_claims_run_against_synthetic_folders(tmp_path):
    runs = make_results(tmp_path / "r")
    here = Path(__file__).resolve().parents[1] / "sweeps" / "claims"
    nft = load_claim(here / "nft_vs_flow_grpo.yaml")
    result = V.evaluate_claims(runs, HEADLINE, [nft], n_boot=300, n_points=4)
    assert result.table.iloc[0]["verdict"] == V.SUPPORTED


def test_missing_cost_column_is_a_report_error(tmp_path):
    from diffrl_bench.report import ReportError

    runs = make_results(tmp_path / "r")
    flops = claim(tmp_path, cost="flops")
    with pytest.raises(ReportError, match="cost/flops"):
        V.evaluate_claims(runs, HEADLINE, [flops], n_boot=100, n_points=3)


def test_cost_unit_override_uses_the_other_column(tmp_path):
    runs = make_results(tmp_path / "r")
    result = V.evaluate_claims(runs, HEADLINE, [claim(tmp_path)], n_boot=200, n_points=3, cost="nfe")
    row = result.table.iloc[0]
    # cost/nfe is 1000 x cost/gpu_hours in every run, so the ratio is the same 25 and the unit is recorded.
    assert row["cost"] == "nfe" and row["speedup"] == pytest.approx(25.0)
    from diffrl_bench.report import ReportError
    with pytest.raises(ReportError, match="'hours'"):
        V.evaluate_claims(runs, HEADLINE, [claim(tmp_path)], cost="hours")


def test_heldout_claim_on_runs_without_the_metric_is_inconclusive(tmp_path):
    runs = make_results(tmp_path / "r")
    for run in runs:
        run.frame = run.frame.drop(columns=[HELDOUT])
    crd = parse_claim({"claim": "crd hacks less", "source": "CRD", "kind": "heldout", "arm": "nft",
                       "baseline": "flow_grpo", "metric": "GenEval", "heldout": {"metric": "toy_no_extra_objects"},
                       "provenance": {"baseline": "unknown"}}, tmp_path / "hacking.yaml")
    row = V.evaluate_claims(runs, HEADLINE, [crd], n_boot=100).table.iloc[0]
    assert row["verdict"] == V.INCONCLUSIVE and "no held-out column" in row["reason"]


def test_cli_claims_write_table_figure_and_report_sentences(tmp_path, capsys):
    from diffrl_bench.report import main

    make_results(tmp_path / "r")
    shipped = Path(__file__).resolve().parents[1] / "sweeps" / "claims"
    out = tmp_path / "out"
    assert main([str(tmp_path / "r"), "--out", str(out), "--n-boot", "200", "--metric", HEADLINE,
                 "--claims", str(shipped / "nft_vs_flow_grpo.yaml"), str(shipped / "dgpo_vs_flow_grpo.yaml")]) == 0
    table = pd.read_csv(out / "claims.csv")
    for column in ("claim", "arm", "baseline", "threshold", "speedup", "ci_low", "ci_high", "censored", "verdict"):
        assert column in table.columns
    assert list(table["verdict"]) == [V.SUPPORTED, V.INCONCLUSIVE]  # dgpo was not run
    report = (out / "report.md").read_text()
    section = report.split("## Published claims")[1].split("\n## ")[0]
    assert sum(line.startswith("- ") for line in section.splitlines()) == 2
    assert "claims_threshold_curves.png" in section and (out / "claims_threshold_curves.png").is_file()
    assert "supported" in capsys.readouterr().out


def test_cli_bad_claim_file_exits_2_naming_the_key(tmp_path, capsys):
    from diffrl_bench.report import main

    make_results(tmp_path / "r")
    bad = tmp_path / "bad.yaml"
    bad.write_text("claim: x\nsource: y\narm: nft\nbaseline: flow_grpo\nmetric: {paper: g}\n"
                   "threshold: {paper: 0.9, fraction: 0.5}\ncost: gpu_hours\nclaimed_speedup: -3\n"
                   "provenance: {baseline: q}\n")
    assert main([str(tmp_path / "r"), "--out", str(tmp_path / "out"), "--claims", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "claimed_speedup" in err
    assert not (tmp_path / "out").exists()  # failed before any analysis or output


def test_extended_runs_that_stopped_short_are_named_in_the_notes(tmp_path):
    # Every flow_grpo seed runs to at least 1600 gpu-hours (seed 0, scale 0.8: 8 tau x 0.8 x 25); seed 3 is cut
    # below 900, as a seed whose extension has not run yet: only it is named, with what it spent.
    from diffrl_bench.report import analyse

    root = tmp_path / "r"
    make_results(root)
    metrics = root / "flow_grpo" / "seed3" / "metrics.csv"
    frame = pd.read_csv(metrics)
    frame[frame["cost/gpu_hours"] < 900].to_csv(metrics, index=False)
    spent = frame[frame["cost/gpu_hours"] < 900]["cost/gpu_hours"].max()
    (root / "sweep.json").write_text(json.dumps({"sweeps": {"t": {"spec": {
        "budget": {"gpu_hours": 100.0}, "extend": {"arms": ["flow_grpo"], "budget": {"gpu_hours": 1000.0}}}}}}))
    notes = [n for n in analyse(root, n_boot=50).notes if "stopped short" in n]
    assert len(notes) == 1 and notes[0].startswith("1 extended run(s) stopped short of 1000 gpu_hours")
    assert f"flow_grpo seed 3 ({spent:.2g})" in notes[0] and "seed 0" not in notes[0]
    (root / "sweep.json").write_text(json.dumps({"sweeps": {"t": {"spec": {
        "budget": {"gpu_hours": 100.0}, "extend": {"arms": ["flow_grpo"], "budget": {"gpu_hours": 800.0}}}}}}))
    assert not [n for n in analyse(root, n_boot=50).notes if "stopped short" in n]
