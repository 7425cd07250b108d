"""Flow-DPPO's pure pieces by analytic identities (parity with UniRL: tests/test_parity.py).

Every expected value comes from a closed form, torch.distributions, numpy or Flow-GRPO's SDE step, never from
these functions' output.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffrl_bench.algorithms.flow_dppo import (dppo_advantages, dppo_loss, dppo_mask, dppo_sigma_t,
                                            gaussian_mean_kl)
from diffrl_bench.sde import sde_step_logprob
from diffrl_bench.sampling import flow_sigmas

D = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_gaussian_mean_kl_is_the_kl_of_two_gaussians():
    g = _gen(5)
    new, old = torch.randn(3, 2, 4, 5, 5, generator=g, dtype=D), torch.randn(3, 2, 4, 5, 5, generator=g, dtype=D)
    sigma_t = torch.tensor([0.3, 0.7], dtype=D)
    s = sigma_t.reshape(1, 2, 1, 1, 1).expand_as(new)
    reference = torch.distributions.kl_divergence(torch.distributions.Normal(new, s),
                                                  torch.distributions.Normal(old, s)).mean(dim=(2, 3, 4))
    assert torch.allclose(gaussian_mean_kl(new, old, sigma_t), reference, rtol=1e-12, atol=0)


def test_dppo_sigma_t_is_the_sde_step_std_except_the_clamped_first_step():
    sigmas = flow_sigmas(10, 3.0)
    steps = torch.arange(10)
    ours = dppo_sigma_t(sigmas, steps, 0.7)
    assert ours.dtype == torch.float32
    # Flow-GRPO's SDE step, an independent implementation: the transition std is std_dev_t * sqrt(-dt)
    x = torch.zeros(10, 2, 2, 2)
    step = sde_step_logprob(x, x, sigmas[steps], sigmas[steps + 1], sigmas[1], noise_level=0.7,
                            prev_sample=x)
    transition_std = (step.std * step.sqrt_neg_dt)
    assert torch.allclose(ours[1:], transition_std[1:], rtol=1e-6, atol=0)
    # at sigma = 1 the original uses min(sigma, 0.99): sqrt(1 / 0.01) = 10
    assert math.isclose(float(ours[0]), 10 * 0.7 * math.sqrt(1 - float(sigmas[1])), rel_tol=1e-6)
    assert float(ours[0]) > 1.9 * float(transition_std[0])
    assert torch.equal(dppo_sigma_t(sigmas, steps, 0.7, add_kl_coefficient=False), torch.ones(10))


def _dppo_case(kl_scale, seed=6, b=4, s=3):
    g = _gen(seed)
    old_means = torch.randn(b, s, 2, 3, 3, generator=g, dtype=D)
    new_means = old_means + kl_scale * torch.randn(b, s, 2, 3, 3, generator=g, dtype=D)
    old_logp = torch.randn(b, s, generator=g, dtype=D)
    new_logp = old_logp + 0.05 * torch.randn(b, s, generator=g, dtype=D)
    adv = torch.tensor([1.5, -0.7, 0.0, -2.0], dtype=D)[:b]
    return new_logp, old_logp, adv, new_means, old_means


def test_dppo_keeps_every_element_inside_the_trust_region():
    new_logp, old_logp, adv, new_means, old_means = _dppo_case(kl_scale=1e-5)
    lp = new_logp.clone().requires_grad_(True)
    loss, m = dppo_loss(lp, old_logp, adv, new_means=new_means, old_means=old_means, sigma_t=torch.ones(3),
                        kl_threshold=1e-5)
    assert float(m["kl_new_old_max"]) < 1e-5
    assert bool(m["keep_mask"].all()) and float(m["masked_fraction"]) == 0.0
    ratio = torch.exp(new_logp - old_logp)
    assert torch.allclose(loss, (-adv.reshape(-1, 1) * ratio).mean(), rtol=1e-13, atol=0)
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.allclose(grad, -adv.reshape(-1, 1) * ratio / 12, rtol=1e-13, atol=0)


def test_dppo_outside_the_region_masks_only_moves_further_in_the_advantage_direction():
    new_logp, old_logp, adv, new_means, old_means = _dppo_case(kl_scale=1.0)
    lp = new_logp.clone().requires_grad_(True)
    loss, m = dppo_loss(lp, old_logp, adv, new_means=new_means, old_means=old_means, sigma_t=torch.ones(3),
                        kl_threshold=1e-5)
    assert float(m["kl_per_sample"].min()) > 1e-5
    ratio = torch.exp(new_logp - old_logp)
    a = adv.reshape(-1, 1).expand_as(ratio)
    aggressive = ((ratio > 1) & (a > 0)) | ((ratio < 1) & (a < 0))
    assert torch.equal(m["keep_mask"].bool(), ~aggressive)
    assert bool(aggressive.any()) and bool((~aggressive & (a != 0)).any())  # both kinds present
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.equal(grad[aggressive], torch.zeros_like(grad[aggressive]))
    assert torch.allclose(grad[~aggressive], (-a * ratio / 12)[~aggressive], rtol=1e-13, atol=0)


def test_dppo_mask_threshold_is_strict_and_ratio_one_or_zero_advantage_stay():
    kl = torch.tensor([2.0**-17, 1.0, 1.0, 1.0, 1.0], dtype=D)
    ratio = torch.tensor([1.01, 1.0, 1.01, 0.99, 0.99], dtype=D)
    adv = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0], dtype=D)
    masks = dppo_mask(kl, ratio, adv, kl_threshold=2.0**-17)
    assert masks["kl_mask"].tolist() == [False] * 5  # kl == tau is outside
    assert masks["keep_mask"].tolist() == [False, True, True, True, True]


def test_dppo_means_get_no_gradient():
    new_logp, old_logp, adv, new_means, old_means = _dppo_case(kl_scale=1.0)
    means = new_means.clone().requires_grad_(True)
    loss, _ = dppo_loss(new_logp.clone().requires_grad_(True), old_logp, adv, new_means=means, old_means=old_means,
                        sigma_t=torch.ones(3))
    (grad,) = torch.autograd.grad(loss, means, allow_unused=True)
    assert grad is None


def test_dppo_one_step_items_average_to_the_multi_step_loss():
    new_logp, old_logp, adv, new_means, old_means = _dppo_case(kl_scale=0.003)
    sigma_t = torch.tensor([0.2, 0.3, 0.4], dtype=D)
    whole, _ = dppo_loss(new_logp, old_logp, adv, new_means=new_means, old_means=old_means, sigma_t=sigma_t)
    per_step = [dppo_loss(new_logp[:, k], old_logp[:, k], adv, new_means=new_means[:, k],
                          old_means=old_means[:, k], sigma_t=sigma_t[k])[0] for k in range(3)]
    assert torch.allclose(whole, torch.stack(per_step).mean(), rtol=1e-13, atol=0)


def test_dppo_advantages_recipe_matches_a_numpy_computation():
    g = _gen(7)
    rewards = torch.rand(12, generator=g, dtype=D)
    rewards[4:8] = 0.25  # a zero-variance group
    groups = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    r = rewards.numpy()
    means = np.repeat(r.reshape(3, 4).mean(1), 4)
    expected = (r - means) / (np.std(r, ddof=1) + 1e-8)
    ours = dppo_advantages(rewards, groups)
    assert np.allclose(ours.numpy(), expected, rtol=1e-12, atol=1e-15)
    assert torch.equal(ours[4:8], torch.zeros(4, dtype=D))


def test_dppo_advantages_group_std_is_eps_inside_the_sqrt_and_label_order_free():
    g = _gen(8)
    rewards = torch.rand(9, generator=g, dtype=D)
    groups = torch.tensor([0, 1, 2] * 3)  # interleaved
    ours = dppo_advantages(rewards, groups, use_global_std=False, eps=1e-8)
    for k in range(3):
        r = rewards[groups == k].numpy()
        expected = (r - r.mean()) / np.sqrt(r.var() + 1e-8)
        assert np.allclose(ours[groups == k].numpy(), expected, rtol=1e-12, atol=1e-15)


def test_dppo_advantages_global_scope_and_affine_invariance():
    g = _gen(9)
    rewards = torch.rand(10, generator=g, dtype=D)
    groups = torch.arange(10) // 5
    adv = dppo_advantages(rewards, groups, scope="global", eps=0.0)
    assert math.isclose(float(adv.sum()), 0.0, abs_tol=1e-12)
    assert math.isclose(float(adv.std()), 1.0, rel_tol=1e-12)
    for kw in ({}, {"use_global_std": False, "eps": 0.0}, {"scope": "global", "eps": 0.0}):
        a1 = dppo_advantages(rewards, groups, **kw)
        a2 = dppo_advantages(3.0 * rewards - 7.0, groups, **kw)
        assert torch.allclose(a1, a2, rtol=1e-6, atol=1e-9)
    assert torch.allclose(dppo_advantages(rewards, groups, normalize=False),
                          rewards - torch.repeat_interleave(rewards.reshape(2, 5).mean(1), 5), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="scope"):
        dppo_advantages(rewards, groups, scope="batch")
