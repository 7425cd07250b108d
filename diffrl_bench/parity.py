"""Parity checks against numbers produced by running the original authors' code.

A parity directory holds one JSON case per file (format: tests/data/parity/README.md). Each case names a `kind`; a
runner registered for that kind rebuilds the inputs as float64 tensors, calls our implementation and returns its
outputs by name. `check_case` compares them with the stored outputs elementwise,
`|ours - expected| <= atol + rtol * |expected|`.

Runners live in a registry so new kinds are added without editing this file: every built-in runner is a function
`case -> {output name: np.ndarray}` decorated with `@register_parity_kind("kind")` in algorithms/parity_runners.py
(the plugin layer, since runners call the plugins' losses; every module of `diffrl_bench.algorithms` is imported
before a run), and a third-party kind is the same in a module exposed under the entry-point group
`diffrl_bench.parity`. This module holds the machinery only: the kind registry, loading, comparison and the input
helpers runners share.
"""
from __future__ import annotations

import importlib
import json
import math
import pkgutil
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Union

import numpy as np
import torch

ParityRunner = Callable[[dict], Dict[str, np.ndarray]]
PARITY_KINDS: Dict[str, ParityRunner] = {}

_REQUIRED_KEYS = ("kind", "case_id", "inputs", "outputs", "tolerance")


def register_parity_kind(kind: str) -> Callable[[ParityRunner], ParityRunner]:
    """Register `fn(case) -> {output name: array}` as the runner for parity cases of `kind`."""

    def decorator(fn: ParityRunner) -> ParityRunner:
        if kind in PARITY_KINDS and PARITY_KINDS[kind] is not fn:
            raise ValueError(f"parity kind {kind!r} is registered twice")
        PARITY_KINDS[kind] = fn
        return fn

    return decorator


_discovered = False


def discover_parity_kinds() -> None:
    """Import the built-in algorithm modules and `diffrl_bench.parity` entry points once, so their runners register."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module("diffrl_bench.algorithms")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"diffrl_bench.algorithms.{info.name}")
    for ep in entry_points(group="diffrl_bench.parity"):
        ep.load()


# ---------------------------------------------------------------------------------------------------------------
# Loading and checking


def load_cases(directory: Union[str, Path]) -> List[dict]:
    """Every `*.json` case in `directory` except `index.json`, sorted by file name.

    Each returned dict is the file's object plus `"_file"` (its path). A file that is not valid JSON or lacks a
    required key raises ValueError naming the file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"parity directory {directory} does not exist")
    cases = []
    for path in sorted(directory.glob("*.json")):
        if path.name == "index.json":
            continue
        try:
            case = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"malformed parity case {path}: {err}") from err
        if not isinstance(case, dict):
            raise ValueError(f"malformed parity case {path}: expected a JSON object")
        missing = [key for key in _REQUIRED_KEYS if key not in case]
        if missing:
            raise ValueError(f"malformed parity case {path}: missing keys {missing}")
        case["_file"] = str(path)
        cases.append(case)
    return cases


@dataclass
class CaseResult:
    """Outcome of one case. `max_abs_error` is the largest |ours - expected| over all outputs; `worst_output` is the
    output closest to (or furthest over) its tolerance, i.e. with the largest |error| / (atol + rtol |expected|)."""

    case_id: str
    kind: str
    passed: bool
    max_abs_error: float
    worst_output: Optional[str]
    message: str
    implemented: bool = True
    errors: Dict[str, float] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if not self.implemented:
            return "NOT IMPLEMENTED"
        return "PASS" if self.passed else "FAIL"


WITHIN_GROUP_PREFIX = "within_group/"
"""`outputs_within_group` entries (crd_loss) are expected from runners under this prefix."""


def _expected_outputs(case: dict) -> Dict[str, object]:
    expected = dict(case["outputs"])
    for name, value in (case.get("outputs_within_group") or {}).items():
        expected[WITHIN_GROUP_PREFIX + name] = value
    return expected


def _tolerance(case: dict, name: str) -> tuple:
    name = name[len(WITHIN_GROUP_PREFIX):] if name.startswith(WITHIN_GROUP_PREFIX) else name
    tol = case["tolerance"]
    override = tol.get("per_output", {}) or {}
    spec = override.get(name, tol)
    return float(spec.get("atol", tol["atol"])), float(spec.get("rtol", tol["rtol"]))


def check_case(case: dict) -> CaseResult:
    """Run the case's kind and compare every non-null expected output (exceptions become failures)."""
    discover_parity_kinds()
    case_id, kind = case["case_id"], case["kind"]
    runner = PARITY_KINDS.get(kind)
    if runner is None:
        return CaseResult(case_id, kind, False, math.nan, None, f"kind {kind!r} is not implemented yet",
                          implemented=False)
    try:
        ours = runner(case)
    except Exception as err:  # a crash in one case must not hide the others
        return CaseResult(case_id, kind, False, math.nan, None, f"runner raised {type(err).__name__}: {err}")

    problems: List[str] = []
    errors: Dict[str, float] = {}
    worst_name, worst_ratio, max_err = None, -1.0, 0.0
    for name, expected in _expected_outputs(case).items():
        if expected is None:
            continue  # the original does not define this output for these params
        if name not in ours:
            problems.append(f"output {name!r} was not produced")
            continue
        exp = np.asarray(expected, dtype=np.float64)
        got = np.asarray(ours[name], dtype=np.float64)
        if got.shape != exp.shape:
            problems.append(f"output {name!r} has shape {got.shape}, expected {exp.shape}")
            continue
        atol, rtol = _tolerance(case, name)
        same = (got == exp) | (np.isnan(got) & np.isnan(exp))  # equal infinities and NaNs count as matches
        err = np.where(same, 0.0, np.abs(got - exp))
        err = np.where(np.isnan(err), np.inf, err)
        bound = atol + rtol * np.abs(np.where(np.isfinite(exp), exp, 0.0))
        ratio = float(np.max(err / bound)) if err.size else 0.0
        out_err = float(np.max(err)) if err.size else 0.0
        errors[name] = out_err
        max_err = max(max_err, out_err)
        if ratio > worst_ratio:
            worst_name, worst_ratio = name, ratio
        if not np.all(err <= bound):
            problems.append(f"output {name!r} off by {out_err:.3g} (atol {atol:g}, rtol {rtol:g})")
    passed = not problems
    message = "ok" if passed else "; ".join(problems)
    return CaseResult(case_id, kind, passed, max_err, worst_name, message, errors=errors)


def run_parity(directory: Union[str, Path], kinds: Optional[Iterable[str]] = None) -> List[CaseResult]:
    """Check every case in `directory` (optionally only those of the given kinds)."""
    wanted = set(kinds) if kinds is not None else None
    return [check_case(case) for case in load_cases(directory) if wanted is None or case["kind"] in wanted]


def parity_main(directory: Union[str, Path], kinds: Optional[Iterable[str]] = None) -> int:
    """Print one line per case and a summary; return 0 iff every selected case passed."""
    results = run_parity(directory, kinds)
    for res in results:
        err = "-" if math.isnan(res.max_abs_error) else f"{res.max_abs_error:.3e}"
        line = f"{res.case_id:<36} {res.kind:<18} max_err {err:<10} worst {res.worst_output or '-':<24} {res.status}"
        if res.implemented and not res.passed:
            line += f"  ({res.message})"
        print(line)
    counts = {status: sum(r.status == status for r in results) for status in ("PASS", "FAIL", "NOT IMPLEMENTED")}
    print(f"{len(results)} cases: {counts['PASS']} passed, {counts['FAIL']} failed, "
          f"{counts['NOT IMPLEMENTED']} not implemented")
    return 0 if results and all(r.passed for r in results) else 1


# ---------------------------------------------------------------------------------------------------------------
# Input helpers shared by runners


def case_tensor(case: dict, name: str) -> torch.Tensor:
    """Input `name` as a float64 tensor with the shape the case states (scalars stay 0-d)."""
    value = torch.as_tensor(np.asarray(case["inputs"][name], dtype=np.float64))
    shape = case.get("shapes", {}).get("inputs", {}).get(name)
    return value.reshape(shape) if shape is not None else value


def case_long(case: dict, name: str) -> torch.Tensor:
    """Integer input `name` (ids, indices, steps) as an int64 tensor."""
    return torch.as_tensor(np.asarray(case["inputs"][name], dtype=np.int64))


def case_leaf(case: dict, name: str) -> torch.Tensor:
    """Input `name` as a float64 leaf tensor that requires grad (for the `grad_<name>` outputs)."""
    return case_tensor(case, name).clone().requires_grad_(True)


def grad_of(loss: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """d loss / d leaf, for a leaf made by `case_leaf`."""
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


def to_numpy(values: Dict[str, torch.Tensor]) -> Dict[str, np.ndarray]:
    return {name: v.detach().to(torch.float64).cpu().numpy() if torch.is_tensor(v) else np.asarray(v, np.float64)
            for name, v in values.items()}
