from pathlib import Path

from diffrl_bench.cli import main

PUBLIC = Path(__file__).parent / "data" / "parity" / "public"
IMPLEMENTED = ["nft_loss", "decay_schedule", "advantages", "dpm2_sampler"]


def test_list_shows_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for section, names in {"algorithms:": ["nft"], "rewards:": ["toy_geneval", "toy_naturalness"],
                           "samplers:": ["euler", "dpm2"], "model backends:": ["toy_unet"],
                           "configs:": ["toy_nft"]}.items():
        assert section in out
        block = out.split(section, 1)[1]
        for name in names:
            assert f"  {name}" in block


def test_parity_command_passes_on_implemented_kinds(capsys):
    args = ["parity", str(PUBLIC)]
    for kind in IMPLEMENTED:
        args += ["--kind", kind]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.count("PASS") >= 16


def test_parity_command_fails_and_names_unimplemented_kinds(capsys, tmp_path):
    import json
    import shutil

    shutil.copy(PUBLIC / "advantages_01.json", tmp_path)
    case = json.loads((PUBLIC / "advantages_01.json").read_text())
    case["kind"] = "flux_magic_loss"
    (tmp_path / "flux_magic_loss_01.json").write_text(json.dumps(case))
    assert main(["parity", str(tmp_path)]) != 0
    out = capsys.readouterr().out
    assert "flux_magic_loss" in out and "not implemented" in out.lower()


def test_overrides_may_follow_options_and_bad_ones_still_stop_the_run(tmp_path, caplog):
    out = tmp_path / "never"
    # The override after --no-progress is applied (and is rejected here because the key is unknown).
    assert main(["train", "toy_nft", "--no-progress", f"output_dir={out}", "train.nonsense=1"]) == 2
    assert "train.nonsense" in caplog.text and not out.exists()
