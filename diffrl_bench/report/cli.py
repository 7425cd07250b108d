"""`diffrl-bench report RESULTS_DIR` (also `python -m diffrl_bench.report`): options, printout, exit status."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from diffrl_bench.report.analysis import analyse
from diffrl_bench.report.claims import COSTS, load_claims
from diffrl_bench.report.completeness import spec_budget_cost
from diffrl_bench.report.errors import ReportError
from diffrl_bench.report.output import write_analysis
from diffrl_bench.report.verdicts import evaluate_claims
from diffrl_bench.report.wording import format_threshold

DESCRIPTION = "Head-to-head report over a results directory: `diffrl-bench report RESULTS_DIR`."


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the report options to `parser` (the standalone parser or a `diffrl-bench` subcommand)."""
    parser.add_argument("results_dir", metavar="RESULTS_DIR",
                        help="folder scanned recursively for run folders (each with metrics.csv)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RESULTS_DIR/report)")
    parser.add_argument("--baseline", default=None, metavar="ARM",
                        help="arm the speedups are measured against (default: the arm named like flow_grpo, "
                             "else the first arm alphabetically)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, default=None,
                       help="score to reach (default: --threshold-fraction x the best arm's mean final score)")
    group.add_argument("--threshold-fraction", type=float, default=0.9,
                       help="fraction of the best arm's mean final score used as the default threshold (0.9)")
    parser.add_argument("--metric", default=None, metavar="COLUMN",
                        help="headline eval column (default: eval/<first eval reward>.strict.task_mean, else "
                             ".task_mean, else the plain column)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (2000)")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level of every interval (0.95)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (0)")
    parser.add_argument("--by", nargs="*", default=None, metavar="KEY",
                        help="ablation: tabulate the final score by these config keys (default: the sweep spec's "
                             "`ablate` keys from RESULTS_DIR/sweep.json; --by with no key: no ablation table)")
    parser.add_argument("--claims", nargs="+", default=None, metavar="FILE_OR_DIR",
                        help="published-claim files (sweeps/claims/*.yaml, or a folder of them) to give a verdict "
                             "on: writes claims.md, claims.csv and claims_threshold_curves.png")
    parser.add_argument("--claims-cost", default=None, choices=sorted(COSTS),
                        help="judge every claim in this cost unit (default: flops when the sweep budgeted in "
                             "FLOPs, else each claim's own `cost`)")
    parser.add_argument("--claims-min-seeds", type=int, default=3,
                        help="fewest seeds per arm for a claim verdict; fewer gives 'inconclusive' (3)")
    parser.add_argument("--claims-power", type=float, default=0.8,
                        help="power of the per-pair resolution (smallest speedup told apart from 1) (0.8)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the report for parsed arguments; prints where it went and the head-to-head sentences.

    Returns 0, or 2 after printing the error when the results cannot be reported on.
    """
    try:
        # Claims first: a bad claim file fails in a second, not after the bootstrap.
        claims = load_claims(args.claims) if args.claims else None
        analysis = analyse(args.results_dir, baseline=args.baseline, threshold=args.threshold,
                           threshold_fraction=args.threshold_fraction, metric=args.metric, n_boot=args.n_boot,
                           seed=args.seed, level=args.level, ablate=args.by)
        verdicts = None
        if claims:
            verdicts = evaluate_claims(analysis.runs, analysis.headline, claims, n_boot=args.n_boot,
                                       level=args.level, seed=args.seed, min_seeds=args.claims_min_seeds,
                                       power=args.claims_power,
                                       cost=args.claims_cost or spec_budget_cost(args.results_dir),
                                       full_runs=analysis.full_runs)
        report = write_analysis(analysis, args.out, claims=verdicts)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    print(f"threshold {format_threshold(analysis.threshold)} on {analysis.headline}, baseline {analysis.baseline}")
    for sentence in analysis.sentences:
        print(f"- {sentence}")
    if analysis.ablation_effects is not None:
        print("ablation (mean final score over the arms with each value):")
        for _, r in analysis.ablation_effects.iterrows():
            print(f"  {r['key']} = {r['value']}: {r['mean_final_reward']:.3f} over {r['arms']} arms")
    if verdicts is not None:
        print(f"claims: {report.parent / 'claims.md'}")
        for sentence in verdicts.sentences:
            print(f"- {sentence}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """`diffrl-bench report` as a standalone program (also `python -m diffrl_bench.report`)."""
    parser = argparse.ArgumentParser(prog="diffrl-bench report", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
