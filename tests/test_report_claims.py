"""Claim files: the shipped drafts load, and each kind of bad input is refused naming the file and the key."""
from pathlib import Path

import pytest
import yaml

from diffrl_bench.report.claims import ClaimError, load_claim, load_claims

REPO = Path(__file__).resolve().parents[1]
GOOD = {
    "claim": "X is 10x cheaper than Y",
    "source": "X paper, Fig. 1",
    "arm": "x",
    "baseline": "y",
    "metric": {"paper": "GenEval", "benchmark": "headline"},
    "threshold": {"paper": 0.9, "paper_base": 0.2, "paper_best": 1.0},
    "cost": "gpu_hours",
    "claimed_speedup": 10,
    "provenance": {"baseline": "rerun by the authors"},
}


def write(tmp_path, body, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def test_shipped_claims_cover_the_methods_table():
    claims = {c.name: c for c in load_claims([REPO / "sweeps" / "claims"])}
    by_pair = {(c.arm, c.baseline, c.kind): c for c in claims.values()}
    assert by_pair[("nft", "flow_grpo", "speedup")].claimed_speedup == 25
    assert by_pair[("awm", "flow_grpo", "speedup")].claimed_speedup in (24, 34)
    assert by_pair[("elbo_pg", "flow_grpo", "speedup")].claimed_speedup == 4.6
    assert by_pair[("elbo_pg", "nft", "speedup")].claimed_speedup == 2
    assert by_pair[("dgpo", "flow_grpo", "speedup")].claimed_speedup == 20
    hacking = by_pair[("crd", "nft", "heldout")]
    assert hacking.heldout_metric and hacking.claimed_speedup is None
    # The ELBO-PG port facts the issue names are recorded where a reader of claims.md sees them.
    assert "lr 1e-6" in by_pair[("elbo_pg", "nft", "speedup")].provenance["baseline"]
    assert "no Flow-GRPO" in by_pair[("elbo_pg", "flow_grpo", "speedup")].provenance["baseline"]
    # Methods added later carry their claims too (issue 15: "and of any method added later").
    for arm in ("grpo_guard", "flow_dppo"):
        assert by_pair[(arm, "flow_grpo", "heldout")].heldout_metric == "toy_no_extra_objects"


def test_the_reference_sweep_runs_every_arm_the_claims_name():
    # A claim whose arm the reference sweep leaves out could only ever be `inconclusive`.
    from diffrl_bench.sweep import load_spec

    spec = load_spec(REPO / "sweeps" / "claims_toy.yaml")
    named = {side for c in load_claims([REPO / "sweeps" / "claims"]) for side in (c.arm, c.baseline)}
    assert named <= {a.name for a in spec.arms}
    kl = next(d for d in spec.tune.space if d.name == "kl")
    assert kl.keys["grpo_guard"] is None and kl.keys["flow_dppo"] is None   # no KL penalty in either release


def test_the_euler_check_reruns_the_flow_dppo_claim_as_claims_toy_ran_it():
    """sweeps/claims_toy_euler_eval.yaml and sweeps/claims_euler/ change one thing against the claims sweep and
    claim: a second, Euler, evaluation and the columns the claim reads. Same fairness otherwise, the learning rate
    and KL weight claims_toy's tuning stage chose (its committed tune/chosen.json), the same budget and seeds."""
    import json

    from diffrl_bench.sweep import load_spec

    main, check = load_spec(REPO / "sweeps" / "claims_toy.yaml"), load_spec(REPO / "sweeps" / "claims_toy_euler_eval.yaml")
    extra = dict(check.fairness)
    assert extra.pop("eval.extra_samplers") == {"euler": {"name": "euler", "num_steps": 10, "shift": 1.0}}
    assert extra == main.fairness
    assert check.budget == main.budget and check.seeds == main.seeds
    chosen = json.loads((REPO / "results" / "reference" / "claims_toy" / "tune" / "chosen.json").read_text())["arms"]
    claim = {c.name: c for c in load_claims([REPO / "sweeps" / "claims"])}["flow_dppo_forgetting"]
    euler, = load_claims([REPO / "sweeps" / "claims_euler"])
    assert {a.name for a in check.arms} == {claim.arm, claim.baseline}
    for arm in check.arms:
        assert arm.overrides == chosen[arm.name]["overrides"], arm.name
        assert arm.config == next(a.config for a in main.arms if a.name == arm.name)
    assert euler.metric_benchmark == "eval_euler/toy_geneval.strict.task_mean"
    assert euler.heldout_metric == "eval_euler/toy_no_extra_objects.task_mean"
    for key in ("claim", "source", "kind", "arm", "baseline", "higher_is_better", "provenance", "metric_paper"):
        assert getattr(euler, key) == getattr(claim, key), key


def test_fraction_derived_from_the_papers_numbers(tmp_path):
    claim = load_claim(write(tmp_path, GOOD))
    # (0.9 - 0.2) / (1.0 - 0.2) of the gain; on a benchmark with base 0.1 and best 0.5: 0.1 + 0.875 * 0.4.
    assert claim.threshold.fraction == pytest.approx(0.875)
    assert claim.threshold.at_scale(0.1, 0.5) == pytest.approx(0.45)
    absolute = load_claim(write(tmp_path, {**GOOD, "threshold": {"paper": 0.9, "rule": "absolute"}}))
    assert absolute.threshold.at_scale(0.1, 0.5) == 0.9


@pytest.mark.parametrize("change, key", [
    ({"threshold": None}, "threshold"),
    ({"cost": "hours"}, "cost"),
    ({"claimed_speedup": -3}, "claimed_speedup"),
    ({"claimed_speedup": 0.5}, "claimed_speedup"),
    ({"claimed_speedup": "25x"}, "claimed_speedup"),
    ({"speed": 3}, "speed"),
    ({"threshold": {"paper": 0.9, "fraction": 1.5}}, "threshold.fraction"),
    ({"threshold": {"paper": 0.9}}, "threshold.fraction"),
    ({"threshold": {"paper": 0.9, "rule": "absolute", "fraction": 0.5}}, "threshold.fraction"),
    ({"threshold": {"paper": 0.9, "rule": "linear", "fraction": 0.5}}, "threshold.rule"),
    ({"threshold": {"fraction": 0.5}}, "threshold.paper"),
    ({"baseline": "x"}, "baseline"),
    ({"provenance": {"arm": "release"}}, "provenance.baseline"),
    ({"provenance": {"baseline": "quoted", "unknown": "gpu"}}, "provenance.unknown"),
    ({"kind": "faster"}, "kind"),
    ({"kind": "heldout", "heldout": {"metric": "m"}}, "threshold"),
    ({"metric": {"paper": "GenEval", "scale": 1}}, "metric.scale"),
])
def test_bad_claim_names_file_and_key(tmp_path, change, key):
    body = {**GOOD, **change}
    body = {k: v for k, v in body.items() if v is not None}
    path = write(tmp_path, body)
    with pytest.raises(ClaimError) as error:
        load_claim(path)
    assert str(path) in str(error.value)
    assert f": {key}:" in str(error.value)


def test_heldout_claim_needs_its_metric(tmp_path):
    body = {k: v for k, v in GOOD.items() if k not in ("threshold", "cost", "claimed_speedup")}
    body.update(kind="heldout", heldout={"higher_is_better": True})
    with pytest.raises(ClaimError, match=r"heldout\.metric"):
        load_claim(write(tmp_path, body))
    body["heldout"] = {"metric": "toy_no_extra_objects", "higher_is_better": "yes"}
    with pytest.raises(ClaimError, match=r"heldout\.higher_is_better"):
        load_claim(write(tmp_path, body))


def test_unreadable_and_duplicate_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("claim: [unclosed\n")
    with pytest.raises(ClaimError, match="bad.yaml: cannot read"):
        load_claim(bad)
    with pytest.raises(ClaimError, match="no such file"):
        load_claim(tmp_path / "absent.yaml")
    (tmp_path / "a").mkdir()
    one = write(tmp_path, GOOD, "same.yaml")
    two = write(tmp_path / "a", GOOD, "same.yaml")
    with pytest.raises(ClaimError, match="share the name 'same'"):
        load_claims([one, two])
