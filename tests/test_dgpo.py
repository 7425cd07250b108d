"""DGPO (algorithms/dgpo.py): the pure loss's identities and invariances, and what the plugin hands the harness.
Parity against the authors' code: tests/test_parity.py (dgpo_loss cases)."""
from __future__ import annotations

import pytest
import torch

from diffrl_bench.algorithm import OptionError, RolloutBatch
from diffrl_bench.algorithms.dgpo import DGPOAlgorithm, DGPOConfig, dgpo_group_weights, dgpo_loss
from diffrl_bench.sampling import dpm_flow_sigmas

D = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dgpo_inputs(seed=0, groups=(0, 0, 0, 1, 1, 1), shape=(2, 3, 3)):
    g = _gen(seed)
    b = len(groups)
    target = torch.randn(b, *shape, generator=g, dtype=D)
    v_theta = target + 0.3 * torch.randn(b, *shape, generator=g, dtype=D)
    v_ref = target + 0.3 * torch.randn(b, *shape, generator=g, dtype=D)
    adv = torch.randn(b, generator=g, dtype=D)
    return v_theta, target, v_ref, adv, torch.tensor(groups)


def test_dgpo_theta_equal_to_reference_gives_weight_one_half_and_closed_form_gradient():
    v_theta, target, _, adv, groups = _dgpo_inputs()
    v = v_theta.clone().requires_grad_(True)
    loss, m = dgpo_loss(v, target, adv, groups, v_ref=v_theta.clone(), clip_dsm=False, beta=0.0, group_size=3)
    assert torch.equal(m["group_weight"], torch.full((6,), 0.5, dtype=D))
    dsm = ((target - v_theta) ** 2).reshape(6, -1).mean(1)
    assert torch.allclose(loss, 0.5 * (adv * dsm).mean(), rtol=1e-13, atol=0)
    (grad,) = torch.autograd.grad(loss, v)
    n = v_theta[0].numel()
    expected = 0.5 * adv.reshape(-1, 1, 1, 1) * 2 * (v_theta - target) / n / 6
    assert torch.allclose(grad, expected, rtol=1e-12, atol=1e-15)


def test_dgpo_is_invariant_to_sample_order_and_group_labels():
    v_theta, target, v_ref, adv, groups = _dgpo_inputs(1)
    v_old = v_theta + 1e-3
    kw = dict(beta_dpo=100.0, group_size=3, clip_range=1e-2, beta=0.02)
    loss, m = dgpo_loss(v_theta, target, adv, groups, v_ref=v_ref, v_old=v_old, **kw)
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    relabel = torch.where(groups == 0, 7, 3)  # other labels, other sort order
    loss_p, m_p = dgpo_loss(v_theta[perm], target[perm], adv[perm], relabel[perm], v_ref=v_ref[perm],
                            v_old=v_old[perm], **kw)
    assert torch.allclose(loss, loss_p, rtol=1e-13, atol=0)
    assert torch.allclose(m["group_weight"][perm], m_p["group_weight"], rtol=1e-13, atol=0)


def test_dgpo_group_weight_depends_only_on_its_own_group_and_scales_with_group_size():
    v_theta, target, v_ref, adv, groups = _dgpo_inputs(2)
    dsm = ((target - v_theta) ** 2).reshape(6, -1).mean(1)
    ref_dsm = ((target - v_ref) ** 2).reshape(6, -1).mean(1)
    logit, weight = dgpo_group_weights(dsm, ref_dsm, adv, groups, beta_dpo=10.0, group_size=3)
    dsm2 = dsm.clone()
    dsm2[4] += 1.0  # a member of group 1 changes
    logit2, _ = dgpo_group_weights(dsm2, ref_dsm, adv, groups, beta_dpo=10.0, group_size=3)
    assert torch.equal(logit2[:3], logit[:3])
    assert not torch.equal(logit2[3:], logit[3:])
    logit6, _ = dgpo_group_weights(dsm, ref_dsm, adv, groups, beta_dpo=10.0, group_size=6)
    assert torch.allclose(logit6, logit / 2, rtol=1e-14, atol=0)
    g0 = (adv[:3] * 10.0 * (dsm[:3] - ref_dsm[:3])).sum() / 3
    assert torch.allclose(logit[:3], g0.expand(3), rtol=1e-13, atol=0)
    assert torch.allclose(weight, torch.sigmoid(logit), rtol=0, atol=0)


def test_dgpo_zero_advantage_group_only_trains_through_the_kl():
    v_theta, target, v_ref, adv, groups = _dgpo_inputs(3)
    adv[3:] = 0.0
    v = v_theta.clone().requires_grad_(True)
    loss, m = dgpo_loss(v, target, adv, groups, v_ref=v_ref, clip_dsm=False, beta=0.0, group_size=3)
    assert torch.equal(m["group_weight"][3:], torch.full((3,), 0.5, dtype=D))
    (grad,) = torch.autograd.grad(loss, v)
    assert torch.equal(grad[3:], torch.zeros_like(grad[3:]))
    assert grad[:3].abs().sum() > 0


def test_dgpo_clip_stops_the_gradient_past_the_edge_in_the_advantage_direction():
    v_theta, target, v_ref, _, groups = _dgpo_inputs(4)
    adv = torch.tensor([1.0, 1.0, 0.0, -1.0, -1.0, 0.0], dtype=D)
    # rows 0, 3, 5: old is 3x further from the target than theta (ratio = exp(8 dsm) >> 1);
    # rows 1, 2, 4: old is 5x closer (ratio = exp(-0.96 dsm) << 1)
    better = torch.tensor([True, False, False, True, False, True])
    scale = torch.where(better, 3.0, 0.2).to(D).reshape(-1, 1, 1, 1)
    v_old = target + scale * (v_theta - target)
    v = v_theta.clone().requires_grad_(True)
    loss, m = dgpo_loss(v, target, adv, groups, v_ref=v_ref, v_old=v_old, clip_range=1e-2, clip_dsm=True,
                        clip_kl=True, beta=0.02, group_size=3)
    ratio = m["ratio"]
    assert bool((ratio[better] > 1.01).all()) and bool((ratio[~better] < 0.99).all())
    # A > 0 clips above 1 + eps; A <= 0 (A = 0 included) clips below 1 - eps
    assert m["should_clip"].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    (grad,) = torch.autograd.grad(loss, v)
    clipped = m["should_clip"].bool()
    assert torch.equal(grad[clipped], torch.zeros_like(grad[clipped]))
    assert bool((grad[~clipped].reshape(3, -1).abs().sum(1) > 0).all())


def test_dgpo_ema_reference_needs_the_old_velocity():
    v_theta, target, v_ref, adv, groups = _dgpo_inputs()
    with pytest.raises(ValueError, match="v_old"):
        dgpo_loss(v_theta, target, adv, groups, v_ref=v_ref, clip_dsm=False, use_ema_ref=True, group_size=3)


# ------------------------------------------------------------------------------------------------------------------
# The plugin


def _batch(num_groups=3, K=4, steps=10, shape=(2, 4, 4)):
    g = _gen(5)
    B = num_groups * K
    group_ids = torch.arange(num_groups).repeat_interleave(K)
    perm = torch.randperm(B, generator=g)  # the harness's order need not keep groups contiguous
    rewards = torch.randn(B, generator=g, dtype=D)
    return RolloutBatch(x0=torch.randn(B, *shape, generator=g), cond=None, prompts=["p"] * B, metadata=[{}] * B,
                        group_ids=group_ids[perm], rewards=rewards, advantages=rewards.clone(), reward_components={},
                        sigmas=dpm_flow_sigmas(steps, 3.0))


def test_config_defaults_are_the_geneval_recipe_and_validate_names_the_key():
    c = DGPOConfig()
    assert (c.beta_dpo, c.kl_beta, c.clip_range, c.num_train_times, c.train_time_pool,
            c.rollout_from_old_after) == (100.0, 0.02, 1e-2, 4, 5, 500)
    c.validate()
    with pytest.raises(OptionError, match="train_time_pool"):
        DGPOConfig(num_train_times=6, train_time_pool=5).validate()
    with pytest.raises(OptionError, match="old_decay"):
        DGPOConfig(old_decay="no-such").validate()


def test_plugin_declares_snapshots_and_the_rollout_switch():
    algo = DGPOAlgorithm(DGPOConfig(kl_cfg=4.5))
    assert set(algo.snapshots) == {"old", "ref"} and algo.snapshots["ref"] is None
    assert algo.snapshots["old"](1) == 0.0 and algo.snapshots["old"](301) == pytest.approx(0.3)
    assert algo.rollout.snapshot_at(500) == "theta" and algo.rollout.snapshot_at(501) == "old"
    never = DGPOAlgorithm(DGPOConfig(rollout_from_old_after=-1, clip_dsm=False, kl_beta=0.0))
    assert never.rollout.snapshot_at(10 ** 6) == "theta" and set(never.snapshots) == {"ref"}


def test_items_hold_whole_groups_at_shared_integer_times_with_group_noise():
    batch = _batch()
    algo = DGPOAlgorithm(DGPOConfig(kl_cfg=4.5))
    items = algo.training_items(batch, torch.arange(12), 6, _gen(0))
    # 4 times x 3 groups of 4: a micro-batch of 6 pairs takes one whole group (4 <= 6 < 8)
    assert len(items) == 12 and all(len(item.index) == 4 for item in items)
    grid_ts = [int(v) for v in torch.floor(dpm_flow_sigmas(10, 3.0)[:5] * 1000 + 1e-3)]
    seen = set()
    for item in items:
        assert len(set(batch.group_ids[item.index].tolist())) == 1
        assert item.sigma.dtype == torch.float32 and len(set(item.sigma.tolist())) == 1
        t = float(item.sigma[0])
        assert int(round(t * 1000)) in grid_ts and t * 1000 == pytest.approx(round(t * 1000), abs=1e-4)
        seen.add(t)
        eps = item.data["eps"]
        assert all(torch.equal(eps[0], e) for e in eps)  # one noise per group and time
        tb = item.sigma.reshape(-1, 1, 1, 1)
        assert torch.allclose(item.x, (1 - tb) * item.data["x0"] + tb * eps)
        assert item.snapshots == ("theta", "old", "ref") and item.snapshot_cfg == {"ref": 4.5}
    assert len(seen) == 4
    # The times are drawn once per rollout batch: a second optimizer step over the same batch reuses them.
    again = algo.training_items(batch, torch.arange(12), 6, _gen(1))
    assert {float(i.sigma[0]) for i in again} == seen


def test_items_refuse_a_split_group():
    batch = _batch()
    algo = DGPOAlgorithm(DGPOConfig())
    with pytest.raises(ValueError, match="whole prompt groups"):
        algo.training_items(batch, torch.arange(6), 8, _gen(0))


def test_loss_on_items_matches_the_pure_loss():
    batch = _batch()
    algo = DGPOAlgorithm(DGPOConfig())
    item = algo.training_items(batch, torch.arange(12), 8, _gen(0))[0]
    g = _gen(3)
    v = {name: torch.randn(item.x.shape, generator=g) for name in item.snapshots}
    loss, metrics = algo.loss(item, v)
    target = item.data["eps"] - item.data["x0"]
    expected, _ = dgpo_loss(v["theta"], target, item.data["advantages"], item.data["group_ids"], v_ref=v["ref"],
                            v_old=v["old"], group_size=4)
    assert torch.equal(loss, expected) and metrics["group_weight"].shape == (len(item.index),)
