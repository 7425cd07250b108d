"""How the report words numbers and results: number formats, short metric names and the head-to-head sentence."""
from __future__ import annotations

import numpy as np


def _format_ratio(value: float) -> str:
    # Two significant digits below 10 (3.1x), none above (12x): a ratio over seeds is no more precise than that.
    return f"{value:.0f}" if value >= 9.95 else f"{value:.1f}"


def format_threshold(value: float) -> str:
    """A threshold as the report states it: 3 significant digits (the default threshold is rounded to them)."""
    return f"{value:.3g}"


def format_number(value: float, unit: str) -> str:
    """A cost or score for a table cell: NFEs as whole numbers with thousands separators, others to 3 significant
    digits, and 'n/a' for a value that is not finite."""
    if not np.isfinite(value):
        return "n/a"
    if unit == "nfe":
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _ratio_phrase(ratio: float, lo: float, hi: float) -> str:
    """'3.1x (2.4 to 4.0) cheaper' or, below 1, the inverse '2.0x (1.5 to 2.6) more expensive'."""
    word = "cheaper"
    if ratio < 1.0:
        # "0.5x cheaper" reads badly; the inverse ratio and the inverted (and swapped) interval say the same.
        with np.errstate(divide="ignore"):
            ratio, lo, hi = 1.0 / ratio, 1.0 / np.float64(hi), 1.0 / np.float64(lo)
        word = "more expensive"
    interval = f" ({_format_ratio(lo)} to {_format_ratio(hi)})" if np.isfinite(lo) and np.isfinite(hi) else ""
    return f"{_format_ratio(ratio)}x{interval} {word}"


def speedup_sentence(arm: str, baseline: str, threshold: float, row: dict, base_row: dict) -> str:
    """The head-to-head sentence for one arm, e.g. 'X is 3.1x (2.4 to 4.0) cheaper than Flow-GRPO to reach 0.8
    in GPU-hours, and 2.9x (2.2 to 3.8) cheaper in NFEs.', or the 'not reached' wording."""
    thr = format_threshold(threshold)
    arm_reached = bool(row["reached"])
    base_reached = bool(base_row["reached"])
    if not arm_reached and not base_reached:
        return (f"Neither {arm} ({row['seeds_reached']}/{row['seeds']} seeds) nor {baseline} "
                f"({base_row['seeds_reached']}/{base_row['seeds']} seeds) reached {thr} in every seed: not reached.")
    if not arm_reached:
        return (f"{arm}: not reached ({row['seeds_reached']}/{row['seeds']} seeds reached {thr}); {baseline} reached "
                f"it at {format_number(base_row['cost_gpu_hours_mean'], 'gpu_hours')} GPU-hours.")
    if not base_reached:
        return (f"{arm} reached {thr} at {format_number(row['cost_gpu_hours_mean'], 'gpu_hours')} GPU-hours; "
                f"{baseline}: not reached ({base_row['seeds_reached']}/{base_row['seeds']} seeds), so no ratio.")
    if row["cost_gpu_hours_mean"] == 0:
        return f"{arm} already reaches {thr} before any training (first eval), so no ratio against {baseline}."

    def phrase(stem: str) -> str:
        return _ratio_phrase(row[f"speedup_{stem}"], row[f"speedup_{stem}_ci_low"], row[f"speedup_{stem}_ci_high"])

    sentence = f"{arm} is {phrase('gpu_hours')} than {baseline} to reach {thr} in GPU-hours"
    if np.isfinite(row["speedup_nfe"]) and row["cost_nfe_mean"] > 0:
        sentence += f", and {phrase('nfe')} in NFEs"
    lo, hi = row["speedup_gpu_hours_ci_low"], row["speedup_gpu_hours_ci_high"]
    if np.isfinite(lo) and lo <= 1.0 <= hi:
        sentence += " (the GPU-hours interval includes 1: no clear difference)"
    return sentence + "."


def short_name(column: str) -> str:
    """A metric column without its `eval/` prefix, for titles and table headers."""
    return column.removeprefix("eval/")
