"""The AWM, CRD and RFT plugins through the real harness on the tiny model: short runs, identities, invariances,
snapshots, per-snapshot guidance and config-time checks. (Their pure losses are tested in test_awm_crd.py.)"""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from diffrl_bench.advantages import group_advantages, group_mean_centered
from diffrl_bench.algorithms.awm import AWM, AWMConfig
from diffrl_bench.algorithms.crd import CRD, CRDConfig, crd_loss
from diffrl_bench.algorithms.rft import best_of_group
from diffrl_bench.config import ConfigError, load_config
from diffrl_bench.sampling import flow_sigmas
from diffrl_bench.train import Trainer

F64 = torch.float64


def overrides(tiny_run, *extra, out, times=2):
    return tiny_run("eval.every=-1", "checkpoint.every=0", *extra, out=out, algo=(f"algo.num_train_times={times}",))


def perturb(trainer, scale=0.01):
    with torch.no_grad():
        for p in trainer.policy.core.parameters():
            p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


def flat_grad(trainer):
    return torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten()
                      for p in trainer.policy.trainable_parameters()])


def params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


# --------------------------------------------------------------------------------------------- every plugin
@pytest.mark.parametrize("config,extra,policy_metric", [
    ("toy_awm", (), "loss/policy_loss"),
    ("toy_crd", (), "loss/policy_loss"),
    ("toy_rft", ("algo.skip_flat_groups=false", "algo.min_reward=null"), "loss/fm_loss"),
])
def test_two_steps_through_the_trainer_change_the_parameters(tiny_run, tmp_path, config, extra, policy_metric):
    cfg = load_config(config, overrides(tiny_run, "train.steps=2", *extra, out=tmp_path / "r"))
    trainer = Trainer(cfg, progress=False)
    before = params(trainer.policy.core).clone()
    trainer.run()
    assert not torch.equal(before, params(trainer.policy.core))
    rows = trainer.metrics.rows()
    assert [r["step"] for r in rows] == [1, 2]
    assert all(policy_metric in r and r[policy_metric] == r[policy_metric] for r in rows)
    assert all(r["train/grad_norm"] > 0 for r in rows)  # the loss moved them, not just weight decay
    assert (tmp_path / "r" / "metrics.csv").exists()


# ------------------------------------------------------------------------------------------------------ AWM
def test_awm_with_zero_advantages_has_zero_policy_gradient(tiny_run, tmp_path):
    """beta = 0 leaves only the policy term: with every advantage 0 the gradient is exactly 0, although theta is far
    from the snapshots; with the anchors on, it is then the anchors' gradient alone (not zero)."""
    for beta in (0.0, 0.5):
        cfg = load_config("toy_awm", overrides(tiny_run, f"algo.beta={beta}", out=tmp_path / f"b{beta}"))
        trainer = Trainer(cfg, progress=False)
        perturb(trainer)
        batch = trainer.collect()
        batch.advantages = torch.zeros_like(batch.advantages)
        metrics = trainer.accumulate_gradients(batch, torch.arange(8))
        grad = flat_grad(trainer)
        assert metrics["policy_loss"] == 0.0
        if beta == 0:
            assert torch.equal(grad, torch.zeros_like(grad))
        else:
            assert grad.abs().max() > 0 and metrics["kl_loss"] > 0 and metrics["ema_kl_loss"] > 0
        trainer.reward.close()


def test_awm_items_share_stratified_times_and_lay_pairs_out_time_major(tiny_run, tmp_path):
    cfg = load_config("toy_awm", overrides(tiny_run, "train.micro_batch_size=6", out=tmp_path / "r", times=3))
    trainer = Trainer(cfg, progress=False)
    assert trainer.algo.rollout.snapshot == "theta" and set(trainer.algo.snapshots) == {"ref", "ema"}
    assert trainer.algo.snapshots["ema"](300) == 0.3 and trainer.algo.snapshots["ema"](100) == pytest.approx(0.1)
    batch = trainer.collect()
    items = trainer.algo.training_items(batch, torch.arange(8), 6, trainer.generators["train"])
    assert [len(i.index) for i in items] == [6] * 4  # 2 samples x 3 times per item
    for item in items:
        t = item.data["t"]
        assert t.shape == (3, 2) and torch.equal(item.sigma, t.reshape(-1))
        assert torch.equal(item.index, item.index[:2].repeat(3))
        assert torch.equal(t, items[0].data["t"])  # one stratified draw for the whole optimizer step
    trainer.reward.close()


def awm_batch(B=12, grid=flow_sigmas(14, 3.0)):
    """The parts of a rollout batch AWM's items read: clean samples, advantages and the rollout grid."""
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(x0=torch.randn(B, 2, 3, 3, generator=g), advantages=torch.randn(B, generator=g, dtype=F64),
                           sigmas=grid)


GENEVAL_TIMES = dict(time_distribution="stratified_index", num_train_times=6, time_index_range=[1, 12])


def test_awm_redraws_the_strata_for_every_micro_batch_and_shares_them_inside_it():
    """The released GenEval/OCR setting: micro-batches of 3 samples x 6 times (18 pairs), strata of indices 1..11."""
    algo = AWM(AWMConfig(**GENEVAL_TIMES))
    assert algo.config.time_draw == "micro_batch"  # the original's, by default
    batch, points = awm_batch(), flow_sigmas(14, 3.0)[:-1].tolist()
    items = algo.training_items(batch, torch.arange(12), 18, torch.Generator().manual_seed(5))
    again = algo.training_items(batch, torch.arange(12), 18, torch.Generator().manual_seed(5))
    assert [len(i.index) for i in items] == [18] * 4
    for item, same_seed in zip(items, again):
        t = item.data["t"]
        assert t.shape == (6, 3) and torch.all(t == t[:, :1])  # the 3 samples share the micro-batch's times
        indices = [points.index(v) for v in t[:, 0].tolist()]  # one per stratum; never index 0 (t = 1)
        assert all(i in stratum for i, stratum in zip(indices, ([1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11])))
        assert torch.equal(t, same_seed.data["t"]) and torch.equal(item.x, same_seed.x)  # reproducible
    # Independent draws: over many seeds, two micro-batches of one step pick the same point of the two-point
    # strata about half the time (always, if the draw were shared by the optimizer step).
    same = 0
    for seed in range(200):
        first, second = algo.training_items(batch, torch.arange(12), 18, torch.Generator().manual_seed(seed))[:2]
        same += int(torch.equal(first.data["t"][1:], second.data["t"][1:]))
    assert same < 25  # 5 two-point strata: P(all five equal) = 1/32 if independent, so ~6 of 200 expected


def test_awm_optimizer_step_draw_shares_the_times_across_micro_batches():
    algo = AWM(AWMConfig(**GENEVAL_TIMES, time_draw="optimizer_step"))
    items = algo.training_items(awm_batch(), torch.arange(12), 18, torch.Generator().manual_seed(5))
    assert all(torch.equal(item.data["t"], items[0].data["t"][:, :1].expand(6, 3)) for item in items)


def test_crd_items_train_at_the_ports_fixed_indices():
    grid = flow_sigmas(10, 3.0)
    algo = CRD(CRDConfig(time_distribution="stratified_index", num_train_times=20, time_index_range=[0, 8]))
    B = 8
    g = torch.Generator().manual_seed(0)
    batch = SimpleNamespace(x0=torch.randn(B, 2, 3, 3, generator=g), advantages=torch.randn(B, generator=g, dtype=F64),
                            sigmas=grid, group_ids=torch.arange(B) // 4)
    items = algo.training_items(batch, torch.arange(B), 4, torch.Generator().manual_seed(1))
    fixed = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6, 6, 7, 7]
    times = torch.cat([item.data["t"] for item in items])  # blocks of (slot, prompt group), slot-major
    assert torch.equal(times, grid[fixed].repeat_interleave(B))


def micro_batch_gradients(config, micros, tiny_run, tmp_path, *extra):
    """The accumulated gradient of one optimizer step over the same rollout batch, per micro-batch size."""
    grads = {}
    for micro in micros:
        cfg = load_config(config, overrides(tiny_run, f"train.micro_batch_size={micro}", *extra,
                                            out=tmp_path / f"m{micro}"))
        trainer = Trainer(cfg, progress=False)
        perturb(trainer)
        batch = trainer.collect()
        trainer.accumulate_gradients(batch, torch.arange(8))
        grads[micro] = flat_grad(trainer)
        trainer.reward.close()
    return grads


def test_awm_gradient_is_invariant_to_the_micro_batch_size(tiny_run, tmp_path):
    grads = micro_batch_gradients("toy_awm", (16, 2), tiny_run, tmp_path, "algo.beta=0.1")
    assert grads[16].abs().max() > 0
    torch.testing.assert_close(grads[2], grads[16], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------------ CRD
def crd_inputs(seed=0, B=8, chw=(2, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(B, *chw, generator=g, dtype=F64), torch.randn(B, *chw, generator=g, dtype=F64)
    v_old = eps - x0 + 0.5 * torch.randn(B, *chw, generator=g, dtype=F64)
    v_theta = v_old + 0.1 * torch.randn(B, *chw, generator=g, dtype=F64)
    v_ref = v_old + 0.1 * torch.randn(B, *chw, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    return v_theta, v_old, v_ref, x0, eps, adv


@pytest.mark.parametrize("loss_type", ["mse", "bce"])
def test_crd_loss_is_invariant_to_a_constant_added_to_one_prompt_groups_rewards(loss_type):
    """Within-prompt centring removes any per-prompt constant (the log Z(c) argument): shifting one group's
    advantages (inside the clip range) changes neither the loss nor its gradient. Batch centring does not have this
    property; the reward-adaptive KL weight uses the uncentred target, so the KL is held fixed here (kl_beta 0)."""
    v_theta, v_old, v_ref, x0, eps, adv = crd_inputs()
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    shifted = adv + 0.7 * (groups == 1)

    def run(a, centering):
        v = v_theta.clone().requires_grad_(True)
        loss, _ = crd_loss(v, v_old, v_ref, x0, eps, None, a, groups, loss_type=loss_type, kl_beta=0.0,
                           centering=centering)
        (g,) = torch.autograd.grad(loss, v)
        return loss, g

    (l0, g0), (l1, g1) = run(adv, "group"), run(shifted, "group")
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-15)
    assert g0.abs().max() > 0
    assert not torch.allclose(run(shifted, "batch")[0], run(adv, "batch")[0], rtol=1e-6)


def test_crd_plugin_loss_is_invariant_to_a_constant_added_to_one_prompt_groups_rewards(tiny_run, tmp_path):
    """Through the plugin and the harness, KL included: with per-group std (advantage.std=group) the advantages, and
    so the whole CRD loss and gradient, do not move when one prompt's rewards are all raised by the same amount.
    (With the global std the shift changes the std of the whole batch, hence every advantage's scale.)"""
    cfg = load_config("toy_crd", overrides(tiny_run, "advantage.std=group", out=tmp_path / "r"))
    trainer = Trainer(cfg, progress=False)
    perturb(trainer)
    batch = trainer.collect()
    state = trainer.generators["train"].get_state()
    results = []
    for shift in (0.0, 0.25):
        trainer.generators["train"].set_state(state)
        batch.rewards = batch.rewards + shift * (batch.group_ids == 0)
        batch.advantages = group_advantages(batch.rewards, batch.group_ids, std="group")
        trainer.optimizer.zero_grad(set_to_none=True)
        metrics = trainer.accumulate_gradients(batch, torch.arange(8))
        results.append((metrics["loss"], flat_grad(trainer)))
    assert results[0][1].abs().max() > 0
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-9)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-9)
    trainer.reward.close()


def test_crd_items_keep_prompt_groups_whole_and_evaluate_the_base_with_cfg(tiny_run, tmp_path, monkeypatch):
    cfg = load_config("toy_crd", overrides(tiny_run, "train.micro_batch_size=6", out=tmp_path / "r"))
    trainer = Trainer(cfg, progress=False)
    assert trainer.algo.rollout.snapshot == "sampler"
    assert set(trainer.algo.snapshots) == {"sampler", "old", "ref"}
    batch = trainer.collect()
    items = trainer.algo.training_items(batch, torch.arange(8), 6, trainer.generators["train"])
    # 2 prompts x 4 images x 2 slots: blocks of 4 pairs; a block of 4 plus another would exceed 6 -> 4 items of 4.
    assert [len(i.index) for i in items] == [4, 4, 4, 4]
    for item in items:
        assert len(torch.unique(batch.group_ids[item.index])) == 1 and item.snapshot_cfg == {"ref": 4.5}
    seen = []
    original = trainer.policy.velocity

    def spy(x, sigma, cond, *, snapshot="theta", cfg_scale=1.0):
        seen.append((snapshot, cfg_scale))
        return original(x, sigma, cond, snapshot=snapshot, cfg_scale=cfg_scale)

    monkeypatch.setattr(trainer.policy, "velocity", spy)
    nfe = trainer.ledger.nfe["train"]
    trainer.accumulate_gradients(batch, torch.arange(8))
    assert set(seen) == {("theta", 1.0), ("old", 1.0), ("ref", 4.5)}
    # 8 samples x 2 times, each: theta 1 + old 1 + CFG-guided ref 2 network evaluations.
    assert trainer.ledger.nfe["train"] - nfe == 16 * 4
    trainer.reward.close()


def test_crd_gradient_is_invariant_to_the_micro_batch_size(tiny_run, tmp_path):
    grads = micro_batch_gradients("toy_crd", (16, 1), tiny_run, tmp_path)
    assert grads[16].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[16], rtol=1e-4, atol=1e-7)


def test_crd_sampler_copies_theta_exactly_while_old_lags(tiny_run, tmp_path):
    cfg = load_config("toy_crd", overrides(tiny_run, "optim.lr=1e-2", out=tmp_path / "r"))
    trainer = Trainer(cfg, progress=False)
    old_before = params(trainer.policy.snapshots["old"]).clone()
    row = trainer.rl_step()
    theta = params(trainer.policy.core)
    assert row["train/optimizer_steps"] == 2 and row["train/decay_sampler"] == 0.0
    assert torch.equal(params(trainer.policy.snapshots["sampler"]), theta)
    # crd_old after 2 optimizer steps: d = 0.25 + 0.005 * 2 = 0.26.
    torch.testing.assert_close(params(trainer.policy.snapshots["old"]), 0.26 * old_before + 0.74 * theta,
                               rtol=1e-5, atol=1e-6)
    trainer.reward.close()


# ------------------------------------------------------------------------------------------------------ RFT
def test_best_of_group_selection():
    rewards = torch.tensor([0.1, 0.9, 0.9, 0.2, 0.5, 0.5, 0.5, 0.5, 0.3, 0.7, 0.1, 0.6], dtype=F64)
    groups = torch.arange(3).repeat_interleave(4)
    keep = best_of_group(rewards, groups, top_k=1)
    assert keep.nonzero().flatten().tolist() == [1, 9]  # tie -> lower index; the flat group keeps nothing
    keep = best_of_group(rewards, groups, top_k=2, skip_flat_groups=False)
    assert keep.nonzero().flatten().tolist() == [1, 2, 4, 5, 9, 11]
    keep = best_of_group(rewards, groups, top_fraction=0.5)
    assert keep.nonzero().flatten().tolist() == [1, 2, 9, 11]
    keep = best_of_group(rewards, groups, top_k=2, skip_flat_groups=False, min_reward=0.6)
    assert keep.nonzero().flatten().tolist() == [1, 2, 9, 11]


def test_rft_trains_only_the_best_samples_and_rejects_keeping_everything(tiny_run, tmp_path):
    cfg = load_config("toy_rft", overrides(tiny_run, "algo.top_k=2", "algo.kl_beta=0.1", "algo.min_reward=null",
                                           out=tmp_path / "r"))
    trainer = Trainer(cfg, progress=False)
    assert trainer.algo.rollout.snapshot == "theta" and set(trainer.algo.snapshots) == {"ref"}
    batch = trainer.collect()
    items = trainer.algo.training_items(batch, torch.arange(8), 4, trainer.generators["train"])
    kept = torch.unique(torch.cat([i.index for i in items]))
    assert torch.equal(kept, best_of_group(batch.rewards, batch.group_ids, 2).nonzero().flatten())
    assert sum(len(i.index) for i in items) == len(kept) * 2  # two training times each
    # An optimizer step whose share holds no kept sample trains nothing, but still runs one backward (a collective
    # under DDP): a placeholder item with an exactly zero loss and gradient.
    empty = torch.tensor([i for i in range(8) if i not in kept.tolist()])
    trainer.optimizer.zero_grad(set_to_none=True)
    metrics = trainer.accumulate_gradients(batch, empty)
    assert metrics == {"loss": 0.0}
    grad = flat_grad(trainer)
    assert torch.equal(grad, torch.zeros_like(grad))
    with pytest.raises(ConfigError, match="'algo.top_k': keeping 4 of 4 images per prompt rejects nothing"):
        load_config("toy_rft", overrides(tiny_run, "algo.top_k=4", out=tmp_path / "r"))
    trainer.reward.close()


def _as_process(batch, lo, hi):
    """The view a process holding images [lo, hi) of the step gets: its slice, plus the whole step's scores."""
    return dataclasses.replace(
        batch, x0=batch.x0[lo:hi], cond=batch.cond[lo:hi], prompts=batch.prompts[lo:hi],
        metadata=batch.metadata[lo:hi], group_ids=batch.group_ids[lo:hi], rewards=batch.rewards[lo:hi],
        advantages=batch.advantages[lo:hi], reward_components={k: v[lo:hi] for k, v in batch.reward_components.items()},
        step_scores={"reward": batch.rewards}, step_group_ids=batch.group_ids, step_offset=lo)


def _kept(items, offset=0):
    return [int(i) + offset for item in items if not item.placeholder for i in item.index.unique()]


def test_group_statistics_of_a_prompt_group_split_between_processes_equal_one_process(tiny_run, tmp_path):
    """Under multi-process training a process may hold part of a prompt group (here 2 prompts x 4 images cut 6 | 2):
    elbo_pg's centered advantage and rft's best-of-group selection are computed over the whole step, so each
    process gets exactly its slice of what one process holding every image computes."""
    for config, extra in (("toy_rft", ("algo.min_reward=null", "algo.skip_flat_groups=false")),
                          ("toy_elbo_pg", ("algo.advantage=centered_0.1",))):
        trainer = Trainer(load_config(config, overrides(tiny_run, *extra, out=tmp_path / config)), progress=False)
        batch = trainer.collect()
        assert batch.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
        # Prompt 1's best image is its first, which lives on the first process.
        batch.rewards = torch.tensor([0.1, 0.4, 0.2, 0.3, 0.9, 0.5, 0.7, 0.6], dtype=F64)
        batch.step_scores = {"reward": batch.rewards}
        first, second = _as_process(batch, 0, 6), _as_process(batch, 6, 8)
        if config == "toy_elbo_pg":
            whole = trainer.algo.advantages(batch)
            assert torch.equal(torch.cat([trainer.algo.advantages(first), trainer.algo.advantages(second)]), whole)
            assert whole[6:].tolist() == pytest.approx([0.1 * (0.7 - 0.675), 0.1 * (0.6 - 0.675)])
            # Centred on its own part (mean 0.65) instead, the second process would get other advantages.
            local = group_mean_centered(second.rewards, second.group_ids, trainer.algo.advantage_scale)
            assert not torch.allclose(local, whole[6:])
        else:
            g = trainer.generators["train"]
            assert _kept(trainer.algo.training_items(batch, torch.arange(8), 4, g)) == [1, 4]
            assert _kept(trainer.algo.training_items(first, torch.arange(6), 4, g)) == [1, 4]
            # The second process keeps nothing (its images 6 and 7 are not prompt 1's best): a placeholder item.
            assert _kept(trainer.algo.training_items(second, torch.arange(2), 4, g), offset=6) == []
        trainer.reward.close()


def test_presets_reject_more_grid_times_than_the_grid_has(tiny_run, tmp_path):
    for config in ("toy_awm", "toy_crd"):
        with pytest.raises(ConfigError, match="'algo.num_train_times': 4 times per sample"):
            load_config(config, overrides(tiny_run, out=tmp_path / "r", times=4))


# ------------------------------------------------------------------------------------- the SD3.5 presets' times
def sd3_overrides(tiny_sd3, out, *extra):
    return ["model.backend=sd3", f"model.path={tiny_sd3}", f"output_dir={out}", "train.threads=1",
            "rollout.prompts_per_step=2", "rollout.images_per_prompt=4", "rollout.chunk_size=4",
            "rollout.sampler.shift=3.0", "eval.sampler.num_steps=2", "eval.images_per_prompt=1", "eval.every=-1",
            "checkpoint.every=0", "reward.components.test_brightness=1.0", "optim.lr=1e-2",
            "algo.time_distribution=stratified_index", *extra]


@pytest.mark.slow
def test_awm_and_crd_train_on_the_sd3_backend_at_their_presets_times(tiny_sd3, tmp_path):
    """One RL step each on the tiny SD3 with awm_sd35m_geneval's and crd_sd35m_*'s time settings (14 and 10 Euler
    steps, shift 3): AWM's items hold one sample (micro-batch 6 = 1 x 6 times) at indices 1..11, CRD's the port's
    fixed indices; both move the LoRA weights."""
    for config, extra, check in (
        ("toy_awm", ("rollout.sampler.num_steps=14", "algo.num_train_times=6", "algo.time_index_range=[1,12]",
                     "algo.time_draw=micro_batch", "train.micro_batch_size=6"),
         lambda grid, t: set(grid.tolist().index(v) for v in t.flatten().tolist()) <= set(range(1, 12))),
        ("toy_crd", ("rollout.sampler.num_steps=10", "algo.num_train_times=20", "algo.time_index_range=[0,8]",
                     "train.micro_batch_size=4", "algo.ref_cfg_scale=2.0"),
         lambda grid, t: torch.equal(t[:, 0], grid[[0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6, 6, 7, 7]])),
    ):
        trainer = Trainer(load_config(config, sd3_overrides(tiny_sd3, tmp_path / config, *extra)), progress=False)
        batch = trainer.collect()
        items = trainer.algo.training_items(batch, torch.arange(8), trainer.cfg.train.micro_batch_size,
                                            torch.Generator().manual_seed(0))
        times = torch.stack([item.data["t"] for item in items], dim=-1) if config == "toy_awm" else \
            torch.cat([item.data["t"] for item in items]).reshape(20, 8)
        assert check(batch.sigmas.to(times.dtype), times)
        theta0 = {k: p.detach().clone() for k, p in trainer.policy.lora.params().items()}
        row = trainer.rl_step()
        assert row["train/grad_norm"] > 0
        theta = trainer.policy.lora.params()
        assert max((theta[k] - theta0[k]).abs().max().item() for k in theta) > 1e-4
        trainer.reward.close()
