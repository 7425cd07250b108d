"""Pure statistics over seeds: threshold crossings, bootstrap and Student-t intervals, speedups, curve bands.

Arrays in, numbers out: nothing here knows about runs, files or arms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Tuple

import numpy as np


def threshold_crossing(x: Sequence[float], y: Sequence[float], threshold: float) -> float:
    """Cost `x` at which the score `y` first reaches `threshold`, or NaN if it never does.

    The points are eval points in the order they were taken. Between the two eval points that bracket the first
    crossing the score is interpolated linearly; if the first point already reaches the threshold, its `x` is the
    answer. Points with a non-finite x or y are ignored. A run that reaches the threshold and later falls back
    still counts at its first crossing (the cost to get there once).
    """
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-d and of one length, got shapes {xs.shape} and {ys.shape}")
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    hits = np.flatnonzero(ys >= threshold)
    if hits.size == 0:
        return float("nan")
    i = int(hits[0])
    if i == 0:
        return float(xs[0])
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    # y0 < threshold <= y1, so y1 > y0 and the division is safe.
    return float(x0 + (threshold - y0) / (y1 - y0) * (x1 - x0))


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _apply_rowwise(statistic: Callable, samples: np.ndarray) -> np.ndarray:
    # Vectorised when the statistic takes `axis` (np.mean, np.median, ...): thousands of resamples stay cheap.
    try:
        out = np.asarray(statistic(samples, axis=1), dtype=float)
        if out.shape == (samples.shape[0],):
            return out
    except TypeError:
        pass
    return np.array([float(statistic(row)) for row in samples])


def bootstrap_ci(values: Sequence[float], statistic: Callable = np.mean, n_boot: int = 2000, level: float = 0.95,
                 rng=None) -> Tuple[float, float]:
    """Percentile-bootstrap interval of `statistic` over `values` (one value per seed).

    Resamples the values with replacement `n_boot` times and returns the (1 - level)/2 and (1 + level)/2
    quantiles of the statistic. Returns (NaN, NaN) for fewer than two values (one seed has no spread to resample)
    or when a value is not finite. `rng` is a numpy Generator or a seed.
    """
    data = np.asarray(values, dtype=float).ravel()
    if data.size < 2 or not np.all(np.isfinite(data)):
        return float("nan"), float("nan")
    gen = _as_rng(rng)
    samples = data[gen.integers(0, data.size, size=(int(n_boot), data.size))]
    stats = _apply_rowwise(statistic, samples)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def t_interval(values: Sequence[float], level: float = 0.95) -> Tuple[float, float]:
    """Student-t interval of the mean over seeds (n - 1 degrees of freedom); (NaN, NaN) below two seeds."""
    from scipy.stats import t as student_t

    data = np.asarray(values, dtype=float).ravel()
    if data.size < 2 or not np.all(np.isfinite(data)):
        return float("nan"), float("nan")
    half = student_t.ppf(0.5 + level / 2.0, data.size - 1) * data.std(ddof=1) / math.sqrt(data.size)
    mean = data.mean()
    return float(mean - half), float(mean + half)


def speedup_ci(baseline_costs: Sequence[float], arm_costs: Sequence[float], n_boot: int = 2000, level: float = 0.95,
               rng=None) -> Tuple[float, float, float]:
    """Speedup of an arm over the baseline: mean(baseline cost) / mean(arm cost), with a bootstrap interval.

    Returns (ratio, low, high); a ratio above 1 means the arm is cheaper. The interval resamples the seeds of each
    arm independently (they are independent runs) and takes percentiles of the resampled ratio. A cost that is
    NaN (a seed that never reached the threshold) makes everything NaN: the ratio is not defined. With fewer
    than two seeds on either side the ratio is returned with a NaN interval.
    """
    base = np.asarray(baseline_costs, dtype=float).ravel()
    arm = np.asarray(arm_costs, dtype=float).ravel()
    if base.size == 0 or arm.size == 0 or not (np.all(np.isfinite(base)) and np.all(np.isfinite(arm))):
        return float("nan"), float("nan"), float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.float64(base.mean()) / np.float64(arm.mean()))
        if base.size < 2 or arm.size < 2:
            return ratio, float("nan"), float("nan")
        gen = _as_rng(rng)
        base_means = base[gen.integers(0, base.size, size=(int(n_boot), base.size))].mean(axis=1)
        arm_means = arm[gen.integers(0, arm.size, size=(int(n_boot), arm.size))].mean(axis=1)
        ratios = base_means / arm_means
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(ratios, [alpha, 1.0 - alpha])
    return ratio, float(lo), float(hi)


@dataclass
class CurveBand:
    """Seeds of one arm on a common x grid: mean and a Student-t band (NaN band for a single seed)."""

    x: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n_seeds: int


def _dedupe_sorted(x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    # np.interp wants increasing x; of two evals at the same cost, the later one is the current score.
    last = np.r_[x[1:] != x[:-1], True]
    return x[last], y[last]


def aggregate_curves(xs: Sequence[Sequence[float]], ys: Sequence[Sequence[float]], n_points: int = 200,
                     level: float = 0.95) -> CurveBand:
    """Mean over seeds of piecewise-linear curves, with a Student-t confidence band of the mean.

    Each seed's eval points (x, y) are interpolated linearly onto one grid spanning the x range that every seed
    covers (from the largest first x to the smallest last x), so no seed is extrapolated. The band at each grid
    point is mean +- t_{(1+level)/2, n-1} * sd / sqrt(n) over the n seeds.
    """
    from scipy.stats import t as student_t

    curves = [_dedupe_sorted(np.asarray(x, dtype=float), np.asarray(y, dtype=float)) for x, y in zip(xs, ys)]
    curves = [c for c in curves if c[0].size]
    if not curves:
        empty = np.array([])
        return CurveBand(empty, empty, empty, empty, 0)
    start = max(c[0][0] for c in curves)
    stop = min(c[0][-1] for c in curves)
    grid = np.array([start]) if stop <= start else np.linspace(start, stop, int(n_points))
    table = np.stack([np.interp(grid, cx, cy) for cx, cy in curves])
    n = table.shape[0]
    mean = table.mean(axis=0)
    if n < 2:
        nan = np.full_like(mean, np.nan)
        return CurveBand(grid, mean, nan, nan.copy(), n)
    half = student_t.ppf(0.5 + level / 2.0, n - 1) * table.std(axis=0, ddof=1) / math.sqrt(n)
    return CurveBand(grid, mean, mean - half, mean + half, n)
