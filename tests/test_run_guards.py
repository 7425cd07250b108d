"""Issue 17: each bad input or fault gets an error naming what is wrong, before work or without losing what was
written (docs/errors.md lists them)."""
import json
import math
import threading
from pathlib import Path

import pytest
import torch

from diffrl_bench import registry
from diffrl_bench.checkpoint import step_checkpoints
from diffrl_bench.cli import main
from diffrl_bench.config import ConfigError, load_config
from diffrl_bench.reward_harness import RewardError, call_reward_within
from diffrl_bench.run_guards import (RunStopped, changed_keys, check_device, looks_like_local_path, lock_run_dir)
from diffrl_bench.runlog import MetricsLog
from diffrl_bench.train import Trainer, train


# ------------------------------------------------------------------------------------------ config range checks
@pytest.mark.parametrize("override,message", [
    ("train.optimizer_steps_per_rollout=0", "bad config key 'train.optimizer_steps_per_rollout': must be at least 1"),
    ("train.optimizer_steps_per_rollout=-2", "bad config key 'train.optimizer_steps_per_rollout': must be at least 1"),
    ("optim.betas=[0.9,1.5]", r"bad config key 'optim.betas': \[0.9, 1.5\]: each must be in \[0, 1\)"),
    ("optim.eps=0", "bad config key 'optim.eps': 0.0 must be positive"),
    ("eval.images_per_prompt=0", "bad config key 'eval.images_per_prompt': must be at least 1"),
    ("eval.batch_size=0", "bad config key 'eval.batch_size': must be at least 1"),
    ("train.threads=-1", r"bad config key 'train.threads': must be 0 \(auto\) or a positive thread count"),
    ("advantage.clip=2.0", "bad config key 'advantage.clip': 2.0 would be ignored"),
    ("reward.components.toy_geneval=nan", "bad config key 'reward.components.toy_geneval': weight nan is not a finite"),
    ("reward.options.toy_geneval.strict_weigth=1", "bad config key 'reward.options.toy_geneval.strict_weigth': "
                                                  "reward 'toy_geneval' has no option 'strict_weigth'"),
    ("name=../../x", r"bad config key 'name': '../../x' is not a plain folder name"),
    ("name=a/b", r"bad config key 'name': 'a/b' is not a plain folder name"),
    ("train.budget_flops=-1e12", r"bad config key 'train.budget_flops': must be non-negative \(0: no limit\)"),
])
def test_out_of_range_values_name_their_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("toy_nft", [override])


def test_a_plain_name_or_any_name_with_an_output_dir_is_accepted(tmp_path):
    assert load_config("toy_nft", ["name=nft_lr=1e-4,seed@2"]).name == "nft_lr=1e-4,seed@2"
    assert load_config("toy_nft", ["name=a/b", f"output_dir={tmp_path}"]).name == "a/b"


def test_an_sde_window_longer_than_the_steps_is_refused():
    base = ["algorithm=flow_grpo", "rollout.sampler.name=flow_grpo_sde", "rollout.sampler.num_steps=4"]
    with pytest.raises(ConfigError, match="bad config key 'rollout.sampler.options.window_size': a window of 6 SDE "
                                          "steps is longer than the 4 steps"):
        load_config("toy_flow_grpo", [*base, "rollout.sampler.options.window_size=6"])
    with pytest.raises(ConfigError, match=r"'rollout.sampler.options.window_range': \[0, 9\] is not \[lo, hi\)"):
        load_config("toy_flow_grpo", [*base, "rollout.sampler.options.window_size=2",
                                      "rollout.sampler.options.window_range=[0,9]"])


def test_a_malformed_yaml_file_is_one_config_error_naming_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1,\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid YAML"):
        load_config(str(bad))
    assert main(["train", str(bad), "--no-progress"]) == 2


def test_a_broken_plugins_name_fails_at_config_time_naming_the_plugin(monkeypatch):
    broken = registry.BrokenPlugin("rewards", "pkg.flaky", "ImportError: no module named flaky_dep", ("toy_geneval",))
    registry.load_plugins()
    monkeypatch.setattr(registry, "_broken", [broken])
    with pytest.raises(ConfigError, match=r"bad config key 'reward.components.toy_geneval': reward 'toy_geneval' "
                                          r"is unavailable: plugin pkg.flaky .*ImportError: no module named flaky_dep"):
        load_config("toy_nft")


def test_list_names_broken_plugins(monkeypatch, capsys):
    broken = registry.BrokenPlugin("rewards", "pkg.flaky", "ImportError: boom", ("flaky",))
    registry.load_plugins()
    monkeypatch.setattr(registry, "_broken", [broken])
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "plugins that failed to load" in out and "pkg.flaky (group diffrl_bench.rewards): ImportError: boom" in out
    assert "toy_geneval" in out  # the others still listed


# ------------------------------------------------------------------------------------------- device, model path
def test_cuda_without_cuda_is_an_error():
    with pytest.raises(ConfigError, match="bad config key 'train.device': 'cuda' but torch sees no CUDA device"):
        check_device("cuda", cuda_available=False)
    check_device("cuda", cuda_available=True)
    check_device("auto", cuda_available=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_run_on_cuda_without_cuda_stops_before_building(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="train.device"):
        Trainer(load_config("toy_nft", tiny_run("train.device=cuda", out=tmp_path / "c")), progress=False)
    assert not (tmp_path / "c").exists()


def test_local_looking_model_paths_that_do_not_exist_are_named(tiny_run, tmp_path):
    assert looks_like_local_path("./models/x") and looks_like_local_path("/no/such") and looks_like_local_path("~/m")
    assert looks_like_local_path("a/b/c")
    assert not looks_like_local_path("stabilityai/stable-diffusion-3.5-medium")  # a hub id
    assert not looks_like_local_path("builtin:toy_base") and not looks_like_local_path("random:sd35m")
    (tmp_path / "models").mkdir()
    assert looks_like_local_path(str(tmp_path / "models" / "typo"))
    missing = tmp_path / "models" / "tiny_typo"
    cfg = load_config("toy_nft", [*tiny_run(out=tmp_path / "r"), f"model.path={missing}"])
    with pytest.raises(ConfigError, match=f"bad config key 'model.path': '{missing}' does not exist"):
        Trainer(cfg, progress=False)


# ----------------------------------------------------------------------------------------------- run directory
def test_a_second_train_on_the_same_directory_is_refused(tiny_run, tmp_path):
    out = tmp_path / "run"
    first = Trainer(load_config("toy_nft", tiny_run("eval.every=-1", out=out)), progress=False)
    try:
        with pytest.raises(ConfigError, match=f"output directory {out} is in use by another train command"):
            Trainer(load_config("toy_nft", tiny_run("eval.every=-1", out=out)), progress=False)
    finally:
        first.reward.close()
        first.release_run_dir()
    lock_run_dir(out).release()  # free again once the first is done


def test_an_unwritable_output_directory_is_named(tiny_run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=f"output directory {blocker / 'run'}: cannot create it"):
        Trainer(load_config("toy_nft", tiny_run(out=blocker / "run")), progress=False)


def test_resuming_with_a_changed_config_is_refused_naming_the_keys(tiny_run, tmp_path):
    out = tmp_path / "run"
    common = ("eval.every=-1", "checkpoint.every=1")
    train(load_config("toy_nft", tiny_run("train.steps=1", *common, out=out)), progress=False)
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=r"holds a run with a different config.*Changed: optim.lr: 3e-05 -> 0.001, "
                                          r"train.seed: 0 -> 3"):
        Trainer(load_config("toy_nft", tiny_run("train.steps=1", "optim.lr=1e-3", "train.seed=3", *common, out=out)),
                progress=False)
    with pytest.raises(ConfigError, match=r"Changed: algo\.kl_beta: .*algorithm: 'nft' -> 'rft'\."):
        Trainer(load_config("toy_rft", tiny_run("train.steps=1", *common, out=out, algo=())), progress=False)
    assert (out / "metrics.jsonl").read_bytes() == before
    # Extending the run, and eval/checkpoint settings, are allowed.
    train(load_config("toy_nft", tiny_run("train.steps=2", "eval.images_per_prompt=1", "eval.every=-1",
                                          "checkpoint.every=2", "checkpoint.keep_last=3", out=out)), progress=False)
    assert [r["step"] for r in MetricsLog(out).rows()] == [1, 2]


def test_changed_keys_ignore_keys_one_version_lacks():
    assert changed_keys({"a": {"b": 1, "old": 2}, "train": {"steps": 3}},
                        {"a": {"b": 2, "new": 5}, "train": {"steps": 9}}) == ["a.b"]


# ------------------------------------------------------------------------------------------------- non-finite
def three_step_run_poisoned_from_step_two(tiny_run, out, monkeypatch, poison) -> Trainer:
    """A 3-step toy run, checkpointing every step, whose algorithm loss returns `poison(value, metrics)` from
    step 2 on."""
    trainer = Trainer(load_config("toy_nft", tiny_run("train.steps=3", "eval.every=-1", "checkpoint.every=1", out=out)),
                      progress=False)
    loss = trainer.algo.loss

    def poisoned(item, velocities):
        value, metrics = loss(item, velocities)
        return poison(value, metrics) if trainer.step >= 1 else (value, metrics)

    monkeypatch.setattr(trainer.algo, "loss", poisoned)
    return trainer


def test_a_nan_loss_stops_the_run_naming_step_and_quantity_without_a_checkpoint(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = three_step_run_poisoned_from_step_two(
        tiny_run, out, monkeypatch, lambda value, metrics: (value * math.nan, metrics))
    with pytest.raises(RunStopped, match="step 2: the loss of algorithm 'nft' is nan"):
        trainer.run()
    trainer.release_run_dir()
    assert [p.name for p in step_checkpoints(out / "checkpoints")] == ["step_0000001"]


def assert_step_stops_with_weights_untouched(trainer, match: str) -> None:
    """The next RL step raises RunStopped matching `match`, before any optimizer step moved a weight."""
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    with pytest.raises(RunStopped, match=match):
        trainer.rl_step()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.trainable_parameters()))
    trainer.reward.close()
    trainer.release_run_dir()


def test_a_non_finite_gradient_norm_stops_the_run_before_the_optimizer_step(tiny_run, tmp_path, monkeypatch):
    trainer = Trainer(load_config("toy_nft", tiny_run("eval.every=-1", out=tmp_path / "g")), progress=False)
    monkeypatch.setattr(trainer.accelerator, "clip_grad_norm_", lambda *a: torch.tensor(float("inf")))
    assert_step_stops_with_weights_untouched(trainer, "step 1: the gradient norm is inf")


def test_a_non_finite_metric_stops_the_run_before_its_row_is_written(tiny_run, tmp_path, monkeypatch):
    """A finite loss with a NaN metric beside it (here from step 2): the run stops naming the metric and the step;
    step 2 has neither a row nor a checkpoint."""
    out = tmp_path / "run"
    trainer = three_step_run_poisoned_from_step_two(
        tiny_run, out, monkeypatch, lambda value, metrics: (value, {**metrics, "test_ratio": torch.tensor(math.nan)}))
    with pytest.raises(RunStopped, match="step 2: metric 'loss/test_ratio' is nan; the run stops before this row"):
        trainer.run()
    trainer.release_run_dir()
    assert [r["step"] for r in MetricsLog(out).rows()] == [1]
    assert [p.name for p in step_checkpoints(out / "checkpoints")] == ["step_0000001"]


def test_non_finite_metrics_names_each_and_skips_what_is_nan_by_design(monkeypatch):
    from diffrl_bench import run_guards

    row = {"step": 3, "loss/a": 1.5, "loss/b": math.inf, "reward/c": -math.nan, "flag": True, "note": None, "k": 2}
    assert run_guards.non_finite_metrics(row) == "metric 'loss/b' is inf, metric 'reward/c' is nan"
    assert run_guards.non_finite_metrics({"step": 1, "loss/a": 0.0}) is None
    monkeypatch.setitem(run_guards.NAN_BY_DESIGN, "reward/c", "a test's reason")
    assert run_guards.non_finite_metrics(row) == "metric 'loss/b' is inf"


def test_without_clipping_the_gradient_norm_is_still_checked(tiny_run, tmp_path):
    """optim.grad_clip=0: a finite loss whose gradients are not finite (a hook makes one parameter's inf) stops the
    run before the optimizer step, naming the step and the norm; the weights are untouched."""
    trainer = Trainer(load_config("toy_nft", tiny_run("eval.every=-1", "optim.grad_clip=0", out=tmp_path / "g")),
                      progress=False)
    next(iter(trainer.policy.trainable_parameters())).register_hook(lambda grad: torch.full_like(grad, math.inf))
    assert_step_stops_with_weights_untouched(
        trainer, "step 1: the gradient norm is inf; the run stops before the optimizer step")


def test_without_clipping_the_logged_norm_is_that_of_the_untouched_gradients(tiny_run, tmp_path, monkeypatch):
    """grad_clip=0 logs train/grad_norm too, and taking it leaves the gradients bit for bit as they were: the
    optimizer step sees the gradients of before the norm, whose 2-norm is the logged one."""
    trainer = Trainer(load_config("toy_nft", tiny_run("eval.every=-1", "optim.grad_clip=0", out=tmp_path / "n")),
                      progress=False)
    params = list(trainer.policy.trainable_parameters())
    before, at_step = [], []
    norm = trainer.accelerator.clip_grad_norm_
    step = trainer.optimizer.step

    def recording_norm(*args, **kwargs):
        before.append([p.grad.clone() for p in params])
        return norm(*args, **kwargs)

    def recording_step(*args, **kwargs):
        at_step.append([p.grad.clone() for p in params])
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer.accelerator, "clip_grad_norm_", recording_norm)
    monkeypatch.setattr(trainer.optimizer, "step", recording_step)
    row = trainer.rl_step()
    assert len(before) == len(at_step) == 1
    assert all(torch.equal(a, b) for a, b in zip(before[0], at_step[0]))
    total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in at_step[0]]))
    assert row["train/grad_norm"] == pytest.approx(float(total), rel=1e-5)
    trainer.reward.close()
    trainer.release_run_dir()


def test_a_run_stopped_on_a_nan_exits_1_with_one_line(tiny_run, tmp_path, monkeypatch, caplog):
    import diffrl_bench.train as train_module

    def stopped(cfg, progress=True):
        raise RunStopped("step 4: the loss of algorithm 'nft' is nan")

    monkeypatch.setattr(train_module, "train", stopped)
    assert main(["train", "toy_nft", "--no-progress", *tiny_run()]) == 1
    assert "the run stops: step 4" in caplog.text or "the run stopped: step 4" in caplog.text


# ------------------------------------------------------------------------------------------- metrics, evaluation
def test_a_truncated_last_metrics_row_is_dropped_and_the_rest_kept(tmp_path, caplog):
    log = MetricsLog(tmp_path)
    for step in (1, 2):
        log.append({"step": step, "reward/mean": 0.5})
    with log.path.open("a") as handle:
        handle.write('{"step": 3, "rew')
    assert [r["step"] for r in log.rows()] == [1, 2]
    assert "metrics.jsonl:3: the last row was cut short" in caplog.text
    assert log.truncate_after(5) == 0
    assert log.path.read_text().endswith("}\n")
    log.append({"step": 3})
    assert [r["step"] for r in log.rows()] == [1, 2, 3]
    log.path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a JSON row"):
        log.rows()


def test_an_evaluation_reward_that_hangs_stops_naming_it():
    release = threading.Event()

    def hanging(images, prompts, metadata):
        release.wait(30)
        return {"stuck": torch.zeros(len(prompts))}

    try:
        with pytest.raises(RewardError, match=r"reward 'stuck' did not answer within 0.2 s \(reward.timeout_s\)"):
            call_reward_within(0.2, "stuck", hanging, torch.zeros(2, 3, 4, 4), ["a", "b"], [{}, {}])
    finally:
        release.set()
    quick = lambda images, prompts, metadata: {"q": torch.ones(len(prompts))}  # noqa: E731
    assert call_reward_within(5, "q", quick, torch.zeros(2, 3, 4, 4), ["a", "b"], [{}, {}])["q"].tolist() == [1, 1]


# ------------------------------------------------------------------------------------------------ eval, export
def test_export_onto_a_file_and_eval_of_a_corrupt_checkpoint(tiny_run, tmp_path, caplog):
    run = tmp_path / "run"
    assert main(["train", "toy_nft", "--no-progress",
                 *tiny_run("train.steps=1", "eval.every=-1", "checkpoint.every=1", out=run)]) == 0
    target = tmp_path / "weights.bin"
    target.write_text("keep me")
    with pytest.raises(SystemExit, match=f"--out {target} is a file, not a directory"):
        main(["export", str(run), "--out", str(target)])
    assert target.read_text() == "keep me"
    weights = run / "checkpoints" / "step_0000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["eval", str(run)]) == 2
    assert "step_0000001 is damaged: model.safetensors has 100 bytes" in caplog.text
    assert json.loads((run / "checkpoints" / "step_0000001" / "manifest.json").read_text())


# ------------------------------------------------------------------------------------------------ signals
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_run_promptly_leaving_the_newest_checkpoint_intact(tiny_run, tmp_path, signum):
    import signal
    import subprocess
    import sys
    import time

    from diffrl_bench.checkpoint import newest_intact_checkpoint, verify_checkpoint

    out = tmp_path / "run"
    # The tests' conftest registers the cheap `test_brightness` reward the tiny run uses.
    launcher = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import conftest; "
                "from diffrl_bench.cli import main; sys.exit(main(sys.argv[1:]))")
    command = [sys.executable, "-c", launcher, str(Path(__file__).parent), "train", "toy_nft", "--no-progress",
               *tiny_run("train.steps=500", "eval.every=-1", "checkpoint.every=1", "checkpoint.keep_last=2", out=out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not step_checkpoints(out / "checkpoints") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert step_checkpoints(out / "checkpoints"), proc.stdout.read() if proc.poll() is not None else "no ckpt"
        proc.send_signal(getattr(signal, signum))
        output, _ = proc.communicate(timeout=30)  # prompt: well under a second of work is left per step
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "interrupted: the run stops; its checkpoints and logged rows are kept" in output
    for path in step_checkpoints(out / "checkpoints"):
        verify_checkpoint(path)
    newest = newest_intact_checkpoint(out / "checkpoints")
    steps = [r["step"] for r in MetricsLog(out).rows()]
    assert newest is not None and int(newest.name.split("_")[-1]) <= steps[-1]
    lock_run_dir(out).release()  # the lock went with the process


def test_a_malformed_sweep_spec_exits_2_with_one_line(tmp_path, caplog):
    bad = tmp_path / "spec.yaml"
    bad.write_text("arms:\n  a: [1,\n")
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    assert f"sweep spec {bad}: cannot read it:" in caplog.text and "line" in caplog.text


def test_a_full_disk_during_a_run_is_one_line_naming_the_file(tiny_run, monkeypatch, caplog):
    import errno

    import diffrl_bench.train as train_module

    def full(cfg, progress=True):
        raise OSError(errno.ENOSPC, "No space left on device", "/p/run/checkpoints/.tmp_step_0000004/model.safetensors")

    monkeypatch.setattr(train_module, "train", full)
    assert main(["train", "toy_nft", "--no-progress", *tiny_run()]) == 1
    assert ("/p/run/checkpoints/.tmp_step_0000004/model.safetensors: No space left on device (what was written "
            "before is kept)") in caplog.text
