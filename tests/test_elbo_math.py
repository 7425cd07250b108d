"""ELBO-PG as its authors run it (jaemoo-choi/rethinking-diffusion-rl@c2570002): the `exact` weighting's offset, the
guidance divisor of the adaptive and uniform ELBOs, the coupled advantage, advantages clipped only inside grpo, and
x_t taken from the rollout's stored latents. Every expected value below follows from the formulas, not from a run."""
from types import SimpleNamespace

import pytest
import torch

from diffrl_bench.algorithm import OptionError, RolloutBatch
from diffrl_bench.algorithms.estimators import ESTIMATORS, guidance_divisor
from diffrl_bench.algorithms.forward_items import forward_process_items, noise_from_latent
from diffrl_bench.algorithms.objectives import OBJECTIVES, advantage_scale, parse_advantage
from diffrl_bench.algorithms.policy_gradient import (ELBOPGConfig, ELBOPolicyGradient, elbo_pg_loss,
                                                     forward_estimates, original_loss_terms, stored_latents)

F64 = torch.float64


def straight_path(B=4, chw=(2, 3, 3), seed=0, t=None):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *chw, generator=g, dtype=F64)
    eps = torch.randn(B, *chw, generator=g, dtype=F64)
    t = torch.rand(B, generator=g, dtype=F64) * 0.8 + 0.1 if t is None else torch.as_tensor(t, dtype=F64)
    x_t = (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * eps
    return x0, eps, t, x_t


# ------------------------------------------------------------------------------------------------ exact weighting
def test_exact_weighting_has_the_originals_offset():
    # v = v* + c everywhere: the matching error is exactly c^2, so the estimate is -w(t) c^2.
    x0, eps, t, x_t = straight_path(t=[1.0, 0.001, 0.5, 0.0])
    c = 0.5
    v = eps - x0 + c
    got = ESTIMATORS.get("elbo_exact")(v, x_t, x0, eps, t)
    expected_weight = torch.tensor([0.0, 0.999 / 0.002, 0.5 / 0.501, 1.0 / 0.001], dtype=F64)
    torch.testing.assert_close(got, -expected_weight * c ** 2)
    assert got[0] == 0.0                       # t = 1: nothing to learn at pure noise
    assert torch.isfinite(got).all()           # t = 0 is finite (weight 1000), unlike (1 - t) / t
    assert got[1] == pytest.approx(-499.5 * 0.25)


# ------------------------------------------------------------------------------------------------ guidance divisor
def guided(v_uncond, v_text, g):
    return v_uncond + g * (v_text - v_uncond)


@pytest.mark.parametrize("name,power", [("elbo_adaptive", 1), ("elbo_uniform", 2), ("elbo_t2", 0),
                                        ("elbo_exact", 0), ("fm_ghuber", 0)])
def test_guidance_divisor_powers(name, power):
    assert guidance_divisor(ESTIMATORS.get(name), 3.0) == 3.0 ** power
    assert guidance_divisor(ESTIMATORS.get(name), 1.0) == 1.0
    with pytest.raises(ValueError, match="guidance_scale must be positive"):
        guidance_divisor(ESTIMATORS.get(name), 0.0)


@pytest.mark.parametrize("name", ["elbo_adaptive", "elbo_uniform"])
def test_divided_estimates_do_not_grow_with_the_guidance(name):
    """With the unconditional branch exact (u = v*) and the text branch off by d, the guided error is G d: the
    adaptive ELBO grows like G and the uniform one like G^2, so after the divisor they are the same for every G."""
    x0, eps, t, x_t = straight_path(seed=1)
    d = 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    u = eps - x0
    est = ESTIMATORS.get(name)
    values = {}
    for g in (1.0, 2.0, 4.5):
        v = guided(u, u + d, g)
        raw = est(v, x_t, x0, eps, t)
        e_theta, e_old = forward_estimates(est, v, v, x_t, x0, eps, t, theta_cfg_scale=g)
        values[g] = e_theta
        torch.testing.assert_close(e_theta, raw / g ** (1 if name == "elbo_adaptive" else 2))
        assert torch.equal(e_theta.detach(), e_old)
    torch.testing.assert_close(values[4.5], values[1.0])
    torch.testing.assert_close(values[2.0], values[1.0])


def test_old_estimate_is_divided_by_the_training_guidance_not_its_own():
    x0, eps, t, x_t = straight_path(seed=3)
    est = ESTIMATORS.get("elbo_uniform")
    v_theta = eps - x0 + 0.2
    v_old = eps - x0 + 0.3      # made with some other (sampling) guidance; the divisor is still the training one
    e_theta, e_old = forward_estimates(est, v_theta, v_old, x_t, x0, eps, t, theta_cfg_scale=2.0)
    torch.testing.assert_close(e_old, torch.full_like(e_old, -0.09 / 4.0))
    torch.testing.assert_close(e_theta, torch.full_like(e_theta, -0.04 / 4.0))


def test_snapshot_guidance_follows_the_original():
    """theta at train G, old at the rollout's G unless set, ref at ref G; guidance 1 is left out (one call)."""
    algo = ELBOPolicyGradient(ELBOPGConfig(theta_cfg_scale=4.5, ref_cfg_scale=4.5))
    assert algo.snapshot_guidance(SimpleNamespace(cfg_scale=4.5)) == {"theta": 4.5, "old": 4.5, "ref": 4.5}
    assert algo.snapshot_guidance(SimpleNamespace(cfg_scale=1.0)) == {"theta": 4.5, "ref": 4.5}
    algo = ELBOPolicyGradient(ELBOPGConfig(old_cfg_scale=3.0, kl_beta=0.0))
    assert algo.snapshot_guidance(SimpleNamespace(cfg_scale=4.5)) == {"old": 3.0}


# ------------------------------------------------------------------------------------------------ advantages
def batch_of(rewards, group_ids, advantages=None, **extra):
    rewards = torch.tensor(rewards, dtype=F64)
    return RolloutBatch(x0=extra.pop("x0", None), cond=None, prompts=[""] * len(rewards),
                        metadata=[{}] * len(rewards), group_ids=torch.tensor(group_ids),
                        rewards=rewards, advantages=torch.tensor(advantages if advantages is not None else
                                                                 [0.0] * len(rewards), dtype=F64),
                        reward_components={}, sigmas=extra.pop("sigmas", torch.tensor([1.0, 0.0])), **extra)


def test_coupled_advantage_is_beta_over_alpha_times_the_centred_reward():
    assert parse_advantage("coupled_0.001") == ("coupled", 0.001)
    assert advantage_scale("coupled", 1e-3, 1e-4) == pytest.approx(0.1)
    batch = batch_of([1.0, 0.0, 0.5, 0.5, 0.9], [0, 0, 1, 1, 0])
    centred = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.9], dtype=F64) - torch.tensor([1.9 / 3, 1.9 / 3, 0.5, 0.5, 1.9 / 3],
                                                                                 dtype=F64)
    for kl_beta in (1e-4, 4e-4):
        algo = ELBOPolicyGradient(ELBOPGConfig(advantage="coupled_0.001", kl_beta=kl_beta))
        torch.testing.assert_close(algo.advantages(batch), kl_beta / 1e-3 * centred)
    # The decoupled default does not move with the KL weight.
    for kl_beta in (1e-4, 4e-4):
        algo = ELBOPolicyGradient(ELBOPGConfig(advantage="centered_0.1", kl_beta=kl_beta))
        torch.testing.assert_close(algo.advantages(batch), 0.1 * centred)
    with pytest.raises(ValueError, match="needs kl_beta > 0"):
        ELBOPGConfig(advantage="coupled_0.001", kl_beta=0.0).validate()


def test_standard_advantages_reach_the_objective_unclipped_and_only_grpo_clips():
    batch = batch_of([0.0, 1.0, 2.0], [0, 0, 0], advantages=[7.0, -7.0, 1.0])
    algo = ELBOPolicyGradient(ELBOPGConfig(objective="pepg", advantage="standard"))
    assert algo.advantages(batch).tolist() == [7.0, -7.0, 1.0]
    assert ELBOPolicyGradient(ELBOPGConfig(advantage="standard_2")).advantages(batch).tolist() == [14.0, -14.0, 2.0]
    adv = algo.advantages(batch)
    e_old = torch.tensor([-1.0, -2.0, -3.0], dtype=F64)
    for name, expected in (("grpo", [-5.0, 5.0, -1.0]), ("epg", [-7.0, 7.0, -1.0])):
        e_theta = e_old.clone().requires_grad_(True)   # ratio exactly 1: d loss / d e = -A' / N
        loss, _ = elbo_pg_loss(OBJECTIVES.get(name), e_theta, e_old, adv, None, None, use_ratio=True,
                               clip_range=1e-3, adv_clip_max=5.0, kl_beta=0.0)
        (grad,) = torch.autograd.grad(loss, e_theta)
        torch.testing.assert_close(grad, torch.tensor(expected, dtype=F64) / 3)


# ------------------------------------------------------------------------------------------------ x_t from latents
def test_noise_from_latent_inverts_the_straight_path():
    x0, eps, t, x_t = straight_path(seed=4)
    torch.testing.assert_close(noise_from_latent(x_t, x0, t), eps)
    # t = 0: the original divides by 1e-6, not by 0.
    z = torch.ones(1, 1, 1, 1, dtype=F64)
    assert noise_from_latent(2 * z, z, torch.zeros(1, dtype=F64)).item() == pytest.approx(1e6)


def latent_batch(B=3, chw=(1, 2, 2)):
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64)
    # trajectory[k, i] is filled with 10 k + i, so a latent names its own step and sample.
    trajectory = (10 * torch.arange(5, dtype=F64).reshape(5, 1) + torch.arange(B, dtype=F64)).reshape(5, B, 1, 1, 1)
    trajectory = trajectory.expand(5, B, *chw).contiguous()
    x0 = torch.randn(B, *chw, generator=torch.Generator().manual_seed(5), dtype=F64)
    return batch_of([0.0, 1.0, 0.5][:B], [0] * B, x0=x0, sigmas=sigmas, trajectory=trajectory)


def test_stored_latents_are_the_trajectory_at_the_training_time():
    batch = latent_batch()
    times = torch.tensor([[0.5, 1.0, 0.25], [0.75, 0.5, 1.0]], dtype=F64)
    latents = stored_latents(batch, torch.tensor([2, 0, 1]), times)
    step = {1.0: 0, 0.75: 1, 0.5: 2, 0.25: 3}
    for k in range(2):
        for j, sample in enumerate((2, 0, 1)):
            assert torch.all(latents[k, j] == 10 * step[float(times[k, j])] + sample)
    with pytest.raises(ValueError, match="not a point of the rollout grid"):
        stored_latents(batch, torch.tensor([0, 1, 2]), torch.full((1, 3), 0.6, dtype=F64))


def test_latent_items_train_on_the_stored_latent_with_back_solved_noise():
    batch = latent_batch()
    algo = ELBOPolicyGradient(ELBOPGConfig(xt_source="latents", num_train_times=2))
    assert algo.rollout.keep_trajectory
    items = algo.training_items(batch, torch.arange(3), 4, torch.Generator().manual_seed(0))
    step = {1.0: 0, 0.75: 1, 0.5: 2, 0.25: 3}
    seen = 0
    for item in items:
        for j in range(len(item.index)):
            t, i = float(item.sigma[j]), int(item.index[j])
            assert torch.all(item.x[j] == 10 * step[t] + i)
            torch.testing.assert_close((1 - t) * item.data["x0"][j] + t * item.data["eps"][j], item.x[j])
            seen += 1
    assert seen == 6
    # With fresh forward noise the same items are not the stored latents.
    fresh = ELBOPolicyGradient(ELBOPGConfig(num_train_times=2)).training_items(
        batch, torch.arange(3), 4, torch.Generator().manual_seed(0))
    assert not any(torch.equal(a.x, b.x) for a, b in zip(items, fresh))


def test_latents_need_grid_times_and_a_forward_estimator():
    run = SimpleNamespace(rollout=SimpleNamespace(sampler=SimpleNamespace(name="dpm2", num_steps=10)))
    ELBOPolicyGradient.check_run(ELBOPGConfig(xt_source="latents"), run)
    with pytest.raises(OptionError, match="latents are stored at the rollout grid's times") as error:
        ELBOPolicyGradient.check_run(ELBOPGConfig(xt_source="latents", time_distribution="uniform"), run)
    assert error.value.key == "xt_source"
    with pytest.raises(OptionError, match="'noise' is not one of") as error:
        ELBOPGConfig(xt_source="noise").validate()
    assert error.value.key == "xt_source"
    items = forward_process_items(torch.zeros(2, 1, 2, 2), torch.arange(2), torch.full((1, 2), 0.5),
                                  torch.Generator().manual_seed(0), 2, ("theta",))
    with pytest.raises(ValueError, match="do not match"):
        forward_process_items(torch.zeros(2, 1, 2, 2), torch.arange(2), torch.full((1, 2), 0.5),
                              torch.Generator().manual_seed(0), 2, ("theta",), latents=torch.zeros(2, 2, 1, 2, 2))
    assert torch.all(items[0].x == 0.5 * items[0].data["eps"])


# ------------------------------------------------------------------------------------------------ logged terms
def test_original_loss_terms_identities():
    e = torch.tensor([-1.0, -2.0, -0.5], dtype=F64)
    adv = torch.tensor([0.3, -0.1, 0.2], dtype=F64)
    v_theta = torch.zeros(3, 1, 2, 2, dtype=F64)
    v_ref = torch.full((3, 1, 2, 2), 3.0, dtype=F64)
    terms = original_loss_terms(e, e, adv, torch.tensor(0.7), torch.tensor(-0.9), kl_beta=0.01, theta_cfg_scale=3.0,
                                x0=torch.full((3, 1, 2, 2), 2.0, dtype=F64), v_theta=v_theta, v_old=v_theta,
                                v_ref=v_ref)
    # theta == old: the PEPG weight is A itself, so its cosine with A is 1 and there is no correction term.
    assert terms["policy_dir_cosine_adv"] == pytest.approx(1.0, abs=1e-6)
    assert terms["correction_term_mean"] == 0 and terms["elbo_diff_std"] == 0 and terms["old_deviate"] == 0
    assert terms["kl_div"] == 9.0 and terms["kl_div_cfg_normalized"] == 1.0 and terms["old_kl_div"] == 9.0
    assert terms["kl_term_weighted_abs"] == pytest.approx(0.09) and terms["x0_norm"] == 4.0
    assert terms["total_loss"] == pytest.approx(-0.9) and terms["policy_loss_abs"] == pytest.approx(0.7)
    assert terms["adv_elbo_mean"] == pytest.approx((-0.3 + 0.2 - 0.1) / 3)
    # Without x0 and the old velocity (trajectory estimator) those terms are left out.
    short = original_loss_terms(e, e, adv, torch.tensor(0.7), torch.tensor(-0.9), kl_beta=0.0, theta_cfg_scale=1.0)
    assert "x0_norm" not in short and "old_deviate" not in short and "kl_div" not in short


# ------------------------------------------------------------------------------------------------ through the harness
def test_latents_and_guided_theta_through_the_real_trainer(tiny_run, tmp_path):
    """The rollout keeps its trajectory, every training input is one of its latents at the item's time, and a
    guided theta and old cost two evaluations each (the ref stays unguided)."""
    from diffrl_bench.config import load_config
    from diffrl_bench.train import Trainer

    cfg = load_config("toy_elbo_pg", tiny_run("eval.every=-1", "checkpoint.every=0", "algo.xt_source=latents",
                                              "algo.theta_cfg_scale=2.0", "algo.old_cfg_scale=3.0",
                                              "algo.kl_beta=0.01", out=tmp_path / "r"))
    trainer = Trainer(cfg, progress=False)
    batch = trainer.collect()
    steps = cfg.rollout.sampler.num_steps
    assert batch.trajectory is not None and batch.trajectory.shape[0] == steps + 1
    items = trainer.algo.training_items(batch, torch.arange(8), 4, trainer.generators["train"])
    for item in items:
        assert item.snapshot_cfg == {"theta": 2.0, "old": 3.0}
        for j in range(len(item.index)):
            k = int((batch.sigmas.to(item.sigma) == item.sigma[j]).nonzero())
            assert 0 <= k < steps
            assert torch.equal(item.x[j], batch.trajectory[k, item.index[j]].to(item.x))
    before = trainer.ledger.nfe["train"]
    metrics = trainer.accumulate_gradients(batch, torch.arange(8))
    # 8 samples x 2 times x (theta 2 + old 2 + ref 1)
    assert trainer.ledger.nfe["train"] - before == 16 * 5
    assert metrics["kl_div"] > 0 and "forward_elbo_mean" in metrics and "x0_norm_max" in metrics
    trainer.reward.close()
