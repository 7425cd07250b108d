"""The head-to-head report: crossing, bootstrap, speedup and curve maths on data with known answers, and an
end-to-end report over a synthetic results directory (three arms x three seeds)."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from diffrl_bench import report
from diffrl_bench.report import (MissingColumnError, NoRunsError, ReportError, UnknownArmError, aggregate_curves,
                                 bootstrap_ci, phase_breakdown, speedup_ci, speedup_sentence, t_interval,
                                 threshold_crossing, write_report)

# ------------------------------------------------------------------------------------------ threshold_crossing


def test_crossing_interpolates_between_the_bracketing_eval_points():
    # y = 0.2 + 0.1 x reaches 0.45 at x = 2.5 exactly, between the evals at 2 and 3.
    x = np.array([0.0, 1.0, 2.0, 3.0])
    assert threshold_crossing(x, 0.2 + 0.1 * x, 0.45) == pytest.approx(2.5)
    # Uneven spacing: from (10, 0.5) to (30, 0.9) the score reaches 0.7 halfway, at x = 20.
    assert threshold_crossing([0, 10, 30], [0.0, 0.5, 0.9], 0.7) == pytest.approx(20.0)


def test_crossing_at_an_eval_point_and_at_the_first_eval():
    assert threshold_crossing([0, 10, 20], [0.1, 0.5, 0.9], 0.5) == pytest.approx(10.0)
    # Already above the threshold at the first eval: the cost is that eval's x, not an extrapolation.
    assert threshold_crossing([3.0, 10, 20], [0.6, 0.7, 0.9], 0.5) == 3.0


def test_crossing_not_reached_is_nan_and_first_crossing_wins():
    assert math.isnan(threshold_crossing([0, 1, 2], [0.1, 0.2, 0.3], 0.5))
    # Up past 0.5 between x=1 and x=2 (at 1.5), then down again and up later: the first crossing counts.
    assert threshold_crossing([0, 1, 2, 3, 4], [0.0, 0.4, 0.6, 0.2, 0.9], 0.5) == pytest.approx(1.5)
    # NaN evals (non-eval rows) are skipped: the bracket is (1, 0.4) to (3, 0.8).
    assert threshold_crossing([0, 1, 2, 3], [0.0, 0.4, np.nan, 0.8], 0.6) == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_interval_covers_a_normal_mean_about_95_percent():
    rng = np.random.default_rng(1234)
    true_mean, reps, covered = 1.5, 400, 0
    for _ in range(reps):
        sample = rng.normal(true_mean, 2.0, size=30)
        lo, hi = bootstrap_ci(sample, np.mean, n_boot=1000, level=0.95, rng=rng)
        covered += lo <= true_mean <= hi
    # Percentile bootstrap of a mean of 30 normals covers about 93-94%; binomial sd over 400 reps is 1.2%.
    assert 0.88 <= covered / reps <= 0.99


def test_bootstrap_is_reproducible_and_accepts_statistics_without_axis():
    values = [1.0, 4.0, 2.0, 8.0, 5.0]
    assert bootstrap_ci(values, rng=7) == bootstrap_ci(values, rng=7)
    lo, hi = bootstrap_ci(values, lambda v: float(np.median(v)), n_boot=500, rng=0)
    assert 1.0 <= lo <= np.median(values) <= hi <= 8.0
    # One seed has no spread to resample; a NaN (seed that did not reach) has no value to resample.
    assert all(math.isnan(v) for v in bootstrap_ci([3.0]))
    assert all(math.isnan(v) for v in bootstrap_ci([3.0, np.nan, 1.0]))


def test_bootstrap_of_constant_values_is_that_value():
    assert bootstrap_ci([2.5, 2.5, 2.5], rng=0) == (2.5, 2.5)


def test_t_interval_known_value():
    # mean 2, sd 1, n 3: half-width t_{0.975, 2} / sqrt(3) = 4.302653 / 1.732051 = 2.484138.
    lo, hi = t_interval([1.0, 2.0, 3.0], 0.95)
    assert lo == pytest.approx(2 - 2.484138, abs=1e-5)
    assert hi == pytest.approx(2 + 2.484138, abs=1e-5)
    assert all(math.isnan(v) for v in t_interval([1.0]))


# -------------------------------------------------------------------------------------------------- speedup


def test_speedup_is_the_ratio_of_mean_costs():
    ratio, lo, hi = speedup_ci([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], n_boot=2000, rng=0)
    assert ratio == pytest.approx(2.0)
    assert lo < 2.0 < hi
    # Costs without spread: every resample gives exactly 2.
    assert speedup_ci([2.0, 2.0, 2.0], [1.0, 1.0, 1.0], rng=0) == pytest.approx((2.0, 2.0, 2.0))
    # An arm twice as expensive has speedup 0.5.
    assert speedup_ci([1.0, 1.0], [2.0, 2.0], rng=0)[0] == pytest.approx(0.5)


def test_speedup_not_reached_is_nan():
    assert all(math.isnan(v) for v in speedup_ci([2.0, 4.0], [1.0, np.nan], rng=0))
    assert all(math.isnan(v) for v in speedup_ci([np.nan, 4.0], [1.0, 2.0], rng=0))
    ratio, lo, hi = speedup_ci([4.0], [2.0], rng=0)
    assert ratio == pytest.approx(2.0) and math.isnan(lo) and math.isnan(hi)


def _row(reached=True, k=3, n=3, gpu=0.1, nfe=1000.0, s=(2.0, 1.5, 2.5), s_nfe=(2.0, 1.5, 2.5)):
    return {"reached": reached, "seeds_reached": k, "seeds": n, "cost_gpu_hours_mean": gpu, "cost_nfe_mean": nfe,
            "speedup_gpu_hours": s[0], "speedup_gpu_hours_ci_low": s[1], "speedup_gpu_hours_ci_high": s[2],
            "speedup_nfe": s_nfe[0], "speedup_nfe_ci_low": s_nfe[1], "speedup_nfe_ci_high": s_nfe[2]}


def test_speedup_wording():
    base = _row(gpu=0.2)
    assert speedup_sentence("NFT", "Flow-GRPO", 0.8, _row(s=(3.1, 2.4, 4.0)), base).startswith(
        "NFT is 3.1x (2.4 to 4.0) cheaper than Flow-GRPO to reach 0.8 in GPU-hours")
    # Below 1 the inverse is worded: 0.5 (0.4 to 0.8) -> 2.0x (1.2 to 2.5) more expensive.
    text = speedup_sentence("X", "B", 0.8, _row(s=(0.5, 0.4, 0.8)), base)
    assert "X is 2.0x (1.2 to 2.5) more expensive than B to reach 0.8" in text
    assert "includes 1" in speedup_sentence("X", "B", 0.8, _row(s=(1.2, 0.9, 1.6)), base)
    assert "X: not reached (2/3 seeds reached 0.8)" in speedup_sentence("X", "B", 0.8, _row(False, 2), base)
    assert "B: not reached (1/3 seeds)" in speedup_sentence("X", "B", 0.8, _row(), _row(False, 1))


# ---------------------------------------------------------------------------------------- curves and phases


def test_aggregate_curves_mean_and_t_band_on_a_common_grid():
    # Seed A: y = x on [0, 2]; seed B: y = x + 0.2 on [0, 3] with other eval points. Common range [0, 2].
    band = aggregate_curves([[0, 1, 2], [0, 0.5, 1.5, 3]], [[0, 1, 2], [0.2, 0.7, 1.7, 3.2]], n_points=21)
    assert band.n_seeds == 2
    assert band.x[0] == 0 and band.x[-1] == 2
    np.testing.assert_allclose(band.mean, band.x + 0.1, atol=1e-12)
    # sd of (a, a + 0.2) = 0.1414, se = 0.1, t_{0.975, 1} = 12.7062.
    np.testing.assert_allclose(band.hi - band.mean, 1.27062, atol=1e-4)
    np.testing.assert_allclose(band.mean - band.lo, 1.27062, atol=1e-4)
    single = aggregate_curves([[0, 1]], [[0.0, 1.0]])
    assert single.n_seeds == 1 and np.isnan(single.lo).all()


def test_phase_breakdown_reads_the_last_row_in_hours():
    frame = pd.DataFrame({"step": [0, 1, 2], "cost/rollout_device_s": [0, 1800, 3600],
                          "cost/reward_device_s": [0, 900, 1800], "cost/train_device_s": [0, 3600, 7200],
                          "cost/eval_device_s": [360, 360, 720]})
    assert phase_breakdown(frame) == pytest.approx({"rollout": 1.0, "reward": 0.5, "train": 2.0, "eval": 0.2})
    assert math.isnan(phase_breakdown(frame.drop(columns="cost/reward_device_s"))["reward"])


# ------------------------------------------------------------------------------------------- end to end

EVAL_EVERY, STEPS = 10, 40


def _write_run(directory, *, name, seed, slope, gpu_rate, nfe_rate, arm_json=None, strict=True, flops_rate=None):
    """A run whose headline is 0.1 + slope * step, with costs linear in the step (rates per step); `cost/flops`
    only with a `flops_rate` (runs logged before the ledger counted FLOPs have none)."""
    directory.mkdir(parents=True)
    rows = []
    for step in range(STEPS + 1):
        gpu = gpu_rate * step
        row = {"step": step, "cost/gpu_hours": gpu, "cost/nfe": nfe_rate * step, "cost/images": 32 * step,
               "cost/rollout_device_s": 0.25 * gpu * 3600, "cost/reward_device_s": 0.05 * gpu * 3600,
               "cost/train_device_s": 0.70 * gpu * 3600, "cost/eval_device_s": 36.0 * (step // EVAL_EVERY + 1),
               "train/optimizer_steps": float(step) if step else np.nan,
               "reward/mean": np.nan if step == 0 else 0.2 + slope * step}
        if step % EVAL_EVERY == 0:
            if strict:
                row["eval/score.strict.task_mean"] = 0.1 + slope * step
            # Partial credit sits higher: if the report picked it instead of the strict form, the numbers would move.
            row["eval/score.task_mean"] = 0.15 + slope * step
            row["eval/natural.task_mean"] = 0.98 - 0.001 * step
        if flops_rate is not None:
            row["cost/flops"] = flops_rate * step
        rows.append(row)
    pd.DataFrame(rows).to_csv(directory / "metrics.csv", index=False)
    (directory / "config.yaml").write_text(
        f"name: {name}\nalgorithm: nft\ntrain:\n  seed: {seed}\neval:\n  rewards:\n  - score\n  - natural\n")
    if arm_json is not None:
        (directory / "arm.json").write_text(json.dumps(arm_json))


GPU_RATES = (0.010, 0.012, 0.014)


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    for seed, rate in enumerate(GPU_RATES):
        # Config names of the trainer: `flow_grpo`, `flow_grpo_seed1`, ...; the arm is the name without _seed<N>.
        _write_run(root / "runs" / ("flow_grpo" if seed == 0 else f"flow_grpo_seed{seed}"),
                   name="flow_grpo" if seed == 0 else f"flow_grpo_seed{seed}", seed=seed, slope=0.02,
                   gpu_rate=rate, nfe_rate=1000)
        # Same score per step at half the GPU-hours and a quarter of the NFEs; arm and seed from arm.json.
        _write_run(root / "sweep" / f"trial_{seed}", name=f"trial_{seed}", seed=99, slope=0.02,
                   gpu_rate=rate / 2, nfe_rate=250, arm_json={"arm": "fast", "seed": seed})
        # Seeds 0 and 1 reach 0.45 at step 35; seed 2 (slope 0.0075) ends at 0.4 and never does.
        _write_run(root / "runs" / f"weak_seed{seed}", name=f"weak_seed{seed}", seed=seed,
                   slope=0.01 if seed < 2 else 0.0075, gpu_rate=0.001, nfe_rate=100)
    return root


def test_end_to_end_report_with_known_answers(results, tmp_path):
    out = tmp_path / "out"
    path = write_report(results, out, threshold=0.45, n_boot=500)
    assert path == out / "report.md"
    summary = pd.read_csv(out / "summary.csv").set_index("arm")
    # The named-like-Flow-GRPO arm is the default baseline, though "fast" sorts first; baseline rows come first.
    assert list(summary.index) == ["flow_grpo", "fast", "weak"]
    assert (summary["baseline"] == "flow_grpo").all()
    assert (summary["metric"] == "eval/score.strict.task_mean").all()
    assert (summary["seeds"] == 3).all()

    grpo, fast, weak = summary.loc["flow_grpo"], summary.loc["fast"], summary.loc["weak"]
    assert grpo["final_reward_mean"] == pytest.approx(0.9)
    assert grpo["threshold"] == 0.45
    # 0.1 + 0.02 step = 0.45 at step 17.5, between the evals at 10 and 20: 17.5 x rate GPU-hours per seed.
    assert grpo["cost_gpu_hours_mean"] == pytest.approx(17.5 * np.mean(GPU_RATES))
    assert grpo["cost_gpu_hours_ci_low"] <= grpo["cost_gpu_hours_mean"] <= grpo["cost_gpu_hours_ci_high"]
    assert 17.5 * GPU_RATES[0] - 1e-12 <= grpo["cost_gpu_hours_ci_low"]
    assert grpo["cost_gpu_hours_ci_high"] <= 17.5 * GPU_RATES[-1] + 1e-12
    assert grpo["cost_nfe_mean"] == pytest.approx(17500)
    assert grpo["speedup_gpu_hours"] == 1.0 and math.isnan(grpo["speedup_gpu_hours_ci_low"])

    assert bool(fast["reached"]) and fast["seeds_reached"] == 3
    assert fast["cost_gpu_hours_mean"] == pytest.approx(17.5 * np.mean(GPU_RATES) / 2)
    assert fast["speedup_gpu_hours"] == pytest.approx(2.0)
    assert fast["speedup_gpu_hours_ci_low"] < 2.0 < fast["speedup_gpu_hours_ci_high"]
    assert fast["speedup_nfe"] == pytest.approx(4.0)
    assert fast["speedup_nfe_ci_low"] == pytest.approx(4.0) and fast["speedup_nfe_ci_high"] == pytest.approx(4.0)

    assert not bool(weak["reached"]) and weak["seeds_reached"] == 2
    assert math.isnan(weak["cost_gpu_hours_mean"]) and math.isnan(weak["speedup_gpu_hours"])

    # Per-phase breakdown: shares 25/5/70 of each run's final GPU-hours (40 steps x rate), mean over seeds.
    final = 40 * np.mean(GPU_RATES)
    assert grpo["rollout_gpu_hours"] == pytest.approx(0.25 * final)
    assert grpo["reward_gpu_hours"] == pytest.approx(0.05 * final)
    assert grpo["train_gpu_hours"] == pytest.approx(0.70 * final)
    assert grpo["final_heldout:natural.task_mean"] == pytest.approx(0.94)

    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 9 and sorted(runs[runs["arm"] == "fast"]["seed"]) == [0, 1, 2]

    text = path.read_text()
    assert "fast is 2.0x (" in text
    assert "cheaper than flow_grpo to reach 0.45 in GPU-hours, and 4.0x (4.0 to 4.0) cheaper in NFEs" in text
    assert "weak: not reached (2/3 seeds reached 0.45)" in text
    for name in ("reward_vs_gpu_hours.png", "reward_vs_nfe.png", "reward_vs_optimizer_steps.png",
                 "cost_to_threshold.png", "cost_breakdown.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text
    assert "| flow_grpo | 3 |" in text
    assert not list(out.glob(".*.tmp"))


def test_default_threshold_and_cli(results, tmp_path, capsys):
    out = tmp_path / "cli"
    assert report.main([str(results), "--out", str(out), "--n-boot", "200", "--baseline", "fast"]) == 0
    printed = capsys.readouterr().out
    summary = pd.read_csv(out / "summary.csv").set_index("arm")
    # Best mean final score 0.9 x 0.9 = 0.81: reached at step 35.5 by both slope-0.02 arms, by no weak seed.
    assert (summary["threshold"] == 0.81).all()
    assert summary.loc["flow_grpo", "cost_gpu_hours_mean"] == pytest.approx(35.5 * np.mean(GPU_RATES))
    assert summary.loc["flow_grpo", "speedup_gpu_hours"] == pytest.approx(0.5)
    assert summary.loc["weak", "seeds_reached"] == 0
    assert "flow_grpo is 2.0x (" in printed and "more expensive than fast to reach 0.81" in printed
    assert "not reached" in printed


def test_metric_override_and_partial_credit_fallback(tmp_path):
    root = tmp_path / "r"
    for seed in range(2):
        _write_run(root / f"a_seed{seed}", name=f"a_seed{seed}", seed=seed, slope=0.02, gpu_rate=0.01, nfe_rate=10,
                   strict=False)
    analysis = report.analyse(root, threshold=0.45, n_boot=100)
    # No strict column anywhere: the task-mean form, 0.15 + 0.02 step, reaches 0.45 at step 15.
    assert analysis.headline == "eval/score.task_mean"
    assert analysis.summary.loc[0, "cost_gpu_hours_mean"] == pytest.approx(0.15)
    analysis = report.analyse(root, threshold=0.9, metric="natural.task_mean", n_boot=100)
    assert analysis.headline == "eval/natural.task_mean"
    assert analysis.summary.loc[0, "cost_gpu_hours_mean"] == 0.0


def test_errors_name_the_directory_column_and_arm(results, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoRunsError, match="empty"):
        write_report(empty)
    assert report.main([str(empty)]) == 2
    assert str(empty) in capsys.readouterr().err

    with pytest.raises(UnknownArmError, match="'nope'.*flow_grpo"):
        write_report(results, tmp_path / "o", baseline="nope")
    assert report.main([str(results), "--baseline", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err

    with pytest.raises(MissingColumnError, match="eval/nothing"):
        report.analyse(results, metric="eval/nothing")

    # One run without the strict column the others have: named, not silently compared on another score.
    _write_run(results / "runs" / "late_seed0", name="late_seed0", seed=0, slope=0.02, gpu_rate=0.01, nfe_rate=10,
               strict=False)
    with pytest.raises(MissingColumnError, match=r"late_seed0.*eval/score\.strict\.task_mean"):
        report.analyse(results)


def test_the_same_arm_and_seed_twice_is_refused(tmp_path):
    root = tmp_path / "r"
    _write_run(root / "x" / "a_seed1", name="a_seed1", seed=1, slope=0.02, gpu_rate=0.01, nfe_rate=10)
    _write_run(root / "y" / "a_seed1", name="a_seed1", seed=1, slope=0.02, gpu_rate=0.01, nfe_rate=10)
    with pytest.raises(ReportError, match="arm 'a' seed 1"):
        report.load_runs(root)


def test_mounts_as_a_subcommand(results, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="diffrl-bench")
    sub = parser.add_subparsers(dest="command", required=True)
    report.add_arguments(sub.add_parser("report"))
    args = parser.parse_args(["report", str(results), "--out", str(tmp_path / "sub"), "--threshold", "0.45",
                              "--n-boot", "100", "--metric", "eval/score.strict.task_mean"])
    assert report.run(args) == 0
    assert (tmp_path / "sub" / "summary.csv").exists()
    with pytest.raises(SystemExit):
        parser.parse_args(["report", str(results), "--threshold", "0.5", "--threshold-fraction", "0.8"])
    capsys.readouterr()


def _ablation_results(root):
    """Arms crossing objective {a, b} x estimator {x, y}: final score 0.1 + 40 slope, slope = 0.005 (objective b)
    + 0.0025 (estimator y) over 0.005; plus a reference arm whose config has no `algo` keys."""
    for objective in ("a", "b"):
        for estimator in ("x", "y"):
            slope = 0.005 + 0.005 * (objective == "b") + 0.0025 * (estimator == "y")
            for seed in range(2):
                run = root / "runs" / f"{objective}-{estimator}" / f"seed{seed}"
                _write_run(run, name=f"{objective}-{estimator}_seed{seed}", seed=seed, slope=slope, gpu_rate=0.01,
                           nfe_rate=10, arm_json={"arm": f"{objective}-{estimator}", "seed": seed})
                with open(run / "config.yaml", "a") as handle:
                    handle.write(f"algo:\n  objective: {objective}\n  estimator: {estimator}\n")
    _write_run(root / "runs" / "reference" / "seed0", name="reference_seed0", seed=0, slope=0.02, gpu_rate=0.01,
               nfe_rate=10, arm_json={"arm": "reference", "seed": 0})
    spec = {"ablate": ["algo.objective", "algo.estimator"]}
    (root / "sweep.json").write_text(json.dumps({"sweeps": {"abl": {"spec": spec}}}))
    return root


def test_ablation_tables_by_arm_and_by_value(tmp_path, capsys):
    root = _ablation_results(tmp_path / "abl")
    out = tmp_path / "out"
    # The ablated keys come from the sweep spec recorded in sweep.json.
    assert report.main([str(root), "--out", str(out), "--n-boot", "50"]) == 0
    table = pd.read_csv(out / "ablation.csv")
    by_arm = table[table["table"] == "by_arm"].set_index("arm")
    assert sorted(by_arm.index) == ["a-x", "a-y", "b-x", "b-y"]  # the reference arm sets no algo keys
    assert by_arm.loc["b-y", "final_reward"] == pytest.approx(0.1 + 40 * 0.0125)
    assert by_arm.loc["a-x", "algo.estimator"] == "x" and by_arm.loc["a-x", "seeds"] == 2
    by_value = table[table["table"] == "by_value"].set_index(["key", "value"])
    # Main effects: objective b adds 40 x 0.005 = 0.2 over a, estimator y adds 0.1 over x, whatever the other key.
    mean = by_value["mean_final_reward"]
    assert mean[("algo.objective", "b")] - mean[("algo.objective", "a")] == pytest.approx(0.2)
    assert mean[("algo.estimator", "y")] - mean[("algo.estimator", "x")] == pytest.approx(0.1)
    assert by_value.loc[("algo.objective", "a"), "arms"] == 2
    assert by_value.loc[("algo.estimator", "x"), "min_final_reward"] == pytest.approx(0.3)
    assert by_value.loc[("algo.estimator", "x"), "max_final_reward"] == pytest.approx(0.5)
    text = (out / "report.md").read_text()
    assert "## Ablation" in text and "4 of 5 arms" in text
    assert "algo.estimator = y: 0.500 over 2 arms" in capsys.readouterr().out

    # --by with no key turns it off; an explicit key list overrides the spec's.
    plain = report.analyse(root, n_boot=20, ablate=[])
    assert plain.ablation is None
    only = report.analyse(root, n_boot=20, ablate=["algo.estimator"])
    assert list(only.ablation_effects["value"]) == ["x", "y"]


def test_ablation_errors_name_the_arm_and_the_key(tmp_path):
    root = _ablation_results(tmp_path / "abl")
    with pytest.raises(report.ReportError, match="algo.nothing"):
        report.analyse(root, n_boot=20, ablate=["algo.nothing"])
    with open(root / "runs" / "a-x" / "seed1" / "config.yaml", "a") as handle:
        handle.write("rollout:\n  sampler:\n    name: euler\n")
    with open(root / "runs" / "a-x" / "seed0" / "config.yaml", "a") as handle:
        handle.write("rollout:\n  sampler:\n    name: dpm2\n")
    with pytest.raises(report.ReportError, match="arm 'a-x': its seeds differ"):
        report.analyse(root, n_boot=20, ablate=["rollout.sampler.name"])


def test_evaluated_weights_are_stated_and_a_mismatch_is_flagged(tmp_path):
    def run(arm, seed, eval_cfg):
        return report.RunResult(arm=arm, seed=seed, path=tmp_path, frame=pd.DataFrame(), config={"eval": eval_cfg})

    old = run("a", 0, {"every": 5})  # a run written before the evaluation EMA existed
    assert report.evaluated_weights([old, run("b", 0, {"ema_decay": 0.0})]) == "Evaluated weights: theta, for every arm."
    ema = [run("a", 0, {"ema_decay": 0.9, "ema_every": 8}), run("b", 1, {"ema_decay": 0.9, "ema_every": 8})]
    assert report.evaluated_weights(ema) == ("Evaluated weights: an EMA of the weights (decay 0.9, updated every 8 "
                                             "optimizer step(s)), for every arm.")
    mixed = report.evaluated_weights([ema[0], run("b", 0, {"ema_decay": 0.0}), run("b", 1, {})])
    assert mixed.startswith("**Evaluated weights differ between arms**")
    assert "(decay 0.9, updated every 8 optimizer step(s)) for a; theta for b." in mixed
    # Flow-GRPO's two moves per update and CRD's RL-step clock are named, so the two read as different settings
    clocks = report.evaluated_weights([run("f", 0, {"ema_decay": 0.9, "ema_every": 8, "ema_updates_per_event": 2}),
                                       run("c", 0, {"ema_decay": 0.995, "ema_every": 10, "ema_unit": "rl_step"})])
    assert "(decay 0.9, updated every 8 optimizer step(s), 2 moves each) for f" in clocks
    assert "(decay 0.995, updated every 10 RL step(s)) for c" in clocks


def test_eval_cfg_and_precision_are_stated_per_arm(tmp_path):
    def run(arm, seed, cfg, precision="fp16", dtype="float32"):
        config = {"eval": {"sampler": {"cfg_scale": cfg}}, "train": {"mixed_precision": precision},
                  "model": {"options": {"dtype": dtype}}}
        return report.RunResult(arm=arm, seed=seed, path=tmp_path, frame=pd.DataFrame(), config=config)

    # The SD3.5 head-to-head: Flow-GRPO judged at its own CFG 4.5, the others at 1; one precision fixed for all.
    runs = [run("flow_grpo", 0, 4.5), run("flow_grpo", 1, 4.5), run("nft", 0, 1.0), run("awm", 0, 1.0)]
    cfg, precision = report.arm_settings(runs)
    assert cfg == "Evaluation per arm: CFG 4.5 for flow_grpo; CFG 1 for nft, awm."
    assert precision == "Precision: fp16 autocast, frozen weights float32, for every arm."
    cfg, precision = report.arm_settings([run("nft", 0, 1.0), run("crd", 0, 1.0, "bf16", "bfloat16"),
                                          report.RunResult("old", 0, tmp_path, pd.DataFrame(), config={})])
    assert cfg == "Evaluation per arm: CFG 1 for nft, crd; unrecorded for old."
    assert precision == ("Precision per arm: fp16 autocast, frozen weights float32 for nft; bf16 autocast, "
                         "frozen weights bfloat16 for crd; unrecorded for old.")
    split = run("nft", 0, 1.0)
    split.config["model"]["options"]["text_encoder_dtype"] = "float16"  # the originals' fp16 text encoders
    assert report.arm_settings([split])[1] == ("Precision: fp16 autocast, frozen weights float32, text encoders "
                                               "float16, for every arm.")


def _half_finished_sweep(root):
    """A sweep whose spec names flow_grpo as the baseline: nft finished, flow_grpo seed 0 only started."""
    for seed in range(2):
        _write_run(root / "nft" / f"seed{seed}", name=f"nft_seed{seed}", seed=seed, slope=0.01, gpu_rate=0.01,
                   nfe_rate=10, arm_json={"arm": "nft", "seed": seed})
    started = root / "flow_grpo" / "seed0"
    started.mkdir(parents=True)
    (started / "arm.json").write_text(json.dumps({"arm": "flow_grpo", "seed": 0}))
    (started / "config.yaml").write_text("name: flow_grpo_seed0\n")
    (root / "sweep.json").write_text(json.dumps({"sweeps": {"s": {"spec": {"baseline": "flow_grpo"}}}}))
    return started


def test_a_half_finished_sweep_keeps_its_specs_baseline_or_refuses_naming_the_unfinished_run(tmp_path, capsys):
    root = tmp_path / "sweep"
    started = _half_finished_sweep(root)
    with pytest.raises(ReportError, match=rf"the sweep spec's baseline arm 'flow_grpo' has no finished run under "
                                          rf"{root} \(unfinished: {started}\); finish the sweep, or pass --baseline"):
        report.analyse(root, n_boot=20)
    assert report.main([str(root), "--out", str(tmp_path / "out"), "--n-boot", "20"]) == 2
    # Once asked for explicitly, the other baseline is used, and the unfinished run is still named.
    analysis = report.analyse(root, baseline="nft", n_boot=20)
    assert analysis.baseline == "nft"
    assert any(f"1 run(s) not finished (no metrics.csv), left out: flow_grpo ({started})" in n for n in analysis.notes)


def test_the_specs_baseline_is_kept_when_finished(tmp_path):
    root = tmp_path / "sweep"
    started = _half_finished_sweep(root)
    import shutil

    shutil.rmtree(started)
    _write_run(started, name="flow_grpo_seed0", seed=0, slope=0.005, gpu_rate=0.01, nfe_rate=10,
               arm_json={"arm": "flow_grpo", "seed": 0})
    (root / "sweep.json").write_text(json.dumps({"sweeps": {"s": {"spec": {"baseline": "nft"}}}}))
    analysis = report.analyse(root, n_boot=20)
    assert analysis.baseline == "nft" and analysis.baseline_reason == "the sweep spec's baseline"
    assert not any("not finished" in n for n in analysis.notes)


def test_flops_is_a_cost_axis_when_every_run_has_it_and_a_flops_sweep_judges_claims_in_flops(tmp_path):
    from diffrl_bench.report.completeness import spec_budget_cost
    from diffrl_bench.report.runs import cost_axes

    root = tmp_path / "sweep"
    for seed in range(2):
        for arm, rate in (("nft", 1e12), ("flow_grpo", 2e12)):
            _write_run(root / arm / f"seed{seed}", name=f"{arm}_seed{seed}", seed=seed, slope=0.01, gpu_rate=0.01,
                       nfe_rate=10, arm_json={"arm": arm, "seed": seed}, flops_rate=rate)
    analysis = report.analyse(root, n_boot=20)
    assert [axis[0] for axis in cost_axes(analysis.runs)][-1] == "cost/flops"
    run = next(r for r in analysis.runs if r.arm == "flow_grpo")
    assert run.eval_points("eval/score.strict.task_mean")["cost/flops"].tolist() == [2e12 * s for s in range(0, 41, 10)]
    out = tmp_path / "out"
    text = write_report(root, out, n_boot=20).read_text()
    assert "](reward_vs_flops.png)" in text and (out / "reward_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    # One run without the column (logged before FLOPs were counted): no FLOP axis rather than a broken one.
    _write_run(root / "nft" / "seed2", name="nft_seed2", seed=2, slope=0.01, gpu_rate=0.01, nfe_rate=10,
               arm_json={"arm": "nft", "seed": 2})
    assert "cost/flops" not in [axis[0] for axis in cost_axes(report.analyse(root, n_boot=20).runs)]

    assert spec_budget_cost(root) is None  # no sweep.json
    (root / "sweep.json").write_text(json.dumps({"sweeps": {"s": {"spec": {"budget": {"flops": 4e13}}}}}))
    assert spec_budget_cost(root) == "flops"
    (root / "sweep.json").write_text(json.dumps({"sweeps": {"s": {"spec": {"budget": {"gpu_hours": 0.1}}}}}))
    assert spec_budget_cost(root) is None


def test_a_bad_tune_section_in_sweep_json_is_a_report_error_naming_the_file(tmp_path):
    # It used to surface as a NameError from the message itself.
    from diffrl_bench.report.analysis import tuning_lines
    from diffrl_bench.report.errors import ReportError

    (tmp_path / "sweep.json").write_text('{"sweeps": {"t": {"spec": {"arms": {"a": {}}, "tune": {"trails": 3}}}}}')
    with pytest.raises(ReportError, match=r"sweep\.json: sweep t: .*trails"):
        tuning_lines(tmp_path)


@pytest.mark.parametrize("record", ['["not", "a", "mapping"]', '{"spec": ["ablate"]}'])
def test_a_sweep_record_that_is_not_a_mapping_is_a_report_error_for_every_reader(tmp_path, record):
    # sweep_ablate_keys and tuning_lines used to raise AttributeError here; the baseline reader a ReportError.
    from diffrl_bench.report.analysis import sweep_ablate_keys, tuning_lines
    from diffrl_bench.report.completeness import spec_baseline, spec_extension
    from diffrl_bench.report.errors import ReportError

    (tmp_path / "sweep.json").write_text('{"sweeps": {"ok": {"spec": {}}, "broken": %s}}' % record)
    for reader in (sweep_ablate_keys, tuning_lines, spec_baseline, spec_extension):
        with pytest.raises(ReportError, match=r"cannot read .*sweep\.json: .*'broken'"):
            reader(tmp_path)
