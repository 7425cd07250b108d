"""The provenance table (configs/provenance/sd35m.yaml) against the SD3.5 presets: every entry's value is what the
loaded preset resolves, every key a preset sets has an entry, and docs/presets.md is rendered from the table."""
import pytest

from diffrl_bench import provenance
from diffrl_bench.config import load_config

TABLE = provenance.load_table()


@pytest.mark.parametrize("name", sorted(TABLE["presets"]))
def test_every_table_entry_matches_the_loaded_preset_and_every_preset_key_has_one(name):
    assert provenance.check_preset(name, TABLE["presets"][name]["settings"]) == []


# Methods whose SD3.5 presets the table covers; a method added later joins when its entries land.
COVERED = ("flow_grpo", "flow_grpo_nocfg", "nft", "awm", "crd", "elbo_pg", "rft")


def test_every_sd35_preset_of_a_covered_method_is_in_the_table():
    from diffrl_bench.config import CONFIG_DIR

    shipped = {p.stem for p in CONFIG_DIR.glob("*_sd35m_*.yaml") if p.stem.split("_sd35m_")[0] in COVERED}
    assert len(shipped) == 20 and shipped - set(TABLE["presets"]) == set()


def test_a_drifted_value_a_missing_preset_and_an_uncovered_key_are_reported():
    entries = dict(TABLE["presets"]["nft_sd35m_geneval"]["settings"])
    entries["optim.lr"] = {**entries["optim.lr"], "value": 1.0e-5}
    assert any("optim.lr: the table expects 1e-05, the preset resolves 0.0003" in p
               for p in provenance.check_preset("nft_sd35m_geneval", entries))
    del entries["optim.lr"]
    assert any("sets 'optim.lr', which has no entry" in p for p in provenance.check_preset("nft_sd35m_geneval", entries))
    problems = provenance.check_preset("no_such_method_sd35m_geneval", {"optim.lr": {"value": 1.0, "source": "x"}})
    assert problems and "does not exist" in problems[0]


def test_a_key_our_schema_lacks_must_stay_unresolved_until_the_table_says_otherwise():
    cfg = load_config("awm_sd35m_geneval")
    assert provenance.resolved_value(cfg, "quirk.skip_first_two_epochs") is provenance.MISSING
    assert provenance.resolved_value(cfg, "model.options.no_such_option") is provenance.MISSING
    # defaults come from the schema that owns the key, not from the table
    assert provenance.resolved_value(load_config("dgpo_sd35m_geneval"), "reward.options.geneval.partial_mode") == "clauses"
    assert provenance.resolved_value(load_config("nft_sd35m_ocr"), "reward.options.ocr.whitespace") == "ascii_space"
    entries = {"train.steps": {"value": 1000, "source": "x", "ours": provenance.NO_KEY, "status": "kept"}}
    assert any("has no such key" in p for p in provenance.check_preset("flow_grpo_sd35m_geneval", entries))


def test_docs_presets_md_is_rendered_from_the_table():
    assert provenance.DOC.read_text() == provenance.render(TABLE)
