"""Parity with the original implementations, over every case of a directory.

The directory is `DIFFRL_PARITY_DIR` (default: the public copy in tests/data/parity/public), so any other set in
the same format runs through the same tests. Cases whose kind has no runner yet are skipped here (and reported
as NOT IMPLEMENTED by `parity_main`).
"""
import json
import os
from pathlib import Path

import pytest

from diffrl_bench.parity import (
    PARITY_KINDS,
    CaseResult,
    check_case,
    discover_parity_kinds,
    load_cases,
    parity_main,
    register_parity_kind,
    run_parity,
)

PUBLIC_DIR = Path(__file__).parent / "data" / "parity" / "public"
PARITY_DIR = Path(os.environ.get("DIFFRL_PARITY_DIR", PUBLIC_DIR))
CASES = load_cases(PARITY_DIR)
discover_parity_kinds()
HARNESS_KINDS = ("advantages", "decay_schedule", "dpm2_sampler", "nft_loss")


@pytest.mark.parametrize("case", CASES, ids=[c["case_id"] for c in CASES])
def test_case(case):
    if case["kind"] not in PARITY_KINDS:
        pytest.skip(f"kind {case['kind']!r} is not implemented yet")
    result = check_case(case)
    assert result.passed, f"{result.case_id}: {result.message}"


def test_public_set_passes_for_the_harness_kinds():
    results = run_parity(PUBLIC_DIR, kinds=HARNESS_KINDS)
    assert {r.kind for r in results} == set(HARNESS_KINDS)
    failed = [f"{r.case_id}: {r.message}" for r in results if not r.passed]
    assert not failed, failed


def test_index_is_not_a_case_and_every_file_is_loaded():
    files = [p for p in PUBLIC_DIR.glob("*.json") if p.name != "index.json"]
    cases = load_cases(PUBLIC_DIR)
    assert len(cases) == len(files)
    assert [Path(c["_file"]).name for c in cases] == sorted(p.name for p in files)
    index = json.loads((PUBLIC_DIR / "index.json").read_text())
    assert sorted(entry["file"] for entry in index["cases"]) == sorted(p.name for p in files)


def copy_case(tmp_path, name, edit):
    case = json.loads((PUBLIC_DIR / name).read_text())
    edit(case)
    (tmp_path / name).write_text(json.dumps(case))
    return tmp_path


@pytest.mark.parametrize("name, output", [("nft_loss_01.json", "loss"), ("advantages_01.json", "advantages"),
                                          ("dpm2_sampler_01.json", "final")])
def test_tampered_case_fails(tmp_path, name, output):
    def tamper(case):
        value = case["outputs"][output]
        if isinstance(value, list):
            flat = value
            while isinstance(flat[0], list):
                flat = flat[0]
            flat[0] += 1e-3
        else:
            case["outputs"][output] = value + 1e-3

    directory = copy_case(tmp_path, name, tamper)
    (result,) = run_parity(directory)
    assert not result.passed and result.implemented
    assert output in result.message
    assert parity_main(directory) == 1


def test_missing_output_is_a_failure_naming_it(tmp_path):
    directory = copy_case(tmp_path, "decay_schedule_02.json",
                          lambda case: case["outputs"].update(decay_squared=[0.0] * 10))
    (result,) = run_parity(directory)
    assert not result.passed and "decay_squared" in result.message


def test_null_output_is_not_checked(tmp_path):
    directory = copy_case(tmp_path, "decay_schedule_02.json", lambda case: case["outputs"].update(extra=None))
    assert run_parity(directory)[0].passed


def test_per_output_tolerance_overrides(tmp_path):
    def loosen(case):
        case["outputs"]["loss"] += 1e-3
        case["tolerance"]["per_output"] = {"loss": {"atol": 1e-2, "rtol": 0.0}}

    assert run_parity(copy_case(tmp_path, "nft_loss_01.json", loosen))[0].passed


def test_unknown_kind_reports_not_implemented(tmp_path, capsys):
    directory = copy_case(tmp_path, "advantages_01.json", lambda case: case.update(kind="mystery_loss"))
    (result,) = run_parity(directory)
    assert isinstance(result, CaseResult)
    assert not result.passed and not result.implemented
    assert result.message == "kind 'mystery_loss' is not implemented yet"
    assert parity_main(directory) == 1
    assert "NOT IMPLEMENTED" in capsys.readouterr().out


def test_kind_filter_and_main_exit_code(capsys):
    assert parity_main(PUBLIC_DIR, kinds=["decay_schedule"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "nft_loss" not in out.split("cases:")[0]


def test_runner_exception_is_a_failure(tmp_path):
    directory = copy_case(tmp_path, "decay_schedule_01.json",
                          lambda case: case["params"].update(function="Someone else's decay"))
    (result,) = run_parity(directory)
    assert not result.passed and "Someone else's decay" in result.message


def test_registering_a_kind_without_editing_the_core(tmp_path):
    directory = copy_case(tmp_path, "advantages_01.json", lambda case: case.update(kind="echo_for_test"))

    @register_parity_kind("echo_for_test")
    def echo(case):
        return dict(case["outputs"])

    try:
        assert run_parity(directory)[0].passed
        with pytest.raises(ValueError):
            register_parity_kind("echo_for_test")(lambda case: {})
    finally:
        PARITY_KINDS.pop("echo_for_test")


def test_malformed_file_names_the_file(tmp_path):
    (tmp_path / "broken_01.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken_01.json"):
        load_cases(tmp_path)
    (tmp_path / "broken_01.json").write_text(json.dumps({"kind": "advantages"}))
    with pytest.raises(ValueError, match="broken_01.json"):
        load_cases(tmp_path)
