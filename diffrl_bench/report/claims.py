"""Published claims as data: the schema of `sweeps/claims/*.yaml` and its loader.

A claim file states one published claim in a form a sweep can be judged against: which arm is claimed to beat which
baseline, on what metric, to what threshold, in what cost unit, by how much, and how the paper ran its baseline.
Two kinds:

- `speedup` (default): "arm reaches the threshold `claimed_speedup` x cheaper than baseline";
- `heldout`: "arm ends with a better held-out metric than baseline" (the reward-hacking claim), judged on
  `heldout.metric`, which the training reward never sees.

The threshold is given at the paper's scale; `threshold.rule` says how to carry it to a benchmark on another scale:
`fraction_of_gain` (the same fraction of the way from the base model's score to the best arm's final score;
`fraction` defaults to (paper - paper_base) / (paper_best - paper_base)) or `absolute` (the paper's number as is).
Every error names the file and the key. See docs/reports.md, "Claims".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

KINDS = ("speedup", "heldout")
COSTS = {"gpu_hours": "cost/gpu_hours", "nfe": "cost/nfe", "flops": "cost/flops"}
RULES = ("fraction_of_gain", "absolute")
TOP_KEYS = ("claim", "source", "kind", "arm", "baseline", "metric", "threshold", "cost", "claimed_speedup",
            "heldout", "provenance", "notes")
REQUIRED = {"speedup": ("claim", "source", "arm", "baseline", "metric", "threshold", "cost", "claimed_speedup",
                        "provenance"),
            "heldout": ("claim", "source", "arm", "baseline", "metric", "heldout", "provenance")}
METRIC_KEYS = ("paper", "benchmark")
THRESHOLD_KEYS = ("paper", "paper_base", "paper_best", "rule", "fraction")
HELDOUT_KEYS = ("metric", "higher_is_better", "paper_metrics")
PROVENANCE_KEYS = ("baseline", "arm", "unknown")


# a ReportError, so that `diffrl-bench report --claims` reports it like any other bad input
from diffrl_bench.report.errors import ReportError


class ClaimError(ReportError):
    """A claim file that cannot be used; the message names the file and the key."""


@dataclass
class Threshold:
    paper: float
    rule: str
    fraction: Optional[float]
    """for `fraction_of_gain`: where between the base's score (0) and the best arm's final (1) the threshold lies"""
    paper_base: Optional[float] = None
    paper_best: Optional[float] = None

    def at_scale(self, base: float, best_final: float) -> float:
        """The threshold on a benchmark whose base model scores `base` and whose best arm ends at `best_final`."""
        if self.rule == "absolute":
            return float(self.paper)
        return float(base + self.fraction * (best_final - base))


@dataclass
class Claim:
    path: Path
    claim: str
    source: str
    kind: str
    arm: str
    baseline: str
    metric_paper: str
    metric_benchmark: str
    """`headline` (the report's headline column) or an eval column"""
    provenance: Dict[str, Any]
    threshold: Optional[Threshold] = None
    cost: Optional[str] = None
    claimed_speedup: Optional[float] = None
    heldout_metric: Optional[str] = None
    higher_is_better: bool = True
    notes: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def cost_column(self) -> Optional[str]:
        return COSTS.get(self.cost) if self.cost else None


def _err(path: Path, key: str, message: str) -> ClaimError:
    return ClaimError(f"claim file {path}: {key}: {message}")


def _mapping(path: Path, key: str, value: Any) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise _err(path, key, f"must be a mapping, got {type(value).__name__} {value!r}")
    return value


def _check_keys(path: Path, where: str, given: Dict[str, Any], allowed: Sequence[str]) -> None:
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise _err(path, f"{where}.{unknown[0]}" if where else str(unknown[0]),
                   f"unknown key; allowed: {', '.join(allowed)}")


def _text(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _err(path, key, f"must be a non-empty string, got {value!r}")
    return value.strip()


def _number(path: Path, key: str, value: Any, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _err(path, key, f"must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise _err(path, key, f"must be positive, got {value!r}")
    return float(value)


def _threshold(path: Path, raw: Any) -> Threshold:
    raw = _mapping(path, "threshold", raw)
    _check_keys(path, "threshold", raw, THRESHOLD_KEYS)
    if "paper" not in raw:
        raise _err(path, "threshold.paper", "missing: the score the claim is made at, on the paper's scale")
    paper = _number(path, "threshold.paper", raw["paper"])
    rule = raw.get("rule", "fraction_of_gain")
    if rule not in RULES:
        raise _err(path, "threshold.rule", f"{rule!r} is not one of {list(RULES)}")
    base = _number(path, "threshold.paper_base", raw["paper_base"]) if "paper_base" in raw else None
    best = _number(path, "threshold.paper_best", raw["paper_best"]) if "paper_best" in raw else None
    fraction = raw.get("fraction")
    if rule == "fraction_of_gain":
        if fraction is None:
            if base is None or best is None:
                raise _err(path, "threshold.fraction", "missing: give it, or paper_base and paper_best to derive it")
            if not best > base:
                raise _err(path, "threshold.paper_best", f"{best} must exceed paper_base {base}")
            fraction = (paper - base) / (best - base)
        fraction = _number(path, "threshold.fraction", fraction)
        if not 0.0 < fraction <= 1.0:
            raise _err(path, "threshold.fraction", f"must lie in (0, 1] (a share of the base-to-best gain), "
                                                   f"got {fraction:.4g}")
    elif fraction is not None:
        raise _err(path, "threshold.fraction", "only with rule fraction_of_gain")
    return Threshold(paper, rule, None if fraction is None else float(fraction), base, best)


def parse_claim(raw: Any, path: Path) -> Claim:
    """Check one claim's mapping (as read from `path`) and return it as a `Claim`."""
    raw = _mapping(path, "(top level)", raw)
    _check_keys(path, "", raw, TOP_KEYS)
    kind = raw.get("kind", "speedup")
    if kind not in KINDS:
        raise _err(path, "kind", f"{kind!r} is not one of {list(KINDS)}")
    for key in REQUIRED[kind]:
        if key not in raw or raw[key] is None:
            raise _err(path, key, f"missing (a {kind} claim needs {', '.join(REQUIRED[kind])})")
    arm, baseline = _text(path, "arm", raw["arm"]), _text(path, "baseline", raw["baseline"])
    if arm == baseline:
        raise _err(path, "baseline", f"is the arm itself ({arm!r})")
    metric = raw["metric"]
    if isinstance(metric, str):
        metric = {"paper": metric}
    metric = _mapping(path, "metric", metric)
    _check_keys(path, "metric", metric, METRIC_KEYS)
    provenance = _mapping(path, "provenance", raw["provenance"])
    _check_keys(path, "provenance", provenance, PROVENANCE_KEYS)
    if "baseline" not in provenance:
        raise _err(path, "provenance.baseline", "missing: how the paper ran its baseline, or 'unknown'")
    _text(path, "provenance.baseline", provenance["baseline"])
    unknown = provenance.get("unknown", [])
    if not isinstance(unknown, list) or not all(isinstance(u, str) for u in unknown):
        raise _err(path, "provenance.unknown", f"must be a list of strings, got {unknown!r}")
    claim = Claim(path=path, claim=_text(path, "claim", raw["claim"]), source=_text(path, "source", raw["source"]),
                  kind=kind, arm=arm, baseline=baseline,
                  metric_paper=_text(path, "metric.paper", metric.get("paper")),
                  metric_benchmark=_text(path, "metric.benchmark", metric.get("benchmark", "headline")),
                  provenance=provenance, notes=str(raw.get("notes") or "").strip())
    if kind == "speedup":
        for key in ("heldout",):
            if key in raw:
                raise _err(path, key, "only in a heldout claim")
        claim.threshold = _threshold(path, raw["threshold"])
        if raw["cost"] not in COSTS:
            raise _err(path, "cost", f"{raw['cost']!r} is not one of {list(COSTS)}")
        claim.cost = raw["cost"]
        claim.claimed_speedup = _number(path, "claimed_speedup", raw["claimed_speedup"], positive=True)
        if not claim.claimed_speedup > 1:
            raise _err(path, "claimed_speedup", f"a speedup claim is above 1, got {claim.claimed_speedup:g}")
    else:
        for key in ("threshold", "cost", "claimed_speedup"):
            if key in raw:
                raise _err(path, key, "only in a speedup claim")
        held = _mapping(path, "heldout", raw["heldout"])
        _check_keys(path, "heldout", held, HELDOUT_KEYS)
        claim.heldout_metric = _text(path, "heldout.metric", held.get("metric"))
        higher = held.get("higher_is_better", True)
        if not isinstance(higher, bool):
            raise _err(path, "heldout.higher_is_better", f"must be true or false, got {higher!r}")
        claim.higher_is_better = higher
    return claim


def load_claim(path) -> Claim:
    """Read and check one claim file."""
    # OmegaConf, like the sweep specs: no direct YAML dependency, and the same parse errors.
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise ClaimError(f"claim file {path}: no such file")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as error:  # noqa: BLE001 - YAML and OmegaConf errors alike, reported with the file's name
        raise ClaimError(f"claim file {path}: cannot read it: {str(error).splitlines()[0]}") from None
    return parse_claim(raw, path)


def load_claims(paths: Sequence) -> List[Claim]:
    """Several claim files (a folder stands for its `*.yaml`), in the given order; two with one name are refused."""
    files: List[Path] = []
    for entry in paths:
        entry = Path(entry)
        files.extend(sorted(entry.glob("*.yaml")) if entry.is_dir() else [entry])
    claims = [load_claim(f) for f in files]
    seen: Dict[str, Path] = {}
    for claim in claims:
        if claim.name in seen:
            raise ClaimError(f"claim files {seen[claim.name]} and {claim.path} share the name {claim.name!r}")
        seen[claim.name] = claim.path
    return claims
