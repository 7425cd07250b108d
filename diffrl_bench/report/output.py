"""Writing a report: analyse a results directory, then its figures, CSV tables and report.md, each atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd

from diffrl_bench.fileio import atomic_write
from diffrl_bench.report.analysis import Analysis, analyse
from diffrl_bench.report.figures import plot_cost_breakdown, plot_cost_to_threshold, plot_curves
from diffrl_bench.report.markdown import render_markdown
from diffrl_bench.report.runs import cost_axes
from diffrl_bench.report.claims_output import write_claims
from diffrl_bench.report.verdicts import ClaimsResult


def write_report(results_dir, out_dir=None, *, baseline: Optional[str] = None, threshold: Optional[float] = None,
                 threshold_fraction: float = 0.9, metric: Optional[str] = None, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95, claims: Optional[ClaimsResult] = None) -> Path:
    """Analyse `results_dir` and write report.md, summary.csv, runs.csv and PNG figures; returns report.md's path.

    `out_dir` defaults to `results_dir/report`. See `analyse` for the options; raises a `ReportError` (a
    ValueError) naming the directory, column or arm when the results cannot be reported on.
    """
    analysis = analyse(results_dir, baseline=baseline, threshold=threshold, threshold_fraction=threshold_fraction,
                       metric=metric, n_boot=n_boot, seed=seed, level=level)
    return write_analysis(analysis, out_dir, claims=claims)


def write_analysis(analysis: Analysis, out_dir=None, claims: Optional[ClaimsResult] = None) -> Path:
    """Write the files of an `analyse` result to `out_dir` (default `results_dir/report`); returns report.md.

    With `claims` (an `evaluate_claims` result) also claims.md, claims.csv and the threshold-curve figure, and
    report.md gets a "Published claims" section with one sentence per claim.
    """
    out = Path(out_dir) if out_dir is not None else analysis.results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    for axis in cost_axes(analysis.runs):
        name = f"reward_vs_{axis[2]}.png"
        plot_curves(analysis, axis, out / name)
        figures[f"curves_{axis[2]}"] = name
    plot_cost_to_threshold(analysis, out / "cost_to_threshold.png")
    figures["cost_to_threshold"] = "cost_to_threshold.png"
    plot_cost_breakdown(analysis, out / "cost_breakdown.png")
    figures["cost_breakdown"] = "cost_breakdown.png"
    atomic_write(out / "summary.csv", analysis.summary.to_csv(index=False).encode())
    atomic_write(out / "runs.csv", analysis.per_run.to_csv(index=False).encode())
    if analysis.ablation is not None:
        # One file: the by-value rows (key, value, ...) after the by-arm rows, so either reads with a filter.
        table = pd.concat([analysis.ablation.assign(table="by_arm"), analysis.ablation_effects.assign(table="by_value")],
                          ignore_index=True)
        atomic_write(out / "ablation.csv", table.to_csv(index=False).encode())
    if claims is not None:
        written = write_claims(claims, out)
        if "figure" in written:
            figures["claims_threshold_curves"] = written["figure"].name
    report = out / "report.md"
    atomic_write(report, render_markdown(analysis, figures, claims=claims).encode())
    return report
