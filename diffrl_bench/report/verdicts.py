"""Verdicts on published claims: censored cost-to-threshold, speedup intervals, power and the threshold curve.

Input: runs (seeds of arms, each with eval points of a score against a cumulative cost) and claims
(`claims.Claim`). For a speedup claim each seed yields either the cost at which it first reached the threshold,
or, when it never did, a right-censored cost: the cost of its last eval, which the true cost-to-threshold exceeds.

**Estimator.** Per arm, the *restricted mean* cost: the mean over seeds of min(cost to threshold, censoring cost),
i.e. a censored seed enters at its censoring cost. The speedup is the ratio of the baseline's restricted mean to the
arm's, with a percentile-bootstrap interval (seeds of each arm resampled independently; `speedup_ci` of the report).
Why this and not Kaplan-Meier or a parametric fit:
- it is monotone: raising any one seed's cost raises every resampled baseline mean, so every bootstrap quantile of
  the ratio can only rise. The bound computed with a censored baseline is therefore never above the interval the
  true (unobserved) costs would have given: a *lower bound* that holds whatever happens after the budget. With a
  censored arm the same argument gives an *upper bound*;
- with censoring only at the end of each run (a seed is observed until its budget), Kaplan-Meier's restricted
  mean up to the common budget equals this mean; KM cannot say anything past the last observation either, and with
  5 seeds its median is a single seed;
- a parametric (e.g. log-normal) likelihood would give a point speedup for a censored baseline only by
  extrapolating the cost curve past the budget, which is exactly what the data cannot support;
- without censoring it is the report's existing speedup (ratio of mean costs = ratio of total compute), so the
  claims table agrees with the head-to-head table.

**Power.** `min_detectable_speedup`: on log costs (seed-to-seed cost spread is multiplicative), the two-sample
Student-t resolution exp((t_{1-a/2} + t_power) * s_pooled * sqrt(1/n_arm + 1/n_base)): the smallest true speedup
these seeds would show as cheaper (interval above 1) with the given power.
It is computed from the seeds that reached the threshold only (a censored seed's restricted cost would shrink the
spread and overstate the resolution); with fewer than two reached seeds on a side it is not stated.

Verdict rules (issue 15): `supported` (claim inside the interval or the whole interval above it), `smaller than
claimed` (interval below the claim and above 1), `not shown cheaper` (interval contains 1), `reversed` (below 1),
`inconclusive` (neither arm reached, too few seeds, a censored bound below the claim, an arm not run).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from diffrl_bench.report.analysis import _rng_for
from diffrl_bench.report.claims import COSTS, Claim
from diffrl_bench.report.errors import ReportError
from diffrl_bench.report.runs import _metric_for
from diffrl_bench.report.stats import speedup_ci, threshold_crossing

SUPPORTED = "supported"
SMALLER = "smaller than claimed"
NOT_CHEAPER = "not shown cheaper"
REVERSED = "reversed"
INCONCLUSIVE = "inconclusive"
NOT_BETTER = "not shown better"
VERDICTS = (SUPPORTED, SMALLER, NOT_CHEAPER, REVERSED, INCONCLUSIVE)
HELDOUT_VERDICTS = (SUPPORTED, NOT_BETTER, REVERSED, INCONCLUSIVE)

ESTIMATE, LOWER, UPPER, NO_BOUND = "estimate", "lower bound", "upper bound", "none"


# --------------------------------------------------------------------------------------------- per-seed costs
@dataclass
class SeedCosts:
    """One arm's seeds at one threshold: cost to reach it (NaN: not reached) and the censoring cost of each seed."""

    cost: np.ndarray
    limit: np.ndarray
    """the cost of the seed's last eval: a seed that did not reach the threshold would need more than this"""

    def __post_init__(self):
        self.cost = np.asarray(self.cost, dtype=float).ravel()
        self.limit = np.asarray(self.limit, dtype=float).ravel()
        if self.cost.shape != self.limit.shape:
            raise ValueError(f"costs and limits differ in length: {self.cost.size} vs {self.limit.size}")
        bad = ~np.isfinite(self.cost) & ~np.isfinite(self.limit)
        if bad.any():
            raise ValueError(f"seed {int(np.flatnonzero(bad)[0])} has neither a cost nor a censoring cost")

    @property
    def n(self) -> int:
        return int(self.cost.size)

    @property
    def reached(self) -> np.ndarray:
        return np.isfinite(self.cost)

    @property
    def k(self) -> int:
        return int(self.reached.sum())

    @property
    def censoring_budget(self) -> float:
        """The largest censoring cost among the seeds that did not reach (NaN when every seed reached)."""
        return float(self.limit[~self.reached].max()) if self.k < self.n else float("nan")

    def restricted(self) -> np.ndarray:
        """min(cost, censoring cost) per seed: the cost where reached, else the censoring cost."""
        return np.where(self.reached, self.cost, self.limit)


@dataclass
class Speedup:
    speedup: float
    ci_low: float
    ci_high: float
    bound: str
    """estimate, lower bound (censored baseline), upper bound (censored arm) or none"""
    censored: str
    """which side has seeds that did not reach: none, baseline, arm or both"""
    n_arm: int
    k_arm: int
    n_base: int
    k_base: int
    reason: str = ""


def censored_speedup(base: SeedCosts, arm: SeedCosts, n_boot: int = 2000, level: float = 0.95, rng=None,
                     min_seeds: int = 3) -> Speedup:
    """Speedup of `arm` over `base` (above 1: the arm is cheaper) with its interval, censoring-aware.

    Both fully reached: the ratio of mean costs and its bootstrap interval. Censored baseline seeds (arm fully
    reached): the same on restricted costs, which is a lower bound; `ci_high` is +inf. Censored arm seeds
    (baseline fully reached): an upper bound; `ci_low` is 0. Censored seeds on both sides bound nothing.
    """
    censored = {(False, False): "none", (True, False): "baseline", (False, True): "arm", (True, True): "both"}[
        (base.k < base.n, arm.k < arm.n)]
    nan = float("nan")

    def out(value, lo, hi, bound, reason=""):
        return Speedup(value, lo, hi, bound, censored, arm.n, arm.k, base.n, base.k, reason)

    if min(base.n, arm.n) < max(2, int(min_seeds)):
        return out(nan, nan, nan, NO_BOUND, f"too few seeds ({arm.n} arm, {base.n} baseline; "
                                            f"{max(2, int(min_seeds))} needed on each side)")
    if base.k == 0 and arm.k == 0:
        return out(nan, nan, nan, NO_BOUND, "neither arm reached the threshold in any seed")
    if censored == "both":
        return out(nan, nan, nan, NO_BOUND, f"seeds of both arms did not reach the threshold "
                                            f"({arm.k}/{arm.n} arm, {base.k}/{base.n} baseline): no bound")
    b, a = base.restricted(), arm.restricted()
    if not (b.mean() > 0 and a.mean() > 0):
        return out(nan, nan, nan, NO_BOUND, "a mean cost of 0: the base model already scores the threshold")
    ratio, lo, hi = speedup_ci(b, a, n_boot, level, rng)
    if censored == "baseline":
        return out(ratio, lo, math.inf, LOWER)
    if censored == "arm":
        return out(ratio, 0.0, hi, UPPER)
    return out(ratio, lo, hi, ESTIMATE)


def censored_cost_for_claim(base: SeedCosts, arm: SeedCosts, claimed: float, make_rng: Callable[[], object],
                            n_boot: int = 2000, level: float = 0.95, rel_tol: float = 1e-3) -> float:
    """How far a censored baseline would have to go for a claimed speedup to enter the interval (a tipping point).

    A lower bound below the claim is inconclusive: the claim might hold if the censored seeds need far more than
    their budget. This is the smallest cost C such that, had every censored baseline seed reached the threshold
    at C (and no sooner than its own budget), the claimed speedup would lie inside the bootstrap interval (its
    upper end reaches the claim). Below C the same seeds would give an interval wholly under the claim. The reader
    weighs C against the censored seeds' curves (how close they came by their budget).

    `make_rng()` must return the same stream each call (the verdict's own): with the same resamples every bootstrap
    ratio, and so the interval's upper end, rises with C, so C is found by bisection. NaN unless the baseline
    alone is censored and the arm fully reached; the budget itself when the claim is already inside there.
    """
    if base.k == base.n or arm.k < arm.n or min(base.n, arm.n) < 2 or not claimed > 0:
        return float("nan")
    arm_costs = arm.restricted()
    floor = base.censoring_budget
    if not floor > 0:
        return float("nan")

    def upper_end(c: float) -> float:
        costs = np.where(base.reached, base.cost, c)  # c >= floor: no censored seed arrives before its budget
        return speedup_ci(costs, arm_costs, n_boot, level, make_rng())[2]

    if upper_end(floor) >= claimed:
        return floor
    low, high = floor, 2.0 * floor
    while upper_end(high) < claimed:
        low, high = high, 2.0 * high
        # Unbounded only if too few resamples hold a censored seed for the interval's upper end to move.
        if high > floor * 2.0 ** 60:
            return math.inf
    while high / low > 1.0 + rel_tol:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if upper_end(mid) >= claimed else (mid, high)
    return high


def classify(lo: float, hi: float, claimed: float, bound: str = ESTIMATE) -> Tuple[str, str]:
    """The verdict on a claimed speedup from an interval [lo, hi] (and the kind of bound it is), with its reason."""
    if bound == NO_BOUND or not (np.isfinite(lo) or np.isfinite(hi)):
        return INCONCLUSIVE, "no interval"
    if bound == LOWER:
        if lo >= claimed:
            return SUPPORTED, f"even the censored lower bound {_ratio(lo, 'down')}x is at or above the claimed {claimed:g}x"
        return INCONCLUSIVE, (f"the baseline did not always reach the threshold; the censored lower bound "
                              f"{_ratio(lo, 'down')}x is below the claimed {claimed:g}x, so the claim can be neither placed "
                              f"nor ruled out")
    if bound == UPPER:
        if hi < 1:
            return REVERSED, f"the arm did not always reach the threshold and is at most {_ratio(hi, 'up')}x: more expensive"
        if hi < claimed:
            return NOT_CHEAPER, (f"the arm did not always reach the threshold; its speedup is at most {_ratio(hi, 'up')}x, "
                                 f"below the claimed {claimed:g}x, and may be below 1")
        return INCONCLUSIVE, (f"the arm did not always reach the threshold; its speedup is at most {_ratio(hi, 'up')}x, "
                              f"which does not rule out the claimed {claimed:g}x")
    if lo <= claimed <= hi:
        note = " (the interval also contains 1)" if lo <= 1 else ""
        return SUPPORTED, f"the claimed {claimed:g}x lies inside the interval{note}"
    if lo > claimed:
        return SUPPORTED, f"the whole interval lies above the claimed {claimed:g}x"
    if hi < 1:
        return REVERSED, "the whole interval lies below 1: the arm is more expensive"
    if lo <= 1 <= hi:
        return NOT_CHEAPER, "the interval contains 1"
    return SMALLER, f"the interval lies above 1 and below the claimed {claimed:g}x"


def min_detectable_speedup(base_costs: Sequence[float], arm_costs: Sequence[float], level: float = 0.95,
                           power: float = 0.8) -> float:
    """Smallest true speedup these seeds would tell apart from 1 (interval above 1) with probability `power`.

    Two-sample Student-t on log costs with the pooled seed-to-seed variance: exp((t_{(1+level)/2} + t_power) *
    s * sqrt(1/n_a + 1/n_b)), df = n_a + n_b - 2. `power=0.5` gives the speedup whose interval just touches 1.
    NaN below two seeds on either side or for a non-positive cost.
    """
    from scipy.stats import t as student_t

    b = np.asarray(base_costs, dtype=float).ravel()
    a = np.asarray(arm_costs, dtype=float).ravel()
    if b.size < 2 or a.size < 2 or not (np.all(b > 0) and np.all(a > 0)) or \
            not (np.all(np.isfinite(b)) and np.all(np.isfinite(a))):
        return float("nan")
    lb, la = np.log(b), np.log(a)
    df = b.size + a.size - 2
    pooled = ((b.size - 1) * lb.var(ddof=1) + (a.size - 1) * la.var(ddof=1)) / df
    se = math.sqrt(pooled * (1.0 / b.size + 1.0 / a.size))
    z = student_t.ppf(0.5 + level / 2.0, df) + student_t.ppf(power, df)
    return float(math.exp(z * se))


def heldout_difference(base_values: Sequence[float], arm_values: Sequence[float], level: float = 0.95,
                       higher_is_better: bool = True) -> Tuple[float, float, float]:
    """Arm minus baseline of a held-out metric (sign flipped when lower is better, so above 0 = arm better), with
    a Welch interval over seeds (unequal variances: a hacking arm's seeds often spread more)."""
    from scipy.stats import t as student_t

    b = np.asarray(base_values, dtype=float).ravel()
    a = np.asarray(arm_values, dtype=float).ravel()
    sign = 1.0 if higher_is_better else -1.0
    nan = float("nan")
    if b.size < 2 or a.size < 2:
        return nan, nan, nan
    diff = sign * (a.mean() - b.mean())
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return float(diff), float(diff), float(diff)
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    half = student_t.ppf(0.5 + level / 2.0, df) * se
    return float(diff), float(diff - half), float(diff + half)


def classify_heldout(diff: float, lo: float, hi: float, reward_hi: float = float("nan")) -> Tuple[str, str]:
    """The held-out verdict from the interval of arm minus baseline (above 0 = arm better).

    Every held-out claim of the table is "less hacking *while keeping the reward*" (CRD: "competitive reward";
    GRPO-Guard: "maintaining or improving generation quality"; Flow-DPPO: "higher rewards"). At an equal budget an
    arm that optimised less, or collapsed, also hacks less, so a better held-out score only counts when the arm's
    own reward did not end lower: `reward_hi` is the upper end of the interval of arm minus baseline of the claim's
    reward metric; below 0 (lower for sure) turns `supported` into `inconclusive`.
    """
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return INCONCLUSIVE, "no interval"
    if lo > 0 and np.isfinite(reward_hi) and reward_hi < 0:
        return INCONCLUSIVE, ("the arm hacks less but also ends with a lower reward: at an equal budget, less hacking "
                              "cannot be told from less optimisation")
    if lo > 0:
        return SUPPORTED, "the whole interval of the difference lies above 0: the arm hacks less"
    if hi < 0:
        return REVERSED, "the whole interval lies below 0: the arm hacks more"
    return NOT_BETTER, "the interval of the difference contains 0"


# ------------------------------------------------------------------------------------------------- from runs
def _final_value(run, metric: str) -> float:
    """A run's metric at its last eval that has it (NaN when it has none)."""
    values = run.frame[metric].dropna() if metric in run.frame else ()
    return float(values.iloc[-1]) if len(values) else float("nan")


def _eval_points(run, metric: str, cost_column: str) -> Tuple[np.ndarray, np.ndarray]:
    frame = run.frame
    for column in (metric, cost_column):
        if column not in frame:
            raise ReportError(f"run {run.path} has no column {column!r} (needed by a claim)")
    rows = frame[frame[metric].notna()]
    return rows[cost_column].to_numpy(dtype=float), rows[metric].to_numpy(dtype=float)


def seed_costs(runs: Sequence, arm: str, metric: str, cost_column: str, threshold: float) -> SeedCosts:
    """The arm's seeds at `threshold`: first-crossing cost (report's `threshold_crossing`) or the last eval's cost."""
    costs, limits = [], []
    for run in (r for r in runs if r.arm == arm):
        x, y = _eval_points(run, metric, cost_column)
        costs.append(threshold_crossing(x, y, threshold))
        finite = np.isfinite(x) & np.isfinite(y)
        limits.append(float(x[finite][-1]) if finite.any() else float("nan"))
    return SeedCosts(costs, limits)


def base_and_best(runs: Sequence, metric: str) -> Tuple[float, float, str]:
    """The base model's score (mean first eval over every seed of every arm), and the best arm's mean final."""
    firsts, finals = [], {}
    for run in runs:
        y = run.frame[metric].dropna().to_numpy(dtype=float)
        firsts.append(y[0])
        finals.setdefault(run.arm, []).append(y[-1])
    means = {arm: float(np.mean(v)) for arm, v in finals.items()}
    best_arm = max(means, key=means.get)
    return float(np.mean(firsts)), means[best_arm], best_arm


def threshold_curve(runs: Sequence, arm: str, baseline: str, metric: str, cost_column: str, base: float,
                    best_final: float, n_points: int = 20, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                    min_seeds: int = 3) -> pd.DataFrame:
    """Speedup of `arm` over `baseline` with its interval at thresholds from just above the base's score up to
    the best arm's final (fractions 1/n .. 1 of the gain; the base's own score is skipped: every seed reaches it
    at cost 0, where the ratio is 0/0)."""
    rows = []
    for fraction in np.linspace(1.0 / n_points, 1.0, n_points):
        threshold = base + fraction * (best_final - base)
        result = censored_speedup(seed_costs(runs, baseline, metric, cost_column, threshold),
                                  seed_costs(runs, arm, metric, cost_column, threshold), n_boot, level,
                                  _rng_for(seed, baseline, arm, cost_column, f"{fraction:.6f}"), min_seeds)
        rows.append({"fraction": float(fraction), "threshold": float(threshold), "speedup": result.speedup,
                     "ci_low": result.ci_low, "ci_high": result.ci_high, "bound": result.bound,
                     "k_arm": result.k_arm, "n_arm": result.n_arm, "k_base": result.k_base, "n_base": result.n_base})
    return pd.DataFrame(rows)


def threshold_ranges(curve: pd.DataFrame, claimed: float) -> List[Dict[str, object]]:
    """The threshold curve read as verdicts: consecutive thresholds with the same verdict on `claimed` merged into
    one range, in threshold order. Each range: `verdict`, `lo`/`hi` (thresholds), `frac_lo`/`frac_hi` (fractions of
    the gain), `speedup_lo`/`speedup_hi` (the point estimates or bounds over the range, NaN where there is none) and
    `bounds` (their kinds: estimate, lower bound, upper bound, none).
    It says where along the thresholds a claim holds, where it does not, and where the runs cannot tell; at toy
    scale the claim's own threshold often sits where the slow arm is censored."""
    ranges: List[Dict[str, object]] = []
    for row in curve.sort_values("threshold").to_dict("records"):
        verdict, _ = classify(row["ci_low"], row["ci_high"], claimed, row["bound"])
        value = float(row["speedup"])
        if ranges and ranges[-1]["verdict"] == verdict:
            last = ranges[-1]
            last.update(hi=float(row["threshold"]), frac_hi=float(row["fraction"]))
            if row["bound"] not in last["bounds"]:
                last["bounds"].append(row["bound"])
            if np.isfinite(value):
                last["speedup_lo"] = float(np.nanmin([last["speedup_lo"], value]))
                last["speedup_hi"] = float(np.nanmax([last["speedup_hi"], value]))
            continue
        ranges.append({"verdict": verdict, "lo": float(row["threshold"]), "hi": float(row["threshold"]),
                       "frac_lo": float(row["fraction"]), "frac_hi": float(row["fraction"]),
                       "speedup_lo": value, "speedup_hi": value, "bounds": [row["bound"]]})
    return ranges


@dataclass
class ClaimsResult:
    table: pd.DataFrame
    sentences: List[str]
    curves: Dict[str, pd.DataFrame] = field(default_factory=dict)
    claims: List[Claim] = field(default_factory=list)
    base: float = float("nan")
    best_final: float = float("nan")
    best_arm: str = ""
    level: float = 0.95
    power: float = 0.8


def _ratio(value: float, rounding: str = "nearest") -> str:
    """Two significant digits; a lower bound is rounded down and an upper bound up, so that neither is overstated."""
    if not np.isfinite(value):
        return "inf" if value > 0 else "n/a"
    if value <= 0:
        return "0"
    step = 10.0 ** (math.floor(math.log10(value)) - 1)
    snapped = {"down": math.floor, "up": math.ceil}.get(rounding, round)(value / step * (1 + 1e-12)) * step
    text = f"{snapped:.2g}"
    return str(int(float(text))) if float(text) >= 10 else text


def speedup_phrase(row: dict, than: str = "") -> str:
    """'27x cheaper (95% interval 19 to 40)', 'at least 3.1x cheaper (95% lower bound)', 'at most ...' or
    'no estimate'; `than` (e.g. ' than flow_grpo') goes after 'cheaper'."""
    pct = f"{row['level']:.0%}"
    if row["bound"] == LOWER:
        return (f"at least {_ratio(row['ci_low'], 'down')}x cheaper{than} ({pct} lower bound; restricted ratio "
                f"{_ratio(row['speedup'])}x)")
    if row["bound"] == UPPER:
        return f"at most {_ratio(row['ci_high'], 'up')}x cheaper{than} ({pct} upper bound)"
    if row["bound"] == ESTIMATE:
        return (f"{_ratio(row['speedup'])}x cheaper{than} ({pct} interval {_ratio(row['ci_low'], 'down')} to "
                f"{_ratio(row['ci_high'], 'up')})")
    return "no estimate"


def claim_sentence(row: dict) -> str:
    """One sentence per claim for report.md."""
    if row["kind"] == "heldout":
        if not np.isfinite(row["difference"]):
            return (f"{row['claim']} ({row['arm']} vs {row['baseline']}, held-out {row['heldout_metric']}): "
                    f"{row['verdict']}: {row['reason']}.")
        reward = ""
        if np.isfinite(row.get("reward_difference", float("nan"))):
            reward = (f"; its reward {row['metric']} differs by {row['reward_difference']:+.3g} "
                      f"({row['reward_ci_low']:+.3g} to {row['reward_ci_high']:+.3g})")
        why = f": {row['reason']}" if row["verdict"] == INCONCLUSIVE else ""
        return (f"{row['claim']} ({row['arm']} vs {row['baseline']}): {row['verdict']}{why}; final held-out "
                f"{row['heldout_metric']} differs by {row['difference']:+.3g} ({row['level']:.0%} interval "
                f"{row['ci_low']:+.3g} to {row['ci_high']:+.3g}; {row['n_arm']} vs {row['n_base']} seeds){reward}.")
    if row["bound"] == NO_BOUND:
        at = (f" at threshold {row['threshold']:.3g} ({row['threshold_fraction']:.0%} of the way from the base's "
              f"{row['base_score']:.3g} to the best final {row['best_final']:.3g})"
              if np.isfinite(row["threshold"]) and np.isfinite(row["threshold_fraction"]) else "")
        return (f"{row['claim']} ({row['arm']} vs {row['baseline']}, claimed {row['claimed_speedup']:g}x in "
                f"{row['cost']}{at}): {row['verdict']}: {row['reason']}.")
    resolution = ""
    if np.isfinite(row["min_detectable_speedup"]):
        resolution = (f"; these seeds resolve speedups from {_ratio(row['min_detectable_speedup'])}x "
                      f"({row['power']:.0%} power)")
    return (f"{row['claim']} (claimed {row['claimed_speedup']:g}x in {row['cost']}): {row['verdict']}; to reach "
            f"{row['threshold']:.3g} ({row['threshold_fraction']:.0%} of the way from the base's "
            f"{row['base_score']:.3g} to the best final {row['best_final']:.3g}) {row['arm']} is "
            f"{speedup_phrase(row, ' than ' + row['baseline'])} ({row['k_arm']}/{row['n_arm']} vs "
            f"{row['k_base']}/{row['n_base']} seeds reached; {row['reason']}){resolution}{tipping_phrase(row)}.")


def tipping_phrase(row: dict) -> str:
    """'; the claimed 25x enters the interval only if ...' for an inconclusive lower bound, else ''."""
    needs = float(row.get("claim_needs_cost", float("nan")))
    if math.isnan(needs):
        return ""
    if math.isinf(needs):
        return (f"; no arrival of {row['baseline']}'s censored seeds would bring the claimed "
                f"{row['claimed_speedup']:g}x inside the interval")
    if row["claim_needs_budgets"] <= 1.0:
        return (f"; the claimed {row['claimed_speedup']:g}x is inside the interval even if {row['baseline']}'s "
                f"censored seeds reached the threshold at their budget")
    return (f"; the claimed {row['claimed_speedup']:g}x enters the interval only if {row['baseline']}'s censored "
            f"seeds need {needs:.3g} {row['cost']} or more, {row['claim_needs_budgets']:.2g}x their budget")


def evaluate_claims(runs: Sequence, headline: str, claims: Sequence[Claim], *, n_boot: int = 2000,
                    level: float = 0.95, seed: int = 0, min_seeds: int = 3, power: float = 0.8,
                    n_points: int = 20, cost: Optional[str] = None,
                    full_runs: Optional[Sequence] = None) -> ClaimsResult:
    """Every claim against the runs: one table row, one sentence and (speedup claims) one threshold curve each.

    The claim's `metric.benchmark` is `headline` (the report's headline column) or an eval column. An arm that
    was not run gives an inconclusive row, never an error: one claims folder serves sweeps of any arm subset.
    `cost` (gpu_hours, nfe or flops) replaces every claim's cost unit, e.g. FLOPs on a shared CPU where
    device-hours are noise; the table's `cost` column says which unit was used.
    `full_runs` (a sweep's `extend:`; `Analysis.full_runs`): the extended arms' whole runs, from which the costs to
    a threshold and the threshold curves are read; `runs` (cut at the common budget) still give the base, the
    best final and the held-out finals, so that no arm's final gains from its longer budget.
    """
    crossing = full_runs if full_runs is not None else runs
    if cost is not None and cost not in COSTS:
        raise ReportError(f"claims cost unit {cost!r} is not one of {list(COSTS)}")
    arms = {r.arm for r in runs}
    rows, curves = [], {}
    cache: Dict[str, Tuple[float, float, str]] = {}
    for claim in claims:
        metric = headline if claim.metric_benchmark == "headline" else claim.metric_benchmark
        if metric not in cache:
            cache[metric] = base_and_best(runs, metric)
        base, best, best_arm = cache[metric]
        row = {"claim": claim.name, "kind": claim.kind, "arm": claim.arm, "baseline": claim.baseline,
               "metric": metric, "cost": (cost or claim.cost) if claim.kind == "speedup" else "",
               "claimed_speedup": claim.claimed_speedup or float("nan"),
               "base_score": base, "best_final": best, "best_arm": best_arm, "level": level, "power": power,
               "threshold": float("nan"), "threshold_fraction": float("nan"), "speedup": float("nan"),
               "ci_low": float("nan"), "ci_high": float("nan"), "bound": NO_BOUND, "censored": "",
               "n_arm": 0, "k_arm": 0, "n_base": 0, "k_base": 0, "min_detectable_speedup": float("nan"),
               "heldout_metric": claim.heldout_metric or "", "difference": float("nan"),
               "reward_difference": float("nan"), "reward_ci_low": float("nan"), "reward_ci_high": float("nan"),
               "claim_needs_cost": float("nan"), "claim_needs_budgets": float("nan")}
        if claim.kind == "speedup":
            threshold = claim.threshold.at_scale(base, best)
            fraction = (claim.threshold.fraction if claim.threshold.rule == "fraction_of_gain"
                        else (threshold - base) / (best - base) if best != base else float("nan"))
            row.update(threshold=threshold, threshold_fraction=fraction)
        missing = [a for a in (claim.arm, claim.baseline) if a not in arms]
        if missing:
            row.update(verdict=INCONCLUSIVE, reason=f"arm {missing[0]!r} was not run")
            rows.append(row)
            continue
        if claim.kind == "heldout":
            column = _metric_for(claim.heldout_metric, runs) or claim.heldout_metric
            pair = [r for r in runs if r.arm in (claim.arm, claim.baseline)]
            # A sweep evaluated without the claim's metric cannot place it: inconclusive, like an arm not run,
            # so one claims folder serves older sweeps too.
            unmeasured = [r for r in pair if column not in r.frame or not r.frame[column].notna().any()]
            if unmeasured:
                row.update(heldout_metric=column, verdict=INCONCLUSIVE,
                           reason=f"{len(unmeasured)}/{len(pair)} runs have no held-out column {column!r} "
                                  f"(e.g. {unmeasured[0].path}); add its reward to eval.rewards")
                rows.append(row)
                continue
            finals = {side: [float(r.frame[column].dropna().iloc[-1]) for r in pair if r.arm == side]
                      for side in (claim.arm, claim.baseline)}
            # The claim's reward at the same final evals: its condition "while keeping the reward".
            rewards = {side: [_final_value(r, metric) for r in pair if r.arm == side]
                       for side in (claim.arm, claim.baseline)}
            row.update(heldout_metric=column, n_arm=len(finals[claim.arm]), n_base=len(finals[claim.baseline]))
            if min(row["n_arm"], row["n_base"]) < max(2, min_seeds):
                row.update(verdict=INCONCLUSIVE, reason=f"too few seeds ({row['n_arm']} arm, {row['n_base']} "
                                                        f"baseline)")
            else:
                diff, lo, hi = heldout_difference(finals[claim.baseline], finals[claim.arm], level,
                                                  claim.higher_is_better)
                rdiff, rlo, rhi = heldout_difference(rewards[claim.baseline], rewards[claim.arm], level)
                verdict, reason = classify_heldout(diff, lo, hi, rhi)
                row.update(difference=diff, ci_low=lo, ci_high=hi, reward_difference=rdiff, reward_ci_low=rlo,
                           reward_ci_high=rhi, verdict=verdict, reason=reason)
            rows.append(row)
            continue
        cost_column = COSTS[cost] if cost else claim.cost_column
        b = seed_costs(crossing, claim.baseline, metric, cost_column, threshold)
        a = seed_costs(crossing, claim.arm, metric, cost_column, threshold)

        def make_rng(claim=claim, cost_column=cost_column):
            return _rng_for(seed, claim.baseline, claim.arm, cost_column)

        result = censored_speedup(b, a, n_boot, level, make_rng(), min_seeds)
        verdict, reason = classify(result.ci_low, result.ci_high, claim.claimed_speedup, result.bound)
        if result.bound == NO_BOUND:
            reason = result.reason
        if verdict == INCONCLUSIVE and result.bound == LOWER:
            needs = censored_cost_for_claim(b, a, claim.claimed_speedup, make_rng, n_boot, level)
            row.update(claim_needs_cost=needs, claim_needs_budgets=needs / b.censoring_budget)
        row.update(speedup=result.speedup, ci_low=result.ci_low,
                   ci_high=result.ci_high, bound=result.bound, censored=result.censored, n_arm=result.n_arm,
                   k_arm=result.k_arm, n_base=result.n_base, k_base=result.k_base, verdict=verdict, reason=reason,
                   min_detectable_speedup=min_detectable_speedup(b.cost[b.reached], a.cost[a.reached], level,
                                                                        power))
        curves[claim.name] = threshold_curve(crossing, claim.arm, claim.baseline, metric, cost_column, base, best,
                                             n_points, n_boot, level, seed, min_seeds)
        rows.append(row)
    table = pd.DataFrame(rows)
    sentences = [claim_sentence(r) for r in rows]
    base, best, best_arm = cache.get(headline) or base_and_best(runs, headline)
    return ClaimsResult(table, sentences, curves, list(claims), base, best, best_arm, level, power)
