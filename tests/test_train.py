"""End-to-end runs of the harness on a tiny random toy model (seconds each)."""
import dataclasses
import json

import pandas as pd
import pytest
import torch

from diffrl_bench.config import load_config
from diffrl_bench.train import Trainer, train

pytestmark = pytest.mark.slow


def test_short_run_writes_the_results_folder_and_counts_costs(tiny_run, tmp_path):
    out = tmp_path / "run"
    cfg = load_config("toy_nft", tiny_run("train.steps=3", "eval.every=2", "checkpoint.every=2"))
    train(cfg, progress=False)
    for name in ("config.yaml", "run_info.json", "metrics.csv", "metrics.jsonl", "reward_vs_cost.png",
                 "grid_start.png", "grid_end.png", "grid_step00002.png"):
        assert (out / name).exists(), name
    info = json.loads((out / "run_info.json").read_text())
    assert info["packages"]["torch"] and info["git_commit"] and info["device_kind"].startswith("cpu")
    resolved = load_config(str(out / "config.yaml"))  # the saved config is itself a valid config
    assert resolved.train.steps == 3 and resolved.algo["num_train_times"] == 2

    frame = pd.read_csv(out / "metrics.csv")
    assert list(frame["step"]) == [0, 1, 2, 3]
    train_rows = frame.dropna(subset=["reward/mean"])
    # 2 prompts x 4 images, 3 sampler steps, 2 training times, theta + old + ref per training item.
    assert list(train_rows["cost/nfe_rollout"]) == [8 * 3, 16 * 3, 24 * 3]
    assert list(train_rows["cost/nfe_train"]) == [8 * 2 * 3, 16 * 2 * 3, 24 * 2 * 3]
    assert list(train_rows["cost/images"]) == [8, 16, 24]
    # Eval (start, step 2, end) uses 38 held-out prompts x 2 images x 3 steps each and is outside the budget.
    assert frame["cost/nfe_eval"].iloc[-1] == 3 * 38 * 2 * 3
    assert (frame["cost/nfe"] == frame["cost/nfe_rollout"] + frame["cost/nfe_train"]).all()
    for column in ("cost/device_s", "cost/gpu_hours", "cost/nfe"):
        assert frame[column].is_monotonic_increasing
    assert frame["cost/gpu_hours"].iloc[-1] == pytest.approx(frame["cost/device_s"].iloc[-1] / 3600)
    assert frame["eval/toy_geneval.strict.task_mean"].notna().sum() == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]


def test_an_extra_eval_sampler_scores_what_a_run_evaluated_with_that_sampler_scores(tiny_run, tmp_path):
    """`eval.extra_samplers` adds evaluations beside eval.sampler's without touching the run: a DPM2-evaluated run
    with an extra Euler evaluation logs under `eval_euler/` exactly what a run evaluated with Euler alone logs under
    `eval/` (same training, same eval noise), its own `eval/` columns equal a DPM2 run's without the extra, and the
    extra NFEs count as evaluation only (the budget's `cost/nfe` is unchanged)."""
    common = ("train.steps=2", "eval.every=1", "checkpoint.every=0", "optim.lr=1e-3",
              "eval.rewards=[toy_geneval, test_brightness]")
    both = tmp_path / "both"
    euler = tmp_path / "euler"
    dpm2 = tmp_path / "dpm2"
    train(load_config("toy_nft", tiny_run(*common, "eval.sampler.name=dpm2",
                                          "eval.extra_samplers.euler={name: euler, num_steps: 3}", out=both)),
          progress=False)
    train(load_config("toy_nft", tiny_run(*common, "eval.sampler.name=euler", out=euler)), progress=False)
    train(load_config("toy_nft", tiny_run(*common, "eval.sampler.name=dpm2", out=dpm2)), progress=False)
    frames = {name: pd.read_csv(tmp_path / name / "metrics.csv") for name in ("both", "euler", "dpm2")}
    evals = {name: frame.dropna(subset=["eval/test_brightness"]).reset_index(drop=True)
             for name, frame in frames.items()}
    assert len(evals["both"]) == 3  # start, step 1, end
    columns = [c for c in evals["euler"] if c.startswith("eval/")]
    assert "eval/test_brightness" in columns and "eval/toy_geneval.strict.task_mean" in columns
    for column in columns:
        extra = "eval_euler/" + column.removeprefix("eval/")
        assert evals["both"][extra].tolist() == evals["euler"][column].tolist(), column
        assert evals["both"][column].tolist() == evals["dpm2"][column].tolist(), column
    # The two solvers really differ on these images, so the equalities above are not trivially true.
    assert evals["both"]["eval/test_brightness"].tolist() != evals["both"]["eval_euler/test_brightness"].tolist()
    assert frames["both"]["reward/mean"].dropna().tolist() == frames["dpm2"]["reward/mean"].dropna().tolist()
    assert frames["both"]["cost/nfe"].tolist() == frames["dpm2"]["cost/nfe"].tolist()
    eval_nfe = {name: frame["cost/nfe_eval"].iloc[-1] for name, frame in frames.items()}
    assert eval_nfe["both"] == eval_nfe["euler"] + eval_nfe["dpm2"] == 2 * 3 * 38 * 2 * 3
    assert (both / "grid_end_euler.png").exists() and (both / "grid_end.png").exists()
    assert not (dpm2 / "grid_end_euler.png").exists()


def test_resumed_run_continues_the_same_curve(tiny_run, tmp_path):
    straight = tmp_path / "straight"
    resumed = tmp_path / "resumed"
    common = ("eval.every=-1", "checkpoint.every=2", "optim.lr=1e-3")
    train(load_config("toy_nft", tiny_run("train.steps=4", *common, out=straight)), progress=False)
    # "Interrupted" after step 2: the run stopped there, then the same command is run again with the full length.
    train(load_config("toy_nft", tiny_run("train.steps=2", *common, out=resumed)), progress=False)
    train(load_config("toy_nft", tiny_run("train.steps=4", *common, out=resumed)), progress=False)
    a = pd.read_csv(straight / "metrics.csv")
    b = pd.read_csv(resumed / "metrics.csv")
    assert list(b["step"]) == [1, 2, 3, 4]
    for column in ("reward/mean", "loss/loss", "loss/policy_loss", "loss/kl_loss", "train/grad_norm",
                   "cost/nfe", "cost/images"):
        assert a[column].tolist() == b[column].tolist(), column
    assert (b["train/grad_norm"] > 0).all()  # the policy really moved, so matching curves mean something
    # The ledger carried over: the resumed run's cumulative cost never went backwards.
    assert b["cost/device_s"].is_monotonic_increasing


def test_resume_drops_rows_logged_after_the_checkpoint(tiny_run, tmp_path):
    out = tmp_path / "run"
    train(load_config("toy_nft", tiny_run("train.steps=3", "eval.every=-1", "checkpoint.every=2", out=out)),
          progress=False)
    # Simulate a crash after step 3 was logged but before its checkpoint: remove the last checkpoint.
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_0000003")
    trainer = Trainer(load_config("toy_nft", tiny_run("train.steps=3", "eval.every=-1", "checkpoint.every=2", out=out)),
                      progress=False)
    assert trainer.step == 2
    assert [r["step"] for r in trainer.metrics.rows()] == [1, 2]
    trainer.reward.close()


@pytest.mark.parametrize("algorithm_overrides", [(), ("algo.loss_form=velocity",)])
def test_gradient_is_invariant_to_the_micro_batch_size(tiny_run, tmp_path, algorithm_overrides):
    """Batch 8 x accumulation 1 gives the same gradient as batch 1 x accumulation 8."""
    grads = {}
    for micro in (8, 1):
        cfg = load_config("toy_nft", tiny_run("eval.every=-1", f"train.micro_batch_size={micro}",
                                              *algorithm_overrides, out=tmp_path / f"m{micro}"))
        trainer = Trainer(cfg, progress=False)
        batch = trainer.collect()
        trainer.accumulate_gradients(batch, torch.arange(8))
        grads[micro] = torch.cat([p.grad.flatten() for p in trainer.policy.trainable_parameters()])
        trainer.reward.close()
    assert grads[8].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[8], rtol=1e-4, atol=1e-7)


def test_an_unequal_share_is_weighted_by_the_whole_steps_count_and_padded_to_the_busiest_process(tiny_run, tmp_path,
                                                                                                 monkeypatch):
    """Multi-process, simulated on one process: `gather` reports a second process with 3x the samples (48, not 16)
    and 7 items (not 4). The gradient is then the step's mean over all 64 samples, which DDP forms by averaging two
    processes: this process's contribution is its 16/64 of the mean times the world size 2, i.e. half its own
    mean's gradient; and it runs 3 extra items of weight 0, so both run 7 forward and backward passes."""
    cfg = load_config("toy_nft", tiny_run("eval.every=-1", "train.micro_batch_size=4", out=tmp_path / "share"))
    trainer = Trainer(cfg, progress=False)
    batch = trainer.collect()
    start = trainer.generators["train"].get_state()

    def gradient():
        trainer.generators["train"].set_state(start)
        trainer.optimizer.zero_grad(set_to_none=True)
        metrics = trainer.accumulate_gradients(batch, torch.arange(8))
        return torch.cat([p.grad.flatten() for p in trainer.policy.trainable_parameters()]), metrics

    alone, alone_metrics = gradient()
    calls = []
    velocity = trainer.policy.velocity
    monkeypatch.setattr(trainer.policy, "velocity", lambda *a, **k: calls.append(k["snapshot"]) or velocity(*a, **k))
    monkeypatch.setattr(trainer, "world", 2)
    # The other process: 48 samples in 7 items, the last of 6.
    monkeypatch.setattr(trainer, "gather", lambda values: torch.cat([values, torch.tensor([[48, 7, 48, 6]])]))
    nfe = trainer.ledger.nfe["train"]
    shared, shared_metrics = gradient()
    assert alone.abs().max() > 0
    torch.testing.assert_close(shared, 0.5 * alone, rtol=1e-5, atol=1e-8)
    assert calls.count("theta") == 7 and len(calls) == 7 * len(trainer.algo._needs)
    # The ledger is charged both processes' passes: 16 + 3 repeats of this one's last item (4) + the other's 48,
    # each through theta, old and ref.
    assert trainer.ledger.nfe["train"] - nfe == (16 + 3 * 4 + 48) * 3
    assert shared_metrics == alone_metrics  # logged metrics stay this process's own means
    trainer.reward.close()


def test_items_that_evaluate_different_snapshots_in_one_call_are_refused(tiny_run, tmp_path, monkeypatch):
    """The harness counts NFEs and pads processes as if every item of a call were alike; an algorithm breaking
    that is stopped with its name, not silently miscounted."""
    trainer = Trainer(load_config("toy_nft", tiny_run("eval.every=-1", out=tmp_path / "alike")), progress=False)
    batch = trainer.collect()
    produce = trainer.algo.training_items
    monkeypatch.setattr(trainer.algo, "training_items", lambda *a: [
        *produce(*a)[:1], dataclasses.replace(produce(*a)[-1], snapshots=("theta",))])
    with pytest.raises(RuntimeError, match="algorithm 'nft' returned 2 training items that do not all evaluate"):
        trainer.accumulate_gradients(batch, torch.arange(8))
    trainer.reward.close()


def test_sampling_snapshot_starts_equal_to_theta_and_lags_after_updates(tiny_run, tmp_path):
    cfg = load_config("toy_nft", tiny_run("eval.every=-1", "optim.lr=1e-2", "algo.old_decay=crd_old",
                                          out=tmp_path / "lag"))
    trainer = Trainer(cfg, progress=False)
    theta = lambda: torch.cat([p.flatten() for p in trainer.policy.core.parameters()])  # noqa: E731
    old = lambda: torch.cat([p.flatten() for p in trainer.policy.snapshots["old"].parameters()])  # noqa: E731
    ref = torch.cat([p.flatten() for p in trainer.policy.snapshots["ref"].parameters()]).clone()
    assert torch.equal(theta(), old())
    before_old = old().clone()
    trainer.rl_step()
    # crd_old decays with 0.25 + 0.005 step: after 1 optimizer step old = 0.255 old + 0.745 theta.
    expected = 0.255 * before_old + 0.745 * theta()
    torch.testing.assert_close(old(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(old(), theta())
    # ref is frozen.
    assert torch.equal(ref, torch.cat([p.flatten() for p in trainer.policy.snapshots["ref"].parameters()]))
    trainer.reward.close()


def test_resuming_a_checkpoint_without_a_generator_state_names_it_and_changes_nothing(tiny_run, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    train(load_config("toy_nft", tiny_run("train.steps=2", "eval.every=-1", "checkpoint.every=2", out=out)),
          progress=False)
    # A checkpoint from a version without the sampler generator: its RNG file lacks that entry.
    rng_file = out / "checkpoints" / "step_0000002" / "rng.safetensors"
    rng = load_file(str(rng_file))
    del rng["generator.sampler"]
    save_file(rng, str(rng_file))
    (rng_file.parent / "manifest.json").unlink()  # that version wrote no manifest either
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"step_0000002 holds no state for the random generator\(s\) \['sampler'\]"):
        Trainer(load_config("toy_nft", tiny_run("train.steps=3", "eval.every=-1", "checkpoint.every=2", out=out)),
                progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def flat_weights(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def weights_over_two_rl_steps(trainer):
    """The policy's weights before and after each of two RL steps (for checking an EMA against them)."""
    base = flat_weights(trainer.policy.core)
    thetas = []
    for _ in range(2):
        trainer.rl_step()
        thetas.append(flat_weights(trainer.policy.core))
    return base, thetas


@pytest.mark.parametrize("every,expected", [
    # decay min(0.9, (1 + n) / (10 + n)) after optimizer step n: 2/11 after step 1, 3/12 after step 2.
    (1, lambda base, t1, t2: (3 / 12) * ((2 / 11) * base + (9 / 11) * t1) + (9 / 12) * t2),
    (2, lambda base, t1, t2: (3 / 12) * base + (9 / 12) * t2),  # updated after step 2 only
])
def test_evaluation_ema_follows_its_warmed_up_decay(tiny_run, tmp_path, every, expected):
    cfg = load_config("toy_nft", tiny_run("eval.every=-1", "optim.lr=1e-2", "eval.ema_decay=0.9",
                                          f"eval.ema_every={every}", out=tmp_path / f"ema{every}"))
    trainer = Trainer(cfg, progress=False)
    base, thetas = weights_over_two_rl_steps(trainer)
    torch.testing.assert_close(flat_weights(trainer.policy.snapshots["eval_ema"]), expected(base, *thetas),
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(thetas[1], base)
    trainer.reward.close()


def test_evaluation_ema_on_the_rl_step_clock_moves_after_each_rl_step_as_many_times_as_asked(tiny_run, tmp_path):
    # unit rl_step, warm-up over the 0-based RL step (offset -1), 2 moves per update: decay 0.1 twice after RL
    # step 1 (n = 0), 2/11 twice after RL step 2 (n = 1); two optimizer steps per RL step make no extra moves.
    cfg = load_config("toy_nft", tiny_run("eval.every=-1", "optim.lr=1e-2", "eval.ema_decay=0.9",
                                          "eval.ema_unit=rl_step", "eval.ema_warmup_offset=-1",
                                          "eval.ema_updates_per_event=2", "train.optimizer_steps_per_rollout=2",
                                          out=tmp_path / "ema_rl"))
    trainer = Trainer(cfg, progress=False)
    base, thetas = weights_over_two_rl_steps(trainer)
    first = 0.1 ** 2 * base + (1 - 0.1 ** 2) * thetas[0]
    expected = (2 / 11) ** 2 * first + (1 - (2 / 11) ** 2) * thetas[1]
    torch.testing.assert_close(flat_weights(trainer.policy.snapshots["eval_ema"]), expected, rtol=1e-5, atol=1e-6)
    assert trainer.optimizer_steps == 4
    trainer.reward.close()


needs_tensorboard = pytest.mark.skipif(__import__("importlib").util.find_spec("tensorboard") is None,
                                       reason="tensorboard not installed")


@needs_tensorboard
def test_tensorboard_mirrors_metrics_jsonl_once_per_step_across_a_crash_and_resume(tiny_run, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    overrides = tiny_run("train.steps=4", "eval.every=2", "checkpoint.every=2", "log.trackers=[tensorboard]", out=out)
    real_step = Trainer.rl_step

    def crash_at_step_4(self):
        if self.step == 3:
            raise RuntimeError("node lost")
        return real_step(self)

    monkeypatch.setattr(Trainer, "rl_step", crash_at_step_4)
    with pytest.raises(RuntimeError, match="node lost"):
        train(load_config("toy_nft", overrides), progress=False)  # logged steps 0..3, checkpoint at 2
    monkeypatch.setattr(Trainer, "rl_step", real_step)
    train(load_config("toy_nft", overrides), progress=False)  # redoes step 3 (already tracked), then 4 and the end

    table = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in table] == [0, 1, 2, 2, 3, 4, 4]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    # Timings differ between the attempts; everything else is the same computation (resume is exact).
    for tag in ("reward/mean", "loss/loss", "cost/nfe", "eval/toy_geneval.strict.task_mean", "eval/toy_geneval"):
        want = [(r["step"], r[tag]) for r in table if r.get(tag) is not None]
        got = sorted((e.step, e.value) for e in events.Scalars(tag))
        assert [s for s, _ in got] == [s for s, _ in want], tag  # every step once
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag
    for grid in ("start", "step00002", "end"):
        assert len(events.Images(f"eval/grid_{grid}")) == 1, grid


@needs_tensorboard
def test_a_tracker_that_cannot_start_stops_the_run_before_any_work(tiny_run, tmp_path):
    from diffrl_bench.trackers import TrackerError

    out = tmp_path / "run"
    cfg = load_config("toy_nft", tiny_run("log.trackers=[tensorboard]",
                                          "log.tracker_options={tensorboard: {no_such_option: 1}}", out=out))
    with pytest.raises(TrackerError, match="'tensorboard' failed to start.*no_such_option"):
        train(cfg, progress=False)
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()
    assert not list(out.glob("grid_*.png")) and not (out / "checkpoints").exists()
