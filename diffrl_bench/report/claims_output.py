"""The files of a claims verdict (`verdicts.evaluate_claims`): claims.csv, claims.md and the speedup-vs-threshold
figure, written atomically like the rest of the report."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np

from diffrl_bench.fileio import atomic_write
from diffrl_bench.report.figures import _save_figure
from diffrl_bench.report.verdicts import (ESTIMATE, LOWER, NO_BOUND, UPPER, ClaimsResult, _ratio, speedup_phrase,
                                         threshold_ranges)


def plot_threshold_curves(result: ClaimsResult, path) -> Optional[Path]:
    """One panel per speedup claim: speedup vs threshold (log y), the interval band where both arms reached,
    triangles for one-sided bounds (^ lower, v upper), the claimed speedup, 1, and the claim's threshold."""
    names = [c.name for c in result.claims if c.name in result.curves]
    if not names:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator

    ncols = min(CURVE_COLUMNS, len(names))
    nrows = -(-len(names) // ncols)
    fig = Figure(figsize=(CURVE_PANEL[0] * ncols, CURVE_PANEL[1] * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(names):]:
        ax.set_visible(False)
    rows = {r["claim"]: r for r in result.table.to_dict("records")}
    for ax, name in zip(axes, names):
        curve, row = result.curves[name], rows[name]
        est = curve[curve["bound"] == ESTIMATE]
        ax.fill_between(est["threshold"], est["ci_low"], est["ci_high"], alpha=0.25, color="C0", linewidth=0,
                        label=f"{result.level:.0%} interval")
        ax.plot(est["threshold"], est["speedup"], "o-", color="C0", ms=3, label="speedup")
        low = curve[curve["bound"] == LOWER]
        ax.plot(low["threshold"], low["ci_low"], "^", color="C1", ms=6, label="at least (baseline censored)")
        up = curve[curve["bound"] == UPPER]
        ax.plot(up["threshold"], up["ci_high"], "v", color="C3", ms=6, label="at most (arm censored)")
        ax.axhline(row["claimed_speedup"], color="k", ls="--", lw=1, label=f"claimed {row['claimed_speedup']:g}x")
        ax.axhline(1.0, color="0.5", lw=1)
        ax.axvline(row["threshold"], color="0.3", ls=":", lw=1, label="claim's threshold")
        ax.set_yscale("log")
        # Plain ratios ("0.5x", "2x") read better than 5x10^-1 on a log axis.
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel(f"threshold on {row['metric'].removeprefix('eval/')}")
        ax.set_ylabel(f"{row['arm']} over {row['baseline']}, {row['cost']}")
        ax.set_title(f"{row['arm']} vs {row['baseline']} (claimed {row['claimed_speedup']:g}x): {row['verdict']}",
                     fontsize=9)
    # One legend for all panels: the marks are the same; only the claim line's value differs (it is in the title).
    handles, labels = axes[0].get_legend_handles_labels()
    keep = [(h, "claimed speedup" if l.startswith("claimed") else l) for h, l in zip(handles, labels)]
    fig.legend([h for h, _ in keep], [l for _, l in keep], loc="outside lower center", ncols=len(keep), fontsize=7)
    return _save_figure(fig, Path(path))


CURVE_COLUMNS = 2
CURVE_PANEL = (5.0, 3.4)  # inches per panel of the threshold-curve figure

CSV_COLUMNS = ("claim", "kind", "arm", "baseline", "metric", "cost", "threshold", "threshold_fraction", "base_score",
               "best_final", "claimed_speedup", "speedup", "ci_low", "ci_high", "bound", "censored", "n_arm", "k_arm",
               "n_base", "k_base", "min_detectable_speedup", "heldout_metric", "difference", "reward_difference",
               "reward_ci_low", "reward_ci_high", "claim_needs_cost", "claim_needs_budgets", "verdict", "reason")


def claims_markdown(result: ClaimsResult, figure: Optional[str] = None) -> str:
    rows = result.table.to_dict("records")
    lines = ["# Published claims", "",
             f"Each claim is judged at its threshold carried to this benchmark's scale (base model "
             f"{result.base:.3g}, best arm {result.best_arm} at {result.best_final:.3g}). Seeds that never reached a "
             f"threshold are right-censored at the cost of their last eval; a speedup against a censored baseline "
             f"is a lower bound, against a censored arm an upper bound. Intervals: {result.level:.0%} percentile "
             f"bootstrap over seeds of the ratio of (restricted) mean costs. Resolution: the smallest speedup the "
             f"seeds would tell apart from 1 with {result.power:.0%} power. See docs/reports.md, \"Claims\".", ""]
    speed = [r for r in rows if r["kind"] == "speedup"]
    if speed:
        lines += ["| claim | arm vs baseline | claimed | threshold | speedup | seeds reached | resolution | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in speed:
            thr = f"{r['threshold']:.3g}" if np.isfinite(r["threshold"]) else "n/a"
            mde = f"{_ratio(r['min_detectable_speedup'])}x" if np.isfinite(r["min_detectable_speedup"]) else "n/a"
            lines.append(f"| {r['claim']} | {r['arm']} vs {r['baseline']} | {r['claimed_speedup']:g}x ({r['cost']}) "
                         f"| {thr} | {speedup_phrase(r)} | {r['k_arm']}/{r['n_arm']} vs {r['k_base']}/{r['n_base']} "
                         f"| {mde} | **{r['verdict']}** |")
        lines.append("")
    held = [r for r in rows if r["kind"] == "heldout"]
    if held:
        lines += ["| claim | arm vs baseline | held-out metric | difference (arm - baseline) | reward (arm - baseline) "
                  "| seeds | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for r in held:
            diff, reward = ((f"{r[k]:+.3g} ({r[lo]:+.3g} to {r[hi]:+.3g})" if np.isfinite(r[k]) else "n/a")
                            for k, lo, hi in (("difference", "ci_low", "ci_high"),
                                              ("reward_difference", "reward_ci_low", "reward_ci_high")))
            lines.append(f"| {r['claim']} | {r['arm']} vs {r['baseline']} | {r['heldout_metric']} | {diff} | "
                         f"{reward} | {r['n_arm']} vs {r['n_base']} | **{r['verdict']}** |")
        lines.append("")
    lines += ["## Verdicts", ""] + [f"- {s}" for s in result.sentences] + [""]
    if figure:
        lines += [f"![speedup vs threshold]({figure})", "",
                  "Speedup against the threshold: the band is the interval where every seed of both arms reached; "
                  "triangles are one-sided bounds where some did not; the dashed line is the claim.", ""]
    lines += _along_thresholds(result)
    lines += ["## Claims and how the papers ran their baselines", ""]
    for claim in result.claims:
        baseline = claim.provenance["baseline"].rstrip(".")
        lines.append(f"- **{claim.name}**: {claim.claim} ({claim.source}). Baseline: {baseline}.")
        for item in claim.provenance.get("unknown", []):
            lines.append(f"  - unknown: {item}")
    return "\n".join(lines) + "\n"


def _range_values(r) -> str:
    kinds = [b for b in r["bounds"] if b != NO_BOUND]
    if not np.isfinite(r["speedup_lo"]):
        return "no estimate"
    lo, hi = _ratio(r["speedup_lo"]), _ratio(r["speedup_hi"])
    span = f"{lo}x" if lo == hi else f"{lo}x to {hi}x"
    if kinds == [LOWER]:
        return f"at least {span}"
    if kinds == [UPPER]:
        return f"at most {span}"
    return span if kinds == [ESTIMATE] else f"{span} ({', '.join(kinds)})"


def _along_thresholds(result: ClaimsResult) -> list:
    """Per speedup claim, the verdict on the claimed number at every threshold of the curve, merged into ranges."""
    lines = []
    for claim in result.claims:
        curve = result.curves.get(claim.name)
        if claim.kind != "speedup" or curve is None or curve.empty:
            continue
        parts = []
        for r in threshold_ranges(curve, claim.claimed_speedup):
            if r["lo"] == r["hi"]:
                where = f"{r['lo']:.3g} ({r['frac_lo']:.0%} of the gain)"
            else:
                where = f"{r['lo']:.3g} to {r['hi']:.3g} ({r['frac_lo']:.0%}-{r['frac_hi']:.0%} of the gain)"
            parts.append(f"{where}: {r['verdict']}, {_range_values(r)}")
        lines.append(f"- **{claim.name}** ({claim.arm} vs {claim.baseline}, claimed {claim.claimed_speedup:g}x): "
                     + "; ".join(parts) + ".")
    if not lines:
        return []
    return (["## Along the thresholds", "",
             "The verdict on each claimed number at every threshold of the curve above (from just above the base's "
             "score to the best arm's final), consecutive thresholds with the same verdict merged; the speedups are "
             "the point estimates, or the bounds where one arm did not always reach. The curves' numbers are in "
             "`claims_threshold_curves.csv`.", ""] + lines + [""])


def write_claims(result: ClaimsResult, out_dir) -> Dict[str, Path]:
    """claims.csv, claims.md, claims_threshold_curves.png and .csv into `out_dir` (atomically, like the report)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: Dict[str, Path] = {}
    figure = plot_threshold_curves(result, out / "claims_threshold_curves.png")
    if figure is not None:
        paths["figure"] = figure
    table = result.table.reindex(columns=list(CSV_COLUMNS))
    atomic_write(out / "claims.csv", table.to_csv(index=False).encode())
    paths["csv"] = out / "claims.csv"
    curves = [curve.assign(claim=name) for name, curve in result.curves.items() if not curve.empty]
    if curves:
        import pandas as pd

        frame = pd.concat(curves, ignore_index=True)
        frame = frame[["claim"] + [c for c in frame.columns if c != "claim"]]
        atomic_write(out / "claims_threshold_curves.csv", frame.to_csv(index=False).encode())
        paths["curves_csv"] = out / "claims_threshold_curves.csv"
    atomic_write(out / "claims.md", claims_markdown(result, figure.name if figure else None).encode())
    paths["md"] = out / "claims.md"
    return paths
