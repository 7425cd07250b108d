"""Transition items (algorithms/transition_items.py) carry the rollout sampler's step settings to the loss."""
import pytest
import torch

from diffrl_bench.algorithm import RolloutBatch
from diffrl_bench.algorithms.transition_items import transition_items
from diffrl_bench.sampling import Transitions, flow_sigmas


def batch_with(sampler_options):
    B, R = 4, 2
    transitions = Transitions(latents=torch.randn(R + 1, B, 1, 2, 2), steps=torch.arange(R)[:, None].expand(R, B),
                              log_probs=torch.randn(R, B))
    return RolloutBatch(x0=None, cond=None, prompts=["p"] * B, metadata=[{}] * B, group_ids=torch.arange(B) // 2,
                        rewards=torch.zeros(B, dtype=torch.float64), advantages=torch.zeros(B, dtype=torch.float64),
                        reward_components={}, sigmas=flow_sigmas(4), sampler_options=sampler_options,
                        transitions=transitions)


def test_items_carry_exactly_the_step_options_the_sampler_ran_with():
    batch = batch_with({"noise_level": 0.8, "sde_type": "cps", "window_size": 2, "shared_prefix": False})
    items = transition_items(batch, torch.arange(4), 2, ("theta",), batch.advantages, "test")
    assert len(items) == 2 * 2  # (micro-batch of samples) x (recorded step)
    assert all(item.options == {"noise_level": 0.8, "sde_type": "cps"} for item in items)
    assert torch.equal(items[1].data["x_next"], batch.transitions.latents[2, :2])


def test_a_batch_from_a_sampler_without_sde_steps_is_refused_by_name():
    with pytest.raises(ValueError, match=r"lack \['noise_level', 'sde_type'\]"):
        transition_items(batch_with({"model_time": None}), torch.arange(4), 2, ("theta",), torch.zeros(4), "test")


def test_dropping_zero_advantages_trains_only_informative_samples():
    batch = batch_with({"noise_level": 0.7, "sde_type": "sde"})
    advantages = torch.tensor([0.0, 0.0, 1.0, -1.0], dtype=torch.float64)  # group 0 had equal rewards
    items = transition_items(batch, torch.arange(4), 2, ("theta",), advantages, "test", drop_zero_advantage=True)
    assert {int(i) for item in items for i in item.index} == {2, 3}
    assert not any(item.placeholder for item in items)
    kept = transition_items(batch, torch.arange(4), 2, ("theta",), advantages, "test")
    assert {int(i) for item in kept for i in item.index} == {0, 1, 2, 3}


def test_a_step_with_only_zero_advantages_gets_one_placeholder():
    batch = batch_with({"noise_level": 0.7, "sde_type": "sde"})
    items = transition_items(batch, torch.tensor([1, 0]), 2, ("theta", "ref"), torch.zeros(4), "test",
                             drop_zero_advantage=True)
    assert len(items) == 1 and items[0].placeholder and items[0].snapshots == ("theta", "ref")
    assert torch.equal(items[0].x, batch.transitions.latents[0, [1]])
