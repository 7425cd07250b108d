"""report.md: the head-to-head sentences, summary, ablation, figure links, per-phase costs, runs and method notes."""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

from diffrl_bench.ledger import BUDGET_PHASES
from diffrl_bench.report.analysis import Analysis
from diffrl_bench.report.runs import AXES, COST_UNITS, MISSING, OPTIONAL_AXES, RunResult, config_value
from diffrl_bench.report.wording import format_number, format_threshold, short_name


def _ci_cell(mean: float, lo: float, hi: float, unit: str = "") -> str:
    if not np.isfinite(mean):
        return "n/a"
    if np.isfinite(lo) and np.isfinite(hi):
        return f"{format_number(mean, unit)} ({format_number(lo, unit)} to {format_number(hi, unit)})"
    return format_number(mean, unit)


def _markdown_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ablation_markdown(a: Analysis) -> List[str]:
    score = f"final {short_name(a.headline)}"
    held = [c for c in a.ablation.columns if c.startswith("final_heldout:")]
    by_value = [[f"`{r['key']}`", str(r["value"]), str(r["arms"]), f"{r['mean_final_reward']:.3f}",
                 f"{r['min_final_reward']:.3f} to {r['max_final_reward']:.3f}"] for _, r in a.ablation_effects.iterrows()]
    ordered = a.ablation.sort_values("final_reward", ascending=False, kind="stable")
    by_arm = [[r["arm"], *[str(r[k]) for k in a.ablate], str(r["seeds"]), f"{r['final_reward']:.3f}",
               *[f"{r[c]:.3f}" for c in held]] for _, r in ordered.iterrows()]
    return ["## Ablation", "",
            f"Arms whose configs set every ablated key ({', '.join(f'`{k}`' for k in a.ablate)}); "
            f"{len(a.ablation)} of {len(a.arms)} arms. Each value's row averages the arm means over the arms with "
            "that value, so it reads across every setting of the other keys (a main effect).", "",
            _markdown_table(["key", "value", "arms", f"mean {score}", "range over those arms"], by_value), "",
            _markdown_table(["arm", *[f"`{k}`" for k in a.ablate], "seeds", score,
                             *[short_name(c.removeprefix("final_heldout:")) for c in held]], by_arm), "",
            "Both tables, unrounded: [ablation.csv](ablation.csv).", ""]


def evaluated_weights(runs: List[RunResult]) -> str:
    """One sentence on which weights the arms' evaluations sampled: theta, or an EMA of it (`eval.ema_decay`)."""
    by_setting: Dict[str, List[str]] = {}
    for run in runs:
        decay = config_value(run.config, "eval.ema_decay")
        every = config_value(run.config, "eval.ema_every")
        # keys absent from runs written before they existed take their then-only behaviour
        unit = config_value(run.config, "eval.ema_unit")
        moves = config_value(run.config, "eval.ema_updates_per_event")
        if decay is MISSING or not decay:  # written before the evaluation EMA existed, or with it off
            setting = "theta"
        else:
            unit = "RL step(s)" if unit == "rl_step" else "optimizer step(s)"
            twice = f", {moves} moves each" if moves is not MISSING and moves > 1 else ""
            setting = f"an EMA of the weights (decay {decay:g}, updated every {every if every is not MISSING else 1}" \
                      f" {unit}{twice})"
        arms = by_setting.setdefault(setting, [])
        if run.arm not in arms:
            arms.append(run.arm)
    if len(by_setting) == 1:
        return f"Evaluated weights: {next(iter(by_setting))}, for every arm."
    parts = "; ".join(f"{setting} for {', '.join(arms)}" for setting, arms in by_setting.items())
    return f"**Evaluated weights differ between arms**, so their scores are not like for like: {parts}."


def _claims_markdown(claims, figures: Dict[str, str]) -> List[str]:
    out = ["## Published claims", ""] + [f"- {s}" for s in claims.sentences] + [""]
    out.append("Table, estimator and how each paper ran its baseline: [claims.md](claims.md); all columns: "
               "[claims.csv](claims.csv).")
    name = figures.get("claims_threshold_curves")
    if name:
        out += ["", f"![speedup vs threshold]({name})", "",
                "*Each pair's speedup as a function of the threshold, from the base model's score up to the best "
                "arm's final: band where every seed of both arms reached, triangles for one-sided bounds where some "
                "seeds did not (censored), dashed line the claim.*"]
    return out + [""]


def _by_arm(runs: List[RunResult], label: str, setting_of) -> str:
    """One sentence: `label`'s setting for every arm, or each setting with the arms that used it."""
    by_setting: Dict[str, List[str]] = {}
    for run in runs:
        arms = by_setting.setdefault(setting_of(run.config), [])
        if run.arm not in arms:
            arms.append(run.arm)
    if len(by_setting) == 1:
        return f"{label}: {next(iter(by_setting))}, for every arm."
    return f"{label} per arm: " + "; ".join(f"{s} for {', '.join(arms)}" for s, arms in by_setting.items()) + "."


def _eval_cfg(config: dict) -> str:
    value = config_value(config, "eval.sampler.cfg_scale")
    return "unrecorded" if value is MISSING else f"CFG {value:g}"


def _precision(config: dict) -> str:
    autocast = config_value(config, "train.mixed_precision")
    weights = config_value(config, "model.options.dtype")
    text = config_value(config, "model.options.text_encoder_dtype")
    if autocast is MISSING:
        return "unrecorded"
    return f"{autocast} autocast" + ("" if weights is MISSING else f", frozen weights {weights}") + \
        ("" if text is MISSING or not text else f", text encoders {text}")


def arm_settings(runs: List[RunResult]) -> List[str]:
    """Sentences on the settings a head-to-head may deliberately leave to each arm (a sweep's `per_arm:` keys, or
    fixed under `fairness:`): the evaluation CFG and the precision. Stated either way, so a reader sees whether
    Flow-GRPO was judged at its own CFG 4.5 and under which precision each arm trained."""
    return [_by_arm(runs, "Evaluation", _eval_cfg), _by_arm(runs, "Precision", _precision)]


def render_markdown(analysis: Analysis, figures: Dict[str, str], claims=None) -> str:
    """The text of report.md: sentences, summary table, figures (relative links) and method notes.

    `claims` (a `verdicts.ClaimsResult`) adds a "Published claims" section after the head-to-head sentences.
    """
    a = analysis
    pct = f"{a.level * 100:g}%"
    thr = format_threshold(a.threshold)
    out = [f"# Head-to-head report: {a.results_dir}", ""]
    out.append(f"{len(a.runs)} runs, {len(a.arms)} arm{'s' if len(a.arms) != 1 else ''}. Headline metric `{a.headline}`"
               + (f"; held-out metrics {', '.join(f'`{h}`' for h in a.heldout)}" if a.heldout else "") + ".")
    out.append(f"Threshold **{thr}** ({a.threshold_reason}). Baseline **{a.baseline}** ({a.baseline_reason}).")
    out.append(evaluated_weights(a.runs))
    out += arm_settings(a.runs)
    out.append("")
    out += ["## Head to head", ""] + [f"- {s}" for s in a.sentences] + [""]
    if claims is not None:
        out += _claims_markdown(claims, figures)

    header = ["arm", "seeds", f"final {short_name(a.headline)} ({pct} CI)", f"reached {thr}",
              f"GPU-hours to {thr} ({pct} CI)", f"NFEs to {thr} ({pct} CI)",
              f"speedup vs {a.baseline}, GPU-hours", f"speedup vs {a.baseline}, NFEs"]
    rows = []
    for _, r in a.summary.iterrows():
        reached = f"{r['seeds_reached']}/{r['seeds']}" + ("" if r["reached"] else " (not reached)")
        cells = [r["arm"], str(r["seeds"]), _ci_cell(r["final_reward_mean"], r["final_reward_ci_low"],
                                                    r["final_reward_ci_high"]), reached]
        for _, stem, _ in COST_UNITS:
            cells.append(_ci_cell(r[f"cost_{stem}_mean"], r[f"cost_{stem}_ci_low"], r[f"cost_{stem}_ci_high"], stem)
                         if r["reached"] else "not reached")
        for _, stem, _ in COST_UNITS:
            if r["arm"] == a.baseline:
                cells.append("1 (baseline)" if r["reached"] else "not reached")
            elif np.isfinite(r[f"speedup_{stem}"]):
                ratio = r[f"speedup_{stem}"]
                lo, hi = r[f"speedup_{stem}_ci_low"], r[f"speedup_{stem}_ci_high"]
                cells.append(f"{ratio:.2f}x" + (f" ({lo:.2f} to {hi:.2f})" if np.isfinite(lo) else ""))
            else:
                cells.append("not reached")
        rows.append(cells)
    out += ["## Summary", "", _markdown_table(header, rows), "",
            "All columns, unrounded: [summary.csv](summary.csv); one row per seed: [runs.csv](runs.csv). "
            "A speedup above 1 means the arm is cheaper than the baseline.", ""]

    if a.ablation is not None:
        out += _ablation_markdown(a)
    out += ["## Eval score vs cost", ""]
    for column, label, stem in AXES + OPTIONAL_AXES:
        name = figures.get(f"curves_{stem}")
        if name:
            out += [f"![eval score vs {stem}]({name})", "",
                    f"*Eval score vs {label}. Thick line: mean over seeds (each seed interpolated linearly between "
                    f"its eval points onto a common grid over the range every seed covers); shaded: {pct} "
                    "Student-t interval of the mean; thin lines: single seeds. Held-out metrics in the other panels "
                    "on the same x axis: a headline that rises while a held-out metric falls is reward hacking.*",
                    ""]
    out += ["## Cost to threshold", "", f"![cost to threshold]({figures['cost_to_threshold']})", "",
            f"*Cost at which the headline first reaches {thr} (linear interpolation between the bracketing eval "
            f"points), mean over seeds with a {pct} percentile-bootstrap interval over seeds ({a.n_boot} "
            "resamples). An arm is reached only when all its seeds reached.*", ""]

    header = ["arm", "rollout h", "reward h", "train h", "budget h", "rollout %", "reward %", "train %",
              "eval h (not in budget)"]
    rows = []
    for _, r in a.summary.iterrows():
        parts = [r[f"{p}_gpu_hours"] for p in BUDGET_PHASES]
        total = float(np.nansum(parts))
        share = [f"{100 * p / total:.0f}%" if total > 0 and np.isfinite(p) else "n/a" for p in parts]
        rows.append([r["arm"]] + [format_number(p, "h") for p in parts] + [format_number(total, "h")] + share
                    + [format_number(r["eval_gpu_hours"], "h")])
    out += ["## Cost per phase", "", _markdown_table(header, rows), "",
            f"![cost per phase]({figures['cost_breakdown']})", "",
            "*Device-hours per phase at the end of each run (cumulative `cost/<phase>_device_s` of the last row), "
            "mean over seeds. The budget is rollout + reward + train; eval is logged but kept out.*", ""]

    rows = []
    for _, r in a.per_run.iterrows():
        rows.append([r["arm"], str(r["seed"]), f"`{os.path.relpath(r['run_dir'], a.results_dir)}`",
                     str(r["final_step"]), f"{r['final_reward']:.4g}",
                     format_number(r["cost_gpu_hours_to_threshold"], "h") if r["reached"] else "not reached",
                     format_number(r["cost_nfe_to_threshold"], "nfe") if r["reached"] else "not reached",
                     format_number(r["budget_gpu_hours"], "h")])
    out += ["## Runs", "", _markdown_table(["arm", "seed", "directory", "last eval step", "final score",
                                             f"GPU-hours to {thr}", f"NFEs to {thr}", "budget GPU-hours"], rows), ""]

    out += a.tuning
    out += ["## Method", "",
            f"- Final score: the headline at each seed's last eval; mean and {pct} Student-t interval over seeds "
            "(n - 1 degrees of freedom; none for a single seed).",
            f"- Cost to threshold: per seed, the first crossing of {thr}, interpolated linearly in cost between the "
            "two eval points that bracket it (the first eval's cost if it already reaches it). Interval: percentile "
            f"bootstrap of the mean over seeds ({a.n_boot} resamples). With few seeds this interval is narrow and "
            "reads as the spread of the seeds (with 3 seeds it is close to their range), not as a guaranteed "
            f"{pct} coverage.",
            "- Reached: an arm counts as reached only if every seed reached; otherwise it is reported as not reached "
            "with k/n. Seeds that never got there have an unknown (censored) cost, and averaging over the seeds that "
            "did would make an unreliable arm look cheap.",
            "- Speedup: mean baseline cost / mean arm cost; interval by resampling the seeds of each arm "
            "independently and taking percentiles of the ratio.",
            "- Bootstrap resamples use a fixed seed per arm (and per arm pair), so the numbers are reproducible and "
            "adding an arm does not change the others'."]
    if a.notes:
        out += [""] + [f"- Note: {n}" for n in a.notes]
    return "\n".join(out) + "\n"
