"""GRPO-Guard and Flow-DPPO through the real harness: stored behaviour means, the per-rollout SDE step set,
on-policy identities, DPPO's own advantages, short runs, tiny SD3 with LoRA and CFG, and that every preset loads."""
import json

import pytest
import torch

from diffrl_bench.algorithms.flow_dppo import dppo_advantages
from diffrl_bench.config import ConfigError, load_config
from diffrl_bench.models import index_condition
from diffrl_bench.sde import draw_sde_steps
from diffrl_bench.train import Trainer, train

# The tiny run's sampler has 3 steps: DPPO draws 2 of steps [0, 3) per rollout.
DPPO_TINY = ("rollout.sampler.options.sde_pool=[0,3]", "rollout.sampler.options.sde_count=2")


def _overrides(tiny_run, *extra, out):
    return tiny_run("eval.every=-1", *extra, out=out, algo=())


def _on_policy_metrics(trainer, batch):
    items = trainer.algo.training_items(batch, torch.arange(8), 4, trainer.generators["train"])
    out = []
    for item in items:
        with torch.no_grad():
            v = trainer.policy.velocity(item.x, item.sigma, index_condition(batch.cond, item.index),
                                        cfg_scale=item.cfg_scale)
        out.append(trainer.algo.loss(item, {"theta": v})[1])
    return items, out


def test_grpo_guard_stores_behaviour_means_and_is_exactly_on_policy(tiny_run, tmp_path):
    cfg = load_config("toy_grpo_guard", _overrides(
        tiny_run, "train.shuffle=false", "train.micro_batch_size=4", "rollout.chunk_size=4",
        "rollout.sampler.cfg_scale=2.0", "train.optimizer_steps_per_rollout=1", out=tmp_path / "r"))
    trainer = Trainer(cfg, progress=False)
    batch = trainer.collect()
    assert batch.transitions.means.shape == batch.transitions.latents[1:].shape
    items, metrics = _on_policy_metrics(trainer, batch)
    assert len(items) == 2 * 2 and all("old_mean" in item.data for item in items)
    for m in metrics:
        # Same layout as the rollout: the recomputed mean is the stored one, so the bias is 0 and the ratio 1.
        assert m["ratio_mean_bias"] == 0 and torch.equal(m["ratio"], torch.ones_like(m["ratio"]))
    row = trainer.optimize(batch)
    assert row["loss/ratio_min"] == 1.0 and "loss/ratio_mean_bias" in row
    trainer.reward.close()


def test_grpo_guard_rejects_cps(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="rationorm"):
        load_config("toy_grpo_guard", _overrides(tiny_run, "rollout.sampler.options.sde_type=cps",
                                                 out=tmp_path / "r"))


def test_flow_dppo_trains_the_seeded_step_set_with_its_own_advantages(tiny_run, tmp_path):
    cfg = load_config("toy_flow_dppo", _overrides(
        tiny_run, *DPPO_TINY, "train.micro_batch_size=4", "rollout.chunk_size=4", out=tmp_path / "r"))
    trainer = Trainer(cfg, progress=False)
    batch = trainer.collect()
    drawn = draw_sde_steps(0, (0, 3), 2)  # the first rollout's index is 0
    assert torch.equal(batch.transitions.steps, torch.tensor(drawn)[:, None].expand(2, 8))
    assert batch.transitions.means is not None
    items, metrics = _on_policy_metrics(trainer, batch)
    expected = dppo_advantages(batch.rewards, batch.group_ids)
    for item, m in zip(items, metrics):
        torch.testing.assert_close(item.data["advantages"], expected[item.index])
        assert torch.equal(m["kl_per_sample"], torch.zeros_like(m["kl_per_sample"]))
        assert m["masked_fraction"] == 0 and torch.equal(m["ratio"], torch.ones_like(m["ratio"]))
    trainer.optimize(batch)
    trainer.reward.close()


def test_flow_dppo_rejects_a_bad_step_set_at_load_time(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="sde_pool"):
        load_config("toy_flow_dppo", _overrides(tiny_run, out=tmp_path / "r"))  # [0, 5) on a 3-step grid
    with pytest.raises(ConfigError, match="advantage"):
        load_config("toy_flow_dppo", _overrides(tiny_run, *DPPO_TINY, "algo.advantage=ppo", out=tmp_path / "r"))


@pytest.mark.parametrize("preset,extra,trained", [("toy_grpo_guard", (), 2), ("toy_flow_dppo", DPPO_TINY, 2)])
def test_short_runs_log_their_metrics_and_count_costs(tiny_run, tmp_path, preset, extra, trained):
    out = tmp_path / "run"
    train(load_config(preset, _overrides(tiny_run, "train.steps=2", *extra, out=out)), progress=False)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    keys = ("loss/ratio_mean_bias", "loss/clipfrac") if preset == "toy_grpo_guard" else (
        "loss/masked_fraction", "loss/kl_new_old_mean")
    for key in keys:
        assert key in last, key
    # Rollout: 8 images x 3 steps per RL step; train: 8 samples x 2 trained steps, theta only.
    assert last["cost/nfe_rollout"] == 2 * 8 * 3 and last["cost/nfe_train"] == 2 * 8 * trained


@pytest.mark.parametrize("preset,extra", [("toy_grpo_guard", ()), ("toy_flow_dppo", DPPO_TINY)])
def test_on_tiny_sd3_with_lora_and_cfg(tiny_sd3, tmp_path, preset, extra):
    overrides = ["model.backend=sd3", f"model.path={tiny_sd3}", f"output_dir={tmp_path / 'r'}", "train.threads=1",
                 "rollout.prompts_per_step=2", "rollout.images_per_prompt=2", "rollout.chunk_size=2",
                 "rollout.sampler.num_steps=3", "rollout.sampler.shift=3.0", "rollout.sampler.cfg_scale=4.5",
                 "eval.every=-1", "train.micro_batch_size=2", "train.shuffle=false",
                 "train.optimizer_steps_per_rollout=1", "reward.components.test_brightness=1.0", "optim.lr=1e-2",
                 *extra]
    trainer = Trainer(load_config(preset, overrides), progress=False)
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    row = trainer.optimize(trainer.collect())
    assert row["loss/ratio_min"] == 1.0 and row["loss/ratio_max"] == 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.trainable_parameters()))
    trainer.reward.close()


@pytest.mark.parametrize("preset", ["toy_grpo_guard", "toy_flow_dppo", "grpo_guard_sd35m_geneval",
                                    "grpo_guard_sd35m_ocr", "grpo_guard_sd35m_pickscore",
                                    "flow_dppo_sd35m_pickscore", "flow_dppo_sd35m_geneval",
                                    "flow_dppo_sd35m_ocr"])
def test_presets_load(preset):
    cfg = load_config(preset, [])
    assert cfg.algorithm in ("grpo_guard", "flow_dppo")
