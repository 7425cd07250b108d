"""Head-to-head report over a results directory: `diffrl-bench report RESULTS_DIR`.

Every run directory under RESULTS_DIR (any folder holding a `metrics.csv`) is one seed of one arm. The report puts
the arms side by side on the same cost axes and answers "how much cheaper is X than the baseline to reach a given
score", with intervals over seeds:

- eval reward (and each held-out metric) vs cumulative GPU-hours, NFEs and optimizer steps: mean over seeds with a
  Student-t band (`aggregate_curves`);
- cost to first reach a threshold (`threshold_crossing`, linear interpolation between eval points) per arm with
  percentile-bootstrap intervals over seeds (`bootstrap_ci`), and speedups against a baseline arm
  (`speedup_ci`, seeds of each arm resampled independently);
- a per-phase cost breakdown (rollout, reward, train; eval shown but outside the budget);
- for an ablation (`--by KEY ...`, or the sweep spec's `ablate` keys found in RESULTS_DIR/sweep.json), the final
  score of every arm by its value of each ablated config key, and each value's mean over the arms that have it
  (`ablation_tables`), written to `ablation.csv`.

An arm counts as having reached the threshold only when every one of its seeds did (k/n is always reported):
averaging the cost over the seeds that happened to get there would make an unreliable arm look cheap.

Outputs (written atomically): `report.md`, `summary.csv` (one row per arm), `runs.csv` (one row per seed) and PNG

With `--claims FILE...` it also judges published claims (`sweeps/claims/*.yaml`): claims.md, claims.csv, a
speedup-vs-threshold figure and one sentence per claim in report.md (docs/reports.md, "Claims").

Modules, in import order: `errors`, `stats` (pure statistics), `runs` (loading run folders), `wording` (numbers and
sentences), `analysis` (the tables and sentences of one report), `figures`, `claims` (claim files), `verdicts`
(censoring-aware verdicts on claims), `claims_output` (their files), `markdown` (report.md), `output` (writing all
files), `cli` (`diffrl-bench report`; `__main__` for `python -m diffrl_bench.report`).
"""
from diffrl_bench.report.analysis import Analysis, ablation_tables, analyse, default_baseline, sweep_ablate_keys
from diffrl_bench.report.cli import add_arguments, main, run
from diffrl_bench.report.errors import MissingColumnError, NoRunsError, ReportError, UnknownArmError
from diffrl_bench.report.figures import plot_cost_breakdown, plot_cost_to_threshold, plot_curves
from diffrl_bench.report.markdown import arm_settings, evaluated_weights, render_markdown
from diffrl_bench.report.output import write_analysis, write_report
from diffrl_bench.report.runs import (AXES, COST_UNITS, RunResult, config_value, load_runs, phase_breakdown,
                                      resolve_metrics)
from diffrl_bench.report.stats import (CurveBand, aggregate_curves, bootstrap_ci, speedup_ci, t_interval,
                                       threshold_crossing)
from diffrl_bench.report.wording import speedup_sentence

__all__ = ["AXES", "COST_UNITS", "Analysis", "CurveBand", "MissingColumnError", "NoRunsError", "ReportError",
           "RunResult", "UnknownArmError", "ablation_tables", "add_arguments", "aggregate_curves", "analyse",
           "arm_settings", "bootstrap_ci", "config_value", "default_baseline", "evaluated_weights", "load_runs", "main",
           "phase_breakdown", "plot_cost_breakdown", "plot_cost_to_threshold", "plot_curves", "render_markdown",
           "resolve_metrics", "run", "speedup_ci", "speedup_sentence", "sweep_ablate_keys", "t_interval",
           "threshold_crossing", "write_analysis", "write_report"]
