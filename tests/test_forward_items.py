"""Forward-process training items (algorithms/forward_items.py): group-shared noise and whole-block packing."""
from __future__ import annotations

import pytest
import torch

from diffrl_bench.algorithm import RolloutRequest
from diffrl_bench.algorithms.forward_items import forward_process_items


def _x0(B=6):
    return torch.randn(B, 2, 3, 3, generator=torch.Generator().manual_seed(0))


def test_noise_groups_share_one_noise_per_group_and_time():
    x0 = _x0()
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    times = torch.tensor([[0.9] * 6, [0.5] * 6])
    items = forward_process_items(x0, torch.arange(6), times, torch.Generator().manual_seed(1), 12, ("theta",),
                                  noise_groups=labels)
    (item,) = items
    eps = item.data["eps"].reshape(2, 6, -1)
    for k in range(2):
        for a in range(6):
            for b in range(6):
                assert torch.equal(eps[k, a], eps[k, b]) == bool(labels[a] == labels[b])
    assert not torch.equal(eps[0, 0], eps[1, 0])  # a fresh draw per time


def test_noise_groups_agree_between_processes_holding_parts_of_the_step():
    """Two processes with the same generator and the step's label count draw the same noise for a shared group."""
    x0 = _x0()
    times = torch.full((1, 3), 0.7)
    a = forward_process_items(x0[:3], torch.arange(3), times, torch.Generator().manual_seed(4), 8, ("theta",),
                              noise_groups=torch.tensor([0, 0, 1]), num_noise_groups=3)[0]
    b = forward_process_items(x0[3:], torch.arange(3), times, torch.Generator().manual_seed(4), 8, ("theta",),
                              noise_groups=torch.tensor([1, 2, 2]), num_noise_groups=3)[0]
    assert torch.equal(a.data["eps"][2], b.data["eps"][0])
    assert not torch.equal(a.data["eps"][0], b.data["eps"][1])
    with pytest.raises(ValueError, match="num_noise_groups"):
        forward_process_items(x0[:3], torch.arange(3), times, torch.Generator(), 8, ("theta",),
                              noise_groups=torch.tensor([0, 0, 3]), num_noise_groups=3)


def test_blocks_are_never_split_and_pack_up_to_the_micro_batch():
    x0 = _x0()
    blocks = [torch.tensor([0, 3]), torch.tensor([1, 4]), torch.tensor([2, 5])]
    times = torch.rand(2, 6, generator=torch.Generator().manual_seed(2))
    items = forward_process_items(x0, torch.arange(10, 16), times, torch.Generator(), 5, ("theta",), blocks=blocks)
    assert [item.index.tolist() for item in items] == [[10, 13, 11, 14], [12, 15]] * 2
    assert torch.equal(items[2].sigma, times[1, [0, 3, 1, 4]].to(x0.dtype))
    single = forward_process_items(x0, torch.arange(6), times, torch.Generator(), 1, ("theta",), blocks=blocks)
    assert [len(item.index) for item in single] == [2] * 6  # at least one block per item
    with pytest.raises(ValueError, match="partition"):
        forward_process_items(x0, torch.arange(6), times, torch.Generator(), 4, ("theta",), blocks=blocks[:2])


def test_default_items_are_unchanged_by_the_new_options():
    """Without noise_groups/blocks the draws and cuts are those of the plain builder (the committed runs' numbers)."""
    x0 = _x0()
    times = torch.rand(2, 6, generator=torch.Generator().manual_seed(3))
    items = forward_process_items(x0, torch.arange(6), times, torch.Generator().manual_seed(5), 5, ("theta",))
    eps = torch.randn((2, *x0.shape), generator=torch.Generator().manual_seed(5)).reshape(12, *x0.shape[1:])
    assert [len(i.index) for i in items] == [5, 5, 2]
    assert torch.equal(torch.cat([i.data["eps"] for i in items]), eps)


def test_rollout_request_switches_snapshot_after_the_given_optimizer_steps():
    request = RolloutRequest(snapshot="theta", switch_snapshot="old", switch_after=3)
    assert [request.snapshot_at(n) for n in range(6)] == ["theta"] * 4 + ["old"] * 2
    assert RolloutRequest(switch_snapshot="old").snapshot_at(10 ** 6) == "theta"  # switch_after < 0: never
    assert RolloutRequest(snapshot="old").snapshot_at(0) == "old"
