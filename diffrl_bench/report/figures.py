"""The report's figures: eval score vs each cost axis with bands over seeds, cost to threshold, cost per phase.

Figures are drawn on bare matplotlib `Figure`s (no pyplot) and written atomically as PNG.
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np

from diffrl_bench.fileio import atomic_write
from diffrl_bench.ledger import BUDGET_PHASES
from diffrl_bench.report.analysis import Analysis
from diffrl_bench.report.runs import COST_UNITS
from diffrl_bench.report.stats import aggregate_curves
from diffrl_bench.report.wording import format_threshold, short_name

FIGURE_DPI = 110
# Inches. A curve figure has one panel per metric; a bar chart grows by one row per arm.
PANEL_WIDTH, PANEL_HEIGHT = 5.2, 4.0
BREAKDOWN_WIDTH = 7.5
BAR_ROW_HEIGHT, BAR_CHART_MARGIN = 0.6, 1.8
# Bars stand at y = 0 .. n-1 and are 0.8 high (matplotlib's default): the axis runs from BAR_YLIM[0] to
# n + BAR_YLIM[1], their edges plus a little room below the last bar.
BAR_YLIM = (-0.6, -0.4)


def _save_figure(fig, path: Path) -> Path:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
    atomic_write(path, buffer.getvalue())
    return path


def _new_figure(ncols: int, width: float = PANEL_WIDTH, height: float = PANEL_HEIGHT):
    # A bare Figure renders through Agg without pyplot: no global backend switch, no figure registry to leak.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _bar_chart_height(n_arms: int) -> float:
    return BAR_ROW_HEIGHT * n_arms + BAR_CHART_MARGIN


def plot_curves(analysis: Analysis, axis: Tuple[str, str, str], path: Path) -> Path:
    """Headline and held-out metrics vs one cost axis: per arm the mean over seeds, its t-band, thin seed lines."""
    column, label, _ = axis
    metrics = [analysis.headline] + analysis.heldout
    fig, axes = _new_figure(len(metrics))
    pct = f"{analysis.level * 100:g}%"
    for ax, metric in zip(axes, metrics):
        for i, arm in enumerate(analysis.arms):
            color = f"C{i % 10}"
            seeds = [r for r in analysis.runs if r.arm == arm]
            xs, ys = [], []
            for run in seeds:
                points = run.eval_points(metric)
                xs.append(points[column].to_numpy())
                ys.append(points[metric].to_numpy())
                ax.plot(xs[-1], ys[-1], ".-", color=color, alpha=0.3, linewidth=0.8, markersize=4)
            band = aggregate_curves(xs, ys, level=analysis.level)
            ax.plot(band.x, band.mean, color=color, linewidth=2, label=f"{arm} (n={band.n_seeds})")
            if band.n_seeds > 1:
                ax.fill_between(band.x, band.lo, band.hi, color=color, alpha=0.2, linewidth=0)
        if metric == analysis.headline:
            ax.axhline(analysis.threshold, color="0.4", linestyle="--", linewidth=1,
                       label=f"threshold {format_threshold(analysis.threshold)}")
            ax.set_title(f"{short_name(metric)} (headline)", fontsize=10)
        else:
            ax.set_title(f"{short_name(metric)} (held-out metric)", fontsize=10)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel(f"{short_name(metric)} (score)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Eval score vs {label.split(' (')[0]}: mean over seeds, shaded {pct} Student-t band of the mean; "
                 "thin lines: single seeds", fontsize=10)
    return _save_figure(fig, path)


def plot_cost_to_threshold(analysis: Analysis, path: Path) -> Path:
    """Bars of mean cost to threshold per arm (GPU-hours, NFEs) with bootstrap whiskers; 'not reached k/n'."""
    fig, axes = _new_figure(len(COST_UNITS), width=PANEL_WIDTH, height=_bar_chart_height(len(analysis.arms)))
    table = analysis.summary.set_index("arm")
    pct = f"{analysis.level * 100:g}%"
    for ax, (_, stem, unit) in zip(axes, COST_UNITS):
        positions = np.arange(len(analysis.arms))[::-1]
        for pos, (i, arm) in zip(positions, enumerate(analysis.arms)):
            row = table.loc[arm]
            if row["reached"]:
                mean = row[f"cost_{stem}_mean"]
                lo, hi = row[f"cost_{stem}_ci_low"], row[f"cost_{stem}_ci_high"]
                err = None
                if np.isfinite(lo):
                    err = [[mean - lo], [hi - mean]]
                ax.barh(pos, mean, xerr=err, color=f"C{i % 10}", alpha=0.8, capsize=4)
            else:
                ax.text(0, pos, f" not reached ({row['seeds_reached']}/{row['seeds']} seeds)", va="center",
                        fontsize=8, color="0.3")
        ax.set_yticks(positions, analysis.arms)
        ax.set_ylim(BAR_YLIM[0], len(analysis.arms) + BAR_YLIM[1])
        ax.set_xlabel(f"{unit} to first reach {format_threshold(analysis.threshold)}")
        ax.set_title(f"cost to threshold ({unit})", fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"Cost to reach {short_name(analysis.headline)} >= {format_threshold(analysis.threshold)}: mean over "
                 f"seeds, {pct} percentile-bootstrap interval", fontsize=10)
    return _save_figure(fig, path)


def plot_cost_breakdown(analysis: Analysis, path: Path) -> Path:
    """Stacked bars of mean device-hours per budget phase (rollout, reward, train) per arm."""
    fig, axes = _new_figure(1, width=BREAKDOWN_WIDTH, height=_bar_chart_height(len(analysis.arms)))
    ax = axes[0]
    table = analysis.summary.set_index("arm")
    positions = np.arange(len(analysis.arms))[::-1]
    left = np.zeros(len(analysis.arms))
    colors = {"rollout": "tab:blue", "reward": "tab:orange", "train": "tab:green"}
    for phase in BUDGET_PHASES:
        values = np.nan_to_num(np.array([table.loc[a, f"{phase}_gpu_hours"] for a in analysis.arms]))
        ax.barh(positions, values, left=left, color=colors[phase], label=phase)
        left += values
    ax.set_yticks(positions, analysis.arms)
    ax.set_xlabel("device-hours (GPU-hours), mean over seeds")
    ax.set_title("Budget per phase at the end of each run (eval excluded)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="x")
    return _save_figure(fig, path)
