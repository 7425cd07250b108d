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


def test_eval_of_a_run_directory_scores_its_trained_weights_as_the_run_did(tiny_run, tmp_path, capsys):
    """`eval RUN_DIR` loads the run's config and its newest checkpoint's weights: with the fixed eval noise it
    reproduces the run's own final evaluation exactly, and an earlier checkpoint its evaluation there."""
    import json

    run = tmp_path / "run"
    # test_brightness: a score that moves on the tiny random model's images, where the toy detector scores 0.
    overrides = tiny_run("train.steps=2", "eval.every=1", "checkpoint.every=1", "optim.lr=1e-2",
                         "eval.rewards=[toy_geneval, toy_naturalness, test_brightness]", out=run)
    assert main(["train", "toy_nft", "--no-progress", *overrides]) == 0
    evals = {row["step"]: {k: v for k, v in row.items() if k.startswith("eval/")}
             for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/images" in row}
    assert sorted(evals) == [0, 1, 2]
    assert evals[2]["eval/toy_naturalness"] != evals[0]["eval/toy_naturalness"]  # training changed the images
    capsys.readouterr()
    for extra, step in (([], 2), (["--checkpoint", "1"], 1)):
        assert main(["eval", str(run), *extra, "--json", str(tmp_path / f"eval{step}.json")]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed == json.loads((tmp_path / f"eval{step}.json").read_text())
        assert printed == evals[step]
    # A checkpoint re-read with a second solver (eval.extra_samplers, as the Flow-DPPO diagnosis needs): the run's
    # own scores again under eval/, and under eval_euler/ what evaluating with Euler alone gives under eval/.
    assert main(["eval", str(run), "eval.extra_samplers.euler={name: euler, num_steps: 3}"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run), "eval.sampler.name=euler"]) == 0
    euler = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in both.items() if k.startswith("eval/")} == evals[2]
    assert {k.replace("eval_euler/", "eval/"): v for k, v in both.items() if k.startswith("eval_euler/")} == euler
    assert euler != evals[2]


def test_eval_of_a_run_directory_without_checkpoints_says_so(tiny_run, tmp_path):
    import pytest

    run = tmp_path / "run"
    assert main(["train", "toy_nft", "--no-progress",
                 *tiny_run("train.steps=1", "eval.every=-1", "checkpoint.every=0", out=run)]) == 0
    with pytest.raises(SystemExit, match="has no checkpoint to evaluate"):
        main(["eval", str(run)])
    with pytest.raises(SystemExit, match="--checkpoint '7'.*is not a finished checkpoint"):
        main(["eval", str(run), "--checkpoint", "7"])


def test_export_writes_a_model_that_scores_as_the_run_did_and_never_overwrites(tiny_run, tmp_path, capsys):
    import json

    import pytest

    run, out = tmp_path / "run", tmp_path / "exported"
    assert main(["train", "toy_nft", "--no-progress",
                 *tiny_run("train.steps=1", "eval.every=-1", "checkpoint.every=1", "optim.lr=1e-2", out=run)]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert json.loads((out / "exported_from.json").read_text())["step"] == 1
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    from_run = json.loads(capsys.readouterr().out)
    # The exported directory is a model path like the base's: the run's config pointed at it scores the same.
    assert main(["eval", str(run / "config.yaml"), f"model.path={out}"]) == 0
    assert json.loads(capsys.readouterr().out) == from_run
    assert main(["eval", str(run / "config.yaml")]) == 0  # the base, for contrast
    assert json.loads(capsys.readouterr().out) != from_run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit, match="exists and is not empty"):
        main(["export", str(run), "--out", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_export_of_an_sd3_lora_run_writes_its_evaluation_ema_as_diffusers_lora_weights(tiny_sd3, tmp_path):
    run, out = tmp_path / "run", tmp_path / "lora"
    assert main(["train", "toy_nft", "--no-progress", "model.backend=sd3", f"model.path={tiny_sd3}",
                 f"output_dir={run}", "train.threads=1", "train.steps=1", "eval.every=-1", "checkpoint.every=1",
                 "rollout.prompts_per_step=2", "rollout.images_per_prompt=2", "rollout.chunk_size=4",
                 "rollout.sampler.num_steps=2", "train.micro_batch_size=4", "algo.num_train_times=2",
                 "reward.components.test_brightness=1.0", "eval.ema_decay=0.9"]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    import json

    assert json.loads((out / "exported_from.json").read_text())["weights"] == "eval_ema"  # an extra LoRA adapter
    from safetensors.torch import load_file

    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    # peft starts every B at zero: a trained theta, not a fresh adapter, was exported.
    up = [v for k, v in weights.items() if "lora_B" in k]
    assert up and any(bool(v.abs().max() > 0) for v in up)


def test_a_run_with_an_evaluation_ema_evaluates_and_exports_the_ema(tiny_run, tmp_path, capsys):
    """eval.ema_decay > 0: the run's logged evaluations sample the `eval_ema` snapshot; `eval RUN_DIR` reproduces
    them from the checkpoint, `eval.ema_decay=0` scores raw theta instead (different), and `export` writes the EMA."""
    import json

    run, out = tmp_path / "run", tmp_path / "exported"
    assert main(["train", "toy_nft", "--no-progress", *tiny_run(
        "train.steps=2", "eval.every=0", "checkpoint.every=1", "optim.lr=1e-2", "eval.ema_decay=0.9",
        out=run)]) == 0
    logged = [{k: v for k, v in row.items() if k.startswith("eval/")}
              for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/images" in row][-1]
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert json.loads(capsys.readouterr().out) == logged
    assert main(["eval", str(run), "eval.ema_decay=0"]) == 0
    assert json.loads(capsys.readouterr().out) != logged
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert json.loads((out / "exported_from.json").read_text())["weights"] == "eval_ema"
    capsys.readouterr()
    assert main(["eval", str(run / "config.yaml"), f"model.path={out}", "eval.ema_decay=0"]) == 0
    assert json.loads(capsys.readouterr().out) == logged


def test_train_ends_with_a_summary_of_scores_time_and_figures(tiny_run, tmp_path, capsys):
    import json
    import re

    out = tmp_path / "run"
    assert main(["train", "toy_nft", "--no-progress", *tiny_run("train.steps=2", "eval.every=1", out=out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    key = "eval/toy_geneval.strict.task_mean"
    evals = [r for r in rows if r.get(key) is not None]
    assert [r["step"] for r in evals] == [0, 1, 2]
    match = re.fullmatch(r"done: held-out toy_geneval\.strict\.task_mean: (\S+) at step 0 -> (\S+) at step 2; "
                         r"took (\S+?)(?: \(.*\))?; figures in (\S+): (.*)", line)
    assert match, line
    assert (float(match[1]), float(match[2])) == (round(evals[0][key], 4), round(evals[-1][key], 4))
    assert Path(match[4]) == out
    figures = match[5].split(", ")
    assert figures[0] == "reward_vs_cost.png" and {"grid_start.png", "grid_end.png"} <= set(figures)
    assert all((out / name).exists() for name in figures)
