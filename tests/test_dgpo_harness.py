"""DGPO through the real harness: the toy preset on the tiny model and on the tiny SD3 backend, the rollout
snapshot switch, and that every DGPO preset loads. (The pure loss: test_dgpo.py.)"""
import pytest
import torch

from diffrl_bench.config import ConfigError, load_config
from diffrl_bench.train import Trainer


def params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.mark.parametrize("name", ["toy_dgpo", "dgpo_sd35m_geneval", "dgpo_sd35m_ocr", "dgpo_sd35m_pickscore"])
def test_presets_load(name):
    cfg = load_config(name)
    assert cfg.algorithm == "dgpo" and cfg.rollout.sampler.grid == "dpm_flow"
    assert cfg.train.optimizer_steps_per_rollout == 1


def test_preset_values_differ_per_task_as_the_authors_configs():
    g, o, p = (load_config(f"dgpo_sd35m_{task}") for task in ("geneval", "ocr", "pickscore"))
    assert (g.algo.train_time_pool, g.algo.rollout_from_old_after) == (5, 500)
    assert (o.algo.train_time_pool, o.algo.rollout_from_old_after) == (7, 200)
    assert (p.algo.beta_dpo, p.algo.kl_beta, p.algo.clip_range, p.rollout.images_per_prompt, p.advantage.std) == (
        10.0, 1e-3, 5e-2, 24, "global")
    assert g.advantage.std == "group" and g.model.options.lora_rank == 64 and g.rollout.sampler.cfg_scale == 4.5


def test_time_pool_beyond_the_grid_is_refused_at_load(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="train_time_pool"):
        load_config("toy_dgpo", tiny_run(out=tmp_path, algo=("algo.num_train_times=2",)))  # 3-step grid, pool 5


def _run(tiny_run, tmp_path, *extra):
    return tiny_run("eval.every=-1", "checkpoint.every=0", "algo.train_time_pool=3", *extra, out=tmp_path,
                    algo=("algo.num_train_times=2",))


def test_two_steps_train_and_switch_rollouts_to_old(tiny_run, tmp_path, monkeypatch):
    cfg = load_config("toy_dgpo", _run(tiny_run, tmp_path / "r", "train.steps=2", "algo.rollout_from_old_after=0"))
    trainer = Trainer(cfg, progress=False)
    used = []
    import diffrl_bench.train as train_module
    real = train_module.sample_chunks
    monkeypatch.setattr(train_module, "sample_chunks",
                        lambda *a, snapshot, **k: used.append(snapshot) or real(*a, snapshot=snapshot, **k))
    before = params(trainer.policy.core).clone()
    trainer.run()
    assert used == ["theta", "old"]  # switch_after 0: from the first optimizer step on
    assert not torch.equal(before, params(trainer.policy.core))
    rows = trainer.metrics.rows()
    assert all(r["train/grad_norm"] > 0 and r["loss/policy_loss"] == r["loss/policy_loss"] for r in rows)
    trainer.reward.close()


@pytest.mark.slow
def test_two_steps_on_the_sd3_backend(tiny_sd3, tmp_path):
    overrides = ["model.backend=sd3", f"model.path={tiny_sd3}", f"output_dir={tmp_path / 'run'}", "train.threads=1",
                 "rollout.prompts_per_step=2", "rollout.images_per_prompt=4", "rollout.chunk_size=4",
                 "rollout.sampler.num_steps=3", "rollout.sampler.shift=3.0", "rollout.sampler.cfg_scale=2.0",
                 "eval.sampler.num_steps=2", "eval.images_per_prompt=1", "eval.every=-1", "train.micro_batch_size=4",
                 "algo.num_train_times=2", "algo.train_time_pool=3", "algo.kl_cfg=2.0",
                 "reward.components.test_brightness=1.0", "train.steps=2", "optim.lr=1e-2", "checkpoint.every=0"]
    trainer = Trainer(load_config("toy_dgpo", overrides), progress=False)
    assert trainer.policy.snapshot_names() == ["old", "ref"]
    theta0 = {k: p.detach().clone() for k, p in trainer.policy.lora.params().items()}
    trainer.rl_step()
    row = trainer.rl_step()
    assert row["train/grad_norm"] > 0 and row["loss/kl_loss"] > 0
    theta = trainer.policy.lora.params()
    assert max((theta[k] - theta0[k]).abs().max().item() for k in theta) > 1e-4
    trainer.reward.close()
