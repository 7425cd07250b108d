"""GRPO-Guard's pure loss by analytic identities (parity with the released code: tests/test_parity.py).

Every expected value comes from a closed form or Flow-GRPO's loss, never from these functions' output.
"""
from __future__ import annotations

import pytest
import torch

from diffrl_bench.algorithms.flow_grpo import grpo_loss
from diffrl_bench.algorithms.grpo_guard import grpo_guard_loss, guard_ratio

D = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _guard_inputs(seed=0, batch=5, shape=(4, 3, 3)):
    g = _gen(seed)
    log_prob = torch.randn(batch, generator=g, dtype=D)
    mean = torch.randn(batch, *shape, generator=g, dtype=D)
    std = 0.5 + torch.rand(batch, generator=g, dtype=D)
    sqrt_dt = 0.1 + 0.3 * torch.rand(batch, generator=g, dtype=D)
    adv = 3 * torch.randn(batch, generator=g, dtype=D)
    return log_prob, mean, std, sqrt_dt, adv


def test_guard_on_policy_loss_is_the_reweighted_mean_advantage():
    log_prob, mean, std, sqrt_dt, adv = _guard_inputs()
    adv[0] = 9.0  # beyond the clip, so the clamp is part of the closed form
    lp = log_prob.clone().requires_grad_(True)
    loss, m = grpo_guard_loss(lp, log_prob, adv, mean=mean, old_mean=mean.clone(), std=std, sqrt_dt=sqrt_dt,
                              clip_range=2e-6, adv_clip_max=5.0)
    a = adv.clamp(-5, 5)
    d, s = sqrt_dt.mean(), std.mean()
    assert torch.equal(m["ratio"], torch.ones(5, dtype=D))
    assert m["ratio_mean_bias"] == 0
    assert torch.allclose(loss, -a.mean() / d**2, rtol=1e-12, atol=0)
    # d ratio / d log p = d s at ratio 1, so the gradient is -A d s / (B d^2) = -A s / (B d)
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.allclose(grad, -a * s / (5 * d), rtol=1e-12, atol=0)


def test_guard_bias_is_one_number_for_the_whole_micro_batch():
    log_prob, mean, std, sqrt_dt, _ = _guard_inputs(1)
    old_mean = mean.clone()
    c = 0.01
    mean = mean.clone()
    mean[0] += c  # only sample 0's mean moved
    ratio, bias, s, d = guard_ratio(log_prob, log_prob, mean, old_mean, std, sqrt_dt)
    expected_bias = (c**2 / 5) / (2 * (sqrt_dt.mean() * std.mean()) ** 2)  # c^2 on 1/5 of all elements
    assert torch.allclose(bias, expected_bias, rtol=1e-12, atol=0)
    # every sample gets the same shift, not only the one that moved
    assert torch.allclose(ratio, torch.full((5,), float(torch.exp(expected_bias * d * s)), dtype=D), rtol=1e-12)


def test_guard_fully_clipped_batch_has_no_log_prob_gradient():
    log_prob, mean, std, sqrt_dt, _ = _guard_inputs(2)
    adv = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=D)
    # log-ratio so large that the normalised ratio is far above 1 + eps for these positive advantages
    lp = (log_prob + 1.0 / (sqrt_dt.mean() * std.mean())).requires_grad_(True)
    loss, m = grpo_guard_loss(lp, log_prob, adv, mean=mean, old_mean=mean, std=std, sqrt_dt=sqrt_dt,
                              clip_range=1e-4)
    assert float(m["clipfrac_gt_one"]) == 1.0
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_guard_kl_is_the_flow_grpo_gaussian_kl():
    log_prob, mean, std, sqrt_dt, adv = _guard_inputs(3)
    c = 0.02
    loss, m = grpo_guard_loss(log_prob, log_prob, adv, mean=mean, old_mean=mean, std=std, sqrt_dt=sqrt_dt,
                              clip_range=2e-6, beta=0.04, ref_mean=mean - c)
    assert torch.allclose(m["kl_loss"], (c**2 / (2 * std**2)).mean(), rtol=1e-12, atol=0)
    assert torch.allclose(loss, m["policy_loss"] + 0.04 * m["kl_loss"], rtol=1e-14, atol=0)


def test_guard_without_rationorm_is_flow_grpo():
    log_prob, mean, std, sqrt_dt, adv = _guard_inputs(4)
    old = log_prob + 1e-4 * torch.randn(5, generator=_gen(9), dtype=D)
    ours, _ = grpo_guard_loss(log_prob, old, adv, mean=mean, old_mean=mean + 1.0, std=std, sqrt_dt=sqrt_dt,
                              clip_range=1e-4, rationorm=False)
    flow, _ = grpo_loss(log_prob, old, adv, clip_range=1e-4)
    assert torch.equal(ours, flow)


def test_guard_needs_ref_mean_for_kl():
    log_prob, mean, std, sqrt_dt, adv = _guard_inputs()
    with pytest.raises(ValueError, match="ref_mean"):
        grpo_guard_loss(log_prob, log_prob, adv, mean=mean, old_mean=mean, std=std, sqrt_dt=sqrt_dt,
                        clip_range=2e-6, beta=0.1)


def test_grpo_guard_drops_zero_advantage_samples_as_its_script_does_unless_kept():
    """GRPO-Guard's script keeps Flow-GRPO's filter: a prompt group whose rewards are all equal is not trained."""
    from diffrl_bench.advantages import group_advantages
    from diffrl_bench.algorithm import RolloutBatch
    from diffrl_bench.algorithms.grpo_guard import GRPOGuard, GRPOGuardConfig
    from diffrl_bench.sampling import Transitions, flow_sigmas

    B, R = 6, 2
    g = torch.Generator().manual_seed(0)
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.1, 0.9, 0.4], dtype=torch.float64)  # group 0: all equal
    group_ids = torch.arange(B) // 3
    advantages = group_advantages(rewards, group_ids, std="group")
    transitions = Transitions(latents=torch.randn(R + 1, B, 1, 4, 4, generator=g),
                              steps=torch.arange(R)[:, None].expand(R, B), log_probs=torch.zeros(R, B),
                              means=torch.randn(R, B, 1, 4, 4, generator=g))
    batch = RolloutBatch(x0=None, cond=None, prompts=["p"] * B, metadata=[{}] * B, group_ids=group_ids,
                         rewards=rewards, advantages=advantages, reward_components={}, sigmas=flow_sigmas(4),
                         sampler_options={"noise_level": 0.7, "sde_type": "sde"}, transitions=transitions)

    def trained(keep):
        items = GRPOGuard(GRPOGuardConfig(keep_zero_advantage=keep)).training_items(batch, torch.arange(B), 4, g)
        return {int(i) for item in items if not item.placeholder for i in item.index}

    assert trained(False) == {3, 4, 5}
    assert trained(True) == set(range(6))
